"""The Triton path of InfoNCE: the two tile sweeps of ``chunked.py`` as fused GPU kernels.

Same two primitives, same signatures and meaning as ``chunked.py`` (the ``InfoNCEEngine`` protocol of ``engine.py``) (the autograd Function in ``__init__`` does
everything else):

* ``lse(q, k, scale, need_cols, labels, keep_logits)``: ``_lse_kernel``, one sweep.  A program owns ``BLOCK_M`` rows and
  walks the column blocks of its column split, computing each ``BLOCK_M × BLOCK_N`` logit tile with
  ``tl.dot`` over ``BLOCK_D`` chunks of D.  It keeps online row statistics (running max of z, running
  Σ exp(z - max)) and writes one partial column max and sum per (row block, column) to fp32 buffers
  ``[num_row_blocks, M]``: every program writes its own row of those buffers, so there are no races and no
  atomics; ``_merge`` finishes them exactly (``max = max_b pmax_b``, ``sum = Σ_b psum_b·exp(pmax_b - max)``).
  The result stays split, ``row [2, N] = (max_j z_ij, log Σ_j exp(z_ij - max))``, in natural-log units, and
  ``col [2, M]``.  The same sweep also picks each row's positive logit ``z_pos_i = z_{i, labels[i]}`` out of
  the tile that holds it (``Σ_j [j = labels[i]]·z_ij``: one nonzero term, exact), i.e. the very value whose
  max was taken, so that ``row_max_i - z_pos_i`` is exactly 0 when the positive is the row max (as in naive
  PyTorch, which takes both from one logits matrix; a separately computed ``s·<q_i, k_{labels[i]}>`` sums in
  another order and leaves |z|·eps there).  Each label lies in exactly one column split, whose program
  stores it.
* ``grad(q, k, scale, row, col, a, w)``: ``_grad_kernel``, one recomputing sweep.  A program recomputes
  each tile, forms ``P = a_i·exp((z - m_i) - ls_i) + w_j·exp((z - m_j) - ls_j)`` in registers and
  accumulates ``dq_u = P k`` for its own rows and ``dk_u = Pᵀ q`` with ``tl.atomic_add``.

Why split statistics: a softmax entry formed as ``exp(z - lse)`` with ``lse`` one fp32 number of size |z|
(~100 at CLIP's logit scale) carries an error of |z|·eps in every entry, which the cancellation
``P - onehot`` of the InfoNCE gradient turns into gradients 6-800× less accurate than PyTorch's
``log_softmax`` (which computes ``(z - max) - log Σ exp(z - max)``).  So both kernels work with
``z = dot·scale`` in natural units (the backward recomputes the same z, with the same D chunks, as the
forward), subtract the max first, and only the small difference goes to the base-2 domain:
``exp2((z - m)·log2 e)``; a |z|-sized number times log2 e never appears.  The backward folds the weight in as
``a_i·exp((z - m) - ls) = sign(a_i)·exp((z - m) - shift_i)``, ``shift_i = ls_i - log|a_i|`` (a zero weight:
shift +inf, sign 0, exactly 0), after dividing all weights by an exact power of two ``c`` with
``max |weight| / c`` in (1/2, 1] so that ``log|a_i|`` is ~0 (uniform weights give exactly 0) and its
rounding adds nothing to the exponent; the outputs are multiplied by ``c``.

Column splits: a grid over row blocks alone has only ``N / BLOCK_M`` programs (32 for N = 4096), too few for
an H100's 132 SMs, so the launchers also split the columns into ``split`` contiguous ranges (grid axis 1)
when the row blocks alone cannot fill the GPU.  The forward then also writes partial row statistics
``[split, N]`` (merged by ``_merge``), and the backward adds its ``dq`` rows with atomics.

Deterministic mode (``torch.are_deterministic_algorithms_enabled()`` or ``XLOSS_DETERMINISTIC=1``): the
atomic backward sums in a run-dependent order, so instead the backward launches ``_grad_kernel`` twice
without atomics and without column splits: once over row blocks for ``dq`` (plain read-add-store), once with
the roles of q and k swapped (``Pᵀ`` has the same form with ``(k, col, w)`` as rows and ``(q, row, a)``
as columns) over key blocks for ``dk``.  Cost: 2 recompute sweeps instead of 1, i.e. the backward does
``2·2NMD`` (logits twice) + ``2·2NMD`` (dq, dk) = ``8·NMD`` FLOPs instead of ``6·NMD``, and each launch has
only ``N / BLOCK_M`` (resp. ``M / BLOCK_M``) programs.  The forward is deterministic in both modes.

Precision: inputs are loaded in their dtype (fp32/fp16/bf16) and every dot accumulates in fp32; LSE
statistics, P before its cast, and the outputs are fp32.  For fp16/bf16 inputs ``P`` is cast to the input
dtype before the two gradient dots (as flash attention does: tensor-core dots, the same rounding as a
naive half-precision backward); the power-of-two rescale of the weights above also keeps P in fp16's
range (``a_i ~ 1/N`` would underflow).  fp32 inputs use IEEE fp32 dots when
``torch.get_float32_matmul_precision() == "highest"`` (PyTorch's default) and TF32 otherwise.  float64 is not
supported (TypeError): use the "cpu" backend for it.

Tile sizes are fixed constants below (smaller under ``TRITON_INTERPRET=1`` to keep CPU tests fast); there is
no autotuning yet (``XLOSS_AUTOTUNE`` is not read).  Inputs need unit stride along D (the launchers call
``.contiguous()`` otherwise); any row stride is passed through.  Offsets are 64-bit.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from .. import _triton_common as _common
from .._triton_common import dot_tile

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
# The backward must recompute the forward's logits bit for bit where it can (the statistics are relative to
# the forward's max): the same D chunking in both sweeps.
assert FWD_CONFIG[2] == BWD_CONFIG[2]

_LOG2E = tl.constexpr(1.4426950408889634)  # exp(x) = exp2(x·log2 e): exp2 is the native instruction

# ------------------------------------------------------------------------------------------------- kernels


@triton.jit
def _lse_kernel(
    q_ptr, k_ptr,  # [N, D], [M, D] fp32/fp16/bf16, unit stride along D
    scale_ptr,  # [] fp32: the logit scale, read on the device (no host sync)
    pmax_r_ptr, psum_r_ptr,  # [split, N] fp32 out: row max of z, Σ exp(z - max), over each split's columns
    pmax_c_ptr, psum_c_ptr,  # [cdiv(N, BLOCK_M), M] fp32 out: the same per column, per row block (NEED_COLS)
    labels_ptr,  # [N] int64: each row's positive column, in [0, M)
    zpos_ptr,  # [N] fp32 out: z[i, labels[i]], stored by the program whose column range holds the label
    N, M, D, stride_qn, stride_kn,
    cols_per_split,  # columns per split, a multiple of BLOCK_N
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    SINGLE_D: tl.constexpr,  # D <= BLOCK_D: load the q block once, outside the column loop
    NEED_COLS: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
):
    # grid: (cdiv(N, BLOCK_M), split).  Logits and maxes are in natural units, z = dot·scale exactly as
    # _grad_kernel recomputes them; only differences z - max (small where it matters) go to base 2.
    pid_m = tl.program_id(0).to(tl.int64)
    pid_s = tl.program_id(1).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # [BLOCK_M] int64
    row_ok = offs_m < N
    scale = tl.load(scale_ptr).to(tl.float32)
    label = tl.load(labels_ptr + offs_m, mask=row_ok, other=-1).to(tl.int64)  # [BLOCK_M]; -1: no column
    if SINGLE_D:
        offs_d = tl.arange(0, BLOCK_D)
        q_blk = tl.load(q_ptr + offs_m[:, None] * stride_qn + offs_d[None, :],
                        mask=row_ok[:, None] & (offs_d[None, :] < D), other=0.0)  # [BLOCK_M, BLOCK_D]
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)  # running max of z over the columns seen
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)  # running Σ exp(z - m_i)
    z_pos = tl.zeros([BLOCK_M], dtype=tl.float32)  # z[i, label_i] once its tile is seen (+0.0 terms: exact)
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
            dots = dot_tile(q_ptr, k_ptr, offs_m, offs_n, row_ok, col_ok, D, stride_qn, stride_kn,
                            BLOCK_M, BLOCK_N, BLOCK_D, INPUT_PRECISION)
        z = dots * scale  # [BLOCK_M, BLOCK_N]; masked rows/cols read zeros, so every entry is finite
        # Row statistics: invalid columns are -inf.  Every tile has >= 1 valid column, so the new max is
        # finite and exp2((m_i - m_new)·log2 e) never sees -inf - (-inf) (first tile: exp2(-inf) = 0).
        z_r = tl.where(col_ok[None, :], z, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(z_r, 1))
        l_i = l_i * tl.exp2((m_i - m_new) * _LOG2E) + tl.sum(tl.exp2((z_r - m_new[:, None]) * _LOG2E), 1)
        m_i = m_new
        # The positive logit from the same z (its column is valid, so z_r holds the same value there): one
        # tile holds it, every other term is +0.0, so the sums are exact and z_pos equals that entry.
        z_pos += tl.sum(tl.where(offs_n[None, :] == label[:, None], z, 0.0), 1)
        if NEED_COLS:
            # Column statistics of this row block: invalid rows are -inf; every tile has >= 1 valid row.
            z_c = tl.where(row_ok[:, None], z, float("-inf"))
            c_max = tl.max(z_c, 0)  # [BLOCK_N]
            c_sum = tl.sum(tl.exp2((z_c - c_max[None, :]) * _LOG2E), 0)
            tl.store(pmax_c_ptr + pid_m * M + offs_n, c_max, mask=col_ok)
            tl.store(psum_c_ptr + pid_m * M + offs_n, c_sum, mask=col_ok)
    tl.store(pmax_r_ptr + pid_s * N + offs_m, m_i, mask=row_ok)
    tl.store(psum_r_ptr + pid_s * N + offs_m, l_i, mask=row_ok)
    # Exactly one program per row has the label in its column range [n_lo, n_hi): no race.
    tl.store(zpos_ptr + offs_m, z_pos, mask=row_ok & (label >= n_lo) & (label < n_hi))


@triton.jit
def _grad_kernel(
    q_ptr, k_ptr,  # [N, D] "rows", [M, D] "columns" (swapped for the dk launch of the deterministic mode)
    scale_ptr,  # [] fp32
    st_r_ptr,  # [3, N] fp32 (ROW_TERM): per row m_i, shift_i = log Σ_j exp(z_ij - m_i) - log|a_i|, sign(a_i)
    st_c_ptr,  # [3, M] fp32: the same per column, with the column-softmax weight w_j (COL_TERM)
    dq_ptr,  # [N, D] fp32 in/out (contiguous, zero-initialised): += P k
    dk_ptr,  # [M, D] fp32 in/out (contiguous, zero-initialised): += Pᵀ q with atomics (COMPUTE_DK)
    N, M, D, stride_qn, stride_kn,
    cols_per_split,  # columns per split, a multiple of BLOCK_N
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    SINGLE_D: tl.constexpr,  # D <= BLOCK_D: q block and dq accumulator stay in registers
    ROW_TERM: tl.constexpr,  # P has the a_i·exp((z - m_i) - ls_i) part
    COL_TERM: tl.constexpr,  # P has the w_j·exp((z - m_j) - ls_j) part
    COMPUTE_DK: tl.constexpr,  # also atomically accumulate dk (the default, one-sweep backward)
    DQ_ATOMIC: tl.constexpr,  # several programs (column splits) share these dq rows
    INPUT_PRECISION: tl.constexpr,
):
    # grid: (cdiv(N, BLOCK_M), split).  P_ij = sign_i·exp2((z_ij - m_i)·log2 e - shift_i·log2 e) + (same per
    # column j), with z = dot·scale in natural units as in _lse_kernel: the max is subtracted first, so the
    # exponent is small wherever P is not negligible and no |z|-sized number reaches exp2.
    pid_m = tl.program_id(0).to(tl.int64)
    pid_s = tl.program_id(1).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # [BLOCK_M] int64
    row_ok = offs_m < N
    offs_d = tl.arange(0, BLOCK_D)
    scale = tl.load(scale_ptr).to(tl.float32)
    max_r = tl.zeros([BLOCK_M], dtype=tl.float32)
    shift2_r = tl.zeros([BLOCK_M], dtype=tl.float32)
    sign_r = tl.zeros([BLOCK_M], dtype=tl.float32)
    if ROW_TERM:
        max_r = tl.load(st_r_ptr + offs_m, mask=row_ok, other=0.0)
        shift2_r = tl.load(st_r_ptr + N + offs_m, mask=row_ok, other=0.0) * _LOG2E  # +inf where a_i = 0
        sign_r = tl.load(st_r_ptr + N + N + offs_m, mask=row_ok, other=0.0)
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
            dots = dot_tile(q_ptr, k_ptr, offs_m, offs_n, row_ok, col_ok, D, stride_qn, stride_kn,
                            BLOCK_M, BLOCK_N, BLOCK_D, INPUT_PRECISION)
        # Out-of-range entries read zeros (z = 0) and their max/shift read 0, so exp(z - max) would be
        # exp(0) (and overflow for a far-away max): make them -inf so that both exponentials give exactly 0
        # there (else inf·0 = NaN in the dots below).  A zero weight has shift +inf: exp2(-inf)·0 = 0.
        z = tl.where(row_ok[:, None] & col_ok[None, :], dots * scale, float("-inf"))  # [BLOCK_M, BLOCK_N]
        p = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        if ROW_TERM:
            p += sign_r[:, None] * tl.exp2((z - max_r[:, None]) * _LOG2E - shift2_r[:, None])
        if COL_TERM:
            max_c = tl.load(st_c_ptr + offs_n, mask=col_ok, other=0.0)
            shift2_c = tl.load(st_c_ptr + M + offs_n, mask=col_ok, other=0.0) * _LOG2E
            sign_c = tl.load(st_c_ptr + M + M + offs_n, mask=col_ok, other=0.0)
            p += sign_c[None, :] * tl.exp2((z - max_c[None, :]) * _LOG2E - shift2_c[None, :])
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

def _split(row_blocks: int, col_blocks: int, block_n: int, device: torch.device, allow: bool = True):
    target = TARGET_PROGRAMS if TARGET_PROGRAMS is not None else _common.device_programs(device, 2)
    return _common.column_split(row_blocks, col_blocks, block_n, target, allow)


def _scale_arg(scale: torch.Tensor, device: torch.device) -> torch.Tensor:
    return scale.detach().to(device=device, dtype=torch.float32).reshape(())


def _merge(pmax: torch.Tensor, psum: torch.Tensor) -> torch.Tensor:
    """Exact merge of partials ``[B, L]`` (max, Σ exp(z - max)) into ``[2, L]`` (max, log Σ exp(z - max)).

    ``max = max_b pmax_b`` and ``Σ_b psum_b·exp(pmax_b - max)``: only differences of maxes reach ``exp``.
    A non-finite max (a fully masked partial set, which the launchers never produce, or non-finite logits)
    is replaced by 0 as the subtrahend so that no ``-inf - (-inf)`` NaN appears; such partials contribute 0.
    """
    if pmax.shape[0] == 1:
        return torch.stack((pmax[0], torch.log(psum[0])))
    mx = pmax.amax(0)
    ref = torch.where(torch.isfinite(mx), mx, torch.zeros_like(mx))
    total = (psum * torch.exp(pmax - ref)).sum(0)
    return torch.stack((mx, torch.log(total)))


def lse(q: torch.Tensor, k: torch.Tensor, scale: torch.Tensor, need_cols: bool, labels: torch.Tensor,
        keep_logits: bool = False):
    """Split log-sum-exp statistics of ``z = scale · q kᵀ`` over rows and (optionally) columns, and the
    positive logits, one sweep.

    Args:
        q: ``[N, D]``; k: ``[M, D]``: float32/float16/bfloat16, same dtype and device.
        scale: 0-dim tensor (read by the kernel from device memory).
        need_cols: also return the column statistics (symmetric loss).
        labels: ``[N]`` integer tensor on the same device, each query's positive key, values in ``[0, M)``.

    Returns:
        ``row [2, N]`` and ``col [2, M]`` (or None), float32, natural-log units: ``row[0, i] = max_j z_ij``
        and ``row[1, i] = log Σ_j exp(z_ij - row[0, i])``; ``col`` the same over i.  The LSE is
        ``row[0] + row[1]``.  ``z_pos [N]`` float32: ``z[i, labels[i]]``, the same value (same dot, same D
        chunks, same ``· scale``) that the row max was taken over, so ``row[0] - z_pos`` is exactly 0 where
        the positive is the max.  A label outside ``[0, M)`` (not checked here) leaves NaN.
    """
    q, k = _common.unit_stride_rows("info_nce", q, k)
    n, d = q.shape
    m = k.shape[0]
    block_m, block_n, chunk, num_warps, num_stages = FWD_CONFIG
    block_d, single_d = _common.block_d(d, chunk, SINGLE_D_MAX)
    row_blocks, col_blocks = triton.cdiv(n, block_m), triton.cdiv(m, block_n)
    split, cols_per_split = _split(row_blocks, col_blocks, block_n, q.device)
    part_r = torch.empty(2, split, n, dtype=torch.float32, device=q.device)  # [max, Σ exp(z - max)]
    part_c = torch.empty(2, row_blocks, m, dtype=torch.float32, device=q.device) if need_cols else part_r
    labels = labels.to(device=q.device, dtype=torch.int64).contiguous()
    z_pos = torch.full((n,), float("nan"), dtype=torch.float32, device=q.device)  # every entry written once
    _lse_kernel[(row_blocks, split)](
        q, k, _scale_arg(scale, q.device), part_r[0], part_r[1], part_c[0], part_c[1], labels, z_pos,
        n, m, d, q.stride(0), k.stride(0), cols_per_split,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d, SINGLE_D=single_d, NEED_COLS=need_cols,
        INPUT_PRECISION=_common.input_precision(q.dtype), num_warps=num_warps, num_stages=num_stages,
    )
    row = _merge(part_r[0], part_r[1])
    col = _merge(part_c[0], part_c[1]) if need_cols else None
    return row, col, z_pos, None  # the kernels never keep the logits (keep_logits is False): backward recomputes


def _kernel_stats(stats: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``[3, L]`` fp32 for ``_grad_kernel``: max, ``shift = ls - log|weight|`` and ``sign(weight)``.

    ``weight·exp((z - max) - ls) = sign·exp((z - max) - shift)``; a zero weight gives shift +inf and sign 0,
    i.e. exactly 0 in the kernel.
    """
    return torch.stack((stats[0], stats[1] - torch.log(weight.abs()), torch.sign(weight)))


