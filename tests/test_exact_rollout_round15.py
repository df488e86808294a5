"""Exact small cases for rollout (tree_rl, engine, chain, buffer, parent_mix, scoring), trajectory trees and the
group-advantage maths (advantages, signal) (round 15 audit).

Each test pins one behaviour that a plausible one-point bug (a mutation audit, 2026-12-07) changed without failing
the suite; every expected value is worked out by hand in the docstring, never by calling the code under test.
"""
from __future__ import annotations

import json
import math
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from r3_rl.algorithms.advantages import group_advantages
from r3_rl.algorithms.signal import SIGNAL_ATOL, has_signal
from r3_rl.rollout.buffer import BufferEntry, ParentBuffer
from r3_rl.rollout.engine import run_ordered
from r3_rl.rollout.parent_mix import parent_feature
from r3_rl.rollout.chain import r3_chains
from r3_rl.rollout.tree_rl import RolloutTask, StageSampling, run_task
from r3_rl.trajectory import PromptItem, SamplingParams
from test_exact_loop import P1, STOP_PHRASE, Scripted
from test_exact_parent_buffer_tree import _good, _tokens_decode, _write

D = torch.float64


# ------------------------------------------------------------------------------------------------ advantages
def test_a_batch_std_pool_with_one_valid_reward_has_std_zero() -> None:
    """std_pools: rewards [1, 0] in one group but pools "a" and "b" of one valid reward each: each pool's std is 0
    (mean r, deviation 0), so with eps=1 the advantages are +-0.5 / (0 + 1).  A one-member mean of r/2 (a count
    clamped at 2) gives pool "a" a std of 0.5 and +0.5 / 1.5."""
    adv = group_advantages(torch.tensor([1.0, 0.0], dtype=D), ["g", "g"], normalize_std=True, eps=1.0,
                           std_pools=["a", "b"])
    assert adv.tolist() == [0.5, -0.5]


def test_has_signal_agrees_with_the_advantages_at_exactly_signal_atol() -> None:
    """0 and SIGNAL_ATOL (a spread of exactly 1e-9): no signal for the logs either (``>``, as the advantages'
    ``flat`` uses ``<=``), while twice that spread is a signal."""
    assert SIGNAL_ATOL == 1e-9
    assert has_signal([0.0, SIGNAL_ATOL]) is False
    assert group_advantages(torch.tensor([0.0, SIGNAL_ATOL], dtype=D), ["g", "g"]).tolist() == [0.0, 0.0]
    assert has_signal([0.0, 2 * SIGNAL_ATOL]) is True


def test_a_real_reward_difference_of_1e_7_is_a_signal() -> None:
    """Only float rounding is 'equal': rewards 0 and 1e-7 (a small but genuine difference) rank their group,
    A = -+5e-8; a tolerance of 1e-6 would call the group flat and give it zeros."""
    assert has_signal([0.0, 1e-7]) is True
    adv = group_advantages(torch.tensor([0.0, 1e-7], dtype=D), ["g", "g"])
    assert adv.tolist() == pytest.approx([-5e-8, 5e-8], rel=1e-9, abs=0)
    assert not math.isnan(adv[0].item())


def test_two_dimensional_rewards_are_refused_by_name() -> None:
    """Rewards are one per sample: a 2x2 tensor with four group ids is a caller's bug, refused as "must be 1-D"
    (not an index error from deep inside, or advantages of a flattened batch)."""
    with pytest.raises(ValueError, match=r"rewards must be 1-D, got shape \(2, 2\)"):
        group_advantages(torch.zeros(2, 2, dtype=D), ["a", "a", "b", "b"])


