"""sentence-transformers: ``MultipleNegativesRankingLoss`` computed by ``xloss.info_nce``, gradient caching built in.

A drop-in for ``SentenceTransformerTrainer``: the constructor follows sentence-transformers'
``MultipleNegativesRankingLoss`` (``model``, ``scale``, ``similarity_fct``) and its cached variant
(``mini_batch_size``, ``mini_batch_num_tokens``), with ``symmetric=True`` for the doc→query term::

    from xloss.integrations.sentence_transformers import MultipleNegativesRankingLoss

    loss = MultipleNegativesRankingLoss(model, scale=20.0, mini_batch_size=32)   # cached: any batch size
    trainer = SentenceTransformerTrainer(model=model, train_dataset=ds, loss=loss)

The logits never exist (``xloss.info_nce`` streams them), and with ``mini_batch_size`` (or
``mini_batch_num_tokens``) the encoder's activations are bounded too, through ``xloss.GradCache``.

This module imports sentence-transformers; ``import xloss`` does not import this module.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

try:
    from sentence_transformers.util import cos_sim, dot_score
except ImportError as exc:  # the optional dependency is missing: say what to install
    raise ImportError("xloss.integrations.sentence_transformers needs sentence-transformers: "
                      "pip install sentence-transformers") from exc

from ..gradcache import GradCache
from ..infonce import info_nce

__all__ = ["MultipleNegativesRankingLoss"]

_SIMILARITIES = {"cos_sim": True, "dot_score": False}  # name -> normalise first


class MultipleNegativesRankingLoss(nn.Module):
    """In-batch negatives ranking loss (InfoNCE) for (anchor, positive[, negative_1, ..., negative_n]) columns.

    For each anchor ``a_i`` the candidates are every positive and every hard negative of the batch; the loss
    is the mean cross-entropy of ``scale · sim(a_i, ·)`` with ``p_i`` as the target, i.e.
    ``xloss.info_nce(a, cat([p, n_1, ...]), logit_scale=scale, symmetric=symmetric)``.

    Equal (values and gradients) to sentence-transformers' ``MultipleNegativesRankingLoss(model, scale,
    similarity_fct)``; with ``symmetric=True`` to its ``directions=("query_to_doc", "doc_to_query"),
    partition_mode="per_direction"`` (the old ``MultipleNegativesSymmetricRankingLoss``); with
    ``mini_batch_size`` to ``CachedMultipleNegativesRankingLoss`` (same gradients, chunked memory).

    Args:
        model: the ``SentenceTransformer`` to train.
        scale: multiplies the similarities (``1 / temperature``); 20 for cosine similarity.
        similarity_fct: ``sentence_transformers.util.cos_sim`` (embeddings L2-normalised first) or
            ``dot_score`` (raw dot products; pick a smaller scale).  xloss computes dot products, so other
            similarity functions are refused.
        symmetric: add the doc→query term: ``½ (anchor→docs + positive→anchors)``.
        mini_batch_size: turn gradient caching on: embed at most this many texts at a time
            (``xloss.GradCache``), so memory no longer grows with the batch's activations; one extra forward.
        mini_batch_num_tokens: gradient caching with chunks of at most this many non-padding tokens (by the
            attention mask) instead of, or as well as, ``mini_batch_size`` rows.

    Inputs: one tokenized feature dict per dataset column, anchors first, then positives, then any hard
    negatives, all of the same batch size; labels are ignored (the positive of anchor i is positive i).
    """

    def __init__(self, model: nn.Module, scale: float = 20.0, similarity_fct: Callable[[Tensor, Tensor], Tensor] = cos_sim,
                 *, symmetric: bool = False, mini_batch_size: int | None = None,
                 mini_batch_num_tokens: int | None = None) -> None:
        super().__init__()
        if not scale > 0:
            raise ValueError(f"Scale must be a positive value, got {scale!r}")
        name = _similarity_name(similarity_fct)
        for arg, value in (("mini_batch_size", mini_batch_size), ("mini_batch_num_tokens", mini_batch_num_tokens)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"{arg} must be a positive integer or None, got {value!r}")
        self.model = model
        self.scale = scale
        self.similarity_fct = similarity_fct
        self.symmetric = bool(symmetric)
        self.mini_batch_size = mini_batch_size
        self.mini_batch_num_tokens = mini_batch_num_tokens
        self._normalize = _SIMILARITIES[name]

    @property
    def cached(self) -> bool:
        """Whether the embeddings are computed through gradient caching."""
        return self.mini_batch_size is not None or self.mini_batch_num_tokens is not None

    def forward(self, sentence_features: Iterable[dict[str, Tensor]], labels: Tensor | None = None) -> Tensor:
        features = list(sentence_features)
        if len(features) < 2:
            raise ValueError(f"Expected at least 2 inputs (anchors, positives[, negatives...]), got {len(features)}")
        sizes = [_batch_size(f, i) for i, f in enumerate(features)]
        if len(set(sizes)) > 1:
            raise ValueError("the columns must pair row by row (anchor i, positive i, negative i, ...), but their "
                             f"batch sizes differ: {sizes}")
        if not self.cached:
            return self.compute_loss_from_embeddings(_embed_columns(self.model, features), labels)
        # Built per call: the trainer may have swapped self.model for its DDP-wrapped model, whose no_sync()
        # GradCache then finds inside the wrapper.
        cache = GradCache(_SentenceEmbedding(self.model), lambda *embeddings: self.compute_loss_from_embeddings(
            list(embeddings), labels), chunk_size=self.mini_batch_size, token_budget=self.mini_batch_num_tokens)
        return cache.loss(*features)  # the trainer's backward() runs the second pass

    def compute_loss_from_embeddings(self, embeddings: list[Tensor], labels: Tensor | None = None) -> Tensor:
        """The loss of the columns' embeddings ``[anchors, positives, negatives_1, ...]``, each ``[N, D]``."""
        if len(embeddings) < 2:
            raise ValueError(f"Expected at least 2 embeddings, got {len(embeddings)}")
        anchors, docs = embeddings[0], torch.cat(embeddings[1:])
        if self._normalize:
            anchors, docs = F.normalize(anchors, p=2, dim=-1), F.normalize(docs, p=2, dim=-1)
        return info_nce(anchors, docs, logit_scale=self.scale, symmetric=self.symmetric)

    def get_config_dict(self) -> dict[str, Any]:
        return {
            "scale": self.scale,
            "similarity_fct": _similarity_name(self.similarity_fct),
            "symmetric": self.symmetric,
            "mini_batch_size": self.mini_batch_size,
            "mini_batch_num_tokens": self.mini_batch_num_tokens,
        }

    @property
    def temperature(self) -> float:
        return 1.0 / self.scale

    @property
    def citation(self) -> str:
        if self.cached:
            return """
@misc{gao2021scaling,
    title={Scaling Deep Contrastive Learning Batch Size under Memory Limited Setup},
    author={Luyu Gao and Yunyi Zhang and Jiawei Han and Jamie Callan},
    year={2021},
    eprint={2101.06983},
    archivePrefix={arXiv},
    primaryClass={cs.LG}
}
"""
        return """
@misc{oord2019representationlearningcontrastivepredictive,
      title={Representation Learning with Contrastive Predictive Coding},
      author={Aaron van den Oord and Yazhe Li and Oriol Vinyals},
      year={2019},
      eprint={1807.03748},
      archivePrefix={arXiv},
      primaryClass={cs.LG},
      url={https://arxiv.org/abs/1807.03748},
}
"""


