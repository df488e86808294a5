"""Exact cases at the edges that the rewards, eval, tracking and data tests did not touch.

A second mutation audit (2026-12-06) made 41 plausible one-point bugs in rewards/ (GenEval rules, Blocks, the
remote and VLM-judge clients, composition), eval/ (understanding, synergy, the report), r3_rl/tracking/metrics.py,
r3_rl/blocks/ and r3_rl/data.py; 14 passed the whole suite, one of them equivalent (no test can tell it apart).
Each test here fails on one of the other 13, named by its audit id in the docstring (tests/test_exact_small_cases.py
holds the first round's).  Several hid behind square images or sat exactly on a boundary no test touched.
"""
from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest

from r3_rl.blocks.codec import encode
from r3_rl.blocks.world import CELL, token_of
from r3_rl.eval.evaluate import check_failures
from r3_rl.eval.understanding import yes_no_summary
from r3_rl.rewards.base import RewardSample
from r3_rl.rewards.blocks import BlocksReward, score_image
from r3_rl.rewards.geneval_rules import Detection, evaluate
from r3_rl.rewards.reward_set import RewardFailureError
from r3_rl.rewards.vlm_judge import JudgeParseError, parse_answers
from r3_rl.tracking.metrics import refine_metrics, understanding_metrics
from r3_rl.trajectory import Node, PromptItem, Tree


# ---------------------------------------------------------------- GenEval rules
def test_colour_clause_needs_every_counted_object_in_the_colour() -> None:
    """G1: ``colors.count(color) < k`` -> ``< 1`` (one red square passes "two red squares")."""
    dets = [Detection("square", (0, 0, 10, 10), color="red"), Detection("square", (20, 0, 30, 10), color="blue")]
    res = evaluate(dets, {"include": [{"class": "square", "count": 2, "color": "red"}]})
    assert res.correct is False
    assert res.reasons and "expected red square>=2, found 1 red" in res.reasons[0]


def test_region_uses_the_image_height_for_above() -> None:
    """G7: region ``above`` compares the centre's y with ``w / 2`` instead of ``h / 2`` (hidden by square images)."""
    meta = {"include": [{"class": "square", "count": 1, "region": "above"}]}
    det = [Detection("square", (0, 55, 10, 65))]  # centre y = 60: below the middle of a 200x100 image
    assert evaluate(det, meta, image_size=(200, 100)).correct is False
    assert evaluate([Detection("square", (0, 35, 10, 45))], meta, image_size=(200, 100)).correct is True


def test_size_equal_areas_score_no_larger_term() -> None:
    """G8: ``_area(a) <= _area(b)`` -> ``<`` for ``larger``: equal areas earn the larger clause's size term.
    ``correct`` cannot see it (the ``smaller`` clause fails on the same pair), the partial credit can."""
    meta = {"include": [{"class": "square", "count": 1, "size": "larger"},
                        {"class": "circle", "count": 1, "size": "smaller"}]}
    dets = [Detection("square", (0, 0, 10, 10)), Detection("circle", (50, 50, 60, 60))]
    res = evaluate(dets, meta)
    assert res.correct is False and res.strict_correct is False
    # terms: 1 (square count), 1 (circle count), 0 (square not larger), 0 (circle not smaller)
    assert res.score == pytest.approx(0.5)


# ---------------------------------------------------------------- Blocks reward
def _grid(rows: int, cols: int, cells: dict[tuple[int, int], tuple[str, str]]) -> np.ndarray:
    g = np.zeros((rows, cols), dtype=np.int64)
    for (r, c), (shape, color) in cells.items():
        g[r, c] = token_of(shape, color)
    return g


def test_blocks_region_on_a_wide_image() -> None:
    """B1: ``image_size=(shape[1], shape[0])`` swapped to ``(shape[0], shape[1])``: only a non-square image
    (rows != cols) shows it."""
    meta = {"include": [{"class": "square", "count": 1, "region": "above"}]}
    low = encode(_grid(2, 4, {(1, 0): ("square", "red")}))  # 16 x 32 pixels, square in the bottom row
    high = encode(_grid(2, 4, {(0, 0): ("square", "red")}))
    assert low.shape[:2] == (2 * CELL, 4 * CELL)
    assert score_image(low, meta).correct is False
    assert score_image(high, meta).correct is True


def test_blocks_reward_fails_on_an_exclude_class_it_cannot_draw() -> None:
    """B3: ``unsupported`` checks only ``include``: an exclude of a class the Blocks world has no shape for
    is then scored (always satisfied) instead of being an explicit failure."""
    img = encode(_grid(4, 4, {(0, 0): ("square", "red")}))
    meta = {"include": [{"class": "square", "count": 1}], "exclude": [{"class": "dog", "count": 1}]}
    out = BlocksReward().score_one(RewardSample(prompt="a square", metadata=meta, stage="generate", round=0, image=img))
    assert out.failed and "dog" in (out.failure or "")


# ---------------------------------------------------------------- remote reward client
def test_remote_body_exactly_at_the_limit_is_sent() -> None:
    """RM1: ``len(body) > max_request_bytes`` -> ``>=``: a body of exactly the server's limit is refused."""
    from r3_rl.rewards.remote import RemoteReward

    r = RemoteReward("http://127.0.0.1:1")
    r.max_request_bytes = 100
    assert r._over_limit([], b"x" * 100) is None
    assert r._over_limit([], b"x" * 101) is not None


