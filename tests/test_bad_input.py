"""Every bad argument of ``xloss.info_nce`` raises ValueError (wrong shape or value), TypeError (wrong kind or
dtype) or RuntimeError (a backend that cannot run here), with a message that names the argument.

The checks run before a backend is picked, so each case is tried with every backend that runs on the CPU.
"""

from __future__ import annotations

import math

import pytest
import torch

import xloss
from xloss import _dispatch

N, M, D = 4, 6, 3
CPU_BACKENDS = ["auto", "cpu", "reference"]


def q_(n=N, d=D, dtype=torch.float32, device="cpu"):
    return torch.randn(n, d, dtype=dtype, device=device)


def k_(m=M, d=D, dtype=torch.float32, device="cpu"):
    return torch.randn(m, d, dtype=dtype, device=device)


# (id, args, kwargs, exception, regex the message must match)
CASES = [
    # --- shapes
    ("dim-mismatch", (q_(d=3), k_(d=5)), {}, ValueError, r"query.*\(4, 3\).*key.*\(6, 5\)"),
    ("query-1d", (torch.randn(D), k_()), {}, ValueError, r"query must be 2-D.*\(3,\)"),
    ("query-3d", (torch.randn(2, N, D), k_()), {}, ValueError, r"query must be 2-D.*\(2, 4, 3\)"),
    ("key-1d", (q_(), torch.randn(D)), {}, ValueError, r"key must be 2-D.*\(3,\)"),
    ("key-3d", (q_(), torch.randn(2, M, D)), {}, ValueError, r"key must be 2-D.*\(2, 6, 3\)"),
    ("query-0d", (torch.tensor(1.0), k_()), {}, ValueError, r"query must be 2-D"),
    ("empty-N", (q_(n=0), k_()), {}, ValueError, r"query must not be empty.*\(0, 3\)"),
    ("empty-M", (q_(), k_(m=0)), {}, ValueError, r"key must not be empty.*\(0, 3\)"),
    ("empty-D", (q_(d=0), k_(d=0)), {}, ValueError, r"query must not be empty.*\(4, 0\)"),
    ("empty-D-key-only", (q_(), k_(d=0)), {}, ValueError, r"key"),
    # --- kinds and dtypes
    ("query-int", (torch.ones(N, D, dtype=torch.long), k_()), {}, TypeError, r"query.*floating-point.*int64"),
    ("key-int", (q_(), torch.ones(M, D, dtype=torch.int32)), {}, TypeError, r"key.*floating-point.*int32"),
    ("query-bool", (torch.ones(N, D, dtype=torch.bool), k_()), {}, TypeError, r"query.*floating-point"),
    (
        "query-complex",
        (torch.ones(N, D, dtype=torch.complex64), k_()),
        {},
        TypeError,
        r"query.*floating-point",
    ),
    ("query-list", ([[1.0] * D] * N, k_()), {}, TypeError, r"query must be a torch.Tensor"),
    ("key-none", (q_(), None), {}, TypeError, r"key must be a torch.Tensor"),
    (
        "mixed-dtypes",
        (q_(), k_(dtype=torch.float64)),
        {},
        TypeError,
        r"query and key.*dtype.*float32.*float64",
    ),
    (
        "mixed-half",
        (q_(dtype=torch.float16), k_(dtype=torch.bfloat16)),
        {},
        TypeError,
        r"query and key.*dtype",
    ),
    (
        "different-devices",
        (q_(), k_(device="meta")),
        {},
        ValueError,
        r"query and key.*same device.*cpu.*meta",
    ),
    # --- labels
    (
        "labels-negative",
        (q_(), k_()),
        {"labels": torch.tensor([0, 1, -1, 2])},
        ValueError,
        r"labels.*\[0, 6\)",
    ),
    (
        "labels-too-large",
        (q_(), k_()),
        {"labels": torch.tensor([0, 1, 6, 2])},
        ValueError,
        r"labels.*\[0, 6\)",
    ),
    (
        "labels-too-large-fewer-keys",
        (q_(n=6), k_(m=4)),
        {"labels": torch.tensor([0, 1, 2, 3, 4, 0])},
        ValueError,
        r"labels.*\[0, 4\)",
    ),
    (
        "labels-short",
        (q_(), k_()),
        {"labels": torch.arange(N - 1)},
        ValueError,
        r"labels.*shape \(4,\).*\(3,\)",
    ),
    ("labels-long", (q_(), k_()), {"labels": torch.arange(N + 1)}, ValueError, r"labels.*shape \(4,\)"),
    (
        "labels-2d",
        (q_(), k_()),
        {"labels": torch.arange(N)[:, None]},
        ValueError,
        r"labels.*shape \(4,\).*\(4, 1\)",
    ),
    ("labels-0d", (q_(n=1), k_()), {"labels": torch.tensor(0)}, ValueError, r"labels.*shape \(1,\)"),
    (
        "labels-float",
        (q_(), k_()),
        {"labels": torch.arange(N).float()},
        TypeError,
        r"labels.*integer.*float32",
    ),
    (
        "labels-bool",
        (q_(), k_()),
        {"labels": torch.ones(N, dtype=torch.bool)},
        TypeError,
        r"labels.*integer.*bool",
    ),
    ("labels-list", (q_(), k_()), {"labels": [0, 1, 2, 3]}, TypeError, r"labels must be a torch.Tensor"),
    (
        "labels-device",
        (q_(), k_()),
        {"labels": torch.arange(N, device="meta")},
        ValueError,
        r"labels.*same device.*meta",
    ),
    ("more-queries-no-labels", (q_(n=7), k_(m=6)), {}, ValueError, r"query.*\(7 > 6\).*labels"),
    # --- scale / temperature
    ("temperature-zero", (q_(), k_()), {"temperature": 0.0}, ValueError, r"temperature must be positive"),
    ("temperature-negative", (q_(), k_()), {"temperature": -1}, ValueError, r"temperature must be positive"),
    ("temperature-nan", (q_(), k_()), {"temperature": math.nan}, ValueError, r"temperature must be positive"),
    (
        "temperature-tensor-zero",
        (q_(), k_()),
        {"temperature": torch.tensor(0.0)},
        ValueError,
        r"temperature must be positive",
    ),
    (
        "temperature-tensor-negative",
        (q_(), k_()),
        {"temperature": torch.tensor(-0.5, requires_grad=True)},
        ValueError,
        r"temperature must be positive",
    ),
    (
        "temperature-and-scale",
        (q_(), k_()),
        {"temperature": 0.1, "logit_scale": 10.0},
        ValueError,
        r"logit_scale.*temperature",
    ),
    (
        "scale-two-elements",
        (q_(), k_()),
        {"logit_scale": torch.tensor([1.0, 2.0])},
        ValueError,
        r"logit_scale.*one element.*\(2,\)",
    ),
    ("scale-empty", (q_(), k_()), {"logit_scale": torch.tensor([])}, ValueError, r"logit_scale.*one element"),
    (
        "temperature-two-elements",
        (q_(), k_()),
        {"temperature": torch.ones(2, 1)},
        ValueError,
        r"temperature.*one element.*\(2, 1\)",
    ),
    ("scale-int-tensor", (q_(), k_()), {"logit_scale": torch.tensor(10)}, TypeError, r"logit_scale.*int64"),
    ("scale-string", (q_(), k_()), {"logit_scale": "10"}, TypeError, r"logit_scale.*str"),
    ("scale-bool", (q_(), k_()), {"logit_scale": True}, TypeError, r"logit_scale.*bool"),
    ("temperature-string", (q_(), k_()), {"temperature": "0.07"}, TypeError, r"temperature.*str"),
    (
        "scale-other-device-1d",
        (q_(), k_()),
        {"logit_scale": torch.ones(1, device="meta")},
        ValueError,
        r"logit_scale.*meta",
    ),
    # --- options
    ("reduction-unknown", (q_(), k_()), {"reduction": "avg"}, ValueError, r"reduction.*'avg'"),
    ("reduction-none-object", (q_(), k_()), {"reduction": None}, ValueError, r"reduction.*None"),
    ("smoothing-negative", (q_(), k_()), {"label_smoothing": -0.1}, ValueError, r"label_smoothing.*\[0, 1\]"),
    ("smoothing-above-one", (q_(), k_()), {"label_smoothing": 1.5}, ValueError, r"label_smoothing.*\[0, 1\]"),
    ("smoothing-nan", (q_(), k_()), {"label_smoothing": math.nan}, ValueError, r"label_smoothing"),
    ("smoothing-string", (q_(), k_()), {"label_smoothing": "0.1"}, TypeError, r"label_smoothing.*str"),
    ("symmetric-not-bool", (q_(), k_()), {"symmetric": "yes"}, TypeError, r"symmetric.*bool.*str"),
]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("args,kwargs,exc,match", [pytest.param(*c[1:], id=c[0]) for c in CASES])
def test_bad_input(monkeypatch, backend, args, kwargs, exc, match):
    monkeypatch.delenv("XLOSS_BACKEND", raising=False)
    with pytest.raises(exc, match=match):
        xloss.info_nce(*args, backend=backend, **kwargs)


