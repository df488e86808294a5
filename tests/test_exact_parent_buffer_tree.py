"""Exact small cases for the Tree-RL parent buffer (draws, checkpoint file checks), the refine/generate task
split and tree building (tree_rl), stage scoring (scoring) and the local rollout engine (round 11A audit).

Each test pins one behaviour that a plausible one-point bug (a mutation audit, 2026-12-07) changed without
failing the suite: stub random generators make the buffer's draws exact, hand-written buffer files make each
field check fail on its own, scripted policies record what the rollout hands them.
"""
from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
from safetensors.torch import save_file
import torch

from r3_rl.config import Recipe
from r3_rl.policy.base import ImageSample, TextSample
from r3_rl.rewards.reward_set import FailureBudget, RewardSet
from r3_rl.rollout.buffer import BufferEntry, ParentBuffer
from r3_rl.rollout.engine import LocalEngine, build_engine, run_ordered
from r3_rl.rollout.scoring import reward_sample
from r3_rl.rollout.tree_rl import RolloutTask, plan_tasks, run_task, stage_sampling
from r3_rl.trajectory import Node, PromptItem, Segment
from test_exact_loop import Scripted
from test_exact_scoring_learner import Failing, MeanPixel, _refine_tree, _scorer


class FixedRandom(random.Random):
    """``random()`` always gives ``value`` and ``randrange`` always its lowest value: the buffer's draws exact."""

    def __init__(self, value: float) -> None:
        super().__init__(0)
        self.value = value

    def random(self) -> float:
        return self.value

    def randrange(self, start, stop=None, step=1):  # noqa: ANN001, ANN201
        return 0


def _e(i: int, correct: bool, tag: str = "colors", tokens: list[int] | None = None, rnd: int = 0) -> BufferEntry:
    return BufferEntry(prompt=PromptItem(id=f"p{i}", prompt=f"prompt {i}", metadata={"tag": tag}),
                       image=np.full((2, 3, 3), i % 256, np.uint8), image_tokens=tokens, reward=i / 4,
                       correct=correct, round=rnd, source=f"t{i}/g0")


def _tokens_decode(tokens: list[int]) -> np.ndarray:
    """A decoder stand-in: pixels are the token ids mod 256, one row."""
    return (np.asarray(tokens, dtype=np.int64) % 256).astype(np.uint8).reshape(1, -1, 1).repeat(3, axis=2)


# ----------------------------------------------------------------------------------------------- buffer draws
@pytest.mark.parametrize("balance", ["pool", "tag"])
def test_fraction_zero_never_draws_a_correct_parent_even_at_random_zero(balance: str) -> None:
    """``rng.random() < correct_fraction``: at fraction 0 a correct parent is never drawn, not even when the
    generator gives exactly 0.0 (``<=`` would draw one); a draw equal to the fraction is a flawed parent."""
    buf = ParentBuffer(8)
    buf.add_many([_e(0, True), _e(1, False), _e(2, True), _e(3, False)])
    assert [p.correct for p in buf.sample(3, 0.0, FixedRandom(0.0), balance=balance)] == [False] * 3
    assert [p.correct for p in buf.sample(2, 0.5, FixedRandom(0.5), balance=balance)] == [False] * 2
    assert [p.correct for p in buf.sample(2, 0.5, FixedRandom(0.4999), balance=balance)] == [True] * 2


def test_every_parent_of_a_pool_can_be_drawn() -> None:
    """Pool draws are uniform over the whole pool: 200 draws from three flawed parents reach all three."""
    buf = ParentBuffer(8)
    buf.add_many([_e(i, False) for i in range(3)])
    assert {p.source for p in buf.sample(200, 0.0, random.Random(0))} == {"t0/g0", "t1/g0", "t2/g0"}
    tagged = ParentBuffer(8)
    tagged.add_many([_e(i, i == 0) for i in range(4)])
    assert {p.source for p in tagged.sample(200, 0.0, random.Random(0), balance="tag")} == {"t1/g0", "t2/g0", "t3/g0"}


