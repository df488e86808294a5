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

Keeping the critic honest (``rewards.reflect`` in the recipe, :class:`CriticRule`).  Under the reference's
rule a stop on a flawed image scores a steady ``0`` while edits are noisy and often negative early on,
so stopping is the safe bet and the critic learns to say "no further edit needed" to everything.  The
rule makes the verdict's own reward explicit and symmetric:

* stop on a correct image: ``stop_correct`` (reference: 1);
* stop on a flawed image: ``stop_flawed`` (reference: 0; negative = a penalty);
* edit of a correct image: its improvement (``<= 0``) plus ``edit_correct`` (reference: 0);
* edit of a flawed image: its improvement, plus ``edit_flawed_unimproved`` when it leaves the image no better
  (reference: 0).  Under a ``stop_flawed`` penalty an edit that asks for nothing the refiner can do (the
  prompt's colour parroted: "make the yellow square yellow" on a green square) still scores 0, ``-stop_flawed``
  above a stop, and RL rewards it; ``edit_flawed_unimproved: <stop_flawed>`` scores it as the stop it amounts to.

:func:`verdict_term` is that verdict part alone: PPO, whose refine step already carries the improvement,
gives it to the critique as the critique's own stage reward, so both algorithms reward a verdict alike.
Extra reflect rewards from the recipe (e.g. ``verdict_consistency``, scored by their own
:class:`~r3_rl.rewards.reward_set.RewardSet`) are added with :func:`combine`.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

DEFAULT_FORMAT = r"^<think>.*</think>$"


def format_ok(text: str, pattern: str = DEFAULT_FORMAT) -> bool:
    return re.match(pattern, text.strip(), flags=re.DOTALL) is not None


def plan_reward(task: float | None, fmt: bool, format_weight: float) -> float | None:
    if task is None:
        return None
    f = 1.0 if fmt else 0.0
    return task * f + format_weight * f


@dataclass(frozen=True)
class CriticRule:
    """What a critique's verdict itself earns (module docstring); the defaults are the reference's."""

    stop_correct: float = 1.0
    stop_flawed: float = 0.0
    edit_correct: float = 0.0
    edit_flawed_unimproved: float = 0.0


REFERENCE_RULE = CriticRule()


def verdict_term(parent_correct: bool, stop: bool, rule: CriticRule = REFERENCE_RULE,
                 improved: bool | None = None) -> float:
    """The verdict's own reward: everything a critique earns besides the improvement of its refined image.
    ``improved``: whether the edit left the image better (``None``: unknown, counted as improved)."""
    if stop:
        return rule.stop_correct if parent_correct else rule.stop_flawed
    if parent_correct:
        return rule.edit_correct
    return rule.edit_flawed_unimproved if improved is False else 0.0


def improvement(r_old: float | None, r_new: float | None, stop: bool, correct_threshold: float = 1.0,
                rule: CriticRule = REFERENCE_RULE, parent_correct: bool | None = None) -> float | None:
    """``dR``: how much the refine round improved the image, plus the verdict's own term (1 for a right
    "no further edit" under the reference's rule).  The parent is correct when ``parent_correct`` says so,
    else when ``r_old >= correct_threshold``."""
    if r_old is None or r_new is None:
        return None
    term = verdict_term(r_old >= correct_threshold if parent_correct is None else parent_correct, stop, rule,
                        improved=r_new > r_old)
    return term if stop else r_new - r_old + term


def reflect_reward(r_old: float | None, r_new: float | None, stop: bool, fmt: bool, format_weight: float,
                   correct_threshold: float = 1.0, rule: CriticRule = REFERENCE_RULE,
                   parent_correct: bool | None = None) -> float | None:
    d = improvement(r_old, r_new, stop, correct_threshold, rule, parent_correct)
    if d is None:
        return None
    f = 1.0 if fmt else 0.0
    return format_weight * f + d * f


def reflect_own_reward(parts: dict[str, float], format_weight: float) -> float | None:
    """A critique's own stage reward for PPO (its refine step carries the improvement): format, the verdict
    term and any extra reflect rewards, from the parts :class:`~r3_rl.rollout.scoring.StageScorer` stored."""
    if "format" not in parts or "verdict_term" not in parts:
        return None
    f = parts["format"]
    return format_weight * f + parts["verdict_term"] * f + parts.get("extra", 0.0)


def combine(base: float | None, *extras: float | None) -> float | None:
    """A stage reward plus the (already weighted) totals of extra reward sets; any ``None`` -> ``None``."""
    if base is None or any(e is None for e in extras):
        return None
    return base + sum(extras)  # type: ignore[arg-type]
