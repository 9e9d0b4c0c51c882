"""Sigmoid loss with group ids (issue 11): ``y_ij = +1`` iff ``key_groups[j] == query_groups[i]``, else -1.

The reference against the definition written out by hand and against the labels path; every engine (chunked,
Triton in the interpreter, reference), eager and compiled, against the fp64 reference (values and gradients of
query, key, logit_scale and logit_bias); gradcheck of the chunked engine; the engines' block contract with
group ids; bad input.  Multi-rank runs are in tests/test_distributed.py (``_check_sigmoid_groups``).
Shapes are small and odd (the interpreter is slow; its tiles are 32).
"""

from __future__ import annotations

import importlib.util
import math

import engines
import pytest
import torch
import torch.nn.functional as F
from tolerance import assert_close64, assert_no_worse

import xloss
from xloss.sigmoid import chunked as _chunked

SCALE, BIAS = 4.0, -2.0  # exactly representable: float arguments mean the same in fp32 and fp64
F64 = torch.float64

# Query ids 5 and 6 match no key (rows without a positive); id 1 has three keys (several positives per row);
# key id 3 belongs to one query, key id 4 to none.  N = 11 > M = 9.
QG = torch.tensor([1, 0, 5, 2, 1, 3, 1, 6, 0, 1, 2])
KG = torch.tensor([0, 1, 1, 2, 0, 4, 1, 3, 4])


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def make_inputs(n, m, d=7, *, seed=0, dtype=F64):
    """L2-normalised features drawn in fp32 (casting to fp64 is exact)."""
    g = _gen(seed)
    q = F.normalize(torch.randn(n, d, generator=g), dim=1)
    k = F.normalize(torch.randn(m, d, generator=g), dim=1)
    return q.to(dtype), k.to(dtype)


def random_groups(n, m, num_groups, seed):
    """Random key ids in [0, num_groups), query ids in [0, num_groups + 2) (some queries without a key)."""
    g = _gen(seed)
    qg = torch.randint(0, num_groups + 2, (n,), generator=g)
    return qg, torch.randint(0, num_groups, (m,), generator=g)


def dense(q, k, s, b, qg, kg):
    """The per-query terms from the definition: ``-Σ_j log σ(y_ij z_ij)`` with the [N, M] sign matrix."""
    y = (qg[:, None] == kg[None, :]).to(q.dtype) * 2 - 1
    return -F.logsigmoid(y * (s * q @ k.T + b)).sum(1)


def run(fn, q, k, *, scale=SCALE, bias=BIAS, **opts):
    """``[loss, d q, d k, d scale, d bias]`` of ``fn(q, k, logit_scale=s, logit_bias=b, **opts)`` for a
    grad_output of mixed signs."""
    acc = F64 if q.dtype == F64 else torch.float32
    leaves = [t.detach().clone().requires_grad_(True)
              for t in (q, k, torch.tensor(scale, dtype=acc), torch.tensor(bias, dtype=acc))]
    out = fn(*leaves[:2], logit_scale=leaves[2], logit_bias=leaves[3], **opts)
    go = torch.linspace(-0.7, 1.3, out.numel(), dtype=out.dtype).reshape(out.shape)
    return [out.detach(), *torch.autograd.grad(out, leaves, go)]


def ref_loss(q, k, **kw):
    return xloss.reference.sigmoid_loss(q, k, **kw)


def chunked_loss(q, k, **kw):
    return xloss.sigmoid_loss(q, k, backend="chunked", **kw)


# ------------------------------------------------------------------------------------ reference = spec
def test_reference_formula_by_hand():
    """``-Σ_ij log σ(y_ij z_ij) / N`` with Python floats, ``y_ij = +1`` iff the ids match: several positives
    per row, rows without one, a key that is nobody's positive, M < N."""
    q, k = make_inputs(11, 9, 5, seed=3)
    total, rows = 0.0, []
    for i in range(11):
        row = 0.0
        for j in range(9):
            z = SCALE * float(q[i] @ k[j]) + BIAS
            y = 1.0 if int(QG[i]) == int(KG[j]) else -1.0
            row += math.log1p(math.exp(-y * z))
        rows.append(row)
        total += row
    kw = {"logit_scale": SCALE, "logit_bias": BIAS, "query_groups": QG, "key_groups": KG}
    assert abs(float(ref_loss(q, k, **kw)) - total / 11) < 1e-12
    assert abs(float(ref_loss(q, k, reduction="sum", **kw)) - total) < 1e-12
    torch.testing.assert_close(ref_loss(q, k, reduction="none", **kw), torch.tensor(rows, dtype=F64),
                               rtol=1e-13, atol=0)


