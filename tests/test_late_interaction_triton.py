"""Triton kernel of late interaction (xloss/late_interaction/triton.py): ``maxsim_fwd`` vs fp64 torch.

On machines without a GPU the kernel runs in Triton's interpreter (``TRITON_INTERPRET=1``, set below before
Triton is imported); there fp32 and fp16 are right but bf16 is not, so bf16 is tested on a GPU only (run this
file with ``TRITON_INTERPRET=0`` on a CUDA machine to test the compiled kernel on CUDA tensors).

The reference here is written from the definition (an fp64 ``[Nq, Nd, Lq, Ld]`` einsum, masked max with values
and indices, weighted sums) and depends on nothing else in the package.  Shapes are tiny because the
interpreter is slow; with the interpreter tiles (MAX_T = 32 rows of one token set, BLOCK_V = 16, one D chunk
up to 32, chunks of 16 beyond) they cover: packed queries per tile, token sets longer than a tile (33), the
fused sweep with queries or with documents on the rows, the two-sweep path, the D loop, the document split.

Exactness: integer-valued inputs make every dot exact in fp32 and fp16, so values and indices are compared
exactly, with many ties (lowest index must win).  Random inputs: values at ~1e-5 (fp32) / 1e-3 (fp16) of fp64
on the same (upcast) inputs, indices exactly where the top-2 gap is clear, and everywhere the value at the
kernel's index must be a maximum.
"""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch

if importlib.util.find_spec("triton") is None:
    pytest.skip("Triton is not installed: the triton backend of maxsim cannot be tested",
                allow_module_level=True)

from xloss.late_interaction import triton as tri

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")  # set by tests/conftest.py
DEVICE = "cpu" if INTERPRET else "cuda"

# (Nq, Nd, Lq, Ld, D).  Lq = 33 / Ld = 33 are longer than one interpreter tile (MAX_T = 32); D = 33 takes the
# D-chunk loop, D in {1, 5, 17} one chunk; Nq != Nd throughout.
SHAPES = [
    (3, 5, 5, 17, 17),  # several queries packed per tile, 2 doc-token blocks: fused, rows = queries
    (2, 3, 33, 5, 33),  # long queries, short docs: fused with rows = documents; D loop
    (2, 3, 33, 33, 5),  # both long: two one-direction sweeps, token-block loop on the rows
    (4, 2, 1, 1, 1),  # one token, D = 1
]
DIRECTIONS = [(True, True), (True, False), (False, True)]


def _ref(q, d, q_w, d_w, q_valid, d_valid, zero_mode):
    """fp64 ``(s_q2d, idx_q2d, val_q2d, s_d2q, idx_d2q, val_d2q)`` from the full similarity tensor, and the
    masked similarities each max is taken over, ``[Nq, Nd, Lq, Ld]`` (q2d) and ``[Nq, Nd, Ld, Lq]`` (d2q)."""
    sim = torch.einsum("atk,bvk->abtv", q.double().cpu(), d.double().cpu())  # [Nq, Nd, Lq, Ld]
    qv, dv = q_valid.cpu(), d_valid.cpu()
    out, cands = [], []
    for valid, own, dim, w in ((dv[None, :, None, :], qv[:, None, :], 3, q_w),
                               (qv[:, None, :, None], dv[None, :, :], 2, d_w)):
        masked = torch.where(valid, sim, 0.0) if zero_mode else sim.masked_fill(~valid, float("-inf"))
        if masked.shape[dim] == 0:
            val = torch.zeros(masked.shape[:dim] + masked.shape[dim + 1:], dtype=torch.float64)
            idx = torch.full(val.shape, -1, dtype=torch.int64)
        else:
            val, idx = masked.max(dim)  # lowest index on ties
            # no candidate (exclude mode, no valid token on the other side), or a masked-out token of the
            # weighted side (the padding contract): value 0, index -1
            none = ~own if zero_mode else ~own | ~valid.any(dim)
            val, idx = val.masked_fill(none, 0.0), idx.masked_fill(none, -1)
        if dim == 3:
            s = (val * w.double().cpu()[:, None, :]).sum(-1)
        else:
            s = (val * w.double().cpu()[None, :, :]).sum(-1) if w is not None else None
        out += [s, idx, val]
        cands.append(masked if dim == 3 else masked.transpose(2, 3))
    return tuple(out), cands


def _masks(nq, nd, lq, ld, g, kind="random"):
    if kind == "ragged":  # prefix masks of random lengths (0 included), like padded batches
        q_valid = torch.arange(lq)[None, :] < torch.randint(0, lq + 1, (nq, 1), generator=g)
        d_valid = torch.arange(ld)[None, :] < torch.randint(0, ld + 1, (nd, 1), generator=g)
    else:
        q_valid = torch.rand(nq, lq, generator=g) > 0.3
        d_valid = torch.rand(nd, ld, generator=g) > 0.3
    q_valid[-1] = False  # an all-masked query
    d_valid[0] = False  # an all-masked document
    if nq > 1:
        q_valid[0] = True
    if nd > 1:
        d_valid[-1] = True
    return q_valid, d_valid


