"""Exact small cases of the rollout loop: task seeds and tree ids (tree_rl), R3 chains (chain), task order
(engine) and the warm start's synthetic trajectories (warmstart).  Scripted stubs, hand-worked expectations."""
from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from r3_rl.blocks import edits
from r3_rl.config import Recipe
from r3_rl.data import BlocksPrompts
from r3_rl.policy.base import ImageSample, Policy, TextSample
from r3_rl.policy.warmstart import LENIENT, synthetic_examples
from r3_rl.rollout.buffer import BufferEntry
from r3_rl.rollout.chain import images_by_round, r3_chains, rounds_used
from r3_rl.rollout.engine import run_ordered
from r3_rl.rollout.tree_rl import plan_tasks, run_task, stage_sampling
from r3_rl.trajectory import PromptItem, Segment

STOP_PHRASE = "no further edit needed"
STOP = f"<think> fine </think> {STOP_PHRASE}"
EDIT = "<think> off </think> make it right"
P1, P2 = PromptItem("p1", "a red square", {"tag": "colors"}), PromptItem("p2", "a blue circle", {"tag": "colors"})


def _seg(kind: str) -> Segment:
    return Segment(kind, {"input_ids": [1]}, [2], [-0.1])


def _img(value: int) -> np.ndarray:
    return np.full((2, 2, 3), value, np.uint8)


class Scripted(Policy):
    """Plans "plan", draws images of value 0; the critic edits an image of value 0 and stops on any other;
    a refined image is the input's value + 1."""

    version = 0
    model = None  # type: ignore[assignment]

    def reason(self, prompts, sampling, generator=None):
        return [TextSample("plan", _seg("text")) for _ in prompts]

    def generate(self, prompts, plans, sampling, generator=None):
        return [ImageSample(_img(0), _seg("image"), None) for _ in prompts]

    def reflect(self, prompts, images, sampling, generator=None):
        return [TextSample(EDIT if im.image[0, 0, 0] == 0 else STOP, _seg("text")) for im in images]

    def refine(self, prompts, images, instructions, sampling, generator=None):
        return [ImageSample(_img(int(im.image[0, 0, 0]) + 1), _seg("image"), None) for im in images]

    def segment_logprobs(self, *a, **k):
        raise NotImplementedError


SAMPLING = stage_sampling(Recipe())


# --- tree_rl -----------------------------------------------------------------------------------------------

def test_task_seeds_depend_on_step_index_and_nothing_else() -> None:
    a = [t.seed for t in plan_tasks(0, 7, [P1, P2], [], 2, 1)]
    assert len(a) == 2 and a[0] != a[1]  # two tasks of one step: different seeds (index)
    b = [t.seed for t in plan_tasks(1, 7, [P1, P2], [], 2, 1)]
    assert a[0] != b[0] and a[1] != b[1]  # the same task at the next step: different seeds (step)
    assert [t.seed for t in plan_tasks(0, 7, [P1, P2], [], 2, 1)] == a  # same arguments, same seeds
    assert [t.index for t in plan_tasks(0, 7, [P1, P2], [], 2, 1)] == [0, 1]


def test_stage_a_tree_and_group_ids_are_distinct_across_tasks() -> None:
    tasks = plan_tasks(0, 0, [P1, P2], [], group_size=2, groups_per_task=1)
    trees = [tree for t in tasks for tree in run_task(Scripted(), t, SAMPLING, STOP_PHRASE)]
    assert [t.id for t in trees] == ["s0-t0-A0", "s0-t1-A0"]
    groups = {n.group_id for t in trees for n in t.nodes.values()}
    assert groups == {"s0-t0-A0/plan", "s0-t0-A0/image", "s0-t1-A0/plan", "s0-t1-A0/image"}
    assert [len(t.nodes) for t in trees] == [4, 4]  # 2 siblings x (plan, image)


@pytest.mark.parametrize("parent_round,root_stage", [(0, "generate"), (1, "refine")])
def test_refine_stage_rounds_follow_the_parent(parent_round: int, root_stage: str) -> None:
    parent = BufferEntry(P1, _img(0), None, 0.5, False, parent_round, "x/g0")
    (task,) = plan_tasks(3, 0, [], [parent], group_size=2, groups_per_task=1)
    (tree,) = run_task(Scripted(), task, SAMPLING, STOP_PHRASE)
    assert tree.id == "s3-t0-BC0"
    root = tree.nodes["root"]
    assert (root.stage, root.round) == (root_stage, parent_round)
    for nid in ("c0", "c1", "r0", "r1"):
        assert tree.nodes[nid].round == parent_round + 1
    assert [tree.nodes[n].stage for n in ("c0", "r0")] == ["reflect", "refine"]


# --- chain -------------------------------------------------------------------------------------------------

def test_chain_stops_after_the_critic_says_stop_and_carries_the_last_image() -> None:
    (tree,) = r3_chains(Scripted(), [P1], SAMPLING, rounds=3, stop_phrase=STOP_PHRASE)
    # round 1: img0 (value 0) -> edit -> img1 (value 1); round 2: img1 -> stop; round 3: nothing
    assert set(tree.nodes) == {"plan", "img0", "crit1", "img1", "crit2"}
    assert tree.nodes["crit1"].parent == "img0" and tree.nodes["img1"].parent == "crit1"
    assert tree.nodes["crit2"].parent == "img1" and tree.nodes["crit2"].stop is True
    assert tree.nodes["crit1"].stop is False
    assert [n.id for n in images_by_round(tree, 3)] == ["img0", "img1", "img1", "img1"]
    assert [int(n.image[0, 0, 0]) for n in images_by_round(tree, 3)] == [0, 1, 1, 1]
    assert rounds_used(tree) == 2


