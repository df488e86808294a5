"""``rollout.verdict_rescue_temperature``: a parent whose critiques all give one verdict is critiqued again,
hotter; the hotter group is what the trees (and so the learner) get.  A scripted policy: at temperature 1 it
stops on the image whose top-left cell is set and edits the others; hotter, it edits everything."""
from __future__ import annotations

import numpy as np
import pytest

from r3_rl.config import Recipe
from r3_rl.policy.base import ImageSample, Policy, TextSample
from r3_rl.rollout.buffer import BufferEntry
from r3_rl.rollout.tree_rl import RolloutTask, run_task, stage_sampling
from r3_rl.tracking.metrics import group_metrics
from r3_rl.trajectory import PromptItem, Segment

STOP = "<think> fine </think> no further edit needed"
EDIT = "<think> off </think> make it right"


class ScriptedCritic(Policy):
    def __init__(self) -> None:
        self.reflect_calls: list[tuple[int, float]] = []

    def reflect(self, prompts, images, sampling, generator=None):
        self.reflect_calls.append((len(images), sampling.temperature))
        hot = sampling.temperature > 1.0
        out = []
        for k, im in enumerate(images):
            # the image with a set top-left cell: stop (a unanimous group) at temperature 1; else alternate
            text = EDIT if hot else STOP if im.image[0, 0, 0] else (STOP if k % 2 else EDIT)
            out.append(TextSample(text, Segment("text", {"input_ids": [1]}, [2, 3], [-0.1, -0.2],
                                                {"temperature": sampling.temperature})))
        return out

    def refine(self, prompts, images, instructions, sampling, generator=None):
        return [ImageSample(im.image, Segment("image", {"input_ids": [1]}, [4], [-0.3]), None) for im in images]

    def reason(self, *a, **k): raise NotImplementedError  # noqa: E704
    def generate(self, *a, **k): raise NotImplementedError  # noqa: E704
    def segment_logprobs(self, *a, **k): raise NotImplementedError  # noqa: E704
    model = None  # type: ignore[assignment]


def _task() -> RolloutTask:
    sure, unsure = np.zeros((2, 2, 3), np.uint8), np.zeros((2, 2, 3), np.uint8)
    sure[0, 0] = 255
    p = PromptItem("p", "x", {"tag": "colors"})
    parents = [BufferEntry(p, sure, None, 0.0, False, 0, "a/g0"), BufferEntry(p, unsure, None, 0.0, False, 0, "a/g1")]
    return RolloutTask(kind="BC", step=0, index=0, seed=1, group_size=4, parents=parents)


@pytest.mark.parametrize("temperature", [0.0, 2.5])
def test_unanimous_group_is_critiqued_again_hotter(temperature: float) -> None:
    recipe = Recipe.model_validate({"rollout": {"verdict_rescue_temperature": temperature}})
    policy = ScriptedCritic()
    trees = run_task(policy, _task(), stage_sampling(recipe), "no further edit needed")
    stops = [[n.stop for n in t.nodes.values() if n.stage == "reflect"] for t in trees]
    assert stops[1] == [False, True, False, True]  # mixed: kept as sampled
    if temperature == 0.0:
        assert policy.reflect_calls == [(8, 1.0)] and stops[0] == [True] * 4
        assert not any("rescued" in t.meta for t in trees) and "groups/reflect/rescued" not in group_metrics(trees)
        return
    assert policy.reflect_calls == [(8, 1.0), (4, 2.5)]  # only the sure parent's four critiques again
    assert stops[0] == [False] * 4 and trees[0].meta["rescued"] is True and trees[1].meta["rescued"] is False
    assert group_metrics(trees)["groups/reflect/rescued"] == 1.0
    temps = [n.segment.sampling["temperature"] for n in trees[0].nodes.values() if n.stage == "reflect"]
    assert temps == [2.5] * 4  # the hot critiques replaced the first ones (their segments say how they were sampled)
    assert sum(n.stage == "refine" and n.segment is not None for n in trees[0].nodes.values()) == 4


def test_eval_never_rescues() -> None:
    recipe = Recipe.model_validate({"rollout": {"verdict_rescue_temperature": 2.0}})
    assert stage_sampling(recipe).reflect_rescue is not None
    assert stage_sampling(recipe, eval_mode=True).reflect_rescue is None
    with pytest.raises(ValueError):
        Recipe.model_validate({"rollout": {"verdict_rescue_temperature": -1.0}})
