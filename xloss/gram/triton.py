"""The Triton path of GRAM: the Schur-complement / adjugate form of ``chunked.py`` as fused kernels.

Notation as in ``chunked.py``: ``p = k − 1`` other modalities, ``X_j`` the ``p × D`` matrix of sample j's other
modalities, ``adj_j = adj(X_j X_jᵀ)`` and ``det_j = det(X_j X_jᵀ)`` (computed once per sample in PyTorch,
O(N2·p²·D), by ``chunked.per_sample``), ``c^r_ij = <a_i, x^r_j>`` and ``h^r_ij = Σ_s adj_j[r, s] c^s_ij``:

    det G_ij = |a_i|²·det_j − Σ_r c^r_ij h^r_ij,          V_ij = sqrt(|det G_ij| + eps).

Every kernel computes a ``BLOCK_I × BLOCK_J`` tile of pairs from p ``tl.dot`` GEMMs over ``BLOCK_D`` chunks of
D (the anchor chunk is loaded once for all p modalities), then the O(p²) polynomial in registers:

* ``_volume_kernel`` (``gram_volume``): grid over (i, j) tiles, stores ``V``.
* ``_loss_fwd_kernel`` (``gram_loss`` forward): a program owns ``BLOCK_I`` anchors and walks all j tiles:
  online row statistics of ``Z = −s·V`` (running max and Σ exp(z − max)), the row sums of ``V`` (label
  smoothing) and the positive ``V_{i, labels[i]}`` picked out of the tile that holds it; the column statistics go to
  per-program partial buffers ``[row_blocks, N2]`` (each program writes only its own row: no races, no atomics)
  that ``_merge`` combines exactly in PyTorch, as ``infonce/triton.py`` does.  Nothing N×N is stored.
* ``_bwd_anchor_kernel``: a program owns ``BLOCK_I`` anchors, recomputes the tiles along j, forms the incoming
  ``dV`` (from a ``grad_out`` tensor, or from the loss: ``dZ = w_i(softmax_row − t) + w_j(softmax_col − t)``,
  ``dV = −s·dZ``), ``dg = dV·sign(g)/(2V)``, and accumulates ``da_i = 2a_i Σ_j dg_ij det_j − 2 Σ_r (dg∘h^r) X^r``
  (p GEMMs) into its own rows, plus its partial of ``ds = −Σ dZ∘V`` (one number per program).
* ``_bwd_others_kernel``: a program owns ``BLOCK_J`` samples, recomputes the tiles along i and accumulates
  ``E^r_j = Σ_i (dg∘c^r)_ij a_i`` (p GEMMs) and ``d det_j = Σ_i dg_ij |a_i|²`` into its own rows.
  ``dX^r_j = −2 Σ_s adj_j[r, s] E^s_j`` and ``d adj_j[r, s] = −<E^r_j, x^s_j>`` then go through the O(N2·p²·D)
  cofactor polynomials of ``M_j`` with autograd, in PyTorch, exactly as ``chunked.volume_backward``.

Both backward kernels own their output rows, so the backward is deterministic without atomics (and needs no
separate deterministic mode); the price is that the tile's p projections are recomputed in both, i.e. a
forward + backward is ``5p`` GEMMs of ``N1·N2·D`` (the chunked engine: ``4p``).  The autograd Function in
``__init__`` does the O(N·D) rest (label smoothing terms, the reduction); the launchers below implement
:class:`xloss.gram.engine.GramEngine`.

Precision: inputs are loaded in their dtype (fp32/fp16/bf16) and the projections ``c`` accumulate in fp32,
always with IEEE fp32 dots for fp32 inputs (``det G`` is a cancelling polynomial of them: TF32 would cost ~3
digits of V); everything after (det, V, the LSE statistics, ``dg``) is fp32.  The gradient GEMMs multiply fp32
weights ``dg∘h`` (large where V is small) with the inputs upcast to fp32 (no fp16 overflow): IEEE when
``torch.get_float32_matmul_precision() == "highest"`` and the inputs are fp32, TF32 otherwise (half inputs
carry no more mantissa than TF32).  float64 is not supported here (``UnsupportedDtypeError``, a TypeError and a
RuntimeError): ``backend="auto"`` sends it to the chunked engine.  A zero volume with ``eps = 0`` (exactly degenerate
inputs) gets a zero gradient here (the chunked engine and the reference: NaN).  No column split and no autotuning:
the loss kernels have ``N / BLOCK_I`` programs, and the tile sizes below are untuned guesses for GPUs.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from . import chunked as _chunked

# ----------------------------------------------------------------------------------------------- constants

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
# The interpreter uses small tiles (fast numpy steps; tiny test shapes still span several tiles), except when
# XLOSS_TRITON_GPU_TILES=1 asks for the GPU's: tools/check_triton_compiles.py --report records those variants.
_SMALL_TILES = _INTERPRET and os.environ.get("XLOSS_TRITON_GPU_TILES", "0") in ("", "0")

# (BLOCK_I, BLOCK_J, BLOCK_D, num_warps) per p.  Larger p keeps 2p tile-sized fp32 arrays (c and h) live,
# hence smaller tiles.  GPU sizes: picked among a few candidates so that the fp32 kernels compile for sm_90
# without register spills (cuobjdump --dump-resource-usage; p = 4: 32 bytes in _bwd_others_kernel); not timed
# on a GPU yet.  The interpreter runs every block op in numpy: small tiles keep tests fast and make tiny test
# shapes span several tiles and D chunks.
if _SMALL_TILES:
    CONFIGS = {p: (16, 16, 16, 4) for p in range(1, 5)}
else:
    CONFIGS = {1: (32, 64, 32, 8), 2: (32, 32, 16, 4), 3: (32, 32, 16, 4), 4: (32, 32, 32, 8)}

_LOG2E = tl.constexpr(1.4426950408889634)

# ------------------------------------------------------------------------------------------------- kernels


@triton.jit
def _proj(a_ptr, x_ptr, offs_i, offs_j, i_ok, j_ok, D, stride_a, stride_x, stride_xm,
          P: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_D: tl.constexpr):
    """``c^r = A_i X^r_jᵀ`` for r < P (the rest zeros), fp32 ``[BLOCK_I, BLOCK_J]`` each; D in BLOCK_D chunks."""
    c0 = tl.zeros([BLOCK_I, BLOCK_J], dtype=tl.float32)
    c1 = tl.zeros([BLOCK_I, BLOCK_J], dtype=tl.float32)
    c2 = tl.zeros([BLOCK_I, BLOCK_J], dtype=tl.float32)
    c3 = tl.zeros([BLOCK_I, BLOCK_J], dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        d_ok = offs_d < D
        a_c = tl.load(a_ptr + offs_i[:, None] * stride_a + offs_d[None, :],
                      mask=i_ok[:, None] & d_ok[None, :], other=0.0)  # [BLOCK_I, BLOCK_D]
        x_ptrs = x_ptr + offs_j[:, None] * stride_x + offs_d[None, :]
        x_mask = j_ok[:, None] & d_ok[None, :]
        # ieee: the projections feed a cancelling polynomial (det G), TF32 would cost ~3 digits there
        c0 += tl.dot(a_c, tl.trans(tl.load(x_ptrs, mask=x_mask, other=0.0)), input_precision="ieee")
        if P > 1:
            c1 += tl.dot(a_c, tl.trans(tl.load(x_ptrs + stride_xm, mask=x_mask, other=0.0)), input_precision="ieee")
        if P > 2:
            c2 += tl.dot(a_c, tl.trans(tl.load(x_ptrs + 2 * stride_xm, mask=x_mask, other=0.0)),
                         input_precision="ieee")
        if P > 3:
            c3 += tl.dot(a_c, tl.trans(tl.load(x_ptrs + 3 * stride_xm, mask=x_mask, other=0.0)),
                         input_precision="ieee")
    return c0, c1, c2, c3


@triton.jit
def _adj(adj_ptr, r: tl.constexpr, s: tl.constexpr, P: tl.constexpr, N2, offs_j, j_ok):
    """``adj_j[r, s]`` as a ``[1, BLOCK_J]`` row (adj stored ``[P·P, N2]``)."""
    return tl.load(adj_ptr + (r * P + s) * N2 + offs_j, mask=j_ok, other=0.0)[None, :]


@triton.jit
def _h(adj_ptr, r: tl.constexpr, P: tl.constexpr, N2, offs_j, j_ok, c0, c1, c2, c3):
    """``h^r = Σ_s adj[r, s] c^s``."""
    h = c0 * _adj(adj_ptr, r, 0, P, N2, offs_j, j_ok)
    if P > 1:
        h += c1 * _adj(adj_ptr, r, 1, P, N2, offs_j, j_ok)
    if P > 2:
        h += c2 * _adj(adj_ptr, r, 2, P, N2, offs_j, j_ok)
    if P > 3:
        h += c3 * _adj(adj_ptr, r, 3, P, N2, offs_j, j_ok)
    return h


@triton.jit
def _tile(a_ptr, x_ptr, asq_ptr, det_ptr, adj_ptr, offs_i, offs_j, i_ok, j_ok, N2, D,
          stride_a, stride_x, stride_xm,
          P: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_D: tl.constexpr):
    """One tile: ``c^r``, ``h^r`` (zeros for r ≥ P), the signed ``g = det G`` and ``det_j`` ``[1, BLOCK_J]``."""
    c0, c1, c2, c3 = _proj(a_ptr, x_ptr, offs_i, offs_j, i_ok, j_ok, D, stride_a, stride_x, stride_xm,
                           P, BLOCK_I, BLOCK_J, BLOCK_D)
    asq = tl.load(asq_ptr + offs_i, mask=i_ok, other=0.0)
    det = tl.load(det_ptr + offs_j, mask=j_ok, other=0.0)[None, :]
    h0 = _h(adj_ptr, 0, P, N2, offs_j, j_ok, c0, c1, c2, c3)
    h1 = tl.zeros([BLOCK_I, BLOCK_J], dtype=tl.float32)
    h2 = tl.zeros([BLOCK_I, BLOCK_J], dtype=tl.float32)
    h3 = tl.zeros([BLOCK_I, BLOCK_J], dtype=tl.float32)
    g = asq[:, None] * det - c0 * h0
    if P > 1:
        h1 = _h(adj_ptr, 1, P, N2, offs_j, j_ok, c0, c1, c2, c3)
        g -= c1 * h1
    if P > 2:
        h2 = _h(adj_ptr, 2, P, N2, offs_j, j_ok, c0, c1, c2, c3)
        g -= c2 * h2
    if P > 3:
        h3 = _h(adj_ptr, 3, P, N2, offs_j, j_ok, c0, c1, c2, c3)
        g -= c3 * h3
    return c0, c1, c2, c3, h0, h1, h2, h3, g, det


@triton.jit
def _volume_kernel(
    a_ptr, x_ptr,  # [N1, D], [P, N2, D] (input dtype, unit stride along D)
    asq_ptr, det_ptr, adj_ptr,  # [N1], [N2], [P·P, N2] fp32
    v_ptr,  # [N1, N2] fp32 out
    N1, N2, D, stride_a, stride_x, stride_xm, eps,
    P: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_D: tl.constexpr,
):
    offs_i = tl.program_id(0).to(tl.int64) * BLOCK_I + tl.arange(0, BLOCK_I)
    offs_j = tl.program_id(1).to(tl.int64) * BLOCK_J + tl.arange(0, BLOCK_J)
    i_ok, j_ok = offs_i < N1, offs_j < N2
    _, _, _, _, _, _, _, _, g, _ = _tile(a_ptr, x_ptr, asq_ptr, det_ptr, adj_ptr, offs_i, offs_j, i_ok, j_ok,
                                         N2, D, stride_a, stride_x, stride_xm, P, BLOCK_I, BLOCK_J, BLOCK_D)
    v = tl.sqrt(tl.abs(g) + eps)
    tl.store(v_ptr + offs_i[:, None] * N2 + offs_j[None, :], v, mask=i_ok[:, None] & j_ok[None, :])


@triton.jit
def _loss_fwd_kernel(
    a_ptr, x_ptr, asq_ptr, det_ptr, adj_ptr,
    scale_ptr,  # [] fp32
    lab_ptr,  # [N1] int64: the positive column of each row
    lse_r_ptr, vsum_r_ptr, vpos_ptr,  # [N1] fp32 out: row LSE of Z, Σ_j V_ij, V_{i, labels[i]}
    pmax_c_ptr, psum_c_ptr, pv_c_ptr,  # [row_blocks, N2] fp32 out: column partials (max z, Σ exp(z − max), Σ V)
    N1, N2, D, stride_a, stride_x, stride_xm, eps,
    P: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    offs_i = pid * BLOCK_I + tl.arange(0, BLOCK_I)
    i_ok = offs_i < N1
    lab = tl.load(lab_ptr + offs_i, mask=i_ok, other=-1)
    s = tl.load(scale_ptr)
    m_r = tl.full([BLOCK_I], float("-inf"), dtype=tl.float32)
    l_r = tl.zeros([BLOCK_I], dtype=tl.float32)
    vs_r = tl.zeros([BLOCK_I], dtype=tl.float32)
    vd = tl.zeros([BLOCK_I], dtype=tl.float32)
    for j0 in range(0, N2, BLOCK_J):
        offs_j = j0 + tl.arange(0, BLOCK_J).to(tl.int64)
        j_ok = offs_j < N2
        ok = i_ok[:, None] & j_ok[None, :]
        _, _, _, _, _, _, _, _, g, _ = _tile(a_ptr, x_ptr, asq_ptr, det_ptr, adj_ptr, offs_i, offs_j, i_ok, j_ok,
                                             N2, D, stride_a, stride_x, stride_xm, P, BLOCK_I, BLOCK_J, BLOCK_D)
        v = tl.where(ok, tl.sqrt(tl.abs(g) + eps), 0.0)
        z = tl.where(ok, -s * v, float("-inf"))
        vs_r += tl.sum(v, 1)
        vd += tl.sum(tl.where(lab[:, None] == offs_j[None, :], v, 0.0), 1)
        # rows: online max / sum; a fully masked row (i ≥ N1) keeps max −inf: use 0 as the subtrahend there
        m_new = tl.maximum(m_r, tl.max(z, 1))
        m_sub = tl.where(m_new == float("-inf"), 0.0, m_new)
        l_r = l_r * tl.exp2((m_r - m_sub) * _LOG2E) + tl.sum(tl.exp2((z - m_sub[:, None]) * _LOG2E), 1)
        m_r = m_new
        # columns: this program's partial over its BLOCK_I rows
        m_c = tl.max(z, 0)
        m_cs = tl.where(m_c == float("-inf"), 0.0, m_c)
        l_c = tl.sum(tl.exp2((z - m_cs[None, :]) * _LOG2E), 0)
        tl.store(pmax_c_ptr + pid * N2 + offs_j, m_c, mask=j_ok)
        tl.store(psum_c_ptr + pid * N2 + offs_j, l_c, mask=j_ok)
        tl.store(pv_c_ptr + pid * N2 + offs_j, tl.sum(v, 0), mask=j_ok)
    tl.store(lse_r_ptr + offs_i, m_r + tl.log(tl.where(i_ok, l_r, 1.0)), mask=i_ok)
    tl.store(vsum_r_ptr + offs_i, vs_r, mask=i_ok)
    tl.store(vpos_ptr + offs_i, vd, mask=i_ok)


@triton.jit
def _dvs(g, det, offs_i, offs_j, ok, s, eps,
         gv_ptr, stride_gv_i, stride_gv_j,  # MODE 0: the incoming dV [N1, N2] (any strides)
         lse_r_ptr, lse_c_ptr, wr_ptr, wc_ptr, lab_ptr, ls, N1, N2,  # MODE 1: the loss's statistics, weights
         MODE: tl.constexpr, STOPGRAD: tl.constexpr):
    """``dg`` for the anchor route and for the others' route, and the tile's ``Σ dZ∘V`` (MODE 1, else 0).

    MODE 1, with ``y_i`` the positive column of row i, ``w_i`` the weight of row i's cross-entropies and
    ``W_j = Σ_{i: y_i = j} w_i`` that of column j's softmax:
    ``pr = w_i(exp(z − lse_r_i) − ε/N2 − (1−ε)[j=y_i])``, ``pc = W_j(exp(z − lse_c_j) − ε/N1) − (1−ε)w_i[j=y_i]``
    (written ``W_j(exp − ε/N1 − (1−ε)[j=y_i]) + (1−ε)(W_j − w_i)[j=y_i]``: the same arithmetic as the
    diagonal-only kernel when every column is one row's positive), ``dV = −s·(pr + pc)`` for both routes, or
    ``−s·pr`` (anchor) and ``−s·pc`` (others) with ``STOPGRAD``.
    """
    v = tl.sqrt(tl.abs(g) + eps)
    # dg = dV · sign(g) / (2V); sign(0) = 0, so a zero volume (eps = 0: only at exactly degenerate inputs, and
    # in the masked padding of edge tiles) gets dg = 0 instead of 0/0
    k = tl.where(g > 0, 0.5, tl.where(g < 0, -0.5, 0.0)) / tl.where(v > 0, v, 1.0)
    dsum = tl.sum(tl.sum(tl.zeros_like(g), 1), 0)  # an fp32 scalar in both modes
    if MODE == 0:
        dv = tl.load(gv_ptr + offs_i[:, None] * stride_gv_i + offs_j[None, :] * stride_gv_j, mask=ok, other=0.0)
        dga = tl.where(ok, dv.to(tl.float32) * k, 0.0)
        dgx = dga
    else:
        z = tl.where(ok, -s * v, float("-inf"))  # padding: exp gives exactly 0, whatever the LSE there
        lse_r = tl.load(lse_r_ptr + offs_i, mask=offs_i < N1, other=0.0)
        lse_c = tl.load(lse_c_ptr + offs_j, mask=offs_j < N2, other=0.0)
        w_i = tl.load(wr_ptr + offs_i, mask=offs_i < N1, other=0.0)[:, None]
        w_j = tl.load(wc_ptr + offs_j, mask=offs_j < N2, other=0.0)[None, :]
        y_i = tl.load(lab_ptr + offs_i, mask=offs_i < N1, other=-1)
        pos = y_i[:, None] == offs_j[None, :]
        t_pos = tl.where(pos, 1.0 - ls, 0.0)
        pr = w_i * (tl.exp2((z - lse_r[:, None]) * _LOG2E) - (t_pos + ls / N2))  # smoothed target over N2
        pc = w_j * (tl.exp2((z - lse_c[None, :]) * _LOG2E) - (t_pos + ls / N1))  # and over N1
        pc += tl.where(pos, (1.0 - ls) * (w_j - w_i), 0.0)
        pr = tl.where(ok, pr, 0.0)
        pc = tl.where(ok, pc, 0.0)
        dsum = -tl.sum(tl.sum((pr + pc) * tl.where(ok, v, 0.0), 1), 0)
        if STOPGRAD:
            dga = tl.where(ok, -s * pr * k, 0.0)
            dgx = tl.where(ok, -s * pc * k, 0.0)
        else:
            dga = tl.where(ok, -s * (pr + pc) * k, 0.0)
            dgx = dga
    return dga, dgx, dsum


@triton.jit
def _bwd_anchor_kernel(
    a_ptr, x_ptr, asq_ptr, det_ptr, adj_ptr, scale_ptr,
    gv_ptr, stride_gv_i, stride_gv_j, lse_r_ptr, lse_c_ptr, wr_ptr, wc_ptr, lab_ptr, ls,
    ga_ptr,  # [N1, D] fp32 out (zeros in), this program's rows only
    ds_ptr,  # [row_blocks] fp32 out: Σ dZ∘V of this program's rows (MODE 1)
    N1, N2, D, stride_a, stride_x, stride_xm, eps,
    P: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_D: tl.constexpr,
    MODE: tl.constexpr, STOPGRAD: tl.constexpr, COMPUTE_GA: tl.constexpr, PREC: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    offs_i = pid * BLOCK_I + tl.arange(0, BLOCK_I)
    i_ok = offs_i < N1
    s = tl.load(scale_ptr)
    ds_acc = tl.sum(tl.zeros([BLOCK_I], dtype=tl.float32), 0)
    for j0 in range(0, N2, BLOCK_J):
        offs_j = j0 + tl.arange(0, BLOCK_J).to(tl.int64)
        j_ok = offs_j < N2
        ok = i_ok[:, None] & j_ok[None, :]
        _, _, _, _, h0, h1, h2, h3, g, det = _tile(
            a_ptr, x_ptr, asq_ptr, det_ptr, adj_ptr, offs_i, offs_j, i_ok, j_ok, N2, D,
            stride_a, stride_x, stride_xm, P, BLOCK_I, BLOCK_J, BLOCK_D)
        dga, _, dsum = _dvs(g, det, offs_i, offs_j, ok, s, eps, gv_ptr, stride_gv_i, stride_gv_j,
                            lse_r_ptr, lse_c_ptr, wr_ptr, wc_ptr, lab_ptr, ls, N1, N2, MODE, STOPGRAD)
        ds_acc += dsum
        if COMPUTE_GA:
            rsum = tl.sum(dga * det, 1)  # Σ_j dg_ij det_j
            # da_i = 2 a_i Σ_j dg det − 2 Σ_r (dg∘h^r) X^r: per D chunk, read-add-store of this program's rows
            w0 = dga * h0
            w1 = dga * h1
            w2 = dga * h2
            w3 = dga * h3
            for d0 in range(0, D, BLOCK_D):
                offs_d = d0 + tl.arange(0, BLOCK_D)
                d_ok = offs_d < D
                x_ptrs = x_ptr + offs_j[:, None] * stride_x + offs_d[None, :]
                x_mask = j_ok[:, None] & d_ok[None, :]
                acc = tl.dot(w0, tl.load(x_ptrs, mask=x_mask, other=0.0).to(tl.float32), input_precision=PREC)
                if P > 1:
                    acc += tl.dot(w1, tl.load(x_ptrs + stride_xm, mask=x_mask, other=0.0).to(tl.float32),
                                  input_precision=PREC)
                if P > 2:
                    acc += tl.dot(w2, tl.load(x_ptrs + 2 * stride_xm, mask=x_mask, other=0.0).to(tl.float32),
                                  input_precision=PREC)
                if P > 3:
                    acc += tl.dot(w3, tl.load(x_ptrs + 3 * stride_xm, mask=x_mask, other=0.0).to(tl.float32),
                                  input_precision=PREC)
                a_mask = i_ok[:, None] & d_ok[None, :]
                a_c = tl.load(a_ptr + offs_i[:, None] * stride_a + offs_d[None, :], mask=a_mask, other=0.0)
                ga_ptrs = ga_ptr + offs_i[:, None] * D + offs_d[None, :]
                upd = 2.0 * a_c.to(tl.float32) * rsum[:, None] - 2.0 * acc
                tl.store(ga_ptrs, tl.load(ga_ptrs, mask=a_mask, other=0.0) + upd, mask=a_mask)
    if MODE == 1:
        tl.store(ds_ptr + pid, ds_acc)


@triton.jit
def _bwd_others_kernel(
    a_ptr, x_ptr, asq_ptr, det_ptr, adj_ptr, scale_ptr,
    gv_ptr, stride_gv_i, stride_gv_j, lse_r_ptr, lse_c_ptr, wr_ptr, wc_ptr, lab_ptr, ls,
    e_ptr,  # [P, N2, D] fp32 out (zeros in): E^r_j = Σ_i (dg∘c^r)_ij a_i, this program's samples only
    gdet_ptr,  # [N2] fp32 out: Σ_i dg_ij |a_i|²
    N1, N2, D, stride_a, stride_x, stride_xm, eps,
    P: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_D: tl.constexpr,
    MODE: tl.constexpr, STOPGRAD: tl.constexpr, PREC: tl.constexpr,
):
    offs_j = tl.program_id(0).to(tl.int64) * BLOCK_J + tl.arange(0, BLOCK_J)
    j_ok = offs_j < N2
    s = tl.load(scale_ptr)
    gdet = tl.zeros([BLOCK_J], dtype=tl.float32)
    for i0 in range(0, N1, BLOCK_I):
        offs_i = i0 + tl.arange(0, BLOCK_I).to(tl.int64)
        i_ok = offs_i < N1
        ok = i_ok[:, None] & j_ok[None, :]
        c0, c1, c2, c3, _, _, _, _, g, det = _tile(
            a_ptr, x_ptr, asq_ptr, det_ptr, adj_ptr, offs_i, offs_j, i_ok, j_ok, N2, D,
            stride_a, stride_x, stride_xm, P, BLOCK_I, BLOCK_J, BLOCK_D)
        _, dgx, _ = _dvs(g, det, offs_i, offs_j, ok, s, eps, gv_ptr, stride_gv_i, stride_gv_j,
                         lse_r_ptr, lse_c_ptr, wr_ptr, wc_ptr, lab_ptr, ls, N1, N2, MODE, STOPGRAD)
        asq = tl.load(asq_ptr + offs_i, mask=i_ok, other=0.0)
        gdet += tl.sum(dgx * asq[:, None], 0)
        w0 = tl.trans(dgx * c0)  # [BLOCK_J, BLOCK_I]
        w1 = tl.trans(dgx * c1)
        w2 = tl.trans(dgx * c2)
        w3 = tl.trans(dgx * c3)
        for d0 in range(0, D, BLOCK_D):
            offs_d = d0 + tl.arange(0, BLOCK_D)
            d_ok = offs_d < D
            a_c = tl.load(a_ptr + offs_i[:, None] * stride_a + offs_d[None, :],
                          mask=i_ok[:, None] & d_ok[None, :], other=0.0).to(tl.float32)  # [BLOCK_I, BLOCK_D]
            e_ptrs = e_ptr + offs_j[:, None] * D + offs_d[None, :]
            e_mask = j_ok[:, None] & d_ok[None, :]
            tl.store(e_ptrs, tl.load(e_ptrs, mask=e_mask, other=0.0)
                     + tl.dot(w0, a_c, input_precision=PREC), mask=e_mask)
            if P > 1:
                e_ptrs += N2 * D
                tl.store(e_ptrs, tl.load(e_ptrs, mask=e_mask, other=0.0)
                         + tl.dot(w1, a_c, input_precision=PREC), mask=e_mask)
            if P > 2:
                e_ptrs += N2 * D
                tl.store(e_ptrs, tl.load(e_ptrs, mask=e_mask, other=0.0)
                         + tl.dot(w2, a_c, input_precision=PREC), mask=e_mask)
            if P > 3:
                e_ptrs += N2 * D
                tl.store(e_ptrs, tl.load(e_ptrs, mask=e_mask, other=0.0)
                         + tl.dot(w3, a_c, input_precision=PREC), mask=e_mask)
    tl.store(gdet_ptr + offs_j, gdet, mask=j_ok)


# ----------------------------------------------------------------------------------------------- launchers

_SUPPORTED = (torch.float32, torch.float16, torch.bfloat16)


class UnsupportedDtypeError(TypeError, RuntimeError):
    """float64 (or another dtype the kernels do not take) with an explicit ``backend="triton"``: a TypeError
    about the input and a RuntimeError about the backend choice (what ``_dispatch.resolve`` raises when the
    triton backend cannot run), so that either ``except`` clause catches it."""


def supports(dtype: torch.dtype) -> bool:
    """Whether the kernels take this input dtype (float64 does not: the chunked engine handles it)."""
    return dtype in _SUPPORTED


class _Prepared:
    """The kernels' view of the inputs: ``a [N1, D]`` and the stacked ``x [p, N2, D]`` in the input dtype,
    unit stride along D; the per-sample ``adj [p·p, N2]``, ``det [N2]`` and ``|a_i|² [N1]`` in fp32."""

    def __init__(self, anchor: torch.Tensor, others: list[torch.Tensor]):
        if anchor.dtype not in _SUPPORTED:
            raise UnsupportedDtypeError(
                f"the Triton backend of gram supports float32, float16 and bfloat16 inputs, got anchor "
                f"{anchor.dtype}; use backend='chunked' for float64"
            )
        self.p = len(others)
        self.a = anchor.detach().contiguous()
        self.x = torch.stack([x.detach() for x in others]).contiguous()  # [p, N2, D]
        with torch.no_grad():
            xf = [x.detach().float() for x in others]
            adj, det = _chunked.per_sample(xf)  # the O(N2·p²·D) per-sample part, once
            self.adj = adj.reshape(-1, self.p * self.p).T.contiguous()  # [p·p, N2]
            self.det = det.contiguous()
            af = self.a.float()
            self.asq = (af * af).sum(-1).contiguous()
        self.n1, self.d = self.a.shape
        self.n2 = self.x.shape[1]
        self.bi, self.bj, self.bd, self.warps = CONFIGS[self.p]

    def args(self):
        return (self.a, self.x, self.asq, self.det, self.adj)

    def strides(self):
        return (self.d, self.x.stride(1), self.x.stride(0))

    def meta(self):
        return {"P": self.p, "BLOCK_I": self.bi, "BLOCK_J": self.bj, "BLOCK_D": self.bd, "num_warps": self.warps}


def _precision(dtype: torch.dtype) -> str:
    if dtype == torch.float32 and torch.get_float32_matmul_precision() == "highest":
        return "ieee"
    return "tf32"


def _scale_arg(s, device) -> torch.Tensor:
    if not isinstance(s, torch.Tensor):
        s = torch.tensor(float(s))
    return s.detach().to(device=device, dtype=torch.float32).reshape(())


def volume(anchor: torch.Tensor, others: list[torch.Tensor], eps: float):
    """``(V [N1, N2] fp32, None)`` from ``anchor [N1, D]`` and ``others`` (p tensors ``[N2, D]``), one kernel
    (nothing is kept for ``volume_grad``, which recomputes the tiles)."""
    pr = _Prepared(anchor, others)
    v = torch.empty(pr.n1, pr.n2, dtype=torch.float32, device=pr.a.device)
    grid = (triton.cdiv(pr.n1, pr.bi), triton.cdiv(pr.n2, pr.bj))
    _volume_kernel[grid](*pr.args(), v, pr.n1, pr.n2, pr.d, *pr.strides(), float(eps), **pr.meta())
    return v, None


def _merge(pmax: torch.Tensor, psum: torch.Tensor) -> torch.Tensor:
    """Exact merge of partial (max, Σ exp(z − max)) ``[B, L]`` into the LSE ``[L]``."""
    mx = pmax.amax(0)
    ref = torch.where(torch.isfinite(mx), mx, torch.zeros_like(mx))
    return ref + torch.log((psum * torch.exp(pmax - ref)).sum(0))


def loss_stats(anchor: torch.Tensor, others: list[torch.Tensor], scale, labels: torch.Tensor, eps: float):
    """One sweep over the ``N1 × N2`` tiles of ``Z = −s·V``.

    Returns fp32 ``(lse_r [N1], lse_c [N2], mean_r [N1], mean_c [N2], v_pos [N1], None)``: row and column LSE
    of ``Z``, row and column means of ``V``, ``V[i, labels[i]]`` (no ``det G`` is kept).
    """
    pr = _Prepared(anchor, others)
    n1, n2, dev = pr.n1, pr.n2, pr.a.device
    blocks = triton.cdiv(n1, pr.bi)
    f32 = {"dtype": torch.float32, "device": dev}
    lse_r, vsum_r, vpos = (torch.empty(n1, **f32) for _ in range(3))
    part = torch.empty(3, blocks, n2, **f32)
    lab = labels.to(device=dev, dtype=torch.int64).contiguous()
    _loss_fwd_kernel[(blocks,)](*pr.args(), _scale_arg(scale, dev), lab, lse_r, vsum_r, vpos, part[0], part[1],
                                part[2], n1, n2, pr.d, *pr.strides(), float(eps), **pr.meta())
    return lse_r, _merge(part[0], part[1]), vsum_r / n2, part[2].sum(0) / n1, vpos, None


def _backward(pr: _Prepared, scale, eps, mode_args, mode, stopgrad, need_a, need_x, need_s):
    dev = pr.a.device
    f32 = {"dtype": torch.float32, "device": dev}
    s = _scale_arg(scale, dev)
    prec = _precision(pr.a.dtype)
    ga, e, gdet, ds = None, None, None, None
    if need_a or need_s:
        blocks = triton.cdiv(pr.n1, pr.bi)
        ga = torch.zeros(pr.n1, pr.d, **f32) if need_a else torch.zeros(1, **f32)
        dsp = torch.zeros(blocks, **f32)
        _bwd_anchor_kernel[(blocks,)](*pr.args(), s, *mode_args, ga, dsp, pr.n1, pr.n2, pr.d, *pr.strides(),
                                      float(eps), MODE=mode, STOPGRAD=stopgrad, COMPUTE_GA=need_a, PREC=prec,
                                      **pr.meta())
        ds = dsp.sum()
        ga = ga if need_a else None
    if need_x:
        e = torch.zeros(pr.p, pr.n2, pr.d, **f32)
        gdet = torch.empty(pr.n2, **f32)
        _bwd_others_kernel[(triton.cdiv(pr.n2, pr.bj),)](*pr.args(), s, *mode_args, e, gdet, pr.n1, pr.n2, pr.d,
                                                         *pr.strides(), float(eps), MODE=mode, STOPGRAD=stopgrad,
                                                         PREC=prec, **pr.meta())
    return ga, e, gdet, ds


def _others_grad(others: list[torch.Tensor], e: torch.Tensor, gdet: torch.Tensor) -> list[torch.Tensor]:
    """``dX^r`` from ``E [p, N2, D]`` and ``d det [N2]`` (fp32): the direct term ``−2 adj E`` and the cofactor
    polynomials of ``M_j`` through autograd (``d adj[r, s] = −<E^r, x^s>``), as ``chunked.volume_backward``."""
    p = len(others)
    with _chunked.autograd_on(), torch.enable_grad():  # (inside a custom op autograd is off: turn it on)
        xl = [x.detach().float().requires_grad_() for x in others]
        adj, det = _chunked.per_sample(xl)
        et = e.transpose(0, 1)  # [N2, p, D]
        with torch.no_grad():
            gxt = torch.bmm(adj.detach(), et).mul_(-2.0)
            gadj = torch.bmm(et, torch.stack([x.detach() for x in xl], 1).transpose(1, 2)).neg_()
        outs, grads = [det], [gdet]
        if adj.requires_grad:
            outs.append(adj)
            grads.append(gadj)
        extra = torch.autograd.grad(outs, xl, grads)
    return [gxt[:, r] + extra[r] for r in range(p)]


def volume_grad(anchor, others, eps: float, det, grad_v, need_a: bool, need_x: bool):
    """Gradients of ``Σ grad_v∘V`` w.r.t. ``anchor`` and ``others`` (fp32, or None where not needed); ``det``
    is unused (None: the tiles are recomputed)."""
    pr = _Prepared(anchor, others)
    gv = grad_v.float()
    dummy = pr.asq
    mode_args = (gv, gv.stride(0), gv.stride(1), dummy, dummy, dummy, dummy, dummy, 0.0)
    ga, e, gdet, _ = _backward(pr, 1.0, eps, mode_args, 0, False, need_a, need_x, False)
    return ga, (_others_grad(others, e, gdet) if need_x else None)


def loss_grad(anchor, others, scale, det, lse_r, lse_c, w_r, w_c, labels, label_smoothing: float,
              stopgrad: bool, eps: float, need_a: bool, need_x: bool, need_s: bool):
    """Gradients of the loss given ``w_r [N1]``, the weight of row i's and of column ``labels[i]``'s
    cross-entropy of anchor i, and ``w_c [N2]``, ``w_c[j] = Σ_{i: labels[i] = j} w_r[i]``.

    ``dZ = w_r[i](softmax_row − ε/N2) + w_c[j](softmax_col − ε/N1) − 2(1−ε)w_r[i][j = labels[i]]`` and
    ``dV = −s·dZ``.  Returns fp32 ``(ga or None, [gx] or None, ds = Σ dZ∘(−V) or None)``: ``d loss / d s``.
    ``det`` is unused (None).
    """
    pr = _Prepared(anchor, others)
    dev = pr.a.device
    dummy = pr.asq
    mode_args = (dummy, 0, 0, lse_r.float().contiguous(), lse_c.float().contiguous(), w_r.float().contiguous(),
                 w_c.float().contiguous(), labels.to(device=dev, dtype=torch.int64).contiguous(),
                 float(label_smoothing))
    ga, e, gdet, ds = _backward(pr, scale, eps, mode_args, 1, stopgrad, need_a, need_x, need_s)
    return ga, (_others_grad(others, e, gdet) if need_x else None), (ds if need_s else None)


__all__ = ["CONFIGS", "UnsupportedDtypeError", "loss_grad", "loss_stats", "supports", "volume", "volume_grad"]
