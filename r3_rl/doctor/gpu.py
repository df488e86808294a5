"""Doctor checks that need a GPU: the GPUs the recipe asks for are visible (with their memory), NCCL can
all-reduce between them, and the recipe trains 2 steps on a random model of its shape.

On a machine without CUDA the GPU-running checks say ``skipped: no GPU``; a recipe that puts work on a GPU
of *this* machine (``policy.device: cuda``, or GPU actors on a local Ray) is then a problem, since it could
not start here.  The all-reduce and the 2-step training are plain functions that also run on CPU (gloo,
the tiny policy), which is how the tests cover them.
"""
from __future__ import annotations

import multiprocessing as mp
import queue
import tempfile
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

from r3_rl.doctor.base import Context, Finding, ok, problem, skipped
from r3_rl.doctor.devices import GIB, GpuInfo
from r3_rl.doctor.ray_check import uses_ray
from r3_rl.gpu_layout import actor_gpus

def describe(gpus: list[GpuInfo]) -> str:
    names = sorted({g.name for g in gpus})
    free = min(g.free for g in gpus) / GIB
    return (f"{len(gpus)} x {' / '.join(names)} ({max(g.total for g in gpus) / GIB:.1f} GiB; "
            f"least free {free:.1f} GiB)")


def needed_gpus_here(recipe: Any) -> tuple[int, list[str]]:
    """GPUs this machine must show: the trainer's ``policy.device``, plus the actors of a local Ray."""
    n, why = 0, []
    device = recipe.policy.device
    if device.startswith("cuda"):
        index = device.partition(":")[2]
        n = int(index) + 1 if index.isdigit() else 1
        why.append(f"policy.device {device}")
    if uses_ray(recipe) and not recipe.ray.address:
        gpus = actor_gpus(recipe)  # GPU shares packed as Ray places them, not their sum
        if gpus:
            n = max(n, gpus)
            why.append(f"{gpus} for Ray actors on a local Ray")
    return n, why


def check_gpus(ctx: Context) -> Finding:
    need, why = needed_gpus_here(ctx.recipe)
    gpus = ctx.gpus()
    if not gpus:
        if need:
            return problem(f"the recipe needs {need} GPU(s) on this machine ({'; '.join(why)}) but none is visible "
                           f"(torch.cuda.is_available() is False)",
                           "run on a GPU node (check `nvidia-smi` and CUDA_VISIBLE_DEVICES), or --set "
                           "policy.device=cpu for a CPU trial")
        return skipped("no GPU (the recipe needs none on this machine)")
    if len(gpus) < need:
        return problem(f"the recipe needs {need} GPU(s) here ({'; '.join(why)}) but {describe(gpus)} visible",
                       "use a node with more GPUs, set ray.address to a cluster, or lower learner.ranks / "
                       "rollout.workers")
    return ok(f"{describe(gpus)}; the recipe uses {need} here" + (f" ({'; '.join(why)})" if why else ""))


# ---------------------------------------------------------------------------------------------- all-reduce
def _all_reduce_rank(rank: int, world: int, port: int, backend: str, results: Any) -> None:
    """One rank: join the group, all-reduce ``rank + 1`` over 1 Mi floats, report whether the sum is right."""
    try:
        import torch
        import torch.distributed as dist

        dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                                timeout=timedelta(seconds=60))
        device = torch.device("cuda", rank) if backend == "nccl" else torch.device("cpu")
        if device.type == "cuda":
            torch.cuda.set_device(device)
        t = torch.full((1 << 20,), float(rank + 1), device=device)
        dist.all_reduce(t)
        expected = world * (world + 1) / 2
        right = bool((t == expected).all().item())
        dist.destroy_process_group()
        results.put((rank, None if right else f"rank {rank} got {t[0].item():g}, expected {expected:g}"))
    except Exception as e:  # noqa: BLE001 - reported to the parent as one line
        first = (str(e).strip().splitlines() or [""])[0]
        results.put((rank, f"rank {rank}: {type(e).__name__}: {first}"))