def test_reference_matches_dense_sign_matrix():
    q, k = make_inputs(11, 9, seed=4)
    for reduction, reduce in (("mean", torch.mean), ("sum", torch.sum), ("none", lambda t: t)):

        def by_definition(q, k, logit_scale, logit_bias, reduce=reduce):
            return reduce(dense(q, k, logit_scale, logit_bias, QG, KG))

        got = run(ref_loss, q, k, query_groups=QG, key_groups=KG, reduction=reduction)
        exp = run(by_definition, q, k)
        for a, e in zip(got, exp):
            assert_close64(a, e)


@pytest.mark.parametrize("n,m", [(7, 7), (7, 19)])
def test_groups_of_a_permutation_are_the_labels(n, m):
    """``query_groups = labels``, ``key_groups = arange(M)`` with distinct labels: the labels loss, bit for
    bit in the reference (the same sign matrix) and to fp64 rounding on the chunked engine."""
    q, k = make_inputs(n, m, seed=n + m)
    labels = torch.randperm(m, generator=_gen(2))[:n]
    as_groups = {"query_groups": labels, "key_groups": torch.arange(m)}
    for reduction in ("mean", "sum", "none"):
        a = run(ref_loss, q, k, reduction=reduction, **as_groups)
        e = run(ref_loss, q, k, reduction=reduction, labels=labels)
        for x, y in zip(a, e):
            assert torch.equal(x, y)
        a = run(chunked_loss, q, k, reduction=reduction, **as_groups)
        for x, y in zip(a, e):
            assert_close64(x, y)


def test_default_none_groups_are_todays_call():
    """``query_groups=None, key_groups=None`` is the call without them, bit for bit."""
    q, k = make_inputs(9, 12, seed=8)
    for backend in ("chunked", "reference"):
        fn = xloss.sigmoid_loss
        a = run(fn, q, k, backend=backend, query_groups=None, key_groups=None)
        e = run(fn, q, k, backend=backend)
        for x, y in zip(a, e):
            assert torch.equal(x, y)


# ------------------------------------------------------------------------ chunked engine = reference
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("n,m,num_groups", [(1, 1, 1), (11, 9, 0), (13, 29, 4), (37, 23, 7)])
def test_chunked_matches_reference_fp64(n, m, num_groups, reduction):
    q, k = make_inputs(n, m, 5, seed=n * m)
    if num_groups == 0:
        qg, kg = QG, KG
    else:
        qg, kg = random_groups(n, m, num_groups, seed=n)
    fast = run(chunked_loss, q, k, query_groups=qg, key_groups=kg, reduction=reduction)
    exact = run(ref_loss, q, k, query_groups=qg, key_groups=kg, reduction=reduction)
    for a, e in zip(fast, exact):
        assert_close64(a, e)


@pytest.mark.parametrize("case", ["no-positive-anywhere", "all-positive"])
def test_chunked_extreme_targets(case):
    """No pair positive (every term a negative: a finite loss, not NaN) and every pair positive."""
    q, k = make_inputs(9, 13, seed=5)
    qg = torch.zeros(9, dtype=torch.long)
    kg = torch.full((13,), 1 if case == "no-positive-anywhere" else 0)
    fast = run(chunked_loss, q, k, query_groups=qg, key_groups=kg, reduction="none")
    exact = run(ref_loss, q, k, query_groups=qg, key_groups=kg, reduction="none")
    for a, e in zip(fast, exact):
        assert torch.isfinite(a).all()
        assert_close64(a, e)


# 1-row strips; 9-row strips of 4-row sub-blocks
@pytest.mark.parametrize("tile_mb,elem_bytes", [("0.00001", 1), ("0.002", 1000)])
def test_chunked_tile_boundaries(monkeypatch, tile_mb, elem_bytes):
    monkeypatch.setenv("XLOSS_CPU_TILE_MB", tile_mb)
    monkeypatch.setattr(_chunked, "ELEMENTWISE_BYTES", elem_bytes)
    assert _chunked._strip_rows(37, 29, 8) < 37
    q, k = make_inputs(37, 29, 7, seed=2)
    qg, kg = random_groups(37, 29, 5, seed=3)
    for reduction in ("mean", "none"):
        fast = run(chunked_loss, q, k, query_groups=qg, key_groups=kg, reduction=reduction)
        exact = run(ref_loss, q, k, query_groups=qg, key_groups=kg, reduction=reduction)
        for a, e in zip(fast, exact):
            assert_close64(a, e)


