"""Rollout on Ray actors (reward actors: :mod:`r3_rl.rollout.ray_rewards`).

Where it fits: :func:`r3_rl.rollout.engine.build_engine` returns a :class:`RayEngine` when the recipe
says ``rollout.backend: ray``.  The trainer's loop is unchanged: it asks for a step's tasks, scores each
task's trees as they arrive, trains, and calls :meth:`RayEngine.sync` with the new weights.

Why this shape:
* Work units are the seeded :class:`RolloutTask` s of :mod:`r3_rl.rollout.tree_rl`.  A task's trees are
  a pure function of (weights, task), so a task lost with a dead actor is simply run again -- on a fresh
  actor with the same weights -- and gives the very same trees: nothing lost, nothing duplicated.
* Weights go through the object store once per sync (``ray.put``, as numpy bytes: no private copies,
  :func:`r3_rl.ray_runtime.pack_state`) and every worker loads them before it samples again; every node is
  stamped with the version it was sampled with, and the learner refuses stale data (``learner.max_staleness``).
  After a learner step only the weights that train travel (LoRA: the adapters, not the frozen base); each
  worker keeps the last full state it loaded, and a replacement loads that first, then the update.
* Actors are restarted by this engine, not by Ray (``max_restarts=0``): a Ray-restarted actor would
  come back with its initial weights, silently sampling with the wrong policy.  A restart is bounded
  (:class:`r3_rl.ray_actors.ActorGroup`: ``rollout.max_task_retries`` attempts, ``ray.placement_timeout_s``
  each); a worker that cannot be restarted is dropped and the run carries on with the others down to
  ``rollout.min_workers``, then stops with one line.  Every wait has a timeout (``ray.call_timeout_s``).
* Each worker holds up to two tasks (``TASKS_PER_WORKER``): the second waits in the actor's queue and starts
  when the first ends, so the worker does not idle through the driver's round trip.  Its timeout clock
  starts then, and a worker lost with two tasks is replaced once and both tasks run again.

Gotchas: a Ray started here (no ``ray.address``) is shut down by :meth:`close`; a Ray the caller
already started (tests, notebooks) or a cluster joined with ``ray.address: auto`` is left running,
only our actors are killed.
"""
from __future__ import annotations

import os
import time
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch

from r3_rl.policy.base import Policy
from r3_rl.gpu_layout import actor_recipe_data, gpus_for_local_ray
from r3_rl.ray_actors import ActorGroup, ActorLost, ClusterError, ReadyActor, get_within
from r3_rl.ray_runtime import pack_state, start_ray, stop_ray, unpack_state
from r3_rl.rollout.tree_rl import RolloutTask, StageSampling, run_task
from r3_rl.trajectory import Tree


def worker_policy(recipe: Any) -> Policy:
    """The policy a worker samples with: the recipe's architecture (+ LoRA adapters), weights synced later."""
    from r3_rl.policy.registry import build_policy

    policy = build_policy(recipe)
    if recipe.learner.lora is not None:
        from r3_rl.learner.lora import adapters_in_base_dtype, apply_lora

        apply_lora(policy, recipe.learner.lora, adapters_in_base_dtype(recipe.learner))
    return policy


# A worker runs its tasks one after another.  With a second task queued behind the one it runs, it starts
# that task the moment the first ends, instead of after a round trip through the driver (result back, next
# task out): on 2 cores the round trip cost a 1-worker step about 13% (benchmarks/rollout_throughput.py,
# session 33; 5-8% with two in flight).
TASKS_PER_WORKER = 2


@dataclass
class _InFlight:
    """A task sent to a worker: the slot and the actor it went to (a slot's actor changes when it is replaced),
    and when its clock started (``ray.call_timeout_s``): when it was sent, or when the task ahead of it ended."""

    slot: int
    actor: Any
    task: RolloutTask
    since: float


