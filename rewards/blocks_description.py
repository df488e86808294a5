"""The ``blocks_description`` reward: does a critique's observation say what the critiqued image holds?

With ``warmstart.describe: objects`` the tiny critic's think text first says what it sees ("<think> the image
has a blue triangle and two red circles </think> make the triangle red"), and its verdict follows that text.
A critique is otherwise paid through one bit -- its verdict -- and 300 RL steps of one-bit verdict rewards do
not teach the demo's critic to read a colour (README: R3 synergy).  The description can be checked exactly in
the Blocks world: every object word in it is right or wrong.  This reward scores the observation against the
critiqued image's grid: the F1 of the described objects (a multiset of colour-shape pairs) against the drawn
ones, 1.0 for an exact description ("the image is empty" of an empty grid included) and 0 for a think text
that is not a description.  So RL gets a signal per object word, not per verdict.  Use it as a reflect extra
(``rewards.reflect.extra``); a real model's equivalent is a captioning or grounding judge of the critique's
observation.
"""
from __future__ import annotations

import re
from collections import Counter

import numpy as np

from r3_rl.blocks import codec
from r3_rl.blocks.world import COLORS, PLURALS, SHAPES, object_of, word_number
from r3_rl.rewards.base import Reward, RewardOutput, RewardSample
from r3_rl.rewards.self_consistency import critiqued

_NOUNS = {**{s: s for s in SHAPES}, **{p: s for s, p in PLURALS.items()}}


def drawn_objects(grid: np.ndarray) -> Counter:
    """(colour, shape) -> count of a grid's objects."""
    out: Counter = Counter()
    for token in np.asarray(grid).reshape(-1):
        kind = object_of(int(token))
        if kind is not None:
            out[(kind[1], kind[0])] += 1
    return out


def described_objects(think: str) -> Counter | None:
    """(colour, shape) -> count named by a description ``the image has a blue circle and two red squares``;
    an empty Counter for ``the image is empty``; ``None`` when the text is not such a description."""
    words = think.split()
    if words == ["the", "image", "is", "empty"]:
        return Counter()
    if words[:3] != ["the", "image", "has"] or len(words) < 6:
        return None
    out: Counter = Counter()
    for item in " ".join(words[3:]).split(" and "):
        toks = item.split()
        if len(toks) != 3 or toks[1] not in COLORS or toks[2] not in _NOUNS:
            return None
        n = 1 if toks[0] in ("a", "an") else word_number(toks[0])
        if not n:
            return None
        out[(toks[1], _NOUNS[toks[2]])] += n
    return out


def description_f1(described: Counter, drawn: Counter) -> float:
    """F1 of two object multisets (1.0 when both are empty)."""
    if not described and not drawn:
        return 1.0
    hit = sum((described & drawn).values())
    if hit == 0:
        return 0.0
    precision, recall = hit / sum(described.values()), hit / sum(drawn.values())
    return 2 * precision * recall / (precision + recall)


def think_text(critique: str) -> str:
    """The text between ``<think>`` and ``</think>`` (empty when either is missing)."""
    m = re.search(r"<think>(.*?)</think>", critique, flags=re.S)
    return m.group(1).strip() if m else ""


class BlocksDescriptionReward(Reward):
    """F1 of the objects a critique's think text describes against those of the critiqued Blocks image."""

    name = "blocks_description"

    def score_one(self, sample: RewardSample) -> RewardOutput:
        where = critiqued(sample.history)
        if where is None:
            return RewardOutput(failure="blocks_description: no critique of an image in this sample's history")
        r, m = where
        try:
            grid = codec.decode(sample.history[m].image)  # type: ignore[arg-type]
        except ValueError as e:  # an image the Blocks world cannot read: an explicit failure
            return RewardOutput(failure=f"blocks_description: {e}")
        described = described_objects(think_text(sample.history[r].text or ""))
        if described is None:
            return RewardOutput(score=0.0, components={"parsed": 0.0})
        exact = float(described == drawn_objects(grid))
        return RewardOutput(score=description_f1(described, drawn_objects(grid)),
                            components={"parsed": 1.0, "exact": exact})

    def __call__(self, samples: list[RewardSample]) -> list[RewardOutput]:
        return [self.score_one(s) for s in samples]
