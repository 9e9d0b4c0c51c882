"""The chunked PyTorch engine of late interaction (MaxSim): similarity tiles, never ``[Nq, Nd, Lq, Ld]``.

Implements :class:`~xloss.late_interaction.engine.MaxSimEngine` (``maxsim_fwd``, ``maxsim_bwd``) and
:class:`~xloss.late_interaction.engine.MaxSimPairsEngine` (``maxsim_pairs_fwd``, ``maxsim_pairs_bwd``); the
backward sweeps are the shared torch routing of ``backward.py``.

``maxsim_fwd`` walks over tiles of ``bq`` queries × ``bd`` documents.  Each tile is one GEMM,
``sim = q_blk.reshape(bq·Lq, D) @ d_blk.reshape(bd·Ld, D)ᵀ`` viewed ``[bq, Lq, bd, Ld]``, reduced at once:

* query→document (``q2d``): max over the document tokens (last dim), ``s_q2d = Σ_t q_w·max``;
* document→query (``d2q``): max over the query tokens (dim 1), ``s_d2q = Σ_v d_w·max``;

both from the same tile when both are asked.  Masks cost no pass over the tile: in ``exclude`` mode an
additive ``-inf`` bias on the invalid tokens of the other side (fused into the GEMM by ``addmm``), in ``zero``
mode the invalid token embeddings are zeroed once beforehand, so their similarities are exactly 0 and still
compete (PyLate ``colbert_scores``).  Ties go to the lowest index (``torch.max``).

The tile size comes from a memory budget, ``XLOSS_CPU_TILE_MB`` (default 8 MiB here: a tile that stays in
the L2/L3 cache is faster than a big one).  Half-precision inputs are computed in fp32, fp64 stays fp64.
Nothing here is CPU-specific: this is also the fallback on CUDA tensors when Triton is missing.

``maxsim_pairs_fwd`` is the aligned-pair version (query a against document a), chunked ``bmm``s.  Only this
engine has it: ``maxsim_pairs`` runs it whatever the backend (except ``"reference"``).

Compiled op: on CPU tensors, when only the query→document direction is asked (ColBERT scoring, every
reduction, weights and mask mode, fp32/bf16/fp16/fp64), both forwards run ``torch.ops.xloss.maxsim_q2d``
(``xloss/csrc/cpu/maxsim.cpp``: a register-blocked micro-kernel that never writes a similarity tile and
touches only the valid prefix of each ragged document) instead of the tile loop, with the same outputs, so the
backward is unchanged.  ``d2q``/``both``, CUDA tensors, ``XLOSS_NO_EXT=1`` or a failed build keep the loop.
"""

from __future__ import annotations

import math

import torch

from .. import _ext, _tiling
from .._tiling import accumulation_dtype, upcast

DEFAULT_TILE_BYTES = 8 * 2**20


def index_dtype(length: int) -> torch.dtype:
    """int16 arg-max indices (token counts up to 32767), int32 beyond."""
    return torch.int16 if length <= 2**15 - 1 else torch.int32


def budget_bytes() -> int:
    """The working-set budget in bytes: ``XLOSS_CPU_TILE_MB`` (MiB, may be fractional), default 8 MiB."""
    return _tiling.budget_bytes(DEFAULT_TILE_BYTES)


