"""Triton kernels of InfoNCE (xloss/info_nce/triton.py): raw launchers vs fp64 formulas, then the public function.

On machines without a GPU the kernels run in Triton's interpreter (``TRITON_INTERPRET=1``, set below before
Triton is imported); there fp32 and fp16 are right but bf16 is not, so bf16 is tested on a GPU only (run
this file with ``TRITON_INTERPRET=0`` on a CUDA machine to test the compiled kernels on CUDA tensors).
Shapes are small (1, 7, 129, D not a multiple of the tile) because the interpreter is slow; the interpreter
tile sizes (32) make them cover several row/column blocks, the D loop, the column split and its atomics.

Tolerances: fp32 against fp64 at ~1e-5 relative; fp16 inputs against fp64 on the same (upcast) inputs, with
the slack of one fp16 rounding of P in the gradient dots.
"""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch

if importlib.util.find_spec("triton") is None:
    pytest.skip("Triton is not installed: the triton backend of info_nce cannot be tested", allow_module_level=True)

import xloss
from xloss.infonce import triton as tri

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")  # set by tests/conftest.py
DEVICE = "cpu" if INTERPRET else "cuda"
SCALE = 4.0

# (N, M, D): N != M, D below, at, and across the tile (interpreter BLOCK_D = 32), 1-row / 1-column edges.
SHAPES = [(1, 1, 1), (7, 129, 7), (129, 7, 129), (40, 70, 40)]


