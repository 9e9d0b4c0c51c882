"""InfoNCE / CLIP (SPEC.md §1): reference vs open_clip and F.cross_entropy, CPU path vs reference.

Tolerances (DESIGN.md "Habits"): fp64 runs must agree to ~1e-10 relative; an fp32 run of the fast path must
be no further from the fp64 result than the naive fp32 reference is, plus a small slack (cut-cross-entropy's
rule).  Half-precision inputs are checked against the fp64 reference of the same (rounded) inputs.

All shapes are small: the machine has 2 shared cores and the whole file must run in seconds.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os

import engines
import pytest
import torch
import torch.nn.functional as F
from tolerance import assert_close64, assert_no_worse

import xloss
from xloss import _dispatch
from xloss.infonce import chunked as _cpu

SCALE = 4.0  # exactly representable, and so is 1/SCALE: float scales mean the same thing in fp32 and fp64
D = 16

# name -> (N, M, labels kind); labels kind: None (default arange), "perm" (distinct, random),
# "dup" (random with repeats)
SHAPES = {
    "1x1": (1, 1, None),
    "7x7": (7, 7, None),
    "129x129": (129, 129, None),
    "7x19-extra-neg": (7, 19, None),
    "7x19-random-labels": (7, 19, "perm"),
    "19x7-fewer-keys": (19, 7, "dup"),
    "9x9-dup-labels": (9, 9, "dup"),
}


# --------------------------------------------------------------------------------------------- helpers
def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def make_inputs(n, m, d=D, labels_kind=None, *, seed=0, dtype=torch.float32, normalize=True):
    """Features drawn in fp32 (so that casting to fp64 is exact), labels as asked."""
    g = _gen(seed)
    q = torch.randn(n, d, generator=g)
    k = torch.randn(m, d, generator=g)
    if normalize:
        q, k = F.normalize(q, dim=1), F.normalize(k, dim=1)
    labels = None
    if labels_kind == "perm":
        labels = torch.randperm(m, generator=g)[:n]
    elif labels_kind == "dup":
        labels = torch.randint(0, m, (n,), generator=g)
        if n >= 2:
            labels[1] = labels[0]  # at least one repeated positive
    return q.to(dtype), k.to(dtype), labels


def grad_output(out: torch.Tensor, seed: int = 123) -> torch.Tensor:
    """A grad_output != 1: random with mixed signs (and one zero for reduction='none'), drawn in fp32."""
    g = _gen(seed)
    if out.dim() == 0:
        go = torch.tensor(-0.7) + 0.1 * torch.rand((), generator=g)
    else:
        go = torch.randn(out.shape, generator=g)
        if out.numel() > 2:
            go[2] = 0.0
    return go.to(out.dtype)


def run(fn, q, k, *, scale_kind="tensor", scale=SCALE, go_seed=123, backward=True, **opts):
    """Call fn(q, k, ...) with the scale given as asked; return [loss, grads of the differentiable args]."""
    q = q.detach().clone().requires_grad_(True)
    k = k.detach().clone().requires_grad_(True)
    params = [q, k]
    kw = {}
    if scale_kind == "float":
        kw["logit_scale"] = float(scale)
    elif scale_kind == "tensor":
        s = torch.tensor(
            float(scale), dtype=q.dtype if q.dtype == torch.float64 else torch.float32, requires_grad=True
        )
        kw["logit_scale"] = s
        params.append(s)
    elif scale_kind == "temperature":
        t = torch.tensor(
            1.0 / scale, dtype=q.dtype if q.dtype == torch.float64 else torch.float32, requires_grad=True
        )
        kw["temperature"] = t
        params.append(t)
    elif scale_kind == "temperature-float":
        kw["temperature"] = 1.0 / scale
    elif scale_kind != "none":
        raise AssertionError(scale_kind)
    out = fn(q, k, **kw, **opts)
    if not backward:
        return [out.detach()]
    grads = torch.autograd.grad(out, params, grad_output(out, go_seed))
    return [out.detach(), *grads]


def cpu_loss(q, k, **kw):
    return xloss.info_nce(q, k, backend="cpu", **kw)


def ref_loss(q, k, **kw):
    return xloss.reference.info_nce(q, k, **kw)


def term_magnitudes(q, k, scale, go, reduction):
    """Size of the terms summed into [loss entry, dq entry, dk entry, d scale]: |z| for the loss (LSE - z),
    ``s·|k|·g`` for dq (softmax minus target, times s·k, per query weight g), ``s·|q|·g`` for dk and
    ``Σg·|q||k|`` for the scale."""
    n = q.shape[0]
    qn = float(q.double().norm(dim=1).max())
    kn = float(k.double().norm(dim=1).max())
    s = abs(float(scale))
    go = go.double().abs()
    per_query = go / n if reduction == "mean" else go  # weight of each query's term
    g_max = float(per_query.max())
    g_sum = float(per_query.sum()) * (n if (go.dim() == 0 and reduction != "none") else 1)
    return [s * qn * kn * (n if reduction == "sum" else 1), s * kn * g_max, s * qn * g_max, g_sum * qn * kn]


def check_fp32(fast, naive, exact, q, k, scale, reduction, logit_rounding=False):
    """Every output of the fp32 fast path against the fp64 result, by the rule of ``assert_no_worse``.

    ``logit_rounding``: allow, on the gradients, roundings at the size of the largest logit |z| (for
    |z| >> 1), i.e. the accuracy of a softmax ``exp(z - LSE)`` with the LSE stored as one fp32 number.
    Used for the extreme inputs only (see ``test_fp32_large_logits_no_worse_than_naive`` for why).
    """
    mags = term_magnitudes(q, k, scale, grad_output(exact[0]), reduction)
    ulps = [8.0] * 4
    if logit_rounding:  # two roundings at |z| times the size of the gradient terms
        z_max = max(1.0, mags[0] / (q.shape[0] if reduction == "sum" else 1))
        mags = [mags[0]] + [z_max * m for m in mags[1:]]
        ulps = [8.0, 2.0, 2.0, 2.0]
    for name, f, r, e, mag, u in zip(("loss", "d query", "d key", "d scale"), fast, naive, exact, mags, ulps):
        assert f.shape == e.shape, name
        assert_no_worse(f, r, e, name, magnitude=mag, slack_ulps=u)


def compare_fp32(n, m, labels_kind, *, seed=0, d=D, normalize=True, **opts):
    """Fast path (fp32) vs naive fp32 reference, both judged against the fp64 reference of the same inputs."""
    q, k, labels = make_inputs(n, m, d, labels_kind, seed=seed, normalize=normalize)
    return compare_fp32_inputs(q, k, labels, **opts)


def compare_fp32_inputs(q, k, labels, logit_rounding=False, **opts):
    fast = run(cpu_loss, q, k, labels=labels, **opts)
    naive = run(ref_loss, q, k, labels=labels, **opts)
    exact = run(ref_loss, q.double(), k.double(), labels=labels, **opts)
    assert all(f.dtype == torch.float32 for f in fast)
    scale, reduction = opts.get("scale", SCALE), opts.get("reduction", "mean")
    check_fp32(fast, naive, exact, q, k, scale, reduction, logit_rounding)
    return fast, exact


def load_open_clip_loss():
    spec = importlib.util.find_spec("open_clip")
    if spec is None:
        pytest.skip("open-clip-torch is not installed (pip install --no-deps open-clip-torch)")
    path = os.path.join(spec.submodule_search_locations[0], "loss.py")
    mspec = importlib.util.spec_from_file_location("open_clip_loss", path)
    module = importlib.util.module_from_spec(mspec)
    mspec.loader.exec_module(module)  # `import open_clip` would fail: it needs torchvision
    return module


# ------------------------------------------------------------------------------------ reference = spec
@pytest.mark.parametrize("n,d", [(1, 4), (8, 16), (33, 7)])
def test_reference_matches_open_clip(n, d):
    oc = load_open_clip_loss()
    g = _gen(n)
    img = F.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=1)
    txt = F.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=1)
    results = []
    for fn in (
        lambda i, t, s: oc.ClipLoss()(i, t, s),
        lambda i, t, s: xloss.reference.info_nce(i, t, logit_scale=s),
    ):
        i = img.clone().requires_grad_(True)
        t = txt.clone().requires_grad_(True)
        log_s = torch.tensor(1 / 0.07, dtype=torch.float64).log().requires_grad_(True)
        loss = fn(i, t, log_s.exp())
        loss.backward()
        results.append((loss.detach(), i.grad, t.grad, log_s.grad))
    for a, b in zip(results[1], results[0]):  # loss, d img, d txt, d log_scale
        assert_close64(a, b)


def _ce_by_hand(q, k, s, labels, symmetric, eps):
    """Rows with F.cross_entropy; columns built one by one: column y_i of the logits over all queries."""
    logits = s * q @ k.T  # [N, M]
    n = q.shape[0]
    rows = F.cross_entropy(logits, labels, label_smoothing=eps, reduction="none")
    if not symmetric:
        return rows
    columns = torch.stack([logits[:, int(labels[i])] for i in range(n)])  # [N, N]: row i = column y_i
    cols = F.cross_entropy(columns, torch.arange(n), label_smoothing=eps, reduction="none")
    return (rows + cols) / 2


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("eps", [0.0, 0.1, 1.0])
@pytest.mark.parametrize("n,m,kind", [(6, 11, "perm"), (6, 11, "dup"), (6, 6, None), (11, 6, "dup")])
def test_reference_matches_cross_entropy(symmetric, eps, n, m, kind):
    q, k, labels = make_inputs(n, m, 5, kind, seed=3, dtype=torch.float64)
    labels_full = torch.arange(n) if labels is None else labels
    expected = _ce_by_hand(q, k, 2.5, labels_full, symmetric, eps)
    for reduction, reduce in (("none", lambda t: t), ("mean", torch.mean), ("sum", torch.sum)):
        got = xloss.reference.info_nce(
            q,
            k,
            logit_scale=2.5,
            labels=labels,
            symmetric=symmetric,
            label_smoothing=eps,
            reduction=reduction,
        )
        assert_close64(got, reduce(expected))


def test_reference_default_labels_extra_negatives():
    """M > N with labels=None means labels=arange(N): keys N..M-1 are negatives only."""
    q, k, _ = make_inputs(5, 9, 4, seed=4, dtype=torch.float64)
    expected = _ce_by_hand(q, k, 1.0, torch.arange(5), True, 0.0)
    assert_close64(xloss.reference.info_nce(q, k, reduction="none"), expected)


# --------------------------------------------------------------------------- CPU path vs reference
# Every shape × every option combination; the scale kind (float / tensor / tensor temperature) rotates so
# that each kind meets every option combination and every shape while the grid stays at 126 cases per dtype.
SCALE_KINDS = ("tensor", "float", "temperature")
GRID = [
    pytest.param(
        shape,
        sym,
        eps,
        red,
        SCALE_KINDS[(i + j) % 3],
        id=f"{shape}-{'sym' if sym else 'oneway'}-eps{eps}-{red}-{SCALE_KINDS[(i + j) % 3]}",
    )
    for i, shape in enumerate(SHAPES)
    for j, (sym, eps, red) in enumerate(
        (sym, eps, red) for sym in (True, False) for eps in (0.0, 0.1, 1.0) for red in ("mean", "sum", "none")
    )
]


@pytest.mark.parametrize("shape,symmetric,eps,reduction,scale_kind", GRID)
def test_cpu_matches_reference_fp64(shape, symmetric, eps, reduction, scale_kind):
    n, m, kind = SHAPES[shape]
    q, k, labels = make_inputs(n, m, 5 if n == 129 else D, kind, seed=n + m, dtype=torch.float64)
    opts = {
        "labels": labels, "symmetric": symmetric, "label_smoothing": eps, "reduction": reduction, "scale_kind": scale_kind
    }
    got = run(cpu_loss, q, k, **opts)
    exp = run(ref_loss, q, k, **opts)
    assert len(got) == len(exp) == (2 if scale_kind == "float" else 3) + 1
    for name, a, b in zip(("loss", "d query", "d key", "d scale"), got, exp):
        assert a.dtype == torch.float64, name
        assert a.shape == b.shape, name
        assert_close64(a, b)
    assert got[0].shape == ((n,) if reduction == "none" else ())


@pytest.mark.parametrize("shape,symmetric,eps,reduction,scale_kind", GRID)
def test_cpu_fp32_no_worse_than_naive(shape, symmetric, eps, reduction, scale_kind):
    n, m, kind = SHAPES[shape]
    compare_fp32(
        n,
        m,
        kind,
        seed=n * m,
        d=5 if n == 129 else D,
        symmetric=symmetric,
        label_smoothing=eps,
        reduction=reduction,
        scale_kind=scale_kind,
    )


@pytest.mark.parametrize(
    "symmetric,eps,reduction,kind",
    [(True, 0.0, "mean", None), (True, 0.1, "none", None), (False, 0.1, "sum", "dup")],
)
def test_cpu_n1000(symmetric, eps, reduction, kind):
    n = m = 1000
    opts = {"symmetric": symmetric, "label_smoothing": eps, "reduction": reduction}
    q, k, labels = make_inputs(n, m, 8, kind, seed=1000, dtype=torch.float64)
    got = run(cpu_loss, q, k, labels=labels, **opts)
    exp = run(ref_loss, q, k, labels=labels, **opts)
    for a, b in zip(got, exp):
        assert_close64(a, b)
    compare_fp32(n, m, kind, seed=1000, d=8, **opts)


def test_cpu_extra_negatives_n_ne_m_large():
    """N=129 queries against M=1000 keys with random distinct positives."""
    for sym in (True, False):
        compare_fp32(129, 1000, "perm", seed=7, d=8, symmetric=sym, label_smoothing=0.1, reduction="none")


@pytest.mark.parametrize("rows_mb", [None, "1e-5"], ids=["one-strip", "one-row-strips"])
@pytest.mark.parametrize("n,m", [(1, 1), (7, 19), (19, 7), (129, 33)])
def test_cpu_engine_primitives(monkeypatch, n, m, rows_mb):
    """The two sweeps of cpu.py against their definitions, with weights of both signs and zeros."""
    if rows_mb is None:
        monkeypatch.delenv("XLOSS_CPU_TILE_MB", raising=False)
    else:
        monkeypatch.setenv("XLOSS_CPU_TILE_MB", rows_mb)
    q, k, _ = make_inputs(n, m, 5, seed=n + 2 * m, dtype=torch.float64)
    s = torch.tensor(3.0, dtype=torch.float64)
    z = s * q @ k.T
    keep = _cpu.keeps_logits(n, m, 8)
    assert keep == (rows_mb is None)
    row, col, z_pos, kept = _cpu.lse(q, k, s, True, torch.arange(n) % m, keep)
    if rows_mb is None:  # small problem: the logits are kept for backward
        assert_close64(kept, z)
    else:
        assert kept is None
    assert_close64(z_pos, z[torch.arange(n), torch.arange(n) % m])
    assert row.shape == (2, n) and col.shape == (2, m)
    assert_close64(row[0], z.amax(1))
    assert_close64(col[0], z.amax(0))
    assert_close64(row[0] + row[1], torch.logsumexp(z, 1))
    assert_close64(col[0] + col[1], torch.logsumexp(z, 0))
    row1, none, _, _ = _cpu.lse(q, k, s, False, torch.arange(n) % m)
    assert none is None
    assert_close64(row1, row)
    g = _gen(5)
    a = torch.randn(n, generator=g, dtype=torch.float64)
    w = torch.randn(m, generator=g, dtype=torch.float64)
    a[0] = 0.0
    w[-1] = 0.0
    p_rows = a[:, None] * torch.softmax(z, 1)
    p = p_rows + w * torch.softmax(z, 0)
    dq, dk = _cpu.grad(q, k, s, row, col, a, w)
    assert_close64(dq, p @ k)
    assert_close64(dk, p.T @ q)
    kept_before = z.clone()
    dq, dk = _cpu.grad(q, k, s, row, col, a, w, logits=z)  # reusing kept logits: same result, z untouched
    assert_close64(dq, p @ k)
    assert_close64(dk, p.T @ q)
    assert torch.equal(z, kept_before)
    dq, dk = _cpu.grad(q, k, s, row, None, a.abs(), None)  # one-way, all weights >= 0
    assert_close64(dq, a.abs()[:, None] * torch.softmax(z, 1) @ k)
    assert_close64(dk, (a.abs()[:, None] * torch.softmax(z, 1)).T @ q)
    # half inputs are computed in fp32
    row_h, _, _, _ = _cpu.lse(q.half(), k.half(), s.float(), False, torch.zeros(n, dtype=torch.long))
    assert row_h.dtype == torch.float32
    assert _cpu.accumulation_dtype(torch.bfloat16) == _cpu.accumulation_dtype(torch.float16) == torch.float32
    assert _cpu.accumulation_dtype(torch.float64) == torch.float64


@pytest.mark.parametrize("q_dtype,s_dtype", [(torch.float64, torch.float32), (torch.float32, torch.float64)])
def test_scale_dtype_differs_from_inputs(q_dtype, s_dtype):
    """A scale tensor of another float dtype works and its gradient keeps the scale's dtype."""
    q, k, labels = make_inputs(7, 9, seed=31, labels_kind="dup", dtype=q_dtype)
    grads = []
    for fn in (cpu_loss, ref_loss):
        s = torch.tensor(SCALE, dtype=s_dtype, requires_grad=True)
        out = fn(q, k, logit_scale=s, labels=labels, label_smoothing=0.1)
        (g,) = torch.autograd.grad(out, [s], torch.tensor(-1.5, dtype=out.dtype))
        assert g.dtype == s_dtype
        grads.append(g)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- scale and temperature
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_temperature_tensor_gets_gradient(dtype):
    q, k, _ = make_inputs(7, 7, seed=11, dtype=dtype)
    t = torch.tensor(0.25, dtype=dtype, requires_grad=True)
    loss = xloss.info_nce(q, k, temperature=t, backend="cpu")
    loss.backward()
    assert t.grad is not None and torch.isfinite(t.grad) and t.grad != 0
    # d loss/d τ = -ds/s²... checked against the reference, and against the logit_scale gradient
    t_ref = t.detach().clone().requires_grad_(True)
    xloss.reference.info_nce(q, k, temperature=t_ref).backward()
    s = torch.tensor(4.0, dtype=dtype, requires_grad=True)
    xloss.info_nce(q, k, logit_scale=s, backend="cpu").backward()
    rtol = 1e-10 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(t.grad, t_ref.grad, rtol=rtol, atol=0)
    torch.testing.assert_close(t.grad, -s.grad / 0.25**2, rtol=rtol, atol=0)