class RolloutWorker(ReadyActor):
    """A Ray actor holding one copy of the policy for sampling (built on the first :meth:`load`)."""

    def __init__(self, recipe_data: dict[str, Any], threads: int) -> None:
        self.recipe_data, self.threads = recipe_data, threads  # cheap: ready() then answers once placed
        self.policy: Policy | None = None
        self.full_id = -1  # which full state this worker holds

    def load(self, full: list[Any], full_id: int, update: Any, version: int) -> int:
        """Weights of ``version``: the full state (``[ObjectRef]``: fetched only when this worker does not hold
        ``full_id`` yet), then ``update``, the trainable weights since (or None)."""
        if self.policy is None:
            from r3_rl.config import Recipe

            if self.threads:
                torch.set_num_threads(self.threads)
            recipe = Recipe.model_validate(self.recipe_data)
            self.policy, self.stop_phrase = worker_policy(recipe), recipe.templates.stop_phrase
        if full_id != self.full_id:
            import ray

            self.policy.load_state_dict(unpack_state(ray.get(full[0])))
            self.full_id = full_id
        if update is not None:
            self.policy.load_state_dict(unpack_state(update), partial=True)
        self.policy.version = version
        return version

    def run(self, task: RolloutTask, sampling: StageSampling) -> list[Tree]:
        assert self.policy is not None, "load() the weights first"
        with torch.no_grad():
            return run_task(self.policy, task, sampling, self.stop_phrase)

    def pid(self) -> int:
        return os.getpid()


