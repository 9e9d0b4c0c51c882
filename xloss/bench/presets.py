"""Presets: which shapes, dtype, device, number of runs and baselines ``--preset NAME`` measures.

``PRESETS[name][device type]`` is a :class:`Preset`; options given on the command line override its fields
(see :func:`xloss.bench.cli.resolve_config`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from .registry import Shape


@dataclass(frozen=True)
class Preset:
    """Shapes, dtype, number of timed runs and baselines for one device type."""

    shapes: tuple[Shape, ...]
    dtype: str
    runs: int = 3
    baselines: tuple[str, ...] = ("naive",)
    families: tuple[str, ...] | None = None  # what "--family all" runs; None: every registered family
    family_shapes: dict[str, tuple[Shape, ...]] | None = None  # shapes of a family, instead of `shapes`
    # Small problems: each timed run repeats the step until it lasts this long and reports the time per step
    # (a single sub-millisecond step is below the timer's and the scheduler's noise).  0: one step per run.
    min_run_s: float = 0.0
    # Rounds per case: xloss and each baseline measured in turn, ``rounds`` times (ABAB...), their timed runs
    # pooled.  The host's speed drifts by tens of percent over seconds on shared machines: alternating puts
    # both sides in the same periods, so the ratio of small, fast cases is not one process's luck.
    rounds: int = 1


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
    # The compiled CPU MaxSim op: one query of 32 tokens against 1000 documents, D=128, fixed 300 tokens and
    # ragged 50-800 tokens; baselines the naive padded scorer and the maxsim-cpu package.
    "maxsim-op-cpu": {"cpu": Preset(
        ((1, 1000, 128),), "float32", runs=5, baselines=("naive", "maxsim_cpu"),
        families=("maxsim_cpu_op", "maxsim_cpu_op_ragged"),
    )},
    # Symile "n_squared" (M = 3), CPU fp32: training at N=512, D=256.
    "symile-cpu": {"cpu": Preset(((512, 512, 256),), "float32", families=("symile",))},
    # Forward only at N=1024, D=256: xloss within a few hundred MiB, the naive [N, N^2] logits need ~13 GiB.
    "symile-forward-cpu": {"cpu": Preset(((1024, 1024, 256),), "float32", runs=1, families=("symile_forward",))},
    # GRAM, k = 4 modalities, CPU fp32: N=4096, D=512 (the naive [N, N, 4, 4] Gram tensor alone is 1 GiB).
    "gram-cpu": {"cpu": Preset(((4096, 4096, 512),), "float32", families=("gram",))},
    # HBI's Banzhaf interaction, CPU fp32: B=32 pairs, T=32 words, V=12 frames, 10 samples (shape = (B, T, V)).
    "banzhaf-cpu": {"cpu": Preset(((32, 32, 12),), "float32", runs=1, families=("banzhaf",))},
    # Sigmoid loss (SigLIP), CPU fp32: the acceptance shape N = M = 16384, D = 512.
    "sigmoid-cpu": {"cpu": Preset(((16384, 16384, 512),), "float32", families=("sigmoid",))},
    # Multi-positive InfoNCE (issue 11), 4 positives per row in N/4 groups: CPU fp32 N = M = 16384, D = 512 and the
    # GPU shape N = M = 65536, D = 768 in bf16.
    "groups": {
        "cpu": Preset(((16384, 16384, 512),), "float32", families=("info_nce_groups",)),
        "cuda": Preset(((65536, 65536, 768),), "bfloat16", families=("info_nce_groups",)),
    },
    # Soft targets (issue 12): in-batch distillation, student D = 512 against a 768-wide teacher, and CWCL; CPU fp32
    # N = M = 16384, GPU bf16 N = M = 65536.
    "distill": {
        "cpu": Preset(((16384, 16384, 512),), "float32", families=("distill", "cwcl")),
        "cuda": Preset(((65536, 65536, 512),), "bfloat16", families=("distill", "cwcl")),
    },
    # Matryoshka InfoNCE (issue 12): prefixes (64, 128, 256, 512, 768) of D = 768, CPU fp32 N = M = 16384; against
    # naive (the reference's loop over prefixes) and five separate xloss.info_nce calls.
    "matryoshka": {
        "cpu": Preset(((16384, 16384, 768),), "float32", baselines=("naive", "separate"),
                      families=("info_nce_matryoshka",)),
    },
    "gpu": {"cuda": Preset(((65536, 65536, 768),), "bfloat16", baselines=("naive", "inf_cl"), families=("info_nce",))},
    # tools/gpu_check.sh: the sigmoid loss at the InfoNCE GPU shape, and late interaction at the ColBERT training
    # shape (Nq = Nd = 256, Lq = 32, Ld = 180), the ColPali one (Ld = 1030) and scoring, against flash-maxsim.
    "gpu-sigmoid": {"cuda": Preset(((65536, 65536, 768),), "bfloat16", families=("sigmoid",))},
    "gpu-late-interaction": {"cuda": Preset(
        ((256, 256, 128),), "bfloat16", baselines=("naive", "flash_maxsim"),
        families=("late_interaction", "late_interaction_colpali", "maxsim_scoring"),
        family_shapes={"late_interaction_colpali": ((64, 64, 128),), "maxsim_scoring": ((64, 1000, 128),)},
    )},
    # Gradient caching (issue 13): one MiniLM training step (all weights, dropout on) at sequence length 64, cached
    # with chunks of D = 64 texts against the uncached step; shape (N queries, M documents, D).  Batch 1024 texts
    # (512 pairs), and 2048 texts (1024 pairs), where the uncached step needs ~35 GiB and is skipped on 24 GiB.
    "gradcache": {"cpu": Preset(((512, 512, 64), (1024, 1024, 64)), "float32", runs=1, families=("gradcache",))},
    # Small batches (issue 16): the per-call cost of every loss against naive at the sizes most people run per
    # device, D = 64; N = 8 is the fixed overhead.  Late interaction Lq = 8, Ld = 32; GRAM k = 4 modalities;
    # Symile M = 3 "n_squared".  Each timed run repeats the step for >= 0.2 s (time per step reported).
    "small": {
        device: Preset(
            _square((8, 32, 128, 256, 512), 64), dtype, runs=5, min_run_s=0.2, rounds=5,
            families=("info_nce", "sigmoid", "distill", "cwcl", "late_interaction_small", "gram", "symile"),
            family_shapes={"late_interaction_small": _square((8, 16, 32, 64), 64),
                           "gram": _square((8, 64, 128, 256), 64), "symile": _square((8, 64, 128), 64)},
        )
        for device, dtype in (("cpu", "float32"), ("cuda", "bfloat16"))
    },
    # Late interaction at training scale (issue 14), CPU fp32, D = 128, Lq = 32, Ld = 180: distillation of each
    # query against its own n = 16 teacher-scored documents, N = 64, 128, 256 queries (shape (N, n, D)); XTR
    # scores with k = 256, (Nq, Nd) = (16, 64), (32, 128), (64, 256) in-batch, against sentence-transformers.  On
    # CUDA the same shapes in bf16 ("auto" runs the Triton engines there).
    "late-interaction-training": {
        device: Preset(
            ((64, 16, 128), (128, 16, 128), (256, 16, 128)), dtype, families=("late_interaction_distill", "xtr"),
            family_shapes={"xtr": ((16, 64, 128), (32, 128, 128), (64, 256, 128))},
        )
        for device, dtype in (("cpu", "float32"), ("cuda", "bfloat16"))
    },
    "quick": {
        "cpu": Preset(_square((512, 1024), 64), "float32", runs=2, families=("info_nce",)),
        "cuda": Preset(_square((1024, 2048), 128), "float32", runs=2, families=("info_nce",)),
    },
}
