"""Every bad argument of ``xloss.maxsim``, ``xloss.maxsim_pairs`` and ``xloss.late_interaction_loss`` raises
ValueError (wrong shape or value), TypeError (wrong kind or dtype) or RuntimeError (a backend that cannot run
here), with a message that names the argument.

The checks run before a backend is picked, so each case is tried with every backend that runs on the CPU.
"""

from __future__ import annotations

import math

import pytest
import torch

import xloss

NQ, ND, LQ, LD, D = 3, 4, 5, 6, 2
CPU_BACKENDS = ["auto", "cpu", "reference"]


def q_(n=NQ, lq=LQ, d=D, dtype=torch.float32, device="cpu"):
    return torch.randn(n, lq, d, dtype=dtype, device=device)


def d_(n=ND, ld=LD, d=D, dtype=torch.float32, device="cpu"):
    return torch.randn(n, ld, d, dtype=dtype, device=device)


def qm_(shape=(NQ, LQ), dtype=torch.bool, device="cpu"):
    return torch.ones(shape, dtype=dtype, device=device)


def dm_(shape=(ND, LD), dtype=torch.bool, device="cpu"):
    return torch.ones(shape, dtype=dtype, device=device)


# Cases shared by the three functions: (id, args, kwargs, exception, regex the message must match)
COMMON = [
    # --- shapes
    ("dim-mismatch", (q_(d=2), d_(d=3)), {}, ValueError, r"q and d.*feature dimension.*\(3, 5, 2\).*\(4, 6, 3\)"),
    ("q-4d", (torch.randn(1, NQ, LQ, D), d_()), {}, ValueError, r"q must be 3-D.*\(1, 3, 5, 2\)"),
    ("d-2d", (q_(), torch.randn(ND, D)), {}, ValueError, r"d must be 3-D.*\(4, 2\).*d\[None\]"),
    ("q-1d", (torch.randn(D), d_()), {}, ValueError, r"q must be 3-D.*\(2,\)"),
    ("q-0d", (torch.tensor(1.0), d_()), {}, ValueError, r"q must be 3-D"),
    ("empty-Nq", (q_(n=0), d_()), {}, ValueError, r"q must not be empty.*\(0, 5, 2\)"),
    ("empty-Lq", (q_(lq=0), d_()), {}, ValueError, r"q must not be empty.*\(3, 0, 2\)"),
    ("empty-Nd", (q_(), d_(n=0)), {}, ValueError, r"d must not be empty.*\(0, 6, 2\)"),
    ("empty-Ld", (q_(), d_(ld=0)), {}, ValueError, r"d must not be empty.*\(4, 0, 2\)"),
    ("empty-D", (q_(d=0), d_(d=0)), {}, ValueError, r"q must not be empty"),
    # --- kinds and dtypes
    ("q-int", (torch.ones(NQ, LQ, D, dtype=torch.long), d_()), {}, TypeError, r"q must be a floating-point.*int64"),
    ("d-int", (q_(), torch.ones(ND, LD, D, dtype=torch.int32)), {}, TypeError, r"d must be a floating-point.*int32"),
    ("q-bool", (torch.ones(NQ, LQ, D, dtype=torch.bool), d_()), {}, TypeError, r"q must be a floating-point"),
    ("q-complex", (torch.ones(NQ, LQ, D, dtype=torch.complex64), d_()), {}, TypeError, r"q must be a floating"),
    ("q-list", ([[[1.0] * D] * LQ] * NQ, d_()), {}, TypeError, r"q must be a torch.Tensor"),
    ("d-none", (q_(), None), {}, TypeError, r"d must be a torch.Tensor"),
    ("mixed-dtypes", (q_(), d_(dtype=torch.float64)), {}, TypeError, r"q and d.*dtype.*float32.*float64"),
    ("mixed-half", (q_(dtype=torch.float16), d_(dtype=torch.bfloat16)), {}, TypeError, r"q and d.*dtype"),
    ("different-devices", (q_(), d_(device="meta")), {}, ValueError, r"q and d.*same device.*cpu.*meta"),
    # --- masks
    ("q-mask-shape", (q_(), d_(), qm_((NQ, LQ + 1))), {}, ValueError, r"q_mask.*shape \(3, 5\).*\(3, 6\)"),
    ("q-mask-1d", (q_(), d_(), qm_((NQ,))), {}, ValueError, r"q_mask.*shape \(3, 5\).*\(3,\)"),
    ("d-mask-shape", (q_(), d_(), None, dm_((ND + 1, LD))), {}, ValueError, r"d_mask.*shape \(4, 6\).*\(5, 6\)"),
    ("d-mask-transposed", (q_(), d_(), None, dm_((LD, ND))), {}, ValueError, r"d_mask.*shape \(4, 6\).*\(6, 4\)"),
    # 0/1 masks of any integer or float dtype are accepted (test_late_interaction.py); other values are not
    ("q-mask-float-half", (q_(), d_(), qm_(dtype=torch.float32) * 0.5), {}, ValueError,
     r"q_mask must hold only 0 and 1"),
    ("q-mask-float-nan", (q_(), d_(), qm_(dtype=torch.float32) * math.nan), {}, ValueError,
     r"q_mask must hold only 0 and 1"),
    ("d-mask-int-2", (q_(), d_(), None, dm_(dtype=torch.int64) * 2), {}, ValueError, r"d_mask must hold only 0 and 1"),
    ("d-mask-int-negative", (q_(), d_(), None, -dm_(dtype=torch.int32)), {}, ValueError,
     r"d_mask must hold only 0 and 1"),
    ("d-mask-uint8-255", (q_(), d_(), None, dm_(dtype=torch.uint8) * 255), {}, ValueError,
     r"d_mask must hold only 0 and 1"),
    ("q-mask-complex", (q_(), d_(), qm_(dtype=torch.complex64)), {}, TypeError, r"q_mask must be bool.*complex64"),
    ("q-mask-float-shape", (q_(), d_(), qm_((NQ, LQ + 1), dtype=torch.float16)), {}, ValueError,
     r"q_mask.*shape \(3, 5\).*\(3, 6\)"),
    ("q-mask-list", (q_(), d_(), [[True] * LQ] * NQ), {}, TypeError, r"q_mask must be a torch.Tensor.*list"),
    ("d-mask-device", (q_(), d_(), None, dm_(device="meta")), {}, ValueError, r"d_mask.*same device.*meta"),
    # --- weights
    ("q-weights-shape", (q_(), d_()), {"q_weights": torch.ones(NQ, LQ + 1)}, ValueError,
     r"q_weights.*shape \(3, 5\).*\(3, 6\)"),
    ("q-weights-int", (q_(), d_()), {"q_weights": torch.ones(NQ, LQ, dtype=torch.long)}, TypeError,
     r"q_weights.*floating-point.*int64"),
    ("q-weights-bool", (q_(), d_()), {"q_weights": torch.ones(NQ, LQ, dtype=torch.bool)}, TypeError,
     r"q_weights.*floating-point.*bool"),
    ("q-weights-list", (q_(), d_()), {"q_weights": [1.0] * LQ}, TypeError, r"q_weights must be a float torch"),
    ("d-weights-shape", (q_(), d_()), {"d_weights": torch.ones(ND), "direction": "both"}, ValueError,
     r"d_weights.*shape \(4, 6\).*\(4,\)"),
    ("d-weights-int", (q_(), d_()), {"d_weights": torch.ones(ND, LD, dtype=torch.int32), "direction": "d2q"},
     TypeError, r"d_weights.*floating-point.*int32"),
    ("d-weights-device", (q_(), d_()), {"d_weights": torch.ones(ND, LD, device="meta"), "direction": "both"},
     ValueError, r"d_weights.*same device.*meta"),
    ("d-weights-with-q2d", (q_(), d_()), {"d_weights": torch.ones(ND, LD), "direction": "q2d"}, ValueError,
     r"d_weights.*direction='d2q' or 'both'"),
    ("q-weights-with-d2q", (q_(), d_()), {"q_weights": torch.ones(NQ, LQ), "direction": "d2q"}, ValueError,
     r"q_weights.*direction='q2d' or 'both'"),
    # --- options
    ("mask-mode-unknown", (q_(), d_()), {"mask_mode": "ignore"}, ValueError, r"mask_mode.*'exclude'.*'ignore'"),
    ("mask-mode-none", (q_(), d_()), {"mask_mode": None}, ValueError, r"mask_mode.*None"),
    ("direction-unknown", (q_(), d_()), {"direction": "t2i"}, ValueError, r"direction.*'q2d'.*'t2i'"),
    ("direction-none", (q_(), d_()), {"direction": None}, ValueError, r"direction.*None"),
]

