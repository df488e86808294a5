"""Rollout (and optionally reward scoring) on Ray actors.

Where it fits: :func:`r3_rl.rollout.engine.build_engine` returns a :class:`RayEngine` when the recipe
says ``rollout.backend: ray``.  The trainer's loop is unchanged: it asks for a step's tasks, scores each
task's trees as they arrive, trains, and calls :meth:`RayEngine.sync` with the new weights.

Why this shape:
* Work units are the seeded :class:`RolloutTask` s of :mod:`r3_rl.rollout.tree_rl`.  A task's trees are
  a pure function of (weights, task), so a task lost with a dead actor is simply run again -- on a fresh
  actor with the same weights -- and gives the very same trees: nothing lost, nothing duplicated.
* Weights go through the object store once per sync (``ray.put``) and every worker loads them before
  it samples again; every node is stamped with the version it was sampled with, and the learner
  refuses stale data (``learner.max_staleness``).
* Actors are restarted by this engine, not by Ray (``max_restarts=0``): a Ray-restarted actor would
  come back with its initial weights, silently sampling with the wrong policy.

Gotchas: a Ray started here (no ``ray.address``) is shut down by :meth:`close`; a Ray the caller
already started (tests, notebooks) or a cluster joined with ``ray.address: auto`` is left running,
only our actors are killed.
"""
from __future__ import annotations

import os
from collections import deque
from typing import Any, Callable, Iterator

import torch

from r3_rl.errors import UserError
from r3_rl.policy.base import Policy
from r3_rl.ray_runtime import actor_died, cpu_state, kill_actors, start_ray, stop_ray
from r3_rl.rewards.base import RewardSample
from r3_rl.rewards.reward_set import RewardSet, ScoredSample
from r3_rl.rollout.tree_rl import RolloutTask, StageSampling, run_task
from r3_rl.trajectory import Tree


def worker_policy(recipe: Any) -> Policy:
    """The policy a worker samples with: the recipe's architecture (+ LoRA adapters), weights synced later."""
    from r3_rl.policy.registry import build_policy

    policy = build_policy(recipe)
    if recipe.learner.lora is not None:
        from r3_rl.learner.lora import apply_lora

        apply_lora(policy, recipe.learner.lora)
    return policy


class RolloutWorker:
    """A Ray actor holding one copy of the policy for sampling."""

    def __init__(self, recipe_data: dict[str, Any], threads: int) -> None:
        from r3_rl.config import Recipe

        if threads:
            torch.set_num_threads(threads)
        recipe = Recipe.model_validate(recipe_data)
        self.policy = worker_policy(recipe)
        self.stop_phrase = recipe.templates.stop_phrase

    def load(self, state: dict[str, Any], version: int) -> int:
        self.policy.load_state_dict(state, version)
        return version

    def run(self, task: RolloutTask, sampling: StageSampling) -> list[Tree]:
        with torch.no_grad():
            return run_task(self.policy, task, sampling, self.stop_phrase)

    def pid(self) -> int:
        return os.getpid()


class RewardWorker:
    """A Ray actor holding a reward set (its models are loaded once, in the actor)."""

    def __init__(self, specs: list[dict[str, Any]], threads: int) -> None:
        if threads:
            torch.set_num_threads(threads)
        self.rewards = RewardSet.from_specs(specs)

    def score(self, samples: list[RewardSample]) -> list[ScoredSample]:
        return self.rewards.score(samples)


