"""Cross-rank negatives: contrastive losses over a batch spread across the ranks of a process group.

Each rank ``r`` holds local query rows ``q_r [n_r, D]`` and local key rows ``k_r [m_r, D]``.  The loss is the
single-process loss of the concatenated batch ``q = cat_r q_r`` (``[N, D]``), ``k = cat_r k_r`` (``[M, D]``),
and no rank ever holds the global ``N×M`` logits.  Only ``torch.distributed`` collectives and point-to-point
ops are used (gloo on CPU, NCCL on CUDA); the tile work is done by the single-process engines
(``xloss.info_nce.cpu`` / ``triton``, ``xloss.sigmoid.cpu`` / ``triton``).

Entry points: ``xloss.info_nce(..., group=g, exchange=...)`` and ``xloss.sigmoid_loss(..., group=g, ...)``
dispatch here when ``g`` has more than one rank; ``info_nce`` and ``sigmoid_loss`` of this module take the
same arguments.

Semantics
---------
* **Labels are global.**  ``labels`` (``[n_r]``, optional) gives each local query's positive as an index into
  the concatenated keys, ``[0, M)``.  Default: local query ``i`` of rank ``r`` ↔ global key
  ``offset_r + i`` where ``offset_r = m_0 + … + m_{r-1}``, which needs ``n_r <= m_r`` on every rank (as the
  single-process default needs ``N <= M``).  With the usual equal split of a CLIP batch this is the diagonal.
* **Uneven per-rank batch sizes** are supported: the sizes are gathered once per call (one small all_gather
  that also checks D, dtype, device, logit scale and label range on every rank at once, so that a bad input
  raises the same error on every rank instead of hanging the others).
* **Returned value**: for ``reduction="mean"`` / ``"sum"`` the GLOBAL loss, bit-identical on every rank; for
  ``"none"`` this rank's per-query terms ``[n_r]``.  (The sigmoid loss forms its gradients in the forward
  pass for ``"mean"``/``"sum"``; for ``"none"`` its backward exchanges the keys once more.)
* **Gradients**: ``query.grad`` and ``key.grad`` of rank ``r`` are exactly the ``q_r`` and ``k_r`` slices of
  the single-process gradient of the global loss (contributions from every other rank's rows included and
  summed once).  A replicated ``logit_scale`` (and ``logit_bias``) tensor receives THIS RANK'S SHARE of its
  gradient (the terms of this rank's query rows), so the SUM over ranks is the full gradient and nothing is
  counted twice.  Precisely, rank ``r``'s ``grad_output`` weighs the loss terms of rank ``r``'s queries; with
  the same ``grad_output`` on every rank (the normal case: the loss is one global number) every gradient above
  is ``grad_output ×`` the single-process gradient.  (The sigmoid loss with ``"mean"``/``"sum"`` forms its
  gradients in forward and scales them by this rank's ``grad_output``: same value on every rank assumed.)
* **DDP / FSDP**: they AVERAGE parameter gradients over ranks, while the per-rank gradients above already SUM
  to the full gradient.  Multiply the loss by the world size before ``backward()`` (``loss * world_size``)
  to train with the gradient of the global loss; without it the effective learning rate is divided by the
  world size.  (open_clip's ``gather_with_grad`` + ``local_loss=False`` gives ``world_size ×`` the gradient
  instead, which DDP's average brings back to 1×.)
* Every rank must call the loss, and every rank must run its backward (backward communicates too).

Exchanges
---------
* ``exchange="ring"`` (default; the Inf-CL idea): key blocks travel around the ring with
  ``batch_isend_irecv``; the next block is in flight while the current block's tiles are computed.
  Forward: row statistics of the local queries merge over the blocks; the column statistics of a block travel
  with it and arrive back, complete, at its owner.  Backward: the same ring carries each block's ``dk``
  accumulator, which every rank adds its queries' contribution to, back to its owner.  Extra memory per rank
  is independent of the world size: two fixed receive buffers for key blocks (one with two ranks), two for
  the travelling ``dk`` accumulators and the engine's ``dk`` part of the current block, i.e. about
  ``5·max_r m_r·D`` numbers besides the engine's own tiles and ``O(n_r·D)``, plus ``O(M)`` scalars (the
  per-key column statistics and column-softmax weights, needed where a positive lives on another rank).
* ``exchange="all_gather"``: all keys are gathered in forward (``O(M·D)`` per rank, saved for backward);
  column statistics merge with two all_reduces (max, then sum); backward sums the ``dk`` pieces of every rank
  with ``reduce_scatter`` on a padded ``[world·max m_r, D]`` buffer (all_reduce of it where the backend has
  no reduce_scatter).  Fewer, larger messages: faster on
  small worlds with a fast interconnect, but the memory grows with the world size.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.autograd.function import once_differentiable

from . import _backend, _checks
from ._tiling import accumulation_dtype

EXCHANGES = ("ring", "all_gather")
_DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16)
_TAG_K, _TAG_COL, _TAG_DK = 11, 12, 13  # one tag per kind of ring message
# Devices each single backend can serve ("cpu:gloo,cuda:nccl"-style strings are parsed instead).
_BACKEND_DEVICES = {"gloo": {"cpu"}, "nccl": {"cuda"}, "mpi": {"cpu"}}
_REDUCE_SCATTER_OK = True  # False once the backend has refused reduce_scatter (then: all_reduce + slice)


# ----------------------------------------------------------------------------------------------------------
# Process group helpers
# ----------------------------------------------------------------------------------------------------------


def world_size(group) -> int:
    """Ranks in ``group`` (1 for ``None`` or when torch.distributed is not initialised)."""
    if group is None or not dist.is_available() or not dist.is_initialized():
        return 1
    return dist.get_world_size(group)


def _backend_devices(group):
    """Device types the group's backend serves, or None for a backend we do not know (trusted)."""
    name = str(dist.get_backend(group)).lower()
    if ":" in name:  # a multi-device backend string such as "cpu:gloo,cuda:nccl"
        return {part.split(":")[0].strip() for part in name.split(",")}
    return _BACKEND_DEVICES.get(name)