def _inputs(nq, nd, lq, ld, dim, dtype, seed=0, integer=False, mask_kind="random"):
    g = torch.Generator().manual_seed(seed)
    if integer:  # exact dots, many ties
        q = torch.randint(-2, 3, (nq, lq, dim), generator=g).float()
        d = torch.randint(-2, 3, (nd, ld, dim), generator=g).float()
    else:
        q = torch.randn(nq, lq, dim, generator=g)
        d = torch.randn(nd, ld, dim, generator=g)
    q_valid, d_valid = _masks(nq, nd, lq, ld, g, mask_kind)
    q_w = torch.rand(nq, lq, generator=g) * q_valid  # final weights: 0 on invalid tokens
    d_w = torch.rand(nd, ld, generator=g) * d_valid
    to = {"device": DEVICE}
    return (q.to(dtype).to(**to), d.to(dtype).to(**to), q_w.to(**to), d_w.to(**to), q_valid.to(**to),
            d_valid.to(**to))


def _run(q, d, q_w, d_w, q_valid, d_valid, zero_mode, q2d, d2q):
    q_w, d_w = (q_w if q2d else None), (d_w if d2q else None)
    return tri.maxsim_fwd(q, d, q_w, d_w, q_valid, d_valid, zero_mode, q2d, d2q)


