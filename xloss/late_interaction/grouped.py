"""The grouped (distillation) layout of late interaction: each query against its own n documents.

A distillation batch holds, for each query, n candidate documents a teacher has scored (PyLate's
``Distillation``, sentence-transformers' ``MultiVectorDistillKLDivLoss``): ``q [N, Lq, D]``,
``d [N, n, Ld, D]``, ``teacher_scores [N, n]``.  The naive scores build ``[N, n, Lq, Ld]`` similarities (and
as much again for their gradient); here the ``N·n`` (query, document) pairs are one aligned-pair MaxSim sweep
(the engine of ``maxsim_pairs`` with ``group=n``: query a against documents ``a·n … a·n + n - 1``; on CUDA one
Triton launch whose programs each own a query and a range of its documents, elsewhere the compiled CPU
micro-kernel or chunked ``bmm``s; arg-max routing in the backward) over ``d`` flattened (a view), so
nothing larger than a tile exists, the backward's temporaries are blocks of rows and ``d``'s gradient is
written once; the ``[N, n]`` scores feed the softmaxes of the KL divergence directly.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .. import _checks
from .._reduce import reduce_terms
from .._tiling import accumulation_dtype
from ..reference.late_interaction import kl_terms, min_max_normalize


def _check_grouped(q, d, q_mask, d_mask):
    _checks.check_float_tensor("q", q, ndim=3)
    if not isinstance(d, torch.Tensor) or d.dim() != 4:
        shape = tuple(d.shape) if isinstance(d, torch.Tensor) else type(d).__name__
        raise ValueError(f"d must be 4-D [N, n, Ld, D] (each query's n documents), got {shape}; flattened "
                         "documents [N·n, Ld, D] go in as d.view(N, n, Ld, D)")
    if d.shape[0] != q.shape[0]:
        raise ValueError(f"d [N, n, Ld, D] must hold a group of documents for each of the N = {q.shape[0]} "
                         f"queries, got d {tuple(d.shape)}")
    if d_mask is not None and (not isinstance(d_mask, torch.Tensor) or tuple(d_mask.shape) != tuple(d.shape[:3])):
        shape = tuple(d_mask.shape) if isinstance(d_mask, torch.Tensor) else type(d_mask).__name__
        raise ValueError(f"d_mask must have shape {tuple(d.shape[:3])} [N, n, Ld] for d {tuple(d.shape)}, got "
                         f"{shape}")


def maxsim_grouped(q: Tensor, d: Tensor, q_mask: Tensor | None = None, d_mask: Tensor | None = None, *,
                   token_reduction: str = "sum", mask_mode: str = "exclude", backend: str = "auto") -> Tensor:
    """MaxSim (query→document) of each query against its own n documents: ``S [N, n]``,
    ``S_aj = maxsim(q[a], d[a, j])``, without the ``[N, n, Lq, Ld]`` similarities.

    Args:
        q: ``[N, Lq, D]`` query tokens; d: ``[N, n, Ld, D]`` each query's n documents (same dtype, device).
        q_mask: ``[N, Lq]``; d_mask: ``[N, n, Ld]``; True / 1 = valid token, None = all valid.
        token_reduction, mask_mode: as :func:`xloss.maxsim` (``mask_mode="zero"``: PyLate's
            ``colbert_kd_scores``, which multiplies the similarities by the masks).
        backend: ``"auto"`` (Triton on CUDA, the chunked sweeps elsewhere), ``"triton"``, ``"chunked"`` (any
            device) or ``"reference"`` / ``"dense"`` (the naive definition).

    Returns:
        ``[N, n]`` scores, float32 for half inputs, float64 for float64.  Equal to
        ``xloss.reference.maxsim_grouped`` and to PyLate's / sentence-transformers' ``colbert_kd_scores``.
    """
    from .. import _dispatch
    from .. import reference as _reference
    from . import FAMILY, _check_inputs, _directional

    _check_grouped(q, d, q_mask, d_mask)
    n_q, n, ld = d.shape[0], d.shape[1], d.shape[2]
    d_flat = d.reshape(n_q * n, ld, d.shape[3])  # a view for a contiguous d: its gradient is d.grad itself
    q_mask, d_mask_flat = _check_inputs(q, d_flat, q_mask, None if d_mask is None else d_mask.reshape(n_q * n, ld),
                                        token_reduction, mask_mode, None, None, "q2d")
    name = _dispatch.resolve(FAMILY, backend, q.device, q.dtype)
    if name in ("reference", "dense"):
        dq, dd = _dispatch.dense_inputs("dense", q, d)
        return _reference.maxsim_grouped(dq, dd, q_mask, d_mask, token_reduction=token_reduction,
                                         mask_mode=mask_mode).to(accumulation_dtype(q.dtype))
    if n == 0:
        return torch.zeros(n_q, 0, dtype=accumulation_dtype(q.dtype), device=q.device)
    # One aligned-pair sweep over the N·n (query, document) pairs, query a against documents a·n … a·n + n - 1
    # (group=n): the gradient of d is written once, the queries are never repeated in what is kept.
    s, _ = _directional(q, d_flat, q_mask, d_mask_flat, token_reduction, mask_mode, None, None, "q2d", name,
                        pairs=True, group=n)
    return s.view(n_q, n)


def late_interaction_distill_loss(
    q: Tensor,
    d: Tensor,
    teacher_scores: Tensor,
    q_mask: Tensor | None = None,
    d_mask: Tensor | None = None,
    *,
    logit_scale=None,
    temperature=None,
    teacher_logit_scale=None,
    teacher_temperature=None,
    normalize_scores: bool = False,
    token_reduction: str = "sum",
    mask_mode: str = "exclude",
    reduction: str = "mean",
    backend: str = "auto",
) -> Tensor:
    """Late-interaction distillation from a teacher's scores over each query's own documents (ColBERTv2):
    ``KL(softmax(s_T·T_a) ‖ softmax(s·S_a))`` per query, ``S = maxsim_grouped(q, d)``, ``T = teacher_scores``.

    Args:
        q, d, q_mask, d_mask, token_reduction, mask_mode, backend: as :func:`maxsim_grouped`
            (``d [N, n, Ld, D]``).
        teacher_scores: ``[N, n]`` the teacher's scores (logits) of each query's documents; no gradient.
        logit_scale | temperature: the student's scale ``s`` (default 1); a tensor gets a gradient.
        teacher_logit_scale | teacher_temperature: the teacher's ``s_T`` (default 1).
        normalize_scores: min-max normalise each row of ``S`` to [0, 1] first (``(S - min)/(max - min + 1e-8)``),
            as PyLate's ``Distillation(normalize_scores=True)`` (its default).
        reduction: ``"mean"`` (the sum of the row KLs over N: ``KLDivLoss(reduction="batchmean")``),
            ``"sum"``, or ``"none"`` (``[N]``).

    Equal to PyLate's ``Distillation(model, normalize_scores=...)`` with ``mask_mode="zero"`` on the same
    (normalised) embeddings, and to sentence-transformers' ``MultiVectorDistillKLDivLoss`` with
    ``temperature=τ`` as ``τ² · late_interaction_distill_loss(..., temperature=τ, teacher_temperature=τ)``.
    """
    _check_grouped(q, d, q_mask, d_mask)
    if not isinstance(teacher_scores, torch.Tensor) or not teacher_scores.dtype.is_floating_point:
        raise TypeError("teacher_scores must be a floating-point tensor [N, n] of the teacher's scores")
    if tuple(teacher_scores.shape) != tuple(d.shape[:2]):
        raise ValueError(f"teacher_scores must have shape {tuple(d.shape[:2])} [N, n] (one score per query and "
                         f"document of d {tuple(d.shape)}), got {tuple(teacher_scores.shape)}")
    _checks.check_reduction(reduction)
    scale = _checks.resolve_scale(logit_scale, temperature, q.device)
    t_scale = _checks.resolve_scale(teacher_logit_scale, teacher_temperature, q.device, prefix="teacher_")
    s = maxsim_grouped(q, d, q_mask, d_mask, token_reduction=token_reduction, mask_mode=mask_mode, backend=backend)
    if normalize_scores:
        s = min_max_normalize(s)
    student = s * (scale if scale.requires_grad else scale.to(s.dtype))
    teacher = teacher_scores.detach().to(s.dtype) * t_scale.detach().to(s.dtype)
    return reduce_terms(kl_terms(student, teacher), reduction)


__all__ = ["late_interaction_distill_loss", "maxsim_grouped"]
