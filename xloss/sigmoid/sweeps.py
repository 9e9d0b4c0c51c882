"""Where the keys come from in the sigmoid-loss sweep: one process, a ring of ranks, or an all-gather.

The sigmoid loss needs no normalisation, so one sweep gives the loss and every gradient; across ranks, each key
block's ``dk`` accumulator travels with it around the ring (or is summed with a reduce_scatter after an
all-gather) and arrives back, complete, at its owner.  See ``xloss/_comm.py`` for the exchanges.

With group ids, the key group ids of every rank are gathered once per sweep (``[M]`` long, global key order)
and sliced per key block in the ring (or used whole after the all-gather); the query ids stay local.
"""

from __future__ import annotations

import torch

from .. import _comm
from .._tiling import accumulation_dtype
from . import ops


def _add(total, part):
    return part if total is None else total + part


def run(comm, q, k, s, bias, labels, need_grad: bool, engine: str, *, row_weight=None, per_row: bool = False,
        groups=None):
    """``(loss, dq, dk, ds, db)`` of this rank's queries against every key; ``dk`` complete for this rank's
    keys; ``loss`` this rank's part (a 0-dim sum, or ``[n]`` row sums with ``per_row``).

    ``groups``: None (``labels``: global key indices), or ``(qg [n], kg [m])``, the group ids of this rank's
    queries and keys (``labels`` then unused)."""
    options = {"row_weight": row_weight, "per_row": per_row}
    qg = kg_all = None
    if groups is not None:
        qg, kg_all = groups[0], comm.gather_keys(groups[1])  # kg_all: every key's id, [M] in global key order
    if comm.exchange == "ring":
        return _ring(comm, q, k, s, bias, labels, qg, kg_all, need_grad, engine, options)
    keys = comm.gather_keys(k)
    loss, dq, dk_all, ds, db = ops.sweep(q, keys, s, bias, labels, need_grad, engine, qg=qg, kg=kg_all,
                                         **options)
    return loss, dq, (comm.scatter_keys(dk_all) if need_grad else None), ds, db


def _ring(comm, q, k, s, bias, labels, qg, kg_all, need_grad, engine, options):
    loss = dq = ds = db = None
    dk_ring = _comm.AccRing(comm, k.shape[1], accumulation_dtype(q.dtype), q.device) if need_grad else None
    for off, mb, block in _comm.KeyRing(comm, k):
        rel = kg = None
        if qg is None:
            rel, inside = _comm.block_labels(labels, off, mb)
            rel = torch.where(inside, rel, rel.new_full((), -1))  # -1: the positive is in another block
        else:
            kg = kg_all[off: off + mb]  # this block's key ids
        l_b, dq_b, dk_b, ds_b, db_b = ops.sweep(q, block, s, bias, rel, need_grad, engine, qg=qg, kg=kg,
                                                **options)
        loss = _add(loss, l_b)
        if need_grad:
            dq, ds, db = _add(dq, dq_b), _add(ds, ds_b), _add(db, db_b)
            dk_ring.add_and_pass(dk_b)
            del dk_b
    return loss, dq, (dk_ring.finish() if need_grad else None), ds, db
