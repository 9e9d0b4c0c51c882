"""Memory-efficient InfoNCE / CLIP loss (SPEC.md §1).

``info_nce`` checks its arguments, picks a backend and runs ``InfoNCEFunction``, one autograd Function for
every fast path.  A backend supplies two tile sweeps (see ``cpu.py`` and ``triton.py``):

* ``lse``: row and column log-sum-exp statistics of the logits, from the same tiles, kept split as
  ``[max, log Σ exp(z - max)]`` so that no large fp32 number is subtracted from another, the positive
  logits from those tiles, and (CPU, small problems only) the logits themselves when they fit its budget;
* ``grad``: ``dq_u = P k`` and ``dk_u = Pᵀ q`` for ``P_ij = a_i·softmax_row + w_j·softmax_col``.

Everything else is O((N+M)·D) and lives here once: the positive logits, label smoothing, the reduction, the
target terms of the gradient and the gradient of the logit scale (``ds = Σ_i <q_i, dq_u_i>``).
"""

from __future__ import annotations

import torch

from .. import _backend, _checks
from .. import reference as _reference
from .._reduce import reduce_terms
from . import cpu as _cpu


def _engine(name: str):
    if name == "triton":
        from . import triton as _triton  # imported lazily: Triton is optional

        return _triton
    return _cpu


def _forward(q, k, scale, labels, symmetric: bool, eps: float, reduction: str, engine):
    """The forward of :class:`InfoNCEFunction` (also run by the ``xloss::info_nce_forward`` custom op).

    Returns ``(loss, row, col, logits)``: the loss and what backward needs besides the inputs (``col`` and
    ``logits`` may be None; see ``cpu.lse``).
    """
    acc = _cpu.accumulation_dtype(q.dtype)
    n, m = q.shape[0], k.shape[0]
    s = scale.detach().to(acc)
    # z_pos comes from the same tiles as the maxima, so max - z_pos is exactly 0 when the positive wins.
    row, col, z_pos, logits = engine.lse(q, k, s, symmetric, labels)
    qf, kf = q.to(acc), k.to(acc)
    rows = (row[0] - z_pos) + row[1]  # LSE - z_pos, the max subtracted first (as log_softmax)
    if eps:
        rows = rows + eps * (z_pos - s * (qf @ kf.sum(0)) / m)  # ε(LSE - mean_j z_ij) - ε(LSE - z_pos)
    if symmetric:
        cols = (col[0, labels] - z_pos) + col[1, labels]
        if eps:
            cols = cols + eps * (z_pos - s * (kf[labels] @ qf.sum(0)) / n)
        terms = (rows + cols) / 2
    else:
        terms = rows
    return reduce_terms(terms, reduction), row, col, logits


def _backward(grad_out, q, k, scale, labels, row, col, logits, symmetric: bool, eps: float, reduction: str,
              engine, needs):
    """The backward of :class:`InfoNCEFunction`: ``(grad_q, grad_k, grad_scale)``, None where ``needs``
    (three bools for q, k, scale) is False."""
    acc = row.dtype
    n, m = q.shape[0], k.shape[0]
    g = grad_out.to(acc)
    g = (g / n if reduction == "mean" else g).expand(n)  # d loss / d ℓ_i
    a = g / 2 if symmetric else g  # weight of row i's softmax
    w = torch.zeros(m, dtype=acc, device=q.device).index_add_(0, labels, a) if symmetric else None
    s = scale.detach().to(acc)
    dq, dk = engine.grad(q, k, s, row, col, a, w, logits)
    # Target terms, O((N+M)·D): -(1-ε)·(weight of positive) and the uniform ε/M, ε/N parts of smoothing.
    qf, kf = q.to(acc), k.to(acc)
    pos = (1 - eps) * (a + a if symmetric else a)
    dq -= pos[:, None] * kf[labels]
    dk.index_add_(0, labels, -pos[:, None] * qf)
    if eps:
        dq -= (eps / m) * a[:, None] * kf.sum(0)
        dk -= (eps / m) * (a @ qf)
        if symmetric:
            dq -= (eps / n) * (w @ kf)
            dk -= (eps / n) * w[:, None] * qf.sum(0)
    grad_scale = (qf * dq).sum() if needs[2] else None  # Σ G∘(q kᵀ)
    grad_q = (s * dq).to(q.dtype) if needs[0] else None
    grad_k = (s * dk).to(k.dtype) if needs[1] else None
    if grad_scale is not None:
        grad_scale = grad_scale.to(scale.dtype)
    return grad_q, grad_k, grad_scale


class InfoNCEFunction(torch.autograd.Function):
    """Autograd for InfoNCE: saves the inputs and the LSE vectors, recomputes tiles in backward.

    Forward args: ``q [N, D]``, ``k [M, D]``, ``scale`` (0-dim), ``labels [N]`` (long), ``symmetric``,
    ``label_smoothing``, ``reduction``, ``engine`` (module with ``lse`` and ``grad``).
    """

    @staticmethod
    def forward(ctx, q, k, scale, labels, symmetric, label_smoothing, reduction, engine):
        eps = float(label_smoothing)
        loss, row, col, logits = _forward(q, k, scale, labels, symmetric, eps, reduction, engine)
        ctx.save_for_backward(q, k, scale, labels, row, col, logits)
        ctx.options = (symmetric, eps, reduction, engine)
        return loss

    @staticmethod
    def backward(ctx, grad_out):
        q, k, scale, labels, row, col, logits = ctx.saved_tensors
        symmetric, eps, reduction, engine = ctx.options
        grads = _backward(grad_out, q, k, scale, labels, row, col, logits, symmetric, eps, reduction, engine,
                          ctx.needs_input_grad[:3])
        return (*grads, None, None, None, None, None)


