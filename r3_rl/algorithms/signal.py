"""When a sibling group carries a learning signal: the one definition the advantages, the batch and the logs use.

A group can rank its members only with at least two valid (non-failed) rewards that are not all equal.
"Equal" allows float rounding (``SIGNAL_ATOL``): ``0.1 + 0.2`` and ``0.3`` are the same reward, and a
rounding residue divided by a group std of ~1e-17 would otherwise become a huge advantage.  Pure Python
(no torch), so the logs can use it without importing the learner.
"""
from __future__ import annotations

from collections.abc import Sequence

SIGNAL_ATOL = 1e-9  # rewards closer than this are equal


def has_signal(valid_rewards: Sequence[float]) -> bool:
    """Whether a group with these valid rewards can rank its members (>= 2 of them, not all equal)."""
    return len(valid_rewards) >= 2 and max(valid_rewards) - min(valid_rewards) > SIGNAL_ATOL
