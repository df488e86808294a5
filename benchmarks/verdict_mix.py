"""How much of a run's pooled verdict change is the critic, and how much is which images it was shown.

The pooled verdict balanced accuracy (issue 12's third figure) averages a critic's stop-on-correct and
edit-on-flawed rates over every image it critiqued, so it moves when RL changes which tags the generator's flaws
fall in, even if the critic reads no better or worse.  For each run dir (``eval/before.json``, ``eval/after.json``)
this prints the pooled figure before and after RL, then the per-tag rates of one eval weighted by the other's
per-tag image counts (:func:`r3_rl.eval.understanding.balanced_accuracy_on_mix`):

* ``before-RL critic on after-RL images``: the change the flaw mix alone makes (the critic as it was);
* ``after-RL critic on before-RL images``: the change the critic alone makes (the images as they were).

Why: in the Blocks demo RL fixes the flaws the critic sees (missing objects) and leaves those it does not
(colours), so a critic that reads no better loses pooled accuracy as the generator gains: -6.5 to -7.0 points on
the shipped recipe's seed 0-1 runs (README: R3 synergy, session 28).

    python benchmarks/verdict_mix.py RUN_DIR [RUN_DIR ...]
"""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from r3_rl.arguments import OneLineArgumentParser  # noqa: E402
from r3_rl.errors import EXIT_USAGE  # noqa: E402
from r3_rl.eval.understanding import balanced_accuracy_on_mix  # noqa: E402


def verdict_blocks(run: Path) -> tuple[dict, dict]:
    """The chains' verdict blocks of ``eval/before.json`` and ``eval/after.json``; ValueError names what is missing."""
    out = []
    for name in ("before", "after"):
        path = run / "eval" / f"{name}.json"
        what = f"{path}: not an eval report with understanding.verdict.overall.balanced_accuracy and .per_tag"
        try:
            block = json.loads(path.read_text())["understanding"]["verdict"]
        except FileNotFoundError:
            raise ValueError(f"{path}: no such file (a run dir of `r3-rl train` with its before/after evals)")
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ValueError(f"{what} ({e!r})")
        overall = block.get("overall") if isinstance(block, dict) else None
        if not isinstance(overall, dict) or "balanced_accuracy" not in overall or not isinstance(block.get("per_tag"), dict):
            raise ValueError(what)
        out.append(block)
    return out[0], out[1]


def decomposition(before: dict, after: dict) -> dict[str, float]:
    """Pooled before and after, and each critic on the other eval's images (fractions)."""
    return {"before": float(before["overall"]["balanced_accuracy"]),
            "after": float(after["overall"]["balanced_accuracy"]),
            "mix_only": balanced_accuracy_on_mix(before["per_tag"], after["per_tag"]),
            "critic_only": balanced_accuracy_on_mix(after["per_tag"], before["per_tag"])}


def _against_before(d: dict[str, float], key: str) -> str:
    if math.isnan(d[key]):  # one eval has images of a kind in a tag the other's critic never judged
        return "n/a (a tag's critic never judged such an image)"
    return f"{d[key]:.3f} ({100 * (d[key] - d['before']):+.1f})"


def main() -> int:
    ap = OneLineArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", type=Path, help="run dirs with eval/before.json and eval/after.json")
    args = ap.parse_args()
    try:  # every run read before any is printed: a bad one is one line and exit 2, as in `r3-rl`
        blocks = [verdict_blocks(run) for run in args.runs]
    except ValueError as e:
        print(f"verdict_mix: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    for run, (before, after) in zip(args.runs, blocks):
        d = decomposition(before, after)
        print(f"{run}: pooled verdict {d['before']:.3f} -> {d['after']:.3f} "
              f"({100 * (d['after'] - d['before']):+.1f} points); "
              f"before-RL critic on after-RL images {_against_before(d, 'mix_only')}; "
              f"after-RL critic on before-RL images {_against_before(d, 'critic_only')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
