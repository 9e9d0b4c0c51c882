"""``python -m xloss.bench``: xloss against naive PyTorch, forward+backward time and peak memory.

For every case (a loss family at one shape ``(N, M, D)``) the command measures each implementation in a
fresh worker process, prints an aligned table (times, peak memories and the xloss/naive ratios), and writes a
CSV and a PNG plot to ``--out`` (default ``benchmarks/results/``)::

    python -m xloss.bench                              # preset "default" on CUDA if available, else CPU
    python -m xloss.bench --preset acceptance-cpu      # N=M=16384 D=512 and N=M=65536 D=256, fp32, CPU
    python -m xloss.bench --preset gpu                 # N=M=65536 D=768 bf16, also against inf_cl
    python -m xloss.bench --sizes 1024,2048 --dim 256 --runs 5
    python -m xloss.bench --quick --no-plot            # CI smoke test

How it measures:

* One worker process per (implementation, case) (``python -m xloss.bench --worker SPEC``, answering one JSON
  line), so that memory freed by one implementation does not lower the next one's peak, and so that a worker
  killed by the OOM killer is reported instead of ending the benchmark.
* In the worker: a tiny priming run (code pages, thread pools), the inputs, one warm-up run that also
  measures the peak memory, then ``runs`` timed runs (median reported, all times kept in the CSV).
* Peak memory is what the run adds on top of its inputs.  CUDA: ``max_memory_allocated`` after
  ``reset_peak_memory_stats``, minus what was allocated before.  CPU: growth of the resident set, i.e.
  ``VmHWM`` after the run minus ``VmRSS`` before it, with the high-water mark reset through
  ``/proc/self/clear_refs`` first.
* A naive run whose estimated peak exceeds 85 % of the available memory (``MemAvailable``, or free CUDA
  memory; ``--mem-limit-gib`` lowers it) is not launched and is reported as ``skipped: needs ~X GiB, Y GiB
  available``; a worker that runs out of memory anyway is reported as ``oom``.

New loss families plug in through ``register(Family(...))``: a function building inputs for a shape, the
xloss and naive implementations (each running forward+backward), optional extra baselines and an estimate of
the naive peak memory.  Only torch is needed to import this module; tqdm and matplotlib are optional.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import gc
import importlib.metadata
import importlib.util
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

RESULT_TAG = "XLOSS_BENCH_RESULT "  # marks the worker's answer among anything else printed on stdout
MEM_FRACTION = 0.85  # launch a naive run only when its estimated peak fits in this share of free memory
CLIP_MAX_SCALE = 100.0  # CLIP clamps exp(logit_scale) at 100: a realistic, numerically demanding scale
DEFAULT_TIMEOUT_S = 3600.0
MIB = 2**20
GIB = 2**30


# ----------------------------------------------------------------------------------------------------------
# Families: what to run
# ----------------------------------------------------------------------------------------------------------

Shape = tuple[int, int, int]  # (N, M, D)


@dataclass(frozen=True)
class Impl:
    """One implementation of a family, run as forward + backward on the family's inputs.

    Attributes:
        name: short name used on the command line and in the CSV ("xloss", "naive", "inf_cl").
        label: what it calls, for the table and the CSV ("xloss.info_nce").
        run: ``run(inputs)`` computes the loss and calls ``.backward()``.
        backend: ``backend(device)`` names the code path that runs ("cpu", "triton", "reference", ...).
        estimate_peak_bytes: ``f(shape, dtype, device)``, the expected peak memory of one run, or None when
            the implementation is small enough never to need the check.
        unavailable: ``f()`` returns why the implementation cannot run here (e.g. a package is missing), or
            None when it can.
    """

    name: str
    label: str
    run: Callable[[dict], None]
    backend: Callable[[torch.device], str]
    estimate_peak_bytes: Callable[[Shape, torch.dtype, torch.device], int] | None = None
    unavailable: Callable[[], str | None] = lambda: None


@dataclass(frozen=True)
class Family:
    """A loss family: how to build inputs for a shape, and the implementations to compare.

    Attributes:
        name: the family's name ("info_nce").
        make_inputs: ``f(shape, dtype, device)`` returns a dict of tensors (leaves requiring grad included).
        xloss: the implementation under test.
        naive: the naive PyTorch reference it is compared with.
        extras: further baselines, run only when a preset or ``--baselines`` asks for them.
        flops: ``f(shape)``, the FLOPs of one xloss forward+backward, for the TFLOP/s column (or None).
    """

    name: str
    make_inputs: Callable[[Shape, torch.dtype, torch.device], dict]
    xloss: Impl
    naive: Impl
    extras: dict[str, Impl] = field(default_factory=dict)
    flops: Callable[[Shape], float] | None = None

    def impl(self, name: str) -> Impl:
        """The implementation called ``name``."""
        impls = {"xloss": self.xloss, "naive": self.naive, **self.extras}
        if name not in impls:
            raise KeyError(f"family {self.name!r} has no implementation {name!r}; it has {sorted(impls)}")
        return impls[name]


FAMILIES: dict[str, Family] = {}


def register(family: Family) -> Family:
    """Add a family to the benchmark (later registrations of the same name replace earlier ones)."""
    FAMILIES[family.name] = family
    return family


# --- InfoNCE ----------------------------------------------------------------------------------------------

# Peak of the naive InfoNCE forward+backward, measured as RSS growth on CPU fp32 (N=M=1024/2048/4096, D=512):
# 5.5 / 5.4 / 4.1 × N·M·itemsize (the logits, two log-softmaxes and their gradients).  5 plus the O((N+M)·D)
# gradients is a fair, slightly generous estimate for the skip decision.
NAIVE_INFO_NCE_FACTOR = 5.0


def _info_nce_inputs(shape: Shape, dtype: torch.dtype, device: torch.device) -> dict:
    """L2-normalised random ``q [N, D]``, ``k [M, D]`` and a 0-dim fp32 scale of 100, all requiring grad."""
    n, m, d = shape
    gen = torch.Generator(device=device).manual_seed(0)

    def features(rows: int) -> torch.Tensor:
        x = torch.randn(rows, d, generator=gen, device=device)
        return torch.nn.functional.normalize(x, dim=-1).to(dtype).requires_grad_()

    scale = torch.tensor(CLIP_MAX_SCALE, device=device, requires_grad=True)
    return {"q": features(n), "k": features(m), "scale": scale}


def _info_nce_xloss(inputs: dict) -> None:
    import xloss

    xloss.info_nce(inputs["q"], inputs["k"], logit_scale=inputs["scale"]).backward()


def _info_nce_naive(inputs: dict) -> None:
    from xloss import reference

    reference.info_nce(inputs["q"], inputs["k"], logit_scale=inputs["scale"]).backward()


def _inf_cl_head_dim(d: int) -> int:
    """inf_cl splits D into heads of 16..256 channels: the largest that divides D."""
    return next((h for h in (256, 128, 64, 32, 16) if d % h == 0), d)


def _info_nce_inf_cl(inputs: dict) -> None:
    # inf_cl's loss is one-way (rows); CLIP's symmetric loss is the mean of image→text and text→image.
    from inf_cl import cal_inf_loss

    q, k, s = inputs["q"], inputs["k"], inputs["scale"]
    h = _inf_cl_head_dim(q.shape[1])
    loss = (cal_inf_loss(q, k, scale=s, head_dim=h) + cal_inf_loss(k, q, scale=s, head_dim=h)) / 2
    loss.backward()


def _info_nce_naive_peak(shape: Shape, dtype: torch.dtype, device: torch.device) -> int:
    n, m, d = shape
    size = torch.empty((), dtype=dtype).element_size()
    return int(NAIVE_INFO_NCE_FACTOR * n * m * size + 2 * (n + m) * d * size)


def _xloss_backend(family: str) -> Callable[[torch.device], str]:
    def backend(device: torch.device) -> str:
        from xloss import _backend

        return _backend.resolve("auto", device, family)

    return backend


def _missing(module: str) -> Callable[[], str | None]:
    def unavailable() -> str | None:
        return None if importlib.util.find_spec(module) is not None else f"{module} is not installed"

    return unavailable


register(
    Family(
        name="info_nce",
        make_inputs=_info_nce_inputs,
        xloss=Impl("xloss", "xloss.info_nce", _info_nce_xloss, _xloss_backend("info_nce")),
        naive=Impl(
            "naive", "xloss.reference.info_nce", _info_nce_naive, lambda device: "reference",
            estimate_peak_bytes=_info_nce_naive_peak,
        ),
        extras={
            "inf_cl": Impl(
                "inf_cl", "inf_cl.cal_inf_loss (×2, symmetric)", _info_nce_inf_cl, lambda device: "triton",
                unavailable=_missing("inf_cl"),
            ),
        },
        flops=lambda shape: 8.0 * shape[0] * shape[1] * shape[2],  # 4 GEMM sweeps (SPEC.md §1)
    )
)


# --- Late interaction (MaxSim) ------------------------------------------------------------------------------
# The shape tuple is (Nq, Nd, D); the token counts are fixed by each family: ColBERT-like training with
# 32 query tokens against documents of up to 180 tokens, and scoring with 32 query tokens against documents of
# up to 300 tokens.  Documents have ragged lengths (a bool mask), queries are full (ColBERT pads them with
# [MASK] tokens that count).

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
        inputs = {"q": tokens_of(nq, lq), "d": tokens_of(nd, ld), "d_mask": d_mask}
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
        xloss=Impl("xloss", "xloss.late_interaction_loss", _late_xloss, _xloss_backend("late_interaction")),
        naive=Impl(
            "naive", "xloss.reference.late_interaction_loss", _late_naive, lambda device: "reference",
            estimate_peak_bytes=_late_naive_peak(LATE_TRAIN_TOKENS, NAIVE_LATE_TRAIN_FACTOR),
        ),
        flops=_late_flops(LATE_TRAIN_TOKENS, backward=True),
    )
)

register(
    Family(
        name="maxsim_scoring",
        make_inputs=_late_inputs(LATE_SCORE_TOKENS, grad=False),
        xloss=Impl("xloss", "xloss.maxsim (no_grad)", _scoring_xloss, _xloss_backend("late_interaction")),
        naive=Impl(
            "naive", "xloss.reference.maxsim (no_grad)", _scoring_naive, lambda device: "reference",
            estimate_peak_bytes=_late_naive_peak(LATE_SCORE_TOKENS, NAIVE_LATE_SCORE_FACTOR),
        ),
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

    return "cpu-op" if device.type == "cpu" and _ext.has_op("maxsim_q2d") else _xloss_backend("late_interaction")(device)


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
                    lambda device: "cpu", unavailable=_missing("maxsim_cpu"),
                ),
            },
            flops=_late_flops((MAXSIM_OP_LQ, _ld), backward=False),  # ragged: padded FLOPs (the naive work)
        )
    )


# --- Symile ("n_squared", M = 3) ----------------------------------------------------------------------------
# The shape tuple is (N, N, D): three modalities [N, D].  The naive loss builds, per anchor, the N^2 products of
# the other two modalities (a list and its concatenation, N^2·D each) and the [N, N^2] logits; with a gradient
# it keeps the logits, their scaled copy and the log-softmax of all three anchors until backward.
SYMILE_MODALITIES = 3


def _symile_inputs(grad: bool) -> Callable[[Shape, torch.dtype, torch.device], dict]:
    def make(shape: Shape, dtype: torch.dtype, device: torch.device) -> dict:
        """Three L2-normalised ``[N, D]`` modalities and a 0-dim fp32 scale of 100."""
        n, _, d = shape
        gen = torch.Generator(device=device).manual_seed(0)
        reps = [
            torch.nn.functional.normalize(torch.randn(n, d, generator=gen, device=device), dim=-1)
            .to(dtype).requires_grad_(grad)
            for _ in range(SYMILE_MODALITIES)
        ]
        return {"reps": reps, "scale": torch.tensor(CLIP_MAX_SCALE, device=device, requires_grad=grad)}

    return make


def _symile_run(naive: bool, grad: bool) -> Callable[[dict], None]:
    def run(inputs: dict) -> None:
        import xloss
        from xloss import reference

        fn = reference.symile_loss if naive else xloss.symile_loss
        if grad:
            fn(inputs["reps"], inputs["scale"], "n_squared").backward()
        else:
            with torch.no_grad():
                fn(inputs["reps"], inputs["scale"], "n_squared")

    return run


def _symile_naive_peak(grad: bool) -> Callable[[Shape, torch.dtype, torch.device], int]:
    def estimate(shape: Shape, dtype: torch.dtype, device: torch.device) -> int:
        n, _, d = shape
        size = torch.empty((), dtype=dtype).element_size()
        logits, products = n**3 * size, n * n * d * size
        if grad:  # 3 anchors × (saved logits, scaled logits, log-softmax, products) + backward temporaries
            return int(SYMILE_MODALITIES * (3 * logits + 2 * products) + 2 * logits)
        return int(3 * logits + 2 * products)  # one anchor at a time

    return estimate


def _symile_flops(backward: bool) -> Callable[[Shape], float]:
    # One shared N^3·D GEMM sweep for the three anchors' LSEs; backward recomputes it and adds two more.
    def flops(shape: Shape) -> float:
        n, _, d = shape
        return 2.0 * n**3 * d * (4 if backward else 1)

    return flops


register(
    Family(
        name="symile",
        make_inputs=_symile_inputs(grad=True),
        xloss=Impl("xloss", "xloss.symile_loss (n_squared)", _symile_run(False, True), _xloss_backend("symile")),
        naive=Impl(
            "naive", "xloss.reference.symile_loss (n_squared)", _symile_run(True, True), lambda device: "reference",
            estimate_peak_bytes=_symile_naive_peak(grad=True),
        ),
        flops=_symile_flops(backward=True),
    )
)

register(
    Family(
        name="symile_forward",
        make_inputs=_symile_inputs(grad=False),
        xloss=Impl("xloss", "xloss.symile_loss (n_squared, no_grad)", _symile_run(False, False),
                   _xloss_backend("symile")),
        naive=Impl(
            "naive", "xloss.reference.symile_loss (n_squared, no_grad)", _symile_run(True, False),
            lambda device: "reference", estimate_peak_bytes=_symile_naive_peak(grad=False),
        ),
        flops=_symile_flops(backward=False),
    )
)


# --- GRAM (Gram volume, k = 4) -------------------------------------------------------------------------------
# The shape tuple is (N, N, D): an anchor and 3 other modalities [N, D], temperature 0.07 (a tensor).  The naive
# loss builds the [N, N, k, k] Gram tensor through stacks ([N, N, k] rows, then the whole), a det (LU copy) and,
# in backward, the det's solve and the stacks' gradients: ~6 copies of the k²·N² Gram tensor.
GRAM_MODALITIES = 4
NAIVE_GRAM_FACTOR = 6.0


def _gram_inputs(shape: Shape, dtype: torch.dtype, device: torch.device) -> dict:
    """An anchor and GRAM_MODALITIES − 1 other L2-normalised ``[N, D]`` modalities, and τ = 0.07 (fp32 tensor)."""
    n, _, d = shape
    gen = torch.Generator(device=device).manual_seed(0)
    feats = [
        torch.nn.functional.normalize(torch.randn(n, d, generator=gen, device=device), dim=-1).to(dtype).requires_grad_()
        for _ in range(GRAM_MODALITIES)
    ]
    return {"feats": feats, "temperature": torch.tensor(0.07, device=device, requires_grad=True)}


def _gram_run(naive: bool) -> Callable[[dict], None]:
    def run(inputs: dict) -> None:
        import xloss
        from xloss import reference

        fn = reference.gram_loss if naive else xloss.gram_loss
        fn(*inputs["feats"], temperature=inputs["temperature"]).backward()

    return run


def _gram_naive_peak(shape: Shape, dtype: torch.dtype, device: torch.device) -> int:
    n, m, d = shape
    size = torch.empty((), dtype=dtype).element_size()
    return int(NAIVE_GRAM_FACTOR * GRAM_MODALITIES**2 * n * m * size + 2 * GRAM_MODALITIES * n * d * size)


register(
    Family(
        name="gram",
        make_inputs=_gram_inputs,
        xloss=Impl("xloss", "xloss.gram_loss (k=4)", _gram_run(False), _xloss_backend("gram")),
        naive=Impl(
            "naive", "xloss.reference.gram_loss (k=4, det)", _gram_run(True), lambda device: "reference",
            estimate_peak_bytes=_gram_naive_peak,
        ),
        # k−1 GEMMs forward, recomputed in backward, plus 2(k−1) gradient GEMMs: 4(k−1)·2·N²·D
        flops=lambda shape: 8.0 * (GRAM_MODALITIES - 1) * shape[0] * shape[1] * shape[2],
    )
)


# --- Banzhaf interaction (HBI) -------------------------------------------------------------------------------
# The shape tuple is (B, T, V): B pairs of T words and V frames, BANZHAF_SAMPLES coalitions per (word, frame),
# mode "hbi".  No gradient (the result is a distillation target): both runs are forward only.  "naive" is the
# reference port of HBI's Python loop (T·V·samples iterations of small batched ops); both sample their own
# coalitions (the values on the same explicit coalitions are compared in tests/test_banzhaf.py).
BANZHAF_SAMPLES = 10


def _banzhaf_inputs(shape: Shape, dtype: torch.dtype, device: torch.device) -> dict:
    """HBI-like inputs: similarities ×1000, softmaxed weights, ragged word masks, all frames valid."""
    b, t, v = shape
    gen = torch.Generator(device=device).manual_seed(0)
    tm = torch.arange(t, device=device)[None] < torch.randint(1, t + 1, (b,), generator=gen, device=device)[:, None]
    vm = torch.ones(b, v, dtype=torch.bool, device=device)
    sim = (torch.rand(b, t, v, generator=gen, device=device) * 2 - 1) * 1000
    p = torch.softmax(torch.randn(b, t, generator=gen, device=device).masked_fill(~tm, -9e15), -1)
    q = torch.softmax(torch.randn(b, v, generator=gen, device=device), -1)
    return {"sim": sim.to(dtype), "p": p.to(dtype), "q": q.to(dtype), "tm": tm, "vm": vm}


def _banzhaf_run(naive: bool) -> Callable[[dict], None]:
    def run(inputs: dict) -> None:
        import xloss

        xloss.banzhaf_interaction(
            inputs["sim"], inputs["p"], inputs["q"], inputs["tm"], inputs["vm"], num_samples=BANZHAF_SAMPLES,
            generator=torch.Generator().manual_seed(1), backend="reference" if naive else "auto",
        )

    return run


def _banzhaf_backend(device: torch.device) -> str:
    from xloss import banzhaf

    if banzhaf._path("auto", device) != "op":
        return "cpu"  # the vectorised PyTorch path
    return "cuda" if device.type == "cuda" else "cpp"  # the compiled op


register(
    Family(
        name="banzhaf",
        make_inputs=_banzhaf_inputs,
        xloss=Impl("xloss", f"xloss.banzhaf_interaction (hbi, {BANZHAF_SAMPLES} samples)", _banzhaf_run(False),
                   _banzhaf_backend),
        naive=Impl("naive", f"xloss.reference.banzhaf_interaction (HBI's loop, {BANZHAF_SAMPLES} samples)",
                   _banzhaf_run(True), lambda device: "reference"),
    )
)


# --- Sigmoid loss (SigLIP) ---------------------------------------------------------------------------------
# Peak of the naive sigmoid loss forward+backward as multiples of N·M·itemsize: the logits, the ±1 label
# matrix, their product, logsigmoid's output and buffer, and in backward the gradients of the product and of
# the logits (measured as RSS growth on CPU fp32, see the family's report).
NAIVE_SIGMOID_FACTOR = 6.0
SIGLIP_INIT = (10.0, -10.0)  # SigLIP's initial logit scale (exp(log 10)) and bias


def _sigmoid_inputs(shape: Shape, dtype: torch.dtype, device: torch.device) -> dict:
    """L2-normalised ``q [N, D]``, ``k [M, D]``, 0-dim fp32 scale 10 and bias -10, all requiring grad."""
    inputs = _info_nce_inputs(shape, dtype, device)
    inputs["scale"] = torch.tensor(SIGLIP_INIT[0], device=device, requires_grad=True)
    inputs["bias"] = torch.tensor(SIGLIP_INIT[1], device=device, requires_grad=True)
    return inputs


def _sigmoid_run(naive: bool) -> Callable[[dict], None]:
    def run(inputs: dict) -> None:
        import xloss
        from xloss import reference

        fn = reference.sigmoid_loss if naive else xloss.sigmoid_loss
        fn(inputs["q"], inputs["k"], logit_scale=inputs["scale"], logit_bias=inputs["bias"]).backward()

    return run


def _sigmoid_naive_peak(shape: Shape, dtype: torch.dtype, device: torch.device) -> int:
    n, m, d = shape
    size = torch.empty((), dtype=dtype).element_size()
    return int(NAIVE_SIGMOID_FACTOR * n * m * size + 2 * (n + m) * d * size)


register(
    Family(
        name="sigmoid",
        make_inputs=_sigmoid_inputs,
        xloss=Impl("xloss", "xloss.sigmoid_loss", _sigmoid_run(False), _xloss_backend("sigmoid")),
        naive=Impl(
            "naive", "xloss.reference.sigmoid_loss (open_clip SigLipLoss)", _sigmoid_run(True),
            lambda device: "reference", estimate_peak_bytes=_sigmoid_naive_peak,
        ),
        flops=lambda shape: 6.0 * shape[0] * shape[1] * shape[2],  # 3 GEMM sweeps (SPEC.md §2)
    )
)


# ----------------------------------------------------------------------------------------------------------
# Presets: which shapes, dtype, device and baselines
# ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Preset:
    """Shapes, dtype, number of timed runs and baselines for one device type."""

    shapes: tuple[Shape, ...]
    dtype: str
    runs: int = 3
    baselines: tuple[str, ...] = ("naive",)
    families: tuple[str, ...] | None = None  # what "--family all" runs; None: every registered family
    family_shapes: dict[str, tuple[Shape, ...]] | None = None  # shapes of a family, instead of `shapes`


def _square(sizes: Sequence[int], d: int) -> tuple[Shape, ...]:
    return tuple((n, n, d) for n in sizes)


PRESETS: dict[str, dict[str, Preset]] = {
    "default": {
        "cpu": Preset(
            _square((1024, 2048, 4096, 8192, 16384), 512), "float32",
            families=("info_nce", "late_interaction", "maxsim_scoring", "gram", "symile", "sigmoid"),
            family_shapes={
                "late_interaction": _square((64, 128, 256), 128),  # Lq=32, Ld=180
                "maxsim_scoring": ((64, 250, 128), (64, 1000, 128)),  # Lq=32, Ld=300
                "gram": _square((1024, 2048, 4096), 512),  # k=4 modalities
                "symile": _square((128, 256, 512), 256),  # M=3, "n_squared"
            },
        ),
        "cuda": Preset(
            _square((4096, 8192, 16384, 32768, 65536), 768), "bfloat16",
            families=("info_nce", "late_interaction"),
            family_shapes={"late_interaction": _square((256, 1024), 128)},  # the ColBERT training shape
        ),
    },
    "acceptance-cpu": {
        "cpu": Preset(((16384, 16384, 512), (65536, 65536, 256)), "float32", families=("info_nce",)),
    },
    # Late interaction, CPU fp32: training at Nq=Nd=256 (Lq=32, Ld=180) and scoring 64 queries against 1000
    # documents (Lq=32, Ld=300), D=128.
    "late-interaction-cpu": {"cpu": Preset(
        ((256, 256, 128),), "float32", families=("late_interaction", "maxsim_scoring"),
        family_shapes={"maxsim_scoring": ((64, 1000, 128),)},
    )},
    # Symile "n_squared" (M = 3), CPU fp32: training at N=512, D=256.
    # The compiled CPU MaxSim op: one query of 32 tokens against 1000 documents, D=128, fixed 300 tokens and
    # ragged 50-800 tokens; baselines the naive padded scorer and the maxsim-cpu package.
    "maxsim-op-cpu": {"cpu": Preset(
        ((1, 1000, 128),), "float32", runs=5, baselines=("naive", "maxsim_cpu"),
        families=("maxsim_cpu_op", "maxsim_cpu_op_ragged"),
    )},
    "symile-cpu": {"cpu": Preset(((512, 512, 256),), "float32", families=("symile",))},
    # Forward only at N=1024, D=256: xloss within a few hundred MiB, the naive [N, N^2] logits need ~13 GiB.
    "symile-forward-cpu": {"cpu": Preset(((1024, 1024, 256),), "float32", runs=1, families=("symile_forward",))},
    # GRAM, k = 4 modalities, CPU fp32: N=4096, D=512 (the naive [N, N, 4, 4] Gram tensor alone is 1 GiB).
    "gram-cpu": {"cpu": Preset(((4096, 4096, 512),), "float32", families=("gram",))},
    # HBI's Banzhaf interaction, CPU fp32: B=32 pairs, T=32 words, V=12 frames, 10 samples (shape = (B, T, V)).
    "banzhaf-cpu": {"cpu": Preset(((32, 32, 12),), "float32", runs=1, families=("banzhaf",))},
    # Sigmoid loss (SigLIP), CPU fp32: the acceptance shape N = M = 16384, D = 512.
    "sigmoid-cpu": {"cpu": Preset(((16384, 16384, 512),), "float32", families=("sigmoid",))},
    "gpu": {"cuda": Preset(((65536, 65536, 768),), "bfloat16", baselines=("naive", "inf_cl"), families=("info_nce",))},
    "quick": {
        "cpu": Preset(_square((512, 1024), 64), "float32", runs=2, families=("info_nce",)),
        "cuda": Preset(_square((1024, 2048), 128), "float32", runs=2, families=("info_nce",)),
    },
}


# ----------------------------------------------------------------------------------------------------------
# Memory and device facts
# ----------------------------------------------------------------------------------------------------------


def _proc_status_bytes(key: str) -> int:
    """A ``kB`` field of /proc/self/status (VmRSS, VmHWM), in bytes."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(key)


