"""The backward of late interaction, shared by every forward engine (plain torch, any device).

The max routes each score's gradient to its arg-max token.  For query→document scores
``S_ab = Σ_t w_at · sim(a, t, b, idx_abt)`` with incoming gradient ``g_ab``:

* ``dq[a,t] = Σ_b g_ab·w_at·d[b, idx_abt]``    (a gather on the document side)
* ``dd[b,v] = Σ_{a,t: idx_abt = v} g_ab·w_at·q[a,t]``    (a scatter-add on the document side)
* ``dw[a,t] = Σ_b g_ab·val_abt``

only where ``idx ≥ 0`` and the winner is a valid token (in zero mode an invalid winner scores a constant 0).
Document→query scores are the same with the roles of the two sides swapped.

The routing is a sparse matrix product: ``A [X·LX, Y·LY]`` with one entry per ``(x, s, y)`` (column
``y·LY + idx``), ``dX = A·Y`` and ``dY = Aᵀ·X``.  It is built block by block (a block of the weighted side ×
a block of the other side, sized by ``XLOSS_CPU_TILE_MB``) as CSR matrices: ``A`` is row-sorted by
construction, ``Aᵀ`` by one sort of the block's keys.  That costs ``O(X·Y·LX·D)``, ``LY``× less than the
forward, and never builds a ``[X, Y, LX, D]`` tensor.
"""

from __future__ import annotations

import warnings

import torch

from .chunked import budget_bytes

NNZ_BYTES = 64  # working bytes per routed entry in a block (keys, values, sort permutation, CSR copies)


def _csr(crow, col, val, size):
    with warnings.catch_warnings():  # "Sparse CSR tensor support is in beta state"
        warnings.simplefilter("ignore", UserWarning)
        return torch.sparse_csr_tensor(crow, col, val, size=size, check_invariants=False)


