"""Sigmoid loss (SigLIP, SPEC.md §2): reference vs open_clip, CPU path vs reference, engine contract, bad input.

Tolerances (DESIGN.md "Habits"): fp64 runs agree to ~1e-10 relative; an fp32 run of the fast path must be no
further from the fp64 result than the naive fp32 reference is, plus a few fp32 roundings of the terms summed.
Half-precision inputs are checked against the fp64 reference of the same (rounded) inputs.
All shapes are small: the machine has 2 shared cores and the whole file must run in seconds.
"""

from __future__ import annotations

import importlib.util
import math
import os

import engines
import pytest
import torch
import torch.nn.functional as F
from tolerance import assert_close64

import xloss
from xloss import sigmoid as _sigmoid
from xloss.sigmoid import chunked as _cpu

SCALE, BIAS = 4.0, -2.0  # exactly representable: float arguments mean the same in fp32 and fp64
D = 16

# name -> (N, M, labels kind): None (default arange), "perm" (distinct, random), "dup" (random with repeats)
SHAPES = {
    "1x1": (1, 1, None),
    "7x7": (7, 7, None),
    "129x129": (129, 129, None),
    "7x19-extra-neg": (7, 19, None),
    "7x19-random-labels": (7, 19, "perm"),
    "19x7-fewer-keys": (19, 7, "dup"),
}


# --------------------------------------------------------------------------------------------- helpers
def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def make_inputs(n, m, d=D, labels_kind=None, *, seed=0, dtype=torch.float64):
    """L2-normalised features drawn in fp32 (casting to fp64 is exact), labels as asked."""
    g = _gen(seed)
    q = F.normalize(torch.randn(n, d, generator=g), dim=1)
    k = F.normalize(torch.randn(m, d, generator=g), dim=1)
    labels = None
    if labels_kind == "perm":
        labels = torch.randperm(m, generator=g)[:n]
    elif labels_kind == "dup":
        labels = torch.randint(0, m, (n,), generator=g)
        labels[1] = labels[0]
    return q.to(dtype), k.to(dtype), labels


def grad_output(out: torch.Tensor, seed: int = 7) -> torch.Tensor:
    """A grad_output != 1: mixed signs (and one zero for reduction='none')."""
    g = _gen(seed)
    if out.dim() == 0:
        return torch.tensor(-0.7, dtype=out.dtype)
    go = torch.randn(out.shape, generator=g)
    if out.numel() > 2:
        go[2] = 0.0
    return go.to(out.dtype)


def run(fn, q, k, *, scale=SCALE, bias=BIAS, params="tensor", backward=True, **opts):
    """fn(q, k, logit_scale=..., logit_bias=..., **opts) -> [loss, d q, d k, (d scale, d bias)]."""
    q = q.detach().clone().requires_grad_(True)
    k = k.detach().clone().requires_grad_(True)
    leaves = [q, k]
    if params == "tensor":
        acc = torch.float64 if q.dtype == torch.float64 else torch.float32
        s = torch.tensor(scale, dtype=acc, requires_grad=True)
        b = torch.tensor(bias, dtype=acc, requires_grad=True)
        leaves += [s, b]
    else:
        s, b = scale, bias
    out = fn(q, k, logit_scale=s, logit_bias=b, **opts)
    if not backward:
        return [out.detach()]
    return [out.detach(), *torch.autograd.grad(out, leaves, grad_output(out))]


def cpu_loss(q, k, **kw):
    return xloss.sigmoid_loss(q, k, backend="cpu", **kw)


def ref_loss(q, k, **kw):
    return xloss.reference.sigmoid_loss(q, k, **kw)


def load_open_clip_loss():
    spec = importlib.util.find_spec("open_clip")
    if spec is None:
        pytest.skip("open-clip-torch is not installed (pip install --no-deps open-clip-torch)")
    path = os.path.join(spec.submodule_search_locations[0], "loss.py")
    mspec = importlib.util.spec_from_file_location("open_clip_loss", path)
    module = importlib.util.module_from_spec(mspec)
    mspec.loader.exec_module(module)  # `import open_clip` would fail: it needs torchvision
    return module


def naive_block(q, k, s, b, labels):
    """fp64 per-row block sums for labels that may be -1 (no positive in the block), by autograd-able ops."""
    z = s * q @ k.T + b
    y = -torch.ones_like(z)
    rows = torch.nonzero(labels >= 0).flatten()
    y[rows, labels[rows]] = 1.0
    return -F.logsigmoid(y * z).sum(1)


