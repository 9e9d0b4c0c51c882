"""What the chunked PyTorch paths of every family share: the accumulation dtype and the working budget."""

from __future__ import annotations

import os

import torch


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp64 stays fp64; every other float type (fp32, fp16, bf16) accumulates in fp32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def in_accumulation_dtype(t: torch.Tensor, input_dtype: torch.dtype) -> torch.Tensor:
    """``t`` (a dense path's result) in the accumulation dtype of ``input_dtype``; no call when it already is
    (the common case: a per-call cost that small batches notice)."""
    if t.dtype is input_dtype and (input_dtype is torch.float32 or input_dtype is torch.float64):
        return t  # the common case, without a call
    acc = accumulation_dtype(input_dtype)
    return t if t.dtype == acc else t.to(acc)


def upcast(t: torch.Tensor) -> torch.Tensor:
    """``t`` in its accumulation dtype, contiguous (no copy when it already is)."""
    return t.to(accumulation_dtype(t.dtype)).contiguous()


def budget_bytes(default: int) -> int:
    """The working-set budget of a chunked path in bytes: ``XLOSS_CPU_TILE_MB`` (MiB, may be fractional) when
    set, else the family's ``default`` (each family knows which tile size runs fastest for it)."""
    env = os.environ.get("XLOSS_CPU_TILE_MB", "").strip()
    if not env:
        return default
    try:
        mib = float(env)
    except ValueError:
        mib = float("nan")
    if not (mib > 0 and mib != float("inf")):  # also refuses nan
        raise ValueError(f"XLOSS_CPU_TILE_MB must be a positive finite number of MiB (e.g. 64 or 0.5), got {env!r}")
    return max(1, int(mib * 2**20))