def _check(out, ref, cands, q2d, d2q, atol, exact_idx):
    """Compare the kernel's outputs with the fp64 reference; None exactly for directions not asked."""
    for k, want in ((0, q2d), (3, d2q)):
        s, idx, val = out[k:k + 3]
        if not want:
            assert s is None and idx is None and val is None
            continue
        r_s, r_idx, r_val = ref[k:k + 3]
        assert s.dtype == torch.float32 and val.dtype == torch.float32 and idx.dtype == torch.int16
        assert s.shape == r_s.shape and idx.shape == r_idx.shape and val.shape == r_val.shape
        s, idx, val = s.cpu().double(), idx.cpu().long(), val.cpu().double()
        torch.testing.assert_close(val, r_val, atol=atol, rtol=atol)
        torch.testing.assert_close(s, r_s, atol=atol * max(1, r_idx.shape[-1]), rtol=atol)
        assert torch.equal(idx == -1, r_idx == -1)  # "no valid token" exactly where the reference says so
        if exact_idx:
            assert torch.equal(idx, r_idx)
            continue
        # Random inputs: the kernel's index must point at a maximum, and equal the reference where clear.
        cand = cands[k // 3]  # [Nq, Nd, L_own, L_other], masked
        found = idx >= 0
        at = cand.gather(3, idx.clamp(min=0).unsqueeze(3)).squeeze(3)
        assert torch.all((at - r_val).abs()[found] <= atol * (1 + r_val.abs()[found]))
        if cand.shape[3] >= 2:
            top2 = cand.topk(2, dim=3).values
            clear = (top2[..., 0] - top2[..., 1]) > 1e-2
            assert torch.equal(idx[clear & found], r_idx[clear & found]) or not torch.any(clear & found)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("zero_mode", [False, True], ids=["exclude", "zero"])
def test_fp32_random(shape, zero_mode):
    """Both directions (one sweep where possible) on random fp32 inputs with random masks."""
    args = _inputs(*shape, torch.float32, seed=1)
    ref, cands = _ref(*args, zero_mode)
    _check(_run(*args, zero_mode, True, True), ref, cands, True, True, 1e-5, exact_idx=False)


@pytest.mark.parametrize("shape", SHAPES[:3], ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("directions", DIRECTIONS, ids=["both", "q2d", "d2q"])
@pytest.mark.parametrize("zero_mode", [False, True], ids=["exclude", "zero"])
def test_integer_exact_ties(shape, directions, zero_mode):
    """Integer-valued inputs: exact dots, frequent ties; values, indices (lowest on ties) and scores exact."""
    q2d, d2q = directions
    args = _inputs(*shape, torch.float32, seed=2, integer=True, mask_kind="ragged")
    ref, cands = _ref(*args, zero_mode)
    _check(_run(*args, zero_mode, q2d, d2q), ref, cands, q2d, d2q, 1e-6, exact_idx=True)


def test_duplicated_tokens_lowest_index():
    """Duplicated doc tokens (same tile and a later v block) and query tokens: the lowest index wins."""
    g = torch.Generator().manual_seed(3)
    q = torch.randint(-1, 2, (2, 6, 8), generator=g).float()
    d = torch.randint(-1, 2, (3, 40, 8), generator=g).float()
    q[..., 0], d[..., 0] = 3.0, 3.0
    e0 = torch.zeros(8)
    e0[0] = 10.0
    d[:, 3] = d[:, 7] = d[:, 35] = e0  # dots 30 (100 for q tokens 1, 4) vs <= 16: every q token's max
    q[:, 1] = q[:, 4] = e0  # every doc token's max over the query tokens
    q_valid = torch.ones(2, 6, dtype=torch.bool)
    d_valid = torch.ones(3, 40, dtype=torch.bool)
    args = tuple(t.to(DEVICE) for t in (q, d, q_valid.float(), d_valid.float(), q_valid, d_valid))
    for zero_mode in (False, True):
        out = _run(*args, zero_mode, True, True)
        assert torch.all(out[1].cpu() == 3) and torch.all(out[4].cpu() == 1)
        ref, cands = _ref(*args, zero_mode)
        _check(out, ref, cands, True, True, 1e-6, exact_idx=True)


def test_fp16():
    """fp16 inputs against fp64 on the same upcast inputs (fp32 accumulation: loose tolerance)."""
    for shape in (SHAPES[0], SHAPES[1]):
        args = _inputs(*shape, torch.float16, seed=4)
        ref, cands = _ref(*args, False)
        _check(_run(*args, False, True, True), ref, cands, True, True, 1e-3, exact_idx=False)
    args = _inputs(*SHAPES[0], torch.float16, seed=5, integer=True, mask_kind="ragged")
    ref, cands = _ref(*args, True)
    _check(_run(*args, True, True, True), ref, cands, True, True, 1e-6, exact_idx=True)


@pytest.mark.skipif(INTERPRET, reason="bf16 is wrong in Triton's interpreter: GPU only")
def test_bf16_gpu():
    args = _inputs(*SHAPES[0], torch.bfloat16, seed=6, integer=True, mask_kind="ragged")
    ref, cands = _ref(*args, False)
    _check(_run(*args, False, True, True), ref, cands, True, True, 1e-6, exact_idx=True)


def test_strided_inputs():
    """Entity/token strides are passed through; a non-unit D stride is made contiguous."""
    args = list(_inputs(3, 4, 5, 9, 17, torch.float32, seed=7))
    q = torch.zeros(3, 10, 17, device=DEVICE)[:, ::2]  # token stride 2·D
    q.copy_(args[0])
    d = args[1].transpose(0, 1).contiguous().transpose(0, 1)  # [Nd, Ld, D] with stride(0) < stride(1)
    dq = args[0].transpose(1, 2).contiguous().transpose(1, 2)  # D stride != 1
    ref, cands = _ref(*args, False)
    _check(_run(q, d, *args[2:], False, True, True), ref, cands, True, True, 1e-5, exact_idx=False)
    _check(_run(dq, d, *args[2:], False, True, True), ref, cands, True, True, 1e-5, exact_idx=False)


def test_empty_and_errors():
    args = _inputs(2, 3, 4, 5, 6, torch.float32, seed=8)
    # No doc tokens: every query token has no max (0, -1); no query tokens: same for d2q.
    q, d, q_w, d_w, qv, dv = args
    out = _run(q, d[:, :0], q_w, d_w[:, :0], qv, dv[:, :0], False, True, True)
    assert torch.all(out[0] == 0) and torch.all(out[1] == -1) and torch.all(out[2] == 0)
    assert out[4].shape == (2, 3, 0) and torch.all(out[3] == 0)
    out = _run(q[:0], d, q_w[:0], d_w, qv[:0], dv, True, True, True)
    assert out[0].shape == (0, 3) and out[4].shape == (0, 3, 5)
    with pytest.raises(TypeError, match="cpu"):
        _run(q.double(), d.double(), q_w, d_w, qv, dv, False, True, True)
    with pytest.raises(TypeError):
        _run(q, d.half(), q_w, d_w, qv, dv, False, True, True)


def test_need_aux_false_and_index_dtype():
    """Forward without gradients: the same scores, no indices or values; int32 indices past 32767 tokens."""
    args = _inputs(*SHAPES[0], torch.float32, seed=9)
    full = _run(*args, False, True, True)
    for q2d, d2q in DIRECTIONS:
        q, d, q_w, d_w, qv, dv = args
        out = tri.maxsim_fwd(q, d, q_w if q2d else None, d_w if d2q else None, qv, dv, False, q2d, d2q,
                             need_aux=False)
        assert all(out[k] is None for k in (1, 2, 4, 5))
        for k, on in ((0, q2d), (3, d2q)):
            assert (out[k] is None) != on
            if on:
                torch.testing.assert_close(out[k], full[k], atol=1e-6, rtol=1e-6)
    assert tri._index_dtype(32767) == torch.int16 and tri._index_dtype(32768) == torch.int32


# ------------------------------------------------------------------------------------- public functions



def _public_inputs(seed, nq=3, nd=4, lq=5, ld=17, dim=9):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(nq, lq, dim, generator=g, dtype=torch.float64).float()
    d = torch.randn(nd, ld, dim, generator=g, dtype=torch.float64).float()
    q_mask, d_mask = _masks(nq, nd, lq, ld, g, "ragged")
    q_mask[-1, 0] = True  # keep the queries scoring something (an all-masked document stays)
    q_wt = torch.rand(nq, lq, generator=g) + 0.5
    d_wt = torch.rand(nd, ld, generator=g) + 0.5
    return [t.to(DEVICE) for t in (q, d, q_mask, d_mask, q_wt, d_wt)]


@pytest.fixture
def engine_calls(monkeypatch):
    """Records the ``need_aux`` of every call of the Triton engine (proves the public path ran it)."""
    calls = []
    inner = tri.maxsim_fwd

    def spy(*args, need_aux=True, **kwargs):
        calls.append(need_aux)
        return inner(*args, need_aux=need_aux, **kwargs)

    monkeypatch.setattr(tri, "maxsim_fwd", spy)
    return calls


def _same_outputs(out, grads, r_out, r_grads):
    """A public path's value and gradients against the reference's (fp32 tolerance); where the reference gives
    no gradient, the engine gives none or zeros."""
    torch.testing.assert_close(out, r_out, atol=1e-5, rtol=1e-5)
    for g, rg in zip(grads, r_grads):
        if rg is None:
            assert g is None or torch.count_nonzero(g) == 0
        else:
            torch.testing.assert_close(g, rg, atol=1e-5, rtol=1e-5)


def _grads(fn, tensors):
    leaves = [t.detach().clone().requires_grad_(True) for t in tensors]
    out = fn(*leaves)
    g = torch.Generator().manual_seed(11)
    out.backward(torch.randn(out.shape, generator=g).to(out.device))  # grad_output != 1
    return out.detach(), [t.grad for t in leaves]


@pytest.mark.parametrize("direction", ["q2d", "d2q", "both"])
@pytest.mark.parametrize("mask_mode", ["exclude", "zero"])
def test_maxsim_public_vs_reference(direction, mask_mode, engine_calls):
    """``xloss.maxsim(backend="triton")`` against ``backend="reference"``: scores and all gradients, fp32."""
    import xloss

    q, d, q_mask, d_mask, q_wt, d_wt = _public_inputs(12)
    reduction = "mean" if direction == "both" else "sum"

    def run(backend):
        def f(q, d, q_wt, d_wt):
            return xloss.maxsim(q, d, q_mask, d_mask, token_reduction=reduction, mask_mode=mask_mode, direction=direction,
                                q_weights=q_wt if direction != "d2q" else None,
                                d_weights=d_wt if direction != "q2d" else None, backend=backend)
        return _grads(f, (q, d, q_wt, d_wt))

    out, grads = run("triton")
    assert engine_calls == [True]
    r_out, r_grads = run("reference")
    _same_outputs(out, grads, r_out, r_grads)


@pytest.mark.parametrize("direction", ["q2d", "both"])
def test_late_interaction_loss_public_vs_reference(direction, engine_calls):
    """``late_interaction_loss(backend="triton")`` against the reference: loss and gradients (q, d, scale)."""
    import xloss

    q, d, q_mask, d_mask, _, _ = _public_inputs(13, nq=4, nd=4, lq=33, ld=6, dim=5)
    scale = torch.tensor(3.0, device=DEVICE)

    def run(backend):
        def f(q, d, scale):
            return xloss.late_interaction_loss(q, d, q_mask, d_mask, logit_scale=scale, direction=direction,
                                               label_smoothing=0.1, backend=backend)
        return _grads(f, (q, d, scale))

    out, grads = run("triton")
    assert engine_calls == [True]
    r_out, r_grads = run("reference")
    _same_outputs(out, grads, r_out, r_grads)


def test_maxsim_public_no_grad(engine_calls):
    """Forward under no_grad: the public path asks the engine for scores only (need_aux=False)."""
    import xloss

    q, d, q_mask, d_mask, _, _ = _public_inputs(14)
    with torch.no_grad():
        out = xloss.maxsim(q, d, q_mask, d_mask, direction="both", backend="triton")
    assert engine_calls == [False]
    ref = xloss.maxsim(q, d, q_mask, d_mask, direction="both", backend="reference")
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


@pytest.fixture
def pairs_calls(monkeypatch):
    """Records the ``group`` of every call of the Triton aligned-pair sweep (proves the public path ran it)."""
    calls = []
    inner = tri.maxsim_pairs_fwd

    def spy(*args, group=1, **kwargs):
        calls.append(group)
        return inner(*args, group=group, **kwargs)

    monkeypatch.setattr(tri, "maxsim_pairs_fwd", spy)
    return calls


# (N, Lq, Ld, D) of aligned pairs: short sets (both directions in one sweep, rows = queries), a query longer than
# a tile (33 > MAX_T: rows = documents for "both"), both longer (two sweeps), a long document with a D loop.
PAIR_SHAPES = [(3, 5, 17, 9), (2, 33, 6, 5), (2, 33, 34, 5), (3, 4, 40, 40)]


@pytest.mark.parametrize("shape", PAIR_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("direction", ["q2d", "d2q", "both"])
@pytest.mark.parametrize("mask_mode", ["exclude", "zero"])
def test_maxsim_pairs_public_vs_reference(shape, direction, mask_mode, pairs_calls):
    """``xloss.maxsim_pairs(backend="triton")`` (one kernel launch per sweep, each program one query and its
    own document) against ``backend="reference"``: scores and the gradients of q, d and both token weights."""
    import xloss

    n, lq, ld, dim = shape
    q, d, q_mask, d_mask, q_wt, d_wt = _public_inputs(21, nq=n, nd=n, lq=lq, ld=ld, dim=dim)

    def run(backend):
        def f(q, d, q_wt, d_wt):
            return xloss.maxsim_pairs(q, d, q_mask, d_mask, mask_mode=mask_mode, direction=direction,
                                      q_weights=q_wt if direction != "d2q" else None,
                                      d_weights=d_wt if direction != "q2d" else None, backend=backend)
        return _grads(f, (q, d, q_wt, d_wt))

    out, grads = run("triton")
    assert pairs_calls == [1]
    r_out, r_grads = run("reference")
    _same_outputs(out, grads, r_out, r_grads)


@pytest.mark.parametrize(("n_q", "group", "lq", "ld"), [(3, 4, 5, 7), (2, 3, 33, 9), (1, 5, 3, 40)])
@pytest.mark.parametrize("mask_mode", ["exclude", "zero"])
def test_maxsim_grouped_and_distillation_vs_reference(n_q, group, lq, ld, mask_mode, pairs_calls):
    """The grouped layout through the kernel (query a against documents a·n … a·n + n − 1, ``y_per_x``):
    ``maxsim_grouped`` and ``late_interaction_distill_loss`` against the reference, values and gradients."""
    import xloss

    g = torch.Generator().manual_seed(31)
    q = torch.randn(n_q, lq, 6, generator=g).to(DEVICE)
    d = torch.randn(n_q, group, ld, 6, generator=g).to(DEVICE)
    q_mask = (torch.rand(n_q, lq, generator=g) > 0.3).to(DEVICE)
    d_mask = (torch.rand(n_q, group, ld, generator=g) > 0.3).to(DEVICE)
    d_mask[0, 0] = False  # a document without a valid token
    teacher = torch.randn(n_q, group, generator=g).to(DEVICE)

    def scores(backend):
        return _grads(lambda q, d: xloss.maxsim_grouped(q, d, q_mask, d_mask, mask_mode=mask_mode, backend=backend),
                      (q, d))

    def loss(backend):
        return _grads(lambda q, d: xloss.late_interaction_distill_loss(
            q, d, teacher, q_mask, d_mask, mask_mode=mask_mode, normalize_scores=False, backend=backend), (q, d))

    for fn in (scores, loss):
        pairs_calls.clear()
        out, grads = fn("triton")
        assert pairs_calls == [group]
        r_out, r_grads = fn("reference")
        _same_outputs(out, grads, r_out, r_grads)


@pytest.mark.parametrize("direction", ["q2d", "both"])
def test_maxsim_pairs_and_grouped_fp16(direction, pairs_calls):
    """fp16 through the pair launches (the half-precision tiles, and their tensor-core dots on a GPU): the
    kernel's fp32 sums of the fp16 products against the reference on the same values in fp32."""
    import xloss

    g = torch.Generator().manual_seed(41)
    q = torch.randn(3, 6, 16, generator=g).half().to(DEVICE)
    d = torch.randn(3, 2, 9, 16, generator=g).half().to(DEVICE)
    if direction == "q2d":  # grouped: 2 documents per query
        out = xloss.maxsim_grouped(q, d, backend="triton")
        ref = xloss.maxsim_grouped(q.float(), d.float(), backend="reference")
    else:
        out = xloss.maxsim_pairs(q, d[:, 0], direction="both", backend="triton")
        ref = xloss.maxsim_pairs(q.float(), d[:, 0].float(), direction="both", backend="reference")
    assert pairs_calls == [2 if direction == "q2d" else 1]
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, ref, atol=2e-3, rtol=2e-3)


def test_maxsim_pairs_float64_refused():
    """As every Triton sweep: float64 raises the engine's TypeError that names the chunked backend."""
    import xloss

    q, d = torch.randn(2, 3, 4, dtype=torch.float64), torch.randn(2, 5, 4, dtype=torch.float64)
    with pytest.raises(TypeError, match="chunked"):
        xloss.maxsim_pairs(q.to(DEVICE), d.to(DEVICE), backend="triton")


# -------------------------------------------------------------------------------------- backward: route

from xloss.late_interaction import backward as _bwd

# (NX, NY, LX, LY, D): odd sizes; LX = 17 and LY = 33 span two interpreter token blocks (16), D = 33 three D
# chunks; NY = 5 is not a multiple of the atomic scatter's documents per program.
ROUTE_SHAPES = [
    (3, 5, 5, 7, 9),
    (2, 3, 17, 33, 33),
    (1, 1, 1, 1, 1),
]


def _route_inputs(shape, seed, dtype=torch.float32, winners="random"):
    nx, ny, lx, ly, dim = shape
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(nx, lx, dim, generator=g).to(dtype)
    y = torch.randn(ny, ly, dim, generator=g).to(dtype)
    if winners == "tied":  # every token of every x points at one or two tokens of y: heavy scatter collisions
        idx = torch.randint(0, min(2, ly), (nx, ny, lx), generator=g)
    else:
        idx = torch.randint(0, ly, (nx, ny, lx), generator=g)
    idx = torch.where(torch.rand(nx, ny, lx, generator=g) < 0.2, -1, idx).to(torch.int16)  # no winner
    gr = torch.randn(nx, ny, generator=g)
    w = torch.rand(nx, lx, generator=g) + 0.5
    y_valid = torch.rand(ny, ly, generator=g) < 0.7  # invalid winners: dropped with check_winner
    return [t.to(DEVICE) for t in (x, y, idx, gr, w, y_valid)]


def _torch_route(x, y, idx, g, w, y_valid, check_winner):
    return _bwd.route(x.double(), y.double(), idx, g.double(), w.double(), y_valid, check_winner)


@pytest.fixture(params=["atomic", "deterministic"])
def scatter_mode(request, monkeypatch):
    monkeypatch.setenv("XLOSS_DETERMINISTIC", "1" if request.param == "deterministic" else "0")
    assert tri.deterministic() == (request.param == "deterministic")
    return request.param


@pytest.mark.parametrize("shape", ROUTE_SHAPES)
@pytest.mark.parametrize("check_winner", [False, True])
@pytest.mark.parametrize("winners", ["random", "tied"])
def test_route_fp32_vs_torch(shape, check_winner, winners, scatter_mode):
    x, y, idx, g, w, y_valid = _route_inputs(shape, 21, winners=winners)
    dx, dy = tri.route(x, y, idx, g, w, y_valid, check_winner)
    assert dx.dtype == dy.dtype == torch.float32
    assert dx.shape == x.shape and dy.shape == y.shape
    r_dx, r_dy = _torch_route(x, y, idx, g, w, y_valid, check_winner)
    torch.testing.assert_close(dx.double().cpu(), r_dx.cpu(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(dy.double().cpu(), r_dy.cpu(), atol=1e-5, rtol=1e-5)


def test_route_masking_semantics():
    """idx = -1 routes nothing; an invalid winner routes nothing only with check_winner."""
    x, y, idx, g, w, y_valid = _route_inputs((2, 3, 5, 4, 3), 22)
    idx = torch.full_like(idx, -1)
    dx, dy = tri.route(x, y, idx, g, w, y_valid, False)
    assert torch.count_nonzero(dx) == 0 and torch.count_nonzero(dy) == 0
    idx = torch.zeros_like(idx)  # every winner is token 0 of each y
    y_valid = torch.ones_like(y_valid)
    y_valid[:, 0] = False
    dx, dy = tri.route(x, y, idx, g, w, y_valid, True)
    assert torch.count_nonzero(dx) == 0 and torch.count_nonzero(dy) == 0
    dx, dy = tri.route(x, y, idx, g, w, y_valid, False)
    r_dx, r_dy = _torch_route(x, y, idx, g, w, y_valid, False)
    assert torch.count_nonzero(dy[:, 0]) > 0 and torch.count_nonzero(dy[:, 1:]) == 0
    torch.testing.assert_close(dx.double().cpu(), r_dx.cpu(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(dy.double().cpu(), r_dy.cpu(), atol=1e-5, rtol=1e-5)


def test_route_strided_int32_and_modes_agree(monkeypatch):
    """Transposed idx/g views (the d2q call), int32 indices, non-contiguous tokens; atomic == deterministic."""
    x, y, idx, g, w, y_valid = _route_inputs((4, 3, 6, 9, 17), 23, winners="tied")
    idx_t = idx.to(torch.int32).permute(1, 0, 2).contiguous().permute(1, 0, 2)  # [NX, NY, LX] view
    g_t = g.T.contiguous().T
    x_s = torch.stack([x, -x], 3)[..., 0]  # x with stride 2 along D
    assert not idx_t.is_contiguous() and not g_t.is_contiguous() and x_s.stride(2) == 2
    out = {}
    for mode in ("0", "1"):
        monkeypatch.setenv("XLOSS_DETERMINISTIC", mode)
        out[mode] = tri.route(x_s, y, idx_t, g_t, w, y_valid, True)
    r_dx, r_dy = _torch_route(x, y, idx, g, w, y_valid, True)
    for dx, dy in out.values():
        torch.testing.assert_close(dx.double().cpu(), r_dx.cpu(), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(dy.double().cpu(), r_dy.cpu(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out["0"][0], out["1"][0], atol=0, rtol=0)  # the gather is the same kernel
    torch.testing.assert_close(out["0"][1], out["1"][1], atol=1e-6, rtol=1e-6)


def test_route_deterministic_via_torch_flag(monkeypatch):
    monkeypatch.delenv("XLOSS_DETERMINISTIC", raising=False)
    assert not tri.deterministic()
    prev = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        assert tri.deterministic()
        x, y, idx, g, w, y_valid = _route_inputs((2, 3, 5, 6, 4), 24, winners="tied")
        a = tri.route(x, y, idx, g, w, y_valid, False)
        b = tri.route(x, y, idx, g, w, y_valid, False)
    finally:
        torch.use_deterministic_algorithms(prev)
    for u, v in zip(a, b):
        assert torch.equal(u, v)
    _, r_dy = _torch_route(x, y, idx, g, w, y_valid, False)
    torch.testing.assert_close(a[1].double().cpu(), r_dy.cpu(), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("winners", ["random", "tied"])
def test_route_fp16(winners, scatter_mode):
    """fp16 inputs are loaded as fp16 and accumulated in fp32: compare with fp64 on the same fp16 values."""
    x, y, idx, g, w, y_valid = _route_inputs((3, 4, 17, 9, 33), 25, dtype=torch.float16, winners=winners)
    dx, dy = tri.route(x, y, idx, g, w, y_valid, True)
    assert dx.dtype == dy.dtype == torch.float32
    r_dx, r_dy = _torch_route(x, y, idx, g, w, y_valid, True)
    torch.testing.assert_close(dx.double().cpu(), r_dx.cpu(), atol=1e-3, rtol=1e-3)
    torch.testing.assert_close(dy.double().cpu(), r_dy.cpu(), atol=1e-3, rtol=1e-3)


@pytest.mark.skipif(INTERPRET, reason="bf16 is wrong in Triton's interpreter: GPU only")
def test_route_bf16_gpu(scatter_mode):
    x, y, idx, g, w, y_valid = _route_inputs((3, 4, 17, 9, 33), 26, dtype=torch.bfloat16, winners="tied")
    dx, dy = tri.route(x, y, idx, g, w, y_valid, True)
    r_dx, r_dy = _torch_route(x, y, idx, g, w, y_valid, True)
    torch.testing.assert_close(dx.double().cpu(), r_dx.cpu(), atol=1e-2, rtol=1e-2)
    torch.testing.assert_close(dy.double().cpu(), r_dy.cpu(), atol=1e-2, rtol=1e-2)


def test_route_empty():
    x, y, idx, g, w, y_valid = _route_inputs((2, 3, 5, 4, 3), 27)
    dx, dy = tri.route(x[:0], y, idx[:0], g[:0], w[:0], y_valid, False)
    assert dx.shape == (0, 5, 3) and torch.count_nonzero(dy) == 0 and dy.shape == y.shape


@pytest.fixture
def route_calls(monkeypatch):
    """Counts the calls of the Triton ``route`` (proves the backward of the public path ran it)."""
    calls = []
    inner = tri.route

    def spy(*args):
        calls.append(args[0].shape)
        return inner(*args)

    monkeypatch.setattr(tri, "route", spy)
    return calls


@pytest.mark.parametrize("direction", ["q2d", "d2q", "both"])
@pytest.mark.parametrize("mask_mode", ["exclude", "zero"])
def test_maxsim_public_backward_uses_triton_route(direction, mask_mode, route_calls, scatter_mode):
    """The gradients of ``maxsim(backend="triton")`` come from ``triton.route`` and match the reference."""
    import xloss

    q, d, q_mask, d_mask, q_wt, d_wt = _public_inputs(15)

    def run(backend):
        def f(q, d, q_wt, d_wt):
            return xloss.maxsim(q, d, q_mask, d_mask, token_reduction="mean", mask_mode=mask_mode, direction=direction,
                                q_weights=q_wt if direction != "d2q" else None,
                                d_weights=d_wt if direction != "q2d" else None, backend=backend)
        return _grads(f, (q, d, q_wt, d_wt))

    out, grads = run("triton")
    assert len(route_calls) == (2 if direction == "both" else 1)
    r_out, r_grads = run("reference")
    _same_outputs(out, grads, r_out, r_grads)


def test_late_interaction_loss_both_uses_triton_route(route_calls, scatter_mode):
    import xloss

    q, d, q_mask, d_mask, _, _ = _public_inputs(16, nq=4, nd=4, lq=33, ld=6, dim=5)
    scale = torch.tensor(3.0, device=DEVICE)

    def run(backend):
        def f(q, d, scale):
            return xloss.late_interaction_loss(q, d, q_mask, d_mask, logit_scale=scale, direction="both",
                                               label_smoothing=0.1, backend=backend)
        return _grads(f, (q, d, scale))

    out, grads = run("triton")
    assert len(route_calls) == 2
    r_out, r_grads = run("reference")
    _same_outputs(out, grads, r_out, r_grads)


def test_maxsim_public_fp16_backward_uses_triton_route(route_calls):
    """fp16 inputs reach the Triton route in fp16 (no upcast copy); gradients as the chunked backend's."""
    import xloss

    q, d, q_mask, d_mask, _, _ = _public_inputs(17)
    q, d = q.half(), d.half()

    def run(backend):
        return _grads(lambda q, d: xloss.maxsim(q, d, q_mask, d_mask, direction="both", backend=backend), (q, d))

    out, grads = run("triton")
    assert len(route_calls) == 2
    r_out, r_grads = run("cpu")
    torch.testing.assert_close(out, r_out, atol=1e-3, rtol=1e-3)
    for g, rg in zip(grads, r_grads):
        assert g.dtype == torch.float16
        torch.testing.assert_close(g.float(), rg.float(), atol=2e-3, rtol=2e-3)


def test_public_float64_explicit_triton_raises_and_auto_runs_chunked(monkeypatch):
    """An explicit backend="triton" with float64 raises the engine's own TypeError (through the op); "auto"
    takes the chunked engine for float64 (and for CPU tensors at all)."""
    import xloss

    monkeypatch.delenv("XLOSS_BACKEND", raising=False)
    q = torch.randn(2, 3, 4, dtype=torch.float64, device=DEVICE)
    d = torch.randn(3, 2, 4, dtype=torch.float64, device=DEVICE)
    with pytest.raises(TypeError, match="float64"):
        xloss.maxsim(q, d, backend="triton")
    with pytest.raises(TypeError, match="float64"):
        xloss.late_interaction_loss(q, d, logit_scale=1.0, backend="triton")
    torch.testing.assert_close(xloss.maxsim(q, d, direction="both"),
                               xloss.maxsim(q, d, direction="both", backend="reference"))


# ------------------------------------------------------- non-finite values and the padding contract (issue 15)
def _same_nonfinite(got, want, what, tol=1e-5):
    got, want = got.cpu().double(), want.cpu().double()
    assert torch.equal(got.isnan(), want.isnan()), f"{what}: NaN at {got.isnan().nonzero().tolist()}, " \
                                                   f"reference at {want.isnan().nonzero().tolist()}"
    assert torch.equal(got.isposinf(), want.isposinf()) and torch.equal(got.isneginf(), want.isneginf()), what
    fin = want.isfinite()
    torch.testing.assert_close(got[fin], want[fin], atol=tol, rtol=tol, msg=lambda m: f"{what}: {m}")


def _dirty(q, d, q_mask, d_mask):
    """NaN and inf in every masked-out token."""
    q2, d2 = q.masked_fill(~q_mask[..., None], float("nan")), d.masked_fill(~d_mask[..., None], float("nan"))
    d2[..., 0] = torch.where(d_mask, d2[..., 0], float("inf"))
    return q2, d2


# rows = queries (fused), rows = documents (fused), two one-direction sweeps with the token-block loop
PUBLIC_SHAPES = [(3, 4, 5, 17, 9), (2, 3, 33, 5, 6), (2, 3, 33, 33, 5)]


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # numpy's NaN dots (interpreter)
@pytest.mark.parametrize("shape", PUBLIC_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("direction", ["q2d", "d2q", "both"])
@pytest.mark.parametrize("mask_mode", ["exclude", "zero"])
def test_nan_and_inf_propagate_and_padding_is_ignored(shape, direction, mask_mode, engine_calls):
    """The kernel tracks NaN apart from its max (``tl.max`` drops NaN on the GPU, keeps it in the interpreter),
    replaces masked entries instead of multiplying them, and never computes a masked-out row token into a
    score: the NaN / ±inf pattern of the reference, with NaN and inf in the padding."""
    import xloss

    nq, nd, lq, ld, dim = shape
    q, d, q_mask, d_mask, q_wt, d_wt = _public_inputs(14, nq, nd, lq, ld, dim)
    d[-1, 0, 0] = float("nan")  # valid tokens (the last document and the first query are fully valid)
    d[-1, 1, 1] = float("inf")
    q[0, 1, 0] = float("-inf")
    kw = {"mask_mode": mask_mode, "direction": direction, "q_weights": q_wt if direction != "d2q" else None,
          "d_weights": d_wt if direction != "q2d" else None}
    want = xloss.maxsim(q, d, q_mask, d_mask, backend="reference", **kw)
    assert want.isnan().any()
    got = xloss.maxsim(*_dirty(q, d, q_mask, d_mask), q_mask, d_mask, backend="triton", **kw)
    assert engine_calls
    _same_nonfinite(got, want, f"{shape} {mask_mode} {direction}")


@pytest.mark.parametrize("direction", ["q2d", "d2q", "both"])
@pytest.mark.parametrize("mask_mode", ["exclude", "zero"])
def test_dirty_padding_gives_the_clean_values_and_gradients(direction, mask_mode, engine_calls):
    """Values and every gradient with NaN / inf padding equal those with clean padding (Triton forward and
    Triton routing), and the padding gets zero gradients."""
    import xloss

    q, d, q_mask, d_mask, q_wt, d_wt = _public_inputs(15)

    def run(q, d):
        def f(q, d, q_wt, d_wt):
            return xloss.maxsim(q, d, q_mask, d_mask, mask_mode=mask_mode, direction=direction,
                                q_weights=q_wt if direction != "d2q" else None,
                                d_weights=d_wt if direction != "q2d" else None, backend="triton")
        return _grads(f, (q, d, q_wt, d_wt))

    out, grads = run(q, d)
    d_out, d_grads = run(*_dirty(q, d, q_mask, d_mask))
    torch.testing.assert_close(d_out, out, rtol=0, atol=0)
    for g, dg in zip(grads, d_grads):
        if g is None:
            assert dg is None
            continue
        assert torch.isfinite(dg).all()
        torch.testing.assert_close(dg, g, rtol=1e-6, atol=1e-6)  # the atomic scatter's order may differ
    assert (d_grads[0][~q_mask] == 0).all() and (d_grads[1][~d_mask] == 0).all()
