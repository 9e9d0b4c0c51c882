"""The interface every Banzhaf engine implements (``compiled.py``, ``chunked.py``), stated once.

The Banzhaf interaction is a distillation target: it has no gradient, so the family has no autograd Function
and no custom ops of its own besides the compiled ``torch.ops.xloss.banzhaf_interaction`` (which ``compiled.py``
wraps).  :func:`xloss.banzhaf_interaction` checks the arguments, asks ``xloss._dispatch`` for the engine and
calls it under ``no_grad``.
"""

from __future__ import annotations

from typing import Protocol

from torch import Tensor


class BanzhafEngine(Protocol):
    def banzhaf_interaction(self, sim: Tensor, p: Tensor, q: Tensor, text_mask: Tensor, video_mask: Tensor,
                            num_samples: int, seed: int, coalitions: Tensor | None, mode: str) -> Tensor:
        """``I [B, T, V]`` in sim's dtype (computed in fp32, fp64 for fp64 inputs), zero outside the masks.

        Args (checked by the caller, detached): ``sim [B, T, V]``, ``p [B, T]``, ``q [B, V]`` (sim's dtype),
        bool masks ``text_mask [B, T]``, ``video_mask [B, V]``, ``num_samples ≥ 1``, ``seed`` (int64; the
        coalitions come from a counter-based hash of it), ``coalitions`` (bool/uint8 ``[B, T, V, S, T + V]`` or
        None: then ``seed`` draws them), ``mode`` (``"hbi"`` or ``"textbook"``).
        """
