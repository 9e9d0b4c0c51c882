"""The Triton path of InfoNCE: the two tile sweeps of ``chunked.py`` as fused GPU kernels.

Same two primitives, same signatures and meaning as ``chunked.py`` (the ``InfoNCEEngine`` protocol of ``engine.py``) (the autograd Function in ``__init__`` does
everything else):

* ``lse(q, k, scale, need_cols, labels, keep_logits)``: ``_lse_kernel``, one sweep.  A program owns ``BLOCK_M`` rows and
  walks the column blocks of its column split, computing each ``BLOCK_M × BLOCK_N`` logit tile with
  ``tl.dot`` over ``BLOCK_D`` chunks of D.  It keeps online row statistics (running max of z, running
  Σ exp(z - max)) and writes one partial column max and sum per (row block, column) to fp32 buffers
  ``[num_row_blocks, M]``: every program writes its own row of those buffers, so there are no races and no
  atomics; ``_merge`` finishes them exactly (``max = max_b pmax_b``, ``sum = Σ_b psum_b·exp(pmax_b - max)``).
  The result stays split, ``row [2, N] = (max_j z_ij, log Σ_j exp(z_ij - max))``, in natural-log units, and
  ``col [2, M]``.  The same sweep also picks each row's positive logit ``z_pos_i = z_{i, labels[i]}`` out of
  the tile that holds it (``Σ_j [j = labels[i]]·z_ij``: one nonzero term, exact), i.e. the very value whose
  max was taken, so that ``row_max_i - z_pos_i`` is exactly 0 when the positive is the row max (as in naive
  PyTorch, which takes both from one logits matrix; a separately computed ``s·<q_i, k_{labels[i]}>`` sums in
  another order and leaves |z|·eps there).  Each label lies in exactly one column split, whose program
  stores it.
* ``grad(q, k, scale, row, col, a, w)``: ``_grad_kernel``, one recomputing sweep.  A program recomputes
  each tile, forms ``P = a_i·exp((z - m_i) - ls_i) + w_j·exp((z - m_j) - ls_j)`` in registers and
  accumulates ``dq_u = P k`` for its own rows and ``dk_u = Pᵀ q`` with ``tl.atomic_add``.

Structured targets (groups, exclude_self, false-negative margin, decoupled, hardness: the target rule of
``engine.py``) reuse these two kernels under ``tl.constexpr`` flags (``STRUCTURED``, ``EXCLUDE_SELF``,
``DECOUPLED``, ``HAS_MARGIN``; hardness is a runtime float), so that the plain path compiles to the same code as
before (its PTX instruction stream is unchanged) and both paths share the tiling, the D chunking, the column
splits and the deterministic mode.  The rule itself is two small jit helpers, ``_targets`` (positives ``Y`` and
the entries both LSEs keep, from group ids loaded per row / column block and ``i - j == self_offset``) and
``_under_margin`` (drops the negatives whose raw dot exceeds ``ref + margin``; the launchers form the fp32
thresholds ``ref + margin`` once, so every sweep compares the dots with the same numbers):

* ``positive_max(q, k, qg, kg, self_offset, need_cols)``: ``_positive_max_kernel``, the margin's references,
  the max raw dot over positives per row (partials ``[split, N]``) and per column (``[row blocks, M]``), merged
  by a max; same tiles and D chunks as ``_lse_kernel``, so the reference is one of the very dots compared.
* ``masked_lse(...)``: ``_lse_kernel`` with ``STRUCTURED``.  Statistics of ``ẑ`` over ``in_row`` / ``in_col``;
  a tile or a whole row may hold none of its set, so 0 stands in for a -inf max as the subtrahend and an empty
  set ends as ``(-inf, -inf)`` (``_merge`` handles -inf partials).  The extra O(N + M) state, the positives'
  ``Σ Y z`` and count, lives in registers per row (one partial per column split) and in partial buffers per
  (row block, column) like the column max / sum, summed in a fixed order: deterministic, no atomics.
* ``masked_grad(...)``: ``_grad_kernel`` with ``STRUCTURED``: ``G = in_row·a·exp(ẑ - row) + in_col·w·exp(ẑ -
  col) - Y·(pa + pw)``.  Masked entries are selected away with ``tl.where`` (never multiplied: the exponential
  may be inf there), the statistics of an empty set are made inert before launch (max 0, shift +inf, sign 0),
  and one power of two normalises all four weights.  Deterministic mode swaps the roles as for ``grad``
  (``_Targets.swapped``: groups, thresholds, positive weights, and ``self_offset → -self_offset``).
The negatives' ``ẑ`` is ``(scale + hardness)·dot`` (one rounding that only a select consumes), not
``z + hardness·dot``, whose FMA contraction could differ between the forward and the backward.

Matryoshka prefixes (issue 12, ``matryoshka_lse`` / ``matryoshka_grad``) have their own two kernels,
``_mrl_lse_kernel`` and ``_mrl_grad_kernel`` (at the end of this file): a tile accumulates the dots of the D
slices between consecutive prefix widths and derives every prefix's logits from them; the per-prefix state lives
in register tuples (``tl.static_range`` over the P prefixes).

Why split statistics: a softmax entry formed as ``exp(z - lse)`` with ``lse`` one fp32 number of size |z|
(~100 at CLIP's logit scale) carries an error of |z|·eps in every entry, which the cancellation
``P - onehot`` of the InfoNCE gradient turns into gradients 6-800× less accurate than PyTorch's
``log_softmax`` (which computes ``(z - max) - log Σ exp(z - max)``).  So both kernels work with
``z = dot·scale`` in natural units (the backward recomputes the same z, with the same D chunks, as the
forward), subtract the max first, and only the small difference goes to the base-2 domain:
``exp2((z - m)·log2 e)``; a |z|-sized number times log2 e never appears.  The backward folds the weight in as
``a_i·exp((z - m) - ls) = sign(a_i)·exp((z - m) - shift_i)``, ``shift_i = ls_i - log|a_i|`` (a zero weight:
shift +inf, sign 0, exactly 0), after dividing all weights by an exact power of two ``c`` with
``max |weight| / c`` in (1/2, 1] so that ``log|a_i|`` is ~0 (uniform weights give exactly 0) and its
rounding adds nothing to the exponent; the outputs are multiplied by ``c``.

Column splits: a grid over row blocks alone has only ``N / BLOCK_M`` programs (32 for N = 4096), too few for
an H100's 132 SMs, so the launchers also split the columns into ``split`` contiguous ranges (grid axis 1)
when the row blocks alone cannot fill the GPU.  The forward then also writes partial row statistics
``[split, N]`` (merged by ``_merge``), and the backward adds its ``dq`` rows with atomics.

Deterministic mode (``torch.are_deterministic_algorithms_enabled()`` or ``XLOSS_DETERMINISTIC=1``): the
atomic backward sums in a run-dependent order, so instead the backward launches ``_grad_kernel`` twice
without atomics and without column splits: once over row blocks for ``dq`` (plain read-add-store), once with
the roles of q and k swapped (``Pᵀ`` has the same form with ``(k, col, w)`` as rows and ``(q, row, a)``
as columns) over key blocks for ``dk``.  Cost: 2 recompute sweeps instead of 1, i.e. the backward does
``2·2NMD`` (logits twice) + ``2·2NMD`` (dq, dk) = ``8·NMD`` FLOPs instead of ``6·NMD``, and each launch has
only ``N / BLOCK_M`` (resp. ``M / BLOCK_M``) programs.  The forward is deterministic in both modes.

Precision: inputs are loaded in their dtype (fp32/fp16/bf16) and every dot accumulates in fp32; LSE
statistics, P before its cast, and the outputs are fp32.  For fp16/bf16 inputs ``P`` is cast to the input
dtype before the two gradient dots (as flash attention does: tensor-core dots, the same rounding as a
naive half-precision backward); the power-of-two rescale of the weights above also keeps P in fp16's
range (``a_i ~ 1/N`` would underflow).  fp32 inputs use IEEE fp32 dots when
``torch.get_float32_matmul_precision() == "highest"`` (PyTorch's default) and TF32 otherwise.  float64 is not
supported (TypeError): use the "cpu" backend for it.

Tile sizes are fixed constants below (smaller under ``TRITON_INTERPRET=1`` to keep CPU tests fast); there is
no autotuning yet (``XLOSS_AUTOTUNE`` is not read).  Inputs need unit stride along D (the launchers call
``.contiguous()`` otherwise); any row stride is passed through.  Offsets are 64-bit.
"""

from __future__ import annotations

import os
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from .. import _triton_common as _common
from .._triton_common import dot_tile

# ----------------------------------------------------------------------------------------------- constants

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
# The interpreter uses small tiles (fast numpy steps; tiny test shapes still span several tiles), except when
# XLOSS_TRITON_GPU_TILES=1 asks for the GPU's: tools/check_triton_compiles.py --report records those variants.
_SMALL_TILES = _INTERPRET and os.environ.get("XLOSS_TRITON_GPU_TILES", "0") in ("", "0")

# (BLOCK_M, BLOCK_N, BLOCK_D chunk for D > SINGLE_D_MAX, num_warps, num_stages).  D <= SINGLE_D_MAX is done in
# one chunk of next_power_of_2(D) (>= 16, tl.dot's minimum): the q block and, in the backward, the dq block
# then stay in registers for the whole column loop.
if _SMALL_TILES:  # small tiles: the interpreter runs every block op in numpy, and tests use D up to ~130
    FWD_CONFIG = (32, 32, 32, 4, 1)
    BWD_CONFIG = (32, 32, 32, 4, 1)
    SINGLE_D_MAX = 32
    TARGET_PROGRAMS = 8  # so that small test shapes still exercise the column split