# ------------------------------------------------------------------------------------ reference = spec
@pytest.mark.parametrize("n,d", [(1, 4), (8, 16), (33, 7)])
def test_reference_matches_open_clip(n, d):
    oc = load_open_clip_loss()
    g = _gen(n)
    img = F.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=1)
    txt = F.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=1)
    results = []
    for fn in (
        lambda i, t, s, b: oc.SigLipLoss()(i, t, s, b),
        lambda i, t, s, b: xloss.reference.sigmoid_loss(i, t, logit_scale=s, logit_bias=b),
        lambda i, t, s, b: xloss.sigmoid_loss(i, t, logit_scale=s, logit_bias=b, backend="cpu"),
    ):
        i = img.clone().requires_grad_(True)
        t = txt.clone().requires_grad_(True)
        log_s = torch.tensor(10.0, dtype=torch.float64).log().requires_grad_(True)  # SigLIP's init
        b = torch.tensor(-10.0, dtype=torch.float64, requires_grad=True)
        loss = fn(i, t, log_s.exp(), b)
        loss.backward()
        results.append((loss.detach(), i.grad, t.grad, log_s.grad, b.grad))
    for ours in results[1:]:
        for a, e in zip(ours, results[0]):
            assert_close64(a, e)


def test_reference_formula_by_hand():
    """``-Σ_ij log σ(y_ij z_ij) / N`` written out with Python floats, y = +1 on labels."""
    q, k, labels = make_inputs(3, 4, 5, "perm", seed=3)
    total = 0.0
    for i in range(3):
        for j in range(4):
            z = SCALE * float(q[i] @ k[j]) + BIAS
            y = 1.0 if j == int(labels[i]) else -1.0
            total += math.log1p(math.exp(-y * z))
    out = xloss.reference.sigmoid_loss(q, k, logit_scale=SCALE, logit_bias=BIAS, labels=labels)
    assert abs(float(out) - total / 3) < 1e-12


# ------------------------------------------------------------------------------ cpu path = reference
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("shape", list(SHAPES), ids=list(SHAPES))
def test_cpu_matches_reference_fp64(shape, reduction):
    n, m, kind = SHAPES[shape]
    q, k, labels = make_inputs(n, m, labels_kind=kind)
    fast = run(cpu_loss, q, k, labels=labels, reduction=reduction)
    exact = run(ref_loss, q, k, labels=labels, reduction=reduction)
    for a, e in zip(fast, exact):
        assert_close64(a, e)


@pytest.mark.parametrize("params", ["tensor", "float"])
def test_cpu_float_params_and_odd_d(params):
    q, k, labels = make_inputs(9, 13, 3, "dup", seed=5)
    fast = run(cpu_loss, q, k, labels=labels, params=params, scale=11.5, bias=-7.25)
    exact = run(ref_loss, q, k, labels=labels, params=params, scale=11.5, bias=-7.25)
    assert len(fast) == (5 if params == "tensor" else 3)
    for a, e in zip(fast, exact):
        assert_close64(a, e)


@pytest.mark.parametrize(
    "tile_mb,elem_bytes",
    [("0.00001", 1), ("0.002", 1000), ("0.002", 10**6)],  # 1-row strips; 9-row strips of 4-row sub-blocks; 1 sub-block
)
def test_cpu_tile_boundaries(monkeypatch, tile_mb, elem_bytes):
    monkeypatch.setenv("XLOSS_CPU_TILE_MB", tile_mb)
    monkeypatch.setattr(_cpu, "ELEMENTWISE_BYTES", elem_bytes)
    assert _cpu._strip_rows(37, 29, 8) < 37
    q, k, labels = make_inputs(37, 29, 7, "dup", seed=2)
    for reduction in ("mean", "none"):
        fast = run(cpu_loss, q, k, labels=labels, reduction=reduction)
        exact = run(ref_loss, q, k, labels=labels, reduction=reduction)
        for a, e in zip(fast, exact):
            assert_close64(a, e)


@pytest.mark.parametrize("n,m", [(1, 1), (5, 9)])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_gradcheck(n, m, reduction):
    q, k, _ = make_inputs(n, m, 3, seed=n + m)
    labels = torch.randint(0, m, (n,), generator=_gen(1))
    q.requires_grad_(True)
    k.requires_grad_(True)
    s = torch.tensor(2.5, dtype=torch.float64, requires_grad=True)
    b = torch.tensor(-1.5, dtype=torch.float64, requires_grad=True)

    def fn(q, k, s, b):
        return xloss.sigmoid_loss(q, k, logit_scale=s, logit_bias=b, labels=labels, reduction=reduction,
                                  backend="cpu")

    assert torch.autograd.gradcheck(fn, (q, k, s, b))