def test_balanced_groups_are_listed_in_key_order() -> None:
    """The (correct, flawed) groups come in sorted key order, not in the order the tags were first added."""
    buf = ParentBuffer(8)
    buf.add_many([_e(0, True, "zebra"), _e(1, False, "zebra"), _e(2, True, "apple"), _e(3, False, "apple")])
    assert [p.prompt.tag for p in buf.sample(2, 0.5, FixedRandom(0.0), balance="tag")] == ["apple", "apple"]


def test_len_counts_both_pools_and_clear_empties_both() -> None:
    buf = ParentBuffer(8)
    buf.add_many([_e(0, True), _e(1, False), _e(2, False)])
    assert len(buf) == 3 and (len(buf.correct), len(buf.flawed)) == (1, 2)
    buf.clear()
    assert len(buf) == 0 and not buf.correct and not buf.flawed


def test_drawn_tokens_are_python_ints_and_png_pixels_writeable() -> None:
    """A drawn parent's token ids are plain ints (they go to JSON trajectories), and its pixels rebuilt from
    PNG are an ordinary writeable array."""
    buf = ParentBuffer(4, decode=_tokens_decode)
    buf.add(_e(0, True, tokens=[5, 70000, 3]))
    plain = ParentBuffer(4)
    plain.add(_e(1, True))
    (a,), (b,) = buf.sample(1, 1.0, random.Random(0)), plain.sample(1, 1.0, random.Random(0))
    assert a.image_tokens == [5, 70000, 3] and all(type(t) is int for t in a.image_tokens)
    assert b.image.flags.writeable and np.array_equal(b.image, np.full((2, 3, 3), 1, np.uint8))


# ----------------------------------------------------------------------------------------------- checkpoint
def test_token_ids_beyond_int16_survive_a_save_and_load(tmp_path: Path) -> None:
    """Token ids are int32: a codebook above 32767 (e.g. 65536 entries) keeps its ids exactly."""
    buf = ParentBuffer(4, decode=_tokens_decode)
    buf.add(_e(0, False, tokens=[0, 40000, 65535, 16383]))
    buf.save(tmp_path / "b.safetensors")
    back = ParentBuffer(1, decode=_tokens_decode)
    back.load(tmp_path / "b.safetensors")
    (p,) = back.sample(1, 0.0, random.Random(0))
    assert p.image_tokens == [0, 40000, 65535, 16383] and p.reward == 0.0


@pytest.mark.parametrize("capacity", [1, 5])
def test_capacity_survives_a_save_and_load_whatever_the_fill(tmp_path: Path, capacity: int) -> None:
    """The saved capacity is the pools' size, not how full they are; 1 is a valid capacity."""
    buf = ParentBuffer(capacity)
    buf.add_many([_e(0, True), _e(1, False)])
    buf.save(tmp_path / "b.safetensors")
    back = ParentBuffer(99)
    back.load(tmp_path / "b.safetensors")
    assert (back.correct.maxlen, back.flawed.maxlen, len(back)) == (capacity, capacity, 2)


def test_loaded_token_spans_own_their_memory(tmp_path: Path) -> None:
    """Each loaded entry keeps a copy of its span, not a view holding the file's whole token array alive."""
    buf = ParentBuffer(4, decode=_tokens_decode)
    buf.add_many([_e(0, True, tokens=[1, 2]), _e(1, False, tokens=[3, 4])])
    buf.save(tmp_path / "b.safetensors")
    back = ParentBuffer(1, decode=_tokens_decode)
    back.load(tmp_path / "b.safetensors")
    assert [s.tokens.tolist() for s in (*back.correct, *back.flawed)] == [[1, 2], [3, 4]]
    assert all(s.tokens.base is None for s in (*back.correct, *back.flawed))