else:
    FWD_CONFIG = (128, 64, 64, 8, 3)
    BWD_CONFIG = (64, 64, 64, 8, 2)
    SINGLE_D_MAX = 128
    TARGET_PROGRAMS = None  # None: 2 programs per SM of the current GPU
# The backward must recompute the forward's logits bit for bit where it can (the statistics are relative to
# the forward's max): the same D chunking in both sweeps.
assert FWD_CONFIG[2] == BWD_CONFIG[2]

_LOG2E = tl.constexpr(1.4426950408889634)  # exp(x) = exp2(x·log2 e): exp2 is the native instruction

# ------------------------------------------------------------------------------------------------- kernels


@triton.jit
def _targets(offs_m, offs_n, row_ok, col_ok, rg, cg, self_offset,
             EXCLUDE_SELF: tl.constexpr, DECOUPLED: tl.constexpr):
    """The target rule of one tile (``engine.py``) before the margin. -> ``(y, keep)`` [BLOCK_M, BLOCK_N] bool

    ``y``: the positive pairs (same group, not the self pair); ``keep``: the entries that both LSEs hold before
    the margin (in range, not the self pair, not a positive when decoupled).  Out-of-range entries are in
    neither, so a caller needs no other mask.
    """
    keep = row_ok[:, None] & col_ok[None, :]
    if EXCLUDE_SELF:  # local indices: the pair (i, i) of the single tower sits at i - j == self_offset
        keep = keep & ((offs_m[:, None] - offs_n[None, :]) != self_offset)
    y = keep & (rg[:, None] == cg[None, :])
    if DECOUPLED:
        keep = keep & (y == 0)
    return y, keep


@triton.jit
def _under_margin(keep, y, dots, thr, HAS_MARGIN: tl.constexpr):
    """``keep`` less the negatives above the margin: ``raw > ref + margin`` (``thr`` = ref + margin, broadcast).

    A row without positive has ref = -inf, so every negative is above it and its set keeps only positives.
    """
    if HAS_MARGIN:
        keep = keep & (y | (dots <= thr))
    return keep


@triton.jit
def _lse_kernel(
    q_ptr, k_ptr,  # [N, D], [M, D] fp32/fp16/bf16, unit stride along D
    scale_ptr,  # [] fp32: the logit scale, read on the device (no host sync)
    pmax_r_ptr, psum_r_ptr,  # [split, N] fp32 out: row max of z, Σ exp(z - max), over each split's columns
    pmax_c_ptr, psum_c_ptr,  # [cdiv(N, BLOCK_M), M] fp32 out: the same per column, per row block (NEED_COLS)
    labels_ptr,  # [N] int64: each row's positive column, in [0, M)
    zpos_ptr,  # [N] fp32 out: z[i, labels[i]], stored by the program whose column range holds the label
    # -- structured targets (STRUCTURED; labels_ptr and zpos_ptr are then unused) --
    qg_ptr, kg_ptr,  # [N], [M] int64 group ids
    thr_r_ptr, thr_c_ptr,  # [N], [M] fp32 margin thresholds ref + margin (HAS_MARGIN; thr_c with NEED_COLS)
    ppos_r_ptr, pcnt_r_ptr,  # [split, N] fp32 out: Σ_j Y_ij z_ij and Σ_j Y_ij over each split's columns
    ppos_c_ptr, pcnt_c_ptr,  # [cdiv(N, BLOCK_M), M] fp32 out: the same per column, per row block (NEED_COLS)
    self_offset,  # int: the self pair is i - j == self_offset (EXCLUDE_SELF)
    hardness,  # float: negatives' logits are (scale + hardness)·dot
    N, M, D, stride_qn, stride_kn,
    cols_per_split,  # columns per split, a multiple of BLOCK_N
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    SINGLE_D: tl.constexpr,  # D <= BLOCK_D: load the q block once, outside the column loop
    NEED_COLS: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    STRUCTURED: tl.constexpr = False,  # the target rule of engine.py instead of labels
    EXCLUDE_SELF: tl.constexpr = False, DECOUPLED: tl.constexpr = False, HAS_MARGIN: tl.constexpr = False,
):
    # grid: (cdiv(N, BLOCK_M), split).  Logits and maxes are in natural units, z = dot·scale exactly as
    # _grad_kernel recomputes them; only differences z - max (small where it matters) go to base 2.
    pid_m = tl.program_id(0).to(tl.int64)
    pid_s = tl.program_id(1).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # [BLOCK_M] int64
    row_ok = offs_m < N
    scale = tl.load(scale_ptr).to(tl.float32)
    if STRUCTURED:
        scale_h = scale + hardness  # the negatives' scale
        qg = tl.load(qg_ptr + offs_m, mask=row_ok, other=0)
        thr_r = tl.zeros([BLOCK_M], dtype=tl.float32)
        if HAS_MARGIN:
            thr_r = tl.load(thr_r_ptr + offs_m, mask=row_ok, other=0.0)
        pos_s = tl.zeros([BLOCK_M], dtype=tl.float32)  # Σ_j Y_ij z_ij over the columns seen
        pos_n = tl.zeros([BLOCK_M], dtype=tl.float32)  # Σ_j Y_ij
    else:
        label = tl.load(labels_ptr + offs_m, mask=row_ok, other=-1).to(tl.int64)  # [BLOCK_M]; -1: no column
    if SINGLE_D:
        offs_d = tl.arange(0, BLOCK_D)
        q_blk = tl.load(q_ptr + offs_m[:, None] * stride_qn + offs_d[None, :],
                        mask=row_ok[:, None] & (offs_d[None, :] < D), other=0.0)  # [BLOCK_M, BLOCK_D]
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)  # running max of z over the columns seen
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)  # running Σ exp(z - m_i)
    z_pos = tl.zeros([BLOCK_M], dtype=tl.float32)  # z[i, label_i] once its tile is seen (+0.0 terms: exact)
    n_lo = pid_s * cols_per_split
    n_hi = tl.minimum(n_lo + cols_per_split, M)
    for start_n in range(n_lo, n_hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N).to(tl.int64)  # [BLOCK_N]
        col_ok = offs_n < M
        if SINGLE_D:
            k_blk = tl.load(k_ptr + offs_n[:, None] * stride_kn + offs_d[None, :],
                            mask=col_ok[:, None] & (offs_d[None, :] < D), other=0.0)  # [BLOCK_N, BLOCK_D]
            dots = tl.dot(q_blk, tl.trans(k_blk), input_precision=INPUT_PRECISION)
        else:
            dots = dot_tile(q_ptr, k_ptr, offs_m, offs_n, row_ok, col_ok, D, stride_qn, stride_kn,
                            BLOCK_M, BLOCK_N, BLOCK_D, INPUT_PRECISION)
        z = dots * scale  # [BLOCK_M, BLOCK_N]; masked rows/cols read zeros, so every entry is finite
        if STRUCTURED:
            cg = tl.load(kg_ptr + offs_n, mask=col_ok, other=0)
            y, keep = _targets(offs_m, offs_n, row_ok, col_ok, qg, cg, self_offset, EXCLUDE_SELF, DECOUPLED)
            z_y = tl.where(y, z, 0.0)  # the positives' z, without hardness
            y_f = y.to(tl.float32)
            pos_s += tl.sum(z_y, 1)
            pos_n += tl.sum(y_f, 1)
            # ẑ: negatives at (scale + hardness)·dot, one rounding that only a select consumes, so the backward
            # recomputes it bit for bit (z + hardness·dot could be contracted into an FMA one way here and
            # another way there); hardness 0 gives z exactly.
            z = tl.where(y, z, dots * scale_h)
            # Row statistics over in_row.  A tile (or a whole row) may hold no entry of the set: its max is
            # -inf, and 0 stands in as the subtrahend so that no -inf - (-inf) reaches exp2 (the sum stays 0).
            z_r = tl.where(_under_margin(keep, y, dots, thr_r[:, None], HAS_MARGIN), z, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(z_r, 1))
            m_sub = tl.where(m_new == float("-inf"), 0.0, m_new)
            l_i = l_i * tl.exp2((m_i - m_sub) * _LOG2E) + tl.sum(tl.exp2((z_r - m_sub[:, None]) * _LOG2E), 1)
            m_i = m_new
            if NEED_COLS:
                thr_c = tl.zeros([BLOCK_N], dtype=tl.float32)
                if HAS_MARGIN:
                    thr_c = tl.load(thr_c_ptr + offs_n, mask=col_ok, other=0.0)
                z_c = tl.where(_under_margin(keep, y, dots, thr_c[None, :], HAS_MARGIN), z, float("-inf"))
                c_max = tl.max(z_c, 0)  # [BLOCK_N]; -inf where this row block holds none of the column's set
                c_sub = tl.where(c_max == float("-inf"), 0.0, c_max)
                c_sum = tl.sum(tl.exp2((z_c - c_sub[None, :]) * _LOG2E), 0)
                tl.store(pmax_c_ptr + pid_m * M + offs_n, c_max, mask=col_ok)
                tl.store(psum_c_ptr + pid_m * M + offs_n, c_sum, mask=col_ok)
                tl.store(ppos_c_ptr + pid_m * M + offs_n, tl.sum(z_y, 0), mask=col_ok)
                tl.store(pcnt_c_ptr + pid_m * M + offs_n, tl.sum(y_f, 0), mask=col_ok)
        else:
            # Row statistics: invalid columns are -inf.  Every tile has >= 1 valid column, so the new max is
            # finite and exp2((m_i - m_new)·log2 e) never sees -inf - (-inf) (first tile: exp2(-inf) = 0).
            z_r = tl.where(col_ok[None, :], z, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(z_r, 1))
            l_i = l_i * tl.exp2((m_i - m_new) * _LOG2E) + tl.sum(tl.exp2((z_r - m_new[:, None]) * _LOG2E), 1)
            m_i = m_new
            # The positive logit from the same z (its column is valid, so z_r holds the same value there): one
            # tile holds it, every other term is +0.0, so the sums are exact and z_pos equals that entry.
            z_pos += tl.sum(tl.where(offs_n[None, :] == label[:, None], z, 0.0), 1)
            if NEED_COLS:
                # Column statistics of this row block: invalid rows are -inf; every tile has >= 1 valid row.
                z_c = tl.where(row_ok[:, None], z, float("-inf"))
                c_max = tl.max(z_c, 0)  # [BLOCK_N]
                c_sum = tl.sum(tl.exp2((z_c - c_max[None, :]) * _LOG2E), 0)
                tl.store(pmax_c_ptr + pid_m * M + offs_n, c_max, mask=col_ok)
                tl.store(psum_c_ptr + pid_m * M + offs_n, c_sum, mask=col_ok)
    tl.store(pmax_r_ptr + pid_s * N + offs_m, m_i, mask=row_ok)
    tl.store(psum_r_ptr + pid_s * N + offs_m, l_i, mask=row_ok)
    if STRUCTURED:
        tl.store(ppos_r_ptr + pid_s * N + offs_m, pos_s, mask=row_ok)
        tl.store(pcnt_r_ptr + pid_s * N + offs_m, pos_n, mask=row_ok)
    else:
        # Exactly one program per row has the label in its column range [n_lo, n_hi): no race.
        tl.store(zpos_ptr + offs_m, z_pos, mask=row_ok & (label >= n_lo) & (label < n_hi))


