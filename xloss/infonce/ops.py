"""The InfoNCE engine sweeps as ``torch.library`` custom ops: one op per sweep, registered once.

:class:`~xloss.infonce.InfoNCEFunction` calls these in eager mode, under ``torch.compile`` and on every rank,
so there is one path: Dynamo and AOTAutograd see two opaque ops (with fakes that depend only on shapes, dtypes
and arguments) instead of the engines' Python tile loops, and the loss formula around them is traced as usual.

* ``xloss::info_nce_lse(q, k, scale, labels, need_cols, keep_logits, engine)`` →
  ``(row [2, N], col [2, M] | [0], z_pos [N], logits [N, M] | [0])``
* ``xloss::info_nce_grad(q, k, scale, row, col?, a, w?, logits?, engine)`` → ``(dq_u [N, D], dk_u [M, D])``

Structured targets (groups, exclude_self, margin, decoupled, hardness: the target rule of ``engine.py``):

* ``xloss::info_nce_positive_max(q, k, qg, kg, self_offset?, need_cols, engine)`` → ``(ref_r [N], ref_c [M] | [0])``
* ``xloss::info_nce_masked_lse(q, k, scale, qg, kg, self_offset?, decoupled, hardness, margin?, ref_r?, ref_c?,
  need_cols, engine)`` → ``(row [2, N], col [2, M] | [0], pos_r [2, N], pos_c [2, M] | [0])``
* ``xloss::info_nce_masked_grad(q, k, scale, qg, kg, self_offset?, decoupled, hardness, margin?, ref_r?, ref_c?,
  row, col?, a, w?, pa, pw?, engine)`` → ``(dq_u [N, D], dk_u [M, D])``

``engine`` names the engine module ("chunked" or "triton", see ``xloss._dispatch``); an absent output is an
empty tensor (custom ops cannot return None).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .. import _dispatch
from .._tiling import accumulation_dtype


def _engine(name: str):
    return _dispatch.engine("info_nce", name)


@torch.library.custom_op("xloss::info_nce_lse", mutates_args=())
def info_nce_lse(q: Tensor, k: Tensor, scale: Tensor, labels: Tensor, need_cols: bool, keep_logits: bool,
                 engine: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    row, col, z_pos, logits = _engine(engine).lse(q, k, scale, need_cols, labels, keep_logits)
    return row, (row.new_empty(0) if col is None else col), z_pos, (row.new_empty(0) if logits is None else logits)


@info_nce_lse.register_fake
def _(q, k, scale, labels, need_cols, keep_logits, engine):
    acc = accumulation_dtype(q.dtype)
    n, m = q.shape[0], k.shape[0]
    return (
        q.new_empty((2, n), dtype=acc),
        q.new_empty((2, m) if need_cols else (0,), dtype=acc),
        q.new_empty((n,), dtype=acc),
        q.new_empty((n, m) if keep_logits else (0,), dtype=acc),
    )


@torch.library.custom_op("xloss::info_nce_grad", mutates_args=())
def info_nce_grad(q: Tensor, k: Tensor, scale: Tensor, row: Tensor, col: Tensor | None, a: Tensor,
                  w: Tensor | None, logits: Tensor | None, engine: str) -> tuple[Tensor, Tensor]:
    return _engine(engine).grad(q, k, scale, row, col, a, w, logits)


@info_nce_grad.register_fake
def _(q, k, scale, row, col, a, w, logits, engine):
    acc = accumulation_dtype(q.dtype)
    return q.new_empty(q.shape, dtype=acc), k.new_empty(k.shape, dtype=acc)


@torch.library.custom_op("xloss::info_nce_positive_max", mutates_args=())
def info_nce_positive_max(q: Tensor, k: Tensor, qg: Tensor, kg: Tensor, self_offset: int | None, need_cols: bool,
                          engine: str) -> tuple[Tensor, Tensor]:
    ref_r, ref_c = _engine(engine).positive_max(q, k, qg, kg, self_offset, need_cols)
    return ref_r, (ref_r.new_empty(0) if ref_c is None else ref_c)


@info_nce_positive_max.register_fake
def _(q, k, qg, kg, self_offset, need_cols, engine):
    acc = accumulation_dtype(q.dtype)
    return q.new_empty((q.shape[0],), dtype=acc), q.new_empty((k.shape[0],) if need_cols else (0,), dtype=acc)


@torch.library.custom_op("xloss::info_nce_masked_lse", mutates_args=())
def info_nce_masked_lse(q: Tensor, k: Tensor, scale: Tensor, qg: Tensor, kg: Tensor, self_offset: int | None,
                        decoupled: bool, hardness: float, margin: float | None, ref_r: Tensor | None,
                        ref_c: Tensor | None, need_cols: bool, engine: str
                        ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    row, col, pos_r, pos_c = _engine(engine).masked_lse(q, k, scale, qg, kg, self_offset, decoupled, hardness,
                                                        margin, ref_r, ref_c, need_cols)
    empty = row.new_empty(0)
    return row, (empty if col is None else col), pos_r, (empty.clone() if pos_c is None else pos_c)


@info_nce_masked_lse.register_fake
def _(q, k, scale, qg, kg, self_offset, decoupled, hardness, margin, ref_r, ref_c, need_cols, engine):
    acc = accumulation_dtype(q.dtype)
    n, m = q.shape[0], k.shape[0]
    cols = (2, m) if need_cols else (0,)
    return (q.new_empty((2, n), dtype=acc), q.new_empty(cols, dtype=acc), q.new_empty((2, n), dtype=acc),
            q.new_empty(cols, dtype=acc))


@torch.library.custom_op("xloss::info_nce_masked_grad", mutates_args=())
def info_nce_masked_grad(q: Tensor, k: Tensor, scale: Tensor, qg: Tensor, kg: Tensor, self_offset: int | None,
                         decoupled: bool, hardness: float, margin: float | None, ref_r: Tensor | None,
                         ref_c: Tensor | None, row: Tensor, col: Tensor | None, a: Tensor, w: Tensor | None,
                         pa: Tensor, pw: Tensor | None, engine: str) -> tuple[Tensor, Tensor]:
    return _engine(engine).masked_grad(q, k, scale, qg, kg, self_offset, decoupled, hardness, margin, ref_r, ref_c,
                                       row, col, a, w, pa, pw)


@info_nce_masked_grad.register_fake
def _(q, k, scale, qg, kg, self_offset, decoupled, hardness, margin, ref_r, ref_c, row, col, a, w, pa, pw, engine):
    acc = accumulation_dtype(q.dtype)
    return q.new_empty(q.shape, dtype=acc), k.new_empty(k.shape, dtype=acc)


def lse(q, k, scale, labels, need_cols: bool, keep_logits: bool, engine: str):
    """``(row, col | None, z_pos, logits | None)`` through the op."""
    row, col, z_pos, logits = info_nce_lse(q, k, scale, labels, need_cols, keep_logits, engine)
    return row, (col if need_cols else None), z_pos, (logits if keep_logits else None)


def grad(q, k, scale, row, col, a, w, logits, engine: str):
    """``(dq_u, dk_u)`` through the op."""
    return info_nce_grad(q, k, scale, row, col, a, w, logits, engine)


def positive_max(q, k, qg, kg, rule, need_cols: bool, engine: str):
    """``(ref_r, ref_c | None)`` through the op; ``rule`` a :class:`~xloss.infonce.targets.TargetRule`."""
    ref_r, ref_c = info_nce_positive_max(q, k, qg, kg, rule.self_offset, need_cols, engine)
    return ref_r, (ref_c if need_cols else None)


def masked_lse(q, k, scale, qg, kg, rule, ref_r, ref_c, need_cols: bool, engine: str):
    """``(row, col | None, pos_r, pos_c | None)`` through the op."""
    row, col, pos_r, pos_c = info_nce_masked_lse(q, k, scale, qg, kg, rule.self_offset, rule.decoupled,
                                                 rule.hardness, rule.margin, ref_r, ref_c, need_cols, engine)
    return row, (col if need_cols else None), pos_r, (pos_c if need_cols else None)


def masked_grad(q, k, scale, qg, kg, rule, ref_r, ref_c, row, col, a, w, pa, pw, engine: str):
    """``(dq_u, dk_u)`` through the op."""
    return info_nce_masked_grad(q, k, scale, qg, kg, rule.self_offset, rule.decoupled, rule.hardness, rule.margin,
                                ref_r, ref_c, row, col, a, w, pa, pw, engine)


__all__ = ["grad", "info_nce_grad", "info_nce_lse", "info_nce_masked_grad", "info_nce_masked_lse",
           "info_nce_positive_max", "lse", "masked_grad", "masked_lse", "positive_max"]
