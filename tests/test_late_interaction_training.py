"""Late interaction in the training layouts (issue 14, items 2 and 4): ``xloss.maxsim_grouped`` and
``xloss.late_interaction_distill_loss`` against their fp64 references (values, gradients, every option), against
PyLate's ``Distillation`` loss and ``colbert_*scores``, against sentence-transformers' multi-vector scoring and
its ``MultiVectorDistillKLDivLoss`` formula, under ``torch.compile``, on meta tensors, and with bad input."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from tolerance import assert_close64

import xloss

F64 = torch.float64


def _inputs(n, lq, groups, ld, dim, seed=0, masks=True, dtype=F64):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(n, lq, dim, generator=g, dtype=dtype).requires_grad_()
    d = torch.randn(n, groups, ld, dim, generator=g, dtype=dtype).requires_grad_()
    q_mask = d_mask = None
    if masks:
        q_mask = torch.rand(n, lq, generator=g) > 0.25
        q_mask[:, 0] = True
        d_mask = torch.rand(n, groups, ld, generator=g) > 0.3
        d_mask[..., 0] = True
    teacher = torch.randn(n, groups, generator=g, dtype=dtype) * 3
    return q, d, q_mask, d_mask, teacher


def _values_and_grads(out, leaves):
    g = torch.linspace(0.5, 1.5, out.numel(), dtype=out.dtype).reshape(out.shape)
    return [out.detach(), *torch.autograd.grad(out, leaves, g)]


SHAPES = [(4, 5, 3, 6, 8), (1, 1, 1, 1, 1), (3, 7, 16, 5, 4), (6, 2, 2, 9, 3)]


@pytest.mark.parametrize("mask_mode", ["exclude", "zero"])
@pytest.mark.parametrize("token_reduction", ["sum", "mean"])
@pytest.mark.parametrize("shape", SHAPES)
def test_grouped_scores_equal_the_reference(shape, token_reduction, mask_mode):
    q, d, qm, dm, _ = _inputs(*shape)
    kw = {"token_reduction": token_reduction, "mask_mode": mask_mode}
    got = _values_and_grads(xloss.maxsim_grouped(q, d, qm, dm, **kw), (q, d))
    want = _values_and_grads(xloss.reference.maxsim_grouped(q, d, qm, dm, **kw), (q, d))
    for a, b, name in zip(got, want, ("scores", "dq", "dd")):
        assert_close64(a, b, what=name)
    # and each column is maxsim_pairs of q against that column
    for j in range(d.shape[1]):
        col = xloss.maxsim_pairs(q, d[:, j], qm, None if dm is None else dm[:, j], **kw)
        assert_close64(got[0][:, j], col.detach(), what=f"column {j}")


@pytest.mark.parametrize("tile_mb", [None, "0.0005"])
@pytest.mark.parametrize("engine", ["op", "tiles"])
@pytest.mark.parametrize("mask_mode", ["exclude", "zero"])
def test_grouped_engines_blocks_and_padding(engine, tile_mb, mask_mode, monkeypatch):
    """The grouped sweep (query a against documents a·n … a·n + n - 1) through the compiled op and through the
    tile loop, with the backward in one block or in many (blocks of whole groups): equal to the reference;
    NaN in masked-out tokens and an empty document change nothing."""
    from xloss.late_interaction import chunked

    if engine == "tiles":
        monkeypatch.setattr(chunked, "_use_op", lambda *a: False)
    elif not xloss._ext.has_op("maxsim_q2d"):
        pytest.skip("the compiled ops could not be built here")
    if tile_mb is not None:
        monkeypatch.setenv("XLOSS_CPU_TILE_MB", tile_mb)
    q, d, qm, dm, _ = _inputs(5, 6, 3, 7, 4, seed=3)
    dm[1, 2] = False  # an empty document
    with torch.no_grad():
        q.masked_fill_(~qm[:, :, None], float("nan"))
        d.masked_fill_(~dm[..., None], float("nan"))
    got = _values_and_grads(xloss.maxsim_grouped(q, d, qm, dm, mask_mode=mask_mode, backend="chunked"), (q, d))
    want = _values_and_grads(xloss.reference.maxsim_grouped(q, d, qm, dm, mask_mode=mask_mode), (q, d))
    for a, b, name in zip(got, want, ("scores", "dq", "dd")):
        assert torch.isfinite(a).all(), name
        assert_close64(a, b, what=name)


@pytest.mark.parametrize("normalize_scores", [False, True])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_distill_loss_equals_the_reference(reduction, normalize_scores):
    q, d, qm, dm, t = _inputs(5, 4, 6, 7, 8, seed=1)
    s = torch.tensor(1.3, dtype=F64, requires_grad=True)
    kw = {"logit_scale": s, "teacher_temperature": 0.7, "normalize_scores": normalize_scores, "reduction": reduction}
    got = _values_and_grads(xloss.late_interaction_distill_loss(q, d, t, qm, dm, **kw), (q, d, s))
    want = _values_and_grads(xloss.reference.late_interaction_distill_loss(q, d, t, qm, dm, logit_scale=s,
                                                                           teacher_temperature=0.7,
                                                                           normalize_scores=normalize_scores,
                                                                           reduction=reduction), (q, d, s))
    for a, b, name in zip(got, want, ("loss", "dq", "dd", "ds")):
        assert_close64(a, b, what=name)


def test_distill_loss_is_zero_when_student_equals_teacher_and_teacher_gets_no_gradient():
    q, d, qm, dm, _ = _inputs(3, 4, 5, 6, 8, seed=2)
    teacher = xloss.maxsim_grouped(q, d, qm, dm).detach().requires_grad_()
    loss = xloss.late_interaction_distill_loss(q, d, teacher, qm, dm)
    assert abs(float(loss)) < 1e-12
    loss.backward()
    assert teacher.grad is None


class _StubColBERT(torch.nn.Module):
    """What PyLate's ``Distillation`` reads from a model: token embeddings, a skiplist, query expansion."""

    def __init__(self):
        super().__init__()
        self.skiplist = []
        self.do_query_expansion = False

    def forward(self, features):
        return {"token_embeddings": features["embeddings"]}


