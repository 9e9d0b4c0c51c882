"""The distillation engine sweeps as ``torch.library`` custom ops, registered once (as ``xloss/infonce/ops.py``).

* ``xloss::distill_lse(q, k, scale, tq, tk, tscale, need_cols, engine)`` →
  ``(row [2, N], col [2, M] | [0], trow [3, N], tcol [3, M] | [0])``
* ``xloss::distill_grad(q, k, scale, tq, tk, tscale, row, col?, trow, tcol?, a, w?, engine)`` →
  ``(dq_u [N, D], dk_u [M, D])``

CWCL needs no sweep of its own: its targets are linear in the logits, so it runs InfoNCE's sweeps
(``xloss::info_nce_lse`` / ``xloss::info_nce_grad``) and adds closed-form target terms.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .. import _dispatch
from .._tiling import accumulation_dtype


def _engine(name: str):
    return _dispatch.engine("distill", name)


@torch.library.custom_op("xloss::distill_lse", mutates_args=())
def distill_lse(q: Tensor, k: Tensor, scale: Tensor, tq: Tensor, tk: Tensor, tscale: Tensor, need_cols: bool,
                engine: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    row, col, trow, tcol = _engine(engine).lse(q, k, scale, tq, tk, tscale, need_cols)
    empty = row.new_empty(0)
    return row, (empty if col is None else col), trow, (empty.clone() if tcol is None else tcol)


@distill_lse.register_fake
def _(q, k, scale, tq, tk, tscale, need_cols, engine):
    acc = accumulation_dtype(q.dtype)
    n, m = q.shape[0], k.shape[0]
    return (q.new_empty((2, n), dtype=acc), q.new_empty((2, m) if need_cols else (0,), dtype=acc),
            q.new_empty((3, n), dtype=acc), q.new_empty((3, m) if need_cols else (0,), dtype=acc))


@torch.library.custom_op("xloss::distill_grad", mutates_args=())
def distill_grad(q: Tensor, k: Tensor, scale: Tensor, tq: Tensor, tk: Tensor, tscale: Tensor, row: Tensor,
                 col: Tensor | None, trow: Tensor, tcol: Tensor | None, a: Tensor, w: Tensor | None,
                 engine: str) -> tuple[Tensor, Tensor]:
    return _engine(engine).grad(q, k, scale, tq, tk, tscale, row, col, trow, tcol, a, w)


@distill_grad.register_fake
def _(q, k, scale, tq, tk, tscale, row, col, trow, tcol, a, w, engine):
    acc = accumulation_dtype(q.dtype)
    return q.new_empty(q.shape, dtype=acc), k.new_empty(k.shape, dtype=acc)


def lse(q, k, scale, tq, tk, tscale, need_cols: bool, engine: str):
    """``(row, col | None, trow, tcol | None)`` through the op."""
    row, col, trow, tcol = distill_lse(q, k, scale, tq, tk, tscale, need_cols, engine)
    return row, (col if need_cols else None), trow, (tcol if need_cols else None)


def grad(q, k, scale, tq, tk, tscale, row, col, trow, tcol, a, w, engine: str):
    """``(dq_u, dk_u)`` through the op."""
    return distill_grad(q, k, scale, tq, tk, tscale, row, col, trow, tcol, a, w, engine)


__all__ = ["distill_grad", "distill_lse", "grad", "lse"]