# ------------------------------------------------------------------------------------------------ parent_mix
def test_an_untagged_parents_tag_feature_is_the_prompts_tag_all() -> None:
    """The tag feature is ``PromptItem.tag`` -- ``"all"`` for an untagged prompt, the key of every per-tag figure --
    so an untagged parent and one tagged "all" fall in one tag group (correct 1, flawed 1: balanced accuracy 0.5),
    not two groups that each give the verdict away (1.0)."""
    untagged = BufferEntry(PromptItem("u", "x"), np.zeros((1, 1, 3), np.uint8), None, 1.0, True, 0)
    tagged = BufferEntry(PromptItem("t", "y", {"tag": "all"}), np.zeros((1, 1, 3), np.uint8), None, 0.0, False, 0)
    assert parent_feature(untagged, "tag") == "all"
    buf = ParentBuffer(4)
    buf.add_many([untagged, tagged])
    assert buf.shortcut_accuracy("tag")["tag"] == 0.5



def test_the_round_feature_keeps_every_round_apart() -> None:
    """Round 1 and round 2 are different values of the round feature: a correct round-1 parent and a flawed
    round-2 one give the verdict away by their round (1.0); folding all refined rounds into one value gives 0.5."""
    one = BufferEntry(PromptItem("a", "x"), np.zeros((1, 1, 3), np.uint8), None, 1.0, True, 1)
    two = BufferEntry(PromptItem("b", "x"), np.zeros((1, 1, 3), np.uint8), None, 0.0, False, 2)
    assert (parent_feature(one, "round"), parent_feature(two, "round")) == (1, 2)
    buf = ParentBuffer(4)
    buf.add_many([one, two])
    assert buf.shortcut_accuracy()["round"] == 1.0

# ------------------------------------------------------------------------------------------------ buffer
def _entry(i: int, correct: bool, tag: str = "t") -> BufferEntry:
    return BufferEntry(PromptItem(f"p{i}", f"prompt {i}", {"tag": tag}), np.full((2, 2, 3), i, np.uint8), None,
                       float(correct), correct, 0, f"s/{i}")


def test_a_pool_draw_with_only_correct_parents_still_draws_n() -> None:
    """Only correct parents held and a fraction of 0 (every draw asks for a flawed one): the draw falls back to
    the kind that exists and returns all 3 parents, not an empty list."""
    buf = ParentBuffer(4)
    buf.add(_entry(1, True))
    drawn = buf.sample(3, 0.0, random.Random(0))
    assert [p.source for p in drawn] == ["s/1"] * 3 and all(p.correct for p in drawn)


@pytest.mark.parametrize("pool, correct", [("flawed", True), ("correct", False)])
def test_a_buffer_entry_whose_pool_contradicts_its_verdict_is_refused(tmp_path: Path, pool: str,
                                                                        correct: bool) -> None:
    """A flawed image filed among the correct parents would be taught as right: the load refuses it, naming the
    pool and the verdict."""
    path = _write(tmp_path / "b.safetensors", [_good(pool=pool, correct=correct)], [7, 8])
    with pytest.raises(ValueError, match=f"entry 0: in pool '{pool}' but 'correct' is {str(correct).lower()}"):
        ParentBuffer(1, decode=_tokens_decode).load(path)


# ------------------------------------------------------------------------------------------------ engine
class _Backwards:
    """An engine stand-in that finishes the tasks last-first; each task's trees are ``["<index>a", "<index>b"]``."""

    restarts = 0

    def run(self, tasks, sampling):  # noqa: ANN001, ANN201
        for task in reversed(tasks):
            yield task, [f"{task.index}a", f"{task.index}b"]


def test_run_ordered_returns_trees_by_task_index_whatever_the_list_order() -> None:
    """Tasks handed over as [2, 0, 1] and finished 1, 0, 2: the trees come back in index order 0, 1, 2 (each
    task's own trees in their order), so a caller's list order cannot reorder the step's trees."""
    tasks = [RolloutTask(kind="A", step=4, index=i, seed=i, group_size=1) for i in (2, 0, 1)]
    assert run_ordered(_Backwards(), tasks, None) == ["0a", "0b", "1a", "1b", "2a", "2b"]


