"""blocks_instruction: a critique scored by what its instruction, carried out exactly, would gain.

Checked against the Blocks world's own diagnosis (the fix :func:`edits.diagnose` names always makes a flawed
image better), by exact small cases worked by hand, and through the rollout scorer as a reflect extra."""
from __future__ import annotations

import numpy as np
import pytest

from r3_rl.blocks import codec, edits
from r3_rl.data import BlocksPrompts
from r3_rl.blocks.prompts import TAGS
from r3_rl.blocks.world import token_of
from r3_rl.errors import UserError
from r3_rl.rewards.base import RewardSample, Turn
from r3_rl.rewards.blocks_instruction import instruction_gain
from r3_rl.rewards.registry import load_reward
from r3_rl.rewards.reward_set import RewardSet
from r3_rl.rollout.scoring import StageScorer
from r3_rl.trajectory import Node, PromptItem, Segment, Tree

RED_TRIANGLE = {"tag": "colors", "include": [{"class": "triangle", "count": 1, "color": "red"}],
                "prompt": "a photo of a red triangle"}


def purple_triangle() -> np.ndarray:
    g = np.zeros((4, 4), dtype=np.int64)
    g[0, 0] = token_of("triangle", "purple")
    return g


def sample(grid: np.ndarray, critique: str, metadata: dict = RED_TRIANGLE) -> RewardSample:
    image = codec.encode(grid)
    hist = [Turn("generate", 0, image=image, reward=0.5), Turn("reflect", 1, text=critique)]
    return RewardSample(prompt=metadata["prompt"], metadata=metadata, stage="reflect", round=1, image=image,
                        history=hist, text=critique)


def test_exact_small_cases_worked_by_hand() -> None:
    g = purple_triangle()  # partial credit 0.5: the triangle is there, its colour wrong
    assert instruction_gain(g, "make the triangle red", RED_TRIANGLE) == pytest.approx(0.5)
    assert instruction_gain(g, "make the triangle red", RED_TRIANGLE, binary=True) == pytest.approx(1.0)
    assert instruction_gain(g, "make the triangle blue", RED_TRIANGLE) == pytest.approx(0.0)  # still the wrong colour
    assert instruction_gain(g, "make the triangle purple", RED_TRIANGLE) == pytest.approx(0.0)  # does not apply
    assert instruction_gain(g, "remove a triangle", RED_TRIANGLE) == pytest.approx(-0.5)  # nothing left
    assert instruction_gain(g, "paint it red", RED_TRIANGLE) is None  # not in the Blocks language


def test_the_fix_the_world_diagnoses_always_gains_and_breaking_a_correct_image_never_does() -> None:
    """Against the world's own diagnosis, on 300 flawed images of every tag: carried out exactly, the first
    fix :func:`edits.diagnose` names never lowers the score and on most images raises it; on the correct
    image it came from, the same instruction never raises it."""
    rng = np.random.default_rng(0)
    prompts = BlocksPrompts(tags={t: 1.0 for t in TAGS}, seed=3)
    gains, on_correct = [], []
    for k in range(300):
        meta = prompts.train_prompt(k).metadata
        good = edits.random_correct_grid(meta, rng)
        flawed = edits.perturb(good, meta, rng)
        ops = edits.diagnose(flawed, meta)
        if not ops:
            continue
        text = edits.edit_text(ops[0])
        gains.append(instruction_gain(flawed, text, meta, draws=8))
        on_correct.append(instruction_gain(good, text, meta, draws=8))
    assert len(gains) > 200
    assert min(gains) >= 0.0 and np.mean(np.array(gains) > 0) > 0.9
    assert max(on_correct) <= 1e-9


