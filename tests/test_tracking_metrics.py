"""Per-step scalars computed from hand-built trees with known answers."""
from __future__ import annotations

import math

import numpy as np
import pytest

from r3_rl.tracking.metrics import (eval_metrics, failed_reward_count, group_metrics, refine_metrics, reward_metrics,
                                    rollout_metrics, throughput_metrics)
from r3_rl.trajectory import Node, PromptItem, Segment, Tree


def seg(modality: str, n: int) -> Segment:
    return Segment(modality=modality, context={}, token_ids=list(range(n)), logprobs=[-1.0] * n)


def img(value: int) -> np.ndarray:
    return np.full((8, 8, 3), value, dtype=np.uint8)


def stage_a_tree() -> Tree:
    """Prompt with 3 siblings: image rewards 0.5, 1.0 and one failed reward."""
    t = Tree(id="s0-t0-A0", prompt=PromptItem("p0", "two red squares", {"tag": "counting"}), meta={"kind": "A"})
    for j, (r_plan, r_img) in enumerate([(0.6, 0.5), (1.1, 1.0), (None, None)]):
        t.add(Node(id=f"p{j}", parent=None, stage="reason", round=0, group_id="A0/plan", policy_version=0,
                   segment=seg("text", 5), text=f"<think>plan {j}</think>", reward=r_plan,
                   rewards={"format": 1.0}))
        t.add(Node(id=f"g{j}", parent=f"p{j}", stage="generate", round=0, group_id="A0/image", policy_version=0,
                   segment=seg("image", 16), image=img(10 * j), reward=r_img,
                   rewards={} if r_img is None else {"blocks": r_img},
                   reward_failures={"blocks": "detector timed out"} if r_img is None else {},
                   advantage=None if r_img is None else r_img - 0.75))
    return t


def stage_bc_tree() -> Tree:
    """Buffered parent (reward 0.5, round 0) -> 3 critiques: edit to 1.0, stop (copy), edit to 0.25."""
    t = Tree(id="s0-t1-BC0", prompt=PromptItem("p1", "a blue circle", {"tag": "colors"}), meta={"kind": "BC"})
    t.add(Node(id="root", parent=None, stage="generate", round=0, group_id="BC0/root", policy_version=-1,
               image=img(50), reward=0.5))
    for j, (stop, r) in enumerate([(False, 1.0), (True, 0.5), (False, 0.25)]):
        t.add(Node(id=f"c{j}", parent="root", stage="reflect", round=1, group_id="BC0/reflect", policy_version=0,
                   segment=seg("text", 7), text=f"<think>c{j}</think> edit", stop=stop, reward=0.1 + r - 0.5))
        t.add(Node(id=f"r{j}", parent=f"c{j}", stage="refine", round=1, group_id="BC0/refine", policy_version=0,
                   segment=None if stop else seg("image", 16), image=img(60 + j), reward=r,
                   meta={"copied": True} if stop else {}))
    return t


def trees() -> list[Tree]:
    return [stage_a_tree(), stage_bc_tree()]


def test_reward_metrics_exact() -> None:
    m = reward_metrics(trees(), correct_threshold=1.0)
    assert m["reward/generate/mean"] == pytest.approx(0.75)
    assert m["reward/generate/std"] == pytest.approx(0.25)
    assert m["reward/generate/count"] == 2  # the failed image is not averaged in
    assert m["reward/refine/mean"] == pytest.approx((1.0 + 0.5 + 0.25) / 3)
    assert m["reward_round/refine/round1/mean"] == pytest.approx((1.0 + 0.5 + 0.25) / 3)
    assert m["reward_round/generate/round0/std"] == pytest.approx(0.25)
    assert m["reward_component/generate/blocks"] == pytest.approx(0.75)
    assert m["reward_component/reason/format"] == pytest.approx(1.0)  # failed plans keep their format part
    assert m["accuracy/generate"] == pytest.approx(0.5)
    assert m["accuracy/refine"] == pytest.approx(1 / 3)
    # the buffered parent (policy_version -1) is not this step's sample
    assert "reward/generate/count" in m and m["reward/generate/count"] == 2


def test_refine_metrics_compare_with_parent_image() -> None:
    m = refine_metrics(trees())
    assert m["rollout/stop_rate"] == pytest.approx(1 / 3)
    assert (m["rollout/improved"], m["rollout/worse"], m["rollout/unchanged"]) == (1, 1, 1)
    assert (m["rollout/round1/improved"], m["rollout/round1/worse"], m["rollout/round1/unchanged"]) == (1, 1, 1)
    assert m["reward/refine/delta_mean"] == pytest.approx((0.5 + 0.0 - 0.25) / 3)


def test_group_metrics_zero_signal_and_advantages() -> None:
    a, bc = trees()
    for n in bc.nodes.values():  # make the refine group flat: every sibling got the same reward
        if n.stage == "refine":
            n.reward = 0.5
    m = group_metrics([a, bc])
    # groups with >= 2 scored members: A0/plan (2), A0/image (2), BC0/reflect (3), BC0/refine (3, flat)
    assert m["groups/zero_signal"] == 1
    assert m["groups/refine/zero_signal"] == 1 and m["groups/generate/zero_signal"] == 0
    assert m["groups/zero_signal_fraction"] == pytest.approx(1 / 4)
    assert m["advantage/generate/mean"] == pytest.approx(0.0)
    assert m["advantage/generate/std"] == pytest.approx(0.25)
    assert m["advantage/generate/abs_max"] == pytest.approx(0.25)


def test_throughput_and_failures() -> None:
    m = throughput_metrics(trees(), rollout_s=2.0)
    assert m["rollout/trajectories"] == 6  # 3 plan->image paths + 3 root->critique->refine paths
    assert m["rollout/image_tokens"] == 3 * 16 + 2 * 16  # the copied image sampled nothing
    assert m["rollout/text_tokens"] == 3 * 5 + 3 * 7
    assert m["throughput/trajectories_per_s"] == pytest.approx(3.0)
    assert m["throughput/image_tokens_per_s"] == pytest.approx(40.0)
    assert "throughput/trajectories_per_s" not in throughput_metrics(trees(), rollout_s=0.0)
    assert failed_reward_count(trees()) == 1


def test_rollout_metrics_merges_everything_and_empty_is_safe() -> None:
    m = rollout_metrics(trees(), 1.0, rollout_s=1.0)
    for key in ("reward/generate/mean", "rollout/stop_rate", "groups/zero_signal", "throughput/trajectories_per_s",
                "rollout/failed_rewards", "advantage/generate/mean"):
        assert key in m
    empty = rollout_metrics([], 1.0)
    assert math.isnan(empty["rollout/stop_rate"]) and empty["rollout/failed_rewards"] == 0


def test_eval_metrics_names() -> None:
    report = {"accuracy": [0.25, 0.5], "per_tag": {"colors": [0.0, 1.0]}, "stop_rate": 0.5, "mean_rounds_used": 1.0,
              "transitions": [{"round": 1, "improved": 2, "worse": 1, "unchanged": 5}], "failed": [0, 1]}
    m = eval_metrics(report)
    assert m["eval/accuracy/round1"] == 0.5 and m["eval_tag/colors/round1"] == 1.0
    assert (m["eval/round1/improved"], m["eval/round1/worse"], m["eval/round1/unchanged"]) == (2, 1, 5)
    assert m["eval/failed/round1"] == 1 and m["eval/mean_rounds_used"] == 1.0
