"""A weighted sum of named rewards, with explicit failures, and the budget that stops a run.

The task reward of a stage is ``sum_i weight_i * reward_i``.  If any weighted reward fails for a
sample, the sample's total is ``None`` (excluded from its group's advantage, counted, logged), never
0: silent zeros were the reference implementation's worst bug.  An exception inside a reward fails only the
samples that raise it (:func:`call_isolating` splits the batch to find them), with the exception text as the
reason; a non-finite score is a failure.

:class:`FailureBudget` counts what the rollout scorer scored (per reward too) and, checked by the trainer
after each rollout, raises a one-line :class:`RewardFailureError` once more than ``max_fraction`` of the
scored samples failed, so a dead reward server stops the run instead of training on nothing.
"""
from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Iterable, Protocol

from r3_rl.errors import UserError
from r3_rl.rewards.base import Reward, RewardOutput, RewardSample
from r3_rl.rewards.registry import load_reward, to_output, with_recipe_defaults

SPEC_KEYS = frozenset({"name", "weight", "options"})


@dataclass
class ScoredSample:
    total: float | None  # None = failed
    parts: dict[str, float] = field(default_factory=dict)  # reward name (and name/component) -> value
    failures: dict[str, str] = field(default_factory=dict)  # reward name -> why
    reasons: dict[str, str] = field(default_factory=dict)

    @property
    def failed(self) -> bool:
        return self.total is None


@dataclass
class WeightedReward:
    reward: Reward
    weight: float = 1.0


def _check_spec(i: int, spec: Any) -> None:
    if not isinstance(spec, dict):
        raise UserError(f"rewards[{i}]: expected {{name, weight, options}}, got {type(spec).__name__}")
    unknown = set(spec) - SPEC_KEYS
    if unknown:
        raise UserError(f"rewards[{i}]: unknown key(s) {sorted(unknown)}; valid keys: {sorted(SPEC_KEYS)}")
    if not isinstance(spec.get("name"), str):
        raise UserError(f"rewards[{i}]: 'name' must be a reward name, got {spec.get('name')!r}")
    w = spec.get("weight", 1.0)
    if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w):
        raise UserError(f"rewards[{i}] ({spec['name']}): 'weight' must be a finite number, got {w!r}")
    if not isinstance(spec.get("options", {}) or {}, dict):
        raise UserError(f"rewards[{i}] ({spec['name']}): 'options' must be a mapping")


def reward_specs(recipe: Any, specs: Iterable[Any]) -> list[dict[str, Any]]:
    """A recipe's reward entries as :meth:`RewardSet.from_specs` takes them, with the recipe-wide options a reward
    takes (``templates.stop_phrase`` as ``stop_phrase``) added where the entry sets none."""
    defaults = {"stop_phrase": recipe.templates.stop_phrase}
    return [with_recipe_defaults(s.model_dump(), defaults) for s in specs]


class Scorer(Protocol):
    """Anything that scores samples like a :class:`RewardSet` (one in this process, or reward actors)."""

    def score(self, samples: list[RewardSample]) -> list[ScoredSample]:
        ...


class RewardSet:
    """Scores samples with several rewards and combines them by weight."""

    def __init__(self, members: list[WeightedReward]) -> None:
        self.members = members
        self._ready = False
        names = [m.reward.name for m in members]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise UserError(f"rewards: {dupes} listed twice; give one entry per reward (a custom reward's name "
                            f"is its function/class name; give each 'remote' its own options.label)")

    @classmethod
    def from_specs(cls, specs: list[dict[str, Any]]) -> "RewardSet":
        """``specs``: ``[{name: str, weight: float, options: {...}}, ...]`` as in the recipe."""
        for i, s in enumerate(specs):
            _check_spec(i, s)
        return cls([WeightedReward(load_reward(s["name"], **(s.get("options") or {})), float(s.get("weight", 1.0)))
                    for s in specs])

    # ------------------------------------------------------------------ policy-bound rewards
    @property
    def needs_policy(self) -> bool:
        return any(getattr(m.reward, "needs_policy", False) for m in self.members)

    def bind_policy(self, policy: Any) -> None:
        """Hand the live policy to every reward that asks it questions (``needs_policy``)."""
        for m in self.members:
            if getattr(m.reward, "needs_policy", False):
                m.reward.bind_policy(policy)

    # ------------------------------------------------------------------ lifecycle
    def setup(self) -> None:
        if not self._ready:
            for m in self.members:
                m.reward.setup()
            self._ready = True

    def teardown(self) -> None:
        for m in self.members:
            m.reward.teardown()
        self._ready = False

    # ------------------------------------------------------------------ scoring
    def score(self, samples: list[RewardSample]) -> list[ScoredSample]:
        self.setup()
        out = [ScoredSample(total=0.0) for _ in samples]
        if not samples:
            return out
        for m in self.members:
            name = m.reward.name
            results = call_isolating(m.reward, samples)  # the run goes on; FailureBudget decides
            for s, r in zip(out, results):
                if r.failed:
                    s.failures[name] = r.failure or "no score"
                    s.total = None
                    if r.reason:
                        s.reasons[name] = r.reason
                    continue
                s.parts[name] = float(r.score)  # type: ignore[arg-type]
                for k, v in r.components.items():
                    s.parts[f"{name}/{k}"] = float(v)
                if r.reason:
                    s.reasons[name] = r.reason
                if s.total is not None:
                    s.total += m.weight * float(r.score)  # type: ignore[arg-type]
        return out


