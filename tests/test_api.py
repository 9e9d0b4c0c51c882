"""The package's structure rules (the one-path issue): importable modules, one Function per family, one dispatch
table, one rule for public signatures (xloss/_api.py), no compile forks, a distributed module without a Function."""

from __future__ import annotations

import ast
import importlib
import inspect
import pathlib
import pkgutil

import pytest
import torch

import xloss
from xloss import _dispatch

ROOT = pathlib.Path(xloss.__file__).parent
FAMILIES = {  # package → the public losses it defines
    "infonce": ["info_nce"],
    "sigmoid": ["sigmoid_loss"],
    "late_interaction": ["late_interaction_loss", "maxsim", "maxsim_pairs"],
    "gram": ["gram_loss", "gram_volume"],
    "symile": ["symile_loss"],
    "banzhaf": ["banzhaf_interaction"],
    "soft_targets": ["distill_loss", "cwcl_loss"],
}
SCALED_LOSSES = ["info_nce", "sigmoid_loss", "late_interaction_loss", "gram_loss", "symile_loss", "distill_loss",
                 "cwcl_loss"]


def _modules():
    names = ["xloss"]
    for info in pkgutil.walk_packages([str(ROOT)], prefix="xloss."):
        if info.name.rsplit(".", 1)[-1] != "__main__":  # importing it would run the CLI
            names.append(info.name)
    return names


@pytest.mark.parametrize("name", _modules())
def test_every_module_is_importable_by_its_path(name):
    """``import xloss.a.b as m`` binds the module itself (no public function hides a subpackage)."""
    if name.endswith(".triton") and not _dispatch.triton_available():
        pytest.skip("Triton is not installed (the kernel modules need it; the package does not)")
    scope: dict = {}
    exec(f"import {name} as m", scope)  # noqa: S102 (the statement form: it resolves the dotted path attribute by attribute)
    assert scope["m"] is importlib.import_module(name)
    assert inspect.ismodule(scope["m"])


def test_the_family_of_info_nce_is_importable_beside_the_function():
    import xloss.infonce.chunked as c

    assert callable(xloss.info_nce) and not inspect.ismodule(xloss.info_nce)
    assert inspect.ismodule(c) and hasattr(c, "lse")
    assert importlib.import_module("xloss.infonce") is not xloss.info_nce


def test_import_xloss_imports_neither_triton_nor_dynamo():
    """A plain ``import xloss`` stays light: Triton and torch._dynamo load on first use only."""
    import subprocess
    import sys

    code = "import sys, xloss; print('triton' in sys.modules, 'torch._dynamo' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"], out


def _functions_of(package: str):
    """autograd.Function subclasses defined in the modules of ``xloss.<package>``."""
    found = set()
    pkg = importlib.import_module(f"xloss.{package}")
    names = [pkg.__name__] + [i.name for i in pkgutil.iter_modules(pkg.__path__, prefix=pkg.__name__ + ".")]
    for name in names:
        if name.endswith(".triton") and not _dispatch.triton_available():
            continue
        module = importlib.import_module(name)
        for obj in vars(module).values():
            if (inspect.isclass(obj) and issubclass(obj, torch.autograd.Function) and obj is not torch.autograd.Function
                    and obj.__module__.startswith(pkg.__name__)):
                found.add(obj)
    return found


@pytest.mark.parametrize("package", sorted(FAMILIES))
def test_one_autograd_function_per_family(package):
    found = _functions_of(package)
    if package == "banzhaf":  # a distillation target without gradient: no Function at all
        assert not found, found
    else:
        assert len(found) == 1, f"xloss.{package} defines {sorted(f.__name__ for f in found)}"


def test_no_public_function_branches_on_is_compiling():
    for path in [ROOT / "__init__.py", ROOT / "nn.py", *sorted(ROOT.glob("*/__init__.py"))]:
        assert "is_compiling" not in path.read_text(), f"{path.relative_to(ROOT.parent)} forks on is_compiling()"


def test_distributed_module_defines_no_function_and_imports_no_family():
    tree = ast.parse((ROOT / "distributed.py").read_text())
    for node in tree.body:  # module level only: imports inside functions run on first call
        if isinstance(node, ast.ClassDef):
            pytest.fail(f"xloss/distributed.py defines class {node.name}")
        if isinstance(node, ast.ImportFrom):
            module = node.module or ""
            assert module in ("__future__", "_comm"), f"xloss/distributed.py imports from {module!r} at import"
        if isinstance(node, ast.Import):
            pytest.fail(f"xloss/distributed.py imports {[a.name for a in node.names]} at import")


def test_families_do_not_import_distributed():
    for path in ROOT.glob("*/*.py"):
        text = path.read_text()
        assert "import distributed" not in text and "distributed import" not in text, path


