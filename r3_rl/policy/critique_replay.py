"""Supervised critiques rehearsed during RL (``learner.critic_replay``): PPO-ptx for the critic.

R3's stages share one set of weights, and RL moves them mostly for the generator (it has the most samples).
In the Blocks demo the critic's reading of the image then wears away: verdicts on fixed reference images
fall after RL on every seed, even with no RL term on the critique at all (README: R3 synergy).  InstructGPT
kept its policy's pretraining skills by mixing pretraining gradients into PPO; here every optimiser step
adds ``coef`` x the cross-entropy of a few critiques of the warm start's kind -- a correct image of a
*training* prompt (the warm start's canonical layout or a random one), flawed half the time with the flaw
kind drawn evenly (:func:`r3_rl.policy.warmstart.critic_images`), labelled with the Blocks world's truth.
With ``questions`` each of those images is also asked that many of its prompt's yes/no questions, answered with
the truth about the image (the warm start's ``questions``): the critiques alone keep the verdict but let the
yes/no answers about images the model did not draw wear away (README: R3 synergy).  The two parts are averaged
apart and summed, so a two-token answer weighs as much as a twenty-token critique.

The examples of optimiser step ``k`` are a pure function of (run seed, ``k``): a resumed run rehearses the
same critiques it would have without the interruption.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np
import torch

from r3_rl.data import BlocksPrompts
from r3_rl.policy.warmstart import critic_images, critique_example, question_examples, sft_loss

if TYPE_CHECKING:
    from r3_rl.policy.tiny import TinyUnifiedPolicy

Example = tuple[list[int], list[int]]  # (context ids, target ids)
STREAM = 7_001  # the rehearsal's own random stream and prompt stream, apart from rollout's and the warm start's


class Rehearsal(NamedTuple):
    """One optimiser step's examples: the critiques, and the yes/no questions about the same images."""

    critiques: list[Example]
    questions: list[Example]


class CritiqueReplay:
    """``examples(k)``: the rehearsal of optimiser step ``k``; ``loss(examples)``: its cross-entropy."""

    def __init__(self, policy: "TinyUnifiedPolicy", recipe: Any) -> None:
        self.policy, self.warmstart, self.seed = policy, recipe.warmstart, recipe.seed
        self.per_step = recipe.learner.critic_replay.examples
        self.questions = recipe.learner.critic_replay.questions
        self.prompts = BlocksPrompts(tags=recipe.data.blocks.tags, seed=recipe.seed + STREAM)

    def examples(self, k: int) -> Rehearsal:
        rng = np.random.default_rng([self.seed, STREAM, k])
        images = critic_images(self.prompts, k * self.per_step, self.per_step, self.warmstart, rng,
                               self.policy.rows, self.policy.cols)
        critiques = [critique_example(self.policy, item.prompt, grid, item.metadata, self.warmstart, lenient)
                     for item, grid, lenient in images]
        ask = np.random.default_rng([self.seed, STREAM, k, 1])  # its own stream: the critiques do not depend on it
        questions = [ex for item, grid, _ in images
                     for ex in question_examples(self.policy, grid, item.metadata, self.questions, ask)]
        return Rehearsal(critiques, questions)

    def loss(self, examples: Rehearsal) -> torch.Tensor:
        """Mean cross-entropy of the critiques, plus that of the questions when there are any."""
        ce = sft_loss(self.policy, examples.critiques)
        return ce + sft_loss(self.policy, examples.questions) if examples.questions else ce
