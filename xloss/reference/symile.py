"""Naive Symile loss (SPEC.md §5): the ``symile`` package's ``Symile`` loss, op for op.

``M ≥ 2`` modalities ``X¹ … X^M``, each ``[N, D]``; multilinear inner product
``MIP(x¹, …, x^M) = Σ_d Π_m x^m_d``; ``s`` the (already exponentiated) logit scale.

For each anchor modality ``a`` (in order) with the other modalities ``(Y¹ … Y^{M-1})`` (in order):

* ``negative_sampling="n"``: one ``torch.randperm(N)`` ``π_k`` per non-anchor modality (drawn anchor-major,
  from the CPU default generator or ``generator``), ``logits_ij = MIP(x_i, Y¹_{π_1(j)}, …, Y^{M-1}_{π_{M-1}(j)})``
  for ``i ≠ j`` and the positive ``MIP(x_i, Y¹_i, …)`` on the diagonal;
  ``ℓ^a_i = CE(s·logits_i, i)``.
* ``negative_sampling="n_squared"`` (``M ≥ 3``): every tuple of non-anchor rows is a candidate,
  ``ℓ^a_i = −s·MIP(x_i, Y¹_i, …) + log Σ_{j_1 … j_{M-1}} exp(s·MIP(x_i, Y¹_{j_1}, …, Y^{M-1}_{j_{M-1}}))``
  (the package builds the ``[N, N^{M-1}]`` logits by rolling rows; the positive is column ``i``).

Loss: ``mean_a mean_i ℓ^a_i`` (the package), ``sum_i mean_a ℓ^a_i`` for ``reduction="sum"``, or the per-sample
``mean_a ℓ^a_i`` ``[N]`` for ``reduction="none"``.  This module builds every logit matrix on purpose.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def draw_permutations(m: int, n: int, generator: torch.Generator | None = None) -> list[list[torch.Tensor]]:
    """The package's random draws: for each anchor (in order) one ``torch.randperm(n)`` per non-anchor modality
    (in order), on the CPU, from ``generator`` (default: the global CPU generator)."""
    return [[torch.randperm(n, generator=generator) for _ in range(m - 1)] for _ in range(m)]


def _logits_n(anchor, non_anchor, perms):
    # Op for op as symile.Symile.compute_logits_n (so that the numbers agree bit for bit).
    shuff = torch.ones_like(anchor)
    for r, p in zip(non_anchor, perms):
        shuff = shuff * r[p.to(r.device)]
    logits = anchor @ torch.t(shuff)
    pos = anchor.clone()
    for r in non_anchor:
        pos = pos * r
    pos = pos.sum(axis=1)
    eye = torch.eye(n=anchor.shape[0]).to(anchor.device) > 0.5
    return torch.where(eye, pos, logits)


def _non_anchor_products(tensors):
    # As symile.Symile.compute_non_anchor_products: all N^len(tensors) row tuples, by rolling rows.
    if len(tensors) == 2:
        y, z = tensors
        out = []
        for _ in range(y.shape[0]):
            out.append(y * z)
            z = torch.roll(z, shifts=1, dims=0)
        return out
    x = tensors[0]
    partial = _non_anchor_products(tensors[1:])
    out = []
    for _ in range(x.shape[0]):
        for p in partial:
            out.append(p * x)
        x = torch.roll(x, shifts=1, dims=0)
    return out


def _logits_n_squared(anchor, non_anchor):
    return anchor @ torch.cat(_non_anchor_products(non_anchor), 0).T


def symile_loss(reps, logit_scale=1.0, negative_sampling: str = "n", permutations=None, generator=None,
                reduction: str = "mean") -> torch.Tensor:
    """Naive Symile loss, equal to ``symile.Symile(negative_sampling)(reps, logit_scale)`` for
    ``reduction="mean"`` (with the same random state, or the same ``permutations``).

    Args:
        reps: list of ``M ≥ 2`` tensors ``[N, D]``.
        logit_scale: ``s`` (float or 0-dim tensor), multiplied into the logits as given.
        negative_sampling: ``"n"`` or ``"n_squared"`` (``M ≥ 3``).
        permutations: ``"n"`` only: ``permutations[a][k]`` the ``[N]`` row permutation of the ``k``-th
            non-anchor modality (modalities in order, the anchor skipped) when modality ``a`` is the anchor;
            None draws them as the package does.
        generator: the CPU generator for those draws (default: the global one).
        reduction: ``"mean"``, ``"sum"`` or ``"none"`` (``[N]``, the mean over anchors of each row's term).
    """
    reps = list(reps)
    m, n = len(reps), reps[0].shape[0]
    if negative_sampling == "n" and permutations is None:
        permutations = draw_permutations(m, n, generator)
    labels = torch.arange(n).to(reps[0].device)
    losses = []
    for a, r in enumerate(reps):
        others = [x for b, x in enumerate(reps) if b != a]
        if negative_sampling == "n":
            logits = logit_scale * _logits_n(r, others, permutations[a])
        elif negative_sampling == "n_squared":
            logits = logit_scale * _logits_n_squared(r, others)
        else:
            raise ValueError(f"negative_sampling must be 'n' or 'n_squared', got {negative_sampling!r}")
        if reduction == "mean":
            losses.append(F.cross_entropy(logits, labels))
        else:
            losses.append(F.cross_entropy(logits, labels, reduction="none"))
    out = sum(losses) / len(losses)
    return out.sum() if reduction == "sum" else out


__all__ = ["draw_permutations", "symile_loss"]