# A single 2-D query is a batch of one for maxsim and the loss (flash-maxsim's flash_maxsim(Q, D)), not for
# aligned pairs
PAIRS_ONLY = [
    ("q-2d", (torch.randn(NQ, D), d_(n=NQ)), {}, ValueError, r"q must be 3-D.*\(3, 2\)"),
]
TWO_D_QUERY = [
    ("q-2d-mask-shape", (torch.randn(LQ, D), d_(), qm_((LQ + 1,))), {}, ValueError, r"q_mask.*shape \(1, 5\)"),
    ("q-2d-mask-values", (torch.randn(LQ, D), d_(), qm_((LQ,), dtype=torch.int8) * 3), {}, ValueError,
     r"q_mask must hold only 0 and 1"),
]

# maxsim and maxsim_pairs: the token reduction is "token_reduction" ("reduction", its deprecated old name, still
# reaches the same check)
SCORE_ONLY = [
    ("token-reduction-unknown", (q_(), d_()), {"token_reduction": "max"}, ValueError,
     r"token_reduction.*'sum'.*'mean'.*'max'"),
    ("token-reduction-none-string", (q_(), d_()), {"token_reduction": "none"}, ValueError,
     r"token_reduction.*'none'"),
    ("reduction-unknown", (q_(), d_()), {"reduction": "max"}, ValueError, r"reduction.*'sum'.*'mean'.*'max'"),
    ("reduction-none-string", (q_(), d_()), {"reduction": "none"}, ValueError, r"reduction.*'none'"),
]

