"""GRAM (SPEC.md §4): the chunked Schur/adjugate path vs the det-based reference, in fp64 and fp32.

Tiny shapes only (2 shared cores).  Most tests also run with a tiny tile budget (``XLOSS_CPU_TILE_MB``) so that
the tile loops, and the diagonal crossing tile boundaries, are exercised.
"""

from __future__ import annotations

import engines
import pytest
import torch
from tolerance import assert_close64

import xloss
from xloss import gram
from xloss import reference as R
from xloss.gram import chunked as _cpu

D = 6


@pytest.fixture(params=["one_tile", "many_tiles"])
def tiles(request, monkeypatch):
    if request.param == "many_tiles":
        monkeypatch.setenv("XLOSS_CPU_TILE_MB", "0.002")  # ~2 KiB: tiles of a few pairs
    else:
        monkeypatch.delenv("XLOSS_CPU_TILE_MB", raising=False)
    return request.param


def _inputs(n1, n2, k, dtype=torch.float64, seed=0, normalize=False):
    gen = torch.Generator().manual_seed(seed)

    def make(n):
        x = torch.randn(n, D, generator=gen, dtype=torch.float64)
        if normalize:
            x = torch.nn.functional.normalize(x, dim=-1)
        return x.to(dtype).requires_grad_()

    return make(n1), [make(n2) for _ in range(k - 1)]


def _grads(out, inputs, grad_out=None):
    return torch.autograd.grad(out, inputs, grad_out, allow_unused=True)


def _close(x, y, rtol=1e-9, atol=1e-10):
    """fp64: the suite's rule (``tolerance.assert_close64``) at this file's rtol; other dtypes: rtol/atol."""
    if x.dtype == y.dtype == torch.float64:
        assert_close64(x, y, rtol=rtol)
    else:
        torch.testing.assert_close(x, y, rtol=rtol, atol=atol)


def test_tiles_really_split(monkeypatch):
    monkeypatch.setenv("XLOSS_CPU_TILE_MB", "0.002")
    assert len(list(_cpu._tiles(9, 7, 3, 8))) > 4


