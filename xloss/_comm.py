"""Communicators: what a loss needs from the other ranks, and a no-op one for a single process.

A loss's autograd Function takes a communicator and writes its formula once: the same code runs on one process
(:data:`LOCAL`, where every collective is the identity and the keys are one block) and across the ranks of a
``torch.distributed`` process group (:class:`GroupComm`, built by :func:`make` once per call).  The families'
sweeps (``xloss/<family>/sweeps.py``) use these pieces to move key blocks, column statistics and gradient
accumulators between ranks; nothing here knows a loss formula, and nothing here imports a family.

Layout of a multi-rank batch: rank ``r`` holds ``n_r`` query rows and ``m_r`` key rows; the loss is that of the
concatenated batch (``N = Σ n_r`` queries, ``M = Σ m_r`` keys), and labels are global key indices.

Gradients across ranks (``grad_reduction``):

* ``"mean"`` (default): every gradient that leaves the loss is multiplied by the world size ``W``, so that the
  AVERAGE over ranks that DDP and FSDP apply to parameter gradients gives exactly the single-process gradient of
  the global loss: no change to the training loop (what open_clip's ``gather_with_grad=True`` and Inf-CL give).
* ``"sum"``: each rank gets its exact share (the query/key rows' gradients are the slices of the global
  gradient; a replicated scale gets the part from this rank's queries), so the SUM over ranks is the gradient:
  for users who all-reduce gradients with a sum themselves.
"""

from __future__ import annotations

import copy

import torch
import torch.distributed as dist

from . import _checks
from ._reduce import reduce_terms

EXCHANGES = ("ring", "all_gather")
GRAD_REDUCTIONS = ("mean", "sum")
_DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16)
TAG_K, TAG_COL, TAG_DK, TAG_TEACHER = 11, 12, 13, 14  # one tag per kind of ring message
# Devices each single backend can serve ("cpu:gloo,cuda:nccl"-style strings are parsed instead).
_BACKEND_DEVICES = {"gloo": {"cpu"}, "nccl": {"cuda"}, "mpi": {"cpu"}}
_REDUCE_SCATTER_OK = True  # False once the backend has refused reduce_scatter (then: all_reduce + slice)


def world_size(group) -> int:
    """Ranks in ``group`` (1 for ``None`` or when torch.distributed is not initialised)."""
    if group is None or not dist.is_available() or not dist.is_initialized():
        return 1
    return dist.get_world_size(group)


class LocalComm:
    """One process: the whole batch is here, the keys are one block, every collective is the identity."""

    size = 1
    rank = 0
    grad_factor = 1
    exchange = "local"
    is_local = True

    def total_rows(self, n):
        return n

    def total_keys(self, m):
        return m

    def key_offset(self):
        return 0

    def query_offset(self):
        return 0

    def all_reduce(self, x, op=None):
        return x

    def global_sum(self, x):
        return x

    def gather_keys(self, x):
        return x

    def scatter_keys(self, x):
        return x

    def default_labels(self, n, device):
        """Query i's positive: key i."""
        return torch.arange(n, device=device)

    def reduce(self, terms, reduction: str, total_rows):
        """The loss from this rank's per-row terms: mean, sum, or the terms ("none")."""
        return reduce_terms(terms, reduction)


LOCAL = LocalComm()


def _backend_devices(group):
    """Device types the group's backend serves, or None for a backend we do not know (trusted)."""
    name = str(dist.get_backend(group)).lower()
    if ":" in name:  # a multi-device backend string such as "cpu:gloo,cuda:nccl"
        return {part.split(":")[0].strip() for part in name.split(",")}
    return _BACKEND_DEVICES.get(name)



def wait(works) -> None:
    for work in works or ():
        work.wait()



