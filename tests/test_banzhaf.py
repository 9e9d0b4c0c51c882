"""Banzhaf interaction of HBI (SPEC.md §6): compiled op, PyTorch fallback and the reference loop port.

* On the same explicit coalitions, the compiled op and the PyTorch path agree with the reference in fp64, in
  both modes, with ragged masks and odd shapes (including T = 1 and V = 1, where a row or column holds no zero).
* With a seed, the op and the PyTorch path draw the same counter-based coalitions (``coalition_bits``).
* The reference is checked against an independent, set-based evaluation of the SPEC formula enumerating every
  coalition, and the Monte-Carlo estimate against that exact value within a statistical tolerance.
* Reproducibility (generator, ``torch.manual_seed``), ``torch.library.opcheck``, bad input (Python and the op's
  own TORCH_CHECKs), and the fallback without the extension (``XLOSS_NO_EXT=1`` in a subprocess).
Tests needing the compiled op build it through ``xloss._ext`` (cached) and skip only when no compiler works.
"""

from __future__ import annotations

import itertools
import math
import os
import subprocess
import sys

import pytest
import torch

import xloss
from xloss import banzhaf as bz
from xloss.banzhaf import chunked as bz_cpu
from xloss.reference import banzhaf as ref

MODES = ("hbi", "textbook")


@pytest.fixture(scope="module")
def op():
    if not bz.op_available():
        pytest.skip(f"the compiled ops could not be built here: {xloss._ext.error()}")
    return torch.ops.xloss.banzhaf_interaction


def make(b, t, v, *, seed=0, dtype=torch.float64, ragged=True, spread=1.0):
    g = torch.Generator().manual_seed(seed)
    sim = torch.randn(b, t, v, generator=g).to(dtype)
    p = (torch.randn(b, t, generator=g) * spread).to(dtype)
    q = (torch.randn(b, v, generator=g) * spread).to(dtype)
    if ragged:  # ragged valid lengths, as in padded batches; the last row keeps everything valid
        tl = torch.randint(1, t + 1, (b,), generator=g)
        vl = torch.randint(1, v + 1, (b,), generator=g)
        tl[-1], vl[-1] = t, v
        tm = torch.arange(t)[None] < tl[:, None]
        vm = torch.arange(v)[None] < vl[:, None]
    else:
        tm, vm = torch.ones(b, t, dtype=torch.bool), torch.ones(b, v, dtype=torch.bool)
    return sim, p, q, tm, vm


def random_coalitions(b, t, v, s, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, t, v, s, t + v, generator=g) > 0.5


# --------------------------------------------------------------------------- explicit coalitions, fp64
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("shape", [(3, 5, 4), (1, 1, 1), (2, 1, 3), (2, 4, 1), (3, 7, 5), (2, 3, 2)])
def test_op_and_fallback_match_reference(op, mode, shape):
    b, t, v = shape
    sim, p, q, tm, vm = make(b, t, v)
    c = random_coalitions(b, t, v, 3)
    expected = ref.banzhaf_interaction(sim, p, q, tm, vm, mode=mode, coalitions=c)
    got_op = op(sim, p, q, tm, vm, 3, 0, c, mode)
    got_torch = bz_cpu.banzhaf_interaction(sim, p, q, tm, vm, 3, 0, c, mode)
    got_public = xloss.banzhaf_interaction(sim, p, q, tm, vm, mode=mode, coalitions=c.to(torch.uint8))
    assert expected.abs().max() > 0
    for got in (got_op, got_torch, got_public):
        assert got.dtype == torch.float64 and got.shape == (b, t, v)
        torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    assert (got_op[~(tm[:, :, None] & vm[:, None, :])] == 0).all()


