"""PyLate: its ColBERT scoring functions computed by xloss, to pass as a loss's ``score_metric``.

PyLate's losses take the scoring function as an argument; these have its signature and its semantics (masks
multiply the similarities: ``mask_mode="zero"``), without the ``[Nq, Nd, Lq, Ld]`` similarity tensor and with
xloss's arg-max backward::

    from pylate import losses
    from xloss.integrations import pylate as xp

    contrastive = losses.Contrastive(model, score_metric=xp.colbert_scores)      # in-batch negatives
    distillation = losses.Distillation(model, score_metric=xp.colbert_kd_scores)  # teacher scores [N, n]

Scores are float32 for half inputs (PyLate returns the input dtype) and float64 for float64.  ``backend`` is
xloss's (``"auto"``, ``"chunked"``, ``"triton"``, ``"reference"``), not PyLate's ``"torch"``/``"flash"``.
This module does not import PyLate.
"""

from __future__ import annotations

import torch

from ..late_interaction import maxsim, maxsim_pairs
from ..late_interaction.grouped import maxsim_grouped


def _tensor(x):
    return x if x is None or isinstance(x, torch.Tensor) else torch.as_tensor(x)


def colbert_scores(queries_embeddings, documents_embeddings, queries_mask=None, documents_mask=None,
                   backend: str | None = None) -> torch.Tensor:
    """PyLate's ``colbert_scores``: ``[Nq, Nd]`` MaxSim of every query against every document.

    ``documents_embeddings`` ``[Nd, Ld, D]``, or stacked ``[Q, N, Ld, D]`` (PyLate's ``Contrastive`` stacks each
    query's documents) scored as ``Q·N`` documents, query-major (``[Nq, Q·N]``).  Masks: 0/1 or bool, None =
    all valid.
    """
    q, d = _tensor(queries_embeddings), _tensor(documents_embeddings)
    dm = _tensor(documents_mask)
    if d.dim() == 4:
        dm = None if dm is None else dm.reshape(d.shape[0] * d.shape[1], d.shape[2])
        d = d.reshape(d.shape[0] * d.shape[1], *d.shape[2:])
    return maxsim(q, d, _tensor(queries_mask), dm, mask_mode="zero", backend=backend or "auto")


def colbert_kd_scores(queries_embeddings, documents_embeddings, queries_mask=None, documents_mask=None,
                      backend: str | None = None) -> torch.Tensor:
    """PyLate's ``colbert_kd_scores``: ``[N, n]`` MaxSim of each query against its own n documents
    (``documents_embeddings [N, n, Ld, D]``, ``documents_mask [N, n, Ld]``): :func:`xloss.maxsim_grouped`."""
    return maxsim_grouped(_tensor(queries_embeddings), _tensor(documents_embeddings), _tensor(queries_mask),
                          _tensor(documents_mask), mask_mode="zero", backend=backend or "auto")


def colbert_scores_pairwise(queries_embeddings, documents_embeddings, backend: str | None = None) -> torch.Tensor:
    """PyLate's ``colbert_scores_pairwise``: ``[N]`` MaxSim of query a against document a (no masks)."""
    return maxsim_pairs(_tensor(queries_embeddings), _tensor(documents_embeddings), mask_mode="zero",
                        backend=backend or "auto")


__all__ = ["colbert_kd_scores", "colbert_scores", "colbert_scores_pairwise"]