@triton.jit
def _positive_max_kernel(
    q_ptr, k_ptr,  # [N, D], [M, D] fp32/fp16/bf16, unit stride along D
    qg_ptr, kg_ptr,  # [N], [M] int64 group ids
    pmax_r_ptr,  # [split, N] fp32 out: max over each split's columns of the positive pairs' dots, -inf if none
    pmax_c_ptr,  # [cdiv(N, BLOCK_M), M] fp32 out: the same per column, per row block (NEED_COLS)
    self_offset,  # int: the self pair is i - j == self_offset (EXCLUDE_SELF)
    N, M, D, stride_qn, stride_kn,
    cols_per_split,  # columns per split, a multiple of BLOCK_N
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    SINGLE_D: tl.constexpr, NEED_COLS: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    EXCLUDE_SELF: tl.constexpr,
):
    # grid: (cdiv(N, BLOCK_M), split), the tiles and dots of _lse_kernel (same BLOCK_D chunks), so that the
    # margin's reference is one of the very dots that _lse_kernel and _grad_kernel compare with it.
    pid_m = tl.program_id(0).to(tl.int64)
    pid_s = tl.program_id(1).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # [BLOCK_M] int64
    row_ok = offs_m < N
    qg = tl.load(qg_ptr + offs_m, mask=row_ok, other=0)
    if SINGLE_D:
        offs_d = tl.arange(0, BLOCK_D)
        q_blk = tl.load(q_ptr + offs_m[:, None] * stride_qn + offs_d[None, :],
                        mask=row_ok[:, None] & (offs_d[None, :] < D), other=0.0)  # [BLOCK_M, BLOCK_D]
    best = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    n_lo = pid_s * cols_per_split
    n_hi = tl.minimum(n_lo + cols_per_split, M)
    for start_n in range(n_lo, n_hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N).to(tl.int64)  # [BLOCK_N]
        col_ok = offs_n < M
        if SINGLE_D:
            k_blk = tl.load(k_ptr + offs_n[:, None] * stride_kn + offs_d[None, :],
                            mask=col_ok[:, None] & (offs_d[None, :] < D), other=0.0)  # [BLOCK_N, BLOCK_D]
            dots = tl.dot(q_blk, tl.trans(k_blk), input_precision=INPUT_PRECISION)
        else:
            dots = dot_tile(q_ptr, k_ptr, offs_m, offs_n, row_ok, col_ok, D, stride_qn, stride_kn,
                            BLOCK_M, BLOCK_N, BLOCK_D, INPUT_PRECISION)
        cg = tl.load(kg_ptr + offs_n, mask=col_ok, other=0)
        y, _keep = _targets(offs_m, offs_n, row_ok, col_ok, qg, cg, self_offset, EXCLUDE_SELF, False)
        raw = tl.where(y, dots, float("-inf"))  # max only: no exponential, so -inf needs no care
        best = tl.maximum(best, tl.max(raw, 1))
        if NEED_COLS:
            tl.store(pmax_c_ptr + pid_m * M + offs_n, tl.max(raw, 0), mask=col_ok)
    tl.store(pmax_r_ptr + pid_s * N + offs_m, best, mask=row_ok)


@triton.jit
def _grad_kernel(
    q_ptr, k_ptr,  # [N, D] "rows", [M, D] "columns" (swapped for the dk launch of the deterministic mode)
    scale_ptr,  # [] fp32
    st_r_ptr,  # [3, N] fp32 (ROW_TERM): per row m_i, shift_i = log Σ_j exp(z_ij - m_i) - log|a_i|, sign(a_i)
    st_c_ptr,  # [3, M] fp32: the same per column, with the column-softmax weight w_j (COL_TERM)
    dq_ptr,  # [N, D] fp32 in/out (contiguous, zero-initialised): += P k
    dk_ptr,  # [M, D] fp32 in/out (contiguous, zero-initialised): += Pᵀ q with atomics (COMPUTE_DK)
    # -- structured targets (STRUCTURED): P becomes G of engine.py, on ẑ, masked, less the positives' weights --
    rg_ptr, cg_ptr,  # [N], [M] int64 group ids of the rows and of the columns
    thr_r_ptr, thr_c_ptr,  # [N], [M] fp32 margin thresholds ref + margin (HAS_MARGIN; with ROW_TERM / COL_TERM)
    pr_ptr, pc_ptr,  # [N], [M] fp32 positive weights: G_ij -= Y_ij·(pr_i + pc_j)
    self_offset,  # int: the self pair is i - j == self_offset (EXCLUDE_SELF)
    hardness,  # float: negatives' logits are (scale + hardness)·dot
    N, M, D, stride_qn, stride_kn,
    cols_per_split,  # columns per split, a multiple of BLOCK_N
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    SINGLE_D: tl.constexpr,  # D <= BLOCK_D: q block and dq accumulator stay in registers
    ROW_TERM: tl.constexpr,  # P has the a_i·exp((z - m_i) - ls_i) part
    COL_TERM: tl.constexpr,  # P has the w_j·exp((z - m_j) - ls_j) part
    COMPUTE_DK: tl.constexpr,  # also atomically accumulate dk (the default, one-sweep backward)
    DQ_ATOMIC: tl.constexpr,  # several programs (column splits) share these dq rows
    INPUT_PRECISION: tl.constexpr,
    STRUCTURED: tl.constexpr = False,  # the target rule of engine.py
    EXCLUDE_SELF: tl.constexpr = False, DECOUPLED: tl.constexpr = False, HAS_MARGIN: tl.constexpr = False,
):
    # grid: (cdiv(N, BLOCK_M), split).  P_ij = sign_i·exp2((z_ij - m_i)·log2 e - shift_i·log2 e) + (same per
    # column j), with z = dot·scale in natural units as in _lse_kernel: the max is subtracted first, so the
    # exponent is small wherever P is not negligible and no |z|-sized number reaches exp2.
    pid_m = tl.program_id(0).to(tl.int64)
    pid_s = tl.program_id(1).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # [BLOCK_M] int64
    row_ok = offs_m < N
    offs_d = tl.arange(0, BLOCK_D)
    scale = tl.load(scale_ptr).to(tl.float32)
    max_r = tl.zeros([BLOCK_M], dtype=tl.float32)
    shift2_r = tl.zeros([BLOCK_M], dtype=tl.float32)
    sign_r = tl.zeros([BLOCK_M], dtype=tl.float32)
    if ROW_TERM:
        max_r = tl.load(st_r_ptr + offs_m, mask=row_ok, other=0.0)
        shift2_r = tl.load(st_r_ptr + N + offs_m, mask=row_ok, other=0.0) * _LOG2E  # +inf where a_i = 0
        sign_r = tl.load(st_r_ptr + N + N + offs_m, mask=row_ok, other=0.0)
    if STRUCTURED:
        scale_h = scale + hardness  # the negatives' scale, as in _lse_kernel
        rg = tl.load(rg_ptr + offs_m, mask=row_ok, other=0)
        pos_r = tl.load(pr_ptr + offs_m, mask=row_ok, other=0.0)
        thr_r = tl.zeros([BLOCK_M], dtype=tl.float32)
        if HAS_MARGIN and ROW_TERM:
            thr_r = tl.load(thr_r_ptr + offs_m, mask=row_ok, other=0.0)
    if SINGLE_D:
        d_ok = offs_d < D
        q_blk = tl.load(q_ptr + offs_m[:, None] * stride_qn + offs_d[None, :],
                        mask=row_ok[:, None] & d_ok[None, :], other=0.0)  # [BLOCK_M, BLOCK_D]
        dq_acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    n_lo = pid_s * cols_per_split
    n_hi = tl.minimum(n_lo + cols_per_split, M)
    for start_n in range(n_lo, n_hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N).to(tl.int64)  # [BLOCK_N]
        col_ok = offs_n < M
        if SINGLE_D:
            k_blk = tl.load(k_ptr + offs_n[:, None] * stride_kn + offs_d[None, :],
                            mask=col_ok[:, None] & d_ok[None, :], other=0.0)  # [BLOCK_N, BLOCK_D]
            dots = tl.dot(q_blk, tl.trans(k_blk), input_precision=INPUT_PRECISION)
        else:
            dots = dot_tile(q_ptr, k_ptr, offs_m, offs_n, row_ok, col_ok, D, stride_qn, stride_kn,
                            BLOCK_M, BLOCK_N, BLOCK_D, INPUT_PRECISION)
        # Out-of-range entries read zeros (z = 0) and their max/shift read 0, so exp(z - max) would be
        # exp(0) (and overflow for a far-away max): make them -inf so that both exponentials give exactly 0
        # there (else inf·0 = NaN in the dots below).  A zero weight has shift +inf: exp2(-inf)·0 = 0.
        z = tl.where(row_ok[:, None] & col_ok[None, :], dots * scale, float("-inf"))  # [BLOCK_M, BLOCK_N]
        if STRUCTURED:
            cg = tl.load(cg_ptr + offs_n, mask=col_ok, other=0)
            y, keep = _targets(offs_m, offs_n, row_ok, col_ok, rg, cg, self_offset, EXCLUDE_SELF, DECOUPLED)
            # ẑ as in _lse_kernel, bit for bit (same dots); out of range stays -inf
            z = tl.where(y, z, tl.where(row_ok[:, None] & col_ok[None, :], dots * scale_h, float("-inf")))
        p = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        if ROW_TERM:
            p_r = sign_r[:, None] * tl.exp2((z - max_r[:, None]) * _LOG2E - shift2_r[:, None])
            if STRUCTURED:
                # Outside in_row the exponential may be anything (inf above a margin-dropped max, inf·0):
                # select 0 there rather than multiply by a mask.
                p_r = tl.where(_under_margin(keep, y, dots, thr_r[:, None], HAS_MARGIN), p_r, 0.0)
            p += p_r
        if COL_TERM:
            max_c = tl.load(st_c_ptr + offs_n, mask=col_ok, other=0.0)
            shift2_c = tl.load(st_c_ptr + M + offs_n, mask=col_ok, other=0.0) * _LOG2E
            sign_c = tl.load(st_c_ptr + M + M + offs_n, mask=col_ok, other=0.0)
            p_c = sign_c[None, :] * tl.exp2((z - max_c[None, :]) * _LOG2E - shift2_c[None, :])
            if STRUCTURED:
                thr_c = tl.zeros([BLOCK_N], dtype=tl.float32)
                if HAS_MARGIN:
                    thr_c = tl.load(thr_c_ptr + offs_n, mask=col_ok, other=0.0)
                p_c = tl.where(_under_margin(keep, y, dots, thr_c[None, :], HAS_MARGIN), p_c, 0.0)
            p += p_c
        if STRUCTURED:
            pos_c = tl.load(pc_ptr + offs_n, mask=col_ok, other=0.0)
            p -= tl.where(y, pos_r[:, None] + pos_c[None, :], 0.0)
        p_in = p.to(q_ptr.dtype.element_ty)  # half inputs: half P for tensor-core dots (fp32 stays fp32)
        if SINGLE_D:
            dq_acc += tl.dot(p_in, k_blk, input_precision=INPUT_PRECISION)
            if COMPUTE_DK:
                dk_part = tl.dot(tl.trans(p_in), q_blk, input_precision=INPUT_PRECISION)  # [BLOCK_N, BLOCK_D]
                tl.atomic_add(dk_ptr + offs_n[:, None] * D + offs_d[None, :], dk_part,
                              mask=col_ok[:, None] & d_ok[None, :], sem="relaxed")
        else:
            # D too large for a register accumulator: per D chunk, dq rows += P k_c in global memory (this
            # program owns them unless DQ_ATOMIC) and dk rows += Pᵀ q_c with atomics.
            for d0 in range(0, D, BLOCK_D):
                offs_dc = d0 + offs_d
                dc_ok = offs_dc < D
                k_c = tl.load(k_ptr + offs_n[:, None] * stride_kn + offs_dc[None, :],
                              mask=col_ok[:, None] & dc_ok[None, :], other=0.0)  # [BLOCK_N, BLOCK_D]
                dq_ptrs = dq_ptr + offs_m[:, None] * D + offs_dc[None, :]
                dq_mask = row_ok[:, None] & dc_ok[None, :]
                dq_c = tl.dot(p_in, k_c, input_precision=INPUT_PRECISION)  # [BLOCK_M, BLOCK_D]
                if DQ_ATOMIC:
                    tl.atomic_add(dq_ptrs, dq_c, mask=dq_mask, sem="relaxed")
                else:
                    tl.store(dq_ptrs, tl.load(dq_ptrs, mask=dq_mask, other=0.0) + dq_c, mask=dq_mask)
                if COMPUTE_DK:
                    q_c = tl.load(q_ptr + offs_m[:, None] * stride_qn + offs_dc[None, :],
                                  mask=dq_mask, other=0.0)  # [BLOCK_M, BLOCK_D]
                    dk_c = tl.dot(tl.trans(p_in), q_c, input_precision=INPUT_PRECISION)  # [BLOCK_N, BLOCK_D]
                    tl.atomic_add(dk_ptr + offs_n[:, None] * D + offs_dc[None, :], dk_c,
                                  mask=col_ok[:, None] & dc_ok[None, :], sem="relaxed")
    if SINGLE_D:
        dq_ptrs = dq_ptr + offs_m[:, None] * D + offs_d[None, :]
        if DQ_ATOMIC:
            tl.atomic_add(dq_ptrs, dq_acc, mask=row_ok[:, None] & d_ok[None, :], sem="relaxed")
        else:
            tl.store(dq_ptrs, dq_acc, mask=row_ok[:, None] & d_ok[None, :])


