"""The Triton path of Symile ``negative_sampling="n_squared"``: the two sweeps of ``chunked.py`` as fused kernels.

Same two primitives, same meaning as ``chunked.py`` (:class:`xloss.symile.engine.SymileEngine`;
``SymileFunction`` in ``__init__`` does the rest):

* ``lse(xs, s)``: ``[M, N]``, anchor ``a``'s log-sum-exp of ``s·MIP`` over every tuple of the other
  modalities' rows.  MIP is symmetric in its arguments, so anchor ``a``'s statistic is one kernel,
  ``_lse_kernel``, run with modality ``a`` as the "row" modality R and the others, in order, as B, C (and E
  for M = 4): ``LSE_i = log Σ_{j,l(,m)} exp(s·<r_i, b_j∘c_l(∘e_m)>)``.  A program owns ``BLOCK_I`` rows and
  one ``BLOCK_J`` block of B (grid axis 1, for parallelism) and walks all ``(l, m)`` blocks: it forms the
  products ``Q = b_j∘c_l(∘e_m)`` of the tile on the fly in registers (``[BLOCK_J·BLOCK_L(·BLOCK_E), BLOCK_D]``,
  fp32), one ``tl.dot`` per D chunk gives the score tile ``r_i·Qᵀ``, and an online (max, Σ exp) runs along
  the tile's columns.  Each program writes its own row of partial buffers ``[j_blocks, N]`` (no races, no
  atomics), merged exactly in PyTorch.  Nothing of size ``N^{M-1}`` is ever stored.
* ``grad(xs, s, lse, g, need_scale)``: gradients of ``Σ_a <g^a, LSE^a>``.  With every anchor's softmax on the
  same score tensor, ``G[i_0, …, i_{M-1}] = Σ_a g^a_{i_a}·exp(s·T − LSE^a_{i_a})`` and
  ``dX^o_i = s·Σ_{tuples with i_o = i} G·Π_{m≠o} X^m``.  ``_grad_kernel`` computes that for one "owner"
  modality o (run as R, the others as B, C, E): a program owns ``BLOCK_I`` rows of o, recomputes each score
  tile, forms ``G`` in registers from the M (lse, g) vectors indexed by the tile's row and column indices,
  and accumulates ``G·Q`` (``tl.dot``) into its own rows of ``dX^o``.  ``ds = Σ_i <X⁰_i, dX⁰_i>/s``.
  Every output row has one owner: deterministic without atomics.

Cost: the chunked engine gets every anchor's LSE from one sweep (column/scatter statistics); here anchor a is its
own sweep and each modality's gradient its own recomputing sweep, i.e. ``M`` forward sweeps of
``2·N^M·D`` FLOPs and ``M`` backward sweeps of ``4·N^M·D``, in exchange for race-free, atomic-free kernels.
M ≥ 5 is not supported here (ValueError; ``backend="auto"`` keeps the chunked engine for it).

Precision: inputs are loaded in their dtype (fp32/fp16/bf16) and upcast; the products, scores, statistics and
gradients are fp32.  The dots are IEEE fp32 for fp32 inputs when ``torch.get_float32_matmul_precision() ==
"highest"`` and TF32 otherwise (half inputs).  float64 raises ``UnsupportedDtypeError`` (a TypeError and a
RuntimeError; use the chunked engine).  Tile sizes are untuned guesses for GPUs; no autotuning.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

# ----------------------------------------------------------------------------------------------- constants

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
# The interpreter uses small tiles (fast numpy steps; tiny test shapes still span several tiles), except when
# XLOSS_TRITON_GPU_TILES=1 asks for the GPU's: tools/check_triton_compiles.py --report records those variants.
_SMALL_TILES = _INTERPRET and os.environ.get("XLOSS_TRITON_GPU_TILES", "0") in ("", "0")

# (M, dot precision) -> (BLOCK_I, BLOCK_J, BLOCK_L, BLOCK_E, BLOCK_D, num_warps): the tile has
# BLOCK_J·BLOCK_L·BLOCK_E columns.  GPU sizes: the largest that compile for sm_90 without register spills
# (checked with cuobjdump --dump-resource-usage; "ieee" fp32 dots run on FMA units and need more registers, and
# still spill 24 bytes); not timed on a GPU yet.
if _SMALL_TILES:  # small tiles: fast numpy steps, and tiny test shapes still span several blocks
    CONFIGS = {(3, "tf32"): (16, 8, 8, 1, 16, 4), (4, "tf32"): (16, 4, 4, 4, 16, 4)}
    CONFIGS.update({(m, "ieee"): cfg for (m, _), cfg in list(CONFIGS.items())})
else:
    CONFIGS = {(3, "tf32"): (64, 8, 16, 1, 32, 8), (3, "ieee"): (64, 8, 8, 1, 32, 8),
               (4, "tf32"): (64, 4, 4, 4, 32, 8), (4, "ieee"): (32, 4, 4, 4, 32, 4)}
MODALITIES = (3, 4)

_LOG2E = tl.constexpr(1.4426950408889634)

# ------------------------------------------------------------------------------------------------- kernels


@triton.jit
def _products(b_ptr, c_ptr, e_ptr, rj, rl, re, j_ok, l_ok, e_ok, offs_d, d_ok,
              HAS_E: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_E: tl.constexpr,
              BLOCK_D: tl.constexpr):
    """``Q[(j, l, m), d] = b_jd·c_ld(·e_md)`` for one D chunk, fp32 ``[BLOCK_J·BLOCK_L·BLOCK_E, BLOCK_D]``
    (columns j-major, then l, then m); ``rj``/``rl``/``re`` are row offsets (index·D)."""
    b = tl.load(b_ptr + rj[:, None] + offs_d[None, :], mask=j_ok[:, None] & d_ok[None, :], other=0.0)
    c = tl.load(c_ptr + rl[:, None] + offs_d[None, :], mask=l_ok[:, None] & d_ok[None, :], other=0.0)
    b = b.to(tl.float32)
    c = c.to(tl.float32)
    # one return statement: compiled Triton type-checks every return, even past a constexpr branch
    if HAS_E:
        e = tl.load(e_ptr + re[:, None] + offs_d[None, :], mask=e_ok[:, None] & d_ok[None, :], other=0.0)
        q = tl.reshape(b[:, None, None, :] * c[None, :, None, :] * e.to(tl.float32)[None, None, :, :],
                       [BLOCK_J * BLOCK_L * BLOCK_E, BLOCK_D])
    else:  # BLOCK_E == 1
        q = tl.reshape(b[:, None, :] * c[None, :, :], [BLOCK_J * BLOCK_L * BLOCK_E, BLOCK_D])
    return q


@triton.jit
def _cols(vj, vl, ve, HAS_E: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_L: tl.constexpr,
          BLOCK_E: tl.constexpr, WHICH: tl.constexpr):
    """Broadcast a per-index vector of B (``WHICH`` 0), C (1) or E (2) to the tile's ``[BLOCK_J·BLOCK_L·BLOCK_E]``
    columns, in the column order of ``_products``."""
    if HAS_E:
        if WHICH == 0:
            t = tl.reshape(tl.broadcast_to(vj[:, None, None], [BLOCK_J, BLOCK_L, BLOCK_E]),
                           [BLOCK_J * BLOCK_L * BLOCK_E])
        elif WHICH == 1:
            t = tl.reshape(tl.broadcast_to(vl[None, :, None], [BLOCK_J, BLOCK_L, BLOCK_E]),
                           [BLOCK_J * BLOCK_L * BLOCK_E])
        else:
            t = tl.reshape(tl.broadcast_to(ve[None, None, :], [BLOCK_J, BLOCK_L, BLOCK_E]),
                           [BLOCK_J * BLOCK_L * BLOCK_E])
    else:  # BLOCK_E == 1
        if WHICH == 0:
            t = tl.reshape(tl.broadcast_to(vj[:, None], [BLOCK_J, BLOCK_L]), [BLOCK_J * BLOCK_L * BLOCK_E])
        else:
            t = tl.reshape(tl.broadcast_to(vl[None, :], [BLOCK_J, BLOCK_L]), [BLOCK_J * BLOCK_L * BLOCK_E])
    return t


@triton.jit
def _scores(r_ptr, b_ptr, c_ptr, e_ptr, ri, rj, rl, re, i_ok, j_ok, l_ok, e_ok, D,
            HAS_E: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_L: tl.constexpr,
            BLOCK_E: tl.constexpr, BLOCK_D: tl.constexpr, PREC: tl.constexpr):
    """``<r_i, b_j∘c_l(∘e_m)>`` for one tile: fp32 ``[BLOCK_I, BLOCK_J·BLOCK_L·BLOCK_E]``, D in chunks."""
    acc = tl.zeros([BLOCK_I, BLOCK_J * BLOCK_L * BLOCK_E], dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        d_ok = offs_d < D
        r = tl.load(r_ptr + ri[:, None] + offs_d[None, :], mask=i_ok[:, None] & d_ok[None, :], other=0.0)
        q = _products(b_ptr, c_ptr, e_ptr, rj, rl, re, j_ok, l_ok, e_ok, offs_d, d_ok,
                      HAS_E, BLOCK_J, BLOCK_L, BLOCK_E, BLOCK_D)
        acc += tl.dot(r.to(tl.float32), tl.trans(q), input_precision=PREC)
    return acc


@triton.jit
def _lse_kernel(
    r_ptr, b_ptr, c_ptr, e_ptr,  # [N, D] each (row stride D): the anchor R and the others B, C (E: M = 4)
    scale_ptr,  # [] fp32
    pmax_ptr, psum_ptr,  # [j_blocks, N] fp32 out: per (row, B block) max of s·score and Σ exp(s·score − max)
    N, D, N_L, N_E,  # N_L, N_E: number of C and E blocks (N_E = 1 for M = 3)
    HAS_E: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_L: tl.constexpr,
    BLOCK_E: tl.constexpr, BLOCK_D: tl.constexpr, PREC: tl.constexpr,
):
    pid_j = tl.program_id(1).to(tl.int64)
    offs_i = tl.program_id(0).to(tl.int64) * BLOCK_I + tl.arange(0, BLOCK_I)
    offs_j = pid_j * BLOCK_J + tl.arange(0, BLOCK_J)
    i_ok, j_ok = offs_i < N, offs_j < N
    s = tl.load(scale_ptr)
    m_r = tl.full([BLOCK_I], float("-inf"), dtype=tl.float32)
    l_r = tl.zeros([BLOCK_I], dtype=tl.float32)
    for t in range(N_L * N_E):
        offs_l = (t // N_E) * BLOCK_L + tl.arange(0, BLOCK_L).to(tl.int64)
        offs_e = (t % N_E) * BLOCK_E + tl.arange(0, BLOCK_E).to(tl.int64)
        l_ok, e_ok = offs_l < N, offs_e < N
        sc = _scores(r_ptr, b_ptr, c_ptr, e_ptr, offs_i * D, offs_j * D, offs_l * D, offs_e * D,
                     i_ok, j_ok, l_ok, e_ok, D, HAS_E, BLOCK_I, BLOCK_J, BLOCK_L, BLOCK_E, BLOCK_D, PREC)
        col_ok = _cols(j_ok, l_ok, e_ok, HAS_E, BLOCK_J, BLOCK_L, BLOCK_E, 0) \
            & _cols(j_ok, l_ok, e_ok, HAS_E, BLOCK_J, BLOCK_L, BLOCK_E, 1)
        if HAS_E:
            col_ok = col_ok & _cols(j_ok, l_ok, e_ok, HAS_E, BLOCK_J, BLOCK_L, BLOCK_E, 2)
        z = tl.where(i_ok[:, None] & col_ok[None, :], sc * s, float("-inf"))
        m_new = tl.maximum(m_r, tl.max(z, 1))
        m_sub = tl.where(m_new == float("-inf"), 0.0, m_new)  # a masked row (i ≥ N) stays at −inf / 0
        l_r = l_r * tl.exp2((m_r - m_sub) * _LOG2E) + tl.sum(tl.exp2((z - m_sub[:, None]) * _LOG2E), 1)
        m_r = m_new
    tl.store(pmax_ptr + pid_j * N + offs_i, m_r, mask=i_ok)
    tl.store(psum_ptr + pid_j * N + offs_i, l_r, mask=i_ok)


@triton.jit
def _grad_kernel(
    r_ptr, b_ptr, c_ptr, e_ptr,  # as _lse_kernel; R is the owner modality of this launch
    scale_ptr,
    lse_ptr, g_ptr,  # [M, N] fp32: LSE and its incoming gradient of each modality, in role order R, B, C(, E)
    dr_ptr,  # [N, D] fp32 out (zeros in): Σ_{tuples} G·Q (unscaled), this program's rows only
    N, D, N_L, N_E,
    HAS_E: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_L: tl.constexpr,
    BLOCK_E: tl.constexpr, BLOCK_D: tl.constexpr, PREC: tl.constexpr,
):
    offs_i = tl.program_id(0).to(tl.int64) * BLOCK_I + tl.arange(0, BLOCK_I)
    i_ok = offs_i < N
    s = tl.load(scale_ptr)
    lse_r = tl.load(lse_ptr + offs_i, mask=i_ok, other=0.0)
    g_r = tl.load(g_ptr + offs_i, mask=i_ok, other=0.0)
    for j0 in range(0, N, BLOCK_J):
        offs_j = j0 + tl.arange(0, BLOCK_J).to(tl.int64)
        j_ok = offs_j < N
        lse_j = tl.load(lse_ptr + N + offs_j, mask=j_ok, other=0.0)
        g_j = tl.load(g_ptr + N + offs_j, mask=j_ok, other=0.0)
        for t in range(N_L * N_E):
            offs_l = (t // N_E) * BLOCK_L + tl.arange(0, BLOCK_L).to(tl.int64)
            offs_e = (t % N_E) * BLOCK_E + tl.arange(0, BLOCK_E).to(tl.int64)
            l_ok, e_ok = offs_l < N, offs_e < N
            sc = _scores(r_ptr, b_ptr, c_ptr, e_ptr, offs_i * D, offs_j * D, offs_l * D, offs_e * D,
                         i_ok, j_ok, l_ok, e_ok, D, HAS_E, BLOCK_I, BLOCK_J, BLOCK_L, BLOCK_E, BLOCK_D, PREC)
            z = sc * s
            lse_l = tl.load(lse_ptr + 2 * N + offs_l, mask=l_ok, other=0.0)
            g_l = tl.load(g_ptr + 2 * N + offs_l, mask=l_ok, other=0.0)
            # G = Σ over the M modalities of g_idx·exp(z − LSE_idx): masked indices load g = 0
            gw = g_r[:, None] * tl.exp2((z - lse_r[:, None]) * _LOG2E)
            lse_c = _cols(lse_j, lse_l, lse_l, HAS_E, BLOCK_J, BLOCK_L, BLOCK_E, 0)
            gw += _cols(g_j, g_l, g_l, HAS_E, BLOCK_J, BLOCK_L, BLOCK_E, 0)[None, :] \
                * tl.exp2((z - lse_c[None, :]) * _LOG2E)
            lse_c = _cols(lse_j, lse_l, lse_l, HAS_E, BLOCK_J, BLOCK_L, BLOCK_E, 1)
            gw += _cols(g_j, g_l, g_l, HAS_E, BLOCK_J, BLOCK_L, BLOCK_E, 1)[None, :] \
                * tl.exp2((z - lse_c[None, :]) * _LOG2E)
            col_ok = _cols(j_ok, l_ok, e_ok, HAS_E, BLOCK_J, BLOCK_L, BLOCK_E, 0) \
                & _cols(j_ok, l_ok, e_ok, HAS_E, BLOCK_J, BLOCK_L, BLOCK_E, 1)
            if HAS_E:
                lse_e = tl.load(lse_ptr + 3 * N + offs_e, mask=e_ok, other=0.0)
                g_e = tl.load(g_ptr + 3 * N + offs_e, mask=e_ok, other=0.0)
                lse_c = _cols(lse_e, lse_e, lse_e, HAS_E, BLOCK_J, BLOCK_L, BLOCK_E, 2)
                gw += _cols(g_e, g_e, g_e, HAS_E, BLOCK_J, BLOCK_L, BLOCK_E, 2)[None, :] \
                    * tl.exp2((z - lse_c[None, :]) * _LOG2E)
                col_ok = col_ok & _cols(j_ok, l_ok, e_ok, HAS_E, BLOCK_J, BLOCK_L, BLOCK_E, 2)
            gw = tl.where(i_ok[:, None] & col_ok[None, :], gw, 0.0)
            for d0 in range(0, D, BLOCK_D):  # dR rows += G·Q, per D chunk (this program owns the rows)
                offs_d = d0 + tl.arange(0, BLOCK_D)
                d_ok = offs_d < D
                q = _products(b_ptr, c_ptr, e_ptr, offs_j * D, offs_l * D, offs_e * D, j_ok, l_ok, e_ok,
                              offs_d, d_ok, HAS_E, BLOCK_J, BLOCK_L, BLOCK_E, BLOCK_D)
                ptrs = dr_ptr + offs_i[:, None] * D + offs_d[None, :]
                msk = i_ok[:, None] & d_ok[None, :]
                tl.store(ptrs, tl.load(ptrs, mask=msk, other=0.0) + tl.dot(gw, q, input_precision=PREC), mask=msk)


# ----------------------------------------------------------------------------------------------- launchers

_SUPPORTED = (torch.float32, torch.float16, torch.bfloat16)


class UnsupportedDtypeError(TypeError, RuntimeError):
    """float64 (or another dtype the kernels do not take) with an explicit ``backend="triton"``: a TypeError
    about the input and a RuntimeError about the backend choice (what ``_dispatch.resolve`` raises when the
    triton backend cannot run), so that either ``except`` clause catches it."""


def supports(dtype: torch.dtype, m: int) -> bool:
    """Whether the kernels take ``m`` modalities of this dtype (M = 3, 4; not float64)."""
    return dtype in _SUPPORTED and m in MODALITIES


def _prepare(xs: list[torch.Tensor]) -> torch.Tensor:
    """``[M, N, D]`` contiguous stack of the inputs in their dtype, after the checks."""
    if xs[0].dtype not in _SUPPORTED:
        raise UnsupportedDtypeError(
            f"the Triton backend of symile supports float32, float16 and bfloat16 inputs, got {xs[0].dtype}; "
            "use backend='chunked' for float64"
        )
    if len(xs) not in MODALITIES:
        raise ValueError(
            f"the triton backend of symile 'n_squared' supports M = 3 or 4 modalities, got M = {len(xs)}; "
            "use backend='chunked' (backend='auto' does) for more"
        )
    return torch.stack([x.detach() for x in xs]).contiguous()


def _precision(dtype: torch.dtype) -> str:
    if dtype == torch.float32 and torch.get_float32_matmul_precision() == "highest":
        return "ieee"
    return "tf32"


def _launch_args(x: torch.Tensor, order: list[int]):
    """The role tensors R, B, C, E (E = C when M = 3: never read) and the meta-parameters."""
    m, n, _ = x.shape
    prec = _precision(x.dtype)
    bi, bj, bl, be, bd, warps = CONFIGS[(m, prec)]
    roles = [x[o] for o in order] + ([x[order[2]]] if m == 3 else [])
    meta = {"HAS_E": m == 4, "BLOCK_I": bi, "BLOCK_J": bj, "BLOCK_L": bl, "BLOCK_E": be, "BLOCK_D": bd,
            "PREC": prec, "num_warps": warps}
    return roles, (triton.cdiv(n, bl), triton.cdiv(n, be) if m == 4 else 1), meta


def _order(a: int, m: int) -> list[int]:
    return [a] + [b for b in range(m) if b != a]


def _scale_arg(s, device) -> torch.Tensor:
    return s.detach().to(device=device, dtype=torch.float32).reshape(())


def lse(xs: list[torch.Tensor], s: torch.Tensor) -> torch.Tensor:
    """Per-anchor log-sum-exp of ``s·MIP`` over all tuples of the other modalities: ``[M, N]`` fp32.

    Args:
        xs: ``M`` (3 or 4) tensors ``[N, D]``, float32/float16/bfloat16, same dtype and device.
        s: 0-dim logit scale (read by the kernel from device memory).
    """
    x = _prepare(xs)
    m, n, d = x.shape
    sc = _scale_arg(s, x.device)
    out = torch.empty(m, n, dtype=torch.float32, device=x.device)
    for a in range(m):
        roles, (n_l, n_e), meta = _launch_args(x, _order(a, m))
        j_blocks = triton.cdiv(n, meta["BLOCK_J"])
        part = torch.empty(2, j_blocks, n, dtype=torch.float32, device=x.device)
        _lse_kernel[(triton.cdiv(n, meta["BLOCK_I"]), j_blocks)](*roles, sc, part[0], part[1], n, d, n_l, n_e,
                                                                  **meta)
        mx = part[0].amax(0)  # exact merge of the B-block partials: only differences of maxima reach exp
        out[a] = mx + torch.log((part[1] * torch.exp(part[0] - mx)).sum(0))
    return out


def grad(xs: list[torch.Tensor], s: torch.Tensor, lse_: torch.Tensor, g: torch.Tensor, need_scale: bool):
    """Gradients of ``Σ_a <g^a, LSE^a>``: ``([dX⁰ … dX^{M-1}] fp32, ds fp32 or None)``, one sweep per modality.

    Args:
        xs: as ``lse``; s: 0-dim scale; lse_: ``[M, N]`` from ``lse``; g: ``[M, N]`` incoming gradient.
    """
    x = _prepare(xs)
    m, n, d = x.shape
    sc = _scale_arg(s, x.device)
    lse_ = lse_.detach().to(device=x.device, dtype=torch.float32)
    g = g.detach().to(device=x.device, dtype=torch.float32)
    dxs = []
    for o in range(m):
        order = _order(o, m)
        roles, (n_l, n_e), meta = _launch_args(x, order)
        dr = torch.zeros(n, d, dtype=torch.float32, device=x.device)
        _grad_kernel[(triton.cdiv(n, meta["BLOCK_I"]),)](*roles, sc, lse_[order].contiguous(),
                                                         g[order].contiguous(), dr, n, d, n_l, n_e, **meta)
        dxs.append(dr)
    ds = (x[0].float() * dxs[0]).sum() if need_scale else None  # Σ G∘T = Σ_i <X⁰_i, (G·Q)_i>
    return [dx.mul_(sc) for dx in dxs], ds


__all__ = ["CONFIGS", "MODALITIES", "UnsupportedDtypeError", "grad", "lse", "supports"]