@pytest.mark.parametrize("entries", [{}, 5, "ab"])
def test_a_buffer_file_whose_entries_are_not_a_list_is_refused(tmp_path: Path, entries: object) -> None:
    """'entries' must be a JSON list: an object (which would load as an empty buffer), a number or a string is
    refused in one line naming the field, and the buffer keeps what it held."""
    path = _write(tmp_path / "b.safetensors", entries, [7, 8])  # type: ignore[arg-type]
    buf = ParentBuffer(2)
    buf.add(_entry(1, True))
    with pytest.raises(ValueError, match="'entries' is not a list"):
        buf.load(path)
    assert [s.source for s in buf.correct] == ["s/1"]


@pytest.mark.parametrize("fmt", ["2", None])
def test_a_buffer_file_of_another_format_is_refused_before_it_is_read(tmp_path: Path, fmt: str | None) -> None:
    """Good entries under format "2" (or no format at all) are not read as format 1: the load names the format it
    reads, rather than loading entries whose meaning may have changed."""
    meta = {"capacity": "4", "entries": json.dumps([_good()])}
    if fmt is not None:
        meta["format"] = fmt
    save_file({"tokens": torch.tensor([7, 8], dtype=torch.int32), "png": torch.zeros(0, dtype=torch.uint8)},
              str(tmp_path / "b.safetensors"), metadata=meta)
    buf = ParentBuffer(2, decode=_tokens_decode)
    with pytest.raises(ValueError, match="not a parent-buffer file of format 1"):
        buf.load(tmp_path / "b.safetensors")
    assert len(buf) == 0 and buf.correct.maxlen == 2


# ------------------------------------------------------------------------------------------------ stage sampling
class _Sampled(Scripted):
    """``Scripted`` (edit an image of value 0, stop on any other) recording which sampling each stage was given,
    by its ``max_new_tokens``."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, int]] = []

    def reason(self, prompts, sampling, generator=None):  # noqa: ANN001, ANN201
        self.seen.append(("reason", sampling.max_new_tokens))
        return super().reason(prompts, sampling, generator)

    def generate(self, prompts, plans, sampling, generator=None):  # noqa: ANN001, ANN201
        self.seen.append(("generate", sampling.max_new_tokens))
        return super().generate(prompts, plans, sampling, generator)

    def reflect(self, prompts, images, sampling, generator=None):  # noqa: ANN001, ANN201
        self.seen.append(("reflect", sampling.max_new_tokens))
        return super().reflect(prompts, images, sampling, generator)

    def refine(self, prompts, images, instructions, sampling, generator=None):  # noqa: ANN001, ANN201
        self.seen.append(("refine", sampling.max_new_tokens))
        return super().refine(prompts, images, instructions, sampling, generator)


# each stage's own parameters, told apart by max_new_tokens: reason 1, generate 2, reflect 3, refine 4
FOUR = StageSampling(*(SamplingParams(max_new_tokens=n) for n in (1, 2, 3, 4)))


def test_an_eval_chain_samples_each_stage_with_its_own_parameters() -> None:
    """Plan, image, critique, edit, critique (stop): each call gets its stage's sampling, never another's."""
    policy = _Sampled()
    r3_chains(policy, [P1], FOUR, rounds=2, stop_phrase=STOP_PHRASE)
    assert policy.seen == [("reason", 1), ("generate", 2), ("reflect", 3), ("refine", 4), ("reflect", 3)]


def test_rollout_tasks_sample_each_stage_with_its_own_parameters() -> None:
    """A stage-A task calls reason then generate; a B+C task on a value-0 parent reflects then refines, each
    with its own stage's sampling."""
    policy = _Sampled()
    run_task(policy, RolloutTask(kind="A", step=0, index=0, seed=1, group_size=2, prompts=[P1]), FOUR, STOP_PHRASE)
    parent = BufferEntry(P1, np.zeros((2, 2, 3), np.uint8), None, 0.0, False, 0, "s0/g0")
    run_task(policy, RolloutTask(kind="BC", step=0, index=1, seed=2, group_size=2, parents=[parent]), FOUR,
             STOP_PHRASE)
    assert policy.seen == [("reason", 1), ("generate", 2), ("reflect", 3), ("refine", 4)]
