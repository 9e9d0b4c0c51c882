"""tools/check_triton_compiles.py and the launch recorder of tests/conftest.py: a kernel that the interpreter
runs but the compiler rejects must fail the check, and a good one must pass."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import conftest
import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET", "0") in ("", "0"), reason="records launches of the interpreter"
)

KERNELS = textwrap.dedent('''
    import triton
    import triton.language as tl


    @triton.jit
    def column_sum(x_ptr, out_ptr, N, B: tl.constexpr):
        offs = tl.arange(0, B)
        acc = tl.zeros([B], dtype=tl.float32)
        for i in range(0, N):
            acc += tl.load(x_ptr + i * B + offs)
        tl.store(out_ptr + offs, acc)


    @triton.jit
    def column_sum_bad(x_ptr, out_ptr, N, B: tl.constexpr):
        offs = tl.arange(0, B)
        acc = tl.zeros([B], dtype=tl.int32)
        for i in range(0, N):
            acc += tl.load(x_ptr + i * B + offs)  # fp32 into an int32 loop-carried value: the compiler refuses
        tl.store(out_ptr + offs, acc)
''')


def _record(tmp_path, name: str) -> str:
    """Run kernel `name` in the interpreter with the recorder on; return the JSON-lines file."""
    (tmp_path / "toy_kernels.py").write_text(KERNELS)
    sys.path.insert(0, str(tmp_path))
    try:
        import importlib

        toy = importlib.import_module("toy_kernels")
        path = str(tmp_path / f"{name}.jsonl")
        from triton.runtime.interpreter import InterpretedFunction

        original = InterpretedFunction.run
        conftest._install_recorder(path)
        try:
            x, out = torch.randn(3, 16), torch.empty(16)
            getattr(toy, name)[(1,)](x, out, 3, B=16)
        finally:
            InterpretedFunction.run = original
        torch.testing.assert_close(out, x.sum(0))  # the interpreter runs both kernels "correctly"
        return path
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop("toy_kernels", None)


def _check(path: str, tmp_path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    return subprocess.run([sys.executable, os.path.join(ROOT, "tools", "check_triton_compiles.py"), path],
                          capture_output=True, text=True, env=env, timeout=300, check=False)


def test_recorder_describes_a_launch(tmp_path):
    with open(_record(tmp_path, "column_sum")) as f:
        (line,) = f.read().splitlines()
    variant = json.loads(line)
    assert variant["kernel"] == "column_sum" and variant["module"] == "toy_kernels"
    assert variant["signature"] == {"x_ptr": "*fp32", "out_ptr": "*fp32", "N": "i32", "B": "constexpr"}
    assert variant["constexprs"] == {"B": 16}


def test_compile_check_passes_a_good_kernel_and_fails_a_bad_one(tmp_path):
    good = _check(_record(tmp_path, "column_sum"), tmp_path)
    assert good.returncode == 0 and "1/1 variants" in good.stdout, good.stdout + good.stderr
    bad = _check(_record(tmp_path, "column_sum_bad"), tmp_path)
    assert bad.returncode == 1 and "Loop-carried variable" in bad.stdout, bad.stdout + bad.stderr
