"""Supervised critiques rehearsed during RL (``learner.critic_replay``): PPO-ptx for the critic.

R3's stages share one set of weights, and RL moves them mostly for the generator (it has the most samples).
In the Blocks demo the critic's reading of the image then wears away: verdicts on fixed reference images
fall after RL on every seed, even with no RL term on the critique at all (README: R3 synergy).  InstructGPT
kept its policy's pretraining skills by mixing pretraining gradients into PPO; here every optimiser step
adds ``coef`` x the cross-entropy of a few critiques of the warm start's kind -- a correct image of a
*training* prompt (the warm start's canonical layout or a random one), flawed half the time with the flaw
kind drawn evenly (:func:`r3_rl.policy.warmstart.critic_examples`), labelled with the Blocks world's truth.

The examples of optimiser step ``k`` are a pure function of (run seed, ``k``): a resumed run rehearses the
same critiques it would have without the interruption.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from r3_rl.data import BlocksPrompts
from r3_rl.policy.warmstart import critic_examples, sft_loss

if TYPE_CHECKING:
    from r3_rl.policy.tiny import TinyUnifiedPolicy

Example = tuple[list[int], list[int]]  # (context ids, target ids)
STREAM = 7_001  # the rehearsal's own random stream and prompt stream, apart from rollout's and the warm start's


class CritiqueReplay:
    """``examples(k)``: the critiques of optimiser step ``k``; ``loss(examples)``: their mean cross-entropy."""

    def __init__(self, policy: "TinyUnifiedPolicy", recipe: Any) -> None:
        self.policy, self.warmstart, self.seed = policy, recipe.warmstart, recipe.seed
        self.per_step = recipe.learner.critic_replay.examples
        self.prompts = BlocksPrompts(tags=recipe.data.blocks.tags, seed=recipe.seed + STREAM)

    def examples(self, k: int) -> list[Example]:
        rng = np.random.default_rng([self.seed, STREAM, k])
        return critic_examples(self.policy, self.prompts, k * self.per_step, self.per_step, self.warmstart, rng)

    def loss(self, examples: list[Example]) -> torch.Tensor:
        return sft_loss(self.policy, examples)