def _good(**over) -> dict:
    e = {"pool": "flawed", "prompt": {"id": "p", "prompt": "x", "metadata": {}, "source": ""}, "reward": 0.5,
         "correct": False, "round": 0, "source": "t/g0", "tokens": [0, 2]}
    e.update(over)
    return {k: v for k, v in e.items() if v is not ...}


def _write(path: Path, entries: list[dict], tokens: list[int], capacity: str = "4") -> Path:
    save_file({"tokens": torch.tensor(tokens, dtype=torch.int32), "png": torch.zeros(0, dtype=torch.uint8)},
              str(path), metadata={"format": "1", "capacity": capacity, "entries": json.dumps(entries)})
    return path


def test_a_hand_written_file_of_good_entries_loads(tmp_path: Path) -> None:
    """The baseline for the refusals below: the same entries, well formed, load (a prompt without metadata too)."""
    prompt = {"id": "q", "prompt": "y"}
    path = _write(tmp_path / "ok.safetensors", [_good(), _good(tokens=[2, 4], pool="correct", correct=True,
                                                               prompt=prompt)], [7, 8, 9, 10])
    buf = ParentBuffer(1, decode=_tokens_decode)
    buf.load(path)
    assert [s.tokens.tolist() for s in buf.flawed] == [[7, 8]] and [s.tokens.tolist() for s in buf.correct] == [[9, 10]]
    assert buf.correct[0].prompt == PromptItem("q", "y")


@pytest.mark.parametrize("bad, says", [
    ({"tokens": [1, 1]}, "'tokens' span"),  # an empty span: no image
    ({"tokens": [False, True]}, "'tokens' span"),  # JSON booleans are not offsets
    ({"round": -1}, "whole 'round' >= 0"),
    ({"correct": "yes"}, "true/false 'correct'"),
    ({"correct": 1}, "true/false 'correct'"),
    ({"reward": True}, "'reward' must be a finite number"),
    ({"reward": float("nan")}, "'reward' must be a finite number"),
    ({"reward": float("inf")}, "'reward' must be a finite number"),
    ({"prompt": {"id": "p", "prompt": "x", "extra": 1}}, "'prompt' must be"),
    ({"prompt": {"id": "p", "prompt": "x", "metadata": []}}, "'prompt' must be"),
    ({"source": None}, "'source' a string"),
])
def test_each_bad_field_of_a_buffer_file_is_refused_in_one_line(tmp_path: Path, bad: dict, says: str) -> None:
    path = _write(tmp_path / "bad.safetensors", [_good(**bad)], [7, 8, 9, 10])
    with pytest.raises(ValueError, match=f"entry 0: .*{says}"):
        ParentBuffer(1, decode=_tokens_decode).load(path)


@pytest.mark.parametrize("spans", [[[0, 1], [1, 3], [3, 6]], [[0, 2], [2, 5]]])
def test_token_spans_of_different_lengths_are_refused(tmp_path: Path, spans: list) -> None:
    path = _write(tmp_path / "mixed.safetensors", [_good(tokens=s) for s in spans], list(range(6)))
    with pytest.raises(ValueError, match=f"spans of {len(spans)} different lengths"):
        ParentBuffer(1, decode=_tokens_decode).load(path)


def test_a_failed_load_leaves_the_buffer_as_it_was(tmp_path: Path) -> None:
    """Entries are read into new pools and swapped in only once all are good: a bad entry 1 keeps the old buffer."""
    buf = ParentBuffer(3, decode=_tokens_decode)
    buf.add(_e(9, True, tokens=[1, 2]))
    path = _write(tmp_path / "bad.safetensors", [_good(), _good(round=-1)], [7, 8])
    with pytest.raises(ValueError, match="entry 1"):
        buf.load(path)
    assert buf.correct.maxlen == 3 and [s.source for s in buf.correct] == ["t9/g0"] and not buf.flawed


