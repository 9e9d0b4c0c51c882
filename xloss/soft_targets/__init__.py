"""Soft targets without the N×M matrices (issue 12): in-batch distillation (open_clip's ``DistillClipLoss``) and
CWCL, the whole family in one place.

Both are a cross-entropy of the student's softmax against a target distribution per row (and per column):
``LSE_j z_ij − Σ_j π_ij z_ij`` with ``z = s·Q Kᵀ``, gradient ``∂z_ij = softmax(z)_ij − π_ij``.

* Distillation (``distill_loss``): ``π = softmax(t)`` of the teacher's logits ``t = s_T·Q_T K_Tᵀ`` (any teacher
  width).  Not linear in anything we can sum ahead, so it has sweeps of its own (``engine.py``; ``chunked.py``
  and ``triton.py``; ``ops.py``; ``sweeps.py`` for the ranks): one forward sweep keeps the student's row and
  column LSE, the teacher's, and the online-rescaled ``Σ_j e^{t_ij − m_i} z_ij``; backward recomputes both tiles.
* CWCL (``cwcl_loss``): ``π_ij = w_ij / Σ_j w_ij``, ``w_ij = ½<u_i, u_j> + ½`` from the targets ``u``.  Linear in
  ``u ⊗ u``, so every target term has a closed form through the small ``[D_u, D]`` matrix ``Uᵀ K``:
  ``Σ_j w_ij z_ij = s·(½ u_iᵀ (UᵀK) q_i + ½ <q_i, Σ_j k_j>)``, and likewise for the gradients.  Only the softmax
  part needs tiles, and those are InfoNCE's sweeps (``xloss/infonce/sweeps.py``), reused as they are.

:class:`SoftTargetFunction` is the family's one autograd Function (``options.kind`` says which target).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .. import _checks, _comm, _dispatch
from .. import reference as _reference
from .._autograd import first_order_only
from .._tiling import accumulation_dtype, in_accumulation_dtype
from ..infonce import sweeps as _infonce_sweeps
from ..reference import soft_targets as _reference_soft
from . import sweeps

KINDS = ("teacher", "cwcl")


@dataclass(frozen=True)
class SoftTargetOptions:
    """Every non-tensor option of one call (hashable: a constant for ``torch.compile``)."""

    kind: str = "teacher"  # "teacher" (distill_loss) | "cwcl"
    symmetric: bool = True
    reduction: str = "mean"
    engine: str = "chunked"  # "chunked" | "triton"


def _split(stats):
    """Teacher statistics ``[max, Σ exp(t − max), ...]`` as split LSE ``[max, log Σ exp(t − max)]``."""
    return torch.stack([stats[0], stats[1].log()])


def _terms(stats, cross):
    """``LSE − Σ π z`` with the max subtracted first (``cross`` is a weighted mean of the logits)."""
    return (stats[0] - cross) + stats[1]


class SoftTargetFunction(torch.autograd.Function):
    """Autograd for soft-target contrastive losses: saves the inputs and O(N + M) statistics, recomputes tiles.

    Forward args: ``q [n, D]``, ``k [m, D]`` (this rank's rows), ``scale`` (0-dim), ``tq``, ``tk`` (teacher
    features ``[n, E]``, ``[m, E]``; for CWCL the targets ``u [n, ·]`` and ``v [m, ·]`` or None), ``tscale``
    (0-dim teacher scale; unused by CWCL), ``options``, ``comm``.  Targets get no gradient; gradients are
    multiplied by ``comm.grad_factor``.
    """

    @staticmethod
    def forward(ctx, q, k, scale, tq, tk, tscale, options: SoftTargetOptions, comm):
        acc = accumulation_dtype(q.dtype)
        s = scale.detach().to(acc)
        N, M = comm.total_rows(q.shape[0]), comm.total_keys(k.shape[0])
        if options.kind == "teacher":
            ts = tscale.detach().to(acc)
            row, col, trow, tcol, keys = sweeps.lse(comm, q, k, s, tq, tk, ts, options.symmetric, options.engine)
            rows = _terms(row, trow[2] / trow[1])
            cols = _terms(col, tcol[2] / tcol[1]) if options.symmetric else None  # every key's [M]
            trow, tcol = _split(trow), (_split(tcol) if options.symmetric else None)
            saved = (trow, tcol) + ((None, None) if keys is None else keys)  # the gathered (k, tk) of all_gather
        else:
            labels = torch.zeros(q.shape[0], dtype=torch.long, device=q.device)  # unused by the statistics
            row, col, _, keys, _ = _infonce_sweeps.lse(comm, q, k, s, labels, options.symmetric, False,
                                                       options.engine)
            sums = _cwcl_sums(comm, q, k, tq, tk, acc)
            rows = _terms(row, s * _cwcl_cross(q, tq, sums["C"], sums["kbar"], sums["ubar"], N))
            cols = None
            if options.symmetric:  # this rank's keys (paired with this rank's queries), not every key
                off = comm.key_offset()
                own = col[:, off : off + k.shape[0]]
                cols = _terms(own, s * _cwcl_cross(k, tk, sums["Cv"], sums["qbar"], sums["vbar"], M))
            saved = (sums["C"], sums["Cv"], sums["kbar"], sums["qbar"], sums["ubar"], sums["vbar"], keys)
        out = _reduce(comm, rows, cols, options, N, M, q)
        ctx.save_for_backward(q, k, scale, tq, tk, tscale, row, col, *saved)
        ctx.options, ctx.comm = options, comm
        return out

    @staticmethod
    @first_order_only("distill_loss / cwcl_loss")
    def backward(ctx, grad_out):
        q, k, scale, tq, tk, tscale, row, col, *saved = ctx.saved_tensors
        options, comm = ctx.options, ctx.comm
        acc = row.dtype
        n, m = q.shape[0], k.shape[0]
        N, M = comm.total_rows(n), comm.total_keys(m)
        a, w = _weights(comm, grad_out.to(acc), options, n, N, M, q.device)
        s = scale.detach().to(acc)
        qf = q.to(acc)
        if options.kind == "teacher":
            trow, tcol, keys, tkeys = saved
            keys = None if keys is None else (keys, tkeys)
            dq, dk = sweeps.grad(comm, q, k, keys, s, tq, tk, tscale.detach().to(acc), row, col, trow, tcol, a, w,
                                 options.engine)
        else:
            C, Cv, kbar, qbar, ubar, vbar, keys = saved
            labels = torch.zeros(n, dtype=torch.long, device=q.device)
            dq, dk = _infonce_sweeps.grad(comm, q, qf, k, keys, s, row, col, a, w, labels, a.new_zeros(n), None,
                                          options.engine)
            _cwcl_subtract_targets(comm, dq, dk, qf, k.to(acc), tq, tk, a, w, C, Cv, kbar, qbar, ubar, vbar, N, M,
                                   options.symmetric)
        needs, f = ctx.needs_input_grad, comm.grad_factor
        grad_q = grad_k = grad_scale = None
        if needs[2]:  # Σ G∘(q kᵀ) (this rank's share on many)
            grad_scale = ((qf * dq).sum() * f).to(scale.dtype)
        if needs[0]:
            grad_q = ((s * f) * dq).to(q.dtype)
        if needs[1]:
            grad_k = ((s * f) * dk).to(k.dtype)
        return grad_q, grad_k, grad_scale, None, None, None, None, None


def _reduce(comm, rows, cols, options, N, M, q):
    """The loss from this rank's row terms ``[n]`` and the column terms (teacher: every key's ``[M]``, the same on
    every rank; CWCL: this rank's keys' ``[m]``)."""
    reduction = options.reduction
    if cols is None:
        return comm.reduce(rows, reduction, N)
    if reduction == "none":  # paired batch: query i's column is key i (global index)
        if options.kind == "teacher":
            off = comm.query_offset()
            cols = cols[off : off + rows.shape[0]]
        return (rows + cols) / 2
    col_total = cols.sum() if options.kind == "teacher" else comm.global_sum(cols.sum())
    row_total = comm.global_sum(rows.sum())
    if reduction == "mean":
        return (row_total / N + col_total / M) / 2
    return (row_total + col_total) / 2


def _weights(comm, g, options, n, N, M, device):
    """``a [n]`` (d loss / d row term of this rank's queries) and ``w [M]`` (of every key's column term), both
    global-consistent; ``w`` None one-way."""
    half = g / 2 if options.symmetric else g
    if options.reduction == "none":
        a = half
        if not options.symmetric:
            return a, None
        # paired batch: column term of global key q_off + i is weighted by query i's grad_output
        idx = torch.arange(n, device=device) + comm.query_offset()
        w = comm.all_reduce(torch.zeros(M, dtype=g.dtype, device=device).index_add_(0, idx, half))
        return a, w
    a = (half / N if options.reduction == "mean" else half).expand(n)
    if not options.symmetric:
        return a, None
    return a, (half / M if options.reduction == "mean" else half).expand(M)


# ---------------------------------------------------------------------------------------------- CWCL (closed form)


def _cwcl_sums(comm, q, k, u, v, acc):
    """The global sums CWCL's target terms need: ``C = Uᵀ K`` ``[D_u, D]``, ``Σ k``, ``Σ u`` (and for the column
    term ``Cv = Vᵀ Q``, ``Σ q``, ``Σ v``); one all_reduce across ranks (samples are paired on their rank)."""
    qf, kf, uf = q.to(acc), k.to(acc), u.to(acc)
    parts = {"C": uf.T @ kf, "kbar": kf.sum(0), "ubar": uf.sum(0)}
    if v is not None:
        vf = v.to(acc)
        parts.update(Cv=vf.T @ qf, qbar=qf.sum(0), vbar=vf.sum(0))
    else:
        parts.update(Cv=qf.new_zeros(0), qbar=qf.new_zeros(0), vbar=qf.new_zeros(0))
    if comm.is_local:
        return parts
    flat = comm.all_reduce(torch.cat([t.reshape(-1) for t in parts.values()]))
    out, i = {}, 0
    for name, t in parts.items():
        out[name] = flat[i : i + t.numel()].view(t.shape)
        i += t.numel()
    return out


def _cwcl_cross(x, u, C, ybar, ubar, count):
    """``Σ_j ŵ_ij <x_i, y_j>`` for rows ``x`` with targets ``u``: ``(½ u_iᵀ C x_i + ½ <x_i, ȳ>) / n_i`` with the
    normaliser ``n_i = Σ_j w_ij = ½(<u_i, ū> + count)`` (``C = Σ_j u_j y_jᵀ``, ``ȳ = Σ_j y_j``)."""
    xf, uf = x.to(C.dtype), u.to(C.dtype)
    norm = 0.5 * (uf @ ubar + count)
    return (0.5 * ((uf @ C) * xf).sum(1) + 0.5 * (xf @ ybar)) / norm


def _cwcl_subtract_targets(comm, dq, dk, qf, kf, u, v, a, w, C, Cv, kbar, qbar, ubar, vbar, N, M, symmetric):
    """Subtract the target parts ``Σ_j a_i ŵ_ij k_j`` (from ``dq``) and ``Σ_i a_i ŵ_ij q_i`` (from ``dk``), and
    with ``symmetric`` the column targets, all in closed form (``Σ_j <u_i, u_j> k_j = Cᵀ u_i``)."""
    acc = dq.dtype
    uf = u.to(acc)
    alpha = a / (0.5 * (uf @ ubar + N))  # a_i / n_i
    dq -= alpha[:, None] * (0.5 * (uf @ C) + 0.5 * kbar)
    # dk_j -= ½ (Σ_i α_i q_i u_iᵀ) u_j + ½ Σ_i α_i q_i  (global sums over the queries of every rank)
    A, aq = _all_sum(comm, (qf * alpha[:, None]).T @ uf, alpha @ qf)
    dk -= 0.5 * (uf @ A.T) + 0.5 * aq  # u_j: the targets of sample j, whose key is this rank's row j
    if symmetric:
        vf = v.to(acc)
        off = comm.key_offset()
        w_own = w[off : off + kf.shape[0]]
        beta = w_own / (0.5 * (vf @ vbar + M))
        dk -= beta[:, None] * (0.5 * (vf @ Cv) + 0.5 * qbar)
        B, bk = _all_sum(comm, (kf * beta[:, None]).T @ vf, beta @ kf)
        dq -= 0.5 * (vf @ B.T) + 0.5 * bk


def _all_sum(comm, *tensors):
    if comm.is_local:
        return tensors
    flat = comm.all_reduce(torch.cat([t.reshape(-1) for t in tensors]))
    out, i = [], 0
    for t in tensors:
        out.append(flat[i : i + t.numel()].view(t.shape))
        i += t.numel()
    return out


# ------------------------------------------------------------------------------------------------- public


def _check_features(name: str, t, rows: int, of: str, device) -> None:
    _checks.check_float_tensor(name, t, ndim=2)
    if t.shape[0] != rows:
        raise ValueError(f"{name} must have {rows} rows (one per row of {of}), got shape {tuple(t.shape)}")
    if t.device != device:
        raise ValueError(f"{name} must be on the same device as {of} ({device}), got {t.device}")


def distill_loss(
    query: torch.Tensor,
    key: torch.Tensor,
    teacher_query: torch.Tensor,
    teacher_key: torch.Tensor,
    *,
    logit_scale=None,
    temperature=None,
    teacher_logit_scale=None,
    teacher_temperature=None,
    symmetric: bool = True,
    reduction: str = "mean",
    backend: str = "auto",
    group=None,
    exchange: str = "ring",
    grad_reduction: str = "mean",
) -> torch.Tensor:
    """In-batch distillation without the N×M matrices: open_clip's ``DistillClipLoss`` distillation term.

    ``−Σ_j softmax(t_i)_j · log softmax(z_i)_j`` with student logits ``z = s·Q Kᵀ`` and teacher logits
    ``t = s_T·Q_T K_Tᵀ``, averaged over the rows; with ``symmetric`` the same over the columns (``zᵀ`` against
    ``tᵀ``), and the two halved.  Equal to ``xloss.reference.distill_loss``.

    Args:
        query, key: the student's ``[N, D]``, ``[M, D]``.
        teacher_query, teacher_key: the teacher's ``[N, E]``, ``[M, E]`` (``E`` may differ from ``D``; any float
            dtype, same device).  They get no gradient.
        logit_scale / temperature: the student's scale ``s`` (a tensor gets its gradient); default 1.
        teacher_logit_scale / teacher_temperature: the teacher's ``s_T`` (no gradient); default 1.
        symmetric: add the column (key→query) term, as open_clip does.
        reduction: ``"mean"``, ``"sum"`` (of the row and column terms, halved) or ``"none"`` (per query
            ``½(r_i + c_i)``, which needs N = M; one-way: ``r_i``).
        backend, group, exchange, grad_reduction: as :func:`xloss.info_nce` (across ranks the teacher's keys
            travel with the student's).

    Returns:
        The loss (0-dim) or ``[N]`` terms; float32 for half inputs, float64 for float64.
    """
    _checks.check_query_key(query, key)
    n, m = query.shape[0], key.shape[0]
    _check_features("teacher_query", teacher_query, n, "query", query.device)
    _check_features("teacher_key", teacher_key, m, "key", query.device)
    if teacher_query.shape[1] != teacher_key.shape[1]:
        raise ValueError(f"teacher_query and teacher_key must have the same feature dimension, got "
                         f"{teacher_query.shape[1]} and {teacher_key.shape[1]}")
    _check_options(symmetric, reduction)
    name = _dispatch.resolve("distill", backend, query.device, query.dtype, local=group is None, cells=n * m)
    scale = _checks.resolve_scale(logit_scale, temperature, query.device)
    tscale = _checks.resolve_scale(teacher_logit_scale, teacher_temperature, query.device, prefix="teacher_")
    need_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (query, key, scale))
    comm, _ = _comm.make(group, exchange, grad_reduction, query, key, None, [scale], need_grad, name, groups=True)
    _check_paired(comm, n, m, symmetric and reduction == "none", "reduction='none' with symmetric=True")
    if name in ("reference", "dense"):
        return in_accumulation_dtype(_reference.distill_loss(*_dispatch.dense_inputs(name, query, key, teacher_query, teacher_key),
                                       logit_scale=scale,
                                       teacher_logit_scale=tscale, symmetric=symmetric, reduction=reduction
                                       ), query.dtype)
    options = SoftTargetOptions("teacher", symmetric, reduction, name)
    return SoftTargetFunction.apply(query, key, scale, teacher_query.detach(), teacher_key.detach(), tscale.detach(),
                                    options, comm)


def cwcl_loss(
    query: torch.Tensor,
    key: torch.Tensor,
    *,
    logit_scale=None,
    temperature=None,
    query_targets: torch.Tensor | None = None,
    key_targets: torch.Tensor | None = None,
    symmetric: bool = False,
    reduction: str = "mean",
    backend: str = "auto",
    group=None,
    exchange: str = "ring",
    grad_reduction: str = "mean",
) -> torch.Tensor:
    """CWCL (Srinivasa et al., NeurIPS 2023), continuously weighted contrastive loss, without N×N matrices.

    Row term ``−Σ_j ŵ_ij log softmax(z_i)_j`` with ``z = s·Q Kᵀ``, ``w_ij = ½<u_i, u_j> + ½`` and ``ŵ_ij = w_ij /
    Σ_j w_ij``; ``u = query_targets`` (default ``query.detach()``: the frozen modality's embeddings, which should
    be L2-normalised so that ``w`` lies in [0, 1]).  ``symmetric=True`` adds the column term with weights from
    ``key_targets`` (default ``key.detach()``), halved.  The batch is paired (N = M, sample j's targets weigh key
    j; across ranks each rank holds its samples' queries and keys).  Equal to ``xloss.reference.cwcl_loss``.

    The targets' terms have closed forms through ``Uᵀ K`` (``[D_u, D]``), so the cost is that of
    :func:`xloss.info_nce` plus O(N·D·D_u).

    Args:
        query, key: ``[N, D]`` each.
        logit_scale / temperature: ``s`` (a tensor gets its gradient); default 1.
        query_targets: ``[N, D_u]``; key_targets: ``[N, D_v]`` (symmetric only).  No gradient flows to them.
        symmetric, reduction, backend, group, exchange, grad_reduction: as :func:`distill_loss`.
    """
    _checks.check_query_key(query, key)
    n, m = query.shape[0], key.shape[0]
    u = query.detach() if query_targets is None else query_targets
    v = (key.detach() if key_targets is None else key_targets) if symmetric else None
    _check_features("query_targets", u, n, "query", query.device)
    if v is not None:
        _check_features("key_targets", v, m, "key", query.device)
    elif key_targets is not None:
        raise ValueError("key_targets weigh the column term: pass symmetric=True with them")
    _check_options(symmetric, reduction)
    name = _dispatch.resolve("info_nce", backend, query.device, query.dtype, local=group is None, cells=n * m)
    scale = _checks.resolve_scale(logit_scale, temperature, query.device)
    need_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (query, key, scale))
    comm, _ = _comm.make(group, exchange, grad_reduction, query, key, None, [scale], need_grad, name, groups=True)
    _check_paired(comm, n, m, True, "cwcl_loss")
    if name in ("reference", "dense"):
        q, k, u, v = _dispatch.dense_inputs(name, query, key, u, v)
        return in_accumulation_dtype(_reference_soft.cwcl_loss(q, k, logit_scale=scale, query_targets=u, key_targets=v,
                                         symmetric=symmetric, reduction=reduction), query.dtype)
    options = SoftTargetOptions("cwcl", symmetric, reduction, name)
    return SoftTargetFunction.apply(query, key, scale, u.detach(), None if v is None else v.detach(),
                                    scale.new_ones(()), options, comm)


def _check_options(symmetric, reduction) -> None:
    if not isinstance(symmetric, bool):
        raise TypeError(f"symmetric must be a bool, got {type(symmetric).__name__}")
    _checks.check_reduction(reduction)


def _check_paired(comm, n: int, m: int, needed: bool, what: str) -> None:
    """A paired batch (query i ↔ key i): N = M, and across ranks n_r = m_r on every rank."""
    if not needed:
        return
    sizes = (comm.layout.n, comm.layout.m) if not comm.is_local else ([n], [m])
    if sizes[0] != sizes[1]:
        raise ValueError(f"{what} needs a paired batch (as many queries as keys, on every rank): got queries "
                         f"{sizes[0]} and keys {sizes[1]}")


__all__ = ["KINDS", "SoftTargetFunction", "SoftTargetOptions", "cwcl_loss", "distill_loss"]
