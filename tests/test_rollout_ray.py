"""Ray rollout: same trajectories as local rollout, weight sync, killed actors, reward-actor failures, shutdown."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import tiny_overrides
from r3_rl.config import load_recipe
from r3_rl.policy.registry import build_policy
from r3_rl.rewards.base import RewardSample
from r3_rl.rollout.buffer import BufferEntry
from r3_rl.rollout.engine import LocalEngine, run_ordered
from r3_rl.rollout.tree_rl import plan_tasks
from r3_rl.rollout.tree_rl import stage_sampling

pytestmark = pytest.mark.usefixtures("ray_session")


@pytest.fixture(scope="module")
def recipe(repo: Path, tmp_path_factory: pytest.TempPathFactory):
    tmp = tmp_path_factory.mktemp("ray")
    r = load_recipe(repo / "recipes" / "tiny_blocks.yaml", tiny_overrides(tmp) + [
        "tree.group_size=3", "rollout.groups_per_task=1", "rollout.backend=ray", "rollout.workers=2",
        "rollout.threads_per_worker=1"])
    return r


@pytest.fixture(scope="module")
def policy(recipe):
    return build_policy(recipe)


def step_tasks(recipe, policy, step: int, n_prompts: int = 3, n_parents: int = 3):
    """A step's tasks with both kinds: A-groups on fresh prompts and BC-groups on parents sampled before."""
    from r3_rl.data import PromptSource

    src = PromptSource(recipe)
    prompts = src.next_batch(n_prompts + n_parents)
    first = run_ordered(LocalEngine(policy, recipe.templates.stop_phrase),
                        plan_tasks(0, 99, prompts[n_prompts:], [], 1, 1), stage_sampling(recipe))
    parents = [BufferEntry(prompt=t.prompt, image=t.nodes["g0"].image, image_tokens=t.nodes["g0"].image_tokens,
                           reward=0.0, correct=False, round=0, source=t.id) for t in first]
    return plan_tasks(step, recipe.seed, prompts[:n_prompts], parents, recipe.tree.group_size,
                      recipe.rollout.groups_per_task)


def local_trees(recipe, policy, tasks):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the workers' thread count: same float reductions, same samples
    try:
        return run_ordered(LocalEngine(policy, recipe.templates.stop_phrase), tasks, stage_sampling(recipe))
    finally:
        torch.set_num_threads(threads)


def assert_same_trees(a, b) -> None:
    assert [t.id for t in a] == [t.id for t in b]
    for ta, tb in zip(a, b):
        assert list(ta.nodes) == list(tb.nodes)
        for na, nb in zip(ta.nodes.values(), tb.nodes.values()):
            assert (na.stage, na.text, na.policy_version, na.group_id) == (nb.stage, nb.text, nb.policy_version,
                                                                           nb.group_id)
            assert na.image_tokens == nb.image_tokens
            if na.image is not None:
                assert np.array_equal(na.image, nb.image)
            if na.segment is not None:
                assert na.segment.token_ids == nb.segment.token_ids
                np.testing.assert_allclose(na.segment.logprobs, nb.segment.logprobs, atol=1e-5)


@pytest.fixture(scope="module")
def engine(recipe, policy):
    from r3_rl.rollout.ray_engine import RayEngine

    events: list[str] = []
    eng = RayEngine(recipe, policy, events.append)
    eng.events = events
    yield eng
    eng.close()


def test_same_seeds_same_trajectories_local_and_ray(recipe, policy, engine) -> None:
    tasks = step_tasks(recipe, policy, step=1)
    assert {t.kind for t in tasks} == {"A", "BC"} and len(tasks) == 6
    ray_trees = run_ordered(engine, tasks, stage_sampling(recipe))
    assert len(ray_trees) == 6 and sum(len(t.nodes) for t in ray_trees) > 6 * 3
    assert_same_trees(local_trees(recipe, policy, tasks), ray_trees)


def test_new_weights_reach_every_worker_before_it_samples(recipe, policy, engine) -> None:
    import copy

    updated = copy.deepcopy(policy)
    with torch.no_grad():
        for p in updated.model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    updated.version = policy.version + 1
    engine.sync(updated)
    try:
        tasks = step_tasks(recipe, policy, step=2)
        ray_trees = run_ordered(engine, tasks, stage_sampling(recipe))
        assert {n.policy_version for t in ray_trees for n in t.nodes.values() if n.segment is not None} == {
            updated.version}
        assert_same_trees(local_trees(recipe, updated, tasks), ray_trees)
        assert not _same_tokens(local_trees(recipe, policy, tasks), ray_trees)  # the old weights sample otherwise
    finally:
        engine.sync(policy)


