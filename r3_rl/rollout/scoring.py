"""From nodes to rewards: builds what a reward sees (:class:`RewardSample`) and writes scores back.

Kept apart from sampling so that a distributed rollout can score images on reward actors as soon as
they exist.  Stage rewards are composed with the pure functions of :mod:`r3_rl.rewards.compose`.
"""
from __future__ import annotations

from typing import Any, Iterable

from r3_rl.errors import UserError
from r3_rl.rewards.base import RewardSample, Turn
from r3_rl.rewards.compose import REFERENCE_RULE, CriticRule, combine, format_ok, plan_reward, reflect_reward, verdict_term
from r3_rl.rewards.reward_set import FailureBudget, RewardSet, Scorer
from r3_rl.trajectory import Node, Tree


def reward_sample(tree: Tree, node: Node) -> RewardSample:
    """What a reward sees of ``node``: the prompt and the R3 history down to it, each image with the task
    reward it already has (``Turn.reward``; ``None`` when not scored yet or failed)."""
    path = tree.path(node.id)
    history = [Turn(stage=n.stage, round=n.round, text=n.text, image=n.image,
                    reward=n.reward if n.image is not None else None) for n in path]
    image = next((n.image for n in reversed(path) if n.image is not None), None)
    text = next((n.text for n in reversed(path) if n.text is not None), None)
    return RewardSample(prompt=tree.prompt.prompt, metadata=tree.prompt.metadata, stage=node.stage,
                        round=node.round, image=image, history=history, text=text)


class StageScorer:
    """Scores image nodes with the task rewards and composes plan/critique rewards.

    ``task`` is where the task reward is computed (a :class:`~r3_rl.rewards.reward_set.RewardSet` in this
    process, or reward actors); every scored image (and extra critique reward) is recorded in ``failures``,
    whose ``check()`` the trainer calls after each rollout.  ``rule`` is the critic's verdict reward
    (:class:`~r3_rl.rewards.compose.CriticRule`); ``reflect_extra`` optional rewards scored on critiques
    (e.g. ``verdict_consistency``), weighted and added.  An image is correct (``node.meta["correct"]``: what
    the critic's verdict is judged against, and the parent buffer's split) when the reward part
    ``correct_part`` (e.g. ``blocks/correct``: GenEval's verdict, while the task reward is partial credit) or
    else the task reward reaches ``correct_threshold``.
    """

    def __init__(self, task: Scorer, format_weight: float, reason_format: str, reflect_format: str,
                 correct_threshold: float = 1.0, rule: CriticRule = REFERENCE_RULE,
                 reflect_extra: RewardSet | None = None, correct_part: str | None = None,
                 failures: FailureBudget | None = None) -> None:
        self.task = task
        self.correct_part = correct_part
        self.rule = rule
        self.reflect_extra = reflect_extra if reflect_extra is not None and reflect_extra.members else None
        self.format_weight = format_weight
        self.reason_format = reason_format
        self.reflect_format = reflect_format
        self.correct_threshold = correct_threshold
        self.failures = failures if failures is not None else FailureBudget(1.0)

    def score_images(self, pairs: Iterable[tuple[Tree, Node]]) -> None:
        """Task reward -> ``node.reward`` (None on failure), parts -> ``node.rewards``."""
        pairs = [(t, n) for t, n in pairs if n.image is not None]
        if not pairs:
            return
        results = self.task.score([reward_sample(t, n) for t, n in pairs])
        for (_, node), res in zip(pairs, results):
            node.rewards.update(res.parts)
            node.reward_failures.update(res.failures)
            node.reward = res.total
            node.meta["correct"] = self._correct(res)
        self.failures.record(results, check=False)  # checked once per rollout, after every task is in

    def _correct(self, res: Any) -> bool | None:
        if res.total is None:
            return None
        if self.correct_part is None:
            return bool(res.total >= self.correct_threshold)
        if self.correct_part not in res.parts:
            raise UserError(f"rewards.reflect.correct_part: {self.correct_part!r} is not a part of the task reward "
                            f"(parts: {', '.join(sorted(res.parts)) or 'none'})")
        return bool(res.parts[self.correct_part] >= self.correct_threshold)

    def compose(self, tree: Tree) -> None:
        """Plan and critique rewards from the image rewards below/around them."""
        extra = self._reflect_extra(tree)
        for node in tree.nodes.values():
            if node.stage == "reason":
                child = next((c for c in tree.children(node.id) if c.stage == "generate"), None)
                ok = format_ok(node.text or "", self.reason_format)
                node.rewards["format"] = float(ok)
                node.reward = plan_reward(child.reward if child else None, ok, self.format_weight)
            elif node.stage == "reflect":
                parent = tree.nodes[node.parent] if node.parent else None
                child = next((c for c in tree.children(node.id) if c.stage == "refine"), None)
                ok = format_ok(node.text or "", self.reflect_format)
                node.rewards["format"] = float(ok)
                r_old = parent.reward if parent is not None else None
                r_new = child.reward if child is not None else None
                pc = parent.meta.get("correct") if parent is not None else None
                if pc is None and r_old is not None:
                    pc = r_old >= self.correct_threshold
                node.reward = reflect_reward(r_old, r_new, bool(node.stop), ok, self.format_weight,
                                             self.correct_threshold, self.rule, pc)
                if r_old is not None and r_new is not None:
                    node.rewards["delta"] = r_new - r_old
                if pc is not None and r_old is not None:
                    improved = None if r_new is None else r_new > r_old
                    node.rewards["verdict_term"] = verdict_term(bool(pc), bool(node.stop), self.rule, improved)
                if node.id in extra:
                    res = extra[node.id]
                    node.rewards.update(res.parts)
                    node.reward_failures.update(res.failures)
                    if res.total is not None:
                        node.rewards["extra"] = res.total
                    node.reward = combine(node.reward, res.total)

    def _reflect_extra(self, tree: Tree) -> dict[str, Any]:
        """``rewards.reflect.extra`` scored on the tree's sampled critiques (one batch), by node id."""
        if self.reflect_extra is None:
            return {}
        nodes = [n for n in tree.nodes.values() if n.stage == "reflect" and n.segment is not None]
        if not nodes:
            return {}
        results = self.reflect_extra.score([reward_sample(tree, n) for n in nodes])
        self.failures.record(results, check=False)
        return {n.id: r for n, r in zip(nodes, results)}
