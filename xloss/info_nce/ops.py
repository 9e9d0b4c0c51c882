"""InfoNCE as ``torch.library`` custom ops, for ``torch.compile(fullgraph=True)``.

``info_nce`` runs these under ``torch.compiler.is_compiling()``: Dynamo and AOTAutograd then see two opaque
ops (with fake implementations for shapes) instead of the Python tile loops of the engines, which they would
otherwise unroll or break the graph on.  Eager calls keep :class:`~xloss.info_nce.InfoNCEFunction`.

* ``xloss::info_nce_forward(q, k, scale, labels, symmetric, label_smoothing, reduction, backend)`` →
  ``(loss, row [2, N], col [2, M] | [0], logits [N, M] | [0])``: ``_forward`` of the package with the engine
  named by ``backend`` ("cpu" or "triton", resolved by the caller); an absent ``col``/``logits`` is an empty
  tensor (custom ops cannot return None).
* ``xloss::info_nce_backward(grad, q, k, scale, labels, row, col, logits, ..., need_q, need_k, need_scale)``
  → ``(grad_q, grad_k, grad_scale)``, an empty tensor where not needed.

Both run the same code as the autograd Function (``_forward``/``_backward``), so the numbers are identical.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .._tiling import accumulation_dtype
from . import _backward, _engine, _forward
from . import cpu as _cpu


def _or_empty(t: Tensor | None, like: Tensor) -> Tensor:
    return like.new_empty(0) if t is None else t


def _or_none(t: Tensor, present: bool) -> Tensor | None:
    return t if present else None


@torch.library.custom_op("xloss::info_nce_forward", mutates_args=())
def info_nce_forward(
    q: Tensor, k: Tensor, scale: Tensor, labels: Tensor, symmetric: bool, label_smoothing: float, reduction: str,
    backend: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    loss, row, col, logits = _forward(q, k, scale, labels, symmetric, label_smoothing, reduction, _engine(backend))
    return loss, row, _or_empty(col, row), _or_empty(logits, row)


@info_nce_forward.register_fake
def _(q, k, scale, labels, symmetric, label_smoothing, reduction, backend):
    acc = accumulation_dtype(q.dtype)
    n, m = q.shape[0], k.shape[0]
    loss = q.new_empty((n,) if reduction == "none" else (), dtype=acc)
    # The CPU engine keeps the whole logits for backward when they fit its budget (a rule on shapes only);
    # the Triton kernels never do.
    keep = backend != "triton" and _cpu._keeps_logits(n, m, acc.itemsize)
    return (
        loss,
        q.new_empty((2, n), dtype=acc),
        q.new_empty((2, m) if symmetric else (0,), dtype=acc),
        q.new_empty((n, m) if keep else (0,), dtype=acc),
    )


@torch.library.custom_op("xloss::info_nce_backward", mutates_args=())
def info_nce_backward(
    grad: Tensor, q: Tensor, k: Tensor, scale: Tensor, labels: Tensor, row: Tensor, col: Tensor, logits: Tensor,
    symmetric: bool, label_smoothing: float, reduction: str, backend: str, need_q: bool, need_k: bool,
    need_scale: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    grads = _backward(
        grad, q, k, scale, labels, row, _or_none(col, symmetric), _or_none(logits, logits.numel() > 0),
        symmetric, label_smoothing, reduction, _engine(backend), (need_q, need_k, need_scale),
    )
    return tuple(_or_empty(g, q) for g in grads)


@info_nce_backward.register_fake
def _(grad, q, k, scale, labels, row, col, logits, symmetric, label_smoothing, reduction, backend, need_q, need_k,
      need_scale):
    return (
        torch.empty_like(q) if need_q else q.new_empty(0),
        torch.empty_like(k) if need_k else q.new_empty(0),
        torch.empty_like(scale) if need_scale else q.new_empty(0),
    )


def _setup_context(ctx, inputs, output):
    q, k, scale, labels, symmetric, label_smoothing, reduction, backend = inputs
    _, row, col, logits = output
    ctx.mark_non_differentiable(row, col, logits)
    ctx.save_for_backward(q, k, scale, labels, row, col, logits)
    ctx.options = (symmetric, label_smoothing, reduction, backend)


def _backward_autograd(ctx, grad, *_stats_grads):
    needs = ctx.needs_input_grad[:3]
    if grad is None or not any(needs):
        return (None,) * 8
    q, k, scale, labels, row, col, logits = ctx.saved_tensors
    grads = info_nce_backward(grad, q, k, scale, labels, row, col, logits, *ctx.options, *needs)
    return (*(g if need else None for g, need in zip(grads, needs)), None, None, None, None, None)


info_nce_forward.register_autograd(_backward_autograd, setup_context=_setup_context)


def info_nce(q, k, scale, labels, symmetric: bool, label_smoothing: float, reduction: str, backend: str) -> Tensor:
    """The loss through the custom ops (arguments already checked, ``backend`` resolved to "cpu"/"triton")."""
    return info_nce_forward(q, k, scale, labels, symmetric, float(label_smoothing), reduction, backend)[0]


__all__ = ["info_nce", "info_nce_backward", "info_nce_forward"]
