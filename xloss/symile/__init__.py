"""Symile loss (SPEC.md §5), with a streaming ``"n_squared"`` path: the whole family.

* ``negative_sampling="n"``: per anchor an ``[N, N]`` logit matrix (row-shuffled products of the other
  modalities, the positive MIP on the diagonal), as the ``symile`` package computes it, op for op, so the
  numbers agree bit for bit (it is InfoNCE-sized: no tiling in this round; plain autograd).
* ``negative_sampling="n_squared"``: :class:`SymileFunction`, the family's one autograd Function, returns the
  ``[M, N]`` log-sum-exp of every anchor over all ``N^{M-1}`` candidate tuples, saving only the inputs and the
  LSE; backward recomputes the score tiles.  Layout (op → Function → function):

  * ``engine.py``  the engine interface (:class:`~xloss.symile.engine.SymileEngine`: the sweeps ``lse`` and
    ``grad``), implemented by ``chunked.py`` (one shared sweep over slabs of the score tensor, any device,
    dtype and M) and ``triton.py`` (fused streaming kernels over (j, l[, m]) tiles; M = 3 or 4,
    fp32/fp16/bf16);
  * ``ops.py``     each sweep as a ``torch.library`` custom op (``xloss::symile_lse``, ``xloss::symile_grad``),
    called by the Function in eager mode and under ``torch.compile`` alike.

  ``backend="auto"`` picks Triton for CUDA tensors when it supports the case and the chunked engine otherwise
  (``xloss._dispatch``).  The positive term ``−s·MIP(x_i, …)`` and the reduction are plain autograd on O(N·D)
  tensors.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch

from .. import _checks, _dispatch, _tiling
from .. import reference as _reference
from .._autograd import first_order_only
from .._reduce import reduce_terms
from ..reference.symile import draw_permutations
from . import ops
from .checks import check_generator

SAMPLINGS = ("n", "n_squared")


@dataclass(frozen=True)
class SymileOptions:
    """Every non-tensor option of :class:`SymileFunction` (hashable: a constant for ``torch.compile``)."""

    engine: str = "chunked"  # "chunked" | "triton" (see xloss._dispatch)


class SymileFunction(torch.autograd.Function):
    """``LSE^a_i = log Σ_{tuples} exp(s·MIP(X^a_i, other rows))`` for every anchor ``a``: ``[M, N]``.

    Forward args: ``options`` (:class:`SymileOptions`), ``scale`` (0-dim), then the ``M`` modalities ``[N, D]``
    (same dtype and device).  Output in the accumulation dtype (fp32 for half inputs, fp64 for fp64).  Both
    sweeps run through the custom ops of ``ops.py``.
    """

    @staticmethod
    def forward(ctx, options: SymileOptions, scale, *reps):
        s = scale.detach().to(_tiling.accumulation_dtype(reps[0].dtype))
        out = ops.symile_lse(list(reps), s, options.engine)
        ctx.save_for_backward(scale, out, *reps)
        ctx.options = options
        return out

    @staticmethod
    @first_order_only("symile_loss")
    def backward(ctx, grad_out):
        scale, out, *reps = ctx.saved_tensors
        s = scale.detach().to(out.dtype)
        need_s = ctx.needs_input_grad[1]
        dxs, ds = ops.symile_grad(reps, s, out, grad_out.to(out.dtype).contiguous(), need_s, ctx.options.engine)
        grads = [dx.to(r.dtype) if need else None for dx, r, need in zip(dxs, reps, ctx.needs_input_grad[2:])]
        return (None, ds.to(scale.dtype) if need_s else None, *grads)


def _engine(backend: str, reps: list[torch.Tensor]) -> str:
    """The engine for ``backend``: one call to ``_dispatch.resolve`` ("triton", "dense", "chunked" or "reference").

    "auto" through ``XLOSS_BACKEND`` (e.g. ``XLOSS_BACKEND=triton``) keeps what "auto" takes (dense or chunked)
    where the kernels do not take the case (float64, M ≥ 5); an explicit ``backend="triton"`` that the kernels
    cannot take raises (``triton.UnsupportedDtypeError``, a TypeError, for float64; ValueError for M ≥ 5).
    """
    n, m = reps[0].shape[0], len(reps)  # cells: the [N, N^(M-1)] logits of "n_squared", N^M
    return _dispatch.resolve("symile", backend, reps[0].device, reps[0].dtype, modalities=m, local=True,
                             cells=n**m)


def _check_reps(reps) -> list[torch.Tensor]:
    reps = list(reps)
    if len(reps) < 2:
        raise ValueError(f"symile_loss needs at least 2 modalities (tensors [N, D]), got {len(reps)}")
    if _checks.matrices_ok(reps, same_shape=True):
        return reps
    for i, r in enumerate(reps):
        _checks.check_float_tensor(f"modalities[{i}]", r, ndim=2)
    _checks.check_same_dtype_device(**{f"modalities[{i}]": r for i, r in enumerate(reps)})
    for i, r in enumerate(reps[1:], 1):
        if r.shape != reps[0].shape:
            raise ValueError(
                f"every modality must have the same shape [N, D], got modalities[0] {tuple(reps[0].shape)} "
                f"and modalities[{i}] {tuple(r.shape)}"
            )
    return reps


def _check_permutations(permutations, m: int, n: int) -> list[list[torch.Tensor]]:
    msg = (f"permutations must be a list of {m} lists (one per anchor), each holding {m - 1} permutations of "
           f"range({n}) as integer tensors of shape ({n},) (one per non-anchor modality, in order)")
    if not isinstance(permutations, (list, tuple)) or len(permutations) != m:
        raise ValueError(msg)
    out = []
    for per_anchor in permutations:
        if not isinstance(per_anchor, (list, tuple)) or len(per_anchor) != m - 1:
            raise ValueError(msg)
        row = []
        for p in per_anchor:
            if not isinstance(p, torch.Tensor):
                raise TypeError(f"{msg}; got a {type(p).__name__}")
            if p.dtype.is_floating_point or p.dtype.is_complex or p.dtype == torch.bool:
                raise TypeError(f"{msg}; got dtype {p.dtype}")
            if tuple(p.shape) != (n,):
                raise ValueError(f"{msg}; got shape {tuple(p.shape)}")
            p = p.long()
            # the values: ValueError on CPU tensors; a device-side assert on CUDA tensors and inside
            # torch.compile (no host sync, no graph break; a RuntimeError when it fails)
            arange = torch.arange(n, device=p.device)
            _checks._value_check(torch.sort(p.detach()).values.eq(arange).all(),
                                 f"{msg}; got a tensor that is not a permutation of range({n})")
            row.append(p)
        out.append(row)
    return out


_LEGACY = ("logit_scale", "negative_sampling", "permutations", "generator", "reduction", "backend")
_DEFAULTS = {"logit_scale": None, "negative_sampling": "n", "permutations": None, "generator": None,
             "reduction": "mean", "backend": "auto"}


def _legacy_call(modalities: tuple, given: dict) -> tuple[tuple, dict]:
    """``symile_loss(reps, logit_scale, negative_sampling, ...)`` of earlier releases: a list or tuple of
    tensors first, then the options positionally.  Accepted for one release with a DeprecationWarning."""
    warnings.warn("symile_loss(reps, ...): passing the modalities as one list or tuple (and the options "
                  "positionally) is deprecated and will be removed in the next release; pass the tensors as "
                  "separate arguments and the options by keyword: symile_loss(x, y, z, logit_scale=...)",
                  DeprecationWarning, stacklevel=3)
    extra = modalities[1:]
    if len(extra) > len(_LEGACY):
        raise TypeError(f"symile_loss() takes at most {len(_LEGACY) + 1} positional arguments with a list of "
                        f"modalities, got {len(modalities)}")
    given = dict(given)
    for name, value in zip(_LEGACY, extra):
        if given[name] is not _DEFAULTS[name] and given[name] != _DEFAULTS[name]:
            raise TypeError(f"symile_loss() got multiple values for argument {name!r}")
        given[name] = value
    return tuple(modalities[0]), given


def symile_loss(
    *modalities: torch.Tensor,
    logit_scale=None,
    temperature=None,
    negative_sampling: str = "n",
    permutations=None,
    generator: torch.Generator | None = None,
    reduction: str = "mean",
    backend: str = "auto",
) -> torch.Tensor:
    """Symile loss (the ``symile`` package's ``Symile``), streaming over candidate tuples for ``"n_squared"``.

    For each anchor modality (in order), cross-entropy over ``s·MIP`` logits with the positive at the row's own
    index; the loss is the mean over anchors (and rows).  ``MIP(x¹…x^M) = Σ_d Π_m x^m_d``.

    Args:
        modalities: ``M ≥ 2`` tensors ``[N, D]`` (same shape, dtype and device), not assumed unit-norm.  (One
            list or tuple of them, with the options after it positionally, is the spelling of earlier
            releases: accepted for one release with a DeprecationWarning.)
        logit_scale: ``s``, already exponentiated: a float or a 0-dim tensor (gets a gradient).  Default 1.
        temperature: ``τ``, the same as ``logit_scale=1/τ``; give one or the other.
        negative_sampling: ``"n"`` (N−1 shuffled negatives per row, as the package, random) or ``"n_squared"``
            (every tuple of the other modalities' rows, ``N^{M-1}`` candidates; ``M ≥ 3``).
        permutations: ``"n"`` only, instead of random draws: ``permutations[a][k]`` is the ``[N]`` integer row
            permutation applied to the ``k``-th non-anchor modality (modalities in order, anchor ``a`` skipped)
            when modality ``a`` is the anchor — ``M`` lists of ``M−1`` tensors.  ``reference.symile.draw_permutations``
            makes them as the package draws them.
        generator: CPU ``torch.Generator`` for the ``"n"`` draws (default: the global one, as the package:
            ``torch.manual_seed(k)`` before this call or ``Symile()(...)`` gives the same numbers).  Not under
            ``torch.compile`` (draw ``permutations`` outside the compiled function).
        reduction: ``"mean"`` (the package), ``"sum"`` (over rows of the per-row mean over anchors) or
            ``"none"`` (``[N]``: each row's mean over anchors).
        backend: ``"auto"`` (``"n_squared"``: Triton on CUDA for M = 3, 4 and fp32/fp16/bf16, else the chunked
            PyTorch engine), ``"triton"``, ``"chunked"`` (alias ``"cpu"``; any device) or ``"reference"`` (the
            naive definition).  ``"n"`` always runs the package's PyTorch ops (bit for bit), whatever the backend.

    Returns:
        0-dim loss or ``[N]``.  ``"n"``: in the input dtype (as the package); ``"n_squared"``: in the
        accumulation dtype (fp32 for half inputs).
    """
    if len(modalities) >= 1 and isinstance(modalities[0], (list, tuple)):
        modalities, opts = _legacy_call(modalities, {
            "logit_scale": logit_scale, "negative_sampling": negative_sampling, "permutations": permutations,
            "generator": generator, "reduction": reduction, "backend": backend})
        logit_scale, negative_sampling, permutations, generator, reduction, backend = (opts[k] for k in _LEGACY)
    reps = _check_reps(modalities)
    m, (n, _) = len(reps), reps[0].shape
    _checks.check_choice("negative_sampling", negative_sampling, SAMPLINGS)
    if negative_sampling == "n_squared" and m < 3:
        raise ValueError(f"negative_sampling='n_squared' needs at least 3 modalities, got {m} (use 'n')")
    if permutations is not None:
        if negative_sampling != "n":
            raise ValueError("permutations is only used with negative_sampling='n'")
        permutations = _check_permutations(permutations, m, n)
    check_generator(generator)
    _checks.check_reduction(reduction)
    device = reps[0].device
    scale = _checks.resolve_scale(logit_scale, temperature, device)
    name = _engine(backend, reps)
    if negative_sampling == "n" and permutations is None:
        permutations = draw_permutations(m, n, generator)
    if name in ("reference", "dense") or negative_sampling == "n":
        # "n" is N×N per anchor: the package's ops (bit for bit), differentiated by autograd.
        if isinstance(logit_scale, torch.Tensor) or isinstance(temperature, torch.Tensor):
            s = scale
        elif temperature is not None:
            s = 1.0 / float(temperature)
        else:
            s = 1.0 if logit_scale is None else float(logit_scale)
        dense = _dispatch.dense_inputs(name if negative_sampling == "n_squared" else "reference", *reps)
        out = _reference.symile.symile_loss(list(dense), s, negative_sampling, permutations=permutations,
                                            reduction=reduction)
        # "n" keeps the input dtype (as the package); "n_squared" returns the accumulation dtype on every backend
        return out if negative_sampling == "n" else out.to(_tiling.accumulation_dtype(reps[0].dtype))
    acc = _tiling.accumulation_dtype(reps[0].dtype)
    lse = SymileFunction.apply(SymileOptions(name), scale, *_checks.distinct_inputs(reps))  # [M, N]
    pos = reps[0].to(acc)
    for r in reps[1:]:
        pos = pos * r.to(acc)
    pos = pos.sum(1)
    terms = (lse - scale.to(acc) * pos).mean(0)  # [N]
    return reduce_terms(terms, reduction)


__all__ = ["SymileFunction", "SymileOptions", "symile_loss"]
