"""A seconds-long tiny Blocks training run, checked through what it leaves behind: TensorBoard events (read with
tensorboard's EventAccumulator), metrics.jsonl, trajectory dumps and `r3-rl inspect`."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from conftest import tiny_overrides
from r3_rl.cli import main
from r3_rl.tracking.tensorboard import CAPTION_H, GAP, MIN_CELL
from r3_rl.trajectory import read_trees

STEPS = 3


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory, repo: Path) -> Path:
    tmp = tmp_path_factory.mktemp("train")
    sets = tiny_overrides(tmp, steps=STEPS) + ["log.trajectories_every=2", "eval.every=2", "warmstart.steps=0",
                                                "data.eval_size=4"]
    argv = ["train", str(repo / "recipes" / "tiny_blocks.yaml"), "--run-dir", str(tmp / "run")]
    assert main(argv + [a for s in sets for a in ("--set", s)]) == 0
    return tmp / "run"


def test_scalars_every_step(run: Path) -> None:
    acc = EventAccumulator(str(run / "tb"), size_guidance={"scalars": 0, "images": 0, "tensors": 0,
                                                             "histograms": 0})
    acc.Reload()
    scalars = set(acc.Tags()["scalars"])
    every_step = ["reward/generate/mean", "reward/generate/std", "reward_round/generate/round0/mean",
                  "reward_component/generate/blocks", "rollout/failed_rewards",
                  "groups/zero_signal", "advantage/generate/mean", "time/rollout_s", "time/learner_s",
                  "throughput/trajectories_per_s", "throughput/image_tokens_per_s", "learner/lr"]
    for tag in every_step:
        assert [e.step for e in acc.Scalars(tag)] == list(range(STEPS)), tag
    # refine-stage metrics appear once the buffer holds parents (from step 1 on)
    for tag in ("reward/refine/mean", "rollout/stop_rate", "rollout/improved", "rollout/worse", "rollout/unchanged"):
        assert tag in scalars and acc.Scalars(tag)[-1].step == STEPS - 1
    learner = [t for t in scalars if t.startswith("learner/")]
    assert "learner/grad_norm" in learner and "learner/loss" in learner

    # evals are logged at the number of updates behind them: before (0), after 2 updates (eval.every=2), after
    assert [e.step for e in acc.Scalars("eval/accuracy/round0")] == [0, 2, STEPS]
    assert [e.step for e in acc.Tensors("eval/table/text_summary")] == [0, 2, STEPS]

    # trajectory grids and histograms every 2 steps: steps 0 and 2
    images = acc.Tags()["images"]
    grids = [t for t in images if t.startswith("trajectories/")]
    assert [e.step for e in acc.Images("trajectories/0")] == [0, 2]
    assert all({e.step for e in acc.Images(t)} <= {0, 2} for t in grids)  # step 0 has no refine trees yet
    for t in grids:
        for ev in acc.Images(t):
            n_images = (ev.width + GAP) // (MIN_CELL + GAP)  # 32x32 Blocks images upscaled to 128
            assert ev.height == MIN_CELL + CAPTION_H and ev.width == n_images * MIN_CELL + (n_images - 1) * GAP
    assert [e.step for e in acc.Histograms("hist_reward/generate")] == [0, 2]
    assert [e.step for e in acc.Tensors("trajectories/0/text/text_summary")] == [0, 2]


def test_metrics_jsonl_and_dumps(run: Path) -> None:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if "reward/generate/mean" in r]
    assert [r["step"] for r in train_rows] == list(range(STEPS))
    dumps = sorted(p.name for p in (run / "trajectories").glob("*.jsonl"))
    assert dumps == ["step_000000.jsonl", "step_000002.jsonl"]
    trees = list(read_trees(run / "trajectories" / "step_000002.jsonl"))
    # every trajectory of the step is dumped, not only the few shown in TensorBoard
    assert sum(len(t.leaves()) for t in trees) == train_rows[-1]["rollout/trajectories"]
    for name in ("before", "step_000002", "after"):
        assert (run / "eval" / f"{name}.json").is_file() and (run / "eval" / f"{name}_trajectories.jsonl").is_file()


def test_inspect_the_run(run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["inspect", str(run), "--step", "2", "--html"]) == 0
    out = capsys.readouterr().out
    assert f"training: {STEPS} steps logged" in out and "eval after: accuracy per round" in out
    assert "step 2:" in out and (run / "inspect" / "step_000002.html").is_file()
    assert main(["inspect", str(run), "--eval", "before"]) == 0
    assert "| **overall** |" in capsys.readouterr().out
