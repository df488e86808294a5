"""Learner ranks as Ray actors: data-parallel DeepSpeed over ``learner.ranks`` processes (one per GPU).

Where it fits: with ``learner.ranks: N > 1`` the trainer's learner is a :class:`RankedLearner`.  It has
the same calls as the in-process learners (``step``, ``save``, ``load``), so the loop, checkpoints and
resume do not change; the trainer's own policy becomes a mirror that receives rank 0's weights after
every update (it serves evaluation, rollout weight sync and ``save_pretrained``).

Why it is exact: every rank gets the whole batch and takes every N-th micro-batch of each mini-batch;
losses keep their weight relative to the whole mini-batch, and are multiplied by N because DeepSpeed
averages gradients over ranks, so the summed gradient equals the one-rank gradient (tested).  Ranks
with fewer micro-batches run zero-weighted repeats to keep DeepSpeed's collectives in lockstep.

Ranks run different micro-batches (a text stage on one, an image stage with an image context on
another), so their graphs differ; DeepSpeed reduces gradients in the order backward produces them,
which :class:`r3_rl.learner.deepspeed_learner.DeepSpeedOptim` pins to one order on every rank.

Gotchas: ZeRO-3 is refused (at recipe validation, :func:`r3_rl.config_learner.check_ranks`): it gathers
parameters with a collective in every module call, so every rank would have to call the same modules in the
same order, and R3's stages do not (use ZeRO 0-2, or one rank).  Checkpoints are written by all ranks into the same folder: on a multi-node
cluster the run directory must be on a shared filesystem.
"""
from __future__ import annotations

import os
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch

from r3_rl.config_learner import check_ranks
from r3_rl.policy.base import Policy
from r3_rl.learner.deepspeed_learner import ensure_dist_env, free_port
from r3_rl.learner.manifest import file_sizes
from r3_rl.learner.torch_learner import enable_checkpointing, learner_from_recipe, reduce_metric
from r3_rl.ray_actors import (ActorLost, ClusterError, ReadyActor, Unplaced, first_line, get_within,
                              start_actors)
from r3_rl.gpu_layout import actor_recipe_data, gpus_for_local_ray
from r3_rl.ray_runtime import actor_died, kill_actors, pack_state, start_ray, stop_ray, unpack_state


def unseen_files(root: Path, written: list[dict[str, int]]) -> list[tuple[int, str]]:
    """(rank, file) for each file a rank reported writing under ``root`` that this process does not see there
    with that size: a rank on a node without the run's shared folder wrote into a folder of its own."""
    unseen = []
    for rank, files in enumerate(written):
        for rel, size in files.items():
            f = root / rel
            if not f.is_file() or f.stat().st_size != size:
                unseen.append((rank, rel))
    return unseen


