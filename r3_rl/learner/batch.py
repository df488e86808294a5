"""From scored trees to training items: advantages among siblings, staleness check.

Advantages are computed per sibling group (``Node.group_id``) with
:func:`r3_rl.algorithms.advantages.group_advantages`; a node whose reward failed (``None``) is excluded
from its group's statistics and from the update.  Nodes sampled by a policy older than
``max_staleness`` versions are refused, never silently trained on.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from r3_rl.algorithms.advantages import group_advantages, group_stats
from r3_rl.trajectory import Node, Segment, Tree


@dataclass
class TrainItem:
    segment: Segment
    advantage: float
    stage: str
    policy_version: int


@dataclass
class BatchStats:
    items: int = 0
    stale_refused: int = 0
    failed_rewards: int = 0
    groups: int = 0
    zero_signal_groups: int = 0
    advantage_mean: float = 0.0
    advantage_std: float = 0.0
    advantage_abs_max: float = 0.0
    per_stage: dict[str, int] = field(default_factory=dict)


def assign_advantages(trees: list[Tree], normalize_std: bool = False) -> dict[str, float]:
    """Fill ``node.advantage`` for every node that has a group of siblings; returns group statistics."""
    nodes: list[Node] = [n for t in trees for n in t.nodes.values() if n.policy_version >= 0]
    if not nodes:
        return {}
    rewards = torch.tensor([n.reward if n.reward is not None else math.nan for n in nodes], dtype=torch.float64)
    groups = [n.group_id for n in nodes]
    adv = group_advantages(rewards, groups, normalize_std=normalize_std)
    for n, a in zip(nodes, adv.tolist()):
        n.advantage = None if math.isnan(a) else a
        if n.meta.get("copied"):  # "no further edit": the image is the parent's, nothing to credit
            n.advantage = 0.0 if n.advantage is not None else None
    return group_stats(rewards, groups)


def collect_items(trees: list[Tree], current_version: int, max_staleness: int) -> tuple[list[TrainItem], BatchStats]:
    stats = BatchStats()
    items: list[TrainItem] = []
    for tree in trees:
        for n in tree.nodes.values():
            if n.segment is None or not n.segment.token_ids:
                continue
            if n.advantage is None:
                stats.failed_rewards += n.reward is None
                continue
            if current_version - n.policy_version > max_staleness:
                stats.stale_refused += 1
                continue
            items.append(TrainItem(n.segment, float(n.advantage), n.stage, n.policy_version))
            stats.per_stage[n.stage] = stats.per_stage.get(n.stage, 0) + 1
    stats.items = len(items)
    if items:
        a = torch.tensor([it.advantage for it in items])
        stats.advantage_mean = float(a.mean())
        stats.advantage_std = float(a.std()) if len(items) > 1 else 0.0
        stats.advantage_abs_max = float(a.abs().max())
    return items, stats
