"""Exercises every compiled op of xloss (``torch.ops.xloss.*`` declared in ``xloss/csrc/ops.cpp``) on small
inputs, valid and invalid, so that an AddressSanitizer build reports any out-of-bounds access.

Run it through ``tools/asan_check.sh`` (which builds the ASan copy of the ops and preloads libasan); on its own
it also works against the normal build (a quick smoke test of the ops).  Exit status: 0 when every call
behaved (results match the PyTorch paths, bad input raised), 1 otherwise; an ASan report aborts the process
before that.
"""

from __future__ import annotations

import os
import re
import sys

import torch


def compiled_ops(csrc: str) -> list[str]:
    """The op names declared with ``m.def("name(...`` in ops.cpp."""
    with open(os.path.join(csrc, "ops.cpp")) as fh:
        return re.findall(r'm\.def\("([A-Za-z_0-9]+)\(', fh.read())


def expect_error(fn, *args) -> None:
    try:
        fn(*args)
    except RuntimeError:
        return
    raise AssertionError(f"bad input was accepted: {[getattr(a, 'shape', a) for a in args]}")


def check_maxsim_q2d() -> None:
    from xloss import reference
    from xloss.reference.late_interaction import token_weights

    op = torch.ops.xloss.maxsim_q2d
    gen = torch.Generator().manual_seed(0)
    for nq, lq, nd, ld, dim in ((1, 1, 1, 1, 1), (2, 7, 3, 13, 5), (3, 33, 4, 19, 37), (2, 17, 2, 64, 16)):
        for dtype in (torch.float32, torch.float64, torch.bfloat16, torch.float16):
            q = torch.randn(nq, lq, dim, generator=gen).to(dtype)
            d = torch.randn(nd, ld, dim, generator=gen).to(dtype)
            lengths = torch.randint(0, ld + 1, (nd,), generator=gen)
            masks = {
                "prefix": torch.arange(ld)[None] < lengths[:, None],
                "scattered": torch.rand(nd, ld, generator=gen) > 0.5,
                "full": torch.ones(nd, ld, dtype=torch.bool),
            }
            qv = torch.rand(nq, lq, generator=gen) > 0.3
            acc = torch.float64 if dtype == torch.float64 else torch.float32
            qw = token_weights(qv, None, "sum", acc)
            for dv in masks.values():
                for zero in (False, True):
                    mode = "zero" if zero else "exclude"
                    want = reference.maxsim(q.to(acc), d.to(acc), qv, dv, mask_mode=mode)
                    for need_aux in (True, False):
                        s, idx, val = op(q, d, qw, qv, dv, zero, False, need_aux)
                        torch.testing.assert_close(s, want, rtol=1e-3, atol=1e-3)
                        if need_aux:
                            assert int(idx.max()) < ld and int(idx.min()) >= -1
                            torch.testing.assert_close((val * qw[:, None]).sum(-1), s, rtol=1e-4, atol=1e-4)
                    if nq == nd:
                        s, _, _ = op(q, d, qw, qv, dv, zero, True, True)
                        torch.testing.assert_close(s, want.diagonal(), rtol=1e-3, atol=1e-3)
    # Non-contiguous inputs and an empty batch.
    q, d = torch.randn(4, 3, 8)[:, ::1, ::2].transpose(0, 1), torch.randn(2, 6, 4)
    qv, dv = torch.ones(3, 4, dtype=torch.bool), torch.ones(2, 6, dtype=torch.bool)
    op(q, d, qv.float(), qv, dv, False, False, True)
    op(q[:0], d, qv[:0].float(), qv[:0], dv, False, False, True)
    # Bad input must raise (and never read out of bounds first).
    q, d = torch.randn(2, 5, 4), torch.randn(3, 7, 4)
    qv, dv = torch.ones(2, 5, dtype=torch.bool), torch.ones(3, 7, dtype=torch.bool)
    qw = qv.float()
    for args in (
        (q[0], d, qw, qv, dv), (q, d[0], qw, qv, dv), (q, d[:, :, :3], qw, qv, dv), (q, d.double(), qw, qv, dv),
        (q, d, qw[:, :4], qv, dv), (q, d, qw.double(), qv, dv), (q, d, qw, qv[:, :4], dv), (q, d, qw, qv, dv[:2]),
        (q, d, qw, qv, dv.float()), (q.int(), d.int(), qw, qv, dv),
    ):
        expect_error(op, *args, False, False, True)
    expect_error(op, q, d, qw, qv, dv, False, True, True)  # pairs with Nq != Nd


