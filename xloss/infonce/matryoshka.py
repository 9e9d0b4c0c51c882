"""Matryoshka InfoNCE (issue 12): ``Σ_m w_m · info_nce(q̂_m, k̂_m)`` over prefixes ``d_1 < … < d_P`` of D, one sweep.

``q̂_m = q[:, :d_m]``, L2-normalised per row when ``normalize`` (sentence-transformers' ``MatryoshkaLoss`` over a
cosine loss), the same for the keys.  The prefix dot products are partial sums of the full one, so a tile computes
the GEMMs of the D slices ``[d_{m-1}, d_m)`` in order, accumulates them (``cum^m``) and forms every prefix's logits

    ``z^m_ij = s · rq^m_i · rk^m_j · cum^m_ij``,   ``rq^m_i = 1 / ‖q_i[:d_m]‖`` (1 without ``normalize``),

keeping one set of split LSE statistics per prefix.  The inputs are read once per sweep, never once per prefix,
and no prefix copy of q or k is made.

Gradients (exact, by the chain rule in two parts):

* the engines' backward sweep forms ``G^m`` per prefix as InfoNCE's (softmax parts, minus the target entry, minus
  the uniform parts of label smoothing), ``H^m = G^m ∘ (rq^m rk^mᵀ)`` and the suffix sums ``S^l = Σ_{m≥l} H^m``, so
  that ``dq[:, slice_l] = s·S^l k[:, slice_l]`` and ``dk[:, slice_l] = s·S^lᵀ q[:, slice_l]`` cost one GEMM sweep
  over D in all (not Σ_m d_m), holding the inverse norms fixed;
* the inverse norms are inputs of the autograd Function, computed here with PyTorch ops (:func:`inverse_norms`);
  the sweep returns their gradients ``∂L/∂rq^m_i = Σ_j G^m_ij · rk^m_j · s·cum^m_ij`` (row sums of the tile) and
  ``∂L/∂rk^m_j`` (column sums), and autograd carries them through the normalisation to q and k.
* ``∂L/∂s = Σ_i <q_i, dq_u_i>`` as for plain InfoNCE (``Σ_m Σ_ij G^m_ij ∂z^m_ij/∂s`` regroups by slice).

The formula around the sweeps (positive logits, label smoothing, weights, reduction) is :func:`forward` /
:func:`backward`, the body of :class:`~xloss.infonce.InfoNCEFunction` when its options carry a :class:`Matryoshka`.
"""

from __future__ import annotations

import itertools
import math
import operator
from dataclasses import dataclass

import torch

from .._tiling import accumulation_dtype
from . import sweeps

NORM_EPS = 1e-12  # F.normalize's eps (sentence-transformers' shrink): a zero prefix stays zero, never NaN


@dataclass(frozen=True)
class Matryoshka:
    """The prefixes, their weights and whether each prefix is L2-normalised (hashable: a compile constant)."""

    dims: tuple[int, ...]
    weights: tuple[float, ...]
    normalize: bool = True


