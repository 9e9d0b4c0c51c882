"""Memory-efficient sigmoid loss (SigLIP, SPEC.md §2).

``sigmoid_loss`` checks its arguments, picks an engine (``xloss._dispatch``) and runs ``SigmoidLossFunction``,
the one autograd Function of the family, for eager, ``torch.compile`` and multi-rank runs alike.  Nothing normalises a row of the logits, so the gradient of each logit,
``dZ_ij = -y_ij·σ(-y_ij z_ij)``, is known in the forward sweep: an engine's ``forward_backward`` (``chunked.py``,
``triton.py``) returns the loss and the gradients ``dq = s·dZ k``, ``dk = s·dZᵀ q``, ``ds = Σ dZ∘(q kᵀ)``,
``db = Σ dZ`` from one sweep over the logit tiles (3 GEMM sweeps in all, no recompute).  The Function keeps
those O((N+M)·D) gradients and its backward only multiplies them by ``grad_output`` (and 1/N for the mean).

``reduction="none"`` is the exception: ``grad_output`` then weights each query's row differently, which
changes ``dk``, so forward computes only the loss rows and backward runs one more sweep with those weights.

The engine contract (``engine.py``; both engines; run through the custom op of ``ops.py``, block by block
across ranks by ``sweeps.py``)::

    forward_backward(q, k, scale, bias, labels, need_grad, *, row_weight=None, per_row=False,
                     qg=None, kg=None) -> (loss, dq, dk, ds, db)

``q [n, D]``, ``k [m, D]`` one block of queries and of keys; ``scale``, ``bias`` 0-dim tensors (accumulation
dtype); ``labels [n]`` long, each query's positive key index inside this key block or -1 (no positive here:
all its pairs are negatives), or None when group ids ``qg [n]``, ``kg [m]`` (keyword arguments, long) say
instead that ``y_ij = +1`` iff ``qg[i] == kg[j]``; ``loss`` the 0-dim sum of ``-log σ(y z)`` over the block
(``[n]`` row sums when ``per_row``), ``dq [n, D]``, ``dk [m, D]``, ``ds``, ``db`` the gradients of that sum
(of ``Σ_i w_i ℓ_i`` when ``row_weight=w``), no 1/N, no grad_output, or None when ``need_grad`` is False; all
in the accumulation dtype (fp32 for fp16/bf16/fp32 inputs, fp64 for fp64).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .. import _checks, _comm, _dispatch
from .. import reference as _reference
from .._autograd import first_order_only
from .._tiling import accumulation_dtype, in_accumulation_dtype
from . import sweeps


@dataclass(frozen=True)
class SigmoidOptions:
    """Every non-tensor option of one call (hashable: a constant for ``torch.compile``)."""

    reduction: str = "mean"
    engine: str = "chunked"  # "chunked" | "triton" (see xloss._dispatch)
    need_grad: bool = True  # form the gradients in forward (False: nothing requires grad on any rank)


def _groups(query_groups, key_groups):
    """The ``groups`` argument of ``sweeps.run``: None (labels) or the pair of group-id tensors."""
    return None if query_groups is None else (query_groups, key_groups)


def _scaled(t, factor, like: torch.Tensor):
    """``factor·t`` cast to ``like``'s dtype (the gradient of an input of that dtype)."""
    return (t * factor).to(like.dtype)