def _reset_rss_peak() -> bool:
    """Reset the kernel's resident-set high-water mark (VmHWM) to the current RSS; False where impossible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def cpu_available_bytes() -> int:
    """MemAvailable from /proc/meminfo (what can be allocated without swapping)."""
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("MemAvailable not found in /proc/meminfo")


def cpu_name() -> str:
    """The CPU model from /proc/cpuinfo, with the core count."""
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{model} ({os.cpu_count()} cores)"


class PeakMemory:
    """Context manager measuring the peak memory a block adds on top of what is held when it starts.

    ``peak_bytes`` is set on exit, or stays None when the platform gives no way to measure it.
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.peak_bytes: int | None = None

    def __enter__(self):
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
        else:
            self._base = _proc_status_bytes("VmRSS")
            self._can_reset = _reset_rss_peak()
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_bytes = torch.cuda.max_memory_allocated(self.device) - self._base
        elif self._can_reset:
            self.peak_bytes = max(0, _proc_status_bytes("VmHWM") - self._base)
        return False


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ----------------------------------------------------------------------------------------------------------
# Worker: one (implementation, case) in a fresh process
# ----------------------------------------------------------------------------------------------------------


def _is_oom(exc: BaseException) -> bool:
    oom_types = tuple(t for t in (getattr(torch, "OutOfMemoryError", None), torch.cuda.OutOfMemoryError) if t)
    if isinstance(exc, (MemoryError, *oom_types)):
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text)


