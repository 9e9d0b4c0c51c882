"""Structured targets in ``xloss.info_nce`` (issue 11): groups (SupCon's L_out), exclude_self, the false-negative
margin, decoupled (DCL) and hardness-weighted negatives.

The reference (``xloss.reference.info_nce``) is the dense definition; it is checked here against hand-written
formulas and against the peers that implement the same losses (pytorch-metric-learning's ``SupConLoss`` and
``NTXentLoss``, sentence-transformers' ``MultipleNegativesRankingLoss``), and every engine is checked against it.
"""

from __future__ import annotations

import itertools
import math

import engines
import pytest
import torch
import torch.nn.functional as F
from tolerance import assert_close64

import xloss
from xloss.reference import info_nce as reference

F64 = torch.float64


def _inputs(n, m, d=7, seed=0, dtype=F64, groups=4, normalise=False):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(n, d, generator=g, dtype=F64)
    k = torch.randn(m, d, generator=g, dtype=F64)
    if normalise:
        q, k = F.normalize(q, dim=1), F.normalize(k, dim=1)
    qg = torch.randint(0, groups, (n,), generator=g)
    kg = torch.randint(0, groups, (m,), generator=g)
    return q.to(dtype), k.to(dtype), qg, kg


def _value_and_grads(fn, *tensors):
    leaves = [t.detach().clone().requires_grad_() for t in tensors]
    out = fn(*leaves)
    go = torch.linspace(0.5, 1.5, out.numel(), dtype=out.dtype).reshape(out.shape)
    grads = torch.autograd.grad(out, leaves, go, allow_unused=True)
    return [out.detach(), *[torch.zeros_like(t) if g is None else g for g, t in zip(grads, leaves)]]


# ------------------------------------------------------------------------------------------ the reference


def _dense_row_terms(q, k, s, qg, kg, exclude_self=False, margin=None, decoupled=False, hardness=0.0):
    """One row at a time, with Python loops over the sets: the formulas of the issue, literally."""
    terms, has = [], []
    raw = q @ k.T
    for i in range(q.shape[0]):
        pos = [j for j in range(k.shape[0]) if kg[j] == qg[i] and not (exclude_self and i == j)]
        if not pos:
            terms.append(torch.zeros((), dtype=q.dtype))
            has.append(False)
            continue
        best = max(float(raw[i, p]) for p in pos)
        entries = []
        for j in range(k.shape[0]):
            if exclude_self and i == j:
                continue
            if j in pos:
                if not decoupled:
                    entries.append(s * raw[i, j])
                continue
            if margin is not None and float(raw[i, j]) > best + margin:
                continue
            entries.append(s * raw[i, j] + hardness * raw[i, j].detach())
        lse = torch.logsumexp(torch.stack(entries), 0)
        terms.append(lse - torch.stack([s * raw[i, p] for p in pos]).mean())
        has.append(True)
    return torch.stack(terms), torch.tensor(has)


@pytest.mark.parametrize("opts", [
    {}, {"exclude_self": True}, {"false_negative_margin": 0.1}, {"decoupled": True}, {"hardness": 0.7},
    {"exclude_self": True, "false_negative_margin": 0.0, "hardness": 0.4},
    {"decoupled": True, "false_negative_margin": 0.3},
])
@pytest.mark.parametrize("symmetric", [False, True])
def test_reference_is_the_formula(opts, symmetric):
    q, k, qg, kg = _inputs(9, 9, seed=1)
    s = 2.5
    got = reference(q, k, logit_scale=s, query_groups=qg, key_groups=kg, symmetric=symmetric, **opts)
    kw = {"exclude_self": opts.get("exclude_self", False), "margin": opts.get("false_negative_margin"),
          "decoupled": opts.get("decoupled", False), "hardness": opts.get("hardness", 0.0)}
    rows, has_r = _dense_row_terms(q, k, s, qg, kg, **kw)
    want = rows.sum() / max(int(has_r.sum()), 1)
    if symmetric:
        cols, has_c = _dense_row_terms(k, q, s, kg, qg, **kw)
        want = (want + cols.sum() / max(int(has_c.sum()), 1)) / 2
    assert_close64(got, want, what="reference vs the written formula")


