"""sentence-transformers' multi-vector scoring functions computed by xloss, to pass as a loss's ``similarity_fct``.

sentence-transformers (v6) trains ``MultiVectorEncoder`` models with unfused MaxSim and XTR scoring: each
builds the ``[Q, Lq, Q·N, Ld]`` similarity tensor.  These functions have the signatures and the semantics of
``sentence_transformers.multi_vector_encoder.scoring`` (masked document tokens never win a max, an all-zero
token row counts as padding where no mask is given, a document with no valid token scores ``-1e9``, scores in
float32 or float64) and run xloss's streaming engines::

    from sentence_transformers.multi_vector_encoder.losses import (
        MultiVectorDistillKLDivLoss, MultiVectorMultipleNegativesRankingLoss)
    from xloss.integrations import multi_vector as xmv

    loss = MultiVectorMultipleNegativesRankingLoss(model, similarity_fct=xmv.colbert_scores)
    loss = MultiVectorMultipleNegativesRankingLoss(model, similarity_fct=xmv.XTRScores(top_k=256))
    loss = MultiVectorDistillKLDivLoss(model, similarity_fct=xmv.colbert_kd_scores)

Documents come stacked per query, ``[Q, N, Ld, D]`` with masks ``[Q, N, Ld]``; the contrastive scorers return
``[Nq, Q·N]`` query-major (column ``j·N + n``: query j's n-th document), the ``*_kd_*`` scorers ``[Q, N]``.
``chunk_elements`` is accepted for signature compatibility and ignored: xloss tiles by ``XLOSS_CPU_TILE_MB``.
This module does not import sentence-transformers.
"""

from __future__ import annotations

import torch

from ..late_interaction import maxsim
from ..late_interaction.grouped import maxsim_grouped
from ..xtr import xtr_scores as _xtr_scores
from .pylate import _tensor  # array-likes as tensors (the same rule for both scorer sets)

EMPTY_DOCUMENT_SCORE = -1e9  # sentence-transformers' score of a document with no valid token


def _zero_rows(x: torch.Tensor) -> torch.Tensor:
    """sentence-transformers' fallback mask: a token whose embedding is all zeros is padding."""
    return (x != 0).any(dim=-1)


def _flatten(d, d_mask):
    """A stacked ``[Q, N, Ld, D]`` as ``[Q·N, Ld, D]`` (query-major), masks alike; a 3-D d as it is."""
    if d.dim() == 4:
        d_mask = None if d_mask is None else d_mask.reshape(d.shape[0] * d.shape[1], d.shape[2])
        d = d.reshape(d.shape[0] * d.shape[1], *d.shape[2:])
    return d, d_mask


def _empty_documents(scores: torch.Tensor, d_mask) -> torch.Tensor:
    """Scores of documents without a valid token set to :data:`EMPTY_DOCUMENT_SCORE` (below every real one)."""
    if d_mask is None:
        return scores
    empty = ~(d_mask != 0).any(dim=-1)  # [Nd] (a column of the scores) or [Q, N] (an entry)
    return scores.masked_fill(empty if empty.dim() == 2 else empty[None, :], EMPTY_DOCUMENT_SCORE)


def _scores_dtype(q: torch.Tensor) -> torch.dtype:
    return torch.float64 if q.dtype == torch.float64 else torch.float32


def _colbert(q, d, q_mask, d_mask, length_normalize: bool, grouped: bool) -> torch.Tensor:
    """MaxSim sums with sentence-transformers' conventions: zero-row masks where none is given, the empty
    documents' sentinel, then the division by the query's valid token count (``length_normalize``)."""
    q_mask = _zero_rows(q) if q_mask is None else q_mask != 0
    d_mask = _zero_rows(d) if d_mask is None else d_mask != 0
    s = (maxsim_grouped if grouped else maxsim)(q, d, q_mask, d_mask).to(_scores_dtype(q))
    s = _empty_documents(s, d_mask)
    if length_normalize:
        s = s / q_mask.sum(dim=1, keepdim=True).clamp_min(1).to(s.dtype)
    return s