class RayEngine:
    """``rollout.workers`` Ray actors sampling tasks; dead actors are replaced and their task reissued."""

    def __init__(self, recipe: Any, policy: Policy, log_event: Callable[[str], None]) -> None:
        import ray

        r = recipe.rollout
        self._owns_ray = start_ray(recipe.ray)
        self._recipe_data = recipe.model_dump(mode="json")
        self._threads = r.threads_per_worker or max(1, int(r.cpus_per_worker))
        self._actor_cls = ray.remote(RolloutWorker).options(num_cpus=r.cpus_per_worker, num_gpus=r.gpus_per_worker,
                                                            max_restarts=0, max_task_retries=0)
        self.log_event = log_event
        self.max_reissues = r.max_task_retries
        self.restarts = 0
        self._weights: Any = None
        self._version = policy.version
        self.workers: list[Any] = []
        try:
            self.workers = [self._actor_cls.remote(self._recipe_data, self._threads) for _ in range(r.workers)]
            self.sync(policy)
        except BaseException:
            self.close()
            raise

    # ------------------------------------------------------------------ weights
    def sync(self, policy: Policy) -> None:
        """Put the policy's weights in the object store once; every worker loads them before sampling."""
        import ray

        self._weights, self._version = ray.put(cpu_state(policy.state_dict())), policy.version
        refs = [w.load.remote(self._weights, self._version) for w in self.workers]
        for i, ref in enumerate(refs):
            try:
                ray.get(ref)
            except Exception as e:  # died between steps: its replacement loads the new weights
                if not actor_died(e):
                    raise
                self._replace(i, type(e).__name__)

    def _replace(self, index: int, why: str) -> None:
        import ray

        self.restarts += 1
        self.log_event(f"rollout worker {index} failed ({why}); restarted it with policy version {self._version}")
        kill_actors([self.workers[index]])
        fresh = self._actor_cls.remote(self._recipe_data, self._threads)
        ray.get(fresh.load.remote(self._weights, self._version))
        self.workers[index] = fresh

    # ------------------------------------------------------------------ sampling
    def run(self, tasks: list[RolloutTask], sampling: StageSampling) -> Iterator[tuple[RolloutTask, list[Tree]]]:
        """Yield ``(task, trees)`` as tasks finish; a task whose worker died runs again on its replacement."""
        import ray

        queue = deque(tasks)
        idle = deque(range(len(self.workers)))
        pending: dict[Any, tuple[int, RolloutTask]] = {}
        reissued: dict[int, int] = {}
        sampling_ref = ray.put(sampling)
        while queue or pending:
            while queue and idle:
                w, task = idle.popleft(), queue.popleft()
                pending[self.workers[w].run.remote(task, sampling_ref)] = (w, task)
            (ref,), _ = ray.wait(list(pending), num_returns=1)
            w, task = pending.pop(ref)
            try:
                trees = ray.get(ref)
            except Exception as e:
                if not actor_died(e):
                    raise
                reissued[task.index] = reissued.get(task.index, 0) + 1
                if reissued[task.index] > self.max_reissues:
                    raise RuntimeError(f"rollout: task {task.index} of step {task.step} lost its worker "
                                       f"{reissued[task.index]} times (rollout.max_task_retries="
                                       f"{self.max_reissues}); giving up") from e
                self._replace(w, type(e).__name__)
                self.log_event(f"reissued task {task.index} of step {task.step}")
                queue.appendleft(task)
                idle.append(w)
                continue
            idle.append(w)
            yield task, trees

    def worker_pids(self) -> list[int]:
        import ray

        return ray.get([w.pid.remote() for w in self.workers])

    def close(self) -> None:
        """Kill our actors; shut Ray down if this engine started it (no orphaned processes)."""
        kill_actors(self.workers)
        self.workers = []
        self._owns_ray = stop_ray(self._owns_ray)


class RayRewardSet:
    """Scores on ``rollout.reward_workers`` Ray actors; duck-types :meth:`RewardSet.score`.

    A reward actor that dies returns explicit failures for its samples (never zeros) and is replaced
    for the next call; the trainer's failure budget decides whether the run goes on.
    """

    def __init__(self, specs: list[dict[str, Any]], workers: int, threads: int, log_event: Callable[[str], None]):
        import ray

        probe = RewardSet.from_specs(specs)  # validate specs here: a bad name fails in one line, in the driver
        if probe.needs_policy:
            raise UserError("rollout.reward_workers: a task reward needs the policy (e.g. self_consistency), which "
                            "reward actors do not hold; set rollout.reward_workers: 0")
        self._specs, self._threads, self.log_event = specs, threads, log_event
        self._cls = ray.remote(RewardWorker).options(num_cpus=1, max_restarts=0, max_task_retries=0)
        self.actors = [self._cls.remote(specs, threads) for _ in range(workers)]
        self.restarts = 0

    def score(self, samples: list[RewardSample]) -> list[ScoredSample]:
        import ray

        if not samples:
            return []
        n = len(self.actors)
        chunks = [samples[i::n] for i in range(n)]
        refs = [a.score.remote(c) if c else None for a, c in zip(self.actors, chunks)]
        out: list[ScoredSample | None] = [None] * len(samples)
        for i, (ref, chunk) in enumerate(zip(refs, chunks)):
            if ref is None:
                continue
            try:
                got = ray.get(ref)
            except Exception as e:
                if not actor_died(e):
                    raise
                self.restarts += 1
                self.log_event(f"reward worker {i} failed ({type(e).__name__}); {len(chunk)} samples marked failed")
                got = [ScoredSample(total=None, failures={"reward_worker": f"reward actor died ({type(e).__name__})"})
                       for _ in chunk]
                self.actors[i] = self._cls.remote(self._specs, self._threads)
            for j, res in enumerate(got):
                out[i + j * n] = res
        return out  # type: ignore[return-value]

    def close(self) -> None:
        kill_actors(self.actors)
        self.actors = []