def all_reduce_check(world: int, backend: str = "nccl", timeout: float = 120.0) -> float:
    """All-reduce across ``world`` fresh processes (one per GPU with NCCL); seconds taken, or
    :class:`RuntimeError` naming the first rank that failed or did not answer within ``timeout``."""
    from r3_rl.learner.deepspeed_learner import free_port

    spawn = mp.get_context("spawn")
    results = spawn.Queue()
    port = free_port()
    t0 = time.perf_counter()
    procs = [spawn.Process(target=_all_reduce_rank, args=(r, world, port, backend, results), daemon=True)
             for r in range(world)]
    for p in procs:
        p.start()
    errors: dict[int, str | None] = {}
    try:
        while len(errors) < world:
            left = timeout - (time.perf_counter() - t0)
            try:
                rank, err = results.get(timeout=max(left, 0.01))
            except queue.Empty:
                missing = sorted(set(range(world)) - set(errors))
                raise RuntimeError(f"ranks {missing} did not finish within {timeout:g} s (a hang)") from None
            errors[rank] = err
    finally:
        for p in procs:
            p.join(timeout=5)
            if p.is_alive():
                p.kill()
    bad = [e for _, e in sorted(errors.items()) if e]
    if bad:
        raise RuntimeError(bad[0])
    return time.perf_counter() - t0


def check_nccl(ctx: Context) -> Finding:
    gpus = ctx.gpus()
    if not gpus:
        return skipped("no GPU")
    need, _ = needed_gpus_here(ctx.recipe)
    if not need:
        return skipped("the recipe puts nothing on this machine's GPUs")
    world = min(len(gpus), need)
    try:
        took = all_reduce_check(world, "nccl")
    except RuntimeError as e:
        return problem(f"NCCL all-reduce over {world} GPU(s) failed: {e}",
                       "rerun with NCCL_DEBUG=INFO; check the driver / CUDA / NCCL versions and NCCL_P2P_DISABLE / "
                       "NCCL_IB_DISABLE for this machine's interconnect")
    return ok(f"all-reduce over {world} GPU(s) correct ({took:.1f} s including start-up)")


# ---------------------------------------------------------------------------------------------- 2 steps
def check_train(ctx: Context) -> Finding:
    if not ctx.gpus():
        return skipped("no GPU")
    if ctx.problems:
        return skipped("fix the problems above first")
    from r3_rl.doctor.smoke import random_model_like, smoke_train

    recipe, facts = ctx.recipe, ctx.model()
    t0 = time.perf_counter()
    try:
        with tempfile.TemporaryDirectory(prefix="r3rl-doctor-", dir=recipe.out_dir if Path(recipe.out_dir).is_dir()
                                         else None) as tmp:
            model_dir = None
            if facts.folder is not None:
                device = recipe.policy.device if recipe.policy.device.startswith("cuda") else "cpu"
                model_dir = random_model_like(facts.folder, Path(tmp) / "model", 2, recipe.policy.dtype, device)
            steps = smoke_train(recipe, Path(tmp), model_dir)
    except Exception as e:  # noqa: BLE001 - out of memory, a CUDA error, a DeepSpeed config error: one line
        first = (str(e).strip().splitlines() or [""])[0]
        oom = "out of memory" in str(e).lower()
        return problem(f"2-step training failed: {type(e).__name__}: {first}",
                       "lower learner.micro_batch_size or tree.group_size (see `r3-rl plan`)" if oom else
                       "run `r3-rl train` with --set steps=2 to see the full error")
    losses = ", ".join(f"{s['learner/loss']:.3g}" for s in steps)
    return ok(f"2 steps on a random 2-layer model of the recipe's shape in {time.perf_counter() - t0:.0f} s "
              f"(losses {losses}; checkpoint written)")