def _clear_grads(inputs: dict) -> None:
    # Each run starts without gradients, so runs allocate (and are measured) alike instead of accumulating.
    for t in inputs.values():
        if isinstance(t, torch.Tensor):
            t.grad = None


def measure(family: Family, impl: Impl, shape: Shape, dtype: torch.dtype, device: torch.device,
            runs: int) -> dict:
    """Prime, build inputs, warm up (measuring peak memory) and time ``runs`` runs of one implementation.

    Returns:
        ``{"status", "times_s", "median_s", "peak_bytes", "backend", "threads"}``; status "ok", "oom" or
        "error: ...".
    """
    result = {"backend": None, "threads": torch.get_num_threads(), "times_s": [], "median_s": None,
              "peak_bytes": None}
    try:
        result["backend"] = impl.backend(device)
        # A tiny run first loads code and starts thread pools, so that the peak below is the case's own.
        tiny = family.make_inputs(tuple(min(x, 64) for x in shape), dtype, device)
        impl.run(tiny)
        del tiny
        inputs = family.make_inputs(shape, dtype, device)
        with PeakMemory(device) as peak:
            impl.run(inputs)
        result["peak_bytes"] = peak.peak_bytes
        for _ in range(runs):
            _clear_grads(inputs)
            _synchronize(device)
            start = time.perf_counter()
            impl.run(inputs)
            _synchronize(device)
            result["times_s"].append(time.perf_counter() - start)
        result["median_s"] = statistics.median(result["times_s"])
        result["status"] = "ok"
    except Exception as exc:  # noqa: BLE001  reported in the table: one failing case must not end the run
        if _is_oom(exc):
            result["status"] = f"oom ({type(exc).__name__})"
        else:
            result["status"] = f"error: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    return result