class Layout:
    """Per-rank sizes and offsets of the concatenated batch (from the metadata all_gather)."""

    def __init__(self, n: list, m: list, rank: int):
        self.n, self.m, self.rank = n, m, rank
        self.q_off = [sum(n[:r]) for r in range(len(n))]
        self.k_off = [sum(m[:r]) for r in range(len(m))]
        self.N, self.M, self.m_max = sum(n), sum(m), max(m)

    def block(self, b: int):
        return self.k_off[b], self.m[b]

    def gather_keys(self, comm, x: torch.Tensor) -> torch.Tensor:
        """Concatenate every rank's ``x [m_r, ...]`` into ``[M, ...]`` (padded all_gather when uneven)."""
        if min(self.m) == self.m_max:
            return comm.all_gather_rows(x).flatten(0, 1)
        pad = x.new_zeros((self.m_max,) + tuple(x.shape[1:]))
        pad[: x.shape[0]] = x
        full = comm.all_gather_rows(pad)
        return torch.cat([full[r, : self.m[r]] for r in range(comm.size)])

    def scatter_keys(self, comm, x: torch.Tensor) -> torch.Tensor:
        """Sum ``x [M, ...]`` over ranks and return this rank's ``[m_r, ...]`` rows."""
        if min(self.m) == self.m_max:
            return comm.reduce_scatter_rows(x)
        pad = x.new_zeros((comm.size * self.m_max,) + tuple(x.shape[1:]))
        for r in range(comm.size):
            pad[r * self.m_max : r * self.m_max + self.m[r]] = x[self.k_off[r] : self.k_off[r] + self.m[r]]
        return comm.reduce_scatter_rows(pad)[: self.m[self.rank]]

class GroupComm:
    """The ranks of a process group: this rank, its ring neighbours (as global ranks, for P2P ops), the backend's
    devices, and (once :func:`make` has exchanged the metadata) the batch ``layout``, the ``exchange`` and the
    ``grad_factor`` (W for ``grad_reduction="mean"``, 1 for ``"sum"``)."""

    is_local = False

    def __init__(self, group, exchange: str = "ring", grad_reduction: str = "mean"):
        self.group = group
        self.exchange = exchange
        self.layout: Layout | None = None
        self.size = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        self.next = dist.get_global_rank(group, (self.rank + 1) % self.size)
        self.prev = dist.get_global_rank(group, (self.rank - 1) % self.size)
        self.backend = str(dist.get_backend(group))
        self.devices = _backend_devices(group)
        self.grad_factor = self.size if grad_reduction == "mean" else 1

    def swapped(self) -> GroupComm:
        """This communicator with the query and key sizes of its layout exchanged: for a ring that passes the
        queries round instead of the keys (late interaction's document→query direction)."""
        out = copy.copy(self)
        out.layout = Layout(self.layout.m, self.layout.n, self.rank)
        return out

    # The interface LocalComm shares (sizes of the global batch; collectives over the key rows).
    def total_rows(self, n):
        return self.layout.N

    def total_keys(self, m):
        return self.layout.M

    def key_offset(self):
        return self.layout.k_off[self.rank]

    def query_offset(self):
        return self.layout.q_off[self.rank]

    def gather_keys(self, x: torch.Tensor) -> torch.Tensor:
        """Every rank's ``x [m_r, ...]`` concatenated in rank order, ``[M, ...]``."""
        return self.layout.gather_keys(self, x)

    def scatter_keys(self, x: torch.Tensor) -> torch.Tensor:
        """Sum ``x [M, ...]`` over ranks; this rank's ``[m_r, ...]`` rows."""
        return self.layout.scatter_keys(self, x)

    def default_labels(self, n, device):
        """Local query i's positive: the global key ``offset_r + i`` (local key i)."""
        return torch.arange(n, device=device) + self.key_offset()

    def reduce(self, terms, reduction: str, total_rows):
        """The global loss (the same bits on every rank) from this rank's per-row terms; "none": the terms."""
        if reduction == "none":
            return terms
        total = self.global_sum(terms.sum())
        return total / total_rows if reduction == "mean" else total

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
        """Σ over ranks of ``x`` (any shape), summed in rank order so that every rank gets the same bits."""
        return self.all_gather_rows(x.reshape(-1)).sum(0).reshape(x.shape)


