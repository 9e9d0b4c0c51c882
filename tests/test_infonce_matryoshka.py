"""Matryoshka InfoNCE (issue 12, item 4): ``info_nce(..., matryoshka_dims=, matryoshka_weights=,
matryoshka_normalize=)`` is ``Σ_m w_m · info_nce(q̂_m, k̂_m)`` over prefixes of D, computed in one sweep.

The reference (``xloss.reference.info_nce(..., matryoshka_dims=)``) is a literal loop over the prefixes; it is
checked against sentence-transformers' ``MatryoshkaLoss`` around ``MultipleNegativesRankingLoss``, and every engine
against it (fp64 values and gradients of query, key and the logit scale), against the literal sum of separate
``xloss.info_nce`` calls, and by gradcheck.
"""

from __future__ import annotations

import itertools

import engines
import pytest
import torch
import torch.nn.functional as F
from tolerance import assert_close64, assert_no_worse

import xloss
from xloss.reference import info_nce as reference

F64 = torch.float64
DIMS = (3, 8, 13, 19)  # odd slices, not multiples of any tile


def _inputs(n, m, d=19, seed=0, dtype=F64):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(n, d, generator=g, dtype=F64)
    k = torch.randn(m, d, generator=g, dtype=F64)
    return q.to(dtype), k.to(dtype)


def _value_and_grads(fn, *tensors):
    leaves = [t.detach().clone().requires_grad_() for t in tensors]
    out = fn(*leaves)
    go = torch.linspace(0.5, 1.5, out.numel(), dtype=out.dtype, device=out.device).reshape(out.shape)
    grads = torch.autograd.grad(out, leaves, go)
    return [out.detach(), *grads]


def _check_all(got, want, what):
    for x, y, name in zip(got, want, ("loss", "d query", "d key", "d scale")):
        assert_close64(x, y, what=f"{what}: {name}")


# ------------------------------------------------------------------------------------------ the reference


def test_reference_is_the_weighted_sum_of_per_prefix_cross_entropies():
    """Written out: cosine logits per prefix, cross-entropy both ways, weighted sum."""
    q, k = _inputs(9, 9, d=10, seed=1)
    dims, weights, s = (2, 6, 10), (0.5, 1.0, 2.0), 3.0
    want = 0.0
    for d, w in zip(dims, weights):
        z = s * F.normalize(q[:, :d], dim=1) @ F.normalize(k[:, :d], dim=1).T
        y = torch.arange(9)
        want = want + w * (F.cross_entropy(z, y) + F.cross_entropy(z.T, y)) / 2
    got = reference(q, k, logit_scale=s, matryoshka_dims=dims, matryoshka_weights=weights)
    assert_close64(got, want, what="reference")


def _st_model(d):
    """A stand-in SentenceTransformer for MatryoshkaLoss: the features are the embeddings."""

    class Embeddings(torch.nn.Module):
        def forward(self, features):
            return {"sentence_embedding": features["sentence_embedding"]}

        def get_embedding_dimension(self):
            return d

        def _get_untruncated_embedding_dimension(self):
            return d

    return Embeddings()


