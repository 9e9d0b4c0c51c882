"""Integrations with training libraries; each is imported on first use, so ``import xloss`` never pulls them in.

* ``xloss.integrations.sentence_transformers``: ``MultipleNegativesRankingLoss`` for ``SentenceTransformerTrainer``,
  computed by ``xloss.info_nce``, with gradient caching through ``xloss.GradCache`` (needs sentence-transformers).
"""

from __future__ import annotations

_SUBMODULES = ("sentence_transformers",)


def __getattr__(name):
    # ``xloss.integrations.sentence_transformers`` imports sentence-transformers (and transformers): seconds,
    # and an optional dependency.  Only a user who asks for it pays.
    if name in _SUBMODULES:
        import importlib

        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = list(_SUBMODULES)
