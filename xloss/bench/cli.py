"""The command line: options, their merge with a preset into a :class:`~xloss.bench.runner.Config`, and main().

``main`` records the run's context (device name, versions, commit) in every row, and also answers the
internal ``--worker SPEC`` and ``--probe DEVICE`` of the child processes (see :mod:`xloss.bench.worker`).
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import platform
import subprocess
from collections.abc import Sequence
from pathlib import Path

import torch

from . import cases, memory, worker  # noqa: F401  (cases: registers the built-in families in FAMILIES)
from .presets import PRESETS
from .registry import FAMILIES
from .report import GIB, format_table, output_stem, write_csv, write_plot
from .runner import Config, run_family

DEFAULT_TIMEOUT_S = 3600.0


def _sizes(text: str) -> list[int]:
    try:
        sizes = [int(s) for s in text.replace(" ", "").split(",") if s]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--sizes wants comma-separated integers, got {text!r}") from None
    if not sizes or min(sizes) < 1:
        raise argparse.ArgumentTypeError(f"--sizes wants positive integers, got {text!r}")
    return sizes


def build_parser() -> argparse.ArgumentParser:
    """The command-line interface (see the docstring of :mod:`xloss.bench`)."""
    p = argparse.ArgumentParser(
        prog="python -m xloss.bench",
        description="xloss against naive PyTorch: forward+backward time and peak memory, table + CSV + PNG.",
    )
    p.add_argument("--family", default="all", choices=["all", *FAMILIES], help="loss family (default: all)")
    p.add_argument("--preset", choices=sorted(PRESETS), default=None,
                   help="shapes/dtype/baselines: default, acceptance-cpu, gpu, quick (default: default)")
    p.add_argument("--quick", action="store_true", help="tiny sizes for smoke tests (same as --preset quick)")
    p.add_argument("--sizes", type=_sizes, default=None, help="N=M list, e.g. 1024,2048,4096 (overrides preset)")
    p.add_argument("--dim", type=int, default=None, help="feature dimension D (overrides preset)")
    p.add_argument("--dtype", choices=["float32", "float16", "bfloat16", "float64"], default=None,
                   help="input dtype (default: the preset's)")
    p.add_argument("--runs", type=int, default=None, help="timed runs after one warm-up (default: 3)")
    p.add_argument("--rounds", type=int, default=None,
                   help="measure xloss and the baselines in turn this many times, runs pooled (default: the "
                        "preset's, 1 for most)")
    p.add_argument("--device", choices=["cpu", "cuda"], default=None,
                   help="default: the preset's device, else cuda when available, else cpu")
    p.add_argument("--baselines", default=None,
                   help="comma-separated baselines to compare with (default: the preset's, e.g. naive)")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results"), help="output directory")
    p.add_argument("--no-plot", action="store_true", help="write no PNG")
    p.add_argument("--mem-limit-gib", type=float, default=None,
                   help="treat at most this much memory as available when deciding to skip naive runs")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads in each worker (default: torch's choice; recorded in the CSV)")
    p.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT_S, help="seconds per worker (default 3600)")
    p.add_argument("--worker", metavar="SPEC", help=argparse.SUPPRESS)  # internal: one measurement
    p.add_argument("--probe", metavar="DEVICE", help=argparse.SUPPRESS)  # internal: device facts
    return p


def resolve_config(args: argparse.Namespace, parser: argparse.ArgumentParser,
                   family: str | None = None) -> Config:
    """Merge preset and explicit options (explicit wins) into a :class:`Config`."""
    if args.quick and args.preset not in (None, "quick"):
        parser.error("--quick is the preset 'quick'; do not combine it with --preset")
    preset_name = "quick" if args.quick else (args.preset or "default")
    by_device = PRESETS[preset_name]
    device = args.device or (next(iter(by_device)) if len(by_device) == 1 else None)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        parser.error(f"--device cuda (or preset {preset_name!r}) needs CUDA, which is not available here")
    if device not in by_device:
        parser.error(f"preset {preset_name!r} is defined for {', '.join(by_device)} only, not {device}")
    preset = by_device[device]
    shapes = list(preset.shapes)
    if args.sizes or args.dim:
        dim = args.dim or preset.shapes[0][2]
        shapes = [(n, n, dim) for n in args.sizes] if args.sizes else [(n, m, dim) for n, m, _ in shapes]
    runs = preset.runs if args.runs is None else args.runs
    if runs < 1:
        parser.error("--runs must be at least 1")
    rounds = preset.rounds if args.rounds is None else args.rounds
    if rounds < 1:
        parser.error("--rounds must be at least 1")
    baselines = tuple(args.baselines.split(",")) if args.baselines else preset.baselines
    if family or args.family != "all":
        families = [family or args.family]
    else:
        families = [f for f in FAMILIES if preset.families is None or f in preset.families]
    family_shapes = {} if (args.sizes or args.dim) else dict(preset.family_shapes or {})
    for name in families:
        for b in baselines:
            try:
                FAMILIES[name].impl(b)
            except KeyError as exc:
                parser.error(str(exc.args[0]))
    return Config(
        families=families, shapes=shapes, dtype=args.dtype or preset.dtype, device=device, runs=runs,
        baselines=baselines, preset=preset_name, out=args.out, plot=not args.no_plot,
        mem_limit_bytes=None if args.mem_limit_gib is None else int(args.mem_limit_gib * GIB),
        timeout_s=args.timeout, threads=args.threads, family_shapes=family_shapes, min_run_s=preset.min_run_s,
        rounds=rounds,
    )


def _versions() -> dict:
    """torch / triton / xloss versions without importing Triton (metadata only)."""
    from xloss import __version__

    try:
        triton_version = importlib.metadata.version("triton")
    except importlib.metadata.PackageNotFoundError:
        triton_version = ""
    return {"torch_version": torch.__version__, "triton_version": triton_version, "xloss_version": __version__,
            "xloss_commit": _git_commit(), "python_version": platform.python_version()}


def _git_commit() -> str:
    """The short commit of the xloss checkout, or "" when not run from a git checkout."""
    try:
        out = subprocess.run(["git", "-C", str(worker.PACKAGE_ROOT), "rev-parse", "--short", "HEAD"],
                             capture_output=True, text=True, timeout=10, check=False)
        return out.stdout.strip() if out.returncode == 0 else ""
    except (OSError, subprocess.TimeoutExpired):
        return ""


def _probe(device: str, timeout: float | None) -> dict:
    """Device name and free memory: in-process for CPU, in a child for CUDA (keeps the parent CUDA-free)."""
    if device == "cpu":
        return {"device_name": memory.cpu_name(), "free_bytes": memory.cpu_available_bytes()}
    info = worker._run_child(["--probe", device], timeout)
    return info if "device_name" in info else {"device_name": "cuda (unknown)", "free_bytes": None}


def main(argv: Sequence[str] | None = None, *, family: str | None = None) -> int:
    """Run the benchmark; ``family`` fixes the family (for the per-family scripts in benchmarks/).

    Returns:
        0, or 1 when some measurement ended with an error (skips and OOMs are results, not errors).
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.worker:
        return worker._worker_main(args.worker)
    if args.probe:
        return worker._probe_main(args.probe)
    cfg = resolve_config(args, parser, family)
    probe = _probe(cfg.device, cfg.timeout_s)
    context = {"device_name": probe["device_name"], "date": datetime.datetime.now().astimezone().isoformat(
        timespec="seconds"), **_versions()}
    cfg.out.mkdir(parents=True, exist_ok=True)
    print(f"xloss {context['xloss_version']} ({context['xloss_commit'] or 'no git'}), torch "
          f"{context['torch_version']}, triton {context['triton_version'] or '-'} | {cfg.device}: "
          f"{context['device_name']} | {cfg.dtype}, {cfg.runs} timed runs after 1 warm-up"
          f"{f' x {cfg.rounds} alternating rounds' if cfg.rounds > 1 else ''}, preset {cfg.preset}")
    all_rows = []
    for name in cfg.families:
        rows = run_family(FAMILIES[name], cfg, context, probe.get("free_bytes"))
        all_rows += rows
        print(format_table(rows))
        stem = output_stem(name, cfg)
        write_csv(rows, cfg.out / f"{stem}.csv")
        written = [f"{stem}.csv"]
        if cfg.plot:
            title = f"{name}: xloss vs {', '.join(cfg.baselines)} | {context['device_name']} | {cfg.dtype}"
            if write_plot(rows, cfg.out / f"{stem}.png", title):
                written.append(f"{stem}.png")
            else:
                print("note: matplotlib is not installed; no plot written")
        print(f"wrote {', '.join(str(cfg.out / w) for w in written)}")
    errors = [r for r in all_rows if "error" in r["xloss_status"] or "error" in r["baseline_status"]]
    return 1 if errors else 0
