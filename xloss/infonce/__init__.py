"""Memory-efficient InfoNCE / CLIP loss (SPEC.md §1): the whole family in one place.

Layout (op → Function → function, as quack):

* ``engine.py``   the engine interface (``InfoNCEEngine``): a statistics sweep ``lse`` and a gradient sweep
  ``grad``; implemented by ``chunked.py`` (row strips in PyTorch, any device) and ``triton.py`` (fused kernels);
* ``ops.py``      each sweep as a ``torch.library`` custom op (``xloss::info_nce_lse``, ``xloss::info_nce_grad``);
* ``sweeps.py``   where the keys come from: one process, a ring of ranks, or an all-gather;
* here            :class:`InfoNCEOptions`, the one autograd Function :class:`InfoNCEFunction` (the loss formula,
  once, for eager, ``torch.compile`` and multi-rank runs alike) and the public :func:`info_nce`.

Everything besides the two sweeps is O((N+M)·D) and lives in the Function: the positive logits, label
smoothing, the reduction, the target terms of the gradient and the gradient of the logit scale
(``ds = Σ_i <q_i, dq_u_i>``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .. import _checks, _comm, _dispatch
from .. import reference as _reference
from .._tiling import accumulation_dtype
from . import chunked as _chunked
from . import sweeps


@dataclass(frozen=True)
class InfoNCEOptions:
    """Every non-tensor option of one call (hashable: a constant for ``torch.compile``)."""

    symmetric: bool = True
    label_smoothing: float = 0.0
    reduction: str = "mean"
    engine: str = "chunked"  # "chunked" | "triton" (see xloss._dispatch)
    keep_logits: bool = False  # the chunked engine keeps small logits for backward (3 sweeps instead of 4)


class InfoNCEFunction(torch.autograd.Function):
    """Autograd for InfoNCE: saves the inputs and the split LSE statistics, recomputes tiles in backward.

    Forward args: ``q [n, D]``, ``k [m, D]`` (this rank's rows; the whole batch on one process), ``scale``
    (0-dim), ``labels [n]`` (long, global key indices), ``options`` (:class:`InfoNCEOptions`), ``comm`` (a
    communicator of ``xloss._comm``: ``LOCAL`` on one process).  Gradients are multiplied by
    ``comm.grad_factor`` (the world size under the default ``grad_reduction="mean"``, else 1).
    """

    @staticmethod
    def forward(ctx, q, k, scale, labels, options: InfoNCEOptions, comm):
        acc = accumulation_dtype(q.dtype)
        eps, symmetric = options.label_smoothing, options.symmetric
        N, M = comm.total_rows(q.shape[0]), comm.total_keys(k.shape[0])
        s = scale.detach().to(acc)
        qf, kf = (q.to(acc), k.to(acc)) if eps else (None, None)  # only smoothing needs them here
        sums = comm.all_reduce(torch.stack([qf.sum(0), kf.sum(0)])) if eps else None  # global Σ q, Σ k
        # z_pos comes from the same tiles as the maxima, so max - z_pos is exactly 0 when the positive wins.
        row, col, z_pos, keys, logits = sweeps.lse(comm, q, k, s, labels, symmetric, options.keep_logits,
                                                   options.engine)
        rows = (row[0] - z_pos) + row[1]  # LSE - z_pos, the max subtracted first (as log_softmax)
        if eps:
            rows = rows + eps * (z_pos - s * (qf @ sums[1]) / M)  # ε(LSE - mean_j z_ij) - ε(LSE - z_pos)
        if symmetric:
            cols = (col[0, labels] - z_pos) + col[1, labels]
            if eps:
                e_key = s * comm.gather_keys(kf @ sums[0]) / N  # mean_i z_ij of every key j
                cols = cols + eps * (z_pos - e_key[labels])
            terms = (rows + cols) / 2
        else:
            terms = rows
        ctx.save_for_backward(q, k, scale, labels, row, col, sums, keys, logits)
        ctx.options, ctx.comm = options, comm
        return comm.reduce(terms, options.reduction, N)

    @staticmethod
    def backward(ctx, grad_out):
        q, k, scale, labels, row, col, sums, keys, logits = ctx.saved_tensors
        options, comm = ctx.options, ctx.comm
        eps, symmetric = options.label_smoothing, options.symmetric
        acc = row.dtype
        n, m = q.shape[0], k.shape[0]
        N, M = comm.total_rows(n), comm.total_keys(m)
        g = grad_out.to(acc)
        g = (g / N if options.reduction == "mean" else g).expand(n)  # d loss / d term_i of this rank's queries
        a = g / 2 if symmetric else g  # weight of row i's softmax
        w = None
        if symmetric:  # weight of column j's softmax: Σ a_i over the queries (of every rank) whose positive is j
            w = comm.all_reduce(torch.zeros(M, dtype=acc, device=q.device).index_add_(0, labels, a))
        s = scale.detach().to(acc)
        pos = (1 - eps) * (a + a if symmetric else a)  # weight of the target entry (i, labels[i])
        qf = q.to(acc)
        dq, dk = sweeps.grad(comm, q, qf, k, keys, s, row, col, a, w, labels, pos, logits, options.engine)
        if eps:  # the uniform ε/M and ε/N parts of smoothing; Σ_i a_i q_i and Σ_j w_j k_j are global sums
            qsum, ksum = sums[0], sums[1]
            off = comm.key_offset()
            w_own = w[off : off + m] if symmetric else None
            kf = k.to(acc)
            aq, wk = comm.all_reduce(torch.stack([a @ qf, w_own @ kf if symmetric else torch.zeros_like(qsum)]))
            dq -= (eps / M) * a[:, None] * ksum
            dk -= (eps / M) * aq
            if symmetric:
                dq -= (eps / N) * wk
                dk -= (eps / N) * w_own[:, None] * qsum
        needs, f = ctx.needs_input_grad, comm.grad_factor
        grad_scale = grad_q = grad_k = None
        if needs[2]:  # Σ G∘(q kᵀ) (this rank's share on many)
            grad_scale = ((qf * dq).sum() * f if f != 1 else (qf * dq).sum()).to(scale.dtype)
        if needs[0]:
            grad_q = ((s * f) * dq if f != 1 else s * dq).to(q.dtype)
        if needs[1]:
            grad_k = ((s * f) * dk if f != 1 else s * dk).to(k.dtype)
        return grad_q, grad_k, grad_scale, None, None, None


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
    grad_reduction: str = "mean",
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
        backend: ``"auto"`` (Triton on CUDA, chunked PyTorch elsewhere), ``"triton"``, ``"chunked"`` (alias
            ``"cpu"``; runs on any device) or ``"reference"`` (the naive definition).
        group: a ``torch.distributed`` ProcessGroup: ``query``/``key`` are this rank's rows of a batch spread
            over the group (sizes may differ across ranks), ``labels`` are GLOBAL key indices (default: local
            query ``i`` ↔ key ``offset_r + i``), and the returned value is the loss of the whole batch, the
            same on every rank (``"none"``: this rank's ``[n_r]`` terms).  None (default) or a one-rank group:
            single process.  Every rank must call the loss and run its backward.
        exchange: how keys cross ranks: ``"ring"`` (default; memory flat in the world size) or
            ``"all_gather"`` (fewer, larger messages).
        grad_reduction: how the caller combines gradients across ranks.  ``"mean"`` (default): gradients are
            scaled by the world size so that DDP's / FSDP's averaging of parameter gradients gives exactly the
            single-process gradient of the global loss, with no change to the training loop.  ``"sum"``: each
            rank gets its exact share (the sum over ranks is the gradient), for users who sum gradients.

    Returns:
        0-dim loss, or ``[N]`` per-query terms for ``reduction="none"``; float32 for half inputs, float64 for
        float64 inputs.
    """
    _checks.check_query_key(query, key)
    if not isinstance(symmetric, bool):
        raise TypeError(f"symmetric must be a bool, got {type(symmetric).__name__}")
    _checks.check_label_smoothing(label_smoothing)
    _checks.check_reduction(reduction)
    n, m = query.shape[0], key.shape[0]
    name = _dispatch.resolve("info_nce", backend, query.device, query.dtype)
    scale = _checks.resolve_scale(logit_scale, temperature, query.device)
    need_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (query, key, scale))
    comm, _ = _comm.make(group, exchange, grad_reduction, query, key, labels, [scale], need_grad, name)
    if comm.is_local:
        _checks.check_positives(labels, n, m, query.device, "query", "key", "key")
    if name == "reference":
        return _reference.info_nce(
            query, key, logit_scale=scale, labels=labels, symmetric=symmetric,
            label_smoothing=label_smoothing, reduction=reduction,
        )
    if labels is None:
        labels = comm.default_labels(n, query.device)
    keep = comm.is_local and name == "chunked" and _chunked.keeps_logits(
        n, m, accumulation_dtype(query.dtype).itemsize)
    options = InfoNCEOptions(symmetric, float(label_smoothing), reduction, name, keep)
    return InfoNCEFunction.apply(query, key, scale, labels.long(), options, comm)


__all__ = ["InfoNCEFunction", "InfoNCEOptions", "info_nce"]
