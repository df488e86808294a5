"""GRPO learner: micro-batching is exact, ratio 1 before the update, KL per modality, non-finite steps skipped,
no-signal groups excluded and counted, per-stage std normalisation."""
from __future__ import annotations

import copy
import math

import pytest
import torch
from learner_helpers import clone, learner_cfg, sample_items, step_grads, tiny_policy, weights

from r3_rl.learner.batch import TrainItem, assign_advantages, collect_items, shuffled_by_group
from r3_rl.learner.torch_learner import TorchLearner
from r3_rl.trajectory import Node, PromptItem, Segment, Tree


@pytest.fixture(scope="module")
def base():
    policy = tiny_policy()
    return policy, sample_items(policy)


@pytest.mark.parametrize("loss_type", ["token_mean", "seq_mean", "dr_grpo", "modality_mean"])
def test_micro_batches_give_the_full_batch_gradient(base, loss_type: str) -> None:
    policy, items = base
    grads = []
    for mbs in (64, 1, 4):
        p = clone(policy)
        learner = TorchLearner(p, p.frozen_copy(), learner_cfg(micro_batch_size=mbs, loss_type=loss_type))
        grads.append(step_grads(learner, copy.deepcopy(items)))
    assert sum(float(g.abs().sum()) for g in grads[0]) > 0
    for other in grads[1:]:
        for g, ref in zip(other, grads[0]):
            torch.testing.assert_close(g, ref, rtol=1e-4, atol=1e-7)


def test_modality_mean_adds_a_text_token_mean_and_an_image_token_mean(base) -> None:
    """The gradient of modality_mean on plans + images is token_mean's on the plans alone plus token_mean's on the
    images alone (with KL); pooled token_mean on both is not (its image tokens outnumber the plans')."""
    policy, items = base
    text = [it for it in items if it.segment.modality == "text"]
    image = [it for it in items if it.segment.modality == "image"]

    def grads(loss_type: str, batch: list) -> list[torch.Tensor]:
        p = clone(policy)
        return step_grads(TorchLearner(p, p.frozen_copy(), learner_cfg(loss_type=loss_type, micro_batch_size=2)),
                          copy.deepcopy(batch))

    both = grads("modality_mean", items)
    for g, gt, gi in zip(both, grads("token_mean", text), grads("token_mean", image)):
        torch.testing.assert_close(g, gt + gi, rtol=1e-4, atol=1e-7)
    pooled = grads("token_mean", items)
    assert sum(float((a - b).abs().sum()) for a, b in zip(both, pooled)) > 1e-4


def test_ratio_is_one_and_nothing_clipped_before_the_first_update(base) -> None:
    policy, items = base
    p = clone(policy)
    m = TorchLearner(p, p.frozen_copy(), learner_cfg(micro_batch_size=2)).step(copy.deepcopy(items))
    assert m["learner/ratio_min"] == pytest.approx(1.0, abs=1e-5)
    assert m["learner/ratio_max"] == pytest.approx(1.0, abs=1e-5)
    assert m["learner/clip_frac"] == 0.0 and m["learner/kl_mean"] == pytest.approx(0.0, abs=1e-6)


def test_grad_accum_splits_an_epoch_into_optimizer_steps(base) -> None:
    policy, items = base
    p = clone(policy)
    learner = TorchLearner(p, None, learner_cfg(micro_batch_size=2, grad_accum=1, epochs=2))
    m = learner.step(copy.deepcopy(items))
    assert m["learner/optimizer_steps"] == 6.0 and learner.optim.optimizer.state_dict()["state"][0]["step"] == 6


def test_shuffled_by_group_keeps_groups_whole_and_is_seeded() -> None:
    seg = Segment("text", {"input_ids": [1]}, [2], [-0.1])
    items = [TrainItem(seg, 0.0, stage, 0, group=group) for stage, group in
             [("reason", "a")] * 2 + [("generate", "b")] * 2 + [("reflect", "c")] * 2 + [("refine", "d")] * 2]
    items.append(TrainItem(seg, 0.0, "reason", 0))  # a plug-in's item without a group: a group of one
    orders = {seed: shuffled_by_group(items, seed) for seed in ("0", "1", "2", "3")}
    for out in orders.values():
        assert sorted(map(id, out)) == sorted(map(id, items))  # a permutation
        for g in "abcd":  # each group's two members side by side, in their order
            at = [k for k, it in enumerate(out) if it.group == g]
            assert len(at) == 2 and at[1] == at[0] + 1 and out[at[0]] is items["abcd".index(g) * 2]
    assert shuffled_by_group(items, "1") == orders["1"]  # seeded: the same order every time
    assert len({tuple(it.group for it in o) for o in orders.values()}) > 1


