"""The Symile ``"n_squared"`` engine sweeps as ``torch.library`` custom ops: one op per sweep, registered once.

:class:`~xloss.symile.SymileFunction` calls these in eager mode and under ``torch.compile`` alike; Dynamo and
AOTAutograd see two opaque ops (fakes from shapes, dtypes and arguments only) instead of the engines' Python
loops, and the positive term and reduction around them are traced as usual (so is the whole ``"n"`` path):

* ``xloss::symile_lse(reps[], scale, engine)`` → ``lse [M, N]`` (accumulation dtype);
* ``xloss::symile_grad(reps[], scale, lse, grad, need_scale, engine)`` → ``(d_reps[], d_scale | [0])``.

``engine`` names the engine module ("chunked" or "triton", see ``xloss._dispatch``).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .. import _dispatch
from .._tiling import accumulation_dtype


def _engine(name: str):
    return _dispatch.engine("symile", name)


@torch.library.custom_op("xloss::symile_lse", mutates_args=())
def symile_lse(reps: list[Tensor], scale: Tensor, engine: str) -> Tensor:
    return _engine(engine).lse(reps, scale)


@symile_lse.register_fake
def _(reps, scale, engine):
    return reps[0].new_empty((len(reps), reps[0].shape[0]), dtype=accumulation_dtype(reps[0].dtype))


@torch.library.custom_op("xloss::symile_grad", mutates_args=())
def symile_grad(reps: list[Tensor], scale: Tensor, lse: Tensor, grad: Tensor, need_scale: bool,
                engine: str) -> tuple[list[Tensor], Tensor]:
    dxs, ds = _engine(engine).grad(reps, scale, lse, grad, need_scale)
    return dxs, (lse.new_empty(0) if ds is None else ds)


@symile_grad.register_fake
def _(reps, scale, lse, grad, need_scale, engine):
    acc = accumulation_dtype(reps[0].dtype)
    return [x.new_empty(x.shape, dtype=acc) for x in reps], lse.new_empty(() if need_scale else (0,), dtype=acc)


__all__ = ["symile_grad", "symile_lse"]