class SigmoidLossFunction(torch.autograd.Function):
    """Autograd for the sigmoid loss: gradients formed in forward, scaled by ``grad_output`` in backward.

    Forward args: ``q [n, D]``, ``k [m, D]`` (this rank's rows; the whole batch on one process), ``scale`` and
    ``bias`` (0-dim), ``labels [n]`` (long, global key indices), ``query_groups [n]`` and ``key_groups [m]``
    (long group ids of this rank's rows; then ``labels`` is None, else they are), ``options``
    (:class:`SigmoidOptions`), ``comm`` (``xloss._comm.LOCAL`` on one process).  ``"none"``: forward returns
    the per-query terms and backward runs the sweep again with ``grad_output`` as row weights (it changes
    ``dk``).  Gradients are multiplied by ``comm.grad_factor`` (the world size under the default
    ``grad_reduction="mean"``).
    """

    @staticmethod
    def forward(ctx, q, k, scale, bias, labels, query_groups, key_groups, options: SigmoidOptions, comm):
        acc = accumulation_dtype(q.dtype)
        s, b = scale.detach().to(acc), bias.detach().to(acc)
        ctx.options, ctx.comm = options, comm
        groups = _groups(query_groups, key_groups)
        if options.reduction == "none":
            terms = sweeps.run(comm, q, k, s, b, labels, False, options.engine, per_row=True,
                               groups=groups)[0]
            ctx.save_for_backward(q, k, scale, bias, labels, query_groups, key_groups)
            return terms
        loss, dq, dk, ds, db = sweeps.run(comm, q, k, s, b, labels, options.need_grad, options.engine,
                                          groups=groups)
        if options.need_grad:
            ctx.save_for_backward(q, k, scale, bias, dq, dk, ds, db)
        loss = comm.global_sum(loss)
        return loss / comm.total_rows(q.shape[0]) if options.reduction == "mean" else loss

    @staticmethod
    @first_order_only("sigmoid_loss")
    def backward(ctx, grad_out):
        options, comm = ctx.options, ctx.comm
        if options.reduction == "none":
            q, k, scale, bias, labels, query_groups, key_groups = ctx.saved_tensors
            acc = accumulation_dtype(q.dtype)
            _, dq, dk, ds, db = sweeps.run(comm, q, k, scale.detach().to(acc), bias.detach().to(acc), labels, True,
                                           options.engine, row_weight=grad_out.to(acc).contiguous(),
                                           groups=_groups(query_groups, key_groups))
            g = 1.0
        else:
            q, k, scale, bias, dq, dk, ds, db = ctx.saved_tensors
            g = grad_out.to(dq.dtype)
            if options.reduction == "mean":
                g = g / comm.total_rows(q.shape[0])
        if comm.grad_factor != 1:
            g = g * comm.grad_factor
        need = ctx.needs_input_grad
        return (
            _scaled(dq, g, q) if need[0] else None,
            _scaled(dk, g, k) if need[1] else None,
            _scaled(ds, g, scale) if need[2] else None,
            _scaled(db, g, bias) if need[3] else None,
            None, None, None, None, None,
        )


