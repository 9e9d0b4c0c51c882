"""Memory-efficient late interaction (MaxSim, SPEC.md §3): ColBERT / FILIP / HBI-WTI scores and losses.

``maxsim``, ``maxsim_pairs`` and ``late_interaction_loss`` check their arguments, fold masks, the mean
normalisation and user token weights into per-token weights (torch ops, so that the weights get their
gradients through them), pick a backend and run one autograd Function:

* ``MaxSimFunction``: a forward engine (``cpu.maxsim_fwd`` or ``triton.maxsim_fwd``) computes the scores of
  both directions from the same similarity tiles and returns the arg-max indices (int16) and max values of
  each token; the shared torch backward (``backward.py``) routes the gradients through those indices, with
  the engine's own routing primitive ``route`` when it has one (``triton.route``: gather/scatter kernels).
  Saved: the inputs, the weights and ``[Nq, Nd, L]`` indices (values only when the weights need a gradient).
  The ``[Nq, Nd, Lq, Ld]`` similarity tensor never exists.
* ``MaxSimPairsFunction``: query a against document a only, chunked ``bmm``s (any device).

The loss builds the small ``[Nq, Nd]`` score matrices and applies ``F.cross_entropy`` to them.

Engine interface (shared with the Triton path): ``maxsim_fwd(q, d, q_w, d_w, q_valid, d_valid, zero_mode,
q2d, d2q)`` returns ``(s_q2d, idx_q2d, val_q2d, s_d2q, idx_d2q, val_d2q)``; see ``cpu.maxsim_fwd``.  Every engine
takes the keyword ``need_aux`` (False: forward without gradients, no indices and values).
"""

from __future__ import annotations

import torch

from .. import _backend, _checks
from .. import reference as _reference
from .._reduce import reduce_terms
from ..reference.late_interaction import cross_entropy_terms, token_weights
from . import backward as _bwd
from . import cpu as _cpu

REDUCTIONS = ("sum", "mean")
MASK_MODES = ("exclude", "zero")
DIRECTIONS = ("q2d", "d2q", "both")


def _engine(name: str):
    if name == "triton":
        from . import triton as _triton  # imported lazily: Triton is optional

        return _triton
    return _cpu


def _empty(x: torch.Tensor) -> torch.Tensor:
    return x.new_empty(0)


class MaxSimFunction(torch.autograd.Function):
    """``(S^{q2d}, S^{d2q}) [Nq, Nd]`` from a forward engine; an empty tensor for a direction not asked.

    Forward args: ``q [Nq, Lq, D]``, ``d [Nd, Ld, D]``, ``q_w [Nq, Lq]``, ``d_w [Nd, Ld]`` or None (final
    per-token weights in the accumulation dtype), ``q_valid``, ``d_valid`` (bool), ``zero_mode``, ``q2d``,
    ``d2q``, ``fwd`` (the engine's forward function), ``pairs`` (aligned pairs: ``[N]`` scores), ``need_grad``
    (False under ``no_grad`` or without inputs requiring grad: nothing is saved, no indices are searched),
    ``route`` (the engine's ``route``, as ``backward.route``, for the backward of the cross scores; None: the
    torch one).
    """

    @staticmethod
    def forward(ctx, q, d, q_w, d_w, q_valid, d_valid, zero_mode, q2d, d2q, fwd, pairs, need_grad, route=None):
        s_q2d, idx_q2d, val_q2d, s_d2q, idx_d2q, val_d2q = fwd(
            q, d, q_w, d_w, q_valid, d_valid, zero_mode, q2d, d2q, need_aux=need_grad
        )
        ctx.set_materialize_grads(False)
        ctx.options = (zero_mode, q2d, d2q, pairs, route)
        if need_grad:
            # The max values are needed only for the weights' gradients.
            val_q2d = val_q2d if (q2d and ctx.needs_input_grad[2]) else None
            val_d2q = val_d2q if (d2q and ctx.needs_input_grad[3]) else None
            ctx.save_for_backward(q, d, q_w, d_w, q_valid, d_valid, idx_q2d, val_q2d, idx_d2q, val_d2q)
        out_q2d = s_q2d if q2d else _empty(q_w)
        out_d2q = s_d2q if d2q else _empty(q_w)
        ctx.mark_non_differentiable(*[t for t, on in ((out_q2d, q2d), (out_d2q, d2q)) if not on])
        return out_q2d, out_d2q

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g_q2d, g_d2q):
        q, d, q_w, d_w, q_valid, d_valid, idx_q2d, val_q2d, idx_d2q, val_d2q = ctx.saved_tensors
        zero_mode, q2d, d2q, pairs, route = ctx.options
        grads = _maxsim_backward(q, d, q_w, d_w, q_valid, d_valid, idx_q2d, val_q2d, idx_d2q, val_d2q, g_q2d,
                                 g_d2q, zero_mode, q2d, d2q, pairs, route, ctx.needs_input_grad[:4])
        return (*grads, None, None, None, None, None, None, None, None, None)


