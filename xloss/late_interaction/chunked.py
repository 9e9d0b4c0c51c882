"""The chunked PyTorch engine of late interaction (MaxSim): similarity tiles, never ``[Nq, Nd, Lq, Ld]``.

Implements :class:`~xloss.late_interaction.engine.MaxSimEngine` (``maxsim_fwd``, ``maxsim_bwd``) and
:class:`~xloss.late_interaction.engine.MaxSimPairsEngine` (``maxsim_pairs_fwd``, ``maxsim_pairs_bwd``); the
backward sweeps are the shared torch routing of ``backward.py``.

``maxsim_fwd`` walks over tiles of ``bq`` queries × ``bd`` documents.  Each tile is one GEMM,
``sim = q_blk.reshape(bq·Lq, D) @ d_blk.reshape(bd·Ld, D)ᵀ`` viewed ``[bq, Lq, bd, Ld]``, reduced at once:

* query→document (``q2d``): max over the document tokens (last dim), ``s_q2d = Σ_t q_w·max``;
* document→query (``d2q``): max over the query tokens (dim 1), ``s_d2q = Σ_v d_w·max``;

both from the same tile when both are asked.  Masks are one ``masked_fill_`` of the tile per direction: the
masked-out tokens of the other side become ``-inf`` in ``exclude`` mode (they never win) and exactly 0 in
``zero`` mode (they score 0 and still compete, PyLate ``colbert_scores``); a fill rather than an additive bias
or zeroed embeddings, because ``inf·0`` and ``NaN + (-inf)`` are NaN.  A masked-out token of the weighted side
then gets value 0 and index -1, whatever its row of the tile held.  Between valid tokens NaN and inf propagate
as ``torch.max`` makes them (a NaN is the max, at the first NaN's index).  Ties go to the lowest index.

The backward's products (``backward.py``) get the masked-out embeddings as zeros (the autograd Function
replaces them before it routes), so they never meet ``0·NaN`` either.

The tile size comes from a memory budget, ``XLOSS_CPU_TILE_MB`` (default 8 MiB here: a tile that stays in
the L2/L3 cache is faster than a big one).  Half-precision inputs are computed in fp32, fp64 stays fp64.
Nothing here is CPU-specific: this is also the fallback on CUDA tensors when Triton is missing.

``maxsim_pairs_fwd`` is the aligned-pair version (query a against document a), chunked ``bmm``s.  Only this
engine has it: ``maxsim_pairs`` runs it whatever the backend (except ``"reference"``).

Compiled op: on CPU tensors, when only the query→document direction is asked (ColBERT scoring, every
reduction, weights and mask mode, fp32/bf16/fp16/fp64), both forwards run ``torch.ops.xloss.maxsim_q2d``
(``xloss/csrc/cpu/maxsim.cpp``: a register-blocked micro-kernel that never writes a similarity tile and
touches only the valid prefix of each ragged document) instead of the tile loop, with the same outputs, so the
backward is unchanged.  ``d2q``/``both``, CUDA tensors, ``XLOSS_NO_EXT=1`` or a failed build keep the loop.
"""

from __future__ import annotations

import math

import torch

from .. import _ext, _tiling
from .._tiling import accumulation_dtype, upcast

DEFAULT_TILE_BYTES = 8 * 2**20


def index_dtype(length: int) -> torch.dtype:
    """int16 arg-max indices (token counts up to 32767), int32 beyond."""
    return torch.int16 if length <= 2**15 - 1 else torch.int32


def budget_bytes() -> int:
    """The working-set budget in bytes: ``XLOSS_CPU_TILE_MB`` (MiB, may be fractional), default 8 MiB."""
    return _tiling.budget_bytes(DEFAULT_TILE_BYTES)