def test_extreme_logits_fp64():
    """|z| up to ~100 both ways: softplus's threshold and the positive's own term stay exact in fp64."""
    q, k, labels = make_inputs(6, 8, 4, "perm", seed=9)
    for scale, bias in ((60.0, 40.0), (60.0, -40.0), (100.0, 0.0)):
        fast = run(cpu_loss, q, k, labels=labels, scale=scale, bias=bias, reduction="none")
        exact = run(ref_loss, q, k, labels=labels, scale=scale, bias=bias, reduction="none")
        for a, e in zip(fast, exact):
            assert torch.isfinite(a).all()
            assert_close64(a, e)


@pytest.mark.parametrize("z", [21.0, 35.0, -30.0])
def test_single_terms_exact_fp64(z):
    """One query, two keys with the same logit z: the positive's -log σ(z) and the negative's -log σ(-z) to
    full fp64 precision (a softplus that returns z above 20, or 1 - σ formed by subtraction, would not)."""
    q = torch.ones(1, 1, dtype=torch.float64)
    k = torch.ones(2, 1, dtype=torch.float64)
    out = run(cpu_loss, q, k, scale=1.0, bias=z - 1.0, labels=torch.tensor([0]), reduction="sum")

    def softplus(x):
        return max(x, 0.0) + math.log1p(math.exp(-abs(x)))

    def sigmoid(x):
        return 1.0 / (1.0 + math.exp(-x)) if x >= 0 else math.exp(x) / (1.0 + math.exp(x))

    loss = softplus(-z) + softplus(z)  # positive -log σ(z), negative -log σ(-z)
    assert abs(float(out[0]) - loss) <= 1e-15 * loss
    db = -0.7 * (-sigmoid(-z) + sigmoid(z))  # grad_output · (dℓ/dz of the positive + of the negative)
    assert abs(float(out[4]) - db) <= 1e-15


# ------------------------------------------------------------------------------------- fp32 and half
def _no_worse(fast, naive, exact, magnitude, what, ulps=8.0):
    err_fast = float((fast.double() - exact).abs().max())
    err_naive = float((naive.double() - exact).abs().max())
    slack = ulps * torch.finfo(torch.float32).eps * max(float(exact.abs().max()), magnitude)
    assert err_fast <= err_naive + slack, f"{what}: {err_fast:.3e} > naive {err_naive:.3e} + {slack:.3e}"


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_fp32_no_worse_than_naive(reduction):
    """SigLIP's init (s = 10, b = -10) and a hard setting (s = 30, b = 0) at N = 64, D = 32."""
    q, k, labels = make_inputs(64, 80, 32, "perm", seed=4, dtype=torch.float32)
    for scale, bias in ((10.0, -10.0), (30.0, 0.0)):
        fast = run(cpu_loss, q, k, labels=labels, scale=scale, bias=bias, reduction=reduction)
        naive = run(ref_loss, q, k, labels=labels, scale=scale, bias=bias, reduction=reduction)
        exact = run(ref_loss, q.double(), k.double(), labels=labels, scale=scale, bias=bias, reduction=reduction)
        assert all(f.dtype == torch.float32 for f in fast)
        n = q.shape[0]
        go = float(grad_output(exact[0]).abs().max()) / (n if reduction == "mean" else 1)
        loss_terms = (scale + abs(bias)) * (q.shape[0] if reduction != "none" else 1) * 80 / n
        mags = [loss_terms, scale * go, scale * go * (n if reduction != "none" else 1), go * n * 80, go * n * 80]
        for what, f, r, e, mag in zip(("loss", "dq", "dk", "ds", "db"), fast, naive, exact, mags):
            _no_worse(f, r, e, mag, what)


