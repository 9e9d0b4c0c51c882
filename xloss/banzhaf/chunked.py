"""The chunked engine of the Banzhaf interaction: vectorised PyTorch, used when the compiled op is unavailable
(any device; ``backend="chunked"``, alias ``"cpu"``).  It implements :class:`xloss.banzhaf.engine.BanzhafEngine`.

It evaluates the four coalition values of SPEC.md §6 for a chunk of (i, j, sample) triples of every batch row
at once, on ``[B, n, T, V]`` masked grids (so ``n`` is chosen to keep that grid under ``CHUNK_ELEMENTS``), as
HBI's loop does for one triple, and accumulates with ``index_add_``.  The grids are ``where``s (sim on the
coalition, exactly 0 elsewhere), so NaN and inf reach exactly the values whose coalition holds them, as in the
reference, and padded positions never do.

The coalition bits are the compiled op's counter-based bits (``xloss/csrc/banzhaf.h``), re-implemented with
int64 tensor ops whose intermediate products stay below 2**49, so that a seed draws the same coalitions on every
path: ``coalition_bits`` materialises them (tests feed them to the reference).
"""

from __future__ import annotations

import torch

CHUNK_ELEMENTS = 1 << 21  # elements of one [B, n, T, V] grid
MASK32 = 0xFFFFFFFF
NEG = -9e15  # HBI's weight of a token outside the coalition


# ---------------------------------------------------------------------------------------------- the bits
def _mul32_int(x: int, c: int) -> int:
    return (x * c) & MASK32


def _mix32_int(x: int) -> int:
    x ^= x >> 16
    x = _mul32_int(x, 0x7FEB352D)
    x ^= x >> 15
    x = _mul32_int(x, 0x846CA68B)
    return x ^ (x >> 16)


def make_key(seed: int) -> tuple[int, int]:
    """The two 32-bit keys of a seed (``banzhaf::make_key``)."""
    u = int(seed) & 0xFFFFFFFFFFFFFFFF
    k1 = _mix32_int((u & MASK32) ^ 0x9E3779B9)
    k2 = _mix32_int((u >> 32) ^ k1 ^ 0x85EBCA6B)
    return k1, k2


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """``x * c mod 2**32`` for int64 ``x`` in [0, 2**32), in two 16-bit halves of ``c`` (no int64 overflow)."""
    return (x * (c & 0xFFFF) + (((x * (c >> 16)) & 0xFFFF) << 16)) & MASK32


def _mix32(x: torch.Tensor) -> torch.Tensor:
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def words(key: tuple[int, int], n: torch.Tensor) -> torch.Tensor:
    """32 coalition bits (as int64 in [0, 2**32)) of counters ``n`` (int64 >= 0): ``banzhaf::word``."""
    k1, k2 = key
    return _mix32(_mix32((n & MASK32) ^ k1) ^ (n >> 32) ^ k2)


def _bits(key: tuple[int, int], idx: torch.Tensor, elements: int) -> torch.Tensor:
    """Bits ``[..., elements]`` (bool) of the samples with flat indices ``idx`` (int64 ``[...]``)."""
    w_per = (elements + 31) // 32
    e = torch.arange(elements, device=idx.device)
    n = idx[..., None] * w_per + (e >> 5)
    return ((words(key, n) >> (e & 31)) & 1).bool()


def coalition_bits(seed: int, batch: int, t_len: int, v_len: int, num_samples: int,
                   device: torch.device | str = "cpu") -> torch.Tensor:
    """The coalitions a seed draws, as the ``coalitions`` argument takes them: bool ``[B, T, V, S, T + V]``."""
    idx = torch.arange(batch * t_len * v_len * num_samples, device=device, dtype=torch.int64)
    return _bits(make_key(seed), idx, t_len + v_len).reshape(batch, t_len, v_len, num_samples, t_len + v_len)


# ---------------------------------------------------------------------------------------------- values
def _softmax_in(w: torch.Tensor, member: torch.Tensor) -> torch.Tensor:
    return torch.softmax(w.masked_fill(~member, NEG), dim=-1)


