"""The chunked PyTorch engine of GRAM: GEMM tiles and a Schur complement, never a batched det.

It runs on any device (CUDA included) and in float64; it implements :class:`xloss.gram.engine.GramEngine`
(the four sweeps ``volume``, ``volume_grad``, ``loss_stats`` and ``loss_grad`` at the end of this module) and
works in the accumulation dtype (inputs upcast: fp32 for half inputs, fp64 for fp64).

With ``p = k − 1`` other modalities, write ``X_j`` for the ``p × D`` matrix of sample j's other modalities,
``M_j = X_j X_jᵀ`` (``p × p``) and ``c_ij = X_j a_i`` (``p``).  The Schur complement of ``M_j`` in ``G_ij``
gives ``det G_ij = det M_j · (|a_i|² − c_ijᵀ M_j⁻¹ c_ij)``; with the adjugate ``adj M_j = det M_j · M_j⁻¹``
this is the polynomial

    det G_ij = |a_i|² · det M_j − c_ijᵀ adj(M_j) c_ij,        V_ij = sqrt(|det G_ij| + eps).

``det M_j`` and ``adj M_j`` are computed once per sample j (O(N2·p²·D), cofactor expansion: p ≤ 4), and
``c^m = A X^mᵀ`` are p GEMMs per tile.  The adjugate (rather than ``M⁻¹``) keeps everything finite when
``M_j`` is singular (duplicated modalities: the volume is then exactly 0), and makes every quantity a
polynomial, so the only non-smooth point left is the square root at ``det G = 0`` (``eps > 0`` removes it).

Tiles of ``bi × bj`` pairs are sized from a memory budget (``XLOSS_CPU_TILE_MB``, default 48 MiB for the
tile's working set) and swept j-tile outer, so the stacked ``[p·bj, D]`` block of the other modalities is
built once per j tile and each tile is one GEMM ``C = A_i [X¹_j; …; X^p_j]ᵀ``.  Forward keeps the signed
``det G [N1, N2]`` (one N1×N2 buffer; ``V`` follows from it elementwise).  Backward is analytic (no autograd
on tiles): it recomputes ``C`` per tile and does two more stacked GEMMs (``dA`` and ``E = Wᵀ A``, see
``volume_backward``), so a forward+backward is 4(k−1) GEMMs of ``N1·N2·D`` and O(tile) extra memory; only the
O(N2·p²) cofactor polynomials of ``M_j`` go through autograd, once.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from .._tiling import accumulation_dtype, budget_bytes, upcast  # noqa: F401

DEFAULT_TILE_BYTES = 48 * 2**20
MAX_OTHERS = 4  # k ≤ 5: cofactor expansion grows as p!


def autograd_on():
    """A guard that lets autograd record again where the engines run: inside a custom op's kernel.

    Kernels run below the Autograd dispatch key (autograd keys in the thread-local excluded set), but the
    backward sweeps differentiate the small per-sample adjugate polynomials (``per_sample``, O(N2·p²·D))
    with ``torch.autograd.grad``: this takes the autograd keys out of the excluded set until exit (then
    restored); ``torch.enable_grad()`` is still needed beside it.  Harmless outside an op.
    """
    keys = torch._C.DispatchKey
    exclude = torch._C._dispatch_tls_local_exclude_set()
    for key in (keys.AutogradFunctionality, keys.AutogradOther, keys.AutogradNestedTensor, keys.ADInplaceOrView):
        exclude = exclude.remove(key)
    return torch._C._ForceDispatchKeyGuard(torch._C._dispatch_tls_local_include_set(), exclude)


def _tile_size(n1: int, n2: int, p: int, itemsize: int) -> tuple[int, int]:
    """``bi × bj`` so that ~(3p + 8) tile-sized buffers (C, W, the loss's softmax temporaries) fit the budget."""
    per_pair = (3 * p + 8) * itemsize
    side = max(1, int(math.sqrt(budget_bytes(DEFAULT_TILE_BYTES) / per_pair)))
    bi = _even(n1, side)
    bj = _even(n2, max(1, budget_bytes(DEFAULT_TILE_BYTES) // (per_pair * bi)))
    return bi, bj


def _even(n: int, most: int) -> int:
    """The tile length ≤ ``most`` that splits ``n`` into equal (±1) tiles: no thin remainder tile."""
    return -(-n // -(-n // max(1, most)))


def _det_rows(rows: list) -> torch.Tensor:
    """Determinant of a small matrix given as nested lists of equally shaped tensors (Laplace expansion)."""
    n = len(rows)
    if n == 1:
        return rows[0][0]
    if n == 2:
        return rows[0][0] * rows[1][1] - rows[0][1] * rows[1][0]
    out = None
    for c in range(n):
        minor = [[r[cc] for cc in range(n) if cc != c] for r in rows[1:]]
        term = rows[0][c] * _det_rows(minor)
        out = term if out is None else (out + term if c % 2 == 0 else out - term)
    return out


def per_sample(xs: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """``adj(M_j)`` ``[N2, p, p]`` and ``det(M_j)`` ``[N2]`` of ``M_j = X_j X_jᵀ``, as polynomials (autograd-able)."""
    p = len(xs)
    xst = torch.stack(xs, 1)  # [N2, p, D]
    mm = torch.bmm(xst, xst.transpose(1, 2))  # M_j, [N2, p, p]
    m = [[mm[:, r, c] for c in range(p)] for r in range(p)]
    if p == 1:
        adj = torch.ones_like(m[0][0])[:, None, None]
        return adj, m[0][0]
    cof = [[None] * p for _ in range(p)]
    for r in range(p):
        for c in range(r, p):  # M symmetric ⇒ cofactor matrix symmetric
            minor = [[m[rr][cc] for cc in range(p) if cc != c] for rr in range(p) if rr != r]
            v = _det_rows(minor)
            cof[r][c] = cof[c][r] = v if (r + c) % 2 == 0 else -v
    det = sum(m[0][c] * cof[0][c] for c in range(p))
    adj = torch.stack([torch.stack(row, -1) for row in cof], -2)  # symmetric: adj = cofᵀ = cof
    return adj, det


def _tile(a, asq, xcat, adj, det, p: int):
    """``g = det G`` of one tile, no autograd, in place where possible.

    ``xcat [p·bj, D]`` stacks the tile's p other modalities, so ``C = a xcatᵀ`` is one GEMM and
    ``c_r = C[:, r·bj:(r+1)·bj]``; ``g = |a|² det M − Σ_r c_r ∘ (adj_rr c_r + 2 Σ_{s>r} adj_rs c_s)``.
    """
    bj = xcat.shape[0] // p
    cc = a @ xcat.T  # [bi, p·bj]
    c = [cc[:, r * bj : (r + 1) * bj] for r in range(p)]
    g = torch.outer(asq, det)  # |a_i|² det M_j
    for r in range(p):
        hr = c[r] * adj[:, r, r]
        for s in range(r + 1, p):
            hr.addcmul_(c[s], adj[:, r, s], value=2.0)
        g.addcmul_(c[r], hr, value=-1.0)
    return g


def _sqrt_abs(g: torch.Tensor, eps: float) -> torch.Tensor:
    v = g.abs()
    if eps:
        v.add_(eps)
    return v.sqrt_()


def aligned_volume(a: torch.Tensor, xs: list[torch.Tensor], eps: float) -> torch.Tensor:
    """``V_ii`` ``[N]`` (same formula, row-wise dot products instead of GEMMs); plain autograd, O(N·p²)."""
    adj, det = per_sample(xs)
    p = len(xs)
    c = [(a * x).sum(-1) for x in xs]
    q = sum(adj[:, r, s] * c[r] * c[s] for r in range(p) for s in range(p))
    g = (a * a).sum(-1) * det - q
    return torch.sqrt(g.abs() + eps) if eps else torch.sqrt(g.abs())


def _tiles(n1: int, n2: int, p: int, itemsize: int):
    bi, bj = _tile_size(n1, n2, p, itemsize)
    for j0 in range(0, n2, bj):  # j outer: the stacked tile of the other modalities is built once per j tile
        for i0 in range(0, n1, bi):
            yield i0, min(n1, i0 + bi), j0, min(n2, j0 + bj)


def signed_det(a: torch.Tensor, xs: list[torch.Tensor]) -> torch.Tensor:
    """``det G [N1, N2]`` (signed: roundoff can make it slightly negative) without autograd, tile by tile;
    inputs already in the accumulation dtype.  ``V = sqrt(|det G| + eps)``."""
    p = len(xs)
    with torch.no_grad():
        adj, det = per_sample(xs)
        asq = (a * a).sum(-1)
        out = torch.empty(a.shape[0], xs[0].shape[0], dtype=a.dtype, device=a.device)
        xcat, jcur = None, None
        for i0, i1, j0, j1 in _tiles(a.shape[0], xs[0].shape[0], p, a.element_size()):
            if j0 != jcur:
                xcat, jcur = torch.cat([x[j0:j1] for x in xs]), j0
            out[i0:i1, j0:j1] = _tile(a[i0:i1], asq[i0:i1], xcat, adj[j0:j1], det[j0:j1], p)
    return out



def volume_backward(
    a: torch.Tensor,
    xs: list[torch.Tensor],
    g: torch.Tensor,
    eps: float,
    dv: Callable[[int, int, int, int], tuple[torch.Tensor, torch.Tensor | None]],
    need_a: bool = True,
    need_x: bool = True,
) -> tuple[torch.Tensor | None, list[torch.Tensor] | None]:
    """Gradients of ``Σ dV_a∘V`` w.r.t. ``a`` and of ``Σ dV_x∘V`` w.r.t. ``xs``, tile by tile, given the
    forward's ``g = det G [N1, N2]``.

    ``dv(i0, i1, j0, j1, V_tile)`` returns the tile's incoming gradient ``(dV_a, dV_x)``; ``dV_x=None`` means the same
    tensor routes to both (the usual case; separate ones implement ``stopgrad_gathered``).

    With ``dg = dV·sign(g)/(2V)``, ``W^s = dg ∘ c^s``, ``Y^s_j = Σ_r adj_j[s, r] x^r_j`` (per sample):

    * ``da_i = 2a_i Σ_j dg_ij det_j − 2 Σ_s (W^s Y^s)_i``            (one GEMM over the stacked modalities)
    * ``E^s_j = Σ_i W^s_ij a_i``                                    (one GEMM, accumulated over all i), then
      ``dX^r_j = −2 Σ_s adj_j[r, s] E^s_j``, ``d adj_j[r, s] = −<x^s_j, E^r_j>``, ``d det_j = Σ_i dg_ij |a_i|²``,
      and the last two through the O(N2) cofactor graph of ``M_j`` into ``X``.
    """
    p = len(xs)
    n2 = xs[0].shape[0]
    with torch.no_grad():
        adj, det = per_sample(xs)
        asq = (a * a).sum(-1)
        ga = torch.zeros_like(a) if need_a else None
        ecat = torch.zeros(p, n2, a.shape[1], dtype=a.dtype, device=a.device) if need_x else None
        gdet = torch.zeros_like(det) if need_x else None
        xst = torch.stack(xs, 1)  # [N2, p, D]
        jcur = None
        for i0, i1, j0, j1 in _tiles(a.shape[0], n2, p, a.element_size()):
            bj = j1 - j0
            a_t = a[i0:i1]
            if j0 != jcur:  # [p·bj, D] stacks, once per j tile
                jcur, adj_t = j0, adj[j0:j1]
                xcat = torch.cat([x[j0:j1] for x in xs])
                if need_a:  # Y^s_j = Σ_r adj_j[s, r] x^r_j, stacked like xcat
                    ycat = torch.bmm(adj_t, xst[j0:j1]).transpose(0, 1).reshape(p * (j1 - j0), -1)
            gt = g[i0:i1, j0:j1]
            vt = _sqrt_abs(gt, eps)
            dv_a, dv_x = dv(i0, i1, j0, j1, vt)
            k = torch.sign(gt).div_(vt).mul_(0.5)  # dg = dV · k
            del vt
            cc = a_t @ xcat.T  # [bi, p·bj]
            routes = ((dv_a, need_a, need_x),) if dv_x is None else ((dv_a, need_a, False), (dv_x, False, need_x))
            for dvt, do_a, do_x in routes:
                if not (do_a or do_x):
                    continue
                dg = dvt * k
                w = (cc.view(i1 - i0, p, bj) * dg[:, None, :]).view(i1 - i0, p * bj)
                if do_a:
                    ga[i0:i1].addcmul_(a_t, (dg @ det[j0:j1])[:, None], value=2.0)
                    ga[i0:i1].addmm_(w, ycat, alpha=-2.0)
                if do_x:
                    ecat[:, j0:j1] += (w.T @ a_t).view(p, bj, -1)
                    gdet[j0:j1] += asq[i0:i1] @ dg
        if not need_x:
            return ga, None
        et = ecat.transpose(0, 1)  # [N2, p, D]
        gxt = torch.bmm(adj, et).mul_(-2.0)  # dX^r_j = −2 Σ_s adj_j[r, s] E^s_j
        gx = [gxt[:, r] for r in range(p)]
        gadj = torch.bmm(et, xst.transpose(1, 2)).neg_()  # d adj_j[r, s] = −<E^r_j, x^s_j>
    with autograd_on(), torch.enable_grad():  # through adj(M_j), det(M_j) into X, once
        xl = [x.detach().requires_grad_() for x in xs]
        adj2, det2 = per_sample(xl)
        outs, grads = [det2], [gdet]
        if adj2.requires_grad:
            outs.append(adj2)
            grads.append(gadj)
        extra = torch.autograd.grad(outs, xl, grads)
    return ga, [gx[m] + extra[m] for m in range(p)]


# ------------------------------------------------------------------------------------ the engine's sweeps
# (xloss.gram.engine.GramEngine; the custom ops of ops.py call these with the inputs as the user gave them)


def _up(anchor: torch.Tensor, others) -> tuple[torch.Tensor, list[torch.Tensor]]:
    return upcast(anchor), [upcast(x) for x in others]


def volume(anchor: torch.Tensor, others: list[torch.Tensor], eps: float):
    """``(V [N1, N2], det G [N1, N2])`` in the accumulation dtype: the signed det is kept for ``volume_grad``."""
    a, xs = _up(anchor, others)
    g = signed_det(a, xs)
    return _sqrt_abs(g.clone(), eps), g


def volume_grad(anchor, others, eps: float, det, grad_v, need_a: bool, need_x: bool):
    """Gradients of ``Σ grad_v∘V`` w.r.t. ``anchor`` and ``others`` (accumulation dtype; None where not needed)."""
    a, xs = _up(anchor, others)
    g = grad_v.to(a.dtype)
    return volume_backward(a, xs, det, eps, lambda i0, i1, j0, j1, vt: (g[i0:i1, j0:j1], None), need_a, need_x)


def _stats(g: torch.Tensor, s: torch.Tensor, eps: float):
    """From ``det G``: row and column log-sum-exp of ``Z = −s·V``, and the row and column means of ``V``, in
    row strips of a budgeted size (``V`` is never whole)."""
    n1, n2 = g.shape
    rows = max(1, min(n1, budget_bytes(DEFAULT_TILE_BYTES) // max(1, 2 * n2 * g.element_size())))
    lse_r = torch.empty(n1, dtype=g.dtype, device=g.device)
    mean_r = torch.empty(n1, dtype=g.dtype, device=g.device)
    lse_c = torch.full((n2,), float("-inf"), dtype=g.dtype, device=g.device)
    sum_c = torch.zeros(n2, dtype=g.dtype, device=g.device)
    for i0 in range(0, n1, rows):
        v = _sqrt_abs(g[i0 : i0 + rows], eps)
        mean_r[i0 : i0 + rows] = v.mean(1)
        sum_c += v.sum(0)
        z = v.mul_(-s)
        lse_r[i0 : i0 + rows] = torch.logsumexp(z, 1)
        lse_c = torch.logaddexp(lse_c, torch.logsumexp(z, 0))
    return lse_r, lse_c, mean_r, sum_c / n1


def loss_stats(anchor, others, scale, labels, eps: float):
    """One sweep over the ``N1 × N2`` pairs of ``Z = −s·V`` (``s = scale``, 0-dim).

    Returns ``(lse_r [N1], lse_c [N2], mean_r [N1], mean_c [N2], v_pos [N1], det G [N1, N2])`` in the
    accumulation dtype: row/column LSE of ``Z``, row/column means of ``V``, ``V[i, labels[i]]``.
    """
    a, xs = _up(anchor, others)
    g = signed_det(a, xs)
    s = scale.detach().to(a.dtype)
    lse_r, lse_c, mean_r, mean_c = _stats(g, s, eps)
    v_pos = _sqrt_abs(g[torch.arange(g.shape[0], device=g.device), labels], eps)
    return lse_r, lse_c, mean_r, mean_c, v_pos, g


def loss_grad(anchor, others, scale, det, lse_r, lse_c, w_r, w_c, labels, label_smoothing: float,
              stopgrad: bool, eps: float, need_a: bool, need_x: bool, need_s: bool):
    """Gradients of ``Σ_i w_r[i]·row_i + Σ_i w_r[i]·col_i`` (row_i, col_i the two cross-entropies of anchor i,
    ``w_c[j] = Σ_{i: labels[i] = j} w_r[i]``) through the tiles of ``V``, given the forward's ``det G``.

    ``dZ = w_r[i](softmax_row − ε/N2) + w_c[j](softmax_col − ε/N1) − 2(1−ε)w_r[i][j = labels[i]]`` and
    ``dV = −s·dZ`` (with ``stopgrad``: the row part to the anchor only, the column part to the others only).
    Returns ``(ga | None, [gx] | None, ds | None)`` in the accumulation dtype, ``ds = d/ds = −Σ dZ∘V``.
    """
    a, xs = _up(anchor, others)
    acc = det.dtype
    n1, n2 = det.shape
    ls = float(label_smoothing)
    s = scale.detach().to(acc)
    ds = torch.zeros((), dtype=acc, device=det.device)
    wr, wc = w_r[:, None], w_c[None, :]
    pos_w = (1 - ls) * w_r  # the positive entry (i, labels[i]) of row i's and of column labels[i]'s softmax

    def dv(i0, i1, j0, j1, vt):
        nonlocal ds
        z = vt * (-s)
        pr = torch.sub(z, lse_r[i0:i1, None]).exp_().mul_(wr[i0:i1])  # w_i · softmax over row i
        pc = z.sub_(lse_c[None, j0:j1]).exp_().mul_(wc[:, j0:j1])  # w_j · softmax over column j
        if ls:
            pr.sub_(wr[i0:i1], alpha=ls / n2)
            pc.sub_(wc[:, j0:j1], alpha=ls / n1)
        # the positives inside this tile: rows whose label falls in [j0, j1) (others subtract an exact 0)
        col = labels[i0:i1] - j0
        hit = (col >= 0) & (col < j1 - j0)
        rows = torch.arange(i1 - i0, device=det.device)
        col = col.clamp(0, j1 - j0 - 1)
        corr = torch.where(hit, pos_w[i0:i1], torch.zeros((), dtype=acc, device=det.device))
        pr[rows, col] -= corr
        pc[rows, col] -= corr
        if stopgrad:
            ds = ds - (pr * vt).sum() - (pc * vt).sum()
            return pr.mul_(-s), pc.mul_(-s)
        dz = pr.add_(pc)
        ds = ds - torch.dot(dz.reshape(-1), vt.reshape(-1))
        return dz.mul_(-s), None

    ga, gx = None, None
    if need_a or need_x:
        ga, gx = volume_backward(a, xs, det, eps, dv, need_a, need_x)
    elif need_s:
        for i0, i1, j0, j1 in _tiles(n1, n2, len(xs), det.element_size()):
            dv(i0, i1, j0, j1, _sqrt_abs(det[i0:i1, j0:j1], eps))
    return (ga if need_a else None), (gx if need_x else None), (ds if need_s else None)