def test_temperature_equals_inverse_scale():
    q, k, _ = make_inputs(7, 9, seed=12, dtype=torch.float64)
    a = run(cpu_loss, q, k, scale_kind="temperature-float")
    b = run(cpu_loss, q, k, scale_kind="float")
    for x, y in zip(a, b):
        assert_close64(x, y)


def test_default_scale_is_one():
    q, k, _ = make_inputs(7, 7, seed=13, dtype=torch.float64)
    assert_close64(xloss.info_nce(q, k, backend="cpu"), xloss.info_nce(q, k, logit_scale=1.0, backend="cpu"))
    assert_close64(xloss.info_nce(q, k, backend="cpu"), xloss.reference.info_nce(q, k))


@pytest.mark.parametrize("shape", [(), (1,), (1, 1)], ids=["0-dim", "1-D", "2-D"])
def test_tensor_logit_scale_shapes(shape):
    """A one-element tensor scale of any rank gets a gradient of its own shape."""
    q, k, _ = make_inputs(7, 7, seed=14, dtype=torch.float64)
    s = torch.full(shape, 3.0, dtype=torch.float64, requires_grad=True)
    loss = xloss.info_nce(q, k, logit_scale=s, backend="cpu")
    assert loss.shape == ()
    loss.backward()
    s_ref = torch.tensor(3.0, dtype=torch.float64, requires_grad=True)
    xloss.reference.info_nce(q, k, logit_scale=s_ref).backward()
    assert s.grad.shape == s.shape
    assert_close64(s.grad.reshape(()), s_ref.grad)


