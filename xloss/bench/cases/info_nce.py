"""The "info_nce" family: InfoNCE / CLIP loss, xloss against naive PyTorch and (``--baselines inf_cl``) inf_cl.

The shape tuple is (N, M, D): ``q [N, D]`` against ``k [M, D]``.
"""

from __future__ import annotations

import torch

from ..registry import Family, Impl, Shape, missing, register, xloss_backend

CLIP_MAX_SCALE = 100.0  # CLIP clamps exp(logit_scale) at 100: a realistic, numerically demanding scale

# Peak of the naive InfoNCE forward+backward, measured as RSS growth on CPU fp32 (N=M=1024/2048/4096, D=512):
# 5.5 / 5.4 / 4.1 × N·M·itemsize (the logits, two log-softmaxes and their gradients).  5 plus the O((N+M)·D)
# gradients is a fair, slightly generous estimate for the skip decision.
NAIVE_INFO_NCE_FACTOR = 5.0


def info_nce_inputs(shape: Shape, dtype: torch.dtype, device: torch.device) -> dict:
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


register(
    Family(
        name="info_nce",
        make_inputs=info_nce_inputs,
        xloss=Impl("xloss", "xloss.info_nce", _info_nce_xloss, xloss_backend("info_nce")),
        naive=Impl(
            "naive", "xloss.reference.info_nce", _info_nce_naive, lambda device: "reference",
            estimate_peak_bytes=_info_nce_naive_peak,
        ),
        extras={
            "inf_cl": Impl(
                "inf_cl", "inf_cl.cal_inf_loss (×2, symmetric)", _info_nce_inf_cl, lambda device: "triton",
                unavailable=missing("inf_cl"),
            ),
        },
        flops=lambda shape: 8.0 * shape[0] * shape[1] * shape[2],  # 4 GEMM sweeps (SPEC.md §1)
    )
)


# Multi-positive groups (issue 11): 4 keys per group, every query and key in one of N/4 groups, symmetric;
# naive is the reference's masked-dense version (the [N, M] logits, the positive mask and the masked softmaxes).
POSITIVES_PER_GROUP = 4


def info_nce_groups_inputs(shape: Shape, dtype: torch.dtype, device: torch.device) -> dict:
    """``info_nce_inputs`` plus group ids: ``N / 4`` groups of 4 queries and of 4 keys (shuffled)."""
    inputs = info_nce_inputs(shape, dtype, device)
    n, m, _ = shape
    gen = torch.Generator().manual_seed(1)
    groups = max(1, n // POSITIVES_PER_GROUP)
    inputs["qg"] = (torch.randperm(n, generator=gen) % groups).to(device)
    inputs["kg"] = (torch.randperm(m, generator=gen) % groups).to(device)
    return inputs


def _info_nce_groups_xloss(inputs: dict) -> None:
    import xloss

    xloss.info_nce(inputs["q"], inputs["k"], logit_scale=inputs["scale"], query_groups=inputs["qg"],
                   key_groups=inputs["kg"]).backward()


def _info_nce_groups_naive(inputs: dict) -> None:
    from xloss import reference

    reference.info_nce(inputs["q"], inputs["k"], logit_scale=inputs["scale"], query_groups=inputs["qg"],
                       key_groups=inputs["kg"]).backward()


register(
    Family(
        name="info_nce_groups",
        make_inputs=info_nce_groups_inputs,
        xloss=Impl("xloss", "xloss.info_nce(query_groups=, key_groups=)", _info_nce_groups_xloss,
                   xloss_backend("info_nce")),
        naive=Impl(
            "naive", "xloss.reference.info_nce (masked dense)", _info_nce_groups_naive, lambda device: "reference",
            # the logits, the raw products, masks, the masked logits and the softmax and their gradients
            estimate_peak_bytes=lambda shape, dtype, device: int(2 * _info_nce_naive_peak(shape, dtype, device)),
        ),
        flops=lambda shape: 8.0 * shape[0] * shape[1] * shape[2],
    )
)


# Matryoshka InfoNCE (issue 12): five nested prefixes of D = 768, each L2-normalised (cosine logits), weights 1,
# symmetric.  xloss computes every prefix from one sweep; naive is the reference's literal loop (five dense losses,
# all five graphs alive until backward); "separate" is five ``xloss.info_nce`` calls on the normalised prefixes.
MATRYOSHKA_DIMS = (64, 128, 256, 512, 768)
MATRYOSHKA_SCALE = 20.0  # sentence-transformers' MultipleNegativesRankingLoss scale


def matryoshka_dims(d: int) -> tuple[int, ...]:
    """The prefixes for a feature width ``d``: those of ``MATRYOSHKA_DIMS`` below it, and ``d`` itself."""
    return (*(x for x in MATRYOSHKA_DIMS if x < d), d)


def info_nce_matryoshka_inputs(shape: Shape, dtype: torch.dtype, device: torch.device) -> dict:
    """``info_nce_inputs`` with a scale of 20 and the prefixes ``dims`` (a tuple of ints)."""
    inputs = info_nce_inputs(shape, dtype, device)
    inputs["scale"] = torch.tensor(MATRYOSHKA_SCALE, device=device, requires_grad=True)
    inputs["dims"] = matryoshka_dims(shape[2])
    return inputs


def _matryoshka_xloss(inputs: dict) -> None:
    import xloss

    xloss.info_nce(inputs["q"], inputs["k"], logit_scale=inputs["scale"], matryoshka_dims=inputs["dims"]).backward()


def _matryoshka_naive(inputs: dict) -> None:
    from xloss import reference

    reference.info_nce(inputs["q"], inputs["k"], logit_scale=inputs["scale"],
                       matryoshka_dims=inputs["dims"]).backward()


def _matryoshka_separate(inputs: dict) -> None:
    import torch.nn.functional as F

    import xloss

    q, k, s = inputs["q"], inputs["k"], inputs["scale"]
    total = sum(xloss.info_nce(F.normalize(q[:, :d], dim=1), F.normalize(k[:, :d], dim=1), logit_scale=s)
                for d in inputs["dims"])
    total.backward()


def _matryoshka_naive_peak(shape: Shape, dtype: torch.dtype, device: torch.device) -> int:
    # Every prefix's graph (logits and both log-softmaxes, ~3 N·M each) lives until backward, which adds the
    # gradients of the last ones.
    n, m, d = shape
    size = torch.empty((), dtype=dtype).element_size()
    return int((3 * len(matryoshka_dims(d)) + 2) * n * m * size + 4 * (n + m) * d * size)


register(
    Family(
        name="info_nce_matryoshka",
        make_inputs=info_nce_matryoshka_inputs,
        xloss=Impl("xloss", "xloss.info_nce(matryoshka_dims=(64, ..., 768))", _matryoshka_xloss,
                   xloss_backend("info_nce")),
        naive=Impl("naive", "xloss.reference.info_nce(matryoshka_dims=...) (a loop of dense losses)",
                   _matryoshka_naive, lambda device: "reference", estimate_peak_bytes=_matryoshka_naive_peak),
        extras={
            "separate": Impl("separate", "5 × xloss.info_nce on the normalised prefixes, summed",
                             _matryoshka_separate, xloss_backend("info_nce")),
        },
        flops=lambda shape: 8.0 * shape[0] * shape[1] * shape[2],  # 4 GEMM sweeps over D, whatever the prefixes
    )
)