@pytest.mark.parametrize("k", [2, 3, 4, 5])
@pytest.mark.parametrize("eps", [0.0, 1e-3])
def test_volume_matches_reference(k, eps, tiles):
    a, xs = _inputs(9, 7, k)
    v = xloss.gram_volume(a, *xs, eps=eps)
    vr = R.gram_volume(a, *xs, eps=eps)
    assert v.shape == (9, 7) and v.dtype == torch.float64
    _close(v, vr)
    g = torch.randn(9, 7, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    for x, y in zip(_grads(v, [a, *xs], g), _grads(vr, [a, *xs], g)):
        _close(x, y)


@pytest.mark.parametrize("k", [2, 3, 5])
def test_volume_aligned(k):
    a, xs = _inputs(6, 6, k)
    v = xloss.gram_volume(a, *xs, pairwise=False)
    vr = R.gram_volume(a, *xs, pairwise=False)
    assert v.shape == (6,)
    _close(v, vr)
    _close(v, xloss.gram_volume(a, *xs).diagonal())
    for x, y in zip(_grads(v.sum(), [a, *xs]), _grads(vr.sum(), [a, *xs])):
        _close(x, y)


def test_volume_backend_reference_and_only_some_grads():
    a, xs = _inputs(5, 4, 3)
    _close(xloss.gram_volume(a, *xs, backend="reference"), R.gram_volume(a, *xs))
    xs[1].requires_grad_(False)
    v = xloss.gram_volume(a, xs[0], xs[1])
    (g0,) = torch.autograd.grad(v.sum(), [xs[0]])
    (r0,) = torch.autograd.grad(R.gram_volume(a, xs[0], xs[1]).sum(), [xs[0]])
    _close(g0, r0)


@pytest.mark.parametrize("k", [2, 3, 4, 5])
@pytest.mark.parametrize("stopgrad", [False, True])
def test_loss_matches_reference(k, stopgrad, tiles):
    a, xs = _inputs(7, 7, k, normalize=True)
    t = torch.tensor(0.3, dtype=torch.float64, requires_grad=True)
    loss = xloss.gram_loss(a, *xs, temperature=t, stopgrad_gathered=stopgrad)
    ref = R.gram_loss(a, *xs, temperature=t, stopgrad_gathered=stopgrad)
    _close(loss, ref)
    for x, y in zip(_grads(loss, [a, *xs, t]), _grads(ref, [a, *xs, t])):
        _close(x, y)


def test_stopgrad_routes_terms():
    """With stopgrad_gathered and no label smoothing, the anchor sees only the row term, others only the column."""
    a, xs = _inputs(5, 5, 3, normalize=True)
    full = xloss.gram_loss(a, *xs, temperature=0.5, stopgrad_gathered=False, label_smoothing=0.0)
    sg = xloss.gram_loss(a, *xs, temperature=0.5, stopgrad_gathered=True, label_smoothing=0.0)
    _close(full, sg)
    ga_full, ga_sg = _grads(full, [a])[0], _grads(sg, [a])[0]
    assert not torch.allclose(ga_full, ga_sg)
    v = R.gram_volume(a, *[x.detach() for x in xs])
    rows_only = torch.nn.functional.cross_entropy(-v / 0.5, torch.arange(5)) / 2
    _close(ga_sg, _grads(rows_only, [a])[0])


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("smoothing", [0.0, 0.1, 1.0])
def test_loss_reductions_and_smoothing(reduction, smoothing, tiles):
    a, xs = _inputs(6, 6, 3, normalize=True, seed=3)
    kw = {"temperature": 0.2, "label_smoothing": smoothing, "reduction": reduction}
    loss = xloss.gram_loss(a, *xs, **kw)
    ref = R.gram_loss(a, *xs, **kw)
    assert loss.shape == ref.shape == ((6,) if reduction == "none" else ())
    _close(loss, ref)
    g = torch.rand(loss.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(2)) + 0.5
    for x, y in zip(_grads(loss, [a, *xs], g), _grads(ref, [a, *xs], g)):
        _close(x, y)


def test_loss_eps_and_float_temperature_and_backend_reference():
    a, xs = _inputs(5, 5, 4, normalize=True, seed=4)
    loss = xloss.gram_loss(a, *xs, temperature=0.07, eps=1e-4)
    _close(loss, R.gram_loss(a, *xs, temperature=0.07, eps=1e-4))
    _close(loss, xloss.gram_loss(a, *xs, temperature=0.07, eps=1e-4, backend="reference"))
    for x, y in zip(_grads(loss, [a, *xs]), _grads(R.gram_loss(a, *xs, temperature=0.07, eps=1e-4), [a, *xs])):
        _close(x, y)


def test_loss_only_temperature_grad():
    a, xs = _inputs(5, 5, 3, normalize=True)
    a, xs = a.detach(), [x.detach() for x in xs]
    t = torch.tensor(0.4, dtype=torch.float64, requires_grad=True)
    (g,) = _grads(xloss.gram_loss(a, *xs, temperature=t), [t])
    (r,) = _grads(R.gram_loss(a, *xs, temperature=t), [t])
    _close(g, r)


def test_degenerate_inputs():
    """Duplicated modalities: volume 0 (finite); eps > 0 keeps every gradient finite."""
    a, xs = _inputs(5, 5, 4, normalize=True)
    dup = [xs[0], xs[0], xs[1]]  # singular M_j
    v = xloss.gram_volume(a, *dup)
    assert torch.isfinite(v).all() and v.abs().max() < 1e-6
    same = [a, xs[0]]  # anchor duplicated: the aligned volume is 0
    assert xloss.gram_volume(a, *same, pairwise=False).abs().max() < 1e-6
    for others in (dup, same):
        loss = xloss.gram_loss(a, *others, temperature=0.1)
        assert torch.isfinite(loss)
        loss = xloss.gram_loss(a, *others, temperature=0.1, eps=1e-6)
        grads = _grads(loss, [a, *{id(x): x for x in others}.values()])
        assert all(torch.isfinite(g).all() for g in grads if g is not None)
    v = xloss.gram_volume(a, *dup, eps=1e-6)
    assert all(torch.isfinite(g).all() for g in _grads(v.sum(), [a, xs[0], xs[1]]))


@pytest.mark.parametrize("k", [2, 4])
def test_float32_close_to_float64(k):
    a, xs = _inputs(16, 16, k, normalize=True, seed=5)
    a32, xs32 = a.detach().float().requires_grad_(), [x.detach().float().requires_grad_() for x in xs]
    t = torch.tensor(0.07, requires_grad=True)
    loss32 = xloss.gram_loss(a32, *xs32, temperature=t)
    ref64 = R.gram_loss(a, *xs, temperature=0.07)
    naive32 = R.gram_loss(a32, *xs32, temperature=0.07)
    assert loss32.dtype == torch.float32
    err, naive_err = (loss32.double() - ref64).abs(), (naive32.double() - ref64).abs()
    assert err <= naive_err + 1e-5 * ref64.abs()
    g32 = _grads(loss32, [a32, *xs32])
    g64 = _grads(ref64, [a, *xs])
    for x, y in zip(g32, g64):
        assert x.dtype == torch.float32
        torch.testing.assert_close(x.double(), y, rtol=1e-3, atol=1e-4)
    v16 = xloss.gram_volume(a32.detach().half(), *[x.detach().half() for x in xs32])
    assert v16.dtype == torch.float32


def test_bad_inputs():
    a, xs = _inputs(4, 4, 3)
    with pytest.raises(ValueError, match="at least 2 modalities"):
        xloss.gram_volume(a)
    with pytest.raises(ValueError, match="at least 2 modalities"):
        xloss.gram_loss(a, temperature=0.1)
    with pytest.raises(ValueError, match="k = 2..5"):
        xloss.gram_loss(a, *(xs * 3), temperature=0.1)
    with pytest.raises(ValueError, match="temperature must be positive"):
        xloss.gram_loss(a, *xs, temperature=0.0)
    with pytest.raises(ValueError, match="temperature must be positive"):
        xloss.gram_loss(a, *xs, temperature=torch.tensor(-1.0))
    with pytest.raises(ValueError, match="temperature is required"):
        xloss.gram_loss(a, *xs, temperature=None)
    with pytest.raises(ValueError, match="either logit_scale or temperature"):
        xloss.gram_loss(a, *xs, temperature=0.1, logit_scale=10.0)
    with pytest.raises(ValueError, match=r"labels must have shape \(4,\)"):
        xloss.gram_loss(a, *xs, temperature=0.1, labels=torch.arange(3))
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 4\)"):
        xloss.gram_loss(a, *xs, temperature=0.1, labels=torch.tensor([0, 1, 2, 4]))
    with pytest.raises(TypeError, match="labels must have an integer dtype"):
        xloss.gram_loss(a, *xs, temperature=0.1, labels=torch.zeros(4))
    with pytest.raises(ValueError, match=r"others\[1\] must have the shape"):
        xloss.gram_volume(a, xs[0], xs[1][:3])
    with pytest.raises(ValueError, match="feature dimension"):
        xloss.gram_volume(a[:, :4], *xs)
    with pytest.raises(ValueError, match="same number of rows"):
        xloss.gram_loss(a[:3], *xs, temperature=0.1)
    with pytest.raises(ValueError, match="same number of rows"):
        xloss.gram_volume(a[:3], *xs, pairwise=False)
    with pytest.raises(TypeError, match=r"others\[0\]"):
        xloss.gram_volume(a, xs[0].float(), xs[1])
    with pytest.raises(TypeError, match=r"others\[0\] must be a torch.Tensor"):
        xloss.gram_volume(a, [1.0])
    with pytest.raises(TypeError, match="anchor must be a floating-point"):
        xloss.gram_volume(torch.ones(4, D, dtype=torch.long), *xs)
    with pytest.raises(ValueError, match="anchor must be 2-D"):
        xloss.gram_volume(a[0], *xs)
    with pytest.raises(ValueError, match="eps must be >= 0"):
        xloss.gram_volume(a, *xs, eps=-1.0)
    with pytest.raises(ValueError, match="reduction"):
        xloss.gram_loss(a, *xs, temperature=0.1, reduction="avg")
    with pytest.raises(ValueError, match="label_smoothing"):
        xloss.gram_loss(a, *xs, temperature=0.1, label_smoothing=2.0)
    with pytest.raises(TypeError, match="stopgrad_gathered"):
        xloss.gram_loss(a, *xs, temperature=0.1, stopgrad_gathered=1)
    with pytest.raises(RuntimeError, match="Triton"):
        xloss.gram_loss(a, *xs, temperature=0.1, backend="triton")
    with pytest.raises(ValueError, match="backend"):
        xloss.gram_loss(a, *xs, temperature=0.1, backend="nope")


