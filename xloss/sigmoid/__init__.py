"""Memory-efficient sigmoid loss (SigLIP, SPEC.md §2).

``sigmoid_loss`` checks its arguments, picks a backend and runs ``SigmoidLossFunction``, one autograd Function
for every fast path.  Nothing normalises a row of the logits, so the gradient of each logit,
``dZ_ij = -y_ij·σ(-y_ij z_ij)``, is known in the forward sweep: a backend's ``forward_backward`` (``cpu.py``,
``triton.py``) returns the loss and the gradients ``dq = s·dZ k``, ``dk = s·dZᵀ q``, ``ds = Σ dZ∘(q kᵀ)``,
``db = Σ dZ`` from one sweep over the logit tiles (3 GEMM sweeps in all, no recompute).  The Function keeps
those O((N+M)·D) gradients and its backward only multiplies them by ``grad_output`` (and 1/N for the mean).

``reduction="none"`` is the exception: ``grad_output`` then weights each query's row differently, which
changes ``dk``, so forward computes only the loss rows and backward runs one more sweep with those weights.

The engine contract (both backends; ``xloss.distributed`` calls it block by block)::

    forward_backward(q, k, scale, bias, labels, need_grad, *, row_weight=None, per_row=False)
        -> (loss, dq, dk, ds, db)

``q [n, D]``, ``k [m, D]`` one block of queries and of keys; ``scale``, ``bias`` 0-dim tensors (accumulation
dtype); ``labels [n]`` long, each query's positive key index inside this key block or -1 (no positive here:
all its pairs are negatives); ``loss`` the 0-dim sum of ``-log σ(y z)`` over the block (``[n]`` row sums when
``per_row``), ``dq [n, D]``, ``dk [m, D]``, ``ds``, ``db`` the gradients of that sum (of ``Σ_i w_i ℓ_i`` when
``row_weight=w``), no 1/N, no grad_output, or None when ``need_grad`` is False; all in the accumulation dtype
(fp32 for fp16/bf16/fp32 inputs, fp64 for fp64).
"""

from __future__ import annotations

import torch

from .. import _backend, _checks
from .. import reference as _reference
from . import cpu as _cpu


def _engine(name: str):
    if name == "triton":
        from . import triton as _triton  # imported lazily: Triton is optional

        return _triton
    return _cpu


def _scaled(t, factor, like: torch.Tensor):
    """``factor·t`` cast to ``like``'s dtype (the gradient of an input of that dtype)."""
    return (t * factor).to(like.dtype)


class SigmoidLossFunction(torch.autograd.Function):
    """Autograd for the sigmoid loss: gradients formed in forward, scaled by ``grad_output`` in backward.

    Forward args: ``q [N, D]``, ``k [M, D]``, ``scale`` and ``bias`` (0-dim tensors), ``labels [N]`` (long),
    ``reduction``, ``engine`` (module with ``forward_backward``), ``need_grad`` (bool: compute gradients).
    """

    @staticmethod
    def forward(ctx, q, k, scale, bias, labels, reduction, engine, need_grad):
        acc = _cpu.accumulation_dtype(q.dtype)
        s, b = scale.detach().to(acc), bias.detach().to(acc)
        n = q.shape[0]
        ctx.options = (reduction, engine)
        if reduction == "none":
            # grad_output weights the rows: the gradients depend on it, so backward recomputes (one sweep).
            terms = engine.forward_backward(q, k, s, b, labels, False, per_row=True)[0]
            ctx.save_for_backward(q, k, scale, bias, labels)
            return terms
        loss, dq, dk, ds, db = engine.forward_backward(q, k, s, b, labels, need_grad)
        if need_grad:
            ctx.save_for_backward(q, k, scale, bias, dq, dk, ds, db)
        return loss / n if reduction == "mean" else loss

    @staticmethod
    def backward(ctx, grad_out):
        reduction, engine = ctx.options
        if reduction == "none":
            q, k, scale, bias, labels = ctx.saved_tensors
            acc = _cpu.accumulation_dtype(q.dtype)
            _, dq, dk, ds, db = engine.forward_backward(
                q, k, scale.detach().to(acc), bias.detach().to(acc), labels, True, row_weight=grad_out.to(acc)
            )
            g = 1.0
        else:
            q, k, scale, bias, dq, dk, ds, db = ctx.saved_tensors
            g = grad_out.to(dq.dtype)
            if reduction == "mean":
                g = g / q.shape[0]
        need = ctx.needs_input_grad
        return (
            _scaled(dq, g, q) if need[0] else None,
            _scaled(dk, g, k) if need[1] else None,
            _scaled(ds, g, scale) if need[2] else None,
            _scaled(db, g, bias) if need[3] else None,
            None, None, None, None,
        )


