"""What the benchmark can run: :class:`Impl`, :class:`Family`, the family table and :func:`register`.

The built-in families live in :mod:`xloss.bench.cases` (one module each) and register themselves on import;
new ones plug in through ``register(Family(...))``.  Also here: the small helpers the families share to
describe an implementation (:func:`xloss_backend`, :func:`missing`).
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

Shape = tuple[int, int, int]  # (N, M, D)


@dataclass(frozen=True)
class Impl:
    """One implementation of a family, run as forward + backward on the family's inputs.

    Attributes:
        name: short name used on the command line and in the CSV ("xloss", "naive", "inf_cl").
        label: what it calls, for the table and the CSV ("xloss.info_nce").
        run: ``run(inputs)`` computes the loss and calls ``.backward()``.
        backend: ``backend(device)`` names the code path that runs ("cpu", "triton", "reference", ...).
        estimate_peak_bytes: ``f(shape, dtype, device)``, the expected peak memory of one run, or None when
            the implementation is small enough never to need the check.
        unavailable: ``f()`` returns why the implementation cannot run here (e.g. a package is missing), or
            None when it can.
    """

    name: str
    label: str
    run: Callable[[dict], None]
    backend: Callable[[torch.device], str]
    estimate_peak_bytes: Callable[[Shape, torch.dtype, torch.device], int] | None = None
    unavailable: Callable[[], str | None] = lambda: None


@dataclass(frozen=True)
class Family:
    """A loss family: how to build inputs for a shape, and the implementations to compare.

    Attributes:
        name: the family's name ("info_nce").
        make_inputs: ``f(shape, dtype, device)`` returns a dict of tensors (leaves requiring grad included).
        xloss: the implementation under test.
        naive: the naive PyTorch reference it is compared with.
        extras: further baselines, run only when a preset or ``--baselines`` asks for them.
        flops: ``f(shape)``, the FLOPs of one xloss forward+backward, for the TFLOP/s column (or None).
    """

    name: str
    make_inputs: Callable[[Shape, torch.dtype, torch.device], dict]
    xloss: Impl
    naive: Impl
    extras: dict[str, Impl] = field(default_factory=dict)
    flops: Callable[[Shape], float] | None = None

    def impl(self, name: str) -> Impl:
        """The implementation called ``name``."""
        impls = {"xloss": self.xloss, "naive": self.naive, **self.extras}
        if name not in impls:
            raise KeyError(f"family {self.name!r} has no implementation {name!r}; it has {sorted(impls)}")
        return impls[name]


# In registration order, which is the order of "--family all" and of --family's choices.
FAMILIES: dict[str, Family] = {}


def register(family: Family) -> Family:
    """Add a family to the benchmark (later registrations of the same name replace earlier ones)."""
    FAMILIES[family.name] = family
    return family


def xloss_backend(family: str) -> Callable[[torch.device], str]:
    """``Impl.backend`` of an xloss implementation: the path ``backend="auto"`` picks for ``family``."""

    def backend(device: torch.device) -> str:
        from xloss import _dispatch

        return _dispatch.resolve(family, "auto", device)

    return backend


def missing(module: str) -> Callable[[], str | None]:
    """``Impl.unavailable`` of a baseline that needs the package ``module``."""

    def unavailable() -> str | None:
        return None if importlib.util.find_spec(module) is not None else f"{module} is not installed"

    return unavailable
