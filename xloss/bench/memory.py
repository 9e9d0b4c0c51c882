"""Memory and device facts: free memory, the CPU's name, and :class:`PeakMemory`, what a block adds at peak.

Peak memory is what a run adds on top of its inputs.  CUDA: ``max_memory_allocated`` after
``reset_peak_memory_stats``, minus what was allocated before.  CPU: growth of the resident set, i.e. ``VmHWM``
after the run minus ``VmRSS`` before it, with the high-water mark reset through ``/proc/self/clear_refs``
first.
"""

from __future__ import annotations

import gc
import os
import platform

import torch


def _proc_status_bytes(key: str) -> int:
    """A ``kB`` field of /proc/self/status (VmRSS, VmHWM), in bytes."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(key)


def _reset_rss_peak() -> bool:
    """Reset the kernel's resident-set high-water mark (VmHWM) to the current RSS; False where impossible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def cpu_available_bytes() -> int:
    """MemAvailable from /proc/meminfo (what can be allocated without swapping)."""
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("MemAvailable not found in /proc/meminfo")


def cpu_name() -> str:
    """The CPU model from /proc/cpuinfo, with the core count."""
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{model} ({os.cpu_count()} cores)"


class PeakMemory:
    """Context manager measuring the peak memory a block adds on top of what is held when it starts.

    ``peak_bytes`` is set on exit, or stays None when the platform gives no way to measure it.
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.peak_bytes: int | None = None

    def __enter__(self):
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
        else:
            self._base = _proc_status_bytes("VmRSS")
            self._can_reset = _reset_rss_peak()
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_bytes = torch.cuda.max_memory_allocated(self.device) - self._base
        elif self._can_reset:
            self.peak_bytes = max(0, _proc_status_bytes("VmHWM") - self._base)
        return False