def _inputs(n, m, d, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.nn.functional.normalize(torch.randn(n, d, generator=g), dim=1).to(dtype)
    k = torch.nn.functional.normalize(torch.randn(m, d, generator=g), dim=1).to(dtype)
    a = torch.randn(n, generator=g) / n  # mixed signs
    w = torch.randn(m, generator=g) / n
    return q.to(DEVICE), k.to(DEVICE), a.to(DEVICE), w.to(DEVICE)


def _ref_stats(q, k, scale):
    """fp64 split statistics ``[2, N]``, ``[2, M]``: (max, log Σ exp(z - max)) over each row / column."""
    z = scale * q.double() @ k.double().T
    out = []
    for dim in (1, 0):
        mx = z.amax(dim)
        out.append(torch.stack((mx, torch.logsumexp(z - mx.unsqueeze(dim), dim))))
    return out[0], out[1]


def _ref_lse(q, k, scale):
    z = scale * q.double() @ k.double().T
    return torch.logsumexp(z, 1), torch.logsumexp(z, 0)


def _ref_grad(q, k, scale, a, w):
    qd, kd = q.double(), k.double()
    z = scale * qd @ kd.T
    p = a.double()[:, None] * torch.softmax(z, 1)
    if w is not None:
        p = p + w.double()[None, :] * torch.softmax(z, 0)
    return p @ kd, p.T @ qd


def _close(got, want, dtype, what):
    assert got.dtype == torch.float32, what
    assert torch.isfinite(got).all(), what
    got, want = got.double().cpu(), want.cpu()
    mag = want.abs().max().item() if want.numel() else 0.0
    if dtype == torch.float32:
        tol = 2e-5 * max(1.0, mag)
    else:  # half: P is rounded to fp16/bf16 once before the gradient dots
        tol = (4e-3 if dtype == torch.float16 else 2e-2) * max(1e-3, mag)
    err = (got - want).abs().max().item()
    assert err <= tol, f"{what}: max error {err:.3g} > {tol:.3g} (max |want| {mag:.3g})"


def _labels(n, m, seed=0):
    """Random positives ``[N]`` (int64, on DEVICE) in [0, M)."""
    return torch.randint(0, m, (n,), generator=torch.Generator().manual_seed(100 + seed)).to(DEVICE)


def _check_zpos(z_pos, row, q, k, scale, labels, what="z_pos"):
    """``z_pos`` ``[N]`` against fp64 ``(s·q kᵀ)[i, labels[i]]``, and taken from the same z as the row max.

    The max is over the very values z_pos is picked from, so ``row[0] >= z_pos`` holds exactly, and where the
    positive is the row max by a clear margin (labels set to the fp64 argmax) ``row[0] - z_pos`` is exactly 0.
    """
    n = q.shape[0]
    z = scale * q.double() @ k.double().T
    want = z[torch.arange(n, device=z.device), labels]
    assert z_pos.shape == (n,), what
    _close(z_pos, want, torch.float32, what)  # half inputs: products exact in fp32, fp32 tolerance
    assert (row[0] >= z_pos).all(), f"{what}: a positive logit above its row max"
    return want


def _check_stats(got, q, k, scale, dtype, what):
    """``got`` ``[2, L]`` against fp64: the max, the relative log-sum and their sum (the LSE)."""
    want_r, want_c = _ref_stats(q, k, scale)
    want = want_r if what == "row" else want_c
    assert got.shape == want.shape and got.dtype == torch.float32, what
    _close(got[0], want[0], dtype, f"{what} max")
    _close(got[1], want[1], dtype, f"{what} log-sum")
    _close(got[0] + got[1], want[0] + want[1], dtype, f"{what} LSE")
    # log Σ exp(z - max) has the term exp(0) = 1 and one term per column (row) of z.
    terms = k.shape[0] if what == "row" else q.shape[0]
    assert (got[1] >= -1e-6).all() and (got[1] <= torch.log(torch.tensor(float(terms))) + 1e-5).all(), what


# ------------------------------------------------------------------------------------------- raw launchers
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_lse(shape, dtype):
    n, m, d = shape
    q, k, _, _ = _inputs(n, m, d, dtype)
    labels = _labels(n, m)
    scale = torch.tensor(SCALE, device=DEVICE)
    row, col, z_pos, _ = tri.lse(q, k, scale, True, labels)
    assert row.shape == (2, n) and col.shape == (2, m)
    assert z_pos.dtype == torch.float32
    # forward: products of half inputs are exact in fp32, so fp32 tolerances
    _check_stats(row, q, k, SCALE, torch.float32, "row")
    _check_stats(col, q, k, SCALE, torch.float32, "col")
    _check_zpos(z_pos, row, q, k, SCALE, labels)
    row1, none, z_pos1, _ = tri.lse(q, k, scale, False, labels)
    assert none is None
    torch.testing.assert_close(row1, row, rtol=0, atol=0)
    torch.testing.assert_close(z_pos1, z_pos, rtol=0, atol=0)


@pytest.mark.parametrize("programs", [1, 10**6], ids=["no-split", "split-per-block"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("shape", [(7, 129, 7), (40, 70, 40)], ids=["single-D", "D-loop"])
def test_lse_positive_logit(shape, dtype, programs, monkeypatch):
    """``z_pos`` with and without column splits (``test_lse``'s default TARGET_PROGRAMS splits in between).

    Each row's positive is stored by the one program whose column range holds it, and it is the same fp32
    value the row max was taken from (``row[0] - z_pos`` exactly 0 where the positive is the max).
    """
    monkeypatch.setattr(tri, "TARGET_PROGRAMS", programs)
    n, m, d = shape
    q, k, _, _ = _inputs(n, m, d, dtype, seed=12)
    scale = torch.tensor(SCALE, device=DEVICE)
    z = SCALE * q.double() @ k.double().T
    top2 = z.topk(2, dim=1).values
    clear = (top2[:, 0] - top2[:, 1]) > 1e-3  # fp32 logit rounding cannot swap the max here
    assert clear.sum() >= n // 2
    # positives: the row max for even rows, any column for odd rows (first / last columns included)
    labels = torch.where(torch.arange(n, device=z.device) % 2 == 0, z.argmax(1), _labels(n, m, seed=12))
    labels[1::4] = m - 1
    labels[3::8] = 0
    labels = labels.to(DEVICE)
    for need_cols in (True, False):
        row, _, z_pos, _ = tri.lse(q, k, scale, need_cols, labels)
        _check_stats(row, q, k, SCALE, torch.float32, "row")
        _check_zpos(z_pos, row, q, k, SCALE, labels)
        is_max = (labels == z.argmax(1)) & clear
        assert is_max.any()
        assert torch.equal(row[0][is_max], z_pos[is_max]), "max - z_pos must be 0 for a winning positive"


def test_merge_partials():
    """``_merge`` is the exact logsumexp merge, and -inf partial maxes (fully masked partials) give no NaN."""
    g = torch.Generator().manual_seed(9)
    z = 30 * torch.randn(5, 3, 11, generator=g, dtype=torch.float64)  # 5 partials of 3 entries over 11 terms
    pmax = z.amax(2)
    psum = torch.exp(z - pmax[..., None]).sum(2)
    got = tri._merge(pmax, psum)
    want = torch.logsumexp(z.permute(1, 0, 2).reshape(3, -1), 1)
    torch.testing.assert_close(got[0], pmax.amax(0), rtol=0, atol=0)
    torch.testing.assert_close(got[0] + got[1], want, rtol=1e-12, atol=0)
    inf = float("-inf")
    pmax = torch.tensor([[inf, 1.0, inf], [2.0, 3.0, inf]])
    psum = torch.tensor([[0.0, 1.0, 0.0], [1.0, 2.0, 0.0]])
    got = tri._merge(pmax, psum)
    assert not torch.isnan(got).any()
    torch.testing.assert_close(got[:, 0], torch.tensor([2.0, 0.0]))  # the -inf partial contributes nothing
    want = torch.logaddexp(torch.tensor(1.0), torch.tensor(3.0) + torch.log(torch.tensor(2.0)))
    torch.testing.assert_close(got[0, 1] + got[1, 1], want)
    assert got[0, 2] == inf and got[1, 2] == inf  # nothing at all: LSE -inf, still no NaN


@pytest.mark.parametrize("symmetric", [True, False], ids=["symmetric", "one-way"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_grad(shape, dtype, symmetric):
    n, m, d = shape
    q, k, a, w = _inputs(n, m, d, dtype, seed=1)
    w = w if symmetric else None
    scale = torch.tensor(SCALE, device=DEVICE)
    want_r, want_c = _ref_stats(q, k, SCALE)
    dq_want, dk_want = _ref_grad(q, k, SCALE, a, w)
    dq, dk = tri.grad(q, k, scale, want_r.float(), want_c.float() if symmetric else None, a, w)
    assert dq.shape == (n, d) and dk.shape == (m, d)
    _close(dq, dq_want, dtype, "dq")
    _close(dk, dk_want, dtype, "dk")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_grad_zero_and_negative_weights(dtype):
    """Zero weights (shift +inf, sign 0) contribute exactly 0 without NaN; all-zero weights give zeros."""
    n, m, d = 40, 70, 40
    q, k, a, w = _inputs(n, m, d, dtype, seed=10)
    a[::3] = 0.0
    w[1::4] = 0.0
    w[::5] = -w[::5].abs()
    a[1::5] = -a[1::5].abs()
    scale = torch.tensor(SCALE, device=DEVICE)
    row, col, _, _ = tri.lse(q, k, scale, True, _labels(n, m))
    for ww, cc in ((w, col), (None, None)):
        dq_want, dk_want = _ref_grad(q, k, SCALE, a, ww)
        dq, dk = tri.grad(q, k, scale, row, cc, a, ww)
        _close(dq, dq_want, dtype, "dq")
        _close(dk, dk_want, dtype, "dk")
    zero_a, zero_w = torch.zeros_like(a), torch.zeros_like(w)
    dq, dk = tri.grad(q, k, scale, row, col, zero_a, zero_w)
    assert torch.equal(dq, torch.zeros_like(dq)) and torch.equal(dk, torch.zeros_like(dk))


def test_large_scale_and_strided_inputs():
    """Scale 100 (LSE far from 0: masked tile entries must not overflow into NaN) and non-unit strides."""
    n, m, d = 40, 70, 40
    q, k, a, w = _inputs(n, m, d, torch.float32, seed=2)
    q_strided = torch.zeros(n, d + 9, device=DEVICE)[:, 3:3 + d]  # row stride d + 9
    q_strided.copy_(q)
    k_cols = k.T.contiguous().T  # stride along D != 1: the launcher copies it
    scale = torch.tensor(100.0, device=DEVICE)
    labels = _labels(n, m, seed=2)
    row, col, z_pos, _ = tri.lse(q_strided, k_cols, scale, True, torch.stack((labels, labels), 1)[:, 0])  # strided
    # |z| ~ 100: logit rounding ~|z|·eps, i.e. an absolute tolerance on the max and the LSE
    want_r, want_c = _ref_stats(q, k, 100.0)
    want_pos = (100.0 * q.double() @ k.double().T)[torch.arange(n, device=q.device), labels]
    for got, want in ((row, want_r), (col, want_c), (z_pos, want_pos)):
        torch.testing.assert_close(got.double().cpu(), want.cpu(), rtol=0, atol=5e-5)
    dq, dk = tri.grad(q_strided, k_cols, scale, row, col, a, w)
    dq_want, dk_want = _ref_grad(q, k, 100.0, a, w)
    # Scale 100 amplifies the fp32 logit rounding (|z| ~ 100) into the softmax: a looser relative tolerance.
    torch.testing.assert_close(dq.double().cpu(), dq_want.cpu(), rtol=0, atol=5e-4 * dq_want.abs().max().item())
    torch.testing.assert_close(dk.double().cpu(), dk_want.cpu(), rtol=0, atol=5e-4 * dk_want.abs().max().item())


@pytest.mark.parametrize("d", [8, 40], ids=["single-D", "D-loop"])
def test_all_logits_very_negative(d):
    """Every z ≈ -200: out-of-range tile entries (z = 0 read) must not overflow into NaN."""
    n, m = 7, 40
    g = torch.Generator().manual_seed(8)
    e = torch.nn.functional.normalize(torch.randn(d, generator=g), dim=0)
    q = torch.nn.functional.normalize(e + 0.05 * torch.randn(n, d, generator=g), dim=1).to(DEVICE)
    k = torch.nn.functional.normalize(-e + 0.05 * torch.randn(m, d, generator=g), dim=1).to(DEVICE)
    a, w = torch.full((n,), 1.0 / n, device=DEVICE), torch.full((m,), -0.5 / n, device=DEVICE)
    scale = torch.tensor(200.0, device=DEVICE)
    want_r, want_c = _ref_lse(q, k, 200.0)
    assert want_r.max() < -120 and want_c.max() < -120
    labels = _labels(n, m, seed=8)
    row, col, z_pos, _ = tri.lse(q, k, scale, True, labels)
    _check_zpos(z_pos, row, q, k, 200.0, labels)
    torch.testing.assert_close((row[0] + row[1]).double().cpu(), want_r.cpu(), rtol=1e-5, atol=0)
    torch.testing.assert_close((col[0] + col[1]).double().cpu(), want_c.cpu(), rtol=1e-5, atol=0)
    dq, dk = tri.grad(q, k, scale, row, col, a, w)
    dq_want, dk_want = _ref_grad(q, k, 200.0, a, w)
    assert torch.isfinite(dq).all() and torch.isfinite(dk).all()
    torch.testing.assert_close(dq.double().cpu(), dq_want.cpu(), rtol=0, atol=5e-4 * dq_want.abs().max().item())
    torch.testing.assert_close(dk.double().cpu(), dk_want.cpu(), rtol=0, atol=5e-4 * dk_want.abs().max().item())


@pytest.mark.parametrize("shape", [(7, 129, 7), (40, 70, 40)], ids=["single-D", "D-loop"])
def test_deterministic_mode(shape, monkeypatch):
    """XLOSS_DETERMINISTIC and torch.use_deterministic_algorithms: two atomic-free sweeps, same result."""
    n, m, d = shape
    q, k, a, w = _inputs(n, m, d, torch.float32, seed=3)
    scale = torch.tensor(SCALE, device=DEVICE)
    row, col, _, _ = tri.lse(q, k, scale, True, _labels(n, m, seed=3))
    for ww, cc in ((w, col), (None, None)):
        dq_atomic, dk_atomic = tri.grad(q, k, scale, row, cc, a, ww)
        monkeypatch.setenv("XLOSS_DETERMINISTIC", "1")
        dq_det, dk_det = tri.grad(q, k, scale, row, cc, a, ww)
        monkeypatch.delenv("XLOSS_DETERMINISTIC")
        was = torch.are_deterministic_algorithms_enabled()
        torch.use_deterministic_algorithms(True)
        try:
            dq_det2, dk_det2 = tri.grad(q, k, scale, row, cc, a, ww)
        finally:
            torch.use_deterministic_algorithms(was)
        torch.testing.assert_close(dq_det, dq_atomic, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(dk_det, dk_atomic, rtol=1e-5, atol=1e-6)
        assert torch.equal(dq_det, dq_det2) and torch.equal(dk_det, dk_det2)


def test_no_column_split(monkeypatch):
    """One program per row block (the GPU case for large N): dq by plain stores instead of atomics."""
    monkeypatch.setattr(tri, "TARGET_PROGRAMS", 1)
    n, m, d = 7, 70, 40
    q, k, a, w = _inputs(n, m, d, torch.float32, seed=4)
    scale = torch.tensor(SCALE, device=DEVICE)
    labels = _labels(n, m, seed=4)
    row, col, z_pos, _ = tri.lse(q, k, scale, True, labels)
    _check_zpos(z_pos, row, q, k, SCALE, labels)
    _check_stats(row, q, k, SCALE, torch.float32, "row")
    _check_stats(col, q, k, SCALE, torch.float32, "col")
    dq_want, dk_want = _ref_grad(q, k, SCALE, a, w)
    dq, dk = tri.grad(q, k, scale, row, col, a, w)
    _close(dq, dq_want, torch.float32, "dq")
    _close(dk, dk_want, torch.float32, "dk")


def test_float64_is_rejected():
    q = torch.randn(4, 8, dtype=torch.float64, device=DEVICE)
    with pytest.raises(TypeError, match="float32, float16 and bfloat16"):
        tri.lse(q, q, torch.tensor(1.0, dtype=torch.float64, device=DEVICE), True, _labels(4, 4))


@pytest.mark.skipif(INTERPRET, reason="bf16 is wrong in Triton's interpreter: GPU only")
def test_bf16_gpu():
    q, k, a, w = _inputs(129, 257, 96, torch.bfloat16, seed=5)
    scale = torch.tensor(SCALE, device=DEVICE)
    labels = _labels(129, 257, seed=5)
    row, col, z_pos, _ = tri.lse(q, k, scale, True, labels)
    _check_zpos(z_pos, row, q, k, SCALE, labels)
    _check_stats(row, q, k, SCALE, torch.float32, "row")
    _check_stats(col, q, k, SCALE, torch.float32, "col")
    dq_want, dk_want = _ref_grad(q, k, SCALE, a, w)
    dq, dk = tri.grad(q, k, scale, row, col, a, w)
    _close(dq, dq_want, torch.bfloat16, "dq")
    _close(dk, dk_want, torch.bfloat16, "dk")


# --------------------------------------------------------------------------------------- public function
CASES = {
    # name: (N, M, D, labels, symmetric, label_smoothing, reduction, scale)
    "default": (33, 33, 24, False, True, 0.0, "mean", SCALE),
    "labels-extra-keys-smoothing": (9, 37, 40, True, True, 0.1, "sum", SCALE),
    "none-one-way": (20, 45, 16, True, False, 0.2, "none", SCALE),
    "scale-100": (17, 40, 8, False, True, 0.0, "mean", 100.0),
}


@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_info_nce_vs_reference(case):
    n, m, d, has_labels, symmetric, eps, reduction, scale = CASES[case]
    g = torch.Generator().manual_seed(6)
    q0 = torch.nn.functional.normalize(torch.randn(n, d, generator=g), dim=1)
    k0 = torch.nn.functional.normalize(torch.randn(m, d, generator=g), dim=1)
    labels = torch.randint(0, m, (n,), generator=g).to(DEVICE) if has_labels else None
    grad_out = torch.randn(n, generator=g).to(DEVICE) if reduction == "none" else None

    def run(dtype, backend):
        q = q0.to(device=DEVICE, dtype=dtype).clone().requires_grad_()
        k = k0.to(device=DEVICE, dtype=dtype).clone().requires_grad_()
        s = torch.tensor(scale, dtype=dtype, device=DEVICE, requires_grad=True)
        loss = xloss.info_nce(q, k, logit_scale=s, labels=labels, symmetric=symmetric, label_smoothing=eps,
                              reduction=reduction, backend=backend)
        loss.backward(grad_out.to(loss.dtype) if grad_out is not None else None)
        return loss.detach(), q.grad, k.grad, s.grad

    got = run(torch.float32, "triton")
    want = run(torch.float64, "reference")
    # Scale 100 turns fp32 logit rounding (~1e-5 relative of |z| ~ 100) into ~1e-4 relative softmax error.
    rtol = 2e-4 if scale > 10 else 2e-5
    for name, x, y in zip(("loss", "grad query", "grad key", "grad logit_scale"), got, want):
        assert x.dtype == torch.float32, name
        assert torch.isfinite(x).all(), name
        atol = rtol * max(1.0, y.abs().max().item())
        torch.testing.assert_close(x.double(), y, rtol=rtol, atol=atol, msg=lambda m, name=name: f"{name}: {m}")


def test_info_nce_fp16_vs_reference():
    n, m, d = 24, 40, 48
    g = torch.Generator().manual_seed(7)
    q0 = torch.nn.functional.normalize(torch.randn(n, d, generator=g), dim=1).half().to(DEVICE)
    k0 = torch.nn.functional.normalize(torch.randn(m, d, generator=g), dim=1).half().to(DEVICE)
    q, k = q0.clone().requires_grad_(), k0.clone().requires_grad_()
    loss = xloss.info_nce(q, k, logit_scale=SCALE, label_smoothing=0.1, backend="triton")
    loss.backward()
    qd, kd = q0.double().requires_grad_(), k0.double().requires_grad_()
    ref = xloss.info_nce(qd, kd, logit_scale=SCALE, label_smoothing=0.1, backend="reference")
    ref.backward()
    assert loss.dtype == torch.float32 and q.grad.dtype == torch.float16
    torch.testing.assert_close(loss.double(), ref.detach(), rtol=1e-4, atol=1e-4)
    for got, want in ((q.grad, qd.grad), (k.grad, kd.grad)):
        torch.testing.assert_close(got.double(), want, rtol=1e-2, atol=5e-3 * want.abs().max().item())


# ----------------------------------------------------------------------------------------------- precision
PRECISION_CASES = {
    # name: (N, D, logit scale, feature norm, spread of the features around a common direction)
    # Clustered unit features at CLIP's scale: the positive dominates each row by a margin of ~5-15, so the
    # gradient P - onehot is a strong cancellation (1 - P_ii from ~1e-10 to ~0.1) that exposes any |z|·eps
    # error in the softmax entries (as exp(z - lse) with one fp32 LSE of size |z| had: 20-300× here).
    "scale-100-peaked": (64, 32, 100.0, 1.0, 0.1),
    "scale-100": (100, 32, 100.0, 1.0, 0.06),
    # Unnormalised features (norm 30) with scale 1: logits up to ~900.
    "features-x30-peaked": (64, 32, 1.0, 30.0, 0.03),
    "features-x30": (100, 32, 1.0, 30.0, 0.02),
}


def _precision_inputs(case):
    """Features of a PRECISION_CASES case: key i is a noisy copy of query i, so each query's positive is its
    most similar key (and each key's too): the positive is the row and column max of the logits."""
    n, d, scale, norm, spread = PRECISION_CASES[case]
    g = torch.Generator().manual_seed(11)
    e = torch.nn.functional.normalize(torch.randn(d, generator=g), dim=0)
    q0 = norm * torch.nn.functional.normalize(e + spread * torch.randn(n, d, generator=g), dim=1)
    k0 = norm * torch.nn.functional.normalize(q0 + 0.2 * spread * torch.randn(n, d, generator=g), dim=1)
    return q0, k0, scale


@pytest.mark.parametrize("symmetric", [True, False], ids=["symmetric", "one-way"])
@pytest.mark.parametrize("case", list(PRECISION_CASES), ids=list(PRECISION_CASES))
def test_fp32_loss_precision_vs_naive(case, symmetric):
    """fp32 per-query losses of the triton path are as accurate as naive fp32 PyTorch, vs fp64.

    Peaked rows have loss ``(max - z_pos) + log Σ exp(z - max)`` with ``max - z_pos`` ~0 and the log-sum
    tiny: naive PyTorch takes z_pos from the same logits as the max, so the difference is exactly 0.  A
    z_pos computed apart from the kernel's tiles (another summation order) leaves |z|·eps there, 8-1300×
    the naive error; the kernel's own z_pos must not.
    """
    q0, k0, scale = _precision_inputs(case)
    z = scale * q0.double() @ k0.double().T
    n = z.shape[0]
    assert torch.equal(z.argmax(1), torch.arange(n)), "the positive must be each row's max (peaked case)"

    def losses(dtype, backend):
        q, k = q0.to(device=DEVICE, dtype=dtype), k0.to(device=DEVICE, dtype=dtype)
        return xloss.info_nce(q, k, logit_scale=scale, symmetric=symmetric, reduction="none", backend=backend)

    exact = losses(torch.float64, "reference").cpu()
    naive = losses(torch.float32, "reference").double().cpu()
    got = losses(torch.float32, "triton")
    assert got.dtype == torch.float32 and got.shape == (n,)
    got = got.double().cpu()
    err = (got - exact).abs().max().item()
    err_naive = (naive - exact).abs().max().item()
    slack = 1e-6 * exact.abs().max().item()
    assert err <= 3 * err_naive + slack, (
        f"loss: triton fp32 error {err:.3g} vs naive fp32 error {err_naive:.3g} (max |loss| "
        f"{exact.abs().max().item():.3g})"
    )


@pytest.mark.parametrize("case", list(PRECISION_CASES), ids=list(PRECISION_CASES))
def test_fp32_gradient_precision_vs_naive(case):
    """fp32 gradients of the triton path are as accurate as naive fp32 PyTorch (log_softmax), vs fp64."""
    q0, k0, scale = _precision_inputs(case)

    def grads(dtype, backend):
        q = q0.to(device=DEVICE, dtype=dtype).clone().requires_grad_()
        k = k0.to(device=DEVICE, dtype=dtype).clone().requires_grad_()
        xloss.info_nce(q, k, logit_scale=scale, backend=backend).backward()
        return q.grad, k.grad

    exact = grads(torch.float64, "reference")
    naive = grads(torch.float32, "reference")
    got = grads(torch.float32, "triton")
    for name, x, y, want in zip(("grad query", "grad key"), got, naive, exact):
        want = want.cpu()
        err = (x.double().cpu() - want).abs().max().item()
        err_naive = (y.double().cpu() - want).abs().max().item()
        slack = 1e-6 * want.abs().max().item()
        assert err <= 3 * err_naive + slack, (
            f"{name}: triton fp32 error {err:.3g} vs naive fp32 error {err_naive:.3g} (max |grad| "
            f"{want.abs().max().item():.3g})"
        )
