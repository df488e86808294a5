"""Exact small cases for ``r3-rl doctor``'s checks and findings, environment.json, the Ctrl-C / SIGTERM watchdog
and the console's lines: the summary line's counts, offline mode forced, a check's own error in one line, a
finding's printed form, the disk / NCCL / 2-step / Ray-cluster / host-memory verdicts at their boundaries, the
smoke recipe leaving the user's recipe alone, environment comparisons with a side missing, and NaN figures shown
as "-" (round 12D audit).

No GPU, no Ray, no training: GPUs, the plan, the cluster and the 2-step training are injected."""
from __future__ import annotations

import io
import json
import os
import signal
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from conftest import REPO
from r3_rl.config import load_recipe
from r3_rl.doctor.base import Context, Finding, ok, skipped
from r3_rl.doctor.devices import GIB, GpuInfo

TINY = REPO / "recipes" / "tiny_blocks.yaml"


def _ctx(sets: list[str] | None = None, gpus: list[GpuInfo] | None = None, **kw) -> Context:
    ctx = Context(TINY, load_recipe(TINY, sets or []), **kw)
    if gpus is not None:
        ctx._memo["gpus"] = gpus
    return ctx


def _gpus(n: int) -> list[GpuInfo]:
    return [GpuInfo(i, "NVIDIA H100", 80 * GIB, 79 * GIB) for i in range(n)]


# ------------------------------------------------------------------------------------------ doctor: the run
def test_the_summary_line_counts_the_skipped_checks(monkeypatch: pytest.MonkeyPatch,
                                                    capsys: pytest.CaptureFixture) -> None:
    from r3_rl import doctor as doc

    monkeypatch.setattr(doc, "CHECKS", [("a", lambda c: ok("fine")), ("b", lambda c: skipped("n/a")),
                                        ("c", lambda c: [skipped("n/a"), ok("fine")]), ("d", lambda c: ok("x"))])
    found: list[Finding] = []
    assert doc.doctor(TINY, [], emit=found.append) == 0
    assert capsys.readouterr().out == "r3-rl doctor: every check passed (2 skipped): the run can start\n"
    assert [(f.check, f.status) for f in found] == [("recipe", "ok"), ("a", "ok"), ("b", "skipped"),
                                                    ("c", "skipped"), ("c", "ok"), ("d", "ok")]


def test_offline_mode_is_forced_even_where_the_user_set_it_off(monkeypatch: pytest.MonkeyPatch) -> None:
    """``HF_HUB_OFFLINE=0`` in the shell must not let the doctor download (it promises to look only locally)."""
    from huggingface_hub import constants

    from r3_rl.doctor import offline

    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "0")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    offline()
    assert os.environ["HF_HUB_OFFLINE"] == "1" and os.environ["TRANSFORMERS_OFFLINE"] == "1"
    assert constants.HF_HUB_OFFLINE is True


def test_a_check_that_breaks_is_one_line_naming_its_first_line(monkeypatch: pytest.MonkeyPatch) -> None:
    from r3_rl import doctor as doc
    from r3_rl.errors import UserError

    def broken(ctx):
        raise ValueError("  first line\nsecond line\n")

    def refused(ctx):
        raise UserError("ray.address: bad value")

    monkeypatch.setattr(doc, "CHECKS", [("broken", broken), ("refused", refused)])
    ctx = _ctx()
    found = doc.run_checks(ctx, lambda f: None)
    assert [(f.check, f.status, f.detail, f.fix) for f in found] == [
        ("broken", "problem", "the check itself failed: ValueError: first line", ""),
        ("refused", "problem", "ray.address: bad value", "")]
    assert ctx.problems == 2


def test_a_finding_prints_in_aligned_columns() -> None:
    assert Finding("ok", "all good", "", "disk").line() == "ok       disk      all good"
    assert Finding("problem", "full", "free space", "disk").line() == "problem  disk      full; fix: free space"
    assert Finding("skipped", "no GPU", "", "train").line() == "skipped  train     no GPU"


# ------------------------------------------------------------------------------------------ doctor: base
def test_disk_free_reads_the_nearest_existing_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from r3_rl.doctor import base

    asked: list[Path] = []
    monkeypatch.setattr(base.shutil, "disk_usage", lambda p: asked.append(Path(p)) or SimpleNamespace(free=123))
    assert base.disk_free(tmp_path / "a" / "b" / "c") == 123
    assert asked == [tmp_path.resolve()]


