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

    Returns the max, the shift and the sign vector.  The sign is always applied (a weight's sign is the sign of
    the incoming gradient, known only on the device: testing it would be a host sync).  A zero weight gives
    shift +inf and so exp(...) = 0.
    """
    shift = stats[1] - torch.log(weight.abs())
    return stats[0], shift, torch.sign(weight)


def _add_softmax_part(out, s, mx, shift, sign, accumulate: bool):
    """``out (+)= sign·exp((s - mx) - shift)`` with the max subtracted first (see ``lse``)."""
    if accumulate:
        out.addcmul_(s.sub_(mx).sub_(shift).exp_(), sign)  # the sign in the accumulating pass: no extra pass
    else:
        torch.sub(s, mx, out=out).sub_(shift).exp_().mul_(sign)


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


# ------------------------------------------------------------------------------ structured targets (issue 11)
# The target rule of engine.py (groups, self exclusion, margin, decoupled, hardness) on row strips.  A strip
# needs more working buffers than the plain sweeps (the raw dots, the logits, three boolean masks, one result):
# MASKED_STRIPS of them fit the same budget.

MASKED_STRIPS = 6
_NEG_INF = float("-inf")


def _masks(qg, kg, i0: int, i1: int, self_offset):
    """``(Y, self)`` of rows ``[i0, i1)`` against every key: the positive pairs and the excluded self pairs."""
    pos = qg[i0:i1, None] == kg[None, :]
    if self_offset is None:
        return pos, None
    rows = torch.arange(i0, i1, device=qg.device)[:, None]
    me = (rows - torch.arange(kg.shape[0], device=qg.device)[None, :]) == self_offset
    return pos & ~me, me


def _in_sets(pos, me, raw, decoupled: bool, margin, ref_r, ref_c, need_cols: bool):
    """The entries of each row's and each column's log-sum-exp (``in_row``, ``in_col``)."""
    base = None
    if decoupled:
        base = ~pos if me is None else ~(pos | me)
    elif me is not None:
        base = ~me
    if margin is None:
        base = torch.ones_like(pos) if base is None else base
        return base, (base if need_cols else None)
    neg = ~pos if base is None else (base & ~pos)
    in_row = ~(neg & (raw > ref_r[:, None] + margin))
    in_col = ~(neg & (raw > ref_c[None, :] + margin)) if need_cols else None
    if base is not None:
        in_row = in_row & base
        in_col = None if in_col is None else in_col & base
    return in_row, in_col


def _safe(mx: torch.Tensor) -> torch.Tensor:
    """A max to subtract: 0 where the set is empty (max -inf), so that ``x - max`` is never ``-inf - -inf``."""
    return torch.where(mx == _NEG_INF, torch.zeros_like(mx), mx)


def _rescale(old_max, new_max):
    """``exp(old_max - new_max)`` for an online sum, 0 when the old set was empty."""
    return torch.where(old_max == _NEG_INF, torch.zeros_like(old_max), torch.exp(old_max - _safe(new_max)))


def _masked_rows(q, k, scale, qg, kg, self_offset, need_cols):
    """Yield ``(i0, i1, raw, z, Y, self)`` per row strip (raw dots before the scale, z = scale·raw)."""
    n, m = q.shape[0], k.shape[0]
    rows = max(1, min(n, _budget() // max(1, MASKED_STRIPS * m * q.element_size())))
    kt = k.T
    for i0 in range(0, n, rows):
        i1 = min(n, i0 + rows)
        raw = q[i0:i1] @ kt
        pos, me = _masks(qg, kg, i0, i1, self_offset)
        yield i0, i1, raw, raw * scale, pos, me


def _hard(z, raw, pos, hardness: float):
    """``ẑ``: negatives' logits plus ``hardness·raw`` (positives unchanged)."""
    return torch.where(pos, z, z + hardness * raw) if hardness else z


