"""Exact small cases for maths that other tests only checked against itself or at values that hide a bug.

A mutation audit (2026-12-06) made 48 plausible one-point bugs in the algorithm maths, the learner's batching,
the rewards and the sampling transform; 13 passed the whole suite.  Each test here fails on one of them, named in
its docstring.  The sampling ones matter most: the sampler and the learner call the same ``sampling_logprobs``,
so a test that compares the two cannot see an error in it (only Janus' comparison with transformers caught the
CFG formula).
"""
from __future__ import annotations

import copy
import math
from types import SimpleNamespace

import pytest
import torch

from r3_rl.trajectory import SamplingParams, Segment


def test_kl_by_modality_divides_by_each_modalitys_tokens() -> None:
    """The logged ``kl_text`` / ``kl_image`` are each modality's mean (a denominator of all tokens gave 0.5)."""
    from r3_rl.algorithms.kl import kl_by_modality
    logp = torch.zeros(2, 2)
    ref = torch.tensor([[-1.0, -1.0], [0.0, 0.0]])
    out = kl_by_modality(logp, ref, torch.ones(2, 2), ["text", "image"], kind="k1")
    assert out == {"kl_text": 1.0, "kl_image": 0.0}


def test_value_clip_fraction_counts_the_clipped_rows() -> None:
    """Two of three rows clipped (a flipped comparison gave 1/3; the one-of-two case read 1/2 either way)."""
    from r3_rl.algorithms.ppo import value_clip_fraction
    v, old = torch.ones(3, dtype=torch.float64), torch.full((3,), 0.5, dtype=torch.float64)
    ret = torch.tensor([2.0, 2.0, 0.0], dtype=torch.float64)  # rows 0, 1 clipped; row 2 not
    assert value_clip_fraction(v, old, ret, 0.2) == pytest.approx(2 / 3)


def test_adv_clip_frac_ignores_failed_rows() -> None:
    """A failed row (NaN advantage) is not a clipped one."""
    from r3_rl.algorithms.flow_losses import flow_policy_loss
    _, m = flow_policy_loss(torch.zeros(2), torch.zeros(2), torch.tensor([math.nan, 0.1]), adv_clip=5.0)
    assert float(m["adv_clip_frac"]) == 0.0


def test_dr_grpo_normaliser_is_the_stages_max_new_tokens() -> None:
    """``dr_grpo`` divides by the stage's ``max_new_tokens``, not by the sampled length."""
    from r3_rl.learner.actions import most_actions
    from r3_rl.learner.batch import TrainItem
    seg = Segment(modality="text", context={}, token_ids=[1, 2, 3], logprobs=[-1.0] * 3)
    item = TrainItem(seg, 1.0, "reason", 0)
    rollout = SimpleNamespace(reason=SimpleNamespace(max_new_tokens=10))
    assert most_actions(item, rollout) == 10


def test_minibatch_is_micro_batch_size_times_grad_accum() -> None:
    """``learner.grad_accum: 2`` makes a mini-batch of two micro-batches (every test ran with 0 or 1)."""
    from r3_rl.learner.torch_learner import TorchLearner
    lrn = object.__new__(TorchLearner)
    lrn.cfg = SimpleNamespace(grad_accum=2, micro_batch_size=2)
    assert lrn.minibatches(8) == [range(0, 4), range(4, 8)]


def test_image_at_exactly_the_threshold_is_correct() -> None:
    """An image scored exactly ``correct_threshold`` is correct (``>=``): binary rewards of 1.0 against 1.0."""
    from r3_rl.rollout.scoring import StageScorer
    s = StageScorer(task=None, format_weight=0.0, reason_format="", reflect_format="", correct_threshold=1.0)
    assert s._correct(SimpleNamespace(total=1.0, parts={})) is True


def test_top_p_keeps_the_token_that_crosses_the_threshold() -> None:
    """Nucleus 0.6 over [.5, .3, .2] keeps the first two, renormalised."""
    from r3_rl.policy.sampling import sampling_logprobs
    p = torch.tensor([0.5, 0.3, 0.2])
    lp = sampling_logprobs(p.log(), SamplingParams(top_p=0.6))
    torch.testing.assert_close(lp[:2], (p[:2] / 0.8).log())
    assert lp[2] == -math.inf


