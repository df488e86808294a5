"""A fixed reference set for measuring understanding: one correct and one deliberately flawed image per prompt.

Understanding measured only on the model's own images moves with what the model draws: after RL it
draws other images, so a before/after comparison mixes "sees better" with "is shown easier images".
These images are the same for every checkpoint of a run (a pure function of the prompts and ``seed``).
The correct image has a random layout (not the warm start's canonical one: the critic must judge
layouts it was never taught to draw); the flawed one is the same image with one plausible mistake
(:func:`r3_rl.blocks.synthesis.perturb`: a missing, extra, recoloured, reshaped or misplaced object).  Its
``kind`` names the mistake by the first fix the Blocks world would make (:func:`r3_rl.blocks.edits.diagnose`):
``flawed:add`` (the fix adds an object), ``flawed:remove``, ``flawed:recolor``, ``flawed:move`` or
``flawed:swap``, so the eval can say which mistakes the critic sees.
"""
from __future__ import annotations

import zlib

import numpy as np

from r3_rl.blocks import codec, edits, synthesis
from r3_rl.trajectory import PromptItem, ReferenceImage


def reference_pairs(prompts: list[PromptItem], seed: int, rows: int, cols: int) -> list[ReferenceImage]:
    """``[correct_0, flawed_0, correct_1, flawed_1, ...]``: deterministic per (prompt text, seed)."""
    out: list[ReferenceImage] = []
    for p in prompts:
        rng = np.random.default_rng([seed, zlib.crc32(p.prompt.encode())])
        good = synthesis.random_correct_grid(p.metadata, rng, rows, cols)
        bad = synthesis.perturb(good, p.metadata, rng)
        for grid, kind in ((good, "correct"), (bad, f"flawed:{edits.diagnose(bad, p.metadata)[0].kind}")):
            out.append(ReferenceImage(prompt=p, image=codec.encode(grid), image_tokens=grid.reshape(-1).tolist(),
                                      kind=kind))
    return out