def info_nce(
    query: torch.Tensor,
    key: torch.Tensor,
    *,
    logit_scale=None,
    temperature=None,
    labels: torch.Tensor | None = None,
    symmetric: bool = True,
    label_smoothing: float = 0.0,
    reduction: str = "mean",
    backend: str = "auto",
    group=None,
    exchange: str = "ring",
) -> torch.Tensor:
    """InfoNCE / CLIP contrastive loss without the N×M logits matrix.

    Equal to ``xloss.reference.info_nce`` (and to open_clip's ``ClipLoss`` with default labels): logits
    ``z_ij = s·<q_i, k_j>``, cross-entropy over each row (query→key) and, when ``symmetric``, over the
    positive key's column (key→query), averaged.

    Args:
        query: ``[N, D]`` float32/float16/bfloat16/float64 (image features in CLIP).
        key: ``[M, D]``, same dtype and device; ``M > N`` adds extra negatives.  ``M < N`` needs ``labels``.
        logit_scale: multiplicative scale ``s``: a float or a 0-dim tensor (gets a gradient), e.g.
            ``model.logit_scale.exp()``.  Default 1.
        temperature: ``τ``, the same as ``logit_scale=1/τ``; give one or the other.
        labels: ``[N]`` integer index of each query's positive key; default ``arange(N)``.
        symmetric: add the key→query term (CLIP); False gives the one-way InfoNCE.
        label_smoothing: ``ε`` in [0, 1], as ``F.cross_entropy``, on both terms.
        reduction: ``"mean"`` (default), ``"sum"`` or ``"none"`` (per-query terms ``[N]``).
        backend: ``"auto"`` (Triton on CUDA, chunked PyTorch elsewhere), ``"triton"``, ``"cpu"`` or
            ``"reference"`` (the naive definition).
        group: a ``torch.distributed`` ProcessGroup: ``query``/``key`` are this rank's rows of a batch spread
            over the group, ``labels`` are global key indices, and the loss is that of the whole batch (see
            ``xloss.distributed``); None (default) or a one-rank group: single process.
        exchange: how keys cross ranks when ``group`` is given: ``"ring"`` (default) or ``"all_gather"``.

    Returns:
        0-dim loss, or ``[N]`` per-query terms for ``reduction="none"``; float32 for half inputs, float64 for
        float64 inputs.
    """
    _checks.check_float_tensor("query", query, ndim=2)
    _checks.check_float_tensor("key", key, ndim=2)
    _checks.check_same_dtype_device(query=query, key=key)
    if query.shape[1] != key.shape[1]:
        raise ValueError(
            f"query and key must have the same feature dimension D, got query {tuple(query.shape)} "
            f"and key {tuple(key.shape)}"
        )
    if group is not None and torch.compiler.is_compiling():
        raise ValueError("group= (cross-rank negatives) is not supported inside torch.compile: leave group=None "
                         "in the compiled function, or call xloss.info_nce(..., group=...) outside it")
    if group is not None:
        from .. import distributed as _distributed  # lazily: torch.distributed only when asked for

        if _distributed.world_size(group) > 1:
            return _distributed.info_nce(
                query, key, logit_scale=logit_scale, temperature=temperature, labels=labels, symmetric=symmetric,
                label_smoothing=label_smoothing, reduction=reduction, backend=backend, group=group,
                exchange=exchange,
            )
    _checks.check_choice("exchange", exchange, ("ring", "all_gather"))
    n, m = query.shape[0], key.shape[0]
    _checks.check_positives(labels, n, m, query.device, "query", "key", "key")
    if not isinstance(symmetric, bool):
        raise TypeError(f"symmetric must be a bool, got {type(symmetric).__name__}")
    _checks.check_label_smoothing(label_smoothing)
    _checks.check_reduction(reduction)
    scale = _checks.resolve_scale(logit_scale, temperature, query.device)
    name = _backend.resolve(backend, query.device, "info_nce")
    if name == "reference":
        return _reference.info_nce(
            query, key, logit_scale=scale, labels=labels, symmetric=symmetric,
            label_smoothing=label_smoothing, reduction=reduction,
        )
    if labels is None:
        labels = torch.arange(n, device=query.device)
    if torch.compiler.is_compiling():  # opaque custom ops instead of the engines' Python tile loops
        return _ops.info_nce(query, key, scale, labels.long(), symmetric, float(label_smoothing), reduction, name)
    return InfoNCEFunction.apply(
        query, key, scale, labels.long(), symmetric, float(label_smoothing), reduction, _engine(name)
    )


from . import ops as _ops  # last: it registers the custom ops, which run _forward/_backward above

__all__ = ["InfoNCEFunction", "info_nce"]