# ------------------------------------------------------------------------------------- labels, spellings
@pytest.mark.parametrize("n1,n2", [(5, 5), (4, 7), (7, 3)])
@pytest.mark.parametrize("stopgrad", [False, True])
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_loss_labels_match_reference(n1, n2, stopgrad, smoothing, tiles):
    """``labels``: N1 anchors against N2 samples, duplicate positives (and samples nobody's positive)."""
    a, xs = _inputs(n1, n2, 3, normalize=True, seed=n1 + n2)
    labels = torch.randint(0, n2, (n1,), generator=torch.Generator().manual_seed(n1))
    labels[-1] = labels[0]  # a duplicate, whatever the draw
    t = torch.tensor(0.3, dtype=torch.float64, requires_grad=True)
    for reduction in ("mean", "none"):
        kw = {"labels": labels, "label_smoothing": smoothing, "stopgrad_gathered": stopgrad, "reduction": reduction}
        loss = xloss.gram_loss(a, *xs, temperature=t, **kw)
        ref = R.gram_loss(a, *xs, temperature=t, **kw)
        assert loss.shape == ref.shape == ((n1,) if reduction == "none" else ())
        _close(loss, ref)
        _close(loss, xloss.gram_loss(a, *xs, temperature=t, backend="reference", **kw))
        g = torch.rand(loss.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(2)) + 0.5
        for x, y in zip(_grads(loss, [a, *xs, t], g), _grads(ref, [a, *xs, t], g)):
            _close(x, y)


