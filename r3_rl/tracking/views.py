"""How a trajectory is shown: which paths, in what order, with which captions (pure, no I/O).

Shared by the TensorBoard grids, the static HTML page and ``r3-rl inspect`` so the three always tell
the same story.  A *trajectory* is one root-to-leaf path of a tree: plan -> image for a stage-A tree,
buffered image -> critique -> refined image for a refine-stage tree, the whole R3 chain for eval.
"""
from __future__ import annotations

from collections import deque
from itertools import zip_longest
from typing import Any, Callable, Iterator

from r3_rl.trajectory import Node, Tree


def node_score(node: Node) -> float | None:
    """Training reward, or the eval reward for eval chains (which are scored after the fact)."""
    if node.reward is not None:
        return node.reward
    s = node.meta.get("eval_score")
    return float(s) if isinstance(s, (int, float)) else None


def fmt(x: float | None, digits: int = 3) -> str:
    return "failed" if x is None else f"{x:.{digits}f}"


def scored(node: Node) -> bool:
    """Whether a reward was attempted: eval chains score only their images, so their plans and critiques carry
    no reward at all (shown without ``R=``), while a training node with ``reward=None`` has failed."""
    return (node.reward is not None or bool(node.rewards) or bool(node.reward_failures)
            or "eval_score" in node.meta)


def reward_text(node: Node, digits: int = 2) -> str:
    return f" R={fmt(node_score(node), digits)}" if scored(node) else ""


def trajectory_paths(tree: Tree) -> list[list[Node]]:
    """Every root-to-leaf path, in node insertion order (sibling 0 first)."""
    return [tree.path(leaf.id) for leaf in tree.leaves()]


def select_trajectories(trees: list[Tree], limit: int) -> list[tuple[Tree, list[Node]]]:
    """Up to ``limit`` trajectories, one per tree: full R3 chains first (those with most images first), then
    alternating between the other tree kinds (A, BC) so a dashboard shows first images and refinements.
    Deterministic: the first path of each tree (siblings are independent draws, so the first is as
    representative as any)."""
    by_kind: dict[str, list[Tree]] = {}
    for t in trees:
        by_kind.setdefault(str(t.meta.get("kind", "")), []).append(t)
    if "chain" in by_kind:
        by_kind["chain"].sort(key=lambda t: -sum(1 for n in t.nodes.values() if n.image is not None))
    out: list[tuple[Tree, list[Node]]] = []
    chains = by_kind.pop("chain", [])
    for t in chains[:limit if not by_kind else max(1, limit // 2)]:  # chains first, half the grids at most
        paths = trajectory_paths(t)
        if paths and len(out) < limit:
            out.append((t, paths[0]))
    queues = [iter(v) for v in by_kind.values()]
    while queues and len(out) < limit:
        alive = []
        for q in queues:
            t = next(q, None)
            if t is None:
                continue
            alive.append(q)
            paths = trajectory_paths(t)
            if paths and len(out) < limit:
                out.append((t, paths[0]))
        queues = alive
    return out


def image_caption(node: Node, previous: Node | None = None) -> str:
    """``r1 refine R=0.75 (+0.25)`` -- round, stage and reward (change against the image it refined)."""
    s = node_score(node)
    cap = f"r{node.round} {node.stage}{reward_text(node)}"
    p = node_score(previous) if previous is not None else None
    if s is not None and p is not None:
        cap += f" ({s - p:+.2f})"
    if node.meta.get("copied"):
        cap += " copy"
    return cap


def image_steps(path: list[Node]) -> Iterator[tuple[Node, Node | None]]:
    """Each image on a path with the image before it."""
    prev: Node | None = None
    for n in path:
        if n.image is not None:
            yield n, prev
            prev = n


def text_label(node: Node) -> str:
    """``plan`` or ``critique 2 (stop)``, with the stage reward."""
    if node.stage == "reason":
        head = "plan"
    else:
        head = f"critique {node.round}" + (" (stop)" if node.stop else "")
    return head + reward_text(node)


def prompt_line(tree: Tree) -> str:
    tag = tree.prompt.metadata.get("tag")
    return tree.prompt.prompt + (f"  [tag: {tag}]" if tag else "")


def spread_sample(trees: list[Tree], n: int, key: Callable[[Tree], Any]) -> list[Tree]:
    """``n`` of ``trees``, taken in turn from each ``key`` group (file order within a group), in file order:
    a dump's sample that covers every tag (and tree kind) however the trees are sorted.  A tuple key spreads by
    its first part first: with ``(kind, tag)`` two picks are a first-image tree and a refine tree."""
    groups: dict[Any, deque[int]] = {}
    for i, tree in enumerate(trees):
        groups.setdefault(key(tree), deque()).append(i)
    families: dict[Any, list[deque[int]]] = {}
    for k, group in groups.items():
        families.setdefault(k[0] if isinstance(k, tuple) else k, []).append(group)
    queues = [q for rank in zip_longest(*families.values()) for q in rank if q is not None]
    picked: list[int] = []
    while len(picked) < min(n, len(trees)):
        for queue in queues:
            if queue and len(picked) < n:
                picked.append(queue.popleft())
    return [trees[i] for i in sorted(picked)]
