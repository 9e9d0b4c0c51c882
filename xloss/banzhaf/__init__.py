"""Monte-Carlo Banzhaf interaction of HBI (Jin et al., CVPR 2023; SPEC.md §6) without HBI's Python loop.

HBI computes its distillation targets with ``T·V·num_samples`` Python iterations of a dozen small tensor ops
each (``xloss.reference.banzhaf``).  ``banzhaf_interaction`` evaluates every (batch row, word i, frame j,
sample) in one call:

* the compiled op ``torch.ops.xloss.banzhaf_interaction`` (``xloss/csrc/cpu/banzhaf.cpp``, OpenMP; and
  ``xloss/csrc/cuda/banzhaf.cu``, one thread per (b, i, j), when built with CUDA);
* otherwise ``cpu.py``: the same values with vectorised PyTorch, chunked over (i, j, sample).

Coalitions come from a counter-based hash of ``(seed, b, i, j, sample, element)`` (``xloss/csrc/banzhaf.h``,
re-implemented in ``cpu.py``), so one seed gives the same coalitions on every path and device; the seed is one
int64 drawn from ``generator`` (or torch's default CPU generator: reproducible under ``torch.manual_seed``).
Explicit coalitions can be passed instead (tests).

The result is a target: it is computed under ``no_grad`` from detached inputs and never requires grad.
"""

from __future__ import annotations

import numbers
import os

import torch

from .. import _checks, _ext
from ..reference import banzhaf as _reference
from . import cpu as _cpu

MODES = ("hbi", "textbook")
BACKENDS = ("auto", "cpu", "cuda", "reference")
OP = "banzhaf_interaction"
DEFAULT_SAMPLES = 100  # HBI's


def _fake(sim, text_weight, video_weight, text_mask, video_mask, num_samples, seed, coalitions, mode):
    return sim.new_empty(sim.shape)


def op_available() -> bool:
    """True when ``torch.ops.xloss.banzhaf_interaction`` is loaded (building the extension on first call); its
    fake kernel is registered then (registering needs the schema, so it cannot happen at import)."""
    return _ext.has_op(OP, fake=_fake)


def cuda_op_available() -> bool:
    """True when the compiled op has a CUDA kernel (a CUDA build of torch with nvcc found at build time)."""
    return op_available() and torch._C._dispatch_has_kernel_for_dispatch_key(f"xloss::{OP}", "CUDA")


def _check_shape(name: str, t, shape: tuple, what: str, dtype_kind: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape {shape}{' or None' if dtype_kind == 'bool' else ''}, "
                        f"got {type(t).__name__}")
    if dtype_kind == "bool" and t.dtype != torch.bool:
        raise TypeError(f"{name} must have dtype torch.bool (True = valid), got {t.dtype}")
    if dtype_kind == "float" and not t.dtype.is_floating_point:
        raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}")
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)} ({what}), got {tuple(t.shape)}")


def _check(sim, text_weight, video_weight, text_mask, video_mask, num_samples, mode, generator, coalitions,
           backend) -> int:
    """Validate every argument; returns the number of samples."""
    _checks.check_float_tensor("sim", sim, ndim=3)
    b, t_len, v_len = sim.shape
    dev = sim.device
    _check_shape("text_weight", text_weight, (b, t_len), "[B, T] of sim", "float")
    _check_shape("video_weight", video_weight, (b, v_len), "[B, V] of sim", "float")
    for name, mask, shape, what in (("text_mask", text_mask, (b, t_len), "[B, T] of sim"),
                                    ("video_mask", video_mask, (b, v_len), "[B, V] of sim")):
        if mask is not None:
            _check_shape(name, mask, shape, what, "bool")
    for name, t in (("text_weight", text_weight), ("video_weight", video_weight), ("text_mask", text_mask),
                    ("video_mask", video_mask)):
        if t is not None and t.device != dev:
            raise ValueError(f"{name} must be on sim's device ({dev}), got {t.device}")
    _checks.check_choice("mode", mode, MODES)
    _checks.check_choice("backend", backend, BACKENDS)
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
    if num_samples is not None:
        if isinstance(num_samples, bool) or not isinstance(num_samples, numbers.Integral):
            raise TypeError(f"num_samples must be an int, got {type(num_samples).__name__}")
        if num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    if coalitions is None:
        return DEFAULT_SAMPLES if num_samples is None else int(num_samples)
    if not isinstance(coalitions, torch.Tensor):
        raise TypeError(f"coalitions must be a bool or uint8 torch.Tensor or None, got {type(coalitions).__name__}")
    if coalitions.dtype not in (torch.bool, torch.uint8):
        raise TypeError(f"coalitions must have dtype torch.bool or torch.uint8, got {coalitions.dtype}")
    s = coalitions.shape[3] if coalitions.dim() == 5 else -1
    expected = (b, t_len, v_len, s if num_samples is None else num_samples, t_len + v_len)
    if coalitions.dim() != 5 or tuple(coalitions.shape) != expected or s < 1:
        raise ValueError(
            f"coalitions must have shape [B, T, V, num_samples, T + V] = "
            f"{(b, t_len, v_len, 'num_samples' if num_samples is None else num_samples, t_len + v_len)}, "
            f"got {tuple(coalitions.shape)}"
        )
    if coalitions.device != dev:
        raise ValueError(f"coalitions must be on sim's device ({dev}), got {coalitions.device}")
    return int(s)


def draw_seed(generator: torch.Generator | None = None) -> int:
    """One int64 seed from ``generator`` (on its device), or from torch's default CPU generator."""
    if generator is None:
        return int(torch.randint(0, 2**62, (1,)).item())
    return int(torch.randint(0, 2**62, (1,), generator=generator, device=generator.device).item())


