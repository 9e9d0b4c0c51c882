"""Soft targets (issue 12): in-batch distillation (``xloss.distill_loss``, ``xloss.nn.DistillClipLoss``) and CWCL
(``xloss.cwcl_loss``) against open_clip's ``DistillClipLoss`` and a literal implementation of the CWCL paper's
formula; every engine against the references."""

from __future__ import annotations

import math

import engines
import pytest
import torch
import torch.nn.functional as F
from test_modules import load_open_clip_loss
from tolerance import assert_close64

import xloss
from xloss import reference

F64 = torch.float64


def _features(n, d, seed, m=None, e=None):
    g = torch.Generator().manual_seed(seed)
    q = F.normalize(torch.randn(n, d, generator=g, dtype=F64), dim=1)
    k = F.normalize(torch.randn(m or n, d, generator=g, dtype=F64), dim=1)
    tq = F.normalize(torch.randn(n, e or d, generator=g, dtype=F64), dim=1)
    tk = F.normalize(torch.randn(m or n, e or d, generator=g, dtype=F64), dim=1)
    return q, k, tq, tk


def _value_and_grads(fn, *tensors):
    leaves = [t.detach().clone().requires_grad_() for t in tensors]
    out = fn(*leaves)
    go = torch.linspace(0.5, 1.5, out.numel(), dtype=out.dtype).reshape(out.shape)
    return [out.detach(), *torch.autograd.grad(out, leaves, go)]


# ---------------------------------------------------------------------------------------------- distillation


def test_distill_matches_open_clip_dist_loss():
    oc = load_open_clip_loss().DistillClipLoss()
    q, k, tq, tk = _features(11, 6, seed=1, e=9)

    def theirs(a, b, s):
        z, t = s * a @ b.T, 25.0 * tq @ tk.T
        return (oc.dist_loss(t, z) + oc.dist_loss(t.T, z.T)) / 2

    def ours(a, b, s):
        return xloss.distill_loss(a, b, tq, tk, logit_scale=s, teacher_logit_scale=25.0)

    s = torch.tensor(14.0, dtype=F64)
    for x, y, name in zip(_value_and_grads(ours, q, k, s), _value_and_grads(theirs, q, k, s),
                          ("value", "d query", "d key", "d scale")):
        assert_close64(x, y, what=f"distill {name}")


def test_distill_clip_loss_module_matches_open_clip():
    oc = load_open_clip_loss()
    q, k, tq, tk = _features(9, 6, seed=2, e=8)
    res = []
    for mod in (oc.DistillClipLoss(), xloss.nn.DistillClipLoss()):
        a, b = q.clone().requires_grad_(), k.clone().requires_grad_()
        s = torch.tensor(math.log(12.0), dtype=F64, requires_grad=True)
        c, d = mod(a, b, s.exp(), tq, tk, torch.tensor(30.0, dtype=F64))
        (0.7 * c + 1.3 * d).backward()
        res.append([c.detach(), d.detach(), a.grad, b.grad, s.grad])
    for x, y, name in zip(res[1], res[0], ("contrastive", "distill", "d image", "d text", "d logit_scale")):
        assert_close64(x, y, what=f"DistillClipLoss {name}")
    out = xloss.nn.DistillClipLoss()(q, k, 10.0, tq, tk, 20.0, output_dict=True)
    assert set(out) == {"contrastive_loss", "distill_loss"}


def test_teacher_gets_no_gradient():
    q, k, tq, tk = _features(5, 4, seed=3)
    tq, tk = tq.requires_grad_(), tk.requires_grad_()
    loss = xloss.distill_loss(q.requires_grad_(), k, tq, tk, logit_scale=5.0, teacher_logit_scale=5.0)
    loss.backward()
    assert tq.grad is None and tk.grad is None and q.grad is not None


def test_distill_is_zero_gradient_when_student_equals_teacher():
    """Soft CE against the student's own softmax: the gradient (softmax(z) − softmax(t)) vanishes."""
    q, k, _, _ = _features(6, 4, seed=4)
    a, b = q.clone().requires_grad_(), k.clone().requires_grad_()
    xloss.distill_loss(a, b, q, k, logit_scale=7.0, teacher_logit_scale=7.0).backward()
    assert float(a.grad.abs().max()) < 1e-12 and float(b.grad.abs().max()) < 1e-12


# ----------------------------------------------------------------------------------------------------- CWCL


