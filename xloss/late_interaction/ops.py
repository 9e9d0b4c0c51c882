"""Late interaction (MaxSim) as ``torch.library`` custom ops, for ``torch.compile(fullgraph=True)``.

``maxsim``, ``maxsim_pairs`` and ``late_interaction_loss`` run these under ``torch.compiler.is_compiling()``
in place of :class:`~xloss.late_interaction.MaxSimFunction` (eager calls keep the Function): Dynamo and
AOTAutograd see two opaque ops with fake implementations instead of the engines' Python tile loops.  The
token weights before and the cross-entropy after are plain torch ops, traced as usual.

* ``xloss::maxsim_forward(q, d, q_w, d_w?, q_valid, d_valid, zero_mode, q2d, d2q, backend, pairs, need_grad)``
  → ``(s_q2d, s_d2q, idx_q2d, val_q2d, idx_d2q, val_d2q)``: the engine's forward (``backend`` "cpu" or
  "triton", resolved by the caller; ``pairs``: the aligned-pair engine).  A direction not asked, or the
  arg-max indices and maxima without ``need_grad``, are empty tensors (custom ops cannot return None).
* ``xloss::maxsim_backward(g_q2d?, g_d2q?, q, d, q_w, d_w?, q_valid, d_valid, idx/val ..., need_*)`` →
  ``(grad_q, grad_d, grad_q_w, grad_d_w)``, an empty tensor where not needed: ``_maxsim_backward`` of the
  package, the code the Function runs.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .._tiling import accumulation_dtype
from . import _engine, _maxsim_backward
from . import cpu as _cpu


def _fwd_meta(q, d, q2d, d2q, pairs, need_grad):
    """Shapes and dtypes of the six outputs (shared by the real op, for its placeholders, and the fake)."""
    acc = accumulation_dtype(q.dtype)
    nq, lq = q.shape[0], q.shape[1]
    nd, ld = d.shape[0], d.shape[1]
    lead = (nq,) if pairs else (nq, nd)
    metas = []
    for on, own, other in ((q2d, lq, ld), (d2q, ld, lq)):
        aux = on and need_grad
        metas += [
            (lead if on else (0,), acc),
            ((*lead, own) if aux else (0,), _cpu.index_dtype(other)),
            ((*lead, own) if aux else (0,), acc),
        ]
    return [metas[i] for i in (0, 3, 1, 2, 4, 5)]  # s_q2d, s_d2q, idx_q2d, val_q2d, idx_d2q, val_d2q


@torch.library.custom_op("xloss::maxsim_forward", mutates_args=())
def maxsim_forward(
    q: Tensor, d: Tensor, q_w: Tensor, d_w: Tensor | None, q_valid: Tensor, d_valid: Tensor, zero_mode: bool,
    q2d: bool, d2q: bool, backend: str, pairs: bool, need_grad: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    fwd = _cpu.maxsim_pairs_fwd if pairs else _engine(backend).maxsim_fwd
    s_q2d, idx_q2d, val_q2d, s_d2q, idx_d2q, val_d2q = fwd(
        q, d, q_w, d_w, q_valid, d_valid, zero_mode, q2d, d2q, need_aux=need_grad
    )
    outs = (s_q2d, s_d2q, idx_q2d, val_q2d, idx_d2q, val_d2q)
    metas = _fwd_meta(q, d, q2d, d2q, pairs, need_grad)
    return tuple(q.new_empty(0, dtype=dt) if t is None or shape == (0,) else t for t, (shape, dt) in zip(outs, metas))


@maxsim_forward.register_fake
def _(q, d, q_w, d_w, q_valid, d_valid, zero_mode, q2d, d2q, backend, pairs, need_grad):
    return tuple(q.new_empty(shape, dtype=dt) for shape, dt in _fwd_meta(q, d, q2d, d2q, pairs, need_grad))


@torch.library.custom_op("xloss::maxsim_backward", mutates_args=())
def maxsim_backward(
    g_q2d: Tensor | None, g_d2q: Tensor | None, q: Tensor, d: Tensor, q_w: Tensor, d_w: Tensor | None,
    q_valid: Tensor, d_valid: Tensor, idx_q2d: Tensor, val_q2d: Tensor, idx_d2q: Tensor, val_d2q: Tensor,
    zero_mode: bool, q2d: bool, d2q: bool, backend: str, pairs: bool, need_q: bool, need_d: bool, need_qw: bool,
    need_dw: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    route = None if pairs else getattr(_engine(backend), "route", None)
    grads = _maxsim_backward(
        q, d, q_w, d_w, q_valid, d_valid, idx_q2d, val_q2d if need_qw else None, idx_d2q,
        val_d2q if need_dw else None, g_q2d, g_d2q, zero_mode, q2d, d2q, pairs, route,
        (need_q, need_d, need_qw, need_dw),
    )
    return tuple(q.new_empty(0) if g is None else g for g in grads)


@maxsim_backward.register_fake
def _(g_q2d, g_d2q, q, d, q_w, d_w, q_valid, d_valid, idx_q2d, val_q2d, idx_d2q, val_d2q, zero_mode, q2d, d2q,
      backend, pairs, need_q, need_d, need_qw, need_dw):
    return tuple(
        torch.empty_like(t) if need else q.new_empty(0)
        for t, need in ((q, need_q), (d, need_d), (q_w, need_qw), (d_w, need_dw))
    )


def _setup_context(ctx, inputs, output):
    q, d, q_w, d_w, q_valid, d_valid, zero_mode, q2d, d2q, backend, pairs, _ = inputs
    _, _, idx_q2d, val_q2d, idx_d2q, val_d2q = output
    ctx.mark_non_differentiable(idx_q2d, val_q2d, idx_d2q, val_d2q)
    # The maxima are needed only for the weights' gradients (as in MaxSimFunction).
    need_qw, need_dw = ctx.needs_input_grad[2], ctx.needs_input_grad[3]
    ctx.save_for_backward(q, d, q_w, d_w, q_valid, d_valid, idx_q2d, val_q2d if need_qw else None, idx_d2q,
                          val_d2q if need_dw else None)
    ctx.options = (zero_mode, q2d, d2q, backend, pairs)


def _backward_autograd(ctx, g_q2d, g_d2q, *_aux_grads):
    zero_mode, q2d, d2q, backend, pairs = ctx.options
    needs = tuple(bool(n) for n in ctx.needs_input_grad[:4])
    g_q2d, g_d2q = (g_q2d if q2d else None), (g_d2q if d2q else None)
    if (g_q2d is None and g_d2q is None) or not any(needs):
        return (None,) * 12
    q, d, q_w, d_w, q_valid, d_valid, idx_q2d, val_q2d, idx_d2q, val_d2q = ctx.saved_tensors
    empty = q_w.new_empty(0)
    grads = maxsim_backward(
        g_q2d, g_d2q, q, d, q_w, d_w, q_valid, d_valid, idx_q2d, empty if val_q2d is None else val_q2d, idx_d2q,
        empty if val_d2q is None else val_d2q, zero_mode, q2d, d2q, backend, pairs, *needs,
    )
    return (*(g if need else None for g, need in zip(grads, needs)),) + (None,) * 8


maxsim_forward.register_autograd(_backward_autograd, setup_context=_setup_context)


def maxsim(q, d, q_w, d_w, q_valid, d_valid, zero_mode: bool, q2d: bool, d2q: bool, backend: str, pairs: bool,
           need_grad: bool):
    """``(S^{q2d}, S^{d2q})`` through the custom ops (an empty tensor for a direction not asked)."""
    out = maxsim_forward(q, d, q_w, d_w, q_valid, d_valid, zero_mode, q2d, d2q, backend, pairs, need_grad)
    return out[0], out[1]


__all__ = ["maxsim", "maxsim_backward", "maxsim_forward"]
