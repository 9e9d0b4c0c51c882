"""Late interaction under issue 15: non-finite values, the padding contract, mask dtypes, a single 2-D query
and meta tensors, on every path that runs on the CPU.

Paths: the reference; the chunked engine with the compiled MaxSim op (``backend="auto"``/``"cpu"`` on CPU
tensors, q2d) and without it (its tile loop: what ``XLOSS_NO_EXT=1``, ``"d2q"`` and ``"both"`` run; one
subprocess checks ``XLOSS_NO_EXT=1`` itself).  The Triton kernels get the same checks in
``test_late_interaction_triton.py``.

* NaN and inf in valid tokens propagate exactly as in the definition (the reference): the same NaN / ±inf
  pattern on every path, direction and mask mode, and the same finite values.
* Padding contract: masked-out tokens never influence anything.  Whatever their embeddings and weights hold
  (NaN, inf, garbage), values and gradients are those of clean padding, masked-out tokens get zero gradients,
  and in ``mask_mode="zero"`` a masked document token scores exactly 0.
"""

from __future__ import annotations

import itertools
import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import xloss
from xloss import reference
from xloss.late_interaction import chunked

MODES = ("exclude", "zero")
DIRECTIONS = ("q2d", "d2q", "both")
NQ, ND, LQ, LD, D = 4, 5, 5, 7, 6