def test_a_legacy_buffer_keeps_its_pools(tmp_path: Path) -> None:
    """Formats 1-2: the 'correct' list goes to the correct pool and 'flawed' to the flawed one."""
    from dataclasses import asdict

    state = {"capacity": 4, "correct": [], "flawed": []}
    for e in (_e(0, True), _e(1, False), _e(2, False)):
        state["correct" if e.correct else "flawed"].append({**asdict(e), "image": e.image.tolist()})
    buf = ParentBuffer(1)
    buf.load_legacy(state)
    assert [s.source for s in buf.correct] == ["t0/g0"] and [s.source for s in buf.flawed] == ["t1/g0", "t2/g0"]
    assert [p.source for p in buf.sample(3, 1.0, random.Random(0))] == ["t0/g0"] * 3


# ----------------------------------------------------------------------------------------------- tree_rl
def test_eval_sampling_uses_image_temperature_for_refine_and_text_for_reflect() -> None:
    recipe = Recipe.model_validate({"eval": {"image_temperature": 0.7, "text_temperature": 0.0}})
    sp = stage_sampling(recipe, eval_mode=True)
    assert (sp.generate.temperature, sp.generate.greedy) == (0.7, False)
    assert (sp.refine.temperature, sp.refine.greedy) == (0.7, False)
    # greedy stages record their log-probs at temperature 1 (never 0)
    assert (sp.reason.temperature, sp.reason.greedy) == (1.0, True)
    assert (sp.reflect.temperature, sp.reflect.greedy) == (1.0, True)
    warm = stage_sampling(Recipe.model_validate({"eval": {"text_temperature": 0.3}}), eval_mode=True)
    assert (warm.reflect.temperature, warm.reflect.greedy) == (0.3, False)


def test_rescue_sampling_is_the_reflect_stages_own_but_hotter_and_never_greedy() -> None:
    recipe = Recipe.model_validate({"rollout": {"verdict_rescue_temperature": 2.0,
                                                "reflect": {"greedy": True, "max_new_tokens": 7, "top_k": 5}}})
    rescue = stage_sampling(recipe).reflect_rescue
    assert (rescue.temperature, rescue.greedy, rescue.max_new_tokens, rescue.top_k) == (2.0, False, 7, 5)


def test_task_seeds_follow_the_recipe_seed() -> None:
    p = [PromptItem("p1", "a")]
    assert plan_tasks(0, 1, p, [], 2, 1)[0].seed != plan_tasks(0, 2, p, [], 2, 1)[0].seed


def test_tasks_split_every_item_and_number_across_kinds() -> None:
    """5 prompts and 3 parents in tasks of 2 groups: [2, 2, 1] prompts then [2, 1] parents, indices 0..4."""
    prompts = [PromptItem(f"p{i}", str(i)) for i in range(5)]
    parents = [_e(i, False) for i in range(3)]
    tasks = plan_tasks(1, 0, prompts, parents, group_size=2, groups_per_task=2)
    assert [t.index for t in tasks] == [0, 1, 2, 3, 4] and [t.kind for t in tasks] == ["A"] * 3 + ["BC"] * 2
    assert [[p.id for p in t.prompts] for t in tasks[:3]] == [["p0", "p1"], ["p2", "p3"], ["p4"]]
    assert [[p.source for p in t.parents] for t in tasks[3:]] == [["t0/g0", "t1/g0"], ["t2/g0"]]
    assert len({t.seed for t in tasks}) == 5


class Recorder(Scripted):
    """``Scripted`` that records the generator seed and what reflect/refine are handed; images carry tokens."""

    version = 2

    def __init__(self) -> None:
        self.seeds: list[int] = []
        self.reflect_tokens: list = []
        self.instructions: list[str] = []

    def generate(self, prompts, plans, sampling, generator=None):
        self.seeds.append(generator.initial_seed())
        return [ImageSample(np.zeros((2, 2, 3), np.uint8), Segment("image", {}, [1], [-0.1]), [4, 5])
                for _ in prompts]

    def reflect(self, prompts, images, sampling, generator=None):
        self.seeds.append(generator.initial_seed())
        self.reflect_tokens += [im.image_tokens for im in images]
        return super().reflect(prompts, images, sampling, generator)

    def refine(self, prompts, images, instructions, sampling, generator=None):
        self.instructions += list(instructions)
        return [ImageSample(np.ones((2, 2, 3), np.uint8), Segment("image", {}, [1], [-0.1]), [6, 7]) for _ in images]


