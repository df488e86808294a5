"""R3's claim in three figures: RL improves generation, refinement and understanding together.

From the ``before`` and ``after`` eval reports of one run (:func:`r3_rl.eval.evaluate.evaluate`):

* **first image**: accuracy of round 0 after RL minus before RL (generation);
* **refinement**: after RL, accuracy of the last round minus round 0 (refinement still pays once the
  first image is better);
* **verdict**: the critic's verdict balanced accuracy on the eval chains after RL minus before RL
  (understanding).  Reported beside it: the same within tags (the mean of the per-tag figures; the pooled
  one also rises when the critic learns which tags usually fail and stops reading the image) and on the
  fixed reference set.

Each of the three comes with its **standard error from the eval's own sampling** (``*_se``): the spread the
figure would show if the same two checkpoints were evaluated again with other sampled images.  It is what
one run can tell apart from luck; the spread between training runs (seeds, thread counts) comes on top and
is what ``benchmarks/r3_synergy.py`` measures.  Accuracies are means over prompts drawn in fixed numbers
per tag, so their variance is the tag-weighted sum of per-tag binomial variances; refinement is a paired
difference on the same prompts (first against last round); the balanced accuracy averages two binomial
rates (stop on correct images, edit on flawed ones), and within tags it is the mean of the tags' own.  A
report without the counts gives NaN.

The reference set is the same images before and after RL, critiqued greedily by default, so evaluating the
same checkpoints again gives the same figure: its error (``reference_verdict_gain_se``) is instead how far
the change could differ on another draw of reference images like these -- a paired difference per image,
from the per-image verdicts the report keeps.

``GOALS`` are the demo's targets (issue 12), in accuracy points (fractions: 0.10 = 10 points).
"""
from __future__ import annotations

import math
from typing import Any

from r3_rl.eval.understanding import tags_with_both_kinds, within_tags

GOALS: dict[str, float] = {"first_image_gain": 0.10, "refinement_after": 0.05, "verdict_gain": 0.10}


def _block(report: dict[str, Any], name: str, where: str = "chains") -> dict[str, Any]:
    """``understanding[name]`` of the eval chains, or of the reference set (``where="reference"``)."""
    u = report.get("understanding") or {}
    return ((u if where == "chains" else u.get("reference") or {}).get(name)) or {}


def _verdict_block(report: dict[str, Any], where: str = "chains") -> dict[str, Any]:
    return _block(report, "verdict", where)


def _verdict(report: dict[str, Any], where: str = "chains", key: str = "balanced_accuracy") -> float:
    block = _verdict_block(report, where)
    if key == "within_tag_balanced_accuracy":
        return within_tags(block)
    return float(block.get("overall", {}).get(key, math.nan))


def _yes_no(report: dict[str, Any], where: str = "chains") -> float:
    """Balanced accuracy of the policy's yes/no answers about its own images (or the reference set's); NaN
    where not measured.  Balanced: after RL more of its images are correct, so more truths are "yes"."""
    block = _block(report, "yes_no", where)
    return float(block.get("balanced_accuracy", math.nan)) if block.get("available") else math.nan


def _refinement(report: dict[str, Any]) -> float:
    """Last-round minus first-image accuracy, over the prompts scored in both (the pairs behind its standard
    error); the two accuracies' difference where a report lacks the pairs.  Equal when no eval reward failed;
    with failures the accuracies have different denominators and their difference is no paired change."""
    ref = report.get("refinement") or {}
    if ref.get("pairs"):
        return (ref["improved"] - ref["worse"]) / ref["pairs"]
    return _difference(report["accuracy"][-1], report["accuracy"][0])


def _difference(a: float, b: float) -> float:
    """``a - b`` rounded to 12 decimals: accuracies 10 points apart make a gain of exactly 0.1, which meets a goal
    of +10 points (in floating point 0.3 - 0.2 is 0.09999999999999998, a miss printed as "+10.00")."""
    return round(a - b, 12)


def synergy_figures(before: dict[str, Any], after: dict[str, Any]) -> dict[str, float]:
    """The three figures (and what they are made of) from two eval reports."""
    b, a = before["accuracy"], after["accuracy"]
    out = {"first_image_before": b[0], "first_image_after": a[0], "final_before": b[-1], "final_after": a[-1],
           "verdict_before": _verdict(before), "verdict_after": _verdict(after),
           "reference_verdict_before": _verdict(before, "reference"),
           "reference_verdict_after": _verdict(after, "reference"),
           "within_tag_verdict_before": _verdict(before, key="within_tag_balanced_accuracy"),
           "within_tag_verdict_after": _verdict(after, key="within_tag_balanced_accuracy"),
           "yes_no_before": _yes_no(before), "yes_no_after": _yes_no(after),
           "reference_yes_no_before": _yes_no(before, "reference"), "reference_yes_no_after": _yes_no(after, "reference"),
           "stop_rate_before": before["stop_rate"], "stop_rate_after": after["stop_rate"]}
    out["refinement_before"] = _refinement(before)
    out["refinement_after"] = _refinement(after)
    for key in ("first_image", "verdict", "reference_verdict", "within_tag_verdict", "yes_no", "reference_yes_no"):
        out[f"{key}_gain"] = _difference(out[f"{key}_after"], out[f"{key}_before"])
    out.update(synergy_errors(before, after))
    return out