def _inputs(seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(NQ, LQ, D, generator=g).to(dtype)
    d = torch.randn(ND, LD, D, generator=g).to(dtype)
    qm = torch.rand(NQ, LQ, generator=g) < 0.7
    dm = torch.rand(ND, LD, generator=g) < 0.6
    qm[:, 0] = True
    dm[:, 0] = True
    dm[3] = False  # a document without any valid token
    qw = (torch.rand(NQ, LQ, generator=g) + 0.5).to(dtype)
    dw = (torch.rand(ND, LD, generator=g) + 0.5).to(dtype)
    return q, d, qm, dm, qw, dw


def _weights(direction, qw, dw):
    return {"q_weights": qw if direction != "d2q" else None, "d_weights": dw if direction != "q2d" else None}


@pytest.fixture(params=["op", "tile-loop"])
def path(request, monkeypatch):
    """The chunked engine with the compiled op where it covers the call, or its tile loop only."""
    if request.param == "tile-loop":
        monkeypatch.setattr(chunked, "_use_op", lambda *a: False)
    elif not xloss._ext.has_op("maxsim_q2d"):
        pytest.skip("the compiled ops are not built here")
    return request.param


def assert_same_nonfinite(got, want, what, rtol=1e-12, atol=1e-12):
    """NaN, +inf and -inf exactly where ``want`` has them; the finite entries close."""
    assert torch.equal(got.isnan(), want.isnan()), (
        f"{what}: NaN at {got.isnan().nonzero().tolist()}, reference at {want.isnan().nonzero().tolist()}")
    assert torch.equal(got.isposinf(), want.isposinf()), f"{what}: +inf differs"
    assert torch.equal(got.isneginf(), want.isneginf()), f"{what}: -inf differs"
    fin = want.isfinite()
    torch.testing.assert_close(got[fin], want[fin], rtol=rtol, atol=atol, msg=lambda m: f"{what}: {m}")


# ------------------------------------------------------------------------------ NaN and inf (items 1, 5)
def _nonfinite(seed):
    """Inputs with a NaN and infinities in valid tokens of both sides."""
    q, d, qm, dm, qw, dw = _inputs(seed)
    d[1, 0, 2] = math.nan  # a valid document token
    d[2, 0, 1] = math.inf
    d[4, 0, 3] = -math.inf
    q[0, 0, 4] = -math.inf  # a valid query token
    q[2, 0, 0] = math.nan
    return q, d, qm, dm, qw, dw


@pytest.mark.parametrize("direction", DIRECTIONS)
@pytest.mark.parametrize("mode", MODES)
def test_nan_and_inf_propagate_as_in_the_definition(path, mode, direction):
    """Item 1 of issue 15: the compiled op took a NaN out of the max (and turned an all -inf max into 0)."""
    for seed in (0, 1):
        q, d, qm, dm, qw, dw = _nonfinite(seed)
        for masks in ((qm, dm), (None, None)):
            kw = {"mask_mode": mode, "direction": direction, **_weights(direction, qw, dw)}
            want = reference.maxsim(q, d, *masks, **kw)
            assert want.isnan().any() and want.isfinite().any()
            got = xloss.maxsim(q, d, *masks, backend="cpu", **kw)
            assert_same_nonfinite(got, want, f"maxsim {path} seed {seed}")
            pair_masks = [None if m is None else m[:NQ] for m in masks]
            kw_p = {**kw, "d_weights": None if kw["d_weights"] is None else dw[:NQ]}
            want_p = reference.maxsim_pairs(q, d[:NQ], *pair_masks, **kw_p)
            got_p = xloss.maxsim_pairs(q, d[:NQ], *pair_masks, backend="cpu", **kw_p)
            assert_same_nonfinite(got_p, want_p, f"maxsim_pairs {path} seed {seed}")


def test_a_single_nan_makes_the_scores_and_the_loss_nan(path):
    """The audit's case: one NaN in a valid document token, ColBERT q2d on the CPU (the compiled op)."""
    q, d, qm, dm, _, _ = _inputs(3)
    d[1, 0, 0] = math.nan
    s = xloss.maxsim(q, d, qm, dm)
    assert s[:, 1].isnan().all() and s[:, [0, 2, 4]].isfinite().all()
    q.requires_grad_(True)
    loss = xloss.late_interaction_loss(q, d, qm, dm, logit_scale=1.0)
    assert loss.isnan()
    loss.backward()
    assert q.grad.isnan().any()


@pytest.mark.parametrize("direction", DIRECTIONS)
@pytest.mark.parametrize("mode", MODES)
def test_all_minus_inf_max_is_minus_inf(path, mode, direction):
    """A max over valid similarities that are all -inf is -inf (not "no valid token": 0); in zero mode the
    masked document token's 0 wins over it."""
    q = torch.tensor([[[1.0, 0.0], [0.5, 0.0]]], dtype=torch.float64)
    d = torch.tensor([[[-math.inf, 5.0], [-math.inf, -3.0], [7.0, 7.0]]], dtype=torch.float64)
    dm = torch.tensor([[True, True, False]])
    want = reference.maxsim(q, d, None, dm, mask_mode=mode, direction=direction)
    got = xloss.maxsim(q, d, None, dm, mask_mode=mode, direction=direction, backend="cpu")
    assert_same_nonfinite(got, want, path)
    expected = 0.0 if (mode, direction) == ("zero", "q2d") else -math.inf
    assert got.item() == expected and want.item() == expected


def test_no_ext_subprocess_propagates_nan():
    """``XLOSS_NO_EXT=1``: the same NaN pattern as the reference."""
    code = textwrap.dedent(
        """
        import math, torch, xloss
        from xloss import _ext, reference
        assert not _ext.has_op("maxsim_q2d")
        q, d = torch.randn(2, 4, 3, dtype=torch.float64), torch.randn(3, 5, 3, dtype=torch.float64)
        d[1, 2, 0] = math.nan
        d[2, 0, 1] = math.inf
        for direction in ("q2d", "d2q", "both"):
            got = xloss.maxsim(q, d, direction=direction)
            want = reference.maxsim(q, d, direction=direction)
            assert torch.equal(got.isnan(), want.isnan()) and torch.equal(got.isinf(), want.isinf()), direction
            assert got[:, 1].isnan().all(), direction
        print("no-ext ok")
        """
    )
    out = subprocess.run([sys.executable, "-c", code], env={**os.environ, "XLOSS_NO_EXT": "1"},
                         capture_output=True, text=True, timeout=300, check=False)
    assert out.returncode == 0, out.stderr
    assert "no-ext ok" in out.stdout


# ----------------------------------------------------------------------------- padding contract (item 5)
def _dirty_tokens(q, d, qm, dm):
    """The same tokens with NaN, inf and huge values in every masked-out position."""
    q2, d2 = q.clone(), d.clone()
    q2[~qm] = math.nan
    d2[~dm] = math.nan
    d2[~dm & (torch.arange(LD) % 2 == 0)] = math.inf
    q2[~qm & (torch.arange(LQ) % 2 == 1)] = -1e300
    return q2, d2


def _dirty(q, d, qm, dm, qw, dw):
    """Dirty tokens, and weights with inf / NaN at masked-out tokens."""
    return (*_dirty_tokens(q, d, qm, dm), qw.masked_fill(~qm, math.inf), dw.masked_fill(~dm, math.nan))


def _values_and_grads(fn, q, d, qm, dm, qw, dw, direction, **kw):
    """``[value, grad q, grad d, grad q_weights, grad d_weights]`` (zeros for a weight not used)."""
    leaves = [t.detach().clone().requires_grad_(True) for t in (q, d, qw, dw)]
    lq, ld, lqw, ldw = leaves
    out = fn(lq, ld, qm, dm, direction=direction, **_weights(direction, lqw, ldw), **kw)
    g = torch.linspace(0.5, 1.5, out.numel(), dtype=out.dtype).reshape(out.shape)
    (out * g).sum().backward()
    return [out.detach()] + [t.grad if t.grad is not None else torch.zeros_like(t) for t in leaves]


FUNCTIONS = {
    "maxsim": lambda q, d, qm, dm, **kw: xloss.maxsim(q, d, qm, dm, **kw),
    "maxsim_pairs": lambda q, d, qm, dm, **kw: xloss.maxsim_pairs(
        q, d[:NQ], qm, dm[:NQ], **{k: (v[:NQ] if k == "d_weights" and v is not None else v) for k, v in kw.items()}),
    "late_interaction_loss": lambda q, d, qm, dm, **kw: xloss.late_interaction_loss(
        q, d, qm, dm, logit_scale=2.0, labels=torch.tensor([0, 1, 2, 4]), **kw),
}


@pytest.mark.parametrize("backend", ["cpu", "reference"])
@pytest.mark.parametrize("name", sorted(FUNCTIONS))
@pytest.mark.parametrize("direction", DIRECTIONS)
@pytest.mark.parametrize("mode", MODES)
def test_padding_never_influences_anything(path, mode, direction, name, backend):
    """Item 5 of issue 15: NaN padding poisoned "d2q" and "both" (and a non-finite valid token poisoned the
    masked-out tokens' 0·max).  Values and gradients equal those of clean padding; masked-out positions get
    exactly zero gradient."""
    q, d, qm, dm, qw, dw = _inputs(5)
    clean = _values_and_grads(FUNCTIONS[name], q, d, qm, dm, qw, dw, direction, mask_mode=mode, backend=backend)
    q2, d2, qw2, dw2 = _dirty(q, d, qm, dm, qw, dw)
    dirty = _values_and_grads(FUNCTIONS[name], q2, d2, qm, dm, qw2, dw2, direction, mask_mode=mode,
                              backend=backend)
    for i, (a, b) in enumerate(zip(dirty, clean)):
        assert torch.isfinite(a).all(), f"{name} {backend} output {i} is not finite"
        torch.testing.assert_close(a, b, rtol=0, atol=1e-14, msg=lambda m, i=i: f"{name} output {i}: {m}")
    _, gq, gd, gqw, gdw = dirty
    masks = (qm, dm) if name != "maxsim_pairs" else (qm, torch.cat([dm[:NQ], torch.zeros_like(dm[NQ:])]))
    assert (gq[~masks[0]] == 0).all() and (gd[~masks[1]] == 0).all()
    assert (gqw[~masks[0]] == 0).all() and (gdw[~masks[1]] == 0).all()


@pytest.mark.parametrize("direction", DIRECTIONS)
@pytest.mark.parametrize("mode", MODES)
def test_non_finite_valid_tokens_leave_masked_out_tokens_alone(path, mode, direction):
    """A valid token holding inf meets the (zeroed) padding of the other side: ``inf·0`` is NaN, which must not
    reach a score through a masked-out token (its max is never computed into anything)."""
    q, d, qm, dm, _, _ = _inputs(6)
    d[0, 0] = math.inf  # a valid document token, all features inf
    q[0, 0, 1] = -math.inf  # a valid query token
    want = reference.maxsim(q, d, qm, dm, mask_mode=mode, direction=direction)  # clean (finite) padding
    assert not want.isfinite().all() and want.isfinite().any()
    for backend in ("cpu", "reference"):
        got = xloss.maxsim(*_dirty_tokens(q, d, qm, dm), qm, dm, mask_mode=mode, direction=direction,
                           backend=backend)
        assert_same_nonfinite(got, want, f"{backend} {path}")


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_zero_mode_masked_document_tokens_score_exactly_zero(path, backend):
    """mask_mode="zero": a masked document token scores 0 and competes, whatever its embedding holds, so a
    query token whose valid similarities are all negative gets max 0 (no gradient), NaN padding or not."""
    q = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]], dtype=torch.float64)
    d = torch.tensor([[[-1.0, -2.0], [math.nan, math.inf], [-3.0, -1.0]]], dtype=torch.float64)
    dm = torch.tensor([[True, False, True]])
    leaf = q.clone().requires_grad_(True)
    s = xloss.maxsim(leaf, d, None, dm, mask_mode="zero", backend=backend)
    assert s.item() == 0.0
    s.backward()
    assert (leaf.grad == 0).all()
    # exclude mode: the masked token never wins, so the max is the best valid similarity
    assert xloss.maxsim(q, d, None, dm, backend=backend).item() == -2.0


