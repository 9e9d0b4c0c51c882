"""Triton kernel of the sigmoid loss (xloss/sigmoid/triton.py): engine vs fp64 formulas, then the public function.

On machines without a GPU the kernel runs in Triton's interpreter (``TRITON_INTERPRET=1``, set below before
Triton is imported); there fp32 and fp16 are right but bf16 is not, so bf16 is tested on a GPU only (run this
file with ``TRITON_INTERPRET=0`` on a CUDA machine to test the compiled kernel on CUDA tensors).  Shapes are
small because the interpreter is slow; its tiles (32) make them cover several row and column blocks, the D
loop (D > 32), the column split with its atomics, and the deterministic two-launch mode.

Tolerances: fp32 against fp64 at ~1e-5 relative; fp16 inputs against fp64 on the same (upcast) inputs, with
the slack of one fp16 rounding of dZ in the gradient dots.
"""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch

if importlib.util.find_spec("triton") is None:
    pytest.skip("Triton is not installed: the triton backend of sigmoid_loss cannot be tested", allow_module_level=True)

import torch.nn.functional as F

import xloss
from xloss.sigmoid import triton as tri

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")  # set by tests/conftest.py
DEVICE = "cpu" if INTERPRET else "cuda"

# (N, M, D): N != M, D below / at / across the interpreter tile (SINGLE_D up to 32, chunks of 32 beyond),
# 1-row / 1-column edges.
SHAPES = [(1, 1, 1), (7, 40, 7), (40, 7, 40), (33, 70, 20)]
TOL = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}