@pytest.mark.parametrize("normalize_scores", [True, False])
def test_distill_loss_equals_pylate_distillation(normalize_scores):
    losses = pytest.importorskip("pylate.losses")
    from xloss.integrations import pylate as xp

    n, groups, lq, ld, dim = 3, 4, 5, 6, 8
    q, d, _, _, teacher = _inputs(n, lq, groups, ld, dim, seed=3, masks=False)
    q_att = torch.ones(n, lq, dtype=torch.long)
    d_att = (torch.rand(n * groups, ld, generator=torch.Generator().manual_seed(4)) > 0.3).long()
    d_att[:, 0] = 1
    features = [
        {"input_ids": torch.ones(n, lq, dtype=torch.long), "attention_mask": q_att, "embeddings": q},
        {"input_ids": torch.ones(n * groups, ld, dtype=torch.long), "attention_mask": d_att,
         "embeddings": d.reshape(n * groups, ld, dim)},
    ]
    theirs = losses.Distillation(_StubColBERT(), normalize_scores=normalize_scores)
    want = _values_and_grads(theirs(features, teacher), (q, d))
    # The same loss from xloss, on the embeddings PyLate normalises, masks multiplying (mask_mode="zero")
    qn, dn = F.normalize(q, dim=-1), F.normalize(d, dim=-1)
    ours = xloss.late_interaction_distill_loss(qn, dn, teacher, q_att, d_att.view(n, groups, ld), mask_mode="zero",
                                               normalize_scores=normalize_scores)
    got = _values_and_grads(ours, (q, d))
    for a, b, name in zip(got, want, ("loss", "dq", "dd")):
        assert_close64(a, b, what=name)
    # and PyLate's own loss with xloss's scoring function in place of its colbert_kd_scores
    swapped = losses.Distillation(_StubColBERT(), normalize_scores=normalize_scores,
                                  score_metric=xp.colbert_kd_scores)
    got = _values_and_grads(swapped(features, teacher), (q, d))
    for a, b, name in zip(got, want, ("loss", "dq", "dd")):
        assert_close64(a, b, what=f"score_metric swapped: {name}")


def test_pylate_scoring_functions_are_equal():
    scores = pytest.importorskip("pylate.scores")
    from xloss.integrations import pylate as xp

    q, d, qm, dm, _ = _inputs(4, 5, 3, 7, 8, seed=5)
    q, d, qm, dm = q.detach(), d.detach(), qm.double(), dm.double()  # PyLate's masks are float
    assert_close64(xp.colbert_kd_scores(q, d, qm, dm), scores.colbert_kd_scores(q, d, qm, dm), what="kd")
    flat, flat_mask = d.reshape(12, 7, 8), dm.reshape(12, 7)
    assert_close64(xp.colbert_scores(q, flat, qm, flat_mask), scores.colbert_scores(q, flat, qm, flat_mask),
                   what="colbert_scores")
    assert_close64(xp.colbert_scores(q, d, qm, dm), xp.colbert_scores(q, flat, qm, flat_mask), what="stacked")
    assert_close64(xp.colbert_scores_pairwise(q, d[:, 0]), scores.colbert_scores_pairwise(q, d[:, 0]),
                   what="pairwise")


@pytest.mark.parametrize("length_normalize", [False, True])
def test_sentence_transformers_scoring_functions_are_equal(length_normalize):
    scoring = pytest.importorskip("sentence_transformers.multi_vector_encoder.scoring")
    from xloss.integrations import multi_vector as xmv

    q, d, qm, dm, _ = _inputs(4, 5, 3, 7, 8, seed=6, dtype=torch.float32)
    q, d = q.detach(), d.detach()
    dm[2, 1] = False  # a document without a valid token: the sentinel score
    kw = {"length_normalize": length_normalize}
    for ours, theirs in ((xmv.colbert_scores, scoring.colbert_scores), (xmv.colbert_kd_scores, scoring.colbert_kd_scores)):
        torch.testing.assert_close(ours(q, d, qm, dm, **kw), theirs(q, d, qm, dm, **kw), rtol=1e-5, atol=1e-5)
    q0, d0 = q.clone(), d.clone()  # no masks: all-zero rows are padding
    q0[1, 3:] = 0
    d0[0, 2] = 0
    torch.testing.assert_close(xmv.colbert_scores(q0, d0, **kw), scoring.colbert_scores(q0, d0, **kw),
                               rtol=1e-5, atol=1e-5)