class _Comm:
    """The group, this rank, its ring neighbours (as global ranks, for P2P ops) and the backend's devices."""

    def __init__(self, group):
        self.group = group
        self.size = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        self.next = dist.get_global_rank(group, (self.rank + 1) % self.size)
        self.prev = dist.get_global_rank(group, (self.rank - 1) % self.size)
        self.backend = str(dist.get_backend(group))
        self.devices = _backend_devices(group)

    def serves(self, device: torch.device) -> bool:
        return self.devices is None or device.type in self.devices

    def meta_device(self, device: torch.device) -> torch.device:
        """Where the small metadata tensor goes: the inputs' device if the backend serves it, else one it does."""
        if self.serves(device):
            return device
        if "cpu" in self.devices:
            return torch.device("cpu")
        return torch.device("cuda", torch.cuda.current_device())

    def ring(self, send: torch.Tensor, recv: torch.Tensor, tag: int):
        """Send ``send`` to the next rank and receive ``recv`` from the previous one; returns the works."""
        ops = [
            dist.P2POp(dist.isend, send, self.next, self.group, tag),
            dist.P2POp(dist.irecv, recv, self.prev, self.group, tag),
        ]
        return dist.batch_isend_irecv(ops)

    def all_gather_rows(self, x: torch.Tensor) -> torch.Tensor:
        """``[size, *x.shape]``: every rank's ``x`` (same shape everywhere)."""
        out = x.new_empty((self.size,) + tuple(x.shape))
        fn = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor  # renamed in torch 2.13
        fn(out.view((-1,) + tuple(x.shape[1:])) if x.dim() else out, x.contiguous(), group=self.group)
        return out

    def reduce_scatter_rows(self, x: torch.Tensor) -> torch.Tensor:
        """Sum ``x [size·c, ...]`` over ranks and return this rank's ``[c, ...]`` slice.

        ``reduce_scatter`` where the backend has it (gloo does in torch 2.13, NCCL always); a backend that
        refuses it (older gloo) raises on every rank before any message is sent, and then an ``all_reduce``
        of the whole buffer, of which each rank keeps its slice, does the same job with more traffic.
        """
        global _REDUCE_SCATTER_OK
        c = x.shape[0] // self.size
        x = x.contiguous()
        if _REDUCE_SCATTER_OK:
            out = x.new_empty((c,) + tuple(x.shape[1:]))
            fn = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor  # renamed in 2.13
            try:
                fn(out, x, group=self.group)
                return out
            except (RuntimeError, NotImplementedError) as exc:
                if "support" not in str(exc).lower() and "implement" not in str(exc).lower():
                    raise
                _REDUCE_SCATTER_OK = False
        return self.all_reduce(x.clone())[self.rank * c : (self.rank + 1) * c]

    def all_reduce(self, x: torch.Tensor, op=dist.ReduceOp.SUM) -> torch.Tensor:
        dist.all_reduce(x, op=op, group=self.group)
        return x

    def global_sum(self, x: torch.Tensor) -> torch.Tensor:
        """Σ over ranks of a 0-dim ``x``, summed in rank order so that every rank gets the same bits."""
        return self.all_gather_rows(x.reshape(1))[:, 0].sum()


def _wait(works) -> None:
    for work in works or ():
        work.wait()


