"""The "banzhaf" family: the Banzhaf interaction of HBI, xloss against HBI's loop (forward only).

The shape tuple is (B, T, V): B pairs of T words and V frames, BANZHAF_SAMPLES coalitions per (word, frame),
mode "hbi".  No gradient (the result is a distillation target): both runs are forward only.  "naive" is the
reference port of HBI's Python loop (T·V·samples iterations of small batched ops); both sample their own
coalitions (the values on the same explicit coalitions are compared in tests/test_banzhaf.py).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..registry import Family, Impl, Shape, register

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
    from xloss import _dispatch

    return _dispatch.resolve("banzhaf", "auto", device)  # "compiled" (the csrc op) or "chunked" (PyTorch)


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