def _cwcl_paper(q, k, s, u, v, symmetric):
    """The paper's formula, one row at a time with Python sums (Srinivasa et al. 2023, eq. for L_{U→V})."""
    n = q.shape[0]

    def one_way(x, y, t):
        total = 0.0
        for i in range(n):
            w = [0.5 * float(t[i] @ t[j]) + 0.5 for j in range(n)]
            logits = s * (x[i] @ y.T)
            logp = logits - torch.logsumexp(logits, 0)
            total = total - sum(w[j] * logp[j] for j in range(n)) / sum(w)
        return total / n

    rows = one_way(q, k, u)
    return rows if not symmetric else (rows + one_way(k, q, v)) / 2


@pytest.mark.parametrize("symmetric", [False, True])
def test_cwcl_is_the_paper_formula(symmetric):
    q, k, u, v = _features(7, 5, seed=5, e=6)
    got = xloss.cwcl_loss(q, k, temperature=0.2, query_targets=u, key_targets=v if symmetric else None,
                          symmetric=symmetric)
    assert_close64(got, _cwcl_paper(q, k, 5.0, u, v, symmetric), what="CWCL vs the paper's formula")
    want = reference.cwcl_loss(q, k, temperature=0.2, query_targets=u, key_targets=v if symmetric else None,
                               symmetric=symmetric)
    assert_close64(want, got, what="CWCL reference")


def test_cwcl_default_targets_are_the_detached_inputs():
    q, k, _, _ = _features(6, 4, seed=6)
    a = xloss.cwcl_loss(q, k, logit_scale=3.0, symmetric=True)
    b = xloss.cwcl_loss(q, k, logit_scale=3.0, symmetric=True, query_targets=q, key_targets=k)
    assert_close64(a, b, what="default targets")
    x = q.clone().requires_grad_()
    xloss.cwcl_loss(x, k, logit_scale=3.0).backward()
    y = q.clone().requires_grad_()
    xloss.cwcl_loss(y, k, logit_scale=3.0, query_targets=q).backward()
    assert_close64(x.grad, y.grad, what="targets carry no gradient")


# ------------------------------------------------------------------------------------------------- engines

CASES = [
    ("distill", {"symmetric": True, "reduction": "mean"}),
    ("distill", {"symmetric": False, "reduction": "none"}),
    ("distill", {"symmetric": True, "reduction": "none"}),
    ("cwcl", {"symmetric": False, "reduction": "mean"}),
    ("cwcl", {"symmetric": True, "reduction": "sum"}),
    ("cwcl", {"symmetric": True, "reduction": "none"}),
]


def _call(kind, opts, tq, tk, backend):
    if kind == "distill":
        return lambda q, k, s: xloss.distill_loss(q, k, tq, tk, logit_scale=s, teacher_logit_scale=9.0,
                                                  backend=backend, **opts)
    return lambda q, k, s: xloss.cwcl_loss(q, k, logit_scale=s, query_targets=tq,
                                           key_targets=tk if opts["symmetric"] else None, backend=backend, **opts)


@pytest.mark.parametrize("mode", engines.MODES)
@pytest.mark.parametrize("engine", engines.ENGINES)
@pytest.mark.parametrize("kind, opts", CASES, ids=lambda c: str(c))
def test_engine_mode_matrix(engine, mode, kind, opts):
    dtype = engines.dtype_of(engine)
    q64, k64, tq, tk = _features(37, 19, seed=7, e=23)
    tq, tk = tq.to(engines.DEVICE, dtype), tk.to(engines.DEVICE, dtype)
    if kind == "distill" and engine == "triton" and not _has_distill_triton():
        pytest.skip("no Triton distillation engine in this build")

    def inputs(dt):
        return [t.to(engines.DEVICE, dt).requires_grad_() for t in (q64, k64, torch.tensor(6.0, dtype=F64))]

    got = engines.run(_call(kind, opts, tq, tk, engine), inputs(dtype), mode)
    gold = engines.run(_call(kind, opts, tq.double(), tk.double(), "reference"), inputs(F64), "eager")
    naive = engines.run(_call(kind, opts, tq, tk, "reference"), inputs(dtype), "eager")
    mag = 6.0
    engines.check_engine(engine, got, gold, naive, ["loss", "d query", "d key", "d scale"],
                         [mag * (37 if opts["reduction"] == "sum" else 1), mag, mag, mag * 37])


def _has_distill_triton() -> bool:
    from xloss import _dispatch

    return any(r.engine == "triton" for r in _dispatch.routes("distill"))