def test_matches_sentence_transformers_matryoshka_mnrl():
    """``MatryoshkaLoss(model, MultipleNegativesRankingLoss(model, scale=20), dims, weights)`` on precomputed
    embeddings (anchors, positives, one hard negative each): cosine similarity, one-way, scale 20."""
    pytest.importorskip("sentence_transformers")
    from sentence_transformers.sentence_transformer.losses import MatryoshkaLoss, MultipleNegativesRankingLoss

    d, dims, weights = 24, [24, 16, 8, 4], [1.0, 0.5, 2.0, 1.5]
    model = _st_model(d)
    loss = MatryoshkaLoss(model, MultipleNegativesRankingLoss(model, scale=20.0), dims, weights)
    g = torch.Generator().manual_seed(2)
    a, p, n = (torch.randn(10, d, generator=g, dtype=F64) for _ in range(3))
    leaves = [t.clone().requires_grad_() for t in (a, p, n)]
    want = loss([{"sentence_embedding": t} for t in leaves], None)
    want.backward()
    mine = [t.clone().requires_grad_() for t in (a, p, n)]
    order = sorted(range(len(dims)), key=lambda i: dims[i])  # ST takes any order; xloss increasing
    got = xloss.info_nce(mine[0], torch.cat(mine[1:]), logit_scale=20.0, symmetric=False,
                         matryoshka_dims=[dims[i] for i in order], matryoshka_weights=[weights[i] for i in order])
    got.backward()
    assert_close64(got, want.detach(), what="MatryoshkaLoss value")
    for x, y, name in zip(mine, leaves, ("anchor", "positive", "negative")):
        assert_close64(x.grad, y.grad, what=f"MatryoshkaLoss gradient of the {name}s")


# ---------------------------------------------------------------------------------------------- the engines

OPTIONS = list(itertools.product(
    [True, False],  # matryoshka_normalize
    [True, False],  # symmetric
    [0.0, 0.15],  # label_smoothing
    ["mean", "sum", "none"],  # reduction
    [False, True],  # labels (else the default pairing)
))


@pytest.mark.parametrize("normalize", [True, False])
def test_chunked_equals_reference_on_every_combination(normalize, monkeypatch):
    """fp64, with strips smaller than the batch (the column statistics merged across strips)."""
    monkeypatch.setenv("XLOSS_CPU_TILE_MB", "0.01")
    n, m = 23, 31
    q, k = _inputs(n, m, seed=3)
    labels = torch.randperm(m, generator=torch.Generator().manual_seed(4))[:n]
    for norm, symmetric, eps, reduction, with_labels in OPTIONS:
        if norm != normalize:
            continue
        kw = {"symmetric": symmetric, "label_smoothing": eps, "reduction": reduction, "matryoshka_dims": DIMS,
              "matryoshka_weights": [0.25, 1.0, 0.5, 2.0], "matryoshka_normalize": norm,
              "labels": labels if with_labels else None}
        s = torch.tensor(1.8, dtype=F64)
        want = _value_and_grads(lambda a, b, sc, kw=kw: reference(a, b, logit_scale=sc, **kw), q, k, s)
        got = _value_and_grads(lambda a, b, sc, kw=kw: xloss.info_nce(a, b, logit_scale=sc, backend="chunked",
                                                                      **kw), q, k, s)
        _check_all(got, want, f"{kw}")


def test_equals_the_sum_of_separate_calls():
    """The literal definition through xloss itself: one ``info_nce`` per normalised prefix, weighted."""
    q, k = _inputs(17, 17, seed=5)
    weights = [1.0, 0.3, 0.7, 1.2]
    s = torch.tensor(2.5, dtype=F64)

    def separate(a, b, sc):
        return sum(w * xloss.info_nce(F.normalize(a[:, :d], dim=1), F.normalize(b[:, :d], dim=1), logit_scale=sc,
                                      label_smoothing=0.1)
                   for d, w in zip(DIMS, weights))

    def fused(a, b, sc):
        return xloss.info_nce(a, b, logit_scale=sc, label_smoothing=0.1, matryoshka_dims=DIMS,
                              matryoshka_weights=weights)

    _check_all(_value_and_grads(fused, q, k, s), _value_and_grads(separate, q, k, s), "fused vs separate calls")


@pytest.mark.parametrize("normalize", [True, False])
def test_gradcheck_chunked(normalize):
    q, k = _inputs(5, 7, d=6, seed=6)
    labels = torch.tensor([6, 0, 2, 2, 5])
    s = torch.tensor(1.5, dtype=F64, requires_grad=True)
    for symmetric, eps in ((True, 0.0), (False, 0.2), (True, 0.3)):
        def fn(a, b, sc, symmetric=symmetric, eps=eps):
            return xloss.info_nce(a, b, logit_scale=sc, labels=labels, symmetric=symmetric, label_smoothing=eps,
                                  matryoshka_dims=(2, 3, 6), matryoshka_weights=(1.0, 0.5, 2.0),
                                  matryoshka_normalize=normalize, backend="chunked")

        assert torch.autograd.gradcheck(fn, (q.requires_grad_(), k.requires_grad_(), s))


