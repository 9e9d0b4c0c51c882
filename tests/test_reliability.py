"""Defects of the audit (issue 15) that cut across families: label dtypes and output dtypes on every backend,
environment variables that must be validated."""

from __future__ import annotations

import pytest
import torch

import xloss

LABEL_DTYPES = [torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64]
BACKENDS = ["chunked", "reference"]


def _q_k():
    g = torch.Generator().manual_seed(0)
    return torch.randn(6, 4, generator=g, dtype=torch.float64), torch.randn(8, 4, generator=g, dtype=torch.float64)


LABELLED = {
    "info_nce": lambda q, k, labels, b: xloss.info_nce(q, k, labels=labels, backend=b),
    "info_nce one-way hardness": lambda q, k, labels, b: xloss.info_nce(q, k, labels=labels, hardness=0.5,
                                                                        symmetric=False, backend=b),
    "sigmoid_loss": lambda q, k, labels, b: xloss.sigmoid_loss(q, k, logit_scale=1.5, logit_bias=-1.0, labels=labels,
                                                               backend=b),
    "gram_loss": lambda q, k, labels, b: xloss.gram_loss(q, k, k.flip(0), temperature=0.5, labels=labels,
                                                         backend=b),
    "late_interaction_loss d2q": lambda q, k, labels, b: xloss.late_interaction_loss(
        q.view(3, 2, 4), k.view(4, 2, 4), logit_scale=2.0, labels=labels[:3] % 4, direction="d2q", backend=b),
}


@pytest.mark.parametrize("dtype", LABEL_DTYPES, ids=str)
@pytest.mark.parametrize("name", sorted(LABELLED))
def test_every_integer_label_dtype_gives_the_int64_result_on_every_backend(name, dtype):
    q, k = _q_k()
    labels = torch.tensor([1, 0, 3, 2, 7, 5])
    want = LABELLED[name](q, k, labels, "reference")
    for backend in BACKENDS:
        got = LABELLED[name](q, k, labels.to(dtype), backend)
        what = f"{name} {backend} {dtype}"
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12, msg=lambda m, what=what: f"{what}: {m}")


HALF = {
    "info_nce": lambda q, k, b: xloss.info_nce(q, k, backend=b),
    "sigmoid_loss": lambda q, k, b: xloss.sigmoid_loss(q, k, logit_scale=1.0, logit_bias=0.0, backend=b),
    "gram_loss": lambda q, k, b: xloss.gram_loss(q, k, k.flip(0), temperature=0.5, backend=b),
    "gram_volume": lambda q, k, b: xloss.gram_volume(q, k, k.flip(0), backend=b),
    "distill_loss": lambda q, k, b: xloss.distill_loss(q, k, q, k, backend=b),
    "cwcl_loss": lambda q, k, b: xloss.cwcl_loss(q, k, backend=b),
    "late_interaction_loss": lambda q, k, b: xloss.late_interaction_loss(q.view(3, 2, 4), k.view(3, 2, 4),
                                                                         logit_scale=1.0, backend=b),
    "maxsim": lambda q, k, b: xloss.maxsim(q.view(3, 2, 4), k.view(3, 2, 4), backend=b),
    "symile_loss n_squared": lambda q, k, b: xloss.symile_loss(q, k, k.flip(0), negative_sampling="n_squared",
                                                               backend=b),
}


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("name", sorted(HALF))
def test_half_inputs_give_float32_on_every_backend(name, dtype):
    q, k = (t[:6].to(dtype) for t in _q_k())
    for backend in BACKENDS:
        assert HALF[name](q, k, backend).dtype == torch.float32, f"{name} backend={backend}"


@pytest.mark.parametrize("value", ["abc", "inf", "nan", "-1", "0"])
def test_tile_budget_variable_is_validated(monkeypatch, value):
    monkeypatch.setenv("XLOSS_CPU_TILE_MB", value)
    q, k = _q_k()
    with pytest.raises(ValueError, match="XLOSS_CPU_TILE_MB must be a positive finite number"):
        xloss.info_nce(q, k[:6], backend="chunked")


def test_unknown_backend_variable_is_refused_by_every_family(monkeypatch):
    monkeypatch.setenv("XLOSS_BACKEND", "gpu")
    q, k = _q_k()
    with pytest.raises(ValueError, match="XLOSS_BACKEND must be one of"):
        xloss.info_nce(q, k[:6])
    sim = torch.randn(2, 3, 4)
    w_t, w_v = torch.softmax(torch.randn(2, 3), 1), torch.softmax(torch.randn(2, 4), 1)
    with pytest.raises(ValueError, match="XLOSS_BACKEND must be one of"):
        xloss.banzhaf_interaction(sim, w_t, w_v, torch.ones(2, 3, dtype=torch.bool), torch.ones(2, 4, dtype=torch.bool),
                                  num_samples=2)
