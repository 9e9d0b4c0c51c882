"""The compiled engine of the Banzhaf interaction: the op ``torch.ops.xloss.banzhaf_interaction`` of
``xloss/csrc`` (``cpu/banzhaf.cpp``, OpenMP; ``cuda/banzhaf.cu``, one thread per (b, i, j), when built with
CUDA), built on first use.  ``backend="compiled"`` (alias ``"cuda"``) in ``xloss._dispatch``.

It implements :class:`xloss.banzhaf.engine.BanzhafEngine`.  No gradient: no autograd formula is registered.
"""

from __future__ import annotations

import torch

from .. import _ext

OP = "banzhaf_interaction"


def _fake(sim, text_weight, video_weight, text_mask, video_mask, num_samples, seed, coalitions, mode):
    return sim.new_empty(sim.shape)


def op_available() -> bool:
    """True when ``torch.ops.xloss.banzhaf_interaction`` is loaded (building the extension on first call); its
    fake kernel is registered then (registering needs the schema, so it cannot happen at import)."""
    return _ext.has_op(OP, fake=_fake)


def cuda_op_available() -> bool:
    """True when the compiled op has a CUDA kernel (a CUDA build of torch with nvcc found at build time)."""
    return op_available() and torch._C._dispatch_has_kernel_for_dispatch_key(f"xloss::{OP}", "CUDA")


def banzhaf_interaction(sim, p, q, text_mask, video_mask, num_samples: int, seed: int, coalitions, mode: str):
    """The compiled op (the caller checked that it runs on sim's device)."""
    op_available()  # registers the fake kernel once (torch.compile), a no-op afterwards
    return torch.ops.xloss.banzhaf_interaction(sim, p, q, text_mask, video_mask, num_samples, seed, coalitions,
                                               mode)


__all__ = ["OP", "banzhaf_interaction", "cuda_op_available", "op_available"]
