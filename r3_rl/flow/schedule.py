"""Timestep grids, noise (eta) schedules and the choice of stochastic steps: pure, seeded, no tensors kept.

Convention (every reference, see ``docs/architecture.md``): ``x_t = (1 - t) * x0 + t * eps``; ``t = 1`` is
pure noise, ``t = 0`` data; sampling walks a grid ``t_0 = 1 > t_1 > ... > t_{N-1} = 0``.  Step ``i``
(``i = 0 .. N-2``) goes from ``t_i`` to ``t_{i+1}`` with ``delta_i = t_i - t_{i+1} > 0``; ``t = 0`` is never a
step time, so the ``1 / t`` in the SDE coefficients is always finite.

Which steps are stochastic (SDE) is a recipe decision (:class:`StochasticSteps`); the rest are Euler ODE steps
and carry no log-prob.  Every random choice takes an explicit integer seed (derive one with
:func:`derive_seed`), so a choice can be replayed on another process.
"""
from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from typing import Any

import torch

from r3_rl.errors import close_match

ETA_KINDS: tuple[str, ...] = ("r3", "flow_grpo", "constant")
STEP_MODES: tuple[str, ...] = ("random", "fixed", "random_window", "sliding_window", "all")


def derive_seed(*parts: int | str) -> int:
    """A 63-bit seed from any parts (run seed, learner step, group id, member, purpose ...).

    Stable across processes and Python versions (blake2b, not ``hash()``), so a rollout worker and the
    trainer derive the same seed from the same parts.
    """
    digest = hashlib.blake2b("\x1f".join(repr(p) for p in parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(int(seed))


def timestep_grid(num_points: int, shift: float = 3.0) -> tuple[float, ...]:
    """``N`` grid times from 1 to 0: ``t = s*u / (1 + (s-1)*u)`` on ``u = linspace(1, 0, N)`` (BAGEL, DanceGRPO;
    diffusers' SD3 scheduler, Flow-GRPO's, shifts ``linspace(1, shift(1/1000), N)`` a second time, N steps, and
    appends 0 instead: its last step starts near 0.009).

    ``shift > 1`` spends more steps near the noise end.  Returned as Python floats (float64): the sampler and
    the learner must feed the same ``t`` to the model and to the Gaussian, and Python floats survive JSON
    exactly.  ``N`` points give ``N - 1`` steps (R3: 16 for generation, 21 for edits).
    """
    if num_points < 2:
        raise ValueError(f"timestep_grid: num_points must be >= 2 (one step), got {num_points}")
    if not shift > 0:
        raise ValueError(f"timestep_grid: shift must be > 0, got {shift}")
    out = []
    for i in range(num_points):
        u = 1.0 - i / (num_points - 1)
        out.append(shift * u / (1.0 + (shift - 1.0) * u))
    out[0], out[-1] = 1.0, 0.0  # exact ends whatever the rounding
    return tuple(out)


def check_grid(grid: Sequence[float]) -> None:
    if len(grid) < 2 or any(not grid[i] > grid[i + 1] for i in range(len(grid) - 1)):
        raise ValueError("grid must hold at least 2 strictly decreasing times (1 ... 0), e.g. timestep_grid(16)")
    if grid[0] > 1.0 or grid[-1] < 0.0:
        raise ValueError(f"grid must lie in [0, 1], got {grid[0]} ... {grid[-1]}")


@dataclass(frozen=True)
class EtaSchedule:
    """Noise level ``eta(t)`` of the SDE step (its std is ``eta * sqrt(delta)``).

    * ``r3``: ``scale * sqrt(t / (1 - min(t, clamp)))`` (R3: scale 0.7 for generation, 1.0 for edits,
      clamp 0.95 for every ``t >= clamp``).
    * ``flow_grpo``: ``scale * sqrt(t / (1 - t))`` with ``1 - t_1`` as the denominator at ``t = 1``
      (Flow-GRPO's "noise_level" 0.7; 1.3 for Bagel).
    * ``constant``: ``eta = scale`` (DanceGRPO 0.3).
    """

    kind: str = "r3"
    scale: float = 0.7
    clamp: float = 0.95

    def __post_init__(self) -> None:
        if self.kind not in ETA_KINDS:
            raise ValueError(f"eta kind {self.kind!r} is unknown; valid: {', '.join(ETA_KINDS)}")
        if not (self.scale >= 0 and math.isfinite(self.scale)):
            raise ValueError(f"eta scale must be a finite number >= 0, got {self.scale}")
        if not 0 < self.clamp < 1:
            raise ValueError(f"eta clamp must lie in (0, 1), got {self.clamp}")

    def at(self, i: int, grid: Sequence[float]) -> float:
        """``eta`` of step ``i`` (from ``grid[i]`` to ``grid[i+1]``)."""
        t = float(grid[i])
        if self.kind == "constant":
            return float(self.scale)
        if self.kind == "r3":
            return self.scale * math.sqrt(t / (1.0 - min(t, self.clamp)))
        denom = 1.0 - float(grid[1]) if t >= 1.0 else 1.0 - t
        return self.scale * math.sqrt(t / denom)

    def per_step(self, grid: Sequence[float]) -> tuple[float, ...]:
        """``eta`` of every step of ``grid`` (``len(grid) - 1`` values)."""
        check_grid(grid)
        return tuple(self.at(i, grid) for i in range(len(grid) - 1))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> EtaSchedule:
        return cls(**known_fields(cls, d, "eta"))


@dataclass(frozen=True)
class StochasticSteps:
    """Which denoising steps are SDE steps (recorded, trained); all others are Euler ODE steps.

    Allowed steps are ``0 .. limit-1`` with ``limit = max_index`` (exclusive) or the number of steps.
    ``max_index=2`` restricts edits to the first two steps (R3); ``max_index = steps - 2`` keeps MixGRPO's
    last two steps deterministic.

    * ``random``: ``count`` distinct indices drawn uniformly (R3: ``count=1``, one step per image).
    * ``fixed``: exactly ``indices``.
    * ``random_window``: ``window`` consecutive steps starting uniformly in ``[0, limit - window]``
      (Flow-GRPO's fast/Bagel configs).
    * ``sliding_window`` (MixGRPO "progressive"): the window starts at ``start + stride * (k mod P)`` with
      ``k = learner_step // shift_every``, ``P`` the number of starts inside ``[start, limit)``; with
      ``roll_back=False`` it stops at the last start instead of wrapping.  Near ``limit`` it is truncated
      (``[cur, min(cur + window, limit))``, as MixGRPO); it is never empty (MixGRPO's clip can make it so).
    * ``all``: every allowed step (original Flow-GRPO, DanceGRPO).
    """

    mode: str = "random"
    count: int = 1
    max_index: int | None = None
    indices: tuple[int, ...] = ()
    window: int = 1
    start: int = 0
    stride: int = 1
    shift_every: int = 1
    roll_back: bool = True

    def __post_init__(self) -> None:
        if self.mode not in STEP_MODES:
            raise ValueError(f"stochastic step mode {self.mode!r} is unknown; valid: {', '.join(STEP_MODES)}")
        object.__setattr__(self, "indices", tuple(int(i) for i in self.indices))
        for name in ("count", "window", "stride", "shift_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"stochastic steps: {name} must be >= 1, got {getattr(self, name)}")
        if self.max_index is not None and self.max_index < 1:
            raise ValueError(f"stochastic steps: max_index must be >= 1 (exclusive bound), got {self.max_index}")
        if self.start < 0:
            raise ValueError(f"stochastic steps: start must be >= 0, got {self.start}")
        if self.mode == "fixed" and (not self.indices or min(self.indices) < 0
                                     or len(set(self.indices)) != len(self.indices)):
            raise ValueError(f"stochastic steps: mode 'fixed' needs distinct indices >= 0, got {self.indices}")

    def limit(self, num_steps: int) -> int:
        """Exclusive upper bound of the allowed step indices for a grid of ``num_steps`` steps."""
        if num_steps < 1:
            raise ValueError(f"stochastic steps: num_steps must be >= 1, got {num_steps}")
        return num_steps if self.max_index is None else min(self.max_index, num_steps)

    def possible(self, num_steps: int) -> tuple[int, ...]:
        """Every step index that :meth:`choose` may return for ``num_steps`` steps (what a recipe check covers)."""
        lim = self.limit(num_steps)
        return tuple(sorted(i for i in self.indices if i < lim)) if self.mode == "fixed" else tuple(range(lim))

    def choose(self, num_steps: int, *, seed: int = 0, learner_step: int = 0) -> tuple[int, ...]:
        """Sorted SDE step indices for one image (or one sibling group: pass the group's seed to share them)."""
        lim = self.limit(num_steps)
        if self.mode == "all":
            return tuple(range(lim))
        if self.mode == "fixed":
            if max(self.indices) >= lim:
                raise ValueError(f"stochastic steps: fixed indices {self.indices} must be < {lim} "
                                 f"({num_steps} steps, max_index={self.max_index})")
            return tuple(sorted(self.indices))
        if self.mode == "random":
            if self.count > lim:
                raise ValueError(f"stochastic steps: count={self.count} exceeds the {lim} allowed steps")
            pick = torch.randperm(lim, generator=_generator(seed))[: self.count]
            return tuple(sorted(int(i) for i in pick))
        w = min(self.window, lim)
        if self.mode == "random_window":
            first = int(torch.randint(0, lim - w + 1, (1,), generator=_generator(seed)))
            return tuple(range(first, first + w))
        return self._sliding(lim, learner_step)

    def _sliding(self, lim: int, learner_step: int) -> tuple[int, ...]:
        if self.start >= lim:
            raise ValueError(f"stochastic steps: sliding window start={self.start} must be < {lim}")
        if learner_step < 0:
            raise ValueError(f"stochastic steps: learner_step must be >= 0, got {learner_step}")
        positions = (lim - 1 - self.start) // self.stride + 1
        k = learner_step // self.shift_every
        k = k % positions if self.roll_back else min(k, positions - 1)
        cur = self.start + self.stride * k
        return tuple(range(cur, min(cur + self.window, lim)))

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["indices"] = list(self.indices)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> StochasticSteps:
        return cls(**known_fields(cls, d, "stochastic steps"))


def sde_mean_coefficient(t: float, delta: float, eta: float) -> float:
    """The latent's coefficient ``1 - eta^2 delta / (2 t)`` in the SDE step's mean (``r3_rl.flow.transition``)."""
    return 1.0 - eta * eta * delta / (2.0 * t)


def _flipped_steps(grid: Sequence[float], eta: EtaSchedule, steps: StochasticSteps) -> list[tuple[int, float]]:
    """``(index, coefficient)`` of the possible SDE steps whose mean keeps ``<= 0`` times the latent."""
    coefficients = ((i, sde_mean_coefficient(grid[i], grid[i] - grid[i + 1], eta.at(i, grid)))
                    for i in steps.possible(len(grid) - 1))
    return [(i, a) for i, a in coefficients if not a > 0]


def check_sde_steps(grid: Sequence[float], eta: EtaSchedule, steps: StochasticSteps,
                    shift: float | None = None) -> None:
    """Refuse a grid and eta schedule under which an SDE step ``steps`` may pick keeps ``<= 0`` times the latent.

    R3's eta is large near the noise end (``0.7 sqrt(1 / 0.05) = 3.1`` at ``t = 1``), so a coarse grid's first
    step (large ``delta``) drives ``1 - eta^2 delta / (2 t)`` to zero or below: the mean then ignores or flips the
    latent and its noise (std ``eta sqrt(delta)``) swamps it -- images of noise and log-probs of nothing, which
    nothing downstream notices.  R3's grids (16 and 21 points, shift 3) keep it at 0.81-0.89.  The error names
    the step and what would pass: the largest eta scale for this grid and, given the grid's ``shift``, the
    fewest grid points for this scale.
    """
    flipped = _flipped_steps(grid, eta, steps)
    if not flipped:
        return
    i, a = flipped[0]
    hints = []
    if eta.scale > 0:  # eta is proportional to its scale: a > 0 iff scale < sqrt(2 t / delta) * scale / eta
        most = min(math.sqrt(2.0 * grid[j] / (grid[j] - grid[j + 1])) * eta.scale / eta.at(j, grid)
                   for j in steps.possible(len(grid) - 1))
        hints.append(f"an eta scale below {most:.3g}")
    if shift is not None:
        points = next((n for n in range(len(grid) + 1, 1001)
                       if not _flipped_steps(timestep_grid(n, shift), eta, steps)), None)
        if points is not None:
            hints.append(f"at least {points} grid points")
    raise ValueError(f"SDE step {i} (t={grid[i]:.3g}, delta={grid[i] - grid[i + 1]:.3g}) has eta="
                     f"{eta.at(i, grid):.3g}, so its mean keeps {a:+.3g} x the latent (1 - eta^2 delta / (2 t) must be "
                     f"> 0); use {' or '.join(hints) or 'a finer grid'}")


def train_subset(num_recorded: int, fraction: float, *, order: str = "first", seed: int = 0) -> tuple[int, ...]:
    """Positions (into an image's recorded SDE steps) the learner trains on: ``max(1, int(n * fraction))`` of them.

    ``order="first"`` takes them in denoising order (Flow-GRPO's ``timestep_fraction``); ``"random"`` a seeded
    random subset (DanceGRPO's per-sample permutation, R3's ``timestep_sample_ratio``).
    """
    # the settings are checked first: an image with no recorded step must not hide a bad one
    if not 0 < fraction <= 1:
        raise ValueError(f"train_subset: fraction must lie in (0, 1], got {fraction}")
    if order not in ("first", "random"):
        raise ValueError(f"train_subset: order {order!r} is unknown; valid: first, random")
    if num_recorded < 1:
        return ()
    k = max(1, int(num_recorded * fraction))
    if order == "first":
        return tuple(range(k))
    return tuple(sorted(int(i) for i in torch.randperm(num_recorded, generator=_generator(seed))[:k]))


def known_fields(cls: type, d: dict[str, Any], what: str) -> dict[str, Any]:
    """A copy of ``d`` once every key is known to be a field of ``cls`` (else one line naming the valid ones).

    Records come back from trajectory files and recipes: a misspelt key must fail, not fall back to a default.
    """
    if not isinstance(d, dict):
        raise ValueError(f"{what}: expected a mapping, got {type(d).__name__}")
    names = [f.name for f in fields(cls)]
    for key in d:
        if key not in names:
            raise ValueError(f"{what}: unknown key {key!r}{close_match(str(key), names)}; valid: {', '.join(names)}")
    return dict(d)
