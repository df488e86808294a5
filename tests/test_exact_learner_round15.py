"""Exact small cases for the learner and its maths (clipped loss, aggregation, KL, PPO/GAE, batching, learner
steps, LoRA/frozen weights, checkpoints) that a mutation audit found unpinned (round 15 audit).

Every expectation is worked out by hand (or against an independent peer), never by calling the code under
test twice; each docstring names the one-point bug the test catches."""
from __future__ import annotations

import math

import pytest
import torch

from r3_rl.algorithms.losses import aggregate, clipped_policy_loss

D = torch.float64
NAN = math.nan


# ------------------------------------------------------------------------------------------------ aggregation
def test_aggregate_row_count_is_b_not_t_without_rows() -> None:
    """Without ``rows`` every one of the B=2 rows counts (not T=3): seq_mean of row means 1 and 2 is 1.5,
    dr_grpo (1+1+2) / (2 rows * 3) = 2/3."""
    v = torch.tensor([[1.0, 1.0, 0.0], [2.0, 0.0, 0.0]], dtype=D)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    assert aggregate(v, mask, "seq_mean").item() == pytest.approx(1.5, abs=1e-12)
    assert aggregate(v, mask, "dr_grpo").item() == pytest.approx(4 / 6, abs=1e-12)


def test_aggregate_rows_drop_the_tokens_of_unselected_rows() -> None:
    """``rows`` removes a row's tokens from token_mean too: row 2 (value 10) left out gives 1, not (1+1+10)/3."""
    v = torch.tensor([[1.0, 1.0], [10.0, 0.0]], dtype=D)
    mask = torch.tensor([[1, 1], [1, 0]])
    assert aggregate(v, mask, "token_mean", rows=torch.tensor([True, False])).item() == pytest.approx(1.0)
    assert aggregate(v, mask, "dr_grpo", rows=torch.tensor([True, False])).item() == pytest.approx(1.0)


# ------------------------------------------------------------------------------------------------ clipped loss
def test_negative_kl_coef_is_applied_not_ignored() -> None:
    """Any non-zero ``kl_coef`` adds its KL term, a negative one too (``coef > 0`` silently dropped it).
    logp 0, ref -1: k1 = 1 per token; A = 0, so the loss is -0.5 * 1."""
    logp = torch.zeros(1, 2, dtype=D)
    ref = torch.full((1, 2), -1.0, dtype=D)
    loss, _ = clipped_policy_loss(logp, logp, torch.zeros(1, dtype=D), torch.ones(1, 2), ref_logp=ref,
                                  kl_coef=-0.5, kl_kind="k1")
    assert loss.item() == pytest.approx(-0.5, abs=1e-12)


def test_infinite_advantage_propagates_instead_of_dropping_the_row() -> None:
    """Only NaN drops a row; an infinite advantage reaches the loss (the learner then skips the step) --
    ``isfinite`` as the row filter silently trained on the other row (loss -1)."""
    logp = torch.zeros(2, 1, dtype=D)
    loss, _ = clipped_policy_loss(logp, logp, torch.tensor([math.inf, 1.0], dtype=D), torch.ones(2, 1))
    assert not math.isfinite(loss.item())


def test_clip_fractions_count_only_kept_rows_tokens() -> None:
    """A dropped row's tokens are not in the clip fractions' denominator: one kept token with ratio 2 > 1.2 and
    A > 0 is clip_frac_high 1 (counting the NaN row's token too gave 0.5)."""
    logp = torch.tensor([[math.log(2.0)], [0.0]], dtype=D)
    old = torch.zeros(2, 1, dtype=D)
    _, m = clipped_policy_loss(logp, old, torch.tensor([1.0, NAN], dtype=D), torch.ones(2, 1))
    assert m["clip_frac_high"].item() == 1.0
    assert m["clip_frac"].item() == 1.0
    assert m["ratio_min"].item() == pytest.approx(2.0)