# -------------------------------------------------------------------------------- masks of any dtype (item 6)
MASK_DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64, torch.int32, torch.int16,
               torch.int8, torch.uint8]


@pytest.mark.parametrize("dtype", MASK_DTYPES, ids=str)
def test_zero_one_masks_of_any_dtype_equal_bool_masks(dtype):
    """PyLate passes float and int64 masks: 0/1 of any integer or float dtype is the bool mask."""
    q, d, qm, dm, qw, dw = _inputs(7)
    for mode, direction, backend in itertools.product(MODES, DIRECTIONS, ("cpu", "reference")):
        kw = {"mask_mode": mode, "direction": direction, "backend": backend, **_weights(direction, qw, dw)}
        want = xloss.maxsim(q, d, qm, dm, **kw)
        torch.testing.assert_close(xloss.maxsim(q, d, qm.to(dtype), dm.to(dtype), **kw), want, rtol=0, atol=0)
    kw = {"logit_scale": 2.0, "direction": "both"}
    torch.testing.assert_close(xloss.late_interaction_loss(q, d, qm.to(dtype), dm.to(dtype), **kw),
                               xloss.late_interaction_loss(q, d, qm, dm, **kw), rtol=0, atol=0)
    torch.testing.assert_close(xloss.maxsim_pairs(q, d[:NQ], qm.to(dtype), dm[:NQ].to(dtype)),
                               xloss.maxsim_pairs(q, d[:NQ], qm, dm[:NQ]), rtol=0, atol=0)
    # the reference functions take them too
    torch.testing.assert_close(reference.maxsim(q, d, qm.to(dtype), dm.to(dtype)), reference.maxsim(q, d, qm, dm))