def test_a_fact_that_failed_is_computed_once_and_raised_to_every_check() -> None:
    ctx = _ctx()
    calls: list[int] = []

    def compute():
        calls.append(1)
        raise OSError("no such folder")

    for _ in range(3):
        with pytest.raises(OSError, match="no such folder"):
            ctx.memo("model", compute)
    assert calls == [1]
    assert ctx.memo("n", lambda: 7) == 7 and ctx.memo("n", lambda: 8) == 7


# ------------------------------------------------------------------------------------------ doctor: checks
def test_human_bytes_switches_unit_at_a_thousand() -> None:
    from r3_rl.doctor.checks import human_bytes

    assert [human_bytes(n) for n in (0, 999, 1000, 1_500_000, 2.25e9, 1e15)] == [
        "0 B", "999 B", "1.0 KB", "1.5 MB", "2.2 GB", "1000.0 TB"]


def test_the_disk_line_names_the_three_biggest_parts(monkeypatch: pytest.MonkeyPatch) -> None:
    """need = 2 checkpoints x (15 - 2 GB reference) + one 2 GB reference + 4 GB of final fp32 weights = 32 GB."""
    import r3_rl.weights as weights
    from r3_rl.doctor.checks import check_disk

    parts = {"model": 4e9, "optimiser": 8e9, "reference": 2e9, "parent buffer": 1e9, "DeepSpeed module": 0}
    monkeypatch.setattr(weights, "checkpoint_bytes", lambda recipe, params, pixels: dict(parts))
    monkeypatch.setattr(weights, "checkpoints_on_disk", lambda recipe: 2)
    for free, status in ((32e9 - 1, "problem"), (32e9, "ok"), (100e9, "ok")):
        ctx = _ctx(["out_dir=/data/runs", "policy.dtype=float32"], free_bytes=lambda p, f=free: int(f))
        ctx._memo["model"] = SimpleNamespace(params=10**9, image_pixels=0)
        found = check_disk(ctx)
        assert found.status == status
    assert found.detail == ("/data/runs: needs up to 32.0 GB (2 checkpoint(s) of ~15.0 GB: optimiser 8.0 GB, "
                            "model 4.0 GB, reference 2.0 GB; + final weights), 100.0 GB free")


def test_each_distinct_reward_is_set_up_once_under_every_role_it_has() -> None:
    """tiny_blocks: blocks (binary false) trains, blocks (binary true) evaluates: two rewards, two lines; the same
    options in both roles are one reward, one line."""
    from r3_rl.doctor.checks import check_rewards

    found = check_rewards(_ctx())
    assert [(f.check, f.status) for f in found] == [("reward blocks (task)", "ok"), ("reward blocks (eval)", "ok")]
    same = '[{"name": "blocks", "options": {"binary": false}}]'
    found = check_rewards(_ctx([f"rewards.eval={same}"]))
    assert [(f.check, f.status) for f in found] == [("reward blocks (task+eval)", "ok")]


# ------------------------------------------------------------------------------------------ doctor: gpu
def test_nccl_runs_over_the_gpus_the_recipe_uses_not_every_visible_one(monkeypatch: pytest.MonkeyPatch) -> None:
    from r3_rl.doctor import gpu

    worlds: list[int] = []
    monkeypatch.setattr(gpu, "all_reduce_check", lambda world, backend="nccl", timeout=120.0:
                        worlds.append(world) or 0.25)
    found = gpu.check_nccl(_ctx(["policy.device=cuda"], _gpus(4)))
    assert worlds == [1] and (found.status, found.detail) == ("ok", "all-reduce over 1 GPU(s) correct (0.2 s "
                                                                     "including start-up)")
    found = gpu.check_nccl(_ctx([], _gpus(4)))  # a CPU recipe on a GPU node
    assert worlds == [1] and (found.status, found.detail) == ("skipped", "the recipe puts nothing on this "
                                                                          "machine's GPUs")


def test_actors_on_a_joined_cluster_need_no_gpu_here() -> None:
    from r3_rl.doctor.gpu import needed_gpus_here

    sets = ["rollout.backend=ray", "rollout.workers=2", "rollout.gpus_per_worker=1"]
    assert needed_gpus_here(load_recipe(TINY, sets)) == (2, ["2 for Ray actors on a local Ray"])
    assert needed_gpus_here(load_recipe(TINY, sets + ["ray.address=10.0.0.1:6379"])) == (0, [])


