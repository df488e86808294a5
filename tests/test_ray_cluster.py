"""Losing a Ray node, on a simulated multi-node cluster (tests/sim_cluster.py): never a hang, never a traceback.

Each test runs ``r3-rl train`` as a user would, joined to the cluster with ``ray.address``, and SIGKILLs a
node's raylet and workers while it trains.  The fast one (default suite) checks worker placement across
nodes and the one-line stop when no node can host a replacement; the slow ones check that a run with
spare capacity (or allowed to carry on with fewer workers) ends with the very weights of a run without
the loss, that a learner rank lost mid-step stops in one line and ``--resume auto`` continues, and that
a lost reward actor gives explicit failures and a replacement.
"""
from __future__ import annotations

import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from conftest import tiny_overrides
from sim_cluster import SimCluster

REPO = Path(__file__).resolve().parents[1]
FAST_RAY = ["ray.log_to_driver=false", "ray.placement_timeout_s=4", "ray.call_timeout_s=120"]


def train(cluster: SimCluster, tmp: Path, run: str, steps: int, *extra: str, resume: bool = False) -> subprocess.Popen:
    sets = tiny_overrides(tmp, steps=steps) + [
        "warmstart.steps=0", "rollout.backend=ray", "rollout.workers=2", "rollout.threads_per_worker=1",
        "rollout.max_task_retries=2", "threads=1", f"ray.address={cluster.address}"] + FAST_RAY + list(extra)
    cmd = [sys.executable, "-m", "r3_rl.cli", "train", str(REPO / "recipes" / "tiny_blocks.yaml"),
           "--run-dir", str(tmp / run)] + [a for s in sets for a in ("--set", s)]
    cmd += ["--resume", "auto"] if resume else []
    err = Path(tempfile.mkstemp(prefix=f"{run}-", suffix=".stderr", dir=tmp)[1])  # a file, not a pipe that
    with open(err, "w") as f:                                                    # nobody reads while the run goes
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=f, env=cluster.env)
    proc.err_path = err  # type: ignore[attr-defined]
    return proc


def wait_for(proc: subprocess.Popen, check, what: str, timeout: float = 240.0):
    """Poll ``check()`` until it returns something truthy; the run must still be going."""
    deadline = time.time() + timeout
    while not (got := check()):
        if proc.poll() is not None:
            raise AssertionError(f"run ended (rc {proc.returncode}) before {what}: {proc.err_path.read_text()[-3000:]}")
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)
    return got


def events(run_dir: Path) -> list[str]:
    path = run_dir / "events.log"
    return path.read_text().splitlines() if path.is_file() else []


def worker_nodes(run_dir: Path, kind: str = "rollout: ") -> dict[int, str] | None:
    """``{worker: node id prefix}`` from the 'ready' event, once it is there."""
    line = next((e for e in events(run_dir) if kind in e and "ready (" in e), None)
    if line is None:
        return None
    parts = line.split("ready (", 1)[1].rstrip(")").split(", ")
    return {int(p.split()[1]): p.split()[-1] for p in parts}


def metrics_steps(run_dir: Path) -> list[int]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r["step"] for r in rows if "time/learner_s" in r]  # training steps (eval rows have other keys)


def error_line(err: str) -> str:
    """The run's one error line: the last line of stderr, and no traceback anywhere (progress bars may precede it)."""
    assert "Traceback" not in err, err[-3000:]
    lines = err.strip().splitlines()
    assert lines and sum(line.startswith("r3-rl: ") for line in lines) == 1, err[-3000:]
    return lines[-1]


