"""Symile (SPEC.md §5): the reference and the public function vs the ``symile`` package; CPU path vs reference.

``"n"`` agrees with the package bit for bit (same random draws after ``torch.manual_seed``); ``"n_squared"``
agrees to fp64 rounding.  The streaming ``"n_squared"`` path is compared with the naive reference in fp64
(values and gradients of every modality and of a tensor logit scale), with one block and with many tiny ones.
All shapes are tiny: the machine has 2 shared cores.
"""

from __future__ import annotations

import engines
import pytest
import torch

import xloss
from xloss import reference
from xloss.symile import chunked as _cpu

try:
    from symile import Symile
except ImportError:  # pragma: no cover - .ci/run installs it
    Symile = None

needs_symile = pytest.mark.skipif(Symile is None, reason="the symile package (parity target) is not installed")


def make_reps(m, n=5, d=4, *, seed=0, dtype=torch.float64, grad=False):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, d, generator=g).to(dtype).requires_grad_(grad) for _ in range(m)]


def _grads(fn, reps, scale):
    reps = [r.detach().clone().requires_grad_() for r in reps]
    s = torch.tensor(scale, dtype=torch.float64, requires_grad=True)
    loss = fn(reps, s)
    gout = torch.tensor(1.7, dtype=loss.dtype)  # grad_output != 1
    loss.backward(gout)
    return loss.detach(), [r.grad for r in reps], s.grad


