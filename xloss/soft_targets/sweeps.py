"""Where the keys come from in the distillation sweeps: one process, a ring of ranks, or an all-gather.

As ``xloss/infonce/sweeps.py``: the loss formula lives once, in the Function; these functions move data so that
the statistics and gradients are those of the whole (concatenated) batch.  The teacher's keys travel beside the
student's (a second ring, its own message tag); each rank writes its part of the per-key statistics into O(M)
buffers that are merged across ranks once.
"""

from __future__ import annotations

import torch

from .. import _comm
from .._tiling import accumulation_dtype
from . import ops


def merge_teacher(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Merge two teacher statistics ``[max, Σ exp(t − max), Σ exp(t − max)·z]`` of disjoint sets."""
    mx = torch.maximum(a[0], b[0])
    return torch.cat([mx[None], a[1:] * torch.exp(a[0] - mx) + b[1:] * torch.exp(b[0] - mx)])


def _all_merge_teacher(comm, stats: torch.Tensor) -> torch.Tensor:
    mx = comm.all_reduce(stats[0].clone(), torch.distributed.ReduceOp.MAX)
    return torch.cat([mx[None], comm.all_reduce(stats[1:] * torch.exp(stats[0] - mx))])


def lse(comm, q, k, s, tq, tk, ts, need_cols: bool, engine: str):
    """``(row [2, n], col [2, M] | None, trow [3, n], tcol [3, M] | None, keys | None)``: the local queries' rows
    over every key and every key's column over every query (the same on every rank); ``keys``: the gathered
    ``(k, tk)`` (all_gather only, saved for backward)."""
    if comm.exchange != "ring":
        keys, tkeys = comm.gather_keys(k), comm.gather_keys(tk)
        row, col, trow, tcol = ops.lse(q, keys, s, tq, tkeys, ts, need_cols, engine)
        if need_cols and not comm.is_local:
            col, tcol = _comm.all_merge_stats(comm, col), _all_merge_teacher(comm, tcol)
        return row, col, trow, tcol, (None if comm.is_local else (keys, tkeys))
    acc, M = accumulation_dtype(q.dtype), comm.layout.M
    row = trow = col = tcol = None
    if need_cols:  # this rank's part of every column (a block never seen here stays empty)
        col = torch.stack([q.new_full((M,), float("-inf"), dtype=acc), q.new_zeros(M, dtype=acc)])
        tcol = torch.cat([q.new_full((1, M), float("-inf"), dtype=acc), q.new_zeros((2, M), dtype=acc)])
    rings = zip(_comm.KeyRing(comm, k), _comm.KeyRing(comm, tk, _comm.TAG_TEACHER))
    for (off, mb, block), (_, _, tblock) in rings:
        r_b, c_b, tr_b, tc_b = ops.lse(q, block, s, tq, tblock, ts, need_cols, engine)
        row = r_b if row is None else _comm.merge_stats(row, r_b)
        trow = tr_b if trow is None else merge_teacher(trow, tr_b)
        if need_cols:
            col[:, off : off + mb], tcol[:, off : off + mb] = c_b, tc_b
    if need_cols:
        col, tcol = _comm.all_merge_stats(comm, col), _all_merge_teacher(comm, tcol)
    return row, col, trow, tcol, None


def grad(comm, q, k, keys, s, tq, tk, ts, row, col, trow, tcol, a, w, engine: str):
    """``(dq [n, D], dk [m, D])``, unscaled, accumulation dtype; ``col``, ``tcol``, ``w`` global; ``trow``,
    ``tcol`` as split LSE ``[2, ·]``."""
    if comm.exchange != "ring":
        kk, tkk = (k, tk) if keys is None else keys
        dq, dk = ops.grad(q, kk, s, tq, tkk, ts, row, col, trow, tcol, a, w, engine)
        return dq, comm.scatter_keys(dk)
    dq = None
    dk_ring = _comm.AccRing(comm, k.shape[1], accumulation_dtype(q.dtype), q.device)
    rings = zip(_comm.KeyRing(comm, k), _comm.KeyRing(comm, tk, _comm.TAG_TEACHER))
    for (off, mb, block), (_, _, tblock) in rings:
        blk = slice(off, off + mb)
        cols = (None, None, None) if col is None else (col[:, blk], tcol[:, blk], w[blk])
        dq_b, dk_b = ops.grad(q, block, s, tq, tblock, ts, row, cols[0], trow, cols[1], a, cols[2], engine)
        dq = dq_b if dq is None else dq.add_(dq_b)
        dk_ring.add_and_pass(dk_b)
        del dk_b
    return dq, dk_ring.finish()