def test_ratio_max_ignores_a_dropped_row() -> None:
    """The kept row's only ratio is 0.5, so ratio_max is 0.5 (the dropped row's zeroed ratio 1 must not count)."""
    logp = torch.tensor([[math.log(0.5)], [0.0]], dtype=D)
    _, m = clipped_policy_loss(logp, torch.zeros(2, 1, dtype=D), torch.tensor([1.0, NAN], dtype=D), torch.ones(2, 1))
    assert m["ratio_max"].item() == pytest.approx(0.5)


def test_row_weight_of_the_wrong_length_is_refused() -> None:
    """A ``[1]`` row weight for a 2-row batch raises instead of broadcasting over both rows."""
    logp = torch.zeros(2, 1, dtype=D)
    with pytest.raises(ValueError, match="row_weight"):
        clipped_policy_loss(logp, logp, torch.ones(2, dtype=D), torch.ones(2, 1), row_weight=torch.ones(1))


def test_kl_by_modality_ignores_padding() -> None:
    """Padding (mask 0) is not a token of its row: k1 over the one valid token is 1 (padding counted gave -2)."""
    from r3_rl.algorithms.kl import kl_by_modality
    out = kl_by_modality(torch.zeros(1, 2), torch.tensor([[-1.0, 5.0]]), torch.tensor([[1, 0]]), ["text"], kind="k1")
    assert out == {"kl_text": pytest.approx(1.0)}


# ------------------------------------------------------------------------------------------------ PPO maths
def test_value_loss_clips_a_downward_move_symmetrically() -> None:
    """V moved from 1 down to 0 (R = 0, clip 0.2): V_clip = 1 - 0.2 = 0.8, loss 0.5 * max(0, 0.64) = 0.32
    (a clamp to [0, clip] kept V_clip at 1: 0.5)."""
    from r3_rl.algorithms.ppo import value_loss
    v, old, ret = torch.zeros(1, dtype=D), torch.ones(1, dtype=D), torch.zeros(1, dtype=D)
    assert value_loss(v, old, ret, clip=0.2).item() == pytest.approx(0.32, abs=1e-12)


def test_value_loss_refuses_a_negative_clip() -> None:
    """A negative ``value_clip`` (an inverted clamp range) raises; 0 is allowed (V_clip = V_old)."""
    from r3_rl.algorithms.ppo import value_loss
    v, old, ret = torch.ones(1, dtype=D), torch.zeros(1, dtype=D), torch.zeros(1, dtype=D)
    with pytest.raises(ValueError, match="clip"):
        value_loss(v, old, ret, clip=-0.5)
    assert value_loss(v, old, ret, clip=0.0).item() == pytest.approx(0.5)


def test_gae_refuses_a_discount_above_one() -> None:
    """gamma must lie in [0, 1]: 1.5 (and a lam of 1.5) raise instead of inflating the returns; 1.0 is fine."""
    from r3_rl.algorithms.ppo import gae
    r = torch.tensor([1.0, 0.0], dtype=D)
    with pytest.raises(ValueError, match="gamma"):
        gae(r, torch.zeros(2, dtype=D), gamma=1.5)
    with pytest.raises(ValueError, match="lam"):
        gae(r, torch.zeros(2, dtype=D), lam=1.5)
    adv, _ = gae(r, torch.zeros(2, dtype=D), gamma=1.0, lam=1.0)
    assert adv.tolist() == [1.0, 0.0]


def test_a_negative_clip_high_is_refused() -> None:
    """clip_high -0.5 would clip every ratio to at most 0.5: refused, like a negative clip_low."""
    logp = torch.zeros(1, 1, dtype=D)
    with pytest.raises(ValueError, match="clip range"):
        clipped_policy_loss(logp, logp, torch.ones(1, dtype=D), torch.ones(1, 1), clip_high=-0.5)