def test_chunked_extreme_logits_fp64():
    """|z| up to ~100 both ways on positives and negatives: softplus(t) and -y·σ(t) stay exact in fp64."""
    q, k = make_inputs(11, 9, 4, seed=9)
    for scale, bias in ((60.0, 40.0), (60.0, -40.0), (100.0, 0.0)):
        kw = {"scale": scale, "bias": bias, "query_groups": QG, "key_groups": KG, "reduction": "none"}
        fast = run(chunked_loss, q, k, **kw)
        exact = run(ref_loss, q, k, **kw)
        for a, e in zip(fast, exact):
            assert torch.isfinite(a).all()
            assert_close64(a, e)


def test_chunked_fp32_no_worse_than_naive():
    """fp32 at SigLIP's init (s = 10, b = -10), 4 positives per row on average: no further from the fp64
    result than the naive fp32 reference, plus a few roundings."""
    n, m = 64, 80
    q, k = make_inputs(n, m, 32, seed=4, dtype=torch.float32)
    qg, kg = random_groups(n, m, 20, seed=6)
    fast = run(chunked_loss, q, k, scale=10.0, bias=-10.0, query_groups=qg, key_groups=kg)
    naive = run(ref_loss, q, k, scale=10.0, bias=-10.0, query_groups=qg, key_groups=kg)
    exact = run(ref_loss, q.double(), k.double(), scale=10.0, bias=-10.0, query_groups=qg, key_groups=kg)
    assert all(f.dtype == torch.float32 for f in fast)
    # Size of the terms summed per entry (mean: 1/N each): |z| ≤ 20 per logit, s·|k|, s·|q|, |q||k|, 1.
    mags = [20.0 * m, 10.0 * m / n, 10.0, float(m), float(m)]
    for what, f, r, e, mag in zip(("loss", "dq", "dk", "ds", "db"), fast, naive, exact, mags):
        assert_no_worse(f, r, e, what, magnitude=mag)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_gradcheck_chunked(reduction):
    q, k = make_inputs(6, 5, 3, seed=1)
    qg, kg = torch.tensor([0, 1, 1, 7, 2, 0]), torch.tensor([1, 0, 1, 2, 1])
    leaves = [t.requires_grad_(True)
              for t in (q, k, torch.tensor(2.5, dtype=F64), torch.tensor(-1.5, dtype=F64))]

    def fn(q, k, s, b):
        return chunked_loss(q, k, logit_scale=s, logit_bias=b, query_groups=qg, key_groups=kg,
                            reduction=reduction)

    assert torch.autograd.gradcheck(fn, leaves)


def test_int32_ids_and_no_grad():
    q, k = make_inputs(11, 9, seed=6)
    exp = ref_loss(q, k, logit_scale=SCALE, logit_bias=BIAS, query_groups=QG, key_groups=KG)
    with torch.no_grad():
        got = chunked_loss(q.requires_grad_(), k, logit_scale=SCALE, logit_bias=BIAS, query_groups=QG.int(),
                           key_groups=KG.to(torch.int16))
    assert not got.requires_grad
    assert_close64(got, exp)


# ----------------------------------------------------------------------------- one body: engine × mode
@pytest.mark.parametrize("mode", engines.MODES)
@pytest.mark.parametrize("engine", engines.ENGINES)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_engine_mode_matrix(engine, mode, reduction):
    """Every engine, eager and compiled, against the fp64 reference: value, d query, d key, d scale, d bias,
    with several positives per row, rows without one and M < N."""
    dtype = engines.dtype_of(engine)
    q64, k64 = make_inputs(11, 9, seed=41)
    n, m = q64.shape[0], k64.shape[0]
    qg, kg = QG.to(engines.DEVICE), KG.to(engines.DEVICE)

    def inputs(dt):
        leaves = (q64, k64, torch.tensor(SCALE, dtype=F64), torch.tensor(BIAS, dtype=F64))
        return [t.detach().to(engines.DEVICE, dt).requires_grad_() for t in leaves]

    def loss(backend):
        return lambda q, k, s, b: xloss.sigmoid_loss(q, k, logit_scale=s, logit_bias=b, query_groups=qg,
                                                      key_groups=kg, reduction=reduction, backend=backend)

    got = engines.run(loss(engine), inputs(dtype), mode)
    gold = engines.run(loss("reference"), inputs(F64), "eager")
    naive = engines.run(loss("reference"), inputs(dtype), "eager")
    z = float((SCALE * q64 @ k64.T).abs().max()) + abs(BIAS)
    qn, kn = float(q64.norm(dim=1).max()), float(k64.norm(dim=1).max())
    mags = [z * n * m, SCALE * kn * m, SCALE * qn * n, qn * kn * n * m, float(n * m)]
    engines.check_engine(engine, got, gold, naive, ["loss", "d query", "d key", "d scale", "d bias"], mags)


