"""The dense engine and the small-problem rule of ``backend="auto"`` (issue 16).

"auto" computes a small problem on one process densely (``xloss._dispatch.DENSE_CELLS``), in the accumulation
dtype; larger problems, multi-rank calls and meta tensors keep the streaming engines.  The dense engine must give
what the chunked engine gives: the same values and gradients (fp64: to 1e-10; half inputs: both computed in
fp32 from the same half values), the same output dtypes, and the same errors on bad input.
"""

from __future__ import annotations

import pytest
import torch
from tolerance import assert_close64

import xloss
from xloss import _dispatch

F64 = torch.float64


def _t(*shape, dtype=F64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.nn.functional.normalize(torch.randn(*shape, generator=g, dtype=F64), dim=-1).to(dtype)


def _calls(dtype):
    """Every public loss on a small problem: name -> fn(backend) returning the output; inputs require grad."""
    q, k, c = (_t(12, 16, dtype=dtype, seed=i).requires_grad_() for i in range(3))
    tq, tk = _t(12, 24, dtype=dtype, seed=4), _t(12, 24, dtype=dtype, seed=5)
    lq, ld = _t(5, 4, 16, dtype=dtype, seed=6).requires_grad_(), _t(6, 7, 16, dtype=dtype, seed=7).requires_grad_()
    d_mask = torch.arange(7)[None, :] < torch.tensor([7, 3, 5, 1, 7, 2])[:, None]
    groups = torch.arange(12) % 4
    s = torch.tensor(3.0, dtype=F64, requires_grad=True)
    return {
        "info_nce": lambda b: xloss.info_nce(q, k, logit_scale=s, label_smoothing=0.1, backend=b),
        "info_nce groups": lambda b: xloss.info_nce(q, k, logit_scale=s, query_groups=groups, key_groups=groups,
                                                    false_negative_margin=0.1, backend=b),
        "info_nce matryoshka": lambda b: xloss.info_nce(q, k, logit_scale=s, matryoshka_dims=[4, 8, 16], backend=b),
        "info_nce none": lambda b: xloss.info_nce(q, k, logit_scale=s, reduction="none", backend=b),
        "sigmoid_loss": lambda b: xloss.sigmoid_loss(q, k, logit_scale=s, logit_bias=-2.0, backend=b),
        "distill_loss": lambda b: xloss.distill_loss(q, k, tq, tk, logit_scale=s, teacher_logit_scale=5.0,
                                                     backend=b),
        "cwcl_loss": lambda b: xloss.cwcl_loss(q, k, logit_scale=s, symmetric=True, backend=b),
        "maxsim": lambda b: xloss.maxsim(lq, ld, None, d_mask, direction="both", backend=b),
        "late_interaction_loss": lambda b: xloss.late_interaction_loss(lq, ld[:5], None, d_mask[:5], logit_scale=s,
                                                                       backend=b),
        "gram_volume": lambda b: xloss.gram_volume(q, k, c, backend=b),
        "gram_loss": lambda b: xloss.gram_loss(q, k, c, logit_scale=s, backend=b),
        "symile_loss": lambda b: xloss.symile_loss(q, k, c, logit_scale=s, negative_sampling="n_squared",
                                                   backend=b),
    }, [q, k, c, lq, ld, s]


def _value_and_grads(fn, leaves):
    out = fn()
    g = torch.linspace(0.5, 1.5, out.numel(), dtype=out.dtype).reshape(out.shape)
    grads = torch.autograd.grad(out, leaves, g, allow_unused=True)
    return out.detach(), [None if x is None else x.detach() for x in grads]


@pytest.mark.parametrize("name", sorted(_calls(F64)[0]))
def test_dense_equals_chunked_in_fp64(name):
    calls, leaves = _calls(F64)
    dense, dense_grads = _value_and_grads(lambda: calls[name]("dense"), leaves)
    chunked, chunked_grads = _value_and_grads(lambda: calls[name]("chunked"), leaves)
    assert_close64(dense, chunked, what=f"{name}: value")
    for a, b in zip(dense_grads, chunked_grads):
        assert (a is None) == (b is None), f"{name}: a gradient is missing on one engine"
        if a is not None:
            assert_close64(a, b, what=f"{name}: gradient")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("name", sorted(_calls(F64)[0]))
def test_dense_computes_half_inputs_in_fp32_like_the_chunked_engine(name, dtype):
    """Same half inputs: both engines compute in fp32, so they agree to fp32 rounding, far below half's; the
    value is float32 and each gradient has its input's dtype on both."""
    calls, leaves = _calls(dtype)
    dense, dense_grads = _value_and_grads(lambda: calls[name]("dense"), leaves)
    chunked, chunked_grads = _value_and_grads(lambda: calls[name]("chunked"), leaves)
    assert dense.dtype == chunked.dtype == torch.float32, name
    torch.testing.assert_close(dense, chunked, rtol=1e-5, atol=1e-5)
    for a, b in zip(dense_grads, chunked_grads):
        if a is not None:
            assert a.dtype == b.dtype
            # Gradients are rounded to half at the end: at most one half-precision step apart.
            torch.testing.assert_close(a.float(), b.float(), rtol=2 * torch.finfo(dtype).eps, atol=1e-3)


def test_auto_takes_dense_for_small_problems_only():
    limit = _dispatch.DENSE_CELLS["info_nce"]
    cpu = torch.device("cpu")
    assert _dispatch.resolve("info_nce", "auto", cpu, torch.float32, local=True, cells=limit) == "dense"
    assert _dispatch.resolve("info_nce", "auto", cpu, torch.float32, local=True, cells=limit + 1) == "chunked"
    assert _dispatch.resolve("info_nce", "auto", cpu, torch.float32, local=False, cells=16) == "chunked"
    assert _dispatch.resolve("info_nce", "auto", cpu, torch.float32) == "chunked"  # size unknown
    assert _dispatch.resolve("info_nce", "auto", torch.device("meta"), torch.float32, local=True, cells=16) == "chunked"
    # An explicit choice is taken whatever the size.
    assert _dispatch.resolve("info_nce", "dense", cpu, torch.float32, local=True, cells=10**12) == "dense"
    assert _dispatch.resolve("info_nce", "chunked", cpu, torch.float32, local=True, cells=16) == "chunked"
    with pytest.raises(RuntimeError, match="not available for banzhaf"):
        _dispatch.resolve("banzhaf", "dense", cpu, torch.float32)


def test_auto_routes_by_problem_size(monkeypatch):
    """The public functions report their problem size: the dense engine runs below the limit, the chunked one
    above it (spied through the dispatch table)."""
    seen = []
    original = _dispatch.resolve

    def spy(*args, **kwargs):
        seen.append(original(*args, **kwargs))
        return seen[-1]

    monkeypatch.setattr(_dispatch, "resolve", spy)
    side = int(_dispatch.DENSE_CELLS["info_nce"] ** 0.5)
    for n in (8, side, side + 1):
        q, k = _t(n, 8, dtype=torch.float32), _t(n, 8, dtype=torch.float32, seed=1)
        xloss.info_nce(q, k, logit_scale=2.0)
    assert seen == ["dense", "dense", "chunked"]


def test_dense_reports_bad_input_like_the_other_engines():
    q, k = _t(8, 4, dtype=torch.float32), _t(8, 4, dtype=torch.float32, seed=1)
    with pytest.raises(ValueError, match="labels"):
        xloss.info_nce(q, k, logit_scale=2.0, labels=torch.tensor([0, 1, 2, 3, 4, 5, 6, 8]))
    with pytest.raises(ValueError, match="temperature"):
        xloss.info_nce(q, k, temperature=-1.0)


def test_dense_is_in_available_backends():
    assert xloss.available_backends()["dense"] is True