@pytest.mark.parametrize("bias", [-20.0, -40.0])
def test_fp32_well_separated_pairs_keep_their_tiny_terms(bias):
    """One-hot features: positives at z = 30 + b, negatives at z = b, terms ~1e-9..1e-17 (or one large
    positive term): the fp32 per-row sums and gradients stay within fp32 rounding of the fp64 values."""
    q = torch.eye(16)[:7]
    k = torch.eye(16)[:9]
    fast = run(cpu_loss, q, k, scale=30.0, bias=bias, reduction="none")
    naive = run(ref_loss, q, k, scale=30.0, bias=bias, reduction="none")
    exact = run(ref_loss, q.double(), k.double(), scale=30.0, bias=bias, reduction="none")
    assert float(((fast[0].double() - exact[0]).abs() / exact[0]).max()) < 1e-6
    for a, e in zip(fast[1:3], exact[1:3]):  # dq, dk: one term per entry (one-hot features)
        assert float((a.double() - e).abs().max()) <= 1e-6 * float(e.abs().max())
    # ds, db sum terms of both signs (grad_output has mixed signs): the largest term is max|g|·max|dℓ/dz|.
    d_max = max(1 / (1 + math.exp(30.0 + bias)), 1 / (1 + math.exp(-bias)))
    term = float(grad_output(exact[0]).abs().max()) * d_max
    for what, a, r, e in zip(("ds", "db"), fast[3:], naive[3:], exact[3:]):
        _no_worse(a, r, e, term, what)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs_computed_in_fp32(dtype):
    q, k, labels = make_inputs(20, 24, 16, "dup", seed=8, dtype=dtype)
    fast = run(cpu_loss, q, k, labels=labels, scale=10.0, bias=-10.0)
    exact = run(ref_loss, q.double(), k.double(), labels=labels, scale=10.0, bias=-10.0)
    assert fast[0].dtype == torch.float32
    assert fast[1].dtype == dtype and fast[3].dtype == torch.float32
    for a, e in zip(fast, exact):
        torch.testing.assert_close(a.double(), e, rtol=1e-2, atol=1e-2 * max(1e-3, float(e.abs().max())))


# ---------------------------------------------------------------------------------- autograd details
def test_no_grad_forward_skips_gradient_gemms(monkeypatch):
    calls = []
    real = _cpu.forward_backward

    def spy(*args, **kwargs):
        calls.append(args[5])
        return real(*args, **kwargs)

    monkeypatch.setattr(_cpu, "forward_backward", spy)
    q, k, labels = make_inputs(7, 9, labels_kind="perm")
    q.requires_grad_(True)
    expected = ref_loss(q.detach(), k, logit_scale=SCALE, logit_bias=BIAS, labels=labels)
    with torch.no_grad():
        out = cpu_loss(q, k, logit_scale=SCALE, logit_bias=BIAS, labels=labels)
    assert not out.requires_grad and calls == [False]
    assert_close64(out, expected)
    out = cpu_loss(q.detach(), k, logit_scale=SCALE, logit_bias=BIAS, labels=labels, reduction="none")  # no leaf
    assert not out.requires_grad and calls == [False, False]
    out = cpu_loss(q, k, logit_scale=SCALE, logit_bias=BIAS, labels=labels)
    assert out.requires_grad and calls == [False, False, True]


def test_grad_only_for_some_inputs_and_double_backward_call():
    """Only the key and the bias require grad; backward twice with retain_graph accumulates."""
    q, k, labels = make_inputs(7, 9, labels_kind="perm")
    k = k.clone().requires_grad_(True)
    b = torch.tensor(BIAS, dtype=torch.float64, requires_grad=True)
    out = cpu_loss(q, k, logit_scale=SCALE, logit_bias=b, labels=labels, reduction="sum")
    out.backward(retain_graph=True)
    g1 = (k.grad.clone(), b.grad.clone())
    out.backward()
    kr = k.detach().clone().requires_grad_(True)
    br = b.detach().clone().requires_grad_(True)
    ref_loss(q, kr, logit_scale=SCALE, logit_bias=br, labels=labels, reduction="sum").backward()
    assert_close64(g1[0], kr.grad)
    assert_close64(g1[1], br.grad)
    assert_close64(k.grad, 2 * kr.grad)


def test_group_none_or_uninitialised_is_single_process():
    q, k, _ = make_inputs(5, 5)
    expected = ref_loss(q, k, logit_scale=SCALE, logit_bias=BIAS)
    assert not (torch.distributed.is_available() and torch.distributed.is_initialized())
    for group in (None, object()):  # a group with torch.distributed not initialised: one process
        out = cpu_loss(q, k, logit_scale=SCALE, logit_bias=BIAS, group=group, exchange="ring")
        assert_close64(out, expected)


def test_backend_reference_and_auto():
    q, k, labels = make_inputs(6, 10, labels_kind="perm")
    expected = ref_loss(q, k, logit_scale=SCALE, logit_bias=BIAS, labels=labels)
    for backend in ("reference", "auto", "cpu"):
        out = xloss.sigmoid_loss(q, k, logit_scale=SCALE, logit_bias=BIAS, labels=labels, backend=backend)
        assert_close64(out, expected)


