"""Compile every Triton kernel variant the tests launched, for a Hopper GPU, on a machine without one.

The tests run the kernels in Triton's interpreter, which accepts some programs that the compiler rejects
(a value whose type differs between the branches of a constexpr `if`, a `return` of the wrong type, layout
problems).  With ``XLOSS_TRITON_VARIANTS=path python -m pytest`` the tests record each launch (see
tests/conftest.py); this script compiles each recorded variant ahead of time with
``triton.compile(ASTSource(...), target=GPUTarget("cuda", 90, 32))`` (to PTX and, through the ptxas that ships
with Triton, to a cubin), plus a bf16 twin of every fp16 variant (bf16 cannot be tested in the interpreter).

Usage: ``python tools/check_triton_compiles.py path [--arch 90]``; exits non-zero if any variant fails to
compile, printing the error.  Nothing runs: this checks that the kernels compile, not that they are right.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import time


def _load(path: str) -> list[dict]:
    variants, seen = [], set()
    with open(path) as f:
        for line in f:
            line = line.strip()
            if not line or line in seen:
                continue
            seen.add(line)
            variants.append(json.loads(line))
            sig = variants[-1]["signature"]
            if any(t == "*fp16" for t in sig.values()):  # the bf16 twin
                twin = json.loads(line)
                twin["signature"] = {k: ("*bf16" if t == "*fp16" else t) for k, t in sig.items()}
                key = json.dumps(twin, sort_keys=True)
                if key not in seen:
                    seen.add(key)
                    variants.append(twin)
    return variants


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("path", help="JSON lines written by the tests under XLOSS_TRITON_VARIANTS")
    parser.add_argument("--arch", type=int, default=90, help="compute capability to compile for (default 90)")
    args = parser.parse_args()
    os.environ.pop("TRITON_INTERPRET", None)  # compile for real: the kernels must be JITFunctions

    import triton
    import triton.language as tl
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    if not os.path.exists(args.path) or os.path.getsize(args.path) == 0:
        print(f"check_triton_compiles: no variants recorded in {args.path}")
        return 1
    target = GPUTarget("cuda", args.arch, 32)
    variants = _load(args.path)
    failures, start = 0, time.time()
    for v in variants:
        constexprs = {k: (getattr(tl, c["tl_dtype"]) if isinstance(c, dict) else c) for k, c in v["constexprs"].items()}
        label = f"{v['module']}.{v['kernel']} {sorted(set(v['signature'].values()) - {'constexpr'})} {v['constexprs']}"
        try:
            fn = getattr(importlib.import_module(v["module"]), v["kernel"])
            triton.compile(ASTSource(fn, v["signature"], constexprs), target=target, options=v["options"])
        except Exception as exc:  # noqa: BLE001 (report every failure, then fail)
            failures += 1
            print(f"FAILED {label}\n{type(exc).__name__}: {exc}\n")
    kernels = len({(v["module"], v["kernel"]) for v in variants})
    print(f"check_triton_compiles: {len(variants) - failures}/{len(variants)} variants of {kernels} kernels compiled "
          f"for sm_{args.arch} in {time.time() - start:.0f} s")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
