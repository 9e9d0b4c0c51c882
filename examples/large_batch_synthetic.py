"""A CLIP step at a batch size whose logits would not fit in memory, with ``xloss.info_nce``.

Two tiny learnable towers (linear → GELU → linear) map synthetic paired inputs (``y`` is a noisy linear image of
``x``) to ``D``-dimensional unit vectors; each step draws a fresh batch of ``N`` pairs and takes an AdamW step on
the symmetric InfoNCE loss with a learnable logit scale.  xloss streams the ``N×N`` logits in tiles, so memory is
``O(N·D)``; the naive loss (``logits = s·x yᵀ`` and two ``F.cross_entropy``) holds the ``N×N`` fp32 logits, both
log-softmaxes and their gradients: about ``4·4·N²`` bytes at its peak, 64 GiB at ``N = 65536``.

Run::

    python examples/large_batch_synthetic.py                       # N = 65536, D = 128, 3 steps
    python examples/large_batch_synthetic.py --n 32768 --steps 2
    python examples/large_batch_synthetic.py --n 1024 --steps 1    # a quick check

Prints, per step, the loss, the step time and the process's peak resident memory so far.
"""

from __future__ import annotations

import argparse
import resource
import time

import torch
import torch.nn.functional as F

import xloss

GiB = 2**30


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=65536, help="batch size N (pairs per step)")
    p.add_argument("--dim", type=int, default=128, help="embedding dimension D")
    p.add_argument("--in-dim", type=int, default=64, help="input dimension of the synthetic data")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--backend", default="auto", help="xloss backend (auto, cpu, triton, reference)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return p.parse_args(argv)


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GiB  # ru_maxrss is in KiB on Linux


def tower(in_dim: int, dim: int) -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Linear(in_dim, 2 * dim), torch.nn.GELU(), torch.nn.Linear(2 * dim, dim))


def main(argv=None):
    args = parse_args(argv)
    if args.n < 2 or args.steps < 1:
        raise SystemExit("error: --n must be >= 2 and --steps >= 1")
    torch.manual_seed(args.seed)
    dev = torch.device(args.device)
    n, d = args.n, args.dim
    naive = 4 * n * n  # bytes of one N×N fp32 buffer
    print(f"N = {n}, D = {d}, device {dev}, backend {args.backend!r}")
    print(f"naive CLIP loss: one N×N fp32 logits buffer = {naive / GiB:.2f} GiB; forward + backward keeps about 4 "
          f"(logits, 2 log-softmaxes, their gradient) = {4 * naive / GiB:.1f} GiB")

    mix = torch.randn(args.in_dim, args.in_dim, device=dev) / args.in_dim**0.5  # the hidden pairing x → y
    f, g = tower(args.in_dim, d).to(dev), tower(args.in_dim, d).to(dev)
    log_scale = torch.nn.Parameter(torch.tensor(2.659, device=dev))  # log(1/0.07), as CLIP
    opt = torch.optim.AdamW([*f.parameters(), *g.parameters(), log_scale], lr=args.lr)

    for step in range(1, args.steps + 1):
        x = torch.randn(n, args.in_dim, device=dev)
        y = x @ mix + 0.5 * torch.randn(n, args.in_dim, device=dev)
        if dev.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        zx, zy = F.normalize(f(x), dim=-1), F.normalize(g(y), dim=-1)
        loss = xloss.info_nce(zx, zy, logit_scale=log_scale.exp().clamp(max=100), backend=args.backend)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if dev.type == "cuda":
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        mem = f"peak RSS {peak_rss_gib():.2f} GiB"
        if dev.type == "cuda":
            mem += f", peak CUDA memory {torch.cuda.max_memory_allocated() / GiB:.2f} GiB"
        print(f"step {step}/{args.steps}: loss {loss.item():.4f} (chance level log N = {torch.log(torch.tensor(n)).item():.2f}), "
              f"step time {dt:.2f} s, {mem}, logit scale {log_scale.exp().item():.2f}", flush=True)


if __name__ == "__main__":
    main()
