"""Per-step scalars computed from hand-built trees with known answers."""
from __future__ import annotations

import math

import numpy as np
import pytest

from r3_rl.tracking.metrics import (eval_metrics, failed_reward_count, group_metrics, refine_metrics, reward_metrics,
                                    rollout_metrics, throughput_metrics, understanding_metrics)
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
    assert m["1_reward/generate"] == pytest.approx(0.75)
    assert m["reward_detail/generate/std"] == pytest.approx(0.25)
    assert m["reward_detail/generate/count"] == 2  # the failed image is not averaged in; the parent is not sampled
    assert m["1_reward/refine"] == pytest.approx((1.0 + 0.5 + 0.25) / 3)
    assert m["reward_component/reason/format"] == pytest.approx(1.0)  # failed plans keep their format part
    assert m["2_accuracy/round0"] == pytest.approx(0.5)  # first images
    assert m["2_accuracy/round1"] == pytest.approx(1 / 3)  # images standing after refine round 1
    # one quantity, one name: the image reward's only part equals the stage reward, and one round has no
    # per-round breakdown beyond the stage mean
    assert "reward_component/generate/blocks" not in m
    assert not any(k.startswith("reward_detail/refine/round") for k in m)


def test_components_equal_to_a_logged_quantity_are_left_out() -> None:
    a = stage_a_tree()
    for j, n in enumerate(a.nodes.values()):
        if n.stage == "generate" and n.reward is not None:
            n.rewards = {"blocks": n.reward, "blocks/score": n.reward, "blocks/correct": float(n.reward >= 1.0),
                         "blocks/strict": 0.5 * j, "clip": 0.3}
    m = reward_metrics([a], correct_threshold=1.0)
    comps = sorted(k for k in m if k.startswith("reward_component/generate/"))
    assert comps == ["reward_component/generate/blocks/strict", "reward_component/generate/clip"]
    assert m["reward_component/generate/clip"] == pytest.approx(0.3)


def test_understanding_metrics_judge_parents_by_their_reward() -> None:
    bc = stage_bc_tree()  # parent 0.5 (flawed): c0 edits, c1 stops, c2 edits
    m = understanding_metrics([bc], correct_threshold=1.0)
    assert m["3_understanding/edit_on_flawed"] == pytest.approx(2 / 3)
    assert math.isnan(m["3_understanding/stop_on_correct"])  # no correct parent this step
    assert math.isnan(m["3_understanding/verdict_balanced_accuracy"])
    bc.nodes["root"].reward = 1.0  # now the parent is correct: one stop in three
    m = understanding_metrics([bc, stage_bc_tree()], correct_threshold=1.0)
    assert m["3_understanding/stop_on_correct"] == pytest.approx(1 / 3)
    assert m["3_understanding/verdict_balanced_accuracy"] == pytest.approx((1 / 3 + 2 / 3) / 2)
    assert understanding_metrics([stage_a_tree()]) == {}


def test_refine_metrics_compare_with_parent_image() -> None:
    m = refine_metrics(trees())
    assert m["6_refine/stop_rate"] == pytest.approx(1 / 3)
    assert (m["6_refine/improved"], m["6_refine/worse"], m["6_refine/unchanged"]) == (1, 1, 1)
    assert not any(k.startswith("refine_round/") for k in m)  # one round: the totals are the round's counts
    assert m["6_refine/delta_mean"] == pytest.approx((0.5 + 0.0 - 0.25) / 3)
    deeper = stage_bc_tree()
    for n in deeper.nodes.values():
        n.round += 1
    m = refine_metrics(trees() + [deeper])
    assert (m["refine_round/round2/improved"], m["refine_round/round2/worse"]) == (1, 1)


def test_group_metrics_zero_signal_and_advantages() -> None:
    a, bc = trees()
    for n in bc.nodes.values():  # make the refine group flat: every sibling got the same reward
        if n.stage == "refine":
            n.reward = 0.5
    m = group_metrics([a, bc])
    # groups with >= 2 scored members: A0/plan (2), A0/image (2), BC0/reflect (3), BC0/refine (3, flat)
    assert m["groups/refine/zero_signal"] == 1 and m["groups/generate/zero_signal"] == 0
    assert m["groups/zero_signal_fraction"] == pytest.approx(1 / 4)
    assert m["advantage/generate/mean"] == pytest.approx(0.0)
    assert m["advantage/generate/std"] == pytest.approx(0.25)
    assert m["advantage/generate/abs_max"] == pytest.approx(0.25)


def test_throughput_entropy_and_failures() -> None:
    m = throughput_metrics(trees(), rollout_s=2.0)
    assert m["rollout/trajectories"] == 6  # 3 plan->image paths + 3 root->critique->refine paths
    assert m["rollout/image_tokens"] == 3 * 16 + 2 * 16  # the copied image sampled nothing
    assert m["rollout/images"] == 3 + 2 and "rollout/sde_steps" not in m and "5_entropy/image_sde" not in m
    assert m["rollout/text_tokens"] == 3 * 5 + 3 * 7
    assert m["throughput/trajectories_per_s"] == pytest.approx(3.0)
    assert m["throughput/image_tokens_per_s"] == pytest.approx(40.0)
    assert m["5_entropy/text"] == pytest.approx(1.0) and m["5_entropy/image"] == pytest.approx(1.0)  # -log p = 1
    t = stage_a_tree()
    t.nodes["g0"].segment.logprobs = [-3.0] * 16
    assert throughput_metrics([t], 1.0)["5_entropy/image"] == pytest.approx((3 * 16 + 2 * 16) / 48)
    assert "throughput/trajectories_per_s" not in throughput_metrics(trees(), rollout_s=0.0)
    assert failed_reward_count(trees()) == 1


