"""The interface every teacher-distillation engine implements (``chunked.py``, ``triton.py``), stated once.

Two tile sweeps over the student logits ``z = scale · q kᵀ`` and the teacher logits ``t = tscale · tq tkᵀ``
(the teacher's width may differ from the student's); the autograd Function (``__init__``) does the rest.
"""

from __future__ import annotations

from typing import Protocol

from torch import Tensor


class DistillEngine(Protocol):
    def lse(self, q: Tensor, k: Tensor, scale: Tensor, tq: Tensor, tk: Tensor, tscale: Tensor, need_cols: bool
            ) -> tuple[Tensor, Tensor | None, Tensor, Tensor | None]:
        """Statistics sweep.

        Args:
            q ``[N, D]``, k ``[M, D]`` (student), tq ``[N, E]``, tk ``[M, E]`` (teacher; any float dtype); scale,
            tscale: 0-dim, accumulation dtype.  need_cols: also the column statistics (symmetric loss).

        Returns:
            ``row [2, N]``: the student's split LSE per row ``(max_j z_ij, log Σ_j exp(z_ij − max))``; ``col
            [2, M]`` the same per column (or None); ``trow [3, N]``: the teacher per row ``(max_j t_ij, Σ_j
            exp(t_ij − max), Σ_j exp(t_ij − max)·z_ij)``; ``tcol [3, M]`` the same per column over the queries (or
            None).  The teacher's statistics are kept unlogged so that partial ones (key blocks of a ring)
            merge by rescaling to a common max.  Accumulation dtype (fp32 for fp16/bf16/fp32, fp64 for fp64).
        """

    def grad(self, q: Tensor, k: Tensor, scale: Tensor, tq: Tensor, tk: Tensor, tscale: Tensor, row: Tensor,
             col: Tensor | None, trow: Tensor, tcol: Tensor | None, a: Tensor, w: Tensor | None
             ) -> tuple[Tensor, Tensor]:
        """Gradient sweep: ``dq_u = G k [N, D]``, ``dk_u = Gᵀ q [M, D]`` (accumulation dtype) for

            ``G_ij = a_i·(softmax_j(z_i·) − softmax_j(t_i·))_ij + w_j·(softmax_i(z_·j) − softmax_i(t_·j))_ij``

        with every softmax formed from split statistics ``[2, ·]`` (max, log-sum-exp relative to it): ``row``,
        ``col`` of the student, ``trow``, ``tcol`` of the teacher (``(max, log Σ exp(t − max))``).  The column
        part is absent when ``col`` is None."""