def test_mask_value_check_reads_nothing_back():
    """The 0/1 check is a value check (``torch._assert_async``: a device-side assert on CUDA), not a host read;
    on the CPU it raises ValueError (test_late_interaction_bad_input.py)."""
    from test_no_sync import host_reads

    q, d, qm, dm, _, _ = _inputs(8)
    q.requires_grad_(True)
    with host_reads() as calls:
        xloss.late_interaction_loss(q, d, qm.float(), dm.long(), logit_scale=1.0, direction="both",
                                    backend="chunked").backward()
    assert not calls, sorted(set(calls))


# ------------------------------------------------------------------------------------ a single 2-D query
@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_a_2d_query_is_a_batch_of_one(path, backend):
    """As flash-maxsim's ``flash_maxsim(Q [Lq, D], D [B, Ld, D]) -> [B]``: ``maxsim`` returns ``[Nd]``; the loss
    scores the one query against every document (PyLate's ``colbert_scores`` takes 3-D only)."""
    q, d, qm, dm, qw, _ = _inputs(9)
    for direction in DIRECTIONS:
        got = xloss.maxsim(q[2], d, qm[2], dm, direction=direction, backend=backend,
                           q_weights=qw[2] if direction != "d2q" else None)
        want = xloss.maxsim(q[2:3], d, qm[2:3], dm, direction=direction, backend=backend,
                            q_weights=qw[2:3] if direction != "d2q" else None)
        assert got.shape == (ND,)
        torch.testing.assert_close(got, want[0], rtol=0, atol=0)
    one = xloss.late_interaction_loss(q[2], d, qm[2].float(), dm, logit_scale=2.0, labels=torch.tensor([3]),
                                      backend=backend)
    batch = xloss.late_interaction_loss(q[2:3], d, qm[2:3], dm, logit_scale=2.0, labels=torch.tensor([3]),
                                        backend=backend)
    torch.testing.assert_close(one, batch, rtol=0, atol=0)