# --------------------------------------------------------------------------------------------- dispatch
def test_dispatch_table_covers_every_family_with_a_chunked_engine():
    for family in _dispatch.FAMILIES:
        engines = [r.engine for r in _dispatch.routes(family)]
        assert "chunked" in engines, family
        assert engines.index("chunked") == len(engines) - 1, f"{family}: chunked must be the last fallback"
    assert set(_dispatch.FAMILIES) == {"info_nce", "distill", "sigmoid", "late_interaction", "xtr", "gram", "symile",
                                       "banzhaf"}


def test_dispatch_modules_exist_and_aliases_resolve(monkeypatch):
    monkeypatch.delenv("XLOSS_BACKEND", raising=False)
    cpu = torch.device("cpu")
    for route in _dispatch.TABLE:
        if route.engine == "triton" and not _dispatch.triton_available():
            continue
        assert importlib.util.find_spec(route.module) is not None, route.module
    for family in ("info_nce", "sigmoid", "late_interaction", "gram", "symile"):
        assert _dispatch.resolve(family, "cpu", cpu, torch.float32) == "chunked"
        assert _dispatch.resolve(family, "chunked", cpu, torch.float64) == "chunked"
        assert _dispatch.resolve(family, "reference", cpu, torch.float32) == "reference"
    with pytest.raises(ValueError, match="backend must be one of"):
        _dispatch.resolve("info_nce", "fast", cpu, torch.float32)
    with pytest.raises(RuntimeError, match="backend='cuda' is not available for info_nce"):
        _dispatch.resolve("info_nce", "cuda", cpu, torch.float32)


def test_auto_skips_triton_for_float64_on_cuda(monkeypatch):
    """float64 is no Triton dtype: "auto" on CUDA takes the chunked engine instead of failing."""
    monkeypatch.delenv("XLOSS_BACKEND", raising=False)
    monkeypatch.setattr(_dispatch, "triton_available", lambda: True)
    cuda = torch.device("cuda")
    for family in ("info_nce", "sigmoid", "late_interaction", "gram", "symile"):
        assert _dispatch.resolve(family, "auto", cuda, torch.float32, modalities=3) == "triton"
        assert _dispatch.resolve(family, "auto", cuda, torch.float64, modalities=3) == "chunked"
    assert _dispatch.resolve("symile", "auto", cuda, torch.float32, modalities=5) == "chunked"


# --------------------------------------------------------------------------------------------- signatures
def _params(fn):
    return list(inspect.signature(fn).parameters.values())


@pytest.mark.parametrize("name", SCALED_LOSSES)
def test_public_losses_take_logit_scale_or_temperature_keyword_only(name):
    params = {p.name: p for p in _params(getattr(xloss, name))}
    for arg in ("logit_scale", "temperature", "reduction", "backend"):
        assert arg in params, f"xloss.{name} has no {arg}="
        assert params[arg].kind is inspect.Parameter.KEYWORD_ONLY, f"xloss.{name}: {arg} must be keyword-only"
    order = [p.name for p in _params(getattr(xloss, name))]
    assert order.index("logit_scale") + 1 == order.index("temperature"), order
    assert order.index("temperature") < order.index("reduction") < order.index("backend"), order
    if "labels" in order:
        assert order.index("temperature") < order.index("labels") < order.index("reduction"), order


@pytest.mark.parametrize("name", [n for fam in FAMILIES.values() for n in fam])
def test_tensors_first_then_keyword_only(name):
    params = _params(getattr(xloss, name))
    kinds = [p.kind for p in params]
    positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD,
                  inspect.Parameter.VAR_POSITIONAL)
    first_kw = next((i for i, k in enumerate(kinds) if k not in positional), len(kinds))
    assert all(k not in positional for k in kinds[first_kw:]), f"xloss.{name}: {inspect.signature(getattr(xloss, name))}"
    for p in params[first_kw:]:
        assert p.kind in (inspect.Parameter.KEYWORD_ONLY, inspect.Parameter.VAR_KEYWORD), (name, p.name)
    for p in params[:first_kw]:  # what comes first is tensors (masks and weights included), never an option
        assert p.name not in ("logit_scale", "temperature", "reduction", "backend", "labels"), (name, p.name)


def test_gram_loss_takes_labels():
    assert "labels" in inspect.signature(xloss.gram_loss).parameters


@pytest.mark.parametrize("name", ["info_nce", "sigmoid_loss", "distill_loss", "cwcl_loss"])
def test_multi_rank_options_are_keyword_only(name):
    params = {p.name: p for p in _params(getattr(xloss, name))}
    for arg in ("group", "exchange", "grad_reduction"):
        assert params[arg].kind is inspect.Parameter.KEYWORD_ONLY
    assert params["grad_reduction"].default == "mean"
