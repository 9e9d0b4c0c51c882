"""GRAM: Gram-volume similarity and contrastive loss for k ≥ 2 modalities (SPEC.md §4): the whole family.

Layout (op → Function → function):

* ``engine.py``   the engine interface (:class:`~xloss.gram.engine.GramEngine`): a volume sweep and its
  gradient sweep, a loss-statistics sweep and its gradient sweep; implemented by ``chunked.py`` (Schur
  complement / adjugate form, GEMM tiles, no ``[N1, N2, k, k]`` tensor and no batched det; any device, and
  float64) and ``triton.py`` (fused kernels, fp32/fp16/bf16);
* ``ops.py``      each sweep as a ``torch.library`` custom op (``xloss::gram_volume``, ``xloss::gram_volume_grad``,
  ``xloss::gram_loss_stats``, ``xloss::gram_loss_grad``);
* here            :class:`GramOptions`, the one autograd Function :class:`GramFunction` (for ``gram_volume``
  and ``gram_loss`` alike, in eager mode and under ``torch.compile``) and the public functions.

``backend="auto"`` takes the Triton engine for CUDA tensors (not float64) and the chunked engine otherwise
(``xloss._dispatch``).  For the loss, the chunked engine keeps the signed ``det G [N1, N2]`` from forward; the
Triton engine keeps only the inputs and the O(N) statistics and recomputes the tiles in backward.  Everything
else (the positive terms, label smoothing, the reduction, the weights of the gradient) is O(N) and lives in
the Function, once.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass

import torch

from .. import _checks, _dispatch
from .._autograd import first_order_only
from .._reduce import reduce_terms
from .._tiling import accumulation_dtype, upcast
from ..reference import gram as _reference
from . import chunked as _chunked
from . import ops

OUTPUTS = ("volume", "loss")


@dataclass(frozen=True)
class GramOptions:
    """Every non-tensor option of one call (hashable: a constant for ``torch.compile``).

    ``output`` says what :class:`GramFunction` returns: ``"volume"`` (``V [N1, N2]``, ``gram_volume``) or
    ``"loss"`` (``gram_loss``; the other fields are the loss's options).
    """

    output: str = "loss"
    eps: float = 0.0
    engine: str = "chunked"  # "chunked" | "triton" (see xloss._dispatch)
    label_smoothing: float = 0.1
    stopgrad_gathered: bool = False
    reduction: str = "mean"


class GramFunction(torch.autograd.Function):
    """The one autograd Function of GRAM: the pairwise volumes or the loss, per ``options.output``.

    Forward args: ``options`` (:class:`GramOptions`), ``scale`` (0-dim ``1/τ``; None for the volume),
    ``labels [N1]`` (long, each anchor's positive sample in ``[0, N2)``; None for the volume), ``anchor
    [N1, D]``, then the ``others`` ``[N2, D]``.  The sweeps run through the custom ops of ``ops.py``.

    Loss: ``Z = −s·V``; ``row_i = CE(Z_i, labels[i])`` and ``col_i = CE(Z[:, labels[i]], i)`` with label
    smoothing ε, ``ℓ_i = ½(row_i + col_i)``.  Backward weights row i's and column ``labels[i]``'s softmax by
    ``w_i = ½·d loss/d ℓ_i`` (column j's by ``Σ_{i: labels[i] = j} w_i``) and hands them to the gradient sweep.
    """

    @staticmethod
    def forward(ctx, options: GramOptions, scale, labels, anchor, *others):
        ctx.options = options
        others = list(others)
        if options.output == "volume":
            v, det = ops.gram_volume(anchor, others, options.eps, options.engine)
            ctx.save_for_backward(anchor, det, *others)
            return v
        s = scale.detach().to(accumulation_dtype(anchor.dtype))
        lse_r, lse_c, mean_r, mean_c, v_pos, det = ops.gram_loss_stats(anchor, others, s, labels, options.eps,
                                                                       options.engine)
        ls = options.label_smoothing
        zd = -s * v_pos  # the positive logits
        rows = lse_r - (1 - ls) * zd
        cols = lse_c[labels] - (1 - ls) * zd
        if ls:
            rows = rows + ls * s * mean_r  # − ε·mean_j z_ij, z = −sV
            cols = cols + ls * s * mean_c[labels]
        terms = (rows + cols) / 2
        ctx.save_for_backward(scale, labels, anchor, det, lse_r, lse_c, *others)
        return reduce_terms(terms, options.reduction)

    @staticmethod
    @first_order_only("gram_volume / gram_loss")
    def backward(ctx, grad_out):
        options, needs = ctx.options, ctx.needs_input_grad
        need_a, need_x = needs[3], any(needs[4:])
        if options.output == "volume":
            anchor, det, *others = ctx.saved_tensors
            if not (need_a or need_x):
                return (None,) * (4 + len(others))  # pragma: no cover (autograd calls backward only when needed)
            ga, gx = ops.gram_volume_grad(grad_out, anchor, others, det, options.eps, need_a, need_x, options.engine)
            return (None, None, None, *_cast(ga, gx, anchor, others, needs))
        scale, labels, anchor, det, lse_r, lse_c, *others = ctx.saved_tensors
        need_s = needs[1]
        if not (need_s or need_a or need_x):
            return (None,) * (4 + len(others))  # pragma: no cover
        acc = lse_r.dtype
        n1, n2 = anchor.shape[0], others[0].shape[0]
        g = grad_out.to(acc)
        w = ((g / n1) if options.reduction == "mean" else g).expand(n1) / 2  # row i's and column y_i's CE weight
        w_c = torch.zeros(n2, dtype=acc, device=w.device).index_add_(0, labels, w)  # column j's softmax weight
        s = scale.detach().to(acc)
        ga, gx, ds = ops.gram_loss_grad(anchor, others, s, det, lse_r, lse_c, w, w_c, labels,
                                        options.label_smoothing, options.stopgrad_gathered, options.eps, need_a,
                                        need_x, need_s, options.engine)
        grad_scale = ds.to(scale.dtype) if need_s else None
        return (None, grad_scale, None, *_cast(ga, gx, anchor, others, needs))


def _cast(ga, gx, anchor, others, needs):
    """The op's gradients (accumulation dtype) in the inputs' dtypes, None where not needed."""
    ga = ga.to(anchor.dtype) if needs[3] else None
    return [ga] + [g.to(x.dtype) if need else None for g, x, need in zip(gx, others, needs[4:])]


def _split(modalities, what: str):
    """``(anchor, others)`` from the varargs: the first tensor is the anchor."""
    if not modalities:
        raise ValueError(f"{what} needs at least 2 modalities: the anchor and one or more other tensors, got none")
    return modalities[0], modalities[1:]


def _check_modalities(anchor, others, same_rows: bool, what: str) -> None:
    _checks.check_float_tensor("anchor", anchor, ndim=2)
    if len(others) < 1:
        raise ValueError(f"{what} needs at least 2 modalities: the anchor and one or more other tensors, got only "
                         "the anchor")
    if len(others) > _chunked.MAX_OTHERS:
        raise ValueError(f"{what} supports k = 2..{_chunked.MAX_OTHERS + 1} modalities, got k = {len(others) + 1}")
    if (_checks.matrices_ok(others, same_shape=True) and others[0].dtype == anchor.dtype
            and others[0].device == anchor.device and others[0].shape[1] == anchor.shape[1]
            and (not same_rows or others[0].shape[0] == anchor.shape[0])):
        return  # valid (the common case, in one test); else the checks below name what is wrong
    for m, x in enumerate(others):
        _checks.check_float_tensor(f"others[{m}]", x, ndim=2)
        _checks.check_same_dtype_device(anchor=anchor, **{f"others[{m}]": x})
        if x.shape != others[0].shape:
            raise ValueError(
                f"others[{m}] must have the shape of others[0] {tuple(others[0].shape)}, got {tuple(x.shape)}"
            )
    if anchor.shape[1] != others[0].shape[1]:
        raise ValueError(
            f"anchor and others must have the same feature dimension D, got anchor {tuple(anchor.shape)} and "
            f"others[0] {tuple(others[0].shape)}"
        )
    if same_rows and anchor.shape[0] != others[0].shape[0]:
        raise ValueError(
            f"anchor and others must have the same number of rows N here (sample i of each modality is a positive"
            f"{_LABELS_HINT if what == 'gram_loss' else ''}), got anchor {tuple(anchor.shape)} and others[0] {tuple(others[0].shape)}"
        )


_LABELS_HINT = "; pass labels to say which sample is each anchor's positive"


def _check_eps(eps) -> float:
    if isinstance(eps, bool) or not isinstance(eps, numbers.Real):
        raise TypeError(f"eps must be a float >= 0, got {type(eps).__name__}")
    if not float(eps) >= 0:
        raise ValueError(f"eps must be >= 0, got {eps}")
    return float(eps)


def _engine(backend: str, anchor: torch.Tensor, others: list[torch.Tensor]) -> str:
    """The engine name for ``backend``: one call to ``_dispatch.resolve``.  "auto" through ``XLOSS_BACKEND``
    (e.g. ``XLOSS_BACKEND=triton``) keeps what "auto" takes (dense or chunked) for a dtype the kernels refuse;
    an explicit ``backend="triton"`` with float64 raises ``triton.UnsupportedDtypeError`` (a TypeError)."""
    k = 1 + len(others)  # cells: the [N1, N2, k, k] Gram tensor of the definition
    return _dispatch.resolve("gram", backend, anchor.device, anchor.dtype, local=True,
                             cells=anchor.shape[0] * others[0].shape[0] * k * k)


def gram_volume(*modalities: torch.Tensor, pairwise: bool = True, eps: float = 0.0,
                backend: str = "auto") -> torch.Tensor:
    """Gram volumes ``V_ij = sqrt(|det G_ij| + eps)`` without the ``[N1, N2, k, k]`` Gram tensor.

    ``G_ij`` is the k×k Gram matrix of ``(a_i, X¹_j, …, X^{k−1}_j)``; equal to ``xloss.reference.gram_volume``
    (the authors' ``sqrt(abs(det))`` when ``eps=0``).

    Args:
        modalities: the anchor ``[N1, D]`` (float32/float16/bfloat16/float64), then 1 to 4 tensors ``[N2, D]``
            (k = 2..5), same dtype and device.
        pairwise: True: ``[N1, N2]``; False (``N1 == N2``): the aligned volumes ``V_ii``, ``[N]``.
        eps: ``>= 0``, added to ``|det G|`` under the square root; ``eps > 0`` keeps gradients finite at
            degenerate (zero-volume) inputs.
        backend: ``"auto"`` (Triton on CUDA, chunked PyTorch elsewhere and for float64), ``"triton"``,
            ``"chunked"`` (alias ``"cpu"``; tiled PyTorch, any device) or ``"reference"`` (the det-based
            definition).

    Returns:
        float32 for half inputs, float64 for float64 inputs.
    """
    anchor, others = _split(modalities, "gram_volume")
    _check_modalities(anchor, others, same_rows=not pairwise, what="gram_volume")
    if not isinstance(pairwise, bool):
        raise TypeError(f"pairwise must be a bool, got {type(pairwise).__name__}")
    eps = _check_eps(eps)
    name = _engine(backend, anchor, others)
    if name in ("reference", "dense"):
        return _reference.gram_volume(*_dispatch.dense_inputs(name, anchor, *others), pairwise=pairwise, eps=eps
                                      ).to(accumulation_dtype(anchor.dtype))
    if not pairwise:  # O(N·p²·D) row-wise products: plain PyTorch (and autograd) for every backend
        return _chunked.aligned_volume(upcast(anchor), [upcast(x) for x in others], eps)
    inputs = _checks.distinct_inputs([anchor, *others])
    return GramFunction.apply(GramOptions("volume", eps, name), None, None, *inputs)


def gram_loss(*modalities: torch.Tensor, logit_scale=None, temperature=None, labels: torch.Tensor | None = None,
              label_smoothing: float = 0.1, stopgrad_gathered: bool = False, eps: float = 0.0,
              reduction: str = "mean", backend: str = "auto") -> torch.Tensor:
    """GRAM contrastive loss ``½[CE(−V/τ, labels) + CE(−Vᵀ/τ, ·)]`` (authors' ``forward_ret``).

    Equal to ``xloss.reference.gram_loss``; memory O(N1·N2 + tile) (chunked) or O(N) (Triton) instead of the
    reference's ``[N1, N2, k, k]``.  With ``Z = −s·V``: row term ``CE(Z_i, labels[i])`` (softmax over the N2
    samples), column term ``CE(Z[:, labels[i]], i)`` (softmax over the N1 anchors), ``ℓ_i`` their mean.

    Args:
        modalities: the anchor ``[N1, D]``, then 1 to 4 tensors ``[N2, D]`` (k = 2..5), same dtype and device;
            ``N1 == N2`` unless ``labels`` is given.
        logit_scale: ``s = 1/τ``, a float or a 0-dim tensor (gets a gradient).
        temperature: ``τ > 0``, a float or a 0-dim tensor (gets a gradient; the authors learn it, init 0.07).
            Give one of ``logit_scale`` and ``temperature`` (there is no default scale).
        labels: ``[N1]`` integer index of each anchor's positive sample (a row of the others), in ``[0, N2)``;
            default ``arange(N1)`` (sample i of every modality is a positive).  Duplicates are allowed.
        label_smoothing: ``ε`` in [0, 1] of both cross-entropies (default 0.1, as the authors).
        stopgrad_gathered: the authors' routing: the row term updates only the anchor, the column term only
            the other modalities (the scale gets both).
        eps: ``>= 0``, see ``gram_volume``.
        reduction: ``"mean"``, ``"sum"`` or ``"none"`` (per-anchor ``½(row_i + col_i)``, ``[N1]``).
        backend: ``"auto"``, ``"triton"``, ``"chunked"`` (alias ``"cpu"``) or ``"reference"`` (see
            ``gram_volume``).
    """
    anchor, others = _split(modalities, "gram_loss")
    _check_modalities(anchor, others, same_rows=labels is None, what="gram_loss")
    _checks.check_label_smoothing(label_smoothing)
    _checks.check_reduction(reduction)
    if not isinstance(stopgrad_gathered, bool):
        raise TypeError(f"stopgrad_gathered must be a bool, got {type(stopgrad_gathered).__name__}")
    eps = _check_eps(eps)
    if temperature is None and logit_scale is None:
        raise ValueError("temperature is required (or logit_scale = 1/temperature): a positive float or 0-dim "
                         "tensor (the authors initialise it to 0.07)")
    scale = _checks.resolve_scale(logit_scale, temperature, anchor.device)
    n1, n2 = anchor.shape[0], others[0].shape[0]
    if labels is not None:
        _checks.check_labels(labels, n1, n2, anchor.device)
    name = _engine(backend, anchor, others)
    if name in ("reference", "dense"):
        s = {"temperature": 1.0 / scale} if temperature is not None else {"logit_scale": scale}
        return _reference.gram_loss(*_dispatch.dense_inputs(name, anchor, *others), **s, labels=labels, label_smoothing=label_smoothing,
                                    stopgrad_gathered=stopgrad_gathered, eps=eps, reduction=reduction
                                    ).to(accumulation_dtype(anchor.dtype))
    labels = torch.arange(n1, device=anchor.device) if labels is None else labels.long()
    options = GramOptions("loss", eps, name, float(label_smoothing), stopgrad_gathered, reduction)
    return GramFunction.apply(options, scale, labels, *_checks.distinct_inputs([anchor, *others]))


__all__ = ["GramFunction", "GramOptions", "gram_loss", "gram_volume"]
