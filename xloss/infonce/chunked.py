"""The chunked PyTorch engine of InfoNCE: row strips of the logits, never the whole N×M matrix (any device).

The two sweeps of the ``InfoNCEEngine`` protocol (``engine.py``), shared with the Triton engine:

* ``lse(q, k, scale, need_cols, labels, keep_logits)``: one sweep over row strips ``S = s·q_blk kᵀ`` gives every row's
  log-sum-exp exactly (a strip holds whole rows) and the columns', merged strip by strip (online softmax).
  Statistics stay split as ``[max, log Σ exp(z - max)]`` (shape ``[2, N]``), for precision.
* ``grad(q, k, scale, row, col, a, w)``: one recomputing sweep gives ``dq_u = P k`` and ``dk_u = Pᵀ q`` with
  ``P_ij = a_i·exp((z_ij - row_max_i) - row_logsum_i) + w_j·exp((z_ij - col_max_j) - col_logsum_j)``.

So a forward+backward costs 4 GEMM sweeps and O((N+M)·D) memory plus a working set of two ``rows × M`` strips
(the logits and the probabilities, or a logsumexp temporary in forward) whose size comes from a memory budget:
``XLOSS_CPU_TILE_MB`` (default 64 MiB for both strips together).  A small problem whose whole logits fit
that budget beside the two strips keeps them from forward to backward instead (3 sweeps; ``keeps_logits``):
below ~2k × 2k the naive loss is cache-resident and a fourth sweep would make us slower than it.  Inputs in fp16/bf16 are
computed in fp32; fp64 stays fp64.  Nothing here is CPU-specific: it is also the fallback on CUDA tensors when
Triton is missing.
"""

from __future__ import annotations

import torch

from .._tiling import accumulation_dtype, budget_bytes, upcast  # noqa: F401 (accumulation_dtype: part of the engine API)

DEFAULT_TILE_BYTES = 64 * 2**20
STRIPS = 2  # buffers of rows × M alive at once in either sweep


def _budget() -> int:
    return budget_bytes(DEFAULT_TILE_BYTES)