def _exchange_meta(comm: GroupComm, query, key, labels, scales, need_grad: bool, groups: bool = False):
    """One all_gather of ``[n, m, D, dtype, device ok, label min, label max, has labels, need grad, scales…]``.

    Every rank sees the same table and so raises the same error: a check that failed on one rank only would
    leave the others waiting in the next collective.  Returns the ``Layout`` and whether any rank needs
    gradients.
    """
    ok = comm.serves(query.device)
    n, m, d = query.shape[0], key.shape[0], query.shape[1]
    lo = hi = 0
    if ok and labels is not None:
        lo, hi = int(labels.min()), int(labels.max())
    vals = [float(s.detach()) if ok else 0.0 for s in scales]
    row = [n, m, d, _DTYPES.index(query.dtype) if query.dtype in _DTYPES else -1, int(ok), lo, hi,
           int(labels is not None), int(need_grad)] + vals + [int(groups)]
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
    with_groups = [r for r in ranks if table[r][-1]]
    if with_groups and len(with_groups) != comm.size:
        raise ValueError(f"query_groups/key_groups must be given on every rank or on none, got them on rank(s) "
                         f"{with_groups} only")
    lay = Layout([int(t[0]) for t in table], [int(t[1]) for t in table], comm.rank)
    for r in ranks:
        if with_groups:  # group ids say which keys are positives: no default pairing to check
            continue
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


def block_labels(labels: torch.Tensor, offset: int, size: int):
    """Labels relative to the key block ``[offset, offset + size)``: (clamped index, in-block mask)."""
    rel = labels - offset
    inside = (rel >= 0) & (rel < size)
    return rel.clamp(0, size - 1), inside


def _log_part(stats: torch.Tensor, mx: torch.Tensor) -> torch.Tensor:
    """``log Σ exp(z - mx)`` of one set from its split statistics; -inf for an empty set (max -inf)."""
    empty = stats[0] == float("-inf")
    safe_mx = torch.where(mx == float("-inf"), torch.zeros_like(mx), mx)
    return torch.where(empty, stats[0], (stats[0] - safe_mx) + stats[1])


