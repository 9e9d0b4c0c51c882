"""The XTR sweeps as ``torch.library`` custom ops, so that one path runs eagerly and under ``torch.compile``.

* ``xloss::xtr_forward(q, d, q_valid, d_valid, k, need_aux, d_masked, engine)`` → ``(scores [Nq, Nd],
  idx [Nq, Nd, Lq], z [Nq, Nd])`` in the accumulation dtype (idx and z empty without ``need_aux``);
* ``xloss::xtr_backward(g, q, d, q_valid, d_valid, idx, z, engine)`` → ``(dq, dd)`` in the accumulation dtype.

``engine`` names the engine module ("chunked" or "triton", see ``xloss._dispatch``); both take q and d in
their own dtype.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .. import _dispatch
from .._tiling import accumulation_dtype
from ..late_interaction.chunked import index_dtype


@torch.library.custom_op("xloss::xtr_forward", mutates_args=())
def xtr_forward(q: Tensor, d: Tensor, q_valid: Tensor, d_valid: Tensor, k: int, need_aux: bool,
                d_masked: bool, engine: str) -> tuple[Tensor, Tensor, Tensor]:
    scores, idx, z = _dispatch.engine("xtr", engine).xtr_fwd(q, d, q_valid, d_valid, k, need_aux, d_masked)
    acc = accumulation_dtype(q.dtype)
    return scores.to(acc), idx, z.to(acc)


@xtr_forward.register_fake
def _(q, d, q_valid, d_valid, k, need_aux, d_masked, engine):
    nq, lq, nd, ld = q.shape[0], q.shape[1], d.shape[0], d.shape[1]
    acc = accumulation_dtype(q.dtype)
    if not need_aux:
        return q.new_empty(nq, nd, dtype=acc), q.new_empty(0, dtype=index_dtype(ld)), q.new_empty(0, dtype=acc)
    return (q.new_empty(nq, nd, dtype=acc), q.new_empty(nq, nd, lq, dtype=index_dtype(ld)),
            q.new_empty(nq, nd, dtype=acc))


@torch.library.custom_op("xloss::xtr_backward", mutates_args=())
def xtr_backward(g: Tensor, q: Tensor, d: Tensor, q_valid: Tensor, d_valid: Tensor, idx: Tensor,
                 z: Tensor, engine: str) -> tuple[Tensor, Tensor]:
    dq, dd = _dispatch.engine("xtr", engine).xtr_bwd(g, q, d, q_valid, d_valid, idx, z)
    acc = accumulation_dtype(q.dtype)
    return dq.to(acc), dd.to(acc)


@xtr_backward.register_fake
def _(g, q, d, q_valid, d_valid, idx, z, engine):
    acc = accumulation_dtype(q.dtype)
    return torch.empty_like(q, dtype=acc), torch.empty_like(d, dtype=acc)


__all__ = ["xtr_backward", "xtr_forward"]
