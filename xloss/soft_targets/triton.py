"""The Triton engine of teacher distillation: the two tile sweeps of ``chunked.py`` as fused GPU kernels.

Implements ``engine.py`` (``lse``, ``grad``), modelled on the InfoNCE kernels (``xloss/infonce/triton.py``,
whose docstring explains the split statistics, column splits, power-of-two weights and deterministic mode that
are reused here).  Every ``BLOCK_M × BLOCK_N`` tile computes two logit tiles side by side: the student's
``z = scale·q kᵀ`` (``tl.dot`` over ``BLOCK_D`` chunks of D) and the teacher's ``t = tscale·tq tkᵀ`` (chunks
of the teacher's width E, which may differ from D).  Neither is ever stored.

* ``lse``: ``_lse_kernel``, one sweep.  A program owns ``BLOCK_M`` rows and walks the column blocks of its
  column split, keeping per row, online: the student's (max z, Σ exp(z − max)) and the teacher's (max t,
  Σ exp(t − max), Σ exp(t − max)·z), rescaled to the new max tile by tile.  Per (row block, column) it writes
  the same five numbers over its own rows into partial buffers ``[5, row blocks, M]`` (its own row of them: no
  races, no atomics); the row partials ``[5, split, N]`` of the column splits likewise.  ``_merge`` finishes
  both exactly by rescaling to the common max (``sum = Σ_b sum_b·exp(max_b − max)``), in a fixed order:
  deterministic.
* ``grad``: ``_grad_kernel``, one recomputing sweep.  A program recomputes both tiles with the forward's D and
  E chunks and forms ``G = a_i (softmax_row(z) − softmax_row(t)) + w_j (softmax_col(z) − softmax_col(t))`` in
  registers, every softmax entry as ``sign·exp2(((x − max) − shift)·log2 e)`` with
  ``shift = log Σ − log|weight|`` (the max subtracted first; a zero weight: shift +inf, sign 0, exactly 0).
  All weights are divided by one exact power of two first (undone on the outputs), so that ``log|weight|`` is
  ~0 and half-precision G stays in range.  ``dq_u = G k`` accumulates per row block, ``dk_u = Gᵀ q`` with
  ``tl.atomic_add``; in deterministic mode (``torch.use_deterministic_algorithms(True)`` or
  ``XLOSS_DETERMINISTIC=1``) two atomic-free launches instead, the second with the roles swapped (``Gᵀ`` has
  the same form with k, tk, the column statistics and w as rows and q, tq, the row statistics and a as
  columns).

Dtypes: the student's q, k are fp32/fp16/bf16 (fp64 raises TypeError: use the chunked engine); outputs are
fp32.  The teacher is loaded in its own dtype when it is one of those three and ``tq``, ``tk`` agree;
otherwise (fp64, or two different dtypes) the launcher casts it to fp32, as the chunked engine casts it to the
accumulation dtype.  Each tile's two dots run in their own inputs' precision (``_common.input_precision``): an
fp32 teacher beside a half student takes fp32 dots; cast the teacher to the student's dtype to keep every dot
on tensor cores.  For half students G is cast to the student's dtype before the two gradient dots, as in
InfoNCE.

Tile sizes are fixed constants (small under ``TRITON_INTERPRET=1``); D and E up to ``SINGLE_D_MAX`` are one
register-resident chunk each, larger ones loop in ``BLOCK_D`` chunks, the same in both sweeps.  Offsets are
64-bit.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from .. import _triton_common as _common
from .._triton_common import dot_tile
from ..infonce.triton import _pow2_norm, _scale_arg

# ----------------------------------------------------------------------------------------------- constants

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
# As in the InfoNCE kernels: small tiles in the interpreter unless XLOSS_TRITON_GPU_TILES=1 asks for the GPU's
# (tools/check_triton_compiles.py --report records those variants).
_SMALL_TILES = _INTERPRET and os.environ.get("XLOSS_TRITON_GPU_TILES", "0") in ("", "0")

# (BLOCK_M, BLOCK_N, BLOCK_D chunk for widths > SINGLE_D_MAX, num_warps, num_stages); the teacher's width uses
# the same chunk and limit as the student's.  Two logit tiles per step need more registers than InfoNCE's one:
# these GPU tiles and SINGLE_D_MAX = 64 compile for sm_90 without register spills for fp16/bf16 inputs
# (tools/check_triton_compiles.py --report; widths 40 to 768); fp32 IEEE dots (no tensor cores) still spill a
# little, as in the other families.
if _SMALL_TILES:
    FWD_CONFIG = (32, 32, 32, 4, 1)
    BWD_CONFIG = (32, 32, 32, 4, 1)
    SINGLE_D_MAX = 32
    TARGET_PROGRAMS = 8  # so that small test shapes still exercise the column split
else:
    FWD_CONFIG = (64, 32, 64, 8, 3)
    BWD_CONFIG = (64, 32, 64, 8, 2)
    SINGLE_D_MAX = 64
    TARGET_PROGRAMS = None  # None: 2 programs per SM of the current GPU
# The backward recomputes the forward's logits with the same D (and E) chunks: the statistics are relative to
# the forward's maxes.
assert FWD_CONFIG[2] == BWD_CONFIG[2]

_LOG2E = tl.constexpr(1.4426950408889634)

# ------------------------------------------------------------------------------------------------- kernels


@triton.jit
def _load_rows(ptr, offs, ok, width, stride, BLOCK_W: tl.constexpr):
    """One register-resident block ``[len(offs), BLOCK_W]`` of rows (tails masked to 0)."""
    offs_w = tl.arange(0, BLOCK_W)
    mask = ok[:, None] & (offs_w[None, :] < width)
    return tl.load(ptr + offs[:, None] * stride + offs_w[None, :], mask=mask, other=0.0)


@triton.jit
def _lse_kernel(
    q_ptr, k_ptr,  # [N, D], [M, D] student, fp32/fp16/bf16, unit stride along D
    tq_ptr, tk_ptr,  # [N, E], [M, E] teacher, fp32/fp16/bf16 (its own dtype), unit stride along E
    scale_ptr, tscale_ptr,  # [] fp32, read on the device (no host sync)
    part_r_ptr,  # [5, split, N] fp32 out: per column split, the row statistics (see _merge)
    part_c_ptr,  # [5, cdiv(N, BLOCK_M), M] fp32 out: per row block, the column statistics (NEED_COLS)
    N, M, D, E, stride_qn, stride_kn, stride_tqn, stride_tkn,
    cols_per_split,  # columns per split, a multiple of BLOCK_N
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_E: tl.constexpr,
    SINGLE_D: tl.constexpr, SINGLE_E: tl.constexpr,  # width <= its block: the row block stays in registers
    NEED_COLS: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, T_INPUT_PRECISION: tl.constexpr,  # of the student's / the teacher's dots
):
    # grid: (cdiv(N, BLOCK_M), split).  The five planes: max z, Σ exp(z - max z), max t, Σ exp(t - max t) and
    # Σ exp(t - max t)·z.  Only differences x - max (small where it matters) go to base 2.
    pid_m = tl.program_id(0).to(tl.int64)
    pid_s = tl.program_id(1).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # [BLOCK_M] int64
    row_ok = offs_m < N
    scale = tl.load(scale_ptr).to(tl.float32)
    tscale = tl.load(tscale_ptr).to(tl.float32)
    if SINGLE_D:
        q_blk = _load_rows(q_ptr, offs_m, row_ok, D, stride_qn, BLOCK_D)
    if SINGLE_E:
        tq_blk = _load_rows(tq_ptr, offs_m, row_ok, E, stride_tqn, BLOCK_E)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)  # student: running max and Σ exp(z - m_i)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    tm_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)  # teacher: running max, Σ exp(t - tm_i), and
    tl_i = tl.zeros([BLOCK_M], dtype=tl.float32)  # Σ exp(t - tm_i)·z
    tz_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    c_plane = tl.num_programs(0).to(tl.int64) * M  # the planes of part_c are [row blocks, M]
    n_lo = pid_s * cols_per_split
    n_hi = tl.minimum(n_lo + cols_per_split, M)
    for start_n in range(n_lo, n_hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N).to(tl.int64)  # [BLOCK_N]
        col_ok = offs_n < M
        if SINGLE_D:
            k_blk = _load_rows(k_ptr, offs_n, col_ok, D, stride_kn, BLOCK_D)
            dots = tl.dot(q_blk, tl.trans(k_blk), input_precision=INPUT_PRECISION)
        else:
            dots = dot_tile(q_ptr, k_ptr, offs_m, offs_n, row_ok, col_ok, D, stride_qn, stride_kn,
                            BLOCK_M, BLOCK_N, BLOCK_D, INPUT_PRECISION)
        if SINGLE_E:
            tk_blk = _load_rows(tk_ptr, offs_n, col_ok, E, stride_tkn, BLOCK_E)
            tdots = tl.dot(tq_blk, tl.trans(tk_blk), input_precision=T_INPUT_PRECISION)
        else:
            tdots = dot_tile(tq_ptr, tk_ptr, offs_m, offs_n, row_ok, col_ok, E, stride_tqn, stride_tkn,
                             BLOCK_M, BLOCK_N, BLOCK_E, T_INPUT_PRECISION)
        z = dots * scale  # [BLOCK_M, BLOCK_N]; masked rows / columns read zeros, so every entry is finite
        t = tdots * tscale
        # Rows: invalid columns are -inf.  Every tile has >= 1 valid column, so the new maxes are finite and
        # exp2((old - new)·log2 e) never sees -inf - (-inf) (first tile: exp2(-inf) = 0 rescales the empty
        # sums).
        z_r = tl.where(col_ok[None, :], z, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(z_r, 1))
        l_i = l_i * tl.exp2((m_i - m_new) * _LOG2E) + tl.sum(tl.exp2((z_r - m_new[:, None]) * _LOG2E), 1)
        m_i = m_new
        t_r = tl.where(col_ok[None, :], t, float("-inf"))
        tm_new = tl.maximum(tm_i, tl.max(t_r, 1))
        rescale = tl.exp2((tm_i - tm_new) * _LOG2E)
        e_r = tl.exp2((t_r - tm_new[:, None]) * _LOG2E)  # 0 on invalid columns, where z is a finite 0
        tl_i = tl_i * rescale + tl.sum(e_r, 1)
        tz_i = tz_i * rescale + tl.sum(e_r * z, 1)
        tm_i = tm_new
        if NEED_COLS:
            # This row block's column statistics: invalid rows are -inf; every tile has >= 1 valid row.
            z_c = tl.where(row_ok[:, None], z, float("-inf"))
            c_max = tl.max(z_c, 0)  # [BLOCK_N]
            c_sum = tl.sum(tl.exp2((z_c - c_max[None, :]) * _LOG2E), 0)
            t_c = tl.where(row_ok[:, None], t, float("-inf"))
            tc_max = tl.max(t_c, 0)
            e_c = tl.exp2((t_c - tc_max[None, :]) * _LOG2E)
            col = part_c_ptr + pid_m * M + offs_n
            tl.store(col, c_max, mask=col_ok)
            tl.store(col + c_plane, c_sum, mask=col_ok)
            tl.store(col + 2 * c_plane, tc_max, mask=col_ok)
            tl.store(col + 3 * c_plane, tl.sum(e_c, 0), mask=col_ok)
            tl.store(col + 4 * c_plane, tl.sum(e_c * z, 0), mask=col_ok)
    r_plane = tl.num_programs(1).to(tl.int64) * N  # the planes of part_r are [split, N]
    row = part_r_ptr + pid_s * N + offs_m
    tl.store(row, m_i, mask=row_ok)
    tl.store(row + r_plane, l_i, mask=row_ok)
    tl.store(row + 2 * r_plane, tm_i, mask=row_ok)
    tl.store(row + 3 * r_plane, tl_i, mask=row_ok)
    tl.store(row + 4 * r_plane, tz_i, mask=row_ok)


@triton.jit
def _softmax_diff(z, t, st_ptr, offs, ok, L, AXIS: tl.constexpr):
    """``weight·(softmax(z) − softmax(t))`` along one axis of the tile from its ``[5, L]`` kernel statistics
    (``_kernel_stats``), broadcast along ``AXIS`` (1: per row, 0: per column).  Entries with z = t = -inf
    (out of range) are exactly 0, as are all entries of a zero weight (shift +inf, sign 0)."""
    mz = tl.load(st_ptr + offs, mask=ok, other=0.0)
    sz = tl.load(st_ptr + L + offs, mask=ok, other=0.0) * _LOG2E
    mt = tl.load(st_ptr + 2 * L + offs, mask=ok, other=0.0)
    stt = tl.load(st_ptr + 3 * L + offs, mask=ok, other=0.0) * _LOG2E
    sign = tl.load(st_ptr + 4 * L + offs, mask=ok, other=0.0)
    if AXIS == 1:
        pz = tl.exp2((z - mz[:, None]) * _LOG2E - sz[:, None])
        pt = tl.exp2((t - mt[:, None]) * _LOG2E - stt[:, None])
        p = sign[:, None] * (pz - pt)
    else:
        pz = tl.exp2((z - mz[None, :]) * _LOG2E - sz[None, :])
        pt = tl.exp2((t - mt[None, :]) * _LOG2E - stt[None, :])
        p = sign[None, :] * (pz - pt)
    return p


@triton.jit
def _grad_kernel(
    q_ptr, k_ptr,  # [N, D] "rows", [M, D] "columns" (swapped for the dk launch of the deterministic mode)
    tq_ptr, tk_ptr,  # [N, E], [M, E] the teacher's rows and columns (swapped with them)
    scale_ptr, tscale_ptr,  # [] fp32
    st_r_ptr,  # [5, N] fp32 (ROW_TERM): _kernel_stats of the rows with their weight a
    st_c_ptr,  # [5, M] fp32 (COL_TERM): the same per column with w
    dq_ptr,  # [N, D] fp32 in/out (contiguous, zero-initialised): += G k
    dk_ptr,  # [M, D] fp32 in/out (contiguous, zero-initialised): += Gᵀ q with atomics (COMPUTE_DK)
    N, M, D, E, stride_qn, stride_kn, stride_tqn, stride_tkn,
    cols_per_split,  # columns per split, a multiple of BLOCK_N
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_E: tl.constexpr,
    SINGLE_D: tl.constexpr, SINGLE_E: tl.constexpr,
    ROW_TERM: tl.constexpr, COL_TERM: tl.constexpr,  # G has the row (a) / the column (w) part
    COMPUTE_DK: tl.constexpr,  # also atomically accumulate dk (the default, one-sweep backward)
    DQ_ATOMIC: tl.constexpr,  # several programs (column splits) share these dq rows
    INPUT_PRECISION: tl.constexpr, T_INPUT_PRECISION: tl.constexpr,
):
    # grid: (cdiv(N, BLOCK_M), split).  z and t exactly as _lse_kernel forms them (same dots, same chunks).
    pid_m = tl.program_id(0).to(tl.int64)
    pid_s = tl.program_id(1).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # [BLOCK_M] int64
    row_ok = offs_m < N
    offs_d = tl.arange(0, BLOCK_D)
    scale = tl.load(scale_ptr).to(tl.float32)
    tscale = tl.load(tscale_ptr).to(tl.float32)
    if SINGLE_D:
        d_ok = offs_d < D
        q_blk = _load_rows(q_ptr, offs_m, row_ok, D, stride_qn, BLOCK_D)
        dq_acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    if SINGLE_E:
        tq_blk = _load_rows(tq_ptr, offs_m, row_ok, E, stride_tqn, BLOCK_E)
    n_lo = pid_s * cols_per_split
    n_hi = tl.minimum(n_lo + cols_per_split, M)
    for start_n in range(n_lo, n_hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N).to(tl.int64)  # [BLOCK_N]
        col_ok = offs_n < M
        if SINGLE_D:
            k_blk = _load_rows(k_ptr, offs_n, col_ok, D, stride_kn, BLOCK_D)
            dots = tl.dot(q_blk, tl.trans(k_blk), input_precision=INPUT_PRECISION)
        else:
            dots = dot_tile(q_ptr, k_ptr, offs_m, offs_n, row_ok, col_ok, D, stride_qn, stride_kn,
                            BLOCK_M, BLOCK_N, BLOCK_D, INPUT_PRECISION)
        if SINGLE_E:
            tk_blk = _load_rows(tk_ptr, offs_n, col_ok, E, stride_tkn, BLOCK_E)
            tdots = tl.dot(tq_blk, tl.trans(tk_blk), input_precision=T_INPUT_PRECISION)
        else:
            tdots = dot_tile(tq_ptr, tk_ptr, offs_m, offs_n, row_ok, col_ok, E, stride_tqn, stride_tkn,
                             BLOCK_M, BLOCK_N, BLOCK_E, T_INPUT_PRECISION)
        # Out-of-range entries read zeros and statistics of 0: make them -inf, so that every exponential is
        # exactly 0 there (exp(0 - max) could overflow, and inf·0 is NaN in the dots below).
        ok = row_ok[:, None] & col_ok[None, :]
        z = tl.where(ok, dots * scale, float("-inf"))  # [BLOCK_M, BLOCK_N]
        t = tl.where(ok, tdots * tscale, float("-inf"))
        g = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        if ROW_TERM:
            g += _softmax_diff(z, t, st_r_ptr, offs_m, row_ok, N, 1)
        if COL_TERM:
            g += _softmax_diff(z, t, st_c_ptr, offs_n, col_ok, M, 0)
        g_in = g.to(q_ptr.dtype.element_ty)  # half students: half G for tensor-core dots (fp32 stays fp32)
        if SINGLE_D:
            dq_acc += tl.dot(g_in, k_blk, input_precision=INPUT_PRECISION)
            if COMPUTE_DK:
                dk_part = tl.dot(tl.trans(g_in), q_blk, input_precision=INPUT_PRECISION)  # [BLOCK_N, BLOCK_D]
                tl.atomic_add(dk_ptr + offs_n[:, None] * D + offs_d[None, :], dk_part,
                              mask=col_ok[:, None] & d_ok[None, :], sem="relaxed")
        else:
            # D too large for a register accumulator: per D chunk, dq rows += G k_c in global memory (this
            # program owns them unless DQ_ATOMIC) and dk rows += Gᵀ q_c with atomics.
            for d0 in range(0, D, BLOCK_D):
                offs_dc = d0 + offs_d
                dc_ok = offs_dc < D
                k_c = tl.load(k_ptr + offs_n[:, None] * stride_kn + offs_dc[None, :],
                              mask=col_ok[:, None] & dc_ok[None, :], other=0.0)  # [BLOCK_N, BLOCK_D]
                dq_ptrs = dq_ptr + offs_m[:, None] * D + offs_dc[None, :]
                dq_mask = row_ok[:, None] & dc_ok[None, :]
                dq_c = tl.dot(g_in, k_c, input_precision=INPUT_PRECISION)  # [BLOCK_M, BLOCK_D]
                if DQ_ATOMIC:
                    tl.atomic_add(dq_ptrs, dq_c, mask=dq_mask, sem="relaxed")
                else:
                    tl.store(dq_ptrs, tl.load(dq_ptrs, mask=dq_mask, other=0.0) + dq_c, mask=dq_mask)
                if COMPUTE_DK:
                    q_c = tl.load(q_ptr + offs_m[:, None] * stride_qn + offs_dc[None, :],
                                  mask=dq_mask, other=0.0)  # [BLOCK_M, BLOCK_D]
                    dk_c = tl.dot(tl.trans(g_in), q_c, input_precision=INPUT_PRECISION)  # [BLOCK_N, BLOCK_D]
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


def _student(q: torch.Tensor, k: torch.Tensor):
    """The student's features as the kernels read them (TypeError for a dtype they do not take)."""
    return _common.unit_stride_rows("distill", q, k)


