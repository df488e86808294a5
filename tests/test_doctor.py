"""`r3-rl doctor`: the tiny recipe passes; a missing model, an unreachable Ray, a reward server that is down and
a full disk are each reported in one line with exit code 2; the facts behind the checks are right."""
from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from r3_rl.cli import main
from r3_rl.config import load_recipe
from r3_rl.doctor import doctor
from r3_rl.doctor.base import Finding
from r3_rl.doctor.gpu import needed_gpus_here
from r3_rl.doctor.ray_check import cluster_resources, ray_demand, shortfall
from r3_rl.weights import WeightsMissing, locate, weight_files

NO_GPU = not torch.cuda.is_available()


def closed_port() -> int:
    """A 127.0.0.1 port nothing listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run_doctor(recipe: Path, sets: list[str], **context) -> tuple[int, list[Finding]]:
    found: list[Finding] = []
    rc = doctor(recipe, sets, emit=found.append, **context)
    return rc, found


def by_check(found: list[Finding]) -> dict[str, Finding]:
    return {f.check: f for f in found}


def test_tiny_recipe_passes(repo: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    rc = main(["doctor", str(repo / "recipes" / "tiny_blocks.yaml"), "--set", f"out_dir={tmp_path}"])
    out = capsys.readouterr().out.strip().splitlines()
    assert rc == 0, out
    checks = {line.split()[1]: line.split()[0] for line in out[:-1]}
    assert checks["recipe"] == checks["data"] == checks["weights"] == checks["disk"] == "ok"
    assert checks["reward"] == "ok"  # "reward blocks (task)" and "(eval)": their options differ; each constructed and set up
    assert checks["ray"] == "skipped"
    if NO_GPU:  # every check that needs a GPU says so, and the rest still ran
        gpu_lines = [line for line in out[:-1] if line.split()[1] in ("gpus", "nccl", "train")]
        assert len(gpu_lines) == 3 and all(line.split()[0] == "skipped" and "no GPU" in line for line in gpu_lines)
    assert out[-1].startswith("r3-rl doctor: every check passed")


def _remote_down(port: int) -> list[str]:
    task = [{"name": "remote", "options": {"url": f"http://127.0.0.1:{port}", "health_timeout": 2}}]
    return [f"rewards.task={json.dumps(task)}"]


@pytest.mark.parametrize("case", ["missing model", "ray unreachable", "reward server down", "disk full"])
def test_each_problem_is_one_line_and_exit_2(repo: Path, tmp_path: Path, case: str) -> None:
    port = closed_port()
    sets = [f"out_dir={tmp_path}"]
    context = {}
    expect = {"missing model": ("weights", f"{tmp_path / 'no-such-model'}"),
              "ray unreachable": ("ray", f"127.0.0.1:{port}"),
              "reward server down": ("reward remote (task)", f"http://127.0.0.1:{port}"),
              "disk full": ("disk", "1.0 MB free")}[case]
    if case == "missing model":
        sets.append(f"policy.model={tmp_path / 'no-such-model'}")
    elif case == "ray unreachable":
        sets += ["rollout.backend=ray", f"ray.address=127.0.0.1:{port}"]
    elif case == "reward server down":
        sets += _remote_down(port)
    else:
        context["free_bytes"] = lambda path: 10**6
    rc, found = run_doctor(repo / "recipes" / "tiny_blocks.yaml", sets, **context)
    problems = [f for f in found if f.status == "problem"]
    assert rc == 2
    assert [f.check for f in problems] == [expect[0]], [f.line() for f in problems]
    line = problems[0].line()
    assert expect[1] in line and "; fix: " in line and "\n" not in line
    assert by_check(found)["recipe"].status == "ok" and len(found) >= 8  # every other check still ran


def test_cli_prints_one_line_per_check_and_exits_2(repo: Path, tmp_path: Path) -> None:
    port = closed_port()
    res = subprocess.run([sys.executable, "-m", "r3_rl.cli", "doctor", str(repo / "recipes" / "tiny_blocks.yaml"),
                          "--set", f"out_dir={tmp_path}", "--set", "rollout.backend=ray",
                          "--set", f"ray.address=127.0.0.1:{port}"], capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr[-2000:]
    lines = res.stdout.strip().splitlines()
    ray = [ln for ln in lines if ln.split()[:2] == ["problem", "ray"]]
    assert len(ray) == 1 and "nothing answers" in ray[0] and "ray start --head" in ray[0]
    assert lines[-1] == "r3-rl doctor: 1 problem(s): the run cannot start as it is"


def test_a_recipe_that_does_not_load_is_one_problem(tmp_path: Path) -> None:
    bad = tmp_path / "r.yaml"
    bad.write_text("learner:\n  lrr: 1\n")
    rc, found = run_doctor(bad, [])
    assert rc == 2 and [(f.check, f.status) for f in found] == [("recipe", "problem")]
    assert "did you mean 'lr'" in found[0].detail


def test_hub_models_missing_from_the_cache_say_how_to_download(repo: Path, tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    rc, found = run_doctor(repo / "recipes" / "grpo_geneval.yaml", [f"out_dir={tmp_path}", "policy.device=cpu"])
    checks = by_check(found)
    assert rc == 2
    weights = checks["weights"]
    assert weights.status == "problem" and "deepseek-community/Janus-Pro-1B" in weights.detail
    assert "hf download deepseek-community/Janus-Pro-1B" in weights.fix
    det = checks["reward geneval (task)"]
    assert det.status == "problem" and "hf download facebook/mask2former-swin-small-coco-instance" in det.fix
    assert checks["data"].status == "ok" and "12,359 prompts" in checks["data"].detail
    assert checks["disk"].status == "skipped"


def test_geneval_recipe_with_local_tiny_models_passes(repo: Path, tmp_path: Path) -> None:
    from transformers import JanusForConditionalGeneration

    from r3_rl.policy.janus_tiny import make_tiny_janus
    from tiny_vision import save_tiny_clip, save_tiny_mask2former

    janus = make_tiny_janus(tmp_path / "janus")
    det = {"detector": "mask2former", "model": save_tiny_mask2former(tmp_path / "m2f", ["cat", "dog"]),
           "clip_model": save_tiny_clip(tmp_path / "clip"), "device": "cpu"}
    sets = [f"out_dir={tmp_path}", f"policy.model={janus}", "policy.device=cpu", "policy.dtype=float32",
            f"rewards.task={json.dumps([{'name': 'geneval', 'options': det}])}",
            f"rewards.eval={json.dumps([{'name': 'geneval', 'options': {**det, 'binary': True}}])}",
            # the recipe's 4 GPU learner ranks + 4 GPU rollout workers, on this CPU machine
            "learner.ranks=1", "rollout.workers=1", "rollout.gpus_per_worker=0"]
    rc, found = run_doctor(repo / "recipes" / "grpo_geneval.yaml", sets)
    assert rc == 0, [f.line() for f in found if f.status == "problem"]
    n = sum(p.numel() for p in JanusForConditionalGeneration.from_pretrained(janus).parameters())
    assert f"{n / 1e6:,.1f} M parameters" in by_check(found)["weights"].detail


def test_weights_are_found_in_the_hub_cache_and_a_missing_shard_is_reported(tmp_path: Path) -> None:
    """The hub cache layout (refs/main -> snapshots/<commit>/ with links to blobs), built by hand."""
    from r3_rl.policy.janus_tiny import make_tiny_janus

    src = Path(make_tiny_janus(tmp_path / "janus"))
    repo_dir = tmp_path / "cache" / "models--acme--tiny-janus"
    snap = repo_dir / "snapshots" / "abc123"
    (repo_dir / "blobs").mkdir(parents=True)
    snap.mkdir(parents=True)
    (repo_dir / "refs").mkdir()
    (repo_dir / "refs" / "main").write_text("abc123")
    for f in src.iterdir():
        blob = repo_dir / "blobs" / f.name
        blob.write_bytes(f.read_bytes())
        (snap / f.name).symlink_to(blob)
    folder = locate("acme/tiny-janus", cache_dir=tmp_path / "cache")
    assert folder == snap and weight_files(folder) == [snap / "model.safetensors"]
    with pytest.raises(WeightsMissing, match="not in the Hugging Face cache") as e:
        locate("acme/other", cache_dir=tmp_path / "cache")
    assert "hf download acme/other" in e.value.fix
    (repo_dir / "blobs" / "model.safetensors").unlink()  # an interrupted download: a dangling link
    with pytest.raises(WeightsMissing, match="no weight files"):
        weight_files(folder)


def test_resource_demand_of_ray_actors(repo: Path) -> None:
    recipe = load_recipe(repo / "recipes" / "tiny_blocks.yaml",
                         ["rollout.backend=ray", "rollout.workers=4", "rollout.gpus_per_worker=0.5",
                          "rollout.reward_workers=1", "learner.ranks=2", "learner.gpus_per_rank=1",
                          "learner.cpus_per_rank=2", "policy.device=cuda"])
    need, why = ray_demand(recipe)
    assert need == {"CPU": 4 + 1 + 4, "GPU": 2 + 2} and len(why) == 3
    assert needed_gpus_here(recipe)[0] == 4  # a local Ray puts the actors on this machine's GPUs
    assert needed_gpus_here(load_recipe(repo / "recipes" / "tiny_blocks.yaml", ["ray.address=auto",
                                                                                 "rollout.backend=ray"]))[0] == 0
    assert shortfall(need, {"CPU": 16, "GPU": 3.5}) == ["4 GPU requested, 3.5 free"]
    assert shortfall({"CPU": 1.0, "GPU": 1.5}, {"CPU": 1, "GPU": 1.5}) == []


def test_ray_cluster_resources_are_read_from_a_running_cluster(ray_session) -> None:
    address = ray_session.get_runtime_context().gcs_address
    info = cluster_resources(address, timeout=120)
    assert info["total"]["CPU"] == 4 and info["nodes"] == 1
    assert info["free_gpus_per_node"] == [info["available"].get("GPU", 0.0)]  # one node: its free GPUs are all


def test_the_disk_check_counts_the_linked_reference_once(repo: Path, tmp_path: Path) -> None:
    """Checkpoints hard-link the frozen KL reference the first one wrote: 4 checkpoints on disk hold one copy of it
    (plus the final weights); a disk one byte short of that is a problem, that size is enough."""
    from r3_rl.weights import DTYPE_BYTES, checkpoint_bytes, checkpoints_on_disk, policy_facts

    sets = [f"out_dir={tmp_path}", "steps=10", "save_every=2", "keep_last=3"]
    recipe = load_recipe(repo / "recipes" / "tiny_blocks.yaml", sets)
    facts = policy_facts(recipe)
    parts = checkpoint_bytes(recipe, facts.params, facts.image_pixels)
    n = checkpoints_on_disk(recipe)
    assert n == 4 and parts["reference"] > 0
    need = n * (sum(parts.values()) - parts["reference"]) + parts["reference"] + facts.params * DTYPE_BYTES[
        recipe.policy.dtype]
    for free, status in ((need - 1, "problem"), (need, "ok")):
        _, found = run_doctor(repo / "recipes" / "tiny_blocks.yaml", sets, free_bytes=lambda path, f=free: f)
        assert by_check(found)["disk"].status == status, by_check(found)["disk"].line()