def sigmoid_loss(
    query: torch.Tensor,
    key: torch.Tensor,
    *,
    logit_scale=None,
    temperature=None,
    logit_bias,
    labels: torch.Tensor | None = None,
    query_groups: torch.Tensor | None = None,
    key_groups: torch.Tensor | None = None,
    reduction: str = "mean",
    backend: str = "auto",
    group=None,
    exchange: str = "ring",
    grad_reduction: str = "mean",
) -> torch.Tensor:
    """Sigmoid loss (SigLIP) without the N×M logits matrix.

    Equal to ``xloss.reference.sigmoid_loss`` and to open_clip's ``SigLipLoss`` (one process, default
    labels): logits ``z_ij = s·<q_i, k_j> + b``, loss ``-(1/N) Σ_ij log σ(y_ij z_ij)`` with ``y_ij = +1`` for
    the positive pair ``j = labels[i]`` and ``-1`` for every other pair; with group ids, ``y_ij = +1`` iff
    ``key_groups[j] == query_groups[i]``.

    Args:
        query: ``[N, D]`` float32/float16/bfloat16/float64 (image features in SigLIP).
        key: ``[M, D]``, same dtype and device; ``M > N`` adds extra negatives.  ``M < N`` needs ``labels``.
        logit_scale: multiplicative scale ``s``: a float or a 0-dim tensor (gets a gradient), already
            exponentiated as open_clip passes it (``model.logit_scale.exp()``).
        temperature: ``τ``, the same as ``logit_scale=1/τ``; give exactly one of the two.
        logit_bias: additive bias ``b``: a float or a 0-dim tensor (gets a gradient).  Required.
        labels: ``[N]`` integer index of each query's positive key; default ``arange(N)``.
        query_groups, key_groups: ``[N]`` and ``[M]`` integer group ids (same device as ``query``), given
            together and instead of ``labels``: the pair (i, j) is positive (``y_ij = +1``) iff
            ``key_groups[j] == query_groups[i]``, negative otherwise, for every pair, so that duplicates and
            same-class items are not pushed apart.  A query may have several positives or none (then all its
            pairs are negatives); 1-to-K (K captions per image) is K keys sharing their query's group id.  The
            reduction is as without groups (``"mean"`` still divides by N, the number of queries).  ``M < N``
            is allowed.  With ``group``: each rank passes the ids of its own rows; they are compared across
            all ranks (ids are global, like labels).
        reduction: ``"mean"`` (default: ``Σ/N``, N the number of queries, as open_clip), ``"sum"`` or
            ``"none"`` (per-query row sums ``[N]``).
        backend: ``"auto"`` (Triton on CUDA, chunked PyTorch elsewhere), ``"triton"``, ``"chunked"`` (alias
            ``"cpu"``; any device) or ``"reference"`` (the naive definition).
        group: a ``torch.distributed`` ProcessGroup: the keys of every rank are negatives too, labels are
            global key indices, and the returned value is the global loss, the same on every rank (``"none"``:
            this rank's ``[n_r]`` row sums).  None or a one-rank group: this process alone.
        exchange: ``"ring"`` (default) or ``"all_gather"``, with ``group``.
        grad_reduction: ``"mean"`` (default): gradients scaled by the world size so that DDP's / FSDP's
            averaging gives exactly the single-process gradient of the global loss; ``"sum"``: each rank's
            exact share (the sum over ranks is the gradient).

    Returns:
        0-dim loss, or ``[N]`` per-query terms for ``reduction="none"``; float32 for half inputs, float64 for
        float64 inputs.
    """
    _checks.check_query_key(query, key)
    _checks.check_reduction(reduction)
    if logit_scale is None and temperature is None:
        raise TypeError("logit_scale must be a float or a 0-dim tensor (or pass temperature=, its inverse), got None")
    n, m = query.shape[0], key.shape[0]
    groups = _checks.check_query_key_groups(query_groups, key_groups, n, m, query.device, labels)
    name = _dispatch.resolve("sigmoid", backend, query.device, query.dtype, local=group is None, cells=n * m)
    # A float (kept in fp64 until cast to the compute dtype) or a 0-dim tensor.
    scale = _checks.resolve_scale(logit_scale, temperature, query.device)
    bias = _checks._scalar("logit_bias", logit_bias, query.device)
    need_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (query, key, scale, bias))
    # With groups, labels is None (they exclude each other): nothing to check or default for it.
    comm, need_grad = _comm.make(group, exchange, grad_reduction, query, key, labels, [scale, bias],
                                 need_grad, name, groups=groups)
    if comm.is_local and not groups:
        _checks.check_positives(labels, n, m, query.device, "query", "key", "key")
    if name in ("reference", "dense"):
        q, k = _dispatch.dense_inputs(name, query, key)
        return in_accumulation_dtype(_reference.sigmoid_loss(q, k, logit_scale=scale, logit_bias=bias, labels=labels,
                                       query_groups=query_groups, key_groups=key_groups, reduction=reduction
                                       ), query.dtype)
    if groups:  # one id dtype on every rank: the key ids are gathered
        query_groups, key_groups = query_groups.long(), key_groups.long()
    elif labels is None:
        labels = comm.default_labels(n, query.device)
    options = SigmoidOptions(reduction, name, need_grad)
    return SigmoidLossFunction.apply(query, key, scale, bias, None if groups else labels.long(), query_groups,
                                     key_groups, options, comm)


__all__ = ["SigmoidLossFunction", "SigmoidOptions", "sigmoid_loss"]