def test_non_square_distill_and_strips(monkeypatch):
    """M ≠ N, teacher width ≠ student width, tiny strips (column statistics merged online)."""
    monkeypatch.setenv("XLOSS_CPU_TILE_MB", "0.002")
    q, k, tq, tk = _features(23, 5, seed=8, m=31, e=7)
    for symmetric in (True, False):
        for reduction in ("mean", "sum"):
            kw = {"symmetric": symmetric, "reduction": reduction}
            got = _value_and_grads(lambda a, b, kw=kw: xloss.distill_loss(a, b, tq, tk, temperature=0.1,
                                                                          teacher_temperature=0.05, **kw), q, k)
            want = _value_and_grads(lambda a, b, kw=kw: reference.distill_loss(a, b, tq, tk, temperature=0.1,
                                                                               teacher_temperature=0.05, **kw), q, k)
            for x, y in zip(got, want):
                assert_close64(x, y, what=f"distill {kw}")


def test_gradcheck_chunked():
    q, k, tq, tk = _features(5, 3, seed=9, m=6, e=4)
    s = torch.tensor(2.0, dtype=F64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda a, b, c: xloss.distill_loss(a, b, tq, tk, logit_scale=c, teacher_logit_scale=3.0, backend="chunked"),
        (q.requires_grad_(), k.requires_grad_(), s))
    q, k, u, v = _features(5, 3, seed=10, e=4)
    assert torch.autograd.gradcheck(
        lambda a, b, c: xloss.cwcl_loss(a, b, logit_scale=c, query_targets=u, key_targets=v, symmetric=True,
                                        backend="chunked"),
        (q.requires_grad_(), k.requires_grad_(), s))


def test_meta_tensors_propagate_shapes():
    q = torch.empty(6, 4, device="meta")
    t = torch.empty(6, 5, device="meta")
    assert xloss.distill_loss(q, q, t, t, backend="chunked").shape == ()
    assert xloss.cwcl_loss(q, q, symmetric=True, reduction="none", backend="chunked").shape == (6,)


def test_half_inputs_return_float32():
    q, k, tq, tk = (t.to(torch.bfloat16) for t in _features(8, 4, seed=11))
    assert xloss.distill_loss(q, k, tq, tk).dtype == torch.float32
    assert xloss.cwcl_loss(q, k).dtype == torch.float32


# ------------------------------------------------------------------------------------------------ bad input


@pytest.mark.parametrize("call, error, match", [
    (lambda q, k, t: xloss.distill_loss(q, k, t[:4], t), ValueError, "teacher_query must have 5 rows"),
    (lambda q, k, t: xloss.distill_loss(q, k, t, t[:3]), ValueError, "teacher_key must have 5 rows"),
    (lambda q, k, t: xloss.distill_loss(q, k, t, t[:, :2]), ValueError, "same feature dimension"),
    (lambda q, k, t: xloss.distill_loss(q, k, t.to("meta"), t), ValueError, "teacher_query must be on the same"),
    (lambda q, k, t: xloss.distill_loss(q, k, t.long(), t), TypeError, "teacher_query"),
    (lambda q, k, t: xloss.distill_loss(q, k, t, t, teacher_logit_scale=1.0, teacher_temperature=1.0), ValueError,
     "teacher_logit_scale or teacher_temperature"),
    (lambda q, k, t: xloss.distill_loss(q, k, t, t, teacher_temperature=-1.0), ValueError, "teacher_temperature"),
    (lambda q, k, t: xloss.distill_loss(q, k[:4], t, t[:4], reduction="none"), ValueError, "paired batch"),
    (lambda q, k, t: xloss.cwcl_loss(q, k[:4]), ValueError, "paired batch"),
    (lambda q, k, t: xloss.cwcl_loss(q, k, query_targets=t[:3]), ValueError, "query_targets must have 5 rows"),
    (lambda q, k, t: xloss.cwcl_loss(q, k, key_targets=t, symmetric=True, query_targets=t[:, 0]), ValueError,
     "query_targets"),
    (lambda q, k, t: xloss.cwcl_loss(q, k, key_targets=t), ValueError, "symmetric=True"),
    (lambda q, k, t: xloss.cwcl_loss(q, k, symmetric=1), TypeError, "symmetric"),
])
def test_bad_input_names_the_argument(call, error, match):
    q, k, t = torch.randn(5, 3), torch.randn(5, 3), torch.randn(5, 4)
    with pytest.raises(error, match=match):
        call(q, k, t)