LOSS_ONLY = [
    ("token-reduction-unknown", (q_(), d_()), {"token_reduction": "max"}, ValueError, r"token_reduction.*'max'"),
    ("score-reduction-unknown", (q_(), d_()), {"score_reduction": "max"}, ValueError, r"token_reduction.*'max'"),
    ("scale-and-temperature", (q_(), d_()), {"temperature": 0.5}, ValueError, r"logit_scale or temperature"),
    ("temperature-zero", (q_(), d_()), {"logit_scale": None, "temperature": 0.0}, ValueError,
     r"temperature must be positive"),
    ("reduction-unknown", (q_(), d_()), {"reduction": "avg"}, ValueError, r"reduction.*'avg'"),
    ("reduction-none-object", (q_(), d_()), {"reduction": None}, ValueError, r"reduction.*None"),
    ("labels-negative", (q_(), d_()), {"labels": torch.tensor([0, -1, 2])}, ValueError, r"labels.*\[0, 4\)"),
    ("labels-too-large", (q_(), d_()), {"labels": torch.tensor([0, 4, 2])}, ValueError, r"labels.*\[0, 4\)"),
    ("labels-short", (q_(), d_()), {"labels": torch.arange(NQ - 1)}, ValueError, r"labels.*shape \(3,\).*\(2,\)"),
    ("labels-float", (q_(), d_()), {"labels": torch.arange(NQ).float()}, TypeError, r"labels.*integer.*float32"),
    ("labels-list", (q_(), d_()), {"labels": [0, 1, 2]}, TypeError, r"labels must be a torch.Tensor"),
    ("more-queries-no-labels", (q_(n=5), d_()), {}, ValueError, r"q.*\(5 > 4\).*labels"),
    ("smoothing-negative", (q_(), d_()), {"label_smoothing": -0.1}, ValueError, r"label_smoothing.*\[0, 1\]"),
    ("smoothing-nan", (q_(), d_()), {"label_smoothing": math.nan}, ValueError, r"label_smoothing"),
    ("smoothing-string", (q_(), d_()), {"label_smoothing": "0.1"}, TypeError, r"label_smoothing.*str"),
    ("scale-string", (q_(), d_()), {"logit_scale": "10"}, TypeError, r"logit_scale.*str"),
    ("scale-two-elements", (q_(), d_()), {"logit_scale": torch.tensor([1.0, 2.0])}, ValueError,
     r"logit_scale.*one element"),
    ("scale-int-tensor", (q_(), d_()), {"logit_scale": torch.tensor(10)}, TypeError, r"logit_scale.*int64"),
    # a meta scale holds no value: named, not "Cannot copy out of meta tensor"
    ("scale-meta", (q_(), d_()), {"logit_scale": torch.tensor(2.0, device="meta")}, ValueError,
     r"logit_scale is a meta tensor.*cpu"),
    ("temperature-meta", (q_(), d_()), {"logit_scale": None, "temperature": torch.tensor(0.5, device="meta")},
     ValueError, r"temperature is a meta tensor.*cpu"),
]


