"""The Triton path of the sigmoid loss: the one-sweep ``forward_backward`` of ``chunked.py`` as a fused kernel.

Same engine contract as ``chunked.py`` (``SigmoidEngine`` in ``engine.py``).  ``_sigmoid_kernel``: a program owns
``BLOCK_M`` query rows and walks the column blocks of its column split.  Per ``BLOCK_M × BLOCK_N`` tile it
computes ``z = s·<q_i, k_j> + b`` with ``tl.dot`` (over ``BLOCK_D`` chunks of D when D is large), then in
registers, with ``t = -y·z`` (``y = +1`` on the positive pair ``j = labels[i]``, else -1; with group ids, the
``GROUPS`` variant, ``y = +1`` where the tile's query and key ids are equal) and ``e = exp(-|z|)`` (in (0, 1],
never overflows):

* loss ``-log σ(y z) = softplus(t) = max(t, 0) + log1p(e)``, summed per row (``log1p`` in Goldberg's
  accurate form, since Triton 3.6 has none: a naive ``log(1 + e)`` drops every term below 6e-8, i.e. all the
  well-separated negatives of SigLIP's ``b = -10``);
* ``dZ = -y·σ(t)`` with ``σ(t) = 1/(1+e)`` for ``t >= 0`` and ``e/(1+e)`` otherwise (no cancellation), and its
  row sums (for ``db``);
* ``dq_i += Σ_j dZ_ij k_j`` in a register accumulator (or, for large D, in global memory chunk by chunk) and
  ``dk_j += Σ_i dZ_ij q_i`` with ``tl.atomic_add``.

The launcher finishes the O((N+M)·D) rest: ``dq = s·(dZ k)``, ``dk = s·(dZᵀ q)`` (the kernel multiplies by
the unscaled q: the launcher scales the sum), ``ds = Σ_i <q_i, (dZ k)_i>``, ``db = Σ dZ`` and the loss from the
per-row partial sums ``[split, n]`` (summed on the host side in a fixed order: deterministic).

Column splits: a grid over row blocks alone has too few programs to fill a large GPU for small n, so the
columns are split into ``split`` contiguous ranges (grid axis 1) as in ``xloss/infonce/triton.py``; the
programs of one row block then add their dq rows with atomics.

Deterministic mode (``torch.are_deterministic_algorithms_enabled()`` or ``XLOSS_DETERMINISTIC=1``): no atomics.
The first launch (no column split) computes the loss, the row sums and dq with plain stores; a second launch
over key blocks (``TRANSPOSED``: the roles of q and k swapped, ``y_ji = +1`` where ``labels[i] = j``) recomputes
each tile and accumulates ``dk`` in registers.  Cost: one more logits GEMM sweep (4 instead of 3).

Precision: inputs are loaded in their dtype (fp32/fp16/bf16), dots accumulate in fp32, everything else is
fp32.  For half inputs ``dZ`` is cast to the input dtype before the two gradient dots (tensor-core dots, the
rounding a naive half backward has too).  Row weights (``row_weight``) are divided by a power of two that
brings the largest to (1/2, 1] first, so that ``w·dZ`` does not underflow fp16 for weights like 1/N; the
outputs are multiplied back.  fp32 inputs use IEEE fp32 dots when ``torch.get_float32_matmul_precision() ==
"highest"`` and TF32 otherwise.  float64 is not supported (TypeError): use the "cpu" backend for it.

Tile sizes are fixed constants below (smaller under ``TRITON_INTERPRET=1`` to keep CPU tests fast), no
autotuning.  Inputs need unit stride along D (the launcher calls ``.contiguous()`` otherwise); any row stride is
passed through.  Offsets are 64-bit.
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
# The interpreter uses small tiles (fast numpy steps; tiny test shapes still span several tiles), except when
# XLOSS_TRITON_GPU_TILES=1 asks for the GPU's: tools/check_triton_compiles.py --report records those variants.
_SMALL_TILES = _INTERPRET and os.environ.get("XLOSS_TRITON_GPU_TILES", "0") in ("", "0")

# (BLOCK_M, BLOCK_N, BLOCK_D chunk for D > SINGLE_D_MAX, num_warps, num_stages).  D <= SINGLE_D_MAX is done in
# one chunk of next_power_of_2(D) (>= 16, tl.dot's minimum): the q block and the dq accumulator then stay in
# registers for the whole column loop.
if _SMALL_TILES:  # small tiles: the interpreter runs every block op in numpy, and tests use D up to ~70
    CONFIG = (32, 32, 32, 4, 1)
    SINGLE_D_MAX = 32
    TARGET_PROGRAMS = 4  # so that small test shapes still exercise the column split
else:
    CONFIG = (64, 64, 64, 8, 2)
    SINGLE_D_MAX = 128
    TARGET_PROGRAMS = None  # None: 2 programs per SM of the current GPU

_LOG2E = tl.constexpr(1.4426950408889634)
_LN2 = tl.constexpr(0.6931471805599453)

# ------------------------------------------------------------------------------------------------- kernels


@triton.jit
def _sigmoid_kernel(
    r_ptr, c_ptr,  # [R, D] rows, [C, D] columns: q and k (k and q when TRANSPOSED); unit stride along D
    scale_ptr, bias_ptr,  # [] fp32: logit scale and bias, read on the device (no host sync)
    labels_ptr,  # [N] int64: each query's positive key in [0, M), or -1 (none in this block); not with GROUPS
    row_groups_ptr, col_groups_ptr,  # [R], [C] int64 group ids of the rows and the columns (GROUPS)
    weight_ptr,  # [N] fp32: per-query gradient weight (HAS_WEIGHT)
    loss_ptr, dsum_ptr,  # [split, R] fp32 out: per-row Σ softplus(-y z) and Σ dZ over the split (WRITE_STATS)
    drows_ptr,  # [R, D] fp32 out (contiguous, zero-initialised): += dZ c  (NEED_GRAD)
    dcols_ptr,  # [C, D] fp32 in/out (contiguous, zero-initialised): += dZᵀ r with atomics (COMPUTE_DCOLS)
    R, C, D, stride_r, stride_c,
    cols_per_split,  # columns per split, a multiple of BLOCK_N
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    SINGLE_D: tl.constexpr,  # D <= BLOCK_D: the row block and its gradient accumulator stay in registers
    TRANSPOSED: tl.constexpr,  # rows are keys, columns are queries (labels and weights index columns)
    GROUPS: tl.constexpr,  # y = +1 iff the row's and the column's group ids match (else the labels decide)
    HAS_WEIGHT: tl.constexpr,
    WRITE_STATS: tl.constexpr,  # store the per-row loss and dZ sums
    NEED_GRAD: tl.constexpr,  # accumulate drows (and dcols)
    COMPUTE_DCOLS: tl.constexpr,  # also accumulate dcols with atomics (the one-launch mode)
    DROWS_ATOMIC: tl.constexpr,  # several programs (column splits) share these drows rows
    INPUT_PRECISION: tl.constexpr,
):
    # grid: (cdiv(R, BLOCK_M), split)
    pid_m = tl.program_id(0).to(tl.int64)
    pid_s = tl.program_id(1).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # [BLOCK_M] int64
    row_ok = offs_m < R
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    scale = tl.load(scale_ptr).to(tl.float32)
    bias = tl.load(bias_ptr).to(tl.float32)
    if GROUPS:
        group_r = tl.load(row_groups_ptr + offs_m, mask=row_ok, other=0)  # [BLOCK_M]
    if not TRANSPOSED:
        if not GROUPS:
            label_r = tl.load(labels_ptr + offs_m, mask=row_ok, other=-1).to(tl.int64)  # [BLOCK_M]
        if HAS_WEIGHT:
            weight_r = tl.load(weight_ptr + offs_m, mask=row_ok, other=0.0)
    if SINGLE_D:
        r_blk = tl.load(r_ptr + offs_m[:, None] * stride_r + offs_d[None, :],
                        mask=row_ok[:, None] & d_ok[None, :], other=0.0)  # [BLOCK_M, BLOCK_D]
        dr_acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    loss_acc = tl.zeros([BLOCK_M], dtype=tl.float32)
    dsum_acc = tl.zeros([BLOCK_M], dtype=tl.float32)
    n_lo = pid_s * cols_per_split
    n_hi = tl.minimum(n_lo + cols_per_split, C)
    for start_n in range(n_lo, n_hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N).to(tl.int64)  # [BLOCK_N]
        col_ok = offs_n < C
        if SINGLE_D:
            c_blk = tl.load(c_ptr + offs_n[:, None] * stride_c + offs_d[None, :],
                            mask=col_ok[:, None] & d_ok[None, :], other=0.0)  # [BLOCK_N, BLOCK_D]
            dots = tl.dot(r_blk, tl.trans(c_blk), input_precision=INPUT_PRECISION)
        else:
            dots = dot_tile(r_ptr, c_ptr, offs_m, offs_n, row_ok, col_ok, D, stride_r, stride_c,
                         BLOCK_M, BLOCK_N, BLOCK_D, INPUT_PRECISION)
        z = dots * scale + bias  # [BLOCK_M, BLOCK_N]
        valid = row_ok[:, None] & col_ok[None, :]
        if GROUPS:  # the same test both ways round: TRANSPOSED only swaps which ids are the rows'
            group_c = tl.load(col_groups_ptr + offs_n, mask=col_ok, other=0)  # [BLOCK_N]
            positive = group_r[:, None] == group_c[None, :]
        elif TRANSPOSED:
            label_c = tl.load(labels_ptr + offs_n, mask=col_ok, other=-1).to(tl.int64)  # [BLOCK_N]
            positive = offs_m[:, None] == label_c[None, :]
        else:
            positive = offs_n[None, :] == label_r[:, None]
        # t = -y·z: the loss is softplus(t), dℓ/dz = -y·σ(t).  e = exp(-|t|) = exp(-|z|) lies in (0, 1].
        t = tl.where(positive, -z, z)
        e = tl.exp2(-tl.abs(z) * _LOG2E)
        u = 1.0 + e
        # log1p(e) accurately (Goldberg): log(u)·e/(u - 1), where u - 1 is exact; e itself once 1 + e rounds to 1.
        log1p_e = tl.where(u == 1.0, e, tl.log2(u) * _LN2 * (e / tl.where(u == 1.0, 1.0, u - 1.0)))
        if WRITE_STATS:
            loss_acc += tl.sum(tl.where(valid, tl.maximum(t, 0.0) + log1p_e, 0.0), 1)
        if NEED_GRAD:
            sig_t = tl.where(t >= 0.0, 1.0, e) / u  # σ(t)
            dz = tl.where(valid, tl.where(positive, -sig_t, sig_t), 0.0)  # -y·σ(t), 0 outside the block
            if HAS_WEIGHT:
                if TRANSPOSED:
                    weight_c = tl.load(weight_ptr + offs_n, mask=col_ok, other=0.0)
                    dz = dz * weight_c[None, :]
                else:
                    dz = dz * weight_r[:, None]
            if WRITE_STATS:
                dsum_acc += tl.sum(dz, 1)
            dz_in = dz.to(r_ptr.dtype.element_ty)  # half inputs: half dZ for tensor-core dots (fp32 stays fp32)
            if SINGLE_D:
                dr_acc += tl.dot(dz_in, c_blk, input_precision=INPUT_PRECISION)
                if COMPUTE_DCOLS:
                    dc_part = tl.dot(tl.trans(dz_in), r_blk, input_precision=INPUT_PRECISION)  # [BLOCK_N, BLOCK_D]
                    tl.atomic_add(dcols_ptr + offs_n[:, None] * D + offs_d[None, :], dc_part,
                                  mask=col_ok[:, None] & d_ok[None, :], sem="relaxed")
            else:
                # D too large for a register accumulator: per D chunk, drows += dZ c_chunk in global memory (this
                # program owns those rows unless DROWS_ATOMIC) and dcols += dZᵀ r_chunk with atomics.
                for d0 in range(0, D, BLOCK_D):
                    offs_dc = d0 + offs_d
                    dc_ok = offs_dc < D
                    c_c = tl.load(c_ptr + offs_n[:, None] * stride_c + offs_dc[None, :],
                                  mask=col_ok[:, None] & dc_ok[None, :], other=0.0)  # [BLOCK_N, BLOCK_D]
                    dr_ptrs = drows_ptr + offs_m[:, None] * D + offs_dc[None, :]
                    dr_mask = row_ok[:, None] & dc_ok[None, :]
                    dr_c = tl.dot(dz_in, c_c, input_precision=INPUT_PRECISION)  # [BLOCK_M, BLOCK_D]
                    if DROWS_ATOMIC:
                        tl.atomic_add(dr_ptrs, dr_c, mask=dr_mask, sem="relaxed")
                    else:
                        tl.store(dr_ptrs, tl.load(dr_ptrs, mask=dr_mask, other=0.0) + dr_c, mask=dr_mask)
                    if COMPUTE_DCOLS:
                        r_c = tl.load(r_ptr + offs_m[:, None] * stride_r + offs_dc[None, :],
                                      mask=dr_mask, other=0.0)  # [BLOCK_M, BLOCK_D]
                        dc_c = tl.dot(tl.trans(dz_in), r_c, input_precision=INPUT_PRECISION)  # [BLOCK_N, BLOCK_D]
                        tl.atomic_add(dcols_ptr + offs_n[:, None] * D + offs_dc[None, :], dc_c,
                                      mask=col_ok[:, None] & dc_ok[None, :], sem="relaxed")
    if WRITE_STATS:
        tl.store(loss_ptr + pid_s * R + offs_m, loss_acc, mask=row_ok)
        if NEED_GRAD:
            tl.store(dsum_ptr + pid_s * R + offs_m, dsum_acc, mask=row_ok)
    if NEED_GRAD and SINGLE_D:
        dr_ptrs = drows_ptr + offs_m[:, None] * D + offs_d[None, :]
        if DROWS_ATOMIC:
            tl.atomic_add(dr_ptrs, dr_acc, mask=row_ok[:, None] & d_ok[None, :], sem="relaxed")
        else:
            tl.store(dr_ptrs, dr_acc, mask=row_ok[:, None] & d_ok[None, :])


# ----------------------------------------------------------------------------------------------- launchers

def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """The kernels accumulate in fp32 for every supported input dtype."""
    return torch.float32


def _split(row_blocks: int, col_blocks: int, block_n: int, device: torch.device, allow: bool):
    target = TARGET_PROGRAMS if TARGET_PROGRAMS is not None else _common.device_programs(device, 2)
    return _common.column_split(row_blocks, col_blocks, block_n, target, allow)


def _launch(rows, cols, s, b, labels, groups, weight, d_rows, d_cols, *, transposed, stats, need_grad,
            atomic):
    """One ``_sigmoid_kernel`` sweep over row blocks of ``rows``; ``groups``: None or the ``(rows', cols')``
    group ids.  Returns the ``[split, R]`` loss and dZ row sums (None unless ``stats``)."""
    r, d = rows.shape
    c = cols.shape[0]
    block_m, block_n, chunk, num_warps, num_stages = CONFIG
    block_d, single_d = _common.block_d(d, chunk, SINGLE_D_MAX)
    row_blocks, col_blocks = triton.cdiv(r, block_m), triton.cdiv(c, block_n)
    split, cols_per_split = _split(row_blocks, col_blocks, block_n, rows.device, allow=atomic or not need_grad)
    part = torch.empty(2, split, r, dtype=torch.float32, device=rows.device) if stats else None
    dummy = s  # never read or written: its constexpr flag is off
    row_groups, col_groups = (dummy, dummy) if groups is None else groups
    _sigmoid_kernel[(row_blocks, split)](
        rows, cols, s, b, dummy if labels is None else labels, row_groups, col_groups,
        dummy if weight is None else weight,
        dummy if part is None else part[0], dummy if part is None else part[1],
        d_rows if need_grad else dummy, d_cols if (need_grad and atomic) else dummy,
        r, c, d, rows.stride(0), cols.stride(0), cols_per_split,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d, SINGLE_D=single_d, TRANSPOSED=transposed,
        GROUPS=groups is not None, HAS_WEIGHT=weight is not None, WRITE_STATS=stats, NEED_GRAD=need_grad,
        COMPUTE_DCOLS=need_grad and atomic, DROWS_ATOMIC=need_grad and split > 1,
        INPUT_PRECISION=_common.input_precision(rows.dtype), num_warps=num_warps, num_stages=num_stages,
    )
    return part


def forward_backward(
    q: torch.Tensor,
    k: torch.Tensor,
    scale: torch.Tensor,
    bias: torch.Tensor,
    labels: torch.Tensor,
    need_grad: bool,
    *,
    row_weight: torch.Tensor | None = None,
    per_row: bool = False,
    qg: torch.Tensor | None = None,
    kg: torch.Tensor | None = None,
):
    """Loss and gradients of one block of queries against one block of keys (one sweep; two when
    deterministic).  Same contract as ``xloss.sigmoid.cpu.forward_backward``.

    Args:
        q: ``[n, D]``; k: ``[m, D]``: float32/float16/bfloat16, same dtype and device (float64: TypeError).
        scale, bias: 0-dim tensors (read by the kernel from device memory).
        labels: ``[n]`` integer: positive key index inside this key block, or -1 (none in this block); ignored
            (may be None) with group ids.
        need_grad: compute the gradients (else they are None and the gradient dots are skipped).
        row_weight: optional ``[n]`` weights: gradients of ``Σ_i w_i ℓ_i``.
        per_row: return the ``[n]`` row sums instead of their 0-dim total.
        qg, kg: optional ``[n]``, ``[m]`` integer group ids (both or neither), instead of ``labels``:
            ``y_ij = +1`` iff ``qg[i] == kg[j]``, compared inside the tile (the ``GROUPS`` variant).

    Returns:
        ``(loss, dq, dk, ds, db)``, float32: the block's ``Σ -log σ(y z)`` (0-dim, or ``[n]``) and its gradients
        with respect to q ``[n, D]``, k ``[m, D]``, s and b (0-dim), or None for them without ``need_grad``.
    """
    q, k = _common.unit_stride_rows("sigmoid_loss", q, k)
    dev = q.device
    f32 = {"dtype": torch.float32, "device": dev}
    s = scale.detach().to(**f32).reshape(())
    b = bias.detach().to(**f32).reshape(())
    groups = None
    if qg is not None:
        groups = tuple(g.to(device=dev, dtype=torch.int64).contiguous() for g in (qg, kg))
        labels = None
    else:
        labels = labels.to(device=dev, dtype=torch.int64).contiguous()
    n, d = q.shape
    m = k.shape[0]
    weight, norm = None, None
    if need_grad and row_weight is not None:
        # An exact power of two c with max |w| / c in (1/2, 1]: w·dZ then does not underflow half dots.
        weight = row_weight.detach().to(**f32).reshape(n).contiguous()
        norm = weight.abs().amax()
        norm = torch.where((norm > 0) & torch.isfinite(norm), torch.exp2(torch.ceil(torch.log2(norm))),
                           torch.ones_like(norm))
        weight = weight / norm
    dq = torch.zeros(n, d, **f32) if need_grad else None
    dk = torch.zeros(m, d, **f32) if need_grad else None
    deterministic = _common.deterministic()
    part = _launch(q, k, s, b, labels, groups, weight, dq, dk, transposed=False, stats=True,
                   need_grad=need_grad, atomic=not deterministic)
    if need_grad and deterministic:
        key_major = None if groups is None else groups[::-1]  # rows are keys: (kg, qg)
        _launch(k, q, s, b, labels, key_major, weight, dk, None, transposed=True, stats=False, need_grad=True,
                atomic=False)
    loss_rows = part[0].sum(0)
    loss = loss_rows if per_row else loss_rows.sum()
    if not need_grad:
        return loss, None, None, None, None
    db = part[1].sum()
    ds = torch.dot(q.to(torch.float32).reshape(-1), dq.reshape(-1))  # Σ_i <q_i, (dZ k)_i>
    dq.mul_(s)
    dk.mul_(s)
    if norm is not None:
        dq.mul_(norm)
        dk.mul_(norm)
        ds, db = ds * norm, db * norm
    return loss, dq, dk, ds, db


__all__ = ["accumulation_dtype", "forward_backward"]