# ------------------------------------------------------------------------------------------------ batching
def _tree(*nodes, **extra):  # nodes as (id, parent, stage, reward, meta); extra: node id -> more Node fields
    from r3_rl.trajectory import Node, PromptItem, Tree
    t = Tree(id="t", prompt=PromptItem(id="p", prompt="x"))
    for nid, parent, stage, reward, meta in nodes:
        t.add(Node(id=nid, parent=parent, stage=stage, round=0, group_id=f"g-{stage}", policy_version=0,
                   reward=reward, meta=dict(meta), **extra.get(nid, {})))
    return t


def _seg(n: int = 2):
    from r3_rl.trajectory import Segment
    return Segment("text", {}, [1] * n, [-1.0] * n)


def test_critic_pools_name_the_parents_verdict() -> None:
    """A critique of an image judged correct is in the "correct" pool, of a flawed one in "flawed"."""
    from r3_rl.learner.batch import critic_pools
    t = _tree(("i1", None, "generate", 1.0, {"correct": True}), ("i2", None, "generate", 0.0, {"correct": False}),
              ("c1", "i1", "reflect", 0.5, {}), ("c2", "i2", "reflect", 0.5, {}))
    pools = critic_pools([t])
    assert pools == {id(t.nodes["c1"]): "correct", id(t.nodes["c2"]): "flawed"}


def test_copied_refine_with_a_failed_reward_stays_excluded() -> None:
    """A "no further edit" copy gets advantage 0 only when its reward is known; a failed one stays ``None``."""
    from r3_rl.learner.batch import assign_advantages
    t = _tree(("r0", None, "refine", None, {"copied": True}), ("r1", None, "refine", 1.0, {}),
              ("r2", None, "refine", 0.0, {}))
    assign_advantages([t])
    assert t.nodes["r0"].advantage is None
    assert (t.nodes["r1"].advantage, t.nodes["r2"].advantage) == (0.5, -0.5)


def test_verdict_baseline_leaves_a_failed_critique_out() -> None:
    """``critic_baseline: verdict``: a critique whose reward failed gets ``None`` (not NaN), so it is no train
    item; its pool-mates get r - mean(other valid) = +-0.5."""
    from r3_rl.learner.batch import assign_advantages, collect_items
    t = _tree(("i", None, "generate", 1.0, {"correct": True}), ("c0", "i", "reflect", 1.0, {}),
              ("c1", "i", "reflect", 0.5, {}), ("c2", "i", "reflect", None, {}),
              **{c: {"segment": _seg()} for c in ("c0", "c1", "c2")})
    assign_advantages([t], critic_baseline="verdict")
    assert t.nodes["c2"].advantage is None
    assert (t.nodes["c0"].advantage, t.nodes["c1"].advantage) == (0.5, -0.5)
    items, stats = collect_items([t], 0, 0, pooled_stages=frozenset({"reflect"}))
    assert sorted(it.advantage for it in items) == [-0.5, 0.5] and stats.failed_rewards == 1


def test_failed_rewards_count_only_nodes_whose_own_reward_failed() -> None:
    """A refined image whose *parent's* reward failed has no gain (advantage ``None``) and is left out, but its
    own reward did not fail: ``failed_rewards`` stays 0."""
    import numpy as np

    from r3_rl.learner.batch import assign_advantages, collect_items
    t = _tree(("i", None, "generate", None, {}), ("c", "i", "reflect", 1.0, {}), ("r", "c", "refine", 1.0, {}),
              i={"image": np.zeros((1, 1, 3), dtype=np.uint8)}, r={"segment": _seg()})
    assign_advantages([t], refine_baseline="parent")
    assert t.nodes["r"].advantage is None
    items, stats = collect_items([t], 0, 0, drop_no_signal=False)
    assert [it.stage for it in items] == [] and stats.failed_rewards == 0


