"""The chunked PyTorch engine of Symile ``negative_sampling="n_squared"`` (SPEC.md §5): any device, dtype and M.

It implements :class:`xloss.symile.engine.SymileEngine` (``lse`` and ``grad``), in the accumulation dtype
(inputs upcast: fp32 for half inputs, fp64 for fp64).

All ``M`` anchors share one score tensor ``T[i_0, i_1, …, i_{M-1}] = MIP(X⁰_{i_0}, …, X^{M-1}_{i_{M-1}})``:
anchor ``a``'s log-sum-exp is the LSE of ``s·T`` over every axis but ``a``.  The sweep walks the tuples
``t = (i_2, …, i_{M-1})`` of the modalities after the first two (last modality fastest) in blocks of ``B``;
for a block, ``V_t = Π_{k≥2} X^k_{i_k}`` (``[B, D]``), ``P = X¹ ∘ V`` (``[B, N, D]``) and one GEMM gives the
slab ``S = s·X⁰ Pᵀ`` viewed as ``[N (i_0), B (t), N (i_1)]``.  From each slab:

* anchor 0: online (max, Σexp) per ``i_0``;  anchor 1: online per ``i_1``;
* anchors ``k ≥ 2``: the LSE of each tuple's ``[N, N]`` slice, merged online per ``i_k`` (scatter).

Backward recomputes the slabs and, with ``g^a`` the gradient of anchor ``a``'s LSE vector,
``G = Σ_a g^a·softmax^a`` (a slab), then ``dX⁰ = s·G P``, ``Q = Gᵀ X⁰`` (``[B, N, D]``),
``dX¹ = s·Σ_t Q_t ∘ V_t``, ``dV_t = s·Σ_j Q_tj ∘ X¹_j`` scattered to the rows of ``X^k`` that make ``V_t``,
and ``ds = Σ_i <X⁰_i, (G P)_i>``.  Working memory: O(N·D) plus one block (``B·N·(3N + 2D)`` numbers).
"""

from __future__ import annotations

import torch

from .. import _tiling

DEFAULT_BUDGET = 48 * 2**20  # bytes of working set per block (slab + products)


