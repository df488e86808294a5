"""From scored trees to training items: advantages among siblings, staleness check.

Advantages are computed per sibling group (``Node.group_id``) with
:func:`r3_rl.algorithms.advantages.group_advantages`; a node whose reward failed (``None``) is excluded
from its group's statistics and from the update.  Nodes sampled by a policy older than
``max_staleness`` versions are refused, never silently trained on.

Groups with no learning signal (:func:`r3_rl.algorithms.signal.has_signal`: every valid reward equal,
fewer than two valid rewards, or every reward failed) contribute no gradient at all: their members are left out of the learner batch
(not merely given advantage 0, which would still move the weights through the KL term and dilute
the ``token_mean`` denominator), and they are counted in the logs (``zero_signal_groups``,
``single_valid_groups``, ``all_failed_groups``, ``zero_signal_items``), overall and per stage.
"""
from __future__ import annotations

import math
import random
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from r3_rl.algorithms.advantages import group_advantages, group_stats, leave_one_out_advantages
from r3_rl.algorithms.signal import has_signal
from r3_rl.trajectory import Node, Segment, Tree


@dataclass
class TrainItem:
    """One sampled segment to train on; an algorithm may subclass it to carry more (PPO's ``ChainItem``)."""

    segment: Segment
    advantage: float
    stage: str
    policy_version: int
    # the sibling group (``Node.group_id``): kept together when mini-batches are shuffled; keyword-only, so a
    # plug-in's subclass may still add fields without defaults
    group: str = field(default="", kw_only=True)


def policy_weight(cfg: Any, item: TrainItem) -> float:
    """Weight of ``item``'s policy term (not its KL): its modality's (``learner.loss_weight_text`` /
    ``loss_weight_image``) times its stage's (``learner.stage_weights``; unlisted stages 1)."""
    modality = cfg.loss_weight_image if item.segment.modality == "image" else cfg.loss_weight_text
    return modality * cfg.stage_weights.get(item.stage, 1.0)


@dataclass
class BatchStats:
    items: int = 0
    stale_refused: int = 0
    failed_rewards: int = 0
    groups: int = 0
    zero_signal_groups: int = 0
    zero_signal_items: int = 0  # sampled nodes left out because their group had no signal
    advantage_mean: float = 0.0
    advantage_std: float = 0.0
    advantage_abs_max: float = 0.0
    per_stage: dict[str, int] = field(default_factory=dict)


def stage_flag(normalize_std: bool | Mapping[str, bool], stage: str) -> bool:
    """``learner.normalize_std`` for one stage (a single flag, or a per-stage mapping; unlisted = False)."""
    return bool(normalize_std) if isinstance(normalize_std, bool) else bool(normalize_std.get(stage, False))


def _trainable_nodes(trees: list[Tree]) -> list[Node]:
    return [n for t in trees for n in t.nodes.values() if n.policy_version >= 0]


def _rewards(nodes: list[Node]) -> torch.Tensor:
    return torch.tensor([n.reward if n.reward is not None else math.nan for n in nodes], dtype=torch.float64)


def no_signal_groups(nodes: list[Node]) -> set[str]:
    """Group ids whose valid rewards cannot rank the siblings: < 2 valid rewards, or all equal."""
    valid: dict[str, list[float]] = {}
    for n in nodes:
        valid.setdefault(n.group_id, [])
        if n.reward is not None:
            valid[n.group_id].append(n.reward)
    return {g for g, r in valid.items() if not has_signal(r)}


def critic_pools(trees: list[Tree]) -> dict[int, str]:
    """``id(node) -> "correct" | "flawed"`` for every critique whose parent image the task reward judged
    (``meta["correct"]``): the pools of ``learner.critic_baseline: verdict``."""
    out: dict[int, str] = {}
    for t in trees:
        for n in t.nodes.values():
            parent = t.nodes.get(n.parent) if n.stage == "reflect" and n.parent is not None else None
            ok = parent.meta.get("correct") if parent is not None else None
            if ok is not None:
                out[id(n)] = "correct" if ok else "flawed"
    return out


def edited_image_gains(trees: list[Tree]) -> dict[int, float | None]:
    """``id(node) -> reward - the reward of the image it edited`` for every sampled refined image (not a copy
    after "no further edit"); ``None`` where either reward failed.  The baseline of ``learner.refine_baseline:
    parent``: it depends on the parent image only, never on the instruction or the edit, so the gradient stays
    unbiased, and a refiner that carries out a useless instruction faithfully (the image unchanged) gets 0
    instead of the blame for its siblings' better critiques."""
    out: dict[int, float | None] = {}
    for t in trees:
        for n in t.nodes.values():
            if n.stage != "refine" or n.meta.get("copied") or n.policy_version < 0 or n.parent is None:
                continue
            critique = t.nodes.get(n.parent)
            image = t.nodes.get(critique.parent) if critique is not None and critique.parent else None
            if image is None or image.image is None:
                continue
            out[id(n)] = None if n.reward is None or image.reward is None else n.reward - image.reward
    return out


