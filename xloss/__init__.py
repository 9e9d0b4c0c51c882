"""xloss: fused, memory-efficient losses for cross-modal contrastive learning.

Public API::

    xloss.info_nce(query, key, logit_scale=..., ...)   # CLIP / InfoNCE without the N×M logits
    xloss.reference.info_nce(...)                      # the naive definition (the spec)
    xloss.available_backends()                         # what this machine can run

See README.md and SPEC.md for the formulas.
"""

from . import reference
from ._backend import available_backends
from ._version import __version__
from .info_nce import info_nce

__all__ = ["info_nce", "reference", "available_backends", "__version__"]