def test_stage_a_images_keep_their_tokens_and_the_task_seed() -> None:
    task = RolloutTask(kind="A", step=3, index=1, seed=12345, group_size=2, prompts=[PromptItem("p", "x")])
    policy = Recorder()
    (tree,) = run_task(policy, task, stage_sampling(Recipe()), "no further edit needed")
    assert policy.seeds == [12345] and tree.meta == {"kind": "A", "step": 3}
    assert [tree.nodes[n].image_tokens for n in ("g0", "g1")] == [[4, 5], [4, 5]]


def test_stage_bc_hands_on_tokens_parsed_instructions_and_the_parents_verdict() -> None:
    """Parent 0 (value 0) is edited, parent 1 (value 1) stopped on: the critic sees the parents' tokens, the
    refiner the parsed instruction; the root and a copied image keep the parent's verdict and tokens."""
    flawed = BufferEntry(PromptItem("p", "x"), np.zeros((2, 2, 3), np.uint8), [8, 9], 0.25, False, 1, "s1/r3")
    good = BufferEntry(PromptItem("q", "y"), np.ones((2, 2, 3), np.uint8), [1, 2], 1.0, True, 0, "s0/g1")
    task = RolloutTask(kind="BC", step=5, index=0, seed=99, group_size=2, parents=[flawed, good])
    policy = Recorder()
    trees = run_task(policy, task, stage_sampling(Recipe()), "no further edit needed")
    assert policy.seeds == [99] and policy.reflect_tokens == [[8, 9], [8, 9], [1, 2], [1, 2]]
    assert policy.instructions == ["make it right", "make it right"]
    assert [t.meta for t in trees] == [{"kind": "BC", "step": 5, "parent": "s1/r3"},
                                       {"kind": "BC", "step": 5, "parent": "s0/g1"}]
    assert [t.nodes["root"].meta for t in trees] == [{"correct": False}, {"correct": True}]
    copied = trees[1].nodes["r0"]
    assert copied.meta == {"copied": True, "correct": True} and copied.image_tokens == [1, 2]
    assert trees[0].nodes["r0"].image_tokens == [6, 7] and trees[0].nodes["r0"].round == 2


# ----------------------------------------------------------------------------------------------- scoring
def test_reward_sample_of_a_critique_and_of_a_refined_image() -> None:
    """A critique sees the image above it and its own text; the refined image its own round and the last text;
    text turns of the history carry no reward."""
    tree = _refine_tree()
    tree.nodes["p0"].reward, tree.nodes["g0"].reward, tree.nodes["c0"].reward = 0.7, 0.25, 0.5
    c = reward_sample(tree, tree.nodes["c0"])
    assert c.image is tree.nodes["g0"].image and c.text == tree.nodes["c0"].text and c.round == 1
    r = reward_sample(tree, tree.nodes["r0"])
    assert r.text == tree.nodes["c0"].text and (r.stage, r.round) == ("refine", 1)
    assert [(t.stage, t.reward) for t in r.history] == [("reason", None), ("generate", 0.25), ("reflect", None),
                                                        ("refine", None)]


def test_score_images_writes_parts_and_rescores_a_scored_node() -> None:
    tree = _refine_tree()
    tree.nodes["r0"].reward = 0.3  # an earlier score: score_images replaces it
    _scorer(MeanPixel()).score_images((tree, n) for n in tree.nodes.values())
    assert tree.nodes["r0"].reward == 1.0 and tree.nodes["r0"].rewards == {"mean": 1.0}
    assert tree.nodes["g0"].rewards == {"mean": 0.0}


