"""Compile every Triton kernel variant the tests launched, for a Hopper GPU, on a machine without one.

The tests run the kernels in Triton's interpreter, which accepts some programs that the compiler rejects
(a value whose type differs between the branches of a constexpr `if`, a `return` of the wrong type, layout
problems).  With ``XLOSS_TRITON_VARIANTS=path python -m pytest`` the tests record each launch (see
tests/conftest.py); this script compiles each recorded variant ahead of time with
``triton.compile(ASTSource(...), target=GPUTarget("cuda", 90, 32))`` (to PTX and, through the ptxas that ships
with Triton, to a cubin), plus a bf16 twin of every fp16 variant (bf16 cannot be tested in the interpreter).

Usage: ``python tools/check_triton_compiles.py path [--arch 90] [--report CSV]``; exits non-zero if any variant
fails to compile, printing the error.  Nothing runs: this checks that the kernels compile, not that they are right.

``--report CSV`` also writes, per variant, what the compiler says about it on that architecture: registers per
thread and spilled bytes (``ptxas -v`` of the variant's PTX), shared memory, the instructions its ``tl.dot``s
lower to (``wgmma`` = Hopper warpgroup tensor cores, ``mma`` = older tensor-core ``mma.sync``, ``fma`` = no
tensor cores) and the occupancy this implies on an H100/H200 (resident warps per SM / 64), and fails (exit 2) on
any spill and on fp16/bf16 dots that do not use tensor cores.  Record the variants with the GPU's tile sizes for
that (``XLOSS_TRITON_GPU_TILES=1``, see .ci/run): the interpreter's own tiles are smaller.
"""

from __future__ import annotations

import argparse
import csv
import importlib
import json
import math
import os
import re
import subprocess
import sys
import time

# sm_90 (H100 / H200) per-SM limits: registers, warps, resident blocks, shared memory (1 KiB reserved per block).
SM90 = {"regs": 65536, "warps": 64, "blocks": 32, "smem": 233472, "smem_reserved": 1024}


def _ptxas():
    """Triton's bundled ptxas that accepts the PTX version Triton emits (the newest one shipped)."""
    import triton.backends.nvidia as nv

    bindir = os.path.join(os.path.dirname(nv.__file__), "bin")
    for name in ("ptxas-blackwell", "ptxas"):
        if os.path.exists(os.path.join(bindir, name)):
            return os.path.join(bindir, name)
    return None


def _resources(kernel, arch: int) -> dict:
    """Registers, spills, shared memory, dot instructions and occupancy of one compiled variant."""
    ptx, ttir = kernel.asm["ptx"], kernel.asm["ttir"]
    regs = spill = -1
    ptxas = _ptxas()
    if ptxas:
        out = subprocess.run([ptxas, f"-arch=sm_{arch}a", "-v", "-o", os.devnull, "-"], input=ptx,
                             capture_output=True, text=True, check=False).stderr
        m = re.search(r"Used (\d+) registers", out)
        regs = int(m.group(1)) if m else -1
        spills = re.findall(r"(\d+) bytes spill (?:stores|loads)", out)
        spill = sum(int(x) for x in spills) if spills else -1
    dots = "none" if "tt.dot" not in ttir else ("wgmma" if "wgmma" in ptx else "mma" if "mma.sync" in ptx else "fma")
    warps, smem = kernel.metadata.num_warps, kernel.metadata.shared
    occupancy = float("nan")
    if regs > 0:
        per_warp = math.ceil(regs * 32 / 256) * 256
        blocks = min(SM90["blocks"], (SM90["regs"] // per_warp) // warps, SM90["warps"] // warps,
                     SM90["smem"] // (smem + SM90["smem_reserved"]))
        occupancy = blocks * warps / SM90["warps"]
    return {"num_warps": warps, "num_stages": kernel.metadata.num_stages, "registers": regs, "spill_bytes": spill,
            "shared_bytes": smem, "dots": dots, "occupancy": round(occupancy, 3)}


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
    parser.add_argument("--report", help="write the per-variant resource table to this CSV and check it")
    parser.add_argument("--baseline", help="a committed report: its known problems are listed, not failed on")
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
    failures, start, rows = 0, time.time(), []
    for v in variants:
        constexprs = {k: (getattr(tl, c["tl_dtype"]) if isinstance(c, dict) else c) for k, c in v["constexprs"].items()}
        dtypes = sorted({t for t in v["signature"].values() if t.startswith(("*fp", "*bf"))})
        label = f"{v['module']}.{v['kernel']} {sorted(set(v['signature'].values()) - {'constexpr'})} {v['constexprs']}"
        try:
            fn = getattr(importlib.import_module(v["module"]), v["kernel"])
            kernel = triton.compile(ASTSource(fn, v["signature"], constexprs), target=target, options=v["options"])
        except Exception as exc:  # noqa: BLE001 (report every failure, then fail)
            failures += 1
            print(f"FAILED {label}\n{type(exc).__name__}: {exc}\n")
            continue
        if args.report:
            small = {k: c for k, c in v["constexprs"].items() if not isinstance(c, dict)}
            rows.append({"module": v["module"], "kernel": v["kernel"], "dtypes": " ".join(dtypes),
                         "constexprs": json.dumps(small, sort_keys=True), **_resources(kernel, args.arch)})
    kernels = len({(v["module"], v["kernel"]) for v in variants})
    print(f"check_triton_compiles: {len(variants) - failures}/{len(variants)} variants of {kernels} kernels compiled "
          f"for sm_{args.arch} in {time.time() - start:.0f} s")
    if failures:
        return 1
    return _check_report(rows, args.report, args.arch, args.baseline) if args.report else 0


def _key(row: dict) -> tuple:
    return row["module"], row["kernel"], row["dtypes"], row["constexprs"]


def _problem(row: dict) -> bool:
    """A spill, or fp16/bf16 dots that do not lower to tensor cores."""
    half = "*fp16" in row["dtypes"] or "*bf16" in row["dtypes"]
    return int(row["spill_bytes"]) > 0 or (row["dots"] == "fma" and half)


def _check_report(rows: list[dict], path: str, arch: int, baseline: str | None) -> int:
    """Write the table; exit status 2 on a problem (``_problem``) that the baseline report does not already list
    (known problems are printed as such: the gate is that no new spill or tensor-core fallback appears)."""
    rows.sort(key=lambda r: (r["module"], r["kernel"], r["dtypes"], r["constexprs"]))
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    known = set()
    if baseline and os.path.exists(baseline):
        with open(baseline) as f:
            known = {_key(r) for r in csv.DictReader(f) if _problem(r)}
    problems = [r for r in rows if _problem(r)]
    new = [r for r in problems if _key(r) not in known]
    for r in problems:
        tag = "NEW" if r in new else "known"
        print(f"{tag} {r['module']}.{r['kernel']} {r['dtypes']} {r['constexprs']}: spills {r['spill_bytes']} B, "
              f"dots {r['dots']}")
    kinds = {k: sum(r["dots"] == k for r in rows) for k in ("wgmma", "mma", "fma", "none")}
    print(f"check_triton_compiles: report of {len(rows)} variants for sm_{arch} in {path}: dots {kinds}, "
          f"max registers {max(r['registers'] for r in rows)}, min occupancy "
          f"{min(r['occupancy'] for r in rows):.3f}; {len(problems)} problem(s), {len(new)} not in the baseline")
    return 2 if new else 0


if __name__ == "__main__":
    sys.exit(main())