def test_a_plug_in_item_may_add_a_field_without_a_default() -> None:
    from dataclasses import dataclass

    @dataclass
    class WeightedItem(TrainItem):  # what docs/architecture.md allows an algorithm's items to be
        weight: float

    seg = Segment("text", {"input_ids": [1]}, [2], [-0.1])
    item = WeightedItem(seg, 1.0, "reason", 0, 0.5, group="g")
    assert (item.weight, item.group) == (0.5, "g")


def test_grad_accum_steps_mix_stages(base) -> None:
    """Items arrive one stage after the other; with several optimiser steps per batch each step must not train
    one stage alone (TRL shuffles its generation batch before splitting it into steps)."""
    policy, items = base
    plans, images = items[:3], items[3:]
    items = [TrainItem(it.segment, it.advantage, it.stage, it.policy_version, group=f"g{k}")
             for k, group in enumerate([plans] * 8 + [images] * 8) for it in copy.deepcopy(group)]
    assert [it.stage for it in items] == ["reason"] * 24 + ["generate"] * 24  # tree order: a stage, then the next
    p = clone(policy)
    learner = TorchLearner(p, None, learner_cfg(micro_batch_size=24, grad_accum=1))
    seen: list[list[str]] = []
    original = learner.algorithm.loss

    def recording(models, its, chunk, mini, ctx):
        seen.append([its[i].stage for i in chunk])
        return original(models, its, chunk, mini, ctx)

    learner.algorithm.loss = recording  # type: ignore[method-assign]
    m = learner.step(items)
    assert m["learner/optimizer_steps"] == 2.0 and len(seen) == 2
    assert [sorted(set(s)) for s in seen] == [["generate", "reason"]] * 2  # plans and images in each step


def test_dr_grpo_normaliser_does_not_depend_on_what_else_is_in_the_batch(base) -> None:
    """Dr. GRPO divides by a constant (TRL: max_completion_length); here each row by its stage's most tokens.
    Adding a plan with advantage 0 (and no KL) must only add a row to the count: the images' gradient scales by
    3/4, not by how much longer than an image the plan is (the batch's longest item, until session 35)."""
    policy, items = base
    images = [copy.deepcopy(it) for it in items if it.segment.modality == "image"]
    plan = copy.deepcopy(max((it for it in items if it.segment.modality == "text"),
                             key=lambda it: it.segment.num_actions))
    plan.advantage = 0.0
    assert len(images) == 3 and plan.segment.num_actions > max(it.segment.num_actions for it in images)
    cfg = learner_cfg(loss_type="dr_grpo", kl_coef_text=0.0, kl_coef_image=0.0)
    alone = step_grads(TorchLearner(clone(policy), None, cfg), images)
    beside = step_grads(TorchLearner(clone(policy), None, cfg), [copy.deepcopy(it) for it in images] + [plan])
    assert sum(float(g.abs().sum()) for g in alone) > 0
    for a, b in zip(alone, beside):
        torch.testing.assert_close(b, a * 3 / 4, rtol=1e-4, atol=1e-8)


def test_kl_importance_weight_reaches_the_loss(base) -> None:
    """``learner.kl_importance_weight`` (TRL's use_bias_correction_kl; the maths is checked against TRL in
    test_trl_parity): with zero advantages only the KL term moves the weights, and weighing it by the ratio adds
    KL x grad log-prob to its gradient, so the two settings step differently."""
    policy, items = base
    ref = clone(policy)
    moved = clone(policy)
    with torch.no_grad():
        moved.model.model.norm.weight.mul_(1.5)
    zero = [copy.deepcopy(it) for it in items]
    for it in zero:
        it.advantage = 0.0
    plain, weighted = (step_grads(TorchLearner(clone(moved), ref, learner_cfg(kl_importance_weight=flag)),
                                  copy.deepcopy(zero)) for flag in (False, True))
    assert sum(float((a - b).abs().sum()) for a, b in zip(plain, weighted)) > 1e-6