def _maxsim_backward(q, d, q_w, d_w, q_valid, d_valid, idx_q2d, val_q2d, idx_d2q, val_d2q, g_q2d, g_d2q,
                     zero_mode, q2d, d2q, pairs, route, needs):
    """The backward of :class:`MaxSimFunction` (also run by the ``xloss::maxsim_backward`` custom op):
    ``(grad_q, grad_d, grad_q_w, grad_d_w)``, None where ``needs`` (four bools) is False."""
    need_q, need_d, need_qw, need_dw = needs
    run = _bwd.pairs_backward if pairs else _bwd.maxsim_backward
    kwargs = {} if pairs or route is None else {"route": route}  # the engine's routing primitive
    dq, dd, dq_w, dd_w = run(
        q, d, q_w, d_w, q_valid, d_valid, zero_mode,
        (idx_q2d, val_q2d) if q2d else None, (idx_d2q, val_d2q) if d2q else None,
        g_q2d if q2d else None, g_d2q if d2q else None, need_q, need_d, need_qw, need_dw, **kwargs,
    )
    grad_q = None if not need_q else (torch.zeros_like(q) if dq is None else dq.to(q.dtype))
    grad_d = None if not need_d else (torch.zeros_like(d) if dd is None else dd.to(d.dtype))
    grad_qw = None if not need_qw else (torch.zeros_like(q_w) if dq_w is None else dq_w.to(q_w.dtype))
    grad_dw = None if not need_dw else (torch.zeros_like(d_w) if dd_w is None else dd_w.to(d_w.dtype))
    return grad_q, grad_d, grad_qw, grad_dw


def _check_inputs(q, d, q_mask, d_mask, reduction, mask_mode, q_weights, d_weights, direction,
                  reduction_name="reduction"):
    _checks.check_float_tensor("q", q, ndim=3)
    _checks.check_float_tensor("d", d, ndim=3)
    _checks.check_same_dtype_device(q=q, d=d)
    if q.shape[2] != d.shape[2]:
        raise ValueError(
            f"q and d must have the same feature dimension D (last dim), got q {tuple(q.shape)} and d {tuple(d.shape)}"
        )
    if q_mask is not None:
        _checks.check_token_mask("q_mask", q_mask, tuple(q.shape[:2]), q.device, "q")
    if d_mask is not None:
        _checks.check_token_mask("d_mask", d_mask, tuple(d.shape[:2]), d.device, "d")
    if q_weights is not None:
        _checks.check_token_weights("q_weights", q_weights, tuple(q.shape[:2]), q.device, "q")
    if d_weights is not None:
        _checks.check_token_weights("d_weights", d_weights, tuple(d.shape[:2]), d.device, "d")
    _checks.check_choice(reduction_name, reduction, REDUCTIONS)
    _checks.check_choice("mask_mode", mask_mode, MASK_MODES)
    _checks.check_choice("direction", direction, DIRECTIONS)
    if direction == "q2d" and d_weights is not None:
        raise ValueError("d_weights weight the document→query sum: use direction='d2q' or 'both', or drop them")
    if direction == "d2q" and q_weights is not None:
        raise ValueError("q_weights weight the query→document sum: use direction='q2d' or 'both', or drop them")


def _directional(q, d, q_mask, d_mask, reduction, mask_mode, q_weights, d_weights, direction, engine, pairs):
    """``(S^{q2d}, S^{d2q})``, None for a direction not asked, through :class:`MaxSimFunction`."""
    acc = _cpu.accumulation_dtype(q.dtype)
    q2d, d2q = direction in ("q2d", "both"), direction in ("d2q", "both")
    q_valid = torch.ones(q.shape[:2], dtype=torch.bool, device=q.device) if q_mask is None else q_mask
    d_valid = torch.ones(d.shape[:2], dtype=torch.bool, device=d.device) if d_mask is None else d_mask
    q_w = token_weights(q_valid, q_weights if q2d else None, reduction, acc)
    d_w = token_weights(d_valid, d_weights, reduction, acc) if d2q else None
    fwd = _cpu.maxsim_pairs_fwd if pairs else engine.maxsim_fwd
    route = None if pairs else getattr(engine, "route", None)  # an engine's own backward routing (Triton)
    need_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (q, d, q_w, d_w))
    if torch.compiler.is_compiling():  # opaque custom ops instead of the engines' Python tile loops
        s_q2d, s_d2q = _ops.maxsim(q, d, q_w, d_w, q_valid, d_valid, mask_mode == "zero", q2d, d2q,
                                   "cpu" if engine is _cpu else "triton", pairs, need_grad)
        return (s_q2d if q2d else None), (s_d2q if d2q else None)
    s_q2d, s_d2q = MaxSimFunction.apply(
        q, d, q_w, d_w, q_valid, d_valid, mask_mode == "zero", q2d, d2q, fwd, pairs, need_grad, route
    )
    return (s_q2d if q2d else None), (s_d2q if d2q else None)


