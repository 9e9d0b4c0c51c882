"""The interface every sigmoid-loss engine implements (``chunked.py``, ``triton.py``), stated once."""

from __future__ import annotations

from typing import Protocol

from torch import Tensor


class SigmoidEngine(Protocol):
    def forward_backward(self, q: Tensor, k: Tensor, scale: Tensor, bias: Tensor, labels: Tensor | None,
                         need_grad: bool, *, row_weight: Tensor | None = None, per_row: bool = False,
                         qg: Tensor | None = None, kg: Tensor | None = None
                         ) -> tuple[Tensor, Tensor | None, Tensor | None, Tensor | None, Tensor | None]:
        """Loss and gradients of one block of queries against one block of keys, one sweep.

        Args:
            q: ``[n, D]``; k: ``[m, D]`` (same dtype and device); scale, bias: 0-dim, accumulation dtype.
            labels: ``[n]`` long, each query's positive key inside this key block, or -1 (no positive here:
                all its pairs are negatives).  Ignored (may be None) when ``qg`` and ``kg`` are given.
            need_grad: also form the gradients.
            row_weight: ``[n]``: the gradients are those of ``Σ_i w_i ℓ_i``.
            per_row: return the ``[n]`` row sums instead of their total.
            qg, kg: ``[n]``, ``[m]`` long group ids, both or neither: instead of ``labels``, ``y_ij = +1`` iff
                ``qg[i] == kg[j]`` (any number of positives per row, also none), compared inside the tile.

        Returns:
            ``(loss, dq [n, D], dk [m, D], ds, db)``: ``loss`` the 0-dim sum of ``-log σ(y z)`` over the block
            (``[n]`` with ``per_row``), and its gradients (no 1/N, no grad_output), or None without
            ``need_grad``; accumulation dtype (fp32 for fp16/bf16/fp32 inputs, fp64 for fp64).
        """