def tile_blocks(nq: int, lq: int, nd: int, ld: int, itemsize: int) -> tuple[int, int]:
    """``(bq, bd)`` queries and documents per tile: a roughly square ``bq·Lq × bd·Ld`` tile within budget."""
    elems = max(1, budget_bytes() // itemsize)
    side = math.isqrt(elems)
    bq = max(1, min(nq, side // lq))
    bd = max(1, min(nd, elems // (bq * lq * ld)))
    if bd == nd:  # the documents fit whole: give the rest of the budget to the queries
        bq = max(1, min(nq, elems // (nd * ld * lq)))
    return bq, bd


def _reduce(tile: torch.Tensor, dim: int, need_idx: bool):
    """Max over ``dim`` (values, and the lowest arg-max when ``need_idx``): ``torch.max``, so a NaN is the max
    (at the first NaN's index) and a row of -inf stays -inf."""
    if need_idx:
        return torch.max(tile, dim)
    return torch.amax(tile, dim), None


def _settle(val, idx, keep: torch.Tensor, idx_dtype: torch.dtype):
    """Value 0 and index -1 outside ``keep`` (a masked-out token of the weighted side, or one with no valid
    token to take a max over), whatever the tile held there."""
    val = val.masked_fill_(~keep, 0)
    if idx is not None:
        idx = idx.to(idx_dtype).masked_fill_(~keep, -1)
    return val, idx


def _has_candidates(valid: torch.Tensor, zero_mode: bool) -> torch.Tensor:
    """``[N]``: whether an entity offers the other side's tokens anything to take a max over (any valid token;
    in zero mode its invalid tokens score 0 and compete, so always)."""
    return torch.ones(valid.shape[0], dtype=torch.bool, device=valid.device) if zero_mode else valid.any(1)


def _prepare(q, d, q_w, d_w, zero_mode: bool, q2d: bool, d2q: bool):
    """Inputs and weights in the accumulation dtype, and the value that masked-out tokens of the other side
    take in a tile: ``-inf`` (never win) or, in zero mode, exactly 0.

    The masks are applied to every tile with ``masked_fill_`` (not an additive bias, not by zeroing the
    embeddings: ``inf·0`` and ``NaN - inf`` are NaN) for each side that had a mask, whether or not it masks
    anything (no value is read back to the host to find out).
    """
    acc = accumulation_dtype(q.dtype)
    fill = 0.0 if zero_mode else float("-inf")
    return upcast(q), upcast(d), (q_w.to(acc) if q2d else None), (d_w.to(acc) if d2q else None), fill


_OP = "maxsim_q2d"


def _use_op(q: torch.Tensor, q2d: bool, d2q: bool) -> bool:
    """True when the compiled ``xloss::maxsim_q2d`` covers this call: CPU tensors, query→document only, and
    the op is built (``xloss._ext``; the first call may compile it, and registers its fake kernel)."""
    return q.device.type == "cpu" and q2d and not d2q and _ext.has_op(_OP, fake=_maxsim_q2d_fake)


def _maxsim_q2d_fake(q, d, q_w, q_valid, d_valid, zero_mode, pairs, need_aux, group=1):
    """Shapes and dtypes of ``xloss::maxsim_q2d``: scores ``[Nq, Nd]`` (``[Nd]`` for pairs), indices and
    maxima ``[Nq, Nd, Lq]`` (``[Nd, Lq]``), or empty tensors without ``need_aux``."""
    acc = accumulation_dtype(q.dtype)
    lead = (d.shape[0],) if pairs else (q.shape[0], d.shape[0])
    aux = (*lead, q.shape[1]) if need_aux else (0,)
    return (q.new_empty(lead, dtype=acc), q.new_empty(aux, dtype=index_dtype(d.shape[1])),
            q.new_empty(aux, dtype=acc))


def _op_fwd(q, d, q_w, q_valid, d_valid, zero_mode: bool, pairs: bool, need_aux: bool, group: int = 1):
    """The engine result ``(s, idx, val, None, None, None)`` from the compiled op."""
    q_w = q_w.to(accumulation_dtype(q.dtype))
    s, idx, val = torch.ops.xloss.maxsim_q2d(q, d, q_w, q_valid, d_valid, zero_mode, pairs, need_aux, group)
    return s, (idx if need_aux else None), (val if need_aux else None), None, None, None


def maxsim_fwd(q, d, q_w, d_w, q_valid, d_valid, zero_mode: bool, q2d: bool, d2q: bool, *, need_aux: bool = True,
               q_masked: bool = True, d_masked: bool = True):
    """Late-interaction scores of every query against every document, tile by tile.

    Args:
        q: ``[Nq, Lq, D]`` query tokens; d: ``[Nd, Ld, D]`` document tokens (fp32/fp16/bf16/fp64, same dtype).
        q_w: ``[Nq, Lq]`` final per-token weights of the query→document sum (mask, mean normalisation and
            user weights folded in, 0 for invalid tokens); used when ``q2d``.
        d_w: ``[Nd, Ld]`` the same for the document→query sum; None unless ``d2q``.
        q_valid, d_valid: ``[Nq, Lq]``, ``[Nd, Ld]`` bool token masks.
        zero_mode: invalid tokens score 0 and still compete (PyLate); else they never win (``exclude``).
        q2d, d2q: which directions to compute.
        need_aux: also return the arg-max indices and max values (for backward); False returns None for them
            and skips the index search.
        q_masked, d_masked: whether that side's mask may mask anything (False: all valid, so the tiles are
            not filled for it).

    Returns:
        ``(s_q2d, idx_q2d, val_q2d, s_d2q, idx_d2q, val_d2q)``, None for a direction not asked:
        ``s_q2d [Nq, Nd]`` (accumulation dtype) ``= Σ_t q_w[a,t]·val_q2d[a,b,t]``; ``val_q2d [Nq, Nd, Lq]`` the
        max over document tokens; ``idx_q2d [Nq, Nd, Lq]`` int16 its arg-max (lowest on ties, the first NaN
        when there is one).  Value 0 and index -1 at a masked-out query token, and where no document token is
        valid (exclude mode).  ``d2q``: the same with ``[Nq, Nd, Ld]`` tensors, the max over query tokens for
        each document token, weighted by ``d_w``.
    """
    if _use_op(q, q2d, d2q):
        return _op_fwd(q, d, q_w, q_valid, d_valid, zero_mode, False, need_aux)
    acc = accumulation_dtype(q.dtype)
    dev = q.device
    nq, lq, dim = q.shape
    nd, ld, _ = d.shape
    qf, df, q_w, d_w, fill = _prepare(q, d, q_w, d_w, zero_mode, q2d, d2q)
    q_bad, d_bad = ~q_valid.reshape(nq * lq, 1), ~d_valid.reshape(1, nd * ld)
    has_q, has_d = _has_candidates(q_valid, zero_mode), _has_candidates(d_valid, zero_mode)
    qflat, dflat = qf.reshape(nq * lq, dim), df.reshape(nd * ld, dim)

    s_q2d = torch.empty(nq, nd, dtype=acc, device=dev) if q2d else None
    s_d2q = torch.empty(nq, nd, dtype=acc, device=dev) if d2q else None
    idx_q2d = val_q2d = idx_d2q = val_d2q = None
    if need_aux and q2d:
        idx_q2d = torch.empty(nq, nd, lq, dtype=index_dtype(ld), device=dev)
        val_q2d = torch.empty(nq, nd, lq, dtype=acc, device=dev)
    if need_aux and d2q:
        idx_d2q = torch.empty(nq, nd, ld, dtype=index_dtype(lq), device=dev)
        val_d2q = torch.empty(nq, nd, ld, dtype=acc, device=dev)

    bq, bd = tile_blocks(nq, lq, nd, ld, qf.element_size())
    buf = torch.empty(bq * lq * bd * ld, dtype=acc, device=dev)
    for a0 in range(0, nq, bq):
        a1 = min(nq, a0 + bq)
        na = a1 - a0
        q_blk = qflat[a0 * lq: a1 * lq]
        for b0 in range(0, nd, bd):
            b1 = min(nd, b0 + bd)
            nb = b1 - b0
            tile = buf[: na * lq * nb * ld].view(na * lq, nb * ld)
            torch.mm(q_blk, dflat[b0 * ld: b1 * ld].T, out=tile)
            if q2d and d_masked:  # masked-out document tokens never win (zero mode: score exactly 0)
                tile.masked_fill_(d_bad[:, b0 * ld: b1 * ld], fill)
            if d2q and q_masked:  # masked-out query tokens likewise, for the max over query tokens
                tile.masked_fill_(q_bad[a0 * lq: a1 * lq], fill)
            t4 = tile.view(na, lq, nb, ld)
            if q2d:
                val, idx = _reduce(t4, 3, need_aux)  # [na, lq, nb]
                keep = q_valid[a0:a1, :, None] & has_d[None, None, b0:b1]
                val, idx = _settle(val, idx, keep, index_dtype(ld))
                s_q2d[a0:a1, b0:b1] = torch.bmm(q_w[a0:a1, None, :], val)[:, 0]
                if need_aux:
                    val_q2d[a0:a1, b0:b1] = val.transpose(1, 2)
                    idx_q2d[a0:a1, b0:b1] = idx.transpose(1, 2)
            if d2q:
                val, idx = _reduce(t4, 1, need_aux)  # [na, nb, ld]
                keep = d_valid[None, b0:b1, :] & has_q[a0:a1, None, None]
                val, idx = _settle(val, idx, keep, index_dtype(lq))
                s_d2q[a0:a1, b0:b1] = (val * d_w[None, b0:b1]).sum(2)
                if need_aux:
                    val_d2q[a0:a1, b0:b1] = val
                    idx_d2q[a0:a1, b0:b1] = idx
    return s_q2d, idx_q2d, val_q2d, s_d2q, idx_d2q, val_d2q


def maxsim_pairs_fwd(q, d, q_w, d_w, q_valid, d_valid, zero_mode: bool, q2d: bool, d2q: bool, *,
                     need_aux: bool = True, q_masked: bool = True, d_masked: bool = True, group: int = 1):
    """Aligned pairs: query a against document a only (``Nq == Nd == N``), chunked ``bmm``s of ``[n, Lq, Ld]``.

    Arguments as :func:`maxsim_fwd`.  Returns ``(s_q2d, idx_q2d, val_q2d, s_d2q, idx_d2q, val_d2q)`` with
    ``s [N]``, ``idx_q2d``/``val_q2d [N, Lq]`` and ``idx_d2q``/``val_d2q [N, Ld]``; None where not asked.
    ``group`` > 1 (query→document only): ``Nd = Nq·group`` and query a meets documents ``a·group … a·group +
    group - 1`` (the grouped layout); the queries are repeated here for the sweep only, nothing repeated is kept.
    """
    if group > 1 and d2q:
        raise ValueError("grouped aligned pairs (group > 1) score query→document only")
    if _use_op(q, q2d, d2q):  # the op takes the group as it is (the queries are packed once)
        return _op_fwd(q, d, q_w, q_valid, d_valid, zero_mode, True, need_aux, group)
    if group > 1:  # the tile loop pairs rows: repeat the queries for the sweep (freed after it)
        q, q_w, q_valid = (t.repeat_interleave(group, dim=0) for t in (q, q_w, q_valid))
    acc = accumulation_dtype(q.dtype)
    dev = q.device
    n, lq, _ = q.shape
    ld = d.shape[1]
    qf, df, q_w, d_w, fill = _prepare(q, d, q_w, d_w, zero_mode, q2d, d2q)
    q_bad, d_bad = ~q_valid[:, :, None], ~d_valid[:, None, :]  # [N, Lq, 1], [N, 1, Ld]
    has_q, has_d = _has_candidates(q_valid, zero_mode), _has_candidates(d_valid, zero_mode)
    s_q2d = torch.empty(n, dtype=acc, device=dev) if q2d else None
    s_d2q = torch.empty(n, dtype=acc, device=dev) if d2q else None
    idx_q2d = val_q2d = idx_d2q = val_d2q = None
    if need_aux and q2d:
        idx_q2d = torch.empty(n, lq, dtype=index_dtype(ld), device=dev)
        val_q2d = torch.empty(n, lq, dtype=acc, device=dev)
    if need_aux and d2q:
        idx_d2q = torch.empty(n, ld, dtype=index_dtype(lq), device=dev)
        val_d2q = torch.empty(n, ld, dtype=acc, device=dev)
    rows = max(1, min(n, budget_bytes() // (lq * ld * qf.element_size())))
    buf = torch.empty(rows * lq * ld, dtype=acc, device=dev)
    for a0 in range(0, n, rows):
        a1 = min(n, a0 + rows)
        tile = buf[: (a1 - a0) * lq * ld].view(a1 - a0, lq, ld)
        torch.bmm(qf[a0:a1], df[a0:a1].transpose(1, 2), out=tile)
        if q2d and d_masked:
            tile.masked_fill_(d_bad[a0:a1], fill)
        if d2q and q_masked:
            tile.masked_fill_(q_bad[a0:a1], fill)
        if q2d:
            val, idx = _reduce(tile, 2, need_aux)  # [n, lq]
            val, idx = _settle(val, idx, q_valid[a0:a1] & has_d[a0:a1, None], index_dtype(ld))
            s_q2d[a0:a1] = (val * q_w[a0:a1]).sum(1)
            if need_aux:
                val_q2d[a0:a1], idx_q2d[a0:a1] = val, idx
        if d2q:
            val, idx = _reduce(tile, 1, need_aux)  # [n, ld]
            val, idx = _settle(val, idx, d_valid[a0:a1] & has_q[a0:a1, None], index_dtype(lq))
            s_d2q[a0:a1] = (val * d_w[a0:a1]).sum(1)
            if need_aux:
                val_d2q[a0:a1], idx_d2q[a0:a1] = val, idx
    return s_q2d, idx_q2d, val_q2d, s_d2q, idx_d2q, val_d2q


def maxsim_bwd(q, d, q_w, d_w, q_valid, d_valid, zero_mode: bool, aux_q2d, aux_d2q, g_q2d, g_d2q,
               need_q: bool, need_d: bool, need_qw: bool, need_dw: bool):
    """Gradients of the cross scores of :func:`maxsim_fwd`: ``backward.maxsim_backward`` with the torch
    routing (inputs upcast once).  Returns ``(dq, dd, dq_w, dd_w)`` in the accumulation dtype, None where not
    needed or zero."""
    return _bwd.maxsim_backward(q, d, q_w, d_w, q_valid, d_valid, zero_mode, aux_q2d, aux_d2q, g_q2d, g_d2q,
                                need_q, need_d, need_qw, need_dw)


def maxsim_pairs_bwd(q, d, q_w, d_w, q_valid, d_valid, zero_mode: bool, aux_q2d, aux_d2q, g_q2d, g_d2q,
                     need_q: bool, need_d: bool, need_qw: bool, need_dw: bool, group: int = 1):
    """Gradients of the aligned-pair scores of :func:`maxsim_pairs_fwd`: ``backward.pairs_backward``."""
    return _bwd.pairs_backward(q, d, q_w, d_w, q_valid, d_valid, zero_mode, aux_q2d, aux_d2q, g_q2d, g_d2q,
                               need_q, need_d, need_qw, need_dw, group=group)


from . import backward as _bwd  # last: backward.py imports budget_bytes from here

__all__ = ["accumulation_dtype", "budget_bytes", "index_dtype", "maxsim_bwd", "maxsim_fwd", "maxsim_pairs_bwd",
           "maxsim_pairs_fwd"]
