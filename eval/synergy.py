"""R3's claim in three figures: RL improves generation, refinement and understanding together.

From the ``before`` and ``after`` eval reports of one run (:func:`r3_rl.eval.evaluate.evaluate`):

* **first image**: accuracy of round 0 after RL minus before RL (generation);
* **refinement**: after RL, accuracy of the last round minus round 0 (refinement still pays once the
  first image is better);
* **verdict**: the critic's verdict balanced accuracy on the eval chains after RL minus before RL
  (understanding).  Reported beside it: the same within tags (the mean of the per-tag figures; the pooled
  one also rises when the critic learns which tags usually fail and stops reading the image) and on the
  fixed reference set.

``GOALS`` are the demo's targets (issue 12), in accuracy points (fractions: 0.10 = 10 points).
"""
from __future__ import annotations

import math
from typing import Any

from r3_rl.eval.understanding import within_tags

GOALS: dict[str, float] = {"first_image_gain": 0.10, "refinement_after": 0.05, "verdict_gain": 0.10}


def _verdict(report: dict[str, Any], where: str = "chains", key: str = "balanced_accuracy") -> float:
    u = report.get("understanding") or {}
    block = (u.get("verdict") if where == "chains" else (u.get("reference") or {}).get("verdict")) or {}
    if key == "within_tag_balanced_accuracy":
        return within_tags(block)
    return float(block.get("overall", {}).get(key, math.nan))


def synergy_figures(before: dict[str, Any], after: dict[str, Any]) -> dict[str, float]:
    """The three figures (and what they are made of) from two eval reports."""
    b, a = before["accuracy"], after["accuracy"]
    out = {"first_image_before": b[0], "first_image_after": a[0], "final_before": b[-1], "final_after": a[-1],
           "verdict_before": _verdict(before), "verdict_after": _verdict(after),
           "reference_verdict_before": _verdict(before, "reference"),
           "reference_verdict_after": _verdict(after, "reference"),
           "within_tag_verdict_before": _verdict(before, key="within_tag_balanced_accuracy"),
           "within_tag_verdict_after": _verdict(after, key="within_tag_balanced_accuracy"),
           "stop_rate_before": before["stop_rate"], "stop_rate_after": after["stop_rate"]}
    out["first_image_gain"] = a[0] - b[0]
    out["refinement_before"] = b[-1] - b[0]
    out["refinement_after"] = a[-1] - a[0]
    out["verdict_gain"] = out["verdict_after"] - out["verdict_before"]
    out["reference_verdict_gain"] = out["reference_verdict_after"] - out["reference_verdict_before"]
    out["within_tag_verdict_gain"] = out["within_tag_verdict_after"] - out["within_tag_verdict_before"]
    return out


def goals_met(fig: dict[str, float]) -> dict[str, bool]:
    return {k: bool(fig[k] >= v) for k, v in GOALS.items()}  # NaN compares False: not met


def synergy_lines(fig: dict[str, float]) -> list[str]:
    """The demo's closing lines: one per figure, with the goal and whether it was met."""
    met = goals_met(fig)

    def pts(x: float) -> str:
        return f"{100 * x:+.1f} points"

    def mark(k: str) -> str:
        return f"(goal >= +{100 * GOALS[k]:.0f}: {'met' if met[k] else 'NOT met'})"

    ref = ""
    for key, label in (("within_tag_verdict", "within tags"), ("reference_verdict", "reference images")):
        if math.isfinite(fig.get(f"{key}_gain", math.nan)):
            ref += f"; {label} {fig[f'{key}_before']:.3f} -> {fig[f'{key}_after']:.3f} ({pts(fig[f'{key}_gain'])})"
    return [
        f"first-image accuracy, before -> after RL: {fig['first_image_before']:.3f} -> {fig['first_image_after']:.3f}"
        f" ({pts(fig['first_image_gain'])}) {mark('first_image_gain')}",
        f"refinement after RL, final round - first image: {fig['final_after']:.3f} - {fig['first_image_after']:.3f}"
        f" ({pts(fig['refinement_after'])}; before RL {pts(fig['refinement_before'])}) {mark('refinement_after')}",
        f"verdict balanced accuracy, before -> after RL: {fig['verdict_before']:.3f} -> {fig['verdict_after']:.3f}"
        f" ({pts(fig['verdict_gain'])}) {mark('verdict_gain')}{ref}",
    ]