def test_chain_tree_ids_are_unique_across_batches() -> None:
    prompts = [PromptItem(f"p{i}", f"prompt {i}", {}) for i in range(10)]
    trees = r3_chains(Scripted(), prompts, SAMPLING, rounds=1, stop_phrase=STOP_PHRASE, batch_size=4)
    assert [t.id for t in trees] == [f"eval-{i}" for i in range(10)]
    assert [t.prompt.id for t in trees] == [f"p{i}" for i in range(10)]


# --- engine ------------------------------------------------------------------------------------------------

class FakeEngine:
    restarts = 0

    def __init__(self, order: list[int]) -> None:
        self.order = order

    def run(self, tasks, sampling):
        by_index = {t.index: t for t in tasks}
        for i in self.order:
            yield by_index[i], [f"tree{i}"]


def test_run_ordered_puts_tasks_in_order_and_rejects_duplicates_and_losses() -> None:
    tasks = plan_tasks(5, 0, [P1, P2], [], 2, 1)
    assert run_ordered(FakeEngine([1, 0]), tasks, SAMPLING) == ["tree0", "tree1"]  # type: ignore[arg-type]
    with pytest.raises(RuntimeError, match="task 0 of step 5 came back twice"):
        run_ordered(FakeEngine([0, 0, 1]), tasks, SAMPLING)  # type: ignore[arg-type]
    with pytest.raises(RuntimeError, match=r"tasks \[1\] of step 5 never came back"):
        run_ordered(FakeEngine([0]), tasks, SAMPLING)  # type: ignore[arg-type]


def test_run_ordered_rejects_a_task_that_was_never_sent() -> None:
    """A worker answering with a stale task (index 7 of a 2-task step) must not vanish from the step unnoticed."""
    tasks = plan_tasks(5, 0, [P1, P2], [], 2, 1)
    stray = replace(tasks[0], index=7)

    class StrayEngine:
        restarts = 0

        def run(self, sent, sampling):
            yield sent[0], ["tree0"]
            yield stray, ["tree7"]
            yield sent[1], ["tree1"]

    with pytest.raises(RuntimeError, match=r"task 7 of step 5 came back but was never sent \(sent: \[0, 1\]\)"):
        run_ordered(StrayEngine(), tasks, SAMPLING)  # type: ignore[arg-type]


# --- warm start --------------------------------------------------------------------------------------------

class WordPolicy:
    """Just what synthetic_examples uses: every rendered context / encoded text is one readable item."""

    rows, cols, stop_id = 4, 4, "<stop>"

    def __init__(self) -> None:
        self.templates = {"generate": "GEN"}

    def render(self, stage: str, **kw: str) -> list:
        return [(stage, tuple(sorted(kw.items())))]

    def encode(self, text: str) -> list:
        return [text]

    def image_words(self, image) -> str:
        return " ".join(f"<img_{k}>" for k in image.image_tokens)


def _grid(words: str) -> np.ndarray:
    return np.asarray([int(w[5:-1]) for w in words.split()], np.int64).reshape(4, 4)


def _one_trajectory(prompts: BlocksPrompts, k: int, cfg: object) -> list:
    return synthetic_examples(WordPolicy(), prompts, k, 1, cfg, np.random.default_rng(k))  # type: ignore[arg-type]


def _cfg(**kw: float) -> object:
    r = Recipe()
    w = r.warmstart
    w.questions, w.random_layouts, w.random_edits, w.describe = 0, 0.0, 0.0, "none"
    for k, v in kw.items():
        setattr(w, k, v)
    return w


def test_a_missed_flaw_ends_the_trajectory() -> None:
    prompts = BlocksPrompts(tags=Recipe().data.blocks.tags, seed=0)
    cfg = _cfg(flaw_prob=1.0, miss_prob=1.0, fix_prob=1.0, rounds=2)
    for k in range(4):
        ex = _one_trajectory(prompts, k, cfg)
        stages = [ctx[0][0] for ctx, _ in ex]
        assert stages == ["reason", "reason", "reflect"]  # plan, first image (context starts with reason), critique
        assert ex[2][1] == [LENIENT, "<stop>"]
        flawed = _grid(ex[1][1][0])
        assert edits.diagnose(flawed, prompts.train_prompt(k).metadata)  # the missed image was flawed


def test_the_fix_is_applied_when_fix_prob_is_one() -> None:
    prompts = BlocksPrompts(tags=Recipe().data.blocks.tags, seed=0)
    cfg = _cfg(flaw_prob=1.0, miss_prob=0.0, fix_prob=1.0, rounds=1)
    for k in range(4):
        meta = prompts.train_prompt(k).metadata
        ex = _one_trajectory(prompts, k, cfg)
        assert [ctx[0][0] for ctx, _ in ex] == ["reason", "reason", "reflect", "refine"]
        flawed = _grid(ex[1][1][0])
        ops = edits.diagnose(flawed, meta)
        assert ops and ex[2][1] == [edits.critique_text(flawed, meta), "<stop>"]  # the truth: what is wrong
        assert dict(ex[3][0][0][1])["instruction"] == edits.edit_text(ops[0])
        refined = _grid(ex[3][1][0])
        assert not np.array_equal(refined, flawed)  # the named fix, not the flawed image again
        assert edits.judge(refined, meta).correct  # one flaw, one fix: the prompt is satisfied
