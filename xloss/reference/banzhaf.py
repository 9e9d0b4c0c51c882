"""Monte-Carlo Banzhaf interaction of HBI (Jin et al., CVPR 2023), SPEC.md §6: the spec in code.

A readable port of HBI's ``BanzhafInteraction`` loop (``HBI/models/banzhaf.py``, after its fix of 2023-11-16):
one Python iteration per (word i, frame j, sample), each evaluating four coalition values for the whole batch
with a dozen small tensor ops.  It is what the compiled op and the PyTorch fallback are tested against, and the
"naive" implementation of ``python -m xloss.bench --family banzhaf``.

Value of a coalition (``S_t`` words, ``S_v`` frames) for one batch row, with ``L`` the ``[T, V]`` similarities::

    L̄ = L on S_t × S_v, 0 elsewhere          (the maxima below run over the whole padded grid, zeros included)
    wᵗ = softmax_t(p_t on S_t, -9e15 elsewhere),   wᵛ = softmax_v(q_v on S_v, -9e15 elsewhere)
    f(S_t, S_v) = ½ [Σ_t wᵗ_t max_v L̄_tv + Σ_v wᵛ_v max_t L̄_tv]

and the interaction of word i and frame j, averaged over ``num_samples`` coalitions ``S_t ⊆ valid words \\ {i}``,
``S_v ⊆ valid frames \\ {j}`` (each element kept with probability ½)::

    I_ij = E[f(S ∪ {i, j}) − f(S_t ∪ {i}, S_v) − f(S_t, S_v ∪ {j}) + f(S)],   masked by text_mask ⊗ video_mask.

``mode="textbook"`` evaluates ``f(S ∪ {i, j}) = f(S_t ∪ {i}, S_v ∪ {j})``.  ``mode="hbi"`` reproduces HBI's code:
only the single entry ``(i, j)`` is added to ``L̄`` of ``f(S)``, and the weights are a softmax over
``S_t ∪ {i}`` of the already-softmaxed weights of ``f(S)`` with the raw ``p_i`` at position i (likewise for
frames with ``q_j``).

HBI multiplies the similarities by 1000 before the loop; here ``sim`` is used as given, so pass ``1000 * sim``
to reproduce HBI's numbers (every value is positively homogeneous of degree one in ``sim``).

Non-finite values follow the definition: ``L̄`` is ``L`` on the coalition and exactly 0 elsewhere (a ``where``,
not HBI's ``sim * mask``, whose ``0·NaN`` would let an entry outside the coalition poison every value), so a
NaN or inf entry reaches exactly the values whose coalition holds it, and padded positions (outside
``text_mask ⊗ video_mask``) never influence anything; the result there is exactly 0.  Computed in fp32 for
half inputs (HBI's -9e15 overflows float16), fp64 for fp64, and returned in sim's dtype, as the engines do.
"""

from __future__ import annotations

import torch

MODES = ("hbi", "textbook")
NEG = -9e15  # HBI's mask value for the weights of tokens outside a coalition


def _on(sim: torch.Tensor, tm: torch.Tensor, vm: torch.Tensor) -> torch.Tensor:
    """``L̄``: sim on the coalition ``tm ⊗ vm`` (0/1 floats), exactly 0 elsewhere, whatever sim holds there."""
    zero = torch.zeros((), dtype=sim.dtype, device=sim.device)
    return torch.where((tm[:, :, None] * vm[:, None, :]) != 0, sim, zero)


def _value(sim: torch.Tensor, tm: torch.Tensor, vm: torch.Tensor, p: torch.Tensor, q: torch.Tensor):
    """f for coalition masks ``tm [B, T]``, ``vm [B, V]`` (0/1 floats): the value ``[B]`` and the weights."""
    masked = _on(sim, tm, vm)
    wt = torch.softmax(p.masked_fill(tm == 0, NEG), dim=-1)
    wv = torch.softmax(q.masked_fill(vm == 0, NEG), dim=-1)
    return _combine(masked, wt, wv), masked, wt, wv