# ----------------------------------------------------------------------------------------------- launchers

def _split(row_blocks: int, col_blocks: int, block_n: int, device: torch.device, allow: bool = True):
    target = TARGET_PROGRAMS if TARGET_PROGRAMS is not None else _common.device_programs(device, 2)
    return _common.column_split(row_blocks, col_blocks, block_n, target, allow)


def _scale_arg(scale: torch.Tensor, device: torch.device) -> torch.Tensor:
    return scale.detach().to(device=device, dtype=torch.float32).reshape(())


def _merge(pmax: torch.Tensor, psum: torch.Tensor) -> torch.Tensor:
    """Exact merge of partials ``[B, L]`` (max, Σ exp(z - max)) into ``[2, L]`` (max, log Σ exp(z - max)).

    ``max = max_b pmax_b`` and ``Σ_b psum_b·exp(pmax_b - max)``: only differences of maxes reach ``exp``.
    A non-finite max (a fully masked partial set, which the launchers never produce, or non-finite logits)
    is replaced by 0 as the subtrahend so that no ``-inf - (-inf)`` NaN appears; such partials contribute 0.
    """
    if pmax.shape[0] == 1:
        return torch.stack((pmax[0], torch.log(psum[0])))
    mx = pmax.amax(0)
    ref = torch.where(torch.isfinite(mx), mx, torch.zeros_like(mx))
    total = (psum * torch.exp(pmax - ref)).sum(0)
    return torch.stack((mx, torch.log(total)))


class _Targets(NamedTuple):
    """The target rule's arguments of one kernel launch (``engine.py``), seen from the launch's rows."""

    rg: torch.Tensor  # [rows] int64 group ids
    cg: torch.Tensor  # [cols] int64 group ids
    self_offset: int | None  # the self pair is i - j == self_offset; None: no self pair
    decoupled: bool
    hardness: float
    thr_r: torch.Tensor | None  # [rows] fp32 margin thresholds ref + margin, None without margin (or not needed)
    thr_c: torch.Tensor | None  # [cols] the same per column

    @property
    def has_margin(self) -> bool:
        return self.thr_r is not None or self.thr_c is not None

    def swapped(self) -> _Targets:
        """The same rule with the roles of rows and columns exchanged (the dk launch of deterministic mode):
        ``i - j == off`` becomes ``j - i == -off``; the groups and thresholds trade places."""
        off = None if self.self_offset is None else -self.self_offset
        return _Targets(self.cg, self.rg, off, self.decoupled, self.hardness, self.thr_c, self.thr_r)

    def kernel_args(self, dummy: torch.Tensor) -> tuple:
        """``rg, cg, thr_r, thr_c`` for the kernels (``dummy`` for an absent threshold, never read)."""
        return (self.rg, self.cg, dummy if self.thr_r is None else self.thr_r,
                dummy if self.thr_c is None else self.thr_c)

    def flags(self) -> dict:
        return {"STRUCTURED": True, "EXCLUDE_SELF": self.self_offset is not None, "DECOUPLED": self.decoupled,
                "HAS_MARGIN": self.has_margin}


def _make_targets(device, qg, kg, self_offset, decoupled, hardness, margin, ref_r, ref_c,
                  need_cols: bool) -> _Targets:
    """``_Targets`` of the (q, k) launches: int64 groups on ``device``, thresholds ``ref + margin`` in fp32.

    The thresholds are formed once here, so that every sweep compares the dots with the same fp32 numbers;
    the column threshold only with ``need_cols`` (the column terms).
    """
    def groups(g):
        return g.to(device=device, dtype=torch.int64).contiguous()

    def threshold(ref, name):
        if ref is None:
            raise ValueError(f"false_negative_margin needs {name} (from positive_max) in the masked sweeps")
        return (ref.to(device=device, dtype=torch.float32) + float(margin)).contiguous()

    thr_r = None if margin is None else threshold(ref_r, "ref_r")
    thr_c = None if margin is None or not need_cols else threshold(ref_c, "ref_c")
    off = None if self_offset is None else int(self_offset)
    return _Targets(groups(qg), groups(kg), off, bool(decoupled), float(hardness), thr_r, thr_c)


