"""Where the keys come from in each InfoNCE sweep: one process, a ring of ranks, or an all-gather.

The loss formula lives once, in :class:`~xloss.infonce.InfoNCEFunction`; these two functions only move data so
that its statistics and gradients are those of the whole (concatenated) batch:

* ``lse``: the row statistics of this rank's queries over every key, the column statistics of every key over
  every query (``[2, M]``, global), and each query's positive logit;
* ``grad``: the softmax part and the target part of ``dq`` for this rank's queries and of ``dk`` for this rank's
  keys, complete (summed over the queries of every rank).

``comm.exchange`` picks the data movement (see ``xloss/_comm.py``): ``"local"`` (one process: the engine sweeps
once), ``"all_gather"`` (every key on every rank; column statistics merged by all_reduce; ``dk`` summed with a
reduce_scatter) or ``"ring"`` (the Inf-CL idea: key blocks travel around the ring while the current block's
tiles are computed; column statistics and ``dk`` accumulators travel with their block and arrive back,
complete, at its owner; memory flat in the world size).  The engine sweeps run through the custom ops of
``ops.py`` in every case.
"""

from __future__ import annotations

import torch

from .. import _comm
from .._tiling import accumulation_dtype
from . import ops


def lse(comm, q, k, s, labels, symmetric: bool, keep_logits: bool, engine: str):
    """``(row [2, n], col [2, M] | None, z_pos [n], keys [M, D] | None, logits | None)``.

    ``keys`` are the gathered keys (all_gather only, saved for backward); ``logits`` the kept logits (one
    process, chunked engine, small problems only).
    """
    if comm.exchange == "ring":
        row, col, z_pos = _ring_lse(comm, q, k, s, labels, symmetric, engine)
        if symmetric:  # O(M) per-key statistics of every key: for the queries whose positive lives elsewhere
            col = comm.gather_keys(col.T.contiguous()).T
        return row, col, z_pos, None, None
    keys = comm.gather_keys(k)
    row, col, z_pos, logits = ops.lse(q, keys, s, labels, symmetric, keep_logits, engine)
    if symmetric and not comm.is_local:
        mx = comm.all_reduce(col[0].clone(), torch.distributed.ReduceOp.MAX)
        total = comm.all_reduce(torch.exp((col[0] - mx) + col[1]))
        col = torch.stack([mx, total.log()])
    return row, col, z_pos, (None if comm.is_local else keys), logits


def grad(comm, q, qf, k, keys, s, row, col, a, w, labels, pos, logits, engine: str):
    """``(dq [n, D], dk [m, D])``, unscaled, accumulation dtype: the softmax part ``P k``, ``Pᵀ q`` with the
    weights ``a`` (rows) and ``w`` (columns, global ``[M]``), minus the target part ``pos_i`` at
    ``(i, labels[i])``; ``dk`` complete for this rank's keys.  ``qf``: ``q`` in the accumulation dtype."""
    acc = row.dtype
    if comm.exchange == "ring":
        return _ring_grad(comm, q, qf, k, s, row, col, a, w, labels, pos, engine)
    kk = k if keys is None else keys
    dq, dk = ops.grad(q, kk, s, row, col, a, w, logits, engine)
    dq -= pos[:, None] * kk[labels].to(acc)
    dk.index_add_(0, labels, -pos[:, None] * qf)
    return dq, comm.scatter_keys(dk)


def _ring_lse(comm, q, k, s, labels, symmetric, engine):
    """Forward ring: row statistics of the local queries over all keys, the complete column statistics of the
    local keys (``[2, m_r]``, after their trip around the ring) and each local query's positive logit."""
    row = col_works = col_in = sent = z_pos = None
    lay = comm.layout
    for t, (off, mb, block) in enumerate(_comm.KeyRing(comm, k)):
        rel, inside = _comm.block_labels(labels, off, mb)
        r_part, c_part, zp, _ = ops.lse(q, block, s, rel, symmetric, False, engine)
        row = r_part if row is None else _comm.merge_stats(row, r_part)
        z_pos = torch.where(inside, zp, zp.new_zeros(()) if z_pos is None else z_pos)
        if symmetric:
            if t > 0:  # this block's statistics so far, from the ranks it visited before (small: [2, m_b])
                _comm.wait(col_works)
                c_part = _comm.merge_stats(col_in, c_part)
            b = (comm.rank - t) % comm.size
            col_in = c_part.new_empty(2, lay.m[(b - 1) % comm.size])
            sent = c_part.contiguous()  # kept alive until its work is waited on
            col_works = comm.ring(sent, col_in, _comm.TAG_COL)  # the last hop returns it to its owner
    _comm.wait(col_works)
    del sent
    return row, col_in, z_pos