@pytest.mark.parametrize("mode", MODES)
def test_wide_weight_range_and_hbi_scale(op, mode):
    """Weights spanning hundreds (the op's per-coalition softmax path) and HBI's ×1000 similarities."""
    sim, p, q, tm, vm = make(2, 4, 3, seed=3, spread=400.0)
    sim = sim * 1000
    c = random_coalitions(2, 4, 3, 4, seed=5)
    expected = ref.banzhaf_interaction(sim, p, q, tm, vm, mode=mode, coalitions=c)
    torch.testing.assert_close(op(sim, p, q, tm, vm, 4, 0, c, mode), expected, rtol=1e-12, atol=1e-9)
    torch.testing.assert_close(bz_cpu.banzhaf_interaction(sim, p, q, tm, vm, 4, 0, c, mode), expected,
                               rtol=1e-12, atol=1e-9)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_low_precision_inputs(op, dtype):
    sim, p, q, tm, vm = make(3, 4, 3)
    c = random_coalitions(3, 4, 3, 3)
    expected = ref.banzhaf_interaction(sim.to(dtype).double(), p.to(dtype).double(), q.to(dtype).double(), tm, vm,
                                       coalitions=c)
    for path in ("auto", "torch"):
        args = (sim.to(dtype), p.to(dtype), q.to(dtype), tm, vm)
        got = (xloss.banzhaf_interaction(*args, coalitions=c) if path == "auto"
               else bz_cpu.banzhaf_interaction(*args, 3, 0, c, "hbi"))
        assert got.dtype == dtype
        tol = 1e-5 if dtype == torch.float32 else 2e-2
        torch.testing.assert_close(got.double(), expected.to(dtype).double(), rtol=tol, atol=tol)