def _teacher(tq: torch.Tensor, tk: torch.Tensor, device: torch.device):
    """The teacher's features as the kernels read them: their own dtype when the kernels take it and both
    agree, else float32 (fp64, or two dtypes); on ``device``, unit stride along E."""
    dtype = tq.dtype if tq.dtype == tk.dtype and tq.dtype in _common.SUPPORTED_DTYPES else torch.float32

    def prepare(t):
        t = t.detach().to(device=device, dtype=dtype)
        return t if t.stride(1) == 1 else t.contiguous()

    return prepare(tq), prepare(tk)


def _widths(d: int, e: int, chunk: int) -> dict:
    """The width constexprs of both dots: one register-resident block or ``chunk``-sized chunks each."""
    block_d, single_d = _common.block_d(d, chunk, SINGLE_D_MAX)
    block_e, single_e = _common.block_d(e, chunk, SINGLE_D_MAX)
    return {"BLOCK_D": block_d, "SINGLE_D": single_d, "BLOCK_E": block_e, "SINGLE_E": single_e}


def _precisions(q: torch.Tensor, tq: torch.Tensor) -> dict:
    return {"INPUT_PRECISION": _common.input_precision(q.dtype),
            "T_INPUT_PRECISION": _common.input_precision(tq.dtype)}


