"""Naive XTR (Lee et al. 2023, eq. 5; sentence-transformers' ``xtr_scores``): builds ``[Nq, Lq, Nd, Ld]``.

Each valid query token retrieves its top-``k`` tokens among all valid in-batch document tokens; the score of a
query and a document sums, over the query tokens that retrieved at least one of the document's tokens, the
best retrieved similarity, and divides by their number ``Z`` (at least 1).  Masked-out tokens follow the
padding contract of late interaction (``reference/late_interaction.py``): replaced by zeros, never retrieved,
never counted.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .._reduce import reduce_terms
from .late_interaction import _valid, zero_padding


def xtr_scores(q, d, q_mask=None, d_mask=None, *, k):
    """Naive XTR scores (Lee et al. 2023, eq. 5; sentence-transformers' ``xtr_scores``), ``[Nq, Nd]``.

    Each valid query token retrieves its top-``k`` tokens among all valid in-batch document tokens
    (``torch.topk`` over the ``Nd·Ld`` similarities; ``k`` above the number of tokens keeps them all).
    ``S_ab = Σ_t m_abt / max(Z_ab, 1)``: ``m_abt`` the largest similarity of query token t to a retrieved
    token of document b (0 if it retrieved none of b's tokens), ``Z_ab`` the number of valid query tokens
    that retrieved at least one token of b.  Builds the ``[Nq, Lq, Nd, Ld]`` tensor.  ``d`` may be
    ``[Nq, n, Ld, D]`` (each query's documents stacked): flattened to ``Nq·n`` documents, query-major.
    """
    if d.dim() == 4:
        d = d.reshape(-1, *d.shape[2:])
        d_mask = None if d_mask is None else d_mask.reshape(d.shape[0], -1)
    nq, lq, _ = q.shape
    nd, ld, _ = d.shape
    qv, dv = _valid(q_mask, q), _valid(d_mask, d)
    q, d = zero_padding(q, qv), zero_padding(d, dv)
    sim = torch.einsum("qtx,cvx->qtcv", q, d)
    neg_inf = torch.tensor(float("-inf"), dtype=sim.dtype, device=sim.device)
    flat = torch.where(dv, sim, neg_inf).reshape(nq, lq, nd * ld)
    index = flat.topk(min(k, nd * ld), dim=-1).indices
    retrieved = torch.zeros(nq, lq, nd * ld, dtype=torch.bool, device=q.device).scatter_(-1, index, True)
    retrieved = retrieved.view(nq, lq, nd, ld) & dv  # a masked token in the top-k (k beyond the pool) is no hit
    best = torch.where(retrieved, sim, neg_inf).amax(dim=-1)  # [Nq, Lq, Nd]
    hit = retrieved.any(dim=-1) & qv.unsqueeze(-1)
    m = torch.where(hit, best, torch.zeros((), dtype=sim.dtype, device=sim.device))
    z = hit.sum(dim=1).clamp_min(1).to(sim.dtype)
    return m.sum(dim=1) / z


def xtr_loss(q, d, q_mask=None, d_mask=None, *, k, logit_scale=None, temperature=None, labels=None,
             label_smoothing=0.0, reduction="mean"):
    """Naive XTR contrastive loss: cross-entropy over the rows of ``s·xtr_scores(q, d)``.

    Target of query a: ``labels[a]``; default ``a`` for a 3-D ``d``, ``a·n`` for a stacked ``d [Nq, n, Ld, D]``
    (each query's first document is its positive: sentence-transformers' layout).
    """
    if (logit_scale is None) == (temperature is None):
        raise TypeError("xtr_loss() needs exactly one of logit_scale= and temperature=")
    scale = 1.0 / temperature if temperature is not None else logit_scale
    n = d.shape[1] if d.dim() == 4 else 1
    s = xtr_scores(q, d, q_mask, d_mask, k=k)
    if labels is None:
        labels = torch.arange(q.shape[0], device=q.device) * n
    terms = F.cross_entropy(scale * s, labels.long(), label_smoothing=label_smoothing, reduction="none")
    return reduce_terms(terms, reduction)
