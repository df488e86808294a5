"""Stage rewards of the R3 loop, as pure functions (the reference's combination, made explicit).

Let ``R`` be the task reward of an image (weighted reward set, in [0, 1] for GenEval-style rewards),
``F`` the format reward (1 if the text has the required ``<think>...</think>`` shape, else 0) and ``w``
the format weight.

* reason (plan text):      ``R * F + w * F``   -- a plan is worth the image it leads to, if well formed
* generate / refine image: ``R``               -- raw task reward of the image
* reflect (critique text): ``w * F + dR * F``  with ``dR = R_new - R_old``; a correct "no further edit"
  on an already-correct parent (``R_old == 1``) gets ``dR = 1``
* a refine image after "no further edit" is a copy of its parent: it gets no image advantage.

``None`` (a failed task reward) propagates: the sample is excluded, never scored as 0.

Extra per-stage rewards from the recipe (e.g. ``verdict_consistency`` on reflect nodes, scored by
their own :class:`~r3_rl.rewards.reward_set.RewardSet`) are added with :func:`combine`.
"""
from __future__ import annotations

import re

DEFAULT_FORMAT = r"^<think>.*</think>$"


def format_ok(text: str, pattern: str = DEFAULT_FORMAT) -> bool:
    return re.match(pattern, text.strip(), flags=re.DOTALL) is not None


def plan_reward(task: float | None, fmt: bool, format_weight: float) -> float | None:
    if task is None:
        return None
    f = 1.0 if fmt else 0.0
    return task * f + format_weight * f


def improvement(r_old: float | None, r_new: float | None, stop: bool, correct_threshold: float = 1.0) -> float | None:
    """``dR``: how much the refine round improved the image (1 for a right "no further edit")."""
    if r_old is None or r_new is None:
        return None
    if stop and r_old >= correct_threshold:
        return 1.0
    return r_new - r_old


def reflect_reward(r_old: float | None, r_new: float | None, stop: bool, fmt: bool, format_weight: float,
                   correct_threshold: float = 1.0) -> float | None:
    d = improvement(r_old, r_new, stop, correct_threshold)
    if d is None:
        return None
    f = 1.0 if fmt else 0.0
    return format_weight * f + d * f


def combine(base: float | None, *extras: float | None) -> float | None:
    """A stage reward plus the (already weighted) totals of extra reward sets; any ``None`` -> ``None``."""
    if base is None or any(e is None for e in extras):
        return None
    return base + sum(extras)  # type: ignore[arg-type]