def test_groups_of_distinct_ids_are_the_plain_loss():
    q, k, _, _ = _inputs(6, 9, seed=2)
    labels = torch.tensor([3, 0, 8, 1, 5, 2])
    for symmetric in (True, False):
        plain = reference(q, k, logit_scale=1.3, labels=labels, symmetric=symmetric)
        grouped = xloss.info_nce(q, k, logit_scale=1.3, query_groups=labels, key_groups=torch.arange(9),
                                 symmetric=symmetric, backend="chunked")
        assert_close64(grouped, plain, what="groups = (labels, arange(M))")


def test_one_to_k_captions():
    """K captions per image: K keys share their image's group; each image row averages its K positives."""
    n, kk, d = 5, 3, 6
    img = torch.randn(n, d, dtype=F64)
    txt = torch.randn(n * kk, d, dtype=F64)
    qg, kg = torch.arange(n), torch.arange(n).repeat_interleave(kk)
    got = xloss.info_nce(img, txt, temperature=0.5, query_groups=qg, key_groups=kg, symmetric=False)
    z = img @ txt.T / 0.5
    want = (torch.logsumexp(z, 1) - z.view(n, n, kk)[torch.arange(n), torch.arange(n)].mean(1)).mean()
    assert_close64(got, want, what="1-to-K")


# ------------------------------------------------------------------------------------------------ the peers


def test_supcon_matches_pytorch_metric_learning():
    pml = pytest.importorskip("pytorch_metric_learning.losses")
    z, _, y, _ = _inputs(24, 24, d=10, seed=3, groups=5, normalise=True)
    y[0] = 99  # an anchor without positives
    a = z.clone().requires_grad_()
    want = pml.SupConLoss(temperature=0.1)(a, y)
    want.backward()
    b = z.clone().requires_grad_()
    zn = F.normalize(b, dim=1)  # pml's cosine similarity normalises inside its graph
    got = xloss.info_nce(zn, zn, query_groups=y, key_groups=y, exclude_self=True, symmetric=False, temperature=0.1)
    got.backward()
    assert_close64(got, want.detach(), what="SupCon value")
    assert_close64(b.grad, a.grad, what="SupCon gradient")


def test_two_tower_supcon_matches_pytorch_metric_learning_ref_emb():
    pml = pytest.importorskip("pytorch_metric_learning.losses")
    q, k, qg, kg = _inputs(12, 17, d=8, seed=4, groups=3, normalise=True)
    want = pml.SupConLoss(temperature=0.2)(q, qg, ref_emb=k, ref_labels=kg)
    got = xloss.info_nce(q, k, query_groups=qg, key_groups=kg, symmetric=False, temperature=0.2)
    assert_close64(got, want.detach(), what="SupCon with ref_emb")


def test_simclr_matches_pytorch_metric_learning_ntxent():
    pml = pytest.importorskip("pytorch_metric_learning.losses")
    b = 10
    z = F.normalize(torch.randn(2 * b, 8, dtype=F64), dim=1)
    pair = torch.arange(2 * b) % b  # view 1 and view 2 of sample i share its id
    want = pml.NTXentLoss(temperature=0.5)(z, pair)
    got = xloss.info_nce(z, z, labels=(torch.arange(2 * b) + b) % (2 * b), exclude_self=True, symmetric=False,
                         temperature=0.5)
    assert_close64(got, want, what="SimCLR NT-Xent")