def _mean_var(p: float, n: float) -> float:
    """Variance of the mean of ``n`` Bernoulli draws, estimated from that mean (unbiased: ``n - 1``).  A rate
    measured as 0 or 1 adds none: a greedy critic that edits every image of a tag whatever it shows (the
    prompt shortcut) gives the same rate on any other draw of that tag's images."""
    return p * (1 - p) / (n - 1) if n > 1 and math.isfinite(p) else math.nan


def accuracy_variance(report: dict[str, Any], rnd: int) -> float:
    """Sampling variance of round ``rnd``'s accuracy: stratified by tag where the report has per-tag counts
    (the prompts the eval reward scored in that round where it keeps them: a failed reward is no draw)."""
    per_tag, scored = report.get("per_tag") or {}, report.get("scored")
    counts = {t: c[rnd] for t, c in scored.items()} if scored else (report.get("tag_counts") or {})
    total = sum(counts.values())
    if total and set(counts) == set(per_tag):
        return sum((c / total) ** 2 * _mean_var(per_tag[t][rnd], c) for t, c in counts.items() if c)
    return _mean_var(report["accuracy"][rnd], report.get("prompts", 0))


def refinement_variance(report: dict[str, Any]) -> float:
    """Sampling variance of last-round minus first-image accuracy, a paired difference per prompt
    (+1 improved, -1 worse, 0 unchanged)."""
    ref = report.get("refinement") or {}
    n = ref.get("pairs", 0)
    if n < 2:
        return math.nan
    mean = (ref["improved"] - ref["worse"]) / n
    return ((ref["improved"] + ref["worse"]) - n * mean ** 2) / ((n - 1) * n)


def _balanced_variance(summary: dict[str, Any]) -> float:
    """Variance of a balanced accuracy, the mean of two rates on separate images, from its counts."""
    if "correct_images" not in summary:
        return math.nan
    return 0.25 * (_mean_var(summary["stop_on_correct"], summary["correct_images"])
                   + _mean_var(summary["edit_on_flawed"], summary["flawed_images"]))


def verdict_variance(report: dict[str, Any]) -> float:
    """Sampling variance of the verdict balanced accuracy on the eval chains."""
    return _balanced_variance(_verdict_block(report).get("overall") or {})


def within_tag_variance(report: dict[str, Any]) -> float:
    """Sampling variance of the within-tag verdict figure: the mean over the tags with both kinds of image
    of independent balanced accuracies (the tags' images are separate draws)."""
    both = tags_with_both_kinds(_verdict_block(report).get("per_tag") or {})
    return sum(_balanced_variance(v) for v in both) / len(both) ** 2 if both else math.nan


def _paired_mean_var(diffs: list[int]) -> float:
    """Variance of the mean of paired differences (sample variance over ``n - 1``, divided by ``n``)."""
    n = len(diffs)
    if n < 2:
        return math.nan
    mean = sum(diffs) / n
    return sum((d - mean) ** 2 for d in diffs) / ((n - 1) * n)


def reference_gain_variance(before: dict[str, Any], after: dict[str, Any]) -> float:
    """Variance of the reference-set verdict gain as a paired difference per image: on correct images the
    change in "stop", on flawed ones the change in "edit", each rate's mean change then averaged (the
    balanced accuracy's).  NaN unless both reports kept per-image verdicts on the same judged images."""
    images = []
    for report in (before, after):
        per_image = ((report.get("understanding") or {}).get("reference") or {}).get("per_image") or {}
        images.append((per_image.get("judged_correct"), per_image.get("stop")))
    (judged, stop_b), (judged_a, stop_a) = images
    if not judged or judged != judged_a or not len(stop_b or []) == len(stop_a or []) == len(judged):
        return math.nan
    on_correct, on_flawed = [], []  # +1 = the verdict became right, -1 = it became wrong
    for ok, b, a in zip(judged, stop_b, stop_a):
        if ok is None or b is None or a is None:
            continue
        (on_correct if ok else on_flawed).append((int(a) - int(b)) * (1 if ok else -1))
    return 0.25 * (_paired_mean_var(on_correct) + _paired_mean_var(on_flawed))