def _ring_grad(comm, q, qf, k, s, row, col, a, w, labels, pos, engine):
    """Backward ring: ``dq`` of the local queries, and the complete ``dk`` of the local keys, whose accumulator
    travels around the ring (every rank adds its queries' part) and arrives back at its owner."""
    acc = row.dtype
    dq = None
    dk_ring = _comm.AccRing(comm, k.shape[1], acc, q.device)
    for off, mb, block in _comm.KeyRing(comm, k):
        blk = slice(off, off + mb)
        dq_b, dk_b = ops.grad(q, block, s, row, None if col is None else col[:, blk], a,
                              None if w is None else w[blk], None, engine)
        rel, inside = _comm.block_labels(labels, off, mb)
        p = torch.where(inside, pos, pos.new_zeros(()))  # target terms of the queries whose positive is here
        dq_b -= p[:, None] * block[rel].to(acc)
        dk_b.index_add_(0, rel, -p[:, None] * qf)
        dq = dq_b if dq is None else dq.add_(dq_b)
        dk_ring.add_and_pass(dk_b)
        del dk_b
    return dq, dk_ring.finish()


# ------------------------------------------------------------------------------ structured targets (issue 11)
# The target rule (engine.py) across ranks.  Key group ids are global (gathered once by the caller); the self pair
# of the single-tower form is found from global offsets (``self_offset = key block offset - query offset``).  Only
# the keys (and, in backward, their dk accumulators) travel: each rank writes its part of the per-key statistics
# (best positive, LSE, positive sums) into O(M) buffers, merged across ranks once at the end.


def _rule_at(rule, key_offset: int, query_offset: int):
    """The rule of one key block: the self pair at ``i - j == key_offset - query_offset`` (local indices)."""
    return rule.at(key_offset - query_offset if rule.exclude_self else None)


def positive_max(comm, q, k, qg, kg, rule, need_cols: bool, engine: str):
    """``(ref_r [n], ref_c [M] | None)``: each local query's and each (global) key's best positive raw score."""
    q_off = comm.query_offset()
    if comm.exchange != "ring":
        keys = comm.gather_keys(k)
        ref_r, ref_c = ops.positive_max(q, keys, qg, kg, _rule_at(rule, 0, q_off), need_cols, engine)
        if need_cols and not comm.is_local:
            ref_c = comm.all_reduce(ref_c, torch.distributed.ReduceOp.MAX)
        return ref_r, ref_c
    ref_r = ref_c = None
    if need_cols:
        ref_c = q.new_full((comm.layout.M,), float("-inf"), dtype=_acc(q))
    for off, mb, block in _comm.KeyRing(comm, k):
        r_b, c_b = ops.positive_max(q, block, qg, kg[off : off + mb], _rule_at(rule, off, q_off), need_cols,
                                    engine)
        ref_r = r_b if ref_r is None else torch.maximum(ref_r, r_b)
        if need_cols:
            ref_c[off : off + mb] = c_b
    if need_cols:
        ref_c = comm.all_reduce(ref_c, torch.distributed.ReduceOp.MAX)
    return ref_r, ref_c


def masked_lse(comm, q, k, s, qg, kg, rule, ref_r, ref_c, need_cols: bool, engine: str):
    """``(row [2, n], col [2, M] | None, pos_r [2, n], pos_c [2, M] | None, keys | None)``: statistics of the
    local queries' rows and of every key's column (global, the same on every rank); ``keys`` as in ``lse``."""
    q_off = comm.query_offset()
    if comm.exchange != "ring":
        keys = comm.gather_keys(k)
        row, col, pos_r, pos_c = ops.masked_lse(q, keys, s, qg, kg, _rule_at(rule, 0, q_off), ref_r, ref_c,
                                                need_cols, engine)
        if need_cols and not comm.is_local:
            col, pos_c = _comm.all_merge_stats(comm, col), comm.all_reduce(pos_c)
        return row, col, pos_r, pos_c, (None if comm.is_local else keys)
    M = comm.layout.M
    row = pos_r = col = pos_c = None
    if need_cols:  # this rank's part of every column; the blocks it never saw stay empty
        col = torch.stack([q.new_full((M,), float("-inf"), dtype=_acc(q)), q.new_zeros(M, dtype=_acc(q))])
        pos_c = q.new_zeros((2, M), dtype=_acc(q))
    for off, mb, block in _comm.KeyRing(comm, k):
        blk = slice(off, off + mb)
        r_b, c_b, p_b, pc_b = ops.masked_lse(q, block, s, qg, kg[blk], _rule_at(rule, off, q_off), ref_r,
                                             None if ref_c is None else ref_c[blk], need_cols, engine)
        row = r_b if row is None else _comm.merge_stats(row, r_b)
        pos_r = p_b if pos_r is None else pos_r + p_b
        if need_cols:
            col[:, blk], pos_c[:, blk] = c_b, pc_b
    if need_cols:
        col, pos_c = _comm.all_merge_stats(comm, col), comm.all_reduce(pos_c)
    return row, col, pos_r, pos_c, None


