"""The interface every late-interaction engine implements (``chunked.py``, ``triton.py``), stated once.

The autograd Function (``__init__``) runs the two sweeps through the custom ops of ``ops.py``
(``xloss::maxsim_forward``, ``xloss::maxsim_backward``); the token weights before (mask, mean normalisation,
user weights) and the cross-entropy after are plain torch ops in the public functions, once for every engine.

Shapes: ``q [Nq, Lq, D]``, ``d [Nd, Ld, D]`` (same dtype: float32/float16/bfloat16, and float64 for the chunked
engine; the Triton engine raises TypeError for float64); ``q_w [Nq, Lq]``, ``d_w [Nd, Ld]`` the final token
weights (0 for invalid tokens) in the accumulation dtype (fp32 for half and fp32 inputs, fp64 for fp64), ``d_w``
None unless ``d2q``; ``q_valid [Nq, Lq]``, ``d_valid [Nd, Ld]`` bool.  Indices are int16 (int32 when the other
side has more than 32767 tokens).

Padding contract (every engine): masked-out embeddings may hold anything (NaN, inf), and the forward sweeps
never let a masked-out token influence a result: it is not a candidate of the other side's max in exclude
mode, a candidate of exactly 0 in zero mode (replaced, not ``0·x``: ``0·inf`` is NaN), and its own entries are
value 0, index -1.  The gradient sweeps get them as zeros (the autograd Function replaces them first).  Between valid tokens NaN and inf propagate as ``torch.max`` does
(a NaN is the max, at the first NaN's index; a max over valid ``-inf`` similarities is ``-inf``, not "none").
"""

from __future__ import annotations

from typing import Protocol

from torch import Tensor

Aux = tuple[Tensor, Tensor | None] | None  # (idx, val) of one direction; val None when not needed
Six = tuple[Tensor | None, Tensor | None, Tensor | None, Tensor | None, Tensor | None, Tensor | None]
Four = tuple[Tensor | None, Tensor | None, Tensor | None, Tensor | None]


class MaxSimEngine(Protocol):
    """Every query against every document (``maxsim``, ``late_interaction_loss``)."""

    def maxsim_fwd(self, q: Tensor, d: Tensor, q_w: Tensor, d_w: Tensor | None, q_valid: Tensor, d_valid: Tensor,
                   zero_mode: bool, q2d: bool, d2q: bool, *, need_aux: bool = True, q_masked: bool = True,
                   d_masked: bool = True) -> Six:
        """Forward sweep: the scores of one or both directions from the same similarity tiles.

        ``zero_mode``: invalid tokens score exactly 0 and still compete for the max (PyLate); else they never
        win (``exclude``).  ``need_aux``: also return the arg-max indices and maxima (for the backward); False
        returns None for them and skips the index search.  ``q_masked``/``d_masked``: False when that side had
        no mask (all valid): an engine may then skip applying it.

        Returns:
            ``(s_q2d, idx_q2d, val_q2d, s_d2q, idx_d2q, val_d2q)``, None for a direction not asked:
            ``s_q2d [Nq, Nd] = Σ_t q_w[a,t]·val_q2d[a,b,t]``, ``val_q2d [Nq, Nd, Lq]`` the max over the document
            tokens, ``idx_q2d [Nq, Nd, Lq]`` its arg-max (lowest on ties); value 0 and index -1 at a masked-out
            query token and where no document token is a candidate; d2q the same with ``[Nq, Nd, Ld]`` and
            ``d_w``.  Accumulation dtype.
        """

    def maxsim_bwd(self, q: Tensor, d: Tensor, q_w: Tensor, d_w: Tensor | None, q_valid: Tensor, d_valid: Tensor,
                   zero_mode: bool, aux_q2d: Aux, aux_d2q: Aux, g_q2d: Tensor | None, g_d2q: Tensor | None,
                   need_q: bool, need_d: bool, need_qw: bool, need_dw: bool) -> Four:
        """Gradient sweep: the incoming ``g_q2d``/``g_d2q [Nq, Nd]`` (None: none) routed through the arg-max
        indices of ``aux_*`` (``(idx, val)`` of the forward; None for a direction not computed).

        Returns:
            ``(dq [Nq, Lq, D], dd [Nd, Ld, D], dq_w [Nq, Lq], dd_w [Nd, Ld])`` in the accumulation dtype, None
            where not needed (or zero).
        """


class MaxSimPairsEngine(Protocol):
    """Query a against document a only (``maxsim_pairs``), and the grouped layout: ``chunked.py`` and
    ``triton.py`` implement it."""

    def maxsim_pairs_fwd(self, q: Tensor, d: Tensor, q_w: Tensor, d_w: Tensor | None, q_valid: Tensor,
                         d_valid: Tensor, zero_mode: bool, q2d: bool, d2q: bool, *, need_aux: bool = True,
                         q_masked: bool = True, d_masked: bool = True, group: int = 1) -> Six:
        """As :meth:`MaxSimEngine.maxsim_fwd` with ``Nq == Nd == N``: ``s [N]``, ``idx``/``val [N, Lq]`` (q2d) and
        ``[N, Ld]`` (d2q).  ``group`` > 1 (q2d only): ``Nd = Nq·group``, query a against documents
        ``a·group … a·group + group - 1`` (``maxsim_grouped``); the outputs have ``Nd`` rows."""

    def maxsim_pairs_bwd(self, q: Tensor, d: Tensor, q_w: Tensor, d_w: Tensor | None, q_valid: Tensor,
                         d_valid: Tensor, zero_mode: bool, aux_q2d: Aux, aux_d2q: Aux, g_q2d: Tensor | None,
                         g_d2q: Tensor | None, need_q: bool, need_d: bool, need_qw: bool, need_dw: bool,
                         group: int = 1) -> Four:
        """As :meth:`MaxSimEngine.maxsim_bwd` for the aligned-pair scores (``g [Nd]``; ``dq``, ``dq_w`` of q's
        shape: summed over each query's ``group`` documents)."""


__all__ = ["MaxSimEngine", "MaxSimPairsEngine"]
