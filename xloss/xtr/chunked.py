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


def xtr_fwd(q: Tensor, d: Tensor, q_valid: Tensor, d_valid: Tensor, k: int, need_aux: bool, d_masked: bool):
    """``(scores [Nq, Nd], idx [Nq, Nd, Lq], z [Nq, Nd])`` (idx and z empty without ``need_aux``).

    ``q``, ``d``: in the accumulation dtype, masked-out tokens already zero."""
    nq, lq, _ = q.shape
    nd, ld, _ = d.shape
    dev, acc = q.device, q.dtype
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
        tile = None
        top = None
        for d0 in range(0, nd, bd):
            tile = _tile(qb, d, d_bad, d0, min(nd, d0 + bd))
            cand = tile if top is None else torch.cat([top, tile], dim=1)
            top = cand.topk(min(kk, cand.shape[1]), dim=1, sorted=False).values
        # NaN ranks first in topk: the threshold is the smallest non-NaN value among the k retrieved
        thr = top.nan_to_num(nan=float("inf")).amin(dim=1, keepdim=True)
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
    gz = g.to(q.dtype) / z.clamp_min(1)
    return route(q, d, idx, gz, q_valid.to(q.dtype), d_valid, check_winner=False)


__all__ = ["xtr_bwd", "xtr_fwd"]
