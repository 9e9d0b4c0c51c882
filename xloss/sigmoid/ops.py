"""The sigmoid-loss engine sweep as a ``torch.library`` custom op, registered once.

:class:`~xloss.sigmoid.SigmoidLossFunction` calls it in eager mode, under ``torch.compile`` and on every rank
(block by block), so there is one path; Dynamo sees one opaque op with a fake instead of the engines' tile loops.

* ``xloss::sigmoid_sweep(q, k, scale, bias, labels?, need_grad, row_weight?, per_row, engine, qg?, kg?)`` →
  ``(loss, dq [n, D], dk [m, D], ds, db)``, the gradients empty tensors without ``need_grad``; group ids
  ``qg [n]``, ``kg [m]`` (both or neither) replace ``labels`` (then None).

``engine`` names the engine module ("chunked" or "triton", see ``xloss._dispatch``).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .. import _dispatch
from .._tiling import accumulation_dtype


@torch.library.custom_op("xloss::sigmoid_sweep", mutates_args=())
def sigmoid_sweep(q: Tensor, k: Tensor, scale: Tensor, bias: Tensor, labels: Tensor | None, need_grad: bool,
                  row_weight: Tensor | None, per_row: bool, engine: str, qg: Tensor | None = None,
                  kg: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    out = _dispatch.engine("sigmoid", engine).forward_backward(
        q, k, scale, bias, labels, need_grad, row_weight=row_weight, per_row=per_row, qg=qg, kg=kg)
    loss = out[0]
    return (loss,) + tuple(loss.new_empty(0) if t is None else t for t in out[1:])


@sigmoid_sweep.register_fake
def _(q, k, scale, bias, labels, need_grad, row_weight, per_row, engine, qg=None, kg=None):
    acc = accumulation_dtype(q.dtype)
    loss = q.new_empty((q.shape[0],) if per_row else (), dtype=acc)
    if not need_grad:
        return (loss,) + tuple(q.new_empty(0, dtype=acc) for _ in range(4))
    return (loss, q.new_empty(q.shape, dtype=acc), k.new_empty(k.shape, dtype=acc), q.new_empty((), dtype=acc),
            q.new_empty((), dtype=acc))


def sweep(q, k, scale, bias, labels, need_grad: bool, engine: str, *, row_weight=None, per_row: bool = False,
          qg=None, kg=None):
    """``(loss, dq, dk, ds, db)`` through the op, None for the gradients without ``need_grad``."""
    out = sigmoid_sweep(q, k, scale, bias, labels, need_grad, row_weight, per_row, engine, qg, kg)
    return out if need_grad else (out[0], None, None, None, None)


__all__ = ["sigmoid_sweep", "sweep"]
