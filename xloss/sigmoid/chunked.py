"""The chunked PyTorch path of the sigmoid loss: row strips of the logits, never the whole N×M matrix.

Nothing normalises a row, so the gradient of every logit is known as soon as the logit is: one sweep over row
strips gives the loss and all the gradients (3 GEMMs per strip, no recompute).  Per strip ``S = z[i0:i1]``:

1. ``S = b + (s·q_blk) kᵀ``: one ``addmm`` (the bias is the GEMM's ``C`` input; ``s·q`` as open_clip).
2. The positive logit of each row is read (``z_pos``, a gather of one value per row) and its entry set to
   ``-inf``, whose softplus and sigmoid are exactly 0: every remaining entry is a negative.
3. Per sub-block of rows (``ELEMENTWISE_BYTES``, small enough that its passes run in cache): ``softplus(z)``
   (``= -log σ(-z)``, accurate for both signs: PyTorch forms ``log1p(exp(z))``) into a work buffer and its
   row sums; with ``need_grad``, ``σ(z)`` in place (``dℓ/dz`` of a negative), times the row weights if any,
   and its row sums (for ``db``).
4. The positives' own terms per row, O(n): loss ``softplus(-z_pos)``, ``dℓ/dz = -σ(-z_pos)`` (formed directly:
   ``σ(z) - 1`` would cancel), scattered into the strip; then ``dq_blk = S k`` and ``dk += Sᵀ (s·q_blk)``.

With group ids (``qg``, ``kg``) instead of labels, a pair is positive iff its ids are equal, so a row may have
any number of positives: steps 2 and 4 give way to a sign per entry, formed per sub-block from the ids,
``-y = -1`` on the positives and ``+1`` elsewhere.  Then ``t = -y·z`` (the logits times it) gives the loss
``softplus(t)``, and ``σ(t)`` times it again gives ``dℓ/dz = -y·σ(t)`` (a positive's ``-σ(-z)`` formed
directly, as in step 4).

``ds = Σ dZ∘(q kᵀ) = Σ_i <q_i, (dZ k)_i>`` comes from the unscaled ``dZ k`` at the end, O(N·D).  Memory: one
``rows × M`` strip (``XLOSS_CPU_TILE_MB``, default ``DEFAULT_TILE_BYTES``), one sub-block buffer and
O((N+M)·D).  fp16/bf16 inputs are computed in fp32, fp64 in fp64.  Nothing here is CPU-specific: it also
runs on CUDA tensors when Triton is missing.
"""

from __future__ import annotations

import torch

from .._tiling import accumulation_dtype, budget_bytes, upcast

# Strips of 64 MiB (1024 rows at M = 16384 fp32) keep the three GEMMs near their large-matrix speed: on the
# 2-core development machine (EPYC, AVX2, 1 MiB L2 per core, 32 MiB L3), M = 16384, D = 512, strips of 256
# rows cost ~1.3x the GEMM CPU time per row of 1024-row strips.  At that size the strip is still a few % of
# the naive loss's N×M matrices.
DEFAULT_TILE_BYTES = 64 * 2**20
# The elementwise passes run on sub-blocks of a strip of this size: the logits sub-block and its softplus
# buffer (16 MiB together) stay in L3 (32 MiB here) from the softplus to the sigmoid and the sums.  Sub-blocks
# small enough for L2 (1 MiB) were no faster with one thread (N = M = 4096, D = 512: 0.87 s vs 0.86 s CPU time
# per forward+backward) and, each op being one OpenMP region, cost up to 2x more CPU time with two threads on
# the (shared, oversubscribed) development machine; whole 64 MiB strips cost 0.98 s with one thread.
ELEMENTWISE_BYTES = 8 * 2**20
# softplus(z) returns z above this threshold; exp(50) still fits fp32, and log1p(exp(-50)) ~ 2e-22 is below
# the rounding of z in fp64 as well (PyTorch's default 20 would leave 2e-9 there, visible in fp64).
SOFTPLUS_THRESHOLD = 50.0


