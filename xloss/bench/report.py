"""Results: the CSV row of a case and its columns, the aligned table printed to stdout, the CSV and the plot.

Outputs go to ``--out`` as ``<stem>.csv`` and ``<stem>.png``, one pair per family (see :func:`output_stem`).
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import TYPE_CHECKING

from .registry import Family, Shape

if TYPE_CHECKING:
    from .runner import Config

MIB = 2**20
GIB = 2**30

CSV_COLUMNS = [
    "family", "xloss_impl", "baseline", "baseline_impl", "n", "m", "d", "dtype", "device", "device_name",
    "backend", "baseline_backend", "threads", "runs", "xloss_time_s", "baseline_time_s", "time_ratio",
    "xloss_peak_bytes", "baseline_peak_bytes", "baseline_peak_estimate_bytes", "mem_ratio", "xloss_tflops",
    "xloss_times_s", "baseline_times_s", "status", "xloss_status", "baseline_status", "torch_version",
    "triton_version", "xloss_version", "xloss_commit", "python_version", "date", "preset",
    "xloss_calls_per_run", "baseline_calls_per_run", "input_grad_bytes", "workspace_ratio", "rounds",
]


def _ratio(a, b) -> float | None:
    return a / b if a is not None and b else None


def _workspace_ratio(xl: dict, base: dict) -> float | None:
    """The peaks compared beyond the inputs' gradients (the same bytes for both, which both must write): what
    the loss itself holds.  None when a peak is missing or the baseline holds nothing beyond them."""
    grad = xl.get("grad_bytes")
    if grad is None or xl.get("peak_bytes") is None or base.get("peak_bytes") is None:
        return None
    return _ratio(max(0, xl["peak_bytes"] - grad), base["peak_bytes"] - grad) if base["peak_bytes"] > grad else None


def make_row(family: Family, shape: Shape, baseline: str, xl: dict, base: dict, cfg: Config,
             context: dict) -> dict:
    """One CSV/table row: xloss against one baseline at one shape."""
    both_ok = xl["status"] == "ok" and base["status"] == "ok"
    bad = [f"{name}: {r['status']}" for name, r in (("xloss", xl), (baseline, base)) if r["status"] != "ok"]
    flops = family.flops(shape) if family.flops and xl.get("median_s") else None
    return {
        "family": family.name, "xloss_impl": family.xloss.label, "baseline": baseline,
        "baseline_impl": family.impl(baseline).label, "n": shape[0], "m": shape[1], "d": shape[2],
        "dtype": cfg.dtype, "device": cfg.device, "backend": xl.get("backend"),
        "baseline_backend": base.get("backend"), "threads": xl.get("threads"), "runs": cfg.runs,
        "xloss_time_s": xl.get("median_s"), "baseline_time_s": base.get("median_s"),
        "time_ratio": _ratio(xl.get("median_s"), base.get("median_s")) if both_ok else None,
        "xloss_peak_bytes": xl.get("peak_bytes"), "baseline_peak_bytes": base.get("peak_bytes"),
        "baseline_peak_estimate_bytes": base.get("estimate_bytes"),
        "mem_ratio": _ratio(xl.get("peak_bytes"), base.get("peak_bytes")) if both_ok else None,
        "xloss_tflops": flops / xl["median_s"] / 1e12 if flops else None,
        "xloss_times_s": " ".join(f"{t:.6g}" for t in xl.get("times_s", [])),
        "baseline_times_s": " ".join(f"{t:.6g}" for t in base.get("times_s", [])),
        "status": "ok" if both_ok else "; ".join(bad),
        "xloss_status": xl["status"], "baseline_status": base["status"], "preset": cfg.preset,
        "xloss_calls_per_run": xl.get("calls_per_run"), "baseline_calls_per_run": base.get("calls_per_run"),
        "input_grad_bytes": xl.get("grad_bytes"), "rounds": cfg.rounds,
        "workspace_ratio": _workspace_ratio(xl, base) if both_ok else None,
        **context,
    }


def output_stem(family: str, cfg: Config) -> str:
    """``info_nce_cpu_float32``, plus ``_<preset>`` for presets other than default."""
    stem = f"{family}_{cfg.device}_{cfg.dtype}"
    return stem if cfg.preset == "default" else f"{stem}_{cfg.preset}"


def fmt_time(seconds: float | None) -> str:
    """``1.23 s`` or ``12.3 ms``; ``-`` when missing."""
    if seconds is None:
        return "-"
    return f"{seconds:.3g} s" if seconds >= 1 else f"{seconds * 1e3:.3g} ms"


def fmt_bytes(nbytes: float | None) -> str:
    """``1.23 GiB`` or ``123 MiB``; ``-`` when missing."""
    if nbytes is None:
        return "-"
    return f"{nbytes / GIB:.3g} GiB" if nbytes >= GIB else f"{nbytes / MIB:.3g} MiB"


def _fmt_ratio(r: float | None) -> str:
    return "-" if r is None else f"{r:.3g}"


def format_table(rows: list[dict]) -> str:
    """The aligned text table printed to stdout."""
    head = ["family", "impls", "N", "M", "D", "dtype", "t xloss", "t base", "mem xloss", "mem base",
            "t x/b", "mem x/b", "TFLOP/s", "status"]
    body = [[
        r["family"], f"xloss vs {r['baseline']}", str(r["n"]), str(r["m"]), str(r["d"]), r["dtype"],
        fmt_time(r["xloss_time_s"]), fmt_time(r["baseline_time_s"]), fmt_bytes(r["xloss_peak_bytes"]),
        fmt_bytes(r["baseline_peak_bytes"]), _fmt_ratio(r["time_ratio"]), _fmt_ratio(r["mem_ratio"]),
        "-" if r["xloss_tflops"] is None else f"{r['xloss_tflops']:.3g}", r["status"],
    ] for r in rows]
    widths = [max(len(line[i]) for line in [head, *body]) for i in range(len(head))]
    numeric = set(range(2, 5)) | set(range(6, 13))  # right-align numbers

    def line(cells):
        return "  ".join(c.rjust(w) if i in numeric else c.ljust(w)
                         for i, (c, w) in enumerate(zip(cells, widths))).rstrip()

    return "\n".join([line(head), line(["-" * w for w in widths]), *map(line, body)])


def write_csv(rows: list[dict], path: Path) -> None:
    """Write rows with :data:`CSV_COLUMNS` (missing values as empty cells)."""
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS)
        writer.writeheader()
        for r in rows:
            writer.writerow({k: "" if r.get(k) is None else r[k] for k in CSV_COLUMNS})


def write_plot(rows: list[dict], path: Path, title: str) -> bool:
    """Time and peak memory against batch size N, xloss and each baseline, log axes; False without matplotlib.

    Skipped naive runs appear as hollow markers at their estimated memory.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(11, 4.2))
    series: dict[str, dict[int, tuple]] = {}  # label -> {N: (time, mem, estimated)}
    dims = sorted({r["d"] for r in rows})
    for r in rows:
        suffix = f" (D={r['d']})" if len(dims) > 1 else ""
        series.setdefault("xloss" + suffix, {})[r["n"]] = (r["xloss_time_s"], r["xloss_peak_bytes"], None)
        series.setdefault(r["baseline"] + suffix, {})[r["n"]] = (
            r["baseline_time_s"], r["baseline_peak_bytes"], r["baseline_peak_estimate_bytes"])
    for label, points in series.items():
        ns = sorted(points)
        times = [(n, points[n][0]) for n in ns if points[n][0] is not None]
        mems = [(n, points[n][1] / MIB) for n in ns if points[n][1]]
        (line,) = ax_t.plot(*zip(*times), marker="o", label=label) if times else ax_t.plot([], [], label=label)
        if mems:
            ax_m.plot(*zip(*mems), marker="o", color=line.get_color(), label=label)
        est = [(n, points[n][2] / MIB) for n in ns if points[n][1] is None and points[n][2]]
        if est:
            ax_m.plot(*zip(*est), linestyle="none", marker="o", mfc="none", color=line.get_color(),
                      label=f"{label}, estimated (not run)")
    for ax, ylabel in ((ax_t, "forward+backward time (s)"), (ax_m, "peak memory (MiB)")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("batch size N (= M)")
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True