@pytest.mark.parametrize("kw", [{"logit_scale": 1 / 0.07}, {"temperature": 0.07}])
def test_float_scale_keeps_fp64_precision(kw):
    q, k, _ = make_inputs(7, 7, seed=15, dtype=torch.float64)
    assert_close64(xloss.info_nce(q, k, backend="cpu", **kw), xloss.reference.info_nce(q, k, **kw))


# ----------------------------------------------------------------------------- autograd corner cases
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_default_backward_grad_output_one(reduction):
    q, k, labels = make_inputs(7, 10, seed=16, labels_kind="perm", dtype=torch.float64)
    grads = []
    for fn in (cpu_loss, ref_loss):
        qq, kk = q.clone().requires_grad_(True), k.clone().requires_grad_(True)
        s = torch.tensor(SCALE, dtype=torch.float64, requires_grad=True)
        out = fn(qq, kk, logit_scale=s, labels=labels, label_smoothing=0.1, reduction=reduction)
        (out if out.dim() == 0 else out.sum()).backward()
        grads.append((qq.grad, kk.grad, s.grad))
    for a, b in zip(*grads):
        assert_close64(a, b)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_forward_under_no_grad(dtype, reduction):
    q, k, labels = make_inputs(9, 12, seed=17, labels_kind="dup", dtype=dtype)
    q.requires_grad_(True)
    s = torch.tensor(SCALE, requires_grad=True)
    with torch.no_grad():
        got = xloss.info_nce(
            q, k, logit_scale=s, labels=labels, reduction=reduction, label_smoothing=0.1, backend="cpu"
        )
    assert not got.requires_grad and got.grad_fn is None
    with_grad = xloss.info_nce(
        q, k, logit_scale=s, labels=labels, reduction=reduction, label_smoothing=0.1, backend="cpu"
    )
    torch.testing.assert_close(got, with_grad.detach(), rtol=0, atol=0)
    exp = xloss.reference.info_nce(
        q.detach().double(),
        k.double(),
        logit_scale=SCALE,
        labels=labels,
        reduction=reduction,
        label_smoothing=0.1,
    )
    torch.testing.assert_close(got.double(), exp, rtol=1e-10 if dtype == torch.float64 else 1e-5, atol=1e-12)