def block_size(n: int, d: int, itemsize: int, n_tuples: int) -> int:
    """Tuples per block so that a block's slab and products fit the budget (at least 1)."""
    per_tuple = n * (3 * n + 2 * d) * itemsize
    return max(1, min(n_tuples, _tiling.budget_bytes(DEFAULT_BUDGET) // per_tuple))


def _tuple_indices(t0: int, t1: int, n: int, count: int, device) -> list[torch.Tensor]:
    """Row indices ``i_2 … i_{M-1}`` (``count`` = M-2 of them) of the flat tuples ``t0 … t1-1``."""
    flat = torch.arange(t0, t1, device=device)
    out = []
    for k in range(count):
        out.append((flat // n ** (count - 1 - k)) % n)
    return out


def _block(xs, idx):
    """``V [B, D]`` and ``P [B, N, D]`` for the tuples whose rows are ``idx``."""
    v = xs[2][idx[0]]
    for x, i in zip(xs[3:], idx[1:]):
        v = v * x[i]
    return v, xs[1][None] * v[:, None]


def lse(xs: list[torch.Tensor], s: torch.Tensor) -> torch.Tensor:
    """Per-anchor log-sum-exp of ``s·T``: ``[M, N]`` (accumulation dtype)."""
    xs = [_tiling.upcast(x) for x in xs]
    s = s.detach().to(xs[0].dtype)
    m = len(xs)
    n, d = xs[0].shape
    dt, dev = xs[0].dtype, xs[0].device
    n_tuples = n ** (m - 2)
    bsz = block_size(n, d, xs[0].element_size(), n_tuples)
    mx = torch.full((m, n), -torch.inf, dtype=dt, device=dev)
    sm = torch.zeros((m, n), dtype=dt, device=dev)
    for t0 in range(0, n_tuples, bsz):
        t1 = min(n_tuples, t0 + bsz)
        b = t1 - t0
        idx = _tuple_indices(t0, t1, n, m - 2, dev)
        _, p = _block(xs, idx)
        sl = torch.mm(xs[0], p.reshape(b * n, d).T).view(n, b, n)
        sl.mul_(s)
        # anchor 0 (rows i_0) and anchor 1 (i_1): online max / sum
        for a, dims, shape in ((0, (1, 2), (n, 1, 1)), (1, (0, 1), (1, 1, n))):
            new = torch.maximum(mx[a], sl.amax(dims))
            sm[a] = sm[a] * torch.exp(mx[a] - new) + torch.exp(sl - new.view(shape)).sum(dims)
            mx[a] = new
        # anchors k >= 2: LSE of each tuple's [N, N] slice, merged per row index i_k
        r = torch.logsumexp(sl, dim=(0, 2))  # [B]
        for k in range(2, m):
            i = idx[k - 2]
            new = mx[k].scatter_reduce(0, i, r, reduce="amax", include_self=True)
            alpha = torch.exp(mx[k] - new).nan_to_num(0.0)  # -inf - -inf: untouched rows (sum is 0 there)
            sm[k] = sm[k] * alpha + torch.zeros_like(sm[k]).index_add_(0, i, torch.exp(r - new[i]))
            mx[k] = new
    return mx + torch.log(sm)


def grad(xs: list[torch.Tensor], s: torch.Tensor, lse_: torch.Tensor, g: torch.Tensor, need_scale: bool):
    """Gradients of ``Σ_a <g^a, LSE^a>``: ``([dX⁰ … dX^{M-1}], ds or None)``, in the accumulation dtype."""
    xs = [_tiling.upcast(x) for x in xs]
    s = s.detach().to(xs[0].dtype)
    m = len(xs)
    n, d = xs[0].shape
    dev = xs[0].device
    n_tuples = n ** (m - 2)
    bsz = block_size(n, d, xs[0].element_size(), n_tuples)
    dxs = [torch.zeros_like(x) for x in xs]
    ds = torch.zeros((), dtype=xs[0].dtype, device=dev)
    g0, l0 = g[0].view(n, 1, 1), lse_[0].view(n, 1, 1)
    g1, l1 = g[1].view(1, 1, n), lse_[1].view(1, 1, n)
    for t0 in range(0, n_tuples, bsz):
        t1 = min(n_tuples, t0 + bsz)
        b = t1 - t0
        idx = _tuple_indices(t0, t1, n, m - 2, dev)
        v, p = _block(xs, idx)
        pf = p.reshape(b * n, d)
        sl = torch.mm(xs[0], pf.T).view(n, b, n)
        sl.mul_(s)
        big = torch.exp(sl - l0).mul_(g0)
        big += torch.exp(sl - l1).mul_(g1)
        # anchors k >= 2 share exp(S - R_t), R_t the tuple's max: weight Σ_k g^k_{i_k} exp(R_t - LSE^k_{i_k})
        rt = sl.amax(dim=(0, 2))  # [B]
        w = torch.zeros_like(rt)
        for k in range(2, m):
            i = idx[k - 2]
            w += g[k][i] * torch.exp(rt - lse_[k][i])
        sl.sub_(rt.view(1, b, 1)).exp_().mul_(w.view(1, b, 1))
        big += sl
        gm = big.view(n, b * n)
        u = torch.mm(gm, pf)  # Σ_{j,t} G_ijt P_jt: [N, D]
        dxs[0] += u
        if need_scale:
            ds += (xs[0] * u).sum()
        q = torch.mm(gm.T, xs[0]).view(b, n, d)  # Q_tj = Σ_i G_ijt X⁰_i
        dxs[1] += (q * v[:, None]).sum(0)
        dv = (q * xs[1][None]).sum(1)  # [B, D]
        for k in range(2, m):
            part = dv
            for kk in range(2, m):
                if kk != k:
                    part = part * xs[kk][idx[kk - 2]]
            dxs[k].index_add_(0, idx[k - 2], part)
    dxs = [dx.mul_(s) for dx in dxs]
    return dxs, (ds if need_scale else None)


__all__ = ["DEFAULT_BUDGET", "block_size", "grad", "lse"]
