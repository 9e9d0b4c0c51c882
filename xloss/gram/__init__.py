"""GRAM: Gram-volume similarity and contrastive loss for k ≥ 2 modalities (SPEC.md §4).

``gram_volume`` and ``gram_loss`` check their arguments, pick a backend and run ``GramVolumeFunction`` /
``GramLossFunction`` with an engine module: ``cpu.py`` (chunked PyTorch, Schur complement / adjugate form,
GEMM tiles, no ``[N1, N2, k, k]`` tensor and no batched det; runs on any device and in float64) or
``triton.py`` (fused kernels, fp32/fp16/bf16; ``backend="auto"`` picks it for CUDA tensors and falls back to
the cpu engine for float64).

With the cpu engine, ``GramLossFunction`` keeps the signed ``det G [N, N]`` and the row/column log-sum-exp of
``Z = −V/τ`` from forward; backward forms ``dZ = a_i(softmax_row − t) + b_j(softmax_col − t)`` tile by tile
(``t`` the smoothed one-hot target), turns it into ``dV = −dZ/τ`` and pushes it through the volume tiles.  The
triton engine keeps only the inputs and the O(N) statistics and recomputes the tiles in backward.
"""

from __future__ import annotations

import numbers

import torch

from .. import _backend, _checks
from .._reduce import reduce_terms
from .._tiling import budget_bytes, upcast
from ..reference import gram as _reference
from . import cpu as _cpu


class GramVolumeFunction(torch.autograd.Function):
    """``V [N1, N2]`` from ``anchor`` and the k−1 ``others``; forward args ``(eps, engine, anchor, *others)``
    with ``engine`` the ``cpu`` or ``triton`` module."""

    @staticmethod
    def forward(ctx, eps, engine, anchor, *others):
        ctx.eps, ctx.engine = eps, engine
        if engine is not _cpu:  # triton: V from one kernel; backward recomputes the tiles
            ctx.save_for_backward(anchor, *others)
            return engine.volume(anchor, list(others), eps)
        a, xs = upcast(anchor), [upcast(x) for x in others]
        g = _cpu.signed_det(a, xs)
        ctx.save_for_backward(anchor, *others, g)
        return _cpu._sqrt_abs(g.clone(), eps)

    @staticmethod
    def backward(ctx, grad_out):
        need_a, need_x = ctx.needs_input_grad[2], any(ctx.needs_input_grad[3:])
        if ctx.engine is not _cpu:
            anchor, *others = ctx.saved_tensors
            if not (need_a or need_x):
                return (None,) * (3 + len(others))  # pragma: no cover
            ga, gx = ctx.engine.volume_backward(anchor, others, ctx.eps, grad_out, need_a, need_x)
            ga = ga.to(anchor.dtype) if need_a else None
            gx = [t.to(x.dtype) for t, x in zip(gx, others)] if need_x else [None] * len(others)
            return (None, None, ga, *gx)
        anchor, *others, gdet = ctx.saved_tensors
        if not (need_a or need_x):
            return (None,) * (3 + len(others))  # pragma: no cover (autograd calls backward only when needed)
        a, xs = upcast(anchor), [upcast(x) for x in others]
        g = grad_out.to(a.dtype)
        ga, gx = _cpu.volume_backward(a, xs, gdet, ctx.eps, lambda i0, i1, j0, j1, vt: (g[i0:i1, j0:j1], None), need_a, need_x)
        ga = ga.to(anchor.dtype) if need_a else None
        gx = [t.to(x.dtype) for t, x in zip(gx, others)] if need_x else [None] * len(others)
        return (None, None, ga, *gx)


