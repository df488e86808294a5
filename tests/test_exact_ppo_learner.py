"""Exact checks of PPO's learner side and the DeepSpeed driver's step (round 10F mutation audit of
r3_rl.learner.ppo_learner and r3_rl.learner.deepspeed_learner): each test pins one rule whose breaking the older
tests let through.  Expected values are worked out by hand in the docstrings and comments.

No Ray, no DeepSpeed engine, no training: PPO runs on a tiny policy's zero-initialised value head (its bias set by
hand, so ``V(s)`` is that bias exactly), the DeepSpeed driver on stand-in engines (``SimpleNamespace``).
"""
from __future__ import annotations

import copy
import math
from types import SimpleNamespace as NS
from typing import Any

import pytest
import torch
from learner_helpers import ppo_learner

from r3_rl.trajectory import Node, PromptItem, Segment, Tree


# ------------------------------------------------------------------ PPO: chains and stage rewards
def _seg(n_tokens: int = 2) -> Segment:
    return Segment(modality="text", context={"input_ids": [1, 2]}, token_ids=list(range(3, 3 + n_tokens)),
                   logprobs=[-1.0] * n_tokens)


def test_a_segment_with_no_tokens_starts_no_chain() -> None:
    """Catches ``num_actions > 0`` relaxed to ``>= 0`` (a stage with nothing sampled trained as a PPO step)."""
    from r3_rl.learner.ppo_learner import chains

    tree = Tree(id="T", prompt=PromptItem(id="p", prompt="x"))
    tree.add(Node(id="a", parent=None, stage="reason", round=0, group_id="T/plan", policy_version=1,
                  segment=_seg(0), rewards={"format": 1.0}, reward=0.0))
    tree.add(Node(id="b", parent="a", stage="generate", round=0, group_id="T/image", policy_version=1,
                  segment=_seg(2), reward=0.5))
    assert [[n.id for n in c] for c in chains(tree)] == [["b"]]


def test_a_reflect_whose_reward_failed_has_no_stage_reward() -> None:
    """Catches a reflect stage scored from its own rewards even though its GRPO reward failed (chain kept)."""
    from r3_rl.learner.ppo_learner import stage_reward

    tree = Tree(id="T", prompt=PromptItem(id="p", prompt="x"))
    node = Node(id="c", parent=None, stage="reflect", round=1, group_id="T/reflect", policy_version=1,
                segment=_seg(), rewards={"format": 1.0, "verdict_term": 0.0}, reward=None)
    tree.add(node)
    assert stage_reward(tree, node, 0.1) is None


# ------------------------------------------------------------------ PPO: prepare (GAE inputs, advantages, metrics)
def test_gae_runs_over_each_episode_in_time_order_not_list_order(ppo_base):
    """Catches the per-episode sort by ``t`` dropped (GAE then runs over the items in list order).  Items listed
    in reverse, zero critic, gamma 0.5, lam 1: advantages are discounted returns-to-go by t; episode (0.1, 1, 0):
    (0.1 + 0.5 + 0, 1 + 0, 0) = (0.6, 1.0, 0.0); episode (0.5, 0.1, -0.2): (0.5 + 0.05 - 0.05, 0.1 - 0.1, -0.2)."""
    policy, items = ppo_base
    learner = ppo_learner(policy, gamma=0.5, lam=1.0, normalize_advantages=False)
    its = copy.deepcopy(items)[::-1]  # t order 2, 1, 0, 2, 1, 0
    ctx = learner.algorithm.prepare(learner.models, its)
    assert ctx["advantages"].tolist() == pytest.approx([-0.2, 0.0, 0.5, 0.0, 1.0, 0.6], abs=1e-6)


def test_items_carry_the_advantages_and_the_logged_mean_and_std_are_theirs(ppo_base):
    """Catches the items given the returns instead of the advantages (then logged as advantage/mean and /std) and
    advantage/mean logging the std.  V = 0.5 everywhere, gamma 0.9, lam 0.5: A = (0.37625, 0.725, -0.5, 0.33075,
    -0.265, -0.7) (worked out in test_exact_blocks_ppo), mean -0.0055, unbiased std 0.5516..."""
    policy, items = ppo_base
    learner = ppo_learner(policy, gamma=0.9, lam=0.5, normalize_advantages=False)
    with torch.no_grad():
        learner.modules["value_head"].bias.fill_(0.5)
    its = copy.deepcopy(items)
    ctx = learner.algorithm.prepare(learner.models, its)
    adv = [0.37625, 0.725, -0.5, 0.33075, -0.265, -0.7]
    assert [it.advantage for it in its] == pytest.approx(adv, abs=1e-5)
    mean = sum(adv) / 6
    std = math.sqrt(sum((a - mean) ** 2 for a in adv) / 5)
    assert ctx["metrics"]["advantage/mean"] == pytest.approx(mean, abs=1e-5)
    assert ctx["metrics"]["advantage/std"] == pytest.approx(std, abs=1e-5)


