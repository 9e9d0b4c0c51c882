"""The "sigmoid" family: the sigmoid loss (SigLIP), xloss against open_clip's SigLipLoss (the reference).

The shape tuple is (N, M, D), the inputs those of the "info_nce" family with SigLIP's initial scale and bias.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..registry import Family, Impl, Shape, register, xloss_backend
from .info_nce import info_nce_inputs

# Peak of the naive sigmoid loss forward+backward as multiples of N·M·itemsize: the logits, the ±1 label
# matrix, their product, logsigmoid's output and buffer, and in backward the gradients of the product and of
# the logits (measured as RSS growth on CPU fp32, see the family's report).
NAIVE_SIGMOID_FACTOR = 6.0
SIGLIP_INIT = (10.0, -10.0)  # SigLIP's initial logit scale (exp(log 10)) and bias


def _sigmoid_inputs(shape: Shape, dtype: torch.dtype, device: torch.device) -> dict:
    """L2-normalised ``q [N, D]``, ``k [M, D]``, 0-dim fp32 scale 10 and bias -10, all requiring grad."""
    inputs = info_nce_inputs(shape, dtype, device)
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
        xloss=Impl("xloss", "xloss.sigmoid_loss", _sigmoid_run(False), xloss_backend("sigmoid")),
        naive=Impl(
            "naive", "xloss.reference.sigmoid_loss (open_clip SigLipLoss)", _sigmoid_run(True),
            lambda device: "reference", estimate_peak_bytes=_sigmoid_naive_peak,
        ),
        flops=lambda shape: 6.0 * shape[0] * shape[1] * shape[2],  # 3 GEMM sweeps (SPEC.md §2)
    )
)