def test_the_reward_reads_the_critique_and_the_image_it_critiques() -> None:
    r = load_reward("blocks_instruction")
    out = r([sample(purple_triangle(), "<think> the triangle is purple not red </think> make the triangle red"),
             sample(purple_triangle(), "<think> the triangle is purple not red </think> make the triangle blue"),
             sample(purple_triangle(), "<think> fine </think> no further edit needed"),
             sample(purple_triangle(), "<think> hm </think> make it nicer")])
    assert [o.score for o in out] == pytest.approx([0.5, 0.0, 0.0, 0.0])
    assert out[0].components == {"stop": 0.0, "parsed": 1.0, "gain": 0.5}
    assert out[2].components["stop"] == 1.0 and out[3].components["parsed"] == 0.0
    # the same draws every call: an add's free cell is drawn from fixed seeds
    add = sample(np.zeros((4, 4), np.int64), "<think> x </think> add a red triangle")
    assert r([add])[0].score == r([add])[0].score == pytest.approx(1.0)


def test_failures_are_failures_not_zeros() -> None:
    r = load_reward("blocks_instruction")
    no_critique = RewardSample(prompt="p", metadata=RED_TRIANGLE, stage="generate", round=0,
                               image=codec.encode(purple_triangle()),
                               history=[Turn("generate", 0, image=codec.encode(purple_triangle()))])
    not_blocks = sample(purple_triangle(), "<think> x </think> make the triangle red",
                        {"include": [{"class": "dog", "count": 1}], "prompt": "a photo of a dog"})
    odd_image = sample(purple_triangle(), "<think> x </think> make the triangle red")
    odd_image.history[0] = Turn("generate", 0, image=np.zeros((30, 30, 3), np.uint8))
    out = r([no_critique, not_blocks, odd_image])
    assert all(o.failed for o in out)
    assert "dog" in out[1].failure and "cell size" in out[2].failure


@pytest.mark.parametrize("options", [{"draws": 0}, {"draws": 1.5}, {"binary": "yes"}])
def test_bad_options_are_user_errors(options: dict) -> None:
    with pytest.raises(UserError, match="blocks_instruction option"):
        load_reward("blocks_instruction", **options)


def test_as_a_reflect_extra_it_adds_the_instruction_gain_to_the_critique_reward() -> None:
    """Two critiques of one purple triangle, one naming the prompt's colour and one not; the refiner carried
    out neither (both refined images unchanged).  Without the extra both earn the same; with it the right
    colour earns 0.5 more."""
    t = Tree(id="T", prompt=PromptItem("p", RED_TRIANGLE["prompt"], RED_TRIANGLE))
    image = codec.encode(purple_triangle())
    t.add(Node(id="root", parent=None, stage="generate", round=0, group_id="T/root", policy_version=-1,
               image=image, reward=0.5, meta={"correct": False}))
    seg = Segment(modality="text", context={"input_ids": [1]}, token_ids=[2, 3], logprobs=[-1.0, -1.0])
    for j, colour in enumerate(("red", "blue")):
        t.add(Node(id=f"c{j}", parent="root", stage="reflect", round=1, group_id="T/reflect", policy_version=0,
                   segment=seg, text=f"<think> x </think> make the triangle {colour}", stop=False))
        t.add(Node(id=f"r{j}", parent=f"c{j}", stage="refine", round=1, group_id="T/refine", policy_version=0,
                   segment=seg, image=image, reward=0.5))
    plain = StageScorer(RewardSet([]), 0.1, r"^<think>.*</think>$", r"^<think>.*</think>.+$")
    plain.compose(t)
    assert t.nodes["c0"].reward == t.nodes["c1"].reward == pytest.approx(0.1)
    extra = StageScorer(RewardSet([]), 0.1, r"^<think>.*</think>$", r"^<think>.*</think>.+$",
                        reflect_extra=RewardSet.from_specs([{"name": "blocks_instruction", "weight": 1.0}]))
    extra.compose(t)
    assert t.nodes["c0"].reward == pytest.approx(0.6) and t.nodes["c1"].reward == pytest.approx(0.1)
    assert t.nodes["c0"].rewards["blocks_instruction"] == pytest.approx(0.5)

