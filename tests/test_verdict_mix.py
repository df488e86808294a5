"""balanced_accuracy_on_mix and benchmarks/verdict_mix.py: the pooled verdict re-weighted by another eval's images."""
from __future__ import annotations

import json
import math
import random
import subprocess
import sys
from pathlib import Path

from r3_rl.eval.understanding import balanced_accuracy_on_mix, verdict_report

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "verdict_mix.py"


def test_exact_small_case() -> None:
    rates = {"a": {"stop_on_correct": 1.0, "edit_on_flawed": 0.0}, "b": {"stop_on_correct": 0.5, "edit_on_flawed": 1.0}}
    counts = {"a": {"correct_images": 3, "flawed_images": 1}, "b": {"correct_images": 1, "flawed_images": 3}}
    # stop on correct (3 * 1.0 + 1 * 0.5) / 4 = 0.875, edit on flawed (1 * 0.0 + 3 * 1.0) / 4 = 0.75
    assert balanced_accuracy_on_mix(rates, counts) == (0.875 + 0.75) / 2


def test_a_prompt_reading_critic_scores_by_the_mix_alone() -> None:
    """Stop on every single object, edit on every colour image: the same critic, other images, other figure."""
    rates = {"single_object": {"stop_on_correct": 1.0, "edit_on_flawed": 0.0},
             "colors": {"stop_on_correct": 0.0, "edit_on_flawed": 1.0}}
    easy_right_hard_wrong = {"single_object": {"correct_images": 9, "flawed_images": 1},
                             "colors": {"correct_images": 1, "flawed_images": 9}}
    both_half = {"single_object": {"correct_images": 5, "flawed_images": 5},
                 "colors": {"correct_images": 5, "flawed_images": 5}}
    assert balanced_accuracy_on_mix(rates, easy_right_hard_wrong) == 0.9
    assert balanced_accuracy_on_mix(rates, both_half) == 0.5


def test_own_rates_on_own_images_give_the_reports_pooled_figure() -> None:
    rng = random.Random(3)
    tags = ["single_object", "counting", "colors", "color_attr"]
    verdicts = []
    for _ in range(500):
        tag = rng.choice(tags)
        correct = rng.random() < 0.2 + 0.2 * tags.index(tag)
        stop = rng.random() < (0.8 if correct else 0.3 + 0.1 * tags.index(tag))
        verdicts.append((correct, stop, rng.randint(1, 3), tag))
    report = verdict_report(verdicts)
    assert math.isclose(balanced_accuracy_on_mix(report["per_tag"], report["per_tag"]),
                        report["overall"]["balanced_accuracy"], rel_tol=1e-12)


def test_nan_when_the_critic_never_judged_such_an_image() -> None:
    rates = {"a": {"stop_on_correct": 1.0, "edit_on_flawed": float("nan")}}
    assert math.isnan(balanced_accuracy_on_mix(rates, {"a": {"correct_images": 2, "flawed_images": 1}}))
    assert math.isnan(balanced_accuracy_on_mix(rates, {"b": {"correct_images": 2, "flawed_images": 1}}))
    assert math.isnan(balanced_accuracy_on_mix(rates, {"a": {"correct_images": 2, "flawed_images": 0}}))
    # a tag with no flawed images needs no edit rate
    both = {"a": {"correct_images": 2, "flawed_images": 0}, "b": {"correct_images": 0, "flawed_images": 2}}
    rates_b = {**rates, "b": {"stop_on_correct": float("nan"), "edit_on_flawed": 0.5}}
    assert balanced_accuracy_on_mix(rates_b, both) == 0.75


def _write_run(run: Path, before: list, after: list) -> None:
    (run / "eval").mkdir(parents=True)
    for name, verdicts in (("before", before), ("after", after)):
        (run / "eval" / f"{name}.json").write_text(json.dumps({"understanding": {"verdict": verdict_report(verdicts)}}))


def test_script_prints_the_decomposition(tmp_path: Path) -> None:
    # before: colours mostly flawed and the critic edits them all; after: colours mostly correct
    critic = lambda tag: tag == "single_object"  # noqa: E731 -- stops on single objects, edits colours
    before = [(c, critic(t), 1, t) for t, c in [("single_object", True)] * 9 + [("single_object", False)]
              + [("colors", True)] + [("colors", False)] * 9]
    after = [(c, critic(t), 1, t) for t, c in [("single_object", True)] * 5 + [("single_object", False)] * 5
             + [("colors", True)] * 5 + [("colors", False)] * 5]
    _write_run(tmp_path / "run", before, after)
    out = subprocess.run([sys.executable, str(SCRIPT), str(tmp_path / "run")], capture_output=True, text=True,
                         check=True).stdout
    assert "pooled verdict 0.900 -> 0.500 (-40.0 points)" in out
    assert "before-RL critic on after-RL images 0.500 (-40.0)" in out
    assert "after-RL critic on before-RL images 0.900 (+0.0)" in out


def test_script_bad_run_dir_is_one_line_and_exit_2(tmp_path: Path) -> None:
    good = tmp_path / "good"
    _write_run(good, [(True, True, 1, "a"), (False, False, 1, "a")], [(True, True, 1, "a"), (False, True, 1, "a")])
    (tmp_path / "broken" / "eval").mkdir(parents=True)
    (tmp_path / "broken" / "eval" / "before.json").write_text("{}")
    (tmp_path / "broken" / "eval" / "after.json").write_text("{}")
    for bad, says in ((tmp_path / "nope", "no such file"), (tmp_path / "broken", "not an eval report")):
        p = subprocess.run([sys.executable, str(SCRIPT), str(good), str(bad)], capture_output=True, text=True)
        assert p.returncode == 2 and p.stdout == ""
        assert p.stderr.count("\n") == 1 and p.stderr.startswith("verdict_mix: error: ") and says in p.stderr
