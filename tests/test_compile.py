"""The public functions inside ``torch.compile(fullgraph=True)`` (CPU): values and gradients equal eager.

Under compile every family runs its ``torch.library`` custom ops (``xloss/<family>/ops.py``) instead of its
autograd Function; these tests compare the compiled results with the eager ones (fp64 and fp32, tensor
logit scale / temperature with a gradient, labels, masks, weights), run ``torch.library.opcheck`` on every op,
check that new shapes do not recompile forever, and compile once with inductor (the default backend; it
builds C++ with g++, so only one small test).  The rest uses ``backend="aot_eager"``, which still traces with
fake tensors through AOTAutograd.  Tiny shapes: compile time dominates.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend

import xloss
from xloss.gram import ops as gram_ops
from xloss.late_interaction import ops as li_ops
from xloss.symile import ops as symile_ops

DTYPES = [torch.float64, torch.float32]


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()  # no compiled code or recompile counts carried from one test to the next
    yield
    torch._dynamo.reset()


def _randn(*shape, dtype, seed, grad=True):
    t = torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)
    return t.requires_grad_(grad)


def _scalar(value, dtype):
    return torch.tensor(value, dtype=dtype, requires_grad=True)


def _compare(f, args, backend="aot_eager"):
    """``f(*args)`` compiled (fullgraph) against eager: the value and the gradients of every float input that
    requires grad, with a non-trivial ``grad_output``."""
    leaves = [a for a in args if isinstance(a, torch.Tensor) and a.requires_grad]
    compiled = torch.compile(f, fullgraph=True, backend=backend)
    out_c = compiled(*args)
    out_e = f(*args)
    torch.testing.assert_close(out_c, out_e)
    g_out = torch.linspace(0.5, 1.5, out_e.numel(), dtype=out_e.dtype).reshape(out_e.shape)
    grads_c = torch.autograd.grad(out_c, leaves, g_out)
    grads_e = torch.autograd.grad(out_e, leaves, g_out)
    for gc, ge in zip(grads_c, grads_e):
        torch.testing.assert_close(gc, ge)
    return out_c


# ------------------------------------------------------------------------------------------------ losses
@pytest.mark.parametrize("dtype", DTYPES)
def test_info_nce(dtype, monkeypatch):
    if dtype == torch.float64:  # tiny strips, logits not kept: the 4-sweep path and an empty `logits` output
        monkeypatch.setenv("XLOSS_CPU_TILE_MB", "0.0005")
    q, k = _randn(7, 5, dtype=dtype, seed=0), _randn(9, 5, dtype=dtype, seed=1)
    labels = torch.tensor([0, 3, 2, 8, 1, 1, 4])

    def f(q, k, t, s, labels):
        a = xloss.info_nce(q, k, temperature=t, labels=labels, label_smoothing=0.1)
        b = xloss.info_nce(q, k, logit_scale=s, symmetric=False, reduction="none")
        c = xloss.info_nce(q, k, logit_scale=3.0, reduction="sum")  # a Python float scale
        return torch.cat([a[None], b, c[None]])

    _compare(f, (q, k, _scalar(0.5, dtype), _scalar(2.0, dtype), labels))


@pytest.mark.parametrize("dtype", DTYPES)
def test_late_interaction(dtype):
    q, d = _randn(4, 3, 5, dtype=dtype, seed=0), _randn(6, 4, 5, dtype=dtype, seed=1)
    gen = torch.Generator().manual_seed(2)
    q_mask, d_mask = torch.rand(4, 3, generator=gen) > 0.3, torch.rand(6, 4, generator=gen) > 0.3
    q_w, d_w = _randn(4, 3, dtype=dtype, seed=3), _randn(6, 4, dtype=dtype, seed=4)
    labels = torch.tensor([0, 3, 2, 5])

    def f(q, d, q_mask, d_mask, q_w, d_w, s, labels):
        loss = xloss.late_interaction_loss(q, d, q_mask, d_mask, logit_scale=s, labels=labels, direction="both",
                                           q_weights=q_w, d_weights=d_w, label_smoothing=0.1)
        plain = xloss.late_interaction_loss(q, d, logit_scale=5.0, reduction="none")  # ColBERT, q2d, sum
        scores = xloss.maxsim(q, d, q_mask, d_mask, direction="d2q", mask_mode="zero", token_reduction="mean")
        pairs = xloss.maxsim_pairs(q, d[:4], q_mask, d_mask[:4], direction="both", q_weights=q_w)
        by_t = xloss.late_interaction_loss(q, d, q_mask, d_mask, temperature=s, direction="d2q", reduction="none")
        return torch.cat([loss[None], plain, scores.flatten(), pairs, by_t])

    _compare(f, (q, d, q_mask, d_mask, q_w, d_w, _scalar(2.0, dtype), labels))


@pytest.mark.parametrize("dtype", DTYPES)
def test_gram(dtype):
    a, x, y = (_randn(6, 5, dtype=dtype, seed=i) for i in range(3))

    def f(a, x, y, t, labels):
        loss = xloss.gram_loss(a, x, y, temperature=t, label_smoothing=0.1)
        split = xloss.gram_loss(a, x, temperature=0.5, stopgrad_gathered=True, eps=1e-3, reduction="none")
        labelled = xloss.gram_loss(a[:4], x, y, logit_scale=1 / t, labels=labels, reduction="none")
        vol = xloss.gram_volume(a, x[:4], y[:4])
        aligned = xloss.gram_volume(a, x, pairwise=False)
        return torch.cat([loss[None], split, labelled, vol.flatten(), aligned])

    _compare(f, (a, x, y, _scalar(0.3, dtype), torch.tensor([5, 0, 5, 2])))


@pytest.mark.parametrize("dtype", DTYPES)
def test_symile(dtype):
    reps = [_randn(5, 4, dtype=dtype, seed=i) for i in range(3)]
    perms = [[torch.randperm(5, generator=torch.Generator().manual_seed(10 * a + b)) for b in range(2)]
             for a in range(3)]

    def f(x, y, z, s):
        streamed = xloss.symile_loss(x, y, z, logit_scale=s, negative_sampling="n_squared", reduction="none")
        sampled = xloss.symile_loss(x, y, z, logit_scale=s, permutations=perms)
        return torch.cat([streamed, sampled[None]])

    _compare(f, (*reps, _scalar(1.5, dtype)))


@pytest.mark.parametrize("dtype", DTYPES)
def test_sigmoid(dtype):
    q, k = _randn(7, 5, dtype=dtype, seed=0), _randn(9, 5, dtype=dtype, seed=1)
    labels = torch.tensor([0, 3, 2, 8, 1, 1, 4])

    def f(q, k, s, b, labels):
        a = xloss.sigmoid_loss(q, k, logit_scale=s, logit_bias=b, labels=labels)
        rows = xloss.sigmoid_loss(q, k, logit_scale=s, logit_bias=-1.0, reduction="none")
        total = xloss.sigmoid_loss(q, k, logit_scale=3.0, logit_bias=b, reduction="sum")
        return torch.cat([a[None], rows, total[None]])

    _compare(f, (q, k, _scalar(2.0, dtype), _scalar(-0.5, dtype), labels))


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="Triton is not installed")
def test_triton_engines():
    """backend="triton" (the Triton interpreter on CPU tensors): the ops' fake shapes match the kernels'
    outputs and the compiled values and gradients equal eager.  fp32, tiny shapes (the interpreter is slow)."""
    f32 = torch.float32
    q, k = _randn(5, 4, dtype=f32, seed=0), _randn(6, 4, dtype=f32, seed=1)
    tq, td = _randn(3, 2, 4, dtype=f32, seed=2), _randn(4, 3, 4, dtype=f32, seed=3)
    x, y = _randn(5, 4, dtype=f32, seed=4), _randn(5, 4, dtype=f32, seed=5)
    tri = {"backend": "triton"}

    def f(q, k, tq, td, x, y, s):
        return torch.cat([
            xloss.info_nce(q, k, logit_scale=s, label_smoothing=0.1, **tri)[None],
            xloss.sigmoid_loss(q, k, logit_scale=s, logit_bias=-1.0, **tri)[None],
            xloss.late_interaction_loss(tq, td, logit_scale=s, direction="both", **tri)[None],
            xloss.gram_loss(q, x, y, temperature=0.5, **tri)[None],
            xloss.symile_loss(q, x, y, logit_scale=s, negative_sampling="n_squared", **tri)[None],
        ])

    _compare(f, (q, k, tq, td, x, y, _scalar(2.0, f32)))


def test_no_grad_forward():
    """Under no_grad the engines skip what backward needs (MaxSim's indices): the ops return empty tensors."""
    q, d = _randn(3, 4, 5, dtype=torch.float64, seed=0), _randn(5, 2, 5, dtype=torch.float64, seed=1)

    def f(q, d):
        return (xloss.maxsim(q, d, direction="both"), xloss.info_nce(q[:, 0], d[:, 0], logit_scale=2.0),
                xloss.sigmoid_loss(q[:, 0], d[:, 0], logit_scale=2.0, logit_bias=-1.0))

    with torch.no_grad():
        got = torch.compile(f, fullgraph=True, backend="aot_eager")(q, d)
        want = f(q, d)
    torch.testing.assert_close(got, want)


def test_new_shapes_compile_at_most_twice():
    """Default ``dynamic=None``: the first call compiles for its shapes, a second shape recompiles once with
    symbolic sizes (the fake implementations take symbolic shapes), and later shapes reuse that graph, as long
    as they take the same branches (e.g. late interaction's ``Nd == Nq`` shortcut adds one graph).  (Not covered: ``symile_loss(negative_sampling="n")`` with random draws, whose ``torch.randperm(N)``
    specializes on N: one graph per batch size.)"""
    counter = CompileCounterWithBackend("aot_eager")

    def f(q, k, x, tq, td, t):
        return torch.cat([
            xloss.info_nce(q, k, logit_scale=t)[None],
            xloss.sigmoid_loss(q, k, logit_scale=t, logit_bias=-1.0)[None],
            xloss.gram_loss(q, x, temperature=0.5)[None],
            xloss.symile_loss(q, x, q, logit_scale=t, negative_sampling="n_squared")[None],
            xloss.late_interaction_loss(tq, td, logit_scale=t, direction="both")[None],
        ])

    compiled = torch.compile(f, fullgraph=True, backend=counter)
    t = _scalar(2.0, torch.float64)
    for n, m in ((5, 6), (7, 9), (11, 12), (4, 6)):  # N < M throughout (N == M is a branch of its own)
        args = [_randn(n, 3, dtype=torch.float64, seed=n), _randn(m, 3, dtype=torch.float64, seed=m),
                _randn(n, 3, dtype=torch.float64, seed=1), _randn(n, 2, 3, dtype=torch.float64, seed=2),
                _randn(m, n - 2, 3, dtype=torch.float64, seed=3), t]
        out, want = compiled(*args), f(*args)
        torch.testing.assert_close(out, want)
        torch.testing.assert_close(torch.autograd.grad(out.sum(), args), torch.autograd.grad(want.sum(), args))
    # Dynamo puts the Function's forward in a subgraph (fwd_body_0); Dynamo's empty frames hold no apply.
    graphs = [g for g in counter.graphs if "autograd_function_apply" in g.code]  # (not Dynamo's empty frames)
    assert len(graphs) == 2, [g.code for g in graphs]


def test_inductor():
    """One small graph through the default backend (inductor, C++ on the CPU)."""
    q, k = _randn(6, 4, dtype=torch.float32, seed=0), _randn(8, 4, dtype=torch.float32, seed=1)

    def f(q, k, s, labels):
        return xloss.info_nce(q, k, logit_scale=s, labels=labels)

    _compare(f, (q, k, _scalar(2.0, torch.float32), torch.tensor([1, 0, 3, 2, 7, 5])), backend="inductor")


# ------------------------------------------------------------------------------------------------ errors
def test_errors_under_compile():
    """Shape checks still raise while compiling (Dynamo reports the user's ValueError in its error); value
    checks (labels in range) become in-graph asserts, a RuntimeError when the compiled code runs."""
    q, k = torch.randn(4, 3), torch.randn(4, 5)
    with pytest.raises(Exception, match="same feature dimension"):
        torch.compile(lambda q, k: xloss.info_nce(q, k), fullgraph=True, backend="aot_eager")(q, k)
    compiled = torch.compile(lambda q, k, labels: xloss.info_nce(q, k, labels=labels), fullgraph=True,
                             backend="aot_eager")
    compiled(q, q, torch.tensor([1, 0, 3, 2]))
    with pytest.raises(RuntimeError, match=r"labels must lie in \[0, 4\)"):
        compiled(q, q, torch.tensor([1, 0, 4, 2]))
    # A group on a process without torch.distributed (or of one rank) is one process: it compiles and
    # communicates nothing.  (A real multi-rank group under compile raises: tests/test_distributed.py.)
    group = object()
    for loss in (lambda q, k: xloss.info_nce(q, k, group=group),
                 lambda q, k: xloss.sigmoid_loss(q, k, logit_scale=1.0, logit_bias=0.0, group=group)):
        torch.testing.assert_close(torch.compile(loss, fullgraph=True, backend="aot_eager")(q, q), loss(q, q))
    gen = torch.Generator()
    with pytest.raises(Exception, match="generator is not supported under torch.compile"):
        torch.compile(lambda x, y: xloss.symile_loss(x, y, generator=gen), fullgraph=True,
                      backend="aot_eager")(q, q)


# ----------------------------------------------------------------------------------------------- opcheck
def _opcheck_cases():
    f64 = torch.float64

    def rq(*shape, grad=True, seed=0):
        return _randn(*shape, dtype=f64, seed=seed, grad=grad)

    s = _scalar(2.0, f64)
    # late interaction: sweep-level ops without autograd of their own (MaxSimFunction calls them): plain inputs
    mq, md = rq(2, 3, 4, grad=False), rq(3, 2, 4, seed=1, grad=False)
    mq_w, md_w = rq(2, 3, seed=2, grad=False), rq(3, 2, seed=3, grad=False)
    mq_v, md_v = torch.tensor([[True, False, True], [True, True, True]]), torch.ones(3, 2, dtype=torch.bool)
    ms = li_ops.maxsim_forward(mq, md, mq_w, md_w, mq_v, md_v, False, True, True, "chunked", False, True)
    # GRAM and Symile: sweep-level ops without autograd of their own (their Function calls them): plain inputs
    a, x, y = rq(3, 4, grad=False), rq(3, 4, seed=1, grad=False), rq(3, 4, seed=2, grad=False)
    s0, y2 = s.detach(), rq(5, 4, seed=3, grad=False)
    gl_labels = torch.tensor([4, 0, 4])
    _, det = gram_ops.gram_volume(a, [x, y], 0.0, "chunked")
    gst = gram_ops.gram_loss_stats(a, [x, y], s0, torch.arange(3), 0.1, "chunked")
    gw = torch.tensor([0.5, 1.0, 0.25], dtype=f64)
    lse = symile_ops.symile_lse([a, x, y], s0, "chunked")
    ones = torch.ones(2, 3, dtype=f64)
    return {
        "maxsim_forward": (li_ops.maxsim_forward, (mq, md, mq_w, md_w, mq_v, md_v, False, True, True, "chunked",
                                                   False, True)),
        "maxsim_pairs_forward": (li_ops.maxsim_forward, (mq, md[:2], mq_w, None, mq_v, md_v[:2], True, True, False,
                                                         "chunked", True, True)),
        "maxsim_backward": (li_ops.maxsim_backward,
                            (ones, None, mq, md, mq_w, md_w, mq_v, md_v, ms[2], ms[3], ms[4], ms[5], False, True,
                             True, "chunked", False, True, True, True, True)),
        "gram_volume": (gram_ops.gram_volume, (a, [x, y], 0.0, "chunked")),
        "gram_volume_grad": (gram_ops.gram_volume_grad,
                             (torch.ones(3, 3, dtype=f64), a, [x, y], det, 0.0, True, True, "chunked")),
        "gram_loss_stats": (gram_ops.gram_loss_stats, (a, [y2, x[:2].repeat(3, 1)[:5]], s0, gl_labels, 0.0,
                                                       "chunked")),
        "gram_loss_grad": (gram_ops.gram_loss_grad,
                           (a, [x, y], s0, gst[5], gst[0], gst[1], gw, gw, torch.arange(3), 0.1, False, 0.1, True,
                            True, True, "chunked")),
        "gram_loss_grad_stopgrad": (gram_ops.gram_loss_grad,
                                    (a, [x, y], s0, gst[5], gst[0], gst[1], gw, gw, torch.arange(3), 0.0, True, 0.1,
                                     False, True, False, "chunked")),
        "symile_lse": (symile_ops.symile_lse, ([a, x, y], s0, "chunked")),
        "symile_grad": (symile_ops.symile_grad, ([a, x, y], s0, lse, torch.ones(3, 3, dtype=f64), True, "chunked")),
    }


_CASES = None


@pytest.mark.parametrize("name", [
    "maxsim_forward", "maxsim_pairs_forward", "maxsim_backward",
    "gram_volume", "gram_volume_grad", "gram_loss_stats", "gram_loss_grad", "gram_loss_grad_stopgrad",
    "symile_lse", "symile_grad",
])
def test_opcheck(name):
    global _CASES
    if _CASES is None:
        _CASES = _opcheck_cases()
    op, args = _CASES[name]
    if name.endswith("_backward"):  # the backward ops have no gradient of their own: plain tensors in

        def plain(a):
            return [plain(t) for t in a] if isinstance(a, list) else (a.detach() if isinstance(a, torch.Tensor) else a)

        args = tuple(plain(a) for a in args)
    torch.library.opcheck(op, args)
