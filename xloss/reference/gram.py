"""Naive GRAM volume and loss (SPEC.md §4): the authors' det-based form (ispamm/GRAM ``volume_computation``).

* Gram matrix   ``G_ij`` the k×k Gram matrix of ``(a_i, X¹_j, …, X^{k−1}_j)``: entries ``<u, v>`` of those
  vectors, built as one ``[N1, N2, k, k]`` tensor.
* volume        ``V_ij = sqrt(|det G_ij| + eps)`` (``eps = 0``, the default, is the authors' ``sqrt(abs(det))``).
* loss          ``ℓ_i = ½[CE(−V/τ, y)_i + CE(−Vᵀ[y]/τ, arange)_i]``, each cross-entropy with label smoothing
  ``ε`` as ``F.cross_entropy``; ``mean``/``sum`` of ``ℓ`` or ``ℓ`` itself (``reduction="none"``).  ``y = labels``
  (default ``arange(N)``): anchor i's positive is sample ``y_i`` of the other modalities; the row term is the
  cross-entropy of row i against column ``y_i``, the column term that of column ``y_i`` (a softmax over all
  anchors) against row i, as ``xloss.reference.info_nce``.
* ``stopgrad_gathered=True`` reproduces the authors' ``forward_ret`` on one process: the first (row) term is
  ``V(a, X.detach())``, the second ``V(a.detach(), X)ᵀ``, so the row term updates only the anchor and the
  column term only the other modalities (τ gets a gradient from both).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .._reduce import reduce_terms


def gram_volume(anchor: torch.Tensor, *others: torch.Tensor, pairwise: bool = True, eps: float = 0.0) -> torch.Tensor:
    """Gram volumes through ``torch.linalg.det`` of the whole ``[N1, N2, k, k]`` Gram tensor.

    Args:
        anchor: ``[N1, D]``.
        others: k−1 tensors ``[N2, D]``.
        pairwise: True: ``V [N1, N2]`` for every anchor against every sample's other modalities; False
            (``N1 == N2``): the aligned volumes ``V_ii``, ``[N]``.
        eps: added to ``|det G|`` under the square root.

    Returns:
        ``V`` in float32 for half inputs, else in the input dtype.
    """
    acc = torch.float64 if anchor.dtype == torch.float64 else torch.float32
    vecs = [anchor.to(acc)] + [x.to(acc) for x in others]
    if pairwise:
        n1, n2 = anchor.shape[0], others[0].shape[0]
        a = vecs[0]
        aa = (a * a).sum(-1)[:, None].expand(n1, n2)
        ax = [a @ x.T for x in vecs[1:]]  # [N1, N2]
        xx = [[(x * y).sum(-1)[None, :].expand(n1, n2) for y in vecs[1:]] for x in vecs[1:]]
        first = torch.stack([aa] + ax, dim=-1)  # [N1, N2, k]
        rest = [torch.stack([ax[m]] + xx[m], dim=-1) for m in range(len(ax))]
        g = torch.stack([first] + rest, dim=-2)  # [N1, N2, k, k]
    else:
        g = torch.stack([torch.stack([(u * v).sum(-1) for v in vecs], dim=-1) for u in vecs], dim=-2)  # [N, k, k]
    det = torch.linalg.det(g)
    return torch.sqrt(det.abs() + eps) if eps else torch.sqrt(det.abs())


def gram_loss(
    anchor: torch.Tensor,
    *others: torch.Tensor,
    temperature=None,
    logit_scale=None,
    labels: torch.Tensor | None = None,
    label_smoothing: float = 0.1,
    stopgrad_gathered: bool = False,
    eps: float = 0.0,
    reduction: str = "mean",
) -> torch.Tensor:
    """Naive GRAM contrastive loss (the authors' ``forward_ret``), see the module docstring.

    Args:
        anchor: ``[N1, D]``; others: k−1 tensors ``[N2, D]`` (``N1 == N2`` without ``labels``: sample i of
            every modality is positive).
        temperature: ``τ > 0``, float or 0-dim tensor (gets a gradient); the logits are ``−V/τ``.
        logit_scale: ``s`` instead of ``temperature`` (the logits are ``−s·V``).
        labels: ``[N1]`` integer index of each anchor's positive sample; default ``arange(N1)``.
        label_smoothing: ``ε`` of both cross-entropies.
        stopgrad_gathered: the authors' gradient routing (row term → anchor only, column term → others only).
        eps: see ``gram_volume``.
        reduction: ``"mean"``, ``"sum"`` or ``"none"`` (``[N]``).
    """
    if (temperature is None) == (logit_scale is None):
        raise ValueError("give either temperature or logit_scale")
    n = anchor.shape[0]
    if stopgrad_gathered:
        v_row = gram_volume(anchor, *[x.detach() for x in others], eps=eps)
        v_col = gram_volume(anchor.detach(), *others, eps=eps)
    else:
        v_row = v_col = gram_volume(anchor, *others, eps=eps)
    if temperature is not None:
        tau = temperature.to(v_row.dtype) if isinstance(temperature, torch.Tensor) else temperature
        z_row, z_col = -v_row / tau, -v_col.T / tau
    else:
        s = logit_scale.to(v_row.dtype) if isinstance(logit_scale, torch.Tensor) else logit_scale
        z_row, z_col = -v_row * s, -v_col.T * s
    target = torch.arange(n, device=anchor.device)
    if labels is None:
        labels = target
    labels = labels.long()  # any integer dtype (uint8 would index as a mask); int64 stays the same object
    rows = F.cross_entropy(z_row, labels, label_smoothing=label_smoothing, reduction="none")
    # column y_i of the logits, as a row over all anchors; with default labels and N1 == N2 it is z_col itself
    columns = z_col if (labels is target and v_col.shape[1] == n) else z_col[labels]
    cols = F.cross_entropy(columns, target, label_smoothing=label_smoothing, reduction="none")
    terms = (rows + cols) / 2
    return reduce_terms(terms, reduction)


__all__ = ["gram_loss", "gram_volume"]
