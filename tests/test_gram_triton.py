"""Triton kernels of GRAM (xloss/gram/triton.py) against the fp64 det-based reference: values and gradients.

Without a GPU the kernels run in Triton's interpreter (``TRITON_INTERPRET=1``, set below before Triton is
imported); there fp32 and fp16 are right but bf16 is not, so bf16 runs on a GPU only.  The interpreter tiles
are 16 × 16 pairs and 16-wide D chunks, so N = 17..33 and D = 20 cover several tiles, partial tiles and the D
loop; N = 1 and N1 != N2 cover the edges.  fp32 results are compared with the fp64 reference evaluated on the
same (fp32-representable) inputs.
"""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch

if importlib.util.find_spec("triton") is None:
    pytest.skip("Triton is not installed: the triton backend of gram cannot be tested", allow_module_level=True)

import xloss
from xloss import reference as R
from xloss.gram import triton as tri

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")  # set by tests/conftest.py
DEVICE = "cpu" if INTERPRET else "cuda"
D = 20


def _inputs(n1, n2, k, seed=0, d=D, normalize=True):
    """fp64 leaves whose values are exactly fp32 numbers (so fp32 and fp64 runs see the same inputs)."""
    gen = torch.Generator().manual_seed(seed)

    def make(n):
        x = torch.randn(n, d, generator=gen, dtype=torch.float64)
        if normalize:
            x = torch.nn.functional.normalize(x, dim=-1)
        return x.float().double().requires_grad_()

    return make(n1), [make(n2) for _ in range(k - 1)]


def _as(ts, dtype):
    return [t.detach().to(device=DEVICE, dtype=dtype).requires_grad_() for t in ts]


def _rel(got, want, floor=1e-30):
    """Max abs error relative to max |want| (at least ``floor``: N = 1 losses and gradients are 0)."""
    return ((got.double().cpu() - want).abs().max() / want.abs().max().clamp_min(floor)).item()


