"""The one dispatch table: (family, device, dtype, what is installed) → the engine that runs.

Every public loss asks :func:`resolve` which engine to run and :func:`engine` for its module; nothing else in
the package picks an implementation.

Engines, by what they run (the names users pass as ``backend=``):

* ``"triton"``   fused Triton kernels (CUDA tensors; CPU tensors only under ``TRITON_INTERPRET=1``, for tests);
* ``"chunked"``  tiled PyTorch (row strips or blocks of the logits, never the whole matrix): runs on any
  device, CUDA included, and is the fallback wherever Triton is missing or does not take the dtype;
* ``"compiled"`` the C++/CUDA ops of ``xloss/csrc`` (Banzhaf only, and the MaxSim micro-kernel that the
  chunked late-interaction engine uses on CPU when it is built);
* ``"dense"``     the definition on the whole matrix (``xloss.reference``), computed in the accumulation dtype
  (fp32 for half inputs, as the streaming engines compute): "auto" takes it on one process when the problem is
  small (:data:`DENSE_CELLS`), where a few large tensor ops beat the streaming engines' fixed per-call cost;
* ``"reference"`` the naive definition (``xloss.reference``) in the input dtype, for checking.

Aliases kept from earlier releases: ``"cpu"`` → ``"chunked"`` (it always ran on CUDA too) and ``"cuda"`` →
``"compiled"``.  ``backend="auto"`` takes the first row of the family's table below whose device, dtype,
problem and availability all fit; ``XLOSS_BACKEND`` overrides "auto" as if it had been passed explicitly.
An explicit choice that cannot run here raises a RuntimeError that says why (a dtype the kernels do not take
raises the engine's own TypeError when it runs); an unknown name raises ValueError.

Each family states its engine interface once, as a ``typing.Protocol`` beside its Function
(``xloss/<family>/engine.py``); the modules named in the table implement it.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import os
from collections.abc import Callable
from dataclasses import dataclass

import torch

ENGINES = ("triton", "chunked", "compiled", "dense", "reference")
ALIASES = {"cpu": "chunked", "cuda": "compiled"}
BACKENDS = ("auto", *ENGINES, *ALIASES)  # every string ``backend=`` accepts

_LOW_PRECISION = (torch.float32, torch.float16, torch.bfloat16)
_ANY_FLOAT = (torch.float64, *_LOW_PRECISION)


_TRITON_OK: bool | None = None  # probed once (a plain global, not functools.cache: Dynamo traces this call)


def triton_available() -> bool:
    """True when Triton can be imported (it need not have a GPU to import)."""
    global _TRITON_OK
    if _TRITON_OK is None:
        _TRITON_OK = _probe_triton()
    return _TRITON_OK


def _probe_triton() -> bool:
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


def _compiled_op(name: str) -> Callable[[torch.device], bool]:
    def ok(device: torch.device) -> bool:
        from . import _ext

        if device.type == "cuda" and not compiled_cuda_available():
            return False
        if not _ext.has_op(name):
            return False
        key = "CUDA" if device.type == "cuda" else "CPU"
        return torch._C._dispatch_has_kernel_for_dispatch_key(f"xloss::{name}", key)

    return ok


def _triton_runs(device: torch.device) -> bool:
    return triton_available() and (device.type == "cuda" or triton_interpret())


def _always(device: torch.device) -> bool:
    return True


def _any_problem(**problem) -> bool:
    return True


@dataclass(frozen=True)
class Route:
    """One row of the table: ``engine`` of ``family`` lives in ``module``; "auto" takes it for tensors on a
    device in ``auto_devices`` whose dtype is in ``dtypes`` when ``runs(device)`` and ``fits(**problem)``."""

    family: str
    engine: str
    module: str
    auto_devices: tuple[str, ...]
    dtypes: tuple[torch.dtype, ...]
    runs: Callable[[torch.device], bool]
    fits: Callable[..., bool] = _any_problem
    why_not: str = ""  # what to do when an explicit choice cannot run


def _symile_fits(modalities: int = 3, **_) -> bool:
    return modalities in (3, 4)


# The largest problem (cells of the dense matrix the definition builds: N·M logits; Nq·Nd·Lq·Ld similarities for
# late interaction; N1·N2·k·k Gram entries; N^M Symile logits) that "auto" computes densely, per family.  Below
# it the streaming engines' fixed cost per call (a dozen small ops per sweep, two or more sweeps) exceeds the
# dense ops' work.  Each limit sits at the crossover measured on the CPU (2 cores, fp32, D = 64, forward +
# backward, dense against chunked; `python -m xloss.bench --preset small` and README "Small batches"):
# InfoNCE ~550², sigmoid ~400² (its chunked sweep keeps small logits and fuses more), distillation / CWCL ~800²
# (two matrices per tile), late interaction Nq = Nd ≈ 12 at Lq = 8, Ld = 32 (the compiled MaxSim op wins early),
# GRAM N ≈ 96 at k = 3, Symile N ≈ 10 at M = 3.  The dense matrices are then a few MiB at most, so the memory
# bound of the streaming engines is not given up where it matters.
DENSE_CELLS = {
    "info_nce": 512 * 512,
    "distill": 768 * 768,
    "sigmoid": 384 * 384,
    "late_interaction": 12 * 12 * 8 * 32,
    "gram": 96 * 96 * 3 * 3,
    "symile": 10**3,
}


def _dense_fits(family: str) -> Callable[..., bool]:
    limit = DENSE_CELLS[family]

    def fits(cells: int | None = None, local: bool = False, **_) -> bool:
        # Only one process: across ranks the streaming engines exchange blocks (the dense path has no ring).
        # Not while torch.compile traces: there the per-call cost is compiled away, and the traced graph keeps
        # the one path of the custom ops (no size guard, no recompilation at the limit).
        # (is_compiling first: comparing a symbolic size would add a guard, and a recompilation, at the limit)
        return not torch.compiler.is_compiling() and local and cells is not None and cells <= limit

    return fits


_TRITON_HOW = ("it needs CUDA tensors; set TRITON_INTERPRET=1 to run the kernels on CPU tensors through Triton's "
               "interpreter (slow, for testing)")

# Order matters: "auto" takes the first route that fits.
TABLE: tuple[Route, ...] = (
    Route("info_nce", "triton", "xloss.infonce.triton", ("cuda",), _LOW_PRECISION, _triton_runs, why_not=_TRITON_HOW),
    Route("info_nce", "dense", "xloss.reference.infonce", ("cpu", "cuda"), _ANY_FLOAT, _always,
          _dense_fits("info_nce")),
    Route("info_nce", "chunked", "xloss.infonce.chunked", ("cpu", "cuda", "meta"), _ANY_FLOAT, _always),
    Route("distill", "triton", "xloss.soft_targets.triton", ("cuda",), _LOW_PRECISION, _triton_runs,
          why_not=_TRITON_HOW),
    Route("distill", "dense", "xloss.reference.soft_targets", ("cpu", "cuda"), _ANY_FLOAT, _always,
          _dense_fits("distill")),
    Route("distill", "chunked", "xloss.soft_targets.chunked", ("cpu", "cuda", "meta"), _ANY_FLOAT, _always),
    Route("sigmoid", "triton", "xloss.sigmoid.triton", ("cuda",), _LOW_PRECISION, _triton_runs, why_not=_TRITON_HOW),
    Route("sigmoid", "dense", "xloss.reference.sigmoid", ("cpu", "cuda"), _ANY_FLOAT, _always,
          _dense_fits("sigmoid")),
    Route("sigmoid", "chunked", "xloss.sigmoid.chunked", ("cpu", "cuda", "meta"), _ANY_FLOAT, _always),
    Route("late_interaction", "triton", "xloss.late_interaction.triton", ("cuda",), _LOW_PRECISION, _triton_runs,
          why_not=_TRITON_HOW),
    Route("late_interaction", "dense", "xloss.reference.late_interaction", ("cpu", "cuda"), _ANY_FLOAT, _always,
          _dense_fits("late_interaction")),
    Route("late_interaction", "chunked", "xloss.late_interaction.chunked", ("cpu", "cuda", "meta"), _ANY_FLOAT,
          _always),
    Route("xtr", "triton", "xloss.xtr.triton", ("cuda",), _LOW_PRECISION, _triton_runs, why_not=_TRITON_HOW),
    Route("xtr", "chunked", "xloss.xtr.chunked", ("cpu", "cuda", "meta"), _ANY_FLOAT, _always),
    Route("gram", "triton", "xloss.gram.triton", ("cuda",), _LOW_PRECISION, _triton_runs, why_not=_TRITON_HOW),
    Route("gram", "dense", "xloss.reference.gram", ("cpu", "cuda"), _ANY_FLOAT, _always,
          _dense_fits("gram")),
    Route("gram", "chunked", "xloss.gram.chunked", ("cpu", "cuda", "meta"), _ANY_FLOAT, _always),
    Route("symile", "triton", "xloss.symile.triton", ("cuda",), _LOW_PRECISION, _triton_runs, _symile_fits,
          why_not=_TRITON_HOW),
    Route("symile", "dense", "xloss.reference.symile", ("cpu", "cuda"), _ANY_FLOAT, _always,
          _dense_fits("symile")),
    Route("symile", "chunked", "xloss.symile.chunked", ("cpu", "cuda", "meta"), _ANY_FLOAT, _always),
    Route("banzhaf", "compiled", "xloss.banzhaf.compiled", ("cpu", "cuda"), _ANY_FLOAT,
          _compiled_op("banzhaf_interaction"),
          why_not="needs the compiled ops of xloss/csrc (built on first use; see xloss._ext.error())"),
    Route("banzhaf", "chunked", "xloss.banzhaf.chunked", ("cpu", "cuda", "meta"), _ANY_FLOAT, _always),
)

FAMILIES = tuple(dict.fromkeys(r.family for r in TABLE))
_ROUTES = {family: tuple(r for r in TABLE if r.family == family) for family in FAMILIES}  # looked up per call


_ENV_KEY = os.environ.encodekey("XLOSS_BACKEND") if hasattr(os.environ, "encodekey") else None


def env_backend() -> str:
    """``XLOSS_BACKEND``, stripped ("" when unset).  Read per call (tests and users change it at run time), from
    ``os.environ``'s own dict where CPython has one: ``os.environ.get`` of an unset variable raises and catches
    a KeyError inside, a few µs per call that small batches notice."""
    data = getattr(os.environ, "_data", None)
    if data is None or _ENV_KEY is None:
        return os.environ.get("XLOSS_BACKEND", "").strip()
    raw = data.get(_ENV_KEY)
    return "" if raw is None else os.environ.decodevalue(raw).strip()


# The routes "auto" may take per (family, device type), in table order: what :func:`resolve` walks per call.
_AUTO_ROUTES = {(family, device): tuple(r for r in rs if device in r.auto_devices)
                for family, rs in _ROUTES.items() for device in ("cpu", "cuda", "meta")}


def canonical(backend: str) -> str:
    """The engine name of a backend string (aliases mapped); ValueError for an unknown one."""
    if not isinstance(backend, str) or backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    return ALIASES.get(backend, backend)


def routes(family: str) -> tuple[Route, ...]:
    return _ROUTES.get(family, ())


def resolve(family: str, backend: str, device: torch.device, dtype: torch.dtype | None = None, **problem) -> str:
    """The engine to run for ``family`` on tensors of ``device``/``dtype``: one of :data:`ENGINES`.

    ``problem`` holds what a route's ``fits`` looks at (e.g. ``modalities=`` for Symile).
    """
    if backend == "auto" and env_backend() in ("", "auto"):
        # The common case, walked without the checks of the general path below (a per-call cost).
        for r in _AUTO_ROUTES.get((family, device.type), ()):
            if (dtype is None or dtype in r.dtypes) and r.fits(**problem) and r.runs(device):
                return r.engine
    name = canonical(backend)
    if family not in FAMILIES:
        raise ValueError(f"unknown loss family {family!r}")
    if name == "auto":
        env = env_backend()
        if env and env != "auto":
            # The environment variable prefers an engine wherever it applies: a family without that engine,
            # or a dtype / problem it does not take, keeps "auto"'s choice; a device it cannot run on raises,
            # as an explicit choice would.
            chosen = canonical(env) if env in BACKENDS else None
            if chosen is None:
                raise ValueError(f"XLOSS_BACKEND must be one of {BACKENDS}, got {env!r}")
            found = [r for r in routes(family) if r.engine == chosen]
            if chosen == "reference" or (found and (dtype is None or dtype in found[0].dtypes)
                                         and found[0].fits(**problem)):
                return resolve(family, env, device, dtype, **problem)
        for r in routes(family):
            if (device.type in r.auto_devices and (dtype is None or dtype in r.dtypes) and r.fits(**problem)
                    and r.runs(device)):
                return r.engine
        raise RuntimeError(f"no engine of {family} runs {dtype} tensors on {device}")  # pragma: no cover
    if name == "reference":
        return name
    found = [r for r in routes(family) if r.engine == name]
    if not found:
        have = ", ".join(repr(r.engine) for r in routes(family))
        raise RuntimeError(f"backend={backend!r} is not available for {family} (it has {have} and 'reference'); "
                           "use backend='auto'")
    r = found[0]
    if r.engine == "triton" and not triton_available():
        raise RuntimeError(f"backend={backend!r} was requested but Triton is not installed (pip install triton)")
    if not r.runs(device):
        raise RuntimeError(f"backend={backend!r} needs CUDA tensors (got {device}) for {family}: {r.why_not}"
                           if r.engine == "triton" and device.type != "cuda" else
                           f"backend={backend!r} for {family} cannot run on {device} tensors here: {r.why_not}")
    return r.engine


def dense_inputs(name: str, *tensors):
    """The float inputs of a call for the reference engines: cast to the accumulation dtype for ``"dense"``
    (fp32 for half inputs, as the streaming engines compute; gradients flow back through the cast), unchanged
    for ``"reference"`` (the definition in the input dtype).  ``None`` passes through."""
    if name != "dense":
        return tensors
    for t in tensors:
        if t is not None and t.dtype not in _WIDE:
            return tuple(t if t is None or t.dtype in _WIDE else t.float() for t in tensors)
    return tensors  # already wide (the common case): no new tuple


_WIDE = (torch.float32, torch.float64)  # dtypes "dense" computes in as given


@functools.cache
def engine(family: str, name: str):
    """The module of ``family``'s engine ``name`` (imported on first use: Triton is optional)."""
    for r in routes(family):
        if r.engine == name:
            return importlib.import_module(r.module)
    raise ValueError(f"{family} has no engine {name!r}")


def available_backends() -> dict:
    """What this machine can run, for users and the benchmark header: engine names (and the old aliases)."""
    from . import _ext

    triton_ok = triton_available() and (torch.cuda.is_available() or triton_interpret())
    cuda_ok = compiled_cuda_available()
    return {
        "chunked": True,
        "dense": True,
        "reference": True,
        "triton": triton_ok,
        "compiled": _ext.available() or cuda_ok,  # loaded already; never builds here
        "cpu": True,  # alias of "chunked"
        "cuda": cuda_ok,  # the compiled ops with CUDA kernels
    }


__all__ = ["ALIASES", "BACKENDS", "ENGINES", "TABLE", "available_backends", "canonical", "dense_inputs", "engine", "resolve",
           "routes", "triton_available", "triton_interpret"]