def _mnrl(**kwargs):
    st = pytest.importorskip("sentence_transformers")
    try:
        from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss
    except ImportError:  # older layout
        MultipleNegativesRankingLoss = st.losses.MultipleNegativesRankingLoss
    try:
        return MultipleNegativesRankingLoss(torch.nn.Identity(), **kwargs)
    except TypeError as exc:  # an installed version without hardness_mode
        pytest.skip(f"sentence-transformers has no {sorted(kwargs)}: {exc}")


@pytest.mark.parametrize("hardness", [0.0, 5.0])
def test_hard_negatives_match_sentence_transformers_mnrl(hardness):
    """Anchors, positives and one hard negative each, cosine similarity, scale 20; hardness_mode='all_negatives'
    adds ``α·sg(cos)`` to every negative's logit, as ``hardness=α``."""
    kwargs = {"hardness_mode": "all_negatives", "hardness_strength": hardness} if hardness else {}
    loss = _mnrl(scale=20.0, **kwargs)
    g = torch.Generator().manual_seed(5)
    a, p, n = (torch.randn(8, 12, generator=g, dtype=F64) for _ in range(3))
    leaves = [t.clone().requires_grad_() for t in (a, p, n)]
    want = loss.compute_loss_from_embeddings(leaves, None)
    want.backward()
    mine = [t.clone().requires_grad_() for t in (a, p, n)]
    qn, keys = F.normalize(mine[0], dim=1), F.normalize(torch.cat(mine[1:]), dim=1)
    got = xloss.info_nce(qn, keys, logit_scale=20.0, symmetric=False, hardness=hardness)
    got.backward()
    assert_close64(got, want.detach(), what="MNRL value")
    for x, y, name in zip(mine, leaves, ("anchor", "positive", "negative")):
        assert_close64(x.grad, y.grad, what=f"MNRL gradient of the {name}s")


# ---------------------------------------------------------------------------------------------- the engines

MATRIX = [
    {"groups": True, "symmetric": True, "reduction": "mean"},
    {"groups": True, "symmetric": False, "reduction": "none", "false_negative_margin": 0.1, "hardness": 0.5},
    {"groups": True, "symmetric": True, "reduction": "sum", "decoupled": True},
    {"groups": False, "symmetric": True, "reduction": "none", "exclude_self": True, "hardness": 0.3},
    {"groups": True, "symmetric": True, "reduction": "mean", "exclude_self": True, "false_negative_margin": 0.0},
    {"groups": False, "symmetric": False, "reduction": "mean", "decoupled": True, "false_negative_margin": 0.2},
]


def _matrix_call(opts, qg, kg, labels, backend):
    opts = dict(opts)
    targets = {"query_groups": qg, "key_groups": kg} if opts.pop("groups") else {"labels": labels}
    return lambda q, k, s: xloss.info_nce(q, k, logit_scale=s, backend=backend, **targets, **opts)


@pytest.mark.parametrize("mode", engines.MODES)
@pytest.mark.parametrize("engine", engines.ENGINES)
@pytest.mark.parametrize("opts", MATRIX, ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()))
def test_engine_mode_matrix(engine, mode, opts):
    """Every engine, eager and compiled, against the fp64 reference: value, d query, d key, d scale."""
    dtype = engines.dtype_of(engine)
    n = 37
    m = n if opts.get("exclude_self") else 45
    q64, k64, qg, kg = _inputs(n, m, d=19, seed=6)
    qg, kg = qg.to(engines.DEVICE), kg.to(engines.DEVICE)
    labels = torch.randperm(m, generator=torch.Generator().manual_seed(7))[:n].to(engines.DEVICE)

    def inputs(dt):
        return [t.to(engines.DEVICE, dt).requires_grad_() for t in (q64, k64, torch.tensor(2.0, dtype=F64))]

    got = engines.run(_matrix_call(opts, qg, kg, labels, engine), inputs(dtype), mode)
    gold = engines.run(_matrix_call(opts, qg, kg, labels, "reference"), inputs(F64), "eager")
    naive = engines.run(_matrix_call(opts, qg, kg, labels, "reference"), inputs(dtype), "eager")
    mag = 2.0 * float(q64.norm(dim=1).max() * k64.norm(dim=1).max().detach())
    engines.check_engine(engine, got, gold, naive, ["loss", "d query", "d key", "d scale"],
                         [mag * (n if opts["reduction"] == "sum" else 1), mag, mag, mag * n])
    assert got[0].dtype == (F64 if dtype == F64 else torch.float32)