@pytest.mark.parametrize("which", ["query", "key", "scale", "query+scale", "nothing"])
def test_inputs_without_grad(which):
    q, k, labels = make_inputs(7, 11, seed=18, labels_kind="perm", dtype=torch.float64)
    results = []
    for fn in (cpu_loss, ref_loss):
        qq = q.clone().requires_grad_("query" in which)
        kk = k.clone().requires_grad_(which == "key")
        s = torch.tensor(SCALE, dtype=torch.float64, requires_grad="scale" in which)
        out = fn(qq, kk, logit_scale=s, labels=labels, label_smoothing=0.1)
        params = [t for t in (qq, kk, s) if t.requires_grad]
        assert out.requires_grad == bool(params)
        grads = torch.autograd.grad(out, params, torch.tensor(0.3, dtype=torch.float64)) if params else ()
        results.append((out.detach(), *grads))
    for a, b in zip(*results):
        assert_close64(a, b)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_non_contiguous_inputs(dtype):
    """Transposed and strided views give the same values and gradients as contiguous copies."""
    n, m, d = 9, 13, 6
    q, k, labels = make_inputs(n, m, d, "perm", seed=19, dtype=dtype)
    q_store = q.T.contiguous().requires_grad_(True)  # [D, N]
    k_store = torch.zeros(2 * m, d, dtype=dtype)
    k_store[::2] = k
    k_store.requires_grad_(True)
    q_view, k_view = q_store.T, k_store[::2]  # [N, D] transposed, [M, D] with row stride 2·D
    assert not q_view.is_contiguous() and not k_view.is_contiguous()
    opts = {"logit_scale": SCALE, "labels": labels, "label_smoothing": 0.1, "reduction": "none"}
    out = xloss.info_nce(q_view, k_view, backend="cpu", **opts)
    go = grad_output(out)
    out.backward(go)
    qc, kc = q.clone().requires_grad_(True), k.clone().requires_grad_(True)
    out_c = xloss.info_nce(qc, kc, backend="cpu", **opts)
    out_c.backward(go)
    rtol = 1e-12 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(out, out_c, rtol=rtol, atol=rtol)
    torch.testing.assert_close(q_store.grad.T, qc.grad, rtol=rtol, atol=rtol * 1e-2)
    torch.testing.assert_close(k_store.grad[::2], kc.grad, rtol=rtol, atol=rtol * 1e-2)
    assert (k_store.grad[1::2] == 0).all()


