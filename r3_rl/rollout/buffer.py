"""The Tree-RL parent buffer: images from earlier stages waiting to be refined.

Refine-stage groups start from a buffered image rather than a fresh generation, so every step trains
reflect/refine on a controlled mix of parents: ``correct_fraction`` of them already correct (where the
right answer is "no further edit needed") and the rest flawed (reference: 15% correct).  Entries keep
their round, so refinement can go any number of rounds deep.
"""
from __future__ import annotations

import random
from collections import deque
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from r3_rl.trajectory import PromptItem


@dataclass
class BufferEntry:
    prompt: PromptItem
    image: np.ndarray
    image_tokens: list[int] | None
    reward: float
    correct: bool
    round: int
    source: str = ""  # "<tree id>/<node id>" of the image


class ParentBuffer:
    def __init__(self, capacity: int) -> None:
        self.correct: deque[BufferEntry] = deque(maxlen=capacity)
        self.flawed: deque[BufferEntry] = deque(maxlen=capacity)

    def __len__(self) -> int:
        return len(self.correct) + len(self.flawed)

    def add(self, entry: BufferEntry) -> None:
        (self.correct if entry.correct else self.flawed).append(entry)

    def sample(self, n: int, correct_fraction: float, rng: random.Random) -> list[BufferEntry]:
        """``n`` parents, each correct with probability ``correct_fraction`` when both kinds exist."""
        out = []
        for _ in range(n):
            want_correct = rng.random() < correct_fraction
            pool = self.correct if (want_correct and self.correct) or not self.flawed else self.flawed
            if not pool:
                break
            out.append(pool[rng.randrange(len(pool))])
        return out

    # checkpointing (resume restores the buffer: the reference lost it)
    def state_dict(self) -> dict[str, Any]:
        def enc(e: BufferEntry) -> dict[str, Any]:
            d = asdict(e)
            d["image"] = e.image.tolist()
            return d
        return {"capacity": self.correct.maxlen, "correct": [enc(e) for e in self.correct],
                "flawed": [enc(e) for e in self.flawed]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        def dec(d: dict[str, Any]) -> BufferEntry:
            d = dict(d)
            d["prompt"] = PromptItem(**d["prompt"])
            d["image"] = np.asarray(d["image"], dtype=np.uint8)
            return BufferEntry(**d)
        self.correct = deque((dec(d) for d in state["correct"]), maxlen=state["capacity"])
        self.flawed = deque((dec(d) for d in state["flawed"]), maxlen=state["capacity"])