def test_prepare_keeps_the_policy_metrics_of_grpo(ppo_base):
    """Catches PPO's advantage metrics replacing (not joining) GRPO's prepare metrics (the sampler log-prob gap
    of ``old_logp: recompute``)."""
    from learner_helpers import clone, learner_cfg

    from r3_rl.learner.torch_learner import TorchLearner

    policy, items = ppo_base
    learner = TorchLearner(clone(policy), None, learner_cfg(algorithm="ppo", old_logp="recompute"))
    ctx = learner.algorithm.prepare(learner.models, copy.deepcopy(items))
    assert any(k.startswith("learner/sampler_") for k in ctx["metrics"]), sorted(ctx["metrics"])
    assert "advantage/mean" in ctx["metrics"]


def test_old_values_refuse_items_that_no_micro_batch_covered(ppo_base):
    """Catches the coverage check dropped (items no rank computed would get V_old = 0/0 = NaN, silently).
    This learner runs only micro-batch 0-2 of 6 items: 4 items have no old value."""
    policy, items = ppo_base
    learner = ppo_learner(policy)
    models = copy.copy(learner.models)
    models.chunks = [range(0, 2)]
    with pytest.raises(RuntimeError, match="4 of 6 items got no value"):
        learner.algorithm.old_values(models, copy.deepcopy(items))


# ------------------------------------------------------------------ PPO: the loss of one micro-batch
def _loss_at(policy, items, **ppo):
    """Loss of micro-batch 0-2 of mini-batch 0-6 with V_old = 0, returns (1.0, 0.1), advantages (7, 7) set by
    hand and the new critic at V = 1 (zero head weight, bias 1): the value loss then depends only on these."""
    from r3_rl.learner.algorithm import GRPO

    learner = ppo_learner(policy, normalize_advantages=False, **ppo)
    its = copy.deepcopy(items)
    alg, models = learner.algorithm, learner.models
    ctx = alg.prepare(models, its)
    ctx["old_values"] = torch.zeros(6)
    ctx["returns"] = torch.tensor([1.0, 0.1, 0.0, 0.0, 0.0, 0.0])
    ctx["advantages"] = torch.full((6,), 7.0)
    with torch.no_grad():
        models.modules["value_head"].bias.fill_(1.0)
        chunk, mini = range(0, 2), range(0, 6)
        total, m, _ = alg.loss(models, its, chunk, mini, ctx)
        base, _, _ = GRPO.loss(alg, models, its, chunk, mini, ctx)
    return float(total - base), m


def test_value_loss_clips_around_the_old_values_toward_the_returns(ppo_base):
    """Catches the clip centred on the new value (or dropped), old values and returns swapped, and the value target
    read from the advantages.  V 1, V_old 0, clip 0.2: V_clip 0.2; return 1: max(0, 0.64) = 0.64; return 0.1:
    max(0.81, 0.01) = 0.81; value_loss 0.5 x (0.64 + 0.81) / 2 = 0.3625; clipfrac 1/2."""
    policy, items = ppo_base
    _, m = _loss_at(policy, items, value_clip=0.2, vf_coef=1.0)
    assert m["value_loss"] == pytest.approx(0.3625, abs=1e-6)
    assert m["value_clipfrac"] == 0.5


def test_value_loss_is_weighted_by_vf_coef(ppo_base):
    """Catches ``vf_coef`` left out of the loss (the critic then always weighted 1).  0.5 x 0.3625 x 2/6."""
    policy, items = ppo_base
    added, m = _loss_at(policy, items, value_clip=0.2, vf_coef=0.5)
    assert m["value_loss"] == pytest.approx(0.3625, abs=1e-6)
    assert added == pytest.approx(0.5 * 0.3625 * 2 / 6, abs=1e-6)


