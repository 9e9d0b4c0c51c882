"""XTR (Lee et al. 2023): late interaction in which each query token keeps only its top-k in-batch document tokens.

``S_ab = Σ_t m_abt / max(Z_ab, 1)``: ``m_abt`` the largest similarity of valid query token ``(a, t)`` to a token
of document b among the ``k`` document tokens it retrieved from the whole batch (0 if none of them is b's);
``Z_ab`` the number of valid query tokens of a that retrieved at least one token of b (sentence-transformers'
``xtr_scores``; ``xloss.reference.xtr_scores`` is the naive definition, with the ``[Nq, Lq, Nd, Ld]`` tensor).

Layout (op → Function → function): ``chunked.py`` the two sweeps (threshold, then MaxSim under it) and the
backward routing; ``ops.py`` the sweeps as custom ops; here the one autograd Function :class:`XTRFunction` and
the public functions :func:`xtr_scores` and :func:`xtr_loss`; ``triton.py`` the same two sweeps as fused GPU
kernels (what "auto" takes on CUDA for float32/float16/bfloat16).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .. import _checks, _dispatch
from .. import reference as _reference
from .._autograd import first_order_only
from .._reduce import reduce_terms
from .._tiling import accumulation_dtype
from ..late_interaction import _check_inputs
from ..reference.late_interaction import zero_padding
from . import ops as _ops

FAMILY = "xtr"


class XTRFunction(torch.autograd.Function):
    """``S [Nq, Nd]`` of :func:`xtr_fwd` through the ops; gradients for ``q`` and ``d`` (in their dtypes).
    ``need_aux``: the indices are kept for a backward (decided by the caller: grad mode is off in here)."""

    @staticmethod
    def forward(ctx, q, d, q_valid, d_valid, k: int, d_masked: bool, need_aux: bool, engine: str):
        scores, idx, z = _ops.xtr_forward(q, d, q_valid, d_valid, k, need_aux, d_masked, engine)
        ctx.set_materialize_grads(False)
        ctx.dtypes = (q.dtype, d.dtype)
        ctx.engine = engine
        if need_aux:
            ctx.save_for_backward(q, d, q_valid, d_valid, idx, z)
        return scores

    @staticmethod
    @first_order_only("xtr_scores / xtr_loss")
    def backward(ctx, g):
        if g is None:
            return None, None, None, None, None, None, None, None
        q, d, q_valid, d_valid, idx, z = ctx.saved_tensors
        dq, dd = _ops.xtr_backward(g, q, d, q_valid, d_valid, idx, z, ctx.engine)
        return dq.to(ctx.dtypes[0]), dd.to(ctx.dtypes[1]), None, None, None, None, None, None



def _check_k(k) -> int:
    if isinstance(k, bool) or not isinstance(k, int) or k <= 0:
        raise ValueError(f"k (the number of document tokens each query token retrieves) must be a positive "
                         f"integer, got {k!r}")
    return k


def _stacked(q, d, d_mask):
    """A stacked ``d [Nq, n, Ld, D]`` (each query's documents, sentence-transformers' layout) flattened to
    ``[Nq·n, Ld, D]`` query-major, with its mask; ``(d, d_mask, n)`` (n = 1 for a 3-D d)."""
    if not (isinstance(d, torch.Tensor) and d.dim() == 4):
        return d, d_mask, 1
    if isinstance(q, torch.Tensor) and q.dim() == 3 and d.shape[0] != q.shape[0]:
        raise ValueError(f"a stacked d [Nq, n, Ld, D] holds each query's documents: it needs Nq = {q.shape[0]} "
                         f"rows, got d {tuple(d.shape)}")
    if isinstance(d_mask, torch.Tensor) and tuple(d_mask.shape) != tuple(d.shape[:3]):
        raise ValueError(f"d_mask must have shape {tuple(d.shape[:3])} for d {tuple(d.shape)}, got "
                         f"{tuple(d_mask.shape)}")
    n = d.shape[1]
    flat_mask = d_mask.reshape(d.shape[0] * n, d.shape[2]) if isinstance(d_mask, torch.Tensor) else d_mask
    return d.reshape(d.shape[0] * n, *d.shape[2:]), flat_mask, n


def xtr_scores(q: Tensor, d: Tensor, q_mask: Tensor | None = None, d_mask: Tensor | None = None, *, k: int,
               backend: str = "auto") -> Tensor:
    """XTR scores of every query against every in-batch document, without the ``[Nq, Lq, Nd, Ld]`` tensor.

    Each valid query token retrieves its ``k`` most similar valid document tokens among all ``Nd·Ld`` of the
    batch; ``S_ab = Σ_t m_abt / max(Z_ab, 1)`` with ``m_abt`` the best similarity of token t to a retrieved
    token of document b (0 if none is b's) and ``Z_ab`` the number of query tokens that retrieved one of b's
    tokens.  Equal to sentence-transformers' ``xtr_scores`` (``top_k=k``) and to ``xloss.reference.xtr_scores``.

    Args:
        q: ``[Nq, Lq, D]`` query tokens (float32/float16/bfloat16/float64).
        d: ``[Nd, Ld, D]`` document tokens, or ``[Nq, n, Ld, D]`` (each query's n documents stacked, as
            sentence-transformers passes them): scored as ``Nq·n`` documents, query-major
            (``S[a, b·n + j]`` = query a against query b's j-th document).
        q_mask, d_mask: ``[Nq, Lq]`` and ``[Nd, Ld]`` (or ``[Nq, n, Ld]``), True / 1 = valid token; None = all
            valid.  Masked-out tokens are never retrieved and never counted, whatever they hold.
        k: how many document tokens each query token retrieves (a positive int; beyond ``Nd·Ld``: all).
        backend: ``"auto"``, ``"triton"`` (the fused kernels: CUDA, float32/float16/bfloat16; "auto" takes
            them there), ``"chunked"`` (the two sweeps in torch, any device and dtype) or ``"reference"`` (the
            naive definition, in the input dtype).

    Returns:
        ``[Nq, Nd]`` scores, float32 for half inputs, float64 for float64.  Gradients flow to q and d through
        each retained maximum (the retrieval itself is piecewise constant).
    """
    _check_k(k)
    d, d_mask, _ = _stacked(q, d, d_mask)
    q_mask, d_mask = _check_inputs(q, d, q_mask, d_mask, "sum", "exclude", None, None, "q2d")
    engine = _dispatch.resolve(FAMILY, backend, q.device, q.dtype)
    if engine == "reference":
        return _reference.xtr_scores(q, d, q_mask, d_mask, k=k).to(accumulation_dtype(q.dtype))
    q_valid = torch.ones(q.shape[:2], dtype=torch.bool, device=q.device) if q_mask is None else q_mask
    d_valid = torch.ones(d.shape[:2], dtype=torch.bool, device=d.device) if d_mask is None else d_mask
    q = zero_padding(q, q_valid) if q_mask is not None else q
    d = zero_padding(d, d_valid) if d_mask is not None else d
    need_aux = torch.is_grad_enabled() and (q.requires_grad or d.requires_grad)
    return XTRFunction.apply(q, d, q_valid, d_valid, k, d_mask is not None, need_aux, engine)


def xtr_loss(q: Tensor, d: Tensor, q_mask: Tensor | None = None, d_mask: Tensor | None = None, *, k: int,
             logit_scale=None, temperature=None, labels: Tensor | None = None, label_smoothing: float = 0.0,
             reduction: str = "mean", backend: str = "auto") -> Tensor:
    """XTR contrastive loss with in-batch negatives: cross-entropy over the rows of ``s·xtr_scores(q, d)``.

    Args:
        q, d, q_mask, d_mask, k, backend: as :func:`xtr_scores` (a stacked ``d [Nq, n, Ld, D]`` is
            sentence-transformers' layout: query a's positive is its first document, column ``a·n``).
        logit_scale: ``s`` (float or 0-dim tensor, gets a gradient); temperature: ``τ = 1/s``; exactly one.
        labels: ``[Nq]`` integer column of each query's positive; default ``a`` (3-D d) or ``a·n`` (stacked d).
        label_smoothing, reduction: as ``F.cross_entropy`` (``"none"``: per-query terms ``[Nq]``).

    Equal to sentence-transformers' ``MultiVectorMultipleNegativesRankingLoss(similarity_fct=XTRScores(k))``
    with ``scale = s`` on the same embeddings, and to ``xloss.reference.xtr_loss``.
    """
    _check_k(k)
    if logit_scale is None and temperature is None:
        raise TypeError("xtr_loss() needs a scale: pass logit_scale= (sentence-transformers' scale) or temperature=")
    n = d.shape[1] if isinstance(d, torch.Tensor) and d.dim() == 4 else 1
    s = xtr_scores(q, d, q_mask, d_mask, k=k, backend=backend)
    nq, nd = s.shape
    _checks.check_positives(labels, nq, nd, q.device, "q", "d", "document")
    _checks.check_label_smoothing(label_smoothing)
    _checks.check_reduction(reduction)
    scale = _checks.resolve_scale(logit_scale, temperature, q.device)
    if labels is None:
        labels = torch.arange(nq, device=q.device) * n
    z = s * (scale.to(s.dtype) if not scale.requires_grad else scale)
    terms = torch.nn.functional.cross_entropy(z, labels.long(), label_smoothing=float(label_smoothing),
                                              reduction="none")
    return reduce_terms(terms, reduction)


__all__ = ["XTRFunction", "xtr_loss", "xtr_scores"]
