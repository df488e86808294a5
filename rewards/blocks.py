"""The ``blocks`` reward: GenEval's rules on the Blocks world, judged from pixels.

Pipeline per sample: the image (``RewardSample.image``, HxWx3 uint8) -> the exact pixel detector
(:mod:`r3_rl.blocks.detector`, the Mask2Former + CLIP stand-in) -> GenEval's rules
(:func:`r3_rl.rewards.geneval_rules.evaluate`).  ``binary=False`` (training, as R3 and Flow-GRPO do)
returns the Flow-GRPO partial-credit ``score`` -- note it can be negative when far too many objects of
a class are drawn; ``binary=True`` (evaluation) returns GenEval's 1/0 verdict.  Both are always in the
components, so the logs show accuracy while training on partial credit.

A sample without an image, or whose metadata names a class or colour the Blocks world cannot draw,
is an explicit failure (never a zero: such a prompt could never score and would silently drag its
group's mean down).
"""
from __future__ import annotations

from typing import Any

import numpy as np

from r3_rl.blocks.detector import detect
from r3_rl.blocks.world import COLORS, SHAPES
from r3_rl.errors import UserError
from r3_rl.rewards.base import Reward, RewardOutput, RewardSample
from r3_rl.rewards.geneval_rules import RuleResult, evaluate


def score_image(image: np.ndarray, metadata: dict[str, Any], *, position_threshold: float = 0.1) -> RuleResult:
    """GenEval's verdict, partial credit and reasons for one Blocks image."""
    image = np.asarray(image)
    return evaluate(detect(image), metadata, position_threshold=position_threshold,
                    image_size=(image.shape[1], image.shape[0]))


def unsupported(metadata: dict[str, Any]) -> str | None:
    """Why the Blocks world cannot judge this metadata, or ``None``."""
    if not isinstance(metadata, dict) or "include" not in metadata:
        return "metadata has no GenEval 'include' list"
    for where in ("include", "exclude"):
        for i, req in enumerate(metadata.get(where, []) or []):
            if not isinstance(req, dict):
                return f"metadata {where}[{i}] is not an object"
            if req.get("class") not in SHAPES:
                return f"metadata {where}[{i}] class {req.get('class')!r} is not a Blocks shape {list(SHAPES)}"
            if "color" in req and req["color"] not in COLORS:
                return f"metadata {where}[{i}] color {req['color']!r} is not a Blocks colour {list(COLORS)}"
    return None


class BlocksReward(Reward):
    """Blocks world: exact detector + GenEval rules (partial credit, or 1/0 with ``binary=True``)."""

    name = "blocks"

    def __init__(self, binary: bool = False, position_threshold: float = 0.1) -> None:
        if not isinstance(binary, bool):
            raise TypeError(f"blocks reward option 'binary' must be true/false, got {binary!r}")
        self.binary = binary
        self.position_threshold = float(position_threshold)

    def score_one(self, sample: RewardSample) -> RewardOutput:
        if sample.image is None:
            return RewardOutput(failure="blocks: no image to score")
        why = unsupported(sample.metadata)
        if why:
            return RewardOutput(failure=f"blocks: {why}")
        try:
            res = score_image(sample.image, sample.metadata, position_threshold=self.position_threshold)
        except (UserError, ValueError) as e:  # malformed metadata or image: an explicit failure
            return RewardOutput(failure=f"blocks: {e}")
        return RewardOutput(
            score=float(res.correct) if self.binary else res.score,
            components={"correct": float(res.correct), "score": res.score, "strict_correct": float(res.strict_correct)},
            reason="; ".join(res.reasons) or None,
        )

    def __call__(self, samples: list[RewardSample]) -> list[RewardOutput]:
        return [self.score_one(s) for s in samples]