def check_banzhaf_interaction() -> None:
    import xloss
    from xloss.banzhaf import coalition_bits  # noqa: F401 (the package must import)

    op = torch.ops.xloss.banzhaf_interaction
    gen = torch.Generator().manual_seed(1)
    for b, t, v in ((1, 1, 1), (2, 3, 5), (1, 7, 4)):
        for dtype in (torch.float32, torch.float64):
            sim = torch.randn(b, t, v, generator=gen, dtype=dtype)
            p, q = torch.randn(b, t, generator=gen, dtype=dtype), torch.randn(b, v, generator=gen, dtype=dtype)
            tm, vm = torch.rand(b, t, generator=gen) > 0.2, torch.rand(b, v, generator=gen) > 0.2
            tm[:, 0] = vm[:, 0] = True
            for mode in ("hbi", "textbook"):
                out = op(sim, p, q, tm, vm, 8, 3, None, mode)
                assert out.shape == (b, t, v) and torch.isfinite(out).all()
                coal = torch.rand(b, t, v, 4, t + v, generator=gen) > 0.5
                got = op(sim, p, q, tm, vm, 4, 0, coal, mode)
                want = xloss.banzhaf_interaction(sim, p, q, tm, vm, coalitions=coal, mode=mode, backend="reference")
                torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    sim, p, q = torch.randn(2, 3, 4), torch.randn(2, 3), torch.randn(2, 4)
    tm, vm = torch.ones(2, 3, dtype=torch.bool), torch.ones(2, 4, dtype=torch.bool)
    for args in (
        (sim[0], p, q, tm, vm, 4, 0, None, "hbi"), (sim, p[:, :2], q, tm, vm, 4, 0, None, "hbi"),
        (sim, p, q[:1], tm, vm, 4, 0, None, "hbi"), (sim, p, q, tm[:, :2], vm, 4, 0, None, "hbi"),
        (sim, p, q, tm, vm.float(), 4, 0, None, "hbi"), (sim, p, q, tm, vm, 0, 0, None, "hbi"),
        (sim, p, q, tm, vm, 4, 0, None, "nope"),
        (sim, p, q, tm, vm, 4, 0, torch.ones(2, 3, 4, 3, 7, dtype=torch.bool), "hbi"),
        (sim, p, q, tm, vm, 4, 0, torch.ones(2, 3, 4, 4, 6, dtype=torch.bool), "hbi"),
    ):
        expect_error(op, *args)


CHECKS = {"maxsim_q2d": check_maxsim_q2d, "banzhaf_interaction": check_banzhaf_interaction}


def main() -> int:
    # This process keeps the preloaded ASan runtime; the compiler that the JIT build starts need not run under it
    # (that only makes the build slower).
    os.environ.pop("LD_PRELOAD", None)
    from xloss import _ext

    if not _ext.load():
        print(f"asan_check: the compiled ops did not load: {_ext.error()}", file=sys.stderr)
        return 1
    names = compiled_ops(_ext.CSRC)
    failed = False
    for name in names:
        if name not in CHECKS:
            print(f"asan_check: WARNING: no check for the compiled op {name!r}: add one to tools/asan_check.py")
            continue
        try:
            CHECKS[name]()
            print(f"asan_check: {name} ok")
        except Exception as exc:  # noqa: BLE001 (report every op, then fail)
            failed = True
            print(f"asan_check: {name} FAILED: {type(exc).__name__}: {exc}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