MATRIX = [
    {"symmetric": True, "reduction": "mean"},
    {"symmetric": False, "reduction": "none", "label_smoothing": 0.1},
    {"symmetric": True, "reduction": "sum", "matryoshka_normalize": False, "labels": True},
    {"symmetric": True, "reduction": "none", "label_smoothing": 0.2, "labels": True},
]


def _matrix_call(opts, labels, backend):
    opts = dict(opts)
    lab = labels if opts.pop("labels", False) else None
    weights = [1.0, 0.5, 2.0, 1.0]
    return lambda q, k, s: xloss.info_nce(q, k, logit_scale=s, labels=lab, matryoshka_dims=DIMS,
                                          matryoshka_weights=weights, backend=backend, **opts)


@pytest.mark.parametrize("mode", engines.MODES)
@pytest.mark.parametrize("engine", engines.ENGINES)
@pytest.mark.parametrize("opts", MATRIX, ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()))
def test_engine_mode_matrix(engine, mode, opts):
    """Every engine, eager and compiled (fullgraph), against the fp64 reference: value, d query, d key, d scale."""
    dtype = engines.dtype_of(engine)
    n, m = 37, 45
    q64, k64 = _inputs(n, m, seed=7)
    labels = torch.randperm(m, generator=torch.Generator().manual_seed(8))[:n].to(engines.DEVICE)

    def inputs(dt):
        return [t.to(engines.DEVICE, dt).requires_grad_() for t in (q64, k64, torch.tensor(2.0, dtype=F64))]

    got = engines.run(_matrix_call(opts, labels, engine), inputs(dtype), mode)
    gold = engines.run(_matrix_call(opts, labels, "reference"), inputs(F64), "eager")
    naive = engines.run(_matrix_call(opts, labels, "reference"), inputs(dtype), "eager")
    normalize = opts.get("matryoshka_normalize", True)
    mag = 2.0 * (1.0 if normalize else float(q64.detach().norm(dim=1).max() * k64.detach().norm(dim=1).max())) * 4.5
    engines.check_engine(engine, got, gold, naive, ["loss", "d query", "d key", "d scale"],
                         [mag * (n if opts["reduction"] == "sum" else 1), mag, mag, mag * n])
    assert got[0].dtype == (F64 if dtype == F64 else torch.float32)


def test_float32_no_worse_than_naive():
    q64, k64 = _inputs(41, 53, seed=9)
    kw = {"matryoshka_dims": DIMS, "label_smoothing": 0.1}
    s = torch.tensor(20.0, dtype=F64)
    gold = _value_and_grads(lambda a, b, sc: reference(a, b, logit_scale=sc, **kw), q64, k64, s)
    f32 = [t.float() for t in (q64, k64, s)]
    naive = _value_and_grads(lambda a, b, sc: reference(a, b, logit_scale=sc, **kw), *f32)
    got = _value_and_grads(lambda a, b, sc: xloss.info_nce(a, b, logit_scale=sc, backend="chunked", **kw), *f32)
    for name, x, y, z in zip(("loss", "d query", "d key", "d scale"), got, naive, gold):
        assert_no_worse(x, y, z, f"fp32 {name}", magnitude=2 * 20.0 * len(DIMS) * (41 if name == "d scale" else 1))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_half_inputs_give_float32(dtype):
    q, k = (t.to(dtype).requires_grad_() for t in _inputs(11, 11, seed=10))
    loss = xloss.info_nce(q, k, logit_scale=10.0, matryoshka_dims=DIMS)
    assert loss.dtype == torch.float32
    loss.backward()
    assert q.grad.dtype == dtype and torch.isfinite(q.grad.float()).all()
    want = reference(q.detach().float(), k.detach().float(), logit_scale=10.0, matryoshka_dims=DIMS)
    assert abs(float(loss.detach()) - float(want)) < 2e-2 * float(want)


