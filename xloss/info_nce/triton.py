"""The Triton path of InfoNCE: the two tile sweeps of ``cpu.py`` as fused GPU kernels.

Same two primitives, same signatures and meaning as ``cpu.py`` (the autograd Function in ``__init__`` does
everything else):

* ``lse(q, k, scale, need_cols)``: ``_lse_kernel``, one sweep.  A program owns ``BLOCK_M`` rows and walks the
  column blocks of its column split, computing each ``BLOCK_M × BLOCK_N`` logit tile with ``tl.dot`` over
  ``BLOCK_D`` chunks of D.  It keeps an online (running max, running sum) row LSE and writes one partial
  column LSE per (row block, column) to an fp32 buffer ``[num_row_blocks, M]``: every program writes its own
  row of that buffer, so there are no races and no atomics; ``torch.logsumexp(partial, 0)`` finishes it.
* ``grad(q, k, scale, lse_r, lse_c, a, w)``: ``_grad_kernel``, one recomputing sweep.  A program recomputes
  each tile, forms ``P = a_i·exp(z - lse_r_i) + w_j·exp(z - lse_c_j)`` in registers and accumulates
  ``dq_u = P k`` for its own rows and ``dk_u = Pᵀ q`` with ``tl.atomic_add``.

Column splits: a grid over row blocks alone has only ``N / BLOCK_M`` programs (32 for N = 4096), too few for
an H100's 132 SMs, so the launchers also split the columns into ``split`` contiguous ranges (grid axis 1)
when the row blocks alone cannot fill the GPU.  The forward then also writes partial row LSEs
``[split, N]`` (merged with ``torch.logsumexp``), and the backward adds its ``dq`` rows with atomics.

Deterministic mode (``torch.are_deterministic_algorithms_enabled()`` or ``XLOSS_DETERMINISTIC=1``): the
atomic backward sums in a run-dependent order, so instead the backward launches ``_grad_kernel`` twice
without atomics and without column splits: once over row blocks for ``dq`` (plain read-add-store), once with
the roles of q and k swapped (``Pᵀ`` has the same form with ``(k, lse_c, w)`` as rows and ``(q, lse_r, a)``
as columns) over key blocks for ``dk``.  Cost: 2 recompute sweeps instead of 1, i.e. the backward does
``2·2NMD`` (logits twice) + ``2·2NMD`` (dq, dk) = ``8·NMD`` FLOPs instead of ``6·NMD``, and each launch has
only ``N / BLOCK_M`` (resp. ``M / BLOCK_M``) programs.  The forward is deterministic in both modes.

Precision: inputs are loaded in their dtype (fp32/fp16/bf16) and every dot accumulates in fp32; LSE
statistics, P before its cast, and the outputs are fp32.  For fp16/bf16 inputs ``P`` is cast to the input
dtype before the two gradient dots (as flash attention does: tensor-core dots, the same rounding as a
naive half-precision backward); to keep the fp16 range, the weights ``a``, ``w`` are first divided by a power
of two ``c ≥ max|a|, |w|`` (exact) and the outputs multiplied back.  fp32 inputs use IEEE fp32 dots when
``torch.get_float32_matmul_precision() == "highest"`` (PyTorch's default) and TF32 otherwise.  float64 is not
supported (TypeError): use the "cpu" backend for it.

Tile sizes are fixed constants below (smaller under ``TRITON_INTERPRET=1`` to keep CPU tests fast); there is
no autotuning yet (``XLOSS_AUTOTUNE`` is not read).  Inputs need unit stride along D (the launchers call
``.contiguous()`` otherwise); any row stride is passed through.  Offsets are 64-bit.
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

# ----------------------------------------------------------------------------------------------- constants

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")

# (BLOCK_M, BLOCK_N, BLOCK_D chunk for D > SINGLE_D_MAX, num_warps, num_stages).  D <= SINGLE_D_MAX is done in
# one chunk of next_power_of_2(D) (>= 16, tl.dot's minimum): the q block and, in the backward, the dq block
# then stay in registers for the whole column loop.
if _INTERPRET:  # small tiles: the interpreter runs every block op in numpy, and tests use D up to ~130
    FWD_CONFIG = (32, 32, 32, 4, 1)
    BWD_CONFIG = (32, 32, 32, 4, 1)
    SINGLE_D_MAX = 32
    TARGET_PROGRAMS = 8  # so that small test shapes still exercise the column split
else:
    FWD_CONFIG = (128, 64, 64, 8, 3)
    BWD_CONFIG = (64, 64, 64, 8, 2)
    SINGLE_D_MAX = 128
    TARGET_PROGRAMS = None  # None: 2 programs per SM of the current GPU

_LOG2E = tl.constexpr(1.4426950408889634)  # exp(x) = exp2(x·log2 e): exp2 is the native instruction
_LN2 = tl.constexpr(0.6931471805599453)

# ------------------------------------------------------------------------------------------------- kernels


@triton.jit
def _qk_tile(
    q_ptr, k_ptr,  # [N, D], [M, D], unit stride along D
    offs_m, offs_n,  # [BLOCK_M], [BLOCK_N] int64 row / column indices
    row_ok, col_ok,  # [BLOCK_M], [BLOCK_N] masks
    D, stride_qn, stride_kn,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):
    """``<q_i, k_j>`` for one tile, looping over D in BLOCK_D chunks (tails masked to 0). -> [BLOCK_M, BLOCK_N] fp32"""
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        d_ok = offs_d < D
        q_c = tl.load(q_ptr + offs_m[:, None] * stride_qn + offs_d[None, :],
                      mask=row_ok[:, None] & d_ok[None, :], other=0.0)  # [BLOCK_M, BLOCK_D]
        k_c = tl.load(k_ptr + offs_n[:, None] * stride_kn + offs_d[None, :],
                      mask=col_ok[:, None] & d_ok[None, :], other=0.0)  # [BLOCK_N, BLOCK_D]
        acc += tl.dot(q_c, tl.trans(k_c), input_precision=INPUT_PRECISION)
    return acc


@triton.jit
def _lse_kernel(
    q_ptr, k_ptr,  # [N, D], [M, D] fp32/fp16/bf16, unit stride along D
    scale_ptr,  # [] fp32: the logit scale, read on the device (no host sync)
    part_r_ptr,  # [split, N] fp32 out: row LSE over the columns of each split
    part_c_ptr,  # [cdiv(N, BLOCK_M), M] fp32 out: column LSE over the rows of each row block (NEED_COLS)
    N, M, D, stride_qn, stride_kn,
    cols_per_split,  # columns per split, a multiple of BLOCK_N
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    SINGLE_D: tl.constexpr,  # D <= BLOCK_D: load the q block once, outside the column loop
    NEED_COLS: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
):
    # grid: (cdiv(N, BLOCK_M), split).  All LSE arithmetic is in base 2 (z2 = z·log2 e), converted back at the end.
    pid_m = tl.program_id(0).to(tl.int64)
    pid_s = tl.program_id(1).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # [BLOCK_M] int64
    row_ok = offs_m < N
    scale2 = tl.load(scale_ptr).to(tl.float32) * _LOG2E
    if SINGLE_D:
        offs_d = tl.arange(0, BLOCK_D)
        q_blk = tl.load(q_ptr + offs_m[:, None] * stride_qn + offs_d[None, :],
                        mask=row_ok[:, None] & (offs_d[None, :] < D), other=0.0)  # [BLOCK_M, BLOCK_D]
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)  # running max of z2 over the columns seen
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)  # running Σ exp2(z2 - m_i)
    n_lo = pid_s * cols_per_split
    n_hi = tl.minimum(n_lo + cols_per_split, M)
    for start_n in range(n_lo, n_hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N).to(tl.int64)  # [BLOCK_N]
        col_ok = offs_n < M
        if SINGLE_D:
            k_blk = tl.load(k_ptr + offs_n[:, None] * stride_kn + offs_d[None, :],
                            mask=col_ok[:, None] & (offs_d[None, :] < D), other=0.0)  # [BLOCK_N, BLOCK_D]
            dots = tl.dot(q_blk, tl.trans(k_blk), input_precision=INPUT_PRECISION)
        else:
            dots = _qk_tile(q_ptr, k_ptr, offs_m, offs_n, row_ok, col_ok, D, stride_qn, stride_kn,
                            BLOCK_M, BLOCK_N, BLOCK_D, INPUT_PRECISION)
        z2 = dots * scale2  # [BLOCK_M, BLOCK_N]; masked rows/cols read zeros, so every entry is finite
        # Row LSE: invalid columns are -inf.  Every tile has >= 1 valid column, so the new max is finite and
        # exp2(m_i - m_new) never sees -inf - (-inf).
        z_r = tl.where(col_ok[None, :], z2, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(z_r, 1))
        l_i = l_i * tl.exp2(m_i - m_new) + tl.sum(tl.exp2(z_r - m_new[:, None]), 1)
        m_i = m_new
        if NEED_COLS:
            # Column LSE of this row block: invalid rows are -inf; every tile has >= 1 valid row.
            z_c = tl.where(row_ok[:, None], z2, float("-inf"))
            c_max = tl.max(z_c, 0)  # [BLOCK_N]
            c_sum = tl.sum(tl.exp2(z_c - c_max[None, :]), 0)
            tl.store(part_c_ptr + pid_m * M + offs_n, (c_max + tl.log2(c_sum)) * _LN2, mask=col_ok)
    tl.store(part_r_ptr + pid_s * N + offs_m, (m_i + tl.log2(l_i)) * _LN2, mask=row_ok)


@triton.jit
def _grad_kernel(
    q_ptr, k_ptr,  # [N, D] "rows", [M, D] "columns" (swapped for the dk launch of the deterministic mode)
    scale_ptr,  # [] fp32
    lse_r_ptr, a_ptr,  # [N] fp32: row LSE and row-softmax weight (ROW_TERM)
    lse_c_ptr, w_ptr,  # [M] fp32: column LSE and column-softmax weight (COL_TERM)
    dq_ptr,  # [N, D] fp32 in/out (contiguous, zero-initialised): += P k
    dk_ptr,  # [M, D] fp32 in/out (contiguous, zero-initialised): += Pᵀ q with atomics (COMPUTE_DK)
    N, M, D, stride_qn, stride_kn,
    cols_per_split,  # columns per split, a multiple of BLOCK_N
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    SINGLE_D: tl.constexpr,  # D <= BLOCK_D: q block and dq accumulator stay in registers
    ROW_TERM: tl.constexpr,  # P has the a_i·exp(z - lse_r_i) part
    COL_TERM: tl.constexpr,  # P has the w_j·exp(z - lse_c_j) part
    COMPUTE_DK: tl.constexpr,  # also atomically accumulate dk (the default, one-sweep backward)
    DQ_ATOMIC: tl.constexpr,  # several programs (column splits) share these dq rows
    INPUT_PRECISION: tl.constexpr,
):
    # grid: (cdiv(N, BLOCK_M), split).  P_ij = a_i·exp2(z2_ij - lse2_r_i) + w_j·exp2(z2_ij - lse2_c_j) in base 2.
    pid_m = tl.program_id(0).to(tl.int64)
    pid_s = tl.program_id(1).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # [BLOCK_M] int64
    row_ok = offs_m < N
    offs_d = tl.arange(0, BLOCK_D)
    scale2 = tl.load(scale_ptr).to(tl.float32) * _LOG2E
    lse2_r = tl.zeros([BLOCK_M], dtype=tl.float32)
    a = tl.zeros([BLOCK_M], dtype=tl.float32)
    if ROW_TERM:
        lse2_r = tl.load(lse_r_ptr + offs_m, mask=row_ok, other=0.0) * _LOG2E
        a = tl.load(a_ptr + offs_m, mask=row_ok, other=0.0)
    if SINGLE_D:
        d_ok = offs_d < D
        q_blk = tl.load(q_ptr + offs_m[:, None] * stride_qn + offs_d[None, :],
                        mask=row_ok[:, None] & d_ok[None, :], other=0.0)  # [BLOCK_M, BLOCK_D]
        dq_acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    n_lo = pid_s * cols_per_split
    n_hi = tl.minimum(n_lo + cols_per_split, M)
    for start_n in range(n_lo, n_hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N).to(tl.int64)  # [BLOCK_N]
        col_ok = offs_n < M
        if SINGLE_D:
            k_blk = tl.load(k_ptr + offs_n[:, None] * stride_kn + offs_d[None, :],
                            mask=col_ok[:, None] & d_ok[None, :], other=0.0)  # [BLOCK_N, BLOCK_D]
            dots = tl.dot(q_blk, tl.trans(k_blk), input_precision=INPUT_PRECISION)
        else:
            dots = _qk_tile(q_ptr, k_ptr, offs_m, offs_n, row_ok, col_ok, D, stride_qn, stride_kn,
                            BLOCK_M, BLOCK_N, BLOCK_D, INPUT_PRECISION)
        # Out-of-range entries read zeros (z = 0), and exp(0 - LSE) overflows when every logit is below -88:
        # make them -inf so that both exponentials give exactly 0 there (else inf·0 = NaN in the dots below).
        z2 = tl.where(row_ok[:, None] & col_ok[None, :], dots * scale2, float("-inf"))  # [BLOCK_M, BLOCK_N]
        p = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        if ROW_TERM:
            p += a[:, None] * tl.exp2(z2 - lse2_r[:, None])
        if COL_TERM:
            lse2_c = tl.load(lse_c_ptr + offs_n, mask=col_ok, other=0.0) * _LOG2E
            w = tl.load(w_ptr + offs_n, mask=col_ok, other=0.0)
            p += w[None, :] * tl.exp2(z2 - lse2_c[None, :])
        p_in = p.to(q_ptr.dtype.element_ty)  # half inputs: half P for tensor-core dots (fp32 stays fp32)
        if SINGLE_D:
            dq_acc += tl.dot(p_in, k_blk, input_precision=INPUT_PRECISION)
            if COMPUTE_DK:
                dk_part = tl.dot(tl.trans(p_in), q_blk, input_precision=INPUT_PRECISION)  # [BLOCK_N, BLOCK_D]
                tl.atomic_add(dk_ptr + offs_n[:, None] * D + offs_d[None, :], dk_part,
                              mask=col_ok[:, None] & d_ok[None, :], sem="relaxed")
        else:
            # D too large for a register accumulator: per D chunk, dq rows += P k_c in global memory (this
            # program owns them unless DQ_ATOMIC) and dk rows += Pᵀ q_c with atomics.
            for d0 in range(0, D, BLOCK_D):
                offs_dc = d0 + offs_d
                dc_ok = offs_dc < D
                k_c = tl.load(k_ptr + offs_n[:, None] * stride_kn + offs_dc[None, :],
                              mask=col_ok[:, None] & dc_ok[None, :], other=0.0)  # [BLOCK_N, BLOCK_D]
                dq_ptrs = dq_ptr + offs_m[:, None] * D + offs_dc[None, :]
                dq_mask = row_ok[:, None] & dc_ok[None, :]
                dq_c = tl.dot(p_in, k_c, input_precision=INPUT_PRECISION)  # [BLOCK_M, BLOCK_D]
                if DQ_ATOMIC:
                    tl.atomic_add(dq_ptrs, dq_c, mask=dq_mask, sem="relaxed")
                else:
                    tl.store(dq_ptrs, tl.load(dq_ptrs, mask=dq_mask, other=0.0) + dq_c, mask=dq_mask)
                if COMPUTE_DK:
                    q_c = tl.load(q_ptr + offs_m[:, None] * stride_qn + offs_dc[None, :],
                                  mask=dq_mask, other=0.0)  # [BLOCK_M, BLOCK_D]
                    dk_c = tl.dot(tl.trans(p_in), q_c, input_precision=INPUT_PRECISION)  # [BLOCK_N, BLOCK_D]
                    tl.atomic_add(dk_ptr + offs_n[:, None] * D + offs_dc[None, :], dk_c,
                                  mask=col_ok[:, None] & dc_ok[None, :], sem="relaxed")
    if SINGLE_D:
        dq_ptrs = dq_ptr + offs_m[:, None] * D + offs_d[None, :]
        if DQ_ATOMIC:
            tl.atomic_add(dq_ptrs, dq_acc, mask=row_ok[:, None] & d_ok[None, :], sem="relaxed")
        else:
            tl.store(dq_ptrs, dq_acc, mask=row_ok[:, None] & d_ok[None, :])


# ----------------------------------------------------------------------------------------------- launchers

_SUPPORTED = (torch.float32, torch.float16, torch.bfloat16)


def _prepare(q: torch.Tensor, k: torch.Tensor):
    if q.dtype not in _SUPPORTED or k.dtype != q.dtype:
        raise TypeError(
            f"the triton backend of info_nce supports float32, float16 and bfloat16 inputs, got q {q.dtype} and "
            f"k {k.dtype}; use backend='cpu' for float64"
        )
    # The kernels assume unit stride along D (vectorised loads); any row stride is passed to them.
    return (q if q.stride(1) == 1 else q.contiguous()), (k if k.stride(1) == 1 else k.contiguous())


def _input_precision(dtype: torch.dtype) -> str:
    if dtype == torch.float32 and torch.get_float32_matmul_precision() == "highest":
        return "ieee"
    return "tf32"  # allowed TF32 for fp32; ignored by tl.dot for half inputs


def _block_d(d: int, chunk: int) -> tuple[int, bool]:
    """(BLOCK_D, SINGLE_D): one register-resident chunk when D is small, else fixed chunks."""
    if d <= SINGLE_D_MAX:
        return max(16, triton.next_power_of_2(d)), True
    return chunk, False


@functools.cache
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _split(row_blocks: int, col_blocks: int, block_n: int, device: torch.device, allow: bool = True):
    """Split the columns into ranges (grid axis 1) until about TARGET_PROGRAMS programs run.

    Returns ``(split, cols_per_split)``; every range is non-empty and a whole number of column blocks.
    """
    target = TARGET_PROGRAMS
    if target is None:
        target = 2 * _sm_count(device.index if device.index is not None else torch.cuda.current_device()) \
            if device.type == "cuda" else 1
    split = max(1, min(col_blocks, triton.cdiv(target, row_blocks))) if allow else 1
    per = triton.cdiv(col_blocks, split)  # column blocks per range
    return triton.cdiv(col_blocks, per), per * block_n


def _scale_arg(scale: torch.Tensor, device: torch.device) -> torch.Tensor:
    return scale.detach().to(device=device, dtype=torch.float32).reshape(())


def _deterministic() -> bool:
    return torch.are_deterministic_algorithms_enabled() or os.environ.get("XLOSS_DETERMINISTIC", "0") not in ("", "0")


def lse(q: torch.Tensor, k: torch.Tensor, scale: torch.Tensor, need_cols: bool):
    """Row and (optionally) column log-sum-exp of ``z = scale · q kᵀ``, one fused sweep.

    Args:
        q: ``[N, D]``; k: ``[M, D]``: float32/float16/bfloat16, same dtype and device.
        scale: 0-dim tensor (read by the kernel from device memory).
        need_cols: also return the column LSE (symmetric loss).

    Returns:
        ``lse_r [N]`` and ``lse_c [M]`` (or None), float32.
    """
    q, k = _prepare(q, k)
    n, d = q.shape
    m = k.shape[0]
    block_m, block_n, chunk, num_warps, num_stages = FWD_CONFIG
    block_d, single_d = _block_d(d, chunk)
    row_blocks, col_blocks = triton.cdiv(n, block_m), triton.cdiv(m, block_n)
    split, cols_per_split = _split(row_blocks, col_blocks, block_n, q.device)
    part_r = torch.empty(split, n, dtype=torch.float32, device=q.device)
    part_c = torch.empty(row_blocks, m, dtype=torch.float32, device=q.device) if need_cols else part_r
    _lse_kernel[(row_blocks, split)](
        q, k, _scale_arg(scale, q.device), part_r, part_c,
        n, m, d, q.stride(0), k.stride(0), cols_per_split,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d, SINGLE_D=single_d, NEED_COLS=need_cols,
        INPUT_PRECISION=_input_precision(q.dtype), num_warps=num_warps, num_stages=num_stages,
    )
    lse_r = part_r[0] if split == 1 else torch.logsumexp(part_r, 0)
    lse_c = None
    if need_cols:
        lse_c = part_c[0] if row_blocks == 1 else torch.logsumexp(part_c, 0)
    return lse_r, lse_c


def _launch_grad(rows, cols, scale, lse_rows, w_rows, lse_cols, w_cols, d_rows, d_cols, atomic: bool):
    """One ``_grad_kernel`` sweep over row blocks of ``rows``: ``d_rows += P cols`` (and ``d_cols += Pᵀ rows``).

    ``w_rows``/``w_cols`` None drop that part of P; ``d_cols`` is used only when ``atomic``.
    """
    n, d = rows.shape
    m = cols.shape[0]
    block_m, block_n, chunk, num_warps, num_stages = BWD_CONFIG
    block_d, single_d = _block_d(d, chunk)
    row_blocks, col_blocks = triton.cdiv(n, block_m), triton.cdiv(m, block_n)
    split, cols_per_split = _split(row_blocks, col_blocks, block_n, rows.device, allow=atomic)
    row_term, col_term = w_rows is not None, w_cols is not None
    dummy = d_rows  # never read: its constexpr flag is off
    _grad_kernel[(row_blocks, split)](
        rows, cols, scale,
        lse_rows if row_term else dummy, w_rows if row_term else dummy,
        lse_cols if col_term else dummy, w_cols if col_term else dummy,
        d_rows, d_cols if atomic else dummy,
        n, m, d, rows.stride(0), cols.stride(0), cols_per_split,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d, SINGLE_D=single_d,
        ROW_TERM=row_term, COL_TERM=col_term, COMPUTE_DK=atomic, DQ_ATOMIC=split > 1,
        INPUT_PRECISION=_input_precision(rows.dtype), num_warps=num_warps, num_stages=num_stages,
    )


def grad(q, k, scale, lse_r, lse_c, a, w):
    """Unscaled gradient products of one recomputing sweep (two in deterministic mode).

    Args:
        q: ``[N, D]``; k: ``[M, D]``: float32/float16/bfloat16; scale: 0-dim tensor.
        lse_r: ``[N]`` row LSE; lse_c: ``[M]`` column LSE or None (one-way loss).
        a: ``[N]`` weight of each row softmax; w: ``[M]`` weight of each column softmax, or None.

    Returns:
        ``dq_u = P k`` ``[N, D]`` and ``dk_u = Pᵀ q`` ``[M, D]``, float32, for
        ``P_ij = a_i exp(z_ij - lse_r_i) + w_j exp(z_ij - lse_c_j)``.
    """
    q, k = _prepare(q, k)
    dev = q.device
    cols = lse_c is not None
    f32 = {"dtype": torch.float32, "device": dev}
    lse_r, a = lse_r.to(**f32).contiguous(), a.to(**f32).contiguous()
    if cols:
        lse_c, w = lse_c.to(**f32).contiguous(), w.to(**f32).contiguous()
    else:
        lse_c = w = None
    c = None
    if q.dtype != torch.float32:
        # Half P: bring the weights to max |weight| <= 1 with an exact power-of-two factor, so that P's entries
        # are probabilities-sized and do not underflow fp16 (a_i ~ 1/N would); undone on the outputs.
        c = a.abs().amax() if not cols else torch.maximum(a.abs().amax(), w.abs().amax())
        c = torch.where(c > 0, torch.exp2(torch.ceil(torch.log2(c))), torch.ones_like(c))
        a = a / c
        w = w / c if cols else None
    s = _scale_arg(scale, dev)
    n, d = q.shape
    m = k.shape[0]
    dq = torch.zeros(n, d, **f32)
    dk = torch.zeros(m, d, **f32)
    if _deterministic():
        _launch_grad(q, k, s, lse_r, a, lse_c, w, dq, None, atomic=False)
        _launch_grad(k, q, s, lse_c, w, lse_r, a, dk, None, atomic=False)  # Pᵀ: roles swapped
    else:
        _launch_grad(q, k, s, lse_r, a, lse_c, w, dq, dk, atomic=True)
    if c is not None:
        dq.mul_(c)
        dk.mul_(c)
    return dq, dk
