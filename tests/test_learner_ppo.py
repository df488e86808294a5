"""PPO: stage chains and stage rewards from trees, GAE advantages over stages, the critic learns."""
from __future__ import annotations

import copy
import math

import pytest
import torch
from learner_helpers import clone, learner_cfg, sample_items, tiny_policy

from r3_rl.learner.ppo_learner import PPO, chains, ppo_items, stage_reward
from r3_rl.learner.torch_learner import TorchLearner
from r3_rl.trajectory import Node, PromptItem, Segment, Tree


def _seg() -> Segment:
    return Segment(modality="text", context={"input_ids": [1, 2]}, token_ids=[3, 4], logprobs=[-1.0, -1.0])


def _a_tree(image_rewards: list[float | None], formats: list[float]) -> Tree:
    tree = Tree(id="A", prompt=PromptItem(id="p", prompt="x"))
    for j, (r, f) in enumerate(zip(image_rewards, formats)):
        tree.add(Node(id=f"p{j}", parent=None, stage="reason", round=0, group_id="A/plan", policy_version=3,
                      segment=_seg(), rewards={"format": f}, reward=0.0))
        tree.add(Node(id=f"g{j}", parent=f"p{j}", stage="generate", round=0, group_id="A/image", policy_version=3,
                      segment=_seg(), reward=r))
    return tree


def _bc_tree(parent_reward: float) -> Tree:
    tree = Tree(id="BC", prompt=PromptItem(id="p", prompt="x"))
    tree.add(Node(id="root", parent=None, stage="generate", round=0, group_id="BC/root", policy_version=-1,
                  reward=parent_reward))
    # c0 edits (refined image reward 0.9); c1 stops: its refine node is a copy with no tokens
    tree.add(Node(id="c0", parent="root", stage="reflect", round=1, group_id="BC/reflect", policy_version=3,
                  segment=_seg(), rewards={"format": 1.0, "verdict_term": 0.0}, stop=False, reward=0.6))
    tree.add(Node(id="r0", parent="c0", stage="refine", round=1, group_id="BC/refine", policy_version=3,
                  segment=_seg(), reward=0.9))
    tree.add(Node(id="c1", parent="root", stage="reflect", round=1, group_id="BC/reflect", policy_version=3,
                  segment=_seg(), rewards={"format": 0.0, "verdict_term": 0.0}, stop=True, reward=0.0))
    tree.add(Node(id="r1", parent="c1", stage="refine", round=1, group_id="BC/refine", policy_version=3,
                  reward=parent_reward, meta={"copied": True}))
    return tree


def test_chains_and_stage_rewards() -> None:
    a, bc = _a_tree([1.0, 0.25], [1.0, 0.0]), _bc_tree(0.4)
    assert [[n.id for n in c] for c in chains(a)] == [["p0", "g0"], ["p1", "g1"]]
    assert [[n.id for n in c] for c in chains(bc)] == [["c0", "r0"], ["c1"]]
    fw = 0.1
    assert [stage_reward(a, a.nodes[i], fw) for i in ("p0", "g0", "p1", "g1")] == [0.1, 1.0, 0.0, 0.25]
    assert stage_reward(bc, bc.nodes["c0"], fw) == 0.1 and stage_reward(bc, bc.nodes["c1"], fw) == 0.0
    assert stage_reward(bc, bc.nodes["r0"], fw) == pytest.approx(0.5)  # improvement over the parent image


def test_ppo_items_drop_failed_and_stale_chains_whole() -> None:
    a = _a_tree([1.0, None], [1.0, 1.0])
    items, stats = ppo_items([a, _bc_tree(0.4)], current_version=3, max_staleness=0, format_weight=0.1)
    assert [(it.episode, it.t, it.stage) for it in items] == [
        ("A/p0", 0, "reason"), ("A/p0", 1, "generate"), ("BC/c0", 0, "reflect"), ("BC/c0", 1, "refine"),
        ("BC/c1", 0, "reflect")]
    assert stats.failed_rewards == 2 and stats.items == 5
    _, stale = ppo_items([a], current_version=5, max_staleness=1, format_weight=0.1)
    assert stale.items == 0 and stale.stale_refused == 2 and stale.failed_rewards == 2