# ------------------------------------------------------------------------------------ engine contract
def _block_expected(q, k, s, b, qg, kg, w):
    """fp64 per-row block sums and the gradients of ``Σ_i w_i ℓ_i`` (w = 1 when None), by autograd."""
    leaves = [t.detach().cpu().double().requires_grad_(True)
              for t in (q, k, torch.as_tensor(s), torch.as_tensor(b))]
    rows = dense(*leaves, qg.cpu(), kg.cpu())
    weight = torch.ones_like(rows) if w is None else w.cpu().double()
    return rows.detach(), torch.autograd.grad((rows * weight).sum(), leaves)


def test_chunked_engine_contract():
    """``forward_backward(..., labels=None, qg=, kg=)``: the block's loss sum, per-row sums, weighted rows,
    need_grad=False; the gradients of the sum (no 1/N)."""
    q, k = make_inputs(11, 9, 5, seed=6)
    s, b = torch.tensor(7.0, dtype=F64), torch.tensor(-3.0, dtype=F64)
    w = torch.randn(11, generator=_gen(3), dtype=F64)
    rows, grads = _block_expected(q, k, s, b, QG, KG, None)
    _, wgrads = _block_expected(q, k, s, b, QG, KG, w)
    loss, *got = _chunked.forward_backward(q, k, s, b, None, True, qg=QG, kg=KG)
    assert loss.dim() == 0
    assert_close64(loss, rows.sum())
    for a, e in zip(got, grads):
        assert_close64(a, e)
    out = _chunked.forward_backward(q, k, s, b, None, True, row_weight=w, per_row=True, qg=QG, kg=KG)
    assert_close64(out[0], rows)
    for a, e in zip(out[1:], wgrads):
        assert_close64(a, e)
    loss2, *none = _chunked.forward_backward(q, k, s, b, None, False, qg=QG, kg=KG)
    assert none == [None, None, None, None]
    assert_close64(loss2, loss)


def test_sweep_op_opcheck_with_groups():
    from xloss.sigmoid import ops

    q, k = torch.randn(3, 4, dtype=F64), torch.randn(5, 4, dtype=F64)
    s, b = torch.tensor(2.0, dtype=F64), torch.tensor(-1.0, dtype=F64)
    qg, kg = torch.tensor([0, 2, 9]), torch.tensor([2, 0, 0, 1, 2])
    for need_grad, weight, per_row in ((True, None, False), (False, None, True),
                                       (True, torch.rand(3, dtype=F64), False)):
        args = (q, k, s, b, None, need_grad, weight, per_row, "chunked", qg, kg)
        torch.library.opcheck(ops.sigmoid_sweep, args)


TRITON = importlib.util.find_spec("triton") is not None and engines.TRITON_RUNS


@pytest.mark.skipif(not TRITON, reason="Triton cannot run here")
@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic", "deterministic"])
@pytest.mark.parametrize("shape", [(1, 1, 1), (7, 40, 7), (40, 7, 40), (33, 70, 20)],
                         ids=lambda s: "x".join(map(str, s)))