def test_same_tensor_as_query_and_key():
    """q is k (self-similarity): autograd adds both gradients."""
    x, _, _ = make_inputs(8, 8, seed=20, dtype=torch.float64)
    grads = []
    for fn in (cpu_loss, ref_loss):
        xx = x.clone().requires_grad_(True)
        fn(xx, xx, logit_scale=SCALE).backward()
        grads.append(xx.grad)
    assert_close64(*grads)


# ----------------------------------------------------------------------------- strips of the CPU engine
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("n,m,kind", [(129, 129, None), (7, 19, "perm"), (19, 7, "dup"), (1, 1, None)])
@pytest.mark.parametrize("symmetric", [True, False])
def test_many_strips_equal_one_strip(monkeypatch, dtype, n, m, kind, symmetric):
    q, k, labels = make_inputs(n, m, 6, kind, seed=21 + n, dtype=dtype)
    opts = {"labels": labels, "symmetric": symmetric, "label_smoothing": 0.1, "reduction": "none"}
    monkeypatch.delenv("XLOSS_CPU_TILE_MB", raising=False)
    assert _cpu._strip_rows(n, m, 8) == n  # default budget: a single strip
    one = run(cpu_loss, q, k, **opts)
    monkeypatch.setenv("XLOSS_CPU_TILE_MB", "1e-5")
    assert _cpu._strip_rows(n, m, 4) == 1  # one row per strip
    many = run(cpu_loss, q, k, **opts)
    rtol = 1e-12 if dtype == torch.float64 else 2e-6
    for a, b in zip(many, one):
        torch.testing.assert_close(a, b, rtol=rtol, atol=rtol * max(1.0, float(b.abs().max())))
    if dtype == torch.float32:
        naive = run(ref_loss, q, k, **opts)
        exact = run(ref_loss, q.double(), k.double(), **opts)
        check_fp32(many, naive, exact, q, k, SCALE, "none")