def test_kl_weight_applies_per_modality(base) -> None:
    """Zero advantages leave only the KL term; a policy away from its reference gets KL gradient on image rows
    only when only the image KL weight is set."""
    policy, items = base
    ref = clone(policy)
    moved = clone(policy)
    with torch.no_grad():
        moved.model.model.norm.weight.mul_(1.5)  # the policy now differs from its reference
    zero = [copy.deepcopy(it) for it in items]
    for it in zero:
        it.advantage = 0.0
    text = [it for it in zero if it.segment.modality == "text"]
    image = [it for it in zero if it.segment.modality == "image"]
    cfg = learner_cfg(kl_coef_text=0.0, kl_coef_image=1.0)
    m_text = TorchLearner(clone(moved), ref, cfg).step(copy.deepcopy(text))
    m_image = TorchLearner(clone(moved), ref, cfg).step(copy.deepcopy(image))
    assert m_text["learner/grad_norm"] == 0.0
    assert m_image["learner/grad_norm"] > 0.0 and m_image["learner/kl_mean"] > 0.0


def _state(learner: TorchLearner) -> dict:
    return copy.deepcopy(learner.optim.state_dict())


def _assert_untouched(policy, before_w, learner, before_opt) -> None:
    for k, v in weights(policy).items():
        assert torch.equal(v, before_w[k]), k
    after = learner.optim.state_dict()
    assert after["scheduler"] == before_opt["scheduler"]
    for pid, st in before_opt["optimizer"]["state"].items():
        for name, t in st.items():
            assert torch.equal(after["optimizer"]["state"][pid][name], t), (pid, name)


def test_nonfinite_loss_skips_the_step_and_leaves_everything_unchanged(base) -> None:
    policy, items = base
    p = clone(policy)
    learner = TorchLearner(p, p.frozen_copy(), learner_cfg(micro_batch_size=2))
    learner.step(copy.deepcopy(items))  # a real step first, so the optimiser has state to protect
    w, opt = weights(p), _state(learner)
    bad = copy.deepcopy(items)
    bad[4].segment.logprobs[0] = math.nan  # a corrupt behaviour log-prob in the last micro-batch
    m = learner.step(bad)
    assert m["learner/nonfinite_skipped"] == 1.0 and "learner/loss" not in m
    _assert_untouched(p, w, learner, opt)
    assert learner.skipped_steps == 1
    # the next good step is exactly the step a learner that never saw the bad batch takes
    twin = TorchLearner(clone(policy), None, learner_cfg(micro_batch_size=2))
    twin.policy.model.load_state_dict(p.model.state_dict())
    twin.optim.load_state_dict(copy.deepcopy(learner.optim.state_dict()))
    twin.reference = learner.reference
    learner.step(copy.deepcopy(items))
    twin.step(copy.deepcopy(items))
    for k, v in weights(p).items():
        assert torch.equal(v, weights(twin.policy)[k]), k


def test_nonfinite_gradient_skips_the_step(base) -> None:
    policy, items = base
    p = clone(policy)
    learner = TorchLearner(p, None, learner_cfg())
    learner.step(copy.deepcopy(items))
    w, opt = weights(p), _state(learner)
    hook = p.model.model.norm.weight.register_hook(lambda g: torch.full_like(g, math.inf))
    m = learner.step(copy.deepcopy(items))
    hook.remove()
    assert m["learner/nonfinite_skipped"] == 1.0 and "learner/loss" not in m
    _assert_untouched(p, w, learner, opt)


# ------------------------------------------------------------------ advantages / groups
def _seg(n: int = 2) -> Segment:
    return Segment(modality="text", context={"input_ids": [1]}, token_ids=list(range(n)), logprobs=[-1.0] * n)


def _tree(groups: dict[str, tuple[str, list[float | None]]]) -> Tree:
    tree = Tree(id="t", prompt=PromptItem(id="p", prompt="x"))
    for gid, (stage, rewards) in groups.items():
        for j, r in enumerate(rewards):
            tree.add(Node(id=f"{gid}{j}", parent=None, stage=stage, round=0, group_id=gid, policy_version=0,
                          segment=_seg(), reward=r))
    return tree


def test_no_signal_groups_are_left_out_and_counted() -> None:
    tree = _tree({"live": ("reason", [1.0, 0.0, 0.5]), "flat": ("reason", [0.3, 0.3, 0.3]),
                  "dead": ("generate", [None, None]), "single": ("generate", [0.7, None])})
    stats = assign_advantages([tree])
    assert stats["zero_signal_groups"] == 1 and stats["all_failed_groups"] == 1
    assert stats["single_valid_groups"] == 1 and stats["failed_samples"] == 3
    assert stats["reason/zero_signal_groups"] == 1 and stats["generate/all_failed_groups"] == 1
    items, b = collect_items([tree], 0, 0)
    assert [round(it.advantage, 6) for it in items] == [0.5, -0.5, 0.0]  # only the live group
    assert b.zero_signal_items == 4 and b.failed_rewards == 3 and b.zero_signal_groups == 3 and b.groups == 4