def test_flow_images_count_as_images_and_sde_steps_with_their_own_entropy() -> None:
    """Images drawn by flow matching: no tokens, one log-density per recorded SDE step (mean per latent element)."""
    from r3_rl.flow.action import FLOW_ACTION_KIND

    t = stage_a_tree()
    steps = {"g0": [0.5, -1.5], "g1": [-2.0], "g2": [1.0, 1.0]}  # differential entropies: can be negative
    for nid, logprobs in steps.items():
        t.nodes[nid].segment = Segment(modality="image", context={}, token_ids=[], logprobs=logprobs,
                                       action={"kind": FLOW_ACTION_KIND})
    m = throughput_metrics([t], rollout_s=2.0)
    assert m["rollout/images"] == 3 and m["rollout/sde_steps"] == 5
    assert "rollout/image_tokens" not in m and "5_entropy/image" not in m  # not "zero tokens sampled"
    assert m["5_entropy/image_sde"] == pytest.approx(-(0.5 - 1.5 - 2.0 + 1.0 + 1.0) / 5)
    assert m["throughput/sde_steps_per_s"] == pytest.approx(2.5)
    assert m["rollout/text_tokens"] == 3 * 5 and m["5_entropy/text"] == pytest.approx(1.0)


def test_rollout_metrics_merges_everything_and_empty_is_safe() -> None:
    m = rollout_metrics(trees(), 1.0, rollout_s=1.0)
    for key in ("1_reward/generate", "6_refine/stop_rate", "groups/zero_signal_fraction",
                "throughput/trajectories_per_s", "rollout/failed_rewards", "advantage/generate/std",
                "3_understanding/edit_on_flawed", "5_entropy/text"):
        assert key in m
    empty = rollout_metrics([], 1.0)
    assert "6_refine/stop_rate" not in empty and empty["rollout/failed_rewards"] == 0


def test_step_metrics_count_failures_once_and_rename_kl() -> None:
    from r3_rl.learner.batch import BatchStats
    from r3_rl.tracking.metrics import step_metrics

    groups = {"generate/single_valid_groups": 1.0, "generate/all_failed_groups": 0.0, "zero_signal_items": 3.0,
              "failed_samples": 1.0, "groups": 5.0}
    m = step_metrics(trees(), 1.0, {"learner/kl_text": 0.01, "learner/kl_image": 0.02, "learner/loss": 0.1},
                     BatchStats(items=7, failed_rewards=4), groups, 1.0, 2.0, 0)
    assert m["4_kl/text"] == 0.01 and m["4_kl/image"] == 0.02 and "learner/kl_text" not in m
    assert m["groups/generate/single_valid"] == 1.0 and "groups/generate/all_failed" not in m
    assert m["groups/zero_signal_items"] == 3.0 and m["batch/items"] == 7.0
    assert [k for k in m if "fail" in k] == ["rollout/failed_rewards"]  # failures counted once


def test_eval_metrics_names() -> None:
    report = {"accuracy": [0.25, 0.5], "per_tag": {"colors": [0.0, 1.0]}, "stop_rate": 0.5, "mean_rounds_used": 1.0,
              "transitions": [{"round": 1, "improved": 2, "worse": 1, "unchanged": 5}], "failed": [0, 1],
              "understanding": {"verdict": {"overall": {"balanced_accuracy": 0.75, "stop_on_correct": 1.0,
                                                        "edit_on_flawed": 0.5},
                                            "per_round": {"1": {"balanced_accuracy": 0.75}},
                                            "per_tag": {"colors": {"balanced_accuracy": 0.5}}},
                                "yes_no": {"available": True, "accuracy": 0.8}}}
    m = eval_metrics(report)
    assert m["0_eval/accuracy_round1"] == 0.5 and m["eval_tag/colors/round1"] == 1.0
    assert m["0_eval/verdict_balanced_accuracy"] == 0.75 and m["0_eval/yes_no_accuracy"] == 0.8
    assert m["eval/verdict/round1"] == 0.75 and m["eval_tag/colors/verdict"] == 0.5
    assert (m["eval/round1/improved"], m["eval/round1/worse"], m["eval/round1/unchanged"]) == (2, 1, 5)
    assert m["eval/failed/round1"] == 1 and m["eval/mean_rounds_used"] == 1.0


def test_text_lengths_and_token_limit_exact() -> None:
    """Plans of 5 tokens under a 5-token limit all reach it; critiques of 7 under 8 do not, but one cut at 8 does."""
    from r3_rl.trajectory import SamplingParams

    ts = trees()
    for n in ts[0].nodes.values():
        if n.stage == "reason":
            n.segment.sampling = SamplingParams(max_new_tokens=5)
    critiques = [n for n in ts[1].nodes.values() if n.stage == "reflect"]
    for n in critiques:
        n.segment.sampling = SamplingParams(max_new_tokens=8)
    critiques[0].segment = seg("text", 8)
    critiques[0].segment.sampling = SamplingParams(max_new_tokens=8)
    m = rollout_metrics(ts)
    assert m["rollout/text_tokens/reason"] == 5.0 and m["rollout/at_token_limit/reason"] == 1.0
    assert m["rollout/text_tokens/reflect"] == pytest.approx((8 + 7 + 7) / 3)
    assert m["rollout/at_token_limit/reflect"] == pytest.approx(1 / 3)
    assert not any(k.startswith("rollout/at_token_limit/") and k.endswith(("generate", "refine")) for k in m)