def test_items_without_a_group_are_shuffled_each_on_its_own() -> None:
    """Ungrouped items (a plug-in's) are groups of one: ten of them come back in a new order, each exactly once,
    while a real group's members stay together and in order (lumping every ungrouped item into one group
    left them in list order)."""
    from r3_rl.learner.batch import TrainItem, shuffled_by_group
    loose = [TrainItem(_seg(), float(k), "reason", 0) for k in range(10)]
    pair = [TrainItem(_seg(), 10.0 + k, "reason", 0, group="g") for k in range(2)]
    out = shuffled_by_group(loose + pair, "7/12")
    advs = [it.advantage for it in out]
    assert sorted(advs) == [float(k) for k in range(12)]
    assert [a for a in advs if a < 10] != [float(k) for k in range(10)]
    i = advs.index(10.0)
    assert advs[i + 1] == 11.0


def test_summary_abs_max_is_the_largest_magnitude() -> None:
    """``advantage_abs_max`` of [-3, 1] is 3 (the plain max gave 1); mean -1, std (ddof 1) 2*sqrt(2)."""
    from r3_rl.learner.batch import BatchStats, TrainItem, summarize
    stats = BatchStats()
    summarize([TrainItem(_seg(), -3.0, "reason", 0), TrainItem(_seg(), 1.0, "reason", 0)], stats)
    assert (stats.items, stats.advantage_abs_max, stats.advantage_mean) == (2, 3.0, -1.0)
    assert stats.advantage_std == pytest.approx(2 * math.sqrt(2))


# ------------------------------------------------------------------------------------------------ actions
def test_uses_kl_when_either_modality_has_a_weight() -> None:
    """A KL weight on text alone (or image alone) needs the reference; neither: none."""
    from types import SimpleNamespace as NS

    from r3_rl.learner.actions import uses_kl
    assert uses_kl(NS(kl_coef_text=0.1, kl_coef_image=0.0)) is True
    assert uses_kl(NS(kl_coef_text=0.0, kl_coef_image=0.2)) is True
    assert uses_kl(NS(kl_coef_text=0.0, kl_coef_image=0.0)) is False


# ------------------------------------------------------------------------------------------------ the learner
def test_a_rank_with_fewer_micro_batches_repeats_one_at_scale_zero() -> None:
    """3 micro-batches over 2 ranks: both run ceil(3/2) = 2 passes; rank 1 owns one and repeats it at scale 0
    (a floor division gave rank 1 a single pass, and DeepSpeed's collectives would not line up)."""
    from types import SimpleNamespace as NS

    from r3_rl.learner.torch_learner import TorchLearner
    lrn = object.__new__(TorchLearner)
    lrn.cfg, lrn.world = NS(micro_batch_size=1), 2
    lrn.rank = 0
    assert lrn._my_chunks(range(0, 3)) == [(range(0, 1), 1.0), (range(2, 3), 1.0)]
    lrn.rank = 1
    assert lrn._my_chunks(range(0, 3)) == [(range(1, 2), 1.0), (range(1, 2), 0.0)]


def test_a_nonfinite_loss_on_several_ranks_is_skipped_even_if_the_driver_steps() -> None:
    """Several ranks hand a NaN loss to the driver as a NaN gradient; if the driver reports the step applied
    anyway (a bf16 engine without an overflow check), the learner still counts it skipped, not as an update."""
    from test_exact_learner_algorithm import FakePolicy, _cfg, _item

    from r3_rl.learner.torch_learner import TorchLearner
    items = [_item(0, "text", 2, 1.0), _item(1, "text", 2, -1.0)]
    items[0].segment.logprobs[0] = math.nan
    learner = TorchLearner(FakePolicy(2), None, _cfg())
    learner.rank, learner.world = 0, 2
    learner.optim.step = lambda: (True, 0.0)
    m = learner.step(items)
    assert (learner.updates, learner.skipped_steps) == (0, 1)
    assert m["learner/nonfinite_skipped"] == 1.0 and m["learner/optimizer_steps"] == 0.0