def test_normalize_std_per_stage() -> None:
    tree = _tree({"plans": ("reason", [1.0, 0.0, 0.5]), "images": ("generate", [1.0, 0.0, 0.5])})
    assign_advantages([tree], {"generate": True})
    plans = [tree.nodes[f"plans{j}"].advantage for j in range(3)]
    images = [tree.nodes[f"images{j}"].advantage for j in range(3)]
    assert plans == pytest.approx([0.5, -0.5, 0.0])
    assert images == pytest.approx([0.5 / (0.5 + 1e-6), -0.5 / (0.5 + 1e-6), 0.0])  # sample std of (1, 0, .5) = .5


def test_std_scope_batch_divides_by_the_stages_std() -> None:
    """Two image groups (1, 0) and (.5, .3): by group, the second's small gap becomes +-0.71; by batch, the
    stage's std over all four (0.4203) divides both, and plans (not normalised) keep r - mean."""
    tree = _tree({"plans": ("reason", [1.0, 0.0]), "a": ("generate", [1.0, 0.0]), "b": ("generate", [0.5, 0.3])})
    assign_advantages([tree], {"generate": True}, std_scope="batch")
    std = (0.53 / 3) ** 0.5
    assert [tree.nodes[f"b{j}"].advantage for j in range(2)] == pytest.approx([0.1 / std, -0.1 / std], rel=1e-5)
    assert [tree.nodes[f"plans{j}"].advantage for j in range(2)] == pytest.approx([0.5, -0.5])


def _critic_tree() -> Tree:
    """Two images, four critiques each: every critique of the flawed image stops (-1.0, a confident
    mistake), the correct image's critiques mix stops (1.0) and one edit (-0.5)."""
    tree = Tree(id="t", prompt=PromptItem(id="p", prompt="x"))
    for img, ok in (("bad", False), ("good", True)):
        tree.add(Node(id=img, parent=None, stage="generate", round=0, group_id="images", policy_version=-1,
                      reward=0.0 if not ok else 1.0, meta={"correct": ok}))
    for j in range(4):
        tree.add(Node(id=f"bad{j}", parent="bad", stage="reflect", round=1, group_id="bad/critiques",
                      policy_version=0, segment=_seg(), reward=-1.0, stop=True))
        r = -0.5 if j == 0 else 1.0
        tree.add(Node(id=f"good{j}", parent="good", stage="reflect", round=1, group_id="good/critiques",
                      policy_version=0, segment=_seg(), reward=r, stop=j != 0))
    return tree


def test_critic_baseline_group_leaves_a_unanimous_mistake_untaught() -> None:
    tree = _critic_tree()
    assign_advantages([tree])
    items, b = collect_items([tree], 0, 0)
    assert all(it.segment is not tree.nodes[f"bad{j}"].segment for it in items for j in range(4))
    assert b.zero_signal_items == 4
    assert [round(tree.nodes[f"good{j}"].advantage, 6) for j in range(4)] == [-1.125, 0.375, 0.375, 0.375]


def test_critic_baseline_verdict_pools_critiques_by_their_parents_verdict() -> None:
    """With ``critic_baseline: verdict`` the flawed image's unanimous stops are compared with each other only
    (one pool: all -1 -> advantage 0 each, still no push) -- so the pools must span images: add a second flawed
    image whose critiques edit, and the stops get a negative advantage while they stay in the batch."""
    tree = _critic_tree()
    tree.add(Node(id="worse", parent=None, stage="generate", round=0, group_id="images", policy_version=-1,
                  reward=0.5, meta={"correct": False}))
    for j in range(4):
        tree.add(Node(id=f"edit{j}", parent="worse", stage="reflect", round=1, group_id="worse/critiques",
                      policy_version=0, segment=_seg(), reward=0.5, stop=False))
    assign_advantages([tree], critic_baseline="verdict")
    # flawed pool: four -1.0 and four 0.5; leave one out -> a stop's baseline (3 x -1 + 4 x 0.5) / 7 = -1/7
    assert tree.nodes["bad0"].advantage == pytest.approx(-1.0 + 1 / 7)
    assert tree.nodes["edit0"].advantage == pytest.approx(0.5 - (4 * -1.0 + 3 * 0.5) / 7)
    # correct pool: the one edit against three stops, each stop against the other two stops and the edit
    assert tree.nodes["good0"].advantage == pytest.approx(-1.5)
    assert tree.nodes["good1"].advantage == pytest.approx(1.0 - 1.5 / 3)
    items, b = collect_items([tree], 0, 0, pooled_stages=frozenset({"reflect"}))
    trained = {id(it.segment) for it in items}
    assert all(id(tree.nodes[f"bad{j}"].segment) in trained for j in range(4)) and b.zero_signal_items == 0


