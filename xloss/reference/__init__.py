"""The spec in code: naive PyTorch definitions of every loss (see SPEC.md).

Tests, benchmarks and docs share these.  They build the full matrices on purpose: they are what every fast
path is judged against, and what "naive PyTorch" means in ``python -m xloss.bench``.
"""

from .info_nce import info_nce
from .late_interaction import late_interaction_loss, maxsim, maxsim_pairs

__all__ = ["info_nce", "late_interaction_loss", "maxsim", "maxsim_pairs"]
