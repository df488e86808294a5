"""The synergy figures' standard errors: exact small cases, and agreement with the spread of simulated evals."""
from __future__ import annotations

import math

import numpy as np
import pytest

from r3_rl.eval.evaluate import summarise
from r3_rl.eval.synergy import (
    accuracy_variance, refinement_variance, synergy_errors, synergy_figures, synergy_lines, verdict_variance,
)
from r3_rl.trajectory import PromptItem, Tree


def _report(first: dict[str, list[bool]], last: dict[str, list[bool]] | None = None,
            verdicts: tuple[list[bool], list[bool]] | None = None) -> dict:
    """An eval report built from per-tag outcomes of the first and last round (and verdicts: stop on each
    correct image, edit on each flawed one), with the counts :func:`summarise` and the verdict report keep."""
    last = last if last is not None else first
    counts = {t: len(v) for t, v in first.items()}
    n = sum(counts.values())
    per_tag = {t: [float(np.mean(first[t])), float(np.mean(last[t]))] for t in first}
    pairs = [(a, b) for t in first for a, b in zip(first[t], last[t])]
    rep = {"prompts": n, "rounds": 1, "tag_counts": counts, "per_tag": per_tag, "stop_rate": 0.5,
           "accuracy": [sum(a for a, _ in pairs) / n, sum(b for _, b in pairs) / n],
           "refinement": {"improved": sum(1 for a, b in pairs if not a and b),
                          "worse": sum(1 for a, b in pairs if a and not b), "pairs": n}}
    if verdicts is not None:
        stops, edits = verdicts
        s, e = float(np.mean(stops)), float(np.mean(edits))
        rep["understanding"] = {"verdict": {"overall": {
            "correct_images": len(stops), "flawed_images": len(edits), "stop_on_correct": s,
            "edit_on_flawed": e, "balanced_accuracy": (s + e) / 2}}}
    return rep


def test_exact_small_cases() -> None:
    # tag a: 1 of 2 right (unbiased variance of its mean 0.25 / 1), tag b: 2 of 2 (0); weights (2/4)^2
    rep = _report({"a": [True, False], "b": [True, True]}, {"a": [True, True], "b": [False, True]},
                  ([True, False, True], [True, True]))
    assert accuracy_variance(rep, 0) == pytest.approx(0.25 * 0.25)
    # paired differences +1 (a's second), -1 (b's first), 0, 0: mean 0, variance 2/3, of the mean 2/3 / 4
    assert refinement_variance(rep) == pytest.approx((2 / 3) / 4)
    # stop on correct 2 of 3 (variance of the mean (2/9) / 2), edit on flawed 2 of 2 (0); balanced: x 1/4
    assert verdict_variance(rep) == pytest.approx(0.25 * (2 / 9) / 2)
    se = synergy_errors(rep, rep)
    assert se["first_image_gain_se"] == pytest.approx(math.sqrt(2 * 0.25 * 0.25))
    assert se["refinement_after_se"] == pytest.approx(math.sqrt((2 / 3) / 4))
    # without per-tag counts: one binomial over all prompts (3 of 4 right: 0.1875 / 3)
    assert accuracy_variance({"accuracy": [0.75], "prompts": 4}, 0) == pytest.approx(0.1875 / 3)


def test_old_reports_give_nan_and_lines_drop_the_error() -> None:
    before = {"accuracy": [0.4, 0.5], "stop_rate": 0.9,
              "understanding": {"verdict": {"overall": {"balanced_accuracy": 0.6}}}}
    after = {"accuracy": [0.55, 0.62], "stop_rate": 0.5,
             "understanding": {"verdict": {"overall": {"balanced_accuracy": 0.65}}}}
    fig = synergy_figures(before, after)
    assert math.isnan(fig["refinement_after_se"]) and math.isnan(fig["verdict_gain_se"])
    assert math.isnan(fig["first_image_gain_se"])  # no prompt count either
    lines = synergy_lines(fig)
    assert "(+15.0 points)" in lines[0] and "±" not in "".join(lines)
    rep = _report({"a": [True, False] * 50}, {"a": [True, True] * 50}, ([True] * 30 + [False] * 10, [True] * 60))
    lines = synergy_lines(synergy_figures(rep, rep))
    assert "(+0.0 ± 7.1 points)" in lines[0]  # sqrt(2 x 0.25 / 99)
    assert "(+50.0 ± 5.0 points; before RL" in lines[1]  # 50 of 100 improved: sqrt((0.5 - 0.25) / 99)
    near = {**synergy_figures(rep, rep), "verdict_gain": 0.0996, "first_image_gain": 0.0996 + 0.01}
    lines = synergy_lines(near)  # a miss that rounds to the goal shows two decimals; a pass keeps one
    assert "(+9.96 ± " in lines[2] and "NOT met" in lines[2] and "(+11.0 ± " in lines[0]


def test_summarise_counts_first_against_last_round() -> None:
    trees = [Tree(id=f"t{i}", prompt=PromptItem(id=f"p{i}", prompt="a photo of a square",
                                                metadata={"tag": "single_object"})) for i in range(4)]
    rep = summarise(trees, [[False, True, True], [True, True, False], [True, False, True], [None, True, True]], 2)
    # the third chain dipped and recovered (unchanged first to last); the fourth has no first-image score
    assert rep["refinement"] == {"improved": 1, "worse": 1, "pairs": 3}


def test_standard_errors_match_the_spread_of_simulated_evals() -> None:
    """Evaluate the 'same checkpoints' 4000 times with fresh samples: the sample standard deviation of each
    figure must match the standard error one eval reports (averaged over the simulated evals), within 6%."""
    rng = np.random.default_rng(0)
    tags = {"easy": (0.9, 0.95, 64), "mid": (0.4, 0.6, 64), "hard": (0.1, 0.3, 128)}  # p before, p after, n
    fix, brk = 0.35, 0.08  # after RL: a flawed first image is fixed by the last round, a correct one broken
    figs = []
    for _ in range(4000):
        before, after, last = {}, {}, {}
        for t, (pb, pa, n) in tags.items():
            before[t] = list(rng.random(n) < pb)
            after[t] = list(rng.random(n) < pa)
            u = rng.random(n)
            last[t] = [(u[i] >= brk) if a else (u[i] < fix) for i, a in enumerate(after[t])]
        vb = (list(rng.random(150) < 0.7), list(rng.random(250) < 0.6))
        va = (list(rng.random(150) < 0.8), list(rng.random(250) < 0.75))
        figs.append(synergy_figures(_report(before, verdicts=vb), _report(after, last, va)))
    for k in ("first_image_gain", "refinement_after", "verdict_gain"):
        spread = float(np.std([f[k] for f in figs], ddof=1))
        reported = float(np.mean([f[f"{k}_se"] for f in figs]))
        assert reported == pytest.approx(spread, rel=0.06), k
