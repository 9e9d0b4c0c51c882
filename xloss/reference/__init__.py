"""The spec in code: naive PyTorch definitions of every loss (see SPEC.md).

Tests, benchmarks and docs share these.  They build the full matrices on purpose: they are what every fast
path is judged against, and what "naive PyTorch" means in ``python -m xloss.bench``.
"""

from . import symile  # the module too: symile.draw_permutations is part of the spec's sampling
from .banzhaf import banzhaf_interaction
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

__all__ = [
    "banzhaf_interaction",
    "cwcl_loss",
    "distill_loss",
    "gram_loss",
    "gram_volume",
    "info_nce",
    "late_interaction_distill_loss",
    "late_interaction_loss",
    "maxsim",
    "maxsim_grouped",
    "maxsim_pairs",
    "sigmoid_loss",
    "symile",
    "symile_loss",
    "xtr_loss",
    "xtr_scores",
]