def assign_advantages(trees: list[Tree], normalize_std: bool | Mapping[str, bool] = False,
                      critic_baseline: str = "group", refine_baseline: str = "group",
                      std_scope: str = "group") -> dict[str, float]:
    """Fill ``node.advantage`` for every node that has a group of siblings; returns group statistics.

    ``normalize_std`` may differ per stage; a group's stage is its first member's; ``std_scope: "batch"``
    divides by the std of the stage's rewards across the batch instead of the group's.  ``critic_baseline:
    "verdict"`` gives every critique whose parent was judged the leave-one-out advantage among the batch's
    critiques of parents with the same verdict (:func:`~r3_rl.algorithms.advantages.leave_one_out_advantages`)
    instead of its group's.  ``refine_baseline: "parent"`` gives every sampled refined image its reward minus
    its parent image's (:func:`edited_image_gains`; never divided by a std) instead.  The statistics are
    :func:`~r3_rl.algorithms.advantages.group_stats` over all groups plus ``<stage>/<count>`` per stage.
    """
    nodes = _trainable_nodes(trees)
    if not nodes:
        return {}
    rewards = _rewards(nodes)
    groups = [n.group_id for n in nodes]
    group_stage: dict[str, str] = {}
    for n in nodes:
        group_stage.setdefault(n.group_id, n.stage)
    flags = {g: stage_flag(normalize_std, s) for g, s in group_stage.items()}
    plain = group_advantages(rewards, groups, normalize_std=False) if not all(flags.values()) else None
    pools = [group_stage[g] for g in groups] if std_scope == "batch" else None
    scaled = group_advantages(rewards, groups, normalize_std=True, std_pools=pools) if any(flags.values()) else None
    for i, n in enumerate(nodes):
        a = float((scaled if flags[n.group_id] else plain)[i])  # type: ignore[index]
        n.advantage = None if math.isnan(a) else a
        if n.meta.get("copied"):  # "no further edit": the image is the parent's, nothing to credit
            n.advantage = 0.0 if n.advantage is not None else None
    if critic_baseline == "verdict":
        pools = critic_pools(trees)
        idx = [i for i, n in enumerate(nodes) if id(n) in pools]
        pooled = leave_one_out_advantages(rewards[idx], [pools[id(nodes[i])] for i in idx]) if idx else []
        for i, a in zip(idx, pooled):
            nodes[i].advantage = None if math.isnan(float(a)) else float(a)
    if refine_baseline == "parent":
        gains = edited_image_gains(trees)
        for n in nodes:
            if id(n) in gains:
                n.advantage = gains[id(n)]
    stats = group_stats(rewards, groups)
    for stage in sorted({n.stage for n in nodes}):
        idx = [i for i, n in enumerate(nodes) if n.stage == stage]
        per = group_stats(rewards[idx], [groups[i] for i in idx])
        stats.update({f"{stage}/{k}": v for k, v in per.items()
                      if k in ("groups", "zero_signal_groups", "all_failed_groups", "single_valid_groups")})
    return stats


def collect_items(trees: list[Tree], current_version: int, max_staleness: int,
                  drop_no_signal: bool = True, pooled_stages: frozenset[str] = frozenset()) -> tuple[list[TrainItem], BatchStats]:
    """Sampled nodes with an advantage -> :class:`TrainItem` s (see the module docstring for what is left out).
    Groups of ``pooled_stages`` (advantages taken against a pool wider than the group) are never dropped."""
    stats = BatchStats()
    items: list[TrainItem] = []
    nodes = _trainable_nodes(trees)
    pooled_groups = {n.group_id for n in nodes if n.stage in pooled_stages}
    dead = no_signal_groups(nodes) - pooled_groups if drop_no_signal else set()
    stats.groups = len({n.group_id for n in nodes})
    stats.zero_signal_groups = len(dead)
    for n in nodes:
        if n.segment is None or n.segment.num_actions == 0:
            continue
        if n.advantage is None:
            stats.failed_rewards += n.reward is None
            continue
        if n.group_id in dead:
            stats.zero_signal_items += 1
            continue
        if current_version - n.policy_version > max_staleness:
            stats.stale_refused += 1
            continue
        items.append(TrainItem(n.segment, float(n.advantage), n.stage, n.policy_version, group=n.group_id))
        stats.per_stage[n.stage] = stats.per_stage.get(n.stage, 0) + 1
    summarize(items, stats)
    return items, stats


def shuffled_by_group(items: list[TrainItem], seed: str) -> list[TrainItem]:
    """``items`` with their sibling groups in a seeded random order, each group's members together and in order.

    Items arrive in tree order (one stage's groups after another), so consecutive mini-batches would each train
    one stage and one group (``learner.grad_accum > 0``).  TRL shuffles its generation batch before splitting it
    into optimiser steps for the same reason.  Groups stay whole so siblings still share one context forward.
    Items without a group (a plug-in's) are groups of one."""
    groups: dict[Any, list[TrainItem]] = {}
    for k, it in enumerate(items):
        groups.setdefault(it.group or ("", k), []).append(it)
    order = list(groups)
    random.Random(seed).shuffle(order)
    return [it for key in order for it in groups[key]]


def summarize(items: list[TrainItem], stats: BatchStats) -> None:
    stats.items = len(items)
    if items:
        a = torch.tensor([it.advantage for it in items])
        stats.advantage_mean = float(a.mean())
        stats.advantage_std = float(a.std()) if len(items) > 1 else 0.0
        stats.advantage_abs_max = float(a.abs().max())