def synergy_errors(before: dict[str, Any], after: dict[str, Any]) -> dict[str, float]:
    """Standard errors of the three figures and of the verdict's two companions: from the two evals'
    independent samples, except the reference set's (the same images twice: paired per image)."""
    return {"first_image_gain_se": math.sqrt(accuracy_variance(before, 0) + accuracy_variance(after, 0)),
            "refinement_after_se": math.sqrt(refinement_variance(after)),
            "verdict_gain_se": math.sqrt(verdict_variance(before) + verdict_variance(after)),
            "within_tag_verdict_gain_se": math.sqrt(within_tag_variance(before) + within_tag_variance(after)),
            "reference_verdict_gain_se": math.sqrt(reference_gain_variance(before, after))}


def near_miss(value: float, goal: float) -> bool:
    """A miss that one decimal would round up to the goal (+9.96 -> "+10.0"): printed with two decimals."""
    return value < goal and round(100 * value, 1) >= 100 * goal


def goals_met(fig: dict[str, float]) -> dict[str, bool]:
    return {k: bool(fig[k] >= v) for k, v in GOALS.items()}  # NaN compares False: not met


GOAL_NAMES: dict[str, str] = {"first_image_gain": "first image", "refinement_after": "refinement",
                              "verdict_gain": "verdict"}


def goals_brief(fig: dict[str, float]) -> str:
    """One line for an eval during training: the three figures against before RL, in points, each missed goal
    named (``first image +15.7, refinement +4.2 (< +5), verdict -4.5 (< +10)``).  A run then shows where the
    figures rise and fall on the way, not only where they end (session 33: on the demo's seed 0 refinement and
    the verdict crossed without either meeting its goal at any of six evals)."""
    met = goals_met(fig)
    return ", ".join(f"{GOAL_NAMES[k]} {100 * fig[k]:+.1f}" + ("" if met[k] else f" (< +{100 * goal:.0f})")
                     for k, goal in GOALS.items())


def synergy_lines(fig: dict[str, float]) -> list[str]:
    """The demo's closing lines: one per figure, with the goal and whether it was met."""
    met = goals_met(fig)

    def gain(k: str) -> str:
        return _points(fig, k, digits=2 if near_miss(fig[k], GOALS[k]) else 1)

    def mark(k: str) -> str:
        return f"(goal >= +{100 * GOALS[k]:.0f}: {'met' if met[k] else 'NOT met'})"

    ref = "".join(f"; {part}" for part in _before_after(fig, (("within_tag_verdict", "within tags"),
                                                             ("reference_verdict", "reference images"))))
    return [
        f"first-image accuracy, before -> after RL: {fig['first_image_before']:.3f} -> {fig['first_image_after']:.3f}"
        f" ({gain('first_image_gain')}) {mark('first_image_gain')}",
        f"refinement after RL, final round - first image: {fig['final_after']:.3f} - {fig['first_image_after']:.3f}"
        f" ({gain('refinement_after')}; before RL {_points(fig, 'refinement_before')}) {mark('refinement_after')}",
        f"verdict balanced accuracy, before -> after RL: {fig['verdict_before']:.3f} -> {fig['verdict_after']:.3f}"
        f" ({gain('verdict_gain')}) {mark('verdict_gain')}{ref}",
    ]


def _points(fig: dict[str, float], key: str, digits: int = 1) -> str:
    """``+11.7 ± 1.0 points`` (the ``± error`` only where ``{key}_se`` is a number)."""
    se = fig.get(f"{key}_se", math.nan)
    err = f" ± {100 * se:.1f}" if math.isfinite(se) else ""
    return f"{100 * fig[key]:+.{digits}f}{err} points"


def _before_after(fig: dict[str, float], pairs: tuple[tuple[str, str], ...]) -> list[str]:
    """``label before -> after (gain ± se points)`` for each (figure key, label) the figures hold."""
    return [f"{label} {fig[f'{key}_before']:.3f} -> {fig[f'{key}_after']:.3f} ({_points(fig, f'{key}_gain')})"
            for key, label in pairs if math.isfinite(fig.get(f"{key}_gain", math.nan))]


def understanding_line(fig: dict[str, float]) -> str | None:
    """The yes/no answers about the image before and after RL (balanced accuracy), on the policy's own images
    and on the reference set; ``None`` where neither was measured.  The demo prints it just before
    :func:`synergy_lines`: understanding beyond the critic's verdict.  No error: a prompt's questions are
    about one image, so they are not independent draws."""
    parts = _before_after(fig, (("yes_no", "on its own images"), ("reference_yes_no", "on the reference images")))
    return f"yes/no answers about the image (balanced accuracy), before -> after RL: {'; '.join(parts)}" \
        if parts else None
