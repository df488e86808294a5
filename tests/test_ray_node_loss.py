"""Lost actors in one local Ray: bounded restarts, events logged after the fact, one-line stops, no hang.

The whole-cluster scenarios (a node SIGKILLed under ``r3-rl train``) are in tests/test_ray_cluster.py;
these check the same logic in seconds: a replacement that no node can host (it asks for 64 CPUs of a
4-CPU Ray), a rollout worker dropped while its task moves to the other one, and a learner rank that
hangs mid-collective (SIGSTOP) or dies between steps.
"""
from __future__ import annotations

import copy
import os
import signal
import time
from pathlib import Path

import pytest
import torch

from conftest import tiny_overrides
from r3_rl.config import RayCfg, load_recipe
from r3_rl.ray_actors import ActorGroup, ClusterError, ReadyActor

pytestmark = pytest.mark.usefixtures("ray_session")
REPO = Path(__file__).resolve().parents[1]
FAST = RayCfg(placement_timeout_s=1.0, call_timeout_s=60.0)


def group_of(sizes: list[int], events: list[str], min_alive: int = 1) -> ActorGroup:
    """An :class:`ActorGroup` whose n-th actor asks for ``sizes[n]`` CPUs (64: no node can ever host it)."""
    import ray

    cls, left = ray.remote(ReadyActor), iter(sizes)
    return ActorGroup("rollout worker", lambda: cls.options(num_cpus=next(left)).remote(), {"CPU": 64}, FAST,
                      attempts=2, min_alive=min_alive, log_event=events.append)


@pytest.mark.timeout(180)
def test_unplaceable_replacement_is_dropped_then_the_run_stops_in_one_line() -> None:
    import ray

    events: list[str] = []
    group = group_of([1, 1, 64, 64, 64, 64], events)
    try:
        group.start(2, lambda a: a.ready.remote())
        assert sorted(group.actors) == [0, 1]
        ray.kill(group.actors[1], no_restart=True)
        t0 = time.monotonic()
        assert group.replace(1, "killed by the test", lambda a: a.ready.remote()) is False  # dropped: 1 left
        assert time.monotonic() - t0 < 15
        assert list(group.actors) == [0]
        assert events[-4:] == [
            "rollout worker 1 lost (killed by the test)",
            "rollout worker 1: restart attempt 1/2 failed: no node has 64 free CPU",
            "rollout worker 1: restart attempt 2/2 failed: no node has 64 free CPU",
            "rollout worker 1 could not be restarted: no node has 64 free CPU (2 attempts, 1 s each); continuing "
            "with 1 of 2 rollout workers"]
        ray.kill(group.actors[0], no_restart=True)
        with pytest.raises(ClusterError, match=r"^rollout worker 0 could not be restarted: no node has 64 free CPU "
                                               r"\(2 attempts, 1 s each\)$"):
            group.replace(0, "killed by the test", lambda a: a.ready.remote())
        assert not any(" 0 restarted" in e or " 1 restarted" in e for e in events)  # never claimed
    finally:
        group.close()


@pytest.mark.timeout(180)
def test_restart_is_logged_once_the_replacement_answers() -> None:
    import ray

    events: list[str] = []
    group = group_of([1, 64, 1], events)  # the first replacement cannot be placed, the second can
    try:
        group.start(1, lambda a: a.ready.remote())
        ray.kill(group.actors[0], no_restart=True)
        assert group.replace(0, "killed by the test", lambda a: a.ready.remote(), detail=" with policy version 3")
        assert events[-3].startswith("rollout worker 0 lost")
        assert events[-2] == "rollout worker 0: restart attempt 1/2 failed: no node has 64 free CPU"
        assert events[-1].startswith("rollout worker 0 restarted with policy version 3 on node ")
        assert events[-1].endswith("attempt 2/2)") and group.restarts == 1
        assert ray.get(group.actors[0].ready.remote(), timeout=30)  # it is really there
    finally:
        group.close()


@pytest.mark.timeout(180)
def test_initial_workers_that_cannot_be_placed_stop_in_one_line(repo: Path, tmp_path: Path) -> None:
    from r3_rl.policy.registry import build_policy
    from r3_rl.rollout.ray_engine import RayEngine

    recipe = load_recipe(repo / "recipes" / "tiny_blocks.yaml", tiny_overrides(tmp_path) + [
        "rollout.backend=ray", "rollout.workers=2", "rollout.cpus_per_worker=3", "rollout.min_workers=2",
        "ray.placement_timeout_s=2"])  # a 4-CPU Ray holds one 3-CPU worker, not two
    t0 = time.monotonic()
    with pytest.raises(ClusterError, match=r"^rollout worker [01] could not be started: no node has 3 free CPU "
                                           r"\(waited 2 s\)$"):
        RayEngine(recipe, build_policy(recipe), lambda e: None)
    assert time.monotonic() - t0 < 60


