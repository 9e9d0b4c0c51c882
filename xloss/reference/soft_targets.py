"""Naive soft-target contrastive losses (issue 12): in-batch distillation and CWCL, each building N×M matrices.

* ``distill_loss``: open_clip's ``DistillClipLoss.dist_loss``: ``−Σ_j softmax(t_i)_j · log softmax(z_i)_j`` with
  student logits ``z = s·Q Kᵀ`` and teacher logits ``t = s_T·Q_T K_Tᵀ`` (no gradient to the teacher), averaged
  over the rows; ``symmetric``: the same over the columns (``z.T`` against ``t.T``), and the two halved.
* ``cwcl_loss``: CWCL (Srinivasa et al., NeurIPS 2023): row term ``−Σ_j ŵ_ij log softmax(z_i)_j`` with
  ``w_ij = ½<u_i, u_j> + ½``, ``ŵ_ij = w_ij / Σ_j w_ij`` and ``u`` the query-side targets (default
  ``query.detach()``); ``symmetric`` adds the column term with weights from the key-side targets, halved.  The
  batch is paired (N = M): sample j's targets weigh key j.
"""

from __future__ import annotations

import torch

from .._reduce import reduce_terms


def _scale(logit_scale, temperature):
    if temperature is not None:
        return 1.0 / temperature
    return 1.0 if logit_scale is None else logit_scale


def _soft_ce(targets: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """Per-row ``−Σ_j targets_ij · log_softmax(logits_i)_j``."""
    return -(targets * logits.log_softmax(dim=1)).sum(dim=1)


def _combine(rows, cols, reduction):
    if cols is None:
        return reduce_terms(rows, reduction)
    if reduction == "none":
        return (rows + cols) / 2
    return (reduce_terms(rows, reduction) + reduce_terms(cols, reduction)) / 2


def distill_loss(query, key, teacher_query, teacher_key, *, logit_scale=None, temperature=None,
                 teacher_logit_scale=None, teacher_temperature=None, symmetric: bool = True,
                 reduction: str = "mean") -> torch.Tensor:
    """Naive in-batch distillation (open_clip ``DistillClipLoss``'s distillation term).

    ``reduction="none"``: per-query terms (``½(r_i + c_i)`` when ``symmetric``, which needs N = M).
    """
    z = _scale(logit_scale, temperature) * query @ key.T
    t = (_scale(teacher_logit_scale, teacher_temperature) * teacher_query @ teacher_key.T).detach()
    rows = _soft_ce(t.softmax(dim=1), z)
    cols = _soft_ce(t.T.softmax(dim=1), z.T) if symmetric else None
    return _combine(rows, cols, reduction)


def _cwcl_weights(u: torch.Tensor) -> torch.Tensor:
    w = 0.5 * (u @ u.T) + 0.5
    return w / w.sum(dim=1, keepdim=True)


def cwcl_loss(query, key, *, logit_scale=None, temperature=None, query_targets=None, key_targets=None,
              symmetric: bool = False, reduction: str = "mean") -> torch.Tensor:
    """Naive CWCL: the ``[N, N]`` weight matrices and logits."""
    z = _scale(logit_scale, temperature) * query @ key.T
    u = (query if query_targets is None else query_targets).detach()
    rows = _soft_ce(_cwcl_weights(u), z)
    cols = None
    if symmetric:
        v = (key if key_targets is None else key_targets).detach()
        cols = _soft_ce(_cwcl_weights(v), z.T)
    return _combine(rows, cols, reduction)