@pytest.mark.parametrize(("k", "n1", "n2", "eps"), [
    (2, 1, 1, 0.0), (2, 33, 7, 0.0), (3, 7, 17, 1e-3), (4, 17, 5, 0.0), (5, 7, 17, 1e-3),
])
def test_volume_values_and_grads(k, n1, n2, eps):
    a, xs = _inputs(n1, n2, k, seed=k)
    want = R.gram_volume(a, *xs, eps=eps)
    go = torch.randn(n1, n2, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    g_want = torch.autograd.grad(want, [a, *xs], go)
    ins = _as([a, *xs], torch.float32)
    got = xloss.gram_volume(*ins, eps=eps, backend="triton")
    assert got.shape == (n1, n2) and got.dtype == torch.float32
    assert _rel(got, want) < 1e-5
    g_got = torch.autograd.grad(got, ins, go.float().to(DEVICE))
    for x, y in zip(g_got, g_want):
        assert x.dtype == torch.float32 and _rel(x, y) < 1e-4


def test_volume_sum_backward():
    """``V.sum()``: the incoming gradient is an expanded (stride-0) tensor, read through its strides."""
    a, xs = _inputs(7, 9, 2, seed=9)
    g_want = torch.autograd.grad(R.gram_volume(a, *xs).sum(), [a, *xs])
    ins = _as([a, *xs], torch.float32)
    g_got = torch.autograd.grad(xloss.gram_volume(*ins, backend="triton").sum(), ins)
    for x, y in zip(g_got, g_want):
        assert _rel(x, y) < 1e-4


@pytest.mark.parametrize(("k", "n", "stopgrad", "reduction", "ls", "eps"), [
    (2, 1, False, "mean", 0.1, 0.0),
    (2, 20, False, "mean", 0.1, 0.0),
    (3, 17, True, "none", 0.0, 0.0),
    (4, 17, False, "sum", 0.3, 1e-3),
    (5, 19, True, "mean", 0.1, 1e-4),
])
def test_loss_values_and_grads(k, n, stopgrad, reduction, ls, eps):
    a, xs = _inputs(n, n, k, seed=10 + k)
    tau = torch.tensor(0.1, dtype=torch.float64, requires_grad=True)
    opts = {"label_smoothing": ls, "stopgrad_gathered": stopgrad, "eps": eps, "reduction": reduction}
    want = R.gram_loss(a, *xs, temperature=tau, **opts)
    go = torch.randn(want.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(2)) + 1.5
    g_want = torch.autograd.grad(want, [a, *xs, tau], go)
    ins = _as([a, *xs], torch.float32)
    tau32 = tau.detach().float().to(DEVICE).requires_grad_()
    got = xloss.gram_loss(*ins, temperature=tau32, backend="triton", **opts)
    assert got.shape == want.shape and got.dtype == torch.float32
    assert _rel(got, want, floor=1.0) < 1e-5
    g_got = torch.autograd.grad(got, [*ins, tau32], go.float().to(DEVICE))
    for x, y in zip(g_got, g_want):
        assert _rel(x, y, floor=1e-2) < 1e-4


def test_loss_partial_grads_and_no_grad():
    """Only τ, only the others, only the anchor: each backward kernel alone; and a no_grad forward."""
    a, xs = _inputs(17, 17, 3, seed=3)
    tau = torch.tensor(0.07, dtype=torch.float64, requires_grad=True)
    want = R.gram_loss(a, *xs, temperature=tau)
    g_a, g_x0, g_tau = torch.autograd.grad(want, [a, xs[0], tau])
    a32, x32 = _as([a], torch.float32)[0], _as(xs, torch.float32)
    t32 = tau.detach().float().to(DEVICE).requires_grad_()
    got = xloss.gram_loss(a32.detach(), *[x.detach() for x in x32], temperature=t32, backend="triton")
    assert _rel(torch.autograd.grad(got, t32)[0], g_tau) < 1e-4
    got = xloss.gram_loss(a32.detach(), x32[0], x32[1].detach(), temperature=0.07, backend="triton")
    assert _rel(torch.autograd.grad(got, x32[0])[0], g_x0) < 1e-4
    got = xloss.gram_loss(a32, *[x.detach() for x in x32], temperature=0.07, backend="triton")
    assert _rel(torch.autograd.grad(got, a32)[0], g_a) < 1e-4
    with torch.no_grad():
        got = xloss.gram_loss(a32, *x32, temperature=t32, backend="triton")
        vol = xloss.gram_volume(a32, *x32, backend="triton")
    assert not got.requires_grad and _rel(got, want.detach()) < 1e-5
    assert not vol.requires_grad and _rel(vol, R.gram_volume(a, *xs).detach()) < 1e-5


def test_fp16_inputs():
    a, xs = _inputs(17, 17, 3, seed=4)
    a16, *x16 = _as([a, *xs], torch.float16)
    ah, xh = a16.detach().double().cpu().requires_grad_(), [x.detach().double().cpu().requires_grad_() for x in x16]
    want = R.gram_loss(ah, *xh, temperature=0.1)
    g_want = torch.autograd.grad(want, [ah, *xh])
    got = xloss.gram_loss(a16, *x16, temperature=0.1, backend="triton")
    assert got.dtype == torch.float32 and _rel(got, want) < 1e-4
    g_got = torch.autograd.grad(got, [a16, *x16])
    for x, y in zip(g_got, g_want):
        assert x.dtype == torch.float16 and _rel(x, y) < 2e-2  # one fp16 rounding of the gradient, TF32 dots
    vol = xloss.gram_volume(a16, *x16, backend="triton")
    assert vol.dtype == torch.float32 and _rel(vol, R.gram_volume(ah, *xh)) < 1e-4


@pytest.mark.skipif(not torch.cuda.is_available(), reason="bf16 is wrong in Triton's interpreter: GPU only")
def test_bf16_inputs():  # pragma: no cover (GPU machines)
    a, xs = _inputs(33, 33, 3, seed=5)
    ab, *xb = _as([a, *xs], torch.bfloat16)
    want = R.gram_loss(ab.detach().double().cpu(), *[x.detach().double().cpu() for x in xb], temperature=0.1)
    got = xloss.gram_loss(ab, *xb, temperature=0.1, backend="triton")
    assert _rel(got, want) < 1e-3
    assert all(torch.isfinite(g).all() for g in torch.autograd.grad(got, [ab, *xb]))


def test_large_logits_are_stable():
    """τ = 0.005 and unnormalised inputs: |z| in the thousands, the online max keeps exp finite."""
    a, xs = _inputs(17, 17, 2, seed=6, normalize=False)
    tau = 0.005
    want = R.gram_loss(a, *xs, temperature=tau)
    g_want = torch.autograd.grad(want, [a, *xs])
    ins = _as([a, *xs], torch.float32)
    got = xloss.gram_loss(*ins, temperature=tau, backend="triton")
    assert torch.isfinite(got) and _rel(got, want) < 1e-5
    for x, y in zip(torch.autograd.grad(got, ins), g_want):
        assert torch.isfinite(x).all() and _rel(x, y) < 1e-3


def test_backward_is_deterministic():
    a, xs = _inputs(17, 17, 2, seed=7)
    ins = _as([a, *xs], torch.float32)
    runs = [torch.autograd.grad(xloss.gram_loss(*ins, temperature=0.1, backend="triton"), ins) for _ in range(2)]
    for x, y in zip(*runs):
        assert torch.equal(x, y)


def test_raw_loss_stats():
    """``loss_stats`` against fp64 formulas: row/column LSE of −s·V, row/column means, the diagonal."""
    a, xs = _inputs(33, 33, 4, seed=8)
    v = R.gram_volume(a, *xs).detach()
    s = 7.0
    lse_r, lse_c, mean_r, mean_c, vdiag, det = tri.loss_stats(*_as([a], torch.float32), _as(xs, torch.float32),
                                                              torch.tensor(s), torch.arange(33, device=DEVICE), 0.0)
    assert det is None
    for got, want in [(lse_r, torch.logsumexp(-s * v, 1)), (lse_c, torch.logsumexp(-s * v, 0)),
                      (mean_r, v.mean(1)), (mean_c, v.mean(0)), (vdiag, v.diagonal())]:
        assert got.shape == (33,) and _rel(got, want) < 1e-5
    # N1 != N2 and labels: the positive V[i, labels[i]], columns over N1 rows, rows over N2 columns
    labels = torch.randint(0, 9, (33,), generator=torch.Generator().manual_seed(1))
    v = R.gram_volume(a, *[x[:9] for x in xs]).detach()
    stats = tri.loss_stats(*_as([a], torch.float32), _as([x[:9] for x in xs], torch.float32), torch.tensor(s),
                           labels.to(DEVICE), 0.0)
    wants = [torch.logsumexp(-s * v, 1), torch.logsumexp(-s * v, 0), v.mean(1), v.mean(0), v[torch.arange(33), labels]]
    for got, want in zip(stats[:5], wants):
        assert got.shape == want.shape and _rel(got, want) < 1e-5


def test_backend_resolution(monkeypatch):
    a, xs = _inputs(4, 4, 3)
    a, xs = a.detach().to(DEVICE), [x.detach().to(DEVICE) for x in xs]
    from xloss import gram

    assert gram._engine("auto", a.float(), xs) == ("triton" if DEVICE == "cuda" else "dense")
    assert gram._engine("triton", a.float(), xs) == "triton"
    with pytest.raises(TypeError, match="float64"):  # also a RuntimeError, as a backend that cannot run
        xloss.gram_loss(a, *xs, temperature=0.1, backend="triton")
    # "auto" through the environment: float64 keeps what "auto" takes (the dense definition at this size)
    monkeypatch.setenv("XLOSS_BACKEND", "triton")
    assert gram._engine("auto", a, xs) == "dense"
    assert gram._engine("auto", a.float(), xs) == "triton"
    got = xloss.gram_loss(a, *xs, temperature=0.1)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got.cpu(), R.gram_loss(a.cpu(), *[x.cpu() for x in xs], temperature=0.1),
                               rtol=0, atol=1e-12)