def _launch_lse(q, k, scale, need_cols: bool, labels, z_pos, targets: _Targets | None):
    """One ``_lse_kernel`` sweep.  Returns its partials ``part_r [P, split, N]`` and ``part_c [P, row blocks, M]``
    (None without ``need_cols``): ``P = 2`` (max, Σ exp(z - max)), or with ``targets`` ``P = 4`` (…, Σ Y z, Σ Y).

    Plain (``targets`` None): ``labels`` and ``z_pos`` as in ``lse``; with ``targets`` both are None.
    """
    n, d = q.shape
    m = k.shape[0]
    block_m, block_n, chunk, num_warps, num_stages = FWD_CONFIG
    block_d, single_d = _common.block_d(d, chunk, SINGLE_D_MAX)
    row_blocks, col_blocks = triton.cdiv(n, block_m), triton.cdiv(m, block_n)
    split, cols_per_split = _split(row_blocks, col_blocks, block_n, q.device)
    planes = 2 if targets is None else 4
    part_r = torch.empty(planes, split, n, dtype=torch.float32, device=q.device)
    part_c = torch.empty(planes, row_blocks, m, dtype=torch.float32, device=q.device) if need_cols else part_r
    dummy = part_r[0]  # for the pointers a constexpr flag leaves unread
    if targets is None:
        structured = (labels, labels, dummy, dummy, dummy, dummy, dummy, dummy, 0, 0.0)
        flags = {}
    else:
        labels, z_pos = targets.rg, dummy
        structured = (*targets.kernel_args(dummy), part_r[2], part_r[3], part_c[2], part_c[3],
                      targets.self_offset or 0, targets.hardness)
        flags = targets.flags()
    _lse_kernel[(row_blocks, split)](
        q, k, _scale_arg(scale, q.device), part_r[0], part_r[1], part_c[0], part_c[1], labels, z_pos,
        *structured, n, m, d, q.stride(0), k.stride(0), cols_per_split,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d, SINGLE_D=single_d, NEED_COLS=need_cols,
        INPUT_PRECISION=_common.input_precision(q.dtype), num_warps=num_warps, num_stages=num_stages, **flags,
    )
    return part_r, (part_c if need_cols else None)


def lse(q: torch.Tensor, k: torch.Tensor, scale: torch.Tensor, need_cols: bool, labels: torch.Tensor,
        keep_logits: bool = False):
    """Split log-sum-exp statistics of ``z = scale · q kᵀ`` over rows and (optionally) columns, and the
    positive logits, one sweep.

    Args:
        q: ``[N, D]``; k: ``[M, D]``: float32/float16/bfloat16, same dtype and device.
        scale: 0-dim tensor (read by the kernel from device memory).
        need_cols: also return the column statistics (symmetric loss).
        labels: ``[N]`` integer tensor on the same device, each query's positive key, values in ``[0, M)``.

    Returns:
        ``row [2, N]`` and ``col [2, M]`` (or None), float32, natural-log units: ``row[0, i] = max_j z_ij``
        and ``row[1, i] = log Σ_j exp(z_ij - row[0, i])``; ``col`` the same over i.  The LSE is
        ``row[0] + row[1]``.  ``z_pos [N]`` float32: ``z[i, labels[i]]``, the same value (same dot, same D
        chunks, same ``· scale``) that the row max was taken over, so ``row[0] - z_pos`` is exactly 0 where
        the positive is the max.  A label outside ``[0, M)`` (not checked here) leaves NaN.
    """
    q, k = _common.unit_stride_rows("info_nce", q, k)
    labels = labels.to(device=q.device, dtype=torch.int64).contiguous()
    z_pos = torch.full((q.shape[0],), float("nan"), dtype=torch.float32, device=q.device)  # every entry written once
    part_r, part_c = _launch_lse(q, k, scale, need_cols, labels, z_pos, None)
    row = _merge(part_r[0], part_r[1])
    col = _merge(part_c[0], part_c[1]) if need_cols else None
    return row, col, z_pos, None  # the kernels never keep the logits (keep_logits is False): backward recomputes