@pytest.mark.parametrize("engine", [e for e in engines.ENGINES if e != "reference"])
@pytest.mark.parametrize("option", ["groups", "hardness", "exclude_self", "decoupled"])
@pytest.mark.parametrize("symmetric", [False, True])
def test_infinite_logit_gives_the_references_infinity(engine, option, symmetric):
    """A +inf logit in a log-sum-exp set makes the LSE +inf (``torch.logsumexp``), not inf − inf = NaN from the
    engines' ``max + log Σ exp(z − max)``: the value's pattern of inf and NaN is the reference's."""
    t = torch.tensor
    dtype = engines.dtype_of(engine)
    q = t([[1.0], [-1.0], [0.5]], dtype=dtype, device=engines.DEVICE)
    k = t([[math.inf], [-1.0], [0.3]], dtype=dtype, device=engines.DEVICE)
    opts = {"groups": {"query_groups": t([2, 1, 1]), "key_groups": t([1, 2, 1])},
            "hardness": {"hardness": 0.5, "labels": t([1, 0, 2])},
            "exclude_self": {"exclude_self": True, "labels": t([1, 0, 1])},
            "decoupled": {"decoupled": True, "labels": t([1, 0, 2])}}[option]
    opts = {key: v.to(engines.DEVICE) if isinstance(v, torch.Tensor) else v for key, v in opts.items()}
    reduction = "sum" if symmetric else "none"
    got = xloss.info_nce(q, k, symmetric=symmetric, reduction=reduction, backend=engine, **opts)
    want = xloss.info_nce(q.double(), k.double(), symmetric=symmetric, reduction=reduction, backend="reference",
                          **opts)
    assert not torch.isfinite(want).all()  # the case is one of infinities
    torch.testing.assert_close(got.double(), want, equal_nan=True, rtol=1e-5, atol=1e-6)


OPTION_GRID = list(itertools.product(
    [True, False],  # groups (else labels)
    [True, False],  # symmetric
    [False, True],  # exclude_self
    [None, 0.0, 0.15],  # false_negative_margin
    [False, True],  # decoupled
    [0.0, 0.6],  # hardness
))


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_chunked_equals_reference_on_every_combination(reduction):
    """The whole option grid, fp64, chunked engine against the reference, with strips smaller than the batch."""
    n = 23
    q, k, qg, kg = _inputs(n, n, d=6, seed=8, groups=5)
    labels = torch.randperm(n, generator=torch.Generator().manual_seed(9))
    for groups, symmetric, exclude_self, margin, decoupled, hardness in OPTION_GRID:
        if groups and symmetric and reduction == "none":
            continue
        opts = {"symmetric": symmetric, "exclude_self": exclude_self, "false_negative_margin": margin,
                "decoupled": decoupled, "hardness": hardness, "reduction": reduction}
        targets = {"query_groups": qg, "key_groups": kg} if groups else {"labels": labels}
        kw = {**targets, **opts}
        want = _value_and_grads(lambda a, b, s, kw=kw: reference(a, b, logit_scale=s, **kw), q, k,
                                torch.tensor(1.8, dtype=F64))
        got = _value_and_grads(lambda a, b, s, kw=kw: xloss.info_nce(a, b, logit_scale=s, backend="chunked", **kw),
                               q, k, torch.tensor(1.8, dtype=F64))
        for x, y, name in zip(got, want, ("loss", "d query", "d key", "d scale")):
            assert_close64(x, y, what=f"{name} {groups=} {opts}")


