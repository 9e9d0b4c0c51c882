"""Triton kernels of teacher distillation (xloss/soft_targets/triton.py): the engine functions against the
chunked engine in fp64 (the oracle), then ``xloss.distill_loss(..., backend="triton")`` against the reference.

Without a GPU the kernels run in Triton's interpreter (tests/conftest.py sets ``TRITON_INTERPRET=1``), whose
tiles are 32 wide: the odd shapes below span several row and column blocks (so the column splits and their
partial buffers are merged), and widths of 37 or 40 (> 32) take the chunked D / E loop while the other width
stays one register-resident block.  bf16 is wrong in the interpreter, so it is tested on a GPU only.

Tolerances: fp32 inputs against fp64 at ~2e-5 of each output's magnitude; fp16 inputs against fp64 on the same
(upcast) inputs, the forward at fp32 tolerance (products of halves are exact in fp32) and the gradients with
the slack of one fp16 rounding of G before the gradient dots.
"""

from __future__ import annotations

import importlib.util
import os

import engines
import pytest
import torch
import torch.nn.functional as F

if importlib.util.find_spec("triton") is None:
    pytest.skip("Triton is not installed: the triton engine of distill cannot be tested",
                allow_module_level=True)

import xloss
from xloss import _dispatch
from xloss.soft_targets import chunked
from xloss.soft_targets import triton as tri

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")  # set by tests/conftest.py
DEVICE = "cpu" if INTERPRET else "cuda"
F64 = torch.float64
SCALE, TSCALE = 5.0, 8.0

# (N, M, D, E): N ≠ M, odd, more than one tile; D > 32 with E one block, E > 32 with D one block, both small,
# and the 1×1 edge.
SHAPES = [(45, 67, 37, 21), (67, 33, 13, 40), (33, 70, 9, 9), (1, 1, 1, 1)]
IDS = ["D-loop", "E-loop", "single", "1x1"]