def positive_max(q, k, qg, kg, self_offset, need_cols: bool):
    """Best raw dot product among each row's (and column's) positives; -inf where none (see engine.py)."""
    q, k = upcast(q), upcast(k)
    ref_r = torch.empty(q.shape[0], dtype=q.dtype, device=q.device)
    ref_c = torch.full((k.shape[0],), _NEG_INF, dtype=q.dtype, device=q.device) if need_cols else None
    one = q.new_ones(())
    for i0, i1, raw, _, pos, _ in _masked_rows(q, k, one, qg, kg, self_offset, need_cols):
        raw = raw.masked_fill_(~pos, _NEG_INF)
        torch.amax(raw, 1, out=ref_r[i0:i1])
        if need_cols:
            torch.maximum(ref_c, raw.amax(0), out=ref_c)
    return ref_r, ref_c


def _whole_sets(self_offset, decoupled: bool, hardness: float, margin) -> bool:
    """Groups alone: every pair is in every log-sum-exp with its plain logit, so the tiles are those of the
    plain sweeps (``lse``, ``grad``) and the positives enter only through O((N + M)·D) group sums."""
    return self_offset is None and not decoupled and not hardness and margin is None


def _group_sums(q, k, qg, kg):
    """Per-group sums and counts of the queries and of the keys: ``(gq [N], gk [M], qsum [G, D], ksum [G, D],
    qcnt [G], kcnt [G])`` with ``gq``/``gk`` the rows' compact group indices."""
    n = q.shape[0]
    ids, inv = torch.unique(torch.cat([qg, kg]), return_inverse=True)
    gq, gk, g = inv[:n], inv[n:], ids.shape[0]
    qsum = q.new_zeros(g, q.shape[1]).index_add_(0, gq, q)
    ksum = k.new_zeros(g, k.shape[1]).index_add_(0, gk, k)
    qcnt = torch.bincount(gq, minlength=g).to(q.dtype)
    kcnt = torch.bincount(gk, minlength=g).to(q.dtype)
    return gq, gk, qsum, ksum, qcnt, kcnt


def _whole_sets_lse(q, k, s, qg, kg, need_cols: bool):
    """``masked_lse`` for groups alone: the plain sweep, and ``Σ_{j∈P(i)} z_ij = s·<q_i, Σ_{j∈P(i)} k_j>``."""
    row, col, _, _ = lse(q, k, s, need_cols, torch.zeros_like(qg))
    gq, gk, qsum, ksum, qcnt, kcnt = _group_sums(q, k, qg, kg)
    pos_r = torch.stack([s * (q * ksum[gq]).sum(1), kcnt[gq]])
    pos_c = torch.stack([s * (k * qsum[gk]).sum(1), qcnt[gk]]) if need_cols else None
    return row, col, pos_r, pos_c


def _whole_sets_grad(q, k, s, qg, kg, row, col, a, w, pa, pw):
    """``masked_grad`` for groups alone: the plain sweep's softmax part, and the target part
    ``Σ_j Y_ij (pa_i + pw_j) k_j`` (and its transpose) from group sums."""
    dq, dk = grad(q, k, s, row, col, a, w)
    gq, gk, qsum, ksum, _, _ = _group_sums(q, k, qg, kg)
    dq -= pa[:, None] * ksum[gq]
    dk -= torch.zeros_like(ksum).index_add_(0, gq, pa[:, None] * q)[gk]
    if col is not None:
        dq -= torch.zeros_like(ksum).index_add_(0, gk, pw[:, None] * k)[gq]
        dk -= pw[:, None] * qsum[gk]
    return dq, dk