def test_triton_engine_contract(monkeypatch, shape, deterministic):
    """The kernel's GROUPS variant across row / column blocks, the D loop, the column split (atomics) and the
    deterministic two-launch mode: fp32 against fp64, unweighted sums and weighted per-row sums."""
    from xloss.sigmoid import triton as tri

    monkeypatch.setenv("XLOSS_DETERMINISTIC", "1" if deterministic else "0")
    n, m, d = shape
    dev = engines.DEVICE
    q, k = (t.to(dev) for t in make_inputs(n, m, d, seed=n + m, dtype=torch.float32))
    qg, kg = (t.to(dev) for t in random_groups(n, m, 5, seed=d))
    w = (torch.randn(n, generator=_gen(1)) / n).to(dev)
    st, bt = torch.tensor(10.0, device=dev), torch.tensor(-5.0, device=dev)
    for weight, per_row in ((None, False), (w, True)):
        rows, grads = _block_expected(q, k, 10.0, -5.0, qg, kg, weight)
        out = tri.forward_backward(q, k, st, bt, None, True, row_weight=weight, per_row=per_row, qg=qg, kg=kg)
        expected = [rows if per_row else rows.sum(), *grads]
        for name, a, e in zip(("loss", "dq", "dk", "ds", "db"), out, expected):
            a = a.detach().cpu().double()
            assert a.shape == e.shape and torch.isfinite(a).all(), name
            err, size = float((a - e).abs().max()), max(1e-3, float(e.abs().max()))
            assert err <= 2e-5 * size, f"{name}: {err:.3e} > 2e-5 × {size:.3e}"
    rows, _ = _block_expected(q, k, 10.0, -5.0, qg, kg, None)
    out = tri.forward_backward(q, k, st, bt, None, False, per_row=True, qg=qg, kg=kg)
    assert out[1:] == (None, None, None, None)
    assert float((out[0].cpu().double() - rows).abs().max()) <= 2e-5 * max(1e-3, float(rows.abs().max()))


# ---------------------------------------------------------------------------------------- bad input
def _call(backend="chunked", **kw):
    q, k = make_inputs(4, 5)
    kw.setdefault("logit_scale", SCALE)
    kw.setdefault("logit_bias", BIAS)
    return xloss.sigmoid_loss(q, k, backend=backend, **kw)


QG4, KG5 = torch.tensor([0, 1, 1, 2]), torch.tensor([0, 1, 2, 2, 3])


@pytest.mark.parametrize("backend", ["chunked", "reference"])
@pytest.mark.parametrize(
    "kwargs,exc,match",
    [
        ({"query_groups": QG4[:3], "key_groups": KG5}, ValueError, r"query_groups must have shape \(4,\)"),
        ({"query_groups": QG4, "key_groups": KG5[:4]}, ValueError, r"key_groups must have shape \(5,\)"),
        ({"query_groups": QG4[None], "key_groups": KG5}, ValueError, r"query_groups must have shape \(4,\)"),
        ({"query_groups": QG4.double(), "key_groups": KG5}, TypeError, r"query_groups must have an integer"),
        ({"query_groups": QG4, "key_groups": KG5.float()}, TypeError, r"key_groups must have an integer"),
        ({"query_groups": QG4, "key_groups": KG5.bool()}, TypeError, r"key_groups must have an integer"),
        ({"query_groups": [0, 1], "key_groups": KG5}, TypeError, r"query_groups must be a torch.Tensor"),
        ({"query_groups": QG4, "key_groups": KG5.to("meta")}, ValueError,
         r"key_groups must be on the same device as key"),
        ({"query_groups": QG4}, ValueError, r"key_groups is missing"),
        ({"key_groups": KG5}, ValueError, r"query_groups is missing"),
        ({"query_groups": QG4, "key_groups": KG5, "labels": torch.arange(4)}, ValueError,
         r"labels and query_groups/key_groups are mutually exclusive"),
    ],
)
def test_bad_input(backend, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        _call(backend, **kwargs)


def test_reference_function_checks_its_groups_too():
    q, k = make_inputs(4, 5)
    with pytest.raises(ValueError, match="key_groups is missing"):
        ref_loss(q, k, logit_scale=SCALE, logit_bias=BIAS, query_groups=QG4)
    with pytest.raises(ValueError, match=r"key_groups must have shape \(5,\)"):
        ref_loss(q, k, logit_scale=SCALE, logit_bias=BIAS, query_groups=QG4, key_groups=KG5[:2])


def test_more_queries_than_keys_needs_no_labels_with_groups():
    """Without labels, N > M raises (the default positive of query i is key i); with groups it is fine."""
    q, k = make_inputs(6, 5)
    with pytest.raises(ValueError, match="more rows than key"):
        chunked_loss(q, k, logit_scale=SCALE, logit_bias=BIAS)
    qg = torch.tensor([0, 1, 1, 2, 9, 3])
    got = chunked_loss(q, k, logit_scale=SCALE, logit_bias=BIAS, query_groups=qg, key_groups=KG5)
    assert_close64(got, ref_loss(q, k, logit_scale=SCALE, logit_bias=BIAS, query_groups=qg, key_groups=KG5))
