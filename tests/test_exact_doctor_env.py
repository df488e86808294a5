"""Exact, small cases for the doctor's GPU / memory / Ray facts, environment.json comparisons, the Ctrl-C
watchdog, the saved RNG streams, the GPU layout and Components' Ray ownership.  No GPU, no Ray, no training:
the machine's GPUs, CUDA's RNG and Ray's start are injected."""
from __future__ import annotations

import json
import random
import signal
import socket
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from r3_rl.config import load_recipe
from r3_rl.doctor.base import Context, ok, problem
from r3_rl.doctor.devices import GIB, GpuInfo

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "recipes" / "tiny_blocks.yaml"
BAGEL = REPO / "recipes" / "grpo_geneval_bagel.yaml"


def _ctx(sets: list[str], gpus: list[GpuInfo] | None = None, path: Path = TINY) -> Context:
    ctx = Context(path, load_recipe(path, sets))
    if gpus is not None:
        ctx._memo["gpus"] = gpus
    return ctx


def _gpu(i: int, total_gib: float, free_gib: float, name: str = "NVIDIA H100") -> GpuInfo:
    return GpuInfo(i, name, int(total_gib * GIB), int(free_gib * GIB))


# ------------------------------------------------------------------------------------------ doctor: gpus
def test_a_trainer_on_cuda_n_needs_n_plus_one_gpus() -> None:
    from r3_rl.doctor.gpu import check_gpus, needed_gpus_here

    recipe = load_recipe(TINY, ["policy.device=cuda:1"])
    assert needed_gpus_here(recipe) == (2, ["policy.device cuda:1"])
    one = check_gpus(_ctx(["policy.device=cuda:1"], [_gpu(0, 80, 80)]))
    assert one.status == "problem" and "needs 2 GPU(s) here" in one.detail
    two = check_gpus(_ctx(["policy.device=cuda:1"], [_gpu(0, 80, 80), _gpu(1, 80, 80)]))
    assert two.status == "ok" and "the recipe uses 2 here" in two.detail


def test_a_gpu_recipe_on_a_machine_without_gpus_is_a_problem() -> None:
    from r3_rl.doctor.gpu import check_gpus

    found = check_gpus(_ctx(["policy.device=cuda"], []))
    assert found.status == "problem" and "needs 1 GPU(s)" in found.detail and "policy.device=cpu" in found.fix
    assert check_gpus(_ctx([], [])).status == "skipped"  # a CPU recipe on a CPU machine


def test_gpus_are_described_in_gib_with_the_least_free() -> None:
    from r3_rl.doctor.gpu import describe

    text = describe([_gpu(0, 80, 70), _gpu(1, 80, 10.5)])
    assert text == "2 x NVIDIA H100 (80.0 GiB; least free 10.5 GiB)"
    assert describe([GpuInfo(0, "A", 80 * 10**9, 80 * 10**9)]) == "1 x A (74.5 GiB; least free 74.5 GiB)"


def test_visible_gpus_reads_free_and_total_in_torchs_order(monkeypatch: pytest.MonkeyPatch) -> None:
    from r3_rl.doctor import devices

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda i: ((10 + i) * GIB, 80 * GIB))  # (free, total)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: SimpleNamespace(name=f"GPU{i}"))
    assert devices.visible_gpus() == [GpuInfo(0, "GPU0", 80 * GIB, 10 * GIB), GpuInfo(1, "GPU1", 80 * GIB, 11 * GIB)]


def test_check_train_waits_for_the_problems_above(monkeypatch: pytest.MonkeyPatch) -> None:
    """The 2-step training runs only when every check before it passed; the doctor counts the problems."""
    from r3_rl import doctor
    from r3_rl.doctor import smoke
    from r3_rl.doctor.gpu import check_train

    def no_training(*args, **kwargs):
        raise AssertionError("trained despite a problem above")
    monkeypatch.setattr(smoke, "smoke_train", no_training)
    monkeypatch.setattr(smoke, "random_model_like", no_training)
    monkeypatch.setattr(doctor, "CHECKS", [("a", lambda c: problem("broken")), ("b", lambda c: ok("fine")),
                                           ("c", lambda c: [problem("x"), problem("y")]), ("train", check_train)])
    ctx = _ctx([], [_gpu(0, 80, 80)])
    ctx._memo["model"] = SimpleNamespace(folder=None)
    found = doctor.run_checks(ctx, lambda f: None)
    assert ctx.problems == 3
    assert [(f.check, f.status) for f in found][-1] == ("train", "skipped")
    assert found[-1].detail == "fix the problems above first"


