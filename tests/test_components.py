"""One builder of parts for train, eval and rollout: eval and rollout build no optimiser, no reference, no ranks.

The recipe asks for everything a sampling command could wrongly build: DeepSpeed, LoRA, two learner ranks on
Ray, a KL reference.  Every builder of those is replaced by one that fails the test, and ``r3-rl eval`` /
``r3-rl rollout`` must still run; the same trap does fire when a trainer is built (so it can catch something).
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import tiny_overrides

from r3_rl.cli import main
from r3_rl.config import load_recipe
from r3_rl.environment import read_records
from r3_rl.policy.registry import build_policy

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "recipes" / "tiny_blocks.yaml"
HEAVY = ["learner.backend=deepspeed", "learner.lora={r: 4}", "learner.ranks=2", "learner.kl_coef_text=0.1"]


@pytest.fixture
def traps(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every way to build learning parts raises (and is recorded)."""
    import r3_rl.components as components
    import r3_rl.learner.deepspeed_learner as ds
    import r3_rl.learner.optim as optim
    import r3_rl.policy.base as base
    import r3_rl.ray_runtime as ray_runtime

    built: list[str] = []

    def trap(what: str):
        def fail(*args, **kwargs):
            built.append(what)
            raise AssertionError(f"a sampling command built {what}")
        return fail
    monkeypatch.setattr(components, "build_learner", trap("a learner"))
    monkeypatch.setattr(components, "load_algorithm", trap("an algorithm"))
    monkeypatch.setattr(optim.TorchOptim, "__init__", trap("a torch optimiser"))
    monkeypatch.setattr(ds.DeepSpeedOptim, "__init__", trap("a DeepSpeed engine"))
    monkeypatch.setattr(base.Policy, "frozen_copy", trap("a reference"))
    monkeypatch.setattr(ray_runtime, "start_ray", trap("a Ray runtime"))
    return built


def _args(tmp_path: Path, run: str) -> list[str]:
    out = ["--run-dir", str(tmp_path / run)]
    for s in tiny_overrides(tmp_path) + HEAVY + ["log.tensorboard=false"]:
        out += ["--set", s]
    return out


def test_eval_and_rollout_build_only_the_policy_and_rewards(tmp_path: Path, traps: list[str],
                                                            capsys: pytest.CaptureFixture) -> None:
    ckpt = tmp_path / "ckpt"
    build_policy(load_recipe(RECIPE, tiny_overrides(tmp_path))).save_pretrained(str(ckpt))
    assert main(["eval", str(RECIPE), "--checkpoint", str(ckpt), *_args(tmp_path, "eval")]) == 0
    assert json.loads((tmp_path / "eval" / "eval" / "eval.json").read_text())["prompts"] == 8
    assert main(["rollout", str(RECIPE), "--num", "3", *_args(tmp_path, "rollout")]) == 0
    assert (tmp_path / "rollout" / "rollout.jsonl").read_text().count("\n") == 3
    assert traps == [], capsys.readouterr().err
    # `r3-rl inspect` reads a rollout run dir's trees as it reads a training dump (it had printed "no steps")
    assert main(["inspect", str(tmp_path / "rollout"), "--html"]) == 0
    shown = capsys.readouterr().out
    assert f"rollout: {tmp_path / 'rollout' / 'rollout.jsonl'}" in shown and "3 R3 chains" in shown
    assert (tmp_path / "rollout" / "inspect" / "rollout.html").is_file()
    # both record what their numbers hang on besides the recipe
    for run, command in (("eval", "eval"), ("rollout", "rollout")):
        records = read_records(tmp_path / run)
        assert [r["command"] for r in records] == [command] and records[0]["torch_threads"] == 1


@pytest.mark.parametrize("sets,first", [(HEAVY, "an algorithm"), ([], "a reference")])
def test_the_traps_fire_when_a_trainer_is_built(tmp_path: Path, traps: list[str], sets: list[str],
                                                first: str) -> None:
    """Training builds its reference (none with LoRA: the base model is the reference) and its learner."""
    from r3_rl.trainer import Trainer

    with pytest.raises(AssertionError, match="built"):
        Trainer(load_recipe(RECIPE, tiny_overrides(tmp_path) + sets), tmp_path / "train")
    assert traps == [first]


@pytest.mark.parametrize("ranks", [1, 2])
def test_the_trainers_reference_stays_in_host_memory_when_ranks_compute_with_their_own(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, ranks: int) -> None:
    """With learner ranks the trainer's KL reference only starts the ranks' own and goes into checkpoints: it is
    copied straight into host memory (it sat on the trainer's GPU for the whole run, a model's worth), not beside
    the policy on its device; in-process it is the learner's and stays with the policy."""
    import r3_rl.policy.base as base
    from r3_rl.components import Components

    hosted: list[int] = []
    real = base.host_copy
    monkeypatch.setattr(base, "host_copy", lambda module: hosted.append(1) or real(module))
    recipe = load_recipe(RECIPE, tiny_overrides(tmp_path) + [f"learner.ranks={ranks}", "learner.backend=deepspeed",
                                                              "learner.kl_coef_text=0.1"])
    parts = Components(recipe, tmp_path / "run")
    reference = parts.reference
    assert len(hosted) == (1 if ranks > 1 else 0)
    live = dict(parts.policy.model.named_parameters())
    for name, p in reference.model.named_parameters():
        assert not p.requires_grad and torch.equal(p, live[name]) and p.data_ptr() != live[name].data_ptr()
        assert p.device.type == "cpu"
