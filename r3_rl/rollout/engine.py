"""Rollout engines: who runs the step's :class:`~r3_rl.rollout.tree_rl.RolloutTask` s.

Every engine has the same three calls, so the trainer does not know where sampling happens:

* ``run(tasks, sampling)`` yields ``(task, trees)`` as each task finishes (in any order), so the
  trainer can score a task's images while the other tasks are still being sampled;
* ``sync(policy)`` makes the next ``run`` sample with the policy's current weights and version;
* ``close()`` releases workers (and the Ray runtime, if this engine started it).

:class:`LocalEngine` runs tasks in-process with the trainer's own policy (debugging, the embedded
default); :class:`r3_rl.rollout.ray_engine.RayEngine` runs them on Ray actors.  Because every task
carries its own seed and the trees a task yields depend only on (weights, task), both engines give
the same trajectories for the same recipe -- tested in ``tests/test_rollout_ray.py``.
"""
from __future__ import annotations

from typing import Any, Callable, Iterator, Protocol

from r3_rl.policy.base import Policy
from r3_rl.rollout.tree_rl import RolloutTask, StageSampling, run_task
from r3_rl.trajectory import Tree


class RolloutEngine(Protocol):
    restarts: int  # workers restarted after a failure (logged as rollout/worker_restarts)

    def run(self, tasks: list[RolloutTask], sampling: StageSampling) -> Iterator[tuple[RolloutTask, list[Tree]]]:
        ...

    def sync(self, policy: Policy, trainable_only: bool = False) -> None:
        """Workers sample with ``policy``'s weights from now on; ``trainable_only``: only its trainable weights
        changed since the last sync (after a learner step), so an engine may send those alone."""
        ...

    def close(self) -> None:
        ...


class LocalEngine:
    """In-process rollout with the trainer's policy: nothing to sync, nothing to restart."""

    def __init__(self, policy: Policy, stop_phrase: str) -> None:
        self.policy = policy
        self.stop_phrase = stop_phrase
        self.restarts = 0

    def run(self, tasks: list[RolloutTask], sampling: StageSampling) -> Iterator[tuple[RolloutTask, list[Tree]]]:
        for task in tasks:
            yield task, run_task(self.policy, task, sampling, self.stop_phrase)

    def sync(self, policy: Policy, trainable_only: bool = False) -> None:
        self.policy = policy  # the same object the learner updates: already current

    def close(self) -> None:
        pass


def build_engine(recipe: Any, policy: Policy, log_event: Callable[[str], None]) -> RolloutEngine:
    """The engine ``rollout.backend`` selects; a Ray engine starts with ``policy``'s weights."""
    if recipe.rollout.backend == "ray":
        from r3_rl.rollout.ray_engine import RayEngine

        return RayEngine(recipe, policy, log_event)
    return LocalEngine(policy, recipe.templates.stop_phrase)


def run_ordered(engine: RolloutEngine, tasks: list[RolloutTask], sampling: StageSampling,
                on_task: Callable[[list[Tree]], None] | None = None) -> list[Tree]:
    """All trees of ``tasks`` in task order, whatever order the engine finished them in.

    ``on_task`` is called with each task's trees as soon as it finishes (the trainer scores there).
    Each task must come back exactly once: a lost, duplicated or unknown task is a bug, never silently tolerated.
    """
    done: dict[int, list[Tree]] = {}
    expected = {t.index for t in tasks}
    for task, trees in engine.run(tasks, sampling):
        if task.index not in expected:
            raise RuntimeError(f"rollout: task {task.index} of step {task.step} came back but was never sent "
                               f"(sent: {sorted(expected)})")
        if task.index in done:
            raise RuntimeError(f"rollout: task {task.index} of step {task.step} came back twice")
        done[task.index] = trees
        if on_task is not None:
            on_task(trees)
    missing = [t.index for t in tasks if t.index not in done]
    if missing:
        raise RuntimeError(f"rollout: tasks {missing} of step {tasks[0].step} never came back")
    return [tree for t in sorted(tasks, key=lambda t: t.index) for tree in done[t.index]]