def _combine(masked: torch.Tensor, wt: torch.Tensor, wv: torch.Tensor) -> torch.Tensor:
    t2v = (masked.amax(dim=-1) * wt).sum(-1)
    v2t = (masked.amax(dim=-2) * wv).sum(-1)
    return (t2v + v2t) / 2.0


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
) -> torch.Tensor:
    """HBI's Banzhaf interaction, one (i, j, sample) at a time (see the module docstring for the formula).

    Args:
        sim: ``[B, T, V]`` word-frame similarities ``L``.
        text_weight: ``[B, T]`` word weights ``p`` (HBI: softmaxed over the valid words).
        video_weight: ``[B, V]`` frame weights ``q``.
        text_mask: ``[B, T]`` bool, True = valid word (None: all valid).
        video_mask: ``[B, V]`` bool, True = valid frame (None: all valid).
        num_samples: coalitions per (i, j); None means 100 (HBI's), or ``coalitions.shape[3]``.
        mode: ``"hbi"`` (HBI's code) or ``"textbook"`` (the Banzhaf interaction as defined).
        generator: draws the coalitions (``torch.rand(...) > 0.5`` per word and frame, as HBI does) when
            ``coalitions`` is None.  Its draws are not the counter-based bits of the fast paths.
        coalitions: explicit coalitions, bool or uint8 ``[B, T, V, num_samples, T + V]``: entry
            ``[b, i, j, s, t]`` (t < T) says whether word t is in sample s's coalition for the pair (i, j) of
            batch row b, entry ``[b, i, j, s, T + v]`` the same for frame v.  Bits of i, j and of padded
            positions are ignored (those are never in the coalition).

    Returns:
        ``[B, T, V]`` interactions in sim's dtype (computed in fp32 for half inputs), exactly zero outside
        ``text_mask ⊗ video_mask``, without gradient.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    b, t_len, v_len = sim.shape
    if num_samples is None:
        num_samples = coalitions.shape[3] if coalitions is not None else 100
    with torch.no_grad():
        out_dtype = sim.dtype
        dtype = torch.float64 if sim.dtype == torch.float64 else torch.float32
        sim = sim.detach().to(dtype)
        tmask = (torch.ones(b, t_len, dtype=torch.bool, device=sim.device) if text_mask is None else text_mask).to(dtype)
        vmask = (torch.ones(b, v_len, dtype=torch.bool, device=sim.device) if video_mask is None else video_mask).to(dtype)
        p, q = text_weight.detach().to(dtype), video_weight.detach().to(dtype)
        out = torch.zeros_like(sim)
        gen_dev = generator.device if generator is not None else torch.device("cpu")
        for i in range(t_len):
            for j in range(v_len):
                for s in range(num_samples):
                    if coalitions is not None:
                        s_t = coalitions[:, i, j, s, :t_len].to(dtype)
                        s_v = coalitions[:, i, j, s, t_len:].to(dtype)
                    else:  # HBI: torch.rand(mask.size()) > 0.5, words then frames
                        s_t = (torch.rand(b, t_len, generator=generator, device=gen_dev) > 0.5).to(sim.device, dtype)
                        s_v = (torch.rand(b, v_len, generator=generator, device=gen_dev) > 0.5).to(sim.device, dtype)
                    s_t[:, i], s_v[:, j] = 0, 0
                    tm, vm = tmask * s_t, vmask * s_v  # the coalition S: valid, sampled, without i and j

                    f_s, masked, wt, wv = _value(sim, tm, vm, p, q)
                    if mode == "hbi":
                        # HBI: add only the entry (i, j); re-softmax the coalition's weights with the raw p_i, q_j.
                        masked = masked.clone()
                        masked[:, i, j] = sim[:, i, j]
                        wt2 = wt.masked_fill(tm == 0, NEG)
                        wt2[:, i] = p[:, i]
                        wv2 = wv.masked_fill(vm == 0, NEG)
                        wv2[:, j] = q[:, j]
                        f_ij = _combine(masked, torch.softmax(wt2, dim=-1), torch.softmax(wv2, dim=-1))
                    else:
                        tm_i, vm_j = tm.clone(), vm.clone()
                        tm_i[:, i], vm_j[:, j] = 1, 1
                        f_ij = _value(sim, tm_i, vm_j, p, q)[0]
                    tm_i = tm.clone()
                    tm_i[:, i] = 1
                    vm_j = vm.clone()
                    vm_j[:, j] = 1
                    f_i = _value(sim, tm_i, vm, p, q)[0]
                    f_j = _value(sim, tm, vm_j, p, q)[0]
                    out[:, i, j] += f_ij - f_i - f_j + f_s
        return _on(out / num_samples, tmask, vmask).to(out_dtype)
