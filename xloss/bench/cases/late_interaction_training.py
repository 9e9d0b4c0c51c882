"""Late interaction at training scale (issue 14): the families "late_interaction_distill" and "xtr".

"late_interaction_distill": ColBERTv2 / PyLate distillation, each query against its own n documents scored by a
teacher.  The shape tuple is (N, n, D): ``q [N, Lq, D]``, ``d [N, n, Ld, D]``, ``teacher_scores [N, n]``
(random logits, no gradient), Lq = 32, Ld = 180.  xloss: :func:`xloss.late_interaction_distill_loss`; naive:
PyLate's ``Distillation`` written out (``colbert_kd_scores`` through the ``[N, n, Lq, Ld]`` einsum, max over
the document tokens, sum over the query tokens, then ``F.kl_div(log_softmax(student), log_softmax(teacher),
reduction="batchmean", log_target=True)``), with padding excluded from the max as xloss's default
``mask_mode="exclude"`` (PyLate multiplies by the mask instead: the same cost).

"xtr": XTR scores, forward+backward (a fixed random ``grad_output [Nq, Nd]``).  The shape tuple is (Nq, Nd, D):
``q [Nq, Lq, D]``, ``d [Nd, Ld, D]``, Lq = 32, Ld = 180, k = 256.  xloss: :func:`xloss.xtr_scores`; naive:
sentence-transformers' ``multi_vector_encoder.scoring.xtr_scores`` (the ``[Nq, Lq, Nd, Ld]`` grid), given the
documents in its stacked layout ``[Nq, Nd/Nq, Ld, D]`` (a view of the same leaf); it is reported as
unavailable where sentence-transformers is not installed.  Extra baseline "reference":
``xloss.reference.xtr_scores`` (the naive definition, torch only).

Both: L2-normalised token embeddings, query lengths uniform in [Lq/2, Lq], document lengths uniform in
[Ld/3, Ld] (bool masks, True = valid).  Peak memory is, as for every family, what one forward+backward adds
on top of the inputs, gradients of q and d included (``d.grad`` alone is as large as d: 377 MB at N = 256,
n = 16 in fp32).
"""

from __future__ import annotations

import torch

from ..registry import Family, Impl, Shape, missing, register, xloss_backend

TRAIN_TOKENS = (32, 180)  # (Lq, Ld) of both families (ColBERT training)
DISTILL_TEMPERATURE = 1.0  # PyLate's Distillation has no temperature: scores are the logits
XTR_K = 256  # document tokens each query token retrieves (sentence-transformers' default top_k)
# Peak of the naive distillation as multiples of the [N, n, Lq, Ld] similarities: the similarities, their masked
# copy, and in backward the gradient of the max and of the masked copy (as the "late_interaction" family).
NAIVE_DISTILL_FACTOR = 4.0
# The naive XTR scorers, as multiples of the [Nq, Lq, Nd, Ld] similarity grid (fp32).  sentence-transformers
# fills its grid in place, then in backward builds the gradient of the per-document max, of the scatter and of
# the masked fill; xloss.reference keeps the grid, a masked copy and the retrieval mask.  CPU fp32 at
# (Nq, Nd) = (32, 128) measured 3.6x and 3.2x (the distillation: 4.0x, as estimated).
NAIVE_XTR_FACTOR = 4.0
REFERENCE_XTR_FACTOR = 3.5


def _tokens(n: int, length: int, dim: int, gen: torch.Generator, dtype: torch.dtype, device: torch.device,
            lead: tuple[int, ...] = ()) -> torch.Tensor:
    x = torch.randn(n, *lead, length, dim, generator=gen, device=device)
    return torch.nn.functional.normalize(x, dim=-1).to(dtype).requires_grad_(True)


def _prefix_mask(rows: tuple[int, ...], length: int, low: int, gen: torch.Generator,
                 device: torch.device) -> torch.Tensor:
    """A bool ``[*rows, length]`` prefix mask with valid lengths uniform in [low, length]."""
    lengths = torch.randint(max(1, low), length + 1, rows, generator=gen, device=device)
    return torch.arange(length, device=device) < lengths[..., None]


