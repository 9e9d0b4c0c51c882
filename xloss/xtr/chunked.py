"""The chunked PyTorch engine of XTR: two sweeps over similarity tiles, never ``[Nq, Lq, Nd, Ld]``.

For a block of queries (``bq·Lq`` query tokens):

1. the threshold: the k-th largest similarity of each query token over all ``Nd·Ld`` valid document tokens,
   a running top-k merged block of documents by block (``torch.topk`` of ``[k + bd·Ld]`` candidates);
2. MaxSim under that threshold: each block of documents again (or the same tile when all documents fit in one),
   tokens below the threshold set to -inf, max and arg-max over each document's tokens, the hit flags and
   their count ``Z``.

Working set ``O(bq·Lq·(k + bd·Ld))`` within ``XLOSS_CPU_TILE_MB``; kept for the backward only the
``[Nq, Nd, Lq]`` arg-max indices (-1: no hit) and ``Z``.  The backward (:func:`xtr_bwd`) is MaxSim's routing
(``xloss.late_interaction.backward.route``) with the incoming gradient divided by ``Z``: the threshold and the
count are piecewise constant, so only the arg-max carries a gradient.  Ties at the threshold keep every tied
token (``torch.topk`` would keep an arbitrary subset).  A NaN similarity counts as retrieved (``torch.topk``
ranks NaN first) and makes its document's score NaN.  Plain torch: runs on any device.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .._tiling import accumulation_dtype
from ..late_interaction.backward import route
from ..late_interaction.chunked import budget_bytes, index_dtype


def _blocks(nq: int, lq: int, nd: int, ld: int, k: int, itemsize: int) -> tuple[int, int]:
    """``(bq, bd)``: queries and documents per tile, ``bq·Lq × (k + bd·Ld)`` within the budget; the documents
    whole when they fit (one similarity GEMM for both sweeps)."""
    elems = max(1, budget_bytes() // itemsize)
    if lq * (nd * ld) <= elems:
        return max(1, min(nq, elems // (lq * nd * ld))), nd
    bd = max(1, min(nd, (elems // lq - k) // ld))
    return 1, bd


def _tile(qb: Tensor, d: Tensor, d_bad: Tensor | None, d0: int, d1: int) -> Tensor:
    """``[bq·Lq, (d1-d0)·Ld]`` similarities, masked-out document tokens at -inf."""
    t = qb @ d[d0:d1].reshape(-1, d.shape[-1]).T
    if d_bad is not None:
        t.masked_fill_(d_bad[d0:d1].reshape(1, -1), float("-inf"))
    return t


def _block_top(qb: Tensor, d: Tensor, d_bad: Tensor | None, kk: int, bd: int) -> tuple[Tensor, Tensor]:
    """The ``kk`` largest similarities (unsorted) of each row of ``qb`` over every document token, masked-out ones
    at -inf (a running ``torch.topk`` merged block of documents by block), and the last tile computed (the
    whole ``[rows, Nd·Ld]`` block when ``bd == Nd``, which the second sweep then reuses)."""
    top = tile = None
    for d0 in range(0, d.shape[0], bd):
        tile = _tile(qb, d, d_bad, d0, min(d.shape[0], d0 + bd))
        cand = tile if top is None else torch.cat([top, tile], dim=1)
        top = cand.topk(min(kk, cand.shape[1]), dim=1, sorted=False).values
    return top, tile


def _smallest(top: Tensor) -> Tensor:
    """``[rows, 1]``: the smallest of each row's retrieved values, NaN taken as +inf (``torch.topk`` ranks NaN
    first, so a NaN among them is above every number); infinities stay infinite."""
    inf = float("inf")
    return top.nan_to_num(nan=inf, posinf=inf, neginf=-inf).amin(dim=1, keepdim=True)


def xtr_bounds(q: Tensor, d: Tensor, d_valid: Tensor, d_masked: bool, k: int) -> tuple[Tensor, Tensor]:
    """``(hi, lo)`` ``[Nq·Lq]`` in the accumulation dtype: the ``kk``-th and ``(kk+1)``-th largest similarity of
    each query token over every valid document token (``kk = min(k, Nd·Ld)``; NaN counted as +inf; -inf where
    there is no such token).  The Triton engine's first sweep when ``k`` is too large for its kernel."""
    acc = accumulation_dtype(q.dtype)
    q, d = q.to(acc), d.to(acc)
    nq, lq, _ = q.shape
    nd, ld, _ = d.shape
    kk = min(k, nd * ld)
    bq, bd = _blocks(nq, lq, nd, ld, kk + 1, q.element_size())
    d_bad = ~d_valid if d_masked else None
    hi = q.new_full((nq * lq,), float("-inf"))
    lo = q.new_full((nq * lq,), float("-inf"))
    for q0 in range(0, nq, bq):
        r0, r1 = q0 * lq, min(nq, q0 + bq) * lq
        top, _ = _block_top(q[q0:q0 + bq].reshape(r1 - r0, -1), d, d_bad, kk + 1, bd)
        top = top.nan_to_num(nan=float("inf"), posinf=float("inf"), neginf=float("-inf"))
        top = top.sort(dim=1, descending=True).values
        hi[r0:r1] = top[:, kk - 1]
        if top.shape[1] > kk:
            lo[r0:r1] = top[:, kk]
    return hi, lo


