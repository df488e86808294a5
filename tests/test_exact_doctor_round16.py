"""Exact small cases for ``r3-rl doctor`` and what it measures against (round 16 audit): the network timeouts a
default Context gives the Ray probe and join, the child that reads a cluster (its environment, its one-line
errors), float slack in Ray's resource totals, the per-node verdict only when the totals fit, the 2-step training's
model (depth, dtype, the trainer's GPU, inside out_dir) and its out-of-memory advice, GPU descriptions of mixed
cards, the disk / weights / rewards / data lines, a Ray store line only with Ray, the smoke recipe and 2-step
training verdicts (with the trainer injected), GPU layout edges, and reward-model / BAGEL-shape edges.

No GPU, no Ray, no training: GPUs, the cluster, the child process and the trainer are injected."""
from __future__ import annotations

import json
import os
import random
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest

from test_exact_doctor_interrupts import TINY, _ctx, _gpus  # the doctor's context on the tiny recipe, H100s
from r3_rl.config import load_recipe
from r3_rl.doctor.devices import GIB, GpuInfo


# ------------------------------------------------------------------------------------------ doctor: ray
def test_a_default_context_probes_in_3_s_and_joins_in_30_s(monkeypatch: pytest.MonkeyPatch) -> None:
    """The TCP probe fails fast (3 s); joining the cluster gets the longer ray_timeout (30 s)."""
    from r3_rl.doctor import ray_check

    seen: dict[str, tuple] = {}

    def probe(host: str, port: int, timeout: float) -> None:
        seen["probe"] = (host, port, timeout)

    def join(address: str, timeout: float) -> dict:
        seen["join"] = (address, timeout)
        return {"total": {"CPU": 8.0, "GPU": 2.0}, "available": {"CPU": 8.0, "GPU": 2.0}, "nodes": 1}

    monkeypatch.setattr(ray_check, "tcp_probe", probe)
    monkeypatch.setattr(ray_check, "cluster_resources", join)
    found = ray_check.check_ray(_ctx(["rollout.backend=ray", "rollout.workers=1", "rollout.gpus_per_worker=1",
                                      "rollout.cpus_per_worker=1", "ray.address=10.0.0.1:6379"]))
    assert found.status == "ok", found.detail
    assert seen == {"probe": ("10.0.0.1", 6379, 3.0), "join": ("10.0.0.1:6379", 30.0)}


