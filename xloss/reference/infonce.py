"""Naive InfoNCE / CLIP loss (SPEC.md §1): builds the N×M logits matrix.

Logits ``z_ij = s·<q_i, k_j>``; ``labels[i]`` (default ``i``) is the positive key of query i.

* row term      ``r_i = (1-ε)(LSE_j z_ij - z_{i,y_i}) + ε(LSE_j z_ij - mean_j z_ij)``  (``F.cross_entropy``)
* column term   ``c_i`` the same over column ``y_i`` (softmax over all queries), symmetric mode only
* per-query     ``ℓ_i = ½(r_i + c_i)`` (symmetric, CLIP / open_clip ``ClipLoss``) or ``ℓ_i = r_i``
* loss          ``mean``/``sum`` of ``ℓ``, or ``ℓ`` itself for ``reduction="none"``

Structured targets (issue 11; any of ``query_groups``/``key_groups``, ``exclude_self``, ``false_negative_margin``,
``decoupled``, ``hardness`` set): ``P(i) = {j : key_groups[j] = query_groups[i]}`` (with ``labels``:
``{labels[i]}``, i.e. ``query_groups = labels``, ``key_groups = arange(M)``), minus ``(i, i)`` with ``exclude_self``.

* logits        ``ẑ_ij = z_ij`` for positives, ``z_ij + α·sg(<q_i, k_j>)`` for negatives (``hardness`` α)
* row term      ``r_i = LSE_{j∈A(i)} ẑ_ij − mean_{p∈P(i)} z_ip`` (SupCon's L_out); ``A(i)``: every key but ``i``
  itself (``exclude_self``), the positives (``decoupled``) and the negatives with ``<q_i, k_j> > max_{p∈P(i)}
  <q_i, k_p> + m`` (``false_negative_margin`` m); 0 for a row without positives (or with an empty ``A(i)``,
  which ``decoupled`` with a margin can give), which also leaves the count of the mean
* column term   the same per key over the queries (``symmetric``)
* loss          ``"mean"``: ``½(Σ r / #rows with a positive + Σ c / #columns with a positive)`` (one-way: the row
  part alone); ``"sum"``: ``½(Σ r + Σ c)``; ``"none"``: ``r`` (one-way) or ``½(r_i + c_{labels[i]})``

Matryoshka (issue 12; ``matryoshka_dims`` ``d_1 < … < d_P``): ``Σ_m w_m · info_nce(q̂_m, k̂_m)`` with ``q̂_m =
q[:, :d_m]``, ``F.normalize``-d per row when ``matryoshka_normalize`` (sentence-transformers' ``MatryoshkaLoss``),
every other option applied to each term: a literal loop over the prefixes.
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
    query_groups: torch.Tensor | None = None,
    key_groups: torch.Tensor | None = None,
    exclude_self: bool = False,
    false_negative_margin: float | None = None,
    decoupled: bool = False,
    hardness: float = 0.0,
    matryoshka_dims=None,
    matryoshka_weights=None,
    matryoshka_normalize: bool = True,
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

        query_groups, key_groups: ``[N]``, ``[M]`` integer group ids (instead of ``labels``): key j is a positive
            of query i iff their ids are equal.
        exclude_self: drop the pair (i, i) everywhere (single tower, ``N == M``).
        false_negative_margin: drop negatives scoring above the row's best positive plus this margin.
        decoupled: drop the positives from the log-sum-exp (DCL).
        hardness: ``α``: negatives' logits get ``α·sg(<q, k>)`` added.
        matryoshka_dims: prefix widths ``d_m``: the sum over prefixes, weighted by ``matryoshka_weights``
            (default 1), of this loss on ``q[:, :d_m]``, ``k[:, :d_m]``, each L2-normalised per row when
            ``matryoshka_normalize``.

    Returns:
        The loss (0-dim) or the ``[N]`` per-query terms.
    """
    if matryoshka_dims is not None:
        weights = [1.0] * len(matryoshka_dims) if matryoshka_weights is None else matryoshka_weights
        total = 0.0
        for d, w in zip(matryoshka_dims, weights):
            q, k = query[:, :d], key[:, :d]
            if matryoshka_normalize:
                q, k = F.normalize(q, dim=1), F.normalize(k, dim=1)
            total = total + w * info_nce(
                q, k, logit_scale=logit_scale, temperature=temperature, labels=labels, symmetric=symmetric,
                label_smoothing=label_smoothing, reduction=reduction, query_groups=query_groups,
                key_groups=key_groups, exclude_self=exclude_self, false_negative_margin=false_negative_margin,
                decoupled=decoupled, hardness=hardness)
        return total
    if temperature is not None:
        logit_scale = 1.0 / temperature
    if logit_scale is None:
        logit_scale = 1.0
    n = query.shape[0]
    structured = (query_groups is not None or key_groups is not None or exclude_self
                  or false_negative_margin is not None or decoupled or hardness)
    if structured:
        return _structured(query, key, logit_scale, labels, query_groups, key_groups, symmetric, exclude_self,
                           false_negative_margin, decoupled, hardness, reduction)
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


