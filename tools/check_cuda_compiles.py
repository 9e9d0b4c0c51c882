"""Compile every xloss/csrc/cuda/*.cu file with nvcc, for sm_80 and sm_90, against the headers of the installed
torch, so that CUDA code that does not compile cannot land even on machines without a GPU (CI runs this).

A CPU build of torch lacks one generated header, ``c10/cuda/impl/cuda_cmake_macros.h``; xloss/csrc/stub holds
a one-line stand-in, placed last on the include path so that a CUDA build's real header wins.

Usage: ``python tools/check_cuda_compiles.py [--arch 80 --arch 90] [--nvcc PATH]``; exits non-zero on the first
failure, printing nvcc's output.  With no nvcc on the machine it says so and exits 0 unless ``--require``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", action="append", default=None, help="SM version, e.g. 90 (repeatable)")
    parser.add_argument("--nvcc", default=None, help="nvcc to use (default: $CUDA_HOME/bin/nvcc or PATH)")
    parser.add_argument("--require", action="store_true", help="fail when nvcc is missing")
    args = parser.parse_args()
    archs = args.arch or ["80", "90"]

    import torch
    from torch.utils import cpp_extension

    nvcc = args.nvcc or (os.path.join(os.environ["CUDA_HOME"], "bin", "nvcc") if os.environ.get("CUDA_HOME")
                         else shutil.which("nvcc"))
    if not nvcc or not os.path.exists(nvcc):
        print("check_cuda_compiles: nvcc not found" + ("" if args.require else "; nothing checked"))
        return 1 if args.require else 0

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    csrc = os.path.join(root, "xloss", "csrc")
    sources = sorted(os.path.join(csrc, "cuda", f) for f in os.listdir(os.path.join(csrc, "cuda")) if f.endswith(".cu"))
    includes = [*cpp_extension.include_paths(), csrc, os.path.join(csrc, "stub")]
    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    # torch's headers need C++20 from 2.14 on (std::strong_ordering, requires-clauses); C++17 before.
    std = "-std=c++20" if tuple(int(x) for x in torch.__version__.split(".")[:2]) >= (2, 14) else "-std=c++17"
    gencode = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs]
    with tempfile.TemporaryDirectory() as out:
        for src in sources:
            cmd = [
                nvcc, "-c", src, "-o", os.path.join(out, os.path.basename(src) + ".o"), std, "-O2",
                "--expt-relaxed-constexpr", "-Xcompiler", "-fPIC", f"-D_GLIBCXX_USE_CXX11_ABI={abi}",
                "-DTORCH_EXTENSION_NAME=xloss_check", "-DTORCH_API_INCLUDE_EXTENSION_H",
                "-D__CUDA_NO_HALF_OPERATORS__", "-D__CUDA_NO_HALF_CONVERSIONS__",
                "-D__CUDA_NO_BFLOAT16_CONVERSIONS__", "-D__CUDA_NO_HALF2_OPERATORS__",
                *gencode, *[f"-I{p}" for p in includes],
            ]
            proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
            name = os.path.relpath(src, root)
            if proc.returncode != 0:
                print(f"FAILED {name} (sm_{', sm_'.join(archs)})\n{' '.join(cmd)}\n{proc.stdout}{proc.stderr}")
                return 1
            print(f"ok {name} (sm_{', sm_'.join(archs)})")
    print(f"check_cuda_compiles: {len(sources)} file(s) compiled with {nvcc}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
