"""Shared set-up for the learner tests: a tiny policy, sampled text+image items, learner configs."""
from __future__ import annotations

import copy
from typing import Any

import torch

from r3_rl.config import Learner, Templates
from r3_rl.learner.batch import TrainItem
from r3_rl.policy.tiny import TinyUnifiedPolicy
from r3_rl.trajectory import PromptItem, SamplingParams

PROMPTS = [PromptItem(id="a", prompt="a photo of a red square"),
           PromptItem(id="b", prompt="a photo of two blue circles"),
           PromptItem(id="c", prompt="a photo of a green triangle")]


def tiny_policy(seed: int = 0, rows: int = 2, cols: int = 2) -> TinyUnifiedPolicy:
    return TinyUnifiedPolicy.build(Templates().model_dump(), rows=rows, cols=cols, hidden_size=32, num_layers=1,
                                   num_heads=2, intermediate_size=48, max_positions=128, seed=seed)


def sample_items(policy: TinyUnifiedPolicy, seed: int = 0, advantages: list[float] | None = None,
                 cfg_scale: float = 1.0) -> list[TrainItem]:
    """Three plans (text) and three images (CFG when ``cfg_scale != 1``), varied lengths, given advantages."""
    gen = torch.Generator().manual_seed(seed)
    plans = policy.reason(PROMPTS, SamplingParams(temperature=1.0, max_new_tokens=6), gen)
    images = policy.generate(PROMPTS, [p.text for p in plans], SamplingParams(temperature=1.0, cfg_scale=cfg_scale),
                             gen)
    segs = [p.segment for p in plans] + [i.segment for i in images]
    advantages = advantages or [1.0, -0.5, 0.25, -1.0, 0.75, 0.5]
    return [TrainItem(s, a, "reason" if s.modality == "text" else "generate", policy.version)
            for s, a in zip(segs, advantages)]


def learner_cfg(**kw: Any) -> Learner:
    base = dict(lr=1e-2, kl_coef_text=0.05, kl_coef_image=0.1, micro_batch_size=64, warmup_steps=0)
    base.update(kw)
    return Learner(**base)


def weights(policy: TinyUnifiedPolicy) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in policy.model.state_dict().items()}


def clone(policy: TinyUnifiedPolicy) -> TinyUnifiedPolicy:
    other = copy.copy(policy)
    other._model = copy.deepcopy(policy.model)
    return other


def step_grads(learner: Any, items: list[TrainItem]) -> list[torch.Tensor]:
    """Run one learner step (one optimiser step), returning the accumulated gradient it stepped with."""
    seen: list[torch.Tensor] = []
    real = learner.optim.step

    def spy():
        seen.extend(torch.zeros_like(q) if q.grad is None else q.grad.clone() for q in learner.optim.params)
        return real()
    learner.optim.step = spy
    m = learner.step(items)
    assert m["learner/optimizer_steps"] == 1.0
    return seen


def ppo_episodes() -> tuple[TinyUnifiedPolicy, list[TrainItem]]:
    """A tiny policy and six sampled items as two PPO episodes of three steps, (0, 1, 2) and (3, 4, 5), with
    rewards (0.1, 1.0, 0.0) and (0.5, 0.1, -0.2): the GAE cases' hand-worked inputs."""
    policy = tiny_policy()
    items = sample_items(policy)
    for i, it in enumerate(items):
        it.episode, it.t, it.reward = f"e{i // 3}", i % 3, [0.1, 1.0, 0.0, 0.5, 0.1, -0.2][i]
    return policy, items


def ppo_learner(policy: TinyUnifiedPolicy, **ppo: Any) -> Any:
    """A torch-backend PPO learner on a copy of ``policy`` with the ``learner.ppo`` options ``ppo``."""
    from r3_rl.learner.torch_learner import TorchLearner

    return TorchLearner(clone(policy), None, learner_cfg(algorithm="ppo", ppo=ppo))
