"""The GRAM engine sweeps as ``torch.library`` custom ops: one op per sweep, registered once.

:class:`~xloss.gram.GramFunction` calls these in eager mode and under ``torch.compile`` alike, so there is one
path: Dynamo and AOTAutograd see opaque ops (with fakes that depend only on shapes, dtypes and arguments)
instead of the engines' Python tile loops; the O(N) formula around them is traced as usual.

* ``xloss::gram_volume(anchor, others[], eps, engine)`` → ``(V [N1, N2], det [N1, N2] | [0])``
* ``xloss::gram_volume_grad(grad_v, anchor, others[], det, eps, need_anchor, need_others, engine)`` →
  ``(d_anchor | [0], d_others[] | [0]s)``
* ``xloss::gram_loss_stats(anchor, others[], scale, labels, eps, engine)`` →
  ``(lse_r [N1], lse_c [N2], mean_r [N1], mean_c [N2], v_pos [N1], det [N1, N2] | [0])``
* ``xloss::gram_loss_grad(anchor, others[], scale, det, lse_r, lse_c, w_r, w_c, labels, label_smoothing,
  stopgrad_gathered, eps, need_anchor, need_others, need_scale, engine)`` → ``(d_anchor, d_others[], d_scale)``

``engine`` names the engine module ("chunked" or "triton", see ``xloss._dispatch``); ``det`` (the signed Gram
determinants) is kept by the chunked engine only.  Outputs are in the accumulation dtype; an absent output is
an empty tensor (custom ops cannot return None).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .. import _dispatch
from .._tiling import accumulation_dtype


def _engine(name: str):
    return _dispatch.engine("gram", name)


def _keeps_det(engine: str) -> bool:
    return engine == "chunked"


def _empty(like: Tensor, dtype=None) -> Tensor:
    return like.new_empty(0, dtype=dtype)


def _or_empty(t: Tensor | None, like: Tensor, dtype) -> Tensor:
    return _empty(like, dtype) if t is None else t


@torch.library.custom_op("xloss::gram_volume", mutates_args=())
def gram_volume(anchor: Tensor, others: list[Tensor], eps: float, engine: str) -> tuple[Tensor, Tensor]:
    v, det = _engine(engine).volume(anchor, others, eps)
    return v, _or_empty(det, v, v.dtype)


@gram_volume.register_fake
def _(anchor, others, eps, engine):
    acc = accumulation_dtype(anchor.dtype)
    shape = (anchor.shape[0], others[0].shape[0])
    return anchor.new_empty(shape, dtype=acc), anchor.new_empty(shape if _keeps_det(engine) else (0,), dtype=acc)


@torch.library.custom_op("xloss::gram_volume_grad", mutates_args=())
def gram_volume_grad(grad_v: Tensor, anchor: Tensor, others: list[Tensor], det: Tensor, eps: float,
                     need_anchor: bool, need_others: bool, engine: str) -> tuple[Tensor, list[Tensor]]:
    acc = accumulation_dtype(anchor.dtype)
    ga, gx = _engine(engine).volume_grad(anchor, others, eps, det if _keeps_det(engine) else None, grad_v,
                                         need_anchor, need_others)
    gx = gx if gx is not None else [None] * len(others)
    return _or_empty(ga, anchor, acc), [_or_empty(g, x, acc) for g, x in zip(gx, others)]


@gram_volume_grad.register_fake
def _(grad_v, anchor, others, det, eps, need_anchor, need_others, engine):
    acc = accumulation_dtype(anchor.dtype)
    return (
        anchor.new_empty(anchor.shape if need_anchor else (0,), dtype=acc),
        [x.new_empty(x.shape if need_others else (0,), dtype=acc) for x in others],
    )


@torch.library.custom_op("xloss::gram_loss_stats", mutates_args=())
def gram_loss_stats(anchor: Tensor, others: list[Tensor], scale: Tensor, labels: Tensor, eps: float,
                    engine: str) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    *stats, det = _engine(engine).loss_stats(anchor, others, scale, labels, eps)
    return (*stats, _or_empty(det, stats[0], stats[0].dtype))


@gram_loss_stats.register_fake
def _(anchor, others, scale, labels, eps, engine):
    acc = accumulation_dtype(anchor.dtype)
    n1, n2 = anchor.shape[0], others[0].shape[0]
    return (
        anchor.new_empty((n1,), dtype=acc),
        anchor.new_empty((n2,), dtype=acc),
        anchor.new_empty((n1,), dtype=acc),
        anchor.new_empty((n2,), dtype=acc),
        anchor.new_empty((n1,), dtype=acc),
        anchor.new_empty((n1, n2) if _keeps_det(engine) else (0,), dtype=acc),
    )


@torch.library.custom_op("xloss::gram_loss_grad", mutates_args=())
def gram_loss_grad(anchor: Tensor, others: list[Tensor], scale: Tensor, det: Tensor, lse_r: Tensor,
                   lse_c: Tensor, w_r: Tensor, w_c: Tensor, labels: Tensor, label_smoothing: float,
                   stopgrad_gathered: bool, eps: float, need_anchor: bool, need_others: bool, need_scale: bool,
                   engine: str) -> tuple[Tensor, list[Tensor], Tensor]:
    acc = accumulation_dtype(anchor.dtype)
    ga, gx, ds = _engine(engine).loss_grad(anchor, others, scale, det if _keeps_det(engine) else None, lse_r,
                                           lse_c, w_r, w_c, labels, label_smoothing, stopgrad_gathered, eps,
                                           need_anchor, need_others, need_scale)
    gx = gx if gx is not None else [None] * len(others)
    return (_or_empty(ga, anchor, acc), [_or_empty(g, x, acc) for g, x in zip(gx, others)],
            _or_empty(ds, anchor, acc))


@gram_loss_grad.register_fake
def _(anchor, others, scale, det, lse_r, lse_c, w_r, w_c, labels, label_smoothing, stopgrad_gathered, eps,
      need_anchor, need_others, need_scale, engine):
    acc = accumulation_dtype(anchor.dtype)
    return (
        anchor.new_empty(anchor.shape if need_anchor else (0,), dtype=acc),
        [x.new_empty(x.shape if need_others else (0,), dtype=acc) for x in others],
        anchor.new_empty(() if need_scale else (0,), dtype=acc),
    )


__all__ = ["gram_loss_grad", "gram_loss_stats", "gram_volume", "gram_volume_grad"]
