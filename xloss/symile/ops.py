"""Symile's streaming log-sum-exp as ``torch.library`` custom ops, for ``torch.compile(fullgraph=True)``.

``symile_loss(..., negative_sampling="n_squared")`` runs these under ``torch.compiler.is_compiling()`` in
place of :class:`~xloss.symile.SymileLSEFunction` (eager calls keep the Function); the positive term and the
reduction around it are plain torch ops, traced as usual, and so is the whole ``"n"`` path.  The ops run the
Function's own ``forward``/``backward`` on a small stand-in for the autograd ctx, so no math is repeated:

* ``xloss::symile_lse_forward(scale, reps[], backend)`` → ``lse [M, N]`` (accumulation dtype);
* ``xloss::symile_lse_backward(grad, scale, lse, reps[], backend, need_scale, need_reps)`` →
  ``(grad_scale, grad_reps[])``, empty tensors where not needed.

``backend`` is "cpu" or "triton", resolved by the caller.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .._ops import FunctionCtx
from .._tiling import accumulation_dtype
from . import SymileLSEFunction
from . import cpu as _cpu


def _engine(name: str):
    if name == "triton":
        from . import triton as _triton  # imported lazily: Triton is optional

        return _triton
    return _cpu


@torch.library.custom_op("xloss::symile_lse_forward", mutates_args=())
def symile_lse_forward(scale: Tensor, reps: list[Tensor], backend: str) -> Tensor:
    return SymileLSEFunction.forward(FunctionCtx(), scale, _engine(backend), *reps)


@symile_lse_forward.register_fake
def _(scale, reps, backend):
    return reps[0].new_empty((len(reps), reps[0].shape[0]), dtype=accumulation_dtype(reps[0].dtype))


@torch.library.custom_op("xloss::symile_lse_backward", mutates_args=())
def symile_lse_backward(
    grad: Tensor, scale: Tensor, lse: Tensor, reps: list[Tensor], backend: str, need_scale: bool, need_reps: bool,
) -> tuple[Tensor, list[Tensor]]:
    ctx = FunctionCtx((scale, lse, *reps), (need_scale, False) + (need_reps,) * len(reps), engine=_engine(backend))
    gs, _, *gx = SymileLSEFunction.backward(ctx, grad)
    return (
        scale.new_empty(0) if gs is None else gs,
        [x.new_empty(0) if g is None else g for g, x in zip(gx, reps)],
    )


@symile_lse_backward.register_fake
def _(grad, scale, lse, reps, backend, need_scale, need_reps):
    return (
        torch.empty_like(scale) if need_scale else scale.new_empty(0),
        [torch.empty_like(x) if need_reps else x.new_empty(0) for x in reps],
    )


def _setup_context(ctx, inputs, output):
    scale, reps, backend = inputs
    ctx.save_for_backward(scale, output, *reps)
    ctx.backend = backend


def _backward(ctx, grad):
    need_scale, need_reps = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    scale, lse, *reps = ctx.saved_tensors
    if grad is None or not (need_scale or any(need_reps)):
        return None, [None] * len(reps), None
    gs, gx = symile_lse_backward(grad, scale, lse, reps, ctx.backend, need_scale, any(need_reps))
    return (gs if need_scale else None), [g if need else None for g, need in zip(gx, need_reps)], None


symile_lse_forward.register_autograd(_backward, setup_context=_setup_context)


def symile_lse(scale: Tensor, reps, backend: str) -> Tensor:
    """``LSE [M, N]`` through the custom ops (arguments already checked, ``backend`` "cpu" or "triton")."""
    return symile_lse_forward(scale, list(reps), backend)


__all__ = ["symile_lse", "symile_lse_backward", "symile_lse_forward"]