@pytest.mark.parametrize(("k", "n1", "n2", "stopgrad", "ls", "reduction"), [
    (2, 20, 20, False, 0.1, "mean"),  # a permutation of the positives
    (3, 17, 9, True, 0.0, "none"),  # N1 > N2: duplicates throughout
    (4, 7, 19, False, 0.2, "sum"),  # N1 < N2: samples nobody's positive
])
def test_loss_labels(k, n1, n2, stopgrad, ls, reduction):
    """``labels`` on the kernels against the fp64 reference: N1 != N2, duplicate labels, every gradient."""
    a, xs = _inputs(n1, n2, k, seed=20 + k)
    gen = torch.Generator().manual_seed(k)
    if n1 <= n2 and k == 2:
        labels = torch.randperm(n2, generator=gen)[:n1]
    else:
        labels = torch.randint(0, n2, (n1,), generator=gen)
    if k != 2:
        labels[-1] = labels[0]  # a duplicate, whatever the draw
    tau = torch.tensor(0.1, dtype=torch.float64, requires_grad=True)
    opts = {"labels": labels, "label_smoothing": ls, "stopgrad_gathered": stopgrad, "reduction": reduction}
    want = R.gram_loss(a, *xs, temperature=tau, **opts)
    go = torch.randn(want.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(2)) + 1.5
    g_want = torch.autograd.grad(want, [a, *xs, tau], go)
    ins = _as([a, *xs], torch.float32)
    tau32 = tau.detach().float().to(DEVICE).requires_grad_()
    got = xloss.gram_loss(*ins, temperature=tau32, backend="triton", **{**opts, "labels": labels.to(DEVICE)})
    assert got.shape == want.shape and got.dtype == torch.float32
    assert _rel(got, want, floor=1.0) < 1e-5
    g_got = torch.autograd.grad(got, [*ins, tau32], go.float().to(DEVICE))
    for x, y in zip(g_got, g_want):
        assert _rel(x, y, floor=1e-2) < 1e-4


def test_labels_under_torch_compile():
    """The sweep ops' fakes with N1 != N2 and labels (Triton engine): compiled values and gradients equal eager."""
    a, xs = _inputs(5, 7, 3, seed=30)
    ins = _as([a, *xs], torch.float32)
    s = torch.tensor(2.0, device=DEVICE, requires_grad=True)
    labels = torch.tensor([6, 0, 6, 3, 1], device=DEVICE)

    def f(a, x, y, s, labels):
        return torch.cat([
            xloss.gram_loss(a, x, y, logit_scale=s, labels=labels, reduction="none", backend="triton"),
            xloss.gram_loss(a, x, y, logit_scale=s, labels=labels, stopgrad_gathered=True, backend="triton")[None],
            xloss.gram_volume(a, x, backend="triton").flatten(),
        ])

    torch._dynamo.reset()
    got = torch.compile(f, fullgraph=True, backend="aot_eager")(*ins, s, labels)
    want = f(*ins, s, labels)
    torch.testing.assert_close(got, want)
    go = torch.linspace(0.5, 1.5, got.numel(), device=DEVICE)
    torch.testing.assert_close(torch.autograd.grad(got, [*ins, s], go), torch.autograd.grad(want, [*ins, s], go))
    torch._dynamo.reset()