def colbert_scores(queries_embeddings, documents_embeddings, queries_mask=None, documents_mask=None,
                   chunk_elements=None, length_normalize: bool = False) -> torch.Tensor:
    """``sentence_transformers...scoring.colbert_scores``: ``[Nq, Q·N]`` MaxSim (``[Nq, Nd]`` for a 3-D
    ``[Nd, Ld, D]``); ``length_normalize``: divided by each query's valid token count (MeanMaxSim)."""
    q, d = _tensor(queries_embeddings), _tensor(documents_embeddings)
    d, dm = _flatten(d, _tensor(documents_mask))
    return _colbert(q, d, _tensor(queries_mask), dm, length_normalize, grouped=False)


def colbert_kd_scores(queries_embeddings, documents_embeddings, queries_mask=None, documents_mask=None,
                      chunk_elements=None, length_normalize: bool = False) -> torch.Tensor:
    """``sentence_transformers...scoring.colbert_kd_scores``: ``[Q, N]``, each query against its own documents."""
    return _colbert(_tensor(queries_embeddings), _tensor(documents_embeddings), _tensor(queries_mask),
                    _tensor(documents_mask), length_normalize, grouped=True)


def xtr_scores(queries_embeddings, documents_embeddings, queries_mask=None, documents_mask=None, top_k: int = 256,
               chunk_elements=None) -> torch.Tensor:
    """``sentence_transformers...scoring.xtr_scores``: ``[Nq, Q·N]`` XTR scores (:func:`xloss.xtr_scores`, k =
    ``top_k``); without masks an all-zero token row is padding, as there."""
    q, d = _tensor(queries_embeddings), _tensor(documents_embeddings)
    d, dm = _flatten(d, _tensor(documents_mask))
    qm = _tensor(queries_mask)
    qm = _zero_rows(q) if qm is None else qm
    dm = _zero_rows(d) if dm is None else dm
    s = _xtr_scores(q, d, qm, dm, k=top_k)
    return _empty_documents(s.to(_scores_dtype(q)), dm)


def xtr_kd_scores(queries_embeddings, documents_embeddings, queries_mask=None, documents_mask=None,
                  top_k: int = 256, chunk_elements=None) -> torch.Tensor:
    """``sentence_transformers...scoring.xtr_kd_scores``: the ``[Q, N]`` blocks of :func:`xtr_scores` that pair
    each query with its own documents (the top-k still runs over every in-batch document token)."""
    d = _tensor(documents_embeddings)
    s = xtr_scores(queries_embeddings, d, queries_mask, documents_mask, top_k=top_k)
    n_q, n = d.shape[0], d.shape[1]
    own = torch.arange(n_q, device=s.device)[:, None] * n + torch.arange(n, device=s.device)
    return s.gather(1, own)


class XTRScores:
    """:func:`xtr_scores` with ``top_k`` bound (sentence-transformers' ``XTRScores``)."""

    def __init__(self, top_k: int = 256, *, chunk_elements=None) -> None:
        self.top_k = top_k
        self.chunk_elements = chunk_elements

    def get_config_dict(self) -> dict:
        return {"top_k": self.top_k, "chunk_elements": self.chunk_elements}

    def __call__(self, queries_embeddings, documents_embeddings, queries_mask=None, documents_mask=None):
        return xtr_scores(queries_embeddings, documents_embeddings, queries_mask, documents_mask, top_k=self.top_k)


class XTRKDScores(XTRScores):
    """:func:`xtr_kd_scores` with ``top_k`` bound (sentence-transformers' ``XTRKDScores``)."""

    def __call__(self, queries_embeddings, documents_embeddings, queries_mask=None, documents_mask=None):
        return xtr_kd_scores(queries_embeddings, documents_embeddings, queries_mask, documents_mask,
                             top_k=self.top_k)


__all__ = ["EMPTY_DOCUMENT_SCORE", "XTRKDScores", "XTRScores", "colbert_kd_scores", "colbert_scores",
           "xtr_kd_scores", "xtr_scores"]