def test_value_and_return_means_are_logged_from_the_new_values_and_the_returns(ppo_base):
    """Catches value_mean logging V_old (0) instead of the critic's values (1) and return_mean logging V_old
    instead of the returns' mean (1.0 + 0.1) / 2 = 0.55."""
    policy, items = ppo_base
    _, m = _loss_at(policy, items, value_clip=0.2, vf_coef=1.0)
    assert m["value_mean"] == pytest.approx(1.0, abs=1e-6)
    assert m["return_mean"] == pytest.approx(0.55, abs=1e-6)


# ------------------------------------------------------------------ PPO: the critic's modules
def test_a_separate_critic_keeps_the_frozen_weights_of_the_policy_frozen() -> None:
    """Catches the separate critic's copy training every weight (the policy's frozen towers included), and a
    value head that does not start at zero."""
    from r3_rl.learner.ppo_learner import critic_modules

    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2))
    model[0].requires_grad_(False)
    out = critic_modules(NS(feature_size=2, model=model), NS(ppo=NS(critic="separate")))
    assert [p.requires_grad for p in out["critic"].parameters()] == [False, False, True, True]
    assert out["critic"] is not model
    assert out["value_head"].weight.tolist() == [[0.0, 0.0]] and out["value_head"].bias.tolist() == [0.0]


def test_value_head_computes_in_float32_from_bf16_weights() -> None:
    """Catches the head computing in its weights' dtype: (1 + 2^-7)^2 = 1 + 2^-6 + 2^-14 exactly in float32,
    which bf16 (8 significant bits) rounds to 1 + 2^-6."""
    from r3_rl.learner.ppo_learner import ValueHead

    head = ValueHead(1, 1).to(torch.bfloat16)
    with torch.no_grad():
        head.weight.fill_(1 + 2 ** -7)
        head.bias.zero_()
    out = head(torch.tensor([[1 + 2 ** -7]], dtype=torch.bfloat16))
    assert out.dtype == torch.float32 and float(out.detach()) == 1 + 2 ** -6 + 2 ** -14


# ------------------------------------------------------------------ the DeepSpeed driver's step, on stand-ins
def _ds(**kw: Any) -> Any:
    from r3_rl.learner.deepspeed_learner import DeepSpeedOptim

    obj = DeepSpeedOptim.__new__(DeepSpeedOptim)
    obj.__dict__.update(kw)
    return obj


def test_backward_hands_deepspeed_the_loss_unscaled_and_unscaled_by_gas() -> None:
    """Catches the micro-batch loss divided by the accumulation steps (by the driver or by DeepSpeed's
    ``scale_wrt_gas``) on top of the learner's own micro-batch weighting."""
    seen: list[tuple[float, bool]] = []
    engine = NS(backward=lambda loss, scale_wrt_gas=True: seen.append((float(loss), scale_wrt_gas)),
                gradient_accumulation_steps=lambda: 4)
    _ds(engine=engine).backward(torch.tensor(3.0))
    assert seen == [(3.0, False)]


def test_discard_under_the_manual_check_only_clears_the_gradients() -> None:
    """Catches the ZeRO-0 fp32 discard falling through to the NaN-poison path (which needs outputs and steps)."""
    ev: list[str] = []
    engine = NS(zero_grad=lambda: ev.append("zero_grad"), step=lambda: ev.append("step"),
                backward=lambda *a, **k: ev.append("backward"), was_step_applied=lambda: False)
    _ds(manual_check=True, engine=engine).discard([])
    assert ev == ["zero_grad"]


def test_discard_refuses_outputs_that_carry_no_gradient() -> None:
    """Catches outputs without ``requires_grad`` poisoned anyway (the NaN then reaches no gradient: the step
    DeepSpeed should skip is taken on the real gradients)."""
    ev: list[str] = []
    engine = NS(zero_grad=lambda: ev.append("zero_grad"), step=lambda: ev.append("step"),
                backward=lambda *a, **k: ev.append("backward"), was_step_applied=lambda: False)
    with pytest.raises(RuntimeError, match="differentiable output"):
        _ds(manual_check=False, engine=engine).discard([torch.tensor([1.0, 2.0])])
    assert ev == []


def test_lr_is_the_first_groups_rate_not_the_critics() -> None:
    """Catches ``lr()`` reading the last parameter group (PPO's ``critic_lr`` group) instead of learner.lr's."""
    assert _ds(engine=NS(get_lr=lambda: [1e-5, 1e-2])).lr() == 1e-5