class RayEngine:
    """``rollout.workers`` Ray actors sampling tasks; lost actors are replaced (or dropped) and their task reissued."""

    def __init__(self, recipe: Any, policy: Policy, log_event: Callable[[str], None]) -> None:
        import ray

        r = recipe.rollout
        self._owns_ray = start_ray(recipe.ray, gpus_for_local_ray(recipe))
        recipe_data = actor_recipe_data(recipe)
        threads = r.threads_per_worker or max(1, int(r.cpus_per_worker))
        actor_cls = ray.remote(RolloutWorker).options(num_cpus=r.cpus_per_worker, num_gpus=r.gpus_per_worker,
                                                      max_restarts=0, max_task_retries=0)
        self.log_event = log_event
        self.max_reissues = r.max_task_retries
        self.call_timeout_s = recipe.ray.call_timeout_s
        self._full: Any = None  # the last full state put (a ref), its number, and the trainable weights since
        self._full_id, self._update = -1, None
        self.group = ActorGroup("rollout worker", lambda: actor_cls.remote(recipe_data, threads),
                                {"CPU": r.cpus_per_worker, "GPU": r.gpus_per_worker}, recipe.ray,
                                attempts=r.max_task_retries, min_alive=r.min_workers, log_event=log_event)
        try:
            self._put(policy)
            self.group.start(r.workers, self._load)
            log_event(f"rollout: {len(self.group.actors)} Ray workers ready ({self.group.describe()})")
        except BaseException:
            self.close()
            raise

    @property
    def workers(self) -> list[Any]:
        return list(self.group.actors.values())

    @property
    def restarts(self) -> int:
        return self.group.restarts

    # ------------------------------------------------------------------ weights
    def sync(self, policy: Policy, trainable_only: bool = False) -> None:
        """Put the policy's weights in the object store once; every worker loads them before sampling.

        ``trainable_only`` (after a learner step, which changes nothing else): only the weights that train are
        put, when they are at most half the state -- LoRA r 64 on Janus-Pro-7B: 252 MB, not 14.8 GB."""
        self._put(policy, trainable_only)
        refs = [(i, self._load(w)) for i, w in self.group.items()]
        deadline = time.monotonic() + self.call_timeout_s
        lost: list[tuple[int, str]] = []
        for i, ref in refs:
            try:
                get_within(ref, deadline - time.monotonic(), "loading the weights")
            except ActorLost as e:  # died between steps: its replacement loads the new weights
                lost.append((i, str(e)))
        for i, why in lost:  # after every wait: a slow replacement must not use up the others' shared deadline
            self._replace(i, why)

    def _put(self, policy: Policy, trainable_only: bool = False) -> None:
        import ray

        self._version = policy.version
        self._update = None  # dropped before the put: the old and the new weights are never in the store together
        # sized before anything is gathered: a full fine-tune under ZeRO-3 gathered and copied every weight for an
        # update it then dropped, and gathered them all again below (three host copies of the model at once)
        if trainable_only and self._full is not None and \
                2 * policy.weight_nbytes(trainable_only=True) <= policy.weight_nbytes():
            self._update = ray.put(pack_state(policy.trainable_state_dict()))
            return
        self._full = None  # likewise
        self._full, self._full_id = ray.put(pack_state(policy.state_dict())), self._full_id + 1

    def _load(self, worker: Any) -> Any:
        return worker.load.remote([self._full], self._full_id, self._update, self._version)

    def _replace(self, index: int, why: str) -> bool:
        """A fresh worker with the current weights in slot ``index``; False if none could be started."""
        return self.group.replace(index, why, self._load, detail=f" with policy version {self._version}")

    # ------------------------------------------------------------------ sampling
    def run(self, tasks: list[RolloutTask], sampling: StageSampling) -> Iterator[tuple[RolloutTask, list[Tree]]]:
        """Yield ``(task, trees)`` as tasks finish; a task whose worker was lost runs again on another worker."""
        import ray

        queue = deque(tasks)
        pending: dict[Any, _InFlight] = {}
        reissued: dict[int, int] = {}
        sampling_ref = ray.put(sampling)
        while queue or pending:
            self._send(queue, pending, sampling_ref)
            oldest = min(pending, key=lambda ref: pending[ref].since)
            wait_s = pending[oldest].since + self.call_timeout_s - time.monotonic()
            done, _ = ray.wait(list(pending), num_returns=1, timeout=max(0.0, wait_s))
            ref = done[0] if done else oldest
            job = pending.pop(ref)
            what = f"task {job.task.index} of step {job.task.step}"
            try:
                if not done:
                    raise ActorLost(f"{what} did not finish within {self.call_timeout_s:g} s (ray.call_timeout_s)")
                trees = get_within(ref, self.call_timeout_s, what)  # ready: returns at once
            except ActorLost as e:
                reissued[job.task.index] = reissued.get(job.task.index, 0) + 1
                if reissued[job.task.index] > self.max_reissues:
                    raise ClusterError(f"rollout: {what} lost its worker {reissued[job.task.index]} times "
                                       f"(rollout.max_task_retries={self.max_reissues}); last: {e}") from None
                if self.group.actors.get(job.slot) is job.actor:  # the first of its tasks to report the loss
                    self._replace(job.slot, str(e))
                self.log_event(f"reissued {what}")
                queue.appendleft(job.task)
                continue
            now = time.monotonic()
            for queued in pending.values():  # the worker starts its queued task now: its clock starts too
                if queued.actor is job.actor:
                    queued.since = now
            yield job.task, trees

    def _send(self, queue: deque[RolloutTask], pending: dict[Any, _InFlight], sampling_ref: Any) -> None:
        """Give every live worker a task, then a second one queued behind it (``TASKS_PER_WORKER``) while there
        is work left for every worker: at a step's tail a task queued behind a busy worker would wait while
        another worker idles."""
        workers = list(self.group.items())
        load = {slot: 0 for slot, _ in workers}
        for job in pending.values():
            if self.group.actors.get(job.slot) is job.actor:  # tasks on a lost actor hold no place
                load[job.slot] += 1
        for depth in range(1, TASKS_PER_WORKER + 1):
            if depth > 1 and len(queue) < len(workers):
                return
            for slot, actor in workers:
                if queue and load[slot] < depth:
                    task = queue.popleft()
                    pending[actor.run.remote(task, sampling_ref)] = _InFlight(slot, actor, task, time.monotonic())
                    load[slot] += 1

    def worker_pids(self) -> list[int]:
        return [get_within(w.pid.remote(), self.call_timeout_s, "pid") for w in self.workers]

    def close(self) -> None:
        """Kill our actors; shut Ray down if this engine started it (no orphaned processes).  The weights it put are
        released too: a Ray the caller keeps (a notebook, a sweep) would otherwise pin a policy per closed run."""
        self.group.close()
        self._full = self._update = None
        self._owns_ray = stop_ray(self._owns_ray)