def _strip_rows(n: int, m: int, itemsize: int) -> int:
    """Rows per strip so that one strip of ``rows × m`` logits fits the budget (at least one row)."""
    return max(1, min(n, budget_bytes(DEFAULT_TILE_BYTES) // max(1, m * itemsize)))


def _sub_rows(m: int, itemsize: int) -> int:
    """Rows per elementwise sub-block: ``ELEMENTWISE_BYTES`` of logits (at least one row)."""
    return max(1, ELEMENTWISE_BYTES // max(1, m * itemsize))


def _negated_targets(qg_rows: torch.Tensor, kg: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """``-y`` of a sub-block into ``out [r, m]``: -1 where the query's and key's group ids match, else +1."""
    return out.fill_(1.0).masked_fill_(qg_rows[:, None] == kg, -1.0)


def _label_positives(z, z_pos, lab, has_pos, loss_rows, dsum, w) -> None:
    """The labels' positive pairs of a strip (one per row at most; the passes saw them as -inf, adding 0):
    their loss into ``loss_rows [r]`` and, when ``dsum`` is given (``need_grad``), their ``dℓ/dz`` (times the
    row weights ``w [r, 1]`` if any) into the strip ``z`` and into ``dsum [r]``."""
    pos_f = has_pos.to(z.dtype)
    loss_rows += (torch.nn.functional.softplus(-z_pos, 1, SOFTPLUS_THRESHOLD) * pos_f).squeeze(1)
    if dsum is None:
        return
    # The positive's dℓ/dz = -σ(-z), formed directly (σ(z) - 1 would cancel).
    d_pos = -torch.sigmoid(-z_pos) * pos_f if w is None else -torch.sigmoid(-z_pos) * pos_f * w
    z.scatter_(1, lab, torch.where(has_pos, d_pos, z.gather(1, lab)))
    dsum += d_pos.squeeze(1)


def forward_backward(
    q: torch.Tensor,
    k: torch.Tensor,
    scale: torch.Tensor,
    bias: torch.Tensor,
    labels: torch.Tensor,
    need_grad: bool,
    *,
    row_weight: torch.Tensor | None = None,
    per_row: bool = False,
    qg: torch.Tensor | None = None,
    kg: torch.Tensor | None = None,
):
    """Loss and gradients of one block of queries against one block of keys, in one sweep.

    The engine contract shared with ``triton.py`` (and used by ``xloss.distributed``).

    Args:
        q: ``[n, D]`` queries; k: ``[m, D]`` keys (same dtype and device; fp32/fp16/bf16/fp64).
        scale: 0-dim logit scale ``s``; bias: 0-dim logit bias ``b`` (accumulation dtype preferred).
        labels: ``[n]`` long: each query's positive key index inside this key block, or ``-1`` when its
            positive is not in this block (then all its pairs here are negatives).  Ignored (may be None) with
            group ids.
        need_grad: compute the gradients; False returns None for them and skips the gradient GEMMs.
        row_weight: optional ``[n]`` weights ``w``: the gradients are those of ``Σ_i w_i ℓ_i`` instead of
            ``Σ_i ℓ_i`` (the returned loss is not weighted).  Used for ``reduction="none"``.
        per_row: return the per-query block sums ``ℓ_i`` ``[n]`` instead of their 0-dim total.
        qg, kg: optional ``[n]``, ``[m]`` integer group ids (both or neither), instead of ``labels``:
            ``y_ij = +1`` iff ``qg[i] == kg[j]``.

    Returns:
        ``(loss, dq, dk, ds, db)`` in the accumulation dtype (fp32 for half inputs, fp64 for fp64):
        ``loss = Σ_ij -log σ(y_ij z_ij)`` over the block (0-dim, or ``[n]`` row sums when ``per_row``);
        ``dq [n, D]``, ``dk [m, D]``, ``ds``, ``db`` (0-dim) the gradients of (weighted) ``loss`` with respect
        to q, k, s and b, or all four None when ``need_grad`` is False.
    """
    q, k = upcast(q), upcast(k)
    acc = q.dtype
    dev = q.device
    s = scale.detach().to(device=dev, dtype=acc)
    b = bias.detach().to(device=dev, dtype=acc)
    n, m = q.shape[0], k.shape[0]
    qs = q * s  # [n, D]: s·q as open_clip forms it (s·q)kᵀ; also the right factor of dk = s·dZᵀ q
    kt = k.T
    rows = _strip_rows(n, m, q.element_size())
    sub = _sub_rows(m, q.element_size())
    groups = qg is not None
    if groups:
        qg = qg.to(device=dev, dtype=torch.long)
        kg = kg.to(device=dev, dtype=torch.long)[None, :]  # [1, m]
        sign = torch.empty(min(rows, sub), m, dtype=acc, device=dev)  # -y of one sub-block
    else:
        labels = labels.to(device=dev, dtype=torch.long)
        has_pos = labels >= 0  # [n]
        lab = labels.clamp_min(0)[:, None]  # [n, 1]; a row without a positive points at column 0 (kept)
    strip = torch.empty(rows, m, dtype=acc, device=dev)
    work = torch.empty(min(rows, sub), m, dtype=acc, device=dev)
    loss_rows = torch.empty(n, dtype=acc, device=dev)
    w = None
    if need_grad:
        dq = torch.empty(n, q.shape[1], dtype=acc, device=dev)
        dk = torch.zeros(m, k.shape[1], dtype=acc, device=dev)
        dsum = torch.empty(n, dtype=acc, device=dev)  # Σ_j dZ_ij, for db
        if row_weight is not None:
            w = row_weight.detach().to(device=dev, dtype=acc).reshape(n, 1)
    for i0 in range(0, n, rows):
        i1 = min(n, i0 + rows)
        z = strip[: i1 - i0]
        torch.addmm(b, qs[i0:i1], kt, out=z)
        if not groups:
            lab_b, pos_b = lab[i0:i1], has_pos[i0:i1, None]
            z_pos = z.gather(1, lab_b)  # [r, 1]
            # The positive entry becomes -inf, whose softplus and sigmoid are exactly 0: the passes below
            # treat every entry as a negative; the positive's own terms are added per row afterwards (O(r)).
            z.scatter_(1, lab_b, torch.where(pos_b, float("-inf"), z_pos))
        for j0 in range(i0, i1, sub):  # sub-blocks of rows small enough to stay in cache between their passes
            j1 = min(i1, j0 + sub)
            zs, sp = z[j0 - i0: j1 - i0], work[: j1 - j0]
            if groups:
                sg = _negated_targets(qg[j0:j1], kg, sign[: j1 - j0])
                zs.mul_(sg)  # t = -y·z: every entry's loss is softplus(t), its dℓ/dz = -y·σ(t)
            torch._C._nn.softplus(zs, 1, SOFTPLUS_THRESHOLD, out=sp)  # -log σ(-z); softplus(t) with groups
            torch.sum(sp, 1, out=loss_rows[j0:j1])
            if need_grad:
                zs.sigmoid_()  # dℓ/dz of a negative (labels); σ(t) (groups)
                if groups:
                    zs.mul_(sg)  # -y·σ(t): a positive's -σ(-z) without cancellation
                if w is not None:
                    zs.mul_(w[j0:j1])
                torch.sum(zs, 1, out=dsum[j0:j1])
        if not groups:  # with groups every entry's terms are in already
            _label_positives(z, z_pos, lab_b, pos_b, loss_rows[i0:i1], dsum[i0:i1] if need_grad else None,
                             None if w is None else w[i0:i1])
        if need_grad:
            torch.mm(z, k, out=dq[i0:i1])  # unscaled dZ k, for ds below
            dk.addmm_(z.T, qs[i0:i1])
    loss = loss_rows if per_row else loss_rows.sum()
    if not need_grad:
        return loss, None, None, None, None
    ds = torch.dot(q.reshape(-1), dq.reshape(-1))  # Σ_ij dZ_ij <q_i, k_j>, no [n, D] temporary
    return loss, dq.mul_(s), dk, ds, dsum.sum()


__all__ = ["accumulation_dtype", "forward_backward"]