def _same_tokens(a, b) -> bool:
    return all(na.segment is None or na.segment.token_ids == nb.segment.token_ids
               for ta, tb in zip(a, b) for na, nb in zip(ta.nodes.values(), tb.nodes.values()))


def test_killed_worker_is_restarted_and_its_task_reissued(recipe, policy, engine) -> None:
    import ray

    tasks = step_tasks(recipe, policy, step=3)
    before = engine.restarts
    old_pids = set(engine.worker_pids())
    got = []
    for i, (task, trees) in enumerate(engine.run(tasks, stage_sampling(recipe))):
        got.append((task.index, trees))
        if i == 0:  # mid-step: the other worker still has a task in flight
            for w in list(engine.workers):
                ray.kill(w, no_restart=True)
    indices = [i for i, _ in got]
    assert sorted(indices) == [t.index for t in tasks]  # none lost, none twice
    assert engine.restarts - before == 2  # both killed workers had more work, so both were replaced
    assert any("restarted" in e for e in engine.events) and any("reissued task" in e for e in engine.events)
    assert not old_pids & set(engine.worker_pids())
    trees = [t for _, ts in sorted(got, key=lambda x: x[0]) for t in ts]
    assert_same_trees(local_trees(recipe, policy, tasks), trees)


DYING_REWARD = '''
import os
from pathlib import Path
MARK = Path(__file__).with_suffix(".die")

def fragile(samples):
    if MARK.exists():
        os._exit(1)  # the actor process dies mid-call
    return [0.5 for _ in samples]
'''


def test_dead_reward_actor_gives_failures_not_zeros(tmp_path: Path) -> None:
    from r3_rl.rollout.ray_rewards import RayRewardSet

    path = tmp_path / "fragile.py"
    path.write_text(DYING_REWARD)
    events: list[str] = []
    rewards = RayRewardSet([{"name": f"{path}:fragile"}], workers=1, threads=1, log_event=events.append)
    samples = [RewardSample(prompt=f"p{i}", metadata={}, stage="generate", round=0,
                            image=np.zeros((4, 4, 3), np.uint8)) for i in range(3)]
    try:
        assert [s.total for s in rewards.score(samples)] == [0.5, 0.5, 0.5]
        path.with_suffix(".die").write_text("")
        died = rewards.score(samples)
        assert all(s.total is None and "reward actor lost" in s.failures["reward_worker"] for s in died)
        assert rewards.restarts == 1
        assert any("reward worker 0 lost" in e and "3 samples are marked failed" in e for e in events)
        assert "reward worker 0 restarted" in events[-1]  # logged once the replacement answered
        path.with_suffix(".die").unlink()
        assert [s.total for s in rewards.score(samples)] == [0.5, 0.5, 0.5]  # the replacement actor scores
    finally:
        rewards.close()


# ----------------------------------------------------------------------------- whole runs, in a subprocess
def ray_processes(temp_root: str) -> list[str]:
    out = subprocess.run(["ps", "-ww", "-eo", "pid,args"], capture_output=True, text=True).stdout
    return [line for line in out.splitlines() if temp_root in line and "ps -ww" not in line]


def wait_no_ray_processes(temp_root: str, timeout: float = 30.0) -> list[str]:
    deadline = time.time() + timeout
    while (left := ray_processes(temp_root)) and time.time() < deadline:
        time.sleep(0.5)
    return left


def train_cmd(repo: Path, tmp: Path, steps: int) -> list[str]:
    sets = tiny_overrides(tmp, steps=steps) + ["rollout.backend=ray", "rollout.workers=2", "warmstart.steps=0",
                                               "ray.num_cpus=2", "ray.log_to_driver=false"]
    return [sys.executable, "-m", "r3_rl.cli", "train", str(repo / "recipes" / "tiny_blocks.yaml"),
            "--run-dir", str(tmp / "run")] + [a for s in sets for a in ("--set", s)]