def test_distill_loss_equals_sentence_transformers_kl_div_formula():
    scoring = pytest.importorskip("sentence_transformers.multi_vector_encoder.scoring")
    q, d, qm, dm, t = _inputs(4, 5, 3, 7, 8, seed=7)
    tau = 0.25

    def theirs():  # MultiVectorDistillKLDivLoss.forward: KLDivLoss(batchmean, log_target) · τ²
        s = scoring.colbert_kd_scores(q, d, qm, dm)
        kl = torch.nn.KLDivLoss(reduction="batchmean", log_target=True)
        return kl(F.log_softmax(s / tau, dim=-1), F.log_softmax(t / tau, dim=-1)) * tau**2

    want = _values_and_grads(theirs(), (q, d))
    ours = xloss.late_interaction_distill_loss(q, d, t, qm, dm, temperature=tau, teacher_temperature=tau) * tau**2
    got = _values_and_grads(ours, (q, d))
    for a, b, name in zip(got, want, ("loss", "dq", "dd")):  # theirs keeps the token maxima in fp32
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6, msg=name)


def test_compiled_equals_eager():
    q, d, qm, dm, t = _inputs(3, 4, 2, 5, 8, seed=8)

    def fn(q, d):
        return xloss.late_interaction_distill_loss(q, d, t, qm, dm, temperature=0.5, normalize_scores=True)

    torch._dynamo.reset()
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    for a, b, name in zip(_values_and_grads(compiled(q, d), (q, d)), _values_and_grads(fn(q, d), (q, d)),
                          ("loss", "dq", "dd")):
        assert_close64(a, b, what=name)


def test_meta_tensors_dtypes_and_backends():
    m = torch.empty(3, 4, 8, device="meta")
    md = torch.empty(3, 2, 6, 8, device="meta")
    assert xloss.maxsim_grouped(m, md).shape == (3, 2)
    assert xloss.late_interaction_distill_loss(m, md, torch.empty(3, 2, device="meta")).shape == ()
    q, d, qm, dm, _ = _inputs(2, 3, 2, 4, 5, seed=9)
    ref = xloss.maxsim_grouped(q, d, qm, dm, backend="reference").detach()
    for backend in ("auto", "chunked", "dense", "reference"):
        assert_close64(xloss.maxsim_grouped(q, d, qm, dm, backend=backend).detach(), ref, what=backend)
    for dtype in (torch.bfloat16, torch.float16):
        for backend in ("auto", "reference"):
            out = xloss.maxsim_grouped(q.detach().to(dtype), d.detach().to(dtype), backend=backend)
            assert out.dtype == torch.float32, (dtype, backend)


def test_bad_input_gives_clear_errors():
    q, d, qm, dm, t = _inputs(3, 4, 2, 5, 8)
    with pytest.raises(ValueError, match=r"d must be 4-D \[N, n, Ld, D\]"):
        xloss.maxsim_grouped(q, d[:, 0])
    with pytest.raises(ValueError, match="a group of documents for each of the N = 3 queries"):
        xloss.maxsim_grouped(q, d[:2])
    with pytest.raises(ValueError, match=r"d_mask must have shape \(3, 2, 5\)"):
        xloss.maxsim_grouped(q, d, qm, dm[:, 0])
    with pytest.raises(ValueError, match=r"teacher_scores must have shape \(3, 2\)"):
        xloss.late_interaction_distill_loss(q, d, t[:, :1])
    with pytest.raises(TypeError, match="teacher_scores must be a floating-point tensor"):
        xloss.late_interaction_distill_loss(q, d, torch.ones(3, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="reduction"):
        xloss.late_interaction_distill_loss(q, d, t, reduction="batchmean")
    with pytest.raises(ValueError, match="same feature dimension"):
        xloss.maxsim_grouped(q, torch.randn(3, 2, 5, 7, dtype=F64))


def test_double_backward_rule():
    q, d, qm, dm, t = _inputs(2, 3, 2, 4, 5)
    (gq,) = torch.autograd.grad(xloss.late_interaction_distill_loss(q, d, t, qm, dm), (q,), create_graph=True)
    with pytest.raises(RuntimeError, match=r"double backward .* is not supported .* backend='reference'"):
        (gq ** 2).sum().backward()
    (gq,) = torch.autograd.grad(xloss.late_interaction_distill_loss(q, d, t, qm, dm, backend="reference"), (q,),
                                create_graph=True)
    (gq ** 2).sum().backward()
    assert torch.isfinite(d.grad).all()
