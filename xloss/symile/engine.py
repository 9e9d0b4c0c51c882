"""The interface every Symile ``"n_squared"`` engine implements (``chunked.py``, ``triton.py``), stated once.

All ``M`` anchors share one score tensor ``T[i_0, …, i_{M-1}] = MIP(X⁰_{i_0}, …, X^{M-1}_{i_{M-1}})``; anchor
``a``'s statistic is the log-sum-exp of ``s·T`` over every axis but ``a``.  The autograd Function
(:class:`xloss.symile.SymileFunction`) runs the two sweeps through the custom ops of ``ops.py``; the positive
term and the reduction around it are plain autograd on O(N·D) tensors.  "acc" is the accumulation dtype (fp32
for fp32/fp16/bf16 inputs, fp64 for fp64); inputs come as the user gave them.  The Triton engine takes M = 3
or 4 and fp32/fp16/bf16 only (``ValueError`` / ``triton.UnsupportedDtypeError`` otherwise).
"""

from __future__ import annotations

from typing import Protocol

from torch import Tensor


class SymileEngine(Protocol):
    def lse(self, xs: list[Tensor], s: Tensor) -> Tensor:
        """``[M, N]`` acc: ``LSE^a_i = log Σ_{tuples of the other modalities' rows} exp(s·MIP(X^a_i, …))``.

        Args:
            xs: ``M`` tensors ``[N, D]``, same dtype and device.
            s: 0-dim logit scale (acc).
        """

    def grad(self, xs: list[Tensor], s: Tensor, lse: Tensor, g: Tensor, need_scale: bool
             ) -> tuple[list[Tensor], Tensor | None]:
        """Gradients of ``Σ_a <g^a, LSE^a>`` (``lse``, ``g``: ``[M, N]`` acc): ``([dX^m [N, D]] acc, ds | None)``."""
