"""Late interaction across ranks: ``exchange="ring"`` against ``"all_gather"``, per direction (issue 14).

Each configuration runs in fresh processes (gloo on this machine's CPU, one thread per rank): every rank builds
its shard of one global batch (N queries of Lq tokens, M documents of Ld tokens, D features, fp32), runs one
``late_interaction_loss(..., group=pg)`` forward+backward, and reports the growth of its peak RSS over what it
held before the call, and the wall time.  Printed per configuration: the mean over ranks (and the largest).
The ring holds two blocks of the travelling side (documents for ``"q2d"``, queries for ``"d2q"``) instead of
all of them, so its peak should not grow with the world size; all_gather's holds the whole batch::

    python benchmarks/late_interaction_ranks.py                       # 2 and 4 ranks, every direction
    python benchmarks/late_interaction_ranks.py --worlds 4 --directions q2d --n 1024 --ld 180

Peak RSS is coarse (the allocator's pages, other threads' buffers) and this host is shared: read differences of
a few MiB as noise.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # run from a checkout without installing xloss

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _status_mib(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024  # kB
    raise RuntimeError(f"no {field} in /proc/self/status")


def _reset_peak() -> None:
    """Set the peak RSS (VmHWM) to the current RSS (Linux >= 4.0), so that the peak read after the call is the
    call's own, not the import's."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def _rank(rank: int, world: int, init: str, cfg: dict, out) -> None:
    import xloss

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    n, m = cfg["n"] // world, cfg["m"] // world
    gen = torch.Generator().manual_seed(rank)
    q = torch.randn(n, cfg["lq"], cfg["dim"], generator=gen).requires_grad_()
    d = torch.randn(m, cfg["ld"], cfg["dim"], generator=gen).requires_grad_()
    kw = {"logit_scale": 10.0, "direction": cfg["direction"], "group": dist.group.WORLD, "exchange": cfg["exchange"]}
    xloss.late_interaction_loss(q[:1], d[:1], **kw).backward()  # warm-up: loads the compiled ops, fills caches
    q.grad = d.grad = None
    dist.barrier()
    _reset_peak()
    before, start = _status_mib("VmRSS"), time.perf_counter()
    xloss.late_interaction_loss(q, d, **kw).backward()
    dist.barrier()
    out.put((rank, _status_mib("VmHWM") - before, time.perf_counter() - start))
    dist.destroy_process_group()


def run(world: int, cfg: dict) -> tuple[float, float, float]:
    """(mean peak growth MiB, largest, mean seconds) of one configuration on ``world`` fresh processes."""
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    with tempfile.TemporaryDirectory() as tmp:
        init = f"file://{tmp}/rendezvous"
        procs = [ctx.Process(target=_rank, args=(r, world, init, cfg, out)) for r in range(world)]
        for p in procs:
            p.start()
        results = [out.get(timeout=1800) for _ in procs]
        for p in procs:
            p.join()
    peaks = [r[1] for r in results]
    return sum(peaks) / world, max(peaks), sum(r[2] for r in results) / world


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--worlds", default="2,4")
    p.add_argument("--directions", default="q2d,d2q,both")
    p.add_argument("--n", type=int, default=512, help="queries in the global batch")
    p.add_argument("--m", type=int, default=512, help="documents in the global batch")
    p.add_argument("--lq", type=int, default=32)
    p.add_argument("--ld", type=int, default=128)
    p.add_argument("--dim", type=int, default=128)
    args = p.parse_args(argv)
    print(f"torch {torch.__version__}, gloo on CPU, one thread per rank; N = {args.n}, M = {args.m}, "
          f"Lq = {args.lq}, Ld = {args.ld}, D = {args.dim}, fp32, one forward+backward")
    print(f"{'direction':9s} {'ranks':>5s} {'exchange':>10s} {'peak MiB (mean)':>16s} {'(max)':>8s} {'seconds':>8s}")
    for direction in args.directions.split(","):
        for world in (int(w) for w in args.worlds.split(",")):
            for exchange in ("ring", "all_gather"):
                cfg = {"n": args.n, "m": args.m, "lq": args.lq, "ld": args.ld, "dim": args.dim,
                       "direction": direction, "exchange": exchange}
                mean, top, secs = run(world, cfg)
                print(f"{direction:9s} {world:5d} {exchange:>10s} {mean:16.1f} {top:8.1f} {secs:8.2f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
