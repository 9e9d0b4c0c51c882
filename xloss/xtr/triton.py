"""The Triton engine of XTR: two fused sweeps over similarity tiles, never the ``[Nq, Lq, Nd, Ld]`` tensor.

Implements the engine interface of ``chunked.py`` (``xtr_fwd``, ``xtr_bwd``); the autograd Function in
``__init__`` does the rest.

1. ``_xtr_bounds_kernel``: per query token, the ``kk``-th and ``(kk+1)``-th largest similarity over every
   valid in-batch document token (``kk = min(k, Nd·Ld)``).  A program owns ``BLOCK_M`` query tokens (rows of
   the flattened ``[Nq·Lq, D]``) and sweeps the flattened document tokens ``[Nd·Ld, D]`` in tiles of
   ``K_PAD = next_power_of_2(kk)`` columns, keeping a running top-``K_PAD`` per row in registers: the tile
   is sorted ascending (``tl.sort``), its element-wise max with the descending buffer is the top ``K_PAD`` of
   the union as a bitonic sequence, which ``tl.bitonic_merge`` sorts, and the largest element-wise min is the
   ``(K_PAD+1)``-th (so ``kk = K_PAD``, as for k = 256, needs no larger buffer).  A tile that holds nothing above any
   row's current ``(kk+1)``-th value is skipped (it cannot change either bound).  Masked-out and padded
   columns are -inf; NaN is taken as +inf (``torch.topk`` ranks NaN first).  ``K_PAD`` above ``MAX_K_PAD``
   (registers) falls back to the chunked engine's torch bounds (``chunked.xtr_bounds``) for this sweep only.
2. ``_xtr_maxsim_kernel``: MaxSim under the cut.  A token is retrieved when ``not sim < cut`` (so a NaN is, as
   in the chunked engine), with ``cut`` strictly above the ``(kk+1)``-th value and at most the ``kk``-th
   (:func:`_cut`): the retrieved set is every token at or above the ``kk``-th value (ties at the threshold
   all kept, as the chunked engine), and it does not depend on the last bits of a similarity: this sweep
   computes the tiles again, with other tile shapes than the first one, and a dot's rounding may depend on
   them.  A program owns ``BLOCK_A`` queries (their tokens packed into the tile rows, as the MaxSim kernel
   of ``late_interaction/triton.py``) and a range of documents; per document the running max and arg-max
   (lowest index on ties, a NaN wins) over its retrieved tokens, the hit flag, then ``S = Σ val / max(Z, 1)``
   and ``Z`` (the number of query tokens with a hit) are written by this one program: no atomics.

The backward is MaxSim's routing (``late_interaction.triton.route``: a gather kernel and a scatter kernel)
with the incoming gradient divided by ``Z``; the retrieval is piecewise constant.

Precision: inputs are loaded in their dtype (fp32/fp16/bf16), dots accumulate in fp32 (IEEE fp32 unless
``torch.set_float32_matmul_precision`` allows TF32); scores, ``Z`` and gradients are fp32, indices int16
(int32 beyond 32767 document tokens).  float64 raises TypeError (the chunked engine takes it).  Tile sizes
are fixed (smaller in the interpreter), not autotuned.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .. import _triton_common as _common
from ..late_interaction import triton as _li
from ..late_interaction.triton import _isnan, _running_max
from . import chunked as _chunked

# K_PAD (buffer columns of the running top-k, a power of two) handled in registers; beyond it the first sweep
# runs on torch.  BOUNDS_ROWS: query tokens per program of the first sweep (tl.dot's minimum of 16 rows).
if _li._SMALL_TILES:
    MAX_K_PAD = 64
    BOUNDS_ROWS = 16
else:
    MAX_K_PAD = 256
    BOUNDS_ROWS = 16

@triton.jit
def _xtr_bounds_kernel(
    q_ptr, d_ptr,  # [R, D] query tokens, [C, D] document tokens (R = Nq·Lq, C = Nd·Ld), unit stride along D
    dv_ptr,  # [C] uint8: document-token validity
    hi_ptr, lo_ptr,  # [R] fp32 out: the kk-th and (kk+1)-th largest similarity of each row
    R, C, D, kk, stride_q, stride_d,
    BLOCK_M: tl.constexpr, K_PAD: tl.constexpr, BLOCK_D: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):
    # grid: (cdiv(R, BLOCK_M),)
    offs_m = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = offs_m < R
    ar = tl.arange(0, K_PAD)
    top = tl.full([BLOCK_M, K_PAD], float("-inf"), dtype=tl.float32)  # the K_PAD largest so far, descending
    out = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)  # the largest value ever left out of ``top``
    floor = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)  # the current (kk+1)-th value
    for c0 in range(0, C, K_PAD):
        offs_c = c0 + ar.to(tl.int64)
        c_ok = offs_c < C
        sim = _common.dot_tile(q_ptr, d_ptr, offs_m, offs_c, m_ok, c_ok, D, stride_q, stride_d,
                               BLOCK_M, K_PAD, BLOCK_D, INPUT_PRECISION)
        cand = c_ok & (tl.load(dv_ptr + offs_c, mask=c_ok, other=0) != 0)
        sim = tl.where(cand[None, :], tl.where(_isnan(sim), float("inf"), sim), float("-inf"))
        # Only a value above some row's (kk+1)-th can change a bound (ties change neither).
        if tl.max((tl.max(sim, 1) > floor).to(tl.int32), 0) > 0:
            tile = tl.sort(sim, dim=1, descending=False)
            # ``top`` descending and ``tile`` ascending: the element-wise max is the top K_PAD of both (a bitonic
            # sequence, which the merge sorts), the element-wise min the rest, whose max is the (K_PAD+1)-th.
            out = tl.maximum(out, tl.max(tl.minimum(top, tile), 1))
            top = tl.bitonic_merge(tl.maximum(top, tile), dim=1, descending=True)
            if kk < K_PAD:
                floor = tl.max(tl.where(ar[None, :] == kk, top, float("-inf")), 1)
            else:
                floor = out
    hi = tl.max(tl.where(ar[None, :] == kk - 1, top, float("-inf")), 1)
    tl.store(hi_ptr + offs_m, hi, mask=m_ok)
    tl.store(lo_ptr + offs_m, floor, mask=m_ok)


@triton.jit
def _xtr_maxsim_kernel(
    q_ptr, d_ptr,  # [Nq·Lq, D], [Nd·Ld, D], unit stride along D
    cut_ptr,  # [Nq·Lq] fp32: a document token is retrieved by query token r when not sim < cut[r]
    qv_ptr, dv_ptr,  # [Nq·Lq], [Nd·Ld] uint8 validity
    s_ptr, z_ptr,  # [Nq, Nd] fp32 out (contiguous): the scores and the hit counts Z
    idx_ptr,  # [Nq, Nd, Lq] int16|32 out (AUX): arg-max document token of each query token, -1 without a hit
    Nq, Nd, Lq, Ld, D, stride_q, stride_d,
    docs_per_prog,
    BLOCK_A: tl.constexpr, T_PAD: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
    AUX: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):
    # grid: (cdiv(Nq, BLOCK_A), cdiv(Nd, docs_per_prog))
    BLOCK_M: tl.constexpr = BLOCK_A * T_PAD
    pid_a = tl.program_id(0).to(tl.int64)
    offs_r = tl.arange(0, BLOCK_M)
    t_loc = offs_r % T_PAD
    a_row = pid_a * BLOCK_A + offs_r // T_PAD  # [BLOCK_M] int64 query of each tile row
    a_row_ok = a_row < Nq
    a_blk = pid_a * BLOCK_A + tl.arange(0, BLOCK_A)
    a_blk_ok = a_blk < Nq
    offs_v0 = tl.arange(0, BLOCK_V)
    b_lo = tl.program_id(1).to(tl.int64) * docs_per_prog
    b_hi = tl.minimum(b_lo + docs_per_prog, Nd)
    for b in range(b_lo, b_hi):
        s_acc = tl.zeros([BLOCK_A], dtype=tl.float32)
        z_acc = tl.zeros([BLOCK_A], dtype=tl.float32)
        for t0 in range(0, Lq, T_PAD):  # one iteration unless a long query loops over token blocks
            t_row = t0 + t_loc
            row_ok = a_row_ok & (t_row < Lq)
            rows = a_row * Lq + t_row  # [BLOCK_M] int64 row of the flattened query tokens
            cut = tl.load(cut_ptr + rows, mask=row_ok, other=float("inf"))
            run_max = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
            run_idx = tl.full([BLOCK_M], -1, dtype=tl.int32)
            found = tl.zeros([BLOCK_M], dtype=tl.int32)
            for v0 in range(0, Ld, BLOCK_V):
                offs_v = v0 + offs_v0
                v_ok = offs_v < Ld
                cols = b * Ld + offs_v  # [BLOCK_V] int64
                sim = _common.dot_tile(q_ptr, d_ptr, rows, cols, row_ok, v_ok, D, stride_q, stride_d,
                                       BLOCK_M, BLOCK_V, BLOCK_D, INPUT_PRECISION)
                dv = tl.load(dv_ptr + cols, mask=v_ok, other=0) != 0
                cand = dv[None, :] & ~(sim < cut[:, None])  # NaN < cut is False: a NaN is retrieved
                s_m = tl.where(cand, sim, float("-inf"))
                run_max, run_idx = _running_max(s_m, cand, offs_v, run_max, run_idx, AUX)
                found = tl.maximum(found, tl.max(cand.to(tl.int32), 1))
            qv = tl.load(qv_ptr + rows, mask=row_ok, other=0) != 0
            got = (found != 0) & qv & row_ok  # [BLOCK_M] this query token retrieved a token of document b
            s_acc += tl.sum(tl.reshape(tl.where(got, run_max, 0.0), (BLOCK_A, T_PAD)), 1)
            z_acc += tl.sum(tl.reshape(got.to(tl.float32), (BLOCK_A, T_PAD)), 1)
            if AUX:
                i_off = (a_row * Nd + b) * Lq + t_row
                tl.store(idx_ptr + i_off, tl.where(got, run_idx, -1).to(idx_ptr.dtype.element_ty), mask=row_ok)
        out = a_blk * Nd + b
        tl.store(s_ptr + out, s_acc / tl.maximum(z_acc, 1.0), mask=a_blk_ok)
        tl.store(z_ptr + out, z_acc, mask=a_blk_ok)


def _cut(hi: torch.Tensor, lo: torch.Tensor) -> torch.Tensor:
    """The retrieval cut of each query token: in ``(lo, hi]`` (``hi``/``lo`` the ``kk``-th and ``(kk+1)``-th
    largest similarity), the midpoint where it lies strictly above ``lo``, else ``hi`` (ties, adjacent floats,
    infinities).  ``not sim < cut`` then keeps exactly the tokens at or above ``hi`` even when the second sweep
    rounds a similarity differently by a few ulps."""
    mid = lo + (hi - lo) * 0.5
    return torch.where(mid > lo, mid, hi).contiguous()


def _flat(t: torch.Tensor) -> torch.Tensor:
    """``[N, L, D]`` as ``[N·L, D]`` rows of one stride, unit stride along D (a copy only if needed)."""
    return t.reshape(-1, t.shape[-1]) if t.stride(-1) == 1 else t.contiguous().reshape(-1, t.shape[-1])


def _config(dtype: torch.dtype):
    return _li.FP32_CONFIG if dtype == torch.float32 else _li.HALF_CONFIG


def _block_d(dim: int, chunk: int) -> int:
    return min(chunk, max(16, triton.next_power_of_2(dim)))


def _bounds(qf, df, dv, k: int, q, d, d_valid, d_masked: bool):
    """``(hi, lo)`` ``[Nq·Lq]`` fp32 of the first sweep: the kernel, or the chunked engine's torch sweep when
    ``K_PAD`` exceeds :data:`MAX_K_PAD`."""
    kk = min(k, df.shape[0])
    k_pad = max(16, triton.next_power_of_2(kk))
    if k_pad > MAX_K_PAD:
        hi, lo = _chunked.xtr_bounds(q, d, d_valid, d_masked, k)
        return hi.float(), lo.float()
    rows = qf.shape[0]
    hi = torch.empty(rows, dtype=torch.float32, device=qf.device)
    lo = torch.empty_like(hi)
    # D chunks of at most 32 and 16 warps from 128 columns: no spills on sm_90 (ptxas; the buffer, the tile and
    # the sort's exchanges all live in registers), where 64-wide chunks or 8 warps spill 80-570 bytes.
    _xtr_bounds_kernel[(triton.cdiv(rows, BOUNDS_ROWS),)](
        qf, df, dv, hi, lo, rows, df.shape[0], qf.shape[1], kk, qf.stride(0), df.stride(0),
        BLOCK_M=BOUNDS_ROWS, K_PAD=k_pad, BLOCK_D=_block_d(qf.shape[1], 32),
        INPUT_PRECISION=_common.input_precision(qf.dtype),
        num_warps=16 if k_pad >= 128 else 8 if k_pad >= 64 else 4,
    )
    return hi, lo


def xtr_fwd(q, d, q_valid, d_valid, k: int, need_aux: bool, d_masked: bool):
    """``(scores [Nq, Nd], idx [Nq, Nd, Lq], z [Nq, Nd])``, fp32 scores and ``Z`` (idx and z empty without
    ``need_aux``), as ``chunked.xtr_fwd``.  ``q [Nq, Lq, D]``, ``d [Nd, Ld, D]``: float32/float16/bfloat16,
    masked-out tokens already zero."""
    if q.dtype not in _common.SUPPORTED_DTYPES or d.dtype != q.dtype:
        raise TypeError(f"the triton backend of xtr supports float32, float16 and bfloat16 inputs, got q {q.dtype} "
                        f"and d {d.dtype}; use backend='chunked' (or 'auto') for float64")
    nq, lq, dim = q.shape
    nd, ld = d.shape[0], d.shape[1]
    dev = q.device
    qf, df = _flat(q), _flat(d)
    qv = q_valid.to(device=dev, dtype=torch.bool).contiguous().view(torch.uint8).reshape(-1)
    dv = d_valid.to(device=dev, dtype=torch.bool).contiguous().view(torch.uint8).reshape(-1)
    cut = _cut(*_bounds(qf, df, dv, k, q, d, d_valid, d_masked))
    scores = torch.empty(nq, nd, dtype=torch.float32, device=dev)
    z = torch.empty(nq, nd, dtype=torch.float32, device=dev)
    idx = torch.empty(nq, nd, lq, dtype=_li._index_dtype(ld), device=dev) if need_aux else scores
    t_pad, block_a = _li.row_packing(lq, nq)
    block_v, chunk, _, num_warps = _config(q.dtype)
    row_blocks = triton.cdiv(nq, block_a)
    split, per = _common.column_split(row_blocks, nd, 1, _li._target_programs(dev))
    _xtr_maxsim_kernel[(row_blocks, split)](
        qf, df, cut, qv, dv, scores, z, idx, nq, nd, lq, ld, dim, qf.stride(0), df.stride(0), per,
        BLOCK_A=block_a, T_PAD=t_pad, BLOCK_V=block_v, BLOCK_D=_block_d(dim, chunk), AUX=need_aux,
        INPUT_PRECISION=_common.input_precision(q.dtype),
        num_warps=num_warps if block_a * t_pad * block_v > 2048 else 4, num_stages=_li.NUM_STAGES,
    )
    if not need_aux:
        return scores, scores.new_empty(0, dtype=_li._index_dtype(ld)), scores.new_empty(0)
    return scores, idx, z


def xtr_bwd(g, q, d, q_valid, d_valid, idx, z):
    """``(dq, dd)`` fp32: MaxSim's Triton routing (``late_interaction.triton.route``) of ``g / max(Z, 1)``."""
    gz = g.float() / z.clamp_min(1)
    return _li.route(q, d, idx, gz, q_valid.float(), d_valid, False)


__all__ = ["xtr_bwd", "xtr_fwd"]
