"""The reward plug-in API.

A reward sees the whole R3 history of a node and returns one :class:`RewardOutput` per sample.
Rewards are batched.  A reward that cannot score a sample returns ``RewardOutput(failure=...)`` (or
raises, which fails the whole batch): failures are never turned into zeros, the sample is excluded
from its group's advantage, counted and logged.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass
class Turn:
    """One step of the R3 history: a plan/critique (text) or an image."""

    stage: str  # reason | generate | reflect | refine
    round: int
    text: str | None = None
    image: np.ndarray | None = None
    # The task reward already computed for this turn's image (None when not scored yet or failed).
    # Lets rewards that judge a critique (verdict consistency) reuse it instead of re-scoring.
    reward: float | None = None


@dataclass
class RewardSample:
    """What a reward sees for one node."""

    prompt: str
    metadata: dict[str, Any]
    stage: str
    round: int
    image: np.ndarray | None  # the latest image on the path (the one being judged), if any
    history: list[Turn] = field(default_factory=list)
    text: str | None = None  # the latest text on the path (plan or critique), if any


@dataclass
class RewardOutput:
    """A score, optionally with named components and a reason, or an explicit failure."""

    score: float | None = None
    components: dict[str, float] = field(default_factory=dict)
    reason: str | None = None
    failure: str | None = None

    @property
    def failed(self) -> bool:
        return self.failure is not None or self.score is None


class Reward:
    """Base class for rewards that hold models: override ``setup``/``teardown`` and ``__call__``.

    Rewards that need the policy being trained (self-consistency asks it questions about its own
    images) set ``needs_policy = True`` and implement :meth:`bind_policy`; the trainer binds the
    policy through :meth:`RewardSet.bind_policy` before the first call.  Such rewards cannot be
    served by ``r3-rl serve-reward`` (the server has no policy).
    """

    name: str = "reward"
    needs_policy: bool = False

    def bind_policy(self, policy: Any) -> None:
        """Give a ``needs_policy`` reward the live policy (called again after each weight sync is fine)."""
        raise TypeError(f"reward {self.name!r} does not use the policy")

    def setup(self) -> None:
        """Load models; called once before the first call (in the process that scores)."""

    def weights(self) -> list[str]:
        """Hub ids / folders whose weights :meth:`setup` loads: ``r3-rl doctor`` looks for them first, so a
        missing model is reported with its download command (nothing is downloaded)."""
        return []

    def teardown(self) -> None:
        """Release models."""

    def __call__(self, samples: list[RewardSample]) -> list[RewardOutput]:
        raise NotImplementedError
