"""Which learner a recipe gets: in-process (:func:`~r3_rl.learner.torch_learner.learner_from_recipe`) or
``learner.ranks`` data-parallel ranks on Ray actors (:class:`~r3_rl.learner.ray_ranks.RankedLearner`, each
rank building an in-process learner itself).

``learner.algorithm`` picks the objective (:mod:`r3_rl.learner.registry`), ``learner.backend`` the
optimiser driver (torch AdamW in-process, or a DeepSpeed engine), ``learner.lora`` whether only LoRA
adapters train (the reference then being the base model with adapters disabled, so the run's frozen copy
is not needed); with every KL weight 0 there is no reference at all.
"""
from __future__ import annotations

from typing import Any

from r3_rl.learner.actions import uses_kl
from r3_rl.policy.base import Policy


def needs_frozen_reference(recipe: Any) -> bool:
    """Whether the trainer should keep a frozen copy of the policy as KL reference: not with LoRA (the base
    model with adapters off is the reference), not when every KL weight is 0 (no reference at all)."""
    return recipe.learner.lora is None and uses_kl(recipe.learner)


def build_learner(policy: Policy, reference: Any, recipe: Any, algorithm: Any = None) -> Any:
    """The learner for ``recipe.learner``; with LoRA the adapters are injected into ``policy`` here."""
    if recipe.learner.ranks > 1:  # data-parallel ranks on Ray actors, each building its own in-process learner
        from r3_rl.learner.ray_ranks import RankedLearner

        return RankedLearner(policy, reference, recipe)
    from r3_rl.learner.torch_learner import learner_from_recipe

    return learner_from_recipe(policy, reference, recipe, algorithm)
