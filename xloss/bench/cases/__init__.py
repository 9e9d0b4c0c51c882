"""The built-in loss families, one module each; importing this package registers them in ``FAMILIES``.

The imports below run in the order the families were always registered, which is the order of
``--family all``, of ``--family``'s choices and of the output files: keep it (not alphabetical).
"""

# isort: off
from . import info_nce  # noqa: F401  (info_nce)
from . import late_interaction  # noqa: F401  (late_interaction, maxsim_scoring, maxsim_cpu_op(_ragged))
from . import symile  # noqa: F401  (symile, symile_forward)
from . import gram  # noqa: F401
from . import banzhaf  # noqa: F401
from . import sigmoid  # noqa: F401
from . import soft_targets  # noqa: F401  (distill, cwcl)
from . import gradcache  # noqa: F401  (MiniLM steps through xloss.GradCache against uncached ones)
from . import late_interaction_training  # noqa: F401  (late_interaction_distill, xtr)
# isort: on
