"""xloss: fused, memory-efficient losses for cross-modal contrastive learning.

Public API::

    xloss.info_nce(query, key, logit_scale=..., ...)   # CLIP / InfoNCE without the N×M logits
    xloss.maxsim(q, d, q_mask, d_mask, ...)            # late interaction (ColBERT / FILIP) scores [Nq, Nd]
    xloss.maxsim_pairs(q, d, ...)                      # query a against document a, [N]
    xloss.maxsim_grouped(q, d, ...)                    # query a against its own n documents, [N, n]
    xloss.late_interaction_distill_loss(q, d, t, ...)  # ColBERTv2 / PyLate distillation from teacher scores
    xloss.xtr_scores(q, d, ..., k=...)                 # XTR: top-k token retrieval, no [Nq, Lq, Nd, Ld] tensor
    xloss.late_interaction_loss(q, d, logit_scale=...) # MaxSim scores, then cross-entropy
    xloss.sigmoid_loss(query, key, logit_scale=s, logit_bias=b)  # SigLIP, gradients in one sweep
    xloss.symile_loss(x, y, z, logit_scale=...)        # Symile (multilinear inner product), n_squared streamed
    xloss.banzhaf_interaction(sim, p, q, ...)          # HBI Monte-Carlo Banzhaf interaction [B, T, V]
    xloss.gram_loss(a, x, y, temperature=0.07)        # GRAM (Gram volume), no [N, N, k, k] tensor
    xloss.reference.info_nce(...)                      # the naive definition (the spec)
    xloss.nn.ClipLoss(...), xloss.nn.SigLipLoss(...)   # open_clip drop-ins; InfoNCELoss, ... modules
    xloss.available_backends()                         # what this machine can run

Every public loss follows one signature rule (``xloss/_api.py``): the tensors first, then keyword-only
``logit_scale`` | ``temperature``, ``labels``, the family's options, ``label_smoothing``, ``reduction``,
``backend`` (and ``group``, ``exchange``, ``grad_reduction`` across ranks).  ``backend`` names an engine of the
one dispatch table (``xloss/_dispatch.py``): "auto", "triton", "chunked", "compiled", "reference".

See README.md and SPEC.md for the formulas.
"""

from . import nn, reference
from ._dispatch import available_backends
from ._version import __version__
from .banzhaf import banzhaf_interaction
from .gradcache import GradCache
from .gram import gram_loss, gram_volume
from .infonce import info_nce
from .late_interaction import (
    late_interaction_distill_loss,
    late_interaction_loss,
    maxsim,
    maxsim_grouped,
    maxsim_pairs,
)
from .sigmoid import sigmoid_loss
from .soft_targets import cwcl_loss, distill_loss
from .symile import symile_loss
from .xtr import xtr_loss, xtr_scores


def __getattr__(name):
    # ``xloss.distributed`` is imported on first use: it pulls in torch._dynamo (for torch.compiler.disable),
    # which costs seconds and imports Triton, and a single-process user never needs it.
    if name == "distributed":
        import importlib

        return importlib.import_module(".distributed", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "GradCache",
    "__version__",
    "available_backends",
    "banzhaf_interaction",
    "cwcl_loss",
    "distill_loss",
    "distributed",
    "gram_loss",
    "gram_volume",
    "info_nce",
    "late_interaction_distill_loss",
    "late_interaction_loss",
    "maxsim",
    "maxsim_grouped",
    "maxsim_pairs",
    "nn",
    "reference",
    "sigmoid_loss",
    "symile_loss",
    "xtr_loss",
    "xtr_scores",
]