def _combine(s_q2d, s_d2q, direction):
    if direction == "q2d":
        return s_q2d
    if direction == "d2q":
        return s_d2q
    return (s_q2d + s_d2q) / 2


def maxsim(
    q: torch.Tensor,
    d: torch.Tensor,
    q_mask: torch.Tensor | None = None,
    d_mask: torch.Tensor | None = None,
    *,
    reduction: str = "sum",
    mask_mode: str = "exclude",
    q_weights: torch.Tensor | None = None,
    d_weights: torch.Tensor | None = None,
    direction: str = "q2d",
    backend: str = "auto",
) -> torch.Tensor:
    """Late-interaction (MaxSim) scores of every query against every document, without the
    ``[Nq, Nd, Lq, Ld]`` similarity tensor.  Equal to ``xloss.reference.maxsim``.

    ``"q2d"`` (ColBERT): ``S_ab = Σ_t w_at · max_{v valid} <q_at, d_bv>``; ``"d2q"``: the same with the roles
    swapped (for each document token the max over query tokens, weighted by ``d_mask``/``d_weights``);
    ``"both"``: ``½(S^{q2d} + S^{d2q})``, HBI's weighted token interaction when weights are given.

    Args:
        q: ``[Nq, Lq, D]`` query tokens, float32/float16/bfloat16/float64.
        d: ``[Nd, Ld, D]`` document tokens, same dtype and device.
        q_mask, d_mask: bool ``[Nq, Lq]``, ``[Nd, Ld]`` (True = valid token); None = all valid.
        reduction: ``"sum"`` over valid tokens (ColBERT) or ``"mean"`` (FILIP).  With weights, ``"mean"``
            divides the weighted sum by the number of valid tokens: ``Σ_t w_t·max / |valid|``.
        mask_mode: ``"exclude"`` (invalid tokens never win a max) or ``"zero"`` (invalid tokens score 0 and
            still compete: PyLate's ``colbert_scores``).  A token with no valid token on the other side
            scores 0 and gets no gradient.
        q_weights: ``[Nq, Lq]`` float weights of the query→document sum (``"q2d"``/``"both"``), used as given
            (times the mask); they get a gradient.
        d_weights: ``[Nd, Ld]`` float weights of the document→query sum (``"d2q"``/``"both"``).
        direction: ``"q2d"``, ``"d2q"`` or ``"both"``.
        backend: ``"auto"``, ``"triton"``, ``"cpu"`` or ``"reference"``.

    Returns:
        ``[Nq, Nd]`` scores, float32 for half inputs, float64 for float64 inputs.  Ties in a max go to the
        lowest index (``torch.max``), and so does the gradient.
    """
    _check_inputs(q, d, q_mask, d_mask, reduction, mask_mode, q_weights, d_weights, direction)
    name = _backend.resolve(backend, q.device, "late_interaction")
    opts = {"reduction": reduction, "mask_mode": mask_mode, "q_weights": q_weights, "d_weights": d_weights,
                "direction": direction}
    if name == "reference":
        return _reference.maxsim(q, d, q_mask, d_mask, **opts)
    s_q2d, s_d2q = _directional(q, d, q_mask, d_mask, reduction, mask_mode, q_weights, d_weights, direction,
                                _engine(name), pairs=False)
    return _combine(s_q2d, s_d2q, direction)