def test_reference_labels_definition():
    """The reference's labels: row i against column labels[i]; column labels[i] (over all anchors) against i."""
    a, xs = _inputs(4, 6, 2, seed=7)
    labels = torch.tensor([5, 0, 5, 2])
    z = -R.gram_volume(a, *xs) / 0.5
    rows = torch.stack([torch.logsumexp(z[i], 0) - z[i, labels[i]] for i in range(4)])
    cols = torch.stack([torch.logsumexp(z[:, labels[i]], 0) - z[i, labels[i]] for i in range(4)])
    _close(R.gram_loss(a, *xs, temperature=0.5, labels=labels, label_smoothing=0.0, reduction="none"),
           (rows + cols) / 2)
    # default labels are arange(N): the same as passing them
    b, ys = _inputs(5, 5, 3, seed=8)
    _close(xloss.gram_loss(b, *ys, temperature=0.5), xloss.gram_loss(b, *ys, temperature=0.5, labels=torch.arange(5)))


def test_logit_scale_spelling():
    a, xs = _inputs(6, 6, 3, normalize=True, seed=9)
    s = torch.tensor(1 / 0.3, dtype=torch.float64, requires_grad=True)
    loss = xloss.gram_loss(a, *xs, logit_scale=s)
    ref = R.gram_loss(a, *xs, logit_scale=s)
    _close(loss, ref)
    _close(loss, xloss.gram_loss(a, *xs, temperature=0.3))
    _close(loss, xloss.gram_loss(a, *xs, logit_scale=s, backend="reference"))
    for x, y in zip(_grads(loss, [a, *xs, s]), _grads(ref, [a, *xs, s])):
        _close(x, y)
    _close(xloss.gram_loss(a, *xs, logit_scale=2.0), R.gram_loss(a, *xs, temperature=0.5))