def check(dims, weights, normalize, d: int | None) -> Matryoshka | None:
    """The option of a call, checked (errors name the argument); None when ``dims`` is None.

    ``d``: the feature dimension of the inputs (None: not known yet, e.g. a module's constructor).
    """
    if dims is None and weights is None and normalize is True:
        return None  # the default, in one test
    if not isinstance(normalize, bool):
        raise TypeError(f"matryoshka_normalize must be a bool, got {type(normalize).__name__}")
    if dims is None:
        if weights is not None:
            raise ValueError("matryoshka_weights was given without matryoshka_dims")
        return None
    if not isinstance(dims, (list, tuple)):
        raise TypeError(f"matryoshka_dims must be a list or tuple of ints, got {type(dims).__name__}")
    if not dims:
        raise ValueError("matryoshka_dims must not be empty")
    ints = []
    for x in dims:
        if isinstance(x, bool) or not hasattr(x, "__index__"):
            raise TypeError(f"matryoshka_dims must hold ints, got {x!r} ({type(x).__name__}) in {list(dims)}")
        ints.append(operator.index(x))
    if ints[0] < 1 or any(b <= a for a, b in itertools.pairwise(ints)):
        raise ValueError(f"matryoshka_dims must be strictly increasing positive ints, got {ints}")
    if d is not None and ints[-1] > d:
        raise ValueError(f"matryoshka_dims must be <= the feature dimension D = {d}, got {ints}")
    if weights is None:
        floats = [1.0] * len(ints)
    else:
        if not isinstance(weights, (list, tuple)):
            raise TypeError(f"matryoshka_weights must be a list or tuple of floats, got {type(weights).__name__}")
        if len(weights) != len(ints):
            raise ValueError(f"matryoshka_weights must have one weight per matryoshka_dims entry ({len(ints)}), "
                             f"got {len(weights)}")
        floats = []
        for x in weights:
            if isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x):
                raise TypeError(f"matryoshka_weights must hold finite floats, got {x!r} in {list(weights)}")
            floats.append(float(x))
    return Matryoshka(tuple(ints), tuple(floats), normalize)


def inverse_norms(x: torch.Tensor, dims: tuple[int, ...]) -> torch.Tensor:
    """``[P, n]``: ``1 / max(‖x_i[:d_m]‖, eps)`` in the accumulation dtype, differentiable (autograd takes the
    gradient the sweeps return through it).  Reads ``x`` once: the norms of the D slices, then the prefix norms
    as norms of those (``‖x[:d_m]‖ = ‖(‖x_slice_1‖, …, ‖x_slice_m‖)‖``, safe at 0 where a sqrt of a sum is not)."""
    xf = x.to(accumulation_dtype(x.dtype))
    bounds = (0, *dims)
    parts = torch.stack([torch.linalg.vector_norm(xf[:, a:b], dim=1) for a, b in itertools.pairwise(bounds)])
    norms = torch.stack([torch.linalg.vector_norm(parts[: m + 1], dim=0) for m in range(len(dims))])
    return 1.0 / norms.clamp_min(NORM_EPS)


def _prefix_mask(dims, d: int, device) -> torch.Tensor:
    """``[P, D]`` bool: column c belongs to prefix m (``c < d_m``)."""
    return torch.arange(d, device=device)[None, :] < torch.tensor(dims, device=device)[:, None]


def _prefix_sums(comm, qf, kf, rq, rk, dims) -> torch.Tensor:
    """``[2, P, D]``: the global ``Σ_i q̂^m_i`` and ``Σ_j k̂^m_j`` (zero beyond ``d_m``), for label smoothing."""
    mask = _prefix_mask(dims, qf.shape[1], qf.device).to(qf.dtype)
    if rq is None:
        sums = torch.stack([qf.sum(0) * mask, kf.sum(0) * mask])
    else:
        sums = torch.stack([(rq @ qf) * mask, (rk @ kf) * mask])
    return comm.all_reduce(sums)


def _prefix_dots(xf, r, sums) -> torch.Tensor:
    """``[P, n]``: ``<x̂^m_i, sums^m>`` (``sums [P, D]`` zero beyond ``d_m``)."""
    dots = sums @ xf.T
    return dots if r is None else dots * r