@pytest.fixture()
def ray_tmp():
    root = tempfile.mkdtemp(prefix="r3ray", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    yield root, {**os.environ, "RAY_TMPDIR": root}
    for line in ray_processes(root):  # never leave a stray Ray behind, even when the test failed
        os.kill(int(line.split()[0]), signal.SIGKILL)


def test_train_with_ray_backend_leaves_no_ray_process(repo: Path, tmp_path: Path, ray_tmp) -> None:
    root, env = ray_tmp
    res = subprocess.run(train_cmd(repo, tmp_path, steps=2), capture_output=True, text=True, timeout=300, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "2 Ray workers ready" in (tmp_path / "run" / "events.log").read_text()
    assert (tmp_path / "run" / "summary.json").is_file()
    assert wait_no_ray_processes(root) == []


@pytest.mark.parametrize("sig, code, said", [(signal.SIGINT, 130, "interrupted"),
                                             (signal.SIGTERM, 143, "terminated (SIGTERM)")])
def test_ctrl_c_or_sigterm_shuts_ray_down(repo: Path, tmp_path: Path, ray_tmp, sig: int, code: int, said: str
                                          ) -> None:
    """Ctrl-C, or ``kill PID`` (a scheduler's SIGTERM: Python's default would die with no clean-up), mid-training:
    the workers and the Ray the run started are gone, and the exit code says which signal."""
    root, env = ray_tmp
    proc = subprocess.Popen(train_cmd(repo, tmp_path, steps=10_000), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, env=env)
    try:
        events = tmp_path / "run" / "events.log"
        deadline = time.time() + 180
        while not (events.is_file() and "Ray workers ready" in events.read_text()):
            assert proc.poll() is None, proc.stderr.read()[-3000:] if proc.stderr else ""
            assert time.time() < deadline, "Ray workers never became ready"
            time.sleep(0.5)
        assert ray_processes(root), "expected the run's Ray processes while it trains"
        time.sleep(2)  # mid-training
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == code, err[-3000:]
    assert f"r3-rl: {said}" in err
    assert wait_no_ray_processes(root) == []


class _FakeActor:
    """Stands in for a worker handle: ``run.remote`` records what it was sent and returns a fresh ref."""

    def __init__(self, name: str, sent: list[tuple[str, int]]) -> None:
        self.name, self.sent = name, sent
        self.run = self

    def remote(self, task, sampling_ref):
        self.sent.append((self.name, task.index))
        return object()


class _FakeGroup:
    def __init__(self, actors: dict[int, _FakeActor]) -> None:
        self.actors = actors

    def items(self):
        return list(self.actors.items())


def _sender(n_workers: int):
    from r3_rl.rollout.ray_engine import RayEngine

    sent: list[tuple[str, int]] = []
    engine = object.__new__(RayEngine)  # only _send's state: no Ray, no actors
    engine.group = _FakeGroup({i: _FakeActor(f"w{i}", sent) for i in range(n_workers)})
    return engine, sent


class _Task:
    def __init__(self, index: int) -> None:
        self.index, self.step = index, 1


def test_two_tasks_in_flight_per_worker_while_there_is_work_for_every_worker() -> None:
    from collections import deque

    from r3_rl.rollout.ray_engine import TASKS_PER_WORKER

    assert TASKS_PER_WORKER == 2
    engine, sent = _sender(2)
    queue, pending = deque(_Task(i) for i in range(5)), {}
    engine._send(queue, pending, None)
    assert sent == [("w0", 0), ("w1", 1), ("w0", 2), ("w1", 3)] and [t.index for t in queue] == [4]
    engine._send(queue, pending, None)  # nothing finished: every worker holds its two
    assert len(sent) == 4
    done = next(ref for ref, job in pending.items() if job.task.index == 0)
    pending.pop(done)  # w0 finished task 0; one task left for two workers: it is not queued behind w0's task 2
    engine._send(queue, pending, None)
    assert len(sent) == 4 and len(queue) == 1
    pending.pop(next(ref for ref, job in pending.items() if job.task.index == 2))  # w0 is idle now
    engine._send(queue, pending, None)
    assert sent[-1] == ("w0", 4) and not queue

    engine, sent = _sender(2)  # three tasks for two workers: one each, the third waits for the first free one
    queue, pending = deque(_Task(i) for i in range(3)), {}
    engine._send(queue, pending, None)
    assert sent == [("w0", 0), ("w1", 1)] and len(queue) == 1


def test_tasks_on_a_replaced_worker_hold_no_place() -> None:
    from collections import deque

    engine, sent = _sender(1)
    queue, pending = deque(_Task(i) for i in range(4)), {}
    engine._send(queue, pending, None)
    assert sent == [("w0", 0), ("w0", 1)]
    engine.group.actors[0] = _FakeActor("w0-new", sent)  # replaced: tasks 0 and 1 are on the lost actor
    engine._send(queue, pending, None)
    assert sent[2:] == [("w0-new", 2), ("w0-new", 3)]


def test_a_trainer_with_reward_actors_starts_in_a_run_dir_not_made_yet(repo: Path, tmp_path: Path, ray_session) -> None:
    """Reward actors log an event as they start, before the trainer's logger made the run dir: building a Trainer
    in code (not through the CLI, which makes the folder first) failed with FileNotFoundError on events.log."""
    from r3_rl.trainer import Trainer

    recipe = load_recipe(repo / "recipes" / "tiny_blocks.yaml", tiny_overrides(tmp_path) + ["rollout.reward_workers=1"])
    trainer = Trainer(recipe, tmp_path / "not" / "made" / "yet")
    try:
        assert "Ray reward workers ready" in (tmp_path / "not" / "made" / "yet" / "events.log").read_text()
    finally:
        trainer.close()