@pytest.fixture(scope="module")
def base():
    policy = tiny_policy()
    items = sample_items(policy)
    # two 3-stage episodes: (plan a, image a, plan b) and (image b, plan c, image c)
    for i, it in enumerate(items):
        it.episode, it.t, it.reward = f"e{i // 3}", i % 3, [0.1, 1.0, 0.0, 0.5, 0.1, -0.2][i]
    return policy, items


def test_gae_advantages_with_a_fresh_critic_are_returns_to_go(base) -> None:
    policy, items = base
    cfg = learner_cfg(algorithm="ppo", ppo={"gamma": 0.9, "lam": 1.0, "normalize_advantages": False})
    learner = TorchLearner(clone(policy), None, cfg)
    assert isinstance(learner.algorithm, PPO)  # learner.algorithm: ppo picks the registered algorithm
    ctx = learner.algorithm.prepare(learner.models, copy.deepcopy(items))
    assert torch.equal(ctx["old_values"], torch.zeros(6))  # the value head starts at zero
    r = [it.reward for it in items]
    want = [r[0] + 0.9 * r[1] + 0.81 * r[2], r[1] + 0.9 * r[2], r[2],
            r[3] + 0.9 * r[4] + 0.81 * r[5], r[4] + 0.9 * r[5], r[5]]
    assert ctx["advantages"].tolist() == pytest.approx(want, abs=1e-6)
    assert ctx["returns"].tolist() == pytest.approx(want, abs=1e-6)


def test_ppo_step_trains_policy_and_critic(base) -> None:
    policy, items = base
    p = clone(policy)
    cfg = learner_cfg(algorithm="ppo", micro_batch_size=2, epochs=2, ppo={"vf_coef": 1.0})
    learner = TorchLearner(p, p.frozen_copy(), cfg)
    before = learner.algorithm.values(learner.models, items).detach()
    m = learner.step(copy.deepcopy(items))
    assert m["learner/optimizer_steps"] == 2.0 and math.isfinite(m["learner/value_loss"])
    after = learner.algorithm.values(learner.models, items).detach()
    returns = learner.algorithm.prepare(learner.models, copy.deepcopy(items))["returns"]
    # the critic moved towards the returns
    assert float(((after - returns) ** 2).mean()) < float(((before - returns) ** 2).mean())
    assert not torch.equal(p.model.model.norm.weight, policy.model.model.norm.weight)  # shared backbone moved


def test_separate_critic_leaves_the_policy_backbone_to_the_policy_loss(base) -> None:
    policy, items = base
    zero_adv = copy.deepcopy(items)
    p = clone(policy)
    cfg = learner_cfg(algorithm="ppo", kl_coef_text=0.0, kl_coef_image=0.0,
                      ppo={"critic": "separate", "normalize_advantages": False, "gamma": 0.0, "lam": 0.0})
    learner = TorchLearner(p, None, cfg)
    for it in zero_adv:
        it.reward = 0.0  # zero rewards and a zero critic: zero advantages, so only the value loss is left
    learner.step(zero_adv)
    assert torch.equal(p.model.model.norm.weight, policy.model.model.norm.weight)
    assert "critic" in learner.modules and learner.modules["critic"] is not p.model


def test_ppo_logs_the_advantages_it_trains_on(tmp_path) -> None:
    """``advantage/mean`` and ``advantage/std`` used to be summarised before PPO computed its GAE advantages, so
    they always logged 0."""
    import json
    from pathlib import Path

    from conftest import tiny_overrides

    from r3_rl.config import load_recipe
    from r3_rl.trainer import Trainer

    recipe = load_recipe(Path(__file__).resolve().parents[1] / "recipes" / "tiny_blocks.yaml",
                         tiny_overrides(tmp_path, 1) + ["learner.algorithm=ppo", "learner.refine_baseline=group",
                                                        "log.tensorboard=false",
                                                        "learner.ppo={normalize_advantages: false}", "eval.dump=0"])
    Trainer(recipe, tmp_path / "run").train()
    row = next(json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
               if "batch/items" in line)
    assert row["batch/items"] >= 2 and row["learner/optimizer_steps"] == 1.0
    assert row["advantage/std"] > 0 and row["advantage/mean"] != 0


