"""The one rule for public signatures, and the one way to rename an argument.

The rule (held by every public loss; ``tests/test_api.py`` checks it):

1. The tensors first, positionally: ``query, key`` (InfoNCE, sigmoid, distillation), ``q, d`` (late
   interaction), ``*modalities`` (GRAM, Symile).
2. Then keyword-only, in this order where they apply:
   ``logit_scale`` | ``temperature`` (one or the other, everywhere a loss has a scale; ``temperature=τ`` is
   ``logit_scale=1/τ``), further scalars of the loss (``logit_bias``), ``labels`` (where the positives are
   not the diagonal), the options of the family, ``label_smoothing``, ``reduction`` (``"mean" | "sum" |
   "none"``, of the loss only), ``backend``, then ``group``, ``exchange`` and ``grad_reduction`` for
   multi-rank runs.
3. One vocabulary for direction: ``symmetric`` (bool) where a loss has a key→query term; late interaction's
   scoring direction is ``direction`` (``"q2d" | "d2q" | "both"``).  Token reduction in late interaction is
   ``token_reduction`` (never ``reduction``).
4. Options travel inside the package as one frozen dataclass per family, never as positional tuples.

A renamed argument keeps working for one release through :func:`renamed`, with a ``DeprecationWarning``.
"""

from __future__ import annotations

import functools
import warnings


def renamed(**old_to_new: str):
    """Decorator: accept each old keyword ``old`` for ``new`` for one release, with a DeprecationWarning.

    Passing both the old and the new spelling is a TypeError.
    """

    def wrap(fn):
        name = fn.__qualname__.replace(".__init__", "")  # a class's constructor reads as the class

        @functools.wraps(fn)
        def inner(*args, **kwargs):
            for old, new in old_to_new.items():
                if old in kwargs:
                    if new in kwargs:
                        raise TypeError(f"{name}() got both {old}= (deprecated) and {new}=; pass {new}= only")
                    warnings.warn(f"{name}(): the argument {old}= is deprecated and will be removed in the "
                                  f"next release; use {new}= instead", DeprecationWarning, stacklevel=2)
                    kwargs[new] = kwargs.pop(old)
            return fn(*args, **kwargs)

        return inner

    return wrap

