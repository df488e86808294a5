"""Learner factory and batch preparation: what the trainer calls, whatever the recipe selects.

``learner.algorithm`` picks the objective (GRPO: sibling-group advantages; PPO: GAE over stage chains
with a critic), ``learner.backend`` the optimiser driver (torch AdamW in-process, or a DeepSpeed
engine), ``learner.lora`` whether only LoRA adapters train (the reference then being the base model
with adapters disabled, so the trainer's frozen copy is not needed).
"""
from __future__ import annotations

from typing import Any

from r3_rl.errors import UserError
from r3_rl.learner.batch import BatchStats, TrainItem, assign_advantages, collect_items
from r3_rl.policy.base import Policy
from r3_rl.trajectory import Tree


def uses_kl(cfg: Any) -> bool:
    """Whether ``learner`` settings ``cfg`` penalise the KL to a reference at all."""
    return cfg.kl_coef_text > 0 or cfg.kl_coef_image > 0


def needs_frozen_reference(recipe: Any) -> bool:
    """Whether the trainer should keep a frozen copy of the policy as KL reference: not with LoRA (the base
    model with adapters off is the reference), not when every KL weight is 0 (no reference at all)."""
    return recipe.learner.lora is None and uses_kl(recipe.learner)


def build_learner(policy: Policy, reference: Any, recipe: Any) -> Any:
    """The learner for ``recipe.learner``; with LoRA the adapters are injected into ``policy`` here."""
    cfg = recipe.learner
    if cfg.ranks > 1:  # data-parallel ranks on Ray actors, each building its own learner with this function
        from r3_rl.learner.ray_ranks import RankedLearner

        return RankedLearner(policy, reference, recipe)
    if cfg.gradient_checkpointing:  # before LoRA wraps the model; each learner rank enables its own
        from r3_rl.policy.kv_cache import enable_gradient_checkpointing

        try:
            enable_gradient_checkpointing(policy.model)
        except ValueError as e:
            raise UserError(f"learner.gradient_checkpointing: {e}") from None
    if cfg.lora is not None:
        from r3_rl.learner.lora import AdapterDisabledReference, apply_lora

        peft_model = apply_lora(policy, cfg.lora)
        reference = AdapterDisabledReference(policy, peft_model) if uses_kl(cfg) else None
    if cfg.algorithm == "ppo":
        from r3_rl.learner.ppo_learner import PPOLearner, critic_modules

        learner_cls: Any = PPOLearner
        modules = critic_modules(policy, cfg)
    else:
        from r3_rl.learner.torch_learner import TorchLearner

        learner_cls, modules = TorchLearner, {}
    optim = None
    if cfg.backend == "deepspeed":
        from r3_rl.learner.deepspeed_learner import DeepSpeedOptim

        optim = DeepSpeedOptim({"policy": policy.model, **modules}, cfg)
    return learner_cls(policy, reference, cfg, optim, modules)


def prepare_batch(trees: list[Tree], recipe: Any, current_version: int
                  ) -> tuple[list[TrainItem], BatchStats, dict[str, float]]:
    """Scored trees -> (learner items, batch stats, advantage/group stats for the logs)."""
    cfg = recipe.learner
    adv_stats = assign_advantages(trees, cfg.normalize_std)  # GRPO advantages; group counts logged for PPO too
    if cfg.algorithm == "ppo":
        from r3_rl.learner.ppo_learner import ppo_items

        items, stats = ppo_items(trees, current_version, cfg.max_staleness, recipe.rewards.format_weight)
    else:
        items, stats = collect_items(trees, current_version, cfg.max_staleness)
        adv_stats["zero_signal_items"] = float(stats.zero_signal_items)
    return items, stats, adv_stats