def test_old_values_and_log_probs_are_computed_in_eval_mode(base) -> None:
    """``prepare`` (PPO's old values, ``old_logp: recompute``) runs with every module in eval mode: with LoRA or
    plug-in dropout the old numbers would otherwise be one dropout draw.  The loss itself trains in train mode."""
    policy, items = base
    cfg = learner_cfg(algorithm="ppo", old_logp="recompute", ppo={"critic": "separate"})
    learner = TorchLearner(clone(policy), None, cfg)
    modes: dict[str, list[bool]] = {"prepare": [], "loss": []}
    prepare, loss = learner.algorithm.prepare, learner.algorithm.loss

    def every_mode() -> list[bool]:
        return [m.training for m in (learner.policy.model, *learner.modules.values())]

    def recording_prepare(*a, **k):
        modes["prepare"] += every_mode()
        return prepare(*a, **k)

    def recording_loss(*a, **k):
        modes["loss"] += every_mode()
        return loss(*a, **k)

    learner.algorithm.prepare, learner.algorithm.loss = recording_prepare, recording_loss
    learner.step(copy.deepcopy(items))
    assert modes["prepare"] and not any(modes["prepare"])
    assert modes["loss"] and all(modes["loss"])
    assert not any(every_mode())  # and back to eval after the step


def test_value_clipfrac_is_logged_and_zero_on_a_single_optimiser_step(base) -> None:
    """With one optimiser step per batch the values cannot have left the old ones: value_clip never acts (README);
    over several epochs the critic moves and the clipped branch is taken."""
    policy, items = base
    one = TorchLearner(clone(policy), None, learner_cfg(algorithm="ppo", ppo={"vf_coef": 1.0}))
    assert one.step(copy.deepcopy(items))["learner/value_clipfrac"] == 0.0
    several = TorchLearner(clone(policy), None, learner_cfg(algorithm="ppo", lr=1e-2, epochs=4,
                                                           ppo={"vf_coef": 1.0, "value_clip": 0.01}))
    assert several.step(copy.deepcopy(items))["learner/value_clipfrac"] > 0.0


def test_rewards_equal_up_to_rounding_give_advantages_near_zero(base) -> None:
    """The learner's whitening, not only the function's: float32 rewards a rounding error apart (as chains that
    all scored alike give) stay about 0 instead of being scaled to order 1 (the std + 1e-8 of before)."""
    policy, items = base
    cfg = learner_cfg(algorithm="ppo", ppo={"gamma": 0.0, "lam": 0.0})  # a fresh critic: advantage = reward
    learner = TorchLearner(clone(policy), None, cfg)
    alike = copy.deepcopy(items)
    for k, it in enumerate(alike):
        it.reward = float(torch.tensor(1 / 3 + (3e-8 if k % 2 else 0.0), dtype=torch.float32))
    ctx = learner.algorithm.prepare(learner.models, alike)
    assert float(ctx["advantages"].abs().max()) < 1e-3


