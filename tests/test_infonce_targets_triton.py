"""Triton structured-target sweeps of InfoNCE (``positive_max``, ``masked_lse``, ``masked_grad`` of
xloss/infonce/triton.py) against a dense fp64 oracle written straight from the target rule of
xloss/infonce/engine.py.

The kernels run in Triton's interpreter on machines without a GPU (tests/conftest.py sets
``TRITON_INTERPRET``); there the tiles are 32 wide (``SINGLE_D_MAX`` 32, ``TARGET_PROGRAMS`` 8), so the shapes
below (N, M up to 70, odd) span several row and column blocks, column splits, and with D = 40 the chunked-D
loop.  bf16 is wrong in the interpreter and is tested on a GPU only, as in tests/test_info_nce_triton.py.

Tolerances: fp32 inputs against the fp64 oracle at 2e-5 of max(1, max |expected|); fp16 inputs against the
oracle on the same (upcast) inputs: forward at fp32 tolerance (fp16 products are exact in fp32), gradients
with the slack of one half-precision rounding of G before the gradient dots.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass

import pytest
import torch

if importlib.util.find_spec("triton") is None:
    pytest.skip("Triton is not installed: the triton engine of info_nce cannot be tested", allow_module_level=True)

from xloss.infonce import triton as tri

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")  # set by tests/conftest.py
DEVICE = "cpu" if INTERPRET else "cuda"
SCALE = 4.0
INF = float("inf")


# --------------------------------------------------------------------------------------------- the oracle
def _split_stats(zh, member, dim):
    """fp64 split statistics (max, log Σ exp(ẑ - max)) of ẑ over ``member`` along ``dim``; (-inf, -inf) if empty."""
    mx = zh.masked_fill(~member, -INF).amax(dim)
    sub = torch.where(torch.isinf(mx), torch.zeros_like(mx), mx)
    terms = torch.exp(zh - sub.unsqueeze(dim)).masked_fill(~member, 0.0)
    return torch.stack((mx, torch.log(terms.sum(dim))))


def _lse_of(stats):
    return stats[0] + stats[1]  # -inf for an empty set


@dataclass
class Oracle:
    """The target rule of engine.py on dense ``[N, M]`` fp64 tensors."""

    raw: torch.Tensor
    z: torch.Tensor
    y: torch.Tensor
    zh: torch.Tensor
    in_row: torch.Tensor
    in_col: torch.Tensor
    ref_r: torch.Tensor
    ref_c: torch.Tensor

    @classmethod
    def build(cls, q, k, scale, qg, kg, self_offset=None, decoupled=False, hardness=0.0, margin=None):
        raw = q.double().cpu() @ k.double().cpu().T
        z = scale * raw
        n, m = raw.shape
        if self_offset is None:
            is_self = torch.zeros(n, m, dtype=torch.bool)
        else:
            is_self = (torch.arange(n)[:, None] - torch.arange(m)[None, :]) == self_offset
        y = (qg.cpu()[:, None] == kg.cpu()[None, :]) & ~is_self
        ref_r = raw.masked_fill(~y, -INF).amax(1)
        ref_c = raw.masked_fill(~y, -INF).amax(0)
        zh = torch.where(y, z, z + hardness * raw)
        base = ~is_self & ~(y & decoupled)
        in_row, in_col = base, base
        if margin is not None:
            in_row = base & ~(~y & (raw > ref_r[:, None] + margin))
            in_col = base & ~(~y & (raw > ref_c[None, :] + margin))
        return cls(raw, z, y, zh, in_row, in_col, ref_r, ref_c)

    def stats(self):
        """row [2, N], col [2, M], pos_r [2, N], pos_c [2, M] as masked_lse returns them."""
        yz = self.z.masked_fill(~self.y, 0.0)
        yf = self.y.double()
        return (_split_stats(self.zh, self.in_row, 1), _split_stats(self.zh, self.in_col, 0),
                torch.stack((yz.sum(1), yf.sum(1))), torch.stack((yz.sum(0), yf.sum(0))))

    def grad(self, q, k, a, w, pa, pw):
        """dq_u = G k, dk_u = Gᵀ q with G of engine.py (w, pw None: one-way)."""
        row, col, _, _ = self.stats()
        g = torch.where(self.in_row, a.double().cpu()[:, None] * torch.exp(self.zh - _lse_of(row)[:, None]), 0.0)
        pos = pa.double().cpu()[:, None].expand_as(self.z)
        if w is not None:
            g = g + torch.where(self.in_col, w.double().cpu()[None, :] * torch.exp(self.zh - _lse_of(col)[None, :]),
                                0.0)
            pos = pos + pw.double().cpu()[None, :]
        g = g - torch.where(self.y, pos, 0.0)
        return g @ k.double().cpu(), g.T @ q.double().cpu()


# ---------------------------------------------------------------------------------------------- helpers
def _close(got, want, dtype, what):
    """fp32 output of the kernels against fp64 ``want``: ~1e-5 relative (half: one rounding of G)."""
    assert got.dtype == torch.float32, what
    assert torch.isfinite(got).all(), f"{what}: non-finite values"
    got, want = got.double().cpu(), want.double().cpu()
    mag = want.abs().max().item() if want.numel() else 0.0
    if dtype == torch.float32:
        tol = 2e-5 * max(1.0, mag)
    else:
        tol = (4e-3 if dtype == torch.float16 else 2e-2) * max(1e-3, mag)
    err = (got - want).abs().max().item() if want.numel() else 0.0
    assert err <= tol, f"{what}: max error {err:.3g} > {tol:.3g} (max |want| {mag:.3g})"


def _close_stats(got, want, what):
    """Split statistics ``[2, L]``: empty sets exactly (-inf, -inf), the rest close (max, log-sum, LSE)."""
    assert got.shape == want.shape and got.dtype == torch.float32, what
    got = got.cpu()
    empty = torch.isinf(want[0])
    assert torch.equal(torch.isinf(got[0]), empty) and torch.equal(torch.isinf(got[1]), empty), (
        f"{what}: empty sets differ: got {torch.isinf(got[0]).nonzero().flatten().tolist()}, "
        f"want {empty.nonzero().flatten().tolist()}")
    assert (got[:, empty] == -INF).all(), f"{what}: an empty set must be (-inf, -inf)"
    assert not torch.isnan(got).any(), f"{what}: NaN"
    full = ~empty
    _close(got[0, full], want[0, full], torch.float32, f"{what} max")
    _close(got[1, full], want[1, full], torch.float32, f"{what} log-sum")
    _close(got[0, full] + got[1, full], _lse_of(want)[full], torch.float32, f"{what} LSE")


def _unit(n, d, g, dtype):
    return torch.nn.functional.normalize(torch.randn(n, d, generator=g), dim=1).to(dtype).to(DEVICE)


def _groups_of_sizes(total, g, sizes=(1, 2, 3, 4)):
    """Group ids ``[total]`` in random order, groups of 1–4 members (singletons: no positive but oneself)."""
    ids, gid = [], 0
    while len(ids) < total:
        size = sizes[int(torch.randint(0, len(sizes), (1,), generator=g))]
        ids += [gid] * size
        gid += 1
    ids = torch.tensor(ids[:total])
    return ids[torch.randperm(total, generator=g)]


def _weights(n, m, g):
    """a, w, pa, pw with mixed signs and zeros."""
    a, w = torch.randn(n, generator=g) / n, torch.randn(m, generator=g) / n
    pa, pw = torch.randn(n, generator=g) / n, torch.randn(m, generator=g) / n
    a[::5], w[1::4], pa[2::7], pw[::6] = 0.0, 0.0, 0.0, 0.0
    return tuple(x.to(DEVICE) for x in (a, w, pa, pw))


@dataclass(frozen=True)
class Case:
    n: int
    m: int
    d: int
    groups: str  # "two-tower": random query groups, keys in groups of 3–4, some query groups absent;
    #              "tower": one group vector for both sides (N == M); "offset": a block of one global tower
    self_offset: int | None = None
    decoupled: bool = False
    hardness: float = 0.0
    margin: float | None = None
    seed: int = 0


def _make(case: Case, dtype=torch.float32):
    g = torch.Generator().manual_seed(case.seed)
    q, k = _unit(case.n, case.d, g, dtype), _unit(case.m, case.d, g, dtype)
    if case.groups == "two-tower":
        n_groups = max(1, case.m // 4)
        kg = torch.arange(case.m)[torch.randperm(case.m, generator=g)] % n_groups  # 3–5 keys per group
        # query groups shifted by a quarter: queries past the last key group and keys of the first quarter
        # have no positive (a key-only hard negative, a query whose positives are elsewhere)
        extra = max(1, n_groups // 4)
        qg = torch.randint(extra, n_groups + extra, (case.n,), generator=g)
    elif case.groups == "tower":
        assert case.n == case.m
        qg = kg = _groups_of_sizes(case.n, g)
    else:  # "offset": rows qo.., keys ko.. of one tower; the self pair is at i - j == ko - qo
        ko = max(0, -case.self_offset)
        qo = ko + case.self_offset
        y = _groups_of_sizes(max(qo + case.n, ko + case.m), g)
        qg, kg = y[qo:qo + case.n], y[ko:ko + case.m]
    if case.seed % 2:
        qg, kg = qg.to(torch.int32), kg.to(torch.int32)  # any integer dtype
    return q, k, qg.to(DEVICE), kg.to(DEVICE), _weights(case.n, case.m, g)


def _assert_no_margin_ties(o: Oracle, margin):
    """The fp32 dots may not straddle ``ref + margin`` differently from fp64: the test data keeps clear of it."""
    for ref, what in ((o.ref_r[:, None], "row"), (o.ref_c[None, :], "column")):
        gap = (o.raw - (ref + margin)).abs().masked_fill(o.y | torch.isinf(ref), INF)
        assert gap.min() > 1e-6, f"test data: a {what} negative within {gap.min():.2g} of the margin threshold"


def _run(case: Case, need_cols: bool, dtype=torch.float32, check=True, softmax_weight=1.0):
    """positive_max (with a margin), masked_lse and masked_grad on ``case``, each against the oracle.

    ``softmax_weight`` multiplies ``a`` and ``w`` (not ``pa``, ``pw``): weights of very different sizes.
    """
    q, k, qg, kg, (a, w, pa, pw) = _make(case, dtype)
    a, w = a * softmax_weight, w * softmax_weight
    scale = torch.tensor(SCALE, device=DEVICE)
    o = Oracle.build(q, k, SCALE, qg, kg, case.self_offset, case.decoupled, case.hardness, case.margin)
    ref_r = ref_c = None
    if case.margin is not None:
        _assert_no_margin_ties(o, case.margin)
        ref_r, ref_c = tri.positive_max(q, k, qg, kg, case.self_offset, need_cols)
        assert (ref_c is None) == (not need_cols)
        _close_stats(torch.stack((ref_r, ref_r)), torch.stack((o.ref_r, o.ref_r)), "ref_r")
        if need_cols:
            _close_stats(torch.stack((ref_c, ref_c)), torch.stack((o.ref_c, o.ref_c)), "ref_c")
    row, col, pos_r, pos_c = tri.masked_lse(q, k, scale, qg, kg, case.self_offset, case.decoupled, case.hardness,
                                            case.margin, ref_r, ref_c, need_cols)
    want_row, want_col, want_pos_r, want_pos_c = o.stats()
    assert (col is None) == (pos_c is None) == (not need_cols)
    if not need_cols:
        w = pw = None
    dq, dk = tri.masked_grad(q, k, scale, qg, kg, case.self_offset, case.decoupled, case.hardness, case.margin,
                             ref_r, ref_c, row, col, a, w, pa, pw)
    if check:
        _close_stats(row, want_row, "row")  # half inputs too: their products are exact in fp32
        _close(pos_r[0], want_pos_r[0], torch.float32, "pos_r sum")
        assert torch.equal(pos_r[1].cpu(), want_pos_r[1].float()), "pos_r count"
        if need_cols:
            _close_stats(col, want_col, "col")
            _close(pos_c[0], want_pos_c[0], torch.float32, "pos_c sum")
            assert torch.equal(pos_c[1].cpu(), want_pos_c[1].float()), "pos_c count"
        dq_want, dk_want = o.grad(q, k, a, w, pa, pw)
        assert dq.shape == q.shape and dk.shape == k.shape
        _close(dq, dq_want, dtype, "dq")
        _close(dk, dk_want, dtype, "dk")
    return o, (row, col, pos_r, pos_c), (dq, dk)


# ------------------------------------------------------------------------------------------------ cases
# N, M, D odd and not multiples of the interpreter tiles (32); D = 40 > SINGLE_D_MAX runs the chunked-D loop.
CASES = {
    "groups": Case(45, 70, 40, "two-tower"),
    "groups-single-D": Case(70, 45, 9, "two-tower", seed=1),
    "exclude-self": Case(37, 37, 40, "tower", self_offset=0, seed=2),
    "self-offset-neg": Case(37, 70, 24, "offset", self_offset=-20, seed=3),
    "self-offset-pos": Case(66, 35, 40, "offset", self_offset=9, seed=4),
    "margin-0": Case(45, 70, 40, "two-tower", margin=0.0, seed=5),
    "margin-0.1": Case(45, 70, 9, "two-tower", margin=0.1, seed=6),
    "decoupled": Case(45, 70, 40, "two-tower", decoupled=True, seed=7),
    "hardness": Case(45, 70, 40, "two-tower", hardness=0.5, seed=8),
    "self-margin": Case(37, 37, 40, "tower", self_offset=0, margin=0.1, seed=9),
    "self-decoupled-hardness": Case(37, 37, 9, "tower", self_offset=0, decoupled=True, hardness=0.5, seed=10),
    "decoupled-margin": Case(45, 70, 40, "two-tower", decoupled=True, margin=0.0, seed=11),
    "all": Case(37, 37, 40, "tower", self_offset=0, decoupled=True, hardness=0.5, margin=0.1, seed=12),
    "offset-all": Case(37, 70, 40, "offset", self_offset=-20, decoupled=True, hardness=0.5, margin=0.0, seed=13),
}


@pytest.mark.parametrize("need_cols", [True, False], ids=["symmetric", "one-way"])
@pytest.mark.parametrize("name", list(CASES))
def test_against_oracle(name, need_cols):
    case = CASES[name]
    o, (row, _, _, _), _ = _run(case, need_cols)
    # the case covers what its name says
    if case.groups == "two-tower":
        per_row = o.y.sum(1)
        assert (per_row == 0).any() and (per_row >= 2).any() and (o.y.sum(0) == 0).any()
    if case.self_offset is not None:
        assert (o.y.sum(1) == 0).any(), "a singleton group (no positive but itself)"
    if case.margin is not None:
        assert (~o.y & (o.raw > o.ref_r[:, None] + case.margin) & torch.isfinite(o.ref_r)[:, None]).any(), (
            "the margin drops a negative of a row that has a positive")
    if case.hardness:
        assert torch.isfinite(row[0]).any()


def test_margin_drops_and_empties():
    """The margin case drops negatives above a positive, and a row / column without positive ends empty:
    (-inf, -inf) statistics and a finite gradient (non-zero weights on it included)."""
    o, (row, col, _, _), (dq, dk) = _run(CASES["decoupled-margin"], True)
    dropped = ~o.in_row & ~o.y & (o.raw <= o.ref_r[:, None])
    assert not dropped.any(), "a negative at or below its positive was dropped"
    assert (~o.in_row.any(1)).any() and (~o.in_col.any(0)).any()
    assert torch.isinf(row[0]).any() and torch.isinf(col[0]).any()
    assert torch.isfinite(dq).all() and torch.isfinite(dk).all()


def test_no_positive_anywhere():
    """Disjoint groups: with a margin every set is empty, so every statistic is (-inf, -inf) and the gradient is
    exactly 0 whatever the weights; without a margin the positives' sums are 0 and the LSEs the plain ones."""
    n, m, d = 33, 40, 40
    g = torch.Generator().manual_seed(20)
    q, k = _unit(n, d, g, torch.float32), _unit(m, d, g, torch.float32)
    qg, kg = torch.zeros(n, dtype=torch.long, device=DEVICE), torch.ones(m, dtype=torch.long, device=DEVICE)
    a, w, pa, pw = _weights(n, m, g)
    scale = torch.tensor(SCALE, device=DEVICE)
    ref_r, ref_c = tri.positive_max(q, k, qg, kg, None, True)
    assert (ref_r == -INF).all() and (ref_c == -INF).all()
    row, col, pos_r, pos_c = tri.masked_lse(q, k, scale, qg, kg, None, False, 0.5, 0.1, ref_r, ref_c, True)
    assert (row == -INF).all() and (col == -INF).all()
    assert (pos_r == 0).all() and (pos_c == 0).all()
    dq, dk = tri.masked_grad(q, k, scale, qg, kg, None, False, 0.5, 0.1, ref_r, ref_c, row, col, a, w, pa, pw)
    assert torch.equal(dq, torch.zeros_like(dq)) and torch.equal(dk, torch.zeros_like(dk))
    row, col, pos_r, _ = tri.masked_lse(q, k, scale, qg, kg, None, False, 0.0, None, None, None, True)
    plain_r, plain_c, _, _ = tri.lse(q, k, scale, True, torch.zeros(n, dtype=torch.long, device=DEVICE))
    assert torch.equal(row, plain_r) and torch.equal(col, plain_c) and (pos_r == 0).all()


