"""A seconds-long tiny Blocks training run, checked through what it leaves behind: TensorBoard events (read with
tensorboard's EventAccumulator), metrics.jsonl, trajectory dumps and `r3-rl inspect`.

What a person opening TensorBoard needs is checked here: the scalars they look at first sort first, one name
per quantity, KL and entropy per modality, framed grids of one size, a full R3 chain at every logging step."""
from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from conftest import tiny_overrides
from r3_rl.cli import main
from r3_rl.tracking.tensorboard import LINE_RGB, grid_size
from r3_rl.trajectory import read_trees

STEPS = 3
SLOTS = 4  # max(eval.rounds=1, tree.max_round=3) + 1


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory, repo: Path) -> Path:
    """An untrained critic writes no ``</think>`` and so always stops; make every third critique stop and the
    others ask for an edit (by call order: the same on every machine), so refinement, chains over several rounds
    and the critic's metrics all have something to show."""
    from r3_rl.policy.base import TextSample
    from r3_rl.policy.tiny import TinyUnifiedPolicy

    original = TinyUnifiedPolicy.reflect
    calls = [0]

    def reflect(self, prompts, images, sampling, generator=None):  # noqa: ANN001
        out = original(self, prompts, images, sampling, generator)
        texts = []
        for s in out:
            calls[0] += 1
            texts.append(TextSample("<think> look </think> " + ("no further edit needed" if calls[0] % 3 == 0
                                                                else "move left"), s.segment))
        return texts

    tmp = tmp_path_factory.mktemp("train")
    sets = tiny_overrides(tmp, steps=STEPS) + ["log.trajectories_every=2", "eval.every=2", "warmstart.steps=0",
                                                "data.eval_size=4", "eval.understanding.reference_size=4",
                                                # the reference rule: with the demo's stop_flawed -1, the forced
                                                # critiques on an untrained model's flawed parents gave a mean
                                                # verdict term equal to the mean delta at every step (two
                                                # quantities, one series by coincidence)
                                                "rewards.reflect.stop_flawed=0.0", "rewards.reflect.edit_correct=0.0"]
    argv = ["train", str(repo / "recipes" / "tiny_blocks.yaml"), "--run-dir", str(tmp / "run")]
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(TinyUnifiedPolicy, "reflect", reflect)
        assert main(argv + [a for s in sets for a in ("--set", s)]) == 0
    return tmp / "run"


def events(run: Path) -> EventAccumulator:
    acc = EventAccumulator(str(run / "tb"), size_guidance={"scalars": 0, "images": 0, "tensors": 0, "histograms": 0})
    acc.Reload()
    return acc


def test_scalars_every_step(run: Path) -> None:
    acc = events(run)
    scalars = set(acc.Tags()["scalars"])
    every_step = ["1_reward/generate", "reward_detail/generate/std", "2_accuracy/round0", "rollout/failed_rewards",
                  "groups/zero_signal_fraction", "advantage/generate/std", "time/rollout_s", "time/learner_s",
                  "throughput/trajectories_per_s", "throughput/image_tokens_per_s", "learner/lr",
                  "4_kl/image", "5_entropy/text", "5_entropy/image"]
    for tag in every_step:
        assert [e.step for e in acc.Scalars(tag)] == list(range(STEPS)), tag
    assert "4_kl/text" in scalars  # on steps whose batch holds text rows
    # refine-stage metrics appear once the buffer holds parents (from step 1 on)
    for tag in ("1_reward/refine", "2_accuracy/round1", "6_refine/stop_rate", "6_refine/improved",
                "3_understanding/edit_on_flawed"):
        assert tag in scalars and acc.Scalars(tag)[-1].step == STEPS - 1, tag
    # what a parent's tag / prompt / round alone tells the verdict on each step's draw, in the JSONL at every step
    # (NaN, so not in TensorBoard, while no key holds both correct and flawed parents: here an untrained
    # generator draws no correct image; the figures themselves: tests/test_parent_mix.py)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    for feature in ("tag", "prompt", "round"):
        values = [r[f"3_understanding/shortcut_{feature}"] for r in rows if "step" in r and "time/rollout_s" in r]
        assert len(values) == STEPS and all(v != v or 0.5 <= v <= 1.0 for v in values), feature
    learner = [t for t in scalars if t.startswith("learner/")]
    assert "learner/grad_norm" in learner and "learner/loss" in learner

    # evals are logged at the number of updates behind them: before (0), after 2 updates (eval.every=2), after
    for tag in ("0_eval/accuracy_round0", "0_eval/verdict_balanced_accuracy", "0_eval/reference_balanced_accuracy",
                "0_eval/yes_no_accuracy", "0_eval/stop_rate"):
        assert [e.step for e in acc.Scalars(tag)] == [0, 2, STEPS], tag
    assert [e.step for e in acc.Scalars("eval/reference/stop_rate/correct")] == [0, 2, STEPS]
    assert any(t.startswith("eval/reference/stop_rate/flawed/") for t in acc.Tags()["scalars"])
    assert [e.step for e in acc.Tensors("eval/table/text_summary")] == [0, 2, STEPS]
    # the demo's three figures against before RL at every eval, not only at the end (session 33)
    for tag in ("0_eval/synergy/first_image_gain", "0_eval/synergy/refinement_after", "0_eval/synergy/verdict_gain"):
        assert [e.step for e in acc.Scalars(tag)] == [0, 2, STEPS], tag
    first = {e.step: e.value for e in acc.Scalars("0_eval/synergy/first_image_gain")}
    round0 = {e.step: e.value for e in acc.Scalars("0_eval/accuracy_round0")}
    assert first[0] == 0.0 and first[2] == pytest.approx(round0[2] - round0[0], abs=1e-6)
    refinement = {e.step: e.value for e in acc.Scalars("0_eval/synergy/refinement_after")}
    last_round = max(t for t in acc.Tags()["scalars"] if t.startswith("0_eval/accuracy_round"))
    final = {e.step: e.value for e in acc.Scalars(last_round)}
    assert refinement[2] == pytest.approx(final[2] - round0[2], abs=1e-6)


