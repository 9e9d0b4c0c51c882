"""setuptools entry point.

``pip install .`` compiles nothing by default: every path of xloss works in Python, and the compiled ops
(``xloss/csrc``) are built on first use by ``xloss/_ext.py`` when a compiler is there.  To build them ahead of
time into the module ``xloss._C``, set ``XLOSS_BUILD_EXT=1``; the CUDA sources are added when nvcc and a CUDA
build of torch are present (``XLOSS_BUILD_CUDA=0`` leaves them out).
"""

import glob
import os

from setuptools import setup


def _ext_modules():
    if os.environ.get("XLOSS_BUILD_EXT", "0") in ("", "0"):
        return {}
    import torch
    from torch.utils import cpp_extension

    root = os.path.dirname(os.path.abspath(__file__))
    rel = lambda p: os.path.relpath(p, root)
    sources = [rel(os.path.join(root, "xloss", "csrc", "ops.cpp"))]
    sources += sorted(rel(p) for p in glob.glob(os.path.join(root, "xloss", "csrc", "cpu", "*.cpp")))
    cuda_sources = sorted(rel(p) for p in glob.glob(os.path.join(root, "xloss", "csrc", "cuda", "*.cu")))
    with_cuda = (
        os.environ.get("XLOSS_BUILD_CUDA", "1") not in ("", "0")
        and torch.version.cuda is not None
        and cpp_extension.CUDA_HOME is not None
        and bool(cuda_sources)
    )
    cxx = ["-O3", "-fopenmp", "-DXLOSS_PY_MODULE"]  # no -march=native: a wheel runs anywhere
    if with_cuda:
        ext = cpp_extension.CUDAExtension(
            "xloss._C", sources + cuda_sources,
            extra_compile_args={"cxx": cxx + ["-DXLOSS_WITH_CUDA"], "nvcc": ["-O3"]},
            extra_link_args=["-fopenmp"],
        )
    else:
        ext = cpp_extension.CppExtension(
            "xloss._C", sources, extra_compile_args={"cxx": cxx}, extra_link_args=["-fopenmp"]
        )
    return {"ext_modules": [ext], "cmdclass": {"build_ext": cpp_extension.BuildExtension}}


setup(**_ext_modules())