@pytest.mark.timeout(180)
def test_worker_that_cannot_be_restarted_is_dropped_and_its_task_runs_elsewhere(repo: Path, tmp_path: Path) -> None:
    """Same trees as without the loss: the lost task runs again on the surviving worker.  Enough tasks that the
    killed worker still has work after the first result (with 4 tasks, 2 in flight per worker, a loaded machine
    could finish them all before the kill, and the loss went unseen)."""
    import ray

    from r3_rl.policy.registry import build_policy
    from r3_rl.rollout.ray_engine import RayEngine
    from r3_rl.rollout.tree_rl import stage_sampling
    from test_rollout_ray import assert_same_trees, local_trees, step_tasks

    recipe = load_recipe(repo / "recipes" / "tiny_blocks.yaml", tiny_overrides(tmp_path) + [
        "tree.group_size=2", "rollout.groups_per_task=1", "rollout.backend=ray", "rollout.workers=2",
        "rollout.threads_per_worker=1", "rollout.cpus_per_worker=2", "ray.placement_timeout_s=1"])
    policy = build_policy(recipe)
    tasks = step_tasks(recipe, policy, step=1, n_prompts=6, n_parents=6)
    events: list[str] = []
    engine = RayEngine(recipe, policy, events.append)
    engine.group.need = {"CPU": 64}  # from now on a replacement asks for more than any node has
    engine.group.factory = lambda: ray.remote(ReadyActor).options(num_cpus=64).remote()
    try:
        got = []
        for i, (task, trees) in enumerate(engine.run(tasks, stage_sampling(recipe))):
            got.append((task.index, trees))
            if i == 0:
                ray.kill(engine.workers[-1], no_restart=True)
        assert sorted(i for i, _ in got) == [t.index for t in tasks]
        assert len(engine.workers) == 1 and engine.restarts == 0
        assert any("continuing with 1 of 2 rollout workers" in e for e in events)
        assert_same_trees(local_trees(recipe, policy, tasks), [t for _, ts in sorted(got, key=lambda x: x[0])
                                                               for t in ts])
    finally:
        engine.close()


@pytest.mark.timeout(300)
def test_worker_that_hangs_has_its_tasks_reissued_after_the_call_timeout(repo: Path, tmp_path: Path) -> None:
    """A worker frozen (SIGSTOP) with two tasks sent to it: after ``ray.call_timeout_s`` the task it runs is
    declared lost, the worker replaced once, and both its tasks run again elsewhere -- the very same trees."""
    from r3_rl.policy.registry import build_policy
    from r3_rl.rollout.engine import run_ordered
    from r3_rl.rollout.ray_engine import TASKS_PER_WORKER, RayEngine
    from r3_rl.rollout.tree_rl import stage_sampling
    from test_rollout_ray import assert_same_trees, local_trees, step_tasks

    recipe = load_recipe(repo / "recipes" / "tiny_blocks.yaml", tiny_overrides(tmp_path) + [
        "tree.group_size=2", "rollout.groups_per_task=1", "rollout.backend=ray", "rollout.workers=2",
        "rollout.threads_per_worker=1", "rollout.cpus_per_worker=1", "ray.call_timeout_s=120"])
    policy = build_policy(recipe)
    tasks = step_tasks(recipe, policy, step=1, n_prompts=2, n_parents=2)
    assert len(tasks) == 2 * TASKS_PER_WORKER  # so each worker is sent two at once
    events: list[str] = []
    engine = RayEngine(recipe, policy, events.append)
    # the workers' set-up (and the replacement's) keeps the recipe's 120 s: a fresh worker importing torch on a
    # loaded 2-core machine once took over 15 s; the rollout tasks' timeout, under test here, is 15 s
    engine.call_timeout_s = 15
    frozen = engine.worker_pids()[1]
    os.kill(frozen, signal.SIGSTOP)
    try:
        t0 = time.monotonic()
        trees = run_ordered(engine, tasks, stage_sampling(recipe))
        assert 15 <= time.monotonic() - t0 < 150
        assert engine.restarts == 1 and frozen not in engine.worker_pids()
        lost = [e for e in events if " lost (" in e]
        assert len(lost) == 1 and "did not finish within 15 s (ray.call_timeout_s)" in lost[0], events
        assert len([e for e in events if e.startswith("reissued task")]) == 2, events  # the one it ran, the one queued
        assert_same_trees(local_trees(recipe, policy, tasks), trees)
    finally:
        try:
            os.kill(frozen, signal.SIGCONT)
        except ProcessLookupError:
            pass
        engine.close()


