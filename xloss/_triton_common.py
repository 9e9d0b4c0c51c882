"""What the Triton paths of several families share: one tile function and the launchers' small decisions.

Imported only by the ``triton.py`` modules (which are themselves imported lazily), so ``import xloss`` never
imports Triton.
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@triton.jit
def dot_tile(
    r_ptr, c_ptr,  # [R, D], [C, D], unit stride along D
    offs_m, offs_n,  # [BLOCK_M], [BLOCK_N] int64 row / column indices
    row_ok, col_ok,  # [BLOCK_M], [BLOCK_N] masks
    D, stride_r, stride_c,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):
    """``<r_i, c_j>`` for one tile, looping over D in BLOCK_D chunks (tails masked to 0). -> [BLOCK_M, BLOCK_N] fp32"""
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        d_ok = offs_d < D
        r_c = tl.load(r_ptr + offs_m[:, None] * stride_r + offs_d[None, :],
                      mask=row_ok[:, None] & d_ok[None, :], other=0.0)  # [BLOCK_M, BLOCK_D]
        c_c = tl.load(c_ptr + offs_n[:, None] * stride_c + offs_d[None, :],
                      mask=col_ok[:, None] & d_ok[None, :], other=0.0)  # [BLOCK_N, BLOCK_D]
        acc += tl.dot(r_c, tl.trans(c_c), input_precision=INPUT_PRECISION)
    return acc


def unit_stride_rows(family: str, q: torch.Tensor, k: torch.Tensor):
    """Check the dtypes the kernels take, and give D unit stride (the kernels' vectorised loads assume it; any
    row stride is passed to them)."""
    if q.dtype not in SUPPORTED_DTYPES or k.dtype != q.dtype:
        raise TypeError(
            f"the triton backend of {family} supports float32, float16 and bfloat16 inputs, got q {q.dtype} and "
            f"k {k.dtype}; use backend='chunked' (or 'auto') for float64"
        )
    return (q if q.stride(1) == 1 else q.contiguous()), (k if k.stride(1) == 1 else k.contiguous())


def input_precision(dtype: torch.dtype) -> str:
    """IEEE fp32 dots unless the user allowed TF32 (``torch.set_float32_matmul_precision``); half inputs ignore it."""
    if dtype == torch.float32 and torch.get_float32_matmul_precision() == "highest":
        return "ieee"
    return "tf32"


def block_d(d: int, chunk: int, single_max: int) -> tuple[int, bool]:
    """(BLOCK_D, SINGLE_D): one register-resident chunk when D ≤ single_max, else fixed chunks."""
    if d <= single_max:
        return max(16, triton.next_power_of_2(d)), True
    return chunk, False


@functools.cache
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def device_programs(device: torch.device, per_sm: int) -> int:
    """``per_sm`` programs per streaming multiprocessor of ``device``; 1 off CUDA (the interpreter)."""
    if device.type != "cuda":
        return 1
    return per_sm * _sm_count(device.index if device.index is not None else torch.cuda.current_device())


def column_split(row_blocks: int, col_blocks: int, block_n: int, target: int, allow: bool = True):
    """Split the columns into ranges (grid axis 1) until about ``target`` programs run.

    Returns ``(split, cols_per_split)``; every range is non-empty and a whole number of column blocks.
    """
    split = max(1, min(col_blocks, triton.cdiv(target, row_blocks))) if allow else 1
    per = triton.cdiv(col_blocks, split)  # column blocks per range
    return triton.cdiv(col_blocks, per), per * block_n


def deterministic() -> bool:
    """Atomic-free launches: ``torch.use_deterministic_algorithms(True)`` or ``XLOSS_DETERMINISTIC=1``."""
    return torch.are_deterministic_algorithms_enabled() or os.environ.get("XLOSS_DETERMINISTIC", "0") not in ("", "0")
