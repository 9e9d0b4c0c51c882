"""Triton engine of XTR (xloss/xtr/triton.py): the two fused sweeps against the fp64 reference and the chunked
engine, through the public functions.

Without a GPU the kernels run in Triton's interpreter (``TRITON_INTERPRET=1``, set by tests/conftest.py);
shapes are tiny.  With the interpreter's tiles (MAX_T = 32 query tokens per tile, BLOCK_V = 16, D chunks of 16,
MAX_K_PAD = 64) the cases cover: several queries packed per tile, a query longer than a tile (33 tokens), the
D loop, several document-token blocks, k from 1 to beyond the pool, and k whose buffer exceeds MAX_K_PAD (the
first sweep then runs on torch).

Random inputs are compared at fp32 rounding with the fp64 reference on the same (upcast) inputs: the gap
between the k-th and (k+1)-th similarity is far above it for these seeds, so both retrieve the same tokens.
Integer-valued inputs make every dot exact: then ties at the threshold (all kept) are compared exactly with
the chunked engine.
"""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch

if importlib.util.find_spec("triton") is None:
    pytest.skip("Triton is not installed: the triton backend of xtr cannot be tested", allow_module_level=True)

import xloss
from xloss.xtr import chunked as xtr_chunked
from xloss.xtr import triton as tri

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
DEVICE = "cpu" if INTERPRET else "cuda"

# (Nq, Lq, Nd, Ld, D, k)
CASES = [
    (3, 4, 5, 6, 8, 7),  # queries packed per tile, one document-token block
    (4, 5, 6, 3, 4, 1),  # k = 1
    (2, 3, 4, 5, 6, 1000),  # k beyond the pool: every valid token retrieved
    (2, 33, 3, 20, 17, 40),  # a query longer than a tile, two document-token blocks, the D loop
    (3, 6, 7, 19, 5, 100),  # K_PAD = 128 > MAX_K_PAD (interpreter): the torch first sweep
    (3, 4, 6, 7, 8, 16),  # kk = K_PAD: the (kk+1)-th is the largest value left out of the buffer; 3 tiles
    (2, 5, 9, 10, 6, 64),  # the same at the interpreter's largest buffer, 2 tiles
    (1, 1, 1, 1, 1, 1),
]


