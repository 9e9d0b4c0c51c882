"""XTR (issue 14, item 3): ``xloss.xtr_scores`` / ``xloss.xtr_loss`` against the fp64 reference (values and
gradients, masks, k from 1 to beyond the token pool, the one-tile and the two-sweep paths), against
sentence-transformers' ``xtr_scores`` / ``xtr_kd_scores`` and its MNRL formula, under ``torch.compile``, on meta
tensors, with bad input, and the double-backward rule."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from tolerance import assert_close64

import xloss

F64 = torch.float64


def _inputs(nq, lq, nd, ld, dim, seed=0, masks=True, stacked=None):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(nq, lq, dim, generator=g, dtype=F64).requires_grad_()
    shape = (nq, stacked, ld, dim) if stacked else (nd, ld, dim)
    d = torch.randn(*shape, generator=g, dtype=F64).requires_grad_()
    q_mask = d_mask = None
    if masks:
        q_mask = torch.rand(nq, lq, generator=g) > 0.25
        q_mask[:, 0] = True
        d_mask = torch.rand(*shape[:-1], generator=g) > 0.3
        d_mask[..., 0] = True
    return q, d, q_mask, d_mask


def _values_and_grads(fn, q, d):
    out = fn()
    g = torch.linspace(0.5, 1.5, out.numel(), dtype=out.dtype).reshape(out.shape)
    return [out.detach(), *torch.autograd.grad(out, (q, d), g)]


CASES = [  # nq, lq, nd, ld, dim, k
    (3, 4, 5, 6, 8, 7),
    (4, 5, 6, 3, 4, 1),
    (2, 3, 4, 5, 6, 1000),  # k beyond the pool: every valid token is retrieved
    (5, 6, 7, 8, 4, 20),
    (1, 1, 1, 1, 1, 1),
]


@pytest.mark.parametrize("masks", [False, True])
@pytest.mark.parametrize("case", CASES)
def test_scores_and_gradients_equal_the_reference(case, masks):
    nq, lq, nd, ld, dim, k = case
    q, d, qm, dm = _inputs(nq, lq, nd, ld, dim, masks=masks)
    got = _values_and_grads(lambda: xloss.xtr_scores(q, d, qm, dm, k=k), q, d)
    want = _values_and_grads(lambda: xloss.reference.xtr_scores(q, d, qm, dm, k=k), q, d)
    for a, b, name in zip(got, want, ("scores", "dq", "dd")):
        assert_close64(a, b, what=name)


@pytest.mark.parametrize("budget_mb", ["0.0005", "0.002"])
def test_two_sweep_path_with_documents_in_many_tiles(monkeypatch, budget_mb):
    """A small XLOSS_CPU_TILE_MB splits the documents: the running top-k merges tiles, then MaxSim recomputes."""
    monkeypatch.setenv("XLOSS_CPU_TILE_MB", budget_mb)
    q, d, qm, dm = _inputs(5, 6, 30, 8, 4, seed=3)
    for k in (1, 13, 100):
        got = _values_and_grads(lambda k=k: xloss.xtr_scores(q, d, qm, dm, k=k), q, d)
        want = _values_and_grads(lambda k=k: xloss.reference.xtr_scores(q, d, qm, dm, k=k), q, d)
        for a, b, name in zip(got, want, ("scores", "dq", "dd")):
            assert_close64(a, b, what=f"k={k} {name}")


def test_retrieval_is_global_and_scores_are_normalised_by_the_hit_count():
    """A hand-made case: one query token retrieves from one document only."""
    q = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]], dtype=F64)  # 2 query tokens
    d = torch.tensor([[[2.0, 0.0], [0.5, 0.1]], [[0.0, 3.0], [1.0, 1.0]]], dtype=F64)  # 2 documents × 2 tokens
    s = xloss.xtr_scores(q, d, k=1)
    # token 0 retrieves d[0,0] (2.0), token 1 retrieves d[1,0] (3.0); each document is hit by one token
    torch.testing.assert_close(s, torch.tensor([[2.0, 3.0]], dtype=F64))
    s = xloss.xtr_scores(q, d, k=2)  # token 0: d[0,0]=2, d[1,1]=1; token 1: d[1,0]=3, d[1,1]=1
    torch.testing.assert_close(s, torch.tensor([[2.0, (1.0 + 3.0) / 2]], dtype=F64))


def test_masked_tokens_are_never_retrieved_whatever_they_hold():
    q, d, qm, dm = _inputs(3, 4, 5, 6, 8, seed=1)
    base = xloss.xtr_scores(q, d, qm, dm, k=5)
    q2, d2 = q.detach().clone(), d.detach().clone()
    q2[~qm] = float("nan")
    d2[~dm] = 1e6
    assert_close64(xloss.xtr_scores(q2, d2, qm, dm, k=5), base.detach(), what="garbage in masked positions")


def test_nan_in_a_valid_token_propagates_to_its_document():
    q, d, _, _ = _inputs(2, 3, 4, 5, 6, masks=False)
    d = d.detach().clone()
    d[2, 1, 0] = float("nan")
    s = xloss.xtr_scores(q.detach(), d, k=4)
    r = xloss.reference.xtr_scores(q.detach(), d, k=4)
    assert torch.isnan(s[:, 2]).all() and torch.isnan(r[:, 2]).all()
    torch.testing.assert_close(s, r, equal_nan=True)


def test_stacked_documents_are_query_major():
    q, d, qm, dm = _inputs(3, 4, 0, 5, 6, stacked=2)
    s = xloss.xtr_scores(q, d, qm, dm, k=6)
    flat = xloss.xtr_scores(q, d.reshape(6, 5, 6), qm, dm.reshape(6, 5), k=6)
    assert s.shape == (3, 6)
    assert_close64(s.detach(), flat.detach(), what="stacked vs flat")


@pytest.mark.parametrize("k", [1, 5, 64, 10_000])
def test_equals_sentence_transformers_xtr_scores(k):
    scoring = pytest.importorskip("sentence_transformers.multi_vector_encoder.scoring")
    from xloss.integrations import multi_vector as xmv

    g = torch.Generator().manual_seed(k)
    q, d = torch.randn(4, 6, 16, generator=g), torch.randn(4, 3, 9, 16, generator=g)
    qm, dm = torch.rand(4, 6, generator=g) > 0.2, torch.rand(4, 3, 9, generator=g) > 0.3
    dm[1, 2] = False  # a document without a valid token: sentence-transformers' sentinel
    want = scoring.xtr_scores(q, d, qm, dm, top_k=k)
    torch.testing.assert_close(xmv.xtr_scores(q, d, qm, dm, top_k=k), want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(xmv.xtr_kd_scores(q, d, qm, dm, top_k=k), scoring.xtr_kd_scores(q, d, qm, dm, top_k=k),
                               rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(xmv.XTRScores(top_k=k)(q, d, qm, dm), want, rtol=1e-5, atol=1e-5)
    # without masks, all-zero token rows are padding there and here
    q0, d0 = q.clone(), d.clone()
    q0[0, 4:] = 0
    d0[2, 1, 5:] = 0
    torch.testing.assert_close(xmv.xtr_scores(q0, d0, top_k=k), scoring.xtr_scores(q0, d0, top_k=k),
                               rtol=1e-5, atol=1e-5)
    # the core function in fp64 against theirs on fp64 inputs (no empty document there; they sum the
    # per-token maxima in fp32)
    dm[1, 2, 0] = True
    torch.testing.assert_close(xloss.xtr_scores(q.double(), d.double(), qm, dm, k=k),
                               scoring.xtr_scores(q.double(), d.double(), qm, dm, top_k=k).double(),
                               rtol=1e-6, atol=1e-6)


def test_loss_equals_sentence_transformers_mnrl_formula_with_gradients():
    scoring = pytest.importorskip("sentence_transformers.multi_vector_encoder.scoring")
    q, d, qm, dm = _inputs(4, 5, 0, 7, 8, stacked=3, seed=2)
    scale = 2.5
    got = _values_and_grads(lambda: xloss.xtr_loss(q, d, qm, dm, k=9, logit_scale=scale), q, d)

    def theirs():  # MultiVectorMultipleNegativesRankingLoss.forward with similarity_fct=XTRScores(9)
        s = scoring.xtr_scores(q, d, qm, dm, top_k=9)
        return F.cross_entropy(s * scale, torch.arange(4) * 3)

    want = _values_and_grads(theirs, q, d)
    for a, b, name in zip(got, want, ("loss", "dq", "dd")):  # theirs sums the token maxima in fp32
        torch.testing.assert_close(a, b.to(a.dtype), rtol=1e-6, atol=1e-6, msg=name)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_loss_options_equal_the_reference(reduction):
    q, d, qm, dm = _inputs(4, 5, 6, 7, 8, seed=5)
    s = torch.tensor(1.7, dtype=F64, requires_grad=True)
    labels = torch.tensor([3, 0, 5, 1], dtype=torch.int32)

    def run(fn):
        out = fn(q, d, qm, dm, k=11, logit_scale=s, labels=labels, label_smoothing=0.1, reduction=reduction)
        g = torch.linspace(0.5, 1.5, out.numel(), dtype=F64).reshape(out.shape)
        return [out.detach(), *torch.autograd.grad(out, (q, d, s), g)]

    for a, b, name in zip(run(xloss.xtr_loss), run(xloss.reference.xtr_loss), ("loss", "dq", "dd", "ds")):
        assert_close64(a, b, what=name)


def test_compiled_equals_eager():
    q, d, qm, dm = _inputs(3, 4, 0, 5, 8, stacked=2, seed=4)

    def fn(q, d):
        return xloss.xtr_loss(q, d, qm, dm, k=6, temperature=0.5)

    torch._dynamo.reset()
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    got = _values_and_grads(lambda: compiled(q, d), q, d)
    want = _values_and_grads(lambda: fn(q, d), q, d)
    for a, b, name in zip(got, want, ("loss", "dq", "dd")):
        assert_close64(a, b, what=name)


def test_meta_tensors_and_dtypes():
    m = torch.empty(3, 4, 8, device="meta")
    assert xloss.xtr_scores(m, torch.empty(5, 6, 8, device="meta"), k=3).shape == (3, 5)
    assert xloss.xtr_loss(m, torch.empty(3, 2, 6, 8, device="meta"), k=3, logit_scale=1.0).shape == ()
    for dtype, want in ((torch.bfloat16, torch.float32), (torch.float16, torch.float32), (F64, F64)):
        q, d = torch.randn(2, 3, 4).to(dtype), torch.randn(3, 5, 4).to(dtype)
        for backend in ("auto", "chunked", "reference"):
            assert xloss.xtr_scores(q, d, k=4, backend=backend).dtype == want, (dtype, backend)


def test_half_inputs_are_computed_in_fp32():
    q, d, _, _ = _inputs(3, 4, 5, 6, 8, masks=False)
    exact = xloss.xtr_scores(q.detach().bfloat16().double(), d.detach().bfloat16().double(), k=7)
    got = xloss.xtr_scores(q.detach().bfloat16(), d.detach().bfloat16(), k=7)
    torch.testing.assert_close(got.double(), exact, rtol=1e-5, atol=1e-5)


def test_bad_input_gives_clear_errors():
    q, d, _, _ = _inputs(3, 4, 5, 6, 8)
    for k in (0, -1, 2.5, True, None):
        with pytest.raises(ValueError, match="k .* must be a positive integer"):
            xloss.xtr_scores(q, d, k=k)
    with pytest.raises(ValueError, match="stacked d .* needs Nq = 3 rows"):
        xloss.xtr_scores(q, torch.randn(2, 2, 6, 8, dtype=F64), k=3)
    with pytest.raises(ValueError, match="d_mask must have shape"):
        xloss.xtr_scores(q, torch.randn(3, 2, 6, 8, dtype=F64), d_mask=torch.ones(3, 6, dtype=torch.bool), k=3)
    with pytest.raises(ValueError, match="same feature dimension"):
        xloss.xtr_scores(q, torch.randn(5, 6, 7, dtype=F64), k=3)
    with pytest.raises(TypeError, match="needs a scale"):
        xloss.xtr_loss(q, d, k=3)
    with pytest.raises(ValueError, match="labels"):
        xloss.xtr_loss(q, d, k=3, logit_scale=1.0, labels=torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="backend must be one of"):
        xloss.xtr_scores(q, d, k=3, backend="fused")


def test_double_backward_raises_the_one_clear_error_and_reference_is_twice_differentiable():
    q, d, qm, dm = _inputs(2, 3, 4, 5, 6)
    (gq,) = torch.autograd.grad(xloss.xtr_scores(q, d, qm, dm, k=4).sum(), (q,), create_graph=True)
    assert gq.requires_grad
    with pytest.raises(RuntimeError, match=r"double backward .* is not supported .* backend='reference'"):
        (gq ** 2).sum().backward()
    (gq,) = torch.autograd.grad(xloss.xtr_scores(q, d, qm, dm, k=4, backend="reference").sum(), (q,),
                                create_graph=True)
    (gq ** 2).sum().backward()
    assert d.grad is not None and torch.isfinite(d.grad).all()


@pytest.mark.parametrize("backend", ["chunked", "triton"])
def test_valid_tokens_at_minus_infinity_are_retrieved_when_k_covers_them(backend):
    """k = the whole pool: every valid token is retrieved, one whose similarity is -inf too (the reference's
    topk takes them all), so a document whose only tokens are at -inf scores -inf, not 0 (no hit)."""
    if backend == "triton" and not xloss._dispatch.triton_interpret():
        pytest.skip("the triton engine runs on CPU tensors only in the interpreter")
    inf = float("inf")
    q = torch.tensor([[[inf, 1.0], [1.0, 1.0]]])
    d = torch.tensor([[[-1.0, 0.5], [1.0, 2.0]], [[-2.0, 1.0], [-1.0, 3.0]]])
    s = xloss.xtr_scores(q, d, k=4, backend=backend)
    r = xloss.reference.xtr_scores(q, d, k=4)
    assert r[0, 1] == -inf
    torch.testing.assert_close(s, r)
