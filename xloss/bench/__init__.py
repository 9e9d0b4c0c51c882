"""``python -m xloss.bench``: xloss against naive PyTorch, forward+backward time and peak memory.

For every case (a loss family at one shape ``(N, M, D)``) the command measures each implementation in a
fresh worker process, prints an aligned table (times, peak memories and the xloss/naive ratios), and writes a
CSV and a PNG plot to ``--out`` (default ``benchmarks/results/``)::

    python -m xloss.bench                              # preset "default" on CUDA if available, else CPU
    python -m xloss.bench --preset acceptance-cpu      # N=M=16384 D=512 and N=M=65536 D=256, fp32, CPU
    python -m xloss.bench --preset gpu                 # N=M=65536 D=768 bf16, also against inf_cl
    python -m xloss.bench --sizes 1024,2048 --dim 256 --runs 5
    python -m xloss.bench --quick --no-plot            # CI smoke test

How it measures:

* One worker process per (implementation, case) (``python -m xloss.bench --worker SPEC``, answering one JSON
  line), so that memory freed by one implementation does not lower the next one's peak, and so that a worker
  killed by the OOM killer is reported instead of ending the benchmark.
* In the worker: a tiny priming run (code pages, thread pools), the inputs, one warm-up run that also
  measures the peak memory, then ``runs`` timed runs (median reported, all times kept in the CSV).
* Peak memory is what the run adds on top of its inputs.  CUDA: ``max_memory_allocated`` after
  ``reset_peak_memory_stats``, minus what was allocated before.  CPU: growth of the resident set, i.e.
  ``VmHWM`` after the run minus ``VmRSS`` before it, with the high-water mark reset through
  ``/proc/self/clear_refs`` first.  The CSV also gives ``input_grad_bytes`` (the gradients of the inputs,
  which every implementation writes and both peaks include) and ``workspace_ratio``, the peaks compared beyond
  them: what the loss itself holds.
* A naive run whose estimated peak exceeds 85 % of the available memory (``MemAvailable``, or free CUDA
  memory; ``--mem-limit-gib`` lowers it) is not launched and is reported as ``skipped: needs ~X GiB, Y GiB
  available``; a worker that runs out of memory anyway is reported as ``oom``.

New loss families plug in through ``register(Family(...))``: a function building inputs for a shape, the
xloss and naive implementations (each running forward+backward), optional extra baselines and an estimate of
the naive peak memory.  Only torch is needed to import this package; tqdm and matplotlib are optional.

Layout:

* ``registry.py``: :class:`Impl`, :class:`Family`, :func:`register` and the family table ``FAMILIES``.
* ``cases/``: the built-in families, one module each (inputs, the xloss/naive/extra runners, the naive peak
  estimate, FLOPs); importing ``cases`` registers them.
* ``presets.py``: :class:`Preset` and ``PRESETS``.
* ``memory.py``: free memory, the CPU's name, :class:`PeakMemory`.
* ``worker.py``: :func:`measure` in the worker process, the ``--worker``/``--probe`` entries, and
  ``_run_child``, which launches them.
* ``runner.py``: the parent side: :class:`Config`, the skip decision, one worker per case, rows per family.
* ``report.py``: CSV columns and rows, the printed table, the CSV and the plot.
* ``cli.py``: the options, preset merging and :func:`main`; ``__main__.py`` runs it.

The names below are re-exported for scripts and tests.  To replace a function in a test, patch it in the
module that defines it (``xloss.bench.memory.cpu_available_bytes``, ``xloss.bench.worker._run_child``): the
other modules call it through that module, not through this package.
"""

from __future__ import annotations

from .cases.info_nce import CLIP_MAX_SCALE
from .cli import DEFAULT_TIMEOUT_S, build_parser, main, resolve_config
from .memory import PeakMemory, cpu_available_bytes, cpu_name
from .presets import PRESETS, Preset
from .registry import FAMILIES, Family, Impl, Shape, register
from .report import (
    CSV_COLUMNS,
    GIB,
    MIB,
    fmt_bytes,
    fmt_time,
    format_table,
    make_row,
    output_stem,
    write_csv,
    write_plot,
)
from .runner import MEM_FRACTION, Config, available_bytes, run_family, run_impl
from .worker import RESULT_TAG, measure

__all__ = [
    "CLIP_MAX_SCALE", "CSV_COLUMNS", "DEFAULT_TIMEOUT_S", "FAMILIES", "GIB", "MEM_FRACTION", "MIB", "PRESETS",
    "RESULT_TAG", "Config", "Family", "Impl", "PeakMemory", "Preset", "Shape", "available_bytes", "build_parser",
    "cpu_available_bytes", "cpu_name", "fmt_bytes", "fmt_time", "format_table", "main", "make_row", "measure",
    "output_stem", "register", "resolve_config", "run_family", "run_impl", "write_csv", "write_plot",
]