def test_the_cluster_is_read_by_a_child_without_ray_address_and_fails_in_one_line(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The child gets this environment less RAY_ADDRESS (ray.init would join that one instead); its answer is
    its last stdout line; a failure is the last ``...Error: ...`` line of stderr, else its last line, else the
    exit code, cut at 300 characters."""
    from r3_rl.doctor import ray_check

    calls: list[tuple] = []
    answer: dict = {}

    def run(cmd, capture_output, text, timeout, env):  # noqa: ANN001, ANN202
        calls.append((cmd[-1], timeout, env))
        if not answer:
            raise subprocess.TimeoutExpired(cmd, timeout)
        return SimpleNamespace(**answer)

    monkeypatch.setenv("RAY_ADDRESS", "elsewhere:6379")
    monkeypatch.setattr(ray_check.subprocess, "run", run)
    info = {"total": {"CPU": 4.0}, "available": {"CPU": 3.0}, "nodes": 1, "free_gpus_per_node": None}
    answer.update(returncode=0, stdout=f"2026-12-07 INFO connecting\n{json.dumps(info)}\n", stderr="")
    assert ray_check.cluster_resources("head:6379", 7.0) == info
    address, timeout, env = calls[-1]
    assert (address, timeout) == ("head:6379", 7.0)
    assert "RAY_ADDRESS" not in env and env["PATH"] == os.environ["PATH"]

    def failure(stderr: str, code: int = 1) -> str:
        answer.update(returncode=code, stdout="", stderr=stderr)
        with pytest.raises(RuntimeError) as e:
            ray_check.cluster_resources("head:6379", 7.0)
        return str(e.value)

    assert failure('Traceback (most recent call last):\n  File "x.py", line 1\nConnectionError: GCS not up\n'
                   'RuntimeError: Failed to connect to GCS at head:6379\n  note: retry later\n\n') == \
        "RuntimeError: Failed to connect to GCS at head:6379"
    assert failure("first words\n  last words  \n\n") == "last words"
    assert failure("", 3) == "exit code 3"
    assert failure("ValueError: " + "x" * 400) == ("ValueError: " + "x" * 400)[:300]
    answer.clear()
    with pytest.raises(RuntimeError, match=r"^no answer from Ray at 'head:6379' within 7 s$"):
        ray_check.cluster_resources("head:6379", 7.0)


def test_resource_sums_within_float_slack_are_no_shortfall() -> None:
    from r3_rl.doctor.ray_check import shortfall

    assert 0.1 * 3 > 0.3  # 0.30000000000000004: three 0.1-GPU actors on 0.3 free GPUs fit
    assert shortfall({"CPU": 0.1 + 0.2, "GPU": 0.1 * 3}, {"CPU": 0.3, "GPU": 0.3}) == []
    assert shortfall({"CPU": 0.300002, "GPU": 0.0}, {"CPU": 0.3}) == ["0.300002 CPU requested, 0.3 free"]


def test_a_cluster_short_in_total_is_named_by_its_totals(monkeypatch: pytest.MonkeyPatch) -> None:
    """Two 4-GPU ranks, 6 GPUs free as 4 + 2: the totals already say why; the per-node line is for totals that fit."""
    from r3_rl.doctor import ray_check

    monkeypatch.setattr(ray_check, "tcp_probe", lambda host, port, timeout: None)
    monkeypatch.setattr(ray_check, "cluster_resources", lambda address, timeout: {
        "total": {"CPU": 32.0, "GPU": 8.0}, "available": {"CPU": 32.0, "GPU": 6.0}, "nodes": 2,
        "free_gpus_per_node": [4.0, 2.0]})
    found = ray_check.check_ray(_ctx(["learner.ranks=2", "learner.gpus_per_rank=4", "learner.cpus_per_rank=1",
                                      "ray.address=10.0.0.1:6379"]))
    assert found.status == "problem"
    assert found.detail.endswith("(learner.ranks 2 x (1 CPU, 4 GPU)): 8 GPU requested, 6 free (pending actors "
                                 "would wait forever)")


def test_multi_gpu_actors_are_placed_best_fit_not_first_fit() -> None:
    """Free 4 + 3, actors of 3, 2 and 2 GPUs: the 3 takes the 3-GPU node (best fit) and both 2s share the 4; first fit
    puts the 3 on the 4-GPU node and leaves a 2 with nowhere to go."""
    from r3_rl.doctor.ray_check import unplaced_multi_gpu_actors

    kinds = [("learner.ranks", 2, 2.0), ("rollout.workers", 1, 3.0)]
    assert unplaced_multi_gpu_actors(kinds, [4.0, 3.0]) == []
    assert unplaced_multi_gpu_actors(kinds, [3.0, 3.0]) == ["learner.ranks"]


def test_the_node_verdict_counts_each_unplaced_actor_and_lists_nodes_largest_first(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Three 4-GPU ranks on 12 free GPUs as 3 + 6 + 3: one rank fits (on the 6), two fit nowhere."""
    from r3_rl.doctor import ray_check

    monkeypatch.setattr(ray_check, "tcp_probe", lambda host, port, timeout: None)
    monkeypatch.setattr(ray_check, "cluster_resources", lambda address, timeout: {
        "total": {"CPU": 32.0, "GPU": 12.0}, "available": {"CPU": 32.0, "GPU": 12.0}, "nodes": 3,
        "free_gpus_per_node": [3.0, 6.0, 3.0]})
    found = ray_check.check_ray(_ctx(["learner.ranks=3", "learner.gpus_per_rank=4", "learner.cpus_per_rank=1",
                                      "ray.address=10.0.0.1:6379"]))
    assert found.status == "problem"
    assert found.detail.endswith("12 GPU (learner.ranks 3 x (1 CPU, 4 GPU)): 2 of learner.ranks fit on no node (one "
                                 "actor's GPUs sit on one node; GPUs free per node: 6, 3, 3) (pending actors would "
                                 "wait forever)")


# ------------------------------------------------------------------------------------------ doctor: gpu
def test_the_2_step_model_is_2_layers_in_the_recipes_dtype_on_the_trainers_gpu_inside_out_dir(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from r3_rl.doctor import smoke
    from r3_rl.doctor.gpu import check_train

    calls: dict[str, tuple] = {}

    def model_like(src, dst, layers, dtype, device):  # noqa: ANN001, ANN202
        calls["model"] = (src, dst.name, dst.parent.parent, layers, dtype, device)
        return dst

    def train(recipe, workdir, model_dir=None):  # noqa: ANN001, ANN202
        calls["train"] = (workdir.parent, model_dir)
        return [{"learner/loss": 0.5}, {"learner/loss": -0.0125}]

    monkeypatch.setattr(smoke, "random_model_like", model_like)
    monkeypatch.setattr(smoke, "smoke_train", train)
    for device, expected in (("cuda:1", "cuda:1"), ("cpu", "cpu")):
        ctx = _ctx([f"out_dir={tmp_path}", f"policy.device={device}", "policy.dtype=float16"], _gpus(2))
        ctx._memo["model"] = SimpleNamespace(folder=tmp_path / "src")
        found = check_train(ctx)
        assert found.status == "ok" and found.detail.startswith("2 steps on a random 2-layer model")
        assert found.detail.endswith("(losses 0.5, -0.0125; checkpoint written)")
        assert calls["model"] == (tmp_path / "src", "model", tmp_path, 2, "float16", expected)
        model_dir = calls["train"][1]
        assert calls["train"] == (tmp_path, model_dir) and model_dir.name == "model"


def test_one_rank_all_reduces_to_its_own_value() -> None:
    """World 1 on gloo: the sum is rank 0's 1 (world * (world + 1) / 2), so no error.  Run as the doctor runs it,
    in a fresh process: in the test's own process a default process group left by an earlier test in the same
    worker made ``init_process_group`` fail ("initialize the default process group twice")."""
    from r3_rl.doctor.gpu import all_reduce_check

    assert all_reduce_check(1, backend="gloo", timeout=120) > 0  # raises RuntimeError naming rank 0 on a wrong sum


class _Process:
    """Runs its target when started, in this process (no spawn)."""

    def __init__(self, target, args, daemon) -> None:  # noqa: ANN001
        self.target, self.args = target, args

    def start(self) -> None:
        self.target(*self.args)

    def join(self, timeout: float) -> None:
        pass

    def is_alive(self) -> bool:
        return False


def test_all_reduce_check_names_the_lowest_failed_rank_and_a_hang(monkeypatch: pytest.MonkeyPatch) -> None:
    import queue

    from r3_rl.doctor import gpu

    monkeypatch.setattr(gpu.mp, "get_context", lambda kind: SimpleNamespace(Queue=queue.Queue, Process=_Process))

    def fails(rank, world, port, backend, results):  # noqa: ANN001, ANN202
        results.put((rank, f"rank {rank}: RuntimeError: broken" if rank else None))

    def every_rank_fails(rank, world, port, backend, results):  # noqa: ANN001, ANN202
        results.put((rank, f"rank {rank}: RuntimeError: broken"))

    monkeypatch.setattr(gpu, "_all_reduce_rank", fails)
    with pytest.raises(RuntimeError, match=r"^rank 1: RuntimeError: broken$"):
        gpu.all_reduce_check(3, "gloo", timeout=5.0)
    monkeypatch.setattr(gpu, "_all_reduce_rank", every_rank_fails)
    with pytest.raises(RuntimeError, match=r"^rank 0: RuntimeError: broken$"):
        gpu.all_reduce_check(3, "gloo", timeout=5.0)

    def rank_1_hangs(rank, world, port, backend, results):  # noqa: ANN001, ANN202
        if rank != 1:
            results.put((rank, None))

    monkeypatch.setattr(gpu, "_all_reduce_rank", rank_1_hangs)
    with pytest.raises(RuntimeError, match=r"^ranks \[1\] did not finish within 0.05 s \(a hang\)$"):
        gpu.all_reduce_check(3, "gloo", timeout=0.05)


def test_an_out_of_memory_error_in_any_case_gets_the_memory_fix(monkeypatch: pytest.MonkeyPatch,
                                                                 tmp_path: Path) -> None:
    from r3_rl.doctor import smoke
    from r3_rl.doctor.gpu import check_train

    def train(recipe, workdir, model_dir=None):  # noqa: ANN001, ANN202
        raise RuntimeError("Out of memory: DeepSpeed could not allocate the optimiser states")

    monkeypatch.setattr(smoke, "smoke_train", train)
    ctx = _ctx([f"out_dir={tmp_path}"], _gpus(1))
    ctx._memo["model"] = SimpleNamespace(folder=None)
    found = check_train(ctx)
    assert found.fix == "lower learner.micro_batch_size or tree.group_size (see `r3-rl plan`)"


def test_mixed_gpus_are_described_by_the_largest_card_and_each_name_once() -> None:
    from r3_rl.doctor.gpu import describe

    gpus = [GpuInfo(0, "B", 40 * GIB, 30 * GIB), GpuInfo(1, "A", 80 * GIB, 70 * GIB), GpuInfo(2, "B", 40 * GIB, 35 * GIB)]
    assert describe(gpus) == "3 x A / B (80.0 GiB; least free 30.0 GiB)"


# ------------------------------------------------------------------------------------------ doctor: checks
def test_missing_weights_skip_the_disk_check_and_the_weights_line_counts_millions() -> None:
    from r3_rl.doctor.checks import check_disk, check_weights
    from r3_rl.weights import WeightsMissing

    ctx = _ctx()
    ctx._memo["model"] = WeightsMissing("policy.model '/x': no such folder", "--set policy.model=/y")
    assert (check_disk(ctx).status, check_disk(ctx).detail) == ("skipped", "needs the policy's size (see weights)")
    found = check_weights(ctx)
    assert (found.status, found.detail, found.fix) == ("problem", "policy.model '/x': no such folder",
                                                      "--set policy.model=/y")
    ctx = _ctx()
    ctx._memo["model"] = SimpleNamespace(where="/models/m", params=1_500_000_000)
    assert check_weights(ctx).detail == "policy /models/m: 1,500.0 M parameters"


REWARD = '''
from pathlib import Path
from r3_rl.rewards.base import Reward

LOG = Path(__file__).with_name("log.txt")


class Rec(Reward):
    def __init__(self, models: str = "", fail: str = "") -> None:
        self.models, self.fail = models, fail

    def weights(self):
        return [m for m in self.models.split(",") if m]

    def setup(self):
        if self.fail:
            raise ValueError(self.fail)
        with LOG.open("a") as f:
            f.write("setup\\n")

    def teardown(self):
        with LOG.open("a") as f:
            f.write("teardown\\n")

    def __call__(self, samples):
        return [0.0 for _ in samples]
'''


def test_a_reward_is_torn_down_and_its_first_missing_model_or_error_line_reported(tmp_path: Path) -> None:
    from r3_rl.doctor.checks import check_rewards

    (tmp_path / "rec.py").write_text(REWARD)
    name = f"{tmp_path / 'rec.py'}:Rec"
    first, second = tmp_path / "absent-one", tmp_path / "absent-two"
    task = [{"name": name, "options": {"models": f"{first},{second}"}}]
    evals = [{"name": name, "options": {"fail": "  boom\nsecond line"}}]
    found = check_rewards(_ctx([f"rewards.task={json.dumps(task)}", f"rewards.eval={json.dumps(evals)}"]))
    assert [(f.check, f.status) for f in found] == [(f"reward {name} (task)", "problem"),
                                                   (f"reward {name} (eval)", "problem")]
    assert str(first) in found[0].detail and str(second) not in found[0].detail and "; fix:" not in found[0].detail
    assert found[0].fix and "; fix:" not in found[0].fix
    assert found[1].detail == "setup failed: ValueError: boom"
    assert found[1].fix == "correct the reward's name or options (`r3-rl rewards` lists the names)"
    assert not (tmp_path / "log.txt").exists()
    plain = [{"name": name}]
    found = check_rewards(_ctx([f"rewards.task={json.dumps(plain)}", f"rewards.eval={json.dumps(plain)}"]))
    assert [(f.check, f.status) for f in found] == [(f"reward {name} (task+eval)", "ok")]
    assert (tmp_path / "log.txt").read_text() == "setup\nteardown\n"


def test_the_data_line_counts_the_eval_size_held_out_prompts() -> None:
    from r3_rl.doctor.checks import check_data

    sets = ["data.source=geneval", "data.train=geneval:train", "data.eval=geneval:test553"]
    found = check_data(_ctx(sets + ["eval.size=5"]))
    assert found.status == "ok" and found.detail.endswith("; eval geneval:test553: 5 prompts per eval")
    found = check_data(_ctx(sets + ["data.eval_size=7"]))
    assert found.status == "ok" and found.detail.endswith("; eval geneval:test553: 7 prompts per eval")


# ------------------------------------------------------------------------------------------ doctor: memory
def test_exactly_the_gpus_the_recipe_needs_are_planned_for(monkeypatch: pytest.MonkeyPatch) -> None:
    """One GPU for a trainer on cuda: the plan is made for that GPU and its line judged, not skipped."""
    from r3_rl.doctor.memory_check import check_memory
    from r3_rl.plan import report

    asked: list[tuple] = []
    plan = SimpleNamespace(gpu_totals=lambda: [("trainer process", 10e9)], fits=True, errors=[], host={})
    monkeypatch.setattr(report, "make_plan", lambda recipe, gpus, memory_gb: asked.append((gpus, memory_gb)) or plan)
    ctx = _ctx(["policy.device=cuda"], [GpuInfo(0, "A", int(80e9), int(80e9))], host_memory=lambda: int(8e9))
    found = check_memory(ctx)
    assert asked == [(1, 80.0)]
    assert (found[0].status, found[0].detail) == (
        "ok", "GPU memory: the fullest GPU holds trainer process, 10.0 GB by `r3-rl plan`, against 90% of this "
              "machine's 80.0 GB GPUs")


def test_no_ray_store_line_for_a_run_without_ray() -> None:
    from r3_rl.doctor.memory_check import _host

    found = _host(load_recipe(TINY, []), {"Ray object store": 5e9}, int(1e12), False)
    assert [(f.status, f.detail) for f in found] == [
        ("ok", "host memory: the run holds 5.0 GB beyond its processes' own (Ray object store 5.0); this machine "
               "has 1000.0 GB")]


# ------------------------------------------------------------------------------------------ doctor: smoke
def test_noise_scales_the_seeded_stream(monkeypatch: pytest.MonkeyPatch) -> None:
    from r3_rl.doctor import smoke

    monkeypatch.setattr(smoke, "_rng", random.Random(0))
    peer = random.Random(0)
    expected = [2.5 * peer.random() for _ in range(3)]
    assert smoke.noise(["a", "b", "c"], scale=2.5) == expected


def test_the_smoke_recipe_writes_no_eval_chains_or_trajectories(tmp_path: Path) -> None:
    from r3_rl.doctor.smoke import NOISE_REWARD, smoke_recipe

    recipe = load_recipe(TINY, [])
    assert (recipe.eval.rounds, recipe.eval.dump, recipe.log.trajectories_every) != (0, 0, 0)
    r = smoke_recipe(recipe, tmp_path)
    assert (r.eval.rounds, r.eval.dump, r.log.trajectories_every) == (0, 0, 0)
    assert (r.rewards.task[-1].name, r.rewards.task[-1].weight) == (NOISE_REWARD, 1.0)
    assert r.policy.model == recipe.policy.model


class _Trainer:
    """Stands in for r3_rl.trainer.Trainer: writes ``rows`` as metrics.jsonl and, if asked, a checkpoint."""

    rows: list[dict] = []
    checkpoint = True
    steps: list[int] = []

    def __init__(self, recipe, run) -> None:  # noqa: ANN001
        self.recipe, self.run = recipe, run

    def train(self) -> None:
        _Trainer.steps.append(self.recipe.steps)
        (self.run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in _Trainer.rows) + "\n")
        if _Trainer.checkpoint:
            (self.run / "checkpoints" / "step_000002").mkdir(parents=True)


def test_smoke_train_returns_the_two_step_rows_and_refuses_a_bad_run(monkeypatch: pytest.MonkeyPatch,
                                                                       tmp_path: Path) -> None:
    import r3_rl.trainer
    from r3_rl.doctor.smoke import smoke_train

    monkeypatch.setattr(r3_rl.trainer, "Trainer", _Trainer)
    recipe = load_recipe(TINY, [])
    eval_row = {"eval/accuracy": 0.5}
    steps = [{"batch/items": 4, "learner/loss": 0.5}, {"batch/items": 4, "learner/loss": 0.25}]
    monkeypatch.setattr(_Trainer, "rows", [eval_row, *steps])
    assert smoke_train(recipe, tmp_path / "a") == steps and _Trainer.steps[-1] == 2
    monkeypatch.setattr(_Trainer, "rows", [{"batch/items": 4, "learner/loss": 0.5, "rollout/failed_rewards": 2},
                                           {"batch/items": 4, "learner/loss": float("nan"),
                                            "rollout/failed_rewards": 3}])
    with pytest.raises(RuntimeError, match=r"did not give two finite losses \(got \[0\.5, nan\]; failed rewards so "
                                           r"far: 5\)"):
        smoke_train(recipe, tmp_path / "b")
    monkeypatch.setattr(_Trainer, "rows", steps)
    monkeypatch.setattr(_Trainer, "checkpoint", False)
    with pytest.raises(RuntimeError, match="^2-step training wrote no checkpoint$"):
        smoke_train(recipe, tmp_path / "c")


# ------------------------------------------------------------------------------------------ gpu_layout
def test_gpu_layout_edges() -> None:
    from r3_rl.errors import UserError
    from r3_rl.gpu_layout import actor_recipe_data, check_gpu_shares, gpus_to_place

    assert gpus_to_place([(1, 1 + 1e-12)]) == 1 and gpus_to_place([(2, 2.0)]) == 4
    assert actor_recipe_data(load_recipe(TINY, []))["policy"]["device"] == "cpu"
    ranks = load_recipe(TINY, ["policy.device=cuda", "learner.ranks=2", "learner.gpus_per_rank=1.5"])
    with pytest.raises(UserError, match=r"key 'learner.gpus_per_rank': 1.5 with policy.device cuda"):
        check_gpu_shares(ranks, "r.yaml")
    local = load_recipe(TINY, ["policy.device=cuda", "rollout.backend=local", "rollout.gpus_per_worker=0"])
    check_gpu_shares(local, "r.yaml")  # local rollout workers are no Ray actors: no share needed


# ------------------------------------------------------------------------------------------ environment
def test_the_commit_and_uncommitted_changes_come_from_git_status(monkeypatch: pytest.MonkeyPatch) -> None:
    from r3_rl import environment

    answers: dict[str, str] = {"--show-toplevel": str(Path(environment.__file__).resolve().parent.parent),
                               "HEAD": "0123abc", "--porcelain": ""}

    def run(cmd, capture_output, text, timeout):  # noqa: ANN001, ANN202
        return SimpleNamespace(returncode=0, stdout=answers[cmd[-1]] + "\n")

    monkeypatch.setattr(environment.subprocess, "run", run)
    monkeypatch.setattr(environment, "package_version", lambda name: "9.9")
    assert environment.code_revision() == {"version": "9.9", "commit": "0123abc", "uncommitted_changes": False}
    answers["--porcelain"] = "?? new_module.py"
    assert environment.code_revision()["uncommitted_changes"] is True
    answers["--show-toplevel"] = "/somewhere/else"  # an installed copy inside another repository
    assert environment.code_revision() == {"version": "9.9"}


def test_a_cpu_model_name_keeps_its_own_colons(monkeypatch: pytest.MonkeyPatch) -> None:
    import io

    from r3_rl import environment

    cpuinfo = "processor\t: 0\nmodel name\t: Acme Core X: rev 2 @ 3.0GHz\nflags\t: sse\n"
    monkeypatch.setattr(environment, "open", lambda path, **kw: io.StringIO(cpuinfo), raising=False)
    assert environment.cpu_model() == "Acme Core X: rev 2 @ 3.0GHz"


def test_the_cuda_runtime_is_recorded_only_with_gpus(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    from r3_rl import environment

    monkeypatch.setattr(environment, "code_revision", lambda: {"version": "9.9"})
    monkeypatch.setattr(torch.version, "cuda", "12.4")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    env = environment.describe_environment()
    assert (env["gpus"], env["cuda"]) == ([], None)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i: ["NVIDIA A100", "NVIDIA H100"][i])
    env = environment.describe_environment()
    assert (env["gpus"], env["cuda"]) == (["NVIDIA A100", "NVIDIA H100"], "12.4")
    assert ", GPUs 2 x NVIDIA A100" in environment.summary_line(env)


# ------------------------------------------------------------------------------------------ plan: reward models
def test_reward_model_edges(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from safetensors.torch import save_file
    import torch

    from r3_rl.plan import reward_models as rm

    assert rm.RewardModel("CLIP", "m", "float32", None, "x").describe() == "CLIP: m, float32 (x)"
    bad = tmp_path / "bad-clip"
    bad.mkdir()
    save_file({"w": torch.zeros(2, 3)}, str(bad / "model.safetensors"))
    (bad / "config.json").write_text("{not json")
    assert rm._params(str(bad)) == (None, "not on this machine")
    spec = SimpleNamespace
    arch = rm.models_of(spec(name="geneval", options={"clip_backend": "open_clip", "clip_model": "ViT-B-32",
                                                      "model": "me/det"}))
    assert [(m.role, m.model) for m in arch] == [("CLIP (open_clip)", "ViT-B-32"),
                                                 ("geneval detector (mask2former)", "me/det")]
    monkeypatch.setattr(rm, "_params", lambda model: (None, "not on this machine"))
    both = rm.reward_models([spec(name="geneval", options={"model": "me/x"}), spec(name="clip", options={"model": "me/x"})])
    assert [(m.role, m.model) for m in both] == [("geneval detector (mask2former)", "me/x"), ("CLIP", rm.CLIP_L14)]


# ------------------------------------------------------------------------------------------ plan: BAGEL shape
def test_bagel_vae_header_reads_only_the_decoders_conv_out(tmp_path: Path) -> None:
    from safetensors.torch import save_file
    import torch

    from r3_rl.plan.bagel_shape import _vae_header

    save_file({"decoder.conv_out.weight": torch.zeros(3, 64, 3, 3), "encoder.conv_out.weight": torch.zeros(8, 32, 3, 3)},
              str(tmp_path / "ae.safetensors"))
    assert _vae_header(tmp_path / "ae.safetensors") == (3 * 64 * 9 + 8 * 32 * 9, 64)


def test_a_bagel_named_by_its_folder_name_says_it_is_not_here() -> None:
    from r3_rl.plan.bagel_shape import bagel_shape

    def source(model: str) -> str:
        return bagel_shape(SimpleNamespace(policy=SimpleNamespace(model=model, options={}))).source

    assert source("BAGEL-7B-MoT") == ("built-in shape of ByteDance-Seed/BAGEL-7B-MoT (its published configs; "
                                      "BAGEL-7B-MoT is not on this machine)")
    assert source("ByteDance-Seed/BAGEL-7B-MoT") == "built-in shape of ByteDance-Seed/BAGEL-7B-MoT (its published configs)"


def test_bagel_image_tokens_follow_the_checkpoints_latent_patch() -> None:
    """A checkpoint whose generation tokens are 1x1 VAE latents (8 px a side, not BAGEL-7B's 16): a 256 px image
    is 32 x 32 tokens."""
    from r3_rl.plan.bagel_shape import bagel_shape_from_config
    from r3_rl.policy.bagel.config import TokenIds
    from r3_rl.policy.bagel.recipe import bagel_options
    from r3_rl.policy.bagel.tiny import bagel_shaped_config

    config = bagel_shaped_config(128, 1, 64, TokenIds())
    config.latent_patch_size = 1
    config.max_latent_size = 32
    assert config.latent_downsample == 8
    shape = bagel_shape_from_config(config, bagel_options({"image_size": 256}), "hand", vae_params=1000,
                                    vae_channels=64)
    assert shape.image_tokens == 32 * 32


def test_bagel_head_dim_is_the_configs_own_when_it_names_one() -> None:
    """An llm_config.json with head_dim 32 at hidden 128 and one head: the attention is built 32 wide (mot.py reads
    head_dim first), so the plan's KV sizes use 32, not 128 // 1."""
    from r3_rl.plan.bagel_shape import bagel_shape_from_config
    from r3_rl.policy.bagel.config import TokenIds
    from r3_rl.policy.bagel.recipe import bagel_options
    from r3_rl.policy.bagel.tiny import bagel_shaped_config

    config = bagel_shaped_config(128, 1, 64, TokenIds())
    config.llm.head_dim = 32
    assert config.llm.num_attention_heads == 1
    shape = bagel_shape_from_config(config, bagel_options({}), "hand", vae_params=1000, vae_channels=64)
    assert shape.head_dim == 32
