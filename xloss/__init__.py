"""xloss: fused, memory-efficient losses for cross-modal contrastive learning.

Public API::

    xloss.info_nce(query, key, logit_scale=..., ...)   # CLIP / InfoNCE without the N×M logits
    xloss.maxsim(q, d, q_mask, d_mask, ...)            # late interaction (ColBERT / FILIP) scores [Nq, Nd]
    xloss.maxsim_pairs(q, d, ...)                      # query a against document a, [N]
    xloss.late_interaction_loss(q, d, logit_scale=...) # MaxSim scores, then cross-entropy
    xloss.symile_loss([x, y, z], logit_scale=...)      # Symile (multilinear inner product), n_squared streamed
    xloss.gram_loss(a, x, y, temperature=0.07)        # GRAM (Gram volume), no [N, N, k, k] tensor
    xloss.reference.info_nce(...)                      # the naive definition (the spec)
    xloss.available_backends()                         # what this machine can run

See README.md and SPEC.md for the formulas.
"""

from . import reference
from ._backend import available_backends
from ._version import __version__
from .gram import gram_loss, gram_volume
from .info_nce import info_nce
from .late_interaction import late_interaction_loss, maxsim, maxsim_pairs
from .symile import symile_loss

__all__ = [
    "__version__",
    "available_backends",
    "gram_loss",
    "gram_volume",
    "info_nce",
    "late_interaction_loss",
    "maxsim",
    "maxsim_pairs",
    "reference",
    "symile_loss",
]