@pytest.mark.parametrize("critic", ["head", "separate"])
def test_critic_lr_gives_the_critic_its_own_rate(base, critic: str) -> None:
    """``learner.ppo.critic_lr`` (verl's critic.optim.lr): the value head, and a separate critic's body, step at
    their own rate; a head's shared trunk at learner.lr.  Adam's first step moves a weight by about its rate, so
    the step sizes show the rates.  Left out: one parameter group, as before (checkpoints keep their layout)."""
    policy, items = base
    cfg = learner_cfg(algorithm="ppo", lr=1e-5, warmup_steps=0, grad_clip=0.0, kl_coef_text=0.0, kl_coef_image=0.0,
                      ppo={"critic": critic, "critic_lr": 1e-2, "normalize_advantages": False})
    learner = TorchLearner(clone(policy), None, cfg)
    groups = learner.optim.optimizer.param_groups
    assert [g["lr"] for g in groups] == [1e-5, 1e-2]
    critic_ids = {id(p) for m in learner.modules.values() for p in m.parameters() if p.requires_grad}
    policy_ids = {id(p) for p in learner.policy.model.parameters() if p.requires_grad}
    assert {id(p) for p in groups[1]["params"]} == critic_ids - policy_ids  # masters are the fp32 weights here
    head_before = learner.modules["value_head"].bias.detach().clone()
    trunk_before = learner.policy.model.model.norm.weight.detach().clone()
    learner.step(copy.deepcopy(items))
    head_step = float((learner.modules["value_head"].bias.detach() - head_before).abs().max())
    assert head_step == pytest.approx(1e-2, rel=0.05)
    assert float((learner.policy.model.model.norm.weight - trunk_before).abs().max()) <= 1e-5 * 1.05
    plain = TorchLearner(clone(policy), None, learner_cfg(algorithm="ppo", ppo={"critic": critic}))
    assert len(plain.optim.optimizer.param_groups) == 1


def _old_values_on_rank(rank: int, world: int, port: int, queue, n_items: int) -> None:
    """One gloo rank: the PPO old values with this rank's micro-batches (as TorchLearner assigns them)."""
    import os

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        from r3_rl.config import Recipe

        policy = tiny_policy()
        items = sample_items(policy)[:n_items]
        algorithm = PPO(Recipe(learner=learner_cfg(algorithm="ppo", micro_batch_size=2)))
        modules = algorithm.modules(policy)
        torch.nn.init.normal_(modules["value_head"].weight, generator=torch.Generator().manual_seed(0))
        learner = TorchLearner(policy, None, algorithm.cfg, None, modules, algorithm)
        learner.rank, learner.world = rank, world
        models = learner.models
        models.chunks = [c for mini in learner.minibatches(len(items)) for c, _ in learner._my_chunks(mini)]
        rows: list[int] = []
        values = algorithm.values
        algorithm.values = lambda m, batch: (rows.append(len(batch)), values(m, batch))[1]  # type: ignore[method-assign]
        with torch.no_grad():
            queue.put((rank, algorithm.old_values(models, items).tolist(), sum(rows)))
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.parametrize("n_items, rows", [(6, [4, 2]), (2, [2, 2])])
def test_ranks_compute_the_old_values_of_their_own_micro_batches_only(n_items: int, rows: list[int]) -> None:
    """2 gloo ranks, micro-batches of 2.  6 items: rank 0 values 4 items, rank 1 its 2 (its zero-weight repeat is
    not run twice).  2 items: one micro-batch, which rank 1 repeats at weight 0, so both ranks value the same two
    items and their sum is divided by 2 (a sum left undivided doubled them).  Either way both ranks get every item's
    value exactly as one process computes it."""
    import multiprocessing as mp
    import socket

    from r3_rl.config import Recipe
    from r3_rl.learner.algorithm import LearnerModels

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_old_values_on_rank, args=(r, 2, port, queue, n_items)) for r in range(2)]
    for p in procs:
        p.start()
    got = sorted(queue.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(timeout=60)
    policy = tiny_policy()
    items = sample_items(policy)[:n_items]
    algorithm = PPO(Recipe(learner=learner_cfg(algorithm="ppo", micro_batch_size=2)))
    modules = algorithm.modules(policy)
    torch.nn.init.normal_(modules["value_head"].weight, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        alone = algorithm.old_values(LearnerModels(policy, None, modules), items).tolist()
    assert len(set(alone)) == n_items  # a head that tells the items apart
    assert [r for _, _, r in got] == rows
    assert got[0][1] == got[1][1] == alone