def test_many_strips_n1000(monkeypatch):
    monkeypatch.setenv("XLOSS_CPU_TILE_MB", "0.01")
    assert 1 < -(-1000 // _cpu._strip_rows(1000, 1000, 8)) <= 1000
    q, k, labels = make_inputs(1000, 1000, 4, "dup", seed=22, dtype=torch.float64)
    got = run(cpu_loss, q, k, labels=labels, label_smoothing=0.1)
    exp = run(ref_loss, q, k, labels=labels, label_smoothing=0.1)
    for a, b in zip(got, exp):
        assert_close64(a, b)


# ----------------------------------------------------------------------------------------- gradcheck
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("eps", [0.0, 0.1])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("n,m,labels", [(3, 3, None), (3, 5, [4, 0, 2]), (4, 3, [1, 1, 0, 2])])
def test_gradcheck_cpu(symmetric, eps, reduction, n, m, labels):
    g = _gen(n * 10 + m)
    q = torch.randn(n, 4, generator=g, dtype=torch.float64, requires_grad=True)
    k = torch.randn(m, 4, generator=g, dtype=torch.float64, requires_grad=True)
    s = torch.tensor(1.7, dtype=torch.float64, requires_grad=True)
    lab = None if labels is None else torch.tensor(labels)

    def f(q, k, s):
        return xloss.info_nce(
            q,
            k,
            logit_scale=s,
            labels=lab,
            symmetric=symmetric,
            label_smoothing=eps,
            reduction=reduction,
            backend="cpu",
        )

    assert torch.autograd.gradcheck(f, (q, k, s), eps=1e-6, atol=1e-7, rtol=1e-5)


def test_gradcheck_cpu_temperature(monkeypatch):
    monkeypatch.setenv("XLOSS_CPU_TILE_MB", "0.00001")  # and with one-row strips
    g = _gen(99)
    q = torch.randn(4, 3, generator=g, dtype=torch.float64, requires_grad=True)
    k = torch.randn(6, 3, generator=g, dtype=torch.float64, requires_grad=True)
    t = torch.tensor(0.6, dtype=torch.float64, requires_grad=True)

    def f(q, k, t):
        return xloss.info_nce(q, k, temperature=t, label_smoothing=0.2, reduction="none", backend="cpu")

    assert torch.autograd.gradcheck(f, (q, k, t), eps=1e-6, atol=1e-7, rtol=1e-5)


# ------------------------------------------------------------------------------ extreme, valid input
def extreme_inputs(case):
    """Valid inputs with large logits.  scale100: unit vectors and open_clip's maximum logit scale, some exact
    matches (logits of exactly ±100); norm30: features ×30 with scale 1, logits up to ±900 (exp overflows
    fp32 far earlier)."""
    if case == "scale100":
        q, k, labels = make_inputs(33, 33, 8, None, seed=23)
        k[:5] = q[:5]
        k[5] = -q[5]
        return q, k, labels, 100.0
    q, k, labels = make_inputs(17, 23, 8, "perm", seed=24)
    return 30 * q, 30 * k, labels, 1.0


EXTREME = [
    pytest.param(case, sym, red, id=f"{case}-{'sym' if sym else 'oneway'}-{red}")
    for case in ("scale100", "norm30")
    for sym in (True, False)
    for red in ("none", "mean")
]


@pytest.mark.parametrize("case,symmetric,reduction", EXTREME)
def test_extreme_fp64(case, symmetric, reduction):
    q, k, labels, scale = extreme_inputs(case)
    q, k = q.double(), k.double()
    opts = {"labels": labels, "symmetric": symmetric, "label_smoothing": 0.1, "reduction": reduction, "scale": scale}
    got = run(cpu_loss, q, k, **opts)
    exp = run(ref_loss, q, k, **opts)
    for a, b in zip(got, exp):
        assert torch.isfinite(a).all()
        assert_close64(a, b)


@pytest.mark.parametrize("case,symmetric,reduction", EXTREME)
def test_extreme_fp32(case, symmetric, reduction):
    """Finite, and as accurate as fp32 allows for logits of this size (roundings at the size of |z|)."""
    q, k, labels, scale = extreme_inputs(case)
    fast, _ = compare_fp32_inputs(
        q,
        k,
        labels,
        logit_rounding=True,
        symmetric=symmetric,
        label_smoothing=0.1,
        reduction=reduction,
        scale=scale,
    )
    assert all(torch.isfinite(t).all() for t in fast)
    assert torch.isfinite(xloss.info_nce(q, k, logit_scale=scale, labels=labels, backend="cpu"))


@pytest.mark.parametrize("case", ["scale100", "norm30"])
def test_fp32_large_logits_no_worse_than_naive(case):
    """The plain cut-cross-entropy rule on large logits.  With the LSE kept as one fp32 number this failed
    (norm30 one-way reduction='none': d query error 1.3e-3 vs naive 1.5e-5); keeping the row/column max
    apart from the log-sum (``p = exp((z - max) - log_sum)``, what ``log_softmax`` does) gives the naive error."""
    q, k, labels, scale = extreme_inputs(case)
    for sym in (True, False):
        for red in ("none", "mean"):
            compare_fp32_inputs(q, k, labels, symmetric=sym, label_smoothing=0.1, reduction=red, scale=scale)


@pytest.mark.parametrize(
    "dtype,grad_rtol",
    [(torch.float16, 2e-3), (torch.bfloat16, 1.6e-2)],
    ids=["fp16", "bf16"],
)
@pytest.mark.parametrize("case", ["unit-scale4", "unit-scale100", "norm30-scale1"])
def test_half_inputs(dtype, grad_rtol, case):
    """fp16/bf16 inputs are computed in fp32: the loss matches the fp64 reference of the same rounded inputs
    to fp32 accuracy (and beats the naive half-precision reference); gradients come back in the input dtype,
    right to that dtype's rounding."""
    scale = {"unit-scale4": 4.0, "unit-scale100": 100.0, "norm30-scale1": 1.0}[case]
    q, k, labels = make_inputs(21, 29, 8, "perm", seed=25)
    if case == "norm30-scale1":
        q, k = 30 * q, 30 * k
    q, k = q.to(dtype), k.to(dtype)
    opts = {"labels": labels, "label_smoothing": 0.1, "reduction": "none", "scale": scale}
    got = run(cpu_loss, q, k, **opts)
    exact = run(ref_loss, q.double(), k.double(), **opts)
    naive = run(ref_loss, q, k, **opts)
    loss, dq, dk, ds = got
    assert loss.dtype == torch.float32, "half inputs give an fp32 loss"
    assert dq.dtype == dk.dtype == dtype
    assert ds.dtype == torch.float32  # the scale tensor is fp32
    assert all(torch.isfinite(t.float()).all() for t in got)
    z_max = term_magnitudes(q, k, scale, grad_output(loss), "none")[0]
    assert_no_worse(loss, naive[0], exact[0], "loss", magnitude=z_max)
    torch.testing.assert_close(loss.double(), exact[0], rtol=1e-5, atol=1e-5 * float(exact[0].abs().max()))
    torch.testing.assert_close(ds.double(), exact[3], rtol=1e-4, atol=1e-6)
    for name, a, r, b in (("d query", dq, naive[1], exact[1]), ("d key", dk, naive[2], exact[2])):
        torch.testing.assert_close(
            a.double(),
            b,
            rtol=grad_rtol,
            atol=grad_rtol * float(b.abs().max()),
            msg=f"{name}: fast path vs fp64 reference",
        )
        # the result is rounded to the input dtype: allow one rounding of that dtype on top of the naive error
        assert_no_worse(
            a, r.float(), b, name, slack_ulps=torch.finfo(dtype).eps / torch.finfo(torch.float32).eps
        )


# --------------------------------------------------------------------------------------------- backends
def test_auto_picks_chunked_on_cpu(monkeypatch):
    monkeypatch.delenv("XLOSS_BACKEND", raising=False)
    assert _dispatch.resolve("info_nce", "auto", torch.device("cpu"), torch.float32) == "chunked"
    # the dense definition for a small problem on one process (DENSE_CELLS), never across ranks
    cpu = torch.device("cpu")
    assert _dispatch.resolve("info_nce", "auto", cpu, torch.float32, local=True, cells=7 * 7) == "dense"
    assert _dispatch.resolve("info_nce", "auto", cpu, torch.float32, local=False, cells=7 * 7) == "chunked"
    big = _dispatch.DENSE_CELLS["info_nce"] + 1
    assert _dispatch.resolve("info_nce", "auto", cpu, torch.float32, local=True, cells=big) == "chunked"
    assert _dispatch.resolve("info_nce", "cpu", torch.device("cpu"), torch.float32) == "chunked"  # old alias
    assert _dispatch.available_backends()["chunked"] and _dispatch.available_backends()["reference"]
    q, k, _ = make_inputs(7, 7, seed=26)
    q.requires_grad_(True)
    loss = xloss.info_nce(q, k, logit_scale=SCALE, backend="cpu")
    assert type(loss.grad_fn).__name__ == "InfoNCEFunctionBackward"
    torch.testing.assert_close(loss, xloss.info_nce(q, k, logit_scale=SCALE, backend="chunked"), rtol=0, atol=0)
    small = xloss.info_nce(q, k, logit_scale=SCALE)  # "auto": 7 x 7 is computed densely
    assert type(small.grad_fn).__name__ != "InfoNCEFunctionBackward"
    torch.testing.assert_close(small, loss, rtol=1e-12, atol=1e-12)


def test_backend_reference_is_the_reference(monkeypatch):
    monkeypatch.delenv("XLOSS_BACKEND", raising=False)
    q, k, labels = make_inputs(7, 11, seed=27, labels_kind="dup")
    q.requires_grad_(True)
    got = xloss.info_nce(
        q, k, logit_scale=SCALE, labels=labels, label_smoothing=0.1, reduction="none", backend="reference"
    )
    exp = xloss.reference.info_nce(
        q, k, logit_scale=SCALE, labels=labels, label_smoothing=0.1, reduction="none"
    )
    assert type(got.grad_fn).__name__ != "InfoNCEFunctionBackward"
    torch.testing.assert_close(got, exp, rtol=0, atol=0)


@pytest.mark.parametrize(
    "env,expected",
    [("reference", "reference"), ("cpu", "chunked"), ("chunked", "chunked"), ("auto", "dense"), ("", "dense"),
     ("dense", "dense"), (" reference ", "reference")],
)
def test_xloss_backend_env_overrides_auto(monkeypatch, env, expected):
    monkeypatch.setenv("XLOSS_BACKEND", env)
    cpu = torch.device("cpu")
    assert _dispatch.resolve("info_nce", "auto", cpu, torch.float32, local=True, cells=7 * 7) == expected
    # an explicit choice is not overridden
    assert _dispatch.resolve("info_nce", "cpu", cpu, torch.float32) == "chunked"
    assert _dispatch.resolve("info_nce", "reference", cpu, torch.float32) == "reference"
    q, k, _ = make_inputs(7, 7, seed=28)
    q.requires_grad_(True)
    loss = xloss.info_nce(q, k)
    is_fast = type(loss.grad_fn).__name__ == "InfoNCEFunctionBackward"
    assert is_fast == (expected == "chunked")


def test_cpu_path_stores_nothing_n_by_m(monkeypatch):
    """The autograd graph keeps the inputs and O(N+M) vectors only (SPEC §1: nothing N×M is stored), except
    that a problem whose whole logits fit the working budget keeps them (3 GEMM sweeps instead of 4)."""
    n, m = 64, 96
    q, k, _ = make_inputs(n, m, 4, seed=29)
    q.requires_grad_(True)
    k.requires_grad_(True)
    monkeypatch.setenv("XLOSS_CPU_TILE_MB", str(2 * n * m * 4 / 2**20))  # two strips fit, the logits do not
    loss = xloss.info_nce(q, k, logit_scale=SCALE, backend="cpu")
    assert all(t is None or t.numel() < n * m for t in loss.grad_fn.saved_tensors)
    monkeypatch.setenv("XLOSS_CPU_TILE_MB", str(3 * n * m * 4 / 2**20))  # logits + two strips fit
    loss = xloss.info_nce(q, k, logit_scale=SCALE, backend="cpu")
    big = [t for t in loss.grad_fn.saved_tensors if t is not None and t.numel() >= n * m]
    assert [tuple(t.shape) for t in big] == [(n, m)]
    loss.backward(retain_graph=True)
    first = (q.grad.clone(), k.grad.clone())
    q.grad, k.grad = None, None
    loss.backward()  # a second backward must not see logits modified by the first
    torch.testing.assert_close((q.grad, k.grad), first, rtol=0, atol=0)


@pytest.mark.parametrize("case", ["scale100", "norm30"])
@pytest.mark.parametrize("symmetric", [True, False])
def test_fp32_peaked_loss_values_no_worse_than_naive(case, symmetric):
    """Each query's positive is its most similar key: ``max - z_pos`` must be exactly 0 as in log_softmax,
    so the fp32 per-query loss is as accurate as naive PyTorch's (the positive logit comes from the tiles)."""
    g = _gen(21)
    q = torch.nn.functional.normalize(torch.randn(64, 32, generator=g, dtype=torch.float64), dim=1)
    k = torch.nn.functional.normalize(q + 0.3 * torch.randn(64, 32, generator=g, dtype=torch.float64), dim=1)
    scale = 100.0
    if case == "norm30":
        q, k, scale = 30 * q, 30 * k, 1.0
    opts = {"logit_scale": scale, "symmetric": symmetric, "reduction": "none"}
    exact = xloss.reference.info_nce(q, k, **opts)
    fast = xloss.info_nce(q.float(), k.float(), backend="cpu", **opts).double()
    naive = xloss.reference.info_nce(q.float(), k.float(), **opts).double()
    naive_err = (naive - exact).abs().max()
    assert (fast - exact).abs().max() <= 1.5 * naive_err + 1e-7 * exact.abs().max()


# ------------------------------------------------------------------------------------ custom ops (one path)
def test_sweep_ops_opcheck():
    """The two engine sweeps as custom ops (what InfoNCEFunction calls in eager mode and under compile): schema,
    fake (shapes only) and dispatch agree; the fake's logits shape follows the keep_logits argument alone."""
    from xloss.infonce import ops

    f64 = torch.float64
    q, k = torch.randn(3, 4, dtype=f64), torch.randn(5, 4, dtype=f64)
    s, labels = torch.tensor(2.0, dtype=f64), torch.tensor([0, 4, 2])
    for need_cols, keep in ((True, True), (True, False), (False, False)):
        torch.library.opcheck(ops.info_nce_lse, (q, k, s, labels, need_cols, keep, "chunked"))
        row, col, _, logits = ops.lse(q, k, s, labels, need_cols, keep, "chunked")
        a, w = torch.rand(3, dtype=f64), (torch.rand(5, dtype=f64) if need_cols else None)
        torch.library.opcheck(ops.info_nce_grad, (q, k, s, row, col, a, w, logits, "chunked"))


def test_one_function_one_path(monkeypatch):
    """InfoNCEFunction is the family's only autograd Function and runs on every call (no compile fork)."""
    import inspect

    import xloss.infonce as fam

    functions = [c for _, c in inspect.getmembers(fam, inspect.isclass) if issubclass(c, torch.autograd.Function)]
    assert functions == [fam.InfoNCEFunction]
    src = inspect.getsource(fam)
    assert "is_compiling" not in src
    q, k, _ = make_inputs(5, 6, seed=3)
    loss = xloss.info_nce(q.requires_grad_(), k, logit_scale=SCALE, backend="chunked")
    assert type(loss.grad_fn).__name__ == "InfoNCEFunctionBackward"
    opts = fam.InfoNCEOptions()
    with pytest.raises(dataclasses.FrozenInstanceError):
        opts.symmetric = False  # frozen: options never change after the call starts


# ----------------------------------------------------------------------------- one body: engine × mode
MATRIX_OPTIONS = [
    {"symmetric": True, "label_smoothing": 0.0, "reduction": "mean"},
    {"symmetric": True, "label_smoothing": 0.1, "reduction": "sum"},
    {"symmetric": False, "label_smoothing": 0.2, "reduction": "none"},
]


@pytest.mark.parametrize("mode", engines.MODES)
@pytest.mark.parametrize("engine", engines.ENGINES)
@pytest.mark.parametrize("opts", MATRIX_OPTIONS, ids=lambda o: "-".join(str(v) for v in o.values()))
def test_engine_mode_matrix(engine, mode, opts):
    """Every engine, eager and compiled, against the fp64 reference: value, d query, d key, d scale."""
    dtype = engines.dtype_of(engine)
    q64, k64, labels = make_inputs(7, 9, labels_kind="dup", seed=40, dtype=torch.float64)
    labels = labels.to(engines.DEVICE)

    def inputs(dt):
        return [t.to(engines.DEVICE, dt).requires_grad_() for t in (q64, k64, torch.tensor(SCALE, dtype=torch.float64))]

    def loss(backend):
        return lambda q, k, s: xloss.info_nce(q, k, logit_scale=s, labels=labels, backend=backend, **opts)

    got = engines.run(loss(engine), inputs(dtype), mode)
    gold = engines.run(loss("reference"), inputs(torch.float64), "eager")
    naive = engines.run(loss("reference"), inputs(dtype), "eager")
    go = torch.linspace(0.5, 1.5, gold[0].numel(), dtype=torch.float64).reshape(gold[0].shape)
    mags = term_magnitudes(q64, k64, SCALE, go, opts["reduction"])
    engines.check_engine(engine, got, gold, naive, ["loss", "d query", "d key", "d scale"], mags)
    assert got[0].dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