def _params(cases):
    return [pytest.param(*c[1:], id=c[0]) for c in cases]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("args,kwargs,exc,match", _params(COMMON + SCORE_ONLY + TWO_D_QUERY))
def test_maxsim_bad_input(monkeypatch, backend, args, kwargs, exc, match):
    monkeypatch.delenv("XLOSS_BACKEND", raising=False)
    with pytest.raises(exc, match=match):
        xloss.maxsim(*args, backend=backend, **kwargs)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("args,kwargs,exc,match", _params(COMMON + SCORE_ONLY + PAIRS_ONLY))
def test_maxsim_pairs_bad_input(monkeypatch, backend, args, kwargs, exc, match):
    monkeypatch.delenv("XLOSS_BACKEND", raising=False)
    with pytest.raises(exc, match=match):
        xloss.maxsim_pairs(*args, backend=backend, **kwargs)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("args,kwargs,exc,match", _params(COMMON + LOSS_ONLY + TWO_D_QUERY))
def test_late_interaction_loss_bad_input(monkeypatch, backend, args, kwargs, exc, match):
    monkeypatch.delenv("XLOSS_BACKEND", raising=False)
    kwargs = {"logit_scale": 1.0, **kwargs}
    with pytest.raises(exc, match=match):
        xloss.late_interaction_loss(*args, backend=backend, **kwargs)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_maxsim_pairs_needs_as_many_documents_as_queries(backend):
    with pytest.raises(ValueError, match=r"maxsim_pairs.*same number of rows.*\(3, 5, 2\).*\(4, 6, 2\)"):
        xloss.maxsim_pairs(q_(), d_(), backend=backend)


def test_logit_scale_is_required():
    with pytest.raises(TypeError, match="logit_scale"):
        xloss.late_interaction_loss(q_(), d_())


@pytest.mark.parametrize("backend", ["gpu", "Triton", "", None])
def test_unknown_backend(backend):
    for fn, kw in ((xloss.maxsim, {}), (xloss.maxsim_pairs, {}), (xloss.late_interaction_loss, {"logit_scale": 1.0})):
        d = d_(n=NQ) if fn is xloss.maxsim_pairs else d_()
        with pytest.raises(ValueError, match=r"backend must be one of .*'triton'.*got"):
            fn(q_(), d, backend=backend, **kw)


def test_cuda_backend_unavailable(monkeypatch):
    monkeypatch.delenv("XLOSS_BACKEND", raising=False)
    with pytest.raises(RuntimeError, match=r"backend='cuda'.*not available.*late_interaction"):
        xloss.maxsim(q_(), d_(), backend="cuda")


def test_checks_come_before_backend_errors():
    with pytest.raises(TypeError, match="q must"):
        xloss.maxsim(torch.ones(NQ, LQ, D, dtype=torch.long), d_(), backend="cuda")


def test_valid_edge_values_are_accepted():
    """Boundaries that are valid: fully masked rows, one token, one query, Nd > Nq, labels at the ends."""
    q, d = q_(), d_()
    qm, dm = qm_(), dm_()
    qm[0] = False
    dm[:, 1:] = False
    for fn in (xloss.maxsim, xloss.late_interaction_loss):
        kw = {"logit_scale": 1.0} if fn is xloss.late_interaction_loss else {}
        for mode in ("exclude", "zero"):
            for direction in ("q2d", "d2q", "both"):
                out = fn(q, d, qm, dm, mask_mode=mode, direction=direction, backend="cpu", **kw)
                assert torch.isfinite(out).all()
    assert xloss.maxsim(q_(n=1, lq=1), d_(n=1, ld=1), backend="cpu").shape == (1, 1)
    assert torch.isfinite(xloss.late_interaction_loss(q, d, logit_scale=1.0, labels=torch.tensor([0, 3, 3]),
                                                      backend="cpu"))
    assert torch.isfinite(xloss.late_interaction_loss(q_(n=6), d, logit_scale=torch.tensor([2.0]),
                                                      labels=torch.tensor([0, 1, 2, 3, 3, 0]), backend="cpu"))
    w64 = torch.ones(NQ, LQ, dtype=torch.float64)  # weights of another float dtype are fine
    assert torch.isfinite(xloss.maxsim(q, d, q_weights=w64, backend="cpu")).all()