def xtr_fwd(q: Tensor, d: Tensor, q_valid: Tensor, d_valid: Tensor, k: int, need_aux: bool, d_masked: bool):
    """``(scores [Nq, Nd], idx [Nq, Nd, Lq], z [Nq, Nd])`` in the accumulation dtype (idx and z empty without
    ``need_aux``).  ``q``, ``d``: any float dtype, masked-out tokens already zero."""
    acc = accumulation_dtype(q.dtype)
    q, d = q.to(acc), d.to(acc)
    nq, lq, _ = q.shape
    nd, ld, _ = d.shape
    dev = q.device
    kk = min(k, nd * ld)
    bq, bd = _blocks(nq, lq, nd, ld, kk, q.element_size())
    d_bad = ~d_valid if d_masked else None
    qw = q_valid.to(acc)
    total = torch.zeros(nq, nd, dtype=acc, device=dev)
    z = torch.zeros(nq, nd, dtype=acc, device=dev)
    idx = torch.empty(nq, nd, lq, dtype=index_dtype(ld), device=dev) if need_aux else None
    for q0 in range(0, nq, bq):
        q1 = min(nq, q0 + bq)
        rows = (q1 - q0) * lq
        qb = q[q0:q1].reshape(rows, -1)
        # 1. the k-th largest similarity of each query token over every valid document token
        top, tile = _block_top(qb, d, d_bad, kk, bd)
        thr = _smallest(top)
        # 2. MaxSim over the retrieved tokens (NaN < thr is False: a NaN is retrieved and propagates)
        for d0 in range(0, nd, bd):
            d1 = min(nd, d0 + bd)
            if bd < nd:
                tile = _tile(qb, d, d_bad, d0, d1)
            keep = ~(tile < thr)
            if d_bad is not None:
                keep &= ~d_bad[d0:d1].reshape(1, -1)
            tile.masked_fill_(~keep, float("-inf"))
            val, arg = tile.view(rows, d1 - d0, ld).max(dim=2)
            hit = keep.view(rows, d1 - d0, ld).any(dim=2).view(q1 - q0, lq, d1 - d0)
            hit &= q_valid[q0:q1, :, None]
            val = torch.where(hit, val.view(q1 - q0, lq, d1 - d0), torch.zeros((), dtype=acc, device=dev))
            total[q0:q1, d0:d1] = (val * qw[q0:q1, :, None]).sum(dim=1)
            z[q0:q1, d0:d1] = hit.sum(dim=1).to(acc)
            if need_aux:
                arg = torch.where(hit, arg.view(q1 - q0, lq, d1 - d0), -1)
                idx[q0:q1, d0:d1] = arg.permute(0, 2, 1).to(idx.dtype)
    scores = total / z.clamp_min(1)
    if not need_aux:
        return scores, q.new_empty(0, dtype=index_dtype(ld)), q.new_empty(0)
    return scores, idx, z


def xtr_bwd(g: Tensor, q: Tensor, d: Tensor, q_valid: Tensor, d_valid: Tensor, idx: Tensor, z: Tensor):
    """``(dq, dd)`` in the accumulation dtype: the routing of ``g / max(Z, 1)`` through the arg-max indices."""
    acc = accumulation_dtype(q.dtype)
    q, d = q.to(acc), d.to(acc)
    gz = g.to(acc) / z.clamp_min(1)
    return route(q, d, idx, gz, q_valid.to(q.dtype), d_valid, check_winner=False)


__all__ = ["xtr_bounds", "xtr_bwd", "xtr_fwd"]
