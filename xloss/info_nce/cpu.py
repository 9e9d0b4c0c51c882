"""The chunked PyTorch path of InfoNCE: row strips of the logits, never the whole N×M matrix.

Two primitives, shared with the Triton path through the autograd Function in ``__init__``:

* ``lse(q, k, scale, need_cols)``: one sweep over row strips ``S = s·q_blk kᵀ`` gives every row LSE exactly
  (a strip holds whole rows) and the column LSEs, merged strip by strip with ``logaddexp``.
* ``grad(q, k, scale, lse_r, lse_c, a, w)``: one recomputing sweep gives ``P kᵀ``-style products
  ``dq_u = P k`` and ``dk_u = Pᵀ q`` with ``P_ij = a_i·exp(z_ij - lse_r_i) + w_j·exp(z_ij - lse_c_j)``.

So a forward+backward costs 4 GEMM sweeps and O((N+M)·D) memory plus two strips of ``rows × M`` floats whose
size comes from a memory budget (``XLOSS_CPU_TILE_MB``, default 32 MiB per strip).  Inputs in fp16/bf16 are
computed in fp32; fp64 stays fp64.  Nothing here is CPU-specific: it is also the fallback on CUDA tensors when
Triton is missing.
"""

from __future__ import annotations

import os

import torch

DEFAULT_STRIP_BYTES = 32 * 2**20


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp64 stays fp64; every other float type accumulates in fp32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _strip_rows(n: int, m: int, itemsize: int) -> int:
    budget = int(float(os.environ.get("XLOSS_CPU_TILE_MB", DEFAULT_STRIP_BYTES / 2**20)) * 2**20)
    return max(1, min(n, budget // max(1, m * itemsize)))


def _upcast(t: torch.Tensor) -> torch.Tensor:
    return t.to(accumulation_dtype(t.dtype)).contiguous()


def lse(q: torch.Tensor, k: torch.Tensor, scale: torch.Tensor, need_cols: bool):
    """Row and (optionally) column log-sum-exp of ``z = scale · q kᵀ``.

    Args:
        q: ``[N, D]``; k: ``[M, D]``; scale: 0-dim tensor.
        need_cols: also return the column LSE (symmetric loss).

    Returns:
        ``lse_r [N]`` and ``lse_c [M]`` (or None), in the accumulation dtype.
    """
    q, k = _upcast(q), _upcast(k)
    qs = q * scale.to(q.dtype)
    n, m = q.shape[0], k.shape[0]
    rows = _strip_rows(n, m, q.element_size())
    kt = k.T
    lse_r = torch.empty(n, dtype=q.dtype, device=q.device)
    lse_c = torch.full((m,), float("-inf"), dtype=q.dtype, device=q.device) if need_cols else None
    strip = torch.empty(rows, m, dtype=q.dtype, device=q.device)
    for i0 in range(0, n, rows):
        i1 = min(n, i0 + rows)
        s = strip[: i1 - i0]
        torch.mm(qs[i0:i1], kt, out=s)
        torch.logsumexp(s, 1, out=lse_r[i0:i1])
        if need_cols:
            torch.logaddexp(lse_c, torch.logsumexp(s, 0), out=lse_c)
    return lse_r, lse_c


def _shift_and_sign(lse_v: torch.Tensor, weight: torch.Tensor):
    """``weight·exp(z - lse) = sign·exp(z - (lse - log|weight|))``: one subtract and one exp per element.

    Returns the shift and the sign vector, or None for the sign when every weight is >= 0 (the usual case).
    """
    shift = lse_v - torch.log(weight.abs())  # weight 0 gives +inf: exp(z - inf) = 0
    sign = torch.sign(weight) if bool((weight < 0).any()) else None
    return shift, sign


def grad(q, k, scale, lse_r, lse_c, a, w):
    """Unscaled gradient products of one recomputing sweep.

    Args:
        q: ``[N, D]``; k: ``[M, D]``; scale: 0-dim tensor.
        lse_r: ``[N]`` row LSE; lse_c: ``[M]`` column LSE or None (one-way loss).
        a: ``[N]`` weight of each row softmax; w: ``[M]`` weight of each column softmax, or None.

    Returns:
        ``dq_u = P k`` ``[N, D]`` and ``dk_u = Pᵀ q`` ``[M, D]``, in the accumulation dtype, for
        ``P_ij = a_i exp(z_ij - lse_r_i) + w_j exp(z_ij - lse_c_j)``.
    """
    q, k = _upcast(q), _upcast(k)
    acc = q.dtype
    qs = q * scale.to(acc)
    n, m = q.shape[0], k.shape[0]
    rows = _strip_rows(n, m, q.element_size())
    row_shift, row_sign = _shift_and_sign(lse_r.to(acc), a.to(acc))
    cols = lse_c is not None
    if cols:
        col_shift, col_sign = _shift_and_sign(lse_c.to(acc), w.to(acc))
    kt = k.T
    dq = torch.empty(n, q.shape[1], dtype=acc, device=q.device)
    dk = torch.zeros(m, k.shape[1], dtype=acc, device=q.device)
    strip = torch.empty(rows, m, dtype=acc, device=q.device)
    prob = torch.empty(rows, m, dtype=acc, device=q.device)
    for i0 in range(0, n, rows):
        i1 = min(n, i0 + rows)
        s, p = strip[: i1 - i0], prob[: i1 - i0]
        torch.mm(qs[i0:i1], kt, out=s)
        torch.sub(s, row_shift[i0:i1, None], out=p).exp_()
        if row_sign is not None:
            p.mul_(row_sign[i0:i1, None])
        if cols:
            s.sub_(col_shift).exp_()
            if col_sign is not None:
                s.mul_(col_sign)
            p.add_(s)
        torch.mm(p, k, out=dq[i0:i1])
        dk.addmm_(p.T, q[i0:i1])
    return dq, dk
