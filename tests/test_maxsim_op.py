"""The compiled CPU MaxSim op ``xloss::maxsim_q2d`` (xloss/csrc/cpu/maxsim.cpp) and its dispatch.

Checked against ``xloss.reference.maxsim`` in fp64 (values and gradients) and against the PyTorch tile loop
of ``xloss.late_interaction.chunked`` (the same scores, arg-max indices and maxima), for every option the op covers,
ragged prefix masks and scattered masks, empty documents, ties, odd shapes, bf16 inputs, opcheck, bad input and
the ``XLOSS_NO_EXT=1`` fallback.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

import xloss
from xloss import _ext, reference
from xloss.late_interaction import chunked
from xloss.reference.late_interaction import token_weights

pytestmark = pytest.mark.skipif(
    not _ext.has_op("maxsim_q2d"), reason=f"the compiled ops could not be built: {_ext.error()}"
)

OP = torch.ops.xloss.maxsim_q2d if _ext.has_op("maxsim_q2d") else None


def _inputs(nq, lq, nd, ld, dim, dtype=torch.float64, seed=0, mask="prefix", q_mask=False):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(nq, lq, dim, generator=gen, dtype=torch.float64).to(dtype)
    d = torch.randn(nd, ld, dim, generator=gen, dtype=torch.float64).to(dtype)
    if mask == "prefix":
        lengths = torch.randint(0, ld + 1, (nd,), generator=gen)
        lengths[0] = ld  # one full document
        if nd > 1:
            lengths[1] = 0  # one empty document
        d_mask = torch.arange(ld)[None, :] < lengths[:, None]
    elif mask == "scattered":
        d_mask = torch.rand(nd, ld, generator=gen) > 0.4
        d_mask[0] = False  # empty
        if nd > 1:
            d_mask[1, 0] = False  # a hole before valid tokens
            d_mask[1, -1] = True
    else:
        d_mask = None
    qm = (torch.rand(nq, lq, generator=gen) > 0.25) if q_mask else None
    if qm is not None:
        qm[:, 0] = True
    return q, d, qm, d_mask


def _engine_both(q, d, qm, dm, zero, pairs, need_aux, reduction="sum", weights=None):
    """(op result, tile-loop result) of the engine forward, q2d only."""
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    qv = torch.ones(q.shape[:2], dtype=torch.bool) if qm is None else qm
    dv = torch.ones(d.shape[:2], dtype=torch.bool) if dm is None else dm
    qw = token_weights(qv, weights, reduction, acc)
    fwd = chunked.maxsim_pairs_fwd if pairs else chunked.maxsim_fwd
    assert chunked._use_op(q, True, False)
    got = fwd(q, d, qw, None, qv, dv, zero, True, False, need_aux=need_aux)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(chunked, "_use_op", lambda *a: False)
        want = fwd(q, d, qw, None, qv, dv, zero, True, False, need_aux=need_aux)
    return got, want


@pytest.mark.parametrize("pairs", [False, True])
@pytest.mark.parametrize("zero", [False, True])
@pytest.mark.parametrize("mask", ["prefix", "scattered", "none"])
@pytest.mark.parametrize("shape", [(3, 33, 5, 17, 37), (4, 1, 4, 13, 8), (2, 7, 2, 1, 5), (5, 16, 5, 29, 3)])
def test_engine_matches_tile_loop(shape, mask, zero, pairs):
    nq, lq, nd, ld, dim = shape
    if pairs:
        nd = nq
    q, d, qm, dm = _inputs(nq, lq, nd, ld, dim, mask=mask, q_mask=True)
    for need_aux in (True, False):
        (s, idx, val, *rest), (s0, idx0, val0, *_) = _engine_both(q, d, qm, dm, zero, pairs, need_aux)
        assert all(r is None for r in rest)
        torch.testing.assert_close(s, s0, rtol=1e-12, atol=1e-12)
        if need_aux:
            assert idx.dtype == idx0.dtype == torch.int16 and idx.shape == idx0.shape
            assert torch.equal(idx, idx0)
            torch.testing.assert_close(val, val0, rtol=1e-12, atol=1e-12)
        else:
            assert idx is None and val is None


@pytest.mark.parametrize("reduction", ["sum", "mean"])
@pytest.mark.parametrize("mask_mode", ["exclude", "zero"])
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("mask", ["prefix", "scattered"])
def test_maxsim_matches_reference_fp64(reduction, mask_mode, weighted, mask):
    q, d, qm, dm = _inputs(3, 9, 6, 21, 11, mask=mask, q_mask=True, seed=1)
    qw = torch.rand(3, 9, dtype=torch.float64, generator=torch.Generator().manual_seed(5)) if weighted else None
    opts = {"token_reduction": reduction, "mask_mode": mask_mode, "q_weights": qw}
    leaves = [q, d] + ([qw] if weighted else [])
    for t in leaves:
        t.requires_grad_(True)
    got = xloss.maxsim(q, d, qm, dm, backend="cpu", **opts)
    want = reference.maxsim(q, d, qm, dm, **opts)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    g = torch.randn(got.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    ga = torch.autograd.grad(got, leaves, g)
    gb = torch.autograd.grad(want, leaves, g)
    for a, b in zip(ga, gb):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
    with torch.no_grad():
        torch.testing.assert_close(xloss.maxsim(q, d, qm, dm, backend="cpu", **opts), want.detach(),
                                   rtol=1e-10, atol=1e-10)
    # All-masked documents score 0, no NaN.
    assert not got.isnan().any()
    empty = ~dm.any(1)
    assert empty.any()
    if mask_mode == "exclude":
        assert torch.equal(got[:, empty].detach(), torch.zeros_like(got[:, empty]))


@pytest.mark.parametrize("mask_mode", ["exclude", "zero"])
def test_pairs_match_reference_fp64(mask_mode):
    q, d, qm, dm = _inputs(5, 7, 5, 19, 9, q_mask=True, seed=2)
    q.requires_grad_(True)
    d.requires_grad_(True)
    got = xloss.maxsim_pairs(q, d, qm, dm, mask_mode=mask_mode, token_reduction="mean", backend="cpu")
    want = reference.maxsim_pairs(q, d, qm, dm, mask_mode=mask_mode, token_reduction="mean")
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    g = torch.randn(5, dtype=torch.float64)
    for a, b in zip(torch.autograd.grad(got, (q, d), g), torch.autograd.grad(want, (q, d), g)):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("mask_mode", ["exclude", "zero"])
def test_gradients_equal_old_path(dtype, mask_mode):
    q, d, qm, dm = _inputs(4, 33, 7, 40, 12, dtype=dtype, q_mask=True, seed=4)
    qw = torch.rand(4, 33, dtype=dtype)
    g = torch.randn(4, 7, dtype=dtype)

    def run():
        leaves = [t.detach().clone().requires_grad_(True) for t in (q, d, qw)]
        s = xloss.maxsim(leaves[0], leaves[1], qm, dm, mask_mode=mask_mode, q_weights=leaves[2], backend="cpu")
        return (s, *torch.autograd.grad(s, leaves, g))

    got = run()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(chunked, "_use_op", lambda *a: False)
        want = run()
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=tol, atol=tol)


def test_ties_lowest_index():
    """Duplicated document tokens give bitwise-equal similarities: the lowest index wins, as torch.max."""
    q, d, _, _ = _inputs(2, 5, 3, 6, 8)
    d[:, 3] = d[:, 1]  # tie with an earlier token
    d[:, 5] = d[:, 1]
    d[2] = 0  # all similarities 0: index 0
    qm = torch.ones(2, 5, dtype=torch.bool)
    for zero in (False, True):
        dm = torch.ones(3, 6, dtype=torch.bool)
        dm[1, 0] = False  # in zero mode this invalid token scores 0 and competes at index 0
        (s, idx, val, *_), (s0, idx0, val0, *_) = _engine_both(q, d, qm, dm, zero, False, True)
        assert torch.equal(idx, idx0)
        torch.testing.assert_close(s, s0)
        torch.testing.assert_close(val, val0)
        assert not (idx == 3).any() and not (idx == 5).any()
        assert (idx[:, 2] == 0).all()


@pytest.mark.parametrize("mask_mode", ["exclude", "zero"])
def test_bf16_and_fp16_within_tolerance(mask_mode):
    q, d, qm, dm = _inputs(3, 33, 9, 50, 24, dtype=torch.float32, q_mask=True, seed=6)
    for dtype in (torch.bfloat16, torch.float16):
        qh, dh = q.to(dtype), d.to(dtype)
        got = xloss.maxsim(qh, dh, qm, dm, mask_mode=mask_mode, backend="cpu")
        assert got.dtype == torch.float32
        # Same rounded inputs in fp32: only the accumulation order differs.
        want = reference.maxsim(qh.float(), dh.float(), qm, dm, mask_mode=mask_mode)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
        # Against the fp32 inputs: within bf16/fp16 input rounding.
        tol = 0.1 if dtype == torch.bfloat16 else 0.02
        torch.testing.assert_close(got, reference.maxsim(q, d, qm, dm, mask_mode=mask_mode), rtol=tol, atol=tol)


def test_fp32_tile_loop_agreement_large_d():
    """fp32, D not a multiple of the vector width and long documents: the op and the GEMM loop agree."""
    q, d, _, dm = _inputs(2, 32, 8, 300, 131, dtype=torch.float32, seed=7)
    (s, idx, val, *_), (s0, idx0, val0, *_) = _engine_both(q, d, None, dm, False, False, True)
    torch.testing.assert_close(s, s0, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(val, val0, rtol=1e-5, atol=1e-5)
    assert (idx == idx0).float().mean() > 0.99  # near-ties may flip with a different summation order


def test_noncontiguous_inputs():
    q, d, qm, dm = _inputs(3, 8, 4, 10, 6, q_mask=True)
    qt = q.transpose(0, 1).contiguous().transpose(0, 1)
    dt = torch.cat([d, d], 2)[:, :, :6]
    assert not qt.is_contiguous() and not dt.is_contiguous()
    torch.testing.assert_close(xloss.maxsim(qt, dt, qm, dm, backend="cpu"), reference.maxsim(q, d, qm, dm))


def test_opcheck():
    q, d, qm, dm = _inputs(2, 5, 3, 7, 4, dtype=torch.float32, q_mask=True)
    qw = qm.float()
    for pairs, nd in ((False, 3), (True, 2)):
        for need_aux in (True, False):
            for zero in (False, True):
                torch.library.opcheck(OP.default, (q, d[:nd], qw, qm, dm[:nd], zero, pairs, need_aux))


def test_op_under_torch_compile():
    q, d, qm, dm = _inputs(2, 5, 3, 7, 4, dtype=torch.float32, q_mask=True)
    qw = qm.float()
    chunked._use_op(q, True, False)  # registers the fake kernel

    def f(q, d):
        return OP(q, d, qw, qm, dm, False, False, True)[0] * 2

    torch.testing.assert_close(torch.compile(f, fullgraph=True, backend="aot_eager")(q, d), f(q, d))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("zero_mode", [False, True])
def test_grouped_pairs_equal_repeated_queries(dtype, zero_mode):
    """group=n: query a against documents a·n … a·n + n - 1, the same as pairs with each query repeated n times
    (the queries are packed once), scores, maxima and arg-max indices alike; garbage in masked-out tokens
    changes nothing."""
    n_q, n, lq, ld, dim = 3, 4, 9, 13, 10
    q, d, qm, dm = _inputs(n_q, lq, n_q * n, ld, dim, dtype=dtype, q_mask=True)
    q = q.masked_fill(~qm[:, :, None], float("nan"))
    d = d.masked_fill(~dm[:, :, None], float("nan"))
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    qw = qm.to(acc)
    got = OP(q, d, qw, qm, dm, zero_mode, True, True, n)
    rep = [t.repeat_interleave(n, dim=0) for t in (q, qw, qm)]
    want = OP(rep[0], d, rep[1], rep[2], dm, zero_mode, True, True)
    for a, b in zip(got, want):
        assert a.shape == b.shape and a.dtype == b.dtype
        torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)
    assert torch.isfinite(got[0]).all()


def test_bad_input_messages():
    q, d, qm, dm = _inputs(2, 5, 3, 7, 4, dtype=torch.float32, q_mask=True)
    qw = qm.float()
    cases = [
        ((q[0], d, qw, qm, dm, False, False, True), r"q must be \[Nq, Lq, D\]"),
        ((q, d[0], qw, qm, dm, False, False, True), r"d must be \[Nd, Ld, D\]"),
        ((q.int(), d.int(), qw, qm, dm, False, False, True), "q must be float32"),
        ((q, d.double(), qw, qm, dm, False, False, True), "d must have q's dtype"),
        ((q, d[:, :, :3], qw, qm, dm, False, False, True), "same feature dimension D"),
        ((q, d, qw.double(), qm, dm, False, False, True), "q_w must have the accumulation dtype"),
        ((q, d, qw[:, :4], qm, dm, False, False, True), r"q_w must be \[Nq, Lq\]"),
        ((q, d, qw, qm.float(), dm, False, False, True), "q_valid must be a bool"),
        ((q, d, qw, qm, dm[:, :6], False, False, True), "d_valid must be a bool"),
        ((q, d, qw, qm, dm, False, True, True), "pairs=True needs as many queries as documents"),
        ((q, d, qw, qm, dm, False, True, True, 2), "pairs=True with group=2 needs 2 documents per query"),
        ((q, d, qw, qm, dm, False, True, True, 0), "group must be at least 1"),
    ]
    for args, msg in cases:
        with pytest.raises(RuntimeError, match=msg):
            OP(*args)


def test_no_ext_fallback_subprocess():
    code = textwrap.dedent(
        """
        import torch, xloss
        from xloss import _ext, reference
        from xloss.late_interaction import chunked
        q, d = torch.randn(2, 7, 5, dtype=torch.float64), torch.randn(3, 9, 5, dtype=torch.float64)
        dm = torch.arange(9)[None] < torch.tensor([9, 0, 4])[:, None]
        assert not _ext.has_op("maxsim_q2d") and not chunked._use_op(q, True, False)
        torch.testing.assert_close(xloss.maxsim(q, d, None, dm, backend="cpu"), reference.maxsim(q, d, None, dm))
        print("fallback ok")
        """
    )
    env = {**os.environ, "XLOSS_NO_EXT": "1"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300,
                         check=False)
    assert out.returncode == 0, out.stderr
    assert "fallback ok" in out.stdout


def test_uncovered_options_use_tile_loop(monkeypatch):
    """d2q / both are not covered by the op: the tile loop runs (and still matches the reference)."""
    calls = []
    real = chunked._op_fwd
    monkeypatch.setattr(chunked, "_op_fwd", lambda *a: calls.append(1) or real(*a))
    q, d, qm, dm = _inputs(2, 5, 3, 7, 4, q_mask=True)
    for direction in ("d2q", "both"):
        torch.testing.assert_close(xloss.maxsim(q, d, qm, dm, direction=direction, backend="cpu"),
                                   reference.maxsim(q, d, qm, dm, direction=direction))
    assert not calls
    xloss.maxsim(q, d, qm, dm, backend="cpu")
    assert calls