# --------------------------------------------------------------------------------------------- seeds
@pytest.mark.parametrize("mode", MODES)
def test_seeded_paths_draw_the_same_coalitions(op, mode):
    b, t, v, s = 2, 5, 3, 3
    sim, p, q, tm, vm = make(b, t, v, seed=7)
    seed = 123456789012345
    got_op = op(sim, p, q, tm, vm, s, seed, None, mode)
    got_torch = bz_cpu.banzhaf_interaction(sim, p, q, tm, vm, s, seed, None, mode)
    expected = ref.banzhaf_interaction(sim, p, q, tm, vm, mode=mode, coalitions=bz.coalition_bits(seed, b, t, v, s))
    torch.testing.assert_close(got_op, expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got_torch, expected, rtol=1e-12, atol=1e-12)
    # the public function with a generator: op and the PyTorch path agree
    a = xloss.banzhaf_interaction(sim, p, q, tm, vm, num_samples=s, mode=mode,
                                  generator=torch.Generator().manual_seed(4))
    c = xloss.banzhaf_interaction(sim, p, q, tm, vm, num_samples=s, mode=mode, backend="chunked",
                                  generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(a, c, rtol=1e-12, atol=1e-12)


def test_counter_bits_are_balanced_and_seed_dependent():
    bits = bz.coalition_bits(5, 4, 8, 6, 50)  # 9600 samples × 14 elements
    assert abs(bits.double().mean().item() - 0.5) < 0.01
    assert abs(bits[..., 3].double().mean().item() - 0.5) < 0.03  # no element is biased
    assert not torch.equal(bits, bz.coalition_bits(6, 4, 8, 6, 50))
    assert torch.equal(bits, bz.coalition_bits(5, 4, 8, 6, 50))
    wide = bz.coalition_bits(-3, 1, 40, 30, 2)  # T + V = 70: three 32-bit words per sample
    assert abs(wide.double().mean().item() - 0.5) < 0.05


def test_reproducible_under_generator_and_manual_seed():
    sim, p, q, tm, vm = make(2, 5, 4)
    g = lambda k: torch.Generator().manual_seed(k)
    a = xloss.banzhaf_interaction(sim, p, q, tm, vm, num_samples=8, generator=g(1))
    assert torch.equal(a, xloss.banzhaf_interaction(sim, p, q, tm, vm, num_samples=8, generator=g(1)))
    assert not torch.equal(a, xloss.banzhaf_interaction(sim, p, q, tm, vm, num_samples=8, generator=g(2)))
    torch.manual_seed(11)
    x = xloss.banzhaf_interaction(sim, p, q, tm, vm, num_samples=8)
    torch.manual_seed(11)
    assert torch.equal(x, xloss.banzhaf_interaction(sim, p, q, tm, vm, num_samples=8))
    r1 = xloss.banzhaf_interaction(sim, p, q, tm, vm, num_samples=1, generator=g(1), backend="reference")
    r2 = xloss.banzhaf_interaction(sim, p, q, tm, vm, num_samples=1, generator=g(1), backend="reference")
    assert torch.equal(r1, r2)


# ------------------------------------------------------------------------ exact Banzhaf by enumeration
def _softmax(vals: dict) -> dict:
    m = max(vals.values())
    e = {k: math.exp(x - m) for k, x in vals.items()}
    z = sum(e.values())
    return {k: x / z for k, x in e.items()}


def _f(grid: dict, t_len: int, v_len: int, wt: dict, wv: dict) -> float:
    """SPEC f on an explicit grid {(t, v): value} (missing entries are the zeros of the masked grid)."""
    rows = sum(w * max(grid.get((t, v), 0.0) for v in range(v_len)) for t, w in wt.items())
    cols = sum(w * max(grid.get((t, v), 0.0) for t in range(t_len)) for v, w in wv.items())
    return 0.5 * (rows + cols)


def _value(L, p, q, st, sv):
    grid = {(t, v): L[t][v] for t in st for v in sv}
    wt = _softmax({t: p[t] for t in st}) if st else {}  # an empty coalition has an all-zero grid: f = 0
    wv = _softmax({v: q[v] for v in sv}) if sv else {}
    return _f(grid, len(L), len(L[0]), wt, wv), grid, wt, wv


def exact_banzhaf(L, p, q, mode):
    """I[i][j] by the SPEC definition, averaged over every coalition (all positions valid), with sets."""
    t_len, v_len = len(L), len(L[0])
    out = [[0.0] * v_len for _ in range(t_len)]
    for i, j in itertools.product(range(t_len), range(v_len)):
        others_t = [t for t in range(t_len) if t != i]
        others_v = [v for v in range(v_len) if v != j]
        vals = []
        for mt in itertools.product((0, 1), repeat=len(others_t)):
            for mv in itertools.product((0, 1), repeat=len(others_v)):
                st = {t for t, k in zip(others_t, mt) if k}
                sv = {v for v, k in zip(others_v, mv) if k}
                f_s, grid, wt, wv = _value(L, p, q, st, sv)
                if mode == "textbook":
                    f_ij = _value(L, p, q, st | {i}, sv | {j})[0]
                else:  # HBI: add the entry (i, j) only; re-softmax the coalition weights with the raw p_i, q_j
                    grid2 = dict(grid)
                    grid2[(i, j)] = L[i][j]
                    f_ij = _f(grid2, t_len, v_len, _softmax({**wt, i: p[i]}), _softmax({**wv, j: q[j]}))
                f_i = _value(L, p, q, st | {i}, sv)[0]
                f_j = _value(L, p, q, st, sv | {j})[0]
                vals.append(f_ij - f_i - f_j + f_s)
        out[i][j] = sum(vals) / len(vals)
    return torch.tensor(out, dtype=torch.float64)


def all_coalitions(t_len, v_len):
    """Every bit pattern of T + V elements: [1, T, V, 2^(T+V), T+V] (the bits of i and j are ignored, so each
    coalition of the others appears equally often and the mean is the exact Banzhaf interaction)."""
    e = t_len + v_len
    pats = torch.tensor(list(itertools.product((0, 1), repeat=e)), dtype=torch.bool)
    return pats[None, None, None].expand(1, t_len, v_len, 2**e, e).contiguous()


@pytest.mark.parametrize("mode", MODES)
def test_exact_enumeration_and_monte_carlo(op, mode):
    t_len, v_len = 3, 2
    sim, p, q, tm, vm = make(1, t_len, v_len, seed=9, ragged=False)
    exact = exact_banzhaf(sim[0].tolist(), p[0].tolist(), q[0].tolist(), mode)
    c = all_coalitions(t_len, v_len)
    for got in (op(sim, p, q, tm, vm, c.shape[3], 0, c, mode),
                ref.banzhaf_interaction(sim, p, q, tm, vm, mode=mode, coalitions=c)):
        torch.testing.assert_close(got[0], exact, rtol=1e-12, atol=1e-12)
    # Per-coalition values give the spread of one sample; the MC mean must be within 5 standard errors.
    per = torch.stack([op(sim, p, q, tm, vm, 1, 0, c[:, :, :, k:k + 1], mode)[0] for k in range(c.shape[3])])
    n = 20000
    mc = xloss.banzhaf_interaction(sim, p, q, tm, vm, num_samples=n, mode=mode, generator=torch.Generator().manual_seed(2))
    tol = 5 * per.std(dim=0, unbiased=False) / math.sqrt(n) + 1e-12
    assert ((mc[0] - exact).abs() <= tol).all(), (mc[0] - exact, tol)
    assert not torch.allclose(mc[0], exact, rtol=0, atol=1e-14) or per.std() == 0  # it is an estimate


# ------------------------------------------------------------------------------------- op registration
def test_opcheck(op):
    sim, p, q, tm, vm = make(2, 3, 4, dtype=torch.float32)
    c = random_coalitions(2, 3, 4, 2)
    torch.library.opcheck(op.default, (sim, p, q, tm, vm, 2, 7, None, "hbi"))
    torch.library.opcheck(op.default, (sim.double(), p.double(), q.double(), tm, vm, 2, 0, c, "textbook"))


def test_no_gradient_and_grad_inputs():
    sim, p, q, tm, vm = make(2, 3, 4)
    sim.requires_grad_()
    p.requires_grad_()
    out = xloss.banzhaf_interaction(sim, p, q, tm, vm, num_samples=3)
    assert not out.requires_grad and out.grad_fn is None
    out_ref = xloss.banzhaf_interaction(sim, p, q, tm, vm, num_samples=1, backend="reference")
    assert not out_ref.requires_grad


def test_default_masks_and_num_samples():
    sim, p, q, _, _ = make(2, 3, 4)
    full = torch.ones(2, 3, dtype=torch.bool), torch.ones(2, 4, dtype=torch.bool)
    g = lambda: torch.Generator().manual_seed(0)
    a = xloss.banzhaf_interaction(sim, p, q, generator=g())  # 100 samples, all valid
    b = xloss.banzhaf_interaction(sim, p, q, *full, num_samples=100, generator=g())
    assert torch.equal(a, b)


def test_backends():
    sim, p, q, tm, vm = make(2, 3, 4)
    c = random_coalitions(2, 3, 4, 2)
    expected = ref.banzhaf_interaction(sim, p, q, tm, vm, coalitions=c)
    backends = ["auto", "chunked", "cpu", "reference"] + (["compiled", "cuda"] if bz.op_available() else [])
    for backend in backends:  # "cpu" and "cuda" are the old names of "chunked" and "compiled"
        torch.testing.assert_close(xloss.banzhaf_interaction(sim, p, q, tm, vm, coalitions=c, backend=backend),
                                   expected, rtol=1e-12, atol=1e-12)
    with pytest.MonkeyPatch.context() as mp:  # the compiled op not built: an explicit choice of it says so
        mp.setattr(xloss._ext, "has_op", lambda name, fake=None: False)
        for backend in ("cuda", "compiled"):
            with pytest.raises(RuntimeError, match=f"backend='{backend}'"):
                xloss.banzhaf_interaction(sim, p, q, tm, vm, num_samples=2, backend=backend)
        torch.testing.assert_close(xloss.banzhaf_interaction(sim, p, q, tm, vm, coalitions=c), expected,
                                   rtol=1e-12, atol=1e-12)  # "auto" falls back to the chunked engine
    with pytest.raises(RuntimeError, match="backend='triton'"):
        xloss.banzhaf_interaction(sim, p, q, tm, vm, num_samples=2, backend="triton")
    assert isinstance(xloss.available_backends()["cuda"], bool)


def test_dispatch_routes_and_modules():
    """The engines are modules named by xloss._dispatch; no gradient, hence no autograd Function."""
    import inspect

    import xloss.banzhaf.chunked
    import xloss.banzhaf.compiled
    import xloss.banzhaf.engine
    from xloss import _dispatch

    assert _dispatch.engine("banzhaf", "chunked") is xloss.banzhaf.chunked
    assert _dispatch.engine("banzhaf", "compiled") is xloss.banzhaf.compiled
    dev = torch.device("cpu")
    assert _dispatch.resolve("banzhaf", "auto", dev, torch.float64) == ("compiled" if bz.op_available() else "chunked")
    assert _dispatch.resolve("banzhaf", "cpu", dev, torch.float64) == "chunked"
    assert not [v for v in vars(bz).values()
                if inspect.isclass(v) and issubclass(v, torch.autograd.Function)]
    assert not hasattr(bz, "_path")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU (the CUDA op cannot run on this machine)")
@pytest.mark.parametrize("mode", MODES)
def test_cuda_matches_cpu(op, mode):
    if not bz.cuda_op_available():
        pytest.skip("the compiled ops were built without CUDA")
    sim, p, q, tm, vm = make(3, 7, 5)
    c = random_coalitions(3, 7, 5, 4)
    cpu = op(sim, p, q, tm, vm, 4, 0, c, mode)
    cuda = op(sim.cuda(), p.cuda(), q.cuda(), tm.cuda(), vm.cuda(), 4, 0, c.cuda(), mode)
    torch.testing.assert_close(cuda.cpu(), cpu, rtol=1e-12, atol=1e-12)
    seeded = op(sim, p, q, tm, vm, 9, 42, None, mode)
    seeded_cuda = op(sim.cuda(), p.cuda(), q.cuda(), tm.cuda(), vm.cuda(), 9, 42, None, mode)
    torch.testing.assert_close(seeded_cuda.cpu(), seeded, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(bz_cpu.banzhaf_interaction(sim.cuda(), p.cuda(), q.cuda(), tm.cuda(), vm.cuda(), 9, 42,
                                                          None, mode).cpu(), seeded, rtol=1e-12, atol=1e-12)


# ----------------------------------------------------------------------------------------- bad input
B, T, V = 2, 3, 4


def _args():
    sim, p, q, tm, vm = make(B, T, V)
    return {"sim": sim, "text_weight": p, "video_weight": q, "text_mask": tm, "video_mask": vm}


BAD = [
    ({"sim": torch.randn(B, T)}, ValueError, "sim"),
    ({"sim": torch.ones(B, T, V, dtype=torch.long)}, TypeError, "sim"),
    ({"sim": [[1.0]]}, TypeError, "sim"),
    ({"text_weight": torch.randn(B, T + 1, dtype=torch.float64)}, ValueError, "text_weight"),
    ({"video_weight": torch.randn(B, T, dtype=torch.float64)}, ValueError, "video_weight"),
    ({"video_weight": torch.ones(B, V, dtype=torch.long)}, TypeError, "video_weight"),
    ({"text_mask": torch.ones(B, V, dtype=torch.bool)}, ValueError, "text_mask"),
    ({"video_mask": torch.ones(B + 1, V, dtype=torch.bool)}, ValueError, "video_mask"),
    ({"video_mask": torch.ones(B, V)}, TypeError, "video_mask"),
    ({"num_samples": 0}, ValueError, "num_samples"),
    ({"num_samples": 2.5}, TypeError, "num_samples"),
    ({"mode": "shapley"}, ValueError, "mode"),
    ({"backend": "gpu"}, ValueError, "backend"),
    ({"generator": 3}, TypeError, "generator"),
    ({"coalitions": torch.ones(B, T, V, 2, T + V + 1, dtype=torch.bool)}, ValueError, "coalitions"),
    ({"coalitions": torch.ones(B, T, V, 2, dtype=torch.bool)}, ValueError, "coalitions"),
    ({"coalitions": torch.ones(B, T, V, 2, T + V)}, TypeError, "coalitions"),
    ({"coalitions": torch.ones(B, T, V, 2, T + V, dtype=torch.bool), "num_samples": 3}, ValueError, "coalitions"),
]


@pytest.mark.parametrize("change,exc,name", BAD)
def test_bad_input(change, exc, name):
    kwargs = {**_args(), **change}
    with pytest.raises(exc, match=name):
        xloss.banzhaf_interaction(**kwargs)


OP_BAD = [
    (0, torch.randn(B, T), "sim must be 3-D"),
    (1, torch.randn(B, T + 1, dtype=torch.float64), "text_weight"),
    (2, torch.randn(B, V + 2, dtype=torch.float64), "video_weight"),
    (2, torch.randn(B, V, dtype=torch.float32), "dtype"),
    (3, torch.ones(B, T + 1, dtype=torch.bool), "text_mask"),
    (4, torch.ones(B, V, dtype=torch.uint8), "bool"),
    (5, 0, "num_samples"),
    (7, torch.ones(B, T, V, 2, T + V - 1, dtype=torch.bool), "coalitions"),
    (7, torch.ones(B, T, V, 3, T + V, dtype=torch.bool), "coalitions"),
    (7, torch.ones(B, T, V, 2, T + V, dtype=torch.float32), "coalitions"),
    (8, "both", "mode"),
]


@pytest.mark.parametrize("pos,value,msg", OP_BAD)
def test_op_checks(op, pos, value, msg):
    sim, p, q, tm, vm = make(B, T, V)
    args = [sim, p, q, tm, vm, 2, 0, None, "hbi"]
    args[pos] = value
    with pytest.raises(RuntimeError, match=msg):
        op(*args)


# ---------------------------------------------------------------------------------- without the extension
def test_no_extension_fallback_gives_the_same_values(op, tmp_path):
    sim, p, q, tm, vm = make(2, 5, 4, seed=4)
    path = tmp_path / "inputs.pt"
    torch.save((sim, p, q, tm, vm), path)
    code = (
        "import sys, torch, xloss\n"
        "from xloss import _ext\n"
        f"sim, p, q, tm, vm = torch.load({str(path)!r})\n"
        "outs = [xloss.banzhaf_interaction(sim, p, q, tm, vm, num_samples=6, mode=m,\n"
        "                                  generator=torch.Generator().manual_seed(3)) for m in ('hbi', 'textbook')]\n"
        "assert not _ext.available() and not hasattr(torch.ops.xloss, 'banzhaf_interaction')\n"
        f"torch.save(outs, {str(tmp_path / 'out.pt')!r})\n"
    )
    env = {**os.environ, "XLOSS_NO_EXT": "1"}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300,
                          check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    outs = torch.load(tmp_path / "out.pt")
    for mode, got in zip(MODES, outs):
        expected = xloss.banzhaf_interaction(sim, p, q, tm, vm, num_samples=6, mode=mode,
                                             generator=torch.Generator().manual_seed(3))
        torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


# ----------------------------------------------------------------------------- one body: every engine
@pytest.mark.parametrize("backend", ["compiled", "chunked", "reference"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_every_engine_matches_the_reference(backend, dtype):
    """The compiled op, the chunked PyTorch engine and the reference on the same draws (explicit coalitions and
    a seeded generator), in fp64 and fp32.  No gradient and no torch.compile here: the result is a
    distillation target (see the package docstring)."""
    if backend == "compiled" and not bz.op_available():
        pytest.skip("the compiled ops are not built here")
    sim, p, q, tm, vm = make(3, 5, 4, seed=63, dtype=dtype)
    c = random_coalitions(3, 5, 4, 6, seed=64)
    want = ref.banzhaf_interaction(sim.double(), p.double(), q.double(), tm, vm, mode="hbi", coalitions=c)
    got = xloss.banzhaf_interaction(sim, p, q, tm, vm, mode="hbi", coalitions=c, backend=backend)
    assert got.dtype == dtype
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(got.double(), want, rtol=tol, atol=tol)
    if backend != "reference":  # seeded draws: the counter hash of the fast engines (the reference loops draw
        # with torch's RNG as HBI does, so only the two fast engines share draws)
        seeded = [xloss.banzhaf_interaction(sim, p, q, tm, vm, num_samples=6, backend=b,
                                            generator=torch.Generator().manual_seed(7)) for b in (backend, "chunked")]
        torch.testing.assert_close(seeded[0].double(), seeded[1].double(), rtol=tol, atol=tol)


# ------------------------------------------------------------------- non-finite values, padding (issue 15)
def _same_nonfinite(got: torch.Tensor, want: torch.Tensor, what: str, tol: float = 1e-12) -> None:
    """NaN and ±inf exactly where the reference has them, the finite entries close."""
    assert torch.equal(got.isnan(), want.isnan()), f"{what}: NaN at {got.isnan().nonzero().tolist()}, " \
                                                   f"the reference at {want.isnan().nonzero().tolist()}"
    assert torch.equal(got.isposinf(), want.isposinf()) and torch.equal(got.isneginf(), want.isneginf()), what
    fin = want.isfinite()
    torch.testing.assert_close(got[fin], want[fin], rtol=tol, atol=tol, msg=lambda m: f"{what}: {m}")


def _nonfinite_case(seed: int):
    """Ragged fp64 inputs with NaN, +inf and -inf at valid positions (similarities and weights)."""
    sim, p, q, tm, vm = make(3, 5, 4, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    valid = tm[:, :, None] & vm[:, None, :]
    cells = valid.nonzero()[torch.randperm(int(valid.sum()), generator=g)[:3]]
    for (b, t, v), value in zip(cells.tolist(), (math.nan, math.inf, -math.inf)):
        sim[b, t, v] = value
    p[-1, 1] = math.nan  # the last row is fully valid
    return sim, p, q, tm, vm


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("backend", ["compiled", "chunked"])
def test_nan_and_inf_in_valid_entries_propagate_as_in_the_reference(backend, mode):
    """Item 2 of issue 15: the compiled op took NaN out of a max (``a > b ? a : b``) and sorted with a ``>``
    that NaN breaks, so some entries were finite where the definition gives NaN."""
    if backend == "compiled" and not bz.op_available():
        pytest.skip("the compiled ops are not built here")
    for seed in (3, 11, 29):
        sim, p, q, tm, vm = _nonfinite_case(seed)
        c = random_coalitions(3, 5, 4, 4, seed=seed)
        want = xloss.banzhaf_interaction(sim, p, q, tm, vm, mode=mode, coalitions=c, backend="reference")
        assert want.isnan().any() and want.isfinite().any()  # the case means something
        got = xloss.banzhaf_interaction(sim, p, q, tm, vm, mode=mode, coalitions=c, backend=backend)
        _same_nonfinite(got, want, f"{backend} {mode} seed {seed}")


def test_reference_follows_the_definition_not_hbis_products():
    """L̄ is sim on the coalition and exactly 0 elsewhere: a NaN outside every coalition of a pair changes
    nothing (HBI's ``sim * mask`` would make everything NaN)."""
    sim, p, q, tm, vm = make(1, 3, 3, seed=5, ragged=False)
    c = torch.zeros(1, 3, 3, 2, 6, dtype=torch.bool)  # empty coalitions: only i and j take part
    poisoned = sim.clone()
    poisoned[0, 2, 2] = math.nan
    got = ref.banzhaf_interaction(poisoned, p, q, tm, vm, coalitions=c)
    want = ref.banzhaf_interaction(sim, p, q, tm, vm, coalitions=c)
    assert got[0, 2, 2].isnan()
    keep = torch.ones(3, 3, dtype=torch.bool)
    keep[2, 2] = False
    torch.testing.assert_close(got[0][keep], want[0][keep], rtol=0, atol=0)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("backend", ["compiled", "chunked", "reference"])
def test_padding_never_influences_anything(backend, mode):
    """The padding contract: NaN, inf or garbage outside ``text_mask ⊗ video_mask`` (in sim and in the weights)
    leaves every value as it was with clean padding, and the result there is exactly 0."""
    if backend == "compiled" and not bz.op_available():
        pytest.skip("the compiled ops are not built here")
    sim, p, q, tm, vm = make(3, 5, 4, seed=17)
    c = random_coalitions(3, 5, 4, 4, seed=18)
    clean = xloss.banzhaf_interaction(sim, p, q, tm, vm, mode=mode, coalitions=c, backend=backend)
    valid = tm[:, :, None] & vm[:, None, :]
    dirty = [sim.masked_fill(~valid, math.nan), p.masked_fill(~tm, math.nan), q.masked_fill(~vm, math.inf)]
    got = xloss.banzhaf_interaction(*dirty, tm, vm, mode=mode, coalitions=c, backend=backend)
    torch.testing.assert_close(got, clean, rtol=0, atol=0)
    assert (got[~valid] == 0).all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_reference_takes_half_inputs(dtype):
    """Item 6 of issue 15: ``backend="reference"`` overflowed float16 with HBI's -9e15; it computes in fp32 and
    returns sim's dtype, as the other backends."""
    sim, p, q, tm, vm = make(2, 4, 3, seed=21)
    c = random_coalitions(2, 4, 3, 3, seed=22)
    args = (sim.to(dtype), p.to(dtype), q.to(dtype), tm, vm)
    want = xloss.banzhaf_interaction(*args, coalitions=c, backend="chunked")
    for backend in ("reference", *(("compiled",) if bz.op_available() else ())):
        got = xloss.banzhaf_interaction(*args, coalitions=c, backend=backend)
        assert got.dtype == dtype, backend
        torch.testing.assert_close(got.float(), want.float(), rtol=1e-2, atol=1e-2)
    # seeded sampling (torch.rand on the generator) runs too
    assert xloss.banzhaf_interaction(*args, num_samples=2, backend="reference",
                                     generator=torch.Generator().manual_seed(0)).dtype == dtype


@pytest.mark.parametrize("env", ["gpu", "Compiled", "fast"])
def test_unknown_backend_variable_is_refused(monkeypatch, env):
    """Item 8 of issue 15: ``XLOSS_BACKEND`` is validated by xloss._dispatch for every family, banzhaf included
    (an unknown value is a ValueError that names the variable, never ignored)."""
    monkeypatch.setenv("XLOSS_BACKEND", env)
    sim, p, q, tm, vm = make(2, 3, 4)
    with pytest.raises(ValueError, match=rf"XLOSS_BACKEND must be one of .*'{env}'"):
        xloss.banzhaf_interaction(sim, p, q, tm, vm, num_samples=2)


@pytest.mark.parametrize("env,engine", [("reference", "reference"), ("chunked", "chunked"), ("cpu", "chunked"),
                                        ("triton", None)])
def test_backend_variable_picks_the_engine_as_for_every_family(monkeypatch, env, engine):
    """``XLOSS_BACKEND`` overrides "auto" where the family has that engine; banzhaf has no Triton engine, so
    "triton" keeps auto's choice (as for a dtype Triton does not take elsewhere); an explicit backend wins."""
    from xloss import _dispatch

    monkeypatch.setenv("XLOSS_BACKEND", env)
    dev = torch.device("cpu")
    auto = "compiled" if bz.op_available() else "chunked"
    assert _dispatch.resolve("banzhaf", "auto", dev, torch.float64) == (engine or auto)
    assert _dispatch.resolve("banzhaf", "chunked", dev, torch.float64) == "chunked"
    sim, p, q, tm, vm = make(2, 3, 4)
    c = random_coalitions(2, 3, 4, 2)
    torch.testing.assert_close(xloss.banzhaf_interaction(sim, p, q, tm, vm, coalitions=c),
                               ref.banzhaf_interaction(sim, p, q, tm, vm, coalitions=c), rtol=1e-12, atol=1e-12)