@pytest.mark.parametrize("d", [9, 40], ids=["single-D", "D-loop"])
def test_labels_as_groups_match_plain_kernels_bitwise(d):
    """Groups ``qg = labels``, ``kg = arange(M)`` with no other option are the plain loss: the STRUCTURED
    kernels give the plain kernels' statistics, positive logits and (pa = pw = 0) gradients bit for bit."""
    n, m = 45, 70
    g = torch.Generator().manual_seed(21)
    q, k = _unit(n, d, g, torch.float32), _unit(m, d, g, torch.float32)
    labels = torch.randint(0, m, (n,), generator=g).to(DEVICE)
    a, w, _, _ = _weights(n, m, g)
    scale = torch.tensor(SCALE, device=DEVICE)
    kg = torch.arange(m, device=DEVICE)
    row, col, z_pos, _ = tri.lse(q, k, scale, True, labels)
    m_row, m_col, pos_r, _ = tri.masked_lse(q, k, scale, labels, kg, None, False, 0.0, None, None, None, True)
    assert torch.equal(m_row, row) and torch.equal(m_col, col)
    assert torch.equal(pos_r[0], z_pos) and (pos_r[1] == 1).all()
    zero_n, zero_m = torch.zeros_like(a), torch.zeros_like(w)
    for cc, ww in ((col, w), (None, None)):
        dq, dk = tri.grad(q, k, scale, row, cc, a, ww)
        m_dq, m_dk = tri.masked_grad(q, k, scale, labels, kg, None, False, 0.0, None, None, None, row, cc, a, ww,
                                     zero_n, None if ww is None else zero_m)
        assert torch.equal(m_dq, dq) and torch.equal(m_dk, dk)


