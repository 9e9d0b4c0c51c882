"""Symile ("n_squared", M = 3): the families "symile" (forward+backward) and "symile_forward" (no gradient).

The shape tuple is (N, N, D): three modalities [N, D].  The naive loss builds, per anchor, the N^2 products of
the other two modalities (a list and its concatenation, N^2·D each) and the [N, N^2] logits; with a gradient
it keeps the logits, their scaled copy and the log-softmax of all three anchors until backward.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..registry import Family, Impl, Shape, register, xloss_backend
from .info_nce import CLIP_MAX_SCALE

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

        def fn():
            if naive:
                return reference.symile_loss(inputs["reps"], inputs["scale"], "n_squared")
            return xloss.symile_loss(*inputs["reps"], logit_scale=inputs["scale"], negative_sampling="n_squared")

        if grad:
            fn().backward()
        else:
            with torch.no_grad():
                fn()

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
        xloss=Impl("xloss", "xloss.symile_loss (n_squared)", _symile_run(False, True), xloss_backend("symile")),
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
                   xloss_backend("symile")),
        naive=Impl(
            "naive", "xloss.reference.symile_loss (n_squared, no_grad)", _symile_run(True, False),
            lambda device: "reference", estimate_peak_bytes=_symile_naive_peak(grad=False),
        ),
        flops=_symile_flops(backward=False),
    )
)