def _launch_grad(rows, cols, scale, st_rows, st_cols, d_rows, d_cols, atomic: bool):
    """One ``_grad_kernel`` sweep over row blocks of ``rows``: ``d_rows += P cols`` (and ``d_cols += Pᵀ rows``).

    ``st_rows``/``st_cols``: ``[3, L]`` from ``_kernel_stats``, None drops that part of P; ``d_cols`` is used
    only when ``atomic``.
    """
    n, d = rows.shape
    m = cols.shape[0]
    block_m, block_n, chunk, num_warps, num_stages = BWD_CONFIG
    block_d, single_d = _common.block_d(d, chunk, SINGLE_D_MAX)
    row_blocks, col_blocks = triton.cdiv(n, block_m), triton.cdiv(m, block_n)
    split, cols_per_split = _split(row_blocks, col_blocks, block_n, rows.device, allow=atomic)
    row_term, col_term = st_rows is not None, st_cols is not None
    dummy = d_rows  # never read: its constexpr flag is off
    _grad_kernel[(row_blocks, split)](
        rows, cols, scale,
        st_rows if row_term else dummy, st_cols if col_term else dummy,
        d_rows, d_cols if atomic else dummy,
        n, m, d, rows.stride(0), cols.stride(0), cols_per_split,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d, SINGLE_D=single_d,
        ROW_TERM=row_term, COL_TERM=col_term, COMPUTE_DK=atomic, DQ_ATOMIC=split > 1,
        INPUT_PRECISION=_common.input_precision(rows.dtype), num_warps=num_warps, num_stages=num_stages,
    )