def _worker_main(spec_json: str) -> int:
    """Entry of ``--worker``: run :func:`measure` on a JSON spec and print the tagged JSON answer."""
    spec = json.loads(spec_json)
    if spec.get("threads"):
        torch.set_num_threads(int(spec["threads"]))
    family = FAMILIES[spec["family"]]
    result = measure(
        family, family.impl(spec["impl"]), tuple(spec["shape"]), getattr(torch, spec["dtype"]),
        torch.device(spec["device"]), int(spec["runs"]),
    )
    print(RESULT_TAG + json.dumps(result), flush=True)
    return 0


def _probe_main(device: str) -> int:
    """Entry of ``--probe``: device name and free memory, asked in a child so the parent never holds CUDA."""
    dev = torch.device(device)
    info = {"device_name": cpu_name(), "free_bytes": cpu_available_bytes()}
    if dev.type == "cuda":
        free, _total = torch.cuda.mem_get_info(dev)
        info = {"device_name": torch.cuda.get_device_name(dev), "free_bytes": free}
    print(RESULT_TAG + json.dumps(info), flush=True)
    return 0


def _package_root() -> str:
    return str(Path(__file__).resolve().parent.parent)


def _run_child(args: list[str], timeout: float | None) -> dict:
    """Run ``python -m xloss.bench ARGS`` and return its tagged JSON answer, or a status saying why not."""
    env = dict(os.environ)
    # The child must import this same xloss, installed or not.
    env["PYTHONPATH"] = os.pathsep.join(p for p in (_package_root(), env.get("PYTHONPATH")) if p)
    try:
        proc = subprocess.run([sys.executable, "-m", "xloss.bench", *args], capture_output=True, text=True,
                              timeout=timeout, env=env, check=False)
    except subprocess.TimeoutExpired:
        return {"status": f"timeout (> {timeout:.0f} s)"}
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(RESULT_TAG):
            return json.loads(line[len(RESULT_TAG):])
    if proc.returncode == -signal.SIGKILL:
        return {"status": "oom (worker killed by SIGKILL)"}
    last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
    return {"status": f"error: worker exited with code {proc.returncode}: {last}"}


