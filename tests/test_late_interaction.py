"""Late interaction / MaxSim (SPEC.md §3): reference vs PyLate, FILIP and HBI-WTI; CPU path vs reference.

Every option is compared with the naive reference in fp64 (values and gradients of q, d, the token weights and
the logit scale), on ragged masks with fully masked queries and documents, Nq != Nd and exact ties.  fp32 runs
of the fast path must be no further from the fp64 result than the naive fp32 reference is, plus a small slack.

All shapes are tiny: the machine has 2 shared cores and the whole file must run in seconds.
"""

from __future__ import annotations

import dataclasses
import itertools

import engines
import pytest
import torch
import torch.nn.functional as F
from tolerance import assert_close64

import xloss
from xloss import reference
from xloss.late_interaction import chunked as _chunked

NQ, ND, LQ, LD, D = 5, 7, 4, 6, 8
MODES = ("exclude", "zero")
DIRECTIONS = ("q2d", "d2q", "both")
REDUCTIONS = ("sum", "mean")


# --------------------------------------------------------------------------------------------- helpers
def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def make_inputs(nq=NQ, nd=ND, lq=LQ, ld=LD, d=D, *, seed=0, dtype=torch.float64, empty_rows=True):
    """Random tokens (drawn in fp32 so that casts to fp64 are exact), ragged masks, positive weights.

    With ``empty_rows`` query 1 and document 2 have every token masked (when there are enough of them).
    """
    g = _gen(seed)
    q = torch.randn(nq, lq, d, generator=g)
    dd = torch.randn(nd, ld, d, generator=g)
    q_mask = torch.rand(nq, lq, generator=g) < 0.75
    d_mask = torch.rand(nd, ld, generator=g) < 0.6
    q_mask[0] = True
    d_mask[0] = True
    if empty_rows and nq > 2:
        q_mask[1] = False
    if empty_rows and nd > 3:
        d_mask[2] = False
    q_w = torch.rand(nq, lq, generator=g) + 0.5
    d_w = torch.rand(nd, ld, generator=g) + 0.5
    return q.to(dtype), dd.to(dtype), q_mask, d_mask, q_w.to(dtype), d_w.to(dtype)


def grad_output(shape, seed=123, dtype=torch.float64):
    return torch.randn(shape, generator=_gen(seed)).to(dtype)


def run(fn, tensors: dict, go=None, **kwargs):
    """Call ``fn(**tensors, **kwargs)`` on fresh leaf copies of the float tensors; return ``[out, grads...]``
    (the gradients of every float tensor in ``tensors``, in order; None for those that got none)."""
    leaves = {}
    for k, v in tensors.items():
        if isinstance(v, torch.Tensor) and v.dtype.is_floating_point:
            leaves[k] = v.detach().clone().requires_grad_(True)
        else:
            leaves[k] = v
    out = fn(**leaves, **kwargs)
    if go is None:
        go = grad_output(out.shape, dtype=out.dtype)
    (out * go).sum().backward()
    return [out.detach()] + [v.grad for v in leaves.values() if isinstance(v, torch.Tensor) and v.requires_grad]


def assert_close_lists(got, want, rtol=1e-10, atol=1e-12):
    assert len(got) == len(want)
    for i, (a, b) in enumerate(zip(got, want)):
        if b is None:
            assert a is None or not a.any(), f"entry {i}: expected no gradient"
            continue
        assert a is not None, f"entry {i}: missing gradient"
        assert torch.isfinite(a).all(), f"entry {i}: non-finite values"
        if b.dtype == torch.float64:  # the suite's fp64 rule at this file's rtol
            assert_close64(a.to(b.dtype), b, rtol=rtol, what=f"entry {i}")
        else:
            torch.testing.assert_close(a.to(b.dtype), b, rtol=rtol, atol=atol, msg=lambda m, i=i: f"entry {i}: {m}")


def pylate_colbert_scores(queries_embeddings, documents_embeddings, queries_mask=None, documents_mask=None):
    """PyLate's ``colbert_scores`` (pylate/scores/scores.py), as published."""
    scores = torch.einsum("ash,bth->abst", queries_embeddings, documents_embeddings)
    if queries_mask is not None and documents_mask is not None:
        scores = scores * torch.einsum("ah,bt->abht", queries_mask, documents_mask)
    return scores.max(axis=-1).values.sum(axis=-1)


