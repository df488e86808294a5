"""blocks_description: a critique's observation scored against the image it critiques.

Checked against the warm start's own description labels (every grid the warm start would describe reads back
as exactly its objects), by exact small cases worked by hand, and through the rollout scorer as a reflect extra."""
from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from r3_rl.blocks import codec
from r3_rl.blocks.world import token_of
from r3_rl.policy.warmstart import describe_grid
from r3_rl.rewards.base import RewardSample, Turn
from r3_rl.rewards.blocks_description import described_objects, description_f1, drawn_objects
from r3_rl.rewards.registry import load_reward
from r3_rl.rewards.reward_set import RewardSet
from r3_rl.rollout.scoring import StageScorer
from r3_rl.trajectory import Node, PromptItem, Segment, Tree

META = {"tag": "colors", "include": [{"class": "triangle", "count": 1, "color": "red"}],
        "prompt": "a photo of a red triangle"}


def grid_of(*objects: tuple[int, str, str]) -> np.ndarray:
    g = np.zeros((4, 4), dtype=np.int64)
    for cell, colour, shape in objects:
        g.flat[cell] = token_of(shape, colour)
    return g


def sample(grid: np.ndarray, critique: str) -> RewardSample:
    image = codec.encode(grid)
    hist = [Turn("generate", 0, image=image, reward=0.5), Turn("reflect", 1, text=critique)]
    return RewardSample(prompt=META["prompt"], metadata=META, stage="reflect", round=1, image=image,
                        history=hist, text=critique)


def test_the_warm_starts_descriptions_read_back_exactly() -> None:
    rng = np.random.default_rng(0)
    for _ in range(500):
        g = np.where(rng.random((4, 4)) < 0.3, rng.integers(1, 19, (4, 4)), 0)
        text = describe_grid(g)
        assert described_objects(text) == drawn_objects(g), text
        assert description_f1(described_objects(text), drawn_objects(g)) == 1.0


def test_exact_small_cases_worked_by_hand() -> None:
    assert described_objects("the image has a blue circle and two red squares") == Counter(
        {("blue", "circle"): 1, ("red", "square"): 2})
    assert described_objects("the image is empty") == Counter()
    assert described_objects("the triangle is purple not red") is None  # the plain critique's observation
    assert described_objects("the image has a big circle") is None
    assert described_objects("the image has zero red squares") is None
    drawn = Counter({("blue", "square"): 1, ("green", "circle"): 1})
    # one of two objects right, one named wrong: precision 1/2, recall 1/2
    assert description_f1(Counter({("blue", "square"): 1, ("red", "circle"): 1}), drawn) == pytest.approx(0.5)
    # one right, one missed: precision 1, recall 1/2 -> 2/3
    assert description_f1(Counter({("blue", "square"): 1}), drawn) == pytest.approx(2 / 3)
    assert description_f1(Counter(), drawn) == 0.0 and description_f1(Counter(), Counter()) == 1.0


def test_the_reward_reads_the_think_text_and_the_image_it_critiques() -> None:
    g = grid_of((0, "purple", "triangle"))
    out = load_reward("blocks_description")([
        sample(g, "<think> the image has a purple triangle </think> make the triangle red"),
        sample(g, "<think> the image has a red triangle </think> no further edit needed"),
        sample(g, "<think> the triangle is purple not red </think> make the triangle red"),
        sample(np.zeros((4, 4), np.int64), "<think> the image is empty </think> add a red triangle")])
    assert [o.score for o in out] == pytest.approx([1.0, 0.0, 0.0, 1.0])
    assert out[0].components == {"parsed": 1.0, "exact": 1.0}
    assert out[2].components == {"parsed": 0.0}


def test_failures_are_failures_not_zeros() -> None:
    r = load_reward("blocks_description")
    g = grid_of((0, "red", "triangle"))
    no_critique = RewardSample(prompt="p", metadata=META, stage="generate", round=0, image=codec.encode(g),
                               history=[Turn("generate", 0, image=codec.encode(g))])
    odd_image = sample(g, "<think> the image has a red triangle </think> no further edit needed")
    odd_image.history[0] = Turn("generate", 0, image=np.zeros((30, 30, 3), np.uint8))
    out = r([no_critique, odd_image])
    assert all(o.failed for o in out)
    assert "no critique" in out[0].failure and "cell size" in out[1].failure


def test_as_a_reflect_extra_it_adds_the_description_score_to_the_critique_reward() -> None:
    """Two critiques of one purple triangle with the same verdict, one reading the colour right and one not;
    the refiner changed nothing.  Without the extra both earn the same; with it the right reading earns 1 more."""
    t = Tree(id="T", prompt=PromptItem("p", META["prompt"], META))
    image = codec.encode(grid_of((5, "purple", "triangle")))
    t.add(Node(id="root", parent=None, stage="generate", round=0, group_id="T/root", policy_version=-1,
               image=image, reward=0.5, meta={"correct": False}))
    seg = Segment(modality="text", context={"input_ids": [1]}, token_ids=[2, 3], logprobs=[-1.0, -1.0])
    for j, colour in enumerate(("purple", "blue")):
        t.add(Node(id=f"c{j}", parent="root", stage="reflect", round=1, group_id="T/reflect", policy_version=0,
                   segment=seg, text=f"<think> the image has a {colour} triangle </think> make the triangle red",
                   stop=False))
        t.add(Node(id=f"r{j}", parent=f"c{j}", stage="refine", round=1, group_id="T/refine", policy_version=0,
                   segment=seg, image=image, reward=0.5))
    plain = StageScorer(RewardSet([]), 0.1, r"^<think>.*</think>$", r"^<think>.*</think>.+$")
    plain.compose(t)
    assert t.nodes["c0"].reward == t.nodes["c1"].reward
    extra = StageScorer(RewardSet([]), 0.1, r"^<think>.*</think>$", r"^<think>.*</think>.+$",
                        reflect_extra=RewardSet.from_specs([{"name": "blocks_description", "weight": 1.0}]))
    extra.compose(t)
    assert t.nodes["c0"].reward - t.nodes["c1"].reward == pytest.approx(1.0)
    assert t.nodes["c0"].rewards["blocks_description"] == pytest.approx(1.0)
