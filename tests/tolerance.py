"""The one tolerance rule of the test suite (cut-cross-entropy's gold-relative rule), shared by every family.

* ``assert_close64``: fp64 paths against the fp64 reference: relative 1e-10 per entry, or 1e-10 of the
  tensor's largest entry (entries that cancel to ~0), with a floor for tensors that are exactly 0.
* ``assert_no_worse``: a fast path in a low precision against the fp64 ("gold") result: its error may be no
  larger than the naive PyTorch loss's own error in the same dtype, plus a slack of a few roundings of the
  terms that make up each entry.
"""

from __future__ import annotations

import torch


def assert_close64(actual, expected, rtol=1e-10, what=""):
    """fp64 agreement: relative ``rtol`` per entry, or ``rtol`` of the tensor's largest entry (entries that
    cancel to ~0), with a floor of ``rtol·1e-3`` for tensors that are exactly 0 (N = 1 gradients)."""
    assert actual.dtype == expected.dtype, f"{what}: dtype {actual.dtype} != {expected.dtype}"
    atol = rtol * max(1e-3, float(expected.abs().max())) if expected.numel() else 0.0
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol, msg=lambda m: f"{what}: {m}")


def assert_no_worse(fast, naive, exact, what="", magnitude=0.0, slack_ulps=8.0):
    """|fast - exact| <= |naive - exact| + slack (max-abs over the tensor).

    The slack is ``slack_ulps`` fp32 epsilons of the size of the terms that make up each entry (``magnitude``)
    or of the largest exact entry if larger: a few roundings, nothing more.  Without the term size, an entry
    that cancels to exactly 0 (N = 1) would allow no rounding at all.
    """
    exact = exact.double()
    err_fast = float((fast.double() - exact).abs().max()) if exact.numel() else 0.0
    err_naive = float((naive.double() - exact).abs().max()) if exact.numel() else 0.0
    scale = max(float(exact.abs().max()) if exact.numel() else 0.0, magnitude, 1e-30)
    slack = slack_ulps * torch.finfo(torch.float32).eps * scale
    assert torch.isfinite(fast).all(), f"{what}: non-finite values"
    assert err_fast <= err_naive + slack, (
        f"{what}: fast-path error {err_fast:.3e} > naive error {err_naive:.3e} + slack {slack:.3e}"
    )
