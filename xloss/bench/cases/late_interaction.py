"""Late interaction (MaxSim): the families "late_interaction", "maxsim_scoring", "maxsim_cpu_op" and
"maxsim_cpu_op_ragged".

The shape tuple is (Nq, Nd, D); the token counts are fixed by each family: ColBERT-like training with
32 query tokens against documents of up to 180 tokens, and scoring with 32 query tokens against documents of
up to 300 tokens.  Documents have ragged lengths (a bool mask), queries are full (ColBERT pads them with
[MASK] tokens that count).
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable

import torch

from ..registry import Family, Impl, Shape, missing, register, xloss_backend

LATE_TRAIN_TOKENS = (32, 180)  # (Lq, Ld) of the "late_interaction" family
LATE_SCORE_TOKENS = (32, 300)  # (Lq, Ld) of the "maxsim_scoring" family
# Peak of the naive loss as multiples of the [Nq, Nd, Lq, Ld] similarity tensor: the similarities, their masked
# copy, and in backward the gradient of the max and of the masked copy.  Scoring keeps the first two.
NAIVE_LATE_TRAIN_FACTOR = 4.0
NAIVE_LATE_SCORE_FACTOR = 2.5


def _late_inputs(tokens: tuple[int, int], grad: bool) -> Callable[[Shape, torch.dtype, torch.device], dict]:
    def make(shape: Shape, dtype: torch.dtype, device: torch.device) -> dict:
        """L2-normalised ``q [Nq, Lq, D]``, ``d [Nd, Ld, D]``, document lengths uniform in [Ld/3, Ld]."""
        nq, nd, dim = shape
        lq, ld = tokens
        gen = torch.Generator(device=device).manual_seed(0)

        def tokens_of(n: int, length: int) -> torch.Tensor:
            x = torch.randn(n, length, dim, generator=gen, device=device)
            return torch.nn.functional.normalize(x, dim=-1).to(dtype).requires_grad_(grad)

        lengths = torch.randint(max(1, ld // 3), ld + 1, (nd,), generator=gen, device=device)
        d_mask = torch.arange(ld, device=device)[None, :] < lengths[:, None]
        inputs = {"q": tokens_of(nq, lq), "d": tokens_of(nd, ld), "d_mask": d_mask, "d_len": lengths}
        if grad:
            inputs["scale"] = torch.tensor(1.0, device=device, requires_grad=True)
        return inputs

    return make


def _late_xloss(inputs: dict) -> None:
    import xloss

    xloss.late_interaction_loss(inputs["q"], inputs["d"], None, inputs["d_mask"],
                                logit_scale=inputs["scale"]).backward()


def _late_naive(inputs: dict) -> None:
    from xloss import reference

    reference.late_interaction_loss(inputs["q"], inputs["d"], None, inputs["d_mask"],
                                    logit_scale=inputs["scale"]).backward()


def _scoring_xloss(inputs: dict) -> None:
    import xloss

    with torch.no_grad():
        xloss.maxsim(inputs["q"], inputs["d"], None, inputs["d_mask"])


def _scoring_naive(inputs: dict) -> None:
    from xloss import reference

    with torch.no_grad():
        reference.maxsim(inputs["q"], inputs["d"], None, inputs["d_mask"])


def _flash_maxsim_train(inputs: dict) -> None:
    # flash-maxsim's training kernel: [Nq, Nd] scores (fp32), then the same cross-entropy as xloss's default
    # (direction "q2d", labels arange, the scale on the logits).
    from flash_maxsim import flash_maxsim_batched_train

    scores = flash_maxsim_batched_train(inputs["q"], inputs["d"], doc_lengths=inputs["d_len"].to(torch.int32))
    labels = torch.arange(scores.shape[0], device=scores.device)
    torch.nn.functional.cross_entropy(inputs["scale"] * scores, labels).backward()


def _flash_maxsim_scoring(inputs: dict) -> None:
    from flash_maxsim import flash_maxsim_batched

    with torch.no_grad():
        flash_maxsim_batched(inputs["q"], inputs["d"], doc_lengths=inputs["d_len"].to(torch.int32))


def _flash_maxsim_unavailable() -> str | None:
    """flash-maxsim is CUDA-only (Triton GPU kernels)."""
    return missing("flash_maxsim")() or (None if torch.cuda.is_available() else "flash_maxsim needs a CUDA GPU")


def _flash_extra(run) -> dict:
    return {"flash_maxsim": Impl("flash_maxsim", "flash_maxsim (batched)", run, lambda device: "triton",
                                 unavailable=_flash_maxsim_unavailable)}


def _late_naive_peak(tokens: tuple[int, int], factor: float):
    def estimate(shape: Shape, dtype: torch.dtype, device: torch.device) -> int:
        nq, nd, dim = shape
        lq, ld = tokens
        size = torch.empty((), dtype=dtype).element_size()
        return int(factor * nq * nd * lq * ld * size + 2 * (nq * lq + nd * ld) * dim * size)

    return estimate


def _late_flops(tokens: tuple[int, int], backward: bool) -> Callable[[Shape], float]:
    # One similarity GEMM sweep; the backward routes through the arg-max indices (2 products of Nq·Nd·Lq·D).
    def flops(shape: Shape) -> float:
        nq, nd, dim = shape
        lq, ld = tokens
        return 2.0 * nq * nd * lq * ld * dim + (4.0 * nq * nd * lq * dim if backward else 0.0)

    return flops


register(
    Family(
        name="late_interaction",
        make_inputs=_late_inputs(LATE_TRAIN_TOKENS, grad=True),
        xloss=Impl("xloss", "xloss.late_interaction_loss", _late_xloss, xloss_backend("late_interaction")),
        naive=Impl(
            "naive", "xloss.reference.late_interaction_loss", _late_naive, lambda device: "reference",
            estimate_peak_bytes=_late_naive_peak(LATE_TRAIN_TOKENS, NAIVE_LATE_TRAIN_FACTOR),
        ),
        extras=_flash_extra(_flash_maxsim_train),
        flops=_late_flops(LATE_TRAIN_TOKENS, backward=True),
    )
)

# Small batches (issue 16, the "small" preset): Lq = 8 query tokens against Ld = 32 document tokens.
SMALL_TOKENS = (8, 32)

register(
    Family(
        name="late_interaction_small",
        make_inputs=_late_inputs(SMALL_TOKENS, grad=True),
        xloss=Impl("xloss", "xloss.late_interaction_loss", _late_xloss, xloss_backend("late_interaction")),
        naive=Impl("naive", "xloss.reference.late_interaction_loss", _late_naive, lambda device: "reference"),
        flops=_late_flops(SMALL_TOKENS, backward=True),
    )
)

# ColPali: a ~32-token query against 1030 patch embeddings per page (32×32 patches plus special tokens).
COLPALI_TOKENS = (32, 1030)

register(
    Family(
        name="late_interaction_colpali",
        make_inputs=_late_inputs(COLPALI_TOKENS, grad=True),
        xloss=Impl("xloss", "xloss.late_interaction_loss", _late_xloss, xloss_backend("late_interaction")),
        naive=Impl(
            "naive", "xloss.reference.late_interaction_loss", _late_naive, lambda device: "reference",
            estimate_peak_bytes=_late_naive_peak(COLPALI_TOKENS, NAIVE_LATE_TRAIN_FACTOR),
        ),
        extras=_flash_extra(_flash_maxsim_train),
        flops=_late_flops(COLPALI_TOKENS, backward=True),
    )
)

register(
    Family(
        name="maxsim_scoring",
        make_inputs=_late_inputs(LATE_SCORE_TOKENS, grad=False),
        xloss=Impl("xloss", "xloss.maxsim (no_grad)", _scoring_xloss, xloss_backend("late_interaction")),
        naive=Impl(
            "naive", "xloss.reference.maxsim (no_grad)", _scoring_naive, lambda device: "reference",
            estimate_peak_bytes=_late_naive_peak(LATE_SCORE_TOKENS, NAIVE_LATE_SCORE_FACTOR),
        ),
        extras=_flash_extra(_flash_maxsim_scoring),
        flops=_late_flops(LATE_SCORE_TOKENS, backward=False),
    )
)


# --- MaxSim scoring on CPU with the compiled op (xloss::maxsim_q2d) ------------------------------------------
# Index/reranking machines: Nq queries of 32 tokens against Nd documents, D = shape[2], no gradient.
# "maxsim_cpu_op": documents of exactly 300 tokens (no mask); "maxsim_cpu_op_ragged": lengths uniform in
# [50, 800], padded to 800 with a prefix mask (the naive scorer pays for the padding, the op does not).  Extra
# baseline "maxsim_cpu": the maxsim-cpu PyPI package (mixedbread-ai; one query at a time, numpy inputs;
# ``maxsim_scores_variable`` with a list of unpadded documents for the ragged family).

MAXSIM_OP_LQ = 32
MAXSIM_OP_FIXED_LD = 300
MAXSIM_OP_RAGGED = (50, 800)


def _maxsim_op_inputs(ragged: bool) -> Callable[[Shape, torch.dtype, torch.device], dict]:
    def make(shape: Shape, dtype: torch.dtype, device: torch.device) -> dict:
        """L2-normalised ``q [Nq, 32, D]`` and ``d [Nd, Ld, D]`` (+ prefix mask and unpadded numpy copies)."""
        nq, nd, dim = shape
        gen = torch.Generator(device=device).manual_seed(0)

        def tokens_of(n: int, length: int) -> torch.Tensor:
            x = torch.randn(n, length, dim, generator=gen, device=device)
            return torch.nn.functional.normalize(x, dim=-1).to(dtype)

        ld = MAXSIM_OP_RAGGED[1] if ragged else MAXSIM_OP_FIXED_LD
        inputs = {"q": tokens_of(nq, MAXSIM_OP_LQ), "d": tokens_of(nd, ld), "d_mask": None}
        lengths = torch.full((nd,), ld)
        if ragged:
            lengths = torch.randint(MAXSIM_OP_RAGGED[0], ld + 1, (nd,), generator=gen, device=device)
            inputs["d_mask"] = torch.arange(ld, device=device)[None, :] < lengths[:, None]
        if importlib.util.find_spec("maxsim_cpu") is not None and dtype == torch.float32 and device.type == "cpu":
            # The package's inputs, built outside the timed runs: float32 numpy, unpadded documents.
            inputs["np_q"] = [x.numpy() for x in inputs["q"]]
            inputs["np_d"] = [inputs["d"][b, : int(n)].numpy() for b, n in enumerate(lengths)] if ragged else (
                inputs["d"].numpy())
        return inputs

    return make


def _maxsim_op_xloss(inputs: dict) -> None:
    import xloss

    with torch.no_grad():
        xloss.maxsim(inputs["q"], inputs["d"], None, inputs["d_mask"])


def _maxsim_op_naive(inputs: dict) -> None:
    """The naive scorer: einsum + (masked) max + sum, the padded [Nq, Nd, Lq, Ld] similarities."""
    from xloss import reference

    with torch.no_grad():
        reference.maxsim(inputs["q"], inputs["d"], None, inputs["d_mask"])


def _maxsim_op_package(inputs: dict) -> None:
    import maxsim_cpu

    if "np_q" not in inputs:
        raise RuntimeError("maxsim_cpu runs on float32 CPU inputs only")
    score = maxsim_cpu.maxsim_scores_variable if isinstance(inputs["np_d"], list) else maxsim_cpu.maxsim_scores
    for q in inputs["np_q"]:
        score(q, inputs["np_d"])


def _maxsim_op_backend(device: torch.device) -> str:
    from xloss import _ext

    return "cpu-op" if device.type == "cpu" and _ext.has_op("maxsim_q2d") else xloss_backend("late_interaction")(device)


for _name, _ragged in (("maxsim_cpu_op", False), ("maxsim_cpu_op_ragged", True)):
    _ld = MAXSIM_OP_RAGGED[1] if _ragged else MAXSIM_OP_FIXED_LD
    register(
        Family(
            name=_name,
            make_inputs=_maxsim_op_inputs(_ragged),
            xloss=Impl("xloss", "xloss.maxsim (no_grad, CPU op)", _maxsim_op_xloss, _maxsim_op_backend),
            naive=Impl(
                "naive", "xloss.reference.maxsim (no_grad, padded)", _maxsim_op_naive, lambda device: "reference",
                estimate_peak_bytes=_late_naive_peak((MAXSIM_OP_LQ, _ld), NAIVE_LATE_SCORE_FACTOR),
            ),
            extras={
                "maxsim_cpu": Impl(
                    "maxsim_cpu", "maxsim_cpu.maxsim_scores" + ("_variable" if _ragged else ""), _maxsim_op_package,
                    lambda device: "cpu", unavailable=missing("maxsim_cpu"),
                ),
            },
            flops=_late_flops((MAXSIM_OP_LQ, _ld), backward=False),  # ragged: padded FLOPs (the naive work)
        )
    )