def test_one_function_and_engine_names(monkeypatch):
    """One autograd Function for gram_volume and gram_loss (through the sweep ops); engines by _dispatch name."""
    import inspect

    import xloss.gram.chunked
    import xloss.gram.engine
    from xloss.gram import ops

    functions = [v for v in vars(gram).values()
                 if inspect.isclass(v) and issubclass(v, torch.autograd.Function) and v is not torch.autograd.Function]
    assert functions == [gram.GramFunction]
    a, xs = _inputs(4, 4, 3)
    assert xloss.gram_volume(a, *xs, backend="chunked").grad_fn.name() == "GramFunctionBackward"
    assert xloss.gram_loss(a, *xs, temperature=0.5, backend="chunked").grad_fn.name() == "GramFunctionBackward"
    # "auto": the dense definition while the [N1, N2, k, k] Gram tensor is small, the chunked sweeps beyond
    assert gram._engine("auto", a, xs) == "dense" and gram._engine("cpu", a, xs) == "chunked"
    big = torch.zeros(2048, a.shape[1], dtype=a.dtype)
    assert gram._engine("auto", big, [big] * len(xs)) == "chunked"
    assert gram._engine("reference", a, xs) == "reference"
    for name in ("gram_volume", "gram_volume_grad", "gram_loss_stats", "gram_loss_grad"):
        assert hasattr(torch.ops.xloss, name) and callable(getattr(ops, name))
    with pytest.raises(dataclasses_error()):
        gram.GramOptions().eps = 1.0  # frozen
    for old in ("cpu", "chunked"):
        _close(xloss.gram_loss(a, *xs, temperature=0.5, backend=old), R.gram_loss(a, *xs, temperature=0.5))


def dataclasses_error():
    import dataclasses

    return dataclasses.FrozenInstanceError


# ----------------------------------------------------------------------------- one body: engine × mode
@pytest.mark.parametrize("mode", engines.MODES)
@pytest.mark.parametrize("engine", engines.ENGINES)
@pytest.mark.parametrize("case", ["loss-labels", "loss-stopgrad-sum", "volume"])
def test_engine_mode_matrix(engine, mode, case):
    """Every engine, eager and compiled, against the fp64 reference: the loss (with labels, N1 != N2) or the
    pairwise volumes, and the gradients of every modality and of the scale."""
    dtype = engines.dtype_of(engine)
    a64, others64 = _inputs(5, 7, 3, seed=60, normalize=True)
    labels = torch.tensor([0, 6, 2, 2, 5], device=engines.DEVICE)

    def inputs(dt):
        leaves = [a64, *others64] + ([] if case == "volume" else [torch.tensor(2.0, dtype=torch.float64)])
        return [t.detach().to(engines.DEVICE, dt).requires_grad_() for t in leaves]

    def fn(backend):
        if case == "volume":
            return lambda a, x, y: xloss.gram_volume(a, x, y, backend=backend)
        opts = ({"labels": labels, "label_smoothing": 0.1} if case == "loss-labels"
                else {"labels": labels, "stopgrad_gathered": True, "reduction": "sum"})
        return lambda a, x, y, s: xloss.gram_loss(a, x, y, logit_scale=s, backend=backend, **opts)

    got = engines.run(fn(engine), inputs(dtype), mode)
    gold = engines.run(fn("reference"), inputs(torch.float64), "eager")
    naive = engines.run(fn("reference"), inputs(dtype), "eager")
    # Terms per entry: a Gram determinant is a sum of products of k² normalised dot products (≤ 1 each).
    mags = [float(g.abs().max()) * 16 + 16.0 for g in gold]
    engines.check_engine(engine, got, gold, naive, magnitudes=mags)
