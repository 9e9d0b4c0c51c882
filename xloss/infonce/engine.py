"""The interface every InfoNCE engine implements (``chunked.py``, ``triton.py``), stated once.

The autograd Function (``__init__``) runs the two sweeps through the custom ops of ``ops.py`` and does
everything else (target terms, label smoothing, reduction, scale gradient) itself, once for every engine and
for one process or many.
"""

from __future__ import annotations

from typing import Protocol

from torch import Tensor


class InfoNCEEngine(Protocol):
    def lse(self, q: Tensor, k: Tensor, scale: Tensor, need_cols: bool, labels: Tensor,
            keep_logits: bool = False) -> tuple[Tensor, Tensor | None, Tensor, Tensor | None]:
        """Statistics sweep over the logits ``z = scale · q kᵀ``.

        Args:
            q: ``[N, D]``; k: ``[M, D]`` (same dtype and device); scale: 0-dim, accumulation dtype.
            need_cols: also compute the column statistics (symmetric loss).
            labels: ``[N]`` long, each query's positive key in ``[0, M)``.
            keep_logits: return the whole ``[N, M]`` logits for ``grad`` to reuse (only an engine whose
                ``keeps_logits`` can say True is asked to).

        Returns:
            ``row [2, N]`` (max, log Σ exp(z − max)) per row, ``col [2, M]`` the same per column (or None),
            ``z_pos [N]`` the positive logits read from the same tiles, ``logits [N, M]`` or None; all in the
            accumulation dtype (fp32 for fp16/bf16/fp32 inputs, fp64 for fp64).
        """

    def grad(self, q: Tensor, k: Tensor, scale: Tensor, row: Tensor, col: Tensor | None, a: Tensor,
             w: Tensor | None, logits: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Gradient sweep: ``dq_u = P k [N, D]`` and ``dk_u = Pᵀ q [M, D]`` (accumulation dtype) for
        ``P_ij = a_i·softmax_row(z)_ij + w_j·softmax_col(z)_ij`` (``w`` None: one-way)."""

    def keeps_logits(self, n: int, m: int, itemsize: int) -> bool:
        """Whether ``lse`` should keep the ``[n, m]`` logits for ``grad`` (a rule on shapes only)."""

    # -- Matryoshka prefixes (issue 12; see matryoshka.py) ---------------------------------------------------
    # dims = (d_1 < ... < d_P); cum^p_ij = <q_i[:d_p], k_j[:d_p]> accumulated slice by slice from the same tile;
    # z^p_ij = scale·cum^p_ij·rq^p_i·rk^p_j (rq, rk the inverse prefix norms; None: 1).  Neither sweep reads the
    # inputs once per prefix nor copies a prefix of them.

    def matryoshka_lse(self, q: Tensor, k: Tensor, rq: Tensor | None, rk: Tensor | None, scale: Tensor,
                       dims: list[int], need_cols: bool, labels: Tensor
                       ) -> tuple[Tensor, Tensor | None, Tensor]:
        """Statistics sweep of every prefix: ``row [P, 2, N]``, ``col [P, 2, M]`` (or None unless
        ``need_cols``) split LSE statistics of ``z^p`` and ``z_pos [P, N]`` (``z^p[i, labels[i]]`` from the same
        tiles); accumulation dtype.  ``rq [P, N]``, ``rk [P, M]`` in the accumulation dtype."""

    def matryoshka_grad(self, q: Tensor, k: Tensor, rq: Tensor | None, rk: Tensor | None, scale: Tensor,
                        dims: list[int], row: Tensor, col: Tensor | None, a: Tensor, w: Tensor | None,
                        labels: Tensor, pos: Tensor, u: Tensor | None, v: Tensor | None
                        ) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None]:
        """Gradient sweep: with, per prefix p,

            ``G^p_ij = a_pi·softmax_row(z^p)_ij + w_pj·softmax_col(z^p)_ij - pos_pi·[j = labels_i] - u_pi - v_pj``

        (``a``, ``pos``, ``u`` ``[P, N]``; ``w``, ``v`` ``[P, M]``; ``w``/``col`` None: one-way; ``u``/``v`` None:
        0) and ``H^p = G^p ∘ rq^p rk^pᵀ``, returns ``dq_u [N, D]`` with ``dq_u[:, d_{l-1}:d_l] = (Σ_{p>=l} H^p)
        k[:, d_{l-1}:d_l]``, ``dk_u [M, D]`` likewise with q, and the gradients of the loss with respect to the
        inverse norms, ``drq^p_i = Σ_j G^p_ij·scale·cum^p_ij·rk^p_j`` ``[P, N]`` and ``drk`` ``[P, M]`` (None
        without norms); accumulation dtype.  Weights may have any sign and be 0."""

    # -- structured targets (groups, exclude_self, false-negative margin, decoupled, hardness) --------------
    # Every tile (i, j) is described by the TARGET RULE below; the three sweeps share it.
    #
    #   raw_ij  = <q_i, k_j>                   (the tile's dot products, before the scale)
    #   z_ij    = scale · raw_ij
    #   self_ij = self_offset is not None and i - j == self_offset   (the pair (i, i) of the single-tower form;
    #             local indices, self_offset = key block's global offset - query block's global offset)
    #   Y_ij    = qg_i == kg_j and not self_ij                         (positive pair)
    #   ẑ_ij    = z_ij for Y_ij, z_ij + hardness · raw_ij otherwise    (hardness-weighted negatives)
    #   in_row_ij = not self_ij and not (decoupled and Y_ij)
    #               and not (margin is not None and not Y_ij and raw_ij > ref_r_i + margin)
    #   in_col_ij = the same with ref_c_j in place of ref_r_i
    #
    # Split statistics of an EMPTY set are (max, logsum) = (-inf, -inf); otherwise logsum = log Σ exp(ẑ - max).

    def positive_max(self, q: Tensor, k: Tensor, qg: Tensor, kg: Tensor, self_offset: int | None,
                     need_cols: bool) -> tuple[Tensor, Tensor | None]:
        """``ref_r [N] = max_{j: Y_ij} raw_ij`` and ``ref_c [M] = max_{i: Y_ij} raw_ij`` (None unless
        ``need_cols``); -inf where there is no positive.  Accumulation dtype.  Only the margin needs it."""

    def masked_lse(self, q: Tensor, k: Tensor, scale: Tensor, qg: Tensor, kg: Tensor, self_offset: int | None,
                   decoupled: bool, hardness: float, margin: float | None, ref_r: Tensor | None,
                   ref_c: Tensor | None, need_cols: bool
                   ) -> tuple[Tensor, Tensor | None, Tensor, Tensor | None]:
        """Statistics sweep under the target rule.

        Args:
            q ``[N, D]``, k ``[M, D]``, scale 0-dim (accumulation dtype); qg ``[N]``, kg ``[M]`` long group ids;
            ref_r ``[N]`` / ref_c ``[M]`` from ``positive_max`` when ``margin`` is not None (ref_c only with
            ``need_cols``), else None.

        Returns:
            ``row [2, N]``: split LSE of ``ẑ_i·`` over ``in_row``; ``col [2, M]`` the same over ``in_col`` per
            column (None unless ``need_cols``); ``pos_r [2, N]``: ``(Σ_j Y_ij z_ij, Σ_j Y_ij)`` (the positive
            logits' sum, without hardness, and their count as a float); ``pos_c [2, M]`` the same per column
            (None unless ``need_cols``).  Accumulation dtype.
        """

    def masked_grad(self, q: Tensor, k: Tensor, scale: Tensor, qg: Tensor, kg: Tensor, self_offset: int | None,
                    decoupled: bool, hardness: float, margin: float | None, ref_r: Tensor | None,
                    ref_c: Tensor | None, row: Tensor, col: Tensor | None, a: Tensor, w: Tensor | None,
                    pa: Tensor, pw: Tensor | None) -> tuple[Tensor, Tensor]:
        """Gradient sweep under the target rule: ``dq_u = G k [N, D]``, ``dk_u = Gᵀ q [M, D]`` (accumulation
        dtype) for

            ``G_ij = in_row_ij·a_i·exp(ẑ_ij - row_i) + in_col_ij·w_j·exp(ẑ_ij - col_j) - Y_ij·(pa_i + pw_j)``

        (``exp(ẑ - row) = exp((ẑ - max) - logsum)``; the column and ``pw`` parts absent when ``col`` is None).
        ``a``, ``w``, ``pa``, ``pw`` may have any sign and may be 0 (no contribution, never NaN, also for rows
        whose statistics are those of an empty set)."""
