"""Held-out accuracy of the tiny flow policy before and after RL (recipes/tiny_flow_blocks.yaml), and its CPU time.

Runs the recipe through the real trainer (warm start, eval before, Tree-RL GRPO, eval after) and prints the
held-out accuracy per R3 round before and after RL: round 0 is the first image, later rounds are refinements,
so ``round k - round 0`` is what refinement adds.  The issue's budget is 10 minutes of *training* on 2 cores; on
a shared machine wall time depends on the neighbours, so the training CPU time (process time of the RL steps,
evals and warm start excluded) is printed beside the wall time.

    python benchmarks/tiny_flow_blocks.py [--run-dir runs/bench-tiny-flow] [--steps N] [--set key=value ...]

A second call with the same ``--run-dir`` reuses the cached warm start (``<run-dir>/warmstart``).
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from r3_rl.arguments import OneLineArgumentParser, int_at_least  # noqa: E402
from r3_rl.config import load_recipe  # noqa: E402
from r3_rl.trainer import Trainer  # noqa: E402

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "tiny_flow_blocks.yaml"


def main() -> None:
    ap = OneLineArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--run-dir", default="runs/bench-tiny-flow")
    ap.add_argument("--steps", type=int_at_least(1), default=None, help="RL steps (default: the recipe's)")
    ap.add_argument("--set", action="append", default=[], help="recipe override key=value (repeatable)")
    args = ap.parse_args()
    sets = list(args.set) + ([f"steps={args.steps}"] if args.steps is not None else []) + ["log.console=false"]
    recipe = load_recipe(RECIPE, sets)
    run_dir = Path(args.run_dir)
    t0, c0 = time.time(), time.process_time()
    trainer = Trainer(recipe, run_dir)  # builds the parts; the warm start runs (or is reused) here
    warm_wall, warm_cpu = time.time() - t0, time.process_time() - c0
    evals: list[tuple[float, float]] = []
    run_eval = trainer.evaluator.run

    def timed_eval(*a: Any, **k: Any) -> Any:
        w, c = time.time(), time.process_time()
        out = run_eval(*a, **k)
        evals.append((time.time() - w, time.process_time() - c))
        return out

    trainer.evaluator.run = timed_eval  # type: ignore[method-assign]
    t1, c1 = time.time(), time.process_time()
    summary = trainer.train()
    wall = time.time() - t1 - sum(w for w, _ in evals)
    cpu = time.process_time() - c1 - sum(c for _, c in evals)
    before, after = summary["before"], summary["after"]
    n = recipe.data.eval_size
    print(f"tiny flow Blocks: {recipe.steps} RL steps, held-out {n} prompts, threads {recipe.threads}; run {run_dir}")
    print(f"  warm start ({recipe.warmstart.steps} steps, reused if cached): {warm_wall:.0f} s wall, "
          f"{warm_cpu:.0f} s CPU")
    print(f"  RL training (evals excluded): {wall:.0f} s wall, {cpu:.0f} s CPU ({cpu / 60:.1f} CPU-minutes)")
    print("  accuracy per round   " + "  ".join(f"round {k}" for k in range(len(before))))
    print("  before RL            " + "  ".join(f"{a:7.3f}" for a in before))
    print("  after RL             " + "  ".join(f"{a:7.3f}" for a in after))
    print(f"  first image: {before[0]:.3f} -> {after[0]:.3f} ({100 * (after[0] - before[0]):+.1f} points)")
    print(f"  refinement (last round - first image): before {100 * (before[-1] - before[0]):+.1f} points, "
          f"after {100 * (after[-1] - after[0]):+.1f} points")
    (run_dir / "bench.json").write_text(json.dumps({"before": before, "after": after, "train_cpu_s": cpu,
                                                    "train_wall_s": wall, "warm_cpu_s": warm_cpu}))


if __name__ == "__main__":
    main()
