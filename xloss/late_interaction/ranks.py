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
tokens for ``"d2q"``/``"both"``); there is no ring exchange for late interaction yet.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import _comm


def _padded(x, length: int, fill=0):
    """``x [n, L, ...]`` padded to ``[n, length, ...]`` with ``fill`` (None stays None)."""
    if x is None or x.shape[1] == length:
        return x
    pad = x.new_full((x.shape[0], length - x.shape[1], *x.shape[2:]), fill)
    return torch.cat([x, pad], dim=1)


def loss_across_ranks(q, d, q_mask, d_mask, q_weights, d_weights, *, scale, labels, direction, mask_mode,
                      token_reduction, label_smoothing, reduction, engine, group, exchange, grad_reduction):
    from . import _directional

    if exchange != "all_gather":
        raise ValueError(f"late_interaction_loss across ranks exchanges the documents with exchange='all_gather' "
                         f"(there is no ring for late interaction yet), got exchange={exchange!r}")
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

    d_all = _comm.gather_rows(comm, d, lay.m, need_grad)
    d_valid_all = _comm.gather_rows(comm, d_valid, lay.m)
    d_weights_all = _comm.gather_rows(comm, d_weights, lay.m, need_grad) if d2q else None
    labels = comm.default_labels(q.shape[0], q.device) if labels is None else labels.long()
    acc_scale = scale

    rows = cols = None
    if q2d:
        s_q2d, _ = _directional(q, d_all, q_valid, d_valid_all, token_reduction, mask_mode, q_weights, None, "q2d",
                                engine, pairs=False)
        z = s_q2d * (acc_scale if acc_scale.requires_grad else acc_scale.to(s_q2d.dtype))
        rows = F.cross_entropy(z, labels, label_smoothing=label_smoothing, reduction="none")
    if d2q:
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