def route(x, y, idx, g, w, y_valid, check_winner: bool):
    """Gradients of ``S_xy = Σ_s w[x,s]·<x[x,s], y[y, idx[x,y,s]]>`` through the arg-max indices.

    Args:
        x: ``[NX, LX, D]`` the weighted side (its tokens each take a max); y: ``[NY, LY, D]`` the other side;
            both in the accumulation dtype.
        idx: ``[NX, NY, LX]`` integer arg-max into ``LY`` (-1: no winner); any strides.
        g: ``[NX, NY]`` incoming gradient of S; w: ``[NX, LX]`` token weights.
        y_valid: ``[NY, LY]`` bool; with ``check_winner`` an invalid winner routes nothing (zero mode).

    Returns:
        ``dx [NX, LX, D]`` and ``dy [NY, LY, D]``.
    """
    nx, lx, dim = x.shape
    ny, ly, _ = y.shape
    dev, dt = x.device, x.dtype
    dx = torch.zeros(nx, lx, dim, dtype=dt, device=dev)
    dy = torch.zeros(ny, ly, dim, dtype=dt, device=dev)
    budget = budget_bytes()
    bx = max(1, min(nx, (budget // 2) // (lx * dim * x.element_size())))  # a block of x (and dx) in cache
    by = max(1, min(ny, (budget // NNZ_BYTES) // (bx * lx)))
    xflat, yflat = x.reshape(nx * lx, dim), y.reshape(ny * ly, dim)
    yvalid_flat = y_valid.reshape(-1)
    for x0 in range(0, nx, bx):
        x1 = min(nx, x0 + bx)
        mx = x1 - x0
        x_blk = xflat[x0 * lx: x1 * lx]
        for y0 in range(0, ny, by):
            y1 = min(ny, y0 + by)
            my = y1 - y0
            ii = idx[x0:x1, y0:y1].to(torch.int64)  # [mx, my, lx]
            ok = ii >= 0
            key = ii.clamp_min_(0).add_((torch.arange(y0, y1, device=dev) * ly)[None, :, None])  # global row
            if check_winner:
                ok &= yvalid_flat[key]
            key -= y0 * ly  # row within this block of y
            coef = g[x0:x1, y0:y1, None].to(dt) * w[x0:x1, None, :].to(dt)
            coef = torch.where(ok, coef, torch.zeros((), dtype=dt, device=dev))
            # dX: rows (x, s) hold one entry per y, in increasing column order: CSR as it stands.
            n_rows = mx * lx
            a = _csr(
                torch.arange(0, n_rows * my + 1, my, device=dev),
                key.transpose(1, 2).reshape(-1),
                coef.transpose(1, 2).reshape(-1),
                (n_rows, my * ly),
            )
            dx[x0:x1] += (a @ yflat[y0 * ly: y1 * ly]).view(mx, lx, dim)
            # dY: the same entries sorted by their row (y, v); entry e = (x·my + y)·lx + s has column x·lx + s.
            flat = key.reshape(-1)
            sorted_key, perm = torch.sort(flat.to(torch.int32) if my * ly < 2**31 else flat, stable=True)
            col = torch.div(perm, my * lx, rounding_mode="floor") * lx + perm % lx
            crow = torch.searchsorted(
                sorted_key, torch.arange(my * ly + 1, device=dev, dtype=sorted_key.dtype)
            ).to(torch.int64)
            at = _csr(crow, col, coef.reshape(-1)[perm], (my * ly, n_rows))
            dy[y0:y1] += (at @ x_blk).view(my, ly, dim)
    return dx, dy


def weight_grad(g, val):
    """``dw[x, s] = Σ_y g[x, y]·val[x, y, s]`` for ``g [NX, NY]`` and ``val [NX, NY, LX]`` (any strides)."""
    return torch.einsum("xy,xys->xs", g.to(val.dtype), val)


def maxsim_backward(q, d, q_w, d_w, q_valid, d_valid, zero_mode, aux_q2d, aux_d2q, g_q2d, g_d2q,
                    need_q, need_d, need_qw, need_dw, route=None):
    """Gradients of ``(s_q2d, s_d2q) = maxsim_fwd(...)`` for the cross scores ``[Nq, Nd]``.

    Args:
        q, d, q_w, d_w, q_valid, d_valid, zero_mode: as given to the forward engine.
        aux_q2d, aux_d2q: ``(idx, val)`` of each direction (``val`` may be None when its weight needs no
            gradient), or None for a direction not computed.
        g_q2d, g_d2q: incoming gradients ``[Nq, Nd]`` (None: no gradient).
        need_*: which gradients to return.
        route: the routing primitive (an engine's, e.g. ``triton.route``: same signature and results as
            :func:`route`, given the inputs in their own dtype); None: :func:`route` (inputs upcast first).

    Returns:
        ``(dq, dd, dq_w, dd_w)`` in the accumulation dtype (None where not needed or zero).
    """
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    if route is None:
        route = globals()["route"]
        qf, df = q.to(acc), d.to(acc)
    else:  # an engine's route loads the inputs in their dtype and accumulates in acc itself
        qf, df = q, d
    dq = dd = dq_w = dd_w = None

    def add(a, b):
        return b if a is None else a + b

    if g_q2d is not None and aux_q2d is not None:
        idx, val = aux_q2d
        g = g_q2d.to(acc)
        if need_q or need_d:
            gq, gd = route(qf, df, idx, g, q_w, d_valid, zero_mode)
            dq, dd = add(dq, gq), add(dd, gd)
        if need_qw:
            dq_w = weight_grad(g, val)
    if g_d2q is not None and aux_d2q is not None:
        idx, val = aux_d2q
        g = g_d2q.to(acc)
        if need_q or need_d:
            gd, gq = route(df, qf, idx.permute(1, 0, 2), g.T, d_w, q_valid, zero_mode)
            dq, dd = add(dq, gq), add(dd, gd)
        if need_dw:
            dd_w = weight_grad(g.T, val.permute(1, 0, 2))
    return dq, dd, dq_w, dd_w


def route_pairs(x, y, idx, g, w, y_valid, zero_mode: bool, group: int = 1):
    """Gradients of the aligned-pair scores ``S_p = Σ_s w[p//group, s]·<x[p//group, s], y[p, idx[p, s]]>``.

    Args:
        x: ``[NP/group, LX, D]`` the weighted side (its tokens each take a max over a row of y); y:
            ``[NP, LY, D]`` the other side; any floating dtype (blocks are computed in g's dtype).
        idx: ``[NP, LX]`` integer arg-max into ``LY`` (-1: no winner); g: ``[NP]`` incoming gradient in the
            accumulation dtype; w: ``[NP/group, LX]`` token weights.
        y_valid: ``[NP, LY]`` bool; in zero mode an invalid winner scored a constant 0 and routes nothing.
        group: each row of x meets ``group`` consecutive rows of y (the grouped layout); 1 = aligned pairs.

    Returns:
        ``dx [NP/group, LX, D]`` (summed over each row's group) and ``dy [NP, LY, D]`` in g's dtype.

    ``dx`` gathers the winners' rows (``index_select``), ``dy`` adds the weighted rows of x at the winners
    (``index_add_``): ``O(NP·LX·D)`` in blocks of rows sized by ``XLOSS_CPU_TILE_MB``, so no temporary is
    larger than a block (for the grouped layout y and dy are the largest tensors of the step, and dy is
    written once, by its zero fill and the scattered rows).  A token without a valid winner (masked out, or no
    partner) contributes exactly 0: its gathered row and its own row may hold NaN/inf padding, so the gathered
    row is replaced by 0 (``masked_fill_``), never multiplied by a zero coefficient, and its own row is added to
    a spare row of ``dy`` that is dropped.
    """
    n, lx = idx.shape
    ly, dim = y.shape[1], y.shape[2]
    acc, dev = g.dtype, g.device
    dx = torch.empty(x.shape[0], lx, dim, dtype=acc, device=dev)
    # One spare last row takes the rows of x that route nothing (they may hold NaN/inf padding): no mask pass.
    dy = torch.zeros(n * ly + 1, dim, dtype=acc, device=dev)
    yflat = y.reshape(n * ly, dim)
    rows = max(1, budget_bytes() // (2 * max(1, lx * dim) * max(4, y.element_size())) // group) * group
    for a0 in range(0, n, rows):
        a1 = min(n, a0 + rows)
        m = a1 - a0
        ii = idx[a0:a1].to(torch.int64, copy=True)  # modified in place below
        bad = ii < 0
        ii.clamp_min_(0)
        if zero_mode:
            bad |= ~torch.gather(y_valid[a0:a1], 1, ii)
        wa = w[a0 // group: a1 // group].to(acc)
        coef = g[a0:a1].view(-1, group, 1) * wa[:, None, :]  # [m/group, group, lx]
        coef = coef.reshape(m, lx).masked_fill_(bad, 0)
        ii += (torch.arange(a0, a1, device=dev) * ly)[:, None]  # rows of yflat / dy
        flat = ii.view(-1)
        bad3 = bad[:, :, None]
        win = yflat.index_select(0, flat).view(m, lx, dim).to(acc).masked_fill_(bad3, 0).mul_(coef[:, :, None])
        dx[a0 // group: a1 // group] = win.view(-1, group, lx, dim).sum(1) if group > 1 else win
        xa = x[a0 // group: a1 // group].to(acc)
        src = xa[:, None] * coef.view(-1, group, lx, 1)
        dy.index_add_(0, flat.masked_fill(bad.view(-1), n * ly), src.view(m * lx, dim))
    return dx, dy[: n * ly].view(n, ly, dim)


def pairs_backward(q, d, q_w, d_w, q_valid, d_valid, zero_mode, aux_q2d, aux_d2q, g_q2d, g_d2q,
                   need_q, need_d, need_qw, need_dw, group: int = 1):
    """Gradients of the aligned-pair scores ``[N]`` (query a against document a; with ``group`` > 1, query a
    against documents ``a·group …``, q2d only): :func:`route_pairs` per direction, ``O(N·L·D)``.  Arguments
    as :func:`maxsim_backward`, with ``idx``/``val`` of shape ``[Nd, Lq]`` (q2d) or ``[N, Ld]`` (d2q) and
    ``g [Nd]``."""
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    dq = dd = dq_w = dd_w = None

    def add(a, b):
        return b if a is None else a + b

    if g_q2d is not None and aux_q2d is not None:
        idx, val = aux_q2d
        g = g_q2d.to(acc)
        if need_q or need_d:
            dq, dd = route_pairs(q, d, idx, g, q_w, d_valid, zero_mode, group)
        if need_qw:
            dq_w = (g[:, None] * val).view(-1, group, val.shape[1]).sum(1)
    if g_d2q is not None and aux_d2q is not None:
        if group > 1:
            raise ValueError("grouped aligned pairs (group > 1) score query→document only")
        idx, val = aux_d2q
        g = g_d2q.to(acc)
        if need_q or need_d:
            gd, gq = route_pairs(d, q, idx, g, d_w, q_valid, zero_mode)
            dq, dd = add(dq, gq), add(dd, gd)
        if need_dw:
            dd_w = g[:, None] * val
    return dq, dd, dq_w, dd_w


__all__ = ["maxsim_backward", "pairs_backward", "route", "route_pairs", "weight_grad"]
