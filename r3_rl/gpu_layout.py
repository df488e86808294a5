"""Which GPUs the processes of a run use on a node, decided before Ray starts.

The trainer process keeps a policy on ``policy.device`` (it runs the evals and, with ``learner.ranks > 1``,
mirrors rank 0's weights).  Ray hands out GPU ids lowest first, so a local Ray that sees the trainer's GPU gives
it to its first GPU actor: for the BAGEL recipe that put learner rank 0 (55.4 GB) beside the trainer (37.0 GB)
on one 80 GB card while GPU 7 stayed idle.  So when the node has a GPU to spare beyond what the actors ask for,
the local Ray starts without the trainer's GPU (``r3-rl plan``'s "alone on a spare GPU"); when it has none,
they share it (the plan's "worst case" row).  A joined cluster (``ray.address``) is left as its ``ray start``
made it.

Inside an actor Ray sets ``CUDA_VISIBLE_DEVICES`` to the GPUs it assigned, numbered from 0 there: actors build
on ``cuda``, whatever index the trainer's ``policy.device`` names.
"""
from __future__ import annotations

import itertools
import math
import os
from typing import Any, NamedTuple

from r3_rl.errors import UserError


def on_gpu(recipe: Any) -> bool:
    return recipe.policy.device.startswith("cuda")


def gpus_to_place(groups: list[tuple[int, float]]) -> int:
    """GPUs that hold every actor of ``groups`` (``(count, GPU share)`` per kind of actor), however Ray places them.

    Ray gives a share below 1 a part of one GPU and places actors as they are created, each on a GPU with room
    left.  So the sum of the shares rounded up undercounts: three actors of 0.6 need three GPUs, not two; and
    packing largest first does too: two of 0.3 created before two of 0.7 share a GPU and leave the 0.7s one each
    (3 GPUs, not 2).  This is the most GPUs any order of the kinds needs, placed first fit or best fit (Ray's
    order of creation is not the recipe's to choose).  A share of 1 or more takes that many whole GPUs."""
    whole = sum(count * math.ceil(share - 1e-9) for count, share in groups if share >= 1)
    parts = [(count, share) for count, share in groups if count > 0 and 0 < share < 1]
    worst = 0
    for order in itertools.permutations(parts):
        for best_fit in (False, True):
            room: list[float] = []  # what is left on each GPU in use
            for count, share in order:
                for _ in range(count):
                    fits = [i for i, left in enumerate(room) if left >= share - 1e-9]
                    if not fits:
                        room.append(1.0 - share)
                    else:
                        room[min(fits, key=room.__getitem__) if best_fit else fits[0]] -= share
            worst = max(worst, len(room))
    return whole + worst


REWARD_ACTOR_CPUS = 1  # what each reward actor asks Ray for (rollout.ray_rewards)


class ActorKind(NamedTuple):
    """One kind of the run's Ray actors: its recipe key, how many, and what each asks Ray for."""
    key: str
    count: int
    gpus: float
    cpus: float


def actor_kinds(recipe: Any) -> list[ActorKind]:
    """The run's Ray actors, in the order the doctor names them: rollout workers (with the Ray backend), reward
    workers, learner ranks (when more than one).  A kind the run does not start has count 0."""
    r, lr = recipe.rollout, recipe.learner
    return [ActorKind("rollout.workers", r.workers if r.backend == "ray" else 0, r.gpus_per_worker,
                       r.cpus_per_worker),
            ActorKind("rollout.reward_workers", r.reward_workers, r.gpus_per_reward_worker, REWARD_ACTOR_CPUS),
            ActorKind("learner.ranks", lr.ranks if lr.ranks > 1 else 0, lr.gpus_per_rank, lr.cpus_per_rank)]


def actor_gpus(recipe: Any) -> int:
    """GPUs the run's Ray actors occupy (:func:`gpus_to_place` over :func:`actor_kinds`)."""
    return gpus_to_place([(kind.count, kind.gpus) for kind in actor_kinds(recipe)])


def visible_gpus() -> list[str]:
    """This process's GPUs as the ids ``CUDA_VISIBLE_DEVICES`` would name them."""
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    if listed is not None:
        return [g.strip() for g in listed.split(",") if g.strip()]
    import torch

    return [str(i) for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []


def gpus_for_local_ray(recipe: Any, visible: list[str] | None = None) -> list[str] | None:
    """The GPUs to give a local Ray: all but the trainer's when one is to spare, else None (Ray sees them all)."""
    if recipe.ray.address or not on_gpu(recipe):
        return None
    visible = visible_gpus() if visible is None else visible
    index = int(recipe.policy.device.partition(":")[2] or 0)
    if index >= len(visible) or len(visible) <= actor_gpus(recipe):
        return None
    return [g for i, g in enumerate(visible) if i != index]


def actor_recipe_data(recipe: Any) -> dict[str, Any]:
    """The recipe as an actor receives it: ``policy.device`` without an index (``cuda:3`` -> ``cuda``), since an
    actor sees only its own GPUs, numbered from 0."""
    data = recipe.model_dump(mode="json")
    data["policy"]["device"] = recipe.policy.device.partition(":")[0]
    return data


def check_gpu_shares(recipe: Any, source: str) -> None:
    """On GPUs every learner rank needs a whole GPU of its own (NCCL refuses two ranks on one: "Duplicate GPU
    detected") and every rollout worker some GPU (with 0 Ray sets no ``CUDA_VISIBLE_DEVICES``, and every actor
    would build on GPU 0)."""
    if not on_gpu(recipe):
        return
    lr, r = recipe.learner, recipe.rollout
    if lr.ranks > 1 and (lr.gpus_per_rank < 1 or lr.gpus_per_rank != int(lr.gpus_per_rank)):
        raise UserError(f"{source}: key 'learner.gpus_per_rank': {lr.gpus_per_rank:g} with policy.device "
                        f"{recipe.policy.device} and learner.ranks {lr.ranks}; each rank needs a whole GPU "
                        f"(1, 2, ...): NCCL cannot run two ranks on one GPU")
    if r.backend == "ray" and r.gpus_per_worker <= 0:
        raise UserError(f"{source}: key 'rollout.gpus_per_worker': 0 with policy.device {recipe.policy.device}; "
                        f"give each rollout worker a GPU share (e.g. 1, or 0.5 for two workers a GPU), or "
                        f"rollout.backend: local")