def test_a_step_leaves_the_policy_in_eval_mode() -> None:
    """After ``step`` the policy is back in eval mode (sampling must draw no dropout), whatever it was before."""
    from test_exact_learner_algorithm import FakePolicy, _cfg, _three

    from r3_rl.learner.torch_learner import TorchLearner
    policy = FakePolicy(3)
    policy.model.train(True)
    learner = TorchLearner(policy, None, _cfg())
    learner.step(_three())
    assert policy.model.training is False and learner.updates == 1


# ------------------------------------------------------------------------------------------------ PPO stages
def test_stage_rewards_are_each_stages_own_contribution() -> None:
    """reason: format_weight x format_ok (0.2 x 1); refine: R_new - R of the image it refined -- the previous
    refine's 0.5 for the second refine (0.9 - 0.5 = 0.4), not the first image's 0.3; generate: its R."""
    from r3_rl.learner.ppo_learner import stage_reward
    t = _tree(("p", None, "reason", 0.7, {}), ("g", "p", "generate", 0.3, {}), ("c1", "g", "reflect", 1.0, {}),
              ("r1", "c1", "refine", 0.5, {}), ("c2", "r1", "reflect", 1.0, {}), ("r2", "c2", "refine", 0.9, {}),
              p={"rewards": {"format": 1.0}})
    assert stage_reward(t, t.nodes["p"], 0.2) == pytest.approx(0.2)
    assert stage_reward(t, t.nodes["g"], 0.2) == pytest.approx(0.3)
    assert stage_reward(t, t.nodes["r1"], 0.2) == pytest.approx(0.2)
    assert stage_reward(t, t.nodes["r2"], 0.2) == pytest.approx(0.4)


def test_ppo_items_count_a_failed_chain_per_node_and_keep_chains_apart() -> None:
    """A chain plan -> image whose image reward failed is dropped whole and counts 2 failed rewards (one per
    node); two good chains of one tree are two episodes (``tree/first node``), each with t = 0, 1."""
    from r3_rl.learner.ppo_learner import ppo_items
    seg = {"segment": _seg(), "rewards": {"format": 1.0}}
    t = _tree(("p1", None, "reason", 1.0, {}), ("g1", "p1", "generate", 0.5, {}),
              ("p2", None, "reason", 1.0, {}), ("g2", "p2", "generate", 0.25, {}),
              ("p3", None, "reason", 1.0, {}), ("g3", "p3", "generate", None, {}),
              **{n: seg for n in ("p1", "g1", "p2", "g2", "p3", "g3")})
    items, stats = ppo_items([t], 0, 0, 0.2)
    assert stats.failed_rewards == 2 and stats.items == 4
    assert sorted((it.episode, it.t, round(it.reward, 6)) for it in items) == [
        ("t/p1", 0, 0.2), ("t/p1", 1, 0.5), ("t/p2", 0, 0.2), ("t/p2", 1, 0.25)]


def test_ppo_items_accept_exactly_max_staleness_versions_behind() -> None:
    """Nodes of version 0 at current version 1 with ``max_staleness: 1`` still train; at version 2 the whole
    chain (2 nodes) is refused."""
    from r3_rl.learner.ppo_learner import ppo_items
    seg = {"segment": _seg(), "rewards": {"format": 1.0}}
    t = _tree(("p", None, "reason", 1.0, {}), ("g", "p", "generate", 0.5, {}), p=seg, g=seg)
    items, stats = ppo_items([t], 1, 1, 0.2)
    assert len(items) == 2 and stats.stale_refused == 0
    items, stats = ppo_items([t], 2, 1, 0.2)
    assert items == [] and stats.stale_refused == 2


def test_a_sampled_segment_with_no_actions_is_no_train_item() -> None:
    """A node that sampled nothing (0 actions: an empty completion) has nothing to train: only its sibling with
    tokens becomes an item, though both have advantages (+-0.5)."""
    from r3_rl.learner.batch import assign_advantages, collect_items
    t = _tree(("a", None, "reason", 1.0, {}), ("b", None, "reason", 0.0, {}),
              a={"segment": _seg(0)}, b={"segment": _seg(2)})
    assign_advantages([t])
    items, stats = collect_items([t], 0, 0)
    assert [it.advantage for it in items] == [-0.5] and stats.items == 1


