"""The sigmoid loss as ``torch.library`` custom ops, for ``torch.compile(fullgraph=True)``.

``sigmoid_loss`` runs these under ``torch.compiler.is_compiling()`` in place of
:class:`~xloss.sigmoid.SigmoidLossFunction` and of its no-grad engine call (eager calls keep those).  The
ops run the Function's own ``forward``/``backward`` on a stand-in for the autograd ctx
(``_ops.FunctionCtx``), so no math is repeated here:

* ``xloss::sigmoid_loss_forward(q, k, scale, bias, labels, reduction, backend, need_grad)`` →
  ``(loss, dq [N, D], dk [M, D], ds, db)``: for ``"mean"``/``"sum"`` the gradients are formed in forward (as
  the Function does; accumulation dtype); for ``"none"`` or without ``need_grad`` they are empty tensors.
* ``xloss::sigmoid_loss_backward(grad, q, k, scale, bias, labels, dq, dk, ds, db, reduction, backend,
  need_q, need_k, need_scale, need_bias)`` → the four input gradients, empty where not needed.

``backend`` is "cpu" or "triton", resolved by the caller.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .._ops import FunctionCtx
from .._tiling import accumulation_dtype
from . import SigmoidLossFunction, _engine


def _keeps_grads(reduction: str, need_grad: bool) -> bool:
    return need_grad and reduction != "none"


@torch.library.custom_op("xloss::sigmoid_loss_forward", mutates_args=())
def sigmoid_loss_forward(
    q: Tensor, k: Tensor, scale: Tensor, bias: Tensor, labels: Tensor, reduction: str, backend: str,
    need_grad: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    ctx = FunctionCtx()
    loss = SigmoidLossFunction.forward(ctx, q, k, scale, bias, labels, reduction, _engine(backend), need_grad)
    if _keeps_grads(reduction, need_grad):
        return (loss, *ctx.saved_tensors[4:])  # (q, k, scale, bias, dq, dk, ds, db) saved
    return (loss,) + tuple(loss.new_empty(0) for _ in range(4))


@sigmoid_loss_forward.register_fake
def _(q, k, scale, bias, labels, reduction, backend, need_grad):
    acc = accumulation_dtype(q.dtype)
    loss = q.new_empty((q.shape[0],) if reduction == "none" else (), dtype=acc)
    if not _keeps_grads(reduction, need_grad):
        return (loss,) + tuple(q.new_empty(0, dtype=acc) for _ in range(4))
    return loss, torch.empty_like(q, dtype=acc), torch.empty_like(k, dtype=acc), q.new_empty((), dtype=acc), \
        q.new_empty((), dtype=acc)


@torch.library.custom_op("xloss::sigmoid_loss_backward", mutates_args=())
def sigmoid_loss_backward(
    grad: Tensor, q: Tensor, k: Tensor, scale: Tensor, bias: Tensor, labels: Tensor, dq: Tensor, dk: Tensor,
    ds: Tensor, db: Tensor, reduction: str, backend: str, need_q: bool, need_k: bool, need_scale: bool,
    need_bias: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    saved = (q, k, scale, bias, labels) if reduction == "none" else (q, k, scale, bias, dq, dk, ds, db)
    needs = (need_q, need_k, need_scale, need_bias, False, False, False, False)
    ctx = FunctionCtx(saved, needs, options=(reduction, _engine(backend)))
    grads = SigmoidLossFunction.backward(ctx, grad)[:4]
    return tuple(x.new_empty(0) if g is None else g for g, x in zip(grads, (q, k, scale, bias)))


@sigmoid_loss_backward.register_fake
def _(grad, q, k, scale, bias, labels, dq, dk, ds, db, reduction, backend, need_q, need_k, need_scale, need_bias):
    return tuple(torch.empty_like(x) if need else x.new_empty(0)
                 for x, need in ((q, need_q), (k, need_k), (scale, need_scale), (bias, need_bias)))


def _setup_context(ctx, inputs, output):
    q, k, scale, bias, labels, reduction, backend, _ = inputs
    ctx.mark_non_differentiable(*output[1:])
    ctx.save_for_backward(q, k, scale, bias, labels, *output[1:])
    ctx.options = (reduction, backend)


def _backward(ctx, grad, *_grads_of_grads):
    needs = tuple(bool(n) for n in ctx.needs_input_grad[:4])
    if grad is None or not any(needs):
        return (None,) * 8
    grads = sigmoid_loss_backward(grad, *ctx.saved_tensors, *ctx.options, *needs)
    return (*(g if need else None for g, need in zip(grads, needs)), None, None, None, None)


sigmoid_loss_forward.register_autograd(_backward, setup_context=_setup_context)


def sigmoid_loss(q, k, scale, bias, labels, reduction: str, backend: str, need_grad: bool) -> Tensor:
    """The loss through the custom ops (arguments already checked, ``backend`` "cpu" or "triton")."""
    return sigmoid_loss_forward(q, k, scale, bias, labels, reduction, backend, need_grad)[0]


__all__ = ["sigmoid_loss", "sigmoid_loss_backward", "sigmoid_loss_forward"]
