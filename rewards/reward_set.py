"""A weighted sum of named rewards, with explicit failures.

The task reward of a stage is ``sum_i weight_i * reward_i``.  If any weighted reward fails for a
sample, the sample's total is ``None`` (excluded from its group's advantage, counted, logged), never
0: silent zeros were the reference implementation's worst bug.  An exception inside a reward fails
that reward's whole batch, with the exception text as the reason.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from r3_rl.rewards.base import Reward, RewardOutput, RewardSample
from r3_rl.rewards.registry import load_reward


@dataclass
class ScoredSample:
    total: float | None  # None = failed
    parts: dict[str, float] = field(default_factory=dict)  # reward name (and name/component) -> value
    failures: dict[str, str] = field(default_factory=dict)  # reward name -> why
    reasons: dict[str, str] = field(default_factory=dict)


@dataclass
class WeightedReward:
    reward: Reward
    weight: float = 1.0


class RewardSet:
    """Scores samples with several rewards and combines them by weight."""

    def __init__(self, members: list[WeightedReward]) -> None:
        self.members = members
        self._ready = False

    @classmethod
    def from_specs(cls, specs: list[dict[str, Any]]) -> "RewardSet":
        """``specs``: ``[{name: str, weight: float, options: {...}}, ...]`` as in the recipe."""
        return cls([WeightedReward(load_reward(s["name"], **s.get("options", {})), s.get("weight", 1.0))
                    for s in specs])

    def setup(self) -> None:
        if not self._ready:
            for m in self.members:
                m.reward.setup()
            self._ready = True

    def teardown(self) -> None:
        for m in self.members:
            m.reward.teardown()
        self._ready = False

    def score(self, samples: list[RewardSample]) -> list[ScoredSample]:
        self.setup()
        out = [ScoredSample(total=0.0) for _ in samples]
        for m in self.members:
            name = m.reward.name
            try:
                results = m.reward(samples)
                if len(results) != len(samples):
                    raise ValueError(f"returned {len(results)} results for {len(samples)} samples")
            except Exception as e:  # a broken reward fails its batch; the run goes on
                results = [RewardOutput(failure=f"{type(e).__name__}: {e}") for _ in samples]
            for s, r in zip(out, results):
                if r.failed:
                    s.failures[name] = r.failure or "no score"
                    s.total = None
                    continue
                s.parts[name] = float(r.score)
                for k, v in r.components.items():
                    s.parts[f"{name}/{k}"] = float(v)
                if r.reason:
                    s.reasons[name] = r.reason
                if s.total is not None:
                    s.total += m.weight * float(r.score)
        return out