def masked_grad(comm, q, k, keys, s, qg, kg, rule, ref_r, ref_c, row, col, a, w, pa, pw, engine: str):
    """``(dq [n, D], dk [m, D])``, unscaled, accumulation dtype; ``w``, ``pw``, ``col``, ``ref_c`` global."""
    q_off = comm.query_offset()
    if comm.exchange != "ring":
        kk = k if keys is None else keys
        dq, dk = ops.masked_grad(q, kk, s, qg, kg, _rule_at(rule, 0, q_off), ref_r, ref_c, row, col, a, w, pa, pw,
                                 engine)
        return dq, comm.scatter_keys(dk)
    dq = None
    dk_ring = _comm.AccRing(comm, k.shape[1], _acc(q), q.device)

    def part(x, blk):
        return None if x is None else x[..., blk]

    for off, mb, block in _comm.KeyRing(comm, k):
        blk = slice(off, off + mb)
        dq_b, dk_b = ops.masked_grad(q, block, s, qg, kg[blk], _rule_at(rule, off, q_off), ref_r, part(ref_c, blk),
                                     row, part(col, blk), a, part(w, blk), pa, part(pw, blk), engine)
        dq = dq_b if dq is None else dq.add_(dq_b)
        dk_ring.add_and_pass(dk_b)
        del dk_b
    return dq, dk_ring.finish()


def _acc(q):
    return accumulation_dtype(q.dtype)


# ------------------------------------------------------------------------------ Matryoshka prefixes (issue 12)
# The keys' inverse prefix norms rk [P, m] travel with the keys, in one message: ``_bundle`` appends their bits to
# the key rows (an fp32 norm as two half-precision words when the keys are half), ``_unbundle`` takes them apart.
# Per-prefix statistics are [P, 2, ·]; the dk accumulators carry the norms' gradients the same way ([m, D + P]).


def _bundle(k, rk):
    """``[m, D + c]``: the key rows and their inverse norms' bits (``k`` itself without norms)."""
    if rk is None:
        return k
    r = rk.T.contiguous()
    return torch.cat([k, r if r.dtype == k.dtype else r.view(k.dtype)], 1)


def _unbundle(block, d: int, norms_dtype):
    """``(k [m, D], rk [P, m] | None)`` of a bundle; ``norms_dtype`` None: there are no norms."""
    if norms_dtype is None:
        return block, None
    r = block[:, d:]
    if r.dtype != norms_dtype:
        r = r.contiguous().view(norms_dtype)
    return block[:, :d], r.T


def _merge_prefix_stats(x, y):
    """``merge_stats`` of per-prefix statistics ``[P, 2, ·]``."""
    return _comm.merge_stats(x.transpose(0, 1), y.transpose(0, 1)).transpose(0, 1)


def matryoshka_lse(comm, q, k, rq, rk, s, labels, dims, symmetric: bool, engine: str):
    """``(row [P, 2, n], col [P, 2, M] | None, z_pos [P, n], keys | None)``: statistics of this rank's queries'
    rows and of every key's column per prefix; ``keys`` the gathered key bundle (all_gather only, for backward)."""
    dims = list(dims)
    if comm.exchange == "ring":
        row, col, z_pos = _ring_matryoshka_lse(comm, q, k, rq, rk, s, labels, dims, symmetric, engine)
        if symmetric:  # every key's statistics, for the queries whose positive lives elsewhere
            P, m = col.shape[0], col.shape[2]
            full = comm.gather_keys(col.permute(2, 0, 1).reshape(m, 2 * P))
            col = full.reshape(-1, P, 2).permute(1, 2, 0)
        return row, col, z_pos, None
    if comm.is_local:
        row, col, z_pos = ops.matryoshka_lse(q, k, rq, rk, s, labels, dims, symmetric, engine)
        return row, col, z_pos, None
    keys = comm.gather_keys(_bundle(k, rk))
    kk, rkk = _unbundle(keys, k.shape[1], None if rk is None else rk.dtype)
    row, col, z_pos = ops.matryoshka_lse(q, kk, rq, rkk, s, labels, dims, symmetric, engine)
    if symmetric:
        P, M = col.shape[0], col.shape[2]
        col = _comm.all_merge_stats(comm, col.transpose(0, 1).reshape(2, P * M)).reshape(2, P, M).transpose(0, 1)
    return row, col, z_pos, keys