def masked_lse(q, k, scale, qg, kg, self_offset, decoupled: bool, hardness: float, margin, ref_r, ref_c,
               need_cols: bool):
    """Split LSE statistics over each row's / column's set and the positives' logit sums and counts."""
    q, k = upcast(q), upcast(k)
    acc, n, m = q.dtype, q.shape[0], k.shape[0]
    s = scale.to(acc)
    if _whole_sets(self_offset, decoupled, hardness, margin):
        return _whole_sets_lse(q, k, s, qg, kg, need_cols)
    row = torch.empty(2, n, dtype=acc, device=q.device)
    pos_r = torch.empty(2, n, dtype=acc, device=q.device)
    if need_cols:
        col_max = torch.full((m,), _NEG_INF, dtype=acc, device=q.device)
        col_sum = torch.zeros(m, dtype=acc, device=q.device)
        pos_c = torch.zeros(2, m, dtype=acc, device=q.device)
    for i0, i1, raw, z, pos, me in _masked_rows(q, k, s, qg, kg, self_offset, need_cols):
        in_row, in_col = _in_sets(pos, me, raw, decoupled, margin, None if ref_r is None else ref_r[i0:i1],
                                  ref_c, need_cols)
        zp = torch.where(pos, z, z.new_zeros(()))  # the positives' logits (0 elsewhere: exact sums)
        torch.sum(zp, 1, out=pos_r[0, i0:i1])
        torch.sum(pos, 1, out=pos_r[1, i0:i1])
        if need_cols:
            pos_c[0].add_(zp.sum(0))
            pos_c[1].add_(pos.sum(0))
        del zp
        zh = _hard(z, raw, pos, hardness)
        del raw
        e = zh.masked_fill(~in_row, _NEG_INF)
        r_max = torch.amax(e, 1, out=row[0, i0:i1])
        e.sub_(_safe(r_max)[:, None]).exp_()
        torch.sum(e, 1, out=row[1, i0:i1]).log_()
        if need_cols:  # merge this strip's column statistics into the running ones (online softmax)
            torch.where(in_col, zh, zh.new_full((), _NEG_INF), out=e)
            t_max = e.amax(0)
            new_max = torch.maximum(col_max, t_max)
            part = e.sub_(_safe(t_max)).exp_().sum(0)
            col_sum = col_sum * _rescale(col_max, new_max) + part * _rescale(t_max, new_max)
            col_max = new_max
    col = torch.stack([col_max, col_sum.log()]) if need_cols else None
    return row, col, pos_r, (pos_c if need_cols else None)


def _softmax_part(zh, inside, mx, ls, weight):
    """``inside·weight·exp((ẑ - max) - logsum)``, 0 outside (also for empty sets and zero weights)."""
    p = torch.exp((zh - _safe(mx)) - ls) * weight
    return torch.where(inside, p, p.new_zeros(()))


def masked_grad(q, k, scale, qg, kg, self_offset, decoupled: bool, hardness: float, margin, ref_r, ref_c, row,
                col, a, w, pa, pw):
    """``dq_u = G k``, ``dk_u = Gᵀ q`` of one recomputing sweep under the target rule (see engine.py)."""
    q, k = upcast(q), upcast(k)
    acc, n, m = q.dtype, q.shape[0], k.shape[0]
    s = scale.to(acc)
    need_cols = col is not None
    a, pa = a.to(acc), pa.to(acc)
    if need_cols:
        w, pw = w.to(acc), pw.to(acc)
    if _whole_sets(self_offset, decoupled, hardness, margin):
        return _whole_sets_grad(q, k, s, qg, kg, row, col, a, w, pa, pw)
    dq = torch.empty(n, q.shape[1], dtype=acc, device=q.device)
    dk = torch.zeros(m, k.shape[1], dtype=acc, device=q.device)
    for i0, i1, raw, z, pos, me in _masked_rows(q, k, s, qg, kg, self_offset, need_cols):
        in_row, in_col = _in_sets(pos, me, raw, decoupled, margin, None if ref_r is None else ref_r[i0:i1],
                                  ref_c, need_cols)
        zh = _hard(z, raw, pos, hardness)
        del raw, z
        g = _softmax_part(zh, in_row, row[0, i0:i1, None], row[1, i0:i1, None], a[i0:i1, None])
        target = pa[i0:i1, None]
        if need_cols:
            g += _softmax_part(zh, in_col, col[0], col[1], w)
            target = target + pw
        g -= torch.where(pos, target, g.new_zeros(()))
        torch.mm(g, k, out=dq[i0:i1])
        dk.addmm_(g.T, q[i0:i1])
    return dq, dk


