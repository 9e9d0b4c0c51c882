"""``late_interaction_loss`` over a batch spread across the ranks of a process group (cross-rank in-batch negatives).

Rank ``r`` holds ``q_r [n_r, Lq_r, D]`` and ``d_r [m_r, Ld_r, D]`` (masks and token weights alike); the loss is the
single-process loss of the concatenated batch, padded to the longest token count of any rank with masked-out
tokens (what a trainer that gathers padded batches computes).  The documents' tokens, masks and weights are
all-gathered once (``exchange="all_gather"``): each rank scores its own queries against every document
(``"q2d"`` rows, the arg-max sweeps of one process) and, for ``"d2q"``/``"both"``, every rank's queries (gathered
too) against the positives of its own queries.  The gathers are differentiable (``xloss._comm.GatherRows``):
in the backward, the document (and query) gradients that each rank's arg-max routing produced are summed over
ranks and delivered to their owners.

Returned value and gradients follow ``xloss.distributed``: the global loss on every rank (``"none"``: this
rank's ``[n_r]`` terms); ``grad_reduction="mean"`` scales every gradient by the world size (DDP / FSDP average
it back), ``"sum"`` gives the exact shares.  Labels are global document indices; default: local query i ↔
global document ``offset_r + i``.  Memory: ``O(M·Ld·D)`` document tokens per rank (plus ``O(N·Lq·D)`` query
tokens for ``"d2q"``/``"both"``).

``exchange="ring"``: for ``"q2d"`` (ColBERT's direction) the documents (tokens and mask in one message) travel
the ring instead (:func:`ring_forward`), the next block in flight while this rank scores its queries against the
current one; the backward sends them round again with an accumulator of their gradient that each rank adds
its arg-max routing to (``xloss._comm.AccRing``), so each block's gradient arrives at its owner summed over
ranks, as the all_gather's adjoint gives it.  For ``"d2q"`` the queries travel the same way while each rank
scores its own documents' columns (the same sweep with the roles exchanged), and each query's column term goes
back to its rank in one reduce-scatter of ``[N]`` numbers (:func:`_ring_d2q_columns`); ``"both"`` runs the two
rings.  Memory: two blocks of ``max m_r`` documents (``max n_r`` queries for ``"d2q"``) instead of all of them,
plus the arg-max indices ``[n_r, M, Lq]`` (``[m_r, N, Ld]`` for ``"d2q"``), as for all_gather.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import _comm
from .._tiling import accumulation_dtype
from ..reference.late_interaction import zero_padding


def _padded(x, length: int, fill=0):
    """``x [n, L, ...]`` padded to ``[n, length, ...]`` with ``fill`` (None stays None)."""
    if x is None or x.shape[1] == length:
        return x
    pad = x.new_full((x.shape[0], length - x.shape[1], *x.shape[2:]), fill)
    return torch.cat([x, pad], dim=1)


def ring_forward(ctx, q, d, q_w, q_valid, d_valid, comm, options):
    """Query→document MaxSim of this rank's queries against every rank's documents, passed round the ring:
    ``S [n_r, M]``, the forward of :class:`~xloss.late_interaction.MaxSimFunction` given a ``comm`` (the same
    scores as ``MaxSimFunction(q, all_gather(d))``).  Every rank runs forward and backward together.

    ``q [n_r, Lq, D]``, ``d [m_r, Ld, D]`` (Ld the same on every rank), ``q_w [n_r, Lq]`` (final token weights,
    accumulation dtype), ``q_valid``, ``d_valid`` (bool), ``comm`` (``xloss._comm.GroupComm`` with its layout),
    ``options`` (``MaxSimOptions``, q2d only).
    """
    from . import ops as _ops

    o, lay = options, comm.layout
    n, m, ld, dim = q.shape[0], d.shape[0], d.shape[1], d.shape[2]
    s = torch.empty(n, lay.M, dtype=q_w.dtype, device=q.device)
    idx_all = val_all = None
    need_val = o.need_aux and ctx.needs_input_grad[2]
    for off, size, blk in _comm.KeyRing(comm, _pack(d, d_valid)):
        db, dv = _unpack(blk, ld, dim)
        out = _ops.forward(q, db, q_w, None, q_valid, dv, o.zero_mode, True, False, o.engine, False, o.need_aux,
                           o.q_masked, True)
        s[:, off: off + size] = out[0]
        if o.need_aux:
            if idx_all is None:
                idx_all = q.new_empty((n, lay.M, q.shape[1]), dtype=out[2].dtype)
                val_all = q_w.new_empty((n, lay.M, q.shape[1])) if need_val else None
            idx_all[:, off: off + size] = out[2]
            if need_val:
                val_all[:, off: off + size] = out[3]
    ctx.comm, ctx.shape = comm, (m, ld, dim)
    if o.need_aux:
        ctx.save_for_backward(q, d, q_w, q_valid, d_valid, idx_all, val_all)
    return s


def ring_backward(ctx, g):
    """Gradients ``(dq, dd, dq_w)`` of :func:`ring_forward`: the documents go round again with an accumulator
    of their gradient (``xloss._comm.AccRing``) that each rank adds its arg-max routing to, so each block's
    gradient arrives at its owner summed over ranks (the all_gather's adjoint)."""
    from . import ops as _ops

    q, d, q_w, q_valid, d_valid, idx_all, val_all = ctx.saved_tensors
    comm, o = ctx.comm, ctx.options
    m, ld, dim = ctx.shape
    needs = (ctx.needs_input_grad[0], True, ctx.needs_input_grad[2], False)  # every rank passes d's part on
    acc = q_w.dtype
    if g is None:
        g = q_w.new_zeros((q.shape[0], comm.layout.M))
    qz = zero_padding(q, q_valid) if o.q_masked else q  # as for one process: no 0·NaN in the products
    dq = dq_w = None
    ring = _comm.AccRing(comm, ld * dim, acc, q.device)
    for off, size, blk in _comm.KeyRing(comm, _pack(d, d_valid)):
        db, dv = _unpack(blk, ld, dim)
        gq, gd, gqw, _ = _ops.backward(
            g[:, off: off + size], None, qz, zero_padding(db, dv), q_w, None, q_valid, dv,
            idx_all[:, off: off + size], None if val_all is None else val_all[:, off: off + size],
            q.new_empty(0, dtype=idx_all.dtype), None, o.zero_mode, True, False, o.engine, False, needs)
        ring.add_and_pass(gd.reshape(size, ld * dim).to(acc))
        if gq is not None:
            dq = gq.to(acc) if dq is None else dq.add_(gq)
        if gqw is not None:
            dq_w = gqw if dq_w is None else dq_w.add_(gqw)
    dd = ring.finish()[:m].view(m, ld, dim).to(d.dtype)
    return (None if dq is None else dq.to(q.dtype)), dd, dq_w


def _pack(d, d_valid):
    """One ring message per block of documents: ``[m, Ld·D + Ld]``, the tokens then the mask as 0/1."""
    m = d.shape[0]
    return torch.cat([d.reshape(m, -1), d_valid.to(d.dtype)], dim=1).contiguous()


def _unpack(blk, ld: int, dim: int):
    return blk[:, : ld * dim].view(-1, ld, dim), blk[:, ld * dim:] != 0


def _ring_q2d(comm, q, d, q_valid, d_valid, q_weights, token_reduction, mask_mode, engine, need_grad):
    """``S^{q2d} [n_r, M]`` through ``MaxSimFunction`` with the ring (:func:`ring_forward`); with ``need_grad``
    (the same on every rank) d enters as a leaf that needs a gradient on every rank, so that every rank runs the
    backward's ring."""
    from ..reference.late_interaction import token_weights
    from . import MaxSimFunction, MaxSimOptions

    q_w = token_weights(q_valid, q_weights, token_reduction, accumulation_dtype(q.dtype))
    options = MaxSimOptions(mask_mode == "zero", True, False, engine, False, 1, need_grad, True, True)
    if need_grad and not d.requires_grad:
        d = d.detach().requires_grad_()
    return MaxSimFunction.apply(q, d, q_w, None, q_valid, d_valid, options, comm)[0]


def _ring_d2q_columns(comm, q, d, q_valid, d_valid, d_weights, labels, scale, label_smoothing, token_reduction,
                      mask_mode, engine, need_grad):
    """The column (document→query) terms of this rank's queries, ``[n_r]``, with the queries passed round the ring.

    ``S^{d2q}`` of this rank's documents against every query is the query→document MaxSim with the roles
    exchanged (documents as the queries, their token weights as the query-token weights, the same mask mode), so
    it is :func:`_ring_q2d` on a communicator whose layout swaps queries and keys: ``[m_r, N]``, the columns of
    this rank's documents.  Query a's term is the cross-entropy of its positive's column, ``LSE_i z_ij −
    (1−ε)·z_aj − ε·mean_i z_ij`` (j its label), computed where column j lives, and a reduce-scatter
    (:class:`xloss._comm.ScatterRows`, whose adjoint is an all_gather) brings each term to its query's rank.
    """
    lay = comm.layout
    s_t = _ring_q2d(comm.swapped(), d, q, d_valid, q_valid, d_weights, token_reduction, mask_mode, engine, need_grad)
    z = s_t * (scale if scale.requires_grad else scale.to(s_t.dtype))  # [m_r, N]
    all_labels = _comm.gather_sized(comm, labels, lay.n)  # every query's global document
    off, m = comm.key_offset(), d.shape[0]
    owned = (all_labels >= off) & (all_labels < off + m)  # the queries whose positive is one of this rank's
    if m:
        j = (all_labels - off).clamp(0, m - 1)
        terms = torch.logsumexp(z, dim=1)[j] - (1 - label_smoothing) * z[j, torch.arange(lay.N, device=z.device)]
        if label_smoothing:
            terms = terms - label_smoothing * z.mean(dim=1)[j]
        partial = torch.where(owned, terms, terms.new_zeros(()))
    else:  # no documents here: nothing to add, but the collective runs on every rank
        partial = z.new_zeros(lay.N)
    return _comm.scatter_rows(comm, partial, lay.n, need_grad)


def loss_across_ranks(q, d, q_mask, d_mask, q_weights, d_weights, *, scale, labels, direction, mask_mode,
                      token_reduction, label_smoothing, reduction, engine, group, exchange, grad_reduction):
    from . import _directional

    if exchange not in ("all_gather", "ring"):
        raise ValueError(f"late_interaction_loss across ranks exchanges the documents with exchange='all_gather' "
                         f"or 'ring', got exchange={exchange!r}")
    need_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (q, d, q_weights, d_weights, scale))
    # One metadata exchange (sizes, D, dtype, device, scale, label range: the same error on every rank), on a
    # [n, D] / [m, D] view of the token tensors; then the token counts, to pad every rank to the longest.
    comm, need_grad = _comm.make(group, exchange, grad_reduction, q[:, 0] if q.shape[1] else q.sum(1),
                                 d[:, 0] if d.shape[1] else d.sum(1), labels, [scale], need_grad, engine)
    lay = comm.layout
    lengths = comm.all_gather_rows(torch.tensor([q.shape[1], d.shape[1]], device=comm.meta_device(q.device)))
    lq, ld = (int(v) for v in lengths.max(dim=0).values.tolist())
    q_valid = torch.ones(q.shape[:2], dtype=torch.bool, device=q.device) if q_mask is None else q_mask
    d_valid = torch.ones(d.shape[:2], dtype=torch.bool, device=d.device) if d_mask is None else d_mask
    q, q_valid, q_weights = _padded(q, lq), _padded(q_valid, lq, False), _padded(q_weights, lq)
    d, d_valid, d_weights = _padded(d, ld), _padded(d_valid, ld, False), _padded(d_weights, ld)
    q2d, d2q = direction in ("q2d", "both"), direction in ("d2q", "both")

    labels = comm.default_labels(q.shape[0], q.device) if labels is None else labels.long()
    acc_scale = scale
    if exchange == "ring":
        d_all = d_valid_all = d_weights_all = None
    else:
        d_all = _comm.gather_rows(comm, d, lay.m, need_grad)
        d_valid_all = _comm.gather_rows(comm, d_valid, lay.m)
        d_weights_all = _comm.gather_rows(comm, d_weights, lay.m, need_grad) if d2q else None

    rows = cols = None
    if q2d and exchange == "ring":
        s_q2d = _ring_q2d(comm, q, d, q_valid, d_valid, q_weights, token_reduction, mask_mode, engine, need_grad)
    elif q2d:
        s_q2d, _ = _directional(q, d_all, q_valid, d_valid_all, token_reduction, mask_mode, q_weights, None, "q2d",
                                engine, pairs=False)
    if q2d:
        z = s_q2d * (acc_scale if acc_scale.requires_grad else acc_scale.to(s_q2d.dtype))
        rows = F.cross_entropy(z, labels, label_smoothing=label_smoothing, reduction="none")
    if d2q and exchange == "ring":
        cols = _ring_d2q_columns(comm, q, d, q_valid, d_valid, d_weights, labels, acc_scale, label_smoothing,
                                 token_reduction, mask_mode, engine, need_grad)
    elif d2q:
        # Column term of local query a: its positive document against every query of every rank.
        q_all = _comm.gather_rows(comm, q, lay.n, need_grad)
        q_valid_all = _comm.gather_rows(comm, q_valid, lay.n)
        pos_w = None if d_weights_all is None else d_weights_all[labels]
        _, s_d2q = _directional(q_all, d_all[labels], q_valid_all, d_valid_all[labels], token_reduction, mask_mode,
                                None, pos_w, "d2q", engine, pairs=False)  # [N, n_r]
        z = s_d2q.T * (acc_scale if acc_scale.requires_grad else acc_scale.to(s_d2q.dtype))
        targets = torch.arange(q.shape[0], device=q.device) + comm.query_offset()
        cols = F.cross_entropy(z, targets, label_smoothing=label_smoothing, reduction="none")
    terms = rows if cols is None else cols if rows is None else (rows + cols) / 2

    value = comm.reduce(terms.detach(), reduction, lay.N)
    part = terms if reduction == "none" else terms.sum() / (lay.N if reduction == "mean" else 1)
    # The value is the global loss; the gradient is this rank's part, times W for grad_reduction="mean".
    return value + comm.grad_factor * (part - part.detach())


__all__ = ["loss_across_ranks"]
