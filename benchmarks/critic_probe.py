"""How often a tiny Blocks critic stops, per flaw kind, on synthetic images it did not draw itself.

A saved tiny policy (a run's ``warmstart/`` or ``final/`` folder, anything ``save_pretrained`` wrote) critiques
N images greedily: correct grids of held-out-style prompts in the warm start's canonical layout and in random
layouts, flawed 70% of the time by :func:`r3_rl.blocks.synthesis.perturb` (the warm start's own flaws).  Printed per
layout and flaw kind (the Blocks world's first fix: ``add``, ``remove``, ``recolor``, ``move``, ``swap``;
``correct`` when there is none): the count and the stop rate (on ``correct`` the higher the better, on a flaw
the lower).  Unlike ``critic_flaw_kinds.py`` it needs no run, and every kind gets tens of images.  Prompts come
from the training stream, or with ``--split heldout`` from the eval's held-out list (prompts the model never
trained on: the critic's verdict on those is what the eval measures); ``--tags`` keeps some tags only.

    python benchmarks/critic_probe.py runs/tiny_blocks/warmstart [MORE_FOLDERS] [--n 600] [--recipe R]
    python benchmarks/critic_probe.py RUN/warmstart RUN/final --tags counting --split heldout
"""
from __future__ import annotations

import collections
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from r3_rl.arguments import OneLineArgumentParser, int_at_least  # noqa: E402
from r3_rl.blocks import edits, synthesis  # noqa: E402
from r3_rl.blocks.prompts import TAGS  # noqa: E402
from r3_rl.config import load_recipe  # noqa: E402
from r3_rl.data import BlocksPrompts  # noqa: E402
from r3_rl.errors import EXIT_USAGE, UserError  # noqa: E402
from r3_rl.policy.base import ImageInput, parse_critique  # noqa: E402
from r3_rl.policy.tiny import TinyUnifiedPolicy  # noqa: E402
from r3_rl.policy.warmstart import canonical_grid  # noqa: E402
from r3_rl.trajectory import SamplingParams  # noqa: E402


def stop_rates(policy: TinyUnifiedPolicy, prompts: BlocksPrompts, n: int, seed: int = 0,
               max_new_tokens: int = 48, split: str = "train") -> dict[tuple[str, str], tuple[int, float]]:
    """(layout, flaw kind) -> (images, greedy stop rate), on ``split``'s prompts ("train" or "heldout")."""
    rng = np.random.default_rng(seed)
    held = prompts.held_out(n) if split == "heldout" else []
    prompt_of = prompts.train_prompt if split == "train" else held.__getitem__
    counts: dict[tuple[str, str], list[int]] = collections.defaultdict(lambda: [0, 0])
    sampling = SamplingParams(greedy=True, max_new_tokens=max_new_tokens)
    for layout in ("canonical", "random"):
        items, images, kinds = [], [], []
        for k in range(n):
            item = prompt_of(k)
            meta = item.metadata
            grid = (canonical_grid(meta, rng, policy.rows, policy.cols) if layout == "canonical"
                    else synthesis.random_correct_grid(meta, rng, policy.rows, policy.cols))
            if rng.random() < 0.7:
                grid = synthesis.perturb(grid, meta, rng)
            ops = edits.diagnose(grid, meta)
            items.append(item)
            images.append(ImageInput(image=np.zeros(0), image_tokens=grid.reshape(-1).tolist()))
            kinds.append(ops[0].kind if ops else "correct")
        for i in range(0, n, 100):
            for kind, critique in zip(kinds[i:i + 100], policy.reflect(items[i:i + 100], images[i:i + 100], sampling)):
                counts[(layout, kind)][0] += 1
                counts[(layout, kind)][1] += parse_critique(critique.text)[1]  # the verdict as the R3 loop reads it
    return {key: (total, stops / total) for key, (total, stops) in sorted(counts.items())}


def main() -> int:
    ap = OneLineArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("folders", nargs="+", type=Path, help="save_pretrained folders of tiny policies")
    ap.add_argument("--n", type=int_at_least(1), default=600, help="images per layout")
    ap.add_argument("--recipe", default="recipes/tiny_blocks.yaml", help="templates and prompt tags from here")
    ap.add_argument("--split", choices=("train", "heldout"), default="train", help="which prompts (default train)")
    ap.add_argument("--tags", nargs="+", choices=TAGS, help="only these prompt tags (default: the recipe's mix)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    try:  # every folder loaded before any is probed: a bad one is one line and exit 2, as in `r3-rl`
        recipe = load_recipe(args.recipe)
        policies = [TinyUnifiedPolicy.from_pretrained(str(f), recipe.templates.model_dump()) for f in args.folders]
    except UserError as e:
        print(f"critic_probe: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    for folder, policy in zip(args.folders, policies):
        tags = {t: 1.0 for t in args.tags} if args.tags else recipe.data.blocks.tags
        prompts = BlocksPrompts(tags=tags, seed=777)  # not the warm start's stream
        print(f"{folder} ({args.split} prompts)")
        for (layout, kind), (total, rate) in stop_rates(policy, prompts, args.n, split=args.split).items():
            print(f"  {layout:9s} {kind:8s} images {total:4d}  stop {rate:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
