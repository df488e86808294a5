"""How much a refine-stage parent's tag, prompt or round alone tells its verdict, on the draw the critic trains on.

The critic is paid for its verdict on parents drawn from the buffer.  If, in that draw, flawed parents come
mostly from some tags, prompts or rounds and correct ones from others, a critic can earn the verdict reward
by reading the prompt or the image's round off its context instead of judging the image: its training verdict
climbs while its judgement on held-out prompts does not (README: R3 synergy).  Refined images (round >= 1) are
the sharpest case: once the generator's first images are mostly right, most flawed parents are refiner
outputs, and a critic that edits every refined image scores well in training while it breaks the correct
ones at eval.  The measure here is the best balanced accuracy any rule reading one feature alone reaches on
the draw: 0.5 when the feature carries nothing, 1.0 when it gives the verdict away.  Pure functions; the
buffer applies them to what it holds (:meth:`r3_rl.rollout.buffer.ParentBuffer.shortcut_accuracy`).
"""
from __future__ import annotations

import math
from collections import Counter
from typing import Any, Hashable, Sequence

SHORTCUT_FEATURES = ("tag", "prompt", "round")


def parent_feature(parent: Any, feature: str) -> Hashable:
    """``feature`` of a buffered parent (anything with ``.prompt`` and ``.round``): the prompt's tag (``"all"``
    when untagged), the prompt text, or the round the image was made in (0: a first image)."""
    if feature == "tag":
        return parent.prompt.tag
    if feature == "prompt":
        return parent.prompt.prompt
    if feature == "round":
        return int(parent.round)
    raise ValueError(f"parent feature {feature!r}: valid are {', '.join(SHORTCUT_FEATURES)}")


def shortcut_balanced_accuracy(groups: Sequence[tuple[Sequence[Hashable], Sequence[Hashable]]]) -> float:
    """Best balanced accuracy of a verdict that reads one feature alone.

    ``groups`` lists, per draw group, the feature values of its correct parents and of its flawed ones; each
    group is drawn equally often and each parent uniformly within its kind (as ``ParentBuffer.sample`` does:
    one group, the two pools, for ``"pool"``; one per tag or prompt when balanced).  With ``c(v)`` and ``f(v)``
    the chance that a drawn correct / flawed parent has value ``v``, a rule that says "flawed" on the values
    where ``f(v) > c(v)`` scores ``(sum_v max(c(v), f(v))) / 2`` -- no rule on that feature does better (a
    balanced accuracy is half the true-correct rate plus half the true-flawed rate, summed value by value).
    NaN when no group holds both kinds."""
    usable = [(c, f) for c, f in groups if len(c) and len(f)]
    if not usable:
        return float("nan")
    correct: Counter = Counter()
    flawed: Counter = Counter()
    for c, f in usable:
        for values, dist in ((c, correct), (f, flawed)):
            for v in values:
                dist[v] += 1.0 / (len(values) * len(usable))
    # fsum: exact whatever the order, and a set of strings iterates in a per-process (PYTHONHASHSEED) order --
    # a plain sum logged other last digits in a resumed run's new process
    return 0.5 * math.fsum(max(correct[v], flawed[v]) for v in set(correct) | set(flawed))
