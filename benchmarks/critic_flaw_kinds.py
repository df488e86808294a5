"""Which flaws the Blocks critic sees, and whether RL could teach it the rest: read from a finished run's trajectories.

For every critique in the run's logged training steps (``trajectories/step_*.jsonl``, the refine stage's sibling
groups) and in its eval samples (``eval/before_trajectories.jsonl``, ``eval/after_trajectories.jsonl``), the
parent image's flaw kind is the kind of edit the Blocks world's own diagnosis would make first (``add``,
``remove``, ``recolor``, ``move``, ``swap``; ``correct`` when there is none).  Printed per kind:

* training groups: the share whose critiques all give the right verdict, mix, or all give the wrong one.  A group
  whose critiques all agree has no GRPO signal: a flaw kind the critic misses in every sibling is one RL cannot
  teach it (and ``learner.critic_baseline: verdict`` hardly moves a near-certain verdict: README, R3 synergy);
* eval: the stop rate before and after RL (on ``correct`` the higher the better, on a flaw the lower).

    python benchmarks/critic_flaw_kinds.py RUN_DIR [RUN_DIR ...]

The eval files hold the trees the eval logged (a sample of its prompts), so the eval counts are small.
"""
from __future__ import annotations

import collections
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import yaml  # noqa: E402

from r3_rl.arguments import OneLineArgumentParser  # noqa: E402
from r3_rl.blocks import edits  # noqa: E402
from r3_rl.trajectory import Node, Tree, read_trees  # noqa: E402


def flaw_kind(tree: Tree, parent: Node, shape: tuple[int, int]) -> str:
    ops = edits.diagnose(np.asarray(parent.image_tokens).reshape(shape), tree.prompt.metadata)
    return ops[0].kind if ops else "correct"


def critique_groups(trees: list[Tree], shape: tuple[int, int]) -> dict[str, list[tuple[int, int]]]:
    """flaw kind -> (critiques with the right verdict, critiques) per sibling group."""
    out: dict[str, list[tuple[int, int]]] = collections.defaultdict(list)
    for t in trees:
        groups: dict[str, list[Node]] = collections.defaultdict(list)
        for n in t.nodes.values():
            if n.stage == "reflect" and n.stop is not None:
                groups[n.group_id].append(n)
        for sibs in groups.values():
            parent = t.nodes.get(sibs[0].parent or "")
            if parent is None or parent.image_tokens is None:
                continue
            kind = flaw_kind(t, parent, shape)
            right = sum(bool(n.stop) == (kind == "correct") for n in sibs)
            out[kind].append((right, len(sibs)))
    return out


def report(run: Path) -> None:
    blocks = (yaml.safe_load((run / "recipe.yaml").read_text()).get("data") or {}).get("blocks") or {}
    shape = (int(blocks.get("rows", 4)), int(blocks.get("cols", 4)))
    train = [t for f in sorted((run / "trajectories").glob("step_*.jsonl")) for t in read_trees(f)]
    print(f"{run}: training critique groups ({len(train)} trees logged)")
    for kind, groups in sorted(critique_groups(train, shape).items()):
        n = len(groups)
        all_right = sum(r == k for r, k in groups) / n
        all_wrong = sum(r == 0 for r, _ in groups) / n
        print(f"  {kind:8s} {n:4d} groups  all right {all_right:.2f}  mixed {1 - all_right - all_wrong:.2f}  "
              f"all wrong {all_wrong:.2f}")
    for when in ("before", "after"):
        path = run / "eval" / f"{when}_trajectories.jsonl"
        if not path.is_file():
            continue
        kinds = critique_groups(list(read_trees(path)), shape)
        stops = {k: (sum(r if k == "correct" else c - r for r, c in g), sum(c for _, c in g)) for k, g in kinds.items()}
        print(f"  eval {when:6s} stop rate: " + "  ".join(f"{k} {s / c:.2f} ({c})" for k, (s, c) in sorted(stops.items())))


def main() -> None:
    ap = OneLineArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", type=Path, help="run dirs of finished Blocks runs")
    for run in ap.parse_args().runs:
        report(run)


if __name__ == "__main__":
    main()
