"""The interface every InfoNCE engine implements (``chunked.py``, ``triton.py``), stated once.

The autograd Function (``__init__``) runs the two sweeps through the custom ops of ``ops.py`` and does
everything else (target terms, label smoothing, reduction, scale gradient) itself, once for every engine and
for one process or many.
"""

from __future__ import annotations

from typing import Protocol

from torch import Tensor


class InfoNCEEngine(Protocol):
    def lse(self, q: Tensor, k: Tensor, scale: Tensor, need_cols: bool, labels: Tensor,
            keep_logits: bool = False) -> tuple[Tensor, Tensor | None, Tensor, Tensor | None]:
        """Statistics sweep over the logits ``z = scale · q kᵀ``.

        Args:
            q: ``[N, D]``; k: ``[M, D]`` (same dtype and device); scale: 0-dim, accumulation dtype.
            need_cols: also compute the column statistics (symmetric loss).
            labels: ``[N]`` long, each query's positive key in ``[0, M)``.
            keep_logits: return the whole ``[N, M]`` logits for ``grad`` to reuse (only an engine whose
                ``keeps_logits`` can say True is asked to).

        Returns:
            ``row [2, N]`` (max, log Σ exp(z − max)) per row, ``col [2, M]`` the same per column (or None),
            ``z_pos [N]`` the positive logits read from the same tiles, ``logits [N, M]`` or None; all in the
            accumulation dtype (fp32 for fp16/bf16/fp32 inputs, fp64 for fp64).
        """

    def grad(self, q: Tensor, k: Tensor, scale: Tensor, row: Tensor, col: Tensor | None, a: Tensor,
             w: Tensor | None, logits: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Gradient sweep: ``dq_u = P k [N, D]`` and ``dk_u = Pᵀ q [M, D]`` (accumulation dtype) for
        ``P_ij = a_i·softmax_row(z)_ij + w_j·softmax_col(z)_ij`` (``w`` None: one-way)."""

    def keeps_logits(self, n: int, m: int, itemsize: int) -> bool:
        """Whether ``lse`` should keep the ``[n, m]`` logits for ``grad`` (a rule on shapes only)."""
