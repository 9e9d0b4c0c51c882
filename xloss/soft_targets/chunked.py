"""The chunked PyTorch engine of teacher distillation: row strips of the student and teacher logits, any device.

Implements ``engine.py`` (``lse``, ``grad``).  A strip holds whole rows, so row statistics are exact per strip;
column statistics merge strip by strip (online softmax).  The working set is a few ``rows × M`` buffers (student
logits, teacher logits, one temporary) whose size comes from the budget ``XLOSS_CPU_TILE_MB`` (default 64 MiB);
the teacher's GEMM is computed beside the student's in each strip, in forward and again in backward.
"""

from __future__ import annotations

import torch

from .._tiling import budget_bytes, upcast

DEFAULT_TILE_BYTES = 64 * 2**20
STRIPS = 4  # rows × M buffers alive at once: student logits, teacher logits, two temporaries


def _strip_rows(n: int, m: int, itemsize: int) -> int:
    return max(1, min(n, budget_bytes(DEFAULT_TILE_BYTES) // max(1, STRIPS * m * itemsize)))


def _strips(q, k, scale, tq, tk, tscale):
    """Yield ``(i0, i1, z, t)`` per row strip: student and teacher logits of rows ``[i0, i1)``."""
    n, m = q.shape[0], k.shape[0]
    qs, tqs = q * scale, tq * tscale
    kt, tkt = k.T, tk.T
    rows = _strip_rows(n, m, q.element_size())
    for i0 in range(0, n, rows):
        i1 = min(n, i0 + rows)
        yield i0, i1, qs[i0:i1] @ kt, tqs[i0:i1] @ tkt


def lse(q, k, scale, tq, tk, tscale, need_cols: bool):
    """Student split LSE per row / column, teacher (max, Σ exp, Σ exp·z) per row / column (see engine.py)."""
    q, k = upcast(q), upcast(k)
    acc = q.dtype
    tq, tk = tq.to(acc).contiguous(), tk.to(acc).contiguous()
    s, ts = scale.to(acc), tscale.to(acc)
    n, m = q.shape[0], k.shape[0]
    row = torch.empty(2, n, dtype=acc, device=q.device)
    trow = torch.empty(3, n, dtype=acc, device=q.device)
    if need_cols:
        col_max = torch.full((m,), float("-inf"), dtype=acc, device=q.device)
        col_sum = torch.zeros(m, dtype=acc, device=q.device)
        tcol = torch.zeros(3, m, dtype=acc, device=q.device)
        tcol[0] = float("-inf")
    for i0, i1, z, t in _strips(q, k, s, tq, tk, ts):
        r_max = torch.amax(z, 1, out=row[0, i0:i1])
        torch.sum(torch.exp(z - r_max[:, None]), 1, out=row[1, i0:i1]).log_()
        t_max = torch.amax(t, 1, out=trow[0, i0:i1])
        e = torch.exp(t - t_max[:, None])
        torch.sum(e, 1, out=trow[1, i0:i1])
        torch.sum(e.mul_(z), 1, out=trow[2, i0:i1])
        if need_cols:  # merge this strip into the running column statistics (online, rescaled to the new max)
            c_max = z.amax(0)
            new = torch.maximum(col_max, c_max)
            col_sum = col_sum * torch.exp(col_max - new) + torch.exp(z - c_max).sum(0) * torch.exp(c_max - new)
            col_max = new
            tc_max = t.amax(0)
            tnew = torch.maximum(tcol[0], tc_max)
            e = torch.exp(t - tc_max)
            part = torch.stack([e.sum(0), e.mul_(z).sum(0)]) * torch.exp(tc_max - tnew)
            tcol[1:] = tcol[1:] * torch.exp(tcol[0] - tnew) + part
            tcol[0] = tnew
    col = torch.stack([col_max, col_sum.log()]) if need_cols else None
    return row, col, trow, (tcol if need_cols else None)


def _softmax_(x, stats):
    """``x ← exp((x − max) − logsum)`` in place, the max subtracted first."""
    return x.sub_(stats[0]).sub_(stats[1]).exp_()


def grad(q, k, scale, tq, tk, tscale, row, col, trow, tcol, a, w):
    """``dq_u = G k``, ``dk_u = Gᵀ q`` of one recomputing sweep (see engine.py)."""
    q, k = upcast(q), upcast(k)
    acc = q.dtype
    tq, tk = tq.to(acc).contiguous(), tk.to(acc).contiguous()
    s, ts = scale.to(acc), tscale.to(acc)
    a = a.to(acc)
    dq = torch.empty(q.shape, dtype=acc, device=q.device)
    dk = torch.zeros(k.shape, dtype=acc, device=q.device)
    for i0, i1, z, t in _strips(q, k, s, tq, tk, ts):
        # Few passes and buffers over the rows × M strip: the row part in two fresh buffers, the column part in
        # place in z and t (their last use).
        g = _softmax_(z.clone(), row[:, i0:i1, None])
        g.sub_(_softmax_(t.clone() if col is not None else t, trow[:, i0:i1, None])).mul_(a[i0:i1, None])
        if col is not None:
            g.add_(_softmax_(z, col).sub_(_softmax_(t, tcol)).mul_(w))
        torch.mm(g, k, out=dq[i0:i1])
        dk.addmm_(g.T, q[i0:i1])
    return dq, dk
