"""How to add a reward: a function in one file.

A reward sees one :class:`~r3_rl.rewards.base.RewardSample` per image (prompt, metadata, the R3 history) and
returns a score per sample, or ``None`` for a sample it cannot score (a failure: excluded, never a zero).
Extra keyword arguments are the recipe's ``options``.  Use it as ``rewards.task: [{name: brightness}]`` once
this module is imported, or name the file: ``{name: docs/examples/brightness_reward.py:brightness}``.
"""
from __future__ import annotations

from typing import Any

from r3_rl.rewards.registry import register


@register("brightness", "mean pixel value of the image, in [0, 1]")
def brightness(samples: list[Any], scale: float = 1.0) -> list[float | None]:
    return [None if s.image is None else scale * float(s.image.mean()) / 255.0 for s in samples]