# ----------------------------------------------------------------------------------------------------------
# Driver
# ----------------------------------------------------------------------------------------------------------


@dataclass
class Config:
    """Everything one invocation measures."""

    families: list[str]
    shapes: list[Shape]
    dtype: str
    device: str
    runs: int
    baselines: tuple[str, ...]
    preset: str
    out: Path
    plot: bool
    mem_limit_bytes: int | None
    timeout_s: float | None
    threads: int | None = None
    family_shapes: dict[str, list[Shape]] = field(default_factory=dict)


def _versions() -> dict:
    """torch / triton / xloss versions without importing Triton (metadata only)."""
    from xloss import __version__

    try:
        triton_version = importlib.metadata.version("triton")
    except importlib.metadata.PackageNotFoundError:
        triton_version = ""
    return {"torch_version": torch.__version__, "triton_version": triton_version, "xloss_version": __version__,
            "xloss_commit": _git_commit(), "python_version": platform.python_version()}


def _git_commit() -> str:
    """The short commit of the xloss checkout, or "" when not run from a git checkout."""
    try:
        out = subprocess.run(["git", "-C", _package_root(), "rev-parse", "--short", "HEAD"],
                             capture_output=True, text=True, timeout=10, check=False)
        return out.stdout.strip() if out.returncode == 0 else ""
    except (OSError, subprocess.TimeoutExpired):
        return ""


