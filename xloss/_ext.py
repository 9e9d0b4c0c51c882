"""Builds (on first use) or loads xloss's compiled ops, and never fails at import.

The sources live in ``xloss/csrc`` (installed with the package, so that a plain ``pip install xloss`` can build
them later): ``ops.cpp`` declares every schema once with ``TORCH_LIBRARY(xloss, m)``, ``cpu/*.cpp`` and
``cuda/*.cu`` register the implementations.  ``load()`` makes ``torch.ops.xloss.*`` available by, in order:

1. importing ``xloss._C``, the module that ``setup.py`` builds ahead of time when ``XLOSS_BUILD_EXT=1``;
2. compiling the sources with ``torch.utils.cpp_extension.load`` (ninja; cached by torch under
   ``~/.cache/torch_extensions`` or ``$TORCH_EXTENSIONS_DIR``; CUDA sources only when torch has CUDA and nvcc is
   found);
3. otherwise warning once and returning False: callers then use their Python paths.

CUDA sources include ``c10/cuda/CUDAStream.h`` / ``CUDAGuard.h`` rather than ``ATen/cuda/CUDAContext.h``: the
latter pulls in cuBLAS and cuSPARSE headers, which the CUDA toolkit of the CI machines (where
``tools/check_cuda_compiles.py`` compiles every ``.cu`` file) does not have.

Environment: ``XLOSS_NO_EXT=1`` disables the compiled ops (the Python paths run, no warning);
``XLOSS_EXT_SANITIZE=address`` builds a separate AddressSanitizer copy (run Python with libasan preloaded, see
``tools/asan_check.sh``); ``XLOSS_EXT_VERBOSE=1`` shows the compiler output.
"""

from __future__ import annotations

import functools
import glob
import importlib
import os
import shutil
import warnings

import torch

CSRC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "csrc")


def cpu_sources() -> list[str]:
    """ops.cpp (the schemas) and every CPU implementation."""
    return [os.path.join(CSRC, "ops.cpp"), *sorted(glob.glob(os.path.join(CSRC, "cpu", "*.cpp")))]


def cuda_sources() -> list[str]:
    return sorted(glob.glob(os.path.join(CSRC, "cuda", "*.cu")))


def cxx_flags(sanitize: str = "") -> list[str]:
    """Flags of the CPU sources.  The JIT build targets this machine's CPU (-march=native); the ahead-of-time
    build in setup.py does not, so a wheel runs anywhere."""
    flags = ["-O3", "-fopenmp"]
    if sanitize:
        flags = ["-O1", "-g", "-fno-omit-frame-pointer", f"-fsanitize={sanitize}", "-fopenmp"]
    else:
        flags.append("-march=native")
    return flags


def _cuda_buildable() -> bool:
    if not torch.cuda.is_available() or torch.version.cuda is None:
        return False
    from torch.utils import cpp_extension

    return cpp_extension.CUDA_HOME is not None and bool(cuda_sources())


def disabled() -> bool:
    return os.environ.get("XLOSS_NO_EXT", "0") not in ("", "0")


_STATE = {"error": None}


@functools.cache
def load() -> bool:
    """Make the compiled ops available; True on success.  Cached: the build runs at most once per process."""
    if disabled():
        _STATE["error"] = "disabled by XLOSS_NO_EXT"
        return False
    sanitize = os.environ.get("XLOSS_EXT_SANITIZE", "")
    if not sanitize:
        try:
            importlib.import_module("xloss._C")  # built ahead of time by setup.py
            return True
        except ImportError:
            pass
    try:
        _jit_build(sanitize)
        return True
    except Exception as exc:  # noqa: BLE001 (no compiler, a failed build: whatever it is, fall back)
        _STATE["error"] = f"{type(exc).__name__}: {exc}".strip()
        warnings.warn(
            "xloss: the compiled ops could not be built, so the slower Python paths are used "
            f"({_STATE['error'][:500]}). Install a C++ compiler and ninja, or set XLOSS_NO_EXT=1 to silence this.",
            RuntimeWarning,
            stacklevel=2,
        )
        return False


def _jit_build(sanitize: str) -> None:
    from torch.utils import cpp_extension

    if shutil.which(os.environ.get("CXX", "c++")) is None:
        raise RuntimeError("no C++ compiler found (set CXX or install g++)")
    sources = cpu_sources()
    cuda = not sanitize and _cuda_buildable()
    if cuda:
        sources += cuda_sources()
    ldflags = ["-fopenmp"] + ([f"-fsanitize={sanitize}"] if sanitize else [])
    name = "xloss_ops" + ("_cuda" if cuda else "") + (f"_{sanitize}" if sanitize else "")
    cpp_extension.load(
        name=name,
        sources=sources,
        extra_cflags=cxx_flags(sanitize) + (["-DXLOSS_WITH_CUDA"] if cuda else []),
        extra_cuda_cflags=["-O3"],
        extra_ldflags=ldflags,
        is_python_module=False,  # a plain shared library: loading it runs the TORCH_LIBRARY registrations
        verbose=os.environ.get("XLOSS_EXT_VERBOSE", "0") not in ("", "0"),
    )


def available() -> bool:
    """True when the compiled ops are loaded (building them on first call)."""
    return load()


def error() -> str | None:
    """Why the compiled ops are not available (None when they are, or before the first ``load()``)."""
    return _STATE["error"]


_FAKES_REGISTERED: set[str] = set()


def has_op(name: str, fake=None) -> bool:
    """True when ``torch.ops.xloss.<name>`` exists (after a successful ``load()``).

    ``fake``: the op's fake (meta) kernel, registered once, here, because ``torch.library.register_fake`` needs
    the schema and so cannot run before the library is loaded (not at import time).
    """
    if not (load() and hasattr(torch.ops.xloss, name)):
        return False
    if fake is not None and name not in _FAKES_REGISTERED:
        try:
            torch.library.register_fake(f"xloss::{name}")(fake)
        except RuntimeError as exc:  # registered already by an earlier import of the caller (a reload)
            if "already" not in str(exc):
                raise
        _FAKES_REGISTERED.add(name)
    return True
