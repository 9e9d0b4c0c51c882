"""Argument checks of ``symile_loss`` that need to know whether torch.compile is tracing (kept out of the public
function, which never forks on it)."""

from __future__ import annotations

import torch


def check_generator(generator) -> None:
    """``generator`` must be a ``torch.Generator`` or None, and None under ``torch.compile``: Dynamo cannot trace
    ``torch.randperm(generator=...)``, so the draws must happen outside the compiled function."""
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
    if generator is not None and torch.compiler.is_compiling():
        raise ValueError("generator is not supported under torch.compile: draw the permutations outside the compiled "
                         "function (xloss.reference.symile.draw_permutations(m, n, generator)) and pass permutations=")


__all__ = ["check_generator"]
