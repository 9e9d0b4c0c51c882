"""Symile loss (SPEC.md §5), with a streaming ``"n_squared"`` path.

* ``negative_sampling="n"``: per anchor an ``[N, N]`` logit matrix (row-shuffled products of the other
  modalities, the positive MIP on the diagonal), as the ``symile`` package computes it, op for op, so the
  numbers agree bit for bit (it is InfoNCE-sized: no tiling in this round).
* ``negative_sampling="n_squared"``: ``SymileLSEFunction`` returns the ``[M, N]`` log-sum-exp of every anchor
  over all ``N^{M-1}`` candidate tuples, saving only the inputs and the LSE; backward recomputes the score
  tiles.  An engine module supplies the two sweeps ``lse`` and ``grad``: ``cpu.py`` (one shared sweep over
  slabs of the score tensor, any device and dtype, any M) or ``triton.py`` (fused streaming kernels over
  (j, l[, m]) tiles; M = 3 or 4, fp32/fp16/bf16).  ``backend="auto"`` picks triton for CUDA tensors when it
  supports the case and the cpu engine otherwise.  The positive term ``−s·MIP(x_i, …)`` and the reduction are
  plain autograd on O(N·D) tensors.
"""

from __future__ import annotations

import torch

from .. import _backend, _checks, _tiling
from .. import reference as _reference
from .._reduce import reduce_terms
from ..reference.symile import draw_permutations
from . import cpu as _cpu

SAMPLINGS = ("n", "n_squared")


class SymileLSEFunction(torch.autograd.Function):
    """``LSE^a_i = log Σ_{tuples} exp(s·MIP(X^a_i, other rows))`` for every anchor ``a``: ``[M, N]``.

    Forward args: ``scale`` (0-dim), ``engine`` (the ``cpu`` or ``triton`` module), then the ``M`` modalities
    ``[N, D]`` (same dtype and device).  Output in the accumulation dtype (fp32 for half inputs, fp64 for fp64).
    """

    @staticmethod
    def forward(ctx, scale, engine, *reps):
        xs = _engine_inputs(engine, reps)
        s = scale.detach().to(_tiling.accumulation_dtype(reps[0].dtype))
        out = engine.lse(xs, s)
        ctx.save_for_backward(scale, out, *reps)
        ctx.engine = engine
        return out

    @staticmethod
    def backward(ctx, grad_out):
        scale, out, *reps = ctx.saved_tensors
        xs = _engine_inputs(ctx.engine, reps)
        s = scale.detach().to(out.dtype)
        dxs, ds = ctx.engine.grad(xs, s, out, grad_out.to(out.dtype).contiguous(), ctx.needs_input_grad[0])
        grads = [dx.to(r.dtype) if need else None for dx, r, need in zip(dxs, reps, ctx.needs_input_grad[2:])]
        return (ds.to(scale.dtype) if ds is not None else None, None, *grads)


def _engine_inputs(engine, reps):
    """The cpu engine works in the accumulation dtype; the kernels load the inputs in their own dtype."""
    return [_tiling.upcast(r) for r in reps] if engine is _cpu else list(reps)


def _engine(backend: str, reps: list[torch.Tensor]):
    """``(name, engine)`` for ``"n_squared"``: "auto" (or ``XLOSS_BACKEND``) on CUDA picks triton where it
    supports the case (M = 3, 4; not float64) and the cpu engine otherwise; an explicit ``backend="triton"``
    that the kernels cannot take raises (``triton.UnsupportedDtypeError``, a TypeError, for float64; ValueError
    for M ≥ 5)."""
    name = _backend.resolve(backend, reps[0].device, "symile")
    if name != "triton":
        return name, _cpu
    from . import triton as _triton  # imported lazily: Triton is optional

    if backend != "triton" and not _triton.supports(reps[0].dtype, len(reps)):
        return "cpu", _cpu
    return name, _triton


def _check_reps(reps) -> list[torch.Tensor]:
    if isinstance(reps, torch.Tensor) or not isinstance(reps, (list, tuple)):
        raise TypeError(f"reps must be a list or tuple of [N, D] tensors (one per modality), got {type(reps).__name__}")
    reps = list(reps)
    if len(reps) < 2:
        raise ValueError(f"reps must hold at least 2 modalities, got {len(reps)}")
    for i, r in enumerate(reps):
        _checks.check_float_tensor(f"reps[{i}]", r, ndim=2)
    _checks.check_same_dtype_device(**{f"reps[{i}]": r for i, r in enumerate(reps)})
    for i, r in enumerate(reps[1:], 1):
        if r.shape != reps[0].shape:
            raise ValueError(
                f"every modality in reps must have the same shape [N, D], got reps[0] {tuple(reps[0].shape)} "
                f"and reps[{i}] {tuple(r.shape)}"
            )
    return reps


