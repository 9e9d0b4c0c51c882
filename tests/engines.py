"""The engine × mode matrix every family's test body is parametrised over.

``ENGINES``: the chunked PyTorch engine, the Triton kernels (in Triton's interpreter on CPU tensors, fp32; bf16
is wrong in the interpreter, so half precision runs on a GPU only), and the reference.  ``MODES``: eager and
``torch.compile(fullgraph=True)`` (``aot_eager``: it still traces with fake tensors through AOTAutograd).

``check_engine`` judges one engine's value and gradients by the suite's one tolerance rule (``tolerance.py``):
fp64 engines against the fp64 reference at 1e-10; fp32 engines against the fp64 ("gold") result, no worse
than the naive fp32 result plus a few roundings.
"""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch
from tolerance import assert_close64, assert_no_worse

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")  # set by tests/conftest.py
TRITON_RUNS = importlib.util.find_spec("triton") is not None and (torch.cuda.is_available() or INTERPRET)
DEVICE = "cuda" if torch.cuda.is_available() and not INTERPRET else "cpu"

ENGINES = [
    "chunked",
    pytest.param("triton", marks=pytest.mark.skipif(not TRITON_RUNS, reason="Triton cannot run here")),
    "reference",
]
MODES = ["eager", "compile"]


def dtype_of(engine: str) -> torch.dtype:
    """What an engine is judged in: the kernels in fp32 (no fp64 kernels), the others in fp64."""
    return torch.float32 if engine == "triton" else torch.float64


def run(fn, args, mode: str):
    """``fn(*args)`` eagerly or compiled (fullgraph), then the gradients of every tensor argument that requires
    grad, for a fixed non-trivial grad_output: ``[value, *grads]`` (detached)."""
    if mode == "compile":
        torch._dynamo.reset()
        fn = torch.compile(fn, fullgraph=True, backend="aot_eager")
    leaves = [a for a in args if isinstance(a, torch.Tensor) and a.requires_grad]
    out = fn(*args)
    g = torch.linspace(0.5, 1.5, out.numel(), dtype=out.dtype, device=out.device).reshape(out.shape)
    grads = torch.autograd.grad(out, leaves, g) if leaves else ()
    return [out.detach(), *[t.detach() for t in grads]]


def check_engine(engine: str, got, gold, naive=None, names=None, magnitudes=None):
    """``got`` (the engine's outputs) against ``gold`` (fp64 reference); ``naive``: the reference's outputs in
    the engine's dtype (needed when the engine is not fp64)."""
    names = names or [f"output {i}" for i in range(len(gold))]
    for i, (g, e, name) in enumerate(zip(got, gold, names)):
        assert g.shape == e.shape, f"{engine} {name}: shape {tuple(g.shape)} != {tuple(e.shape)}"
        if g.dtype == torch.float64:
            assert_close64(g, e, what=f"{engine} {name}")
        else:
            mag = magnitudes[i] if magnitudes else 0.0
            assert_no_worse(g, naive[i], e, f"{engine} {name}", magnitude=mag)