def test_positive_max_is_the_forward_dot():
    """``positive_max`` uses the dots of ``masked_lse`` (same D chunks): at scale 1 a row (column) whose
    positive is its largest entry has ``row max == ref`` bit for bit, so a margin of 0 never drops a tie."""
    n, d = 45, 40
    g = torch.Generator().manual_seed(22)
    q = _unit(n, d, g, torch.float32)
    ids = torch.arange(n, device=DEVICE)  # one positive each: the pair (i, i), <q_i, q_i> = 1 the largest
    ref_r, ref_c = tri.positive_max(q, q, ids, ids, None, True)
    one = torch.tensor(1.0, device=DEVICE)
    row, col, pos_r, _ = tri.masked_lse(q, q, one, ids, ids, None, False, 0.0, 0.0, ref_r, ref_c, True)
    assert torch.equal(row[0], ref_r) and torch.equal(col[0], ref_c) and torch.equal(pos_r[0], ref_r)
    assert (pos_r[1] == 1).all()


@pytest.mark.parametrize("programs", [1, 10**6], ids=["no-split", "split-per-block"])
def test_column_splits(programs, monkeypatch):
    """No column split (dq by plain stores) and one split per column block (the default splits in between)."""
    monkeypatch.setattr(tri, "TARGET_PROGRAMS", programs)
    _run(CASES["all"], True)
    _run(CASES["offset-all"], False)