def _combine(masked: torch.Tensor, wt: torch.Tensor, wv: torch.Tensor) -> torch.Tensor:
    return ((masked.amax(dim=-1) * wt).sum(-1) + (masked.amax(dim=-2) * wv).sum(-1)) / 2.0


def banzhaf_interaction(sim: torch.Tensor, p: torch.Tensor, q: torch.Tensor, text_mask: torch.Tensor,
                        video_mask: torch.Tensor, num_samples: int, seed: int, coalitions: torch.Tensor | None,
                        mode: str) -> torch.Tensor:
    """Same arguments and result as ``torch.ops.xloss.banzhaf_interaction`` (checked by the caller).

    ``sim [B, T, V]``, ``p [B, T]``, ``q [B, V]`` (one float dtype), bool masks ``[B, T]``, ``[B, V]``; returns
    ``[B, T, V]`` in sim's dtype, computed in fp32 (fp64 for fp64 inputs).
    """
    b, t_len, v_len = sim.shape
    dev = sim.device
    acc = torch.float64 if sim.dtype == torch.float64 else torch.float32
    L, p, q = sim.to(acc), p.to(acc), q.to(acc)
    zero = torch.zeros((), dtype=acc, device=dev)
    key = make_key(seed)
    n_triples = t_len * v_len * num_samples
    chunk = max(1, CHUNK_ELEMENTS // (b * t_len * v_len))
    out = torch.zeros(b, t_len * v_len, dtype=acc, device=dev)
    t_ar, v_ar = torch.arange(t_len, device=dev), torch.arange(v_len, device=dev)
    batch_base = torch.arange(b, device=dev, dtype=torch.int64)[:, None] * n_triples
    for start in range(0, n_triples, chunk):
        tri = torch.arange(start, min(start + chunk, n_triples), device=dev, dtype=torch.int64)  # (i, j, s) flat
        i, j = tri // (v_len * num_samples), (tri // num_samples) % v_len
        if coalitions is not None:
            bits = coalitions.reshape(b, n_triples, t_len + v_len)[:, start:start + tri.numel()].bool()
        else:
            bits = _bits(key, batch_base + tri, t_len + v_len)  # [B, n, T + V]
        not_i = t_ar[None, :] != i[:, None]  # [n, T]
        not_j = v_ar[None, :] != j[:, None]  # [n, V]
        in_t = bits[..., :t_len] & text_mask[:, None, :] & not_i  # S_t: [B, n, T]
        in_v = bits[..., t_len:] & video_mask[:, None, :] & not_j  # S_v: [B, n, V]
        in_ti, in_vj = in_t | ~not_i, in_v | ~not_j  # S_t ∪ {i}, S_v ∪ {j}
        grid = L[:, None]  # [B, 1, T, V]

        def value(mt, mv, grid=grid):
            masked = torch.where(mt[..., :, None] & mv[..., None, :], grid, zero)  # exactly 0 off the coalition
            return masked, _softmax_in(p[:, None], mt), _softmax_in(q[:, None], mv)

        masked, wt, wv = value(in_t, in_v)
        f_s = _combine(masked, wt, wv)
        f_i = _combine(*value(in_ti, in_v))
        f_j = _combine(*value(in_t, in_vj))
        if mode == "hbi":
            pair = (~not_i)[:, :, None] & (~not_j)[:, None, :]  # [n, T, V]: the entry (i, j)
            masked = torch.where(pair, grid, masked)
            wt2 = torch.where(~not_i, p[:, None], wt.masked_fill(~in_t, NEG))
            wv2 = torch.where(~not_j, q[:, None], wv.masked_fill(~in_v, NEG))
            f_ij = _combine(masked, torch.softmax(wt2, dim=-1), torch.softmax(wv2, dim=-1))
        else:
            f_ij = _combine(*value(in_ti, in_vj))
        out.index_add_(1, i * v_len + j, f_ij - f_i - f_j + f_s)
    out = out.reshape(b, t_len, v_len) / num_samples
    return torch.where(text_mask[:, :, None] & video_mask[:, None, :], out, zero).to(sim.dtype)
