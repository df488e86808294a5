"""Recipes validate; bad input gives exit code 2 and one line naming the key/file."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from r3_rl.cli import main
from r3_rl.config import load_recipe
from r3_rl.errors import UserError


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "r3_rl.cli", *args], capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("recipe", ["tiny_blocks.yaml", "grpo_geneval.yaml"])
def test_shipped_recipes_validate(repo: Path, recipe: str) -> None:
    r = load_recipe(repo / "recipes" / recipe)
    assert r.steps > 0 and r.rewards.task


@pytest.mark.parametrize("content,override,needle", [
    ("learner:\n  lrr: 1.0\n", [], "unknown key 'learner.lrr' (did you mean 'lr'?)"),
    ("tree:\n  group_size: 1\n", [], "key 'tree.group_size'"),
    ("steps: 3\n", ["learner.lr=abc"], "key 'learner.lr'"),
    ("steps: 3\n", ["policy.kind=vae"], "key 'policy.kind'"),
    ("steps: [1\n", [], "not valid YAML"),
    ("- a\n- b\n", [], "must be a mapping"),
    ("bogus_section: {}\n", [], "unknown key 'bogus_section'"),
    ("steps: 3\n", ["seed=-1"], "key 'seed': Input should be greater than or equal to 0"),  # was numpy's traceback
    ("steps: 3\n", ["warmstart.seed=2147483648"], "key 'warmstart.seed'"),
    # signs and ranges that used to be accepted and failed later (a traceback, or a run that learns backwards)
    ("steps: 3\n", ["policy.tiny.num_heads=0"], "key 'policy.tiny.num_heads'"),  # was ZeroDivisionError
    ("steps: 3\n", ["warmstart.batch_size=0"], "key 'warmstart.batch_size'"),
    ("steps: 3\n", ["warmstart.lr=-1e-3"], "key 'warmstart.lr'"),
    ("steps: 3\n", ["learner.lr=-1e-4"], "key 'learner.lr'"),
    ("steps: 3\n", ["learner.clip_low=1.0"], "key 'learner.clip_low': Input should be less than 1"),
    ("steps: 3\n", ["learner.kl_coef_text=-0.1"], "key 'learner.kl_coef_text'"),
    ("steps: 3\n", ["learner.betas=[0.9, 1.0]"], "key 'learner.betas[1]'"),
    ("steps: 3\n", ["eval.size=0"], "key 'eval.size'"),
    ("steps: 3\n", ["rollout.generate.cfg_scale=-2"], "key 'rollout.generate.cfg_scale'"),
])
def test_bad_recipe_is_one_line_user_error(tmp_path: Path, content: str, override: list[str], needle: str) -> None:
    p = tmp_path / "r.yaml"
    p.write_text(content)
    with pytest.raises(UserError) as e:
        load_recipe(p, override)
    msg = str(e.value)
    assert needle in msg and "\n" not in msg and str(p) in msg


def test_cli_bad_recipe_exits_2_with_one_line(tmp_path: Path) -> None:
    p = tmp_path / "r.yaml"
    p.write_text("learner:\n  clip_lo: 0.1\n")
    res = run_cli("train", str(p))
    assert res.returncode == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1, res.stderr
    assert "learner.clip_lo" in lines[0] and "clip_low" in lines[0] and "Traceback" not in res.stderr


def test_cli_missing_recipe_file_exits_2(tmp_path: Path) -> None:
    res = run_cli("train", str(tmp_path / "nope.yaml"))
    assert res.returncode == 2 and "recipe file not found" in res.stderr and len(res.stderr.splitlines()) == 1


def test_cli_bad_override_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    p = tmp_path / "r.yaml"
    p.write_text("steps: 1\n")
    assert main(["train", str(p), "--set", "no_equals_sign"]) == 2
    assert "KEY=VALUE" in capsys.readouterr().err


def test_geneval_recipe_without_weights_says_so_in_one_line(repo: Path, tmp_path: Path) -> None:
    res = run_cli("train", str(repo / "recipes" / "grpo_geneval.yaml"), "--set", f"out_dir={tmp_path}",
                  "--set", f"policy.model={tmp_path / 'no-such-model'}")
    assert res.returncode == 2, res.stderr[-2000:]
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "policy.model" in lines[0], res.stderr[-2000:]


def test_rewards_command_lists_builtins(capsys: pytest.CaptureFixture) -> None:
    assert main(["rewards"]) == 0
    assert "blocks" in capsys.readouterr().out