class LearnerRank(ReadyActor):
    """One data-parallel rank: a policy copy, its KL reference and a DeepSpeed learner."""

    def __init__(self, recipe_data: dict[str, Any], rank: int, world: int, threads: int) -> None:
        if threads:
            torch.set_num_threads(threads)
        if not torch.cuda.is_available():
            os.environ["DS_ACCELERATOR"] = "cpu"
        self.recipe_data, self.rank, self.world = recipe_data, rank, world
        self.learner: Any = None

    def address(self) -> tuple[str, int]:
        """Where rank 0 listens for the rendezvous: this node's IP and a free port."""
        import ray

        return ray.util.get_node_ip_address(), free_port("")

    def setup(self, master: tuple[str, int], policy_state: Any, reference_state: Any, version: int) -> bool:
        """Join the process group; build policy (+ LoRA), reference and learner.  All ranks call this together."""
        from r3_rl.config import Recipe
        from r3_rl.learner.actions import uses_kl
        from r3_rl.policy.registry import build_policy

        os.environ.update({"RANK": str(self.rank), "WORLD_SIZE": str(self.world), "LOCAL_RANK": "0",
                           "MASTER_ADDR": master[0], "MASTER_PORT": str(master[1])})
        if torch.cuda.is_available():
            os.environ["LOCAL_RANK"] = str(torch.cuda.current_device())
        recipe = Recipe.model_validate(self.recipe_data)
        join_process_group(recipe.ray.collective_timeout_s)
        lora, recipe.learner.lora, recipe.learner.ranks = recipe.learner.lora, None, 1  # this process is one rank
        policy = build_policy(recipe)
        reference: Any = None
        adapters = None
        if lora is not None:  # adapters first, so the driver's parameter names match; reference = adapters off
            from r3_rl.learner.lora import adapters_in_base_dtype, apply_lora

            enable_checkpointing(policy, recipe.learner)  # before LoRA wraps the model
            adapters = apply_lora(policy, lora, adapters_in_base_dtype(recipe.learner))
            reference = adapters.reference() if uses_kl(recipe.learner) else None
        policy.load_state_dict(unpack_state(policy_state), version)  # before DeepSpeed partitions the weights
        if lora is None and reference_state is not None:
            reference = policy.frozen_copy()
            reference.model.load_state_dict(unpack_state(reference_state))
        self.policy, self.reference_is_copy = policy, lora is None and reference is not None
        self.reference = reference
        self.learner = learner_from_recipe(policy, reference, recipe, adapters=adapters)
        bound_all_collectives(recipe.ray.collective_timeout_s)
        self.learner.rank, self.learner.world = self.rank, self.world
        return True

    def step(self, items: list[Any]) -> tuple[dict[str, float], dict[str, int]]:
        """The step's metrics and, per metric averaged over micro-batches, how many of this rank's it covers."""
        metrics = self.learner.step(items)
        return metrics, dict(self.learner.metric_counts)

    def weights(self, trainable_only: bool = False) -> Any:
        """This rank's weights for the driver's mirror (:func:`r3_rl.ray_runtime.pack_state`); ``trainable_only``:
        those a learner step changes (LoRA: the adapters, not the frozen base)."""
        return pack_state(self.policy.trainable_state_dict() if trainable_only else self.policy.state_dict())

    def save(self, path: str) -> None:
        from r3_rl.rng_state import global_rng_state

        if self.rank == 0:
            self.learner.save(Path(path))
        else:  # only the DeepSpeed state is per rank; counters are rank 0's
            Path(path).mkdir(parents=True, exist_ok=True)
            self.learner.optim.save(Path(path))
        # this process's own generators (LoRA dropout draws from them): the trainer's trainer.pt holds its own only
        torch.save(global_rng_state(), Path(path) / f"rng_rank{self.rank}.pt")

    def files(self, path: str) -> dict[str, int]:
        """Every file this rank sees under ``path``, with its size (asked once every rank has saved)."""
        return file_sizes(Path(path))

    def load(self, path: str, reference_file: str | None) -> None:
        from r3_rl.learner.safe_load import safe_torch_load
        from r3_rl.rng_state import set_global_rng_state

        self.learner.load(Path(path))
        rng = Path(path) / f"rng_rank{self.rank}.pt"
        if rng.is_file():  # checkpoints before 2026-12-06 have none
            set_global_rng_state(safe_torch_load(rng))
        if reference_file and self.reference_is_copy:
            from safetensors.torch import load_model

            load_model(self.reference.model, reference_file)


def join_process_group(timeout_s: float) -> None:
    """Join the ranks' process group with a timeout on every collective (DeepSpeed's default is 30 min).

    A rank whose peer was lost mid-collective then raises after ``timeout_s`` instead of waiting for
    ever (gloo often sooner: a dead peer's closed socket fails the collective at once).
    """
    backend = ensure_dist_env()
    import deepspeed  # after ensure_dist_env: DS_ACCELERATOR must be set before deepspeed picks an accelerator

    if not torch.distributed.is_initialized():
        deepspeed.init_distributed(dist_backend=backend, verbose=False, timeout=timedelta(seconds=timeout_s))


def bound_all_collectives(timeout_s: float) -> None:
    """Put ``timeout_s`` on every process group, DeepSpeed's own included.

    DeepSpeed clones the world group for data parallelism with ``new_group(ranks)`` and no timeout, so
    its gradient all-reduce would wait torch's default (30 min gloo, 10 min NCCL) for a frozen peer;
    ``_set_pg_timeout`` (private torch API, covered by tests/test_ray_node_loss.py) resets each one.
    """
    from torch.distributed import distributed_c10d as c10d

    for group in list(c10d._world.pg_map):
        c10d._set_pg_timeout(timedelta(seconds=timeout_s), group)


