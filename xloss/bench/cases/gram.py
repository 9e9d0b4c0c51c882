"""The "gram" family: the GRAM (Gram volume) loss with k = 4 modalities, xloss against naive PyTorch.

The shape tuple is (N, N, D): an anchor and 3 other modalities [N, D], temperature 0.07 (a tensor).  The naive
loss builds the [N, N, k, k] Gram tensor through stacks ([N, N, k] rows, then the whole), a det (LU copy) and,
in backward, the det's solve and the stacks' gradients: ~6 copies of the k²·N² Gram tensor.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..registry import Family, Impl, Shape, register, xloss_backend

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
        xloss=Impl("xloss", "xloss.gram_loss (k=4)", _gram_run(False), xloss_backend("gram")),
        naive=Impl(
            "naive", "xloss.reference.gram_loss (k=4, det)", _gram_run(True), lambda device: "reference",
            estimate_peak_bytes=_gram_naive_peak,
        ),
        # k−1 GEMMs forward, recomputed in backward, plus 2(k−1) gradient GEMMs: 4(k−1)·2·N²·D
        flops=lambda shape: 8.0 * (GRAM_MODALITIES - 1) * shape[0] * shape[1] * shape[2],
    )
)