def available_bytes(device: str, probed_free: int | None, limit: int | None) -> int:
    """Memory a naive run may use: MemAvailable now (CPU) or the probed free CUDA memory, capped by limit."""
    free = cpu_available_bytes() if device == "cpu" else probed_free
    if free is None:
        free = limit if limit is not None else sys.maxsize
    return min(free, limit) if limit is not None else free


def _fmt_gib(nbytes: float) -> str:
    return f"{nbytes / GIB:.1f}"


def run_impl(family: Family, impl: Impl, shape: Shape, cfg: Config, probed_free: int | None) -> dict:
    """Measure one implementation on one shape in a worker, unless it is unavailable or cannot fit."""
    reason = impl.unavailable()
    if reason:
        return {"status": f"unavailable: {reason}"}
    estimate = None
    if impl.estimate_peak_bytes is not None:
        estimate = impl.estimate_peak_bytes(shape, getattr(torch, cfg.dtype), torch.device(cfg.device))
        free = available_bytes(cfg.device, probed_free, cfg.mem_limit_bytes)
        if estimate > MEM_FRACTION * free:
            return {"status": f"skipped: needs ~{_fmt_gib(estimate)} GiB, {_fmt_gib(free)} GiB available",
                    "estimate_bytes": estimate}
    spec = {"family": family.name, "impl": impl.name, "shape": list(shape), "dtype": cfg.dtype,
            "device": cfg.device, "runs": cfg.runs, "threads": cfg.threads}
    result = _run_child(["--worker", json.dumps(spec)], cfg.timeout_s)
    result["estimate_bytes"] = estimate
    return result


CSV_COLUMNS = [
    "family", "xloss_impl", "baseline", "baseline_impl", "n", "m", "d", "dtype", "device", "device_name",
    "backend", "baseline_backend", "threads", "runs", "xloss_time_s", "baseline_time_s", "time_ratio",
    "xloss_peak_bytes", "baseline_peak_bytes", "baseline_peak_estimate_bytes", "mem_ratio", "xloss_tflops",
    "xloss_times_s", "baseline_times_s", "status", "xloss_status", "baseline_status", "torch_version",
    "triton_version", "xloss_version", "xloss_commit", "python_version", "date", "preset",
]


def _ratio(a, b) -> float | None:
    return a / b if a is not None and b else None


def make_row(family: Family, shape: Shape, baseline: str, xl: dict, base: dict, cfg: Config,
             context: dict) -> dict:
    """One CSV/table row: xloss against one baseline at one shape."""
    both_ok = xl["status"] == "ok" and base["status"] == "ok"
    bad = [f"{name}: {r['status']}" for name, r in (("xloss", xl), (baseline, base)) if r["status"] != "ok"]
    flops = family.flops(shape) if family.flops and xl.get("median_s") else None
    return {
        "family": family.name, "xloss_impl": family.xloss.label, "baseline": baseline,
        "baseline_impl": family.impl(baseline).label, "n": shape[0], "m": shape[1], "d": shape[2],
        "dtype": cfg.dtype, "device": cfg.device, "backend": xl.get("backend"),
        "baseline_backend": base.get("backend"), "threads": xl.get("threads"), "runs": cfg.runs,
        "xloss_time_s": xl.get("median_s"), "baseline_time_s": base.get("median_s"),
        "time_ratio": _ratio(xl.get("median_s"), base.get("median_s")) if both_ok else None,
        "xloss_peak_bytes": xl.get("peak_bytes"), "baseline_peak_bytes": base.get("peak_bytes"),
        "baseline_peak_estimate_bytes": base.get("estimate_bytes"),
        "mem_ratio": _ratio(xl.get("peak_bytes"), base.get("peak_bytes")) if both_ok else None,
        "xloss_tflops": flops / xl["median_s"] / 1e12 if flops else None,
        "xloss_times_s": " ".join(f"{t:.6g}" for t in xl.get("times_s", [])),
        "baseline_times_s": " ".join(f"{t:.6g}" for t in base.get("times_s", [])),
        "status": "ok" if both_ok else "; ".join(bad),
        "xloss_status": xl["status"], "baseline_status": base["status"], "preset": cfg.preset, **context,
    }


