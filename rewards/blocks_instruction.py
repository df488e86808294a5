"""The ``blocks_instruction`` reward: what a critique's edit instruction would gain if carried out exactly.

A critique is normally paid through its refined image (``r_new - r_old``: ``rewards/compose.py``), so its
instruction is judged only as well as the refiner carries it out.  When the refiner ignores a colour word,
"make the triangle purple" and "make the triangle red" earn the same, and nothing teaches the critic to take
the colour from the prompt; when the critic names the wrong colour, the refiner is paid for ignoring it.  After
RL on the Blocks world this is what was left (README: R3 synergy): recolours naming a colour the prompt does not
give, carried out at random.

The Blocks world can carry out any instruction of its language exactly (:func:`r3_rl.blocks.edits.apply_edit`),
so this reward scores the instruction itself: the critiqued image is decoded to its grid, the parsed instruction
applied exactly, and the score is the Blocks task score (GenEval's rules on the exact detector) after minus
before -- the gain a faithful refiner would make.  A stop ("no further edit needed") and an instruction outside
the Blocks language score 0 (there is nothing to carry out; the verdict and format rewards judge those).  An
``add`` or ``move`` picks a free cell at random: the score is the mean over ``draws`` fixed draws, the same
every call.  Use it as a reflect extra (``rewards.reflect.extra``); a real model's equivalent is an exact or
trusted editor (or an editing judge) standing in for the refiner.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from r3_rl.blocks import codec, edits
from r3_rl.errors import UserError
from r3_rl.policy.base import parse_critique
from r3_rl.rewards.base import Reward, RewardOutput, RewardSample
from r3_rl.rewards.blocks import score_image, unsupported
from r3_rl.rewards.self_consistency import critiqued


def instruction_gain(grid: np.ndarray, instruction: str, metadata: dict[str, Any], draws: int = 4,
                     binary: bool = False) -> float | None:
    """Mean over ``draws`` of the Blocks score after ``instruction`` is applied exactly to ``grid`` minus the
    score before (``binary``: GenEval's 1/0 verdict instead of partial credit); ``None`` when the instruction
    is not in the Blocks language."""
    op = edits.parse_edit(instruction)
    if op is None:
        return None

    def score(g: np.ndarray) -> float:
        res = score_image(codec.encode(g), metadata)
        return float(res.correct) if binary else float(res.score)

    before = score(grid)
    after = [score(edits.apply_edit(grid, op, np.random.default_rng(k))) for k in range(draws)]
    return float(np.mean(after)) - before


class BlocksInstructionReward(Reward):
    """Scores a critique by the Blocks score its instruction, carried out exactly, would add to the critiqued image.

    Options: ``draws`` (random placements averaged for add / move, default 4), ``binary`` (score the gain in
    GenEval's 1/0 verdict rather than partial credit, default false), ``stop_phrase`` (default "no further edit
    needed", matched as the rollout does).
    """

    name = "blocks_instruction"

    def __init__(self, draws: int = 4, binary: bool = False, stop_phrase: str = "no further edit needed") -> None:
        if not isinstance(draws, int) or isinstance(draws, bool) or draws < 1:
            raise UserError(f"blocks_instruction option draws must be an integer >= 1, got {draws!r}")
        if not isinstance(binary, bool):
            raise UserError(f"blocks_instruction option binary must be true/false, got {binary!r}")
        self.draws, self.binary, self.stop_phrase = draws, binary, str(stop_phrase)

    def score_one(self, sample: RewardSample) -> RewardOutput:
        where = critiqued(sample.history)
        if where is None:
            return RewardOutput(failure="blocks_instruction: no critique of an image in this sample's history")
        why = unsupported(sample.metadata)
        if why:
            return RewardOutput(failure=f"blocks_instruction: {why}")
        r, m = where
        instruction, stop = parse_critique(sample.history[r].text or "", self.stop_phrase)
        if stop:
            return RewardOutput(score=0.0, components={"stop": 1.0, "parsed": 0.0})
        try:
            grid = codec.decode(sample.history[m].image)  # type: ignore[arg-type]
            gain = instruction_gain(grid, instruction, sample.metadata, self.draws, self.binary)
        except (UserError, ValueError) as e:  # an image the Blocks world cannot read: an explicit failure
            return RewardOutput(failure=f"blocks_instruction: {e}")
        if gain is None:
            return RewardOutput(score=0.0, components={"stop": 0.0, "parsed": 0.0})
        return RewardOutput(score=gain, components={"stop": 0.0, "parsed": 1.0, "gain": gain})

    def __call__(self, samples: list[RewardSample]) -> list[RewardOutput]:
        return [self.score_one(s) for s in samples]