def _train_ctx(tmp_path: Path, problems: int) -> Context:
    ctx = _ctx([f"out_dir={tmp_path}"], _gpus(1))
    ctx._memo["model"] = SimpleNamespace(folder=None)
    ctx.problems = problems
    return ctx


def test_one_problem_above_is_enough_to_skip_the_training(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from r3_rl.doctor import smoke
    from r3_rl.doctor.gpu import check_train

    def no_training(*args, **kwargs):
        raise AssertionError("trained despite a problem above")
    monkeypatch.setattr(smoke, "smoke_train", no_training)
    found = check_train(_train_ctx(tmp_path, 1))
    assert (found.status, found.detail) == ("skipped", "fix the problems above first")


def test_an_out_of_memory_training_gets_the_memory_fix(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from r3_rl.doctor import smoke
    from r3_rl.doctor.gpu import check_train

    def fails(message):
        def train(recipe, workdir, model_dir=None):
            raise RuntimeError(message)
        return train

    monkeypatch.setattr(smoke, "smoke_train", fails("CUDA out of memory. Tried to allocate 2.00 GiB\nmore"))
    found = check_train(_train_ctx(tmp_path, 0))
    assert found.status == "problem"
    assert found.detail == "2-step training failed: RuntimeError: CUDA out of memory. Tried to allocate 2.00 GiB"
    assert found.fix == "lower learner.micro_batch_size or tree.group_size (see `r3-rl plan`)"
    monkeypatch.setattr(smoke, "smoke_train", fails("NCCL error"))
    found = check_train(_train_ctx(tmp_path, 0))
    assert found.fix == "run `r3-rl train` with --set steps=2 to see the full error"


# ------------------------------------------------------------------------------------------ doctor: memory
def test_host_memory_exactly_the_nodes_is_enough(tmp_path: Path) -> None:
    from r3_rl.doctor.memory_check import _host

    recipe = load_recipe(TINY, [])
    host = {"offloaded optimiser states": 60e9, "parent buffer": 25e9, "eval chains": 10e9, "Ray x": 5e9}
    found = _host(recipe, host, int(100e9), False)
    assert [(f.status, f.detail) for f in found] == [
        ("ok", "host memory: the run holds 100.0 GB beyond its processes' own (offloaded optimiser states 60.0, "
               "parent buffer 25.0, eval chains 10.0); this machine has 100.0 GB")]
    assert _host(recipe, host, int(100e9) - 1, False)[0].status == "problem"


def test_a_gpu_that_does_not_fit_gets_the_plans_first_two_changes(monkeypatch: pytest.MonkeyPatch) -> None:
    """The plan is injected: its fullest GPU is named against 90% of the smallest visible GPU, and the fix is the
    plan's first two pieces of advice (or its errors)."""
    from r3_rl.doctor.memory_check import check_memory
    from r3_rl.plan import render, report

    plan = SimpleNamespace(gpu_totals=lambda: [("1 learner rank", 50e9), ("1 rollout worker", 60e9)], fits=False,
                           errors=[], host={})
    monkeypatch.setattr(report, "make_plan", lambda recipe, gpus, memory_gb: plan)
    monkeypatch.setattr(render, "advice", lambda p: ["learner.ranks: 2", "eval.batch_size: 1", "learner.lora"])
    ctx = _ctx(["policy.device=cuda"], [GpuInfo(0, "A", int(40e9), int(40e9)), GpuInfo(1, "B", int(80e9), 0)],
               host_memory=lambda: int(8e9))
    found = [(f.check, f.status, f.detail, f.fix) for f in check_memory(ctx)]
    assert found == [
        ("memory", "problem", "GPU memory: the fullest GPU holds 1 rollout worker, 60.0 GB by `r3-rl plan`, against "
                              "90% of this machine's 40.0 GB GPUs", "learner.ranks: 2; eval.batch_size: 1"),
        ("memory", "ok", "host memory: the run holds nothing beyond its processes' own; this machine has 8.0 GB", "")]
    plan.errors = ["the policy does not fit one GPU"]
    assert check_memory(ctx)[0].fix == "the policy does not fit one GPU"


def test_a_ray_store_exactly_its_need_is_enough() -> None:
    from r3_rl.doctor.memory_check import _host

    recipe = load_recipe(TINY, ["ray.object_store_gb=50"])
    for store, status in ((50e9, "ok"), (50e9 + 1, "problem")):
        found = _host(recipe, {"Ray object store": store}, int(1e12), True)
        assert [f.status for f in found] == ["ok", status]
    assert found[1].fix.startswith("--set ray.object_store_gb=63 ")  # ceil(1.25 x 50.000000001)


# ------------------------------------------------------------------------------------------ doctor: ray
def _scripted_cluster(monkeypatch: pytest.MonkeyPatch, info: dict) -> Any:
    """``r3_rl.doctor.ray_check`` with a head that answers and a cluster reporting ``info`` (no Ray joined)."""
    from r3_rl.doctor import ray_check

    monkeypatch.setattr(ray_check, "tcp_probe", lambda host, port, timeout: None)
    monkeypatch.setattr(ray_check, "cluster_resources", lambda address, timeout: info)
    return ray_check


def test_a_port_that_is_not_a_number_is_no_address() -> None:
    from r3_rl.doctor.ray_check import host_port

    assert host_port("head:abc") is None and host_port("head:") is None and host_port(":6379") is None


def test_a_cluster_is_judged_on_its_free_resources(monkeypatch: pytest.MonkeyPatch) -> None:
    """4 GPUs in the cluster, 1 free: Ray would keep two 1-GPU rollout workers pending."""
    ray_check = _scripted_cluster(monkeypatch, {
        "total": {"CPU": 16.0, "GPU": 4.0}, "available": {"CPU": 16.0, "GPU": 1.0}, "nodes": 2})
    ctx = _ctx(["rollout.backend=ray", "rollout.workers=2", "rollout.gpus_per_worker=1", "rollout.cpus_per_worker=1",
                "ray.address=10.0.0.1:6379"], [])
    found = ray_check.check_ray(ctx)
    assert found.status == "problem"
    assert found.detail.startswith("cluster at 10.0.0.1:6379: 2 node(s), 16 CPU (16 free), 4 GPU (1 free); ")
    assert found.detail.endswith(": 2 GPU requested, 1 free (pending actors would wait forever)")


@pytest.mark.parametrize("workers,status", [(3, "problem"), (2, "ok")])
def test_fractional_gpu_shares_on_a_cluster_are_packed_not_summed(monkeypatch: pytest.MonkeyPatch, workers: int,
                                                                  status: str) -> None:
    """Three 0.6-GPU workers sum to 1.8 <= 2 free GPUs, but each share sits on one GPU: Ray fits two and keeps the
    third pending for ever.  The doctor compared the sum with the free GPUs and said ok."""
    ray_check = _scripted_cluster(monkeypatch, {
        "total": {"CPU": 16.0, "GPU": 2.0}, "available": {"CPU": 16.0, "GPU": 2.0}, "nodes": 1})
    ctx = _ctx(["rollout.backend=ray", f"rollout.workers={workers}", "rollout.gpus_per_worker=0.6",
                "rollout.cpus_per_worker=1", "ray.address=10.0.0.1:6379"], [])
    found = ray_check.check_ray(ctx)
    assert found.status == status, found.detail
    if status == "problem":
        assert found.detail.endswith("1.8 GPU (rollout.workers 3 x (1 CPU, 0.6 GPU)): the GPU shares pack onto 3 "
                                     "whole GPUs (one actor's share never spans two), 2 free (pending actors would "
                                     "wait forever)")


# ------------------------------------------------------------------------------------------ doctor: smoke
def test_the_smoke_recipe_leaves_the_users_recipe_alone(tmp_path: Path) -> None:
    from r3_rl.doctor.smoke import NOISE_REWARD, smoke_recipe

    recipe = load_recipe(TINY, ["steps=50", "warmstart.steps=3", "eval.every=5", "log.console=true"])
    before = recipe.model_dump()
    r = smoke_recipe(recipe, tmp_path, tmp_path / "model")
    assert recipe.model_dump() == before
    assert (r.steps, r.save_every, r.out_dir, r.warmstart.steps, r.eval.every, r.eval.size) == (
        2, 0, str(tmp_path), 0, 0, 1)
    assert r.log.console is False and r.policy.model == str(tmp_path / "model")
    assert [s.name for s in r.rewards.task] == [s.name for s in recipe.rewards.task] + [NOISE_REWARD]


def test_random_model_like_never_adds_layers_and_refuses_an_unknown_dtype(tmp_path: Path) -> None:
    from transformers import AutoConfig

    from r3_rl.doctor.smoke import random_model_like
    from r3_rl.policy.janus_tiny import make_tiny_janus

    with pytest.raises(ValueError, match="'float64' is not one of float32, bfloat16, float16"):
        random_model_like(tmp_path / "absent", tmp_path / "out", dtype="float64")
    src = Path(make_tiny_janus(tmp_path / "janus", num_layers=1))
    dst = random_model_like(src, tmp_path / "random", layers=3)
    a, b = AutoConfig.from_pretrained(src), AutoConfig.from_pretrained(dst)
    for key in ("text_config", "vision_config"):
        assert getattr(b, key).num_hidden_layers == getattr(a, key).num_hidden_layers <= 1


# ------------------------------------------------------------------------------------------ environment
def test_a_record_without_a_section_differs_by_the_whole_section() -> None:
    """An older record lacking ``packages`` (or a hand-edited one): named as a change, never a crash."""
    from r3_rl.environment import differences

    assert differences({"packages": {"torch": "2.13.0"}}, {}) == ["packages {'torch': '2.13.0'} -> None"]
    assert differences({}, {"variables": {"OMP_NUM_THREADS": "1"}}) == ["variables None -> {'OMP_NUM_THREADS': '1'}"]


def test_a_file_of_exactly_the_limit_is_read(tmp_path: Path) -> None:
    from r3_rl.environment import ENVIRONMENT_FILE, MAX_FILE_BYTES, read_records

    text = json.dumps({"records": [{"command": "train"}]})
    (tmp_path / ENVIRONMENT_FILE).write_text(text + " " * (MAX_FILE_BYTES - len(text)))
    assert (tmp_path / ENVIRONMENT_FILE).stat().st_size == MAX_FILE_BYTES
    assert read_records(tmp_path) == [{"command": "train"}]
    (tmp_path / ENVIRONMENT_FILE).write_text(text + " " * (MAX_FILE_BYTES + 1 - len(text)))
    assert read_records(tmp_path) == []


def test_a_checkpoint_dir_without_records_falls_back_to_this_runs_start(tmp_path: Path) -> None:
    """A run dir written before environment.json existed: the resume compares with this run dir's first record."""
    from r3_rl.environment import record_environment

    base = {"python": "3.11.7", "cpu": "AMD EPYC", "packages": {"torch": "2.13.0"}}
    old = tmp_path / "old"
    old.mkdir()
    record_environment(tmp_path, "train", now=base)
    _, changed = record_environment(tmp_path, "resume", started_in=old, now={**base, "cpu": "Intel Xeon"})
    assert changed == ["cpu AMD EPYC -> Intel Xeon"]


# ------------------------------------------------------------------------------------------ interrupts
def test_a_second_signal_ends_the_grace_timer_too() -> None:
    """After a second Ctrl-C the exit is already under way: the grace timer must not call ``exit_fn`` again."""
    from r3_rl.interrupts import InterruptWatchdog

    exits: list[tuple[str, int]] = []
    dog = InterruptWatchdog(grace_s=0.2, exit_fn=lambda why, code: exits.append((why, code)))
    with pytest.raises(KeyboardInterrupt):
        dog(signal.SIGINT, None)
    dog(signal.SIGTERM, None)
    assert dog.timer is not None
    dog.timer.join(2.0)
    time.sleep(0.1)
    assert exits == [("second SIGTERM during clean-up", 143)]


# ------------------------------------------------------------------------------------------ console
def test_an_undefined_figure_is_a_dash_on_the_status_line() -> None:
    from r3_rl.tracking.console import status_line

    line = status_line({"1_reward/generate": float("nan"), "2_accuracy/round0": float("inf"),
                        "6_refine/delta_mean": 0.125, "learner/loss": float("-inf")})
    assert line == "reward A -  acc A -  refine dR +0.125  verdict -  stop -  loss -"


def test_a_plain_line_is_exact() -> None:
    from r3_rl.tracking.console import Console

    buf = io.StringIO()
    c = Console(every=100, file=buf, tty=False)
    c.step(0, 100, {"1_reward/generate": 0.5, "learner/loss": -0.01}, elapsed=3725.0)
    assert buf.getvalue() == ("step   1/100  reward A 0.500  acc A -  refine dR -  verdict -  stop -  loss -0.0100  "
                              "elapsed 1:02:05  eta 102:26:15\n")


def test_a_prompt_file_beside_the_blocks_generator_is_a_data_problem() -> None:
    """``r3-rl train`` refuses ``data.train`` with ``data.source: blocks`` (the file would never be read); the
    doctor said "Blocks generator" ok and "the run can start"."""
    from r3_rl.doctor.checks import check_data

    found = check_data(_ctx(["data.train=prompts.jsonl"]))
    assert found.status == "problem"
    assert found.detail == (f"{TINY}: key 'data.train': 'prompts.jsonl' is not read with data.source 'blocks' (its "
                            f"prompts are generated); set data.source: geneval, tiif or hf to use it")
    assert check_data(_ctx()).status == "ok"


def test_multi_gpu_actors_are_placed_node_by_node() -> None:
    """Best fit, largest first: a 4-GPU actor takes a node with 4 free; 2-GPU actors fill the 2s; what is left over is
    named by its recipe key, once per actor."""
    from r3_rl.doctor.ray_check import unplaced_multi_gpu_actors

    ranks = ("learner.ranks", 2, 4.0)
    assert unplaced_multi_gpu_actors([ranks], [4.0, 2.0, 2.0]) == ["learner.ranks"]
    assert unplaced_multi_gpu_actors([ranks], [4.0, 4.0]) == []
    assert unplaced_multi_gpu_actors([ranks], [8.0]) == []
    # largest first: the 4-GPU worker takes the 5-GPU node, one 2-GPU rank the 3, the other finds no 2 free
    # (first fit places these alike; test_exact_doctor_round16 has the case where best fit differs)
    assert unplaced_multi_gpu_actors([("learner.ranks", 2, 2.0), ("rollout.workers", 1, 4.0)], [5.0, 3.0]) == \
        ["learner.ranks"]
    assert unplaced_multi_gpu_actors([("rollout.workers", 2, 2.0), ("rollout.workers", 1, 3.0)], [5.0, 2.0]) == []
    # 1-GPU and fractional actors are the totals' to judge; 1.9999999 free is 2 GPUs, 1.5 is one
    assert unplaced_multi_gpu_actors([("rollout.workers", 9, 1.0), ("rollout.reward_workers", 3, 0.5)], [1.0]) == []
    assert unplaced_multi_gpu_actors([("learner.ranks", 1, 2.0)], [1.9999999]) == []
    assert unplaced_multi_gpu_actors([("learner.ranks", 1, 2.0)], [1.5, 1.5]) == ["learner.ranks"]


@pytest.mark.parametrize("per_node,status", [([4.0, 2.0, 2.0], "problem"), ([4.0, 4.0], "ok"), (None, "ok")])
def test_a_cluster_is_judged_node_by_node_for_multi_gpu_actors(monkeypatch: pytest.MonkeyPatch, per_node: Any,
                                                                status: str) -> None:
    """Two 4-GPU learner ranks on 8 free GPUs, but 4 + 2 + 2 of them: Ray keeps the second rank pending for ever, and
    the doctor, comparing totals, said ok.  Without the per-node figures (an older Ray) the totals decide."""
    ray_check = _scripted_cluster(monkeypatch, {
        "total": {"CPU": 32.0, "GPU": 8.0}, "available": {"CPU": 32.0, "GPU": 8.0}, "nodes": 3,
        "free_gpus_per_node": per_node})
    ctx = _ctx(["learner.ranks=2", "learner.gpus_per_rank=4", "learner.cpus_per_rank=1",
                "ray.address=10.0.0.1:6379"], [])
    found = ray_check.check_ray(ctx)
    assert found.status == status, found.detail
    if status == "problem":
        assert found.detail.endswith("8 GPU (learner.ranks 2 x (1 CPU, 4 GPU)): 1 of learner.ranks fit on no node (one "
                                     "actor's GPUs sit on one node; GPUs free per node: 4, 2, 2) (pending actors "
                                     "would wait forever)")