def _progress(items: list, desc: str):
    """tqdm over items when installed, else a plain line per item on stderr."""
    try:
        from tqdm import tqdm
    except ImportError:
        def plain():
            for i, item in enumerate(items, 1):
                print(f"[{i}/{len(items)}] {desc}: {item[0]} N={item[1][0]} M={item[1][1]} D={item[1][2]}",
                      file=sys.stderr, flush=True)
                yield item
        return plain()
    return tqdm(items, desc=desc, unit="case", file=sys.stderr)


def run_family(family: Family, cfg: Config, context: dict, probed_free: int | None) -> list[dict]:
    """Measure every shape of one family: xloss once per shape, then each baseline; one row per baseline."""
    rows = []
    shapes = cfg.family_shapes.get(family.name, cfg.shapes)
    bar = _progress([(family.name, s) for s in shapes], desc=f"{family.name} on {cfg.device}")
    for _, shape in bar:
        if hasattr(bar, "set_postfix_str"):
            bar.set_postfix_str(f"N={shape[0]} M={shape[1]} D={shape[2]}")
        xl = run_impl(family, family.xloss, shape, cfg, probed_free)
        for baseline in cfg.baselines:
            base = run_impl(family, family.impl(baseline), shape, cfg, probed_free)
            rows.append(make_row(family, shape, baseline, xl, base, cfg, context))
    return rows


# ----------------------------------------------------------------------------------------------------------
# Output: table, CSV, plot
# ----------------------------------------------------------------------------------------------------------


def fmt_time(seconds: float | None) -> str:
    """``1.23 s`` or ``12.3 ms``; ``-`` when missing."""
    if seconds is None:
        return "-"
    return f"{seconds:.3g} s" if seconds >= 1 else f"{seconds * 1e3:.3g} ms"


def fmt_bytes(nbytes: float | None) -> str:
    """``1.23 GiB`` or ``123 MiB``; ``-`` when missing."""
    if nbytes is None:
        return "-"
    return f"{nbytes / GIB:.3g} GiB" if nbytes >= GIB else f"{nbytes / MIB:.3g} MiB"


def _fmt_ratio(r: float | None) -> str:
    return "-" if r is None else f"{r:.3g}"


def format_table(rows: list[dict]) -> str:
    """The aligned text table printed to stdout."""
    head = ["family", "impls", "N", "M", "D", "dtype", "t xloss", "t base", "mem xloss", "mem base",
            "t x/b", "mem x/b", "TFLOP/s", "status"]
    body = [[
        r["family"], f"xloss vs {r['baseline']}", str(r["n"]), str(r["m"]), str(r["d"]), r["dtype"],
        fmt_time(r["xloss_time_s"]), fmt_time(r["baseline_time_s"]), fmt_bytes(r["xloss_peak_bytes"]),
        fmt_bytes(r["baseline_peak_bytes"]), _fmt_ratio(r["time_ratio"]), _fmt_ratio(r["mem_ratio"]),
        "-" if r["xloss_tflops"] is None else f"{r['xloss_tflops']:.3g}", r["status"],
    ] for r in rows]
    widths = [max(len(line[i]) for line in [head, *body]) for i in range(len(head))]
    numeric = set(range(2, 5)) | set(range(6, 13))  # right-align numbers

    def line(cells):
        return "  ".join(c.rjust(w) if i in numeric else c.ljust(w)
                         for i, (c, w) in enumerate(zip(cells, widths))).rstrip()

    return "\n".join([line(head), line(["-" * w for w in widths]), *map(line, body)])


def write_csv(rows: list[dict], path: Path) -> None:
    """Write rows with :data:`CSV_COLUMNS` (missing values as empty cells)."""
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS)
        writer.writeheader()
        for r in rows:
            writer.writerow({k: "" if r.get(k) is None else r[k] for k in CSV_COLUMNS})


