"""The parent side of a run: :class:`Config`, whether a case may be launched, and one worker per case.

A naive run whose estimated peak exceeds 85 % of the available memory (``MemAvailable``, or free CUDA memory;
``--mem-limit-gib`` lowers it) is not launched and is reported as ``skipped: needs ~X GiB, Y GiB available``;
a worker that runs out of memory anyway is reported as ``oom``.
"""

from __future__ import annotations

import json
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import memory, worker
from .registry import Family, Impl, Shape
from .report import GIB, make_row

MEM_FRACTION = 0.85  # launch a naive run only when its estimated peak fits in this share of free memory


@dataclass
class Config:
    """Everything one invocation measures."""

    families: list[str]
    shapes: list[Shape]
    dtype: str
    device: str
    runs: int
    baselines: tuple[str, ...]
    preset: str
    out: Path
    plot: bool
    mem_limit_bytes: int | None
    timeout_s: float | None
    threads: int | None = None
    min_run_s: float = 0.0
    rounds: int = 1
    family_shapes: dict[str, list[Shape]] = field(default_factory=dict)


def available_bytes(device: str, probed_free: int | None, limit: int | None) -> int:
    """Memory a naive run may use: MemAvailable now (CPU) or the probed free CUDA memory, capped by limit."""
    free = memory.cpu_available_bytes() if device == "cpu" else probed_free
    if free is None:
        free = limit if limit is not None else sys.maxsize
    return min(free, limit) if limit is not None else free


def _fmt_gib(nbytes: float) -> str:
    return f"{nbytes / GIB:.1f}"


def run_impl(family: Family, impl: Impl, shape: Shape, cfg: Config, probed_free: int | None) -> dict:
    """Measure one implementation on one shape in a worker, unless it is unavailable or cannot fit."""
    reason = impl.unavailable()
    if reason:
        return {"status": f"unavailable: {reason}"}
    estimate = None
    if impl.estimate_peak_bytes is not None:
        estimate = impl.estimate_peak_bytes(shape, getattr(torch, cfg.dtype), torch.device(cfg.device))
        free = available_bytes(cfg.device, probed_free, cfg.mem_limit_bytes)
        if estimate > MEM_FRACTION * free:
            return {"status": f"skipped: needs ~{_fmt_gib(estimate)} GiB, {_fmt_gib(free)} GiB available",
                    "estimate_bytes": estimate}
    spec = {"family": family.name, "impl": impl.name, "shape": list(shape), "dtype": cfg.dtype,
            "device": cfg.device, "runs": cfg.runs, "threads": cfg.threads, "min_run_s": cfg.min_run_s}
    result = worker._run_child(["--worker", json.dumps(spec)], cfg.timeout_s)
    result["estimate_bytes"] = estimate
    return result


def _progress(items: list, desc: str):
    """tqdm over items when installed, else a plain line per item on stderr."""
    try:
        from tqdm import tqdm
    except ImportError:
        def plain():
            for i, item in enumerate(items, 1):
                print(f"[{i}/{len(items)}] {desc}: {item[0]} N={item[1][0]} M={item[1][1]} D={item[1][2]}",
                      file=sys.stderr, flush=True)
                yield item
        return plain()
    return tqdm(items, desc=desc, unit="case", file=sys.stderr)


def merge_rounds(results: list[dict]) -> dict:
    """One implementation's results of several rounds as one: the timed runs pooled (median over all), the
    largest peak; the first failure's result if a round did not run."""
    bad = [r for r in results if r.get("status") != "ok"]
    if bad or len(results) == 1:
        return bad[0] if bad else results[0]
    merged = dict(results[0])
    merged["times_s"] = [t for r in results for t in r["times_s"]]
    merged["median_s"] = statistics.median(merged["times_s"])
    peaks = [r["peak_bytes"] for r in results if r.get("peak_bytes") is not None]
    merged["peak_bytes"] = max(peaks) if peaks else None
    return merged


def run_family(family: Family, cfg: Config, context: dict, probed_free: int | None) -> list[dict]:
    """Measure every shape of one family: xloss, then each baseline, ``cfg.rounds`` times in turn (each in a
    fresh worker); one row per baseline."""
    rows = []
    shapes = cfg.family_shapes.get(family.name, cfg.shapes)
    bar = _progress([(family.name, s) for s in shapes], desc=f"{family.name} on {cfg.device}")
    for _, shape in bar:
        if hasattr(bar, "set_postfix_str"):
            bar.set_postfix_str(f"N={shape[0]} M={shape[1]} D={shape[2]}")
        impls = [family.xloss, *(family.impl(b) for b in cfg.baselines)]
        results: list[list[dict]] = [[] for _ in impls]
        for _ in range(max(1, cfg.rounds)):
            for impl, got in zip(impls, results):
                got.append(run_impl(family, impl, shape, cfg, probed_free))
        xl = merge_rounds(results[0])
        for baseline, got in zip(cfg.baselines, results[1:]):
            rows.append(make_row(family, shape, baseline, xl, merge_rounds(got), cfg, context))
    return rows