# ------------------------------------------------------------------------------------------ package parity
@needs_symile
@pytest.mark.parametrize("m", [2, 3, 4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_n_bit_for_bit_with_package(m, dtype):
    reps = make_reps(m, n=7, d=6, dtype=dtype)
    for scale in (2.5, torch.tensor(2.5, dtype=dtype)):
        torch.manual_seed(0)
        want = Symile("n")(reps, scale)
        torch.manual_seed(0)
        got = xloss.symile_loss(*reps, logit_scale=scale)
        torch.manual_seed(0)
        ref = reference.symile_loss(reps, scale)
        assert torch.equal(got, want) and torch.equal(ref, want)
    # an explicit generator draws the same as the global one seeded alike
    torch.manual_seed(3)
    want = Symile("n")(reps, 1.0)
    got = xloss.symile_loss(*reps, logit_scale=1.0, generator=torch.Generator().manual_seed(3))
    assert torch.equal(got, want)


@needs_symile
@pytest.mark.parametrize("m", [3, 4])
def test_n_squared_matches_package(m):
    reps = make_reps(m, n=5, d=4)
    want = Symile("n_squared")(reps, 3.0)
    assert torch.allclose(reference.symile_loss(reps, 3.0, "n_squared"), want, rtol=0, atol=1e-10)
    got = xloss.symile_loss(*reps, logit_scale=3.0, negative_sampling="n_squared")
    assert torch.allclose(got, want, rtol=0, atol=1e-10)
    # gradients too (the package is plain autograd)
    _, g_want, s_want = _grads(lambda r, s: Symile("n_squared")(r, s), reps, 3.0)
    _, g_got, s_got = _grads(lambda r, s: xloss.symile_loss(*r, logit_scale=s, negative_sampling="n_squared"), reps,
                             3.0)
    for a, b in zip(g_got + [s_got], g_want + [s_want]):
        assert torch.allclose(a, b, rtol=0, atol=1e-10)


# ------------------------------------------------------------------------------------------ CPU vs reference
@pytest.mark.parametrize("m", [3, 4])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("tile_mb", [None, "0.000001"])
def test_n_squared_cpu_vs_reference(m, reduction, tile_mb, monkeypatch):
    if tile_mb is not None:
        monkeypatch.setenv("XLOSS_CPU_TILE_MB", tile_mb)  # one tuple per block
    n = 6 if m == 3 else 4
    reps = make_reps(m, n=n, d=5, seed=m)

    def run(backend):
        def fn(r, s):
            out = xloss.symile_loss(*r, logit_scale=s, negative_sampling="n_squared", reduction=reduction,
                                    backend=backend)
            return out.sum() if reduction == "none" else out
        return _grads(fn, reps, 4.0)

    if reduction == "none":
        got = xloss.symile_loss(*reps, logit_scale=4.0, negative_sampling="n_squared", reduction="none")
        want = reference.symile_loss(reps, 4.0, "n_squared", reduction="none")
        assert got.shape == (n,) and torch.allclose(got, want, rtol=0, atol=1e-12)
    (lg, gg, sg), (lw, gw, sw) = run("cpu"), run("reference")
    assert torch.allclose(lg, lw, rtol=0, atol=1e-12)
    for a, b in zip(gg + [sg], gw + [sw]):
        assert torch.allclose(a, b, rtol=0, atol=1e-12)


def test_tiny_tiles_equal_one_tile(monkeypatch):
    reps = make_reps(3, n=9, d=3, seed=5)
    one = _grads(lambda r, s: xloss.symile_loss(*r, logit_scale=s, negative_sampling="n_squared"), reps, 6.0)
    monkeypatch.setenv("XLOSS_CPU_TILE_MB", "0.000001")
    assert _cpu.block_size(9, 3, 8, 9) == 1
    many = _grads(lambda r, s: xloss.symile_loss(*r, logit_scale=s, negative_sampling="n_squared"), reps, 6.0)
    assert torch.allclose(one[0], many[0], rtol=0, atol=1e-13)
    for a, b in zip(one[1] + [one[2]], many[1] + [many[2]]):
        assert torch.allclose(a, b, rtol=0, atol=1e-13)


@pytest.mark.parametrize("m", [2, 3])
def test_n_explicit_permutations_cpu_vs_reference(m):
    reps = make_reps(m, n=6, d=4, seed=1)
    perms = reference.symile.draw_permutations(m, 6, torch.Generator().manual_seed(1))
    got = _grads(lambda r, s: xloss.symile_loss(*r, logit_scale=s, permutations=perms), reps, 2.0)
    want = _grads(lambda r, s: reference.symile_loss(r, s, permutations=perms), reps, 2.0)
    torch.manual_seed(9)
    drawn = xloss.symile_loss(*reps, logit_scale=2.0)
    torch.manual_seed(9)
    assert torch.equal(drawn, xloss.symile_loss(*reps, logit_scale=2.0,
                                                permutations=reference.symile.draw_permutations(m, 6)))
    assert torch.equal(got[0], want[0])
    for a, b in zip(got[1] + [got[2]], want[1] + [want[2]]):
        assert torch.allclose(a, b, rtol=0, atol=1e-12)


def test_large_scale_is_stable():
    reps = [torch.nn.functional.normalize(r, dim=1) for r in make_reps(3, n=6, d=4, seed=2)]
    got, g, s = _grads(lambda r, s: xloss.symile_loss(*r, logit_scale=s, negative_sampling="n_squared"), reps, 500.0)
    want = reference.symile_loss(reps, 500.0, "n_squared")
    assert torch.isfinite(got) and torch.allclose(got, want, rtol=1e-12, atol=1e-9)
    assert all(torch.isfinite(x).all() for x in g + [s])


def test_fp32_and_no_grad():
    reps = make_reps(3, n=5, d=4, dtype=torch.float32)
    want = reference.symile_loss([r.double() for r in reps], 3.0, "n_squared")
    with torch.no_grad():
        got = xloss.symile_loss(*reps, logit_scale=3.0, negative_sampling="n_squared")
    assert got.dtype == torch.float32 and abs(got.double() - want).item() < 1e-5
    half = xloss.symile_loss(*[r.to(torch.bfloat16) for r in reps], logit_scale=3.0, negative_sampling="n_squared")
    assert half.dtype == torch.float32 and torch.isfinite(half)


# ------------------------------------------------------------------------------------------ bad input
def test_bad_inputs():
    r = make_reps(3)
    with pytest.raises(ValueError, match="at least 2"):
        xloss.symile_loss(*r[:1])
    with pytest.raises(ValueError, match="at least 2"):
        xloss.symile_loss(r[0])
    with pytest.raises(TypeError, match=r"modalities\[1\] must be a torch.Tensor"):
        xloss.symile_loss(r[0], "r1")
    with pytest.raises(ValueError, match="same shape"):
        xloss.symile_loss(r[0], r[1][:3])
    with pytest.raises(TypeError, match="dtype"):
        xloss.symile_loss(r[0], r[1].float())
    with pytest.raises(ValueError, match="2-D"):
        xloss.symile_loss(r[0], r[1][None])
    with pytest.raises(ValueError, match="at least 3"):
        xloss.symile_loss(*r[:2], negative_sampling="n_squared")
    with pytest.raises(ValueError, match="negative_sampling"):
        xloss.symile_loss(*r, negative_sampling="n_cubed")
    with pytest.raises(ValueError, match="reduction"):
        xloss.symile_loss(*r, reduction="max")
    with pytest.raises(TypeError, match="logit_scale"):
        xloss.symile_loss(*r, logit_scale="2")
    with pytest.raises(TypeError, match="generator"):
        xloss.symile_loss(*r, generator=3)
    perms = reference.symile.draw_permutations(3, 5)
    with pytest.raises(ValueError, match="permutations"):
        xloss.symile_loss(*r, permutations=perms[:2])
    with pytest.raises(ValueError, match="permutations"):
        xloss.symile_loss(*r, permutations=[p[:1] for p in perms])
    with pytest.raises(ValueError, match="not a permutation"):
        xloss.symile_loss(*r, permutations=[[torch.zeros(5, dtype=torch.long)] * 2] * 3)
    with pytest.raises(TypeError, match="permutations"):
        xloss.symile_loss(*r, permutations=[[p.float() for p in q] for q in perms])
    with pytest.raises(ValueError, match="only used"):
        xloss.symile_loss(*r, negative_sampling="n_squared", permutations=perms)


def test_triton_backend_refuses_float64():
    """The Triton kernels take fp32/fp16/bf16: an explicit backend="triton" with float64 is refused with a clear
    error (RuntimeError: no CUDA tensors / no interpreter; or the dtype error under TRITON_INTERPRET=1)."""
    reps = [torch.randn(4, 3, dtype=torch.float64) for _ in range(3)]
    with pytest.raises(RuntimeError, match="(?i)triton"):
        xloss.symile_loss(*reps, logit_scale=1.0, negative_sampling="n_squared", backend="triton")


# ------------------------------------------------------------------------------------- spellings, layout
def test_deprecated_list_form_still_works():
    """``symile_loss(reps, logit_scale, negative_sampling, ...)`` of earlier releases: same numbers, a warning."""
    reps = make_reps(3, n=5, d=4, seed=4)
    perms = reference.symile.draw_permutations(3, 5, torch.Generator().manual_seed(0))
    for args, kwargs in (((2.0, "n_squared"), {}), ((), {"logit_scale": 2.0, "negative_sampling": "n_squared"}),
                         ((2.0, "n", perms), {"reduction": "none"})):
        with pytest.warns(DeprecationWarning, match="one list or tuple"):
            old = xloss.symile_loss(reps, *args, **kwargs)
        new_kw = dict(zip(("logit_scale", "negative_sampling", "permutations"), args), **kwargs)
        assert torch.equal(old, xloss.symile_loss(*reps, **new_kw))
    with pytest.warns(DeprecationWarning):
        assert torch.equal(xloss.symile_loss(tuple(reps), permutations=perms),
                           xloss.symile_loss(*reps, permutations=perms))
    with pytest.warns(DeprecationWarning), pytest.raises(TypeError, match="multiple values"):
        xloss.symile_loss(reps, 2.0, logit_scale=3.0)


def test_temperature_spelling():
    reps = make_reps(3, n=5, d=4, seed=5)
    for ns in ("n_squared", "n"):
        perms = reference.symile.draw_permutations(3, 5, torch.Generator().manual_seed(1)) if ns == "n" else None
        a = xloss.symile_loss(*reps, temperature=0.25, negative_sampling=ns, permutations=perms)
        b = xloss.symile_loss(*reps, logit_scale=4.0, negative_sampling=ns, permutations=perms)
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
        t = torch.tensor(0.25, dtype=torch.float64, requires_grad=True)
        loss = xloss.symile_loss(*reps, temperature=t, negative_sampling=ns, permutations=perms)
        want = reference.symile_loss(reps, 1 / t, ns, permutations=perms)
        torch.testing.assert_close(loss, want, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(torch.autograd.grad(loss, t), torch.autograd.grad(want, t), rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError, match="either logit_scale or temperature"):
        xloss.symile_loss(*reps, logit_scale=2.0, temperature=0.5)
    with pytest.raises(ValueError, match="temperature must be positive"):
        xloss.symile_loss(*reps, temperature=0.0)


def test_one_function_and_ops():
    import inspect

    import xloss.symile.chunked
    import xloss.symile.engine
    from xloss import symile
    from xloss.symile import ops

    functions = [v for v in vars(symile).values()
                 if inspect.isclass(v) and issubclass(v, torch.autograd.Function) and v is not torch.autograd.Function]
    assert functions == [symile.SymileFunction]
    reps = make_reps(3, grad=True)
    lse = symile.SymileFunction.apply(symile.SymileOptions("chunked"), torch.tensor(2.0, dtype=torch.float64), *reps)
    assert lse.shape == (3, 5) and lse.grad_fn.name() == "SymileFunctionBackward"
    assert hasattr(torch.ops.xloss, "symile_lse") and hasattr(torch.ops.xloss, "symile_grad")
    assert callable(ops.symile_lse) and callable(ops.symile_grad)
    assert symile._engine("cpu", reps) == "chunked" and symile._engine("auto", reps) == "dense"  # 3 x 3 x 3 cells
    for backend in ("cpu", "chunked"):
        torch.testing.assert_close(xloss.symile_loss(*reps, logit_scale=2.0, negative_sampling="n_squared",
                                                     backend=backend),
                                   reference.symile_loss(reps, 2.0, "n_squared"), rtol=1e-12, atol=1e-12)


# ----------------------------------------------------------------------------- one body: engine × mode
@pytest.mark.parametrize("mode", engines.MODES)
@pytest.mark.parametrize("engine", engines.ENGINES)
@pytest.mark.parametrize("m", [3, 4])
def test_engine_mode_matrix(engine, mode, m):
    """Every engine, eager and compiled, against the fp64 reference: "n_squared" loss and the gradients of every
    modality and of the scale."""
    dtype = engines.dtype_of(engine)
    reps64 = make_reps(m, n=6, d=5, seed=61)

    def inputs(dt):
        leaves = [*reps64, torch.tensor(1.5, dtype=torch.float64)]
        return [t.detach().to(engines.DEVICE, dt).requires_grad_() for t in leaves]

    def fn(backend):
        return lambda *xs: xloss.symile_loss(*xs[:-1], logit_scale=xs[-1], negative_sampling="n_squared",
                                             backend=backend)

    got = engines.run(fn(engine), inputs(dtype), mode)
    gold = engines.run(fn("reference"), inputs(torch.float64), "eager")
    naive = engines.run(fn("reference"), inputs(dtype), "eager")
    n, z = 6, float(max(r.abs().max() for r in reps64)) ** m * 5 * 1.5  # terms: n^(m-1) logits of size |z|
    mags = [z * n ** (m - 1)] * len(gold)
    engines.check_engine(engine, got, gold, naive, magnitudes=mags)