# ------------------------------------------------------------------------------------------ doctor: rewards
def test_an_eval_reward_that_is_down_is_a_problem_of_its_own() -> None:
    from r3_rl.doctor.checks import check_rewards

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = int(s.getsockname()[1])
    remote = [{"name": "remote", "options": {"url": f"http://127.0.0.1:{port}", "health_timeout": 2}}]
    found = {f.check: f for f in check_rewards(_ctx([f"rewards.eval={json.dumps(remote)}"]))}
    assert found["reward blocks (task)"].status == "ok"
    assert found["reward remote (eval)"].status == "problem" and f"127.0.0.1:{port}" in found["reward remote (eval)"].fix


# ------------------------------------------------------------------------------------------ doctor: memory
def test_gpu_memory_is_judged_against_the_smallest_gpu() -> None:
    from r3_rl.doctor.memory_check import check_memory

    ctx = _ctx([], [_gpu(i, 80 * 1e9 / GIB, 80 * 1e9 / GIB) for i in range(7)] + [_gpu(7, 40e9 / GIB, 40e9 / GIB)],
               BAGEL)
    ctx.host_memory = lambda: int(2e12)
    line = {f.detail.split(":")[0]: f for f in check_memory(ctx)}["GPU memory"]
    assert line.status == "problem" and "this machine's 40.0 GB GPUs" in line.detail


def test_ray_default_store_is_95_percent_of_free_shm_never_below_10_gb(monkeypatch: pytest.MonkeyPatch) -> None:
    import shutil

    from r3_rl.doctor.memory_check import ray_default_store

    free = {"bytes": 100e9}
    monkeypatch.setattr(shutil, "disk_usage", lambda path: SimpleNamespace(free=free["bytes"]))
    assert ray_default_store(int(2e12), Path("/shm")) == pytest.approx(95e9)
    free["bytes"] = 4e9
    assert ray_default_store(int(2e12), Path("/shm")) == pytest.approx(10e9)
    assert ray_default_store(int(20e9), Path("/shm")) == pytest.approx(6e9)  # 30% of the node is less still


def test_a_cgroup_limit_above_the_physical_memory_is_not_believed(tmp_path: Path) -> None:
    from r3_rl.doctor.devices import physical_memory

    limit = tmp_path / "memory.max"
    limit.write_text(f"{10**18}\n")
    assert physical_memory(limit) == physical_memory(tmp_path / "absent")


# ------------------------------------------------------------------------------------------ doctor: ray
def test_ray_addresses_and_a_local_rays_cpus() -> None:
    from r3_rl.doctor.ray_check import check_ray, host_port

    assert host_port("10.0.0.1:6379") == ("10.0.0.1", 6379)
    assert host_port("ray://head:10001") == ("head", 10001)
    assert host_port("[::1]:6379") == ("::1", 6379)
    assert host_port("auto") is None
    found = check_ray(_ctx(["rollout.backend=ray", "rollout.workers=2", "rollout.cpus_per_worker=1",
                            "ray.num_cpus=1"], []))
    assert found.status == "problem" and "with 1 CPU, 0 GPU" in found.detail and "2 CPU requested, 1 free" in found.detail


# ------------------------------------------------------------------------------------------ environment
def test_a_resume_on_other_gpus_is_a_difference() -> None:
    from r3_rl.environment import differences

    def env(**changes: object) -> dict:
        return {"r3_rl": {"version": "0.1.0"}, "python": "3.11.7", "cpu": "AMD EPYC", "cpu_capability": "AVX2",
                "torch_threads": 1, "gpus": [], "packages": {"torch": "2.13.0"}, "variables": {}, **changes}

    assert differences(env(gpus=["NVIDIA A100"]), env(gpus=["NVIDIA H100"])) == [
        "gpus ['NVIDIA A100'] -> ['NVIDIA H100']"]
    assert differences(env(), env(cpu="Intel Xeon")) == ["cpu AMD EPYC -> Intel Xeon"]


# ------------------------------------------------------------------------------------------ interrupts
def test_the_hard_exit_ends_the_process_from_any_thread(monkeypatch: pytest.MonkeyPatch,
                                                        capsys: pytest.CaptureFixture) -> None:
    from r3_rl import interrupts

    codes: list[int] = []
    monkeypatch.setattr(interrupts.os, "_exit", codes.append)
    interrupts._hard_exit("why")  # os._exit, not sys.exit: SystemExit in the watchdog's thread ends nothing
    assert codes == [130] and capsys.readouterr().err == "r3-rl: interrupted (why); exiting\n"


