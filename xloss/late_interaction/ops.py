"""The late-interaction engine sweeps as ``torch.library`` custom ops: one op per sweep, registered once.

:class:`~xloss.late_interaction.MaxSimFunction` calls these in eager mode and under ``torch.compile`` alike, so
there is one path: Dynamo and AOTAutograd see two opaque ops (with fakes that depend only on shapes, dtypes
and arguments) instead of the engines' Python tile loops.  The token weights before and the cross-entropy
after are plain torch ops, traced as usual.

* ``xloss::maxsim_forward(q, d, q_w, d_w?, q_valid, d_valid, zero_mode, q2d, d2q, engine, pairs, need_aux,
  q_masked, d_masked)`` → ``(s_q2d, s_d2q, idx_q2d, val_q2d, idx_d2q, val_d2q)``: the engine's ``maxsim_fwd``
  (``pairs``: its ``maxsim_pairs_fwd``, aligned pairs, ``[N]`` scores; ``group`` > 1: query a against
  documents ``a·group … a·group + group - 1``, the grouped layout); ``q_masked``/``d_masked``: a mask was
  given for that side (else it is all valid and an engine may skip applying it).  A direction not asked, or the arg-max indices and
  maxima without ``need_aux``, are empty tensors (custom ops cannot return None).
* ``xloss::maxsim_backward(g_q2d?, g_d2q?, q, d, q_w, d_w?, q_valid, d_valid, idx/val ..., zero_mode, q2d,
  d2q, engine, pairs, need_q, need_d, need_qw, need_dw)`` → ``(grad_q, grad_d, grad_q_w, grad_d_w)``: the
  engine's ``maxsim_bwd`` (``maxsim_pairs_bwd``), cast to the dtype of each input (zeros where needed but
  nothing was routed); an empty tensor where not needed.

``engine`` names the engine module ("chunked" or "triton", see ``xloss._dispatch``); both have the aligned-pair
sweeps.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .. import _dispatch
from .._tiling import accumulation_dtype
from .chunked import index_dtype

FAMILY = "late_interaction"


def _engine(name: str):
    return _dispatch.engine(FAMILY, name)


def _fwd_meta(q, d, q2d, d2q, pairs, need_aux):
    """Shapes and dtypes of the six outputs (shared by the real op, for its placeholders, and the fake)."""
    acc = accumulation_dtype(q.dtype)
    nq, lq = q.shape[0], q.shape[1]
    nd, ld = d.shape[0], d.shape[1]
    lead = (nd,) if pairs else (nq, nd)  # pairs: one score per document (a query has ``group`` of them)
    metas = []
    for on, own, other in ((q2d, lq, ld), (d2q, ld, lq)):
        aux = on and need_aux
        metas += [
            (lead if on else (0,), acc),
            ((*lead, own) if aux else (0,), index_dtype(other)),
            ((*lead, own) if aux else (0,), acc),
        ]
    return [metas[i] for i in (0, 3, 1, 2, 4, 5)]  # s_q2d, s_d2q, idx_q2d, val_q2d, idx_d2q, val_d2q


@torch.library.custom_op("xloss::maxsim_forward", mutates_args=())
def maxsim_forward(
    q: Tensor, d: Tensor, q_w: Tensor, d_w: Tensor | None, q_valid: Tensor, d_valid: Tensor, zero_mode: bool,
    q2d: bool, d2q: bool, engine: str, pairs: bool, need_aux: bool, q_masked: bool = True, d_masked: bool = True,
    group: int = 1,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    eng = _engine(engine)
    kw = {"need_aux": need_aux, "q_masked": q_masked, "d_masked": d_masked}
    if pairs:
        s_q2d, idx_q2d, val_q2d, s_d2q, idx_d2q, val_d2q = eng.maxsim_pairs_fwd(
            q, d, q_w, d_w, q_valid, d_valid, zero_mode, q2d, d2q, group=group, **kw)
    else:
        s_q2d, idx_q2d, val_q2d, s_d2q, idx_d2q, val_d2q = eng.maxsim_fwd(
            q, d, q_w, d_w, q_valid, d_valid, zero_mode, q2d, d2q, **kw)
    outs = (s_q2d, s_d2q, idx_q2d, val_q2d, idx_d2q, val_d2q)
    metas = _fwd_meta(q, d, q2d, d2q, pairs, need_aux)
    return tuple(q.new_empty(0, dtype=dt) if t is None or shape == (0,) else t for t, (shape, dt) in zip(outs, metas))


@maxsim_forward.register_fake
def _(q, d, q_w, d_w, q_valid, d_valid, zero_mode, q2d, d2q, engine, pairs, need_aux, q_masked=True,
      d_masked=True, group=1):
    return tuple(q.new_empty(shape, dtype=dt) for shape, dt in _fwd_meta(q, d, q2d, d2q, pairs, need_aux))


@torch.library.custom_op("xloss::maxsim_backward", mutates_args=())
def maxsim_backward(
    g_q2d: Tensor | None, g_d2q: Tensor | None, q: Tensor, d: Tensor, q_w: Tensor, d_w: Tensor | None,
    q_valid: Tensor, d_valid: Tensor, idx_q2d: Tensor, val_q2d: Tensor, idx_d2q: Tensor, val_d2q: Tensor,
    zero_mode: bool, q2d: bool, d2q: bool, engine: str, pairs: bool, need_q: bool, need_d: bool, need_qw: bool,
    need_dw: bool, group: int = 1,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    eng = _engine(engine)
    args = (
        q, d, q_w, d_w, q_valid, d_valid, zero_mode,
        (idx_q2d, val_q2d if need_qw else None) if q2d else None,
        (idx_d2q, val_d2q if need_dw else None) if d2q else None,
        g_q2d if q2d else None, g_d2q if d2q else None, need_q, need_d, need_qw, need_dw,
    )
    dq, dd, dq_w, dd_w = eng.maxsim_pairs_bwd(*args, group=group) if pairs else eng.maxsim_bwd(*args)
    out = []
    for g, x, need in ((dq, q, need_q), (dd, d, need_d), (dq_w, q_w, need_qw), (dd_w, d_w, need_dw)):
        out.append(q.new_empty(0) if not need else (torch.zeros_like(x) if g is None else g.to(x.dtype)))
    return tuple(out)


@maxsim_backward.register_fake
def _(g_q2d, g_d2q, q, d, q_w, d_w, q_valid, d_valid, idx_q2d, val_q2d, idx_d2q, val_d2q, zero_mode, q2d, d2q,
      engine, pairs, need_q, need_d, need_qw, need_dw, group=1):
    return tuple(
        torch.empty_like(t) if need else q.new_empty(0)
        for t, need in ((q, need_q), (d, need_d), (q_w, need_qw), (d_w, need_dw))
    )


def forward(q, d, q_w, d_w, q_valid, d_valid, zero_mode: bool, q2d: bool, d2q: bool, engine: str, pairs: bool,
            need_aux: bool, q_masked: bool = True, d_masked: bool = True, group: int = 1):
    """``(s_q2d, s_d2q, idx_q2d, val_q2d, idx_d2q, val_d2q)`` through the op (empty tensors where absent)."""
    return maxsim_forward(q, d, q_w, d_w, q_valid, d_valid, zero_mode, q2d, d2q, engine, pairs, need_aux,
                          q_masked, d_masked, group)


def backward(g_q2d, g_d2q, q, d, q_w, d_w, q_valid, d_valid, idx_q2d, val_q2d, idx_d2q, val_d2q, zero_mode: bool,
             q2d: bool, d2q: bool, engine: str, pairs: bool, needs, group: int = 1):
    """``(grad_q, grad_d, grad_q_w, grad_d_w)`` through the op, None where ``needs`` (four bools) is False;
    ``val_*`` may be None (not needed: the weight needs no gradient)."""
    empty = q_w.new_empty(0)
    grads = maxsim_backward(
        g_q2d, g_d2q, q, d, q_w, d_w, q_valid, d_valid, idx_q2d, empty if val_q2d is None else val_q2d, idx_d2q,
        empty if val_d2q is None else val_d2q, zero_mode, q2d, d2q, engine, pairs, *(bool(n) for n in needs),
        group,
    )
    return tuple(g if need else None for g, need in zip(grads, needs))


__all__ = ["backward", "forward", "maxsim_backward", "maxsim_forward"]