@pytest.mark.skipif(not engines.TRITON_RUNS, reason="Triton cannot run here")
@pytest.mark.parametrize("deterministic", [False, True])
def test_triton_deterministic_and_column_splits(deterministic, monkeypatch):
    """The kernels with column splits (atomic dq rows; few row blocks) and in deterministic mode (two atomic-free
    launches, the second with q and k swapped), against the fp64 reference; deterministic runs repeat bit for bit."""
    if deterministic:
        monkeypatch.setenv("XLOSS_DETERMINISTIC", "1")
    q64, k64 = _inputs(21, 70, d=45, seed=11)
    labels = torch.randint(0, 70, (21,), generator=torch.Generator().manual_seed(1)).to(engines.DEVICE)
    kw = {"labels": labels, "label_smoothing": 0.1, "matryoshka_dims": (5, 32, 45), "reduction": "sum"}
    s = torch.tensor(4.0, dtype=F64)
    f32 = [t.to(engines.DEVICE, torch.float32) for t in (q64, k64, s)]
    gold = _value_and_grads(lambda a, b, sc: reference(a, b, logit_scale=sc, **kw), q64.to(engines.DEVICE),
                            k64.to(engines.DEVICE), s.to(engines.DEVICE))
    naive = _value_and_grads(lambda a, b, sc: reference(a, b, logit_scale=sc, **kw), *f32)
    runs = [_value_and_grads(lambda a, b, sc: xloss.info_nce(a, b, logit_scale=sc, backend="triton", **kw), *f32)
            for _ in range(2 if deterministic else 1)]
    for name, x, y, z in zip(("loss", "d query", "d key", "d scale"), runs[0], naive, gold):
        assert_no_worse(x, y, z, f"triton {name}", magnitude=2 * 4.0 * 3 * 21)
    if deterministic:
        assert all(torch.equal(x, y) for x, y in zip(*runs)), "deterministic mode must repeat bit for bit"


def test_one_prefix_of_the_whole_width_is_plain_info_nce():
    q, k = _inputs(13, 15, seed=12)
    labels = torch.randint(0, 15, (13,), generator=torch.Generator().manual_seed(0))
    s = torch.tensor(3.0, dtype=F64)
    got = _value_and_grads(lambda a, b, sc: xloss.info_nce(a, b, logit_scale=sc, labels=labels,
                                                           matryoshka_dims=[19], matryoshka_normalize=False), q, k, s)
    want = _value_and_grads(lambda a, b, sc: xloss.info_nce(a, b, logit_scale=sc, labels=labels), q, k, s)
    _check_all(got, want, "one full-width prefix")


@pytest.mark.parametrize("engine", [e for e in engines.ENGINES if e != "reference"])
def test_prefixes_short_of_d_leave_the_rest_without_gradient(engine):
    q, k = _inputs(12, 14, seed=19)
    kw = {"matryoshka_dims": (3, 8), "label_smoothing": 0.1}
    dt = engines.dtype_of(engine)
    s = torch.tensor(2.0, dtype=F64)
    want = _value_and_grads(lambda a, b, sc: reference(a, b, logit_scale=sc, **kw), q, k, s)
    got = _value_and_grads(lambda a, b, sc: xloss.info_nce(a, b, logit_scale=sc, backend=engine, **kw),
                           *(t.to(engines.DEVICE, dt) for t in (q, k, s)))
    assert torch.equal(got[1][:, 8:], torch.zeros_like(got[1][:, 8:]))
    assert torch.equal(got[2][:, 8:], torch.zeros_like(got[2][:, 8:]))
    if dt == F64:
        _check_all(got, want, "prefixes short of D")
    else:
        for x, y, name in zip(got, want, ("loss", "d query", "d key", "d scale")):
            torch.testing.assert_close(x.double().cpu(), y, rtol=1e-4, atol=1e-5, msg=lambda m, n=name: f"{n}: {m}")