def _ring_matryoshka_lse(comm, q, k, rq, rk, s, labels, dims, symmetric, engine):
    """As ``_ring_lse``, per prefix; the keys' inverse norms travel with them."""
    row = col_works = col_in = sent = z_pos = None
    lay = comm.layout
    d, norms = k.shape[1], None if rk is None else rk.dtype
    for t, (off, mb, block) in enumerate(_comm.KeyRing(comm, _bundle(k, rk))):
        kb, rkb = _unbundle(block, d, norms)
        rel, inside = _comm.block_labels(labels, off, mb)
        r_part, c_part, zp = ops.matryoshka_lse(q, kb, rq, rkb, s, rel, dims, symmetric, engine)
        row = r_part if row is None else _merge_prefix_stats(row, r_part)
        z_pos = torch.where(inside, zp, zp.new_zeros(()) if z_pos is None else z_pos)
        if symmetric:
            if t > 0:  # this block's statistics from the ranks it visited before
                _comm.wait(col_works)
                c_part = _merge_prefix_stats(col_in, c_part)
            b = (comm.rank - t) % comm.size
            col_in = c_part.new_empty(c_part.shape[0], 2, lay.m[(b - 1) % comm.size])
            sent = c_part.contiguous()  # kept alive until its work is waited on
            col_works = comm.ring(sent, col_in, _comm.TAG_COL)  # the last hop returns it to its owner
    _comm.wait(col_works)
    del sent
    return row, col_in, z_pos


def matryoshka_grad(comm, q, k, keys, rq, rk, s, dims, row, col, a, w, labels, pos, u, v, engine: str):
    """``(dq [n, D], dk [m, D], drq [P, n] | None, drk [P, m] | None)``: the per-prefix weights ``a``, ``pos``,
    ``u`` are this rank's queries' (``[P, n]``), ``w``, ``v`` and ``col`` every key's (``[P, M]``, global);
    ``dk`` and ``drk`` complete (summed over every rank's queries) for this rank's keys."""
    dims = list(dims)
    if comm.exchange == "ring":
        return _ring_matryoshka_grad(comm, q, k, rq, rk, s, dims, row, col, a, w, labels, pos, u, v, engine)
    if comm.is_local:
        return ops.matryoshka_grad(q, k, rq, rk, s, dims, row, col, a, w, labels, pos, u, v, engine)
    d = k.shape[1]
    kk, rkk = _unbundle(keys, d, None if rk is None else rk.dtype)
    dq, dk, drq, drk = ops.matryoshka_grad(q, kk, rq, rkk, s, dims, row, col, a, w, labels, pos, u, v, engine)
    if drk is None:
        return dq, comm.scatter_keys(dk), None, None
    both = comm.scatter_keys(torch.cat([dk, drk.T], 1))
    return dq, both[:, :d], drq, both[:, d:].T


def _ring_matryoshka_grad(comm, q, k, rq, rk, s, dims, row, col, a, w, labels, pos, u, v, engine):
    """As ``_ring_grad``: the accumulator of each key block (``[m_b, D]``, plus ``[m_b, P]`` for the norms'
    gradients) travels around the ring and arrives back, complete, at its owner."""
    d, norms = k.shape[1], None if rk is None else rk.dtype
    P = a.shape[0]
    dq = drq = None
    dk_ring = _comm.AccRing(comm, d + (0 if rk is None else P), a.dtype, q.device)

    def part(x, blk):
        return None if x is None else x[..., blk]

    for off, mb, block in _comm.KeyRing(comm, _bundle(k, rk)):
        kb, rkb = _unbundle(block, d, norms)
        blk = slice(off, off + mb)
        rel, inside = _comm.block_labels(labels, off, mb)
        p = torch.where(inside, pos, pos.new_zeros(()))  # target entries of the queries whose positive is here
        dq_b, dk_b, drq_b, drk_b = ops.matryoshka_grad(q, kb, rq, rkb, s, dims, row, part(col, blk), a,
                                                       part(w, blk), rel, p, u, part(v, blk), engine)
        dq = dq_b if dq is None else dq.add_(dq_b)
        if drq_b is not None:
            drq = drq_b if drq is None else drq.add_(drq_b)
        dk_ring.add_and_pass(dk_b if drk_b is None else torch.cat([dk_b, drk_b.T], 1))
        del dk_b
    both = dk_ring.finish()
    if rk is None:
        return dq, both, None, None
    return dq, both[:, :d], drq, both[:, d:].T
