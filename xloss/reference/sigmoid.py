"""Naive sigmoid loss (SigLIP, SPEC.md §2): builds the N×M logits matrix.

Logits ``z_ij = s·<q_i, k_j> + b`` for ``q [N, D]``, ``k [M, D]``; ``labels[i]`` (default ``i``) is the positive
key of query i and every other pair is a negative: ``y_ij = +1`` if ``j = labels[i]``, else ``-1``.
With group ids instead (``query_groups [N]``, ``key_groups [M]``, integers): ``y_ij = +1`` iff
``key_groups[j] == query_groups[i]``, else ``-1``, for every pair (a query may have several positive keys, or
none).

* per-query     ``ℓ_i = -Σ_j log σ(y_ij z_ij)``  (a row sum: no normalisation across the row)
* loss          ``"mean"``: ``Σ_i ℓ_i / N`` (open_clip ``SigLipLoss``: divided by the number of queries, not by
  ``N·M``), ``"sum"``: ``Σ_i ℓ_i``, ``"none"``: ``ℓ`` itself ``[N]``
* gradient      ``dZ_ij = -y_ij·σ(-y_ij z_ij)`` (times 1/N for the mean), ``dq = s·dZ k``, ``dk = s·dZᵀ q``,
  ``ds = Σ dZ∘(q kᵀ)``, ``db = Σ dZ``

open_clip passes ``logit_scale`` already exponentiated (``model.logit_scale.exp()``) and the bias as is.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import _checks
from .._reduce import reduce_terms


def sigmoid_loss(
    query: torch.Tensor,
    key: torch.Tensor,
    *,
    logit_scale,
    logit_bias,
    labels: torch.Tensor | None = None,
    query_groups: torch.Tensor | None = None,
    key_groups: torch.Tensor | None = None,
    reduction: str = "mean",
) -> torch.Tensor:
    """Naive SigLIP loss, as open_clip's ``SigLipLoss`` computes it (single process).

    Args:
        query: ``[N, D]`` float tensor (image features in SigLIP).
        key: ``[M, D]`` float tensor; ``M >= N`` unless ``labels`` is given (text features).
        logit_scale: multiplicative scale ``s`` (float or 0-dim tensor), already exponentiated.
        logit_bias: additive bias ``b`` (float or 0-dim tensor).
        labels: ``[N]`` integer index of each query's positive key; default ``arange(N)``.
        query_groups, key_groups: ``[N]``, ``[M]`` integer group ids (together, instead of ``labels``): the
            pair (i, j) is positive iff the ids are equal.
        reduction: ``"mean"`` (``Σ/N``), ``"sum"`` or ``"none"`` (per-query row sums ``[N]``).

    Returns:
        The loss (0-dim) or the ``[N]`` per-query terms.
    """
    n, m = query.shape[0], key.shape[0]
    groups = _checks.check_query_key_groups(query_groups, key_groups, n, m, query.device, labels)
    logits = logit_scale * query @ key.T + logit_bias  # [N, M]: the matrix the fast paths never build
    if groups:
        same = query_groups[:, None] == key_groups[None, :]  # [N, M]
        signs = torch.where(same, 1.0, -1.0).to(logits.dtype)
    else:
        if labels is None:
            labels = torch.arange(n, device=query.device)
        signs = -torch.ones(n, m, dtype=logits.dtype, device=logits.device)
        signs[torch.arange(n, device=query.device), labels.long()] = 1.0  # any integer dtype (uint8: no mask)
    terms = -F.logsigmoid(signs * logits).sum(1)
    return reduce_terms(terms, reduction)
