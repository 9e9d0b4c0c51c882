"""The parent side of a run: :class:`Config`, whether a case may be launched, and one worker per case.

A naive run whose estimated peak exceeds 85 % of the available memory (``MemAvailable``, or free CUDA memory;
``--mem-limit-gib`` lowers it) is not launched and is reported as ``skipped: needs ~X GiB, Y GiB available``;
a worker that runs out of memory anyway is reported as ``oom``.
"""

from __future__ import annotations

import json
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


def run_family(family: Family, cfg: Config, context: dict, probed_free: int | None) -> list[dict]:
    """Measure every shape of one family: xloss once per shape, then each baseline; one row per baseline."""
    rows = []
    shapes = cfg.family_shapes.get(family.name, cfg.shapes)
    bar = _progress([(family.name, s) for s in shapes], desc=f"{family.name} on {cfg.device}")
    for _, shape in bar:
        if hasattr(bar, "set_postfix_str"):
            bar.set_postfix_str(f"N={shape[0]} M={shape[1]} D={shape[2]}")
        xl = run_impl(family, family.xloss, shape, cfg, probed_free)
        for baseline in cfg.baselines:
            base = run_impl(family, family.impl(baseline), shape, cfg, probed_free)
            rows.append(make_row(family, shape, baseline, xl, base, cfg, context))
    return rows