def _path(backend: str, device: torch.device) -> str:
    """"op" (compiled), "torch" (cpu.py) or "reference" for a backend choice and tensors on ``device``."""
    if backend == "auto":
        env = os.environ.get("XLOSS_BACKEND", "").strip()
        if env in ("cpu", "cuda", "reference"):
            return _path(env, device)
        if device.type == "cuda":
            return "op" if cuda_op_available() else "torch"
        return "op" if device.type == "cpu" and op_available() else "torch"
    if backend == "cpu":
        return "op" if device.type == "cpu" and op_available() else "torch"
    if backend == "cuda":
        if device.type != "cuda":
            raise RuntimeError(f"backend='cuda' (the compiled CUDA op) needs CUDA tensors, got {device}")
        if not cuda_op_available():
            why = _ext.error() or "torch was built without CUDA or nvcc was not found when the ops were built"
            raise RuntimeError(f"backend='cuda': the compiled CUDA op banzhaf_interaction is not available ({why})")
        return "op"
    return "reference"


def banzhaf_interaction(
    sim: torch.Tensor,
    text_weight: torch.Tensor,
    video_weight: torch.Tensor,
    text_mask: torch.Tensor | None = None,
    video_mask: torch.Tensor | None = None,
    *,
    num_samples: int | None = None,
    mode: str = "hbi",
    generator: torch.Generator | None = None,
    coalitions: torch.Tensor | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Monte-Carlo Banzhaf interaction between every word i and frame j (SPEC.md §6, HBI).

    ``I[b, i, j] = mean_s [f(S ∪ {i, j}) − f(S_t ∪ {i}, S_v) − f(S_t, S_v ∪ {j}) + f(S)]`` over ``num_samples``
    coalitions ``S = (S_t, S_v)`` of the other valid words and frames (each kept with probability ½), with the
    value ``f = ½[Σ_t wᵗ_t max_v L̄_tv + Σ_v wᵛ_v max_t L̄_tv]`` of HBI (``L̄`` = ``sim`` on the coalition, 0
    elsewhere; ``wᵗ``, ``wᵛ`` = softmax of ``text_weight``, ``video_weight`` over the coalition).  See
    ``xloss.reference.banzhaf`` for the definition in code, and for what ``mode`` changes.

    HBI passes ``1000 * sim`` (its loop scales the logits by 1000): do the same to reproduce its targets.

    Args:
        sim: ``[B, T, V]`` float word-frame similarities.
        text_weight: ``[B, T]`` float word weights (HBI: softmax over the valid words).
        video_weight: ``[B, V]`` float frame weights.
        text_mask: ``[B, T]`` bool, True = valid word; None = all valid.
        video_mask: ``[B, V]`` bool, True = valid frame; None = all valid.
        num_samples: coalitions per (i, j); None = 100 (HBI's), or ``coalitions.shape[3]``.
        mode: ``"hbi"`` (HBI's code after its 2023-11-16 fix: ``f(S ∪ {i, j})`` adds only the entry (i, j)
            and re-softmaxes the coalition's weights with the raw ``p_i``, ``q_j``) or ``"textbook"``.
        generator: source of the seed (one int64 drawn from it); None = torch's default CPU generator.
        coalitions: explicit coalitions instead of sampling: bool or uint8 ``[B, T, V, num_samples, T + V]``,
            entry ``[b, i, j, s, t]`` = word t in sample s of pair (i, j), ``[b, i, j, s, T + v]`` = frame v;
            bits of i, j and of padded positions are ignored.
        backend: ``"auto"`` (compiled op when loaded, on CPU or CUDA tensors, else the PyTorch path),
            ``"cpu"`` (compiled CPU op for CPU tensors, else the PyTorch path), ``"cuda"`` (the compiled CUDA op,
            RuntimeError when it is not built), ``"reference"`` (the loop port; it samples with
            ``torch.rand`` on ``generator``, so its random coalitions differ from the other paths').

    Returns:
        ``[B, T, V]`` in sim's dtype (computed in fp32, fp64 for fp64), zero outside ``text_mask ⊗ video_mask``,
        not requiring grad (a distillation target; inputs that require grad are detached).

    Raises:
        TypeError, ValueError: bad arguments (the message names the argument and the shapes).
        RuntimeError: ``backend="cuda"`` where the compiled CUDA op is not available.
    """
    samples = _check(sim, text_weight, video_weight, text_mask, video_mask, num_samples, mode, generator,
                     coalitions, backend)
    b, t_len, v_len = sim.shape
    dev = sim.device
    path = _path(backend, dev)
    with torch.no_grad():
        sim = sim.detach()
        p, q = text_weight.detach().to(sim.dtype), video_weight.detach().to(sim.dtype)
        if path == "reference":
            return _reference.banzhaf_interaction(
                sim, p, q, text_mask, video_mask, num_samples=samples, mode=mode, generator=generator,
                coalitions=coalitions,
            )
        tm = torch.ones(b, t_len, dtype=torch.bool, device=dev) if text_mask is None else text_mask
        vm = torch.ones(b, v_len, dtype=torch.bool, device=dev) if video_mask is None else video_mask
        seed = draw_seed(generator) if coalitions is None else 0
        if path == "op":
            return torch.ops.xloss.banzhaf_interaction(sim, p, q, tm, vm, samples, seed, coalitions, mode)
        return _cpu.banzhaf_interaction(sim, p, q, tm, vm, samples, seed, coalitions, mode)


coalition_bits = _cpu.coalition_bits

__all__ = ["banzhaf_interaction", "coalition_bits", "cuda_op_available", "draw_seed", "op_available"]