def _call(reward: Reward, samples: list[RewardSample]) -> list[RewardOutput] | str:
    """The reward's outputs, or why it raised (one line).  A wrong number of results fails the whole batch: the
    reward answered, but which answer is whose is unknown."""
    try:
        results = [to_output(r) for r in reward(samples)]
    except Exception as e:
        msg = str(e).splitlines()[0] if str(e) else ""
        return f"{type(e).__name__}: {msg}"
    if len(results) != len(samples):
        why = f"ValueError: returned {len(results)} results for {len(samples)} samples"
        return [RewardOutput(failure=why) for _ in samples]
    return results


def call_isolating(reward: Reward, samples: list[RewardSample]) -> list[RewardOutput]:
    """``reward(samples)``, where a call that raises fails only the samples that make it raise.

    A raising call is split in halves and each half scored on its own, recursively, so one image that crashes a
    detector fails alone (about 2 log2(n) more calls), not the 1,659 images of a GenEval eval with it.  When both
    halves fail as their whole did, the reward fails everything it is given (a server down, a bug): the search
    stops there, two calls later, instead of calling once per sample.  At most ``8 x log2(n)`` extra calls in all
    (a reward whose message names the batch, failing everywhere): what is not isolated by then fails whole."""
    got = _call(reward, samples)
    return got if isinstance(got, list) else _isolate(reward, samples, got, [8 * len(samples).bit_length()])


def _isolate(reward: Reward, samples: list[RewardSample], failure: str, calls_left: list[int]) -> list[RewardOutput]:
    if len(samples) == 1 or calls_left[0] < 2:
        return [RewardOutput(failure=failure) for _ in samples]
    calls_left[0] -= 2
    mid = len(samples) // 2
    halves = [(part, _call(reward, part)) for part in (samples[:mid], samples[mid:])]
    if all(got == failure for _, got in halves):
        return [RewardOutput(failure=failure) for _ in samples]
    out: list[RewardOutput] = []
    for part, got in halves:
        out += got if isinstance(got, list) else _isolate(reward, part, got, calls_left)
    return out


class RewardFailureError(UserError):
    """More reward calls failed than ``rewards.max_failure_fraction`` allows."""


class FailureBudget:
    """Counts failed samples and stops the run when their fraction exceeds ``max_fraction``.

    The check starts once ``min_samples`` samples were scored, so one unlucky first batch of two does
    not end a run; ``max_fraction = 1.0`` never stops.  Counts are cumulative over the run.
    """

    def __init__(self, max_fraction: float, min_samples: int = 16, key: str = "rewards.max_failure_fraction") -> None:
        if not 0.0 <= max_fraction <= 1.0:
            raise UserError(f"{key} must be in [0, 1], got {max_fraction}")
        self.max_fraction, self.min_samples, self.key = max_fraction, min_samples, key
        self.scored = 0
        self.failed = 0
        self.by_reward: Counter[str] = Counter()
        self.last_reason: dict[str, str] = {}

    @property
    def fraction(self) -> float:
        return self.failed / self.scored if self.scored else 0.0

    def record(self, results: Iterable[ScoredSample], check: bool = True) -> None:
        for r in results:
            self.scored += 1
            if r.total is None:
                self.failed += 1
                for name, why in r.failures.items():
                    self.by_reward[name] += 1
                    self.last_reason[name] = why
        if check:
            self.check()

    def check(self) -> None:
        if self.scored < self.min_samples or self.fraction <= self.max_fraction:
            return
        worst = ", ".join(f"{n} x{c}" for n, c in self.by_reward.most_common(3))
        name = self.by_reward.most_common(1)[0][0] if self.by_reward else None
        last = f"; last {name} failure: {self.last_reason[name]}" if name else ""
        raise RewardFailureError(
            f"rewards: {self.failed}/{self.scored} samples failed ({self.fraction:.0%} > {self.key}="
            f"{self.max_fraction:g}); failing: {worst or 'unknown'}{last}".replace("\n", " "))

    def state_dict(self) -> dict[str, Any]:
        """Counts for a checkpoint: a resumed run keeps its budget."""
        return {"scored": self.scored, "failed": self.failed, "by_reward": dict(self.by_reward),
                "last_reason": dict(self.last_reason)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Inverse of :meth:`state_dict`; checkpoints from before it kept only ``scored`` / ``failed``."""
        self.scored, self.failed = int(state["scored"]), int(state["failed"])
        self.by_reward = Counter(state.get("by_reward", {}))
        self.last_reason = dict(state.get("last_reason", {}))

    def metrics(self) -> dict[str, float]:
        """Scalars for the tracker: totals, fraction and per-reward failure counts."""
        out = {"rewards/scored": float(self.scored), "rewards/failed": float(self.failed),
               "rewards/failed_fraction": self.fraction}
        out.update({f"rewards/failed/{n}": float(c) for n, c in self.by_reward.items()})
        return out
