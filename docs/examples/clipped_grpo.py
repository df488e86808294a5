"""How to add an algorithm: a GRPO variant in one file.

GRPO with every advantage clipped to ``[-clip, clip]`` (one outlier sibling can then no longer dominate a
group's update).  A variant overrides one step of :class:`~r3_rl.learner.algorithm.GRPO` -- here
``advantages``; ``batch`` (which nodes train) and ``loss`` (the micro-batch objective) are the others.  Its
own setting is a keyword argument of ``__init__``, given in a recipe as ``learner.options: {clip: 0.5}``
(checked against this signature before any work).  Use it with ``learner.algorithm: clipped_grpo`` once
this module is imported (an entry point ``r3_rl.algorithms``), or name the file:
``learner.algorithm: docs/examples/clipped_grpo.py:ClippedGRPO``.
"""
from __future__ import annotations

from typing import Any

from r3_rl.learner.algorithm import GRPO
from r3_rl.learner.registry import register_algorithm
from r3_rl.trajectory import Tree


@register_algorithm("clipped_grpo")
class ClippedGRPO(GRPO):
    def __init__(self, recipe: Any, clip: float = 1.0) -> None:
        super().__init__(recipe)
        if not clip > 0:
            raise ValueError(f"clip must be > 0, got {clip}")
        self.clip = clip

    def advantages(self, trees: list[Tree]) -> dict[str, float]:
        stats = super().advantages(trees)  # reward - mean(siblings), per group
        for tree in trees:
            for node in tree.nodes.values():
                if node.advantage is not None:
                    node.advantage = max(-self.clip, min(self.clip, node.advantage))
        return stats