def merge_stats(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Merge two split log-sum-exp statistics ``[max, log Σ exp(z - max)]`` of disjoint sets.

    An empty set has statistics ``(-inf, -inf)`` (structured targets can empty a row's part in a key block) and
    merges as nothing; two empty sets give an empty set."""
    mx = torch.maximum(a[0], b[0])
    return torch.stack([mx, torch.logaddexp(_log_part(a, mx), _log_part(b, mx))])


def all_merge_stats(comm, stats: torch.Tensor) -> torch.Tensor:
    """Merge the split statistics ``[2, M]`` that each rank holds for its part of every set, across ranks."""
    mx = comm.all_reduce(stats[0].clone(), dist.ReduceOp.MAX)
    total = comm.all_reduce(torch.exp(_log_part(stats, mx)))
    return torch.stack([mx, total.log()])


class KeyRing:
    """Iterate over every rank's key block, passed around the ring: ``(offset, size, block)`` per step.

    Step ``t`` holds the block of rank ``(rank - t) mod world`` while the next one is already in flight into
    one of two fixed ``[max m_r, D]`` receive buffers (one suffices for two ranks), so the memory does not
    depend on the world size.
    """

    def __init__(self, comm: GroupComm, k: torch.Tensor, tag: int = TAG_K):
        self.comm, self.lay, self.k, self.tag = comm, comm.layout, k.contiguous(), tag

    def __iter__(self):
        comm, lay, k = self.comm, self.lay, self.k
        bufs = [k.new_empty(lay.m_max, k.shape[1]) for _ in range(min(2, comm.size - 1))]
        cur, nxt = k, None
        for t in range(comm.size):
            b = (comm.rank - t) % comm.size
            works = None
            if t < comm.size - 1:  # the next block travels while the caller computes on this one
                nxt = bufs[t % len(bufs)][: lay.m[(b - 1) % comm.size]]
                works = comm.ring(cur, nxt, self.tag)
            yield lay.k_off[b], lay.m[b], cur
            wait(works)
            cur = nxt


class AccRing:
    """Per-block gradient accumulators around the ring, in two fixed ``[max m_r, D]`` buffers.

    At step ``t`` the accumulator of the current block arrives from the previous rank (in flight during the
    step's tile work), gets this rank's part added, and goes on to the next rank; after ``world`` steps the
    accumulator of each block is back at its owner, summed over every rank.
    """

    def __init__(self, comm: GroupComm, d: int, dtype: torch.dtype, device: torch.device):
        self.comm, self.lay = comm, comm.layout
        self.bufs = [torch.empty(comm.layout.m_max, d, dtype=dtype, device=device) for _ in range(2)]
        self.t, self.works, self.incoming = 0, None, None

    def add_and_pass(self, part: torch.Tensor) -> None:
        """Add this rank's ``part [m_b, D]`` to the accumulator of the current step's block and send it on."""
        comm, lay, t = self.comm, self.lay, self.t
        if t == 0:
            acc = self.bufs[0][: part.shape[0]].copy_(part)
        else:
            wait(self.works)
            acc = self.incoming.add_(part)
        b = (comm.rank - t) % comm.size
        self.incoming = self.bufs[(t + 1) % 2][: lay.m[(b - 1) % comm.size]]
        self.works = comm.ring(acc, self.incoming, TAG_DK)  # the last hop returns it to its owner
        self.t += 1

    def finish(self) -> torch.Tensor:
        """The complete accumulator of this rank's own block, ``[m_r, D]``."""
        wait(self.works)
        return self.incoming




def check_global_labels(labels, n: int, device: torch.device) -> None:
    """The checks of multi-rank labels that need no other rank (the range is checked in the metadata
    exchange, where every rank sees every rank's minimum and maximum)."""
    if labels is None:
        return
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"labels must be a torch.Tensor of global key indices, got {type(labels).__name__}")
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        raise TypeError(f"labels must have an integer dtype (e.g. torch.long), got {labels.dtype}")
    if labels.dim() != 1 or labels.shape[0] != n:
        raise ValueError(f"labels must have shape ({n},) (one global positive key per local query), "
                         f"got {tuple(labels.shape)}")
    if labels.device != device:
        raise ValueError(f"labels must be on the same device as query ({device}), got {labels.device}")


def make(group, exchange: str, grad_reduction: str, query, key, labels, scales, need_grad: bool,
         engine: str = "", groups: bool = False):
    """The communicator of one call, and whether any rank needs gradients.

    :data:`LOCAL` for ``group=None``, torch.distributed not initialised or a one-rank group.  Otherwise a
    :class:`GroupComm` whose layout comes from one small all_gather that also checks, on every rank at once, what
    must agree across ranks (D, dtype, device, the scales, the label range), so that a bad input raises the same
    error everywhere instead of leaving the other ranks waiting.  ``groups``: the call passes group ids (every rank
    must then pass them, and no default pairing of local query i with local key i is assumed).
    """
    if group is None and type(exchange) is str and exchange in EXCHANGES and type(grad_reduction) is str \
            and grad_reduction in GRAD_REDUCTIONS:
        return LOCAL, need_grad  # one process (the common case, checked in one test)
    _checks.check_choice("exchange", exchange, EXCHANGES)
    _checks.check_choice("grad_reduction", grad_reduction, GRAD_REDUCTIONS)
    if group is None or world_size(group) == 1:
        return LOCAL, need_grad
    return _eager_make_group()(group, exchange, grad_reduction, query, key, labels, scales, need_grad, engine,
                               groups)


# Under torch.compile a multi-rank call runs eagerly: the metadata exchange reads values on the host and the ring
# is Python loops over point-to-point ops.  Dynamo breaks the graph here (and at the Function, which it cannot
# trace with a GroupComm); with fullgraph=True it refuses, and names this reason.
_EAGER_REASON = ("xloss: group= (cross-rank negatives) runs eagerly under torch.compile (a graph break): call the "
                 "loss outside the fullgraph=True region, or compile without fullgraph")
_EAGER = []


def _eager_make_group():
    """``_make_group`` wrapped with ``torch.compiler.disable``, made on first multi-rank call: the wrapper imports
    torch._dynamo (seconds), which a single-process ``import xloss`` must not pay."""
    if not _EAGER:
        _EAGER.append(torch.compiler.disable(_make_group, reason=_EAGER_REASON))
    return _EAGER[0]


def _make_group(group, exchange, grad_reduction, query, key, labels, scales, need_grad, engine, groups=False):
    if engine == "reference":  # raised on every rank before any collective
        raise ValueError("backend='reference' is single-process only; with a group use 'auto', 'chunked' or "
                         "'triton'")
    if not isinstance(group, dist.ProcessGroup):
        raise TypeError(f"group must be a torch.distributed ProcessGroup or None, got {type(group).__name__}")
    check_global_labels(labels, query.shape[0], query.device)
    comm = GroupComm(group, exchange, grad_reduction)
    comm.layout, need_grad = _exchange_meta(comm, query, key, labels, scales, need_grad, groups)
    return comm, need_grad


# --- Rows of every rank as one tensor, with gradients (the all_gather exchange of the token families) ---------


def gather_sized(comm: GroupComm, x: torch.Tensor, sizes) -> torch.Tensor:
    """Every rank's ``x [sizes[r], ...]`` concatenated in rank order (a padded all_gather when uneven)."""
    top = max(sizes)
    if min(sizes) == top:
        return comm.all_gather_rows(x).flatten(0, 1)
    pad = x.new_zeros((top,) + tuple(x.shape[1:]))
    pad[: x.shape[0]] = x
    full = comm.all_gather_rows(pad)
    return torch.cat([full[r, : sizes[r]] for r in range(comm.size)])


def scatter_sized(comm: GroupComm, x: torch.Tensor, sizes) -> torch.Tensor:
    """Sum ``x [Σ sizes, ...]`` over ranks; this rank's ``[sizes[rank], ...]`` rows (the adjoint of
    :func:`gather_sized`)."""
    top = max(sizes)
    if min(sizes) == top:
        return comm.reduce_scatter_rows(x.contiguous())
    pad = x.new_zeros((comm.size * top,) + tuple(x.shape[1:]))
    off = 0
    for r, size in enumerate(sizes):
        pad[r * top : r * top + size] = x[off : off + size]
        off += size
    return comm.reduce_scatter_rows(pad)[: sizes[comm.rank]]


class GatherRows(torch.autograd.Function):
    """:func:`gather_sized` with its adjoint as the backward: each rank's gradient of the gathered rows, summed
    over ranks, comes back to the rows' owner.  Every rank must run the backward (it communicates)."""

    @staticmethod
    def forward(ctx, x, comm, sizes):
        ctx.comm, ctx.sizes = comm, sizes
        return gather_sized(comm, x, sizes)

    @staticmethod
    def backward(ctx, g):
        return scatter_sized(ctx.comm, g, ctx.sizes), None, None


class ScatterRows(torch.autograd.Function):
    """:func:`scatter_sized` (every rank's ``[Σ sizes, ...]`` summed, this rank's rows kept) with its adjoint,
    the all_gather, as the backward.  Every rank must run the backward (it communicates)."""

    @staticmethod
    def forward(ctx, x, comm, sizes):
        ctx.comm, ctx.sizes = comm, sizes
        return scatter_sized(comm, x, sizes)

    @staticmethod
    def backward(ctx, g):
        return gather_sized(ctx.comm, g.contiguous(), ctx.sizes), None, None


def scatter_rows(comm: GroupComm, x: torch.Tensor, sizes, with_grad: bool = False) -> torch.Tensor:
    """The sum over ranks of ``x [Σ sizes, ...]``, this rank's ``[sizes[rank], ...]`` rows; ``with_grad`` (the
    same on every rank) through :class:`ScatterRows`, as :func:`gather_rows`."""
    if with_grad and torch.is_grad_enabled():
        return ScatterRows.apply(x if x.requires_grad else x.detach().requires_grad_(), comm, tuple(sizes))
    return scatter_sized(comm, x, sizes)


def gather_rows(comm: GroupComm, x: torch.Tensor | None, sizes, with_grad: bool = False):
    """Every rank's rows of ``x`` (None stays None).  ``with_grad`` (decided the same on every rank: any rank
    needs gradients) goes through :class:`GatherRows`, so that every rank runs the backward's collective; a
    rank whose ``x`` needs no gradient then gathers a detached copy that does, and drops its gradient."""
    if x is None:
        return None
    if x.dtype == torch.bool:  # collectives move numbers
        return gather_sized(comm, x.to(torch.uint8), sizes).bool()
    if with_grad and torch.is_grad_enabled():
        return GatherRows.apply(x if x.requires_grad else x.detach().requires_grad_(), comm, tuple(sizes))
    return gather_sized(comm, x, sizes)
