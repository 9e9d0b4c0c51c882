"""The target rule of structured InfoNCE (issue 11): which pairs are positives and which enter each log-sum-exp.

Set by ``info_nce(..., query_groups=, key_groups=, exclude_self=, false_negative_margin=, decoupled=, hardness=)``
and applied tile by tile by every engine (``engine.py`` states the rule in full): positives are the pairs whose
group ids match (``labels[i]`` is the group of query i when the keys are their own groups ``arange(M)``), minus the
self pair of the single-tower form; negatives may get a hardness bonus ``α·sg(<q, k>)``; the log-sum-exp of a row
(column) drops the self pair, the positives (``decoupled``) and the negatives that score above the best positive
plus a margin (false negatives).
"""

from __future__ import annotations

from dataclasses import dataclass, replace


@dataclass(frozen=True)
class TargetRule:
    """The non-tensor part of the rule (hashable: a constant for ``torch.compile``).

    ``self_offset`` is per key block (``None``: no self pair in this block's tiles, or ``exclude_self`` off):
    the pair ``(i, j)`` of local indices is the self pair when ``i - j == self_offset``.
    """

    exclude_self: bool = False
    decoupled: bool = False
    hardness: float = 0.0
    margin: float | None = None  # false_negative_margin, on raw inner products
    self_offset: int | None = None

    def at(self, self_offset: int | None) -> TargetRule:
        """The same rule for one key block whose self pairs lie at ``i - j == self_offset``."""
        return self if self_offset == self.self_offset else replace(self, self_offset=self_offset)
