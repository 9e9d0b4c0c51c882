"""Memory-efficient late interaction (MaxSim, SPEC.md §3): ColBERT / FILIP / HBI-WTI scores and losses.

Layout (op → Function → function, as the other families):

* ``engine.py``   the engine interface (``MaxSimEngine``): a forward sweep ``maxsim_fwd`` (scores of both
  directions from the same similarity tiles, with the arg-max indices and maxima of every token) and a gradient
  sweep ``maxsim_bwd`` (routes the gradients through those indices); implemented by ``chunked.py`` (tiles in
  PyTorch, any device; on CPU the compiled MaxSim micro-kernel ``xloss::maxsim_q2d`` when built) and
  ``triton.py`` (fused kernels).  Both also have the aligned-pair sweeps (``MaxSimPairsEngine``).
  ``backward.py`` is the torch routing both engines share (the Triton engine with its own ``route`` kernels).
* ``ops.py``      each sweep as a ``torch.library`` custom op (``xloss::maxsim_forward``,
  ``xloss::maxsim_backward``);
* here            :class:`MaxSimOptions`, the one autograd Function :class:`MaxSimFunction` (for ``maxsim``,
  ``maxsim_pairs`` and ``late_interaction_loss``, in eager mode and under ``torch.compile`` alike) and the
  public functions.

The public functions check their arguments, fold masks, the mean normalisation and user token weights into
per-token weights (torch ops, so that the weights get their gradients through them), pick an engine with one
call to ``xloss._dispatch.resolve`` and run :class:`MaxSimFunction`.  Saved for backward: the inputs, the
weights and the ``[Nq, Nd, L]`` indices (maxima only when the weights need a gradient); the
``[Nq, Nd, Lq, Ld]`` similarity tensor never exists.  The loss builds the small ``[Nq, Nd]`` score matrices
and applies ``F.cross_entropy`` to them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .. import _checks, _comm, _dispatch
from .. import reference as _reference
from .._api import renamed
from .._autograd import first_order_only
from .._reduce import reduce_terms
from .._tiling import accumulation_dtype
from ..reference.late_interaction import cross_entropy_terms, token_weights, zero_padding
from . import ops as _ops

FAMILY = "late_interaction"
TOKEN_REDUCTIONS = ("sum", "mean")
REDUCTIONS = TOKEN_REDUCTIONS  # the old name (token reductions), kept for imports
MASK_MODES = ("exclude", "zero")
DIRECTIONS = ("q2d", "d2q", "both")


@dataclass(frozen=True)
class MaxSimOptions:
    """Every non-tensor option of one :class:`MaxSimFunction` call (hashable: a constant for ``torch.compile``)."""

    zero_mode: bool = False  # mask_mode="zero": invalid tokens score 0 and still compete
    q2d: bool = True  # compute the query→document scores
    d2q: bool = False  # compute the document→query scores
    engine: str = "chunked"  # "chunked" | "triton" (see xloss._dispatch)
    pairs: bool = False  # query a against document a only: ``[N]`` scores
    group: int = 1  # pairs: query a against documents a·group … a·group + group - 1 (maxsim_grouped; q2d only)
    need_aux: bool = True  # the engine returns the arg-max indices and maxima (False: nothing is saved)
    q_masked: bool = True  # q_mask was given: masked-out query tokens may hold anything (NaN, inf)
    d_masked: bool = True  # likewise d_mask


class MaxSimFunction(torch.autograd.Function):
    """``(S^{q2d}, S^{d2q})`` ``[Nq, Nd]`` (``[N]`` for pairs) through the ops of ``ops.py``; an empty tensor for a
    direction not asked.  The one autograd Function of the family.

    Forward args: ``q [Nq, Lq, D]``, ``d [Nd, Ld, D]``, ``q_w [Nq, Lq]``, ``d_w [Nd, Ld]`` or None (final
    per-token weights in the accumulation dtype), ``q_valid``, ``d_valid`` (bool), ``options``
    (:class:`MaxSimOptions`; ``need_aux`` False under ``no_grad`` or without inputs requiring grad: nothing is
    saved, no indices are searched), ``comm`` (None; or an ``xloss._comm.GroupComm``: this rank's queries
    against every rank's documents passed round the ring, q2d, ``S [n_r, M]``: ``ranks.ring_forward``).
    """

    @staticmethod
    def forward(ctx, q, d, q_w, d_w, q_valid, d_valid, options: MaxSimOptions, comm=None):
        o = options
        ctx.set_materialize_grads(False)
        ctx.options = o
        if comm is not None:  # across ranks, the documents passed round the ring (q2d): ranks.ring_forward
            from .ranks import ring_forward

            s = ring_forward(ctx, q, d, q_w, q_valid, d_valid, comm, o)
            empty = s.new_empty(0)
            ctx.mark_non_differentiable(empty)
            return s, empty
        s_q2d, s_d2q, idx_q2d, val_q2d, idx_d2q, val_d2q = _ops.forward(
            q, d, q_w, d_w, q_valid, d_valid, o.zero_mode, o.q2d, o.d2q, o.engine, o.pairs, o.need_aux,
            o.q_masked, o.d_masked, o.group,
        )
        if o.need_aux:
            # The max values are needed only for the weights' gradients.
            val_q2d = val_q2d if (o.q2d and ctx.needs_input_grad[2]) else None
            val_d2q = val_d2q if (o.d2q and ctx.needs_input_grad[3]) else None
            ctx.save_for_backward(q, d, q_w, d_w, q_valid, d_valid, idx_q2d, val_q2d, idx_d2q, val_d2q)
        ctx.mark_non_differentiable(*[t for t, on in ((s_q2d, o.q2d), (s_d2q, o.d2q)) if not on])
        return s_q2d, s_d2q

    @staticmethod
    @first_order_only("maxsim / late_interaction_loss")
    def backward(ctx, g_q2d, g_d2q):
        o = ctx.options
        if getattr(ctx, "comm", None) is not None:
            from .ranks import ring_backward

            dq, dd, dq_w = ring_backward(ctx, g_q2d)
            return dq, dd, dq_w, None, None, None, None, None
        q, d, q_w, d_w, q_valid, d_valid, idx_q2d, val_q2d, idx_d2q, val_d2q = ctx.saved_tensors
        # The padding contract: the routing's products (a sparse matrix times the token rows) would carry
        # 0·NaN from masked-out embeddings into valid tokens' gradients, so they are zeros here.  Only here:
        # no forward reads them into a result, and nothing is copied before a backward needs it.
        # (The aligned-pair backward gathers winners only and guards its products with where: no copies.)
        q = zero_padding(q, q_valid) if o.q_masked and not o.pairs else q
        d = zero_padding(d, d_valid) if o.d_masked and not o.pairs else d
        grads = _ops.backward(g_q2d if o.q2d else None, g_d2q if o.d2q else None, q, d, q_w, d_w, q_valid, d_valid,
                              idx_q2d, val_q2d, idx_d2q, val_d2q, o.zero_mode, o.q2d, o.d2q, o.engine, o.pairs,
                              ctx.needs_input_grad[:4], o.group)
        return (*grads, None, None, None, None)


def _token_mask(name: str, mask, x: torch.Tensor, of: str):
    """A token mask as bool (None stays None).  Bool, or 0/1 of any integer or floating-point dtype (PyLate
    passes float and int64 masks), converted with ``!= 0``; any other value is refused by a value check that
    is a device-side assert on CUDA (no host sync), a ValueError on the CPU."""
    if mask is None:
        return None
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape {tuple(x.shape[:2])} (bool, or 0/1 of an integer "
                        f"or floating-point dtype; True = valid token) or None, got {type(mask).__name__}")
    if mask.dtype.is_complex:
        raise TypeError(f"{name} must be bool, or 0/1 of an integer or floating-point dtype, got {mask.dtype}")
    valid = mask if mask.dtype == torch.bool else mask != 0
    _checks.check_token_mask(name, valid, tuple(x.shape[:2]), x.device, of)
    if mask.dtype != torch.bool:
        _checks._value_check(((mask == 0) | (mask == 1)).all(),
                             f"{name} must hold only 0 and 1 (1 = valid token) when it is not bool")
    return valid


def _batch_of_one(q, q_mask, q_weights):
    """A single query ``[Lq, D]`` (flash-maxsim's ``flash_maxsim(Q, D)`` takes one) as a batch of one, with its
    ``[Lq]`` mask and weights; ``(q, q_mask, q_weights, single)``, unchanged unless q is 2-D."""
    if not (isinstance(q, torch.Tensor) and q.dim() == 2):
        return q, q_mask, q_weights, False

    def lift(t):
        return t.unsqueeze(0) if isinstance(t, torch.Tensor) and t.dim() == 1 else t

    return q.unsqueeze(0), lift(q_mask), lift(q_weights), True


def _check_inputs(q, d, q_mask, d_mask, token_reduction, mask_mode, q_weights, d_weights, direction):
    """Check every argument; returns the masks as bool (None where not given)."""
    if isinstance(d, torch.Tensor) and d.dim() == 2:
        raise ValueError(f"d must be 3-D [Nd, Ld, D], got shape {tuple(d.shape)}: pass one document as d[None] "
                         "(a 2-D d is not read as packed tokens, as flash-maxsim's packed layout is)")
    _checks.check_float_tensor("q", q, ndim=3)
    _checks.check_float_tensor("d", d, ndim=3)
    _checks.check_same_dtype_device(q=q, d=d)
    if q.shape[2] != d.shape[2]:
        raise ValueError(
            f"q and d must have the same feature dimension D (last dim), got q {tuple(q.shape)} and d {tuple(d.shape)}"
        )
    q_mask = _token_mask("q_mask", q_mask, q, "q")
    d_mask = _token_mask("d_mask", d_mask, d, "d")
    if q_weights is not None:
        _checks.check_token_weights("q_weights", q_weights, tuple(q.shape[:2]), q.device, "q")
    if d_weights is not None:
        _checks.check_token_weights("d_weights", d_weights, tuple(d.shape[:2]), d.device, "d")
    _checks.check_choice("token_reduction", token_reduction, TOKEN_REDUCTIONS)
    _checks.check_choice("mask_mode", mask_mode, MASK_MODES)
    _checks.check_choice("direction", direction, DIRECTIONS)
    if direction == "q2d" and d_weights is not None:
        raise ValueError("d_weights weight the document→query sum: use direction='d2q' or 'both', or drop them")
    if direction == "d2q" and q_weights is not None:
        raise ValueError("q_weights weight the query→document sum: use direction='q2d' or 'both', or drop them")
    return q_mask, d_mask


def _check_scale_device(device: torch.device, **scales) -> None:
    """A meta scale holds no value: it cannot scale real inputs (copying it raises a message that names
    nothing), so refuse it by name.  Meta inputs with a meta scale propagate shapes as usual."""
    for name, value in scales.items():
        if isinstance(value, torch.Tensor) and value.device.type == "meta" and device.type != "meta":
            raise ValueError(f"{name} is a meta tensor (it holds no value) but q is on {device}: pass a float or "
                             f"a tensor on {device}")


def _directional(q, d, q_mask, d_mask, token_reduction, mask_mode, q_weights, d_weights, direction, engine: str,
                 pairs: bool, group: int = 1):
    """``(S^{q2d}, S^{d2q})``, None for a direction not asked, through :class:`MaxSimFunction` (``group``: see
    :class:`MaxSimOptions`)."""
    acc = accumulation_dtype(q.dtype)
    q2d, d2q = direction in ("q2d", "both"), direction in ("d2q", "both")
    q_valid = torch.ones(q.shape[:2], dtype=torch.bool, device=q.device) if q_mask is None else q_mask
    d_valid = torch.ones(d.shape[:2], dtype=torch.bool, device=d.device) if d_mask is None else d_mask
    q_w = token_weights(q_valid, q_weights if q2d else None, token_reduction, acc)
    d_w = token_weights(d_valid, d_weights, token_reduction, acc) if d2q else None
    need_aux = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (q, d, q_w, d_w))
    options = MaxSimOptions(mask_mode == "zero", q2d, d2q, engine, pairs, group, need_aux, q_mask is not None,
                            d_mask is not None)
    s_q2d, s_d2q = MaxSimFunction.apply(q, d, q_w, d_w, q_valid, d_valid, options)
    return (s_q2d if q2d else None), (s_d2q if d2q else None)


def _combine(s_q2d, s_d2q, direction):
    if direction == "q2d":
        return s_q2d
    if direction == "d2q":
        return s_d2q
    return (s_q2d + s_d2q) / 2


@renamed(reduction="token_reduction")
def maxsim(
    q: torch.Tensor,
    d: torch.Tensor,
    q_mask: torch.Tensor | None = None,
    d_mask: torch.Tensor | None = None,
    *,
    token_reduction: str = "sum",
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
        q: ``[Nq, Lq, D]`` query tokens, float32/float16/bfloat16/float64; or one query ``[Lq, D]`` (as
            flash-maxsim's ``flash_maxsim(Q, D)``), scored as a batch of one: the result is then ``[Nd]``.
        d: ``[Nd, Ld, D]`` document tokens, same dtype and device (one document: ``d[None]``).
        q_mask, d_mask: ``[Nq, Lq]``, ``[Nd, Ld]`` (``[Lq]`` for a 2-D q), True or 1 = valid token; bool, or
            0/1 of any integer or floating-point dtype (PyLate's float masks); None = all valid.  Masked-out
            tokens never influence anything, whatever their embeddings and weights hold (NaN, inf): they are
            replaced by zeros, add exactly 0 to their side's sum and get zero gradients; on the other side
            they never win (``"exclude"``) or score exactly 0 (``"zero"``).  Between valid tokens NaN and inf
            propagate as in the definition (the reference), on every engine.
        token_reduction: ``"sum"`` over valid tokens (ColBERT) or ``"mean"`` (FILIP).  With weights,
            ``"mean"`` divides the weighted sum by the number of valid tokens: ``Σ_t w_t·max / |valid|``.
            (``reduction=`` is its deprecated old name, accepted for one release with a DeprecationWarning.)
        mask_mode: ``"exclude"`` (invalid tokens never win a max) or ``"zero"`` (invalid tokens score 0 and
            still compete: PyLate's ``colbert_scores``).  A token with no valid token on the other side
            scores 0 and gets no gradient.
        q_weights: ``[Nq, Lq]`` float weights of the query→document sum (``"q2d"``/``"both"``), used as given
            (times the mask); they get a gradient.
        d_weights: ``[Nd, Ld]`` float weights of the document→query sum (``"d2q"``/``"both"``).
        direction: ``"q2d"``, ``"d2q"`` or ``"both"``.
        backend: ``"auto"`` (Triton on CUDA, chunked PyTorch elsewhere), ``"triton"``, ``"chunked"`` (alias
            ``"cpu"``; runs on any device) or ``"reference"`` (the naive definition).

    Returns:
        ``[Nq, Nd]`` scores (``[Nd]`` for a 2-D q), float32 for half inputs, float64 for float64 inputs.  Ties
        in a max go to the lowest index (``torch.max``; a NaN similarity is the max), and so does the gradient.
    """
    q, q_mask, q_weights, single = _batch_of_one(q, q_mask, q_weights)
    q_mask, d_mask = _check_inputs(q, d, q_mask, d_mask, token_reduction, mask_mode, q_weights, d_weights,
                                   direction)
    name = _dispatch.resolve(FAMILY, backend, q.device, q.dtype, local=True, cells=_cells(q, d))
    if name in ("reference", "dense"):
        dq, dd, dqw, ddw = _dispatch.dense_inputs(name, q, d, q_weights, d_weights)
        s = _reference.maxsim(dq, dd, q_mask, d_mask, token_reduction=token_reduction, mask_mode=mask_mode,
                              q_weights=dqw, d_weights=ddw, direction=direction
                              ).to(accumulation_dtype(q.dtype))  # float32 for half inputs, as the engines
    else:
        s_q2d, s_d2q = _directional(q, d, q_mask, d_mask, token_reduction, mask_mode, q_weights, d_weights,
                                    direction, name, pairs=False)
        s = _combine(s_q2d, s_d2q, direction)
    return s[0] if single else s


def _cells(q: torch.Tensor, d: torch.Tensor) -> int:
    """Entries of the ``[Nq, Nd, Lq, Ld]`` similarity tensor the definition builds (what "dense" would hold)."""
    return q.shape[0] * q.shape[1] * d.shape[0] * d.shape[1]


@renamed(reduction="token_reduction")
def maxsim_pairs(
    q: torch.Tensor,
    d: torch.Tensor,
    q_mask: torch.Tensor | None = None,
    d_mask: torch.Tensor | None = None,
    *,
    token_reduction: str = "sum",
    mask_mode: str = "exclude",
    q_weights: torch.Tensor | None = None,
    d_weights: torch.Tensor | None = None,
    direction: str = "q2d",
    backend: str = "auto",
) -> torch.Tensor:
    """Aligned-pair scores ``[N]``: query a against document a only (reranking, distillation).

    The same options, formulas and padding contract as :func:`maxsim` with ``Nq == Nd == N`` (q and d 3-D);
    ``O(N·Lq·Ld·D)`` work: one Triton launch on CUDA (each program one query and its own document), chunked
    ``bmm``s (or the compiled CPU op) elsewhere; ``"dense"``, which "auto" takes for small problems, and
    ``"reference"`` run the definition.
    """
    q_mask, d_mask = _check_inputs(q, d, q_mask, d_mask, token_reduction, mask_mode, q_weights, d_weights,
                                   direction)
    if q.shape[0] != d.shape[0]:
        raise ValueError(
            f"maxsim_pairs scores query a against document a: q and d need the same number of rows, got "
            f"q {tuple(q.shape)} and d {tuple(d.shape)} (use maxsim for all pairs)"
        )
    name = _dispatch.resolve(FAMILY, backend, q.device, q.dtype, local=True,
                             cells=q.shape[0] * q.shape[1] * d.shape[1])  # the [N, Lq, Ld] "dense" would hold
    if name in ("reference", "dense"):  # "dense" (auto for small problems): the definition, twice differentiable
        dq, dd, dqw, ddw = _dispatch.dense_inputs(name, q, d, q_weights, d_weights)
        return _reference.maxsim_pairs(dq, dd, q_mask, d_mask, token_reduction=token_reduction, mask_mode=mask_mode,
                                       q_weights=dqw, d_weights=ddw, direction=direction
                                       ).to(accumulation_dtype(q.dtype))
    s_q2d, s_d2q = _directional(q, d, q_mask, d_mask, token_reduction, mask_mode, q_weights, d_weights, direction,
                                name, pairs=True)
    return _combine(s_q2d, s_d2q, direction)


@renamed(score_reduction="token_reduction")
def late_interaction_loss(
    q: torch.Tensor,
    d: torch.Tensor,
    q_mask: torch.Tensor | None = None,
    d_mask: torch.Tensor | None = None,
    *,
    logit_scale=None,
    temperature=None,
    labels: torch.Tensor | None = None,
    direction: str = "q2d",
    mask_mode: str = "exclude",
    token_reduction: str | None = None,
    q_weights: torch.Tensor | None = None,
    d_weights: torch.Tensor | None = None,
    label_smoothing: float = 0.0,
    reduction: str = "mean",
    backend: str = "auto",
    group=None,
    exchange: str = "all_gather",
    grad_reduction: str = "mean",
) -> torch.Tensor:
    """Late-interaction contrastive loss (ColBERT in-batch negatives, FILIP): MaxSim scores, then cross-entropy.

    ``"q2d"``: cross-entropy over the rows of ``s·S^{q2d}`` (each query against all documents, target
    ``labels[a]``); ``"d2q"``: over the columns of ``s·S^{d2q}`` (each positive document against all queries);
    ``"both"`` (FILIP): ``½(CE_rows(s·S^{q2d}) + CE_rows(s·S^{d2q}ᵀ))``, two different score matrices from the
    same similarity tiles.  Equal to ``xloss.reference.late_interaction_loss``.

    Args:
        q, d, q_mask, d_mask, mask_mode, q_weights, d_weights, backend: as :func:`maxsim` (a 2-D q is a batch
            of one query; masks bool or 0/1; masked-out tokens never influence anything).
        logit_scale: multiplicative scale ``s``: a float or a 0-dim tensor (gets a gradient).  ColBERT uses 1.
            A meta tensor only goes with meta inputs (ValueError naming it otherwise).
        temperature: ``τ``, the same as ``logit_scale=1/τ``; give exactly one of the two.
        labels: ``[Nq]`` integer index of each query's positive document; default ``arange(Nq)``.
        direction: ``"q2d"``, ``"d2q"`` or ``"both"``.
        token_reduction: token reduction of the scores, ``"sum"`` or ``"mean"``; default ``"sum"`` for
            ``"q2d"`` (ColBERT) and ``"mean"`` for ``"d2q"``/``"both"`` (FILIP).  (``score_reduction=`` is its
            deprecated old name, accepted for one release with a DeprecationWarning.)
        label_smoothing: ``ε`` in [0, 1], as ``F.cross_entropy``, on every term.
        reduction: the loss reduction: ``"mean"`` (default), ``"sum"`` or ``"none"`` (per-query terms ``[Nq]``).
        group: a ``torch.distributed`` ProcessGroup: ``q``/``d`` (masks, weights) are this rank's rows of a batch
            spread over the group (row counts and token counts may differ across ranks); every rank's queries see
            every rank's documents as negatives.  ``labels`` are then GLOBAL document indices (default: local
            query i ↔ global document ``offset_r + i``); the value is the loss of the whole batch, the same on
            every rank (``"none"``: this rank's ``[n_r]`` terms).  Equal to the single-process loss on the
            concatenated batch (padded to the longest token count with masked-out tokens).  See
            ``xloss/late_interaction/ranks.py`` and ``xloss.distributed``.
        exchange: ``"all_gather"`` (default: the documents' tokens are gathered once per call, and for
            ``"d2q"``/``"both"`` the queries' too) or ``"ring"`` (blocks pass round the ring, overlapped with the
            scoring, so a rank holds two blocks instead of all of them: the documents for ``"q2d"``, the queries
            for ``"d2q"``, both in turn for ``"both"``; the backward sends them round again with their gradient
            accumulators).
        grad_reduction: ``"mean"`` (default: gradients scaled by the world size, for DDP's / FSDP's average) or
            ``"sum"`` (exact shares), as ``xloss.info_nce``.

    Returns:
        0-dim loss, or ``[Nq]`` per-query terms for ``reduction="none"``.
    """
    _checks.check_choice("direction", direction, DIRECTIONS)
    if token_reduction is None:
        token_reduction = "sum" if direction == "q2d" else "mean"
    q, q_mask, q_weights, _ = _batch_of_one(q, q_mask, q_weights)
    q_mask, d_mask = _check_inputs(q, d, q_mask, d_mask, token_reduction, mask_mode, q_weights, d_weights,
                                   direction)
    nq, nd = q.shape[0], d.shape[0]
    across_ranks = group is not None and _comm.world_size(group) > 1
    if not across_ranks:  # across ranks labels are global: the metadata exchange checks them on every rank
        _checks.check_positives(labels, nq, nd, q.device, "q", "d", "document")
    _checks.check_label_smoothing(label_smoothing)
    _checks.check_reduction(reduction)
    if logit_scale is None and temperature is None:
        raise TypeError("late_interaction_loss() needs a scale: pass logit_scale= (ColBERT uses 1.0) or "
                        "temperature= (logit_scale = 1/temperature)")
    _check_scale_device(q.device, logit_scale=logit_scale, temperature=temperature)
    scale = _checks.resolve_scale(logit_scale, temperature, q.device)
    name = _dispatch.resolve(FAMILY, backend, q.device, q.dtype, local=not across_ranks, cells=_cells(q, d))
    if across_ranks:
        from .ranks import loss_across_ranks

        return loss_across_ranks(q, d, q_mask, d_mask, q_weights, d_weights, scale=scale, labels=labels,
                                 direction=direction, mask_mode=mask_mode, token_reduction=token_reduction,
                                 label_smoothing=float(label_smoothing), reduction=reduction, engine=name,
                                 group=group, exchange=exchange, grad_reduction=grad_reduction)
    if name in ("reference", "dense"):
        # int64 labels (a uint8 tensor would index as a mask) and a float32 result for half inputs, as the engines
        dq, dd, dqw, ddw = _dispatch.dense_inputs(name, q, d, q_weights, d_weights)
        return _reference.late_interaction_loss(
            dq, dd, q_mask, d_mask, logit_scale=scale, labels=None if labels is None else labels.long(),
            direction=direction, mask_mode=mask_mode, token_reduction=token_reduction, q_weights=dqw,
            d_weights=ddw, label_smoothing=label_smoothing, reduction=reduction,
        ).to(accumulation_dtype(q.dtype))
    s_q2d, s_d2q = _directional(q, d, q_mask, d_mask, token_reduction, mask_mode, q_weights, d_weights,
                                direction, name, pairs=False)
    acc = (s_q2d if s_q2d is not None else s_d2q).dtype
    terms = cross_entropy_terms(s_q2d, s_d2q, scale.to(acc) if not scale.requires_grad else scale,
                                None if labels is None else labels.long(), direction, float(label_smoothing))
    return reduce_terms(terms, reduction)


# The training layouts (issue 14), after the functions they build on.
from .grouped import late_interaction_distill_loss, maxsim_grouped

__all__ = ["DIRECTIONS", "MASK_MODES", "TOKEN_REDUCTIONS", "MaxSimFunction", "MaxSimOptions",
           "late_interaction_distill_loss", "late_interaction_loss", "maxsim", "maxsim_grouped", "maxsim_pairs"]