class _SentenceEmbedding(nn.Module):
    """The model's pooled ``sentence_embedding`` only: the token embeddings it also returns are not cached."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, features: dict[str, Tensor]) -> Tensor:
        return self.model(features)["sentence_embedding"]


def _similarity_name(similarity_fct: Callable) -> str:
    if similarity_fct is cos_sim or similarity_fct is dot_score:
        return similarity_fct.__name__
    name = getattr(similarity_fct, "__name__", type(similarity_fct).__name__)
    if name not in _SIMILARITIES:
        raise ValueError(f"similarity_fct must be sentence_transformers.util.cos_sim or dot_score (xloss computes "
                         f"scaled dot products of the embeddings), got {name}")
    return name


def _batch_size(features: dict[str, Any], column: int) -> int:
    for key in ("input_ids", "attention_mask"):
        if isinstance(features.get(key), Tensor):
            return features[key].shape[0]
    for value in features.values():
        if isinstance(value, Tensor) and value.dim() > 0:
            return value.shape[0]
    raise ValueError(f"column {column} holds no batched tensor (keys {sorted(features)})")


def _embed_columns(model: nn.Module, features: list[dict[str, Tensor]]) -> list[Tensor]:
    """The columns' sentence embeddings as sentence-transformers' own losses compute them (one merged forward
    where the columns allow it, so dropout draws the same masks as in its MultipleNegativesRankingLoss)."""
    try:
        from sentence_transformers.base.losses.merged_forward import embed_columns
    except ImportError:  # older sentence-transformers: one forward per column, as its losses did then
        return [model(f)["sentence_embedding"] for f in features]
    return embed_columns(model, features)