def test_first_looked_at_scalars_sort_first_and_each_quantity_once(run: Path) -> None:
    acc = events(run)
    tags = sorted(acc.Tags()["scalars"])
    first_adv = next(i for i, t in enumerate(tags) if t.startswith("advantage/"))
    for prefix in ("0_eval/", "1_reward/", "2_accuracy/", "3_understanding/", "4_kl/", "6_refine/stop_rate"):
        assert max(i for i, t in enumerate(tags) if t.startswith(prefix)) < first_adv, prefix
    assert len([t for t in tags if t.startswith("advantage/")]) <= 12
    # the duplicates a reader used to find: the reward's own score under three names, failures counted thrice
    for gone in ("reward_component/generate/blocks", "reward_component/generate/blocks/score",
                 "reward/reflect/delta_mean", "batch/failed_rewards",
                 "rewards/failed_total", "advantage/failed_samples", "advantage/mean"):
        assert gone not in tags, gone
    assert [t for t in tags if "fail" in t and not t.startswith("eval")] == ["rollout/failed_rewards"]
    # and in general: no two reward / accuracy series are the same numbers at every step
    series = {t: [round(e.value, 9) for e in acc.Scalars(t)] for t in tags
              if t.split("/")[0] in ("1_reward", "2_accuracy", "reward_component", "reward_detail")}
    steps = {t: [e.step for e in acc.Scalars(t)] for t in series}
    same = [(a, b) for a in series for b in series
            if a < b and steps[a] == steps[b] and len(set(series[a])) > 1 and series[a] == series[b]]
    assert same == []


def test_framed_grids_one_size_and_a_chain_every_logging_step(run: Path) -> None:
    acc = events(run)
    grids = [t for t in acc.Tags()["images"] if t.startswith("trajectories/")]
    assert [e.step for e in acc.Images("trajectories/0")] == [0, 2]
    height, width = grid_size(SLOTS)
    for t in grids + ["eval_trajectories/0"]:
        for ev in acc.Images(t):
            assert (ev.height, ev.width) == (height, width), t  # fixed cell size, fixed slots: one scale
            with Image.open(io.BytesIO(ev.encoded_image_string)) as im:
                px = np.asarray(im.convert("RGB"))
            assert np.all(px[0] == LINE_RGB) and np.all(px[:, 0] == LINE_RGB) and np.all(px[-1] == LINE_RGB)
    texts = {s: [acc.Tensors(t)[k].tensor_proto.string_val[0].decode() for t in acc.Tags()["tensors"]
                 if t.startswith("trajectories/") for k, e in enumerate(acc.Tensors(t)) if e.step == s]
             for s in (0, 2)}
    for s, mds in texts.items():
        chains = [md for md in mds if f"chain-s{s}-" in md]
        assert chains, f"no R3 chain in the grids of step {s}"
        assert max(md.count("critique") for md in chains) >= 2, f"no multi-round chain at step {s}"
    assert [e.step for e in acc.Histograms("hist_reward/generate")] == [0, 2]


def test_metrics_jsonl_and_dumps(run: Path) -> None:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if "1_reward/generate" in r]
    assert [r["step"] for r in train_rows] == list(range(STEPS))
    dumps = sorted(p.name for p in (run / "trajectories").glob("*.jsonl"))
    assert dumps == ["step_000000.jsonl", "step_000002.jsonl"]
    trees = list(read_trees(run / "trajectories" / "step_000002.jsonl"))
    # every trajectory of the step is dumped, not only the few shown in TensorBoard (log-only chains are not)
    assert sum(len(t.leaves()) for t in trees) == train_rows[-1]["rollout/trajectories"]
    for name in ("before", "step_000002", "after"):
        assert (run / "eval" / f"{name}.json").is_file() and (run / "eval" / f"{name}_trajectories.jsonl").is_file()
    summary = json.loads((run / "summary.json").read_text())
    assert set(summary["synergy"]) >= {"first_image_gain", "refinement_after", "verdict_gain"}


def test_inspect_the_run(run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["inspect", str(run), "--step", "2", "--html"]) == 0
    out = capsys.readouterr().out
    assert f"training: {STEPS} steps logged" in out and "eval after: accuracy per round" in out
    assert "verdict balanced accuracy" in out and "reference set" in out
    assert "reference set, stop rate by kind: correct " in out and "flawed:" in out
    assert "step 2:" in out and (run / "inspect" / "step_000002.html").is_file()
    assert main(["inspect", str(run), "--eval", "before"]) == 0
    out = capsys.readouterr().out
    assert "| **overall** |" in out and "(0 failed)" in out and "failed rewards" not in out
