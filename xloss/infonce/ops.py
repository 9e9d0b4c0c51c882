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

Matryoshka prefixes (``dims``: the P prefix widths; ``rq``/``rk``: inverse prefix norms, absent without
normalisation; see ``matryoshka.py``):

* ``xloss::info_nce_matryoshka_lse(q, k, rq?, rk?, scale, labels, dims, need_cols, engine)`` →
  ``(row [P, 2, N], col [P, 2, M] | [0], z_pos [P, N])``
* ``xloss::info_nce_matryoshka_grad(q, k, rq?, rk?, scale, dims, row, col?, a, w?, labels, pos, u?, v?, engine)`` →
  ``(dq_u [N, D], dk_u [M, D], drq [P, N] | [0], drk [P, M] | [0])``

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


@torch.library.custom_op("xloss::info_nce_matryoshka_lse", mutates_args=())
def info_nce_matryoshka_lse(q: Tensor, k: Tensor, rq: Tensor | None, rk: Tensor | None, scale: Tensor,
                            labels: Tensor, dims: list[int], need_cols: bool, engine: str
                            ) -> tuple[Tensor, Tensor, Tensor]:
    row, col, z_pos = _engine(engine).matryoshka_lse(q, k, rq, rk, scale, dims, need_cols, labels)
    return row, (row.new_empty(0) if col is None else col), z_pos


@info_nce_matryoshka_lse.register_fake
def _(q, k, rq, rk, scale, labels, dims, need_cols, engine):
    acc = accumulation_dtype(q.dtype)
    n, m, p = q.shape[0], k.shape[0], len(dims)
    return (q.new_empty((p, 2, n), dtype=acc), q.new_empty((p, 2, m) if need_cols else (0,), dtype=acc),
            q.new_empty((p, n), dtype=acc))


@torch.library.custom_op("xloss::info_nce_matryoshka_grad", mutates_args=())
def info_nce_matryoshka_grad(q: Tensor, k: Tensor, rq: Tensor | None, rk: Tensor | None, scale: Tensor,
                             dims: list[int], row: Tensor, col: Tensor | None, a: Tensor, w: Tensor | None,
                             labels: Tensor, pos: Tensor, u: Tensor | None, v: Tensor | None, engine: str
                             ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    dq, dk, drq, drk = _engine(engine).matryoshka_grad(q, k, rq, rk, scale, dims, row, col, a, w, labels, pos, u, v)
    return dq, dk, (dq.new_empty(0) if drq is None else drq), (dq.new_empty(0) if drk is None else drk)


@info_nce_matryoshka_grad.register_fake
def _(q, k, rq, rk, scale, dims, row, col, a, w, labels, pos, u, v, engine):
    acc = accumulation_dtype(q.dtype)
    n, m, p = q.shape[0], k.shape[0], len(dims)
    norms = rq is not None
    return (q.new_empty(q.shape, dtype=acc), k.new_empty(k.shape, dtype=acc),
            q.new_empty((p, n) if norms else (0,), dtype=acc), q.new_empty((p, m) if norms else (0,), dtype=acc))


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


def matryoshka_lse(q, k, rq, rk, scale, labels, dims: list[int], need_cols: bool, engine: str):
    """``(row [P, 2, N], col [P, 2, M] | None, z_pos [P, N])`` through the op."""
    row, col, z_pos = info_nce_matryoshka_lse(q, k, rq, rk, scale, labels, dims, need_cols, engine)
    return row, (col if need_cols else None), z_pos


def matryoshka_grad(q, k, rq, rk, scale, dims: list[int], row, col, a, w, labels, pos, u, v, engine: str):
    """``(dq_u, dk_u, drq | None, drk | None)`` through the op."""
    dq, dk, drq, drk = info_nce_matryoshka_grad(q, k, rq, rk, scale, dims, row, col, a, w, labels, pos, u, v, engine)
    return dq, dk, (drq if rq is not None else None), (drk if rq is not None else None)


__all__ = ["grad", "info_nce_grad", "info_nce_lse", "info_nce_masked_grad", "info_nce_masked_lse",
           "info_nce_matryoshka_grad", "info_nce_matryoshka_lse", "info_nce_positive_max", "lse", "masked_grad",
           "masked_lse", "matryoshka_grad", "matryoshka_lse", "positive_max"]
