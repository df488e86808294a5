"""`r3-rl inspect` and the static HTML page, on a run directory built from hand-made trees."""
from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest

from r3_rl.cli import main
from r3_rl.errors import UserError
from r3_rl.eval.evaluate import summarise, write_report
from r3_rl.inspect import inspect_run
from r3_rl.tracking.html import trees_html
from r3_rl.trajectory import Node, PromptItem, Tree, write_trees
from test_tracking_metrics import stage_a_tree, stage_bc_tree, trees


def chain(i: int, scores: list[float], stop_at: int | None) -> Tree:
    """An eval chain like r3_chains writes: plan, img0, crit1, img1, ... (no refine after a stop)."""
    t = Tree(id=f"eval-{i}", prompt=PromptItem(f"e{i}", f"prompt <{i}> & co", {"tag": "colors" if i % 2 else "counting"}),
             meta={"kind": "chain"})
    t.add(Node(id="plan", parent=None, stage="reason", round=0, group_id="x", policy_version=0, text="<think>p</think>"))
    t.add(Node(id="img0", parent="plan", stage="generate", round=0, group_id="x", policy_version=0,
               image=np.full((32, 32, 3), 20 * i, np.uint8), meta={"eval_score": scores[0]}))
    last = "img0"
    for r in range(1, len(scores)):
        stop = stop_at == r
        t.add(Node(id=f"crit{r}", parent=last, stage="reflect", round=r, group_id="x", policy_version=0,
                   text="<think>look</think> " + ("no further edit needed" if stop else f"fix <{r}>"),
                   edit_instruction="no further edit needed" if stop else f"fix <{r}>", stop=stop))
        if stop:
            break
        last = f"img{r}"
        t.add(Node(id=last, parent=f"crit{r}", stage="refine", round=r, group_id="x", policy_version=0,
                   image=np.full((32, 32, 3), 20 * i + r, np.uint8), meta={"eval_score": scores[r]}))
    return t


@pytest.fixture()
def run_dir(tmp_path: Path) -> Path:
    rd = tmp_path / "run"
    rd.mkdir()
    (rd / "recipe.yaml").write_text("name: demo\nrewards: {correct_threshold: 1.0}\n")
    with open(rd / "metrics.jsonl", "w") as fh:
        for step in range(11):
            fh.write(json.dumps({"step": step, "1_reward/generate": step / 10, "2_accuracy/round0": 0.5}) + "\n")
        fh.write('{"step": 11, "rew')  # a run killed mid-write
    write_trees(trees(), rd / "trajectories" / "step_000000.jsonl")
    write_trees([stage_a_tree(), stage_bc_tree()], rd / "trajectories" / "step_000010.jsonl")
    chains = [chain(0, [0.0, 1.0], None), chain(1, [1.0, 1.0], 1)]
    correct = [[s >= 1.0 for s in (0.0, 1.0)], [True, True]]
    write_report(summarise(chains, correct, 1), rd / "eval", "after", chains, dump=8)
    return rd


def test_inspect_latest_step_summary(run_dir: Path) -> None:
    text, html = inspect_run(run_dir)
    assert html is None
    assert "training: 11 steps logged, last step 10: reward A 1.000" in text
    assert "eval after: accuracy per round 0.500 1.000" in text
    assert "trajectory dumps: 2 (steps 0..10)" in text and "eval dumps: after" in text
    assert "step 10:" in text
    assert "2 trees (1 A, 1 BC), 6 trajectories, 1 failed rewards" in text
    assert "generate reward 0.750 +- 0.250 (n=2)" in text and "accuracy round 0 0.500, round 1 0.333" in text
    assert "critic: stop on correct parents -, edit on flawed parents 0.667, balanced accuracy -" in text
    assert "improved/worse/unchanged 1/1/1" in text
    assert "two red squares  [tag: counting]" in text and "[critique 1 R=0.60] <think>c0</think> edit" in text


def test_inspect_counts_one_stage_steps_and_shows_each_figures_latest(tmp_path: Path) -> None:
    """tree.schedule alternate: a B+C step logs no first-image figures (and no loss when every group agreed)."""
    rd = tmp_path / "alt"
    rd.mkdir()
    rows = [{"step": 0, "batch/items": 8.0, "1_reward/generate": 0.5, "2_accuracy/round0": 0.25, "learner/loss": 0.1},
            {"step": 1, "batch/items": 0.0, "3_understanding/verdict_balanced_accuracy": 0.75}]
    (rd / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    text, _ = inspect_run(rd)
    assert "training: 2 steps logged, last step 1: reward A 0.500, acc A 0.250" in text and "verdict 0.750" in text


def test_inspect_step_eval_and_html(run_dir: Path, tmp_path: Path) -> None:
    text, html = inspect_run(run_dir, step=0, html="")
    assert html == run_dir / "inspect" / "step_000000.html" and html.is_file()
    page = html.read_text()
    assert page.count("data:image/png;base64,") == 3 + 3 * 2  # A: 3 paths x 1 image; BC: 3 x (parent, refined)
    assert "&lt;think&gt;plan 0&lt;/think&gt;" in page and "<think>" not in page

    text, html = inspect_run(run_dir, eval_name="after", html=tmp_path / "after.html")
    assert "| **overall** | 2 | **0.500** | **1.000** |" in text
    # eval scores live in node.meta["eval_score"]: none of them is a failed reward
    assert "2 R3 chains, 3 images scored by the eval reward (0 failed), stop rate 0.500" in text
    assert "round 1: refined images improved/worse/unchanged 1/0/0" in text
    assert "critic: stop on correct images 1.000 (of 1), edit on flawed images 1.000 (of 1)" in text
    assert "prompt <1> & co" in text and "[critique 1 (stop)] <think>look</think> no further" in text  # eval texts are unscored
    page = html.read_text()
    assert "prompt &lt;1&gt; &amp; co" in page and "fix &lt;1&gt;" in page
    assert "r1 refine R=1.00 (+1.00)" in page  # eval score shown beside the refined image
    assert (run_dir / "eval" / "after.html").is_file()  # write_report's own page


def test_inspect_errors(run_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r"--step 7: no trajectories/step_000007.jsonl .*nearest is 10"):
        inspect_run(run_dir, step=7)
    with pytest.raises(UserError, match=r"--eval before: .*available: after"):
        inspect_run(run_dir, eval_name="before")
    with pytest.raises(UserError, match="no such run directory"):
        inspect_run(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="not an r3-rl run directory"):
        inspect_run(tmp_path / "empty")


def test_inspect_cli(run_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["inspect", str(run_dir), "--step", "10", "--limit", "1"]) == 0
    out = capsys.readouterr().out
    assert "step 10:" in out and len(re.findall(r"\(s0-t\d-", out)) == 1
    assert main(["inspect", str(run_dir), "--step", "3"]) == 2
    assert "nearest is 0" in capsys.readouterr().err
    assert main(["inspect", str(run_dir / "trajectories" / "step_000000.jsonl"), "--html"]) == 0
    assert (run_dir / "trajectories" / "step_000000.html").is_file()


def test_html_lists_every_path_up_to_max() -> None:
    page = trees_html([stage_a_tree()], "t", max_paths=2)
    assert page.count('class="path"') == 2 and "1 more" in page