def test_zero_prefix_is_finite_as_f_normalize():
    """A row whose first slice is zero: F.normalize's eps keeps it zero (no NaN), in value and gradient."""
    q, k = _inputs(6, 6, seed=13)
    q[2, :3] = 0.0
    s = torch.tensor(2.0, dtype=F64)
    want = _value_and_grads(lambda a, b, sc: reference(a, b, logit_scale=sc, matryoshka_dims=DIMS), q, k, s)
    got = _value_and_grads(lambda a, b, sc: xloss.info_nce(a, b, logit_scale=sc, matryoshka_dims=DIMS), q, k, s)
    assert all(torch.isfinite(t).all() for t in got)
    _check_all(got, want, "zero prefix")


def test_only_some_inputs_require_grad_and_no_grad():
    q, k = _inputs(8, 8, seed=14)
    kr = k.clone().requires_grad_()
    xloss.info_nce(q, kr, matryoshka_dims=DIMS).backward()
    kw = k.clone().requires_grad_()
    reference(q, kw, matryoshka_dims=DIMS).backward()
    assert_close64(kr.grad, kw.grad, what="key only")
    with torch.no_grad():
        assert_close64(xloss.info_nce(q, k, matryoshka_dims=DIMS), reference(q, k, matryoshka_dims=DIMS),
                       what="no_grad")


def test_double_backward_refuses_clearly():
    q, k = (t.requires_grad_() for t in _inputs(6, 6, d=8, seed=15))
    gq = torch.autograd.grad(xloss.info_nce(q, k, matryoshka_dims=[4, 8], backend="chunked"), q,
                             create_graph=True)[0]
    with pytest.raises(RuntimeError, match=r"double backward .* is not supported .* backend='reference'"):
        (gq ** 2).sum().backward()


# ------------------------------------------------------------------------------------------------ bad input

BAD = [
    ({"matryoshka_dims": [8, 4]}, ValueError, "matryoshka_dims must be strictly increasing"),
    ({"matryoshka_dims": [4, 4, 8]}, ValueError, "matryoshka_dims must be strictly increasing"),
    ({"matryoshka_dims": [0, 8]}, ValueError, "matryoshka_dims must be strictly increasing positive"),
    ({"matryoshka_dims": [-2, 8]}, ValueError, "matryoshka_dims must be strictly increasing positive"),
    ({"matryoshka_dims": [4, 20]}, ValueError, r"matryoshka_dims must be <= the feature dimension D = 19"),
    ({"matryoshka_dims": []}, ValueError, "matryoshka_dims must not be empty"),
    ({"matryoshka_dims": 8}, TypeError, "matryoshka_dims must be a list or tuple"),
    ({"matryoshka_dims": torch.tensor([4, 8])}, TypeError, "matryoshka_dims must be a list or tuple"),
    ({"matryoshka_dims": [4.0, 8]}, TypeError, "matryoshka_dims must hold ints"),
    ({"matryoshka_dims": [True, 8]}, TypeError, "matryoshka_dims must hold ints"),
    ({"matryoshka_dims": [4, 8], "matryoshka_weights": [1.0]}, ValueError,
     r"matryoshka_weights must have one weight per matryoshka_dims entry \(2\), got 1"),
    ({"matryoshka_dims": [4, 8], "matryoshka_weights": [1.0, float("nan")]}, TypeError,
     "matryoshka_weights must hold finite floats"),
    ({"matryoshka_dims": [4, 8], "matryoshka_weights": [1.0, "2"]}, TypeError,
     "matryoshka_weights must hold finite floats"),
    ({"matryoshka_dims": [4, 8], "matryoshka_weights": 1.0}, TypeError, "matryoshka_weights must be a list"),
    ({"matryoshka_weights": [1.0]}, ValueError, "matryoshka_weights was given without matryoshka_dims"),
    ({"matryoshka_dims": [4, 8], "matryoshka_normalize": 1}, TypeError, "matryoshka_normalize must be a bool"),
    ({"matryoshka_dims": [4, 8], "hardness": 0.5}, ValueError, "matryoshka_dims cannot be combined"),
    ({"matryoshka_dims": [4, 8], "exclude_self": True}, ValueError, "matryoshka_dims cannot be combined"),
    ({"matryoshka_dims": [4, 8], "false_negative_margin": 0.1}, ValueError, "matryoshka_dims cannot be combined"),
    ({"matryoshka_dims": [4, 8], "decoupled": True}, ValueError, "matryoshka_dims cannot be combined"),
    ({"matryoshka_dims": [4, 8], "query_groups": torch.arange(6), "key_groups": torch.arange(6)}, ValueError,
     "matryoshka_dims cannot be combined"),
]