def test_remote_too_few_results_fail_the_whole_batch(monkeypatch: pytest.MonkeyPatch) -> None:
    """RM2: the result-count check ``!=`` -> ``>``: a reply with fewer results than samples leaves samples
    without any output (None) instead of failing them."""
    import r3_rl.rewards.remote as remote

    monkeypatch.setattr(remote, "request_json", lambda *a, **k: {"results": [{"score": 1.0}]})
    r = remote.RemoteReward("http://127.0.0.1:1")
    samples = [RewardSample(prompt=f"p{i}", metadata={}, stage="reason", round=0, image=None, text="t")
               for i in range(2)]
    out = r(samples)
    assert len(out) == 2 and all(o is not None and o.failed for o in out)
    assert "returned 1 results for 2 samples" in (out[0].failure or "")


# ---------------------------------------------------------------- vlm_judge parsing
def test_judge_with_more_answers_than_questions_is_a_failure() -> None:
    """V1: ``len(values) != n`` -> ``< n``: surplus answers are silently cut instead of failing the reply."""
    with pytest.raises(JudgeParseError, match="3 answers for 2 questions"):
        parse_answers('{"Q1": "yes", "Q2": "no", "Q3": "yes"}', 2)
    with pytest.raises(JudgeParseError, match="3 answers for 2 questions"):
        parse_answers("yes\nno\nyes", 2)


# ---------------------------------------------------------------- eval
def test_yes_no_p_of_exactly_one_half_is_not_a_yes() -> None:
    """U2: ``p > 0.5`` -> ``p >= 0.5``: an undecided answer (P(yes) = 0.5) counts as a yes."""
    s = yes_no_summary([(0.5, True, "a"), (0.5, False, "a")])
    assert s["accuracy_on_yes"] == 0.0 and s["accuracy_on_no"] == 1.0 and s["accuracy"] == 0.5


def test_eval_failures_exactly_at_the_budget_do_not_stop() -> None:
    """E4: ``failed / images > max_fraction`` -> ``>=``: a clean eval under ``max_failure_fraction: 0`` stops,
    and one exactly at the fraction stops."""
    check_failures({"prompts": 4, "rounds": 1, "failed": [0, 0]}, 0.0, "after")
    check_failures({"prompts": 2, "rounds": 1, "failed": [1, 0]}, 0.25, "after")
    with pytest.raises(RewardFailureError):
        check_failures({"prompts": 2, "rounds": 1, "failed": [1, 1]}, 0.25, "after")


# ---------------------------------------------------------------- tracking metrics
def _bc_tree(parent_reward: float, parent_meta: dict, stop: bool, child_reward: float) -> Tree:
    t = Tree(id="t", prompt=PromptItem("p", "a red square", {"tag": "colors"}))
    t.add(Node(id="root", parent=None, stage="generate", round=0, group_id="g/root", policy_version=-1,
               image=np.zeros((8, 8, 3), np.uint8), reward=parent_reward, meta=parent_meta))
    t.add(Node(id="c", parent="root", stage="reflect", round=1, group_id="g/reflect", policy_version=0,
               text="<think>x</think> y", stop=stop, reward=0.0))
    t.add(Node(id="r", parent="c", stage="refine", round=1, group_id="g/refine", policy_version=0,
               image=np.ones((8, 8, 3), np.uint8), reward=child_reward))
    return t


def test_understanding_metrics_take_the_scorers_correct_part() -> None:
    """M2: the parent's ``meta["correct"]`` (``rewards.reflect.correct_part``) ignored, the reward threshold used
    instead: a stop on a parent the scorer judged correct but whose reward is below 1 counts as a wrong stop."""
    m = understanding_metrics([_bc_tree(0.5, {"correct": True}, stop=True, child_reward=0.5)], correct_threshold=1.0)
    assert m["3_understanding/stop_on_correct"] == 1.0
    assert math.isnan(m["3_understanding/edit_on_flawed"])


def test_refine_metrics_treat_a_rounding_difference_as_unchanged() -> None:
    """M3: ``d > SIGNAL_ATOL`` -> ``d > 0``: a refined image 1e-12 better counts as improved."""
    m = refine_metrics([_bc_tree(0.5, {}, stop=False, child_reward=0.5 + 1e-12)])
    assert m["6_refine/unchanged"] == 1.0 and m["6_refine/improved"] == 0.0


# ---------------------------------------------------------------- data
def test_training_stream_reshuffles_every_epoch() -> None:
    """D3: the shuffle seed without the epoch: every epoch repeats the first one's order."""
    from r3_rl.data import PromptSource

    src = PromptSource.__new__(PromptSource)
    src.recipe = SimpleNamespace(seed=3)
    src.train_items = [PromptItem(f"p{i}", f"prompt {i}", {}) for i in range(12)]
    src.position = 0
    ids = [it.id for it in src.next_batch(36)]
    epochs = [ids[0:12], ids[12:24], ids[24:36]]
    assert all(sorted(e) == sorted(x.id for x in src.train_items) for e in epochs)  # each epoch: every prompt once
    assert len({tuple(e) for e in epochs}) == 3  # and in its own order