def _merge(part: torch.Tensor) -> torch.Tensor:
    """Exact merge of partial statistics ``[P, B, L]`` (plane 0 a max, planes 1.. sums relative to it) over
    the B partials into ``[P, L]``: the largest max, and ``sum = Σ_b sum_b·exp(max_b - max)``, in a fixed
    order.

    A non-finite max (non-finite logits) is replaced by 0 as the subtrahend so that no ``-inf - (-inf)`` NaN
    appears from the rescaling itself.
    """
    if part.shape[1] == 1:
        return part[:, 0]
    mx = part[0].amax(0)
    ref = torch.where(torch.isfinite(mx), mx, torch.zeros_like(mx))
    return torch.cat((mx[None], (part[1:] * torch.exp(part[0] - ref)).sum(1)))


def _finish(part: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Five merged planes ``[5, L]`` → the student's split LSE ``[2, L]`` and the teacher's ``[3, L]``."""
    student = _merge(part[:2])
    return torch.stack((student[0], torch.log(student[1]))), _merge(part[2:])


def lse(q: torch.Tensor, k: torch.Tensor, scale: torch.Tensor, tq: torch.Tensor, tk: torch.Tensor,
        tscale: torch.Tensor, need_cols: bool
        ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor | None]:
    """Statistics sweep (``DistillEngine.lse``), one ``_lse_kernel`` launch.

    Args:
        q ``[N, D]``, k ``[M, D]``: float32/float16/bfloat16, same dtype and device; tq ``[N, E]``,
        tk ``[M, E]``: any float dtype (see the module docstring); scale, tscale: 0-dim tensors (read on the
        device).

    Returns:
        float32 ``row [2, N]`` (max z, log Σ exp(z − max)), ``col [2, M]`` (or None), ``trow [3, N]`` (max t,
        Σ exp(t − max), Σ exp(t − max)·z) and ``tcol [3, M]`` (or None).
    """
    q, k = _student(q, k)
    tq, tk = _teacher(tq, tk, q.device)
    n, d = q.shape
    m, e = k.shape[0], tq.shape[1]
    block_m, block_n, chunk, num_warps, num_stages = FWD_CONFIG
    row_blocks, col_blocks = triton.cdiv(n, block_m), triton.cdiv(m, block_n)
    split, cols_per_split = _split(row_blocks, col_blocks, block_n, q.device)
    part_r = torch.empty(5, split, n, dtype=torch.float32, device=q.device)
    part_c = torch.empty(5, row_blocks, m, dtype=torch.float32, device=q.device) if need_cols else part_r
    _lse_kernel[(row_blocks, split)](
        q, k, tq, tk, _scale_arg(scale, q.device), _scale_arg(tscale, q.device), part_r, part_c,
        n, m, d, e, q.stride(0), k.stride(0), tq.stride(0), tk.stride(0), cols_per_split,
        BLOCK_M=block_m, BLOCK_N=block_n, **_widths(d, e, chunk), NEED_COLS=need_cols, **_precisions(q, tq),
        num_warps=num_warps, num_stages=num_stages,
    )
    row, trow = _finish(part_r)
    if not need_cols:
        return row, None, trow, None
    col, tcol = _finish(part_c)
    return row, col, trow, tcol


def _kernel_stats(stats: torch.Tensor, tstats: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``[5, L]`` fp32 for ``_grad_kernel``: the student's max and shift, the teacher's max and shift, and
    ``sign(weight)``, with ``shift = log Σ exp(x − max) − log|weight|``, so that
    ``weight·exp((x − max) − log Σ) = sign·exp((x − max) − shift)``; a zero weight gives shift +inf and
    sign 0."""
    log_w = torch.log(weight.abs())
    return torch.stack((stats[0], stats[1] - log_w, tstats[0], tstats[1] - log_w, torch.sign(weight)))


def _launch_grad(rows, cols, trows, tcols, scales, st_rows, st_cols, d_rows, d_cols, atomic: bool) -> None:
    """One ``_grad_kernel`` sweep over row blocks of ``rows``: ``d_rows += G cols`` (and ``d_cols += Gᵀ rows``
    when ``atomic``); ``st_rows`` / ``st_cols`` ``[5, ·]`` from ``_kernel_stats``, None drops that part of
    G."""
    n, d = rows.shape
    m, e = cols.shape[0], trows.shape[1]
    block_m, block_n, chunk, num_warps, num_stages = BWD_CONFIG
    row_blocks, col_blocks = triton.cdiv(n, block_m), triton.cdiv(m, block_n)
    split, cols_per_split = _split(row_blocks, col_blocks, block_n, rows.device, allow=atomic)
    dummy = d_rows  # never read: its constexpr flag is off
    _grad_kernel[(row_blocks, split)](
        rows, cols, trows, tcols, *scales,
        dummy if st_rows is None else st_rows, dummy if st_cols is None else st_cols,
        d_rows, d_cols if atomic else dummy,
        n, m, d, e, rows.stride(0), cols.stride(0), trows.stride(0), tcols.stride(0), cols_per_split,
        BLOCK_M=block_m, BLOCK_N=block_n, **_widths(d, e, chunk),
        ROW_TERM=st_rows is not None, COL_TERM=st_cols is not None, COMPUTE_DK=atomic, DQ_ATOMIC=split > 1,
        **_precisions(rows, trows), num_warps=num_warps, num_stages=num_stages,
    )


def grad(q: torch.Tensor, k: torch.Tensor, scale: torch.Tensor, tq: torch.Tensor, tk: torch.Tensor,
         tscale: torch.Tensor, row: torch.Tensor, col: torch.Tensor | None, trow: torch.Tensor,
         tcol: torch.Tensor | None, a: torch.Tensor, w: torch.Tensor | None
         ) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradient sweep (``DistillEngine.grad``): ``dq_u = G k`` ``[N, D]`` and ``dk_u = Gᵀ q`` ``[M, D]``,
    float32, one recomputing sweep (two atomic-free ones in deterministic mode).

    ``row``, ``col`` (student) and ``trow``, ``tcol`` (teacher) are split LSE ``[2, ·]``; ``col``, ``tcol``
    and ``w`` are None one-way.
    """
    q, k = _student(q, k)
    tq, tk = _teacher(tq, tk, q.device)
    f32 = {"dtype": torch.float32, "device": q.device}
    cols = col is not None
    a = a.to(**f32)
    w = w.to(**f32) if cols else None
    # One exact power of two c brings max |weight| to (1/2, 1]: log|weight| ~ 0 in the shifts, and half G in
    # range; undone on the outputs.
    c = _pow2_norm(a, w)
    st_r = _kernel_stats(row.to(**f32), trow.to(**f32), a / c)
    st_c = _kernel_stats(col.to(**f32), tcol.to(**f32), w / c) if cols else None
    scales = (_scale_arg(scale, q.device), _scale_arg(tscale, q.device))
    dq = torch.zeros(q.shape, **f32)
    dk = torch.zeros(k.shape, **f32)
    if _common.deterministic():
        _launch_grad(q, k, tq, tk, scales, st_r, st_c, dq, None, atomic=False)
        _launch_grad(k, q, tk, tq, scales, st_c, st_r, dk, None, atomic=False)  # Gᵀ: roles swapped
    else:
        _launch_grad(q, k, tq, tk, scales, st_r, st_c, dq, dk, atomic=True)
    return dq.mul_(c), dk.mul_(c)


__all__ = ["grad", "lse"]