def test_chunked_strips_smaller_than_the_batch(monkeypatch):
    """A tiny tile budget: many row strips, the column statistics merged online across them."""
    monkeypatch.setenv("XLOSS_CPU_TILE_MB", "0.001")
    q, k, qg, kg = _inputs(40, 33, d=5, seed=10, groups=3)
    opts = {"query_groups": qg, "key_groups": kg, "false_negative_margin": 0.1, "hardness": 0.2}
    want = _value_and_grads(lambda a, b: reference(a, b, logit_scale=3.0, **opts), q, k)
    got = _value_and_grads(lambda a, b: xloss.info_nce(a, b, logit_scale=3.0, backend="chunked", **opts), q, k)
    for x, y in zip(got, want):
        assert_close64(x, y, what="chunked with tiny strips")


def test_gradcheck_chunked():
    q, k, qg, kg = _inputs(6, 6, d=3, seed=11, groups=2)
    s = torch.tensor(1.5, dtype=F64, requires_grad=True)
    # (not hardness: its stop-gradient makes the analytic gradient differ from finite differences on purpose)
    for opts in ({"decoupled": True}, {"false_negative_margin": 0.05, "exclude_self": True}, {"symmetric": False}):
        def fn(a, b, sc, opts=opts):
            return xloss.info_nce(a, b, logit_scale=sc, query_groups=qg, key_groups=kg, backend="chunked", **opts)

        assert torch.autograd.gradcheck(fn, (q.requires_grad_(), k.requires_grad_(), s))


def test_hardness_gradient_flows_through_the_scale_only():
    """``(s + α)<q, k>`` in the value, ``s<q, k>`` in the gradient: d/ds is Σ G∘<q, k>, not (s + α)-scaled."""
    q, k, _, _ = _inputs(5, 5, seed=12)
    s = torch.tensor(2.0, dtype=F64, requires_grad=True)
    loss = xloss.info_nce(q, k, logit_scale=s, hardness=1.0, symmetric=False)
    loss.backward()
    z = (q @ k.T) * s.detach()
    zh = z + (q @ k.T) * (1 - torch.eye(5, dtype=F64))
    p = torch.softmax(zh, 1)
    want = ((p - torch.eye(5, dtype=F64)) * (q @ k.T)).sum() / 5
    assert_close64(s.grad, want, what="d scale with hardness")


def test_no_positive_anywhere_is_zero_with_zero_gradients():
    q, k, _, _ = _inputs(8, 8, seed=13)
    for backend in ("chunked", "reference"):
        for symmetric in (True, False):
            a, b = q.clone().requires_grad_(), k.clone().requires_grad_()
            loss = xloss.info_nce(a, b, query_groups=torch.arange(8), key_groups=torch.arange(8) + 100,
                                  symmetric=symmetric, backend=backend)
            loss.backward()
            assert float(loss) == 0.0
            assert torch.equal(a.grad, torch.zeros_like(a)) and torch.equal(b.grad, torch.zeros_like(b))


def test_rows_without_positive_get_no_gradient():
    q, k, qg, kg = _inputs(6, 9, seed=14, groups=3)
    qg[2] = 77
    a = q.clone().requires_grad_()
    xloss.info_nce(a, k, query_groups=qg, key_groups=kg, symmetric=False, backend="chunked").backward()
    assert torch.equal(a.grad[2], torch.zeros_like(a.grad[2]))


def test_defaults_are_todays_loss_bit_for_bit():
    q, k, _, _ = _inputs(11, 13, seed=15, dtype=torch.float32)
    labels = torch.randint(0, 13, (11,))
    plain = xloss.info_nce(q, k, logit_scale=4.0, labels=labels)
    spelled = xloss.info_nce(q, k, logit_scale=4.0, labels=labels, query_groups=None, key_groups=None,
                             exclude_self=False, false_negative_margin=None, decoupled=False, hardness=0.0)
    assert torch.equal(plain, spelled)