def sigmoid_loss(
    query: torch.Tensor,
    key: torch.Tensor,
    *,
    logit_scale,
    logit_bias,
    labels: torch.Tensor | None = None,
    reduction: str = "mean",
    backend: str = "auto",
    group=None,
    exchange: str = "ring",
) -> torch.Tensor:
    """Sigmoid loss (SigLIP) without the N×M logits matrix.

    Equal to ``xloss.reference.sigmoid_loss`` and to open_clip's ``SigLipLoss`` (one process, default
    labels): logits ``z_ij = s·<q_i, k_j> + b``, loss ``-(1/N) Σ_ij log σ(y_ij z_ij)`` with ``y_ij = +1`` for
    the positive pair ``j = labels[i]`` and ``-1`` for every other pair.

    Args:
        query: ``[N, D]`` float32/float16/bfloat16/float64 (image features in SigLIP).
        key: ``[M, D]``, same dtype and device; ``M > N`` adds extra negatives.  ``M < N`` needs ``labels``.
        logit_scale: multiplicative scale ``s``: a float or a 0-dim tensor (gets a gradient), already
            exponentiated as open_clip passes it (``model.logit_scale.exp()``).
        logit_bias: additive bias ``b``: a float or a 0-dim tensor (gets a gradient).
        labels: ``[N]`` integer index of each query's positive key; default ``arange(N)``.
        reduction: ``"mean"`` (default: ``Σ/N``, N the number of queries, as open_clip), ``"sum"`` or
            ``"none"`` (per-query row sums ``[N]``).
        backend: ``"auto"`` (Triton on CUDA, chunked PyTorch elsewhere), ``"triton"``, ``"cpu"`` or
            ``"reference"`` (the naive definition).
        group: a ``torch.distributed`` process group: when given and torch.distributed is initialised with
            more than one rank, the keys of every rank are negatives too (``xloss.distributed.sigmoid_loss``);
            None runs on this process alone.
        exchange: how ``xloss.distributed`` moves keys between ranks (``"ring"`` by default); unused without
            ``group``.

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
    _checks.check_reduction(reduction)
    if group is not None and torch.compiler.is_compiling():
        raise ValueError("group= (cross-rank negatives) is not supported inside torch.compile: leave group=None "
                         "in the compiled function, or call xloss.sigmoid_loss(..., group=...) outside it")
    if group is not None and torch.distributed.is_available() and torch.distributed.is_initialized() \
            and torch.distributed.get_world_size(group) > 1:
        from .. import distributed  # imported lazily: only multi-process runs need it

        return distributed.sigmoid_loss(
            query, key, logit_scale=logit_scale, logit_bias=logit_bias, labels=labels, reduction=reduction,
            backend=backend, group=group, exchange=exchange,
        )
    n, m = query.shape[0], key.shape[0]
    _checks.check_positives(labels, n, m, query.device, "query", "key", "key")
    # Both are required (no default): a float (kept in fp64 until cast to the compute dtype) or a 0-dim tensor.
    scale = _checks._scalar("logit_scale", logit_scale, query.device)
    bias = _checks._scalar("logit_bias", logit_bias, query.device)
    name = _backend.resolve(backend, query.device, "sigmoid")
    if name == "reference":
        return _reference.sigmoid_loss(
            query, key, logit_scale=scale, logit_bias=bias, labels=labels, reduction=reduction
        )
    if labels is None:
        labels = torch.arange(n, device=query.device)
    labels = labels.long()
    engine = _engine(name)
    need_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (query, key, scale, bias))
    if torch.compiler.is_compiling():  # opaque custom ops instead of the engine's Python tile loops
        return _ops.sigmoid_loss(query, key, scale, bias, labels, reduction, name, need_grad)
    if not need_grad:
        # No graph to build: the engine alone, without the gradient GEMMs.
        acc = _cpu.accumulation_dtype(query.dtype)
        s, b = scale.to(acc), bias.to(acc)
        if reduction == "none":
            return engine.forward_backward(query, key, s, b, labels, False, per_row=True)[0]
        loss = engine.forward_backward(query, key, s, b, labels, False)[0]
        return loss / n if reduction == "mean" else loss
    return SigmoidLossFunction.apply(query, key, scale, bias, labels, reduction, engine, True)


from . import ops as _ops  # last: it registers the custom ops, which run the Function above

__all__ = ["SigmoidLossFunction", "sigmoid_loss"]