def _inputs(n, m, d, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = F.normalize(torch.randn(n, d, generator=g), dim=1).to(dtype)
    k = F.normalize(torch.randn(m, d, generator=g), dim=1).to(dtype)
    labels = torch.randint(-1, m, (n,), generator=g)  # -1: no positive in this key block
    w = torch.randn(n, generator=g) / n  # mixed signs, ~1/N: small enough to underflow fp16 unless rescaled
    return q.to(DEVICE), k.to(DEVICE), labels.to(DEVICE), w.to(DEVICE)


def _expected(q, k, s, b, labels, w):
    """fp64 per-row sums and the gradients of Σ_i w_i ℓ_i (w = 1 when None), by autograd on the naive form."""
    leaves = [t.detach().cpu().double().requires_grad_(True) for t in (q, k, torch.tensor(s), torch.tensor(b))]
    qd, kd, sd, bd = leaves
    z = sd * qd @ kd.T + bd
    y = -torch.ones_like(z)
    lab = labels.cpu()
    rows = torch.nonzero(lab >= 0).flatten()
    y[rows, lab[rows]] = 1.0
    terms = -F.logsigmoid(y * z).sum(1)
    weight = torch.ones_like(terms) if w is None else w.cpu().double()
    grads = torch.autograd.grad((terms * weight).sum(), leaves)
    return terms.detach(), grads


def _check(actual, expected, tol, what):
    actual = actual.detach().cpu().double()
    assert actual.shape == expected.shape, what
    assert torch.isfinite(actual).all(), what
    scale = max(1e-3, float(expected.abs().max()))
    err = float((actual - expected).abs().max())
    assert err <= tol * scale, f"{what}: max error {err:.3e} > {tol:.1e} × {scale:.3e}"


def _deterministic_env(monkeypatch, deterministic):
    monkeypatch.setenv("XLOSS_DETERMINISTIC", "1" if deterministic else "0")


@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic", "deterministic"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("shape", SHAPES, ids=[f"{n}x{m}x{d}" for n, m, d in SHAPES])
def test_engine_matches_fp64(monkeypatch, shape, dtype, deterministic):
    _deterministic_env(monkeypatch, deterministic)
    q, k, labels, w = _inputs(*shape, dtype)
    s, b = 10.0, -5.0
    tol = TOL[dtype]
    terms, grads = _expected(q, k, s, b, labels, None)
    st, bt = torch.tensor(s, device=DEVICE), torch.tensor(b, device=DEVICE)
    loss, *got = tri.forward_backward(q, k, st, bt, labels, True)
    assert loss.dim() == 0 and loss.dtype == torch.float32
    _check(loss, terms.sum(), tol, "loss")
    for name, a, e in zip(("dq", "dk", "ds", "db"), got, grads):
        assert a.dtype == torch.float32
        _check(a, e, tol, name)
    # Weighted rows (reduction="none" backward) and per-row sums.
    terms_w, grads_w = _expected(q, k, s, b, labels, w)
    rows, *got = tri.forward_backward(q, k, st, bt, labels, True, row_weight=w, per_row=True)
    _check(rows, terms_w, tol, "rows")
    for name, a, e in zip(("dq", "dk", "ds", "db"), got, grads_w):
        _check(a, e, tol, f"weighted {name}")


@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic", "deterministic"])
def test_engine_without_grad(monkeypatch, deterministic):
    _deterministic_env(monkeypatch, deterministic)
    q, k, labels, _ = _inputs(40, 70, 20, torch.float32, seed=2)
    terms, _ = _expected(q, k, 3.0, 1.0, labels, None)
    out = tri.forward_backward(q, k, torch.tensor(3.0), torch.tensor(1.0), labels, False, per_row=True)
    assert out[1:] == (None, None, None, None)
    _check(out[0], terms, 2e-5, "rows")


def test_engine_row_strided_inputs():
    """Views with a row stride larger than D (a slice of wider features) are read in place."""
    q, k, labels, _ = _inputs(33, 40, 20, torch.float32, seed=6)
    qv = torch.cat([q, torch.randn_like(q)], 1)[:, :20]
    kv = torch.cat([k, torch.randn_like(k)], 1)[:, :20]
    assert qv.stride(0) == 40 and not qv.is_contiguous()
    terms, grads = _expected(q, k, 10.0, -5.0, labels, None)
    rows, *got = tri.forward_backward(qv, kv, torch.tensor(10.0), torch.tensor(-5.0), labels, True, per_row=True)
    _check(rows, terms, 2e-5, "rows")
    for name, a, e in zip(("dq", "dk", "ds", "db"), got, grads):
        _check(a, e, 2e-5, name)


def test_deterministic_mode_is_bitwise_repeatable(monkeypatch):
    _deterministic_env(monkeypatch, True)
    q, k, labels, _ = _inputs(40, 45, 40, torch.float32, seed=3)
    st, bt = torch.tensor(10.0), torch.tensor(-10.0)
    first = tri.forward_backward(q, k, st, bt, labels, True)
    second = tri.forward_backward(q, k, st, bt, labels, True)
    for a, e in zip(first, second):
        assert torch.equal(a, e)


def test_extreme_logits_stay_accurate():
    """s = 100 on unit vectors (|z| up to ~100): the loss of well-separated pairs (~e^-|z|) is not lost."""
    q, k, labels, _ = _inputs(7, 40, 7, torch.float32, seed=4)
    for b in (-10.0, 0.0, 10.0):
        terms, grads = _expected(q, k, 100.0, b, labels, None)
        rows, dq, dk, ds, db = tri.forward_backward(q, k, torch.tensor(100.0), torch.tensor(b), labels, True,
                                                    per_row=True)
        # relative per row: includes rows whose loss is tiny
        rel = float(((rows.double() - terms).abs() / terms.abs().clamp_min(1e-30)).max())
        assert rel < 1e-4, rel
        for name, a, e in zip(("dq", "dk", "ds", "db"), (dq, dk, ds, db), grads):
            _check(a, e, 1e-4, name)


@pytest.mark.parametrize("bias", [-20.0, -40.0])
def test_well_separated_pairs_keep_their_tiny_terms(bias):
    """One-hot features: positives at z = 30 + b, negatives at z = b, all terms ~1e-9..1e-17.  A ``log(1 + e)``
    in fp32 would return 0 for them (and lose all precision below ~1e-4): the per-row sums must stay exact."""
    n, m, d = 7, 9, 16
    q = torch.eye(d)[:n].to(DEVICE)
    k = torch.eye(d)[:m].to(DEVICE)
    labels = torch.arange(n, device=DEVICE)
    terms, grads = _expected(q, k, 30.0, bias, labels, None)
    rows, *got = tri.forward_backward(q, k, torch.tensor(30.0), torch.tensor(bias), labels, True, per_row=True)
    rel = float(((rows.cpu().double() - terms).abs() / terms).max())
    assert rel < 1e-5, rel
    for name, a, e in zip(("dq", "dk", "ds", "db"), got, grads):
        err = float(((a.cpu().double() - e).abs()).max())
        assert err <= 1e-5 * float(e.abs().max()), name


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_public_function_triton_backend(reduction):
    q, k, _, _ = _inputs(33, 40, 20, torch.float32, seed=5)
    labels = torch.randint(0, 40, (33,), generator=torch.Generator().manual_seed(1)).to(DEVICE)
    results = []
    for backend, dtype in (("triton", torch.float32), ("reference", torch.float64)):
        qq = q.to(dtype).requires_grad_(True)
        kk = k.to(dtype).requires_grad_(True)
        s = torch.tensor(10.0, dtype=dtype, device=DEVICE, requires_grad=True)
        b = torch.tensor(-10.0, dtype=dtype, device=DEVICE, requires_grad=True)
        out = xloss.sigmoid_loss(qq, kk, logit_scale=s, logit_bias=b, labels=labels, reduction=reduction,
                                 backend=backend)
        go = torch.linspace(-1, 2, out.numel(), dtype=dtype, device=DEVICE).reshape(out.shape)
        results.append((out, *torch.autograd.grad(out, (qq, kk, s, b), go)))
    for name, a, e in zip(("loss", "dq", "dk", "ds", "db"), *results):
        _check(a, e.detach().cpu(), 2e-5, name)
    assert results[0][1].dtype == torch.float32


def test_float64_raises():
    q, k, labels, _ = _inputs(4, 4, 4, torch.float64)
    with pytest.raises(TypeError, match="float64"):
        tri.forward_backward(q, k, torch.tensor(1.0), torch.tensor(0.0), labels, True)
    with pytest.raises(TypeError, match=r"use backend='chunked' \(or 'auto'\) for float64"):
        xloss.sigmoid_loss(q, k, logit_scale=1.0, logit_bias=0.0, backend="triton")


@pytest.mark.skipif(INTERPRET, reason="bf16 is wrong in Triton's interpreter: tested on a GPU only")
def test_bfloat16_on_gpu():
    q, k, labels, _ = _inputs(129, 70, 40, torch.bfloat16)
    terms, grads = _expected(q, k, 10.0, -10.0, labels, None)
    loss, *got = tri.forward_backward(q, k, torch.tensor(10.0, device=DEVICE), torch.tensor(-10.0, device=DEVICE),
                                      labels, True)
    _check(loss, terms.sum(), TOL[torch.bfloat16], "loss")
    for name, a, e in zip(("dq", "dk", "ds", "db"), got, grads):
        _check(a, e, TOL[torch.bfloat16], name)