def test_module_passes_the_options():
    z, _, y, _ = _inputs(10, 10, seed=16, normalise=True)
    m = xloss.nn.InfoNCELoss(temperature=0.1, exclude_self=True, symmetric=False)
    want = xloss.info_nce(z, z, query_groups=y, key_groups=y, exclude_self=True, symmetric=False, temperature=0.1)
    assert torch.equal(m(z, z, query_groups=y, key_groups=y), want)
    assert "exclude_self=True" in repr(m)
    with pytest.raises(ValueError, match="hardness"):
        xloss.nn.InfoNCELoss(hardness=-0.5)


def test_meta_tensors_propagate_shapes():
    q = torch.empty(6, 4, device="meta")
    g = torch.empty(6, dtype=torch.long, device="meta")
    out = xloss.info_nce(q, q, query_groups=g, key_groups=g, exclude_self=True, false_negative_margin=0.1,
                         temperature=0.1, backend="chunked")
    assert out.shape == () and out.device.type == "meta"


# ------------------------------------------------------------------------------------------------ bad input


@pytest.mark.parametrize("kwargs, error, match", [
    ({"query_groups": torch.zeros(4, dtype=torch.long), "key_groups": torch.zeros(5, dtype=torch.long)},
     ValueError, "query_groups must have shape"),
    ({"query_groups": torch.zeros(5, dtype=torch.long), "key_groups": torch.zeros(6, dtype=torch.long)},
     ValueError, "key_groups must have shape"),
    ({"query_groups": torch.zeros(5), "key_groups": torch.zeros(5, dtype=torch.long)}, TypeError,
     "query_groups must have an integer dtype"),
    ({"query_groups": torch.zeros(5, dtype=torch.long), "key_groups": torch.zeros(5, dtype=torch.bool)},
     TypeError, "key_groups must have an integer dtype"),
    ({"query_groups": torch.zeros(5, dtype=torch.long)}, ValueError, "key_groups is missing"),
    ({"query_groups": torch.zeros(5, dtype=torch.long), "key_groups": torch.zeros(5, dtype=torch.long),
      "labels": torch.arange(5)}, ValueError, "mutually exclusive"),
    ({"query_groups": [0, 1, 2, 3, 4], "key_groups": torch.zeros(5, dtype=torch.long)}, TypeError,
     "query_groups must be a torch.Tensor"),
    ({"false_negative_margin": -0.1}, ValueError, "false_negative_margin"),
    ({"false_negative_margin": "0.1"}, TypeError, "false_negative_margin"),
    ({"hardness": -1.0}, ValueError, "hardness"),
    ({"hardness": float("nan")}, ValueError, "hardness"),
    ({"exclude_self": 1}, TypeError, "exclude_self"),
    ({"decoupled": "yes"}, TypeError, "decoupled"),
    ({"hardness": 0.5, "label_smoothing": 0.1}, ValueError, "label_smoothing"),
    ({"query_groups": torch.zeros(5, dtype=torch.long), "key_groups": torch.zeros(5, dtype=torch.long),
      "reduction": "none"}, ValueError, "reduction='none'"),
])
def test_bad_input_names_the_argument(kwargs, error, match):
    q, k = torch.randn(5, 3), torch.randn(5, 3)
    with pytest.raises(error, match=match):
        xloss.info_nce(q, k, **kwargs)


def test_exclude_self_needs_as_many_queries_as_keys():
    with pytest.raises(ValueError, match="exclude_self=True needs as many queries as keys"):
        xloss.info_nce(torch.randn(4, 3), torch.randn(6, 3), exclude_self=True)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a second device (CUDA)")
def test_group_ids_on_another_device_are_refused():
    q = torch.randn(4, 3, device="cuda")
    with pytest.raises(ValueError, match="query_groups must be on the same device"):
        xloss.info_nce(q, q, query_groups=torch.zeros(4, dtype=torch.long), key_groups=torch.zeros(
            4, dtype=torch.long, device="cuda"))