def grad(q, k, scale, row, col, a, w, logits=None):
    """Unscaled gradient products of one recomputing sweep (two in deterministic mode).

    Args:
        q: ``[N, D]``; k: ``[M, D]``: float32/float16/bfloat16; scale: 0-dim tensor.
        row: ``[2, N]`` row statistics of ``lse`` (max, log Σ exp(z - max)); col: ``[2, M]`` or None, one-way.
        a: ``[N]`` weight of each row softmax; w: ``[M]`` weight of each column softmax, or None.

    Returns:
        ``dq_u = P k`` ``[N, D]`` and ``dk_u = Pᵀ q`` ``[M, D]``, float32, for
        ``P_ij = a_i exp((z_ij - row[0,i]) - row[1,i]) + w_j exp((z_ij - col[0,j]) - col[1,j])``.
    """
    q, k = _common.unit_stride_rows("info_nce", q, k)
    dev = q.device
    cols = col is not None
    f32 = {"dtype": torch.float32, "device": dev}
    row, a = row.to(**f32), a.to(**f32)
    if cols:
        col, w = col.to(**f32), w.to(**f32)
    # Bring the weights to max |weight| in (1/2, 1] by an exact power-of-two factor c, undone on the outputs.
    # Half inputs: P's entries are then probability-sized and do not underflow fp16 (a_i ~ 1/N would).  All
    # dtypes: log|weight| in the shift is then near 0 for the largest weights (uniform a_i = 1/N gives
    # log|a_i/c| = 0), so its rounding does not add log(N)·eps to the exponent where P ≈ 1.
    c = a.abs().amax() if not cols else torch.maximum(a.abs().amax(), w.abs().amax())
    c = torch.where((c > 0) & torch.isfinite(c), torch.exp2(torch.ceil(torch.log2(c))), torch.ones_like(c))
    st_r = _kernel_stats(row, a / c)
    st_c = _kernel_stats(col, w / c) if cols else None
    s = _scale_arg(scale, dev)
    n, d = q.shape
    m = k.shape[0]
    dq = torch.zeros(n, d, **f32)
    dk = torch.zeros(m, d, **f32)
    if _common.deterministic():
        _launch_grad(q, k, s, st_r, st_c, dq, None, atomic=False)
        _launch_grad(k, q, s, st_c, st_r, dk, None, atomic=False)  # Pᵀ: roles swapped
    else:
        _launch_grad(q, k, s, st_r, st_c, dq, dk, atomic=True)
    dq.mul_(c)
    dk.mul_(c)
    return dq, dk


def keeps_logits(n: int, m: int, itemsize: int) -> bool:
    """Never: the kernels recompute the logit tiles in backward (``InfoNCEEngine`` protocol)."""
    return False