def _features(n, m, d, e, dtype=torch.float32, tdtype=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = [F.normalize(torch.randn(rows, width, generator=g, dtype=F64), dim=1)
           for rows, width in ((n, d), (m, d), (n, e), (m, e))]
    tdtype = tdtype or dtype
    return [t.to(DEVICE, dt) for t, dt in zip(out, (dtype, dtype, tdtype, tdtype))]


def _weights(n, m, seed=0):
    """Mixed-sign row and column weights ``a [N]``, ``w [M]`` with some exact zeros."""
    g = torch.Generator().manual_seed(100 + seed)
    a, w = torch.randn(n, generator=g) / n, torch.randn(m, generator=g) / m
    a[1::4] = 0.0
    w[2::5] = 0.0
    return a.to(DEVICE), w.to(DEVICE)


def _scales(dtype=torch.float32):
    return torch.tensor(SCALE, dtype=dtype, device=DEVICE), torch.tensor(TSCALE, dtype=dtype, device=DEVICE)


S, TS = _scales()


def _oracle_lse(q, k, tq, tk, need_cols=True):
    s, ts = _scales(F64)
    return chunked.lse(q.double(), k.double(), s, tq.double(), tk.double(), ts, need_cols)


def _split(t):
    """Teacher statistics ``[3, L]`` as the split LSE ``[2, L]`` that ``grad`` takes (as the Function
    does)."""
    return torch.stack([t[0], t[1].log()])


def _oracle_grad(q, k, tq, tk, a, w):
    row, col, trow, tcol = _oracle_lse(q, k, tq, tk, w is not None)
    s, ts = _scales(F64)
    tc = None if tcol is None else _split(tcol)
    return chunked.grad(q.double(), k.double(), s, tq.double(), tk.double(), ts, row, col, _split(trow), tc,
                        a.double(), None if w is None else w.double())


def _close(got, want, what, rtol=2e-5, magnitude=None):
    """``|got - want| <= rtol·magnitude`` (default: the largest |want|, at least 1e-3)."""
    assert got.dtype == torch.float32, f"{what}: dtype {got.dtype}"
    assert torch.isfinite(got).all(), f"{what}: non-finite values"
    got, want = got.double().cpu(), want.double().cpu()
    mag = magnitude if magnitude is not None else max(1e-3, float(want.abs().max()) if want.numel() else 0.0)
    err = float((got - want).abs().max()) if want.numel() else 0.0
    assert err <= rtol * mag, f"{what}: max error {err:.3g} > {rtol * mag:.3g}"


def _check_lse(got, want, need_cols, what=""):
    """Student split LSE per plane; teacher: the max, the relative sum and the teacher-weighted mean of z (the
    cross sum divided by the sum: the quantity the loss uses, of the size of the logits)."""
    row, col, trow, tcol = got
    names = ("row", "col") if need_cols else ("row",)
    for name, x, y in zip(names, (row, col), (want[0], want[1])):
        assert x.shape == y.shape, f"{what} {name}"
        _close(x[0], y[0], f"{what} {name} max", magnitude=SCALE)
        _close(x[1], y[1], f"{what} {name} log-sum", magnitude=max(1.0, float(y[1].abs().max())))
    for name, x, y in zip(("trow", "tcol") if need_cols else ("trow",), (trow, tcol), (want[2], want[3])):
        assert x.shape == y.shape, f"{what} {name}"
        _close(x[0], y[0], f"{what} {name} max", magnitude=TSCALE)
        _close(x[1], y[1], f"{what} {name} sum")
        _close(x[2] / x[1], y[2] / y[1], f"{what} {name} mean of z", magnitude=SCALE)
    if not need_cols:
        assert col is None and tcol is None


# ------------------------------------------------------------------------------------------- engine functions


@pytest.mark.parametrize("need_cols", [True, False], ids=["cols", "rows-only"])
@pytest.mark.parametrize("shape", SHAPES, ids=IDS)
def test_lse_matches_chunked(shape, need_cols):
    q, k, tq, tk = _features(*shape)
    got = tri.lse(q, k, S, tq, tk, TS, need_cols)
    assert all(t.dtype == torch.float32 for t in got if t is not None)
    _check_lse(got, _oracle_lse(q, k, tq, tk, need_cols), need_cols, "fp32")
    if not need_cols:  # the row statistics do not depend on the column ones: same launch shape, same bits
        full = tri.lse(q, k, S, tq, tk, TS, True)
        assert torch.equal(got[0], full[0]) and torch.equal(got[2], full[2])


@pytest.mark.parametrize("symmetric", [True, False], ids=["symmetric", "one-way"])
@pytest.mark.parametrize("shape", SHAPES, ids=IDS)
def test_grad_matches_chunked(shape, symmetric):
    n, m, _, _ = shape
    q, k, tq, tk = _features(*shape, seed=1)
    a, w = _weights(n, m, seed=1)
    w = w if symmetric else None
    row, col, trow, tcol = (None if t is None else t.float() for t in _oracle_lse(q, k, tq, tk, symmetric))
    dq, dk = tri.grad(q, k, S, tq, tk, TS, row, col, _split(trow),
                      None if tcol is None else _split(tcol), a, w)
    want_q, want_k = _oracle_grad(q, k, tq, tk, a, w)
    assert dq.shape == q.shape and dk.shape == k.shape
    _close(dq, want_q, "dq")
    _close(dk, want_k, "dk")


@pytest.mark.parametrize("programs", [1, 10**6], ids=["no-split", "split-per-block"])
def test_column_splits(programs, monkeypatch):
    """One program per row block (dq by plain stores) and one per tile (partials merged from every block)."""
    monkeypatch.setattr(tri, "TARGET_PROGRAMS", programs)
    q, k, tq, tk = _features(45, 67, 37, 21, seed=2)
    a, w = _weights(45, 67, seed=2)
    got = tri.lse(q, k, S, tq, tk, TS, True)
    _check_lse(got, _oracle_lse(q, k, tq, tk), True, f"programs={programs}")
    row, col, trow, tcol = got
    dq, dk = tri.grad(q, k, S, tq, tk, TS, row, col, _split(trow), _split(tcol), a, w)
    want_q, want_k = _oracle_grad(q, k, tq, tk, a, w)
    _close(dq, want_q, "dq")
    _close(dk, want_k, "dk")


def test_zero_and_negative_weights():
    """Negative weights flip G's sign, zero weights (shift +inf, sign 0) give exactly 0, never NaN."""
    n, m = 33, 70
    q, k, tq, tk = _features(n, m, 37, 40, seed=3)
    a, w = _weights(n, m, seed=3)
    a[::3], w[1::3] = -a[::3].abs(), -w[1::3].abs()
    row, col, trow, tcol = tri.lse(q, k, S, tq, tk, TS, True)
    stats = (row, col, _split(trow), _split(tcol))
    dq, dk = tri.grad(q, k, S, tq, tk, TS, *stats, a, w)
    want_q, want_k = _oracle_grad(q, k, tq, tk, a, w)
    _close(dq, want_q, "dq")
    _close(dk, want_k, "dk")
    zero_q, zero_k = tri.grad(q, k, S, tq, tk, TS, *stats, torch.zeros_like(a),
                              torch.zeros_like(w))
    assert torch.equal(zero_q, torch.zeros_like(dq)) and torch.equal(zero_k, torch.zeros_like(dk))
    # only the row part weighted: the column statistics must not leak in
    row_q, row_k = tri.grad(q, k, S, tq, tk, TS, *stats, a, torch.zeros_like(w))
    want_q, want_k = _oracle_grad(q, k, tq, tk, a, torch.zeros_like(w))
    _close(row_q, want_q, "dq, zero column weights")
    _close(row_k, want_k, "dk, zero column weights")


@pytest.mark.parametrize("shape", [(45, 67, 37, 21), (67, 33, 13, 40)], ids=["D-loop", "E-loop"])
def test_deterministic_mode_is_bitwise_repeatable(shape, monkeypatch):
    """XLOSS_DETERMINISTIC and torch.use_deterministic_algorithms: two atomic-free launches (the second with
    q/k, tq/tk, row/col statistics and a/w swapped), the same bits every time, close to the atomic sweep."""
    n, m, _, _ = shape
    q, k, tq, tk = _features(*shape, seed=4)
    a, w = _weights(n, m, seed=4)
    row, col, trow, tcol = tri.lse(q, k, S, tq, tk, TS, True)
    for ww, cc, tc in ((w, col, _split(tcol)), (None, None, None)):
        args = (q, k, S, tq, tk, TS, row, cc, _split(trow), tc, a, ww)
        dq_atomic, dk_atomic = tri.grad(*args)
        monkeypatch.setenv("XLOSS_DETERMINISTIC", "1")
        first = tri.grad(*args)
        second = tri.grad(*args)
        monkeypatch.delenv("XLOSS_DETERMINISTIC")
        was = torch.are_deterministic_algorithms_enabled()
        torch.use_deterministic_algorithms(True)
        try:
            third = tri.grad(*args)
        finally:
            torch.use_deterministic_algorithms(was)
        for x, y in zip(first, second):
            assert torch.equal(x, y)
        for x, y in zip(first, third):
            assert torch.equal(x, y)
        want_q, want_k = _oracle_grad(q, k, tq, tk, a, ww)
        _close(first[0], want_q, "deterministic dq")
        _close(first[1], want_k, "deterministic dk")
        torch.testing.assert_close(first[0], dq_atomic, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(first[1], dk_atomic, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("shape", [(45, 67, 37, 21), (33, 70, 9, 40)], ids=["D-loop", "E-loop"])
def test_fp16_inputs(shape):
    """fp16 student and teacher against fp64 on the same (upcast) values."""
    n, m, _, _ = shape
    q, k, tq, tk = _features(*shape, dtype=torch.float16, seed=5)
    a, w = _weights(n, m, seed=5)
    got = tri.lse(q, k, S, tq, tk, TS, True)
    _check_lse(got, _oracle_lse(q, k, tq, tk), True, "fp16")
    row, col, trow, tcol = got
    dq, dk = tri.grad(q, k, S, tq, tk, TS, row, col, _split(trow), _split(tcol), a, w)
    want_q, want_k = _oracle_grad(q, k, tq, tk, a, w)
    _close(dq, want_q, "fp16 dq", rtol=4e-3)
    _close(dk, want_k, "fp16 dk", rtol=4e-3)


@pytest.mark.parametrize("dtypes", [(torch.float16, torch.float32), (torch.float32, torch.float16),
                                    (torch.float32, torch.float64)],
                         ids=["fp16-fp32", "fp32-fp16", "fp32-fp64"])
def test_teacher_of_another_dtype(dtypes):
    """The teacher is read in its own dtype when the kernels take it, else as fp32 (same numbers as casting it
    first); a teacher of two dtypes is read as fp32."""
    sdt, tdt = dtypes
    q, k, tq, tk = _features(33, 45, 13, 21, dtype=sdt, tdtype=tdt, seed=6)
    s, ts = S, TS
    got = tri.lse(q, k, s, tq, tk, ts, True)
    _check_lse(got, _oracle_lse(q, k, tq, tk), True, f"{sdt} student, {tdt} teacher")
    if tdt == torch.float64:
        cast = tri.lse(q, k, s, tq.float(), tk.float(), ts, True)
        assert all(torch.equal(x, y) for x, y in zip(got, cast))
    tk_other = tk.to(torch.float32 if tdt == torch.float16 else torch.float16)
    mixed = tri.lse(q, k, s, tq, tk_other, ts, True)
    cast = tri.lse(q, k, s, tq.float(), tk_other.float(), ts, True)
    assert all(torch.equal(x, y) for x, y in zip(mixed, cast))


def test_strided_inputs_and_large_scale():
    """Row strides are passed through, a non-unit stride along the width is copied; scale 100 (z far below 0
    for most entries) must not overflow masked tile entries into NaN."""
    n, m, d, e = 33, 45, 37, 21
    q, k, tq, tk = _features(n, m, d, e, seed=7)
    q_wide = torch.zeros(n, d + 5, device=DEVICE)[:, 2:2 + d]
    q_wide.copy_(q)
    tk_cols = tk.T.contiguous().T
    s, ts = torch.tensor(100.0, device=DEVICE), torch.tensor(60.0, device=DEVICE)
    row, col, trow, tcol = tri.lse(q_wide, k, s, tq, tk_cols, ts, True)
    want = chunked.lse(q.double(), k.double(), s.double(), tq.double(), tk.double(), ts.double(), True)
    # |z| ~ 100: fp32 logit rounding ~|z|·eps, an absolute tolerance on the maxes and log-sums
    for x, y in ((row, want[0]), (col, want[1])):
        torch.testing.assert_close(x.double().cpu(), y.cpu(), rtol=0, atol=5e-5)
    for x, y in ((trow, want[2]), (tcol, want[3])):
        torch.testing.assert_close(x[0].double().cpu(), y[0].cpu(), rtol=0, atol=5e-5)
        torch.testing.assert_close((x[2] / x[1]).double().cpu(), (y[2] / y[1]).cpu(), rtol=0, atol=5e-4)
    a, w = _weights(n, m, seed=7)
    dq, dk = tri.grad(q_wide, k, s, tq, tk_cols, ts, row, col, _split(trow), _split(tcol), a, w)
    want_q, want_k = chunked.grad(q.double(), k.double(), s.double(), tq.double(), tk.double(), ts.double(),
                                  want[0], want[1], _split(want[2]), _split(want[3]), a.double(), w.double())
    _close(dq, want_q, "dq at scale 100", rtol=5e-4)
    _close(dk, want_k, "dk at scale 100", rtol=5e-4)


def test_float64_is_rejected():
    q = torch.randn(4, 8, dtype=F64, device=DEVICE)
    s = torch.tensor(1.0, dtype=F64, device=DEVICE)
    with pytest.raises(TypeError, match="float32, float16 and bfloat16"):
        tri.lse(q, q, s, q, q, s, True)
    with pytest.raises(TypeError, match="float32, float16 and bfloat16"):
        tri.grad(q, q, s, q, q, s, torch.zeros(2, 4), None, torch.zeros(2, 4), None, torch.ones(4), None)


@pytest.mark.skipif(INTERPRET, reason="bf16 is wrong in Triton's interpreter: GPU only")
def test_bf16_gpu():
    n, m = 129, 257
    q, k, tq, tk = _features(n, m, 96, 160, dtype=torch.bfloat16, seed=8)
    a, w = _weights(n, m, seed=8)
    got = tri.lse(q, k, S, tq, tk, TS, True)
    _check_lse(got, _oracle_lse(q, k, tq, tk), True, "bf16")
    row, col, trow, tcol = got
    dq, dk = tri.grad(q, k, S, tq, tk, TS, row, col, _split(trow), _split(tcol), a, w)
    want_q, want_k = _oracle_grad(q, k, tq, tk, a, w)
    _close(dq, want_q, "bf16 dq", rtol=2e-2)
    _close(dk, want_k, "bf16 dk", rtol=2e-2)


# --------------------------------------------------------------------------------------- public function


def test_dispatch_routes_cuda_to_triton():
    assert _dispatch.resolve("distill", "auto", torch.device("cuda"), torch.float16) == "triton"
    assert _dispatch.resolve("distill", "auto", torch.device("cuda"), F64) == "chunked"
    assert _dispatch.resolve("distill", "auto", torch.device("cpu"), torch.float32) == "chunked"
    assert _dispatch.resolve("distill", "triton", torch.device(DEVICE), torch.float32) == "triton"


CASES = {
    # name: (N, M, D, E, symmetric, reduction)
    "symmetric-mean": (45, 67, 37, 21, True, "mean"),
    "one-way-sum": (33, 70, 9, 40, False, "sum"),
    "paired-none": (37, 37, 13, 21, True, "none"),
}


def _distill(tq, tk, symmetric, reduction, backend):
    def fn(q, k, s):
        return xloss.distill_loss(q, k, tq, tk, logit_scale=s, teacher_logit_scale=TSCALE,
                                  symmetric=symmetric, reduction=reduction, backend=backend)
    return fn


@pytest.mark.parametrize("mode", engines.MODES)
@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_distill_loss_vs_reference(case, mode):
    """Values and gradients of query, key and a tensor logit_scale, eager and torch.compile(fullgraph)."""
    n, m, d, e, symmetric, reduction = CASES[case]
    q, k, tq, tk = _features(n, m, d, e, dtype=F64, seed=9)

    def inputs(dtype):
        return [t.to(DEVICE, dtype).requires_grad_() for t in (q, k, torch.tensor(SCALE, dtype=F64))]

    fast = _distill(tq.float(), tk.float(), symmetric, reduction, "triton")
    got = engines.run(fast, inputs(torch.float32), mode)
    want = engines.run(_distill(tq, tk, symmetric, reduction, "reference"), inputs(F64), "eager")
    for name, x, y in zip(("loss", "d query", "d key", "d logit_scale"), got, want):
        assert x.shape == y.shape, name
        _close(x, y, f"{case} {mode} {name}")


def test_distill_loss_fp16_vs_reference():
    q, k, tq, tk = _features(45, 67, 37, 21, dtype=torch.float16, seed=10)
    qh, kh = q.clone().requires_grad_(), k.clone().requires_grad_()
    loss = xloss.distill_loss(qh, kh, tq, tk, logit_scale=SCALE, teacher_logit_scale=TSCALE, backend="triton")
    loss.backward()
    qd, kd = q.double().requires_grad_(), k.double().requires_grad_()
    ref = xloss.distill_loss(qd, kd, tq.double(), tk.double(), logit_scale=SCALE, teacher_logit_scale=TSCALE,
                             backend="reference")
    ref.backward()
    assert loss.dtype == torch.float32 and qh.grad.dtype == torch.float16
    _close(loss.detach(), ref.detach(), "fp16 loss")
    for name, x, y in (("d query", qh.grad, qd.grad), ("d key", kh.grad, kd.grad)):
        _close(x.float(), y, f"fp16 {name}", rtol=5e-3)


def test_student_equal_to_teacher_has_exactly_zero_gradient():
    """Same features, same scale: z and t are the same bits, so are their statistics, and G is exactly 0."""
    q, k, _, _ = _features(45, 67, 37, 37, seed=11)
    a, b = q.clone().requires_grad_(), k.clone().requires_grad_()
    s = torch.tensor(SCALE, device=DEVICE, requires_grad=True)
    xloss.distill_loss(a, b, q, k, logit_scale=s, teacher_logit_scale=SCALE, backend="triton").backward()
    assert torch.equal(a.grad, torch.zeros_like(a)) and torch.equal(b.grad, torch.zeros_like(b))
    assert float(s.grad) == 0.0
