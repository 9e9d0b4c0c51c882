"""Gradient caching (Gao et al. 2021, "Scaling Deep Contrastive Learning Batch Size under Memory Limited Setup"):
``xloss.GradCache``, for any encoders and any loss of their full-batch embeddings.

A fused loss keeps the N×M logits off the table; then the encoders' activations cap the batch.  Gradient
caching removes that cap at the price of one extra forward pass:

1. embed the batch chunk by chunk WITHOUT graphs (recording each chunk's RNG state), and concatenate;
2. compute the loss on the full-batch embeddings and back-propagate it to them: the embedding gradients
   are the "cache" (and the loss's own parameters, e.g. a learnable scale, get their gradients here);
3. re-run each chunk WITH its graph (same RNG state, so dropout draws the same masks) and back-propagate
   that chunk's slice of the cached gradient.

Only one chunk's activations are alive at a time, so the peak memory is that of one chunk plus the O(N·D)
embeddings, whatever N.  Step 3 runs inside the backward of a small autograd node (as reentrant activation
checkpointing does), so ``GradCache.loss`` can hand a trainer a loss tensor whose ``backward()`` (scaled by an
AMP grad scaler, divided for gradient accumulation, ...) does the rest; ``GradCache.__call__`` is that plus
``backward()``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import torch
import torch.utils._pytree as pytree
from torch.autograd.function import once_differentiable
from torch.nn.parallel import DistributedDataParallel

__all__ = ["GradCache"]


class GradCache:
    """One training step's forward and backward through gradient caching.

    ``cache(*inputs)`` leaves in every parameter's ``.grad`` (accumulated onto what is there) what
    ``loss_fn(*(enc(x) for enc, x in zip(encoders, inputs))).backward()`` on the full batch gives, and returns
    the loss, detached, while holding only one chunk's activations at a time.

    Args:
        encoders: one callable (usually an ``nn.Module``) used for every input (a shared tower), or a sequence
            of them, one per input.  An encoder takes a chunk of its input and returns a tensor, or a tuple /
            list / dict of tensors (e.g. late interaction's token embeddings and mask); every tensor it returns
            has the chunk's rows first.  GradCache concatenates the chunks' outputs along dim 0.  Floating
            outputs that require grad in the second pass get the cached gradient; others (bool masks, a frozen
            tower's output) pass through as constants.
        loss_fn: ``loss_fn(*embeddings)``, any differentiable function of the full-batch outputs, one argument
            per input, e.g. ``lambda q, k: xloss.info_nce(q, k, logit_scale=scale)``.  Tensors it uses
            (a learnable scale) get their gradients as in the uncached step.
        chunk_size: at most this many rows per chunk.
        token_budget: at most this many tokens per chunk (a row longer than the budget is a chunk of its own).
            A row's tokens are the nonzero entries of its ``attention_mask`` when the input is a mapping with
            that key (a tokenizer's output); for any other input (a tensor, a list, a mapping without a mask)
            every position counts, i.e. ``x.shape[1]`` tokens per row of the first batched tensor (1 for a
            1-D one).  With both limits, a chunk ends at whichever comes first; at least one is required.

    Inputs are tensors split along dim 0, or mappings (a tokenizer's ``BatchEncoding`` too) / lists / tuples
    of them: each of their tensors with a batch dimension is split alike (they must agree on the batch size),
    0-dim tensors and non-tensors go to every chunk unchanged.  Different inputs may have different batch sizes
    (queries and documents with extra negatives); the loss decides what pairs with what.

    Randomness: the CPU RNG state (and the CUDA RNG state of the chunk's devices) is recorded before each chunk
    of the first pass and restored for its second pass, so dropout draws the same masks; the masks are those of
    a chunk-by-chunk forward.  Afterwards the global RNG is where the first pass left it.

    Grad modes: under ``torch.no_grad()`` / ``torch.inference_mode()`` both ``cache(*inputs)`` and
    ``cache.loss(*inputs)`` just compute the loss in chunks (evaluation at the same memory bound), record
    nothing and touch no ``.grad``.  Under ``torch.autocast`` the autocast state of the call (every device
    type) is recorded and re-entered by the second pass, even when ``backward()`` runs after the ``with``
    block, so both passes compute in the same precision; ``loss_fn`` runs in the caller's context.

    Distributed: an encoder that is, or contains, a ``DistributedDataParallel`` module runs every second-pass
    chunk under its ``no_sync()`` except its last one, whose backward all-reduces the accumulated gradient
    once.  Every rank must then run the same number of chunks (DDP's forward may broadcast buffers, and the
    last chunk's backward is a collective): with ``token_budget``, whose chunk count depends on the data,
    make sure of it.  With a ``group=`` loss (e.g. ``xloss.info_nce(..., group=pg)``) the step equals a DDP
    step on the global batch.
    """

    def __init__(self, encoders, loss_fn: Callable, *, chunk_size: int | None = None,
                 token_budget: int | None = None):
        if chunk_size is None and token_budget is None:
            raise ValueError("GradCache needs chunk_size= (rows per chunk) or token_budget= (tokens per chunk)")
        for name, value in (("chunk_size", chunk_size), ("token_budget", token_budget)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"GradCache: {name} must be a positive integer or None, got {value!r}")
        if not callable(loss_fn):
            raise TypeError(f"GradCache: loss_fn must be callable, got {type(loss_fn).__name__}")
        # One module (nn.Sequential included) is shared; a list, tuple or nn.ModuleList holds one per input.
        shared = callable(encoders) and not isinstance(encoders, torch.nn.ModuleList)
        listed = isinstance(encoders, (Sequence, torch.nn.ModuleList))
        if not shared and not (listed and len(encoders) and all(map(callable, encoders))):
            raise TypeError("GradCache: encoders must be one callable (a shared tower) or a non-empty sequence "
                            f"of callables (one per input), got {type(encoders).__name__}")
        self.encoders = encoders if shared else list(encoders)
        self.shared = shared
        self.loss_fn = loss_fn
        self.chunk_size = chunk_size
        self.token_budget = token_budget

    def __call__(self, *inputs) -> torch.Tensor:
        """Forward and backward of one step; returns the loss, detached.  Gradients land in ``.grad``."""
        loss = self.loss(*inputs)
        if not isinstance(loss, torch.Tensor):
            raise TypeError(f"GradCache: loss_fn returned {type(loss).__name__}; it must return the loss tensor")
        if loss.requires_grad:
            if loss.numel() != 1:
                raise ValueError(f"GradCache: loss_fn returned a tensor of shape {tuple(loss.shape)}; calling the "
                                 "cache back-propagates it, which needs a scalar.  Use cache.loss(*inputs) and "
                                 "call backward(gradient) yourself")
            loss.backward()
        return loss.detach()

    def loss(self, *inputs) -> torch.Tensor:
        """The loss of the full batch, attached to a graph whose ``backward()`` runs the cached second pass.

        For trainers that call ``backward`` themselves (sentence-transformers, AMP grad scalers, gradient
        accumulation): the gradient that reaches the loss scales every chunk's.  Call ``backward()`` once.
        """
        encoders = self._encoders_for(inputs)
        record = torch.is_grad_enabled()
        parts = [_Input(enc, x, f"input {i}") for i, (enc, x) in enumerate(zip(encoders, inputs))]
        for part in parts:
            part.ranges = self._ranges(part)
        for part in parts:  # the first pass, in input order: the RNG advances as in a chunked forward
            part.embed(record=record and part.may_need_grad())
        outputs = [part.leaves for part in parts]
        if record:
            outputs = _attach_replay(parts, _autocast_state(inputs))
        return self.loss_fn(*(pytree.tree_unflatten(leaves, part.spec) for leaves, part in zip(outputs, parts)))

    def _encoders_for(self, inputs) -> list:
        if not inputs:
            raise ValueError("GradCache: no inputs given")
        if self.shared:
            return [self.encoders] * len(inputs)
        if len(self.encoders) != len(inputs):
            raise ValueError(f"GradCache: {len(self.encoders)} encoders for {len(inputs)} inputs; pass one encoder "
                             "per input, or a single one to share")
        return self.encoders

    def _ranges(self, part: _Input) -> list[tuple[int, int]]:
        """``(begin, end)`` row ranges of the chunks, fixed before the first pass (encoders may edit inputs)."""
        rows = part.rows
        if self.token_budget is None:
            return [(b, min(b + self.chunk_size, rows)) for b in range(0, rows, self.chunk_size)]
        max_rows = self.chunk_size or rows
        ranges, begin, used = [], 0, 0
        for i, tokens in enumerate(part.token_counts()):
            if i > begin and (used + tokens > self.token_budget or i - begin == max_rows):
                ranges.append((begin, i))
                begin, used = i, 0
            used += tokens
        ranges.append((begin, rows))
        return ranges


# --------------------------------------------------------------------------------------------------------------
# Inputs: validation, slicing, token counts
# --------------------------------------------------------------------------------------------------------------


def _named_tensors(x, where: str) -> list[tuple[str, torch.Tensor]]:
    """The tensors of one input with their names; a TypeError for inputs GradCache cannot split."""
    if isinstance(x, torch.Tensor):
        return [(where, x)]
    if isinstance(x, Mapping):
        return [(f"{where}[{k!r}]", v) for k, v in x.items() if isinstance(v, torch.Tensor)]
    if isinstance(x, (list, tuple)):
        return [(f"{where}[{i}]", v) for i, v in enumerate(x) if isinstance(v, torch.Tensor)]
    raise TypeError(f"GradCache: {where} is a {type(x).__name__}; inputs must be tensors, or mappings / lists / "
                    "tuples of tensors, split along dim 0")


def _is_batched(v) -> bool:
    return isinstance(v, torch.Tensor) and v.dim() > 0


def _slice(x, begin: int, end: int):
    """Rows ``begin:end`` of every batched tensor of ``x``; anything else unchanged."""
    if isinstance(x, torch.Tensor):
        return x[begin:end]
    if isinstance(x, Mapping):  # a BatchEncoding is a UserDict: rebuilt as a plain dict
        return {k: v[begin:end] if _is_batched(v) else v for k, v in x.items()}
    return type(x)(v[begin:end] if _is_batched(v) else v for v in x)


def _leaf_name(path) -> str:
    return "output" + pytree.keystr(path)


@dataclass
class _RngState:
    """The CPU RNG state and the CUDA RNG states of the devices a chunk touches, recorded before its forward."""

    cpu: torch.Tensor
    cuda: dict[int, torch.Tensor]

    @classmethod
    def capture(cls, chunk) -> _RngState:
        devices = {t.device.index for _, t in _named_tensors(chunk, "chunk") if t.device.type == "cuda"}
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            devices.add(torch.cuda.current_device())  # an encoder on the GPU fed CPU tensors
        return cls(torch.get_rng_state(), {d: torch.cuda.get_rng_state(d) for d in sorted(devices)})

    @contextlib.contextmanager
    def restored(self):
        # fork_rng puts the outer state back afterwards: the second pass leaves no trace on the global RNG.
        with torch.random.fork_rng(devices=list(self.cuda)):
            torch.set_rng_state(self.cpu)
            for device, state in self.cuda.items():
                torch.cuda.set_rng_state(state, device)
            yield


@dataclass
class _Input:
    """One input of the step: its encoder, chunks, RNG states and first-pass outputs."""

    encoder: Callable
    x: object
    where: str
    rows: int = 0
    ranges: list[tuple[int, int]] = field(default_factory=list)
    rng: list[_RngState | None] = field(default_factory=list)
    spec: object = None  # the pytree spec of the encoder's output
    leaves: list[torch.Tensor] = field(default_factory=list)  # concatenated over the chunks
    replayed: list[int] = field(default_factory=list)  # indices of the leaves that take the cached gradient
    meta: list[tuple[torch.dtype, torch.Size]] = field(default_factory=list)  # their dtype and per-row shape
    sync_elsewhere: bool = False  # a later input shares this DDP encoder: its last chunk all-reduces instead

    def __post_init__(self):
        tensors = [(name, t) for name, t in _named_tensors(self.x, self.where) if t.dim() > 0]
        if not tensors:
            raise ValueError(f"GradCache: {self.where} holds no tensor with a batch dimension")
        rows = {name: t.shape[0] for name, t in tensors}
        if len(set(rows.values())) > 1:
            raise ValueError(f"GradCache: the tensors of {self.where} disagree on the batch size (dim 0): "
                             + ", ".join(f"{name} has {n}" for name, n in rows.items()))
        self.rows = tensors[0][1].shape[0]
        if self.rows == 0:
            raise ValueError(f"GradCache: {self.where} is an empty batch")

    def token_counts(self) -> list[int]:
        """Tokens per row: the attention mask's nonzero entries, else every position (see ``token_budget``)."""
        mask = self.x.get("attention_mask") if isinstance(self.x, Mapping) else None
        if _is_batched(mask):
            return (mask.reshape(self.rows, -1) != 0).sum(1).tolist()
        first = next(t for _, t in _named_tensors(self.x, self.where) if t.dim() > 0)
        return [first.shape[1] if first.dim() > 1 else 1] * self.rows

    def may_need_grad(self) -> bool:
        """False when nothing can receive a gradient through this encoder: a frozen module, constant inputs."""
        if any(t.requires_grad for _, t in _named_tensors(self.x, self.where)):
            return True
        if isinstance(self.encoder, torch.nn.Module):
            return any(p.requires_grad for p in self.encoder.parameters())
        return True  # a plain function may close over parameters

    def run(self, begin: int, end: int):
        """The encoder on rows ``begin:end``; the flattened output, checked."""
        out = self.encoder(_slice(self.x, begin, end))
        leaves, spec = pytree.tree_flatten_with_path(out)
        for path, leaf in leaves:
            if not isinstance(leaf, torch.Tensor):
                raise TypeError(f"GradCache: the encoder of {self.where} returned {type(leaf).__name__} at "
                                f"{_leaf_name(path)}; it must return a tensor or a tuple / list / dict of tensors")
            if leaf.dim() == 0 or leaf.shape[0] != end - begin:
                raise ValueError(f"GradCache: the encoder of {self.where} returned {_leaf_name(path)} of shape "
                                 f"{tuple(leaf.shape)} for a chunk of {end - begin} rows; every output needs the "
                                 "chunk's rows first, to be concatenated into the batch")
        if not leaves:
            raise ValueError(f"GradCache: the encoder of {self.where} returned no tensor")
        return [leaf for _, leaf in leaves], spec

    def embed(self, record: bool) -> None:
        """First pass: every chunk without a graph, recording RNG states when a second pass will follow."""
        with torch.no_grad():
            for begin, end in self.ranges:
                self.rng.append(_RngState.capture(self.x) if record else None)
                leaves, spec = self.run(begin, end)
                if self.spec is None:
                    # Copied into batch-sized buffers as they come: an output that is a view (CLS pooling)
                    # must not keep its chunk's hidden states alive.
                    self.spec = spec
                    self.leaves = [leaf.new_empty((self.rows, *leaf.shape[1:])) for leaf in leaves]
                elif spec != self.spec:
                    raise ValueError(f"GradCache: the encoder of {self.where} returned outputs of another "
                                     f"structure for rows {begin}:{end} ({spec}) than for the first chunk "
                                     f"({self.spec})")
                for i, (buf, leaf) in enumerate(zip(self.leaves, leaves)):
                    if leaf.dtype != buf.dtype or leaf.shape[1:] != buf.shape[1:]:
                        raise ValueError(f"GradCache: output {i} of the encoder of {self.where} cannot be "
                                         f"concatenated over the chunks: {leaf.dtype} {tuple(leaf.shape)} for rows "
                                         f"{begin}:{end}, {buf.dtype} {tuple(buf.shape[1:])} per row before")
                    buf[begin:end] = leaf
        if record:
            self.replayed = [i for i, leaf in enumerate(self.leaves) if leaf.is_floating_point()]
            self.meta = [(self.leaves[i].dtype, self.leaves[i].shape[1:]) for i in self.replayed]

    def replay(self, grads: list[torch.Tensor | None], autocast: dict) -> None:
        """Second pass: every chunk with its graph, back-propagating its slice of the cached gradients."""
        ddps = _ddp_modules(self.encoder)
        for chunk, ((begin, end), rng) in enumerate(zip(self.ranges, self.rng)):
            pieces = [None if g is None else g[begin:end] for g in grads]
            # DDP all-reduces the accumulated gradients once: from the backward of its very last chunk.
            final = bool(ddps) and not self.sync_elsewhere and chunk == len(self.ranges) - 1
            if not final and all(p is None for p in pieces):
                continue  # the loss did not use these outputs, and no all-reduce waits for this chunk
            with contextlib.ExitStack() as stack:
                for ddp in ddps if not final else ():
                    stack.enter_context(ddp.no_sync())
                stack.enter_context(rng.restored())
                for device_type, kwargs in autocast.items():
                    stack.enter_context(torch.autocast(device_type, **kwargs))
                leaves, _ = self.run(begin, end)
                outs = [leaves[i] for i in self.replayed]
                self._check_second_pass(outs, begin, end)
                pairs = [(o, p) for o, p in zip(outs, pieces) if o.requires_grad and p is not None]
                if not pairs and final:  # the all-reduce needs a backward: one with zero gradients
                    pairs = [(o, torch.zeros_like(o)) for o in outs if o.requires_grad]
                if pairs:
                    torch.autograd.backward([o for o, _ in pairs], [p for _, p in pairs])

    def _check_second_pass(self, outs: list[torch.Tensor], begin: int, end: int) -> None:
        for out, (dtype, row_shape) in zip(outs, self.meta):
            if out.dtype != dtype or out.shape[1:] != row_shape:
                raise RuntimeError(f"GradCache: the second pass of {self.where} (rows {begin}:{end}) returned "
                                   f"{out.dtype} {tuple(out.shape)} where the first returned {dtype} "
                                   f"{tuple(row_shape)} per row; the encoder must behave the same in both passes")


def _ddp_modules(encoder) -> list[DistributedDataParallel]:
    """The DDP modules an encoder is or contains (a wrapper around a DDP model counts)."""
    if not isinstance(encoder, torch.nn.Module):
        return []
    return [m for m in encoder.modules() if isinstance(m, DistributedDataParallel)]


def _autocast_state(inputs) -> dict:
    """The caller's autocast settings for the CPU, CUDA where present and every device type of the inputs."""
    device_types = {"cpu"} | {t.device.type for x in inputs for _, t in _named_tensors(x, "input")}
    if torch.cuda.is_available():
        device_types.add("cuda")
    return {d: {"enabled": torch.is_autocast_enabled(d), "dtype": torch.get_autocast_dtype(d),
                "cache_enabled": torch.is_autocast_cache_enabled()}
            for d in sorted(device_types) if torch.amp.is_autocast_available(d)}


# --------------------------------------------------------------------------------------------------------------
# The replay node
# --------------------------------------------------------------------------------------------------------------


@dataclass
class _Step:
    """What the second pass needs: the inputs (in order) and the autocast state of the call."""

    parts: list[_Input]
    autocast: dict

    def replay(self, grads) -> None:
        # Inputs sharing one DDP encoder: only the last of them all-reduces, from its last chunk.
        seen: set[int] = set()
        for part in reversed(self.parts):
            ids = {id(m) for m in _ddp_modules(part.encoder)}
            part.sync_elsewhere = bool(ids & seen)
            seen |= ids
        grads = iter(grads)
        with torch.enable_grad():
            for part in self.parts:
                part.replay([next(grads) for _ in part.replayed], self.autocast)


class _Replay(torch.autograd.Function):
    """Identity on the first-pass embeddings; its backward receives all their gradients at once (the cache)
    and runs the second pass.  ``anchor`` (an empty tensor requiring grad) puts the node in the graph."""

    @staticmethod
    def forward(ctx, step: _Step, anchor: torch.Tensor):
        ctx.step = step
        ctx.set_materialize_grads(False)  # an output the loss did not use gets None: its chunks are skipped
        return tuple(part.leaves[i] for part in step.parts for i in part.replayed)

    @staticmethod
    @once_differentiable
    def backward(ctx, *grads):
        step, ctx.step = ctx.step, None  # a second backward would find nothing to replay
        if step is None:
            raise RuntimeError("GradCache: the loss was already back-propagated once; its second pass ran then")
        step.replay(grads)
        return None, None


def _attach_replay(parts: list[_Input], autocast: dict) -> list[list[torch.Tensor]]:
    """The outputs of every input, the floating ones that take a cached gradient routed through ``_Replay``."""
    routed = [p for p in parts if p.replayed]
    if not routed:
        return [p.leaves for p in parts]
    through = iter(_Replay.apply(_Step(routed, autocast), torch.empty(0, requires_grad=True)))
    outputs = []
    for part in parts:
        leaves = list(part.leaves)
        for i in part.replayed:
            leaves[i] = next(through)
        outputs.append(leaves)
        part.leaves = []  # the step keeps no embeddings: nothing ties the outputs' graph back to them
    return outputs