# ------------------------------------------------------------------------------------ engine contract
@pytest.mark.parametrize("tile_mb", [None, "0.0005"])
def test_engine_contract_with_rows_without_positive(monkeypatch, tile_mb):
    """labels = -1: every pair of that row is a negative.  Loss sum, per-row sums and gradients of the sum
    (unscaled: no 1/N), weighted rows, need_grad=False."""
    if tile_mb:
        monkeypatch.setenv("XLOSS_CPU_TILE_MB", tile_mb)
        monkeypatch.setattr(_cpu, "ELEMENTWISE_BYTES", 100)  # 2-row sub-blocks in 10-row strips
    q, k, _ = make_inputs(11, 6, 5, seed=6)
    labels = torch.tensor([0, -1, 5, 3, -1, 2, 2, -1, 1, 4, -1])
    s = torch.tensor(7.0, dtype=torch.float64)
    b = torch.tensor(-3.0, dtype=torch.float64)
    w = torch.randn(11, generator=_gen(3), dtype=torch.float64)
    leaves = [t.clone().requires_grad_(True) for t in (q, k, s, b)]
    rows = naive_block(*leaves, labels)
    exp_grads = torch.autograd.grad(rows.sum(), leaves, retain_graph=True)
    exp_wgrads = torch.autograd.grad((rows * w).sum(), leaves)

    loss, dq, dk, ds, db = _cpu.forward_backward(q, k, s, b, labels, True)
    assert loss.dim() == 0 and ds.dim() == 0 and db.dim() == 0
    assert_close64(loss, rows.detach().sum())
    for a, e in zip((dq, dk, ds, db), exp_grads):
        assert_close64(a, e)
    out = _cpu.forward_backward(q, k, s, b, labels, True, row_weight=w, per_row=True)
    assert_close64(out[0], rows.detach())
    for a, e in zip(out[1:], exp_wgrads):
        assert_close64(a, e)
    loss2, *grads = _cpu.forward_backward(q, k, s, b, labels, False)
    assert grads == [None, None, None, None]
    assert_close64(loss2, loss)


def test_engine_half_inputs_accumulate_in_fp32():
    q, k, _ = make_inputs(4, 5, 8, dtype=torch.float16)
    out = _cpu.forward_backward(q, k, torch.tensor(3.0), torch.tensor(-1.0), torch.arange(4), True)
    assert all(t.dtype == torch.float32 for t in out)
    assert out[1].shape == (4, 8) and out[2].shape == (5, 8)


# ---------------------------------------------------------------------------------------- bad input
def _call(q=None, k=None, **kw):
    q = make_inputs(4, 5)[0] if q is None else q
    k = make_inputs(4, 5)[1] if k is None else k
    kw.setdefault("logit_scale", SCALE)
    kw.setdefault("logit_bias", BIAS)
    return xloss.sigmoid_loss(q, k, **kw)


