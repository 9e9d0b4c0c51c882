"""The one place that picks an implementation.

``backend="auto"`` chooses Triton for CUDA tensors when Triton is installed, and the chunked PyTorch path
("cpu") otherwise.  The environment variable ``XLOSS_BACKEND`` overrides "auto".  An explicit choice that
cannot run here raises a RuntimeError that says why; an unknown name raises ValueError.

Under ``TRITON_INTERPRET=1`` the Triton kernels run on CPU tensors (slowly): that is how they are tested on
machines without a GPU.
"""

from __future__ import annotations

import functools
import importlib.util
import os

import torch

BACKENDS = ("auto", "triton", "cuda", "cpu", "reference")


@functools.cache
def triton_available() -> bool:
    """True when Triton can be imported (it need not have a GPU to import)."""
    if importlib.util.find_spec("triton") is None:
        return False
    try:
        import triton
        import triton.language  # noqa: F401
    except Exception:  # noqa: BLE001 (a broken Triton install, whatever it raises, must not break xloss)
        return False
    return True


def triton_interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def available_backends() -> dict:
    """What this machine can run, for users and the benchmark header."""
    return {
        "cpu": True,
        "reference": True,
        "triton": triton_available() and (torch.cuda.is_available() or triton_interpret()),
        "cuda": compiled_cuda_available(),
    }


def compiled_cuda_available() -> bool:
    """True when the compiled ops (xloss/csrc) are loaded with CUDA kernels.  Without CUDA this answers False
    at once; with CUDA it loads (on first call, building if needed) the compiled ops, never at import."""
    if not torch.cuda.is_available():
        return False
    from . import _ext

    if not _ext.load():
        return False
    names = [n for n in torch._C._dispatch_get_all_op_names() if n.startswith("xloss::")]
    return any(torch._C._dispatch_has_kernel_for_dispatch_key(n, "CUDA") for n in names)


def resolve(backend: str, device: torch.device, family: str = "info_nce", has_triton: bool = True) -> str:
    """Turn a user's backend choice into the implementation to run for tensors on `device`.

    ``has_triton=False`` is for a family without Triton kernels yet: "auto" then runs its chunked PyTorch path
    (which works on any device) and an explicit "triton" is refused rather than silently replaced.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        env = os.environ.get("XLOSS_BACKEND", "").strip()
        if env and env != "auto":
            if env not in BACKENDS:
                raise ValueError(f"XLOSS_BACKEND must be one of {BACKENDS}, got {env!r}")
            return resolve(env, device, family, has_triton)
        if device.type == "cuda" and triton_available() and has_triton:
            return "triton"
        return "cpu"
    if backend == "triton":
        if not has_triton:
            raise RuntimeError(f"{family} has no Triton kernels yet; use backend='auto' or 'cpu' (chunked PyTorch, any device)")
        if not triton_available():
            raise RuntimeError("backend='triton' was requested but Triton is not installed (pip install triton)")
        if device.type != "cuda" and not triton_interpret():
            raise RuntimeError(
                f"backend='triton' needs CUDA tensors (got {device}); set TRITON_INTERPRET=1 to run the "
                "kernels on the CPU through Triton's interpreter (slow, for testing)"
            )
        return "triton"
    if backend == "cuda":
        raise RuntimeError(f"backend='cuda' (compiled CUDA ops) is not available for {family}; use 'triton' or 'auto'")
    return backend