# ------------------------------------------------------------------------------ reference vs published code
@pytest.mark.parametrize("masks", [False, True])
def test_reference_equals_pylate_colbert_scores(masks):
    q, d, qm, dm, _, _ = make_inputs(empty_rows=True)
    want = pylate_colbert_scores(q, d, qm.to(q.dtype) if masks else None, dm.to(q.dtype) if masks else None)
    got = reference.maxsim(q, d, qm if masks else None, dm if masks else None, mask_mode="zero")
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    fast = xloss.maxsim(q, d, qm if masks else None, dm if masks else None, mask_mode="zero", backend="cpu")
    torch.testing.assert_close(fast, want, rtol=1e-12, atol=1e-12)


def _filip_loops(img, txt, txt_mask, scale, eps):
    """FILIP (Yao et al. 2021, eqs. 4-5) pair by pair: image i against text j, mean over image tokens of the
    max over valid text tokens, and mean over valid text tokens of the max over image tokens."""
    n, m = img.shape[0], txt.shape[0]
    s_i2t = torch.zeros(n, m, dtype=img.dtype)
    s_t2i = torch.zeros(m, n, dtype=img.dtype)
    for i in range(n):
        for j in range(m):
            t = txt[j][txt_mask[j]]  # [valid, D]
            sim = img[i] @ t.T  # [Li, valid]
            s_i2t[i, j] = sim.max(1).values.mean()
            s_t2i[j, i] = sim.max(0).values.mean()
    labels = torch.arange(n)
    return (F.cross_entropy(scale * s_i2t, labels, label_smoothing=eps)
            + F.cross_entropy(scale * s_t2i, labels, label_smoothing=eps)) / 2


@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_filip_definition(eps):
    img, txt, _, txt_mask, _, _ = make_inputs(nq=5, nd=5, empty_rows=False)
    want = _filip_loops(img, txt, txt_mask, 3.0, eps)
    for backend in ("reference", "cpu"):
        got = xloss.late_interaction_loss(img, txt, None, txt_mask, logit_scale=3.0, direction="both",
                                          label_smoothing=eps, backend=backend)
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_hbi_weighted_token_interaction():
    """HBI's WTI: ``S_ab = ½[Σ_t wt_at max_v s + Σ_v wv_bv max_t s]``, weights used as given (here positive
    weights on all-valid tokens, as HBI's softmaxed weights)."""
    q, d, _, _, qw, dw = make_inputs(empty_rows=False)
    sim = torch.einsum("atd,bvd->abtv", q, d)
    want = ((qw[:, None, :] * sim.max(-1).values).sum(-1) + (dw[None, :, :] * sim.max(-2).values).sum(-1)) / 2
    for backend in ("reference", "cpu"):
        got = xloss.maxsim(q, d, q_weights=qw, d_weights=dw, direction="both", backend=backend)
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_mean_reduction_with_weights_divides_by_valid_count():
    q, d, qm, dm, qw, _ = make_inputs(empty_rows=False)
    s_sum = reference.maxsim(q, d, qm, dm, q_weights=qw)
    s_mean = reference.maxsim(q, d, qm, dm, q_weights=qw, token_reduction="mean")
    torch.testing.assert_close(s_mean, s_sum / qm.sum(1, keepdim=True).to(q.dtype))