def test_ppo_critic_modules_train_at_the_critic_lr() -> None:
    """``learner.ppo.critic_lr`` is the rate of every module PPO adds (value head, separate critic)."""
    from learner_helpers import learner_cfg

    from r3_rl.config import Recipe
    from r3_rl.learner.ppo_learner import PPO
    algo = PPO(Recipe(learner=learner_cfg(algorithm="ppo", ppo={"critic_lr": 3e-4})))
    assert algo.module_lr("value_head") == 3e-4 and algo.module_lr("critic") == 3e-4


def test_per_stage_stats_count_single_valid_and_all_failed_groups() -> None:
    """Per stage: a reason group with one valid reward (the other failed) is a single-valid group; a generate
    group whose every reward failed is an all-failed one."""
    from r3_rl.learner.batch import assign_advantages
    t = _tree(("a", None, "reason", 1.0, {}), ("b", None, "reason", None, {}),
              ("g1", "a", "generate", None, {}), ("g2", "a", "generate", None, {}))
    stats = assign_advantages([t])
    assert stats["reason/single_valid_groups"] == 1 and stats["reason/groups"] == 1
    assert stats["generate/all_failed_groups"] == 1 and stats["generate/single_valid_groups"] == 0


# ------------------------------------------------------------------------------------------------ checkpoints
def test_a_file_of_exactly_hash_max_bytes_is_hashed(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Files *up to* ``HASH_MAX_BYTES`` get a SHA-256: one of exactly that size is hashed, one byte more is not."""
    import hashlib

    from r3_rl.learner import manifest
    monkeypatch.setattr(manifest, "HASH_MAX_BYTES", 4)
    (tmp_path / "a").write_bytes(b"abcd")
    (tmp_path / "b").write_bytes(b"abcde")
    out = manifest.file_manifest(tmp_path)
    assert out == {"a": {"bytes": 4, "sha256": hashlib.sha256(b"abcd").hexdigest()}, "b": {"bytes": 5, "sha256": None}}


def test_kl_per_modality_leaves_out_the_rows_the_loss_drops() -> None:
    """A text row without an advantage (NaN) is dropped from the loss; ``kl_text`` is then the kept row's KL
    alone (k1: -0.4), not the mean with the dropped row's -5."""
    from test_exact_learner_algorithm import FakePolicy, FakeReference, _cfg, _item

    from r3_rl.config import Recipe
    from r3_rl.learner.algorithm import GRPO, LearnerModels

    items = [_item(0, "text", 2, float("nan")), _item(1, "text", 2, 1.0)]
    cfg = _cfg(kl_coef_text=0.5, kl_kind="k1")
    algo, models = GRPO(Recipe(learner=cfg)), LearnerModels(FakePolicy(2), FakeReference({0: 5.0, 1: 0.4}))
    _, m, _ = algo.loss(models, items, range(0, 2), range(0, 2), algo.prepare(models, items))
    assert m["kl_text"] == pytest.approx(-0.4, abs=1e-6)


def test_value_loss_refuses_a_fractional_mask_as_the_policy_loss_does() -> None:
    """A 0.5 in the mask would be read as 1 (counted whole); 0/1 floats and bools are accepted alike."""
    from r3_rl.algorithms.ppo import value_loss

    v, old, ret = torch.tensor([1.0, 3.0]), torch.tensor([1.0, 3.0]), torch.tensor([0.0, 0.0])
    with pytest.raises(ValueError, match="mask must hold only 0/1"):
        value_loss(v, old, ret, torch.tensor([1.0, 0.5]))
    assert float(value_loss(v, old, ret, torch.tensor([1.0, 0.0]))) == pytest.approx(0.5)
    assert float(value_loss(v, old, ret, torch.tensor([True, True]))) == pytest.approx(0.5 * (1 + 9) / 2)