def _side(z, zh, raw, pos, drop, margin):
    """Per-row terms ``LSE_{A(i)} ẑ − mean_{P(i)} z`` (0 without a positive) and the has-a-positive mask."""
    keep = ~drop
    if margin is not None:
        ref = raw.masked_fill(~pos, float("-inf")).amax(1, keepdim=True)  # the row's best positive
        keep = keep & ~(~pos & (raw > ref + margin))
    count = pos.sum(1)
    has = (count > 0) & keep.any(1)  # a row without a positive, or whose log-sum-exp set is empty, adds nothing
    # Rows without a positive: a harmless finite row, so that their (discarded) term carries no NaN gradient.
    logits = torch.where(has[:, None], zh.masked_fill(~keep, float("-inf")), zh.new_zeros(()))
    lse = torch.logsumexp(logits, 1)
    mean_pos = torch.where(pos, z, z.new_zeros(())).sum(1) / count.clamp(min=1)
    return torch.where(has, lse - mean_pos, lse.new_zeros(())), has


def _structured(query, key, s, labels, query_groups, key_groups, symmetric, exclude_self, margin, decoupled,
                hardness, reduction):
    """Multi-positive, single-tower, false-negative, decoupled and hardness-weighted InfoNCE, dense."""
    n, m = query.shape[0], key.shape[0]
    raw = query @ key.T
    z = s * raw
    from_labels = query_groups is None
    if from_labels:  # labels: query i's one positive is key labels[i]
        query_groups = torch.arange(n, device=query.device) if labels is None else labels
        key_groups = torch.arange(m, device=query.device)
    me = torch.eye(n, m, dtype=torch.bool, device=query.device) if exclude_self else torch.zeros(
        n, m, dtype=torch.bool, device=query.device)
    pos = (query_groups.long()[:, None] == key_groups.long()[None, :]) & ~me
    zh = torch.where(pos, z, z + hardness * raw.detach()) if hardness else z
    drop = me | pos if decoupled else me
    raw_sg = raw.detach()
    rows, has_r = _side(z, zh, raw_sg, pos, drop, margin)
    if not symmetric:
        if reduction == "mean":
            return rows.sum() / has_r.sum().clamp(min=1)
        return reduce_terms(rows, reduction)
    cols, has_c = _side(z.T, zh.T, raw_sg.T, pos.T, drop.T, margin)
    if reduction == "mean":
        return (rows.sum() / has_r.sum().clamp(min=1) + cols.sum() / has_c.sum().clamp(min=1)) / 2
    if reduction == "sum":
        return (rows.sum() + cols.sum()) / 2
    if not from_labels:
        raise ValueError("reduction='none' with query_groups and symmetric=True is not defined (row terms are per "
                         "query, column terms per key): use symmetric=False or reduce")
    return (rows + cols[query_groups.long()]) / 2
