"""Test-session setup shared by every test file.

1. Without a GPU, the Triton kernels run in Triton's interpreter, and ``TRITON_INTERPRET`` must be set before
   anything imports Triton (torch.compile and torch.distributed helpers import it too): set it here, first,
   so that the order in which pytest collects the files cannot matter.  ``TRITON_INTERPRET=0`` on a CUDA
   machine runs the compiled kernels instead.
2. ``XLOSS_TRITON_VARIANTS=path``: record every Triton kernel launch made by the tests (kernel, argument types,
   constexpr values, num_warps) as JSON lines in ``path``.  ``tools/check_triton_compiles.py`` then compiles
   each recorded variant for a Hopper GPU ahead of time, which catches what the interpreter accepts but the
   compiler rejects (type mismatches across branches, layouts), on machines without a GPU.
"""

from __future__ import annotations

import json
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

_VARIANTS_PATH = os.environ.get("XLOSS_TRITON_VARIANTS")

_TRITON_TYPES = {
    torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.float64: "fp64",
    torch.int64: "i64", torch.int32: "i32", torch.int16: "i16", torch.int8: "i8", torch.uint8: "u8",
    torch.bool: "i1",
}


def _is_constexpr(annotation) -> bool:
    # The kernel modules use `from __future__ import annotations`, so annotations are strings there.
    return "constexpr" in (annotation if isinstance(annotation, str) else repr(annotation))


def _describe(fn, arg_names, args, kwargs) -> dict | None:
    """One launch as {kernel, signature, constexprs, options}; None if a value cannot be described."""
    import inspect

    import triton.language as tl

    params = inspect.signature(fn).parameters
    values = dict(zip(arg_names, args))
    values.update({k: v for k, v in kwargs.items() if k in params})
    signature, constexprs = {}, {}
    for name, param in params.items():
        if name not in values:
            if param.default is inspect.Parameter.empty:
                return None
            values[name] = param.default
        value = values[name]
        if _is_constexpr(param.annotation) or value is None:
            if isinstance(value, tl.dtype):
                value = {"tl_dtype": value.name}
            elif isinstance(value, tl.constexpr):
                value = value.value
            if not isinstance(value, (int, float, bool, str, dict, type(None))):
                return None
            signature[name], constexprs[name] = "constexpr", value
        elif isinstance(value, torch.Tensor):
            if value.dtype not in _TRITON_TYPES:
                return None
            signature[name] = "*" + _TRITON_TYPES[value.dtype]
        elif isinstance(value, bool):
            signature[name] = "i1"
        elif isinstance(value, int):
            signature[name] = "i32" if -(2**31) <= value < 2**31 else "i64"
        elif isinstance(value, float):
            signature[name] = "fp32"
        else:
            return None
    options = {k: kwargs[k] for k in ("num_warps", "num_stages") if k in kwargs}
    return {"module": fn.__module__, "kernel": fn.__name__, "signature": signature, "constexprs": constexprs,
            "options": options}


def _install_recorder(path: str, module_prefix: str = "") -> None:
    """Record the launches of kernels whose module starts with ``module_prefix`` (all with "")."""
    from triton.runtime.interpreter import InterpretedFunction

    seen: set[str] = set()
    original = InterpretedFunction.run

    def run(self, *args, grid, warmup, **kwargs):
        described = None
        if self.fn.__module__.startswith(module_prefix):
            described = _describe(self.fn, self.arg_names, args, kwargs)
        if described is not None:
            line = json.dumps(described, sort_keys=True)
            if line not in seen:
                seen.add(line)
                with open(path, "a") as f:
                    f.write(line + "\n")
        return original(self, *args, grid=grid, warmup=warmup, **kwargs)

    InterpretedFunction.run = run


if _VARIANTS_PATH and os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
    _install_recorder(_VARIANTS_PATH, module_prefix="xloss.")