def _strip_rows(n: int, m: int, itemsize: int) -> int:
    """Rows per strip so that STRIPS strips of ``rows × m`` fit the budget (at least one row)."""
    return max(1, min(n, _budget() // max(1, STRIPS * m * itemsize)))


def keeps_logits(n: int, m: int, itemsize: int) -> bool:
    """Small problems: the whole logits matrix, kept from forward to backward beside the two working strips,
    fits the budget, so backward skips its recomputing GEMM (3 sweeps instead of 4)."""
    return (STRIPS + 1) * n * m * itemsize <= _budget()


def lse(q: torch.Tensor, k: torch.Tensor, scale: torch.Tensor, need_cols: bool, labels: torch.Tensor,
        keep_logits: bool = False):
    """Row and (optionally) column log-sum-exp statistics of ``z = scale · q kᵀ``, and the positive logits.

    The statistics are kept split, ``(max, log Σ exp(z - max))``, so that backward can form a softmax entry
    as ``exp((z - max) - logsum)`` as ``log_softmax`` does: one fp32 number of size |z| (the full LSE) would
    add an error of |z|·eps to every entry.

    Args:
        q: ``[N, D]``; k: ``[M, D]``; scale: 0-dim tensor.
        need_cols: also return the column statistics (symmetric loss).
        labels: ``[N]`` long, each query's positive key.

    Returns:
        ``row [2, N]`` and ``col [2, M]`` (or None): ``[0]`` the max, ``[1]`` the log-sum-exp relative to it;
        ``z_pos [N]``, ``z[i, labels[i]]`` read from the same strips (so that ``max - z_pos`` is exactly 0
        when the positive is the max, as in ``log_softmax``); all in the accumulation dtype.
        ``logits``: the whole ``[N, M]`` logits when ``keep_logits`` (the caller decides it with
        ``keeps_logits``, so that the custom op's fake knows the shape), for ``grad`` to reuse, else None.
    """
    q, k = upcast(q), upcast(k)
    qs = q * scale.to(q.dtype)
    n, m = q.shape[0], k.shape[0]
    rows = n if keep_logits else _strip_rows(n, m, q.element_size())  # one strip holds all rows when kept
    kt = k.T
    row = torch.empty(2, n, dtype=q.dtype, device=q.device)
    z_pos = torch.empty(n, dtype=q.dtype, device=q.device)
    if need_cols:
        col_max = torch.full((m,), float("-inf"), dtype=q.dtype, device=q.device)
        col_sum = torch.zeros(m, dtype=q.dtype, device=q.device)
    strip = torch.empty(rows, m, dtype=q.dtype, device=q.device)
    work = torch.empty(rows, m, dtype=q.dtype, device=q.device)
    for i0 in range(0, n, rows):
        i1 = min(n, i0 + rows)
        s, e = strip[: i1 - i0], work[: i1 - i0]
        torch.mm(qs[i0:i1], kt, out=s)
        torch.gather(s, 1, labels[i0:i1, None], out=z_pos[i0:i1, None])
        r_max = torch.amax(s, 1, out=row[0, i0:i1])
        torch.sub(s, r_max[:, None], out=e).exp_()
        torch.sum(e, 1, out=row[1, i0:i1]).log_()
        if need_cols:
            # Merge this strip's column statistics into the running ones (online softmax over strips).
            t_max = s.amax(0)
            torch.sub(s, t_max, out=e).exp_()
            new_max = torch.maximum(col_max, t_max)
            col_sum.mul_(torch.exp(col_max - new_max)).add_(e.sum(0) * torch.exp(t_max - new_max))
            col_max = new_max
    col = torch.stack([col_max, col_sum.log()]) if need_cols else None
    logits = strip if keep_logits else None
    return row, col, z_pos, logits


def _shift_and_sign(stats: torch.Tensor, weight: torch.Tensor):
    """``weight·exp((z - max) - logsum) = sign·exp((z - max) - shift)``, ``shift = logsum - log|weight|``.

    Returns the max, the shift and the sign vector (None when every weight is >= 0, the usual case).
    A zero weight gives shift +inf and so exp(...) = 0.
    """
    shift = stats[1] - torch.log(weight.abs())
    sign = torch.sign(weight) if bool((weight < 0).any()) else None
    return stats[0], shift, sign


def _add_softmax_part(out, s, mx, shift, sign, accumulate: bool):
    """``out (+)= sign·exp((s - mx) - shift)`` with the max subtracted first (see ``lse``)."""
    if accumulate:
        s.sub_(mx).sub_(shift).exp_()
        if sign is not None:
            s.mul_(sign)
        out.add_(s)
    else:
        torch.sub(s, mx, out=out).sub_(shift).exp_()
        if sign is not None:
            out.mul_(sign)


def grad(q, k, scale, row, col, a, w, logits=None):
    """Unscaled gradient products of one recomputing sweep.

    Args:
        q: ``[N, D]``; k: ``[M, D]``; scale: 0-dim tensor.
        row: ``[2, N]`` row statistics of ``lse``; col: ``[2, M]`` column statistics or None (one-way).
        a: ``[N]`` weight of each row softmax; w: ``[M]`` weight of each column softmax, or None.
        logits: the ``[N, M]`` logits kept by ``lse`` (not modified), or None to recompute them.

    Returns:
        ``dq_u = P k`` ``[N, D]`` and ``dk_u = Pᵀ q`` ``[M, D]``, in the accumulation dtype, for
        ``P_ij = a_i·softmax_j(z_i·)_ij + w_j·softmax_i(z_·j)_ij``.
    """
    q, k = upcast(q), upcast(k)
    acc = q.dtype
    qs = q * scale.to(acc)
    n, m = q.shape[0], k.shape[0]
    rows = _strip_rows(n, m, q.element_size())
    # Divide the weights by their largest magnitude (multiplied back at the end): uniform weights such as
    # 1/(2N) then give log|weight| = 0 exactly instead of a rounded log(2N) added to every exponent.
    a, w = a.to(acc), (None if w is None else w.to(acc))
    norm = a.abs().amax() if w is None else torch.maximum(a.abs().amax(), w.abs().amax())
    norm = torch.where(norm > 0, norm, torch.ones_like(norm))
    r_max, r_shift, r_sign = _shift_and_sign(row.to(acc), a / norm)
    if col is not None:
        c_max, c_shift, c_sign = _shift_and_sign(col.to(acc), w / norm)
    kt = k.T
    dq = torch.empty(n, q.shape[1], dtype=acc, device=q.device)
    dk = torch.zeros(m, k.shape[1], dtype=acc, device=q.device)
    strip = torch.empty(rows, m, dtype=acc, device=q.device)
    prob = torch.empty(rows, m, dtype=acc, device=q.device)
    for i0 in range(0, n, rows):
        i1 = min(n, i0 + rows)
        s, p = strip[: i1 - i0], prob[: i1 - i0]
        if logits is None:
            torch.mm(qs[i0:i1], kt, out=s)
        else:
            s.copy_(logits[i0:i1])  # a copy: the column part below works in place, and backward may rerun
        sign = None if r_sign is None else r_sign[i0:i1, None]
        _add_softmax_part(p, s, r_max[i0:i1, None], r_shift[i0:i1, None], sign, accumulate=False)
        if col is not None:
            _add_softmax_part(p, s, c_max, c_shift, c_sign, accumulate=True)
        torch.mm(p, k, out=dq[i0:i1])
        dk.addmm_(p.T, q[i0:i1])
    return dq.mul_(norm), dk.mul_(norm)
