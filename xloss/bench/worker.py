"""Measuring one (implementation, case) in a fresh worker process, and launching such processes.

One worker process per (implementation, case) (``python -m xloss.bench --worker SPEC``, answering one JSON
line), so that memory freed by one implementation does not lower the next one's peak, and so that a worker
killed by the OOM killer is reported instead of ending the benchmark.  In the worker (:func:`measure`): a tiny
priming run (code pages, thread pools), the inputs, one warm-up run that also measures the peak memory
(:class:`~xloss.bench.memory.PeakMemory`), then ``runs`` timed runs (median reported, all times kept).

The parent side is :func:`_run_child`; ``--probe`` (:func:`_probe_main`) asks a child for the device's name
and free memory so that the parent never initialises CUDA.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from . import cases, memory  # noqa: F401  (cases: registers the built-in families in FAMILIES)
from .registry import FAMILIES, Family, Impl, Shape

RESULT_TAG = "XLOSS_BENCH_RESULT "  # marks the worker's answer among anything else printed on stdout
# The module a worker runs as: xloss/bench/__main__.py, whose main() answers --worker and --probe.
CHILD_MODULE = "xloss.bench"
# The directory holding the xloss package (a checkout's root, or site-packages): xloss/bench/worker.py is 3 deep.
PACKAGE_ROOT = Path(__file__).resolve().parents[2]


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _is_oom(exc: BaseException) -> bool:
    oom_types = tuple(t for t in (getattr(torch, "OutOfMemoryError", None), torch.cuda.OutOfMemoryError) if t)
    if isinstance(exc, (MemoryError, *oom_types)):
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text)


@contextlib.contextmanager
def _env(name: str, value: str):
    """``os.environ[name] = value`` inside the block, restored after."""
    old = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = old


def _clear_grads(inputs: dict) -> None:
    # Each run starts without gradients, so runs allocate (and are measured) alike instead of accumulating.
    for t in inputs.values():
        if isinstance(t, torch.Tensor):
            t.grad = None


@contextlib.contextmanager
def _engines_used():
    """Record the engines ``xloss._dispatch.resolve`` returns while the block runs."""
    from xloss import _dispatch

    used, original = [], _dispatch.resolve

    def recording(*args, **kwargs):
        used.append(original(*args, **kwargs))
        return used[-1]

    _dispatch.resolve = recording
    try:
        yield used
    finally:
        _dispatch.resolve = original


def _grad_bytes(inputs: dict) -> int:
    """Bytes of the gradients of the inputs that require grad: what every implementation of the step must
    write (part of each peak), so that the peaks can also be compared beyond them."""
    return sum(t.numel() * t.element_size() for t in inputs.values()
               if isinstance(t, torch.Tensor) and t.requires_grad)


def measure(family: Family, impl: Impl, shape: Shape, dtype: torch.dtype, device: torch.device,
            runs: int, min_run_s: float = 0.0) -> dict:
    """Prime, build inputs, warm up (measuring peak memory) and time ``runs`` runs of one implementation.

    With ``min_run_s`` > 0 each timed run repeats the step ``calls`` times (from one calibrating step: enough
    to last ``min_run_s``) and its time is the mean per step.

    Returns:
        ``{"status", "times_s", "median_s", "peak_bytes", "grad_bytes", "backend", "threads"}``; status "ok",
        "oom" or
        "error: ...".
    """
    result = {"backend": None, "threads": torch.get_num_threads(), "times_s": [], "median_s": None,
              "peak_bytes": None}
    try:
        result["backend"] = impl.backend(device)
        # A tiny run first loads code and starts thread pools, so that the peak below is the case's own.
        tiny = family.make_inputs(tuple(min(x, 64) for x in shape), dtype, device)
        impl.run(tiny)
        if impl.name == "xloss":  # a tiny case runs "dense": prime the streaming engine (and compiled ops) too
            with _env("XLOSS_BACKEND", "chunked"):
                impl.run(tiny)
        del tiny
        inputs = family.make_inputs(shape, dtype, device)
        result["grad_bytes"] = _grad_bytes(inputs)
        with memory.PeakMemory(device) as peak, _engines_used() as used:
            impl.run(inputs)
        result["peak_bytes"] = peak.peak_bytes
        if used and impl.name == "xloss":  # the engine "auto" picked for this shape (it depends on the size)
            result["backend"] = "+".join(dict.fromkeys(used))
        calls = 1
        if min_run_s > 0:
            _clear_grads(inputs)
            _synchronize(device)
            start = time.perf_counter()
            impl.run(inputs)
            _synchronize(device)
            calls = max(1, math.ceil(min_run_s / max(time.perf_counter() - start, 1e-7)))
        result["calls_per_run"] = calls
        for _ in range(runs):
            _synchronize(device)
            start = time.perf_counter()
            for _ in range(calls):
                _clear_grads(inputs)
                impl.run(inputs)
            _synchronize(device)
            result["times_s"].append((time.perf_counter() - start) / calls)
        result["median_s"] = statistics.median(result["times_s"])
        result["status"] = "ok"
    except Exception as exc:  # noqa: BLE001  reported in the table: one failing case must not end the run
        if _is_oom(exc):
            result["status"] = f"oom ({type(exc).__name__})"
        else:
            result["status"] = f"error: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    return result


def _worker_main(spec_json: str) -> int:
    """Entry of ``--worker``: run :func:`measure` on a JSON spec and print the tagged JSON answer."""
    spec = json.loads(spec_json)
    if spec.get("threads"):
        torch.set_num_threads(int(spec["threads"]))
    family = FAMILIES[spec["family"]]
    result = measure(
        family, family.impl(spec["impl"]), tuple(spec["shape"]), getattr(torch, spec["dtype"]),
        torch.device(spec["device"]), int(spec["runs"]), float(spec.get("min_run_s", 0.0)),
    )
    print(RESULT_TAG + json.dumps(result), flush=True)
    return 0


def _probe_main(device: str) -> int:
    """Entry of ``--probe``: device name and free memory, asked in a child so the parent never holds CUDA."""
    dev = torch.device(device)
    info = {"device_name": memory.cpu_name(), "free_bytes": memory.cpu_available_bytes()}
    if dev.type == "cuda":
        free, _total = torch.cuda.mem_get_info(dev)
        info = {"device_name": torch.cuda.get_device_name(dev), "free_bytes": free}
    print(RESULT_TAG + json.dumps(info), flush=True)
    return 0


def _run_child(args: list[str], timeout: float | None) -> dict:
    """Run ``python -m xloss.bench ARGS`` and return its tagged JSON answer, or a status saying why not."""
    env = dict(os.environ)
    # The child must import this same xloss, installed or not.
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(PACKAGE_ROOT), env.get("PYTHONPATH")) if p)
    try:
        proc = subprocess.run([sys.executable, "-m", CHILD_MODULE, *args], capture_output=True, text=True,
                              timeout=timeout, env=env, check=False)
    except subprocess.TimeoutExpired:
        return {"status": f"timeout (> {timeout:.0f} s)"}
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(RESULT_TAG):
            return json.loads(line[len(RESULT_TAG):])
    if proc.returncode == -signal.SIGKILL:
        return {"status": "oom (worker killed by SIGKILL)"}
    last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
    return {"status": f"error: worker exited with code {proc.returncode}: {last}"}