# ----------------------------------------------------------------------------- learner ranks
def ranked(tmp_path: Path, *extra: str):
    pytest.importorskip("deepspeed")
    from learner_helpers import sample_items

    from r3_rl.learner.build import build_learner
    from r3_rl.policy.registry import build_policy

    recipe = load_recipe(REPO / "recipes" / "tiny_blocks.yaml", tiny_overrides(tmp_path) + [
        "learner.backend=deepspeed", "learner.micro_batch_size=2", "learner.ranks=2", *extra])
    policy = build_policy(recipe)
    return build_learner(policy, policy.frozen_copy(), recipe), sample_items(policy)


def rank_pid(rank) -> int:
    import ray

    return ray.get(rank.__ray_call__.remote(lambda self: os.getpid()), timeout=30)


@pytest.mark.timeout(240)
def test_learner_rank_that_hangs_mid_collective_stops_the_step_in_one_line(tmp_path: Path) -> None:
    """Rank 1 frozen (SIGSTOP): rank 0's collective times out (ray.collective_timeout_s), the step is abandoned.

    Without the process group's timeout rank 0 would wait for ever and this test would hit its own timeout.
    """
    # the ranks' start and set-up keep the recipe's 120 s call timeout: a fresh rank importing torch and DeepSpeed
    # on a loaded 2-core machine can take more than 10 s; the learner step's 10 s, under test here, is set after
    learner, items = ranked(tmp_path, "ray.collective_timeout_s=5")
    learner.call_timeout_s = 10
    pid = rank_pid(learner.ranks[1])
    try:
        assert "learner/loss" in learner.step(copy.deepcopy(items))  # healthy first
        os.kill(pid, signal.SIGSTOP)
        t0 = time.monotonic()
        with pytest.raises(ClusterError, match=r"^learner rank 1 did not answer during the learner step while another "
                                               r"rank failed \(.*\); the learner step was abandoned and the ranks "
                                               r"stopped$"):
            learner.step(copy.deepcopy(items))
        assert time.monotonic() - t0 < 5 + 10 + 30
        assert learner.ranks == []
    finally:
        for sig in (signal.SIGCONT, signal.SIGKILL):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        learner.close()


@pytest.mark.timeout(300)
def test_learner_rank_lost_between_steps_stops_the_next_step_in_one_line(tmp_path: Path) -> None:
    import ray

    learner, items = ranked(tmp_path)
    try:
        before = {k: v.clone() for k, v in learner.policy.state_dict().items()}
        ray.kill(learner.ranks[1], no_restart=True)
        t0 = time.monotonic()
        with pytest.raises(ClusterError, match=r"^learner rank 1 was lost during the learner step \(.*\); the learner "
                                               r"step was abandoned and the ranks stopped$"):
            learner.step(copy.deepcopy(items))
        assert time.monotonic() - t0 < 60
        assert all(torch.equal(before[k], v) for k, v in learner.policy.state_dict().items())  # nothing half-applied
    finally:
        learner.close()


def test_min_workers_above_workers_is_a_one_line_recipe_error(tmp_path: Path) -> None:
    from r3_rl.errors import UserError

    with pytest.raises(UserError, match=r"key 'rollout': .*min_workers=3 must be <= workers=2"):
        load_recipe(REPO / "recipes" / "tiny_blocks.yaml", tiny_overrides(tmp_path) + [
            "rollout.workers=2", "rollout.min_workers=3"])


def test_token_authentication_refusal_is_named_in_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    """Ray 2.60 refuses a driver without the cluster's token; the error must say what to set."""
    import ray

    from r3_rl.errors import UserError
    from r3_rl.ray_runtime import start_ray

    def refused(**kw):
        try:
            raise RuntimeError("Failed to connect to GCS. ray.exceptions.AuthenticationError: InvalidAuthToken")
        except RuntimeError as e:
            raise ConnectionError("Failed to connect to Ray cluster at 10.0.0.1:6379") from e

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", refused)
    with pytest.raises(UserError, match=r"^ray.address: cannot join '10.0.0.1:6379' \(Failed to connect to Ray cluster "
                                        r"at 10.0.0.1:6379\); the cluster uses token authentication: set "
                                        r"RAY_AUTH_MODE=token with its token in ~/.ray/auth_token$"):
        start_ray(RayCfg(address="10.0.0.1:6379"))
