"""The compiled-ops loader (xloss/_ext.py): builds here, falls back cleanly without a compiler.

The ops' values are tested in their families' files (tests/test_banzhaf.py, tests/test_maxsim_op.py); this file
checks the machinery around them: every declared schema has a CPU kernel, and a machine with no compiler (or
with the ops disabled) still imports xloss and gets the Python paths, with exactly one clear warning.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys

import pytest
import torch

from xloss import _ext

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
needs_compiler = pytest.mark.skipif(shutil.which("c++") is None, reason="no C++ compiler on this machine")


def _declared_ops() -> list[str]:
    """The op names declared in the one TORCH_LIBRARY block of ops.cpp."""
    with open(os.path.join(_ext.CSRC, "ops.cpp")) as f:
        return re.findall(r'm\.def\(\s*"(\w+)\(', f.read())


def test_sources_ship_inside_the_package():
    assert os.path.exists(os.path.join(_ext.CSRC, "ops.cpp"))
    assert all(os.path.exists(p) for p in _ext.cpu_sources())
    assert _declared_ops(), "ops.cpp declares no op"


@needs_compiler
def test_every_declared_op_has_a_cpu_kernel():
    assert _ext.load(), _ext.error()
    for name in _declared_ops():
        assert _ext.has_op(name), name
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"xloss::{name}", "CPU"), name


def _run(code: str, **env) -> subprocess.CompletedProcess:
    full_env = {**os.environ, **env}
    return subprocess.run([sys.executable, "-W", "always", "-c", code], capture_output=True, text=True,
                          env=full_env, cwd=ROOT, timeout=300, check=False)


# Runs the public functions that have a compiled path, so that the fallback is exercised end to end.
_FALLBACK_SCRIPT = """
import warnings, torch, xloss
from xloss import _ext
torch.manual_seed(0)
first = _ext.load()  # the one warning, if any, comes here
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    q, d = torch.randn(3, 5, 16), torch.randn(4, 7, 16)
    torch.testing.assert_close(xloss.maxsim(q, d), xloss.reference.maxsim(q, d))
    if hasattr(xloss, "banzhaf_interaction"):
        sim = torch.randn(2, 4, 3)
        p, v = torch.softmax(torch.randn(2, 4), -1), torch.softmax(torch.randn(2, 3), -1)
        out = xloss.banzhaf_interaction(sim, p, v, num_samples=4, generator=torch.Generator().manual_seed(0))
        assert out.shape == (2, 4, 3) and torch.isfinite(out).all()
    assert not _ext.load()
print("LOADED", first, "ERROR", _ext.error())
print("LATER_WARNINGS", len(caught))
"""


def test_no_compiler_falls_back_with_one_warning(tmp_path):
    proc = _run(_FALLBACK_SCRIPT, CXX=str(tmp_path / "no-such-compiler"),
                TORCH_EXTENSIONS_DIR=str(tmp_path / "ext"), XLOSS_NO_EXT="0")
    assert proc.returncode == 0, proc.stderr
    assert "LOADED False" in proc.stdout and "no C++ compiler" in proc.stdout
    assert "LATER_WARNINGS 0" in proc.stdout  # the loader is cached: one warning per process, not per call
    warned = [line for line in proc.stderr.splitlines() if "compiled ops could not be built" in line]
    assert len(warned) == 1, proc.stderr


def test_disabled_ops_fall_back_silently(tmp_path):
    proc = _run(_FALLBACK_SCRIPT, XLOSS_NO_EXT="1", TORCH_EXTENSIONS_DIR=str(tmp_path / "ext"))
    assert proc.returncode == 0, proc.stderr
    assert "LOADED False ERROR disabled by XLOSS_NO_EXT" in proc.stdout
    assert "compiled ops could not be built" not in proc.stderr
