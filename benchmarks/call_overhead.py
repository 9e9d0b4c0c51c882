"""The fixed cost of one xloss call over the naive loss, interleaved in one process (issue 16).

At small batches "auto" computes the definition densely, so xloss and naive run the same aten ops and what is
left is xloss's Python: argument checks and dispatch.  This measures it the way it is paid in a training loop
(cache-cold, between tensor ops), not in a hot ``timeit`` loop: ``naive``, a ``minimal`` wrapper (inline type
checks, then the definition: the floor of any wrapper) and ``xloss`` run in turn, forward+backward, ``--rounds``
times ``--calls`` calls each, and the medians of their per-round differences to naive are printed::

    python benchmarks/call_overhead.py                 # info_nce, sigmoid, distill, cwcl at N = 128, D = 64
    python benchmarks/call_overhead.py --n 8 --families info_nce

Differences of a few µs are noise on a shared host; the figures in the issue-16 notes came from this script.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # run from a checkout without installing xloss

import torch

from xloss.bench import FAMILIES


def _clear(inputs: dict) -> None:
    for t in inputs.values():
        if isinstance(t, torch.Tensor):
            t.grad = None


def _per_call(run, inputs: dict, calls: int) -> float:
    start = time.perf_counter()
    for _ in range(calls):
        _clear(inputs)
        run(inputs)
    return (time.perf_counter() - start) / calls


def _minimal(naive_run):
    """The naive runner behind the least a wrapper does: a few inline checks on the tensors."""
    def run(inputs: dict) -> None:
        tensors = [t for t in inputs.values() if isinstance(t, torch.Tensor) and t.dim() == 2]
        first = tensors[0]
        if not all(t.dtype == first.dtype and t.device == first.device for t in tensors):
            raise ValueError("inputs differ in dtype or device")
        naive_run(inputs)
    return run


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--families", default="info_nce,sigmoid,distill,cwcl")
    p.add_argument("--n", type=int, default=128, help="N = M")
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--rounds", type=int, default=150)
    p.add_argument("--calls", type=int, default=20)
    args = p.parse_args(argv)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, N = M = {args.n}, D = {args.dim}, "
          f"{args.rounds} rounds x {args.calls} calls, forward+backward")
    for name in args.families.split(","):
        family = FAMILIES[name]
        inputs = family.make_inputs((args.n, args.n, args.dim), torch.float32, torch.device("cpu"))
        naive = family.impl("naive").run
        runs = {"naive": naive, "minimal": _minimal(naive), "xloss": family.xloss.run}
        times: dict[str, list[float]] = {k: [] for k in runs}
        for _ in range(5):  # warm-up
            for run in runs.values():
                _per_call(run, inputs, args.calls)
        for _ in range(args.rounds):
            for key, run in runs.items():
                times[key].append(_per_call(run, inputs, args.calls))
        base = times["naive"]
        parts = [f"naive {statistics.median(base) * 1e6:7.1f} µs"]
        for key in ("minimal", "xloss"):
            diff = statistics.median([a - b for a, b in zip(times[key], base)])
            parts.append(f"{key} +{diff * 1e6:5.1f} µs ({statistics.median(times[key]) / statistics.median(base):.3f}×)")
        print(f"{name:10s} " + ", ".join(parts))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