def _kernel_stats(stats: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``[3, L]`` fp32 for ``_grad_kernel``: max, ``shift = ls - log|weight|`` and ``sign(weight)``.

    ``weight·exp((z - max) - ls) = sign·exp((z - max) - shift)``; a zero weight gives shift +inf and sign 0,
    i.e. exactly 0 in the kernel.
    """
    return torch.stack((stats[0], stats[1] - torch.log(weight.abs()), torch.sign(weight)))


def _pow2_norm(*weights: torch.Tensor | None) -> torch.Tensor:
    """The exact power of two ``c`` with ``max |weight| / c`` in (1/2, 1] over all ``weights`` (1 if all are 0)."""
    c = torch.stack([x.abs().amax() for x in weights if x is not None]).amax()
    return torch.where((c > 0) & torch.isfinite(c), torch.exp2(torch.ceil(torch.log2(c))), torch.ones_like(c))


def _launch_grad(rows, cols, scale, st_rows, st_cols, d_rows, d_cols, atomic: bool,
                 targets: _Targets | None = None, pos_rows=None, pos_cols=None):
    """One ``_grad_kernel`` sweep over row blocks of ``rows``: ``d_rows += P cols`` (and ``d_cols += Pᵀ rows``).

    ``st_rows``/``st_cols``: ``[3, L]`` from ``_kernel_stats``, None drops that part of P; ``d_cols`` is used
    only when ``atomic``.  With ``targets`` P is ``G`` of the target rule, ``pos_rows [rows]`` and
    ``pos_cols [cols]`` (fp32) the positive weights of its ``- Y_ij·(pos_i + pos_j)`` part.
    """
    n, d = rows.shape
    m = cols.shape[0]
    block_m, block_n, chunk, num_warps, num_stages = BWD_CONFIG
    block_d, single_d = _common.block_d(d, chunk, SINGLE_D_MAX)
    row_blocks, col_blocks = triton.cdiv(n, block_m), triton.cdiv(m, block_n)
    split, cols_per_split = _split(row_blocks, col_blocks, block_n, rows.device, allow=atomic)
    row_term, col_term = st_rows is not None, st_cols is not None
    dummy = d_rows  # never read: its constexpr flag is off
    if targets is None:
        structured = (dummy, dummy, dummy, dummy, dummy, dummy, 0, 0.0)
        flags = {}
    else:
        structured = (*targets.kernel_args(dummy), pos_rows, pos_cols, targets.self_offset or 0, targets.hardness)
        flags = targets.flags()
    _grad_kernel[(row_blocks, split)](
        rows, cols, scale,
        st_rows if row_term else dummy, st_cols if col_term else dummy,
        d_rows, d_cols if atomic else dummy, *structured,
        n, m, d, rows.stride(0), cols.stride(0), cols_per_split,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d, SINGLE_D=single_d,
        ROW_TERM=row_term, COL_TERM=col_term, COMPUTE_DK=atomic, DQ_ATOMIC=split > 1,
        INPUT_PRECISION=_common.input_precision(rows.dtype), num_warps=num_warps, num_stages=num_stages, **flags,
    )


def grad(q, k, scale, row, col, a, w, logits=None):
    """Unscaled gradient products of one recomputing sweep (two in deterministic mode).

    Args:
        q: ``[N, D]``; k: ``[M, D]``: float32/float16/bfloat16; scale: 0-dim tensor.
        row: ``[2, N]`` row statistics of ``lse`` (max, log Σ exp(z - max)); col: ``[2, M]`` or None, one-way.
        a: ``[N]`` weight of each row softmax; w: ``[M]`` weight of each column softmax, or None.

    Returns:
        ``dq_u = P k`` ``[N, D]`` and ``dk_u = Pᵀ q`` ``[M, D]``, float32, for
        ``P_ij = a_i exp((z_ij - row[0,i]) - row[1,i]) + w_j exp((z_ij - col[0,j]) - col[1,j])``.
    """
    q, k = _common.unit_stride_rows("info_nce", q, k)
    dev = q.device
    cols = col is not None
    f32 = {"dtype": torch.float32, "device": dev}
    row, a = row.to(**f32), a.to(**f32)
    if cols:
        col, w = col.to(**f32), w.to(**f32)
    # Bring the weights to max |weight| in (1/2, 1] by an exact power-of-two factor c, undone on the outputs.
    # Half inputs: P's entries are then probability-sized and do not underflow fp16 (a_i ~ 1/N would).  All
    # dtypes: log|weight| in the shift is then near 0 for the largest weights (uniform a_i = 1/N gives
    # log|a_i/c| = 0), so its rounding does not add log(N)·eps to the exponent where P ≈ 1.
    c = _pow2_norm(a, w)
    st_r = _kernel_stats(row, a / c)
    st_c = _kernel_stats(col, w / c) if cols else None
    s = _scale_arg(scale, dev)
    n, d = q.shape
    m = k.shape[0]
    dq = torch.zeros(n, d, **f32)
    dk = torch.zeros(m, d, **f32)
    if _common.deterministic():
        _launch_grad(q, k, s, st_r, st_c, dq, None, atomic=False)
        _launch_grad(k, q, s, st_c, st_r, dk, None, atomic=False)  # Pᵀ: roles swapped
    else:
        _launch_grad(q, k, s, st_r, st_c, dq, dk, atomic=True)
    dq.mul_(c)
    dk.mul_(c)
    return dq, dk


def keeps_logits(n: int, m: int, itemsize: int) -> bool:
    """Never: the kernels recompute the logit tiles in backward (``InfoNCEEngine`` protocol)."""
    return False


# ------------------------------------------------------------------------------------- structured targets

def positive_max(q, k, qg, kg, self_offset, need_cols):
    """The margin's reference: ``ref_r [N] = max_{j: Y_ij} <q_i, k_j>`` and ``ref_c [M]`` the same per column
    (None unless ``need_cols``), fp32, -inf where there is no positive (``InfoNCEEngine`` protocol).

    One sweep of ``_positive_max_kernel`` over the tiles and dots of ``masked_lse`` (same D chunks), so the
    reference is bit for bit one of the dots the margin later compares with it.
    """
    q, k = _common.unit_stride_rows("info_nce", q, k)
    t = _make_targets(q.device, qg, kg, self_offset, False, 0.0, None, None, None, need_cols)
    n, d = q.shape
    m = k.shape[0]
    block_m, block_n, chunk, num_warps, num_stages = FWD_CONFIG
    block_d, single_d = _common.block_d(d, chunk, SINGLE_D_MAX)
    row_blocks, col_blocks = triton.cdiv(n, block_m), triton.cdiv(m, block_n)
    split, cols_per_split = _split(row_blocks, col_blocks, block_n, q.device)
    part_r = torch.empty(split, n, dtype=torch.float32, device=q.device)
    part_c = torch.empty(row_blocks, m, dtype=torch.float32, device=q.device) if need_cols else part_r
    _positive_max_kernel[(row_blocks, split)](
        q, k, t.rg, t.cg, part_r, part_c, t.self_offset or 0, n, m, d, q.stride(0), k.stride(0), cols_per_split,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d, SINGLE_D=single_d, NEED_COLS=need_cols,
        INPUT_PRECISION=_common.input_precision(q.dtype), EXCLUDE_SELF=t.self_offset is not None,
        num_warps=num_warps, num_stages=num_stages,
    )
    return part_r.amax(0), (part_c.amax(0) if need_cols else None)


def masked_lse(q, k, scale, qg, kg, self_offset, decoupled, hardness, margin, ref_r, ref_c, need_cols):
    """Statistics sweep under the target rule (``InfoNCEEngine.masked_lse``), one ``_lse_kernel`` launch.

    Returns ``row [2, N]`` (split LSE of ẑ over ``in_row``; ``(-inf, -inf)`` for an empty set), ``col [2, M]``
    (or None), ``pos_r [2, N]`` = (Σ_j Y_ij z_ij, Σ_j Y_ij) and ``pos_c [2, M]`` (or None), all fp32.  The
    partial sums of the column splits / row blocks are added in a fixed order: deterministic.
    """
    q, k = _common.unit_stride_rows("info_nce", q, k)
    t = _make_targets(q.device, qg, kg, self_offset, decoupled, hardness, margin, ref_r, ref_c, need_cols)
    part_r, part_c = _launch_lse(q, k, scale, need_cols, None, None, t)
    row = _merge(part_r[0], part_r[1])
    pos_r = part_r[2:].sum(1)
    if not need_cols:
        return row, None, pos_r, None
    return row, _merge(part_c[0], part_c[1]), pos_r, part_c[2:].sum(1)


def _masked_kernel_stats(stats: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``_kernel_stats``, with the statistics of an empty set (max -inf) made inert: max 0, shift +inf, sign 0.

    Such a row has no entry in its set, so the kernel selects 0 for all of it anyway; this keeps the shift
    (``-inf - log|a|``, or NaN for a zero weight) out of the exponent altogether.
    """
    inert = torch.tensor([0.0, float("inf"), 0.0], dtype=torch.float32, device=stats.device)[:, None]
    return torch.where(stats[0] == float("-inf"), inert, _kernel_stats(stats, weight))


def masked_grad(q, k, scale, qg, kg, self_offset, decoupled, hardness, margin, ref_r, ref_c, row, col, a, w,
                pa, pw):
    """Gradient sweep under the target rule (``InfoNCEEngine.masked_grad``): ``dq_u = G k``, ``dk_u = Gᵀ q``,
    fp32, for ``G_ij = in_row·a_i·exp(ẑ_ij - row_i) + in_col·w_j·exp(ẑ_ij - col_j) - Y_ij·(pa_i + pw_j)``.

    One recomputing ``_grad_kernel`` sweep (dk by atomics), or in deterministic mode two atomic-free ones, the
    second with the roles of q and k swapped (``_Targets.swapped``).  ``pw`` is used with ``col`` only (the
    column part); all weights are divided by one power of two, undone on the outputs, as in ``grad``.
    """
    q, k = _common.unit_stride_rows("info_nce", q, k)
    dev = q.device
    cols = col is not None
    f32 = {"dtype": torch.float32, "device": dev}
    n, d = q.shape
    m = k.shape[0]
    row, a, pa = row.to(**f32), a.to(**f32), pa.to(**f32)
    if cols:
        col, w = col.to(**f32), w.to(**f32)
        pw = torch.zeros(m, **f32) if pw is None else pw.to(**f32)
    else:
        pw = torch.zeros(m, **f32)
    c = _pow2_norm(a, pa, w if cols else None, pw)
    st_r = _masked_kernel_stats(row, a / c)
    st_c = _masked_kernel_stats(col, w / c) if cols else None
    pa, pw = (pa / c).contiguous(), (pw / c).contiguous()
    t = _make_targets(dev, qg, kg, self_offset, decoupled, hardness, margin, ref_r, ref_c, cols)
    s = _scale_arg(scale, dev)
    dq = torch.zeros(n, d, **f32)
    dk = torch.zeros(m, d, **f32)
    if _common.deterministic():
        _launch_grad(q, k, s, st_r, st_c, dq, None, False, t, pa, pw)
        _launch_grad(k, q, s, st_c, st_r, dk, None, False, t.swapped(), pw, pa)  # Gᵀ: roles swapped
    else:
        _launch_grad(q, k, s, st_r, st_c, dq, dk, True, t, pa, pw)
    dq.mul_(c)
    dk.mul_(c)
    return dq, dk


# ------------------------------------------------------------------------------------- Matryoshka prefixes
# Prefixes d_1 < ... < d_P of D (issue 12, see matryoshka.py).  A tile accumulates the dots of the D slices
# [d_{p-1}, d_p) in order, cum^p = Σ_{l <= p} <q_i[slice_l], k_j[slice_l]>, and forms every prefix's logits
# z^p = (cum^p·scale)·rq^p_i·rk^p_j from it: the inputs are read once per tile, never once per prefix.
#
# * ``_mrl_lse_kernel``: the statistics of ``_lse_kernel`` per prefix.  The running row statistics, the positive
#   logits and the inverse row norms of the P prefixes are tuples of [BLOCK_M] vectors (loop-carried registers);
#   the column partials go to ``[P, row blocks, M]`` buffers as ``_lse_kernel``'s.
# * ``_mrl_grad_kernel``: recomputes cum^1..cum^P of a tile (a tuple of P register tiles), then runs the prefixes
#   from the widest down: ``G^p`` (``_grad_kernel``'s softmax parts, minus the target entries and smoothing's
#   uniform parts), ``H^p = G^p·rq^p_i·rk^p_j``, the suffix sum ``S = Σ_{l>=p} H^l`` and, for slice p only,
#   ``dq[:, slice_p] += S k[:, slice_p]``, ``dk[:, slice_p] += Sᵀ q[:, slice_p]``: one GEMM sweep over D in all.
#   The inverse norms' gradients are row / column sums of ``G^p·(cum^p·scale)`` weighted by the other side's norms.
#   Targets are given as ids (``rg_i == cg_j``: labels against ``arange(M)``), so that deterministic mode can
#   swap the roles of q and k for its atomic-free dk launch, as ``grad`` does.
#
# Tiles (GPU): narrower than the plain kernels', for the P live dot tiles.  Static sm_90 report at P = 5, bf16
# (tools/check_triton_compiles.py --report): the forward (128, 32), 8 warps, has no spill; the backward spills
# ~4 KB per thread at (64, 32), 8 warps (8 KB at (64, 64); ~1.7 KB already at P = 1), the least of the shapes tried.
# Same BLOCK_D chunks in both sweeps: the backward recomputes the forward's dots bit for bit.
if _SMALL_TILES:
    MRL_FWD_CONFIG = (32, 32, 32, 4, 1)
    MRL_BWD_CONFIG = (32, 32, 32, 4, 1)
else:
    MRL_FWD_CONFIG = (128, 32, 64, 8, 2)
    MRL_BWD_CONFIG = (64, 32, 64, 8, 2)
assert MRL_FWD_CONFIG[2] == MRL_BWD_CONFIG[2]


@triton.jit
def _slice_dots(acc, r_ptr, c_ptr, offs_m, offs_n, row_ok, col_ok, lo, hi, stride_r, stride_c,
                BLOCK_D: tl.constexpr, INPUT_PRECISION: tl.constexpr):
    """``acc + <r_i[lo:hi], c_j[lo:hi]>`` of one tile, in BLOCK_D chunks from ``lo`` (the tail masked to 0)."""
    for d0 in range(lo, hi, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        d_ok = offs_d < hi
        r_c = tl.load(r_ptr + offs_m[:, None] * stride_r + offs_d[None, :],
                      mask=row_ok[:, None] & d_ok[None, :], other=0.0)  # [BLOCK_M, BLOCK_D]
        c_c = tl.load(c_ptr + offs_n[:, None] * stride_c + offs_d[None, :],
                      mask=col_ok[:, None] & d_ok[None, :], other=0.0)  # [BLOCK_N, BLOCK_D]
        acc += tl.dot(r_c, tl.trans(c_c), input_precision=INPUT_PRECISION)
    return acc


@triton.jit
def _mrl_lse_kernel(
    q_ptr, k_ptr,  # [N, D], [M, D] fp32/fp16/bf16, unit stride along D
    rq_ptr, rk_ptr,  # [P, N], [P, M] fp32 inverse prefix norms (NORMS)
    scale_ptr,  # [] fp32
    bounds_ptr,  # [P + 1] int64: 0 = d_0 < d_1 < ... < d_P
    pmax_r_ptr, psum_r_ptr,  # [P, split, N] fp32 out: row max of z^p, Σ exp(z^p - max), per column split
    pmax_c_ptr, psum_c_ptr,  # [P, cdiv(N, BLOCK_M), M] fp32 out: the same per column, per row block (NEED_COLS)
    labels_ptr,  # [N] int64: each row's positive column
    zpos_ptr,  # [P, N] fp32 out: z^p[i, labels[i]], stored by the program whose columns hold the label
    N, M, stride_qn, stride_kn, cols_per_split, split, row_blocks,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    P: tl.constexpr, NORMS: tl.constexpr, NEED_COLS: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):
    # grid: (cdiv(N, BLOCK_M), split), as _lse_kernel.
    pid_m = tl.program_id(0).to(tl.int64)
    pid_s = tl.program_id(1).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = offs_m < N
    scale = tl.load(scale_ptr).to(tl.float32)
    label = tl.load(labels_ptr + offs_m, mask=row_ok, other=-1).to(tl.int64)
    m_t = ()  # per prefix: running max of z over the columns seen
    l_t = ()  # running Σ exp(z - max)
    zp_t = ()  # the positive logit once its tile is seen (+0.0 terms elsewhere: exact)
    rq_t = ()  # the rows' inverse norms
    for p in tl.static_range(P):
        m_t = m_t + (tl.full([BLOCK_M], float("-inf"), dtype=tl.float32),)
        l_t = l_t + (tl.zeros([BLOCK_M], dtype=tl.float32),)
        zp_t = zp_t + (tl.zeros([BLOCK_M], dtype=tl.float32),)
        if NORMS:
            rq_t = rq_t + (tl.load(rq_ptr + p * N + offs_m, mask=row_ok, other=0.0),)
    n_lo = pid_s * cols_per_split
    n_hi = tl.minimum(n_lo + cols_per_split, M)
    for start_n in range(n_lo, n_hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N).to(tl.int64)
        col_ok = offs_n < M
        cum = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        new_m = ()
        new_l = ()
        new_zp = ()
        for p in tl.static_range(P):
            cum = _slice_dots(cum, q_ptr, k_ptr, offs_m, offs_n, row_ok, col_ok, tl.load(bounds_ptr + p),
                              tl.load(bounds_ptr + p + 1), stride_qn, stride_kn, BLOCK_D, INPUT_PRECISION)
            z = cum * scale  # masked rows/cols read zeros (and zero norms): every entry is finite
            if NORMS:
                rk_p = tl.load(rk_ptr + p * M + offs_n, mask=col_ok, other=0.0)
                z = z * rq_t[p][:, None] * rk_p[None, :]
            z_r = tl.where(col_ok[None, :], z, float("-inf"))
            m_p = tl.maximum(m_t[p], tl.max(z_r, 1))
            new_l = new_l + (l_t[p] * tl.exp2((m_t[p] - m_p) * _LOG2E)
                             + tl.sum(tl.exp2((z_r - m_p[:, None]) * _LOG2E), 1),)
            new_m = new_m + (m_p,)
            new_zp = new_zp + (zp_t[p] + tl.sum(tl.where(offs_n[None, :] == label[:, None], z, 0.0), 1),)
            if NEED_COLS:
                z_c = tl.where(row_ok[:, None], z, float("-inf"))
                c_max = tl.max(z_c, 0)
                c_sum = tl.sum(tl.exp2((z_c - c_max[None, :]) * _LOG2E), 0)
                tl.store(pmax_c_ptr + (p * row_blocks + pid_m) * M + offs_n, c_max, mask=col_ok)
                tl.store(psum_c_ptr + (p * row_blocks + pid_m) * M + offs_n, c_sum, mask=col_ok)
        m_t = new_m
        l_t = new_l
        zp_t = new_zp
    has_label = row_ok & (label >= n_lo) & (label < n_hi)
    for p in tl.static_range(P):
        tl.store(pmax_r_ptr + (p * split + pid_s) * N + offs_m, m_t[p], mask=row_ok)
        tl.store(psum_r_ptr + (p * split + pid_s) * N + offs_m, l_t[p], mask=row_ok)
        tl.store(zpos_ptr + p * N + offs_m, zp_t[p], mask=has_label)


@triton.jit
def _mrl_grad_kernel(
    r_ptr, c_ptr,  # [R, D] "rows", [C, D] "columns": q and k (swapped for the dk launch of deterministic mode)
    nr_ptr, nc_ptr,  # [P, R], [P, C] fp32 inverse prefix norms (NORMS)
    scale_ptr,  # [] fp32
    bounds_ptr,  # [P + 1] int64 prefix bounds
    st_r_ptr,  # [P, 3, R] fp32 (ROW_TERM): per prefix the row max, shift = logsum - log|a|, sign(a)
    st_c_ptr,  # [P, 3, C] fp32 (COL_TERM): the same per column
    rg_ptr, cg_ptr,  # [R], [C] int64 ids: (i, j) is a target entry iff rg_i == cg_j
    pr_ptr, pc_ptr,  # [P, R], [P, C] fp32 target weights: G -= [rg_i == cg_j]·(pr_i + pc_j)
    ur_ptr, uc_ptr,  # [P, R], [P, C] fp32 uniform parts of label smoothing: G -= ur_i + uc_j (SMOOTH)
    d_r_ptr,  # [R, D] fp32 in/out (contiguous): += S c, per slice
    d_c_ptr,  # [C, D] fp32 in/out (contiguous): += Sᵀ r with atomics (COMPUTE_DC)
    dn_r_ptr,  # [P, R] fp32 in/out: the gradient of the rows' inverse norms (NORMS)
    dn_c_ptr,  # [P, C] fp32 in/out: the columns', with atomics (NORMS and COMPUTE_DC)
    R, C, D, stride_r, stride_c, cols_per_split,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, P: tl.constexpr,
    NORMS: tl.constexpr, ROW_TERM: tl.constexpr, COL_TERM: tl.constexpr, SMOOTH: tl.constexpr,
    COMPUTE_DC: tl.constexpr, ROW_ATOMIC: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):
    # grid: (cdiv(R, BLOCK_M), split).  z^p recomputed exactly as _mrl_lse_kernel forms it (same slices, chunks
    # and products), the max subtracted first as in _grad_kernel.
    pid_m = tl.program_id(0).to(tl.int64)
    pid_s = tl.program_id(1).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = offs_m < R
    scale = tl.load(scale_ptr).to(tl.float32)
    rg = tl.load(rg_ptr + offs_m, mask=row_ok, other=-1)
    # The per-row vectors of each prefix are (re)loaded in every tile, from cache: kept live across the column
    # loop, 6·P of them would crowd out the P dot tiles in registers.  Only the norm gradients are carried.
    dn_t = ()
    for p in tl.static_range(P):
        if NORMS:
            dn_t = dn_t + (tl.zeros([BLOCK_M], dtype=tl.float32),)
    offs_d0 = tl.arange(0, BLOCK_D)
    n_lo = pid_s * cols_per_split
    n_hi = tl.minimum(n_lo + cols_per_split, C)
    for start_n in range(n_lo, n_hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N).to(tl.int64)
        col_ok = offs_n < C
        ok = row_ok[:, None] & col_ok[None, :]
        cg = tl.load(cg_ptr + offs_n, mask=col_ok, other=-2)
        y = ok & (rg[:, None] == cg[None, :])
        cums = ()  # cum^1 .. cum^P of this tile
        cum = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for p in tl.static_range(P):
            cum = _slice_dots(cum, r_ptr, c_ptr, offs_m, offs_n, row_ok, col_ok, tl.load(bounds_ptr + p),
                              tl.load(bounds_ptr + p + 1), stride_r, stride_c, BLOCK_D, INPUT_PRECISION)
            cums = cums + (cum,)
        s_acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)  # Σ_{l >= p} H^l
        new_dn = ()
        for p in tl.static_range(P - 1, -1, -1):  # the widest prefix first
            z = cums[p] * scale
            if NORMS:
                nr_p = tl.load(nr_ptr + p * R + offs_m, mask=row_ok, other=0.0)
                nc_p = tl.load(nc_ptr + p * C + offs_n, mask=col_ok, other=0.0)
                z = z * nr_p[:, None] * nc_p[None, :]
            z = tl.where(ok, z, float("-inf"))  # out of range: both exponentials exactly 0
            g = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
            if ROW_TERM:
                max_r = tl.load(st_r_ptr + (p * 3) * R + offs_m, mask=row_ok, other=0.0)
                shift2_r = tl.load(st_r_ptr + (p * 3 + 1) * R + offs_m, mask=row_ok, other=0.0) * _LOG2E
                sign_r = tl.load(st_r_ptr + (p * 3 + 2) * R + offs_m, mask=row_ok, other=0.0)
                g += sign_r[:, None] * tl.exp2((z - max_r[:, None]) * _LOG2E - shift2_r[:, None])
            if COL_TERM:
                max_c = tl.load(st_c_ptr + (p * 3) * C + offs_n, mask=col_ok, other=0.0)
                shift2_c = tl.load(st_c_ptr + (p * 3 + 1) * C + offs_n, mask=col_ok, other=0.0) * _LOG2E
                sign_c = tl.load(st_c_ptr + (p * 3 + 2) * C + offs_n, mask=col_ok, other=0.0)
                g += sign_c[None, :] * tl.exp2((z - max_c[None, :]) * _LOG2E - shift2_c[None, :])
            pr = tl.load(pr_ptr + p * R + offs_m, mask=row_ok, other=0.0)
            pc = tl.load(pc_ptr + p * C + offs_n, mask=col_ok, other=0.0)
            g -= tl.where(y, pr[:, None] + pc[None, :], 0.0)
            if SMOOTH:
                ur = tl.load(ur_ptr + p * R + offs_m, mask=row_ok, other=0.0)
                uc = tl.load(uc_ptr + p * C + offs_n, mask=col_ok, other=0.0)
                g -= tl.where(ok, ur[:, None] + uc[None, :], 0.0)
            if NORMS:
                t = g * (cums[p] * scale)  # ∂z^p/∂nr_i = (cum·scale)·nc_j, and likewise per column
                new_dn = (dn_t[p] + tl.sum(t * nc_p[None, :], 1),) + new_dn
                if COMPUTE_DC:
                    tl.atomic_add(dn_c_ptr + p * C + offs_n, tl.sum(t * nr_p[:, None], 0), mask=col_ok,
                                  sem="relaxed")
                g = g * nr_p[:, None] * nc_p[None, :]
            s_acc += g
            s_in = s_acc.to(r_ptr.dtype.element_ty)  # half inputs: half S for tensor-core dots, as _grad_kernel
            for d0 in range(tl.load(bounds_ptr + p), tl.load(bounds_ptr + p + 1), BLOCK_D):
                offs_d = d0 + offs_d0
                d_ok = offs_d < tl.load(bounds_ptr + p + 1)
                c_c = tl.load(c_ptr + offs_n[:, None] * stride_c + offs_d[None, :],
                              mask=col_ok[:, None] & d_ok[None, :], other=0.0)  # [BLOCK_N, BLOCK_D]
                dr_ptrs = d_r_ptr + offs_m[:, None] * D + offs_d[None, :]
                dr_mask = row_ok[:, None] & d_ok[None, :]
                dr_c = tl.dot(s_in, c_c, input_precision=INPUT_PRECISION)
                if ROW_ATOMIC:
                    tl.atomic_add(dr_ptrs, dr_c, mask=dr_mask, sem="relaxed")
                else:
                    tl.store(dr_ptrs, tl.load(dr_ptrs, mask=dr_mask, other=0.0) + dr_c, mask=dr_mask)
                if COMPUTE_DC:
                    r_c = tl.load(r_ptr + offs_m[:, None] * stride_r + offs_d[None, :], mask=dr_mask, other=0.0)
                    dc_c = tl.dot(tl.trans(s_in), r_c, input_precision=INPUT_PRECISION)
                    tl.atomic_add(d_c_ptr + offs_n[:, None] * D + offs_d[None, :], dc_c,
                                  mask=col_ok[:, None] & d_ok[None, :], sem="relaxed")
        if NORMS:
            dn_t = new_dn
    if NORMS:
        for p in tl.static_range(P):
            if ROW_ATOMIC:
                tl.atomic_add(dn_r_ptr + p * R + offs_m, dn_t[p], mask=row_ok, sem="relaxed")
            else:
                tl.store(dn_r_ptr + p * R + offs_m, dn_t[p], mask=row_ok)


def _bounds(dims, device) -> torch.Tensor:
    return torch.tensor((0, *dims), dtype=torch.int64, device=device)


def _merge_prefixes(pmax: torch.Tensor, psum: torch.Tensor) -> torch.Tensor:
    """``_merge`` per prefix: partials ``[P, B, L]`` → ``[P, 2, L]``."""
    p, b, n = pmax.shape
    merged = _merge(pmax.transpose(0, 1).reshape(b, p * n), psum.transpose(0, 1).reshape(b, p * n))
    return merged.view(2, p, n).transpose(0, 1)


def matryoshka_lse(q, k, rq, rk, scale, dims, need_cols: bool, labels):
    """Per-prefix split LSE statistics and positive logits, one ``_mrl_lse_kernel`` sweep (``InfoNCEEngine``).

    Returns ``row [P, 2, N]``, ``col [P, 2, M]`` (or None), ``z_pos [P, N]``, float32.
    """
    q, k = _common.unit_stride_rows("info_nce", q, k)
    dev = q.device
    f32 = {"dtype": torch.float32, "device": dev}
    P, n, m = len(dims), q.shape[0], k.shape[0]
    block_m, block_n, chunk, num_warps, num_stages = MRL_FWD_CONFIG
    row_blocks, col_blocks = triton.cdiv(n, block_m), triton.cdiv(m, block_n)
    split, cols_per_split = _split(row_blocks, col_blocks, block_n, dev)
    part_r = torch.empty(2, P, split, n, **f32)
    part_c = torch.empty(2, P, row_blocks, m, **f32) if need_cols else part_r
    z_pos = torch.full((P, n), float("nan"), **f32)  # every entry written once
    norms = rq is not None
    rq_arg = rq.to(**f32).contiguous() if norms else z_pos
    rk_arg = rk.to(**f32).contiguous() if norms else z_pos
    labels = labels.to(device=dev, dtype=torch.int64).contiguous()
    _mrl_lse_kernel[(row_blocks, split)](
        q, k, rq_arg, rk_arg, _scale_arg(scale, dev), _bounds(dims, dev), part_r[0], part_r[1], part_c[0],
        part_c[1], labels, z_pos, n, m, q.stride(0), k.stride(0), cols_per_split, split, row_blocks,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=chunk, P=P, NORMS=norms, NEED_COLS=need_cols,
        INPUT_PRECISION=_common.input_precision(q.dtype), num_warps=num_warps, num_stages=num_stages,
    )
    row = _merge_prefixes(part_r[0], part_r[1])
    col = _merge_prefixes(part_c[0], part_c[1]) if need_cols else None
    return row, col, z_pos


def _launch_mrl_grad(rows, cols, n_rows, n_cols, scale, bounds, st_rows, st_cols, g_rows, g_cols, p_rows, p_cols,
                     u_rows, u_cols, d_rows, d_cols, dn_rows, dn_cols, atomic: bool):
    """One ``_mrl_grad_kernel`` sweep over row blocks of ``rows`` (see ``_launch_grad``); ``d_cols``/``dn_cols``
    only when ``atomic``; ``n_rows`` None: no norms; ``u_rows`` None: no smoothing."""
    n, d = rows.shape
    m = cols.shape[0]
    P = bounds.shape[0] - 1
    block_m, block_n, chunk, num_warps, num_stages = MRL_BWD_CONFIG
    row_blocks, col_blocks = triton.cdiv(n, block_m), triton.cdiv(m, block_n)
    split, cols_per_split = _split(row_blocks, col_blocks, block_n, rows.device, allow=atomic)
    dummy = d_rows  # never read: its constexpr flag is off
    norms, smooth = n_rows is not None, u_rows is not None

    def arg(x):
        return dummy if x is None else x

    _mrl_grad_kernel[(row_blocks, split)](
        rows, cols, arg(n_rows), arg(n_cols), scale, bounds, arg(st_rows), arg(st_cols), g_rows, g_cols, p_rows,
        p_cols, arg(u_rows), arg(u_cols), d_rows, arg(d_cols if atomic else None), arg(dn_rows),
        arg(dn_cols if atomic else None), n, m, d, rows.stride(0), cols.stride(0), cols_per_split,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=chunk, P=P, NORMS=norms, ROW_TERM=st_rows is not None,
        COL_TERM=st_cols is not None, SMOOTH=smooth, COMPUTE_DC=atomic, ROW_ATOMIC=split > 1,
        INPUT_PRECISION=_common.input_precision(rows.dtype), num_warps=num_warps, num_stages=num_stages,
    )


def _prefix_kernel_stats(stats: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``_kernel_stats`` per prefix: ``[P, 2, L]`` statistics and ``[P, L]`` weights → ``[P, 3, L]``."""
    return torch.stack((stats[:, 0], stats[:, 1] - torch.log(weight.abs()), torch.sign(weight)), 1).contiguous()


def matryoshka_grad(q, k, rq, rk, scale, dims, row, col, a, w, labels, pos, u, v):
    """One recomputing ``_mrl_grad_kernel`` sweep (two in deterministic mode): ``(dq_u [N, D], dk_u [M, D],
    drq [P, N] | None, drk [P, M] | None)``, float32, as ``chunked.matryoshka_grad`` (``InfoNCEEngine``)."""
    q, k = _common.unit_stride_rows("info_nce", q, k)
    dev = q.device
    f32 = {"dtype": torch.float32, "device": dev}
    P, (n, d), m = len(dims), q.shape, k.shape[0]
    cols = col is not None
    a, pos = a.to(**f32), pos.to(**f32)
    w = w.to(**f32) if cols else None
    c = _pow2_norm(a, w)  # as grad: max |weight| in (1/2, 1] by an exact power of two, undone on the outputs
    st_r = _prefix_kernel_stats(row.to(**f32), a / c)
    st_c = _prefix_kernel_stats(col.to(**f32), w / c) if cols else None
    p_q, p_k = (pos / c).contiguous(), torch.zeros(P, m, **f32)
    u_q = u_k = None
    if u is not None:
        u_q = (u.to(**f32) / c).contiguous()
        u_k = torch.zeros(P, m, **f32) if v is None else (v.to(**f32) / c).contiguous()
    norms = rq is not None
    n_q = rq.to(**f32).contiguous() if norms else None
    n_k = rk.to(**f32).contiguous() if norms else None
    g_q = labels.to(device=dev, dtype=torch.int64).contiguous()  # target entries: labels[i] == j
    g_k = torch.arange(m, device=dev, dtype=torch.int64)
    s, bounds = _scale_arg(scale, dev), _bounds(dims, dev)
    dq, dk = torch.zeros(n, d, **f32), torch.zeros(m, d, **f32)
    drq, drk = (torch.zeros(P, n, **f32), torch.zeros(P, m, **f32)) if norms else (None, None)
    if _common.deterministic():
        _launch_mrl_grad(q, k, n_q, n_k, s, bounds, st_r, st_c, g_q, g_k, p_q, p_k, u_q, u_k, dq, None, drq, None,
                         atomic=False)
        _launch_mrl_grad(k, q, n_k, n_q, s, bounds, st_c, st_r, g_k, g_q, p_k, p_q, u_k, u_q, dk, None, drk, None,
                         atomic=False)  # Gᵀ: roles swapped
    else:
        _launch_mrl_grad(q, k, n_q, n_k, s, bounds, st_r, st_c, g_q, g_k, p_q, p_k, u_q, u_k, dq, dk, drq, drk,
                         atomic=True)
    dq.mul_(c)
    dk.mul_(c)
    if norms:
        drq.mul_(c)
        drk.mul_(c)
    return dq, dk, drq, drk
