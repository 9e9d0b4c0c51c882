"""The interface every GRAM engine implements (``chunked.py``, ``triton.py``), stated once.

The autograd Function (:class:`xloss.gram.GramFunction`) runs these sweeps through the custom ops of
``ops.py`` and does everything else (positive terms, label smoothing, reduction, the weights of the gradient)
itself, once for every engine.  Notation: ``anchor [N1, D]``, ``others`` p = k−1 tensors ``[N2, D]`` (same
dtype and device, 1 ≤ p ≤ 4), ``V [N1, N2]`` the Gram volumes, ``Z = −s·V`` the loss's logits.  "acc" is the
accumulation dtype: fp32 for fp32/fp16/bf16 inputs, fp64 for fp64 (the Triton engine refuses fp64 with
``triton.UnsupportedDtypeError``).  Inputs come as the user gave them (the engine upcasts what it needs).

``det`` is the signed ``det G [N1, N2]`` (acc) that an engine may keep from a forward sweep for its backward
sweep: the chunked engine keeps it (one N1×N2 buffer), the Triton engine returns None and recomputes tiles.
"""

from __future__ import annotations

from typing import Protocol

from torch import Tensor


class GramEngine(Protocol):
    def volume(self, anchor: Tensor, others: list[Tensor], eps: float) -> tuple[Tensor, Tensor | None]:
        """``(V [N1, N2] acc, det [N1, N2] acc | None)``, ``V = sqrt(|det G| + eps)``."""

    def volume_grad(self, anchor: Tensor, others: list[Tensor], eps: float, det: Tensor | None, grad_v: Tensor,
                    need_a: bool, need_x: bool) -> tuple[Tensor | None, list[Tensor] | None]:
        """Gradients of ``Σ grad_v∘V`` (``grad_v [N1, N2]``): ``(d anchor [N1, D] | None, [d X^m [N2, D]] |
        None)`` in acc, None where not needed."""

    def loss_stats(self, anchor: Tensor, others: list[Tensor], scale: Tensor, labels: Tensor, eps: float
                   ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor | None]:
        """Statistics sweep over ``Z = −scale·V`` (``scale`` 0-dim, ``labels [N1]`` long in ``[0, N2)``).

        Returns acc ``(lse_r [N1], lse_c [N2], mean_r [N1], mean_c [N2], v_pos [N1], det | None)``: row and
        column log-sum-exp of ``Z``, row and column means of ``V``, ``V[i, labels[i]]``.
        """

    def loss_grad(self, anchor: Tensor, others: list[Tensor], scale: Tensor, det: Tensor | None, lse_r: Tensor,
                  lse_c: Tensor, w_r: Tensor, w_c: Tensor, labels: Tensor, label_smoothing: float, stopgrad: bool,
                  eps: float, need_a: bool, need_x: bool, need_s: bool
                  ) -> tuple[Tensor | None, list[Tensor] | None, Tensor | None]:
        """Gradient sweep of ``Σ_i w_r[i]·(row_i + col_i)`` (the row and column cross-entropies of anchor i),
        with ``w_c [N2] = Σ_{i: labels[i] = j} w_r[i]``:
        ``dZ = w_r[i](softmax_row − ε/N2) + w_c[j](softmax_col − ε/N1) − 2(1−ε)·w_r[i]·[j = labels[i]]``,
        ``dV = −s·dZ`` (``stopgrad``: the row part reaches the anchor only, the column part the others only).

        Returns acc ``(d anchor | None, [d X^m] | None, ds | None)``, ``ds = −Σ dZ∘V`` the gradient of ``s``.
        """
