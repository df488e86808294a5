"""Task rewards scored on Ray actors (``rollout.reward_workers``), for reward models too big to copy per worker.

Where it fits: the trainer swaps its in-process :class:`RewardSet` for a :class:`RayRewardSet` (same
``score`` call) when the recipe sets ``rollout.reward_workers``.

Why: a reward actor lost with its node must never turn into zeros (a zero is a reward the learner would
train on).  Its samples come back as explicit failures, which the trainer's failure budget
(``rewards.max_failure_fraction``) counts, and the actor is replaced with bounded attempts
(:class:`r3_rl.ray_actors.ActorGroup`).  One that cannot be replaced is dropped and the others score
for it; with none left the run stops with one line.  Every wait has ``ray.call_timeout_s``.
"""
from __future__ import annotations

import time
from typing import Any, Callable

import torch

from r3_rl.config import RayCfg
from r3_rl.errors import UserError
from r3_rl.gpu_layout import REWARD_ACTOR_CPUS
from r3_rl.ray_actors import ActorGroup, ActorLost, ReadyActor, get_within
from r3_rl.rewards.base import RewardSample
from r3_rl.rewards.reward_set import RewardSet, ScoredSample


class RewardWorker(ReadyActor):
    """A Ray actor holding a reward set (its models are loaded once, in :meth:`setup`)."""

    def __init__(self, specs: list[dict[str, Any]], threads: int) -> None:
        self.specs, self.threads = specs, threads  # cheap: ready() then answers once placed

    def setup(self) -> bool:
        if self.threads:
            torch.set_num_threads(self.threads)
        self.rewards = RewardSet.from_specs(self.specs)
        # the models load here, in the set-up's own deadline: lazily, on the first score() call, a big detector
        # loaded inside the scoring deadline, and every replacement actor timed out the same way
        self.rewards.setup()
        return True

    def score(self, samples: list[RewardSample]) -> list[ScoredSample]:
        return self.rewards.score(samples)


class RayRewardSet:
    """Scores on ``workers`` Ray actors; duck-types :meth:`RewardSet.score`.  Lost actors: failures, never zeros."""

    def __init__(self, specs: list[dict[str, Any]], workers: int, threads: int, log_event: Callable[[str], None],
                 ray_cfg: Any = None, attempts: int = 3, gpus: float = 0.0):
        import ray

        probe = RewardSet.from_specs(specs)  # validate specs here: a bad name fails in one line, in the driver
        if probe.needs_policy:
            raise UserError("rollout.reward_workers: a task reward needs the policy (e.g. self_consistency), which "
                            "reward actors do not hold; set rollout.reward_workers: 0")
        ray_cfg = ray_cfg or RayCfg()
        self.call_timeout_s = ray_cfg.call_timeout_s
        options: dict[str, Any] = {"num_cpus": REWARD_ACTOR_CPUS, "num_gpus": gpus, "max_restarts": 0,
                                   "max_task_retries": 0}
        if not gpus:  # Ray sets no CUDA_VISIBLE_DEVICES for an actor without GPUs: it would see all of the node's,
            # and a reward on device auto would load its models onto GPU 0 (the trainer's or an actor's)
            options["runtime_env"] = {"env_vars": {"CUDA_VISIBLE_DEVICES": ""}}
        cls = ray.remote(RewardWorker).options(**options)
        self.group = ActorGroup("reward worker", lambda: cls.remote(specs, threads), {"CPU": 1, "GPU": gpus}, ray_cfg,
                                attempts=attempts, min_alive=1, log_event=log_event)
        self.group.start(workers, lambda a: a.setup.remote())
        log_event(f"rewards: {len(self.group.actors)} Ray reward workers ready ({self.group.describe()})")

    @property
    def restarts(self) -> int:
        return self.group.restarts

    def score(self, samples: list[RewardSample]) -> list[ScoredSample]:
        if not samples:
            return []
        actors = self.group.items()
        n = len(actors)
        chunks = [samples[k::n] for k in range(n)]
        refs = [(i, a.score.remote(c) if c else None) for (i, a), c in zip(actors, chunks)]
        out: list[ScoredSample | None] = [None] * len(samples)
        deadline = time.monotonic() + self.call_timeout_s
        lost: list[tuple[int, str]] = []
        for k, ((i, ref), chunk) in enumerate(zip(refs, chunks)):
            if ref is None:
                continue
            try:
                got = get_within(ref, deadline - time.monotonic(), "scoring")
            except ActorLost as e:
                got = [ScoredSample(total=None, failures={"reward_worker": f"reward actor lost ({e})"})
                       for _ in chunk]
                lost.append((i, f"{e}; its {len(chunk)} samples are marked failed"))
            for j, res in enumerate(got):
                out[k + j * n] = res
        # replaced after every wait: a slow replacement (placement, start, set-up) must not use up the shared
        # deadline of the healthy actors still scoring, which would then be failed and replaced too
        for i, why in lost:
            self.group.replace(i, why, lambda a: a.setup.remote())
        return out  # type: ignore[return-value]

    def close(self) -> None:
        self.group.close()