def test_score_images_leaves_the_failure_check_to_the_trainer() -> None:
    """Failures are only recorded while scoring (``check=False``): a budget of 0 with a minimum of 1 sample
    does not raise mid-rollout, it raises on the trainer's ``check()``."""
    budget = FailureBudget(0.0, min_samples=1)
    tree = _refine_tree()
    scorer = _scorer(Failing(), failures=budget, reflect_extra=Failing())
    scorer.score_images((tree, n) for n in tree.nodes.values())
    scorer.compose(tree)
    assert (budget.scored, budget.failed) == (3, 3)  # two images and one critique
    with pytest.raises(Exception, match="3/3 samples failed"):
        budget.check()


def test_an_empty_extra_reward_set_adds_nothing() -> None:
    """``rewards.reflect.extra: []``: critiques get no 'extra' part and are not counted as scored samples."""
    tree = _refine_tree()
    scorer = _scorer(MeanPixel(), reflect_extra=RewardSet([]))
    scorer.score_images((tree, n) for n in tree.nodes.values())
    scorer.compose(tree)
    assert "extra" not in tree.nodes["c0"].rewards and scorer.failures.scored == 2


def test_extra_rewards_score_only_sampled_critiques_and_keep_their_parts() -> None:
    class Count:
        members = ["count"]
        calls: list[int] = []

        def score(self, samples: list) -> list:
            from r3_rl.rewards.reward_set import ScoredSample
            self.calls.append(len(samples))
            return [ScoredSample(0.25, parts={"count": 0.25}) for _ in samples]

    tree = _refine_tree()
    tree.add(Node(id="c1", parent="g0", stage="reflect", round=1, group_id="c", policy_version=0,
                  text="<think> x </think> no further edit needed", stop=True))  # not sampled: no segment
    scorer = _scorer(MeanPixel(), reflect_extra=Count())
    scorer.score_images((tree, n) for n in tree.nodes.values())
    scorer.compose(tree)
    assert Count.calls == [1] and tree.nodes["c0"].rewards["count"] == 0.25
    assert tree.nodes["c0"].rewards["extra"] == 0.25 and "extra" not in tree.nodes["c1"].rewards


# ----------------------------------------------------------------------------------------------- engine
def test_run_ordered_hands_each_tasks_trees_to_on_task_as_they_finish() -> None:
    from test_exact_loop import FakeEngine

    tasks = plan_tasks(0, 0, [PromptItem("a", "a"), PromptItem("b", "b")], [], 2, 1)
    seen: list = []
    assert run_ordered(FakeEngine([1, 0]), tasks, None, on_task=seen.append) == ["tree0", "tree1"]  # type: ignore[arg-type]
    assert seen == [["tree1"], ["tree0"]]


def test_local_engine_uses_the_recipes_stop_phrase_and_the_synced_policy() -> None:
    """A recipe whose stop phrase is "all good": a critique saying it stops; after ``sync`` the new policy samples."""
    class SaysAllGood(Scripted):
        def reflect(self, prompts, images, sampling, generator=None):
            return [TextSample("<think> ok </think> all good", Segment("text", {}, [2], [-0.1])) for _ in images]

    recipe = Recipe.model_validate({"templates": {"stop_phrase": "all good"}})
    engine = build_engine(recipe, Scripted(), lambda m: None)
    assert isinstance(engine, LocalEngine) and engine.restarts == 0
    engine.sync(SaysAllGood())
    parent = BufferEntry(PromptItem("p", "x"), np.zeros((2, 2, 3), np.uint8), None, 0.0, False, 0, "s/g0")
    tasks = plan_tasks(0, 0, [], [parent], 2, 1)
    ((_, (tree,)),) = list(engine.run(tasks, stage_sampling(recipe)))
    assert [tree.nodes[c].stop for c in ("c0", "c1")] == [True, True]
    assert tree.nodes["r0"].meta["copied"] is True