def test_the_watchdog_handles_sigint_and_sigterm_with_a_daemon_timer() -> None:
    from r3_rl import interrupts

    old_int, old_term = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    dog = None
    try:
        dog = interrupts.install(grace_s=30)
        assert dog is not None and signal.getsignal(signal.SIGINT) is dog
        assert signal.getsignal(signal.SIGTERM) is dog  # `kill PID` cleans up too (Python's default: no finally)
        with pytest.raises(KeyboardInterrupt) as e:
            dog(signal.SIGINT, None)
        assert not isinstance(e.value, interrupts.Terminated)
        assert dog.timer is not None and dog.timer.daemon  # a finished run never waits for the grace period
    finally:
        if dog is not None:
            dog.cancel()
        signal.signal(signal.SIGINT, old_int)
        signal.signal(signal.SIGTERM, old_term)


# ------------------------------------------------------------------------------------------ rng_state
def test_every_global_stream_is_restored_through_a_weights_only_file(tmp_path: Path) -> None:
    from r3_rl.rng_state import global_rng_state, set_global_rng_state

    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    torch.save(global_rng_state(), tmp_path / "rng.pt")
    first = (random.random(), np.random.random(), torch.rand(3))
    random.seed(11)
    np.random.seed(12)
    torch.manual_seed(13)
    state = torch.load(tmp_path / "rng.pt", weights_only=True)
    assert isinstance(state["numpy_rng"][1], list)
    set_global_rng_state(state)
    again = (random.random(), np.random.random(), torch.rand(3))
    assert first[0] == again[0] and first[1] == again[1] and torch.equal(first[2], again[2])


def test_every_cuda_device_stream_is_saved_and_restored(monkeypatch: pytest.MonkeyPatch) -> None:
    from r3_rl.rng_state import global_rng_state, set_global_rng_state

    states = [torch.tensor([1, 2], dtype=torch.uint8), torch.tensor([3, 4], dtype=torch.uint8)]
    restored: list = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: list(states))
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", restored.append)
    state = global_rng_state()
    assert len(state["cuda_rng"]) == 2 and all(torch.equal(a, b) for a, b in zip(state["cuda_rng"], states))
    set_global_rng_state(state)
    assert len(restored) == 1 and len(restored[0]) == 2


# ------------------------------------------------------------------------------------------ gpu_layout
def test_shares_that_divide_a_gpu_pack_despite_float_rounding() -> None:
    from r3_rl.gpu_layout import gpus_to_place

    assert gpus_to_place([(20, 0.05)]) == 1
    assert gpus_to_place([(1, 0.8), (1, 0.2)]) == 1


def test_local_rollout_workers_take_no_gpu_of_a_local_ray() -> None:
    from r3_rl.gpu_layout import actor_gpus

    recipe = load_recipe(REPO / "recipes" / "grpo_geneval.yaml", ["rollout.backend=local", "rollout.workers=4"])
    assert actor_gpus(recipe) == recipe.learner.ranks * recipe.learner.gpus_per_rank


def test_cuda_visible_devices_lists_only_named_gpus(monkeypatch: pytest.MonkeyPatch) -> None:
    from r3_rl.gpu_layout import visible_gpus

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert visible_gpus() == []
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2, 5,")
    assert visible_gpus() == ["2", "5"]


# ------------------------------------------------------------------------------------------ components
def test_components_keep_ray_ownership_and_close_every_part(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from r3_rl import ray_runtime
    from r3_rl.components import Components

    started = iter([True, False])  # the engine starts Ray; the learner finds it running
    stopped: list[bool] = []
    monkeypatch.setattr(ray_runtime, "start_ray", lambda cfg, gpus=None: next(started))
    monkeypatch.setattr(ray_runtime, "stop_ray", lambda owned: stopped.append(owned) or False)
    parts = Components(load_recipe(TINY, []), tmp_path / "run")
    parts._start_ray()
    parts._start_ray()
    closed: list[str] = []
    for name in ("task_rewards", "engine", "learner"):
        parts.__dict__[name] = SimpleNamespace(close=lambda name=name: closed.append(name))
    parts.close()
    assert closed == ["task_rewards", "engine", "learner"] and stopped == [True]
    parts.close()
    assert stopped == [True]  # safe to call twice: Ray is stopped once