def _merge(rank_metrics: list[dict[str, float]], rank_counts: list[dict[str, int]]) -> dict[str, float]:
    """Per-rank metrics -> one dict, as one learner would have logged them: losses add up (each rank holds its
    share); a mean over micro-batches is weighted by each rank's micro-batches (ranks run unequal numbers: 3
    micro-batches on 2 ranks are 2 and 1, so a plain mean of the ranks' means is biased); min / max and the rest
    (the same on every rank) as :func:`reduce_metric` merges them."""
    out: dict[str, float] = {}
    for key in dict.fromkeys(k for m in rank_metrics for k in m):  # a key only some ranks log (kl_image) too
        pairs = [(m[key], c.get(key, 0)) for m, c in zip(rank_metrics, rank_counts) if key in m]
        weight = sum(n for _, n in pairs)
        if key == "learner/loss":
            out[key] = sum(v for v, _ in pairs)
        elif weight and not key.endswith(("min", "max")):
            out[key] = sum(v * n for v, n in pairs) / weight
        else:
            out[key] = reduce_metric(key, [v for v, _ in pairs])
    return out


class RankedLearner:
    """``learner.ranks`` :class:`LearnerRank` actors behind the in-process learner's interface.

    A rank lost with its node is not rebuilt here: the ranks' optimiser state lives only on the ranks, so
    the one exact restart point is the last checkpoint, and returning to it means rewinding the whole
    trainer (prompts, parent buffer, RNGs), which ``--resume auto`` already does bit-identically.  The
    step is abandoned, every rank killed, and a :class:`ClusterError` says where to continue from.
    """

    def __init__(self, policy: Policy, reference: Any, recipe: Any) -> None:
        import ray

        cfg = recipe.learner
        check_ranks(cfg)  # validation refused these already; a guard for recipes built in code
        self._owns_ray = start_ray(recipe.ray, gpus_for_local_ray(recipe))
        self.policy = policy
        self.adapters = None
        if cfg.lora is not None:  # the mirror must have the ranks' parameter names
            from r3_rl.learner.lora import adapters_in_base_dtype, apply_lora

            self.adapters = apply_lora(policy, cfg.lora, adapters_in_base_dtype(cfg))
        data = actor_recipe_data(recipe)
        actor = ray.remote(LearnerRank).options(num_cpus=cfg.cpus_per_rank, num_gpus=cfg.gpus_per_rank,
                                                max_restarts=0)
        threads = max(1, int(cfg.cpus_per_rank))
        self.call_timeout_s = recipe.ray.call_timeout_s
        self.ranks: list[Any] = []
        self.nodes: list[str] = []
        try:
            placement = recipe.ray.placement_timeout_s
            started = start_actors(lambda r: actor.remote(data, r, cfg.ranks, threads), cfg.ranks,
                                   {"CPU": cfg.cpus_per_rank, "GPU": cfg.gpus_per_rank}, placement,
                                   self.call_timeout_s)
            self.ranks = [got[0] for got in started if not isinstance(got, ActorLost)]
            self.nodes = [got[1] for got in started if not isinstance(got, ActorLost)]
            for r, got in enumerate(started):
                if isinstance(got, ActorLost):
                    waited = f" (waited {placement:g} s)" if isinstance(got, Unplaced) else ""
                    raise ClusterError(f"learner rank {r} could not be started: {got}{waited}")
            master = self._get(self.ranks[0].address.remote(), "rendezvous")
            # put once, passed by reference: an argument given to each rank's call would be stored once per rank
            state = ray.put(pack_state(policy.state_dict()))
            ref_state = (ray.put(pack_state(reference.model.state_dict()))
                         if reference is not None and cfg.lora is None else None)
            self._all([r.setup.remote(master, state, ref_state, policy.version) for r in self.ranks], "set-up")
        except BaseException:
            self.close()
            raise

    def _lost(self, rank: int, what: str, why: str) -> ClusterError:
        self.close()
        return ClusterError(f"learner rank {rank} was lost during the {what} ({why}); the {what} was abandoned and "
                            f"the ranks stopped")

    def _get(self, ref: Any, what: str) -> Any:
        """Rank 0's answer within ``ray.call_timeout_s``, or a one-line stop."""
        try:
            return get_within(ref, self.call_timeout_s, what)
        except ActorLost as e:
            raise self._lost(0, what, str(e)) from None

    def _dead_rank(self) -> int | None:
        """The first rank whose node Ray has marked dead, if any."""
        import ray

        dead = {n["NodeID"] for n in ray.nodes() if not n.get("Alive", True)}
        return next((r for r, node in enumerate(self.nodes) if node in dead), None)

    def _all(self, refs: list[Any], what: str) -> list[Any]:
        """Every rank's answer to one call they make together (step, set-up, save, load), or a one-line stop.

        A rank lost with its node leaves the others blocked in a collective until it fails on the closed
        socket or after ``ray.collective_timeout_s``, and Ray fails the lost rank's own call once it marks
        the node dead, often some seconds later.  So when a rank fails for another reason, its peers get
        up to a minute to show whether a rank was lost or hangs: then a :class:`ClusterError` (continue from
        the last checkpoint); if every rank answered, the rank's own error propagates unchanged (a bug).
        """
        import ray

        pending, results = {ref: r for r, ref in enumerate(refs)}, [None] * len(refs)
        first: BaseException | None = None
        grace = float("inf")
        while pending and time.monotonic() < grace:
            done, _ = ray.wait(list(pending), num_returns=1, timeout=1.0)
            for ref in done:
                r = pending.pop(ref)
                try:
                    results[r] = ray.get(ref, timeout=self.call_timeout_s)  # ready: returns at once
                except Exception as e:
                    if actor_died(e):
                        raise self._lost(r, what, first_line(e)) from None
                    if first is None:
                        first, grace = e, time.monotonic() + min(self.call_timeout_s, 60.0)
            if first is not None and (dead := self._dead_rank()) is not None:
                raise self._lost(dead, what, "its node is dead") from None
        if first is not None:
            self.close()
            if pending:  # a rank failed while another never answered: that one hangs or is cut off
                r = min(pending.values())
                raise ClusterError(f"learner rank {r} did not answer during the {what} while another rank failed "
                                   f"({first_line(first)}); the {what} was abandoned and the ranks stopped")
            raise first
        return results

    def step(self, items: list[Any]) -> dict[str, float]:
        import ray

        if not items:
            return {"learner/skipped_empty": 1.0}
        ref = ray.put(items)
        results = self._all([r.step.remote(ref) for r in self.ranks], "learner step")
        metrics = _merge([m for m, _ in results], [c for _, c in results])
        if "learner/loss" in metrics:
            update = self._get(self.ranks[0].weights.remote(trainable_only=True), "weight copy")
            self.policy.load_state_dict(unpack_state(update), partial=True)
        return metrics

    # the ranks' DeepSpeed checkpoints hold the trained weights; the mirror exports them
    saves_weights = True

    def export(self, folder: Path) -> None:
        """The mirror (rank 0's weights after every update) as a ``from_pretrained`` folder, LoRA merged."""
        if self.adapters is not None:
            self.adapters.export(str(folder))
        else:
            self.policy.save_pretrained(str(folder))

    def save(self, path: Path) -> None:
        self._all([r.save.remote(str(path)) for r in self.ranks], "checkpoint save")
        unseen = unseen_files(Path(path), self._all([r.files.remote(str(path)) for r in self.ranks], "checkpoint save"))
        if unseen:  # the checkpoint would be marked complete without them, and fail only at the resume
            rank, rel = unseen[0]
            raise ClusterError(f"learner rank {rank} (node {self.nodes[rank]}) wrote {rel} where the trainer cannot "
                               f"see it ({len(unseen)} file(s) in all): out_dir must be a folder every node shares; "
                               f"the checkpoint was not completed")

    def load(self, path: Path) -> None:
        ref_file = Path(path).parent / "reference.safetensors"
        self._all([r.load.remote(str(path), str(ref_file) if ref_file.is_file() else None) for r in self.ranks],
                  "checkpoint load")
        self.policy.load_state_dict(unpack_state(self._get(self.ranks[0].weights.remote(), "weight copy")))

    def close(self) -> None:
        kill_actors(self.ranks)
        self.ranks = []
        self._owns_ray = stop_ray(self._owns_ray)