class _Layout:
    """Per-rank sizes and offsets of the concatenated batch (from the metadata all_gather)."""

    def __init__(self, n: list, m: list, rank: int):
        self.n, self.m, self.rank = n, m, rank
        self.q_off = [sum(n[:r]) for r in range(len(n))]
        self.k_off = [sum(m[:r]) for r in range(len(m))]
        self.N, self.M, self.m_max = sum(n), sum(m), max(m)

    def block(self, b: int):
        return self.k_off[b], self.m[b]

    def gather_keys(self, comm: _Comm, x: torch.Tensor) -> torch.Tensor:
        """Concatenate every rank's ``x [m_r, ...]`` into ``[M, ...]`` (padded all_gather when uneven)."""
        if min(self.m) == self.m_max:
            return comm.all_gather_rows(x).flatten(0, 1)
        pad = x.new_zeros((self.m_max,) + tuple(x.shape[1:]))
        pad[: x.shape[0]] = x
        full = comm.all_gather_rows(pad)
        return torch.cat([full[r, : self.m[r]] for r in range(comm.size)])

    def scatter_keys(self, comm: _Comm, x: torch.Tensor) -> torch.Tensor:
        """Sum ``x [M, ...]`` over ranks and return this rank's ``[m_r, ...]`` rows."""
        if min(self.m) == self.m_max:
            return comm.reduce_scatter_rows(x)
        pad = x.new_zeros((comm.size * self.m_max,) + tuple(x.shape[1:]))
        for r in range(comm.size):
            pad[r * self.m_max : r * self.m_max + self.m[r]] = x[self.k_off[r] : self.k_off[r] + self.m[r]]
        return comm.reduce_scatter_rows(pad)[: self.m[self.rank]]


def _check_local(query, key, labels, reduction, exchange, group):
    """The checks that need no other rank (each rank raises on its own)."""
    _checks.check_float_tensor("query", query, ndim=2)
    _checks.check_float_tensor("key", key, ndim=2)
    _checks.check_same_dtype_device(query=query, key=key)
    if query.shape[1] != key.shape[1]:
        raise ValueError(
            f"query and key must have the same feature dimension D, got query {tuple(query.shape)} "
            f"and key {tuple(key.shape)}"
        )
    if labels is not None:
        if not isinstance(labels, torch.Tensor):
            raise TypeError(f"labels must be a torch.Tensor of global key indices, got {type(labels).__name__}")
        if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
            raise TypeError(f"labels must have an integer dtype (e.g. torch.long), got {labels.dtype}")
        if labels.dim() != 1 or labels.shape[0] != query.shape[0]:
            raise ValueError(
                f"labels must have shape ({query.shape[0]},) (one global positive key per local query), "
                f"got {tuple(labels.shape)}"
            )
        if labels.device != query.device:
            raise ValueError(f"labels must be on the same device as query ({query.device}), got {labels.device}")
    _checks.check_reduction(reduction)
    _checks.check_choice("exchange", exchange, EXCHANGES)
    if not isinstance(group, dist.ProcessGroup):
        raise TypeError(f"group must be a torch.distributed ProcessGroup or None, got {type(group).__name__}")


def _exchange_meta(comm: _Comm, query, key, labels, scales, need_grad: bool):
    """One all_gather of ``[n, m, D, dtype, device ok, label min, label max, has labels, need grad, scales…]``.

    Every rank sees the same table and so raises the same error: a check that failed on one rank only would
    leave the others waiting in the next collective.  Returns the ``_Layout`` and whether any rank needs
    gradients.
    """
    ok = comm.serves(query.device)
    n, m, d = query.shape[0], key.shape[0], query.shape[1]
    lo = hi = 0
    if ok and labels is not None:
        lo, hi = int(labels.min()), int(labels.max())
    vals = [float(s.detach()) if ok else 0.0 for s in scales]
    row = [n, m, d, _DTYPES.index(query.dtype) if query.dtype in _DTYPES else -1, int(ok), lo, hi,
           int(labels is not None), int(need_grad)] + vals
    meta = torch.tensor(row, dtype=torch.float64, device=comm.meta_device(query.device))
    table = comm.all_gather_rows(meta).cpu().tolist()
    ranks = range(comm.size)
    bad = [r for r in ranks if not table[r][4]]
    if bad:
        raise ValueError(
            f"query and key must be on a device that the process group's backend {comm.backend!r} serves "
            f"({', '.join(sorted(comm.devices))}); rank(s) {bad} passed tensors on another device "
            f"(this rank {comm.rank}: {query.device})"
        )
    dims = [int(t[2]) for t in table]
    if len(set(dims)) > 1:
        raise ValueError(f"query and key must have the same feature dimension D on every rank, got D = {dims} "
                         f"on ranks 0..{comm.size - 1}")
    codes = [int(t[3]) for t in table]
    if len(set(codes)) > 1:
        names = [str(_DTYPES[c]) if c >= 0 else "other" for c in codes]
        raise TypeError(f"query and key must have the same dtype on every rank, got {names} on ranks "
                        f"0..{comm.size - 1}")
    for j, name in enumerate(("logit_scale", "logit_bias")[: len(scales)]):
        got = [t[9 + j] for t in table]
        if any(v != got[0] for v in got):
            raise ValueError(f"{name} must be the same on every rank (a replicated parameter), got {got}")
    lay = _Layout([int(t[0]) for t in table], [int(t[1]) for t in table], comm.rank)
    for r in ranks:
        if table[r][7]:
            if table[r][5] < 0 or table[r][6] >= lay.M:
                raise ValueError(
                    f"labels must lie in [0, {lay.M}) (global indices into the keys of all {comm.size} ranks), "
                    f"rank {r} has values in [{int(table[r][5])}, {int(table[r][6])}]"
                )
        elif lay.n[r] > lay.m[r]:
            raise ValueError(
                f"rank {r}: query has more rows than key ({lay.n[r]} > {lay.m[r]}): the default positive of "
                f"local query i is local key i; pass labels (global key indices) to say which key is each "
                "query's positive"
            )
    return lay, any(t[8] for t in table)


