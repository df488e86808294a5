"""One builder of a run's parts -- policy, reference, rewards, rollout engine, algorithm, learner -- shared by
``r3-rl train``, ``eval`` and ``rollout``.

Each part is built on first use, and only then: ``eval`` and ``rollout`` ask for the policy and the rewards,
so they build no optimiser, no reference and no learner ranks.  Parts that need Ray (``rollout.backend: ray``,
``rollout.reward_workers``, ``learner.ranks``) share one Ray runtime, started here by the first of them and
shut down by :meth:`Components.close` after all of them (a Ray the caller started is left alone).
"""
from __future__ import annotations

from functools import cached_property
from pathlib import Path
from typing import Any, Callable

from r3_rl.learner.build import build_learner, needs_frozen_reference
from r3_rl.learner.registry import load_algorithm
from r3_rl.policy.registry import build_policy
from r3_rl.rewards.reward_set import FailureBudget, RewardSet, Scorer, reward_specs
from r3_rl.rollout.engine import build_engine
from r3_rl.rollout.scoring import StageScorer


class Components:
    """The parts of a run for ``recipe``; ``run_dir`` caches the warm start, ``log_event`` records what a
    user must be able to find later (worker restarts)."""

    def __init__(self, recipe: Any, run_dir: Path, console: Any = None,
                 log_event: Callable[[str], None] | None = None) -> None:
        self.recipe, self.run_dir, self.console = recipe, Path(run_dir), console
        self.log_event = log_event or (lambda message: None)
        self._owns_ray = False

    def built(self, part: str) -> bool:
        """Whether ``part`` (``"engine"``, ``"learner"``, ...) has been built."""
        return part in self.__dict__

    def _start_ray(self) -> None:
        from r3_rl.gpu_layout import gpus_for_local_ray
        from r3_rl.ray_runtime import start_ray

        self._owns_ray = start_ray(self.recipe.ray, gpus_for_local_ray(self.recipe)) or self._owns_ray

    # ------------------------------------------------------------------ sampling
    @cached_property
    def policy(self) -> Any:
        """The policy with its initial weights (``policy.kind``), warm-started when its family does that."""
        policy = build_policy(self.recipe)
        policy.warm_start(self.recipe, self.run_dir / "warmstart", self.console)
        return policy

    @cached_property
    def engine(self) -> Any:
        """Who samples the step's tasks (``rollout.backend``), started with the policy's current weights."""
        if self.recipe.rollout.backend == "ray":
            self._start_ray()
        return build_engine(self.recipe, self.policy, self.log_event)

    # ------------------------------------------------------------------ rewards
    def _reward_set(self, specs: list[Any]) -> RewardSet:
        rewards = RewardSet.from_specs(reward_specs(self.recipe, specs))
        if rewards.needs_policy:  # self-consistency asks the live policy about its own images
            rewards.bind_policy(self.policy)
        return rewards

    @cached_property
    def task_rewards(self) -> Scorer:
        """Where the task reward is computed: in this process, or on ``rollout.reward_workers`` Ray actors."""
        r = self.recipe
        if not r.rollout.reward_workers:
            return self._reward_set(r.rewards.task)
        from r3_rl.rollout.ray_rewards import RayRewardSet

        self._start_ray()
        return RayRewardSet(reward_specs(r, r.rewards.task), r.rollout.reward_workers,
                            r.rollout.threads_per_worker, self.log_event, r.ray, r.rollout.max_task_retries,
                            r.rollout.gpus_per_reward_worker)

    @cached_property
    def eval_rewards(self) -> RewardSet:
        return self._reward_set(self.recipe.rewards.eval)

    @cached_property
    def failures(self) -> FailureBudget:
        """Reward failures of the rollout, against ``rewards.max_failure_fraction``."""
        return FailureBudget(self.recipe.rewards.max_failure_fraction)

    @cached_property
    def scorer(self) -> StageScorer:
        from dataclasses import fields

        from r3_rl.rewards.compose import CriticRule

        rw = self.recipe.rewards
        rule = CriticRule(**{f.name: getattr(rw.reflect, f.name) for f in fields(CriticRule)})  # keys named alike
        return StageScorer(self.task_rewards, rw.format_weight, rw.reason_format, rw.reflect_format,
                           rw.correct_threshold, rule, self._reward_set(rw.reflect.extra), rw.reflect.correct_part,
                           failures=self.failures)

    # ------------------------------------------------------------------ learning
    @cached_property
    def reference(self) -> Any:
        """The frozen KL reference, or ``None`` (LoRA: the learner's base model with adapters off).  With
        ``learner.ranks > 1`` each rank computes with its own; the trainer's only starts theirs and goes into
        checkpoints, so it stays in host memory (on the trainer's GPU it held a model's worth for the whole run)."""
        if not needs_frozen_reference(self.recipe):
            return None
        return self.policy.frozen_copy(on_host=self.recipe.learner.ranks > 1)

    @cached_property
    def algorithm(self) -> Any:
        return load_algorithm(self.recipe)

    @cached_property
    def learner(self) -> Any:
        if self.recipe.learner.ranks > 1:
            self._start_ray()
        return build_learner(self.policy, self.reference, self.recipe, self.algorithm)

    # ------------------------------------------------------------------ shutdown
    def close(self) -> None:
        """Stop what was started -- reward actors, rollout workers, learner ranks, then a Ray this started;
        safe to call twice."""
        for part in ("task_rewards", "engine", "learner"):
            obj = self.__dict__.get(part)
            if obj is not None and hasattr(obj, "close"):
                obj.close()
        if self._owns_ray:
            from r3_rl.ray_runtime import stop_ray

            self._owns_ray = stop_ray(True)