# ----------------------------------------------------------------------------------- fast path vs reference
@pytest.mark.parametrize("weights", [False, True], ids=["plain", "weights"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("direction", DIRECTIONS)
@pytest.mark.parametrize("mode", MODES)
def test_maxsim_matches_reference(mode, direction, reduction, weights):
    q, d, qm, dm, qw, dw = make_inputs()
    tensors = {"q": q, "d": d, "q_mask": qm, "d_mask": dm}
    if weights and direction != "d2q":
        tensors["q_weights"] = qw
    if weights and direction != "q2d":
        tensors["d_weights"] = dw
    opts = {"mask_mode": mode, "direction": direction, "token_reduction": reduction}
    want = run(reference.maxsim, tensors, **opts)
    got = run(xloss.maxsim, tensors, backend="cpu", **opts)
    assert got[0].shape == (NQ, ND)
    assert_close_lists(got, want)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("direction", DIRECTIONS)
@pytest.mark.parametrize("mode", MODES)
def test_maxsim_pairs_matches_reference(mode, direction, reduction):
    q, d, qm, dm, qw, dw = make_inputs(nq=6, nd=6)
    tensors = {"q": q, "d": d, "q_mask": qm, "d_mask": dm}
    if direction != "d2q":
        tensors["q_weights"] = qw
    if direction != "q2d":
        tensors["d_weights"] = dw
    opts = {"mask_mode": mode, "direction": direction, "token_reduction": reduction}
    want = run(reference.maxsim_pairs, tensors, **opts)
    got = run(xloss.maxsim_pairs, tensors, backend="cpu", **opts)
    assert got[0].shape == (6,)
    assert_close_lists(got, want)
    # and it is the diagonal of the cross scores
    full = xloss.maxsim(q, d, qm, dm, q_weights=tensors.get("q_weights"), d_weights=tensors.get("d_weights"),
                        backend="cpu", **opts)
    torch.testing.assert_close(got[0], full.diagonal(), rtol=1e-12, atol=1e-12)


LOSS_CASES = {
    # name: (nq, nd, labels kind)
    "square": (5, 5, None),
    "extra-docs": (4, 7, None),
    "labels-perm": (4, 7, "perm"),
    "fewer-docs-dup-labels": (7, 4, "dup"),
}


def _labels(kind, nq, nd, seed=5):
    g = _gen(seed)
    if kind == "perm":
        return torch.randperm(nd, generator=g)[:nq]
    if kind == "dup":
        lab = torch.randint(0, nd, (nq,), generator=g)
        lab[1] = lab[0]
        return lab
    return None


@pytest.mark.parametrize("case", list(LOSS_CASES))
@pytest.mark.parametrize("direction", DIRECTIONS)
def test_loss_matches_reference(case, direction):
    nq, nd, kind = LOSS_CASES[case]
    q, d, qm, dm, qw, dw = make_inputs(nq=nq, nd=nd)
    labels = _labels(kind, nq, nd)
    for mode, eps, reduction, weights in itertools.product(MODES, (0.0, 0.2), ("mean", "sum", "none"), (False, True)):
        tensors = {"q": q, "d": d, "q_mask": qm, "d_mask": dm, "logit_scale": torch.tensor(2.5, dtype=torch.float64)}
        if weights and direction != "d2q":
            tensors["q_weights"] = qw[:nq]
        if weights and direction != "q2d":
            tensors["d_weights"] = dw[:nd]
        opts = {"labels": labels, "direction": direction, "label_smoothing": eps, "reduction": reduction, "mask_mode": mode}
        want = run(reference.late_interaction_loss, tensors, **opts)
        got = run(xloss.late_interaction_loss, tensors, backend="cpu", **opts)
        assert_close_lists(got, want)


@pytest.mark.parametrize("token_reduction", [None, "sum", "mean"])
@pytest.mark.parametrize("direction", DIRECTIONS)
def test_loss_token_reduction_and_float_scale(direction, token_reduction):
    q, d, qm, dm, _, _ = make_inputs(nq=5, nd=5)
    opts = {"direction": direction, "token_reduction": token_reduction, "logit_scale": 7.0}
    want = run(reference.late_interaction_loss, {"q": q, "d": d, "q_mask": qm, "d_mask": dm}, **opts)
    got = run(xloss.late_interaction_loss, {"q": q, "d": d, "q_mask": qm, "d_mask": dm}, backend="cpu", **opts)
    assert_close_lists(got, want)
    default = "sum" if direction == "q2d" else "mean"
    explicit = reference.late_interaction_loss(q, d, qm, dm, logit_scale=7.0, direction=direction,
                                               token_reduction=token_reduction or default)
    torch.testing.assert_close(want[0], explicit)


def test_loss_d2q_is_column_cross_entropy():
    """"d2q": each document against all queries (columns of s·S^{d2q})."""
    q, d, qm, dm, _, _ = make_inputs(nq=5, nd=5)
    s = reference.maxsim(q, d, qm, dm, direction="d2q", token_reduction="mean")
    want = F.cross_entropy(2.0 * s.T, torch.arange(5))
    got = xloss.late_interaction_loss(q, d, qm, dm, logit_scale=2.0, direction="d2q", backend="cpu")
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


# ----------------------------------------------------------------------------------------- special values
@pytest.mark.parametrize("direction", DIRECTIONS)
@pytest.mark.parametrize("mode", MODES)
def test_ties_go_to_lowest_index(mode, direction):
    """Integer-valued tokens (exact arithmetic) with duplicated tokens on both sides: many exact ties; the
    gradients equal the reference's, whose max is torch.max (lowest index)."""
    g = _gen(3)
    q = torch.randint(-2, 3, (4, 5, 3), generator=g).double()
    d = torch.randint(-2, 3, (6, 7, 3), generator=g).double()
    d[:, 4] = d[:, 1]  # duplicate document tokens
    q[:, 3] = q[:, 0]  # duplicate query tokens
    qm = torch.ones(4, 5, dtype=torch.bool)
    dm = torch.ones(6, 7, dtype=torch.bool)
    dm[:, 0] = False  # an invalid token that would often tie (zero mode: score 0)
    qm[:, 2] = False
    tensors = {"q": q, "d": d, "q_mask": qm, "d_mask": dm}
    opts = {"mask_mode": mode, "direction": direction}
    want = run(reference.maxsim, tensors, **opts)
    got = run(xloss.maxsim, tensors, backend="cpu", **opts)
    assert_close_lists(got, want, rtol=0, atol=1e-13)


def test_engine_indices_and_values():
    """The raw CPU engine: int16 indices equal to torch.max's (lowest on ties), -1 / 0 for no valid token."""
    q, d, qm, dm, _, _ = make_inputs()
    d[:, 3] = d[:, 1]
    acc = torch.float64
    q_w = reference.late_interaction.token_weights(qm, None, "sum", acc)
    d_w = reference.late_interaction.token_weights(dm, None, "sum", acc)
    s1, i1, v1, s2, i2, v2 = _chunked.maxsim_fwd(q, d, q_w, d_w, qm, dm, False, True, True)
    assert i1.dtype == i2.dtype == torch.int16
    assert i1.shape == (NQ, ND, LQ) and i2.shape == (NQ, ND, LD)
    sim = torch.einsum("atd,bvd->abtv", q, d)
    want_v, want_i = sim.masked_fill(~dm[None, :, None, :], float("-inf")).max(-1)
    has = dm.any(1)[None, :, None].expand_as(want_i)
    sel = has & qm[:, None, :]  # both directions asked: entries at invalid query tokens are don't-care
    assert torch.equal(i1[sel].long(), want_i[sel])
    assert torch.equal(v1[sel], want_v[sel])
    assert (i1[~has] == -1).all() and (v1[~has] == 0).all()
    torch.testing.assert_close(s1, (q_w[:, None, :] * v1).sum(-1))
    _want_v2, want_i2 = sim.masked_fill(~qm[:, None, :, None], float("-inf")).max(-2)
    has2 = qm.any(1)[:, None, None].expand_as(want_i2)
    sel2 = has2 & dm[None, :, :]
    assert torch.equal(i2[sel2].long(), want_i2[sel2])
    assert (i2[~has2] == -1).all() and (v2[~has2] == 0).all()
    torch.testing.assert_close(s2, (d_w[None] * v2).sum(-1))
    # one direction only: the other is None; zero mode: -1 only at masked-out query tokens (invalid document
    # tokens score 0 and compete, so every valid query token has a winner)
    out = _chunked.maxsim_fwd(q, d, q_w, None, qm, dm, True, True, False)
    assert out[3] is None and out[4] is None and out[5] is None
    valid = qm[:, None, :].expand_as(out[1])
    assert (out[1][valid] >= 0).all() and (out[1][~valid] == -1).all() and (out[2][~valid] == 0).all()
    out = _chunked.maxsim_fwd(q, d, q_w, d_w, qm, dm, False, True, False, need_aux=False)
    assert out[1] is None and out[2] is None
    torch.testing.assert_close(out[0], s1)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("direction", DIRECTIONS)
@pytest.mark.parametrize("mode", MODES)
def test_fully_masked_rows_score_zero_without_nan(mode, direction, reduction):
    q, d, qm, dm, qw, dw = make_inputs()
    qm[1] = False
    dm[2] = False
    tensors = {"q": q, "d": d, "q_mask": qm, "d_mask": dm}
    if direction != "d2q":
        tensors["q_weights"] = qw
    if direction != "q2d":
        tensors["d_weights"] = dw
    out = run(xloss.maxsim, tensors, backend="cpu", mask_mode=mode, direction=direction, token_reduction=reduction)
    for t in out:
        assert torch.isfinite(t).all()
    s, dq, dd = out[:3]
    assert (s[1] == 0).all()  # a query with no valid token
    assert (s[:, 2] == 0).all()  # a document with no valid token
    assert (dq[1] == 0).all() and (dd[2] == 0).all()
    # masked tokens get no gradient, and neither do their weights
    assert (dq[~qm] == 0).all() and (dd[~dm] == 0).all()
    for w_grad, mask in zip(out[3:], [m for k, m in (("q_weights", qm), ("d_weights", dm)) if k in tensors]):
        assert (w_grad[~mask] == 0).all()


def test_weights_at_masked_tokens_are_ignored():
    q, d, qm, dm, qw, dw = make_inputs()
    qw2, dw2 = qw.clone(), dw.clone()
    qw2[~qm] = float("nan")
    dw2[~dm] = float("inf")
    for backend in ("cpu", "reference"):
        a = xloss.maxsim(q, d, qm, dm, q_weights=qw, d_weights=dw, direction="both", backend=backend)
        b = xloss.maxsim(q, d, qm, dm, q_weights=qw2, d_weights=dw2, direction="both", backend=backend)
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_all_tokens_masked_everywhere():
    q, d, qm, dm, _, _ = make_inputs()
    qm[:] = False
    dm[:] = False
    for mode, direction, reduction in itertools.product(MODES, DIRECTIONS, REDUCTIONS):
        out = run(xloss.maxsim, {"q": q, "d": d, "q_mask": qm, "d_mask": dm}, backend="cpu", mask_mode=mode,
                  direction=direction, token_reduction=reduction)
        for t in out:
            assert (t == 0).all()
        loss = run(xloss.late_interaction_loss, {"q": q, "d": d, "q_mask": qm, "d_mask": dm}, backend="cpu",
                   logit_scale=3.0, mask_mode=mode, direction=direction)
        for t in loss:
            assert torch.isfinite(t).all()


# ------------------------------------------------------------------------------------------------ modes
def test_forward_under_no_grad():
    q, d, qm, dm, qw, dw = make_inputs()
    q.requires_grad_(True)
    qw.requires_grad_(True)
    for direction in DIRECTIONS:
        kw = {"q_weights": qw if direction != "d2q" else None, "d_weights": dw if direction != "q2d" else None}
        with_grad = xloss.maxsim(q, d, qm, dm, direction=direction, backend="cpu", **kw)
        with torch.no_grad():
            no_grad = xloss.maxsim(q, d, qm, dm, direction=direction, backend="cpu", **kw)
            pairs = xloss.maxsim_pairs(q, d[:NQ], qm, dm[:NQ], direction=direction, backend="cpu", **{
                k: (v if v is None or k == "q_weights" else v[:NQ]) for k, v in kw.items()})
            loss = xloss.late_interaction_loss(q, d, qm, dm, logit_scale=2.0, direction=direction, backend="cpu",
                                               **kw)
        assert not no_grad.requires_grad and not pairs.requires_grad and not loss.requires_grad
        torch.testing.assert_close(no_grad, with_grad.detach(), rtol=0, atol=0)


def test_tiny_tile_budget_equals_one_tile(monkeypatch):
    q, d, qm, dm, qw, dw = make_inputs(nq=9, nd=11, lq=5, ld=7)
    tensors = {"q": q, "d": d, "q_mask": qm, "d_mask": dm, "q_weights": qw, "d_weights": dw}
    results = []
    for budget in ("64", "0.0005"):  # one tile / one query × one document per tile (and tiny backward blocks)
        monkeypatch.setenv("XLOSS_CPU_TILE_MB", budget)
        if budget != "64":
            assert _chunked.tile_blocks(9, 5, 11, 7, 8) == (1, 1)
        for mode, direction in itertools.product(MODES, ("both",)):
            results.append(run(xloss.maxsim, tensors, backend="cpu", mask_mode=mode, direction=direction))
        pairs = {k: v for k, v in tensors.items()}
        pairs["d"], pairs["d_mask"], pairs["d_weights"] = d[:9], dm[:9], dw[:9]
        results.append(run(xloss.maxsim_pairs, pairs, backend="cpu", direction="both"))
    half = len(results) // 2
    for one, many in zip(results[:half], results[half:]):
        assert_close_lists(many, one, rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("direction", DIRECTIONS)
@pytest.mark.parametrize("mode", MODES)
def test_gradcheck(mode, direction):
    q, d, qm, dm, qw, dw = make_inputs(nq=3, nd=4, lq=3, ld=4, d=3, seed=7)
    q, d, qw, dw = (t.requires_grad_(True) for t in (q, d, qw, dw))

    def scores(q, d, qw, dw):
        return xloss.maxsim(q, d, qm, dm, mask_mode=mode, direction=direction, backend="cpu",
                            q_weights=qw if direction != "d2q" else None, d_weights=dw if direction != "q2d" else None)

    assert torch.autograd.gradcheck(scores, (q, d, qw, dw))
    scale = torch.tensor(1.5, dtype=torch.float64, requires_grad=True)

    def loss(q, d, scale):
        return xloss.late_interaction_loss(q, d, qm, dm, logit_scale=scale, mask_mode=mode, direction=direction,
                                           label_smoothing=0.1, backend="cpu")

    assert torch.autograd.gradcheck(loss, (q, d, scale))


def test_gradcheck_pairs():
    q, d, qm, dm, qw, dw = make_inputs(nq=3, nd=3, lq=3, ld=4, d=3, seed=8)
    q, d, qw, dw = (t.requires_grad_(True) for t in (q, d, qw, dw))
    for mode in MODES:
        def f(q, d, qw, dw, mode=mode):
            return xloss.maxsim_pairs(q, d, qm, dm, mask_mode=mode, direction="both", q_weights=qw, d_weights=dw,
                                      backend="cpu")

        assert torch.autograd.gradcheck(f, (q, d, qw, dw))


# -------------------------------------------------------------------------------------------- precision
@pytest.mark.parametrize("direction", DIRECTIONS)
def test_fp32_no_worse_than_naive_fp32(direction):
    q, d, qm, dm, _qw, _dw = make_inputs(nq=8, nd=8, lq=6, ld=9, d=16, empty_rows=False)
    tensors = {"q": q, "d": d, "q_mask": qm, "d_mask": dm, "logit_scale": torch.tensor(5.0, dtype=torch.float64)}
    opts = {"direction": direction, "label_smoothing": 0.1}
    exact = run(reference.late_interaction_loss, tensors, **opts)
    t32 = {k: (v.float() if v.dtype.is_floating_point else v) for k, v in tensors.items()}
    go = torch.tensor(0.75)
    naive = run(reference.late_interaction_loss, t32, go=go, **opts)
    fast = run(xloss.late_interaction_loss, t32, go=go, backend="cpu", **opts)
    for f, n, e in zip(fast, naive, exact):
        assert f.dtype == torch.float32
        err_fast = (f.double() - e).abs().max().item()
        err_naive = (n.double() - e).abs().max().item()
        assert err_fast <= 2 * err_naive + 1e-6 * (1 + e.abs().max().item()), (err_fast, err_naive)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs_compute_in_fp32(dtype):
    q, d, qm, dm, _qw, _dw = make_inputs(empty_rows=False)
    qh, dh = q.to(dtype), d.to(dtype)
    s = xloss.maxsim(qh, dh, qm, dm, direction="both", backend="cpu")
    assert s.dtype == torch.float32
    want = reference.maxsim(qh.double(), dh.double(), qm, dm, direction="both")
    torch.testing.assert_close(s.double(), want, rtol=1e-5, atol=1e-5)
    qh.requires_grad_(True)
    dh.requires_grad_(True)
    loss = xloss.late_interaction_loss(qh, dh, qm, dm, logit_scale=2.0, direction="both", backend="cpu")
    loss.backward()
    assert qh.grad.dtype == dtype and dh.grad.dtype == dtype
    assert torch.isfinite(qh.grad.float()).all() and torch.isfinite(dh.grad.float()).all()


# ---------------------------------------------------------------------------------------------- plumbing
def test_backends_agree_and_exports():
    q, d, qm, dm, _, _ = make_inputs()
    assert xloss.maxsim is not None and xloss.late_interaction_loss is not None and xloss.maxsim_pairs is not None
    assert reference.maxsim is not None and reference.maxsim_pairs is not None
    auto = xloss.maxsim(q, d, qm, dm)
    torch.testing.assert_close(auto, xloss.maxsim(q, d, qm, dm, backend="reference"), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(auto, xloss.maxsim(q, d, qm, dm, backend="cpu"), rtol=0, atol=0)


def test_fast_path_never_uses_the_4d_similarity(monkeypatch):
    """The CPU path never calls einsum (the reference's 4-D similarity)."""
    q, d, qm, dm, qw, dw = make_inputs()

    def no_einsum(*args, **kwargs):
        if args and isinstance(args[0], str) and args[0].replace(" ", "").endswith("->qctv"):
            raise AssertionError("the fast path built the [Nq, Nd, Lq, Ld] similarity tensor")
        return real(*args, **kwargs)

    real = torch.einsum
    monkeypatch.setattr(torch, "einsum", no_einsum)
    out = run(xloss.late_interaction_loss, {"q": q, "d": d, "q_mask": qm, "d_mask": dm, "q_weights": qw, "d_weights": dw},
              backend="cpu", logit_scale=2.0, direction="both")
    assert all(torch.isfinite(t).all() for t in out)
    with pytest.raises(AssertionError, match="4-D|similarity"):
        reference.maxsim(q, d)


# ----------------------------------------------------------------------------------- one path, new spellings
def test_token_reduction_old_spellings_warn_and_agree():
    """``reduction=`` (maxsim, maxsim_pairs) and ``score_reduction=`` (the loss) are the deprecated names of
    ``token_reduction=``: same values, a DeprecationWarning; both spellings at once is a TypeError."""
    q, d, qm, dm, qw, _ = make_inputs(nq=5, nd=5)
    for fn in (xloss.maxsim, xloss.maxsim_pairs, reference.maxsim, reference.maxsim_pairs):
        new = fn(q, d, qm, dm, q_weights=qw, token_reduction="mean")
        with pytest.warns(DeprecationWarning, match=r"reduction= is deprecated.*token_reduction="):
            old = fn(q, d, qm, dm, q_weights=qw, reduction="mean")
        torch.testing.assert_close(old, new, rtol=0, atol=0)
        with pytest.raises(TypeError, match="both"):
            fn(q, d, qm, dm, reduction="mean", token_reduction="mean")
    for fn in (xloss.late_interaction_loss, reference.late_interaction_loss):
        new = fn(q, d, qm, dm, logit_scale=2.0, token_reduction="mean", reduction="sum")
        with pytest.warns(DeprecationWarning, match=r"score_reduction= is deprecated.*token_reduction="):
            old = fn(q, d, qm, dm, logit_scale=2.0, score_reduction="mean", reduction="sum")
        torch.testing.assert_close(old, new, rtol=0, atol=0)
        assert not torch.equal(new, fn(q, d, qm, dm, logit_scale=2.0, token_reduction="sum", reduction="sum"))


@pytest.mark.parametrize("backend", ["cpu", "chunked", "reference"])
def test_loss_temperature_is_inverse_logit_scale(backend):
    q, d, qm, dm, _, _ = make_inputs(nq=5, nd=5)
    t = torch.tensor(0.25, dtype=torch.float64, requires_grad=True)
    s = (1 / t).detach().requires_grad_(True)
    by_t = xloss.late_interaction_loss(q, d, qm, dm, temperature=t, direction="both", backend=backend)
    by_s = xloss.late_interaction_loss(q, d, qm, dm, logit_scale=s, direction="both", backend=backend)
    torch.testing.assert_close(by_t, by_s, rtol=1e-14, atol=1e-14)
    (gt,), (gs,) = torch.autograd.grad(by_t, t), torch.autograd.grad(by_s, s)
    torch.testing.assert_close(gt, -gs / t.detach() ** 2)  # ds/dt = -1/t²
    torch.testing.assert_close(xloss.late_interaction_loss(q, d, qm, dm, temperature=0.5, backend=backend),
                               xloss.late_interaction_loss(q, d, qm, dm, logit_scale=2.0, backend=backend))


def test_one_function_runs_every_public_path_through_the_ops(monkeypatch):
    """maxsim, maxsim_pairs and the loss all run MaxSimFunction, which calls the sweep ops in eager mode."""
    from xloss.late_interaction import MaxSimFunction, MaxSimOptions
    from xloss.late_interaction import ops as li_ops

    calls = []
    fwd, bwd = li_ops.forward, li_ops.backward
    monkeypatch.setattr(li_ops, "forward", lambda *a: calls.append(("fwd", a[9], a[10])) or fwd(*a))  # engine, pairs
    monkeypatch.setattr(li_ops, "backward", lambda *a: calls.append(("bwd", a[15], a[16])) or bwd(*a))
    q, d, qm, dm, _, _ = make_inputs(nq=4, nd=4)
    q.requires_grad_(True)
    for fn in (lambda: xloss.maxsim(q, d, qm, dm, direction="both", backend="cpu"),
               lambda: xloss.maxsim_pairs(q, d, qm, dm, backend="cpu"),
               lambda: xloss.late_interaction_loss(q, d, qm, dm, logit_scale=2.0, backend="cpu"),
               lambda: xloss.maxsim_grouped(q, d.view(4, 1, *d.shape[1:]), qm, dm.view(4, 1, -1))):
        fn().sum().backward()
    assert calls == [("fwd", "chunked", False), ("bwd", "chunked", False), ("fwd", "chunked", True),
                     ("bwd", "chunked", True), ("fwd", "chunked", False), ("bwd", "chunked", False),
                     ("fwd", "chunked", True), ("bwd", "chunked", True)]
    opts = MaxSimOptions()
    with pytest.raises(dataclasses.FrozenInstanceError):
        opts.engine = "triton"
    assert hash(opts) == hash(MaxSimOptions())
    assert MaxSimFunction.__module__ == "xloss.late_interaction"


def test_module_token_reduction_and_old_name():
    import xloss.nn as xnn

    q, d, qm, dm, _, _ = make_inputs(nq=5, nd=5)
    mod = xnn.LateInteractionLoss(logit_scale=2.0, token_reduction="mean")
    torch.testing.assert_close(mod(q, d, qm, dm),
                               xloss.late_interaction_loss(q, d, qm, dm, logit_scale=2.0, token_reduction="mean"))
    with pytest.warns(DeprecationWarning, match="score_reduction"):
        old = xnn.LateInteractionLoss(logit_scale=2.0, score_reduction="mean")
    assert old.token_reduction == old.score_reduction == "mean" and "token_reduction='mean'" in repr(old)


# ----------------------------------------------------------------------------- one body: engine × mode
@pytest.mark.parametrize("mode", engines.MODES)
@pytest.mark.parametrize("engine", engines.ENGINES)
@pytest.mark.parametrize("direction", ["q2d", "d2q", "both"])
def test_engine_mode_matrix(engine, mode, direction):
    """Every engine, eager and compiled, against the fp64 reference: the loss with masks, token weights and
    duplicate labels, and the gradients of q, d, both token weights and the scale."""
    dtype = engines.dtype_of(engine)
    q, d, q_mask, d_mask, q_w, d_w = make_inputs(4, 6, 5, 7, 8, seed=62)
    q_mask, d_mask = q_mask.to(engines.DEVICE), d_mask.to(engines.DEVICE)
    labels = _labels("dup", 4, 6).to(engines.DEVICE)

    weights = {"q2d": [q_w], "d2q": [d_w], "both": [q_w, d_w]}[direction]  # what each direction weights

    def inputs(dt):
        leaves = [q, d, *weights, torch.tensor(3.0, dtype=torch.float64)]
        return [t.detach().to(engines.DEVICE, dt).requires_grad_() for t in leaves]

    def fn(backend):
        def loss(q, d, *rest):
            w = dict(zip({"q2d": ["q_weights"], "d2q": ["d_weights"], "both": ["q_weights", "d_weights"]}[direction],
                         rest[:-1]))
            return xloss.late_interaction_loss(q, d, q_mask, d_mask, logit_scale=rest[-1], labels=labels,
                                               direction=direction, label_smoothing=0.1, backend=backend, **w)

        return loss

    got = engines.run(fn(engine), inputs(dtype), mode)
    gold = engines.run(fn("reference"), inputs(torch.float64), "eager")
    naive = engines.run(fn("reference"), inputs(dtype), "eager")
    score = float(q.abs().max() * d.abs().max()) * 8 * 7 * 1.5  # L token maxima of D-term dots, weighted
    mags = [3.0 * score * 6] * len(gold)
    engines.check_engine(engine, got, gold, naive, magnitudes=mags)