@pytest.mark.parametrize("kwargs,exc,match", BAD, ids=[str(i) for i in range(len(BAD))])
def test_bad_input_names_the_argument(kwargs, exc, match):
    q, k = _inputs(6, 6, seed=16)
    for backend in ("chunked", "reference"):
        with pytest.raises(exc, match=match):
            xloss.info_nce(q, k, backend=backend, **kwargs)


def test_module_passes_the_options_and_checks_them():
    q, k = _inputs(10, 12, seed=17)
    m = xloss.nn.InfoNCELoss(temperature=0.05, symmetric=False, matryoshka_dims=(4, 8, 19),
                             matryoshka_weights=[1.0, 1.0, 2.0])
    want = xloss.info_nce(q, k, temperature=0.05, symmetric=False, matryoshka_dims=[4, 8, 19],
                          matryoshka_weights=[1.0, 1.0, 2.0])
    assert torch.equal(m(q, k), want)
    assert "matryoshka_dims=[4, 8, 19]" in repr(m) and "matryoshka_weights=[1.0, 1.0, 2.0]" in repr(m)
    plain = xloss.nn.InfoNCELoss(matryoshka_dims=[4, 19], matryoshka_normalize=False)
    assert "matryoshka_normalize=False" in repr(plain)
    assert "matryoshka" not in repr(xloss.nn.InfoNCELoss())
    with pytest.raises(ValueError, match="matryoshka_dims must be strictly increasing"):
        xloss.nn.InfoNCELoss(matryoshka_dims=[8, 4])
    with pytest.raises(ValueError, match="matryoshka_weights must have one weight"):
        xloss.nn.InfoNCELoss(matryoshka_dims=[4, 8], matryoshka_weights=[1.0])
    with pytest.raises(ValueError, match="cannot be combined"):
        xloss.nn.InfoNCELoss(matryoshka_dims=[4, 8], hardness=0.3)
    with pytest.raises(ValueError, match="feature dimension D = 19"):
        xloss.nn.InfoNCELoss(matryoshka_dims=[4, 32])(q, k)


@pytest.mark.parametrize("engine", [e for e in engines.ENGINES if e != "reference"])
def test_reads_nothing_back_to_the_host(engine):
    """No host sync (issue 16's spy), forward and backward, normalised and not, with smoothing."""
    from test_no_sync import host_reads

    q, k = (t.float().requires_grad_() for t in _inputs(16, 20, seed=18))
    s = torch.tensor(3.0, requires_grad=True)
    for kw in ({"matryoshka_dims": DIMS}, {"matryoshka_dims": [5, 19], "matryoshka_normalize": False,
                                           "label_smoothing": 0.1, "labels": torch.arange(16) + 2}):
        with host_reads() as calls:
            xloss.info_nce(q, k, logit_scale=s, backend=engine, **kw).backward()
        assert not calls, f"{engine} {kw}: reads values back to the host at {sorted(set(calls))}"