def write_plot(rows: list[dict], path: Path, title: str) -> bool:
    """Time and peak memory against batch size N, xloss and each baseline, log axes; False without matplotlib.

    Skipped naive runs appear as hollow markers at their estimated memory.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(11, 4.2))
    series: dict[str, dict[int, tuple]] = {}  # label -> {N: (time, mem, estimated)}
    dims = sorted({r["d"] for r in rows})
    for r in rows:
        suffix = f" (D={r['d']})" if len(dims) > 1 else ""
        series.setdefault("xloss" + suffix, {})[r["n"]] = (r["xloss_time_s"], r["xloss_peak_bytes"], None)
        series.setdefault(r["baseline"] + suffix, {})[r["n"]] = (
            r["baseline_time_s"], r["baseline_peak_bytes"], r["baseline_peak_estimate_bytes"])
    for label, points in series.items():
        ns = sorted(points)
        times = [(n, points[n][0]) for n in ns if points[n][0] is not None]
        mems = [(n, points[n][1] / MIB) for n in ns if points[n][1]]
        (line,) = ax_t.plot(*zip(*times), marker="o", label=label) if times else ax_t.plot([], [], label=label)
        if mems:
            ax_m.plot(*zip(*mems), marker="o", color=line.get_color(), label=label)
        est = [(n, points[n][2] / MIB) for n in ns if points[n][1] is None and points[n][2]]
        if est:
            ax_m.plot(*zip(*est), linestyle="none", marker="o", mfc="none", color=line.get_color(),
                      label=f"{label}, estimated (not run)")
    for ax, ylabel in ((ax_t, "forward+backward time (s)"), (ax_m, "peak memory (MiB)")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("batch size N (= M)")
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


# ----------------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------------


def _sizes(text: str) -> list[int]:
    try:
        sizes = [int(s) for s in text.replace(" ", "").split(",") if s]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--sizes wants comma-separated integers, got {text!r}") from None
    if not sizes or min(sizes) < 1:
        raise argparse.ArgumentTypeError(f"--sizes wants positive integers, got {text!r}")
    return sizes


def build_parser() -> argparse.ArgumentParser:
    """The command-line interface (see the module docstring)."""
    p = argparse.ArgumentParser(
        prog="python -m xloss.bench",
        description="xloss against naive PyTorch: forward+backward time and peak memory, table + CSV + PNG.",
    )
    p.add_argument("--family", default="all", choices=["all", *FAMILIES], help="loss family (default: all)")
    p.add_argument("--preset", choices=sorted(PRESETS), default=None,
                   help="shapes/dtype/baselines: default, acceptance-cpu, gpu, quick (default: default)")
    p.add_argument("--quick", action="store_true", help="tiny sizes for smoke tests (same as --preset quick)")
    p.add_argument("--sizes", type=_sizes, default=None, help="N=M list, e.g. 1024,2048,4096 (overrides preset)")
    p.add_argument("--dim", type=int, default=None, help="feature dimension D (overrides preset)")
    p.add_argument("--dtype", choices=["float32", "float16", "bfloat16", "float64"], default=None,
                   help="input dtype (default: the preset's)")
    p.add_argument("--runs", type=int, default=None, help="timed runs after one warm-up (default: 3)")
    p.add_argument("--device", choices=["cpu", "cuda"], default=None,
                   help="default: the preset's device, else cuda when available, else cpu")
    p.add_argument("--baselines", default=None,
                   help="comma-separated baselines to compare with (default: the preset's, e.g. naive)")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results"), help="output directory")
    p.add_argument("--no-plot", action="store_true", help="write no PNG")
    p.add_argument("--mem-limit-gib", type=float, default=None,
                   help="treat at most this much memory as available when deciding to skip naive runs")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads in each worker (default: torch's choice; recorded in the CSV)")
    p.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT_S, help="seconds per worker (default 3600)")
    p.add_argument("--worker", metavar="SPEC", help=argparse.SUPPRESS)  # internal: one measurement
    p.add_argument("--probe", metavar="DEVICE", help=argparse.SUPPRESS)  # internal: device facts
    return p


def resolve_config(args: argparse.Namespace, parser: argparse.ArgumentParser,
                   family: str | None = None) -> Config:
    """Merge preset and explicit options (explicit wins) into a :class:`Config`."""
    if args.quick and args.preset not in (None, "quick"):
        parser.error("--quick is the preset 'quick'; do not combine it with --preset")
    preset_name = "quick" if args.quick else (args.preset or "default")
    by_device = PRESETS[preset_name]
    device = args.device or (next(iter(by_device)) if len(by_device) == 1 else None)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        parser.error(f"--device cuda (or preset {preset_name!r}) needs CUDA, which is not available here")
    if device not in by_device:
        parser.error(f"preset {preset_name!r} is defined for {', '.join(by_device)} only, not {device}")
    preset = by_device[device]
    shapes = list(preset.shapes)
    if args.sizes or args.dim:
        dim = args.dim or preset.shapes[0][2]
        shapes = [(n, n, dim) for n in args.sizes] if args.sizes else [(n, m, dim) for n, m, _ in shapes]
    runs = preset.runs if args.runs is None else args.runs
    if runs < 1:
        parser.error("--runs must be at least 1")
    baselines = tuple(args.baselines.split(",")) if args.baselines else preset.baselines
    if family or args.family != "all":
        families = [family or args.family]
    else:
        families = [f for f in FAMILIES if preset.families is None or f in preset.families]
    family_shapes = {} if (args.sizes or args.dim) else dict(preset.family_shapes or {})
    for name in families:
        for b in baselines:
            try:
                FAMILIES[name].impl(b)
            except KeyError as exc:
                parser.error(str(exc.args[0]))
    return Config(
        families=families, shapes=shapes, dtype=args.dtype or preset.dtype, device=device, runs=runs,
        baselines=baselines, preset=preset_name, out=args.out, plot=not args.no_plot,
        mem_limit_bytes=None if args.mem_limit_gib is None else int(args.mem_limit_gib * GIB),
        timeout_s=args.timeout, threads=args.threads, family_shapes=family_shapes,
    )


def _probe(device: str, timeout: float | None) -> dict:
    """Device name and free memory: in-process for CPU, in a child for CUDA (keeps the parent CUDA-free)."""
    if device == "cpu":
        return {"device_name": cpu_name(), "free_bytes": cpu_available_bytes()}
    info = _run_child(["--probe", device], timeout)
    return info if "device_name" in info else {"device_name": "cuda (unknown)", "free_bytes": None}


def output_stem(family: str, cfg: Config) -> str:
    """``info_nce_cpu_float32``, plus ``_<preset>`` for presets other than default."""
    stem = f"{family}_{cfg.device}_{cfg.dtype}"
    return stem if cfg.preset == "default" else f"{stem}_{cfg.preset}"


def main(argv: Sequence[str] | None = None, *, family: str | None = None) -> int:
    """Run the benchmark; ``family`` fixes the family (for the per-family scripts in benchmarks/).

    Returns:
        0, or 1 when some measurement ended with an error (skips and OOMs are results, not errors).
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.worker:
        return _worker_main(args.worker)
    if args.probe:
        return _probe_main(args.probe)
    cfg = resolve_config(args, parser, family)
    probe = _probe(cfg.device, cfg.timeout_s)
    context = {"device_name": probe["device_name"], "date": datetime.datetime.now().astimezone().isoformat(
        timespec="seconds"), **_versions()}
    cfg.out.mkdir(parents=True, exist_ok=True)
    print(f"xloss {context['xloss_version']} ({context['xloss_commit'] or 'no git'}), torch "
          f"{context['torch_version']}, triton {context['triton_version'] or '-'} | {cfg.device}: "
          f"{context['device_name']} | {cfg.dtype}, {cfg.runs} timed runs after 1 warm-up, preset {cfg.preset}")
    all_rows = []
    for name in cfg.families:
        rows = run_family(FAMILIES[name], cfg, context, probe.get("free_bytes"))
        all_rows += rows
        print(format_table(rows))
        stem = output_stem(name, cfg)
        write_csv(rows, cfg.out / f"{stem}.csv")
        written = [f"{stem}.csv"]
        if cfg.plot:
            title = f"{name}: xloss vs {', '.join(cfg.baselines)} | {context['device_name']} | {cfg.dtype}"
            if write_plot(rows, cfg.out / f"{stem}.png", title):
                written.append(f"{stem}.png")
            else:
                print("note: matplotlib is not installed; no plot written")
        print(f"wrote {', '.join(str(cfg.out / w) for w in written)}")
    errors = [r for r in all_rows if "error" in r["xloss_status"] or "error" in r["baseline_status"]]
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