def _block_labels(labels: torch.Tensor, offset: int, size: int):
    """Labels relative to the key block ``[offset, offset + size)``: (clamped index, in-block mask)."""
    rel = labels - offset
    inside = (rel >= 0) & (rel < size)
    return rel.clamp(0, size - 1), inside


def _merge_stats(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Merge two split log-sum-exp statistics ``[max, log Σ exp(z - max)]`` of disjoint sets."""
    mx = torch.maximum(a[0], b[0])
    return torch.stack([mx, torch.logaddexp((a[0] - mx) + a[1], (b[0] - mx) + b[1])])


class _KeyRing:
    """Iterate over every rank's key block, passed around the ring: ``(offset, size, block)`` per step.

    Step ``t`` holds the block of rank ``(rank - t) mod world`` while the next one is already in flight into
    one of two fixed ``[max m_r, D]`` receive buffers (one suffices for two ranks), so the memory does not
    depend on the world size.
    """

    def __init__(self, comm: _Comm, lay: _Layout, k: torch.Tensor):
        self.comm, self.lay, self.k = comm, lay, k.contiguous()

    def __iter__(self):
        comm, lay, k = self.comm, self.lay, self.k
        bufs = [k.new_empty(lay.m_max, k.shape[1]) for _ in range(min(2, comm.size - 1))]
        cur, nxt = k, None
        for t in range(comm.size):
            b = (comm.rank - t) % comm.size
            works = None
            if t < comm.size - 1:  # the next block travels while the caller computes on this one
                nxt = bufs[t % len(bufs)][: lay.m[(b - 1) % comm.size]]
                works = comm.ring(cur, nxt, _TAG_K)
            yield lay.k_off[b], lay.m[b], cur
            _wait(works)
            cur = nxt


class _AccRing:
    """Per-block gradient accumulators around the ring, in two fixed ``[max m_r, D]`` buffers.

    At step ``t`` the accumulator of the current block arrives from the previous rank (in flight during the
    step's tile work), gets this rank's part added, and goes on to the next rank; after ``world`` steps the
    accumulator of each block is back at its owner, summed over every rank.
    """

    def __init__(self, comm: _Comm, lay: _Layout, d: int, dtype: torch.dtype, device: torch.device):
        self.comm, self.lay = comm, lay
        self.bufs = [torch.empty(lay.m_max, d, dtype=dtype, device=device) for _ in range(2)]
        self.t, self.works, self.incoming = 0, None, None

    def add_and_pass(self, part: torch.Tensor) -> None:
        """Add this rank's ``part [m_b, D]`` to the accumulator of the current step's block and send it on."""
        comm, lay, t = self.comm, self.lay, self.t
        if t == 0:
            acc = self.bufs[0][: part.shape[0]].copy_(part)
        else:
            _wait(self.works)
            acc = self.incoming.add_(part)
        b = (comm.rank - t) % comm.size
        self.incoming = self.bufs[(t + 1) % 2][: lay.m[(b - 1) % comm.size]]
        self.works = comm.ring(acc, self.incoming, _TAG_DK)  # the last hop returns it to its owner
        self.t += 1

    def finish(self) -> torch.Tensor:
        """The complete accumulator of this rank's own block, ``[m_r, D]``."""
        _wait(self.works)
        return self.incoming


# ----------------------------------------------------------------------------------------------------------
# InfoNCE
# ----------------------------------------------------------------------------------------------------------


def _ring_lse(comm: _Comm, lay: _Layout, q, k, s, symmetric, labels, engine):
    """Forward ring: row statistics of the local queries over all keys, the complete column statistics of the
    local keys (``[2, m_r]``, after their trip around the ring) and each local query's positive logit."""
    row = col_works = col_in = sent = z_pos = None
    for t, (off, mb, block) in enumerate(_KeyRing(comm, lay, k)):
        rel, inside = _block_labels(labels, off, mb)
        r_part, c_part, zp, _ = engine.lse(q, block, s, symmetric, rel)
        row = r_part if row is None else _merge_stats(row, r_part)
        z_pos = torch.where(inside, zp, zp.new_zeros(()) if z_pos is None else z_pos)
        if symmetric:
            if t > 0:  # this block's statistics so far, from the ranks it visited before (small: [2, m_b])
                _wait(col_works)
                c_part = _merge_stats(col_in, c_part)
            b = (comm.rank - t) % comm.size
            col_in = c_part.new_empty(2, lay.m[(b - 1) % comm.size])
            sent = c_part.contiguous()  # kept alive until its work is waited on
            col_works = comm.ring(sent, col_in, _TAG_COL)  # the last hop returns it to its owner
    _wait(col_works)
    del sent
    return row, col_in, z_pos


def _gathered_lse(comm: _Comm, lay: _Layout, q, k, s, symmetric, labels, engine):
    """Forward all_gather: every key on every rank; column statistics merged by all_reduce (max, then sum)."""
    keys = lay.gather_keys(comm, k)
    row, col, z_pos, _ = engine.lse(q, keys, s, symmetric, labels)
    if symmetric:
        mx = comm.all_reduce(col[0].clone(), dist.ReduceOp.MAX)
        total = comm.all_reduce(torch.exp((col[0] - mx) + col[1]))
        col = torch.stack([mx, total.log()])
    return row, col, z_pos, keys


class _InfoNCEFunction(torch.autograd.Function):
    """InfoNCE over a process group.  Forward args: ``q [n_r, D]``, ``k [m_r, D]``, ``scale`` (0-dim),
    ``labels [n_r]`` (global, long), ``symmetric``, ``eps``, ``reduction``, ``engine``, ``comm``, ``layout``,
    ``exchange``."""

    @staticmethod
    def forward(ctx, q, k, scale, labels, symmetric, eps, reduction, engine, comm, lay, exchange):
        acc = accumulation_dtype(q.dtype)
        N, M = lay.N, lay.M
        s = scale.detach().to(acc)
        qf, kf = q.to(acc), k.to(acc)
        sums = None
        if eps:  # label smoothing needs the global Σ q and Σ k: one all_reduce of [2, D]
            sums = comm.all_reduce(torch.stack([qf.sum(0), kf.sum(0)]))
        if exchange == "ring":
            row, col, z_pos = _ring_lse(comm, lay, q, k, s, symmetric, labels, engine)
            keys = None
            if symmetric:
                # Per-key scalars of every key (column statistics and the smoothing term): O(M), for the
                # queries whose positive lives on another rank, and for backward.
                info = [col[0], col[1]] + ([s * (kf @ sums[0]) / N] if eps else [])
                info = lay.gather_keys(comm, torch.stack(info).T.contiguous()).T.contiguous()  # [2 or 3, M]
                col, e_key = info[:2], (info[2] if eps else None)
        else:
            row, col, z_pos, keys = _gathered_lse(comm, lay, q, k, s, symmetric, labels, engine)
            if symmetric and eps:
                e_key = s * (keys.to(acc) @ sums[0]) / N
        rows = (row[0] - z_pos) + row[1]  # LSE - z_pos, as the single-process path
        if eps:
            rows = rows + eps * (z_pos - s * (qf @ sums[1]) / M)
        if symmetric:
            cols = (col[0, labels] - z_pos) + col[1, labels]
            if eps:
                cols = cols + eps * (z_pos - e_key[labels])
            terms = (rows + cols) / 2
        else:
            terms = rows
        ctx.save_for_backward(q, k, scale, labels, row, col, sums, keys)
        ctx.options = (symmetric, eps, reduction, engine, comm, lay, exchange)
        if reduction == "none":
            return terms
        total = comm.global_sum(terms.sum())
        return total / N if reduction == "mean" else total

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        q, k, scale, labels, row, col, sums, keys = ctx.saved_tensors
        symmetric, eps, reduction, engine, comm, lay, exchange = ctx.options
        acc = row.dtype
        n, N, M = q.shape[0], lay.N, lay.M
        s = scale.detach().to(acc)
        g = grad_out.to(acc)
        g = (g / N if reduction == "mean" else g).expand(n)  # d loss / d term_i of this rank's queries
        a = g / 2 if symmetric else g  # weight of row i's softmax
        w = None
        if symmetric:  # weight of column j's softmax: Σ of a_i over the queries (of every rank) whose positive is j
            w = comm.all_reduce(torch.zeros(M, dtype=acc, device=q.device).index_add_(0, labels, a))
        pos = (1 - eps) * (a + a if symmetric else a)  # weight of the target entry (i, labels[i])
        qf = q.to(acc)
        if exchange == "ring":
            dq, dk = _ring_grad(comm, lay, q, k, s, row, col, a, w, labels, pos, engine)
        else:
            dq, dk_all = engine.grad(q, keys, s, row, col, a, w)
            dq -= pos[:, None] * keys[labels].to(acc)
            dk_all.index_add_(0, labels, -pos[:, None] * qf)
        own = slice(lay.k_off[comm.rank], lay.k_off[comm.rank] + k.shape[0])
        if eps:
            # The uniform ε/M and ε/N parts of smoothing; Σ_i a_i q_i and Σ_j w_j k_j are global sums.
            qsum, ksum = sums[0], sums[1]
            if exchange == "ring":
                local = torch.stack([a @ qf, w[own] @ k.to(acc) if symmetric else torch.zeros_like(qsum)])
                aq, wk = comm.all_reduce(local)
                dq -= (eps / M) * a[:, None] * ksum
                dk -= (eps / M) * aq
                if symmetric:
                    dq -= (eps / N) * wk
                    dk -= (eps / N) * w[own, None] * qsum
            else:  # dk_all is summed over ranks below: add only this rank's share of the key terms
                dq -= (eps / M) * a[:, None] * ksum
                dk_all -= (eps / M) * (a @ qf)
                if symmetric:
                    dq -= (eps / N) * (w @ keys.to(acc))
                    dk_all -= (eps / N) * w[:, None] * qf.sum(0)
        if exchange != "ring":
            dk = lay.scatter_keys(comm, dk_all)
        needs = ctx.needs_input_grad
        grad_scale = (qf * dq).sum().to(scale.dtype) if needs[2] else None  # this rank's share of Σ G∘(q kᵀ)
        grad_q = (s * dq).to(q.dtype) if needs[0] else None
        grad_k = (s * dk).to(k.dtype) if needs[1] else None
        return grad_q, grad_k, grad_scale, None, None, None, None, None, None, None, None


def _ring_grad(comm: _Comm, lay: _Layout, q, k, s, row, col, a, w, labels, pos, engine):
    """Backward ring: ``dq`` of the local queries, and the complete unscaled ``dk`` of the local keys, whose
    accumulator travels around the ring (every rank adds its queries' part) and arrives back at its owner."""
    acc = row.dtype
    qf = q.to(acc)
    dq = None
    dk_ring = _AccRing(comm, lay, k.shape[1], acc, q.device)
    for off, mb, block in _KeyRing(comm, lay, k):
        blk = slice(off, off + mb)
        dq_b, dk_b = engine.grad(q, block, s, row, None if col is None else col[:, blk], a,
                                 None if w is None else w[blk])
        rel, inside = _block_labels(labels, off, mb)
        p = torch.where(inside, pos, pos.new_zeros(()))  # target terms of the queries whose positive is here
        dq_b -= p[:, None] * block[rel].to(acc)
        dk_b.index_add_(0, rel, -p[:, None] * qf)
        dq = dq_b if dq is None else dq.add_(dq_b)
        dk_ring.add_and_pass(dk_b)
        del dk_b
    return dq, dk_ring.finish()


@torch.compiler.disable  # collectives and Python ring loops: a graph break, run eagerly
def info_nce(
    query: torch.Tensor,
    key: torch.Tensor,
    *,
    logit_scale=None,
    temperature=None,
    labels: torch.Tensor | None = None,
    symmetric: bool = True,
    label_smoothing: float = 0.0,
    reduction: str = "mean",
    backend: str = "auto",
    group=None,
    exchange: str = "ring",
) -> torch.Tensor:
    """InfoNCE / CLIP loss over a batch spread across ``group`` (see the module docstring for the semantics).

    Args:
        query: ``[n_r, D]`` this rank's queries; key: ``[m_r, D]`` this rank's keys (same dtype and device,
            the same D and dtype on every rank; sizes may differ across ranks).
        logit_scale, temperature, symmetric, label_smoothing, backend: as ``xloss.info_nce`` (the scale must
            be the same on every rank; a tensor scale gets this rank's share of its gradient).
        labels: ``[n_r]`` GLOBAL key index of each local query's positive, in ``[0, M)``; default
            ``offset_r + arange(n_r)``.
        reduction: ``"mean"`` (over the N queries of all ranks), ``"sum"`` (both: the global loss, the same
            on every rank) or ``"none"`` (this rank's ``[n_r]`` terms).
        group: a ``torch.distributed`` ProcessGroup (or ``torch.distributed.group.WORLD``); a group of one
            rank, or None, runs the single-process loss.
        exchange: ``"ring"`` (default, memory flat in the world size) or ``"all_gather"``.

    Returns:
        The global loss (0-dim) or this rank's per-query terms ``[n_r]``.
    """
    from .info_nce import _engine
    from .info_nce import info_nce as _single

    if group is None or world_size(group) == 1:
        _checks.check_choice("exchange", exchange, EXCHANGES)
        return _single(query, key, logit_scale=logit_scale, temperature=temperature, labels=labels,
                       symmetric=symmetric, label_smoothing=label_smoothing, reduction=reduction,
                       backend=backend)
    _check_local(query, key, labels, reduction, exchange, group)
    if not isinstance(symmetric, bool):
        raise TypeError(f"symmetric must be a bool, got {type(symmetric).__name__}")
    _checks.check_label_smoothing(label_smoothing)
    comm = _Comm(group)
    scale = _checks.resolve_scale(logit_scale, temperature, query.device)
    name = _backend.resolve(backend, query.device, "info_nce")
    if name == "reference":
        raise ValueError("backend='reference' is single-process only; with a group use 'auto', 'cpu' or 'triton'")
    need_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (query, key, scale))
    lay, _ = _exchange_meta(comm, query, key, labels, [scale], need_grad)
    if labels is None:
        labels = torch.arange(query.shape[0], device=query.device) + lay.k_off[comm.rank]
    return _InfoNCEFunction.apply(query, key, scale, labels.long(), symmetric, float(label_smoothing),
                                  reduction, _engine(name), comm, lay, exchange)


# ----------------------------------------------------------------------------------------------------------
# Sigmoid (SigLIP)
# ----------------------------------------------------------------------------------------------------------


def _sigmoid_engine(name: str):
    if name == "triton":
        from .sigmoid import triton as engine
    else:
        from .sigmoid import cpu as engine
    return engine


def _add(total, part):
    return part if total is None else total + part


def _sigmoid_ring(comm: _Comm, lay: _Layout, q, k, s, bias, labels, need_grad, engine, **options):
    """Ring over key blocks; each block's dk accumulator travels with it and arrives back at its owner in the
    same pass (the sigmoid loss needs no normalisation, so gradients are formed in the same sweep)."""
    loss = dq = ds = db = None
    dk_ring = _AccRing(comm, lay, k.shape[1], accumulation_dtype(q.dtype), q.device) if need_grad else None
    for off, mb, block in _KeyRing(comm, lay, k):
        rel, inside = _block_labels(labels, off, mb)
        rel = torch.where(inside, rel, rel.new_full((), -1))  # -1: this query's positive is in another block
        l_b, dq_b, dk_b, ds_b, db_b = engine.forward_backward(q, block, s, bias, rel, need_grad, **options)
        loss = _add(loss, l_b)
        if need_grad:
            dq, ds, db = _add(dq, dq_b), _add(ds, ds_b), _add(db, db_b)
            dk_ring.add_and_pass(dk_b)
            del dk_b
    return loss, dq, (dk_ring.finish() if need_grad else None), ds, db


def _sigmoid_run(comm: _Comm, lay: _Layout, q, k, s, bias, labels, exchange, need_grad, engine, **options):
    """``(loss, dq, dk, ds, db)`` of this rank's queries against all keys; ``dk`` complete (summed over ranks)
    for this rank's keys."""
    if exchange == "ring":
        return _sigmoid_ring(comm, lay, q, k, s, bias, labels, need_grad, engine, **options)
    keys = lay.gather_keys(comm, k)
    loss, dq, dk_all, ds, db = engine.forward_backward(q, keys, s, bias, labels, need_grad, **options)
    return loss, dq, (lay.scatter_keys(comm, dk_all) if need_grad else None), ds, db


class _SigmoidFunction(torch.autograd.Function):
    """Sigmoid loss over a process group.  ``"mean"``/``"sum"``: the gradients are formed in forward (one
    pass) and backward scales them.  ``"none"``: forward returns the per-query terms; backward runs the
    exchange again with the per-query ``grad_output`` as row weights."""

    @staticmethod
    def forward(ctx, q, k, scale, bias, labels, reduction, engine, comm, lay, exchange, need_grad):
        acc = accumulation_dtype(q.dtype)
        s, b = scale.detach().to(acc), bias.detach().to(acc)
        ctx.options = (reduction, engine, comm, lay, exchange)
        ctx.dtypes = (q.dtype, k.dtype, scale.dtype, bias.dtype)
        if reduction == "none":
            terms = _sigmoid_run(comm, lay, q, k, s, b, labels, exchange, False, engine, per_row=True)[0]
            ctx.save_for_backward(q, k, scale, bias, labels)
            return terms
        loss, dq, dk, ds, db = _sigmoid_run(comm, lay, q, k, s, b, labels, exchange, need_grad, engine)
        total = comm.global_sum(loss)
        ctx.factor = 1.0 / lay.N if reduction == "mean" else 1.0
        if need_grad:
            ctx.save_for_backward(dq, dk, ds, db)
        return total * ctx.factor

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        reduction, engine, comm, lay, exchange = ctx.options
        if reduction == "none":
            q, k, scale, bias, labels = ctx.saved_tensors
            acc = accumulation_dtype(q.dtype)
            s, b = scale.detach().to(acc), bias.detach().to(acc)
            weight = grad_out.to(acc).contiguous()
            _, dq, dk, ds, db = _sigmoid_run(comm, lay, q, k, s, b, labels, exchange, True, engine,
                                             row_weight=weight)
            grads = (dq, dk, ds, db)
        else:
            dq, dk, ds, db = ctx.saved_tensors
            g = grad_out.to(dq.dtype) * ctx.factor
            grads = (g * dq, g * dk, g * ds, g * db)
        needs = ctx.needs_input_grad
        grads = [t.to(dt) if need else None for t, dt, need in zip(grads, ctx.dtypes, needs)]
        return (*grads, None, None, None, None, None, None, None)


@torch.compiler.disable  # collectives and Python ring loops: a graph break, run eagerly
def sigmoid_loss(
    query: torch.Tensor,
    key: torch.Tensor,
    *,
    logit_scale,
    logit_bias,
    labels: torch.Tensor | None = None,
    reduction: str = "mean",
    backend: str = "auto",
    group=None,
    exchange: str = "ring",
) -> torch.Tensor:
    """SigLIP sigmoid loss over a batch spread across ``group`` (module docstring: semantics).

    ``z_ij = s·<q_i, k_j> + b`` over the concatenated batch, ``loss = Σ_ij −log σ(y_ij z_ij)`` (``/N`` for
    ``"mean"``, N the global number of queries), ``y = +1`` at each query's global positive, else −1.

    Args:
        query: ``[n_r, D]``; key: ``[m_r, D]`` this rank's rows.
        logit_scale: ``s`` (float or 0-dim tensor, the same on every rank; a tensor gets this rank's share of
            its gradient); logit_bias: ``b``, likewise.
        labels: ``[n_r]`` global key index of each local query's positive; default ``offset_r + arange(n_r)``.
        reduction: ``"mean"`` or ``"sum"`` (the global loss, the same on every rank; gradients formed in the
            forward pass) or ``"none"`` (this rank's ``[n_r]`` row sums; backward exchanges the keys again).
        backend: ``"auto"``, ``"cpu"`` or ``"triton"``.
        group: a ProcessGroup; None or a one-rank group runs the single-process ``xloss.sigmoid_loss``.
        exchange: ``"ring"`` (default) or ``"all_gather"``.

    Returns:
        0-dim global loss.
    """
    if group is None or world_size(group) == 1:
        _checks.check_choice("exchange", exchange, EXCHANGES)
        from .sigmoid import sigmoid_loss as _single  # the single-process loss (no group: no recursion)

        return _single(query, key, logit_scale=logit_scale, logit_bias=logit_bias, labels=labels,
                       reduction=reduction, backend=backend)
    _check_local(query, key, labels, reduction, exchange, group)
    comm = _Comm(group)
    scale = _checks.resolve_scale(logit_scale, None, query.device)
    bias = _checks._scalar("logit_bias", logit_bias, query.device)
    name = _backend.resolve(backend, query.device, "sigmoid")
    if name == "reference":
        raise ValueError("backend='reference' is single-process only; with a group use 'auto', 'cpu' or 'triton'")
    need_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (query, key, scale, bias))
    lay, need_grad = _exchange_meta(comm, query, key, labels, [scale, bias], need_grad)
    if labels is None:
        labels = torch.arange(query.shape[0], device=query.device) + lay.k_off[comm.rank]
    return _SigmoidFunction.apply(query, key, scale, bias, labels.long(), reduction, _sigmoid_engine(name),
                                  comm, lay, exchange, need_grad)


__all__ = ["EXCHANGES", "info_nce", "sigmoid_loss", "world_size"]