# ------------------------------------------------------------------------------ Matryoshka prefixes (issue 12)
# Prefixes d_1 < ... < d_P of D (see matryoshka.py): z^m_ij = rq^m_i·rk^m_j·cum^m_ij with cum^m the accumulated
# scaled dots of the D slices [d_{m-1}, d_m) (rq, rk the inverse prefix norms, or None for 1).  A tile computes
# the P slice GEMMs in order, so every prefix's logits come from one pass over q and k.
#
# Unlike the plain sweeps (whole-row strips), these work on 2-D tiles of rows × columns small enough that the
# P + 3 working tiles stay in the CPU's cache: a tile goes through ~10 elementwise passes per prefix in forward
# and ~20 in backward, which from main memory would cost more than the GEMMs.  Row statistics are then merged
# online across column tiles, as the column statistics are across row tiles.

MATRYOSHKA_TILE_BYTES = 16 * 2**20  # default budget of the P + 3 working tiles together (XLOSS_CPU_TILE_MB)
TILE_ASPECT = 8  # columns per row of a tile: long rows for the GEMMs, enough rows to amortise reading k


def _matryoshka_tile(n: int, m: int, prefixes: int, itemsize: int) -> tuple[int, int]:
    """``(rows, cols)`` of a tile, for both sweeps: the backward keeps every prefix's ``cum`` (the suffix sums run
    from the widest prefix down) and three more tiles.  The forward uses the same tiles so that it and the
    backward's recomputation run the very same GEMMs (a BLAS may block another shape differently)."""
    elems = max(1, budget_bytes(MATRYOSHKA_TILE_BYTES) // ((prefixes + 3) * itemsize))
    cols = max(1, min(m, int((TILE_ASPECT * elems) ** 0.5)))
    return max(1, min(n, elems // cols)), cols


def _accumulate(cum, q_blk, k_blk, a: int, b: int, first: bool):
    """``cum (+)= q_blk[:, a:b] · k_blk[:, a:b]ᵀ``: the next slice's dot products (views: nothing is copied)."""
    if first:
        torch.mm(q_blk[:, a:b], k_blk[:, a:b].T, out=cum)
    else:
        cum.addmm_(q_blk[:, a:b], k_blk[:, a:b].T)


def _prefix_logits(out, cum, rq_blk, rk_blk):
    """``z`` of one prefix on a tile: ``cum·rq_i·rk_j`` into ``out``, or ``cum`` itself without norms."""
    if rq_blk is None:
        return cum
    torch.mul(cum, rq_blk[:, None], out=out)
    return out.mul_(rk_blk)


def _merge_online(mx, total, z, dim: int, work):
    """Merge a tile's ``(max, Σ exp(z - max))`` along ``dim`` into the running ``mx``, ``total`` (in place)."""
    t_max = z.amax(dim)
    torch.sub(z, t_max.unsqueeze(dim), out=work).exp_()
    new_max = torch.maximum(mx, t_max)
    total.mul_(torch.exp(mx - new_max)).add_(work.sum(dim) * torch.exp(t_max - new_max))
    mx.copy_(new_max)


def _tiles(n: int, m: int, rows: int, cols: int):
    """``(r0, r1, c0, c1)`` of every tile, row block by row block."""
    for r0 in range(0, n, rows):
        for c0 in range(0, m, cols):
            yield r0, min(n, r0 + rows), c0, min(m, c0 + cols)


def matryoshka_lse(q, k, rq, rk, scale, dims, need_cols: bool, labels):
    """Split LSE statistics of every prefix's logits, and the positive logits, from one sweep.

    Args:
        q ``[N, D]``, k ``[M, D]``; rq ``[P, N]``, rk ``[P, M]`` inverse prefix norms (accumulation dtype) or
        None (no normalisation); scale 0-dim; dims the P prefix widths; labels ``[N]`` long.

    Returns:
        ``row [P, 2, N]``, ``col [P, 2, M]`` (or None), ``z_pos [P, N]``; accumulation dtype.
    """
    q, k = upcast(q), upcast(k)
    acc, dev = q.dtype, q.device
    qs = q * scale.to(acc)
    n, m, P = q.shape[0], k.shape[0], len(dims)
    bounds = (0, *dims)
    rows, cols = _matryoshka_tile(n, m, P, q.element_size())
    row_max = torch.full((P, n), float("-inf"), dtype=acc, device=dev)
    row_sum = torch.zeros(P, n, dtype=acc, device=dev)
    z_pos = torch.zeros(P, n, dtype=acc, device=dev)
    if need_cols:
        col_max = torch.full((P, m), float("-inf"), dtype=acc, device=dev)
        col_sum = torch.zeros(P, m, dtype=acc, device=dev)
    cum_buf, z_buf, work_buf = (torch.empty(rows * cols, dtype=acc, device=dev) for _ in range(3))
    for r0, r1, c0, c1 in _tiles(n, m, rows, cols):
        shape = (r1 - r0, c1 - c0)
        cum, zb, work = (b[: shape[0] * shape[1]].view(shape) for b in (cum_buf, z_buf, work_buf))
        rel, inside = labels[r0:r1] - c0, (labels[r0:r1] >= c0) & (labels[r0:r1] < c1)
        rel = rel.clamp(0, shape[1] - 1)[:, None]
        for p in range(P):
            _accumulate(cum, qs[r0:r1], k[c0:c1], bounds[p], bounds[p + 1], p == 0)
            z = _prefix_logits(zb, cum, None if rq is None else rq[p, r0:r1], None if rk is None else rk[p, c0:c1])
            # the positive logit from the very tile that holds it (max - z_pos is then exactly 0 when it wins)
            z_pos[p, r0:r1] = torch.where(inside, z.gather(1, rel)[:, 0], z_pos[p, r0:r1])
            _merge_online(row_max[p, r0:r1], row_sum[p, r0:r1], z, 1, work)
            if need_cols:
                _merge_online(col_max[p, c0:c1], col_sum[p, c0:c1], z, 0, work)
    row = torch.stack([row_max, row_sum.log()], 1)
    col = torch.stack([col_max, col_sum.log()], 1) if need_cols else None
    return row, col, z_pos


def matryoshka_grad(q, k, rq, rk, scale, dims, row, col, a, w, labels, pos, u, v):
    """One recomputing sweep: ``(dq_u [N, D], dk_u [M, D], drq [P, N] | None, drk [P, M] | None)``.

    Per prefix ``G^p_ij = a_pi·softmax_row + w_pj·softmax_col - pos_pi·[j = labels_i] - u_pi - v_pj`` (``w``,
    ``u``, ``v`` may be None: absent), ``H^p = G^p ∘ rq^p rk^pᵀ``; ``dq_u[:, slice_l] = (Σ_{p≥l} H^p) k[:, slice_l]``,
    ``dk_u`` likewise with q; ``drq^p_i = Σ_j G^p_ij·rk^p_j·s·cum^p_ij`` and ``drk^p_j`` the column sums (the
    gradients of the loss with respect to the inverse norms; None without norms).  Accumulation dtype.
    """
    q, k = upcast(q), upcast(k)
    acc, dev = q.dtype, q.device
    qs = q * scale.to(acc)
    n, m, P = q.shape[0], k.shape[0], len(dims)
    bounds = (0, *dims)
    rows, cols = _matryoshka_tile(n, m, P, q.element_size())
    a, pos = a.to(acc), pos.to(acc)
    # As grad: divide the weights by their largest magnitude (uniform weights then give log|weight| = 0 exactly)
    # and multiply the results back at the end.
    norm = a.abs().amax() if w is None else torch.maximum(a.abs().amax(), w.abs().amax())
    norm = torch.where(norm > 0, norm, torch.ones_like(norm))
    r_max, r_shift, r_sign = _shift_and_sign(row.to(acc).transpose(0, 1), a / norm)  # each [P, N]
    if col is not None:
        c_max, c_shift, c_sign = _shift_and_sign(col.to(acc).transpose(0, 1), w.to(acc) / norm)
    pos = pos / norm
    u = None if u is None else u.to(acc) / norm
    v = None if v is None else v.to(acc) / norm
    dq = torch.zeros(n, q.shape[1], dtype=acc, device=dev)
    dk = torch.zeros(m, k.shape[1], dtype=acc, device=dev)
    drq = drk = None
    if rq is not None:
        drq = torch.zeros(P, n, dtype=acc, device=dev)
        drk = torch.zeros(P, m, dtype=acc, device=dev)
    cum_bufs = [torch.empty(rows * cols, dtype=acc, device=dev) for _ in range(P)]
    z_buf, g_buf, s_buf = (torch.empty(rows * cols, dtype=acc, device=dev) for _ in range(3))
    for r0, r1, c0, c1 in _tiles(n, m, rows, cols):
        shape = (r1 - r0, c1 - c0)
        cums = [b[: shape[0] * shape[1]].view(shape) for b in cum_bufs]
        zb, g, acc_s = (b[: shape[0] * shape[1]].view(shape) for b in (z_buf, g_buf, s_buf))
        for p in range(P):  # the forward's accumulated dots, every prefix kept
            if p:
                cums[p].copy_(cums[p - 1])  # then the forward's very addmm_ on the very values
            _accumulate(cums[p], qs[r0:r1], k[c0:c1], bounds[p], bounds[p + 1], p == 0)
        rel, inside = labels[r0:r1] - c0, (labels[r0:r1] >= c0) & (labels[r0:r1] < c1)
        hit = (torch.arange(shape[0], device=dev), rel.clamp(0, shape[1] - 1))
        for p in reversed(range(P)):
            rq_p = None if rq is None else rq[p, r0:r1]
            rk_p = None if rk is None else rk[p, c0:c1]
            z = _prefix_logits(zb, cums[p], rq_p, rk_p)  # without norms: cums[p] itself, used up here
            _add_softmax_part(g, z, r_max[p, r0:r1, None], r_shift[p, r0:r1, None], r_sign[p, r0:r1, None],
                              accumulate=False)
            if col is not None:
                _add_softmax_part(g, z, c_max[p, c0:c1], c_shift[p, c0:c1], c_sign[p, c0:c1], accumulate=True)
            # the target entries (of the rows whose positive is in this tile) and smoothing's uniform parts
            g.index_put_(hit, torch.where(inside, -pos[p, r0:r1], pos.new_zeros(())), accumulate=True)
            if u is not None:
                g.sub_(u[p, r0:r1, None])
            if v is not None:
                g.sub_(v[p, c0:c1])
            if rq is not None:
                t = torch.mul(g, cums[p], out=zb)  # G∘(s·cum): its row and column sums weighted by rk, rq
                drq[p, r0:r1].addmv_(t, rk_p)
                drk[p, c0:c1].addmv_(t.T, rq_p)
                g.mul_(rq_p[:, None]).mul_(rk_p)  # H^p
            if p == P - 1:  # the suffix sum starts as H^P: swap the buffers instead of copying
                acc_s, g = g, acc_s
            else:
                acc_s.add_(g)
            a0, b0 = bounds[p], bounds[p + 1]
            dq[r0:r1, a0:b0].addmm_(acc_s, k[c0:c1, a0:b0])
            dk[c0:c1, a0:b0].addmm_(acc_s.T, q[r0:r1, a0:b0])
    dq.mul_(norm), dk.mul_(norm)
    if rq is not None:
        drq.mul_(norm), drk.mul_(norm)
    return dq, dk, drq, drk