def forward(ctx, q, k, scale, labels, options, comm, rq, rk):
    """``Σ_m w_m ℓ^m`` with ``ℓ^m`` InfoNCE's per-query terms on prefix m, reduced (see ``InfoNCEFunction``)."""
    mat = options.matryoshka
    acc = accumulation_dtype(q.dtype)
    eps, symmetric = options.label_smoothing, options.symmetric
    N, M = comm.total_rows(q.shape[0]), comm.total_keys(k.shape[0])
    s = scale.detach().to(acc)
    row, col, z_pos, keys = sweeps.matryoshka_lse(comm, q, k, rq, rk, s, labels, mat.dims, symmetric,
                                                  options.engine)
    rows = (row[:, 0] - z_pos) + row[:, 1]  # [P, n]: LSE - z_pos, the max subtracted first (as log_softmax)
    sums = None
    if eps:  # ε(LSE - mean_j z^m_ij) - ε(LSE - z_pos): the means from O((N + M)·D) sums
        qf, kf = q.to(acc), k.to(acc)
        sums = _prefix_sums(comm, qf, kf, rq, rk, mat.dims)
        rows = rows + eps * (z_pos - s * _prefix_dots(qf, rq, sums[1]) / M)
    if symmetric:
        cols = (col[:, 0, labels] - z_pos) + col[:, 1, labels]
        if eps:
            e_key = s * comm.gather_keys(_prefix_dots(kf, rk, sums[0]).T.contiguous()).T / N  # [P, M]
            cols = cols + eps * (z_pos - e_key[:, labels])
        terms = (rows + cols) / 2
    else:
        terms = rows
    weights = torch.tensor(mat.weights, dtype=acc, device=q.device)
    ctx.save_for_backward(q, k, scale, labels, row, col, keys, rq, rk)
    ctx.options, ctx.comm = options, comm
    return comm.reduce((weights[:, None] * terms).sum(0), options.reduction, N)


def backward(ctx, grad_out):
    """``(grad_q, grad_k, grad_scale, grad_rq, grad_rk)``; ``G^m = w_m·G`` with InfoNCE's ``G`` on prefix m."""
    q, k, scale, labels, row, col, keys, rq, rk = ctx.saved_tensors
    options, comm = ctx.options, ctx.comm
    mat, eps, symmetric = options.matryoshka, options.label_smoothing, options.symmetric
    acc = row.dtype
    n = q.shape[0]
    N, M = comm.total_rows(n), comm.total_keys(k.shape[0])
    g = grad_out.to(acc)
    g = (g / N if options.reduction == "mean" else g).expand(n)  # d loss / d term_i of this rank's queries
    a = g / 2 if symmetric else g  # weight of row i's softmax
    w = None
    if symmetric:  # weight of column j's softmax: Σ a_i over the queries (of every rank) whose positive is j
        w = comm.all_reduce(torch.zeros(M, dtype=acc, device=q.device).index_add_(0, labels, a))
    weights = torch.tensor(mat.weights, dtype=acc, device=q.device)[:, None]

    def per_prefix(x):
        return None if x is None else weights * x

    pos = (1 - eps) * (a + a if symmetric else a)  # weight of the target entry (i, labels[i])
    u = (eps / M) * a if eps else None  # smoothing's uniform part of row i
    v = (eps / N) * w if eps and symmetric else None  # ... and of column j
    s = scale.detach().to(acc)
    dq, dk, drq, drk = sweeps.matryoshka_grad(comm, q, k, keys, rq, rk, s, mat.dims, row, col, per_prefix(a),
                                              per_prefix(w), labels, per_prefix(pos), per_prefix(u),
                                              per_prefix(v), options.engine)
    needs, f = ctx.needs_input_grad, comm.grad_factor
    grad_q = grad_k = grad_scale = grad_rq = grad_rk = None
    if needs[2]:  # Σ_m Σ G^m∘∂z^m/∂s = Σ_i <q_i, dq_u_i> (this rank's share on many)
        grad_scale = ((q.to(acc) * dq).sum() * f).to(scale.dtype)
    if needs[0]:
        grad_q = ((s * f) * dq).to(q.dtype)
    if needs[1]:
        grad_k = ((s * f) * dk).to(k.dtype)
    if rq is not None and needs[7]:
        grad_rq = drq * f if f != 1 else drq
    if rk is not None and needs[8]:
        grad_rk = drk * f if f != 1 else drk
    return grad_q, grad_k, grad_scale, None, None, None, None, grad_rq, grad_rk
