"""The soft-target families: in-batch distillation ("distill") and CWCL ("cwcl"), xloss against naive PyTorch.

The shape tuple is (N, M, D): student ``q [N, D]``, ``k [M, D]``; the distillation teacher has width
``TEACHER_DIM`` (768, a ViT-L/14 CLIP distilled into a B/32-sized student); CWCL's targets are the detached
(L2-normalised) inputs.  The naive baselines build the N×M matrices: for distillation, open_clip's
``DistillClipLoss.dist_loss`` on both logit matrices (which ``xloss.reference.distill_loss`` is, line for line).
"""

from __future__ import annotations

import torch

from ..registry import Family, Impl, Shape, register, xloss_backend
from .info_nce import _info_nce_naive_peak, info_nce_inputs

TEACHER_DIM = 768
TEACHER_SCALE = 100.0


def distill_inputs(shape: Shape, dtype: torch.dtype, device: torch.device) -> dict:
    """``info_nce_inputs`` plus frozen teacher features ``[N, 768]``, ``[M, 768]`` (no grad)."""
    inputs = info_nce_inputs(shape, dtype, device)
    n, m, _ = shape
    gen = torch.Generator(device=device).manual_seed(2)
    for name, rows in (("tq", n), ("tk", m)):
        x = torch.randn(rows, TEACHER_DIM, generator=gen, device=device)
        inputs[name] = torch.nn.functional.normalize(x, dim=-1).to(dtype)
    return inputs


def _distill_xloss(inputs: dict) -> None:
    import xloss

    xloss.distill_loss(inputs["q"], inputs["k"], inputs["tq"], inputs["tk"], logit_scale=inputs["scale"],
                       teacher_logit_scale=TEACHER_SCALE).backward()


def _distill_naive(inputs: dict) -> None:
    from xloss import reference

    reference.distill_loss(inputs["q"], inputs["k"], inputs["tq"], inputs["tk"], logit_scale=inputs["scale"],
                           teacher_logit_scale=TEACHER_SCALE).backward()


def _cwcl_xloss(inputs: dict) -> None:
    import xloss

    xloss.cwcl_loss(inputs["q"], inputs["k"], logit_scale=inputs["scale"], symmetric=True).backward()


def _cwcl_naive(inputs: dict) -> None:
    from xloss import reference

    reference.cwcl_loss(inputs["q"], inputs["k"], logit_scale=inputs["scale"], symmetric=True).backward()


def _twice_info_nce_peak(shape, dtype, device) -> int:
    return int(2 * _info_nce_naive_peak(shape, dtype, device))  # two logit matrices (student and teacher / weights)


register(
    Family(
        name="distill",
        make_inputs=distill_inputs,
        xloss=Impl("xloss", "xloss.distill_loss", _distill_xloss, xloss_backend("distill")),
        naive=Impl("naive", "open_clip DistillClipLoss.dist_loss (xloss.reference.distill_loss)", _distill_naive,
                   lambda device: "reference", estimate_peak_bytes=_twice_info_nce_peak),
        # student: 4 GEMM sweeps; teacher: its logits in forward and again in backward
        flops=lambda shape: 8.0 * shape[0] * shape[1] * shape[2] + 4.0 * shape[0] * shape[1] * TEACHER_DIM,
    )
)

register(
    Family(
        name="cwcl",
        make_inputs=info_nce_inputs,
        xloss=Impl("xloss", "xloss.cwcl_loss(symmetric=True)", _cwcl_xloss, xloss_backend("info_nce")),
        naive=Impl("naive", "xloss.reference.cwcl_loss", _cwcl_naive, lambda device: "reference",
                   estimate_peak_bytes=_twice_info_nce_peak),
        flops=lambda shape: 8.0 * shape[0] * shape[1] * shape[2],
    )
)
