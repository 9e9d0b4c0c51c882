"""Naive InfoNCE / CLIP loss (SPEC.md §1): builds the N×M logits matrix.

Logits ``z_ij = s·<q_i, k_j>``; ``labels[i]`` (default ``i``) is the positive key of query i.

* row term      ``r_i = (1-ε)(LSE_j z_ij - z_{i,y_i}) + ε(LSE_j z_ij - mean_j z_ij)``  (``F.cross_entropy``)
* column term   ``c_i`` the same over column ``y_i`` (softmax over all queries), symmetric mode only
* per-query     ``ℓ_i = ½(r_i + c_i)`` (symmetric, CLIP / open_clip ``ClipLoss``) or ``ℓ_i = r_i``
* loss          ``mean``/``sum`` of ``ℓ``, or ``ℓ`` itself for ``reduction="none"``
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .._reduce import reduce_terms


def info_nce(
    query: torch.Tensor,
    key: torch.Tensor,
    *,
    logit_scale=None,
    temperature=None,
    labels: torch.Tensor | None = None,
    symmetric: bool = True,
    label_smoothing: float = 0.0,
    reduction: str = "mean",
) -> torch.Tensor:
    """Naive symmetric InfoNCE.

    Args:
        query: ``[N, D]`` float tensor (image features in CLIP).
        key: ``[M, D]`` float tensor, ``M >= N`` unless ``labels`` is given (text features in CLIP).
        logit_scale: multiplicative scale ``s`` (float or 0-dim tensor); default 1.
        temperature: ``τ``, the same as ``logit_scale=1/τ``.
        labels: ``[N]`` integer index of each query's positive key; default ``arange(N)``.
        symmetric: add the key→query (column) term, as CLIP does.
        label_smoothing: ``ε`` as in ``F.cross_entropy``, applied to both terms.
        reduction: ``"mean"``, ``"sum"`` or ``"none"`` (per-query terms ``[N]``).

    Returns:
        The loss (0-dim) or the ``[N]`` per-query terms.
    """
    if temperature is not None:
        logit_scale = 1.0 / temperature
    if logit_scale is None:
        logit_scale = 1.0
    n = query.shape[0]
    logits = logit_scale * query @ key.T  # [N, M]: the matrix the fast paths never build
    targets = torch.arange(n, device=query.device)
    if labels is None:
        labels = targets
    rows = F.cross_entropy(logits, labels, label_smoothing=label_smoothing, reduction="none")
    if symmetric:
        # Column y_i of the logits, as a row over all queries; with default labels and M == N it is logits.T.
        columns = logits.T if (labels is targets and key.shape[0] == n) else logits.T[labels]
        cols = F.cross_entropy(columns, targets, label_smoothing=label_smoothing, reduction="none")
        terms = (rows + cols) / 2
    else:
        terms = rows
    return reduce_terms(terms, reduction)