def _inputs(nq, lq, nd, ld, dim, seed=0, masks=True, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(nq, lq, dim, generator=g).to(dtype)
    d = torch.randn(nd, ld, dim, generator=g).to(dtype)
    qm = dm = None
    if masks:
        qm = torch.rand(nq, lq, generator=g) > 0.25
        qm[:, 0] = True
        dm = torch.rand(nd, ld, generator=g) > 0.3
        dm[:, 0] = True
    return q.to(DEVICE), d.to(DEVICE), qm if qm is None else qm.to(DEVICE), dm if dm is None else dm.to(DEVICE)


def _run(fn, q, d):
    q, d = q.detach().clone().requires_grad_(), d.detach().clone().requires_grad_()
    out = fn(q, d)
    w = torch.linspace(0.5, 1.5, out.numel(), dtype=out.dtype, device=out.device).reshape(out.shape)
    return [out.detach(), *torch.autograd.grad((out * w).sum(), (q, d))]


@pytest.fixture
def bounds_calls(monkeypatch):
    """Counts the first sweep's torch fallback (``chunked.xtr_bounds``) called from the Triton engine."""
    calls = []
    real = xtr_chunked.xtr_bounds

    def spy(*a, **kw):
        calls.append(a[4])
        return real(*a, **kw)

    monkeypatch.setattr(tri._chunked, "xtr_bounds", spy)
    return calls


@pytest.mark.parametrize("masks", [False, True])
@pytest.mark.parametrize("case", CASES)
def test_values_and_gradients_equal_the_reference(case, masks, bounds_calls):
    nq, lq, nd, ld, dim, k = case
    q, d, qm, dm = _inputs(nq, lq, nd, ld, dim, masks=masks)
    got = _run(lambda q, d: xloss.xtr_scores(q, d, qm, dm, k=k, backend="triton"), q, d)
    want = _run(lambda q, d: xloss.reference.xtr_scores(q.double(), d.double(), qm, dm, k=k), q, d)
    for a, b, name in zip(got, want, ("scores", "dq", "dd")):
        assert a.dtype == torch.float32, name
        torch.testing.assert_close(a.double(), b.double(), rtol=2e-5, atol=2e-5, msg=lambda m, n=name: f"{n}: {m}")
    k_pad = max(16, 1 << (min(k, nd * ld) - 1).bit_length())  # next power of two from kk
    assert bool(bounds_calls) == (k_pad > tri.MAX_K_PAD)


@pytest.mark.parametrize("k", [1, 3, 8, 16, 30])
def test_ties_at_the_threshold_are_all_kept_as_the_chunked_engine(k):
    """Integer-valued tokens: exact dots, many equal similarities; the retrieved set (every tie at the k-th value
    kept) and hence values and gradients equal the chunked engine's exactly."""
    g = torch.Generator().manual_seed(k)
    q = torch.randint(-2, 3, (3, 5, 6), generator=g).float().to(DEVICE)
    d = torch.randint(-2, 3, (4, 7, 6), generator=g).float().to(DEVICE)
    dm = (torch.rand(4, 7, generator=g) > 0.2).to(DEVICE)
    got = _run(lambda q, d: xloss.xtr_scores(q, d, None, dm, k=k, backend="triton"), q, d)
    want = _run(lambda q, d: xloss.xtr_scores(q, d, None, dm, k=k, backend="chunked"), q, d)
    for a, b, name in zip(got, want, ("scores", "dq", "dd")):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize("k", [1, 5, 16, 17, 32, 64, 100, 500])
def test_first_sweep_gives_the_kth_and_next_largest_value(k):
    """``_bounds``: the kk-th and (kk+1)-th largest similarity over the document tokens (masked-out ones at
    -inf; kk = min(k, Nd·Ld)), exactly (integer-valued tokens: exact dots), from the kernel or
    (K_PAD > MAX_K_PAD) the torch sweep; -inf where there is none."""
    g = torch.Generator().manual_seed(k)
    q = torch.randint(-3, 4, (2, 3, 5), generator=g).float()
    d = torch.randint(-3, 4, (9, 11, 5), generator=g).float()
    dm = torch.rand(9, 11, generator=g) > 0.2
    q_dev, d_dev, dm_dev = q.to(DEVICE), d.to(DEVICE), dm.to(DEVICE)
    dv = dm_dev.contiguous().view(torch.uint8).reshape(-1)
    hi, lo = tri._bounds(tri._flat(q_dev), tri._flat(d_dev), dv, k, q_dev, d_dev, dm_dev, True)
    sim = (q.reshape(-1, 5).double() @ d.reshape(-1, 5).double().T).masked_fill(~dm.reshape(1, -1), float("-inf"))
    ranked = sim.sort(dim=1, descending=True).values
    kk = min(k, 99)
    want_hi = ranked[:, kk - 1]
    want_lo = ranked[:, kk] if kk < ranked.shape[1] else torch.full_like(want_hi, float("-inf"))
    assert torch.equal(hi.cpu().double(), want_hi) and torch.equal(lo.cpu().double(), want_lo)


def test_cut_lies_above_the_next_value_and_at_most_the_kth():
    inf = float("inf")
    hi = torch.tensor([2.0, 1.0, 1.0, inf, inf, 3.0, -inf, 0.0])
    lo = torch.tensor([1.0, 1.0, torch.nextafter(torch.tensor(1.0), torch.tensor(0.0)).item(), 5.0, inf, -inf,
                       -inf, -1e-45])
    cut = tri._cut(hi, lo)
    assert torch.equal(cut, torch.tensor([1.5, 1.0, 1.0, inf, inf, 3.0, -inf, cut[7].item()]))
    assert bool(((cut > lo) | (cut == hi)).all()) and bool((cut <= hi).all())
    assert cut[7] > lo[7] and cut[7] <= hi[7]


def test_no_grad_forward_skips_the_indices_and_gives_the_same_scores():
    q, d, qm, dm = _inputs(3, 4, 5, 6, 8, seed=2)
    with torch.no_grad():
        s = xloss.xtr_scores(q, d, qm, dm, k=9, backend="triton")
    scores, idx, z = tri.xtr_fwd(q, d, qm, dm, 9, False, True)
    assert idx.numel() == 0 and z.numel() == 0
    torch.testing.assert_close(s, xloss.xtr_scores(q, d, qm, dm, k=9, backend="chunked"), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(scores, s, rtol=0, atol=0)


def test_stacked_documents_and_the_loss_equal_the_reference():
    g = torch.Generator().manual_seed(5)
    q = torch.randn(3, 4, 8, generator=g).to(DEVICE)
    d = torch.randn(3, 2, 5, 8, generator=g).to(DEVICE)
    dm = (torch.rand(3, 2, 5, generator=g) > 0.3).to(DEVICE)
    dm[..., 0] = True

    def run(fn, **kw):
        qq, dd = q.clone().requires_grad_(), d.clone().requires_grad_()
        s = torch.tensor(2.5, requires_grad=True)
        out = fn(qq, dd, None, dm, k=6, logit_scale=s, label_smoothing=0.1, **kw)
        return [out.detach(), *torch.autograd.grad(out, (qq, dd, s))]

    got = run(xloss.xtr_loss, backend="triton")
    want = run(lambda q, d, *a, **kw: xloss.reference.xtr_loss(q.double(), d.double(), *a, **kw))
    for a, b, name in zip(got, want, ("loss", "dq", "dd", "ds")):
        torch.testing.assert_close(a.double(), b.double(), rtol=2e-5, atol=2e-5, msg=lambda m, n=name: f"{n}: {m}")


def test_nan_propagates_to_its_document_and_masked_garbage_is_ignored():
    q, d, qm, dm = _inputs(2, 3, 4, 5, 6, seed=7)
    d_nan = d.clone()
    d_nan[2, 0, 0] = float("nan")  # a valid token (every first token is)
    s = xloss.xtr_scores(q, d_nan, qm, dm, k=4, backend="triton")
    r = xloss.reference.xtr_scores(q.double(), d_nan.double(), qm, dm, k=4)
    torch.testing.assert_close(s.double(), r, rtol=2e-5, atol=2e-5, equal_nan=True)
    assert torch.isnan(s[:, 2]).any()
    base = xloss.xtr_scores(q, d, qm, dm, k=4, backend="triton")
    q2, d2 = q.clone(), d.clone()
    q2[~qm] = float("nan")
    d2[~dm] = 1e6
    torch.testing.assert_close(xloss.xtr_scores(q2, d2, qm, dm, k=4, backend="triton"), base, rtol=0, atol=0)


def test_deterministic_scatter_gives_the_same_gradients(monkeypatch):
    q, d, qm, dm = _inputs(3, 5, 4, 6, 8, seed=3)
    fast = _run(lambda q, d: xloss.xtr_scores(q, d, qm, dm, k=5, backend="triton"), q, d)
    monkeypatch.setenv("XLOSS_DETERMINISTIC", "1")
    det = _run(lambda q, d: xloss.xtr_scores(q, d, qm, dm, k=5, backend="triton"), q, d)
    for a, b in zip(fast, det):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def test_fp16_inputs_are_computed_in_fp32():
    q, d, qm, dm = _inputs(3, 4, 5, 6, 8, seed=4, dtype=torch.float16)
    got = _run(lambda q, d: xloss.xtr_scores(q, d, qm, dm, k=7, backend="triton"), q, d)
    want = _run(lambda q, d: xloss.xtr_scores(q, d, qm, dm, k=7, backend="chunked"), q, d)
    assert got[0].dtype == torch.float32 and got[1].dtype == torch.float16 and got[2].dtype == torch.float16
    for a, b in zip(got, want):
        torch.testing.assert_close(a.float(), b.float(), rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_training_shape_k_256(dtype):
    """XTR's usual k = 256 over 288 document tokens, Lq = 32, D = 128: the bench's launch configuration (under
    the GPU tiles, recorded for the sm_90 report: a 256-column running top-k), the torch first sweep under the
    interpreter's tiles."""
    q, d, qm, dm = _inputs(2, 32, 12, 24, 128, seed=8, dtype=dtype)
    got = xloss.xtr_scores(q, d, qm, dm, k=256, backend="triton")
    want = xloss.reference.xtr_scores(q.double(), d.double(), qm, dm, k=256)
    torch.testing.assert_close(got.double(), want, rtol=2e-5, atol=2e-5)


def test_float64_is_refused_by_triton_and_auto_runs_chunked_off_cuda():
    q, d, _, _ = _inputs(2, 3, 4, 5, 6)
    with pytest.raises(TypeError, match="triton backend of xtr supports float32"):
        xloss.xtr_scores(q.double(), d.double(), k=3, backend="triton")
    assert xloss._dispatch.resolve("xtr", "auto", torch.device("cpu"), torch.float32) == "chunked"
    if DEVICE == "cuda":
        assert xloss._dispatch.resolve("xtr", "auto", torch.device("cuda"), torch.float16) == "triton"


def test_compiled_equals_eager():
    """The Triton engine behind the same custom ops under torch.compile (one graph, no break)."""
    q, d, qm, dm = _inputs(3, 4, 5, 6, 8, seed=9)

    def fn(q, d):
        return xloss.xtr_loss(q, d, qm, dm, k=6, temperature=0.5, backend="triton")

    torch._dynamo.reset()
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    for a, b in zip(_run(compiled, q, d), _run(fn, q, d)):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