def maxsim_pairs(
    q: torch.Tensor,
    d: torch.Tensor,
    q_mask: torch.Tensor | None = None,
    d_mask: torch.Tensor | None = None,
    *,
    reduction: str = "sum",
    mask_mode: str = "exclude",
    q_weights: torch.Tensor | None = None,
    d_weights: torch.Tensor | None = None,
    direction: str = "q2d",
    backend: str = "auto",
) -> torch.Tensor:
    """Aligned-pair scores ``[N]``: query a against document a only (reranking, distillation).

    The same options and formulas as :func:`maxsim` with ``Nq == Nd == N``; ``O(N·Lq·Ld·D)`` work in chunked
    ``bmm``s (plain torch on every device; ``backend="reference"`` runs the naive definition).
    """
    _check_inputs(q, d, q_mask, d_mask, reduction, mask_mode, q_weights, d_weights, direction)
    if q.shape[0] != d.shape[0]:
        raise ValueError(
            f"maxsim_pairs scores query a against document a: q and d need the same number of rows, got "
            f"q {tuple(q.shape)} and d {tuple(d.shape)} (use maxsim for all pairs)"
        )
    name = _backend.resolve(backend, q.device, "late_interaction")
    if name == "reference":
        return _reference.maxsim_pairs(q, d, q_mask, d_mask, reduction=reduction, mask_mode=mask_mode,
                                       q_weights=q_weights, d_weights=d_weights, direction=direction)
    s_q2d, s_d2q = _directional(q, d, q_mask, d_mask, reduction, mask_mode, q_weights, d_weights, direction,
                                _cpu, pairs=True)
    return _combine(s_q2d, s_d2q, direction)


def late_interaction_loss(
    q: torch.Tensor,
    d: torch.Tensor,
    q_mask: torch.Tensor | None = None,
    d_mask: torch.Tensor | None = None,
    *,
    logit_scale,
    labels: torch.Tensor | None = None,
    direction: str = "q2d",
    label_smoothing: float = 0.0,
    reduction: str = "mean",
    mask_mode: str = "exclude",
    score_reduction: str | None = None,
    q_weights: torch.Tensor | None = None,
    d_weights: torch.Tensor | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Late-interaction contrastive loss (ColBERT in-batch negatives, FILIP): MaxSim scores, then cross-entropy.

    ``"q2d"``: cross-entropy over the rows of ``s·S^{q2d}`` (each query against all documents, target
    ``labels[a]``); ``"d2q"``: over the columns of ``s·S^{d2q}`` (each positive document against all queries);
    ``"both"`` (FILIP): ``½(CE_rows(s·S^{q2d}) + CE_rows(s·S^{d2q}ᵀ))``, two different score matrices from the
    same similarity tiles.  Equal to ``xloss.reference.late_interaction_loss``.

    Args:
        q, d, q_mask, d_mask, mask_mode, q_weights, d_weights, backend: as :func:`maxsim`.
        logit_scale: multiplicative scale ``s``: a float or a 0-dim tensor (gets a gradient).
        labels: ``[Nq]`` integer index of each query's positive document; default ``arange(Nq)``.
        direction: ``"q2d"``, ``"d2q"`` or ``"both"``.
        label_smoothing: ``ε`` in [0, 1], as ``F.cross_entropy``, on every term.
        reduction: ``"mean"`` (default), ``"sum"`` or ``"none"`` (per-query terms ``[Nq]``).
        score_reduction: token reduction of the scores, ``"sum"`` or ``"mean"``; default ``"sum"`` for
            ``"q2d"`` (ColBERT) and ``"mean"`` for ``"d2q"``/``"both"`` (FILIP).

    Returns:
        0-dim loss, or ``[Nq]`` per-query terms for ``reduction="none"``.
    """
    _checks.check_choice("direction", direction, DIRECTIONS)
    if score_reduction is None:
        score_reduction = "sum" if direction == "q2d" else "mean"
    _check_inputs(q, d, q_mask, d_mask, score_reduction, mask_mode, q_weights, d_weights, direction,
                  reduction_name="score_reduction")
    nq, nd = q.shape[0], d.shape[0]
    _checks.check_positives(labels, nq, nd, q.device, "q", "d", "document")
    _checks.check_label_smoothing(label_smoothing)
    _checks.check_reduction(reduction)
    scale = _checks.resolve_scale(logit_scale, None, q.device)
    name = _backend.resolve(backend, q.device, "late_interaction")
    if name == "reference":
        return _reference.late_interaction_loss(
            q, d, q_mask, d_mask, logit_scale=scale, labels=labels, direction=direction,
            label_smoothing=label_smoothing, reduction=reduction, mask_mode=mask_mode,
            score_reduction=score_reduction, q_weights=q_weights, d_weights=d_weights,
        )
    s_q2d, s_d2q = _directional(q, d, q_mask, d_mask, score_reduction, mask_mode, q_weights, d_weights,
                                direction, _engine(name), pairs=False)
    acc = (s_q2d if s_q2d is not None else s_d2q).dtype
    terms = cross_entropy_terms(s_q2d, s_d2q, scale.to(acc) if not scale.requires_grad else scale,
                                None if labels is None else labels.long(), direction, float(label_smoothing))
    return reduce_terms(terms, reduction)


from . import ops as _ops  # last: it registers the custom ops, which run the functions above

__all__ = ["MaxSimFunction", "late_interaction_loss", "maxsim", "maxsim_pairs"]
