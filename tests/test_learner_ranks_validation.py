"""``learner.ranks > 1`` needs DeepSpeed ZeRO 0-2, refused at recipe validation before any model loads.

The BAGEL recipe once shipped ``ranks: 4`` with ZeRO-3, which only ``RankedLearner`` refused -- after the trainer
had built the policy -- so it failed on a real node while its test ran one rank.  Here: the rule itself, the CLI
(`train`, `doctor`, `plan`) turning it into one line and exit 2 before any model work, every shipped recipe passing
it, and `r3-rl plan` never advising a layout it refuses.
"""
from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from r3_rl.cli import main
from r3_rl.config import load_recipe
from r3_rl.config_learner import Learner, check_ranks
from r3_rl.errors import UserError
from r3_rl.plan.render import advice
from r3_rl.plan.report import make_plan
from r3_rl.validate import check_learner_ranks

REPO = Path(__file__).resolve().parents[1]
BAGEL = REPO / "recipes" / "grpo_geneval_bagel.yaml"
TINY = REPO / "recipes" / "tiny_blocks.yaml"


@pytest.mark.parametrize("ranks, backend, zero, refused", [
    (1, "torch", 2, None), (1, "deepspeed", 3, None), (2, "deepspeed", 0, None), (4, "deepspeed", 1, None),
    (4, "deepspeed", 2, None),
    (2, "torch", 2, "learner.ranks: 2 ranks need learner.backend: deepspeed \\(got torch\\)"),
    (4, "deepspeed", 3, "learner.deepspeed.zero_stage: 3 with learner.ranks: 4 is not supported"),
])
def test_ranks_need_deepspeed_zero_0_to_2(ranks: int, backend: str, zero: int, refused: str | None) -> None:
    cfg = Learner(ranks=ranks, backend=backend, deepspeed={"zero_stage": zero})
    if refused is None:
        check_ranks(cfg)
        return
    with pytest.raises(UserError, match=refused) as err:
        check_ranks(cfg)
    assert "\n" not in str(err.value) and "learner.ranks: 1" in str(err.value)  # says what would be valid


@pytest.mark.parametrize("recipe", sorted((REPO / "recipes").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_recipe_has_a_learner_layout_that_trains(recipe: Path) -> None:
    check_learner_ranks(load_recipe(recipe), str(recipe))


def test_the_bagel_recipe_with_zero3_fails_as_a_real_process_in_one_line(tmp_path: Path) -> None:
    """The shipped layout (4 ranks) with ZeRO-3, as `r3-rl train` itself: one line, exit 2, no run dir, and fast
    (the weights named by the recipe are not on this machine: the ranks are refused before the weights are looked
    at, let alone loaded)."""
    t0 = time.monotonic()
    res = subprocess.run([sys.executable, "-m", "r3_rl.cli", "train", str(BAGEL), "--set", f"out_dir={tmp_path / 'r'}",
                          "--set", "learner.deepspeed.zero_stage=3"], capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr[-2000:]
    assert res.stderr.count("\n") == 1, res.stderr
    assert "learner.deepspeed.zero_stage: 3 with learner.ranks: 4 is not supported" in res.stderr
    assert time.monotonic() - t0 < 30 and not (tmp_path / "r").exists()


@pytest.mark.parametrize("sets, needle", [
    (["learner.ranks=2", "learner.backend=torch"], "learner.ranks: 2 ranks need learner.backend: deepspeed"),
    (["learner.ranks=2", "learner.backend=deepspeed", "learner.deepspeed.zero_stage=3"],
     "learner.deepspeed.zero_stage: 3 with learner.ranks: 2"),
])
def test_train_doctor_and_plan_refuse_before_any_model_work(sets: list[str], needle: str, tmp_path: Path,
                                                            capsys: pytest.CaptureFixture,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    import r3_rl.policy.registry as registry
    import r3_rl.trainer as trainer

    def trap(*_a, **_k):
        raise AssertionError("model work started before the recipe was refused")

    monkeypatch.setattr(registry, "build_policy", trap)
    monkeypatch.setattr(trainer.Trainer, "__init__", trap)
    args = [a for s in sets + [f"out_dir={tmp_path / 'r'}"] for a in ("--set", s)]
    capsys.readouterr()
    assert main(["train", str(TINY)] + args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and needle in err[0] and str(TINY) in err[0], err
    assert not (tmp_path / "r").exists()
    assert main(["plan", str(TINY), "--gpus", "8", "--gpu-memory", "80"] + args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and needle in err[0], err
    assert main(["doctor", str(TINY)] + args) == 2
    out = capsys.readouterr().out
    assert needle in out and "problem" in out


def test_plan_never_advises_zero3_across_ranks() -> None:
    """The BAGEL layout with 4 edit segments a micro-batch is over 72 GB a rank; ZeRO-3 would fit (it shards the
    weights) but `train` refuses it with 4 ranks, so it is not advised; what is advised validates and fits."""
    recipe = load_recipe(BAGEL, ["learner.micro_batch_size=4"])
    plan = make_plan(recipe, 8, 80)
    assert not plan.fits
    assert make_plan(load_recipe(BAGEL, ["learner.micro_batch_size=4", "learner.deepspeed.zero_stage=3"]), 8, 80).fits
    lines = advice(plan)
    assert lines and not any("zero_stage" in line for line in lines), lines
    assert any(line.startswith("learner.micro_batch_size: 2  -> fullest GPU 62.3 GB") for line in lines), lines
