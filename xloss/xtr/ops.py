"""The XTR sweeps as ``torch.library`` custom ops, so that one path runs eagerly and under ``torch.compile``.

* ``xloss::xtr_forward(q, d, q_valid, d_valid, k, need_aux, d_masked)`` → ``(scores [Nq, Nd], idx [Nq, Nd, Lq],
  z [Nq, Nd])`` (idx and z empty without ``need_aux``);
* ``xloss::xtr_backward(g, q, d, q_valid, d_valid, idx, z)`` → ``(dq, dd)`` in the accumulation dtype.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..late_interaction.chunked import index_dtype
from . import chunked


@torch.library.custom_op("xloss::xtr_forward", mutates_args=())
def xtr_forward(q: Tensor, d: Tensor, q_valid: Tensor, d_valid: Tensor, k: int, need_aux: bool,
                d_masked: bool) -> tuple[Tensor, Tensor, Tensor]:
    return chunked.xtr_fwd(q, d, q_valid, d_valid, k, need_aux, d_masked)


@xtr_forward.register_fake
def _(q, d, q_valid, d_valid, k, need_aux, d_masked):
    nq, lq, nd, ld = q.shape[0], q.shape[1], d.shape[0], d.shape[1]
    if not need_aux:
        return q.new_empty(nq, nd), q.new_empty(0, dtype=index_dtype(ld)), q.new_empty(0)
    return q.new_empty(nq, nd), q.new_empty(nq, nd, lq, dtype=index_dtype(ld)), q.new_empty(nq, nd)


@torch.library.custom_op("xloss::xtr_backward", mutates_args=())
def xtr_backward(g: Tensor, q: Tensor, d: Tensor, q_valid: Tensor, d_valid: Tensor, idx: Tensor,
                 z: Tensor) -> tuple[Tensor, Tensor]:
    return chunked.xtr_bwd(g, q, d, q_valid, d_valid, idx, z)


@xtr_backward.register_fake
def _(g, q, d, q_valid, d_valid, idx, z):
    return torch.empty_like(q), torch.empty_like(d)


__all__ = ["xtr_backward", "xtr_forward"]
