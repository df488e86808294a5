"""The synergy figures' standard errors: exact small cases, and agreement with the spread of simulated evals."""
from __future__ import annotations

import math

import numpy as np
import pytest

from r3_rl.eval.evaluate import summarise
from r3_rl.eval.synergy import (
    goals_brief,
    accuracy_variance, reference_gain_variance, refinement_variance, synergy_errors, synergy_figures, synergy_lines,
    verdict_variance, within_tag_variance,
)
from r3_rl.eval.understanding import verdict_report
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
    assert rep["scored"] == {"single_object": [3, 4, 4]}
    # round 0's accuracy is 2 of the 3 scored draws, and so is its variance's count: (2/9) / 2, not / 3
    assert rep["accuracy"][0] == pytest.approx(2 / 3)
    assert accuracy_variance(rep, 0) == pytest.approx((2 / 9) / 2)
    # a tag whose every image failed is no draw at all (not a NaN that spoils the rest)
    rep["scored"]["counting"], rep["per_tag"]["counting"] = [0, 0, 0], [math.nan] * 3
    assert accuracy_variance(rep, 0) == pytest.approx((2 / 9) / 2)


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


def _tagged(rep: dict, verdicts: list[tuple[bool, bool, int, str]],
            reference: tuple[list[bool | None], list[bool | None]] | None = None) -> dict:
    """``rep`` with a real verdict report (per tag) over ``verdicts`` and, optionally, a reference set's
    per-image (judged correct, stop) lists."""
    u = {"verdict": verdict_report(verdicts)}
    if reference is not None:
        judged, stops = reference
        u["reference"] = {"verdict": verdict_report([(j, s, 1, "t") for j, s in zip(judged, stops) if j is not None]),
                          "per_image": {"judged_correct": judged, "stop": stops}}
    return {**rep, "understanding": u}


def test_within_tags_and_reference_exact_cases() -> None:
    base = _report({"a": [True, False]})
    # tag x: stop on correct 1 of 2 (variance of the mean 0.25 / 1), edit on flawed 2 of 2 (0);
    # tag y: stop on correct 2 of 3 ((2/9) / 2), edit on flawed 1 of 2 (0.25); tag z has no flawed image (left out)
    v = [(True, True, 1, "x"), (True, False, 1, "x"), (False, False, 1, "x"), (False, False, 1, "x"),
         (True, True, 1, "y"), (True, True, 1, "y"), (True, False, 1, "y"), (False, False, 1, "y"),
         (False, True, 1, "y"), (True, True, 1, "z")]
    rep = _tagged(base, v)
    per_tag = 0.25 * 0.25 + 0.25 * ((2 / 9) / 2 + 0.25)
    assert within_tag_variance(rep) == pytest.approx(per_tag / 4)  # mean of two tags: / 2^2
    assert synergy_errors(rep, rep)["within_tag_verdict_gain_se"] == pytest.approx(math.sqrt(2 * per_tag / 4))
    # reference: 3 correct images, stops before (1, 1, 0) -> after (0, 1, 1): changes -1, 0, +1 (variance 1,
    # of the mean 1/3); 2 flawed, stops (1, 0) -> (0, 0): edit changes +1, 0 (variance 0.5, of the mean 0.25);
    # a failed reward (None) is left out of both
    before = _tagged(base, v, ([True, True, True, False, False, None], [True, True, False, True, False, None]))
    after = _tagged(base, v, ([True, True, True, False, False, None], [False, True, True, False, False, None]))
    assert reference_gain_variance(before, after) == pytest.approx(0.25 * (1 / 3 + 0.25))
    fig = synergy_figures(before, after)
    assert fig["reference_verdict_gain"] == pytest.approx(0.25)  # (0 + 0.5) / 2
    assert fig["reference_verdict_gain_se"] == pytest.approx(math.sqrt(0.25 * (1 / 3 + 0.25)))
    assert f"reference images 0.583 -> 0.833 (+25.0 ± {100 * math.sqrt(0.25 * (1 / 3 + 0.25)):.1f} points)" \
        in synergy_lines(fig)[2]
    assert "within tags " in synergy_lines(fig)[2] and "(+0.0 ± " in synergy_lines(fig)[2]
    # different images (or an old report without per-image verdicts): no paired error
    other = _tagged(base, v, ([False, True, True, False, False, None], [False, True, True, False, False, None]))
    assert math.isnan(reference_gain_variance(before, other))
    assert math.isnan(reference_gain_variance(base, after)) and math.isnan(within_tag_variance(base))


def test_within_tag_and_reference_errors_match_simulated_spread() -> None:
    """Within tags: fresh eval images every time.  Reference set: a fresh draw of reference images each time,
    whose before and after verdicts are correlated (most verdicts do not change), judged by one critic pair."""
    rng = np.random.default_rng(1)
    tags = {"easy": (0.8, 0.9, 0.85, 0.8, 200), "hard": (0.6, 0.5, 0.7, 0.75, 300)}  # stop/edit before, after, n
    within, within_se, ref, ref_se = [], [], [], []
    for _ in range(3000):
        reps = []
        for when in (0, 1):
            v = []
            for t, (sb, eb, sa, ea, n) in tags.items():
                s_rate, e_rate = (sb, eb) if when == 0 else (sa, ea)
                for ok in rng.random(n) < 0.4:
                    v.append((bool(ok), bool(rng.random() < (s_rate if ok else 1 - e_rate)), 1, t))
            reps.append(_tagged({}, v))
        within.append(synergy_figures_within(reps))
        within_se.append(math.sqrt(within_tag_variance(reps[0]) + within_tag_variance(reps[1])))
        judged = list(rng.random(192) < 0.5)
        flip = rng.random(192)
        stop_b = [bool(rng.random() < (0.9 if j else 0.4)) for j in judged]
        # after RL: a verdict changes on 15% of images, towards right more often than wrong
        stop_a = [(not s if f < 0.15 else s) if (s != j or f < 0.05) else s for s, j, f in zip(stop_b, judged, flip)]
        b = _tagged({}, [], (judged, stop_b))
        a = _tagged({}, [], (judged, stop_a))
        ba = [b["understanding"]["reference"]["verdict"]["overall"]["balanced_accuracy"],
              a["understanding"]["reference"]["verdict"]["overall"]["balanced_accuracy"]]
        ref.append(ba[1] - ba[0])
        ref_se.append(math.sqrt(reference_gain_variance(b, a)))
    assert float(np.mean(within_se)) == pytest.approx(float(np.std(within, ddof=1)), rel=0.06)
    assert float(np.mean(ref_se)) == pytest.approx(float(np.std(ref, ddof=1)), rel=0.06)


def synergy_figures_within(reports: list[dict]) -> float:
    from r3_rl.eval.understanding import within_tags

    return within_tags(reports[1]["understanding"]["verdict"]) - within_tags(reports[0]["understanding"]["verdict"])


def test_goals_brief_names_each_missed_goal() -> None:
    fig = {"first_image_gain": 0.157, "refinement_after": 0.042, "verdict_gain": -0.045}
    assert goals_brief(fig) == "first image +15.7, refinement +4.2 (< +5), verdict -4.5 (< +10)"
    fig = {"first_image_gain": 0.10, "refinement_after": 0.05, "verdict_gain": 0.101}
    assert goals_brief(fig) == "first image +10.0, refinement +5.0, verdict +10.1"
    fig = {"first_image_gain": math.nan, "refinement_after": 0.06, "verdict_gain": 0.2}
    assert goals_brief(fig) == "first image +nan (< +10), refinement +6.0, verdict +20.0"  # NaN is not met