def finish(proc: subprocess.Popen, timeout: float) -> tuple[int, str, float]:
    t0 = time.time()
    try:
        proc.wait(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
    return proc.returncode, proc.err_path.read_text(), time.time() - t0


def node_of(cluster_nodes: dict[str, str], prefix: str) -> str:
    return next(n for n in cluster_nodes.values() if n.startswith(prefix))


@pytest.mark.timeout(420)
def test_node_loss_without_spare_capacity_stops_in_one_line(tmp_path: Path) -> None:
    """Two 1-CPU nodes, one worker on each (placement across nodes); the second node is lost and no node
    has a free CPU: the run stops with one line naming the worker, the reason and the attempts, exit 2."""
    with SimCluster(head_cpus=0) as cluster:
        nodes = {"a": cluster.add(1), "b": cluster.add(1)}
        proc = train(cluster, tmp_path, "run", 40, "rollout.min_workers=2", "save_every=1")
        run = tmp_path / "run"
        placed = wait_for(proc, lambda: worker_nodes(run), "the workers to be ready")
        assert sorted(placed.values()) == sorted(n[:8] for n in nodes.values())  # one worker on each node
        wait_for(proc, lambda: len(metrics_steps(run)) >= 2, "two steps")
        lost_worker = next(w for w, n in placed.items() if nodes["b"].startswith(n))
        cluster.kill(nodes["b"])
        rc, err, took = finish(proc, timeout=120)
    line = error_line(err)
    assert rc == 2, err[-3000:]
    assert line.startswith(f"r3-rl: error: rollout worker {lost_worker} could not be restarted: no node has 1 free "
                           f"CPU (2 attempts, 4 s each); continue from step_0000"), line
    assert line.endswith(f"--run-dir {run} --resume auto")
    print(f"node loss -> one-line exit: {took:.1f} s")
    assert took < 60, f"{took:.0f} s from the node loss to the exit"
    log = events(run)
    after = log[next(i for i, e in enumerate(log) if f"rollout worker {lost_worker} lost" in e):]
    assert any("restart attempt 1/2 failed" in e for e in after) and any("attempt 2/2 failed" in e for e in after)
    assert not any(" restarted " in e for e in after)  # never claimed before it happened
    assert "stopped: rollout worker" in after[-1]


# ----------------------------------------------------------------------------- slow: whole runs compared
def final_weights(run_dir: Path) -> bytes:
    return (run_dir / "final" / "model.safetensors").read_bytes()


@pytest.fixture(scope="module")
def two_nodes():
    """A head (no CPU for actors) and two 1-CPU nodes; one reference run without any loss."""
    with SimCluster(head_cpus=0) as cluster:
        cluster.add(1)
        cluster.add(1)
        yield cluster


@pytest.fixture(scope="module")
def reference(two_nodes, tmp_path_factory) -> bytes:
    tmp = tmp_path_factory.mktemp("reference")
    rc, err, _ = finish(train(two_nodes, tmp, "run", 20), timeout=600)
    assert rc == 0, err[-3000:]
    return final_weights(tmp / "run")


def kill_worker_node(cluster: SimCluster, proc: subprocess.Popen, run: Path, after_steps: int, spare: bool) -> int:
    """Once the workers are placed (then adding a spare node if asked), kill the node of the last worker
    after ``after_steps`` steps; returns that worker's number."""
    placed = wait_for(proc, lambda: worker_nodes(run), "the workers to be ready")
    assert len(set(placed.values())) == 2  # one worker on each node
    if spare:
        cluster.add(1)
    worker = max(placed)
    victim = next(n for n in cluster.nodes if n.startswith(placed[worker]))
    wait_for(proc, lambda: len(metrics_steps(run)) >= after_steps, f"{after_steps} steps")
    cluster.kill(victim)
    return worker


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_node_loss_with_spare_capacity_completes_with_the_same_weights(two_nodes, reference, tmp_path: Path) -> None:
    proc = train(two_nodes, tmp_path, "run", 20, "ray.placement_timeout_s=20")
    run = tmp_path / "run"
    worker = kill_worker_node(two_nodes, proc, run, after_steps=2, spare=True)
    rc, err, _ = finish(proc, timeout=600)
    assert rc == 0, err[-3000:]
    assert metrics_steps(run) == list(range(20))  # every step exactly once
    log = "\n".join(events(run))
    assert f"rollout worker {worker} lost" in log and f"rollout worker {worker} restarted with policy version" in log
    print(next(e for e in events(run) if "restarted" in e))  # the restart's duration
    assert final_weights(run) == reference  # byte for byte


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_node_loss_without_spare_capacity_carries_on_with_fewer_workers(two_nodes, reference, tmp_path: Path) -> None:
    """rollout.min_workers=1 (the default): the lost worker's tasks move to the other one; same weights."""
    proc = train(two_nodes, tmp_path, "run", 20)
    run = tmp_path / "run"
    worker = kill_worker_node(two_nodes, proc, run, after_steps=2, spare=False)
    rc, err, _ = finish(proc, timeout=600)
    assert rc == 0, err[-3000:]
    assert metrics_steps(run) == list(range(20))
    assert f"rollout worker {worker} could not be restarted: no node has 1 free CPU (2 attempts, 4 s each); " \
           f"continuing with 1 of 2 rollout workers" in "\n".join(events(run))
    assert final_weights(run) == reference
    two_nodes.add(1)  # back to two free nodes for the next test


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_node_loss_during_a_learner_step_stops_in_one_line_and_resume_continues(tmp_path: Path) -> None:
    """Two learner ranks on two nodes; one node dies mid-step.  The surviving rank must not wait for ever in
    its all-reduce: the step is abandoned, the run stops in one line, and --resume auto finishes it."""
    ranks = ["rollout.backend=local", "learner.backend=deepspeed", "learner.ranks=2", "learner.micro_batch_size=2",
             "learner.epochs=30", "save_every=2", "ray.collective_timeout_s=20"]
    run = tmp_path / "run"
    with SimCluster(head_cpus=0) as cluster:
        cluster.add(1)
        victim = cluster.add(1)
        proc = train(cluster, tmp_path, "run", 8, *ranks)
        wait_for(proc, lambda: len(metrics_steps(run)) >= 3, "three steps", timeout=600)
        last = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
        time.sleep(last["time/rollout_s"] + last["time/learner_s"] / 2)  # into the next learner step
        cluster.kill(victim)
        rc, err, took = finish(proc, timeout=300)
        line = error_line(err)
        assert rc == 2, err[-3000:]
        assert re.fullmatch(rf"r3-rl: error: learner rank [01] (was lost|did not answer) during the learner step "
                            rf"\(.*\); the learner step was abandoned and the ranks stopped; continue from "
                            rf"step_\d+ with --run-dir {run} --resume auto", line), line
        print(f"learner node loss -> one-line exit: {took:.1f} s")
        assert took < 20 + 90, f"{took:.0f} s from the node loss to the exit"
        cluster.add(1)
        rc, err, _ = finish(train(cluster, tmp_path, "run", 8, *ranks, resume=True), timeout=600)
        assert rc == 0, err[-3000:]
    assert metrics_steps(run)[-1] == 7 and (run / "final" / "model.safetensors").is_file()


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_reward_actor_lost_with_its_node_gives_failures_and_a_replacement(tmp_path: Path) -> None:
    run = tmp_path / "run"
    with SimCluster(head_cpus=0) as cluster:
        cluster.add(1)
        cluster.add(1)
        proc = train(cluster, tmp_path, "run", 20, "rollout.workers=1", "rollout.reward_workers=1",
                     "rewards.max_failure_fraction=0.5", "ray.placement_timeout_s=20")
        placed = wait_for(proc, lambda: worker_nodes(run, "rewards: "), "the reward worker to be ready")
        victim = next(n for n in cluster.nodes if n.startswith(placed[0]))
        cluster.add(1)  # spare capacity for its replacement
        wait_for(proc, lambda: len(metrics_steps(run)) >= 2, "two steps")
        cluster.kill(victim)
        rc, err, _ = finish(proc, timeout=600)
    assert rc == 0, err[-3000:]
    log = "\n".join(events(run))
    assert re.search(r"reward worker 0 lost \(.*; its \d+ samples are marked failed\)", log), log
    assert "reward worker 0 restarted on node" in log
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert sum(r.get("rollout/failed_rewards", 0) for r in rows if "time/learner_s" in r) > 0  # failures, not zeros
    assert metrics_steps(run) == list(range(20))