def test_zero_grad_clears_every_parameter() -> None:
    """Catches stale gradients left on some of the trainable parameters."""
    ps = [torch.nn.Parameter(torch.zeros(1)) for _ in range(3)]
    for p in ps:
        p.grad = torch.ones(1)
    _ds(params=ps).zero_grad()
    assert [p.grad for p in ps] == [None, None, None]


def test_load_without_a_deepspeed_state_is_refused(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    """Catches a resume that found no DeepSpeed checkpoint going on silently from fresh weights."""
    import r3_rl.learner.deepspeed_learner as dsm
    import r3_rl.learner.safe_load as sl

    monkeypatch.setattr(sl, "make_deepspeed_loads_safe", lambda engine: None)
    monkeypatch.setattr(dsm, "frozen_names", lambda container: set())
    monkeypatch.setattr(dsm, "resume_with_recipe_hyperparameters", lambda opt, sched, load: (None, None))
    monkeypatch.setattr(dsm, "check_same_frozen", lambda *a: None)
    ds = _ds(engine=NS(optimizer=NS(), lr_scheduler=None, gradient_clipping=lambda: 1.0), container=None,
             frozen_fingerprint=None)
    with pytest.raises(FileNotFoundError, match="no DeepSpeed state"):
        ds.load(tmp_path)


# ------------------------------------------------------------------ the DeepSpeed driver's set-up, engine faked
def _built(monkeypatch: pytest.MonkeyPatch, **kw: Any) -> tuple[Any, dict[str, Any]]:
    """A DeepSpeedOptim over a small Linear whose ``deepspeed.initialize`` only records what it was handed."""
    pytest.importorskip("deepspeed")
    import deepspeed
    from learner_helpers import learner_cfg

    import r3_rl.learner.deepspeed_learner as dsm

    got: dict[str, Any] = {}

    def initialize(model, optimizer, lr_scheduler, config):
        got.update(model=model, optimizer=optimizer, lr_scheduler=lr_scheduler, config=config)
        return NS(), optimizer, None, lr_scheduler

    monkeypatch.setattr(dsm, "ensure_dist_env", lambda: "gloo")
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda *a, **k: 1)
    monkeypatch.setattr(deepspeed, "initialize", initialize)
    cfg = learner_cfg(backend="deepspeed", micro_batch_size=2, **kw)
    return dsm.DeepSpeedOptim({"policy": torch.nn.Linear(2, 2)}, cfg), got


@pytest.mark.parametrize("stage,manual,clip", [(0, True, 0.0), (2, False, 0.5)])
def test_only_zero0_fp32_checks_and_clips_by_itself(monkeypatch: pytest.MonkeyPatch, stage: int, manual: bool,
                                                    clip: float) -> None:
    """Catches the driver's own finite check and clipping turned on beyond ZeRO-0 fp32 (``and`` read as ``or``):
    ZeRO-2 fp32 keeps DeepSpeed's clipping (grad_clip 0.5) and its overflow path."""
    ds, got = _built(monkeypatch, grad_clip=0.5, deepspeed={"zero_stage": stage, "dtype": "fp32"})
    assert ds.manual_check is manual
    assert got["config"]["gradient_clipping"] == clip


def test_the_schedule_decays_to_lr_final(monkeypatch: pytest.MonkeyPatch) -> None:
    """Catches ``lr_final`` not handed to the schedule: no warm-up, decay over 4 steps to 0.25 x lr; the factor at
    step s is 1 - 0.75 x (s + 1) / 4: 0.8125 at step 0, 0.25 from step 3 on."""
    _, got = _built(monkeypatch, warmup_steps=0, lr_decay_steps=4, lr_final=0.25,
                    deepspeed={"zero_stage": 2, "dtype": "fp32"})
    factor = got["lr_scheduler"].lr_lambdas[0]
    assert [factor(s) for s in (0, 3, 10)] == pytest.approx([0.8125, 0.25, 0.25])


def test_the_fused_adamw_is_used_only_under_the_optimizer_offload(monkeypatch: pytest.MonkeyPatch) -> None:
    """Catches the fused AdamW dropped under ``offload_optimizer`` (2.3x slower CPU step) or used without it."""
    for config, fused in (({}, False),
                          ({"zero_optimization": {"offload_optimizer": {"device": "cpu"}}}, True)):
        _, got = _built(monkeypatch, deepspeed={"zero_stage": 2, "dtype": "fp32", "config": config})
        assert bool(got["optimizer"].defaults.get("fused")) is fused
