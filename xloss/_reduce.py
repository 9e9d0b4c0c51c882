"""The loss reduction shared by every family and its reference."""

from __future__ import annotations

import torch


def reduce_terms(terms: torch.Tensor, reduction: str) -> torch.Tensor:
    """``"mean"`` or ``"sum"`` of the per-sample terms, or the terms themselves for ``"none"``."""
    if reduction == "mean":
        return terms.mean()
    if reduction == "sum":
        return terms.sum()
    return terms