def test_critic_baseline_is_a_grpo_option_only() -> None:
    from r3_rl.config import Recipe

    with pytest.raises(ValueError, match="critic_baseline"):
        Recipe.model_validate({"learner": {"algorithm": "ppo", "critic_baseline": "verdict"}})
    with pytest.raises(ValueError, match="group"):
        Recipe.model_validate({"learner": {"critic_baseline": "mean"}})


def _refine_tree(refined: list[float | None], parent_reward: float = 0.5) -> Tree:
    """One parent image, one critique per sibling: ``None`` in ``refined`` is a stop (the parent copied, as the
    rollout writes it), a number is the reward of the image the refiner drew from that critique."""
    tree = Tree(id="t", prompt=PromptItem(id="p", prompt="x"))
    tree.add(Node(id="root", parent=None, stage="generate", round=0, group_id="root", policy_version=-1,
                  image="parent", reward=parent_reward, meta={"correct": False}))
    for j, r in enumerate(refined):
        stop = r is None
        tree.add(Node(id=f"c{j}", parent="root", stage="reflect", round=1, group_id="critiques", policy_version=0,
                      segment=_seg(), reward=0.0, stop=stop))
        tree.add(Node(id=f"r{j}", parent=f"c{j}", stage="refine", round=1, group_id="refined", policy_version=0,
                      segment=None if stop else _seg(3), image="parent" if stop else f"edit{j}",
                      reward=parent_reward if stop else r, meta={"copied": True} if stop else {}))
    return tree


def test_refine_baseline_parent_pays_the_refiner_for_what_its_edit_changed() -> None:
    """Parent 0.5; a stop, an edit that changed nothing (a useless instruction carried out), a fix, a worse
    image.  GRPO's group baseline (their mean, 0.5625) blames the faithful no-op for its sibling's better
    critique; the parent baseline gives it 0, the fix +0.5, the worse image -0.25, the stop's copy 0."""
    tree = _refine_tree([None, 0.5, 1.0, 0.25])
    assign_advantages([tree])
    assert [tree.nodes[f"r{j}"].advantage for j in range(4)] == pytest.approx([0.0, -0.0625, 0.4375, -0.3125])
    tree = _refine_tree([None, 0.5, 1.0, 0.25])
    assign_advantages([tree], refine_baseline="parent")
    assert [tree.nodes[f"r{j}"].advantage for j in range(4)] == pytest.approx([0.0, 0.0, 0.5, -0.25])
    # the critiques keep their group baseline: the option touches refined images only
    assert tree.nodes["c0"].advantage == pytest.approx(0.0)


def test_refine_baseline_parent_keeps_a_group_whose_edits_all_fixed_and_skips_failures() -> None:
    """Every edit fixed the image: no signal among siblings (GRPO drops the group), but +0.5 each against
    the parent, so the group trains.  A failed reward is left out, never a zero."""
    from r3_rl.config import Recipe
    from r3_rl.learner.algorithm import GRPO

    def refined_items(baseline: str, rewards: list[float | None]) -> list:
        recipe = Recipe.model_validate({"learner": {"refine_baseline": baseline}})
        items, _, _ = GRPO(recipe).batch([_refine_tree(rewards)], 0)
        return [it for it in items if it.stage == "refine"]

    assert refined_items("group", [1.0, 1.0, 1.0]) == []
    assert [it.advantage for it in refined_items("parent", [1.0, 1.0, 1.0])] == pytest.approx([0.5] * 3)
    assert [it.advantage for it in refined_items("parent", [1.0, None, 0.0])] == pytest.approx([0.5, -0.5])


def test_refine_baseline_is_a_grpo_option_only() -> None:
    from r3_rl.config import Recipe

    with pytest.raises(ValueError, match="refine_baseline"):
        Recipe.model_validate({"learner": {"algorithm": "ppo", "refine_baseline": "parent"}})
    with pytest.raises(ValueError, match="parent"):
        Recipe.model_validate({"learner": {"refine_baseline": "sibling"}})
