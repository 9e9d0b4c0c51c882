"""Where the keys come from in the sigmoid-loss sweep: one process, a ring of ranks, or an all-gather.

The sigmoid loss needs no normalisation, so one sweep gives the loss and every gradient; across ranks, each key
block's ``dk`` accumulator travels with it around the ring (or is summed with a reduce_scatter after an
all-gather) and arrives back, complete, at its owner.  See ``xloss/_comm.py`` for the exchanges.
"""

from __future__ import annotations

import torch

from .. import _comm
from .._tiling import accumulation_dtype
from . import ops


def _add(total, part):
    return part if total is None else total + part


def run(comm, q, k, s, bias, labels, need_grad: bool, engine: str, *, row_weight=None, per_row: bool = False):
    """``(loss, dq, dk, ds, db)`` of this rank's queries against every key; ``dk`` complete for this rank's
    keys; ``loss`` this rank's part (a 0-dim sum, or ``[n]`` row sums with ``per_row``)."""
    options = {"row_weight": row_weight, "per_row": per_row}
    if comm.exchange == "ring":
        return _ring(comm, q, k, s, bias, labels, need_grad, engine, options)
    keys = comm.gather_keys(k)
    loss, dq, dk_all, ds, db = ops.sweep(q, keys, s, bias, labels, need_grad, engine, **options)
    return loss, dq, (comm.scatter_keys(dk_all) if need_grad else None), ds, db


def _ring(comm, q, k, s, bias, labels, need_grad, engine, options):
    loss = dq = ds = db = None
    dk_ring = _comm.AccRing(comm, k.shape[1], accumulation_dtype(q.dtype), q.device) if need_grad else None
    for off, mb, block in _comm.KeyRing(comm, k):
        rel, inside = _comm.block_labels(labels, off, mb)
        rel = torch.where(inside, rel, rel.new_full((), -1))  # -1: this query's positive is in another block
        l_b, dq_b, dk_b, ds_b, db_b = ops.sweep(q, block, s, bias, rel, need_grad, engine, **options)
        loss = _add(loss, l_b)
        if need_grad:
            dq, ds, db = _add(dq, dq_b), _add(ds, ds_b), _add(db, db_b)
            dk_ring.add_and_pass(dk_b)
            del dk_b
    return loss, dq, (dk_ring.finish() if need_grad else None), ds, db