def tile_blocks(nq: int, lq: int, nd: int, ld: int, itemsize: int) -> tuple[int, int]:
    """``(bq, bd)`` queries and documents per tile: a roughly square ``bq·Lq × bd·Ld`` tile within budget."""
    elems = max(1, budget_bytes() // itemsize)
    side = math.isqrt(elems)
    bq = max(1, min(nq, side // lq))
    bd = max(1, min(nd, elems // (bq * lq * ld)))
    if bd == nd:  # the documents fit whole: give the rest of the budget to the queries
        bq = max(1, min(nq, elems // (nd * ld * lq)))
    return bq, bd


def _zero_invalid(x: torch.Tensor, valid: torch.Tensor, all_valid: bool) -> torch.Tensor:
    """Token embeddings with the invalid tokens set to 0 (a copy), or x itself when all are valid."""
    return x if all_valid else x * valid.unsqueeze(-1).to(x.dtype)


def _bias(valid: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """0 for valid tokens, -inf for invalid ones."""
    return torch.zeros(valid.shape, dtype=dtype, device=valid.device).masked_fill_(~valid, float("-inf"))


def _reduce(tile: torch.Tensor, dim: int, need_idx: bool, idx_dtype: torch.dtype):
    """Max over ``dim`` (values, and the lowest arg-max when ``need_idx``); a value of -inf means that no
    valid token was there: it becomes 0 and its index -1."""
    if need_idx:
        val, idx = torch.max(tile, dim)
    else:
        val, idx = torch.amax(tile, dim), None
    empty = val == float("-inf")
    val.masked_fill_(empty, 0)
    if need_idx:
        idx = idx.to(idx_dtype).masked_fill_(empty, -1)
    return val, idx


def _prepare(q, d, q_w, d_w, q_valid, d_valid, zero_mode: bool, q2d: bool, d2q: bool):
    """What both forwards need before their tiles: inputs and weights in the accumulation dtype, and the masks
    as zeroed embeddings (zero mode) or as ``-inf`` biases ``[Nd, Ld]`` / ``[Nq, Lq]`` (exclude mode; None
    where every token is valid or the direction is not asked)."""
    acc = accumulation_dtype(q.dtype)
    qf, df = upcast(q), upcast(d)
    q_all, d_all = bool(q_valid.all()), bool(d_valid.all())
    bias_v = bias_t = None
    if zero_mode:
        qf, df = _zero_invalid(qf, q_valid, q_all), _zero_invalid(df, d_valid, d_all)
    else:
        if q2d and not d_all:
            bias_v = _bias(d_valid, acc)  # invalid document tokens never win
        if d2q and not q_all:
            bias_t = _bias(q_valid, acc)  # invalid query tokens never win
    return qf, df, (q_w.to(acc) if q2d else None), (d_w.to(acc) if d2q else None), bias_v, bias_t


_OP = "maxsim_q2d"


def _use_op(q: torch.Tensor, q2d: bool, d2q: bool) -> bool:
    """True when the compiled ``xloss::maxsim_q2d`` covers this call: CPU tensors, query→document only, and
    the op is built (``xloss._ext``; the first call may compile it, and registers its fake kernel)."""
    return q.device.type == "cpu" and q2d and not d2q and _ext.has_op(_OP, fake=_maxsim_q2d_fake)


def _maxsim_q2d_fake(q, d, q_w, q_valid, d_valid, zero_mode, pairs, need_aux):
    """Shapes and dtypes of ``xloss::maxsim_q2d``: scores ``[Nq, Nd]`` (``[N]`` for pairs), indices and
    maxima ``[Nq, Nd, Lq]`` (``[N, Lq]``), or empty tensors without ``need_aux``."""
    acc = accumulation_dtype(q.dtype)
    lead = (q.shape[0],) if pairs else (q.shape[0], d.shape[0])
    aux = (*lead, q.shape[1]) if need_aux else (0,)
    return (q.new_empty(lead, dtype=acc), q.new_empty(aux, dtype=index_dtype(d.shape[1])),
            q.new_empty(aux, dtype=acc))


def _op_fwd(q, d, q_w, q_valid, d_valid, zero_mode: bool, pairs: bool, need_aux: bool):
    """The engine result ``(s, idx, val, None, None, None)`` from the compiled op."""
    q_w = q_w.to(accumulation_dtype(q.dtype))
    s, idx, val = torch.ops.xloss.maxsim_q2d(q, d, q_w, q_valid, d_valid, zero_mode, pairs, need_aux)
    return s, (idx if need_aux else None), (val if need_aux else None), None, None, None


def maxsim_fwd(q, d, q_w, d_w, q_valid, d_valid, zero_mode: bool, q2d: bool, d2q: bool, *, need_aux: bool = True):
    """Late-interaction scores of every query against every document, tile by tile.

    Args:
        q: ``[Nq, Lq, D]`` query tokens; d: ``[Nd, Ld, D]`` document tokens (fp32/fp16/bf16/fp64, same dtype).
        q_w: ``[Nq, Lq]`` final per-token weights of the query→document sum (mask, mean normalisation and
            user weights folded in, 0 for invalid tokens); used when ``q2d``.
        d_w: ``[Nd, Ld]`` the same for the document→query sum; None unless ``d2q``.
        q_valid, d_valid: ``[Nq, Lq]``, ``[Nd, Ld]`` bool token masks.
        zero_mode: invalid tokens score 0 and still compete (PyLate); else they never win (``exclude``).
        q2d, d2q: which directions to compute.
        need_aux: also return the arg-max indices and max values (for backward); False returns None for them
            and skips the index search.

    Returns:
        ``(s_q2d, idx_q2d, val_q2d, s_d2q, idx_d2q, val_d2q)``, None for a direction not asked:
        ``s_q2d [Nq, Nd]`` (accumulation dtype) ``= Σ_t q_w[a,t]·val_q2d[a,b,t]``; ``val_q2d [Nq, Nd, Lq]`` the
        max over document tokens (0 when none is valid in exclude mode); ``idx_q2d [Nq, Nd, Lq]`` int16 its
        arg-max (lowest on ties, -1 when none is valid in exclude mode).  ``d2q``: the same with
        ``[Nq, Nd, Ld]`` tensors, the max over query tokens for each document token, weighted by ``d_w``.
        In exclude mode with both directions, entries of a direction at its own invalid tokens (zero weight)
        are 0 / -1.
    """
    if _use_op(q, q2d, d2q):
        return _op_fwd(q, d, q_w, q_valid, d_valid, zero_mode, False, need_aux)
    acc = accumulation_dtype(q.dtype)
    dev = q.device
    nq, lq, dim = q.shape
    nd, ld, _ = d.shape
    qf, df, q_w, d_w, bias_v, bias_t = _prepare(q, d, q_w, d_w, q_valid, d_valid, zero_mode, q2d, d2q)
    bias_v = None if bias_v is None else bias_v.reshape(1, nd * ld)
    bias_t = None if bias_t is None else bias_t.reshape(nq * lq, 1)
    qflat, dflat = qf.reshape(nq * lq, dim), df.reshape(nd * ld, dim)

    s_q2d = torch.empty(nq, nd, dtype=acc, device=dev) if q2d else None
    s_d2q = torch.empty(nq, nd, dtype=acc, device=dev) if d2q else None
    idx_q2d = val_q2d = idx_d2q = val_d2q = None
    if need_aux and q2d:
        idx_q2d = torch.empty(nq, nd, lq, dtype=index_dtype(ld), device=dev)
        val_q2d = torch.empty(nq, nd, lq, dtype=acc, device=dev)
    if need_aux and d2q:
        idx_d2q = torch.empty(nq, nd, ld, dtype=index_dtype(lq), device=dev)
        val_d2q = torch.empty(nq, nd, ld, dtype=acc, device=dev)

    bq, bd = tile_blocks(nq, lq, nd, ld, qf.element_size())
    buf = torch.empty(bq * lq * bd * ld, dtype=acc, device=dev)
    for a0 in range(0, nq, bq):
        a1 = min(nq, a0 + bq)
        na = a1 - a0
        q_blk = qflat[a0 * lq: a1 * lq]
        for b0 in range(0, nd, bd):
            b1 = min(nd, b0 + bd)
            nb = b1 - b0
            tile = buf[: na * lq * nb * ld].view(na * lq, nb * ld)
            d_blk_t = dflat[b0 * ld: b1 * ld].T
            if bias_v is not None:
                torch.addmm(bias_v[:, b0 * ld: b1 * ld], q_blk, d_blk_t, out=tile)
            else:
                torch.mm(q_blk, d_blk_t, out=tile)
            if bias_t is not None:
                tile.add_(bias_t[a0 * lq: a1 * lq])
            t4 = tile.view(na, lq, nb, ld)
            if q2d:
                val, idx = _reduce(t4, 3, need_aux, index_dtype(ld))  # [na, lq, nb]
                s_q2d[a0:a1, b0:b1] = torch.bmm(q_w[a0:a1, None, :], val)[:, 0]
                if need_aux:
                    val_q2d[a0:a1, b0:b1] = val.transpose(1, 2)
                    idx_q2d[a0:a1, b0:b1] = idx.transpose(1, 2)
            if d2q:
                val, idx = _reduce(t4, 1, need_aux, index_dtype(lq))  # [na, nb, ld]
                s_d2q[a0:a1, b0:b1] = (val * d_w[None, b0:b1]).sum(2)
                if need_aux:
                    val_d2q[a0:a1, b0:b1] = val
                    idx_d2q[a0:a1, b0:b1] = idx
    return s_q2d, idx_q2d, val_q2d, s_d2q, idx_d2q, val_d2q


def maxsim_pairs_fwd(q, d, q_w, d_w, q_valid, d_valid, zero_mode: bool, q2d: bool, d2q: bool, *,
                     need_aux: bool = True):
    """Aligned pairs: query a against document a only (``Nq == Nd == N``), chunked ``bmm``s of ``[n, Lq, Ld]``.

    Arguments as :func:`maxsim_fwd`.  Returns ``(s_q2d, idx_q2d, val_q2d, s_d2q, idx_d2q, val_d2q)`` with
    ``s [N]``, ``idx_q2d``/``val_q2d [N, Lq]`` and ``idx_d2q``/``val_d2q [N, Ld]``; None where not asked.
    """
    if _use_op(q, q2d, d2q):
        return _op_fwd(q, d, q_w, q_valid, d_valid, zero_mode, True, need_aux)
    acc = accumulation_dtype(q.dtype)
    dev = q.device
    n, lq, _ = q.shape
    ld = d.shape[1]
    qf, df, q_w, d_w, bias_v, bias_t = _prepare(q, d, q_w, d_w, q_valid, d_valid, zero_mode, q2d, d2q)
    bias_v = None if bias_v is None else bias_v[:, None, :]  # [N, 1, Ld]
    bias_t = None if bias_t is None else bias_t[:, :, None]  # [N, Lq, 1]
    s_q2d = torch.empty(n, dtype=acc, device=dev) if q2d else None
    s_d2q = torch.empty(n, dtype=acc, device=dev) if d2q else None
    idx_q2d = val_q2d = idx_d2q = val_d2q = None
    if need_aux and q2d:
        idx_q2d = torch.empty(n, lq, dtype=index_dtype(ld), device=dev)
        val_q2d = torch.empty(n, lq, dtype=acc, device=dev)
    if need_aux and d2q:
        idx_d2q = torch.empty(n, ld, dtype=index_dtype(lq), device=dev)
        val_d2q = torch.empty(n, ld, dtype=acc, device=dev)
    rows = max(1, min(n, budget_bytes() // (lq * ld * qf.element_size())))
    buf = torch.empty(rows * lq * ld, dtype=acc, device=dev)
    for a0 in range(0, n, rows):
        a1 = min(n, a0 + rows)
        tile = buf[: (a1 - a0) * lq * ld].view(a1 - a0, lq, ld)
        if bias_v is not None:
            torch.baddbmm(bias_v[a0:a1], qf[a0:a1], df[a0:a1].transpose(1, 2), out=tile)
        else:
            torch.bmm(qf[a0:a1], df[a0:a1].transpose(1, 2), out=tile)
        if bias_t is not None:
            tile.add_(bias_t[a0:a1])
        if q2d:
            val, idx = _reduce(tile, 2, need_aux, index_dtype(ld))  # [n, lq]
            s_q2d[a0:a1] = (val * q_w[a0:a1]).sum(1)
            if need_aux:
                val_q2d[a0:a1], idx_q2d[a0:a1] = val, idx
        if d2q:
            val, idx = _reduce(tile, 1, need_aux, index_dtype(lq))  # [n, ld]
            s_d2q[a0:a1] = (val * d_w[a0:a1]).sum(1)
            if need_aux:
                val_d2q[a0:a1], idx_d2q[a0:a1] = val, idx
    return s_q2d, idx_q2d, val_q2d, s_d2q, idx_d2q, val_d2q


def maxsim_bwd(q, d, q_w, d_w, q_valid, d_valid, zero_mode: bool, aux_q2d, aux_d2q, g_q2d, g_d2q,
               need_q: bool, need_d: bool, need_qw: bool, need_dw: bool):
    """Gradients of the cross scores of :func:`maxsim_fwd`: ``backward.maxsim_backward`` with the torch
    routing (inputs upcast once).  Returns ``(dq, dd, dq_w, dd_w)`` in the accumulation dtype, None where not
    needed or zero."""
    return _bwd.maxsim_backward(q, d, q_w, d_w, q_valid, d_valid, zero_mode, aux_q2d, aux_d2q, g_q2d, g_d2q,
                                need_q, need_d, need_qw, need_dw)


def maxsim_pairs_bwd(q, d, q_w, d_w, q_valid, d_valid, zero_mode: bool, aux_q2d, aux_d2q, g_q2d, g_d2q,
                     need_q: bool, need_d: bool, need_qw: bool, need_dw: bool):
    """Gradients of the aligned-pair scores of :func:`maxsim_pairs_fwd`: ``backward.pairs_backward``."""
    return _bwd.pairs_backward(q, d, q_w, d_w, q_valid, d_valid, zero_mode, aux_q2d, aux_d2q, g_q2d, g_d2q,
                               need_q, need_d, need_qw, need_dw)


from . import backward as _bwd  # last: backward.py imports budget_bytes from here

__all__ = ["accumulation_dtype", "budget_bytes", "index_dtype", "maxsim_bwd", "maxsim_fwd", "maxsim_pairs_bwd",
           "maxsim_pairs_fwd"]