def _check_permutations(permutations, m: int, n: int) -> list[list[torch.Tensor]]:
    msg = (f"permutations must be a list of {m} lists (one per anchor), each holding {m - 1} permutations of "
           f"range({n}) as integer tensors of shape ({n},) (one per non-anchor modality, in order)")
    if not isinstance(permutations, (list, tuple)) or len(permutations) != m:
        raise ValueError(msg)
    arange = torch.arange(n)
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
            # (a value check: skipped under torch.compile, where it would break the graph)
            if not torch.compiler.is_compiling() and not torch.equal(torch.sort(p.detach().cpu().long()).values,
                                                                     arange):
                raise ValueError(f"{msg}; got a tensor that is not a permutation of range({n})")
            row.append(p.long())
        out.append(row)
    return out


def symile_loss(
    reps,
    logit_scale=1.0,
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
        reps: list or tuple of ``M ≥ 2`` tensors ``[N, D]`` (same shape, dtype and device), not assumed unit-norm.
        logit_scale: ``s``, already exponentiated: a float or a 0-dim tensor (gets a gradient).
        negative_sampling: ``"n"`` (N−1 shuffled negatives per row, as the package, random) or ``"n_squared"``
            (every tuple of the other modalities' rows, ``N^{M-1}`` candidates; ``M ≥ 3``).
        permutations: ``"n"`` only, instead of random draws: ``permutations[a][k]`` is the ``[N]`` integer row
            permutation applied to the ``k``-th non-anchor modality (modalities in order, anchor ``a`` skipped)
            when modality ``a`` is the anchor — ``M`` lists of ``M−1`` tensors.  ``reference.symile.draw_permutations``
            makes them as the package draws them.
        generator: CPU ``torch.Generator`` for the ``"n"`` draws (default: the global one, as the package:
            ``torch.manual_seed(k)`` before this call or ``Symile()(...)`` gives the same numbers).
        reduction: ``"mean"`` (the package), ``"sum"`` (over rows of the per-row mean over anchors) or
            ``"none"`` (``[N]``: each row's mean over anchors).
        backend: ``"auto"`` (``"n_squared"``: Triton on CUDA for M = 3, 4 and fp32/fp16/bf16, else the chunked
            PyTorch path), ``"triton"``, ``"cpu"`` (chunked PyTorch, any device) or ``"reference"`` (the naive
            definition).  ``"n"`` always runs the package's PyTorch ops (bit for bit), whatever the backend.

    Returns:
        0-dim loss or ``[N]``.  ``"n"``: in the input dtype (as the package); ``"n_squared"``: in the
        accumulation dtype (fp32 for half inputs).
    """
    reps = _check_reps(reps)
    m, (n, _) = len(reps), reps[0].shape
    _checks.check_choice("negative_sampling", negative_sampling, SAMPLINGS)
    if negative_sampling == "n_squared" and m < 3:
        raise ValueError(f"negative_sampling='n_squared' needs at least 3 modalities in reps, got {m} (use 'n')")
    if permutations is not None:
        if negative_sampling != "n":
            raise ValueError("permutations is only used with negative_sampling='n'")
        permutations = _check_permutations(permutations, m, n)
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
    if generator is not None and torch.compiler.is_compiling():
        raise ValueError("generator is not supported under torch.compile: draw the permutations outside the compiled "
                         "function (xloss.reference.symile.draw_permutations(m, n, generator)) and pass permutations=")
    _checks.check_reduction(reduction)
    device = reps[0].device
    scale = _checks.resolve_scale(logit_scale, None, device)
    name = _backend.resolve(backend, device, "symile")
    if negative_sampling == "n" and permutations is None:
        permutations = draw_permutations(m, n, generator)
    if name == "reference" or negative_sampling == "n":
        # "n" is N×N per anchor: the package's ops (bit for bit), differentiated by autograd.
        s = scale if isinstance(logit_scale, torch.Tensor) else float(logit_scale)
        return _reference.symile.symile_loss(
            reps, s, negative_sampling, permutations=permutations, reduction=reduction
        )
    acc = _tiling.accumulation_dtype(reps[0].dtype)
    engine_name, engine = _engine(backend, reps)
    if torch.compiler.is_compiling():  # an opaque custom op instead of the engine's Python tile loops
        lse = _ops.symile_lse(scale, reps, engine_name)
    else:
        lse = SymileLSEFunction.apply(scale, engine, *reps)  # [M, N]
    pos = reps[0].to(acc)
    for r in reps[1:]:
        pos = pos * r.to(acc)
    pos = pos.sum(1)
    terms = (lse - scale.to(acc) * pos).mean(0)  # [N]
    return reduce_terms(terms, reduction)


from . import ops as _ops  # last: it registers the custom ops, which run the Function above

__all__ = ["SymileLSEFunction", "symile_loss"]
