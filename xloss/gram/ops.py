"""GRAM as ``torch.library`` custom ops, for ``torch.compile(fullgraph=True)``.

``gram_volume`` (pairwise) and ``gram_loss`` run these under ``torch.compiler.is_compiling()`` in place of
:class:`~xloss.gram.GramVolumeFunction` / :class:`~xloss.gram.GramLossFunction` (eager calls keep the
Functions).  The ops run the Functions' own ``forward``/``backward`` bodies on a small stand-in for the
autograd ctx (``_ops.FunctionCtx``), so the numbers are the Functions' numbers and no math is repeated here:

* ``xloss::gram_volume_forward(anchor, others[], eps, backend)`` → ``(V [N1, N2], det [N1, N2] | [0])``;
  ``xloss::gram_volume_backward(grad, anchor, others[], det, eps, backend, need_anchor, need_others)`` →
  ``(grad_anchor, grad_others[])``.
* ``xloss::gram_loss_forward(scale, anchor, others[], label_smoothing, stopgrad_gathered, eps, reduction,
  backend)`` → ``(loss, det [N, N] | [0], lse_rows [N], lse_cols [N])``;
  ``xloss::gram_loss_backward(grad, scale, anchor, others[], det, lse_rows, lse_cols, ..., need_scale,
  need_anchor, need_others)`` → ``(grad_scale, grad_anchor, grad_others[])``.

``det`` (the signed Gram determinants, kept by the cpu engine) is empty for the triton engine, which
recomputes its tiles; a gradient not needed is an empty tensor (custom ops cannot return None).
``backend`` is "cpu" or "triton", resolved by the caller.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .._ops import FunctionCtx, autograd_inside
from .._tiling import accumulation_dtype
from . import GramLossFunction, GramVolumeFunction
from . import cpu as _cpu


def _engine(name: str):
    if name == "triton":
        from . import triton as _triton  # imported lazily: Triton is optional

        return _triton
    return _cpu


def _empty(like: Tensor) -> Tensor:
    return like.new_empty(0)


def _grad_or_empty(g: Tensor | None, like: Tensor) -> Tensor:
    return _empty(like) if g is None else g


# ----------------------------------------------------------------------------------------------- volume
@torch.library.custom_op("xloss::gram_volume_forward", mutates_args=())
def gram_volume_forward(anchor: Tensor, others: list[Tensor], eps: float, backend: str) -> tuple[Tensor, Tensor]:
    ctx = FunctionCtx()
    v = GramVolumeFunction.forward(ctx, eps, _engine(backend), anchor, *others)
    extra = ctx.saved_tensors[1 + len(others):]  # the cpu engine's signed det; nothing for triton
    return v, (extra[0] if extra else _empty(v))


@gram_volume_forward.register_fake
def _(anchor, others, eps, backend):
    acc = accumulation_dtype(anchor.dtype)
    shape = (anchor.shape[0], others[0].shape[0])
    return anchor.new_empty(shape, dtype=acc), anchor.new_empty(shape if backend != "triton" else (0,), dtype=acc)


@torch.library.custom_op("xloss::gram_volume_backward", mutates_args=())
def gram_volume_backward(
    grad: Tensor, anchor: Tensor, others: list[Tensor], det: Tensor, eps: float, backend: str, need_anchor: bool,
    need_others: bool,
) -> tuple[Tensor, list[Tensor]]:
    engine = _engine(backend)
    saved = (anchor, *others) + ((det,) if engine is _cpu else ())
    ctx = FunctionCtx(saved, (False, False, need_anchor) + (need_others,) * len(others), eps=eps, engine=engine)
    with autograd_inside():
        _, _, ga, *gx = GramVolumeFunction.backward(ctx, grad)
    return _grad_or_empty(ga, anchor), [_grad_or_empty(g, x) for g, x in zip(gx, others)]


@gram_volume_backward.register_fake
def _(grad, anchor, others, det, eps, backend, need_anchor, need_others):
    return (
        torch.empty_like(anchor) if need_anchor else _empty(anchor),
        [torch.empty_like(x) if need_others else _empty(x) for x in others],
    )


def _volume_setup_context(ctx, inputs, output):
    anchor, others, eps, backend = inputs
    ctx.mark_non_differentiable(output[1])
    ctx.save_for_backward(anchor, output[1], *others)
    ctx.options = (eps, backend)


def _volume_backward(ctx, grad, _det_grad):
    need_anchor, need_others = ctx.needs_input_grad[0], any(ctx.needs_input_grad[1])
    anchor, det, *others = ctx.saved_tensors
    if grad is None or not (need_anchor or need_others):
        return None, [None] * len(others), None, None
    ga, gx = gram_volume_backward(grad, anchor, others, det, *ctx.options, need_anchor, need_others)
    gx = [g if need else None for g, need in zip(gx, ctx.needs_input_grad[1])]
    return (ga if need_anchor else None), gx, None, None


gram_volume_forward.register_autograd(_volume_backward, setup_context=_volume_setup_context)


# ------------------------------------------------------------------------------------------------- loss
@torch.library.custom_op("xloss::gram_loss_forward", mutates_args=())
def gram_loss_forward(
    scale: Tensor, anchor: Tensor, others: list[Tensor], label_smoothing: float, stopgrad_gathered: bool,
    eps: float, reduction: str, backend: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    ctx = FunctionCtx()
    loss = GramLossFunction.forward(ctx, scale, label_smoothing, stopgrad_gathered, eps, reduction,
                                    _engine(backend), anchor, *others)
    det, lse_r, lse_c = ctx.saved_tensors[-3:]  # det is None for the triton engine
    return loss, (_empty(lse_r) if det is None else det), lse_r, lse_c


@gram_loss_forward.register_fake
def _(scale, anchor, others, label_smoothing, stopgrad_gathered, eps, reduction, backend):
    acc = accumulation_dtype(anchor.dtype)
    n = anchor.shape[0]
    return (
        anchor.new_empty((n,) if reduction == "none" else (), dtype=acc),
        anchor.new_empty((n, n) if backend != "triton" else (0,), dtype=acc),
        anchor.new_empty((n,), dtype=acc),
        anchor.new_empty((n,), dtype=acc),
    )


@torch.library.custom_op("xloss::gram_loss_backward", mutates_args=())
def gram_loss_backward(
    grad: Tensor, scale: Tensor, anchor: Tensor, others: list[Tensor], det: Tensor, lse_rows: Tensor,
    lse_cols: Tensor, label_smoothing: float, stopgrad_gathered: bool, eps: float, reduction: str, backend: str,
    need_scale: bool, need_anchor: bool, need_others: bool,
) -> tuple[Tensor, Tensor, list[Tensor]]:
    engine = _engine(backend)
    saved = (scale, anchor, *others, det if engine is _cpu else None, lse_rows, lse_cols)
    needs = (need_scale, False, False, False, False, False, need_anchor) + (need_others,) * len(others)
    ctx = FunctionCtx(saved, needs, engine=engine, options=(label_smoothing, stopgrad_gathered, eps, reduction))
    with autograd_inside():
        grads = GramLossFunction.backward(ctx, grad)  # (scale, 5 options, anchor, *others)
    gs, ga, gx = grads[0], grads[6], grads[7:]
    return _grad_or_empty(gs, scale), _grad_or_empty(ga, anchor), [_grad_or_empty(g, x) for g, x in zip(gx, others)]


@gram_loss_backward.register_fake
def _(grad, scale, anchor, others, det, lse_rows, lse_cols, label_smoothing, stopgrad_gathered, eps, reduction,
      backend, need_scale, need_anchor, need_others):
    return (
        torch.empty_like(scale) if need_scale else _empty(anchor),
        torch.empty_like(anchor) if need_anchor else _empty(anchor),
        [torch.empty_like(x) if need_others else _empty(x) for x in others],
    )


def _loss_setup_context(ctx, inputs, output):
    scale, anchor, others, *options = inputs
    _, det, lse_r, lse_c = output
    ctx.mark_non_differentiable(det, lse_r, lse_c)
    ctx.save_for_backward(scale, anchor, det, lse_r, lse_c, *others)
    ctx.options = tuple(options)


def _loss_backward(ctx, grad, *_stats_grads):
    need_scale, need_anchor, need_x = ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2]
    scale, anchor, det, lse_r, lse_c, *others = ctx.saved_tensors
    nones = (None,) * 5
    if grad is None or not (need_scale or need_anchor or any(need_x)):
        return None, None, [None] * len(others), *nones
    gs, ga, gx = gram_loss_backward(grad, scale, anchor, others, det, lse_r, lse_c, *ctx.options, need_scale,
                                    need_anchor, any(need_x))
    gx = [g if need else None for g, need in zip(gx, need_x)]
    return (gs if need_scale else None), (ga if need_anchor else None), gx, *nones


gram_loss_forward.register_autograd(_loss_backward, setup_context=_loss_setup_context)


def gram_volume(anchor, others, eps: float, backend: str) -> Tensor:
    """``V [N1, N2]`` through the custom ops (arguments already checked, ``backend`` "cpu" or "triton")."""
    return gram_volume_forward(anchor, list(others), float(eps), backend)[0]


def gram_loss(scale, anchor, others, label_smoothing: float, stopgrad_gathered: bool, eps: float, reduction: str,
              backend: str) -> Tensor:
    """The GRAM loss through the custom ops (arguments already checked, ``backend`` "cpu" or "triton")."""
    return gram_loss_forward(scale, anchor, list(others), float(label_smoothing), stopgrad_gathered, float(eps),
                             reduction, backend)[0]


__all__ = ["gram_loss", "gram_loss_backward", "gram_loss_forward", "gram_volume", "gram_volume_backward",
           "gram_volume_forward"]