@pytest.mark.parametrize("backend", ["gpu", "Triton", "", None, "torch"])
def test_unknown_backend(backend):
    with pytest.raises(ValueError, match=r"backend must be one of .*'triton'.*got"):
        xloss.info_nce(q_(), k_(), backend=backend)


def test_unknown_backend_in_env(monkeypatch):
    monkeypatch.setenv("XLOSS_BACKEND", "fast")
    with pytest.raises(ValueError, match=r"XLOSS_BACKEND.*'fast'"):
        xloss.info_nce(q_(), k_())
    xloss.info_nce(q_(), k_(), backend="cpu")  # an explicit backend does not read the variable


def test_triton_on_cpu_without_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.delenv("XLOSS_BACKEND", raising=False)
    if _dispatch.triton_available():
        match = r"backend='triton' needs CUDA tensors \(got cpu\).*TRITON_INTERPRET=1"
    else:
        match = r"backend='triton'.*Triton is not installed"
    with pytest.raises(RuntimeError, match=match):
        xloss.info_nce(q_(), k_(), backend="triton")
    monkeypatch.setenv("XLOSS_BACKEND", "triton")  # the same through the environment variable
    with pytest.raises(RuntimeError, match=match):
        xloss.info_nce(q_(), k_())


def test_triton_interpret_zero_is_off(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    if not _dispatch.triton_available():
        pytest.skip("Triton is not installed")
    with pytest.raises(RuntimeError, match=r"TRITON_INTERPRET=1"):
        xloss.info_nce(q_(), k_(), backend="triton")


def test_cuda_backend_unavailable(monkeypatch):
    monkeypatch.delenv("XLOSS_BACKEND", raising=False)
    with pytest.raises(RuntimeError, match=r"backend='cuda'.*not available.*info_nce"):
        xloss.info_nce(q_(), k_(), backend="cuda")


def test_checks_come_before_backend_errors(monkeypatch):
    """A bad tensor is reported as such even when the backend could not run either."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(TypeError, match="query"):
        xloss.info_nce(torch.ones(N, D, dtype=torch.long), k_(), backend="cuda")


def test_valid_edge_values_are_accepted():
    """The boundaries themselves are valid: ε = 0 and 1, labels 0 and M-1, M < N with labels, int scale."""
    q, k = q_(), k_()
    for eps in (0, 0.0, 1, 1.0):
        assert torch.isfinite(xloss.info_nce(q, k, label_smoothing=eps, backend="cpu"))
    assert torch.isfinite(xloss.info_nce(q, k, labels=torch.tensor([0, M - 1, 0, M - 1]), backend="cpu"))
    assert torch.isfinite(
        xloss.info_nce(q_(n=7), k_(m=3), labels=torch.tensor([0, 1, 2] * 2 + [0]), backend="cpu")
    )
    assert torch.isfinite(xloss.info_nce(q, k, logit_scale=10, backend="cpu"))
    assert torch.isfinite(xloss.info_nce(q, k, temperature=torch.tensor([0.5]), backend="cpu"))
    for dtype in (torch.int8, torch.uint8, torch.int16, torch.int32):
        assert torch.isfinite(xloss.info_nce(q, k, labels=torch.arange(N, dtype=dtype), backend="cpu"))