def test_temperature_zero_scores_at_temperature_one() -> None:
    """Greedy sampling records log-probs at temperature 1, so greedy trajectories stay scoreable."""
    from r3_rl.policy.sampling import sampling_logprobs
    logits = torch.tensor([2.0, 1.0, 0.0])
    torch.testing.assert_close(sampling_logprobs(logits, SamplingParams(temperature=0.0, greedy=True)),
                               torch.log_softmax(logits, -1))


def test_ppo_micro_batches_give_the_full_batch_gradient() -> None:
    """PPO's value loss keeps its share of the mini-batch in every micro-batch: micro-batches of 1 and one of 64 give the same gradient."""
    from learner_helpers import clone, learner_cfg, sample_items, step_grads, tiny_policy
    from r3_rl.learner.torch_learner import TorchLearner
    policy = tiny_policy()
    items = sample_items(policy)
    for i, it in enumerate(items):
        it.episode, it.t, it.reward = f"e{i // 3}", i % 3, [0.1, 1.0, 0.0, 0.5, 0.1, -0.2][i]
    grads = []
    for mbs in (64, 1):
        p = clone(policy)
        cfg = learner_cfg(algorithm="ppo", micro_batch_size=mbs, kl_coef_text=0.0, kl_coef_image=0.0,
                          ppo={"vf_coef": 1.0})
        grads.append(step_grads(TorchLearner(p, None, cfg), copy.deepcopy(items)))
    assert sum(float(g.abs().sum()) for g in grads[0]) > 0
    for g, ref in zip(grads[1], grads[0]):
        torch.testing.assert_close(g, ref, rtol=1e-4, atol=1e-7)


def test_top_k_keeps_exactly_k_tokens() -> None:
    """Top-2 keeps two tokens, renormalised."""
    from r3_rl.policy.sampling import sampling_logprobs
    logits = torch.tensor([3.0, 2.0, 1.0, 0.0])
    lp = sampling_logprobs(logits, SamplingParams(top_k=2))
    torch.testing.assert_close(lp[:2], torch.log_softmax(logits[:2], -1))
    assert bool(torch.isinf(lp[2:]).all())


def test_reduce_metric_min_is_the_min() -> None:
    """A ``*_min`` metric over micro-batches or ranks is their minimum."""
    from r3_rl.learner.torch_learner import reduce_metric
    assert reduce_metric("ratio_min", [1.0, 0.5]) == 0.5 and reduce_metric("ratio_max", [1.0, 2.0]) == 2.0


def test_ppo_gae_follows_t_not_the_item_order() -> None:
    """GAE runs along each episode's ``t``: mini-batch shuffling can hand an episode's stages over out of order."""
    from learner_helpers import clone, learner_cfg, sample_items, tiny_policy
    from r3_rl.learner.torch_learner import TorchLearner
    policy = tiny_policy()
    items = sample_items(policy)[:3]
    r = [0.1, 1.0, 0.0]
    for i, it in enumerate(items):
        it.episode, it.t, it.reward = "e", i, r[i]
    cfg = learner_cfg(algorithm="ppo", ppo={"gamma": 0.9, "lam": 1.0, "normalize_advantages": False})
    learner = TorchLearner(clone(policy), None, cfg)
    ctx = learner.algorithm.prepare(learner.models, copy.deepcopy(items[::-1]))  # shuffled_by_group may reorder
    want = [r[0] + 0.9 * r[1] + 0.81 * r[2], r[1] + 0.9 * r[2], r[2]][::-1]
    assert ctx["advantages"].tolist() == pytest.approx(want, abs=1e-6)


def test_reflect_delta_part_is_new_minus_old() -> None:
    """The reflect reward's logged ``delta`` part is the edit's reward minus its parent's."""
    from test_critic_rewards import bc_tree, scorer
    t = bc_tree(0.5, [(False, 0.75)])
    scorer().compose(t)
    assert t.nodes["c0"].rewards["delta"] == pytest.approx(0.25)


def test_row_weight_does_not_weigh_the_kl() -> None:
    """Stage weights scale the policy term only, never the KL (advantages 0: the loss is the mean k1 KL, 1.0)."""
    from r3_rl.algorithms.losses import clipped_policy_loss
    logp = torch.zeros(2, 2)
    ref = torch.full((2, 2), -1.0)
    loss, _ = clipped_policy_loss(logp, logp, torch.zeros(2), torch.ones(2, 2), ref_logp=ref, kl_coef=1.0,
                                  kl_kind="k1", row_weight=torch.tensor([2.0, 3.0]))
    assert loss.item() == pytest.approx(1.0)  # mean k1 KL = 1, advantages 0: the weights must not touch it