# --- late_interaction_distill ---------------------------------------------------------------------------------


def distill_inputs(shape: Shape, dtype: torch.dtype, device: torch.device) -> dict:
    """``q [N, Lq, D]``, ``d [N, n, Ld, D]`` (grad), masks ``[N, Lq]`` / ``[N, n, Ld]``, ``teacher [N, n]``."""
    n_q, n, dim = shape
    lq, ld = TRAIN_TOKENS
    gen = torch.Generator(device=device).manual_seed(0)
    return {
        "q": _tokens(n_q, lq, dim, gen, dtype, device),
        "d": _tokens(n_q, ld, dim, gen, dtype, device, lead=(n,)),
        "q_mask": _prefix_mask((n_q,), lq, lq // 2, gen, device),
        "d_mask": _prefix_mask((n_q, n), ld, ld // 3, gen, device),
        "teacher": torch.randn(n_q, n, generator=gen, device=device).to(dtype),
    }


def _distill_xloss(inputs: dict) -> None:
    import xloss

    xloss.late_interaction_distill_loss(inputs["q"], inputs["d"], inputs["teacher"], inputs["q_mask"],
                                        inputs["d_mask"], temperature=DISTILL_TEMPERATURE).backward()


def naive_distill_loss(inputs: dict) -> torch.Tensor:
    """PyLate's ``Distillation`` in plain PyTorch: ``[N, n, Lq, Ld]`` similarities, MaxSim, KL (batchmean)."""
    import torch.nn.functional as F

    q, d, q_mask, d_mask = inputs["q"], inputs["d"], inputs["q_mask"], inputs["d_mask"]
    sim = torch.einsum("ntd,nkvd->nktv", q, d)  # [N, n, Lq, Ld]
    sim = sim.masked_fill(~d_mask[:, :, None, :], float("-inf"))
    best = sim.max(dim=-1).values  # [N, n, Lq]
    scores = torch.where(q_mask[:, None, :], best, torch.zeros((), dtype=best.dtype, device=best.device)).sum(-1)
    student = F.log_softmax(scores / DISTILL_TEMPERATURE, dim=-1)
    teacher = F.log_softmax(inputs["teacher"].to(student.dtype), dim=-1)
    return F.kl_div(student, teacher, reduction="batchmean", log_target=True)


def _distill_naive(inputs: dict) -> None:
    naive_distill_loss(inputs).backward()


def _distill_naive_peak(shape: Shape, dtype: torch.dtype, device: torch.device) -> int:
    n_q, n, dim = shape
    lq, ld = TRAIN_TOKENS
    size = torch.empty((), dtype=dtype).element_size()
    return int(NAIVE_DISTILL_FACTOR * n_q * n * lq * ld * size + 2 * (n_q * lq + n_q * n * ld) * dim * size)


def _distill_flops(shape: Shape) -> float:
    # The similarities of each query with its n documents; the backward routes through the arg-max indices.
    n_q, n, dim = shape
    lq, ld = TRAIN_TOKENS
    return 2.0 * n_q * n * lq * ld * dim + 4.0 * n_q * n * lq * dim


register(
    Family(
        name="late_interaction_distill",
        make_inputs=distill_inputs,
        xloss=Impl("xloss", "xloss.late_interaction_distill_loss", _distill_xloss,
                   xloss_backend("late_interaction")),
        naive=Impl("naive", "PyLate Distillation (einsum [N, n, Lq, Ld] + F.kl_div)", _distill_naive,
                   lambda device: "reference", estimate_peak_bytes=_distill_naive_peak),
        flops=_distill_flops,
    )
)


# --- xtr --------------------------------------------------------------------------------------------------


def xtr_inputs(shape: Shape, dtype: torch.dtype, device: torch.device) -> dict:
    """``q [Nq, Lq, D]``, ``d [Nd, Ld, D]`` (grad), masks ``[Nq, Lq]`` / ``[Nd, Ld]``, ``grad_out [Nq, Nd]``."""
    n_q, n_d, dim = shape
    lq, ld = TRAIN_TOKENS
    gen = torch.Generator(device=device).manual_seed(0)
    return {
        "q": _tokens(n_q, lq, dim, gen, dtype, device),
        "d": _tokens(n_d, ld, dim, gen, dtype, device),
        "q_mask": _prefix_mask((n_q,), lq, lq // 2, gen, device),
        "d_mask": _prefix_mask((n_d,), ld, ld // 3, gen, device),
        "grad_out": torch.randn(n_q, n_d, generator=gen, device=device),
    }


def _backward(scores: torch.Tensor, inputs: dict) -> None:
    scores.backward(inputs["grad_out"].to(scores.dtype))


def _xtr_xloss(inputs: dict) -> None:
    import xloss

    _backward(xloss.xtr_scores(inputs["q"], inputs["d"], inputs["q_mask"], inputs["d_mask"], k=XTR_K), inputs)


def st_stacked(q: torch.Tensor, d: torch.Tensor, d_mask: torch.Tensor):
    """``d [Nd, Ld, D]`` as sentence-transformers' stacked ``[Nq, Nd/Nq, Ld, D]`` (``[1, Nd, Ld, D]`` when Nq
    does not divide Nd: it flattens either query-major, so the scores are the same ``[Nq, Nd]``)."""
    n_q, (n_d, ld) = q.shape[0], d.shape[:2]
    groups = n_q if n_d % n_q == 0 else 1
    return d.view(groups, n_d // groups, ld, d.shape[-1]), d_mask.view(groups, n_d // groups, ld)


def _xtr_st(inputs: dict) -> None:
    from sentence_transformers.multi_vector_encoder.scoring import xtr_scores

    d, d_mask = st_stacked(inputs["q"], inputs["d"], inputs["d_mask"])
    _backward(xtr_scores(inputs["q"], d, inputs["q_mask"], d_mask, top_k=XTR_K), inputs)


def _xtr_reference(inputs: dict) -> None:
    from xloss import reference

    _backward(reference.xtr_scores(inputs["q"], inputs["d"], inputs["q_mask"], inputs["d_mask"], k=XTR_K), inputs)


def _xtr_peak(factor: float):
    def estimate(shape: Shape, dtype: torch.dtype, device: torch.device) -> int:
        n_q, n_d, dim = shape
        lq, ld = TRAIN_TOKENS
        size = torch.empty((), dtype=dtype).element_size()
        grid = n_q * lq * n_d * ld * max(size, 4)  # sentence-transformers accumulates in fp32
        return int(factor * grid + 2 * (n_q * lq + n_d * ld) * dim * size)

    return estimate


def _xtr_flops(shape: Shape) -> float:
    # One sweep of the similarities; the backward routes each query token through at most min(k, Nd) maxima.
    n_q, n_d, dim = shape
    lq, ld = TRAIN_TOKENS
    return 2.0 * n_q * lq * n_d * ld * dim + 4.0 * n_q * lq * min(XTR_K, n_d) * dim


register(
    Family(
        name="xtr",
        make_inputs=xtr_inputs,
        xloss=Impl("xloss", f"xloss.xtr_scores(k={XTR_K})", _xtr_xloss, xloss_backend("xtr")),
        naive=Impl(
            "naive", f"sentence_transformers xtr_scores(top_k={XTR_K})", _xtr_st, lambda device: "reference",
            estimate_peak_bytes=_xtr_peak(NAIVE_XTR_FACTOR), unavailable=missing("sentence_transformers"),
        ),
        extras={
            "reference": Impl("reference", f"xloss.reference.xtr_scores(k={XTR_K})", _xtr_reference,
                              lambda device: "reference", estimate_peak_bytes=_xtr_peak(REFERENCE_XTR_FACTOR)),
        },
        flops=_xtr_flops,
    )
)