# ---------------------------------------------------------------------------------------- meta (item 7)
@pytest.mark.parametrize("backend", ["auto", "chunked", "reference"])
def test_meta_tensors_propagate_shapes(backend):
    """Every public function on meta tensors: shapes and dtypes, forward and backward, no value read."""
    meta = {"device": "meta"}
    q = torch.empty(3, 4, 8, **meta, requires_grad=True)
    d = torch.empty(5, 6, 8, **meta, requires_grad=True)
    qm, dm = torch.ones(3, 4, **meta), torch.ones(5, 6, dtype=torch.bool, **meta)
    qw = torch.ones(3, 4, **meta, requires_grad=True)
    dw = torch.ones(5, 6, **meta, requires_grad=True)
    for mode, direction in itertools.product(MODES, DIRECTIONS):
        kw = {"mask_mode": mode, "direction": direction, "backend": backend, **_weights(direction, qw, dw)}
        s = xloss.maxsim(q, d, qm, dm, **kw)
        assert s.shape == (3, 5) and s.device.type == "meta"
        s.sum().backward()
        assert q.grad.shape == q.shape and d.grad.shape == d.shape
        pairs = xloss.maxsim_pairs(q, d[:3], qm, dm[:3], mask_mode=mode, direction=direction, backend=backend)
        assert pairs.shape == (3,)
        scale = torch.tensor(2.0, **meta, requires_grad=True)
        loss = xloss.late_interaction_loss(q, d, qm, dm, logit_scale=scale, mask_mode=mode, direction=direction,
                                           labels=torch.zeros(3, dtype=torch.long, **meta), backend=backend)
        assert loss.shape == () and loss.device.type == "meta"
        loss.backward()
        assert scale.grad.shape == ()
        none = xloss.late_interaction_loss(q, d, logit_scale=1.0, temperature=None, direction=direction,
                                           reduction="none", backend=backend)
        assert none.shape == (3,)
    assert xloss.maxsim(q[0], d, qm[0], backend=backend).shape == (5,)  # a 2-D query
