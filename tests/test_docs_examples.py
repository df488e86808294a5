"""docs/architecture.md's "How to add a reward / an algorithm / a policy": the code it shows is the code of the
example files, and its command trains with all three (shortened to two steps)."""
from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

from conftest import tiny_overrides

REPO = Path(__file__).resolve().parents[1]
DOC = REPO / "docs" / "architecture.md"


def _section(title: str, text: str) -> str:
    start = text.index(f"### {title}")
    end = text.find("\n## ", start)
    return text[start:end if end >= 0 else None]


def _blocks(text: str, lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", text, flags=re.DOTALL)


def test_the_shown_code_is_the_example_files_code() -> None:
    text = DOC.read_text()
    shown = [b for title in ("How to add a reward", "How to add an algorithm", "How to add a policy")
             for b in _blocks(_section(title, text), "python")]
    assert len(shown) >= 5
    for block in shown:
        first, _, body = block.partition("\n")
        assert first.startswith("# docs/examples/"), first
        source = (REPO / first[2:]).read_text()
        assert body.strip() and body in source, f"{first}: the documented code is not in the file:\n{body}"


def test_the_documented_command_trains_with_the_three_examples(tmp_path: Path) -> None:
    command = next(b for b in _blocks(_section("How to add a policy", DOC.read_text()), "bash") if "r3-rl train" in b)
    argv = shlex.split(command.replace("\\\n", " "))
    assert argv[:2] == ["r3-rl", "train"] and any("gaussian_policy.py" in a for a in argv)
    short = [a for s in tiny_overrides(tmp_path, steps=2) + ["tree.group_size=4", "log.tensorboard=false"]
             for a in ("--set", s)]
    run = tmp_path / "run"
    res = subprocess.run([sys.executable, "-m", "r3_rl.cli", *argv[1:], *short, "--run-dir", str(run)],
                         cwd=REPO, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    steps = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if "batch/items" in line]
    assert [s["step"] for s in steps] == [0, 1] and all("learner/loss" in s for s in steps)
    recipe = (run / "recipe.yaml").read_text()
    assert "gaussian_policy.py:GaussianImagePolicy" in recipe and "clipped_grpo.py:ClippedGRPO" in recipe
