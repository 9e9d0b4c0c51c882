"""Naive late interaction (MaxSim, SPEC.md §3): builds the ``[Nq, Nd, Lq, Ld]`` similarity tensor.

Token sets ``q [Nq, Lq, D]``, ``d [Nd, Ld, D]``, bool masks ``[Nq, Lq]``, ``[Nd, Ld]`` (None = all valid),
similarities ``s_abtv = <q_at, d_bv>`` (``torch.einsum("qtd,cvd->qctv")``).

* query→document (``"q2d"``, ColBERT):  ``S_ab = Σ_t wq_at · max_v s_abtv``
* document→query (``"d2q"``):           ``S_ab = Σ_v wd_bv · max_t s_abtv``
* ``"both"`` (FILIP / HBI "WTI"):       ``S_ab = ½(S^{q2d}_ab + S^{d2q}_ab)``

Token weights ``wq = mask · q_weights`` (``q_weights`` default 1), divided by the number of valid query tokens
for ``token_reduction="mean"`` (FILIP's mean over valid tokens; with weights that is ``Σ_t w_t·max / |valid|``);
``wd`` likewise on the document side.  Masked-out tokens get weight 0 whatever their weight says.

Mask modes:

* ``"exclude"``: an invalid token never wins a max (its similarity is -inf); a token with no valid token on
  the other side scores 0 and gets no gradient.
* ``"zero"``: ``s`` is set to exactly 0 outside the outer product of the masks (PyLate ``colbert_scores``
  multiplies by it): invalid tokens score 0 and still compete.

Padding contract: masked-out tokens never influence anything.  Whatever their embeddings hold (NaN, inf,
garbage), they are replaced by zeros before the similarities (so their gradient is 0 and no ``0·NaN`` reaches
a valid token's gradient), a masked-out token of the weighted side contributes exactly 0 to the sum, and a
masked-out token of the other side never wins (``"exclude"``) or scores exactly 0 (``"zero"``).  Between
valid tokens NaN and inf propagate as IEEE arithmetic and ``torch.max`` make them (a NaN similarity is the
max, at the lowest index).  Masks may be bool or 0/1 of any integer or float dtype (converted with ``!= 0``).

Ties go to the lowest index (``torch.max``), which is also where the gradient goes.

``late_interaction_loss``: logits ``z = s·S``; ``"q2d"`` cross-entropy over the rows of ``s·S^{q2d}`` (each
query against all documents, target ``labels[a]``, default ``a``); ``"d2q"`` over the columns of
``s·S^{d2q}`` (for query a, column ``labels[a]`` as a row over all queries, target a: each document against
all queries); ``"both"`` ``½(CE_rows(s·S^{q2d}) + CE_rows(s·S^{d2q}ᵀ))`` (FILIP).  Label smoothing as
``F.cross_entropy``; ``reduction`` (the loss reduction) ``"mean"``, ``"sum"`` or ``"none"`` (per-query terms).

The token reduction is ``token_reduction`` everywhere (``reduction=`` in ``maxsim``/``maxsim_pairs`` and
``score_reduction=`` in ``late_interaction_loss`` are its deprecated old names, accepted for one release).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .._api import renamed
from .._reduce import reduce_terms

DIRECTIONS = ("q2d", "d2q", "both")


def token_weights(valid: torch.Tensor, weights, reduction: str, dtype: torch.dtype) -> torch.Tensor:
    """``mask · weights`` (weights default 1, masked entries 0 whatever they hold), divided by the number of
    valid tokens (at least 1) for ``reduction="mean"``."""
    w = valid.to(dtype)
    if weights is not None:
        w = torch.where(valid, weights.to(dtype), torch.zeros((), dtype=dtype, device=valid.device))
    if reduction == "mean":
        w = w / valid.sum(-1, keepdim=True).clamp_min(1).to(dtype)
    return w


def _valid(mask, x: torch.Tensor) -> torch.Tensor:
    if mask is None:
        return torch.ones(x.shape[:2], dtype=torch.bool, device=x.device)
    return mask if mask.dtype == torch.bool else mask != 0


def zero_padding(x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """``x`` with its masked-out tokens replaced by zeros (a ``where``, so whatever they held, NaN included,
    is gone and their gradient is 0)."""
    return torch.where(valid.unsqueeze(-1), x, torch.zeros((), dtype=x.dtype, device=x.device))


def _weighted_max(sim, own, other, wt, dim: int, zero_mode: bool):
    """``Σ_own w · max_other sim`` over the valid tokens of one side: ``own`` (the weighted side's mask) and
    ``other`` broadcast against ``sim``; the max runs over ``dim`` (the other side's tokens)."""
    zero = torch.zeros((), dtype=sim.dtype, device=sim.device)
    if zero_mode:  # PyLate: scores * einsum("ah,bt->abht", qmask, dmask), as a where: exactly 0, even for inf
        mx = torch.where(own & other, sim, zero).max(dim).values
        keep = own.squeeze(dim)
    else:
        mx = sim.masked_fill(~other, float("-inf")).max(dim).values
        keep = own.squeeze(dim) & other.any(dim)  # no valid token on the other side: 0, no gradient
    # A masked-out token of the weighted side adds exactly 0 (not 0·max: its max may be NaN); the max is
    # replaced too, so that no gradient meets 0·(-inf) either.
    mx = torch.where(keep, mx, zero)
    return torch.where(keep, wt * mx, zero).sum(-1)


def _directional(sim, qv, dv, wq, wd, direction, mask_mode):
    """``(S^{q2d}, S^{d2q})`` (None where not asked) from ``sim [A, B, Lq, Ld]``, masks broadcastable to
    ``[A, B, Lq, 1]`` / ``[A, B, 1, Ld]`` and weights broadcastable to ``[A, B, Lq]`` / ``[A, B, Ld]``."""
    zero_mode = mask_mode == "zero"
    s_q2d = s_d2q = None
    if direction in ("q2d", "both"):
        s_q2d = _weighted_max(sim, qv, dv, wq, -1, zero_mode)
    if direction in ("d2q", "both"):
        s_d2q = _weighted_max(sim, dv, qv, wd, -2, zero_mode)
    return s_q2d, s_d2q


def maxsim_directional(q, d, q_mask=None, d_mask=None, *, token_reduction="sum", mask_mode="exclude",
                       q_weights=None, d_weights=None, direction="q2d", pairs=False):
    """``(S^{q2d}, S^{d2q})`` separately (None for a direction not asked): ``[Nq, Nd]``, or ``[N]`` for
    ``pairs``.  Used by :func:`maxsim`, :func:`maxsim_pairs` and :func:`late_interaction_loss`."""
    qv, dv = _valid(q_mask, q), _valid(d_mask, d)
    dt = q.dtype
    wq = token_weights(qv, q_weights, token_reduction, dt)
    wd = token_weights(dv, d_weights, token_reduction, dt)
    q, d = zero_padding(q, qv), zero_padding(d, dv)
    if pairs:
        sim = torch.einsum("atd,avd->atv", q, d)[:, None]  # [N, 1, Lq, Ld]
        qv4, dv4 = qv[:, None, :, None], dv[:, None, None, :]
        wq3, wd3 = wq[:, None, :], wd[:, None, :]
    else:
        sim = torch.einsum("qtd,cvd->qctv", q, d)  # [Nq, Nd, Lq, Ld]: the tensor the fast paths never build
        qv4, dv4 = qv[:, None, :, None], dv[None, :, None, :]
        wq3, wd3 = wq[:, None, :], wd[None, :, :]
    s_q2d, s_d2q = _directional(sim, qv4, dv4, wq3, wd3, direction, mask_mode)
    if pairs:
        s_q2d = None if s_q2d is None else s_q2d[:, 0]
        s_d2q = None if s_d2q is None else s_d2q[:, 0]
    return s_q2d, s_d2q


def _combine(s_q2d, s_d2q, direction):
    if direction == "q2d":
        return s_q2d
    if direction == "d2q":
        return s_d2q
    return (s_q2d + s_d2q) / 2


@renamed(reduction="token_reduction")
def maxsim(q, d, q_mask=None, d_mask=None, *, token_reduction="sum", mask_mode="exclude", q_weights=None,
           d_weights=None, direction="q2d"):
    """Naive late-interaction scores of every query against every document.

    Args:
        q: ``[Nq, Lq, D]`` query tokens; d: ``[Nd, Ld, D]`` document tokens.
        q_mask, d_mask: bool ``[Nq, Lq]``, ``[Nd, Ld]``, True = valid; None = all valid.
        token_reduction: ``"sum"`` (ColBERT) or ``"mean"`` over valid tokens (FILIP).
        mask_mode: ``"exclude"`` or ``"zero"`` (see the module docstring).
        q_weights, d_weights: per-token weights ``[Nq, Lq]``, ``[Nd, Ld]`` (the q2d and d2q sums).
        direction: ``"q2d"``, ``"d2q"`` or ``"both"``.

    Returns:
        ``S [Nq, Nd]``.
    """
    s_q2d, s_d2q = maxsim_directional(q, d, q_mask, d_mask, token_reduction=token_reduction, mask_mode=mask_mode,
                                      q_weights=q_weights, d_weights=d_weights, direction=direction)
    return _combine(s_q2d, s_d2q, direction)


@renamed(reduction="token_reduction")
def maxsim_pairs(q, d, q_mask=None, d_mask=None, *, token_reduction="sum", mask_mode="exclude", q_weights=None,
                 d_weights=None, direction="q2d"):
    """Naive aligned-pair scores ``S_a`` = :func:`maxsim` of query a against document a only (``Nq == Nd``).

    Built from ``torch.einsum("atd,avd->atv")``; returns ``[N]``.
    """
    s_q2d, s_d2q = maxsim_directional(q, d, q_mask, d_mask, token_reduction=token_reduction, mask_mode=mask_mode,
                                      q_weights=q_weights, d_weights=d_weights, direction=direction, pairs=True)
    return _combine(s_q2d, s_d2q, direction)


def cross_entropy_terms(s_q2d, s_d2q, scale, labels, direction, label_smoothing):
    """Per-query loss terms ``[Nq]`` from the two score matrices (see the module docstring)."""
    nq = (s_q2d if s_q2d is not None else s_d2q).shape[0]
    nd = (s_q2d if s_q2d is not None else s_d2q).shape[1]
    targets = torch.arange(nq, device=(s_q2d if s_q2d is not None else s_d2q).device)
    # int64 whatever integer dtype came in: a uint8 tensor would index as a mask
    labels = targets if labels is None else labels.long()
    rows = cols = None
    if direction in ("q2d", "both"):
        rows = F.cross_entropy(scale * s_q2d, labels, label_smoothing=label_smoothing, reduction="none")
    if direction in ("d2q", "both"):
        z = (scale * s_d2q).T  # [Nd, Nq]: row b = document b against all queries
        columns = z if (labels is targets and nd == nq) else z[labels]
        cols = F.cross_entropy(columns, targets, label_smoothing=label_smoothing, reduction="none")
    if direction == "q2d":
        return rows
    if direction == "d2q":
        return cols
    return (rows + cols) / 2


@renamed(score_reduction="token_reduction")
def late_interaction_loss(q, d, q_mask=None, d_mask=None, *, logit_scale=None, temperature=None, labels=None,
                          direction="q2d", mask_mode="exclude", token_reduction=None, q_weights=None,
                          d_weights=None, label_smoothing=0.0, reduction="mean"):
    """Naive late-interaction contrastive loss: :func:`maxsim` scores, then cross-entropy.

    Args:
        q, d, q_mask, d_mask, mask_mode, q_weights, d_weights: as :func:`maxsim`.
        logit_scale: multiplicative scale ``s`` (float or 0-dim tensor).
        temperature: ``τ``, the same as ``logit_scale=1/τ``; give exactly one of the two.
        labels: ``[Nq]`` index of each query's positive document; default ``arange(Nq)``.
        direction: ``"q2d"`` (rows of ``s·S^{q2d}``), ``"d2q"`` (columns of ``s·S^{d2q}``) or ``"both"``
            (FILIP: ``½(CE_rows(s·S^{q2d}) + CE_rows(s·S^{d2q}ᵀ))``).
        label_smoothing: ``ε`` as ``F.cross_entropy``.
        reduction: the loss reduction, ``"mean"``, ``"sum"`` or ``"none"`` (per-query terms ``[Nq]``).
        token_reduction: the token reduction of the scores; default ``"sum"`` for ``"q2d"`` (ColBERT) and
            ``"mean"`` for ``"d2q"``/``"both"`` (FILIP).

    Returns:
        The loss (0-dim) or the per-query terms ``[Nq]``.
    """
    if (logit_scale is None) == (temperature is None):
        raise TypeError("late_interaction_loss() needs exactly one of logit_scale= and temperature=")
    if temperature is not None:
        logit_scale = 1.0 / temperature
    if token_reduction is None:
        token_reduction = "sum" if direction == "q2d" else "mean"
    s_q2d, s_d2q = maxsim_directional(q, d, q_mask, d_mask, token_reduction=token_reduction, mask_mode=mask_mode,
                                      q_weights=q_weights, d_weights=d_weights, direction=direction)
    terms = cross_entropy_terms(s_q2d, s_d2q, logit_scale, labels, direction, label_smoothing)
    return reduce_terms(terms, reduction)


# --- Training layouts (issue 14): each query against its own documents, distillation, XTR ------------------


def maxsim_grouped(q, d, q_mask=None, d_mask=None, *, token_reduction="sum", mask_mode="exclude"):
    """Naive grouped scores: query a against its own n documents ``d[a, 0..n-1]``, ``[N, n]``.

    ``q [N, Lq, D]``, ``d [N, n, Ld, D]``, ``q_mask [N, Lq]``, ``d_mask [N, n, Ld]``; ``S_aj`` is the q→d
    :func:`maxsim` of ``q[a]`` against ``d[a, j]`` (PyLate's ``colbert_kd_scores``, sentence-transformers'
    ``colbert_kd_scores``).  Built as the aligned pairs of ``q`` repeated n times with the flattened groups.
    """
    n_q, n = d.shape[0], d.shape[1]
    qr = q.repeat_interleave(n, dim=0)
    qm = None if q_mask is None else q_mask.repeat_interleave(n, dim=0)
    dm = None if d_mask is None else d_mask.reshape(n_q * n, -1)
    s = maxsim_pairs(qr, d.reshape(n_q * n, *d.shape[2:]), qm, dm, token_reduction=token_reduction,
                     mask_mode=mask_mode)
    return s.view(n_q, n)


def min_max_normalize(scores, eps=1e-8):
    """PyLate's ``Distillation(normalize_scores=True)``: each row mapped to [0, 1] by its min and max."""
    hi = scores.max(dim=1, keepdim=True).values
    lo = scores.min(dim=1, keepdim=True).values
    return (scores - lo) / (hi - lo + eps)


def kl_terms(student, teacher):
    """``KL(softmax(teacher) ‖ softmax(student))`` of each row, ``[N]`` (``nn.KLDivLoss(log_target=True)``)."""
    log_p = F.log_softmax(teacher, dim=-1)
    log_q = F.log_softmax(student, dim=-1)
    return (log_p.exp() * (log_p - log_q)).sum(dim=-1)


def late_interaction_distill_loss(q, d, teacher_scores, q_mask=None, d_mask=None, *, logit_scale=None,
                                  temperature=None, teacher_temperature=1.0, normalize_scores=False,
                                  token_reduction="sum", mask_mode="exclude", reduction="mean"):
    """Naive late-interaction distillation: ``KL(softmax(t/τ_T) ‖ softmax(s·S))`` over each query's n documents.

    ``S = maxsim_grouped(q, d)`` ``[N, n]``, min-max normalised per row first with ``normalize_scores``
    (PyLate's option), times the student scale ``s`` (default 1); ``t = teacher_scores [N, n]`` divided by
    ``teacher_temperature``, no gradient.  ``reduction``: ``"mean"`` (``"batchmean"``: the sum over rows / N,
    PyLate's ``size_average=True``), ``"sum"`` or ``"none"`` (``[N]``).
    """
    if logit_scale is not None and temperature is not None:
        raise TypeError("give at most one of logit_scale= and temperature=")
    scale = 1.0 / temperature if temperature is not None else (1.0 if logit_scale is None else logit_scale)
    s = maxsim_grouped(q, d, q_mask, d_mask, token_reduction=token_reduction, mask_mode=mask_mode)
    if normalize_scores:
        s = min_max_normalize(s)
    terms = kl_terms(scale * s, teacher_scores.detach().to(s.dtype) / teacher_temperature)
    return reduce_terms(terms, reduction)