@pytest.mark.parametrize("name", ["all", "offset-all", "groups"])
def test_deterministic_mode(name, monkeypatch):
    """XLOSS_DETERMINISTIC / torch.use_deterministic_algorithms: two atomic-free sweeps (roles swapped for dk),
    right against the oracle, and bitwise identical when repeated."""
    case = CASES[name]
    for need_cols in (True, False):
        _, _, (dq_atomic, dk_atomic) = _run(case, need_cols)
        monkeypatch.setenv("XLOSS_DETERMINISTIC", "1")
        _, _, (dq1, dk1) = _run(case, need_cols)  # against the oracle, in deterministic mode
        _, _, (dq2, dk2) = _run(case, need_cols, check=False)
        monkeypatch.delenv("XLOSS_DETERMINISTIC")
        was = torch.are_deterministic_algorithms_enabled()
        torch.use_deterministic_algorithms(True)
        try:
            _, _, (dq3, dk3) = _run(case, need_cols, check=False)
        finally:
            torch.use_deterministic_algorithms(was)
        assert torch.equal(dq1, dq2) and torch.equal(dk1, dk2)
        assert torch.equal(dq1, dq3) and torch.equal(dk1, dk3)
        torch.testing.assert_close(dq1, dq_atomic, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(dk1, dk_atomic, rtol=1e-5, atol=1e-6)


def test_forward_is_deterministic():
    """Repeated forward sweeps (partials merged in a fixed order) are bitwise identical."""
    case = CASES["all"]
    _, first, _ = _run(case, True, check=False)
    _, again, _ = _run(case, True, check=False)
    for x, y in zip(first, again):
        assert torch.equal(x, y)


@pytest.mark.parametrize("name", ["all", "offset-all", "groups-single-D", "hardness"])
def test_float16(name):
    _run(CASES[name], True, torch.float16)


def test_float16_weights_of_different_sizes():
    """Softmax weights 1e-6 of the positive weights: all four weights share one power-of-two normaliser, so
    the half-precision G (in fp16's range only after that division) neither overflows nor underflows."""
    _run(CASES["all"], True, torch.float16, softmax_weight=1e-6)
    _run(CASES["groups"], True, torch.float16, softmax_weight=1e6)


@pytest.mark.skipif(INTERPRET, reason="bf16 is wrong in Triton's interpreter: GPU only")
@pytest.mark.parametrize("name", ["all", "offset-all", "groups-single-D"])
def test_bfloat16_gpu(name):
    _run(CASES[name], True, torch.bfloat16)


def test_bad_input():
    q = torch.randn(4, 8, dtype=torch.float64, device=DEVICE)
    ids = torch.arange(4, device=DEVICE)
    with pytest.raises(TypeError, match="float32, float16 and bfloat16"):
        tri.positive_max(q, q, ids, ids, None, True)
    q = q.float()
    scale = torch.tensor(1.0, device=DEVICE)
    with pytest.raises(ValueError, match="ref_r"):
        tri.masked_lse(q, q, scale, ids, ids, None, False, 0.0, 0.1, None, None, False)
    ref_r, _ = tri.positive_max(q, q, ids, ids, None, False)
    with pytest.raises(ValueError, match="ref_c"):
        tri.masked_lse(q, q, scale, ids, ids, None, False, 0.0, 0.1, ref_r, None, True)