@pytest.mark.parametrize(
    "kwargs,exc,match",
    [
        ({"k": torch.randn(5, 3, dtype=torch.float64)}, ValueError, r"feature dimension.*\(4, 16\).*\(5, 3\)"),
        ({"q": torch.randn(4, 16, 1, dtype=torch.float64)}, ValueError, r"query must be 2-D.*\(4, 16, 1\)"),
        ({"k": torch.randn(5, 16, dtype=torch.float32)}, TypeError, r"same dtype"),
        ({"q": torch.ones(4, 16, dtype=torch.long)}, TypeError, r"query must be a floating-point"),
        ({"q": torch.empty(0, 16, dtype=torch.float64)}, ValueError, r"query must not be empty"),
        ({"q": torch.randn(6, 16, dtype=torch.float64)}, ValueError, r"more rows than key \(6 > 5\)"),
        ({"labels": torch.tensor([0, 1, 2])}, ValueError, r"labels must have shape \(4,\)"),
        ({"labels": torch.tensor([0, 1, 2, 5])}, ValueError, r"labels must lie in \[0, 5\)"),
        ({"labels": torch.tensor([0, -1, 2, 3])}, ValueError, r"labels must lie in"),
        ({"labels": torch.tensor([0.0, 1.0, 2.0, 3.0])}, TypeError, r"labels must have an integer dtype"),
        ({"labels": [0, 1, 2, 3]}, TypeError, r"labels must be a torch.Tensor"),
        ({"reduction": "avg"}, ValueError, r"reduction must be one of"),
        ({"backend": "fast"}, ValueError, r"backend must be one of"),
        ({"backend": "cuda"}, RuntimeError, r"backend='cuda'"),
        ({"logit_scale": "10"}, TypeError, r"logit_scale must be a float"),
        ({"logit_scale": None}, TypeError, r"logit_scale must be a float"),
        ({"logit_bias": torch.ones(2)}, ValueError, r"logit_bias must be a scalar"),
        ({"logit_bias": torch.tensor(1)}, TypeError, r"logit_bias must be a float or a floating-point tensor"),
    ],
)
def test_bad_input(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        _call(**kwargs)


def test_scale_and_bias_are_required():
    q, k, _ = make_inputs(2, 2)
    with pytest.raises(TypeError, match="logit_bias"):
        xloss.sigmoid_loss(q, k, logit_scale=1.0)
    with pytest.raises(TypeError, match="logit_scale"):
        xloss.sigmoid_loss(q, k, logit_bias=1.0)


def test_public_function_is_exported():
    assert "sigmoid_loss" in xloss.__all__ and xloss.sigmoid_loss is _sigmoid.sigmoid_loss
    assert "sigmoid_loss" in xloss.reference.__all__


def test_sweep_op_opcheck():
    """The engine sweep as a custom op (what SigmoidLossFunction calls in eager mode and under compile)."""
    from xloss.sigmoid import ops

    f64 = torch.float64
    q, k = torch.randn(3, 4, dtype=f64), torch.randn(5, 4, dtype=f64)
    s, b, labels = torch.tensor(2.0, dtype=f64), torch.tensor(-1.0, dtype=f64), torch.tensor([0, 4, -1])
    for need_grad, weight, per_row in ((True, None, False), (False, None, True), (True, torch.rand(3, dtype=f64),
                                                                                   False)):
        torch.library.opcheck(ops.sigmoid_sweep, (q, k, s, b, labels, need_grad, weight, per_row, "chunked"))


def test_temperature_is_the_inverse_scale():
    q, k = make_inputs(4, 5)[:2]
    t = torch.tensor(0.25, dtype=q.dtype, requires_grad=True)
    a = xloss.sigmoid_loss(q, k, temperature=t, logit_bias=BIAS)
    b = xloss.sigmoid_loss(q, k, logit_scale=4.0, logit_bias=BIAS)
    torch.testing.assert_close(a, b)
    a.backward()
    assert t.grad is not None and torch.isfinite(t.grad)
    with pytest.raises(ValueError, match="either logit_scale or temperature"):
        xloss.sigmoid_loss(q, k, logit_scale=4.0, temperature=0.25, logit_bias=BIAS)


# ----------------------------------------------------------------------------- one body: engine × mode
@pytest.mark.parametrize("mode", engines.MODES)
@pytest.mark.parametrize("engine", engines.ENGINES)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_engine_mode_matrix(engine, mode, reduction):
    """Every engine, eager and compiled, against the fp64 reference: value, d query, d key, d scale, d bias."""
    dtype = engines.dtype_of(engine)
    q64, k64, labels = make_inputs(7, 9, labels_kind="dup", seed=41)
    labels = labels.to(engines.DEVICE)

    def inputs(dt):
        leaves = (q64, k64, torch.tensor(SCALE, dtype=torch.float64), torch.tensor(BIAS, dtype=torch.float64))
        return [t.detach().to(engines.DEVICE, dt).requires_grad_() for t in leaves]

    def loss(backend):
        return lambda q, k, s, b: xloss.sigmoid_loss(q, k, logit_scale=s, logit_bias=b, labels=labels,
                                                      reduction=reduction, backend=backend)

    got = engines.run(loss(engine), inputs(dtype), mode)
    gold = engines.run(loss("reference"), inputs(torch.float64), "eager")
    naive = engines.run(loss("reference"), inputs(dtype), "eager")
    # Terms per entry: |z| per logit (M of them per row loss), s·|k|, s·|q| per gradient entry, Σ|q||k| for ds.
    z = float((SCALE * q64 @ k64.T).abs().max()) + abs(BIAS)
    qn, kn = float(q64.norm(dim=1).max()), float(k64.norm(dim=1).max())
    mags = [z * 9 * 7, SCALE * kn * 9, SCALE * qn * 7, qn * kn * 63, 63.0]
    engines.check_engine(engine, got, gold, naive, ["loss", "d query", "d key", "d scale", "d bias"], mags)
