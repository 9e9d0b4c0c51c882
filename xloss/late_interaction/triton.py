"""The Triton path of late interaction (MaxSim): the forward sweep as one fused GPU kernel.

Implements :class:`~xloss.late_interaction.engine.MaxSimEngine`, as ``chunked.py`` (the autograd Function in
``__init__`` does the rest): ``maxsim_fwd`` and ``maxsim_bwd``, the shared torch backward of ``backward.py`` run
with ``route``, this engine's routing primitive (a gather kernel for the weighted side, an atomic or deterministic scatter
kernel for the other side; see the "backward" section below):

* ``maxsim_fwd(q, d, q_w, d_w, q_valid, d_valid, zero_mode, q2d, d2q)``: ``_maxsim_kernel``.  The kernel is
  written for a generic pair of token sets, "rows" ``x [Nx, Lx, D]`` and "columns" ``y [Ny, Ly, D]``.  A
  program owns ``BLOCK_A`` row entities (queries) and a contiguous range of column entities (documents).
  Their tokens are packed into the rows of one tile, ``BLOCK_M = BLOCK_A · T_PAD`` (row ``r`` is token
  ``r % T_PAD`` of entity ``r // T_PAD``; ``T_PAD = next_power_of_2(Lx)``), so that short queries (ColBERT's
  32 tokens) still give tensor-core-sized dots and every loaded document tile serves ``BLOCK_A`` queries.
  For each document ``b`` the program walks the document's tokens in ``BLOCK_V`` blocks and computes the
  similarity tile ``sim [BLOCK_M, BLOCK_V]`` with ``tl.dot`` (fp32 accumulation, over ``BLOCK_D`` chunks of
  D when D is large; the row block stays in registers for the whole document loop when D fits one chunk).
  From that one tile:

  - the row direction (``ROW``, q2d when rows are queries): a running max and arg-max over the column tokens
    per row token.  The candidates are the valid column tokens (exclude mode) or every column token, the
    invalid ones replaced by exactly ``0`` (zero mode); padding never is one.  Within a tile the arg-max is
    the lowest index among the equal maxima (``min(where(sim == rowmax, v, BIG))``) and the running state
    only moves on a strictly greater tile max, so ties go to the lowest index, as ``torch.max``.  NaN is
    tracked apart (the first NaN candidate's index; ``tl.max`` drops NaN on the GPU and keeps it in the
    interpreter, so it never sees one) and wins, as in ``torch.max``.  After the document's last block, a
    masked-out row token, or one without any candidate, gets value 0 / index −1; ``val``/``idx`` are stored
    for every row token and ``s[a, b] = Σ_t w[a, t]·val[a, b, t]`` over the kept row tokens (a segmented
    sum over the packed rows).
  - the column direction (``COL``, d2q when rows are queries), only when all ``Lx`` tokens fit one tile: the
    tile viewed as ``[BLOCK_A, T_PAD, BLOCK_V]`` gives, per query and document token, the max and arg-max
    over the query's tokens (invalid/padded rows masked the same way), stored at once for every ``(a, b, v)``,
    and ``Σ_v w'[b, v]·val'[a, b, v]`` accumulates per document across the v blocks.

  So both directions come from the same similarity tile in one sweep.  The kernel is symmetric: with the
  documents on the rows, its row direction is d2q and its column direction q2d, written through the strides
  of the ``[Nq, Nd, L]`` outputs.  Long token sets: when ``Lx`` exceeds one tile (``MAX_T`` rows) the row
  direction loops over row-token blocks (``BLOCK_A = 1``) with the column loop inside, and there is no
  column direction.  So the launcher puts the queries on the rows (q2d, and d2q too when ``Lq`` fits a
  tile); the documents when both directions are asked and only ``Ld`` fits; two one-direction launches
  (rows = q for q2d, rows = d for d2q) when neither fits; and the documents for d2q alone.

  Zero mode: the arg-max can be an invalid token (its score 0 won); that score is a constant, so the backward
  must send no gradient through such an index.

Every ``(a, b)`` pair, and every ``(a, b, token)`` output, is written by exactly one program: no atomics, no
races, deterministic.  The document range of a program is a contiguous slice of ``docs_per_prog`` documents;
the launchers split the documents only as much as needed to give the GPU enough programs (grid axis 1), and
programs next to each other on axis 0 read the same documents (L2 reuse).

Precision: inputs are loaded in their dtype (fp32/fp16/bf16) and every dot accumulates in fp32; values,
scores and weights are fp32, indices int16 (int32 when the other side has more than 32767 tokens).  Without
gradients (``need_aux=False``) the kernel neither searches nor stores the indices and values, only scores.  fp32 inputs use IEEE fp32 dots when
``torch.get_float32_matmul_precision() == "highest"`` (PyTorch's default) and TF32 otherwise.  float64 is not
supported (TypeError): use the "chunked" backend for it.

Tile sizes are fixed constants below, per dtype (smaller under ``TRITON_INTERPRET=1`` to keep CPU tests fast);
there is no autotuning yet (``XLOSS_AUTOTUNE`` is not read).  Inputs need unit stride along D (the launcher
calls ``.contiguous()`` otherwise); any entity and token strides are passed through.  Offsets are 64-bit
(``Nq·Nd·L`` can pass 2³¹).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from .. import _triton_common as _common

# ----------------------------------------------------------------------------------------------- constants

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
# The interpreter uses small tiles (fast numpy steps; tiny test shapes still span several tiles), except when
# XLOSS_TRITON_GPU_TILES=1 asks for the GPU's: tools/check_triton_compiles.py --report records those variants.
_SMALL_TILES = _INTERPRET and os.environ.get("XLOSS_TRITON_GPU_TILES", "0") in ("", "0")

# ROWS_TARGET: rows of the similarity tile that the launcher aims for by packing several queries (BLOCK_A)
# when their token sets are short; MAX_T: the most tokens of one entity a tile holds (longer sets loop over
# row-token blocks of MAX_T).  Per input dtype: (BLOCK_V column tokens per tile, BLOCK_D chunk of D,
# SINGLE_D_MAX, num_warps); D <= SINGLE_D_MAX is done in one chunk of next_power_of_2(D) (>= 16, tl.dot's
# minimum) whose row block stays in registers.  The GPU settings were chosen from ptxas register reports for
# sm_90 (no spills at 64 and 128 rows, D = 128): fp32 dots need far more registers than fp16/bf16 ones, hence
# the smaller fp32 tiles; they are not tuned by timing yet.
if _SMALL_TILES:  # small tiles: the interpreter runs every block op in numpy; tests use L, D up to ~33
    ROWS_TARGET = 32
    MAX_T = 32
    HALF_CONFIG = FP32_CONFIG = (16, 16, 32, 4)
    TARGET_PROGRAMS = 4  # so that tiny test shapes still exercise both the document loop and the split
else:
    ROWS_TARGET = 64
    MAX_T = 128
    HALF_CONFIG = (64, 64, 128, 8)
    FP32_CONFIG = (32, 32, 32, 8)
    TARGET_PROGRAMS = None  # None: 8 programs per SM of the current GPU
NUM_STAGES = 2

_NO_INDEX = tl.constexpr(1 << 30)  # larger than any token index: the neutral element of the arg-max min()

# ------------------------------------------------------------------------------------------------- kernels


@triton.jit
def _max_nan(a, b):
    """The max that keeps NaN, as torch.max (the default of tl.maximum / tl.max drops it on the GPU)."""
    return tl.maximum(a, b, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def _isnan(x):
    """NaN test that the interpreter and the compiler both take (only NaN differs from itself)."""
    return x != x  # noqa: PLR0124


@triton.jit
def _running_max(s, cand, offs_v, run_max, run_idx, AUX: tl.constexpr):
    """One column block of a running max over the rows of ``s [M, V]`` (``cand``: the candidates, broadcast to
    ``s``; ``s`` is -inf elsewhere) and, with ``AUX``, its arg-max among the candidates: the lowest index on
    ties, the first NaN (which wins, as in ``torch.max``), -1 until a candidate was seen.  Returns the new
    ``(run_max, run_idx)``."""
    t_max = tl.reduce(s, 1, _max_nan)  # [M]
    if AUX:
        hit = (s == t_max[:, None]) | (_isnan(s) & _isnan(t_max)[:, None])
        t_arg = tl.min(tl.where(cand & hit, offs_v[None, :], _NO_INDEX), 1)
        # Strictly greater keeps ties at lower indices; a first NaN takes over and stays; the first candidate
        # always counts (a max of -inf sits at its first token).
        upd = ((t_max > run_max) | (_isnan(t_max) & ~_isnan(run_max))
               | ((run_idx < 0) & (t_arg < _NO_INDEX)))
        run_idx = tl.where(upd, t_arg, run_idx)
    return _max_nan(run_max, t_max), run_idx


@triton.jit
def _maxsim_kernel(
    x_ptr, y_ptr,  # [Nx, Lx, D], [Ny, Ly, D] fp32/fp16/bf16, unit stride along D: the row / column token sets
    wx_ptr,  # [Nx, Lx] fp32 contiguous: token weights of the row direction (ROW)
    xv_ptr,  # [Nx, Lx] uint8 contiguous: row-token validity
    yv_ptr,  # [Ny, Ly] uint8 contiguous: column-token validity
    hx_ptr, hy_ptr,  # [Nx], [Ny] uint8: the entity offers the other side a candidate (any valid token; zero mode: 1)
    wy_ptr,  # [Ny, Ly] fp32 contiguous: token weights of the column direction (COL)
    s_r_ptr, val_r_ptr, idx_r_ptr,  # ROW out: s [x, y] fp32; val fp32 / idx int16|32 [x, y, Lx], unit stride
    s_c_ptr, val_c_ptr, idx_c_ptr,  # COL out: the same with [x, y, Ly]
    Nx, Ny, Lx, Ly, D,
    stride_xn, stride_xl, stride_yn, stride_yl,
    stride_srx, stride_sry, stride_vrx, stride_vry,  # ROW outputs: strides over (row entity, column entity)
    stride_scx, stride_scy, stride_vcx, stride_vcy,  # COL outputs: the same
    docs_per_prog,  # column entities per program (grid axis 1)
    y_per_x,  # GROUPED only (BLOCK_A == 1; aligned pairs and the grouped layout): row entity a meets column
    #           entities a·y_per_x … a·y_per_x + Ny − 1 of y (else every row entity meets the same Ny)
    BLOCK_A: tl.constexpr,  # row entities per program, packed into the tile rows (1 when Lx > T_PAD)
    T_PAD: tl.constexpr,  # row tokens per entity per tile (power of 2; >= Lx unless BLOCK_A == 1 and not COL)
    BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
    SINGLE_D: tl.constexpr,  # D <= BLOCK_D: one dot per tile
    HOIST_X: tl.constexpr,  # SINGLE_D and Lx <= T_PAD: load the row block once, outside the document loop
    ZERO_MODE: tl.constexpr,  # invalid tokens score 0 and compete (else: they never win, -inf)
    ROW: tl.constexpr, COL: tl.constexpr,  # which directions to compute (COL needs Lx <= T_PAD)
    AUX: tl.constexpr,  # also find and store the per-token maxima and arg-max indices (for the backward)
    GROUPED: tl.constexpr,  # each row entity has its own column entities (y_per_x); a constexpr, so that the
    #                         shared-column variants compile as they did without it
    INPUT_PRECISION: tl.constexpr,
):
    # grid: (cdiv(Nx, BLOCK_A), cdiv(Ny, docs_per_prog))
    BLOCK_M: tl.constexpr = BLOCK_A * T_PAD
    pid_a = tl.program_id(0).to(tl.int64)
    pid_b = tl.program_id(1).to(tl.int64)
    offs_r = tl.arange(0, BLOCK_M)
    t_loc = offs_r % T_PAD  # [BLOCK_M] token of the row within its entity's current token block
    a_row = pid_a * BLOCK_A + offs_r // T_PAD  # [BLOCK_M] int64 row entity of each tile row
    a_row_ok = a_row < Nx
    a_blk = pid_a * BLOCK_A + tl.arange(0, BLOCK_A)  # [BLOCK_A] int64 row entities of this program
    a_blk_ok = a_blk < Nx
    offs_d = tl.arange(0, BLOCK_D)
    offs_v0 = tl.arange(0, BLOCK_V)
    if HOIST_X:
        x_ok0 = a_row_ok & (t_loc < Lx)
        x_blk = tl.load(x_ptr + a_row[:, None] * stride_xn + t_loc[:, None] * stride_xl + offs_d[None, :],
                        mask=x_ok0[:, None] & (offs_d[None, :] < D), other=0.0)  # [BLOCK_M, BLOCK_D]
    if COL:
        # Row-token validity for the column direction (Lx <= T_PAD: the one token block is t_loc itself).
        xv = tl.load(xv_ptr + a_row * Lx + t_loc, mask=a_row_ok & (t_loc < Lx), other=0) != 0  # [BLOCK_M]
        if ZERO_MODE:  # every existing row token competes (invalid ones as 0); padded rows never do
            c_cand = t_loc < Lx
        else:
            c_cand = xv
        x_found = tl.load(hx_ptr + a_blk, mask=a_blk_ok, other=0) != 0  # [BLOCK_A] some row candidate
        t_ar = tl.arange(0, T_PAD)[None, :, None]  # [1, T_PAD, 1] token index along the reshaped tile
        cand3 = tl.reshape(c_cand.to(tl.int32), (BLOCK_A, T_PAD))[:, :, None] != 0  # [BLOCK_A, T_PAD, 1]
    b_lo = pid_b * docs_per_prog
    b_hi = tl.minimum(b_lo + docs_per_prog, Ny)
    for b in range(b_lo, b_hi):
        if GROUPED:  # the column entity in y; the outputs are indexed by b, its place among the row's own
            yb = pid_a * y_per_x + b
        else:
            yb = b
        s_r = tl.zeros([BLOCK_A], dtype=tl.float32)
        s_c = tl.zeros([BLOCK_A], dtype=tl.float32)
        for t0 in range(0, Lx, T_PAD):  # one iteration unless a long row set loops over token blocks
            t_row = t0 + t_loc  # [BLOCK_M]
            row_ok = a_row_ok & (t_row < Lx)
            x_off = a_row * stride_xn + t_row * stride_xl  # [BLOCK_M] int64
            # Running state of the row direction: the max (NaN once a NaN candidate was seen) and its arg-max
            # (lowest on ties; the first NaN's); -1 until a candidate was seen.
            run_max = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
            run_idx = tl.full([BLOCK_M], -1, dtype=tl.int32)
            for v0 in range(0, Ly, BLOCK_V):
                offs_v = v0 + offs_v0  # [BLOCK_V]
                v_ok = offs_v < Ly
                y_off = yb * stride_yn + offs_v * stride_yl  # [BLOCK_V] int64
                if HOIST_X:
                    y_blk = tl.load(y_ptr + y_off[:, None] + offs_d[None, :],  # [BLOCK_V, BLOCK_D]
                                    mask=v_ok[:, None] & (offs_d[None, :] < D), other=0.0)
                    sim = tl.dot(x_blk, tl.trans(y_blk), input_precision=INPUT_PRECISION)
                else:
                    sim = tl.zeros([BLOCK_M, BLOCK_V], dtype=tl.float32)
                    for d0 in range(0, D, BLOCK_D):
                        offs_dc = d0 + offs_d
                        dc_ok = offs_dc < D
                        x_c = tl.load(x_ptr + x_off[:, None] + offs_dc[None, :],
                                      mask=row_ok[:, None] & dc_ok[None, :], other=0.0)  # [BLOCK_M, BLOCK_D]
                        y_c = tl.load(y_ptr + y_off[:, None] + offs_dc[None, :],
                                      mask=v_ok[:, None] & dc_ok[None, :], other=0.0)  # [BLOCK_V, BLOCK_D]
                        sim += tl.dot(x_c, tl.trans(y_c), input_precision=INPUT_PRECISION)
                # sim: [BLOCK_M, BLOCK_V] fp32.  Padded rows/columns read zeros; valid tokens may hold inf or
                # NaN, so masked entries are replaced (never multiplied), and the maxima keep NaN (_max_nan:
                # tl.max drops it on the GPU), as torch.max does.
                yv = tl.load(yv_ptr + yb * Ly + offs_v, mask=v_ok, other=0) != 0  # [BLOCK_V]
                if ROW:
                    if ZERO_MODE:  # invalid column tokens score exactly 0 and compete; padding never does
                        cand = v_ok
                        s_row = tl.where(cand[None, :], tl.where(yv[None, :], sim, 0.0), float("-inf"))
                    else:
                        cand = yv
                        s_row = tl.where(cand[None, :], sim, float("-inf"))
                    run_max, run_idx = _running_max(s_row, cand[None, :], offs_v, run_max, run_idx, AUX)
                if COL:
                    if ZERO_MODE:  # invalid rows score 0
                        s_col = tl.where(c_cand[:, None], tl.where(xv[:, None], sim, 0.0), float("-inf"))
                    else:
                        s_col = tl.where(c_cand[:, None], sim, float("-inf"))
                    s3 = tl.reshape(s_col, (BLOCK_A, T_PAD, BLOCK_V))
                    c_max = tl.reduce(s3, 1, _max_nan)  # [BLOCK_A, BLOCK_V]
                    keep_c = yv[None, :] & x_found[:, None]  # own valid column token, some row candidate
                    c_val = tl.where(keep_c, c_max, 0.0)
                    if AUX:
                        hit3 = (s3 == c_max[:, None, :]) | (_isnan(s3) & _isnan(c_max)[:, None, :])
                        c_arg = tl.min(tl.where(cand3 & hit3, t_ar, _NO_INDEX), 1)
                        c_arg = tl.where(keep_c, c_arg, -1)
                        c_off = a_blk[:, None] * stride_vcx + b * stride_vcy + offs_v[None, :]  # [A, V] int64
                        c_mask = a_blk_ok[:, None] & v_ok[None, :]
                        tl.store(val_c_ptr + c_off, c_val, mask=c_mask)
                        tl.store(idx_c_ptr + c_off, c_arg.to(idx_c_ptr.dtype.element_ty), mask=c_mask)
                    wy = tl.load(wy_ptr + yb * Ly + offs_v, mask=v_ok, other=0.0)  # [BLOCK_V]
                    s_c += tl.sum(tl.where(keep_c, c_val * wy[None, :], 0.0), 1)
            if ROW:
                # A masked-out row token, or no candidate at all: value 0, index -1, nothing in the sum.
                xr = tl.load(xv_ptr + a_row * Lx + t_row, mask=row_ok, other=0) != 0  # [BLOCK_M]
                keep = xr & (tl.load(hy_ptr + yb) != 0)
                val = tl.where(keep, run_max, 0.0)
                if AUX:
                    idx = tl.where(keep, run_idx, -1)
                    r_off = a_row * stride_vrx + b * stride_vry + t_row  # [BLOCK_M] int64
                    tl.store(val_r_ptr + r_off, val, mask=row_ok)
                    tl.store(idx_r_ptr + r_off, idx.to(idx_r_ptr.dtype.element_ty), mask=row_ok)
                wx = tl.load(wx_ptr + a_row * Lx + t_row, mask=row_ok, other=0.0)  # [BLOCK_M]
                s_r += tl.sum(tl.reshape(tl.where(keep, wx * val, 0.0), (BLOCK_A, T_PAD)), 1)
        if ROW:
            tl.store(s_r_ptr + a_blk * stride_srx + b * stride_sry, s_r, mask=a_blk_ok)
        if COL:
            tl.store(s_c_ptr + a_blk * stride_scx + b * stride_scy, s_c, mask=a_blk_ok)


# ----------------------------------------------------------------------------------------------- launchers

_SUPPORTED = _common.SUPPORTED_DTYPES
_INT16_TOKENS = 32767  # token counts up to this get int16 arg-max indices, int32 beyond (as chunked.py)


def _index_dtype(length: int) -> torch.dtype:
    return torch.int16 if length <= _INT16_TOKENS else torch.int32


def _target_programs(device: torch.device) -> int:
    if TARGET_PROGRAMS is not None:
        return TARGET_PROGRAMS
    return _common.device_programs(device, 8)


def _has_candidates(valid: torch.Tensor, zero_mode: bool) -> torch.Tensor:
    """uint8 ``[N]``: whether an entity offers the other side's tokens a candidate (any valid token; in zero
    mode its invalid tokens compete as 0, so always), from the masks, never from a value."""
    if zero_mode:
        return torch.ones(valid.shape[0], dtype=torch.uint8, device=valid.device)
    return valid.amax(1).contiguous()


def _tokens(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(2) == 1 else t.contiguous()


def row_packing(lx: int, nx: int) -> tuple[int, int]:
    """``(T_PAD, BLOCK_A)``: row entities of ``lx`` tokens packed into one tile of about ``ROWS_TARGET`` rows
    (at least tl.dot's 16, no more entities than ``nx``); one entity in blocks of ``MAX_T`` tokens when its set
    is longer than a tile."""
    lx_pad = triton.next_power_of_2(lx)
    if lx_pad > MAX_T:
        return MAX_T, 1
    block_a = max(1, ROWS_TARGET // lx_pad)
    block_a = min(block_a, triton.next_power_of_2(nx))  # no wasted rows for a handful of queries
    return lx_pad, max(block_a, 16 // lx_pad, 1)  # tl.dot needs >= 16 rows


def _launch(x, y, wx, xv, yv, hx, hy, wy, zero_mode: bool, row: bool, col: bool, out_r, out_c, aux: bool,
            y_per_x: int = 0):
    """One ``_maxsim_kernel`` sweep with ``x`` on the tile rows and ``y`` on the columns.

    ``out_r``/``out_c``: ``(s, val, idx)`` of the row / column direction, or None; ``s`` is indexed
    ``[x entity, y entity]`` and ``val``/``idx`` ``[x entity, y entity, token]`` through their strides (token
    stride 1), so a transposed view of a ``[Nq, Nd, ...]`` output lets rows be the documents.  ``aux``:
    ``val``/``idx`` are tensors to fill (else None).  ``xv``/``yv``: uint8 token validity; ``hx``/``hy``: uint8
    per entity, whether it offers the other side any candidate.  ``y_per_x`` > 0: row entity ``a`` meets only
    column entities ``a·y_per_x …`` (``y_per_x`` of them: aligned pairs are 1), one row entity per program,
    and the outputs are indexed ``[a, j]`` by the place ``j`` among its own.
    """
    nx, lx, d = x.shape
    ny, ly = (y_per_x if y_per_x else y.shape[0]), y.shape[1]
    lx_pad = triton.next_power_of_2(lx)
    assert lx_pad <= MAX_T or not col, "the column direction needs the whole row token set in one tile"
    if y_per_x:  # one row entity per program (each has its own columns), tl.dot's 16 rows at least
        t_pad, block_a = (max(16, lx_pad), 1) if lx_pad <= MAX_T else (MAX_T, 1)
    else:
        t_pad, block_a = row_packing(lx, nx)
    block_m = block_a * t_pad
    block_v, chunk, single_d_max, num_warps = FP32_CONFIG if x.dtype == torch.float32 else HALF_CONFIG
    single_d = d <= single_d_max
    block_d = max(16, triton.next_power_of_2(d)) if single_d else chunk
    hoist_x = single_d and lx <= t_pad
    row_blocks = triton.cdiv(nx, block_a)
    split = max(1, min(ny, triton.cdiv(_target_programs(x.device), row_blocks)))
    per = triton.cdiv(ny, split)
    split = triton.cdiv(ny, per)
    dummy = wx  # never read or written: its constexpr flag is off
    s_r, val_r, idx_r = out_r if row and aux else (out_r[0], dummy, dummy) if row else (dummy, dummy, dummy)
    s_c, val_c, idx_c = out_c if col and aux else (out_c[0], dummy, dummy) if col else (dummy, dummy, dummy)
    _maxsim_kernel[(row_blocks, split)](
        x, y, wx if row else dummy, xv, yv, hx, hy, wy if col else dummy,
        s_r, val_r, idx_r, s_c, val_c, idx_c,
        nx, ny, lx, ly, d,
        x.stride(0), x.stride(1), y.stride(0), y.stride(1),
        s_r.stride(0) if row else 0, s_r.stride(1) if row else 0,
        val_r.stride(0) if row and aux else 0, val_r.stride(1) if row and aux else 0,
        s_c.stride(0) if col else 0, s_c.stride(1) if col else 0,
        val_c.stride(0) if col and aux else 0, val_c.stride(1) if col and aux else 0,
        per, y_per_x,
        BLOCK_A=block_a, T_PAD=t_pad, BLOCK_V=block_v, BLOCK_D=block_d, SINGLE_D=single_d, HOIST_X=hoist_x,
        ZERO_MODE=zero_mode, ROW=row, COL=col, AUX=aux, GROUPED=y_per_x > 0,
        INPUT_PRECISION=_common.input_precision(x.dtype),
        num_warps=num_warps if block_m * block_v > 2048 else 4, num_stages=NUM_STAGES,
    )


def _setup(q, d, q_w, d_w, q_valid, d_valid, zero_mode: bool, q2d: bool, d2q: bool, need_aux: bool,
           lead_q2d: tuple, lead_d2q: tuple):
    """What every forward launcher does first: refuse a dtype the kernel does not take, allocate the six
    outputs (``s`` of shape ``lead``, ``idx``/``val`` of ``lead + (tokens,)``; None where not asked) and, unless
    there is nothing to sweep (then the outputs are filled with value 0, index -1 and the inputs are None),
    the kernel's inputs ``(q, d, qv, dv, qh, dh, qw, dw)``: unit stride along D, uint8 validity, the
    per-entity candidate flags and fp32 weights."""
    if q.dtype not in _SUPPORTED or d.dtype != q.dtype:
        raise TypeError(
            f"the triton backend of maxsim supports float32, float16 and bfloat16 inputs, got q {q.dtype} "
            f"and d {d.dtype}; use backend='chunked' (alias 'cpu') for float64"
        )
    lq, ld = q.shape[1], d.shape[1]
    dev = q.device
    f32 = {"dtype": torch.float32, "device": dev}
    outs = [None] * 6
    for k, on, lead, own, other in ((0, q2d, lead_q2d, lq, ld), (3, d2q, lead_d2q, ld, lq)):
        if on:
            outs[k] = torch.empty(lead, **f32)
            if need_aux:
                outs[k + 1] = torch.empty(*lead, own, dtype=_index_dtype(other), device=dev)
                outs[k + 2] = torch.empty(*lead, own, **f32)
    if not (q2d or d2q):
        return outs, None
    if min(q.shape[0], d.shape[0], lq, ld) == 0:  # nothing to sweep: no token to take a max over
        for i in range(6):
            if outs[i] is not None:
                outs[i].fill_(-1 if i % 3 == 1 else 0)
        return outs, None
    qv = q_valid.to(device=dev, dtype=torch.bool).contiguous().view(torch.uint8)
    dv = d_valid.to(device=dev, dtype=torch.bool).contiguous().view(torch.uint8)
    qw = q_w.to(**f32).contiguous() if q2d else None
    dw = d_w.to(**f32).contiguous() if d2q else None
    return outs, (_tokens(q), _tokens(d), qv, dv, _has_candidates(qv, zero_mode), _has_candidates(dv, zero_mode),
                  qw, dw)


def maxsim_fwd(q, d, q_w, d_w, q_valid, d_valid, zero_mode: bool, q2d: bool, d2q: bool, *,
               need_aux: bool = True, q_masked: bool = True, d_masked: bool = True):
    """MaxSim scores, per-token maxima and arg-max indices of one or both directions, one sweep.

    Args:
        q: ``[Nq, Lq, D]``; d: ``[Nd, Ld, D]``: float32/float16/bfloat16, same dtype and device.
        q_w: ``[Nq, Lq]`` final token weights of the q2d direction (0 for invalid tokens), or None if not q2d.
        d_w: ``[Nd, Ld]`` final token weights of the d2q direction, or None if not d2q.
        q_valid: ``[Nq, Lq]`` bool; d_valid: ``[Nd, Ld]`` bool.
        zero_mode: invalid tokens score exactly 0 and still compete for the max (else they never win).
        q2d, d2q: which directions to compute.
        need_aux: also return the arg-max indices and max values (for the backward); False returns None for
            them, and the kernel neither searches nor stores them (forward without gradients).
        q_masked, d_masked: unused (the kernel applies the masks to the tiles it loads at no extra cost).

    Returns:
        ``(s_q2d, idx_q2d, val_q2d, s_d2q, idx_d2q, val_d2q)``, None for a direction not asked.
        ``s_q2d [Nq, Nd]`` fp32 ``= Σ_t q_w[a, t]·val_q2d[a, b, t]``; ``val_q2d [Nq, Nd, Lq]`` fp32 the max
        over the doc tokens of ``<q_at, d_bv>`` (0 where no doc token is valid, exclude mode);
        ``idx_q2d [Nq, Nd, Lq]`` int16 its arg-max (lowest index on ties, −1 where no doc token is valid;
        int32 when ``Ld > 32767``).
        d2q the same with the roles swapped: ``[Nq, Nd]``, ``[Nq, Nd, Ld]``,
        ``s_d2q = Σ_v d_w[b, v]·val_d2q``.
    """
    nq, nd = q.shape[0], d.shape[0]
    outs, ins = _setup(q, d, q_w, d_w, q_valid, d_valid, zero_mode, q2d, d2q, need_aux, (nq, nd), (nq, nd))
    if ins is None:
        return tuple(outs)
    # (s, val, idx) indexed [x, y, ...] for each launch; ``.transpose(0, 1)`` when the rows are documents.
    o_q2d = (outs[0], outs[2], outs[1]) if q2d else None
    o_d2q = (outs[3], outs[5], outs[4]) if d2q else None

    def t(o):
        return None if o is None else tuple(None if z is None else z.transpose(0, 1) for z in o)

    _directions(ins, zero_mode, q2d, d2q, need_aux, (o_q2d, o_d2q), (t(o_q2d), t(o_d2q)))
    return tuple(outs)


def _directions(ins, zero_mode: bool, q2d: bool, d2q: bool, need_aux: bool, q_rows, d_rows, group: int = 0):
    """The launches of one forward: both directions from one sweep where a token set fits a tile, else two.

    ``q_rows`` / ``d_rows``: the ``(s, val, idx)`` outputs of (q2d, d2q) indexed for a launch with the queries
    / the documents on the tile rows.  ``group`` > 0: each query meets only its own documents (``y_per_x``;
    aligned pairs are 1, and then symmetric: a document meets its own query the same way)."""
    q, d, qv, dv, qh, dh, qw, dw = ins
    lq, ld = q.shape[1], d.shape[1]
    mine = 1 if group else 0  # the documents on the rows: each meets its own query (aligned pairs only)

    def fits(n):
        return triton.next_power_of_2(n) <= MAX_T

    if q2d and d2q and not fits(lq) and not fits(ld):  # no tile holds a whole token set: two sweeps
        _launch(q, d, qw, qv, dv, qh, dh, None, zero_mode, True, False, q_rows[0], None, need_aux, group)
        _launch(d, q, dw, dv, qv, dh, qh, None, zero_mode, True, False, d_rows[1], None, need_aux, mine)
    elif q2d and (fits(lq) or not d2q):  # rows = queries: q2d is ROW, d2q (if asked) is COL
        _launch(q, d, qw, qv, dv, qh, dh, dw, zero_mode, True, d2q, q_rows[0], q_rows[1], need_aux, group)
    elif q2d:  # both asked, only the doc token sets fit a tile: rows = documents
        _launch(d, q, dw, dv, qv, dh, qh, qw, zero_mode, True, True, d_rows[1], d_rows[0], need_aux, mine)
    else:  # d2q only: rows = documents, one direction (any Ld)
        _launch(d, q, dw, dv, qv, dh, qh, None, zero_mode, True, False, d_rows[1], None, need_aux, mine)


def maxsim_pairs_fwd(q, d, q_w, d_w, q_valid, d_valid, zero_mode: bool, q2d: bool, d2q: bool, *,
                     need_aux: bool = True, q_masked: bool = True, d_masked: bool = True, group: int = 1):
    """Aligned pairs (query a against document a only) and the grouped layout (``group`` > 1, query→document:
    query a against documents ``a·group … a·group + group − 1``): one ``_maxsim_kernel`` launch whose programs
    each own one query and a range of its own documents (``y_per_x``), so nothing is repeated or padded.

    Arguments and results as ``chunked.maxsim_pairs_fwd``: ``s_q2d [Nd]``, ``idx_q2d``/``val_q2d [Nd, Lq]``,
    ``s_d2q [N]``, ``idx_d2q``/``val_d2q [N, Ld]``, fp32 (None where not asked).  Both directions come from one
    sweep when a query's tokens fit one tile (rows = queries); else, for ``"both"``, the rows are the documents
    when theirs fit, and two one-direction sweeps otherwise (aligned pairs are symmetric: the row entity a meets
    column entity a either way).
    """
    if group > 1 and d2q:
        raise ValueError("grouped aligned pairs (group > 1) score query→document only")
    nq, nd = q.shape[0], d.shape[0]
    outs, ins = _setup(q, d, q_w, d_w, q_valid, d_valid, zero_mode, q2d, d2q, need_aux, (nd,), (nq,))
    if ins is None:
        return tuple(outs)

    def per_row(k, row_side_n, per):  # (s, val, idx) of direction k indexed [row entity, own place, token]
        if outs[k] is None:
            return None
        s = outs[k].view(row_side_n, per)
        if not need_aux:
            return (s, None, None)
        return (s, outs[k + 2].view(row_side_n, per, -1), outs[k + 1].view(row_side_n, per, -1))

    own = (per_row(0, nq, group), per_row(3, nd, 1))  # the same indexing with either side on the rows
    _directions(ins, zero_mode, q2d, d2q, need_aux, own, own, group)
    return tuple(outs)


def maxsim_pairs_bwd(q, d, q_w, d_w, q_valid, d_valid, zero_mode: bool, aux_q2d, aux_d2q, g_q2d, g_d2q,
                     need_q: bool, need_d: bool, need_qw: bool, need_dw: bool, group: int = 1):
    """Gradients of :func:`maxsim_pairs_fwd`: ``backward.pairs_backward`` (one ``index_select`` and one
    ``index_add_`` per block of pairs: O(N·L·D) torch ops, on any device), in fp32."""
    from .backward import pairs_backward

    return pairs_backward(q, d, q_w, d_w, q_valid, d_valid, zero_mode, aux_q2d, aux_d2q, g_q2d, g_d2q,
                          need_q, need_d, need_qw, need_dw, group=group)


# ------------------------------------------------------------------------------------------------ backward
#
# ``route(x, y, idx, g, w, y_valid, check_winner)``: the routing primitive of ``backward.route`` (same
# arguments and results) as two kernels, for ``S_xy = Σ_s w[x,s]·<x[x,s], y[y, idx[x,y,s]]>`` and incoming
# ``g [NX, NY]``.  An entry ``(x, y, s)`` routes ``c = g[x,y]·w[x,s]`` when ``idx ≥ 0`` and, with
# ``check_winner``, its winner ``y[y, idx]`` is a valid token.
#
# * ``_route_dx_kernel``, a gather: ``dx[x,s] = Σ_y c·y[y, idx]``.  grid ``(NX, cdiv(LX, BLOCK_S))``, the loop
#   over the ``y`` inside, fp32 registers per D chunk; each ``dx`` row is written once (deterministic).
# * ``_route_dy_atomic_kernel``, a scatter-add: ``dy[y, idx] += c·x[x,s]`` with ``tl.atomic_add`` into an fp32
#   buffer.  grid ``(NX, cdiv(NY, BLOCK_Y))``: the ``x`` tile of a (token block, D chunk) is loaded once and
#   scattered into the ``BLOCK_Y`` documents of the program.  Fast, but the order of the additions varies.
# * ``_route_dy_det_kernel``, the deterministic scatter (``torch.are_deterministic_algorithms_enabled()`` or
#   ``XLOSS_DETERMINISTIC=1``): grid ``(NY, cdiv(LY, BLOCK_V))``, each program owns the ``dy`` rows of its
#   tokens and sweeps every ``(x, s)``: the one-hot matrix ``[idx[x,y,s] == v]·c [BLOCK_V, BLOCK_S]`` times
#   the ``x`` tile (``tl.dot``, IEEE fp32), a fixed order; ``NX·LX·LY`` compares per ``y``, no atomics.
#
# Inputs are loaded in their dtype (fp32/fp16/bf16) and accumulated in fp32; ``dx``/``dy`` are fp32.  ``idx``
# (int16/int32) and ``g`` go through their strides (the d2q direction passes transposed views).

if _SMALL_TILES:
    ROUTE_BLOCK_S = 16  # tokens of x per program (gather) / per step (scatters)
    ROUTE_BLOCK_D = 16  # chunk of D
    ROUTE_BLOCK_Y = 2  # documents per program of the atomic scatter
    ROUTE_BLOCK_V = 16  # y tokens per program of the deterministic scatter
else:
    ROUTE_BLOCK_S = 32
    ROUTE_BLOCK_D = 64
    ROUTE_BLOCK_Y = 8
    ROUTE_BLOCK_V = 32


@triton.jit
def _route_coef(idx_ptr, g_ptr, w_ptr, yv_ptr, x, y, offs_s, s_ok, LX, LY,
                stride_ix, stride_iy, stride_is, stride_gx, stride_gy,
                CHECK_WINNER: tl.constexpr):
    """``(idx, c)`` of the entries ``(x, y, offs_s)``: ``idx`` int32 clamped to >= 0, ``c`` fp32 (0 when the
    entry routes nothing)."""
    ii = tl.load(idx_ptr + x * stride_ix + y * stride_iy + offs_s * stride_is, mask=s_ok, other=-1).to(tl.int32)
    ok = s_ok & (ii >= 0)
    ii = tl.maximum(ii, 0)
    if CHECK_WINNER:
        ok = ok & (tl.load(yv_ptr + y * LY + ii, mask=ok, other=0) != 0)
    g = tl.load(g_ptr + x * stride_gx + y * stride_gy).to(tl.float32)
    w = tl.load(w_ptr + x * LX + offs_s, mask=s_ok, other=0.0).to(tl.float32)
    return ii, tl.where(ok, g * w, 0.0)


@triton.jit
def _route_dx_kernel(
    y_ptr,  # [NY, LY, D] fp32/fp16/bf16, unit stride along D
    idx_ptr,  # [NX, NY, LX] int16/int32, any strides
    g_ptr,  # [NX, NY] fp32, any strides
    w_ptr,  # [NX, LX] fp32 contiguous
    yv_ptr,  # [NY, LY] uint8 contiguous (CHECK_WINNER)
    dx_ptr,  # [NX, LX, D] fp32 contiguous, written
    NY, LX, LY, D,
    stride_yn, stride_yl, stride_ix, stride_iy, stride_is, stride_gx, stride_gy,
    BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr, CHECK_WINNER: tl.constexpr,
):
    # grid: (NX, cdiv(LX, BLOCK_S))
    x = tl.program_id(0).to(tl.int64)
    offs_s = tl.program_id(1) * BLOCK_S + tl.arange(0, BLOCK_S)
    s_ok = offs_s < LX
    offs_d0 = tl.arange(0, BLOCK_D)
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + offs_d0
        d_ok = offs_d < D
        acc = tl.zeros([BLOCK_S, BLOCK_D], dtype=tl.float32)
        for y in range(NY):
            y64 = x * 0 + y  # int64 (the loop variable can be a plain int in the interpreter)
            ii, c = _route_coef(idx_ptr, g_ptr, w_ptr, yv_ptr, x, y64, offs_s, s_ok, LX, LY,
                                stride_ix, stride_iy, stride_is, stride_gx, stride_gy, CHECK_WINNER)
            rows = tl.load(y_ptr + y64 * stride_yn + ii.to(tl.int64)[:, None] * stride_yl + offs_d[None, :],
                           mask=(c != 0.0)[:, None] & d_ok[None, :], other=0.0)  # [BLOCK_S, BLOCK_D]
            acc += c[:, None] * rows.to(tl.float32)
        tl.store(dx_ptr + (x * LX + offs_s.to(tl.int64))[:, None] * D + offs_d[None, :], acc,
                 mask=s_ok[:, None] & d_ok[None, :])


@triton.jit
def _route_dy_atomic_kernel(
    x_ptr,  # [NX, LX, D] fp32/fp16/bf16, unit stride along D
    idx_ptr, g_ptr, w_ptr, yv_ptr,  # as _route_dx_kernel
    dy_ptr,  # [NY, LY, D] fp32 contiguous, zeroed: accumulated with atomics
    NY, LX, LY, D,
    stride_xn, stride_xl, stride_ix, stride_iy, stride_is, stride_gx, stride_gy,
    BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_Y: tl.constexpr, CHECK_WINNER: tl.constexpr,
):
    # grid: (NX, cdiv(NY, BLOCK_Y))
    x = tl.program_id(0).to(tl.int64)
    y_lo = tl.program_id(1) * BLOCK_Y
    y_hi = tl.minimum(y_lo + BLOCK_Y, NY)
    offs_s0 = tl.arange(0, BLOCK_S)
    offs_d0 = tl.arange(0, BLOCK_D)
    for s0 in range(0, LX, BLOCK_S):
        offs_s = s0 + offs_s0
        s_ok = offs_s < LX
        for d0 in range(0, D, BLOCK_D):
            offs_d = d0 + offs_d0
            d_ok = offs_d < D
            x_t = tl.load(x_ptr + x * stride_xn + offs_s.to(tl.int64)[:, None] * stride_xl + offs_d[None, :],
                          mask=s_ok[:, None] & d_ok[None, :], other=0.0).to(tl.float32)  # [BLOCK_S, BLOCK_D]
            for y in range(y_lo, y_hi):
                y64 = x * 0 + y  # int64 (the loop variable can be a plain int in the interpreter)
                ii, c = _route_coef(idx_ptr, g_ptr, w_ptr, yv_ptr, x, y64, offs_s, s_ok, LX, LY,
                                    stride_ix, stride_iy, stride_is, stride_gx, stride_gy, CHECK_WINNER)
                rows = (y64 * LY + ii.to(tl.int64)) * D  # [BLOCK_S] int64
                tl.atomic_add(dy_ptr + rows[:, None] + offs_d[None, :], c[:, None] * x_t,
                              mask=(c != 0.0)[:, None] & d_ok[None, :], sem="relaxed")


@triton.jit
def _route_dy_det_kernel(
    x_ptr, idx_ptr, g_ptr, w_ptr, yv_ptr,  # as _route_dy_atomic_kernel
    dy_ptr,  # [NY, LY, D] fp32 contiguous, written
    NX, LX, LY, D,
    stride_xn, stride_xl, stride_ix, stride_iy, stride_is, stride_gx, stride_gy,
    BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_V: tl.constexpr, CHECK_WINNER: tl.constexpr,
):
    # grid: (NY, cdiv(LY, BLOCK_V))
    y = tl.program_id(0).to(tl.int64)
    offs_v = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
    v_ok = offs_v < LY
    offs_s0 = tl.arange(0, BLOCK_S)
    offs_d0 = tl.arange(0, BLOCK_D)
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + offs_d0
        d_ok = offs_d < D
        acc = tl.zeros([BLOCK_V, BLOCK_D], dtype=tl.float32)
        for x in range(NX):
            x64 = y * 0 + x  # int64
            for s0 in range(0, LX, BLOCK_S):
                offs_s = s0 + offs_s0
                s_ok = offs_s < LX
                ii, c = _route_coef(idx_ptr, g_ptr, w_ptr, yv_ptr, x64, y, offs_s, s_ok, LX, LY,
                                    stride_ix, stride_iy, stride_is, stride_gx, stride_gy, CHECK_WINNER)
                a = tl.where(ii[None, :] == offs_v[:, None], c[None, :], 0.0)  # [BLOCK_V, BLOCK_S]
                x_t = tl.load(x_ptr + x64 * stride_xn + offs_s.to(tl.int64)[:, None] * stride_xl + offs_d[None, :],
                              mask=(c != 0.0)[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
                acc += tl.dot(a, x_t, input_precision="ieee")
        tl.store(dy_ptr + (y * LY + offs_v.to(tl.int64))[:, None] * D + offs_d[None, :], acc,
                 mask=v_ok[:, None] & d_ok[None, :])


def deterministic() -> bool:
    """The scatter of ``route`` runs without atomics: ``torch.are_deterministic_algorithms_enabled()`` or the
    environment variable ``XLOSS_DETERMINISTIC=1``."""
    return _common.deterministic()


def route(x, y, idx, g, w, y_valid, check_winner: bool):
    """Gradients of ``S_xy = Σ_s w[x,s]·<x[x,s], y[y, idx[x,y,s]]>`` through the arg-max indices: the Triton
    version of ``backward.route`` (same arguments and results).

    Args:
        x: ``[NX, LX, D]``; y: ``[NY, LY, D]``: float32/float16/bfloat16 (loaded in their dtype, accumulated
            in fp32), same dtype and device (CUDA, or CPU under ``TRITON_INTERPRET=1``).
        idx: ``[NX, NY, LX]`` int16/int32 arg-max into ``LY`` (-1: no winner); any strides.
        g: ``[NX, NY]`` incoming gradient; w: ``[NX, LX]`` token weights; y_valid: ``[NY, LY]`` bool.
        check_winner: an invalid winner routes nothing (zero mode).

    Returns:
        ``dx [NX, LX, D]`` and ``dy [NY, LY, D]``, float32 (float64 inputs, or CPU tensors outside the
        interpreter, go to ``backward.route`` in their accumulation dtype).
    """
    if x.dtype not in _SUPPORTED or y.dtype != x.dtype or (x.device.type != "cuda" and not _INTERPRET):
        from . import backward as _bwd

        acc = torch.float64 if x.dtype == torch.float64 else torch.float32
        return _bwd.route(x.to(acc), y.to(acc), idx, g.to(acc), w.to(acc), y_valid, check_winner)
    nx, lx, dim = x.shape
    ny, ly = y.shape[0], y.shape[1]
    dev = x.device
    dx = torch.zeros(nx, lx, dim, dtype=torch.float32, device=dev)
    dy = torch.zeros(ny, ly, dim, dtype=torch.float32, device=dev)
    if min(nx, ny, lx, ly, dim) == 0:
        return dx, dy
    x, y = _tokens(x), _tokens(y)
    if idx.dtype not in (torch.int16, torch.int32):
        idx = idx.to(torch.int32)
    g = g.to(torch.float32)
    wf = w.to(device=dev, dtype=torch.float32).contiguous()
    yv = y_valid.to(device=dev, dtype=torch.bool).contiguous().view(torch.uint8)
    istr = (idx.stride(0), idx.stride(1), idx.stride(2), g.stride(0), g.stride(1))
    block_d = min(ROUTE_BLOCK_D, max(16, triton.next_power_of_2(dim)))
    block_s = min(ROUTE_BLOCK_S, max(16, triton.next_power_of_2(lx)))
    _route_dx_kernel[(nx, triton.cdiv(lx, block_s))](
        y, idx, g, wf, yv, dx, ny, lx, ly, dim, y.stride(0), y.stride(1), *istr,
        BLOCK_S=block_s, BLOCK_D=block_d, CHECK_WINNER=check_winner, num_warps=4,
    )
    if deterministic():
        block_v = min(ROUTE_BLOCK_V, max(16, triton.next_power_of_2(ly)))
        _route_dy_det_kernel[(ny, triton.cdiv(ly, block_v))](
            x, idx, g, wf, yv, dy, nx, lx, ly, dim, x.stride(0), x.stride(1), *istr,
            BLOCK_S=block_s, BLOCK_D=block_d, BLOCK_V=block_v, CHECK_WINNER=check_winner, num_warps=4,
        )
    else:
        _route_dy_atomic_kernel[(nx, triton.cdiv(ny, ROUTE_BLOCK_Y))](
            x, idx, g, wf, yv, dy, ny, lx, ly, dim, x.stride(0), x.stride(1), *istr,
            BLOCK_S=block_s, BLOCK_D=block_d, BLOCK_Y=ROUTE_BLOCK_Y, CHECK_WINNER=check_winner, num_warps=4,
        )
    return dx, dy


def maxsim_bwd(q, d, q_w, d_w, q_valid, d_valid, zero_mode: bool, aux_q2d, aux_d2q, g_q2d, g_d2q,
               need_q: bool, need_d: bool, need_qw: bool, need_dw: bool):
    """Gradients of the cross scores of :func:`maxsim_fwd`: ``backward.maxsim_backward`` routed by
    :func:`route` (looked up at call time), the inputs loaded in their own dtype.  Returns
    ``(dq, dd, dq_w, dd_w)`` in fp32, None where not needed or zero."""
    from .backward import maxsim_backward

    return maxsim_backward(q, d, q_w, d_w, q_valid, d_valid, zero_mode, aux_q2d, aux_d2q, g_q2d, g_d2q,
                           need_q, need_d, need_qw, need_dw, route=route)
