"""Learner step time of the tiny flow policy with every denoising step stochastic against one SDE step per image.

A GRPO step (``TorchLearner.step``: rescoring, reference KL, backward, AdamW) on the first images of
``--prompts`` x ``--group`` siblings drawn by ``policy.kind: tiny_flow`` (the shape of recipes/tiny_flow_blocks.yaml
unless told otherwise), in three settings measured in the same run, interleaved:

* ``all``: every step of the ``--points``-point grid is an SDE step, recorded and trained (Flow-GRPO original);
* ``window``: a MixGRPO window of ``--window`` consecutive steps;
* ``one``: one SDE step per image at a random index (R3).

    python benchmarks/flow_learner_step.py [--prompts 8] [--group 8] [--points 16] [--window 4]
                                           [--hidden 128] [--layers 4] [--repeats 5] [--threads 1]

The tiny policy's velocity head reads the Llama's hidden states of the context once per image, whatever the
number of steps, so the ratio here is the head's and the Gaussian's cost; in BAGEL every step is a full
transformer forward and the ratio approaches the number of trained steps.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from r3_rl.arguments import OneLineArgumentParser, int_at_least  # noqa: E402
from r3_rl.config import load_recipe  # noqa: E402
from r3_rl.learner.batch import TrainItem  # noqa: E402
from r3_rl.learner.torch_learner import TorchLearner  # noqa: E402
from r3_rl.policy.registry import build_policy  # noqa: E402
from r3_rl.trajectory import PromptItem, SamplingParams  # noqa: E402

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "tiny_flow_blocks.yaml"
SETTINGS = {"all": "{mode: all}", "window": "{mode: random_window, window: %d}", "one": "{mode: random, count: 1}"}


def setup(args: argparse.Namespace, mode: str) -> tuple[TorchLearner, list[TrainItem]]:
    sde = SETTINGS[mode] % args.window if mode == "window" else SETTINGS[mode]
    recipe = load_recipe(RECIPE, [f"policy.tiny.hidden_size={args.hidden}", f"policy.tiny.num_layers={args.layers}",
                                  f"policy.options.grid_points={args.points}", f"policy.options.sde_generate={sde}",
                                  f"learner.micro_batch_size={args.prompts * args.group}"])
    policy = build_policy(recipe)
    prompts = [PromptItem(id=f"p{k}", prompt=f"a photo of {k % 3 + 1} red squares") for k in range(args.prompts)
               for _ in range(args.group)]
    images = policy.generate(prompts, [None] * len(prompts), SamplingParams(), torch.Generator().manual_seed(0))
    adv = torch.randn(len(images), generator=torch.Generator().manual_seed(1)).tolist()
    items = [TrainItem(im.segment, a, "generate", 0) for im, a in zip(images, adv)]
    return TorchLearner(policy, policy.frozen_copy(), recipe.learner), items


def main() -> None:
    ap = OneLineArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--prompts", type=int_at_least(1), default=8)
    ap.add_argument("--group", type=int_at_least(1), default=8)
    ap.add_argument("--points", type=int_at_least(1), default=16)
    ap.add_argument("--window", type=int_at_least(1), default=4)
    ap.add_argument("--hidden", type=int_at_least(1), default=128)
    ap.add_argument("--layers", type=int_at_least(1), default=4)
    ap.add_argument("--repeats", type=int_at_least(1), default=5)
    ap.add_argument("--threads", type=int_at_least(1), default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    runs = {mode: setup(args, mode) for mode in SETTINGS}
    times: dict[str, list[float]] = {m: [] for m in runs}
    for learner, items in runs.values():
        learner.step(items)  # warm-up
    for _ in range(args.repeats):
        for mode, (learner, items) in runs.items():
            t0 = time.perf_counter()
            learner.step(items)
            times[mode].append(time.perf_counter() - t0)
    med = {m: statistics.median(v) for m, v in times.items()}
    images = args.prompts * args.group
    print(f"tiny flow GRPO learner step: {images} images, {args.points - 1} denoising steps, width {args.hidden}, "
          f"{args.layers} layers, {args.threads} thread(s), median of {args.repeats}")
    for mode, (_, items) in runs.items():
        steps = sum(it.segment.num_actions for it in items)
        print(f"  {mode:<6} {steps:>5} SDE steps trained  {1000 * med[mode]:8.1f} ms  "
              f"{med[mode] / med['one']:5.2f}x of one")


if __name__ == "__main__":
    main()