def _loss_stats(g: torch.Tensor, s: torch.Tensor, eps: float):
    """From ``det G``: row and column log-sum-exp of ``Z = −s·V``, and the row and column means of ``V``, in
    row strips of a budgeted size (``V`` is never whole)."""
    n1, n2 = g.shape
    rows = max(1, min(n1, budget_bytes(_cpu.DEFAULT_TILE_BYTES) // max(1, 2 * n2 * g.element_size())))
    lse_r = torch.empty(n1, dtype=g.dtype, device=g.device)
    mean_r = torch.empty(n1, dtype=g.dtype, device=g.device)
    lse_c = torch.full((n2,), float("-inf"), dtype=g.dtype, device=g.device)
    sum_c = torch.zeros(n2, dtype=g.dtype, device=g.device)
    for i0 in range(0, n1, rows):
        v = _cpu._sqrt_abs(g[i0 : i0 + rows], eps)
        mean_r[i0 : i0 + rows] = v.mean(1)
        sum_c += v.sum(0)
        z = v.mul_(-s)
        lse_r[i0 : i0 + rows] = torch.logsumexp(z, 1)
        lse_c = torch.logaddexp(lse_c, torch.logsumexp(z, 0))
    return lse_r, lse_c, mean_r, sum_c / n1


class GramLossFunction(torch.autograd.Function):
    """GRAM loss; forward args ``(scale, label_smoothing, stopgrad_gathered, eps, reduction, engine, anchor,
    *others)`` with ``scale = 1/τ`` (0-dim) and ``engine`` the ``cpu`` or ``triton`` module."""

    @staticmethod
    def forward(ctx, scale, label_smoothing, stopgrad, eps, reduction, engine, anchor, *others):
        ctx.engine = engine
        if engine is _cpu:
            a, xs = upcast(anchor), [upcast(x) for x in others]
            g = _cpu.signed_det(a, xs)
            s = scale.detach().to(a.dtype)
            lse_r, lse_c, mean_r, mean_c = _loss_stats(g, s, eps)
            vdiag = _cpu._sqrt_abs(g.diagonal().clone(), eps)
        else:  # triton: one sweep, only O(N) statistics come back
            g = None
            s = scale.detach().float()
            lse_r, lse_c, mean_r, mean_c, vdiag = engine.loss_stats(anchor, list(others), s, eps)
        ls = float(label_smoothing)
        zd = -s * vdiag
        rows = lse_r - (1 - ls) * zd
        cols = lse_c - (1 - ls) * zd
        if ls:
            rows = rows + ls * s * mean_r  # − ε·mean_j z_ij, z = −sV
            cols = cols + ls * s * mean_c
        terms = (rows + cols) / 2
        ctx.save_for_backward(scale, anchor, *others, g, lse_r, lse_c)
        ctx.options = (ls, stopgrad, eps, reduction)
        return reduce_terms(terms, reduction)

    @staticmethod
    def backward(ctx, grad_out):
        scale, anchor, *rest = ctx.saved_tensors
        others, (gdet, lse_r, lse_c) = rest[:-3], rest[-3:]
        ls, stopgrad, eps, reduction = ctx.options
        if ctx.engine is not _cpu:
            return GramLossFunction._triton_backward(ctx, grad_out, scale, anchor, others, lse_r, lse_c)
        acc = gdet.dtype
        n = gdet.shape[0]
        s = scale.detach().to(acc)
        g = grad_out.to(acc)
        w = ((g / n) if reduction == "mean" else g).expand(n) / 2  # weight of row i's and of column i's CE
        ds = torch.zeros((), dtype=acc, device=gdet.device)

        wr, wc = w[:, None], w[None, :]

        def dv(i0, i1, j0, j1, vt):
            nonlocal ds
            z = vt * (-s)
            pr = torch.sub(z, lse_r[i0:i1, None]).exp_().mul_(wr[i0:i1])  # w_i · softmax over row i
            pc = z.sub_(lse_c[None, j0:j1]).exp_().mul_(wc[:, j0:j1])  # w_j · softmax over column j
            if ls:
                pr.sub_(wr[i0:i1], alpha=ls / n)
                pc.sub_(wc[:, j0:j1], alpha=ls / n)
            d0, d1 = max(i0, j0), min(i1, j1)
            if d0 < d1:  # the positives (diagonal) inside this tile
                idx = torch.arange(d0, d1, device=gdet.device)
                pr[idx - i0, idx - j0] -= (1 - ls) * w[d0:d1]
                pc[idx - i0, idx - j0] -= (1 - ls) * w[d0:d1]
            if stopgrad:
                ds = ds - (pr * vt).sum() - (pc * vt).sum()
                return pr.mul_(-s), pc.mul_(-s)
            dz = pr.add_(pc)
            ds = ds - torch.dot(dz.reshape(-1), vt.reshape(-1))
            return dz.mul_(-s), None

        need_a, need_x = ctx.needs_input_grad[6], any(ctx.needs_input_grad[7:])
        ga, gx = None, [None] * len(others)
        if need_a or need_x:
            a, xs = upcast(anchor), [upcast(x) for x in others]
            ga, gx = _cpu.volume_backward(a, xs, gdet, eps, dv, need_a, need_x)
            ga = ga.to(anchor.dtype) if need_a else None
            gx = [t.to(x.dtype) for t, x in zip(gx, others)] if need_x else [None] * len(others)
        elif ctx.needs_input_grad[0]:
            for i0, i1, j0, j1 in _cpu._tiles(n, n, len(others), gdet.element_size()):
                dv(i0, i1, j0, j1, _cpu._sqrt_abs(gdet[i0:i1, j0:j1], eps))
        grad_scale = ds.to(scale.dtype) if ctx.needs_input_grad[0] else None
        return (grad_scale, None, None, None, None, None, ga, *gx)

    @staticmethod
    def _triton_backward(ctx, grad_out, scale, anchor, others, lse_r, lse_c):
        ls, stopgrad, eps, reduction = ctx.options
        n = anchor.shape[0]
        g = grad_out.float()
        w = ((g / n) if reduction == "mean" else g).expand(n) / 2  # weight of row i's and of column i's CE
        need_s, need_a, need_x = ctx.needs_input_grad[0], ctx.needs_input_grad[6], any(ctx.needs_input_grad[7:])
        ga, gx, ds = ctx.engine.loss_backward(anchor, others, scale.detach(), eps, lse_r, lse_c, w, ls, stopgrad,
                                              need_a, need_x, need_s)
        ga = ga.to(anchor.dtype) if need_a else None
        gx = [t.to(x.dtype) for t, x in zip(gx, others)] if need_x else [None] * len(others)
        grad_scale = ds.to(scale.dtype) if need_s else None
        return (grad_scale, None, None, None, None, None, ga, *gx)


def _check_modalities(anchor, others, same_rows: bool, what: str) -> None:
    _checks.check_float_tensor("anchor", anchor, ndim=2)
    if len(others) < 1:
        raise ValueError(f"{what} needs at least 2 modalities: the anchor and one or more other tensors, got only the anchor")
    if len(others) > _cpu.MAX_OTHERS:
        raise ValueError(f"{what} supports k = 2..{_cpu.MAX_OTHERS + 1} modalities, got k = {len(others) + 1}")
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
            f"anchor and others must have the same number of rows N here (sample i of each modality is a positive), "
            f"got anchor {tuple(anchor.shape)} and others[0] {tuple(others[0].shape)}"
        )


def _check_eps(eps) -> float:
    if isinstance(eps, bool) or not isinstance(eps, numbers.Real):
        raise TypeError(f"eps must be a float >= 0, got {type(eps).__name__}")
    if not float(eps) >= 0:
        raise ValueError(f"eps must be >= 0, got {eps}")
    return float(eps)


def _resolve(backend: str, anchor: torch.Tensor):
    """``(name, engine)``: the backend's name and, for "cpu"/"triton", the engine module of the Functions.

    "auto" (or ``XLOSS_BACKEND``) on CUDA picks triton, except for float64, which only the cpu engine takes;
    an explicit ``backend="triton"`` with float64 raises ``triton.UnsupportedDtypeError`` (a TypeError).
    """
    name = _backend.resolve(backend, anchor.device, "gram")
    if name != "triton":
        return name, _cpu
    from . import triton as _triton  # imported lazily: Triton is optional

    if backend != "triton" and not _triton.supports(anchor.dtype):
        return "cpu", _cpu
    return name, _triton


def gram_volume(anchor: torch.Tensor, *others: torch.Tensor, pairwise: bool = True, eps: float = 0.0,
                backend: str = "auto") -> torch.Tensor:
    """Gram volumes ``V_ij = sqrt(|det G_ij| + eps)`` without the ``[N1, N2, k, k]`` Gram tensor.

    ``G_ij`` is the k×k Gram matrix of ``(a_i, X¹_j, …, X^{k−1}_j)``; equal to ``xloss.reference.gram_volume``
    (the authors' ``sqrt(abs(det))`` when ``eps=0``).

    Args:
        anchor: ``[N1, D]`` float32/float16/bfloat16/float64.
        others: 1 to 4 tensors ``[N2, D]`` (k = 2..5), same dtype and device.
        pairwise: True: ``[N1, N2]``; False (``N1 == N2``): the aligned volumes ``V_ii``, ``[N]``.
        eps: ``>= 0``, added to ``|det G|`` under the square root; ``eps > 0`` keeps gradients finite at
            degenerate (zero-volume) inputs.
        backend: ``"auto"`` (Triton on CUDA, chunked PyTorch elsewhere and for float64), ``"triton"``,
            ``"cpu"`` (chunked PyTorch) or ``"reference"`` (the det-based definition).

    Returns:
        float32 for half inputs, float64 for float64 inputs.
    """
    _check_modalities(anchor, others, same_rows=not pairwise, what="gram_volume")
    if not isinstance(pairwise, bool):
        raise TypeError(f"pairwise must be a bool, got {type(pairwise).__name__}")
    eps = _check_eps(eps)
    name, engine = _resolve(backend, anchor)
    if name == "reference":
        return _reference.gram_volume(anchor, *others, pairwise=pairwise, eps=eps)
    if not pairwise:  # O(N·p²·D) row-wise products: plain PyTorch for every backend
        return _cpu.aligned_volume(upcast(anchor), [upcast(x) for x in others], eps)
    if torch.compiler.is_compiling():  # an opaque custom op instead of the engine's Python tile loops
        return _ops.gram_volume(anchor, others, eps, name)
    return GramVolumeFunction.apply(eps, engine, anchor, *others)


def gram_loss(anchor: torch.Tensor, *others: torch.Tensor, temperature, label_smoothing: float = 0.1,
              stopgrad_gathered: bool = False, eps: float = 0.0, reduction: str = "mean",
              backend: str = "auto") -> torch.Tensor:
    """GRAM contrastive loss ``½[CE(−V/τ, arange) + CE(−Vᵀ/τ, arange)]`` (authors' ``forward_ret``).

    Equal to ``xloss.reference.gram_loss``; memory O(N² + tile) instead of the reference's ``[N, N, k, k]``.

    Args:
        anchor: ``[N, D]``; others: 1 to 4 tensors ``[N, D]`` (k = 2..5), same dtype and device.
        temperature: ``τ > 0``, a float or a 0-dim tensor (gets a gradient).
        label_smoothing: ``ε`` in [0, 1] of both cross-entropies (default 0.1, as the authors).
        stopgrad_gathered: the authors' routing: the row term updates only the anchor, the column term only
            the other modalities (τ gets both).
        eps: ``>= 0``, see ``gram_volume``.
        reduction: ``"mean"``, ``"sum"`` or ``"none"`` (per-sample ``½(row_i + col_i)``, ``[N]``).
        backend: ``"auto"``, ``"triton"``, ``"cpu"`` or ``"reference"`` (see ``gram_volume``).
    """
    _check_modalities(anchor, others, same_rows=True, what="gram_loss")
    _checks.check_label_smoothing(label_smoothing)
    _checks.check_reduction(reduction)
    if not isinstance(stopgrad_gathered, bool):
        raise TypeError(f"stopgrad_gathered must be a bool, got {type(stopgrad_gathered).__name__}")
    eps = _check_eps(eps)
    if temperature is None:
        raise ValueError("temperature is required: a positive float or 0-dim tensor (the authors initialise it to 0.07)")
    scale = _checks.resolve_scale(None, temperature, anchor.device)
    name, engine = _resolve(backend, anchor)
    if name == "reference":
        return _reference.gram_loss(anchor, *others, temperature=1.0 / scale, label_smoothing=label_smoothing,
                                    stopgrad_gathered=stopgrad_gathered, eps=eps, reduction=reduction)
    if torch.compiler.is_compiling():  # an opaque custom op instead of the engine's Python tile loops
        return _ops.gram_loss(scale, anchor, others, label_smoothing, stopgrad_gathered, eps, reduction, name)
    return GramLossFunction.apply(scale, float(label_smoothing), stopgrad_gathered, eps, reduction, engine, anchor,
                                  *others)


from . import ops as _ops  # last: it registers the custom ops, which run the Functions above

__all__ = ["GramLossFunction", "GramVolumeFunction", "gram_loss", "gram_volume"]
