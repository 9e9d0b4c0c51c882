"""Monte-Carlo Banzhaf interaction of HBI (Jin et al., CVPR 2023; SPEC.md §6) without HBI's Python loop.

HBI computes its distillation targets with ``T·V·num_samples`` Python iterations of a dozen small tensor ops
each (``xloss.reference.banzhaf``).  ``banzhaf_interaction`` evaluates every (batch row, word i, frame j,
sample) in one call, with the engine that ``xloss._dispatch`` picks:

* ``"compiled"`` (``compiled.py``, alias ``"cuda"``): the op ``torch.ops.xloss.banzhaf_interaction``
  (``xloss/csrc/cpu/banzhaf.cpp``, OpenMP; and ``xloss/csrc/cuda/banzhaf.cu``, one thread per (b, i, j), when
  built with CUDA); ``"auto"`` takes it wherever it is built for the tensors' device;
* ``"chunked"`` (``chunked.py``, alias ``"cpu"``): the same values with vectorised PyTorch, chunked over
  (i, j, sample), on any device; ``"auto"`` falls back to it;
* ``"reference"``: HBI's loop, ported.

Both engines implement :class:`~xloss.banzhaf.engine.BanzhafEngine`.  The result is a target, not a loss: it
has no gradient, so this family has no autograd Function (and no custom ops besides the compiled one); it is
computed under ``no_grad`` from detached inputs and never requires grad.

Coalitions come from a counter-based hash of ``(seed, b, i, j, sample, element)`` (``xloss/csrc/banzhaf.h``,
re-implemented in ``chunked.py``), so one seed gives the same coalitions on every engine and device; the seed is
one int64 drawn from ``generator`` (or torch's default CPU generator: reproducible under ``torch.manual_seed``).
Explicit coalitions can be passed instead (tests).
"""

from __future__ import annotations

import numbers

import torch

from .. import _checks, _dispatch
from ..reference import banzhaf as _reference
from . import chunked as _chunked
from .compiled import OP, cuda_op_available, op_available

MODES = ("hbi", "textbook")
BACKENDS = _dispatch.BACKENDS  # "auto", the engines ("compiled", "chunked", "reference"; "triton" has no
#                                route here) and the old names "cpu" (= "chunked") and "cuda" (= "compiled")
DEFAULT_SAMPLES = 100  # HBI's


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
    _dispatch.canonical(backend)  # ValueError for an unknown name
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
    """One int64 seed from ``generator`` (on its device), or from torch's default CPU generator.

    The seed is a Python int (the kernels take it by value), so it is read back: from CPU memory for the default
    generator or a CPU one (no device sync), from the device for a CUDA generator (one sync per call; pass a CPU
    generator, or explicit ``coalitions``, inside a CUDA graph).
    """
    if generator is None:
        return int(torch.randint(0, 2**62, (1,)).item())
    return int(torch.randint(0, 2**62, (1,), generator=generator, device=generator.device).item())


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

    A distillation target, not a loss: it has no gradient, so no autograd Function stands behind it; the engine
    that ``xloss._dispatch`` picks runs under ``no_grad``.

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
        backend: ``"auto"`` (the compiled op where it is built for sim's device, else the chunked PyTorch
            engine), ``"compiled"`` (alias ``"cuda"``: the compiled op, on CPU or CUDA tensors; RuntimeError
            where it is not built), ``"chunked"`` (alias ``"cpu"``: vectorised PyTorch, any device) or
            ``"reference"`` (the loop port; it samples with ``torch.rand`` on ``generator``, so its random
            coalitions differ from the engines').

    Returns:
        ``[B, T, V]`` in sim's dtype (computed in fp32, fp64 for fp64), exactly zero outside
        ``text_mask ⊗ video_mask``, not requiring grad (a distillation target; inputs that require grad are
        detached).  Non-finite values follow the definition on every backend: ``L̄`` is sim on the coalition
        and exactly 0 elsewhere, so a NaN or inf reaches exactly the values whose coalitions hold it (a NaN
        in a max is the max), and padded positions of sim and the weights never influence anything.

    Raises:
        TypeError, ValueError: bad arguments (the message names the argument and the shapes).
        RuntimeError: ``backend="compiled"`` (or ``"cuda"``) where the compiled op is not available for sim's
            device.
    """
    samples = _check(sim, text_weight, video_weight, text_mask, video_mask, num_samples, mode, generator,
                     coalitions, backend)
    b, t_len, v_len = sim.shape
    dev = sim.device
    name = _dispatch.resolve("banzhaf", backend, dev, sim.dtype)
    with torch.no_grad():
        sim = sim.detach()
        p, q = text_weight.detach().to(sim.dtype), video_weight.detach().to(sim.dtype)
        if name == "reference":
            return _reference.banzhaf_interaction(
                sim, p, q, text_mask, video_mask, num_samples=samples, mode=mode, generator=generator,
                coalitions=coalitions,
            )
        tm = torch.ones(b, t_len, dtype=torch.bool, device=dev) if text_mask is None else text_mask
        vm = torch.ones(b, v_len, dtype=torch.bool, device=dev) if video_mask is None else video_mask
        seed = draw_seed(generator) if coalitions is None else 0
        engine = _dispatch.engine("banzhaf", name)
        return engine.banzhaf_interaction(sim, p, q, tm, vm, samples, seed, coalitions, mode)


coalition_bits = _chunked.coalition_bits

__all__ = ["OP", "banzhaf_interaction", "coalition_bits", "cuda_op_available", "draw_seed", "op_available"]
