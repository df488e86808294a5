"""The trainer's own sampling under single-rank DeepSpeed ZeRO-3: weights gathered once with DeepSpeed's hooks off
(``Trainer.sampling_weights``, as TRL's ``unwrap_model_for_generation``) against the hooks on (r3-rl before
2026-12-06), with ZeRO-2 as the peer, in one run.

Each mode trains the tiny recipe (local rollout) for ``--steps`` steps and prints every step's rollout seconds
(the learner step runs between rollouts, so a rollout after an update is measured as a run sees it).  With the
hooks on, every token's forward fetched and released each module's shard, and the step after the first updates
spent most of its time re-recording DeepSpeed's trace of module calls.

    python benchmarks/zero3_sampling.py [--steps 5] [--hidden 32] [--layers 2]
"""
from __future__ import annotations

import contextlib
import statistics
import sys
import tempfile
from pathlib import Path
from unittest import mock

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from r3_rl.arguments import OneLineArgumentParser, int_at_least  # noqa: E402


def rollout_seconds(sets: list[str], steps: int, hooks_on: bool) -> list[float]:
    import time

    from r3_rl.config import load_recipe
    from r3_rl.trainer import Trainer

    with tempfile.TemporaryDirectory() as tmp:
        recipe = load_recipe(REPO / "recipes" / "tiny_blocks.yaml", sets + [f"out_dir={tmp}"])
        trainer = Trainer(recipe, Path(tmp) / "run")
        patch = (mock.patch.object(Trainer, "sampling_weights", lambda self: contextlib.nullcontext())
                 if hooks_on else contextlib.nullcontext())
        out = []
        try:
            with patch:
                for step in range(steps):
                    t0 = time.perf_counter()
                    trees = trainer.rollout(step)
                    out.append(time.perf_counter() - t0)
                    items, _, _ = trainer.algorithm.batch(trees, trainer.policy.version)
                    if "learner/loss" in trainer.learner.step(items):
                        trainer.policy.version += 1
        finally:
            trainer.close()
    return out


def main() -> None:
    ap = OneLineArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int_at_least(2), default=5, help="training steps per mode")
    ap.add_argument("--hidden", type=int_at_least(8), default=32, help="the tiny policy's width")
    ap.add_argument("--layers", type=int_at_least(1), default=2, help="the tiny policy's decoder layers")
    args = ap.parse_args()
    import torch

    torch.set_num_threads(1)
    heads = max(1, args.hidden // 16)
    base = [f"policy.tiny.hidden_size={args.hidden}", f"policy.tiny.num_layers={args.layers}",
            f"policy.tiny.num_heads={heads}", f"policy.tiny.intermediate_size={2 * args.hidden}",
            "warmstart.steps=12", "data.eval_size=4", "tree.group_size=4", "tree.prompts_per_step=2",
            "tree.refine_groups_per_step=2", "eval.rounds=1", "log.console=false", "log.tensorboard=false",
            "learner.micro_batch_size=8", "learner.backend=deepspeed", "learner.deepspeed.dtype=fp32", "threads=1"]
    modes = {"ZeRO-3, weights gathered once, hooks off (now)": (base + ["learner.deepspeed.zero_stage=3"], False),
             "ZeRO-3, hooks on (before 2026-12-06)": (base + ["learner.deepspeed.zero_stage=3"], True),
             "ZeRO-2 (peer)": (base + ["learner.deepspeed.zero_stage=2"], False)}
    results = {name: rollout_seconds(sets, args.steps, hooks) for name, (sets, hooks) in modes.items()}
    peer = statistics.median(results["ZeRO-2 (peer)"])
    print(f"tiny recipe, width {args.hidden} x {args.layers} layers, {args.steps} steps, rollout seconds per step:")
    for name, secs in results.items():
        print(f"  {name:50s} {' '.join(f'{s:6.2f}' for s in secs)}   median {statistics.median(secs):.2f} s, "
              f"total {sum(secs):.1f} s ({statistics.median(secs) / peer:.2f}x ZeRO-2's median)")


if __name__ == "__main__":
    main()
