"""Doctor check ``memory``: ``r3-rl plan``'s figures against what this machine has.

``r3-rl plan`` sizes a run for GPUs the user names (``--gpus``, ``--gpu-memory``) and cannot know the node's
memory; the doctor runs on the node, so it plans for the GPUs it sees and the node's physical memory:

* every GPU's share (a learner rank, a rollout worker, the trainer process) under 90% of the smallest visible
  GPU, as ``r3-rl plan`` judges it, with the plan's own advice when it does not fit;
* the host memory the run holds beyond its processes (offloaded optimiser states, Ray's object store, the
  trainer's copies, parent buffer and eval chains) within the node's physical memory;
* a local Ray's object store large enough for what the plan puts in it.  Unless Ray is started by hand it gets
  30% of the node's memory, at most 200 GB and at most the shared memory ``/dev/shm`` has (but not less than
  10 GB): Ray 2.x's ``resolve_object_store_memory``, re-stated here rather than imported from Ray's private
  modules.  A store that is too small does not fail at once: Ray spills objects to disk and weight syncs crawl.

Without the policy's shape (a local folder not there yet) the check is skipped: the ``weights`` check says why.
With ``ray.address`` the host figures belong to several nodes and are left to ``r3-rl plan``.
"""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from r3_rl.doctor.base import Context, Finding, ok, problem, skipped

RAY_DEFAULT_STORE_FRACTION = 0.3  # ray.init's object_store_memory default: 30% of the node's memory ...
RAY_DEFAULT_STORE_CAP = 200e9  # ... capped at 200 GB (ray_constants.DEFAULT_OBJECT_STORE_MAX_MEMORY_BYTES) ...
RAY_SHM_FLOOR = 10e9  # ... and at /dev/shm's free space, but never below 10 GB (REQUIRE_SHM_SIZE_THRESHOLD)


def ray_default_store(total: int, shm: Path = Path("/dev/shm")) -> float:
    """The object store a local Ray started without ``object_store_memory`` gets on a node of ``total`` bytes."""
    cap = RAY_DEFAULT_STORE_CAP
    try:
        # Ray reads the space free now (statvfs f_bavail: a /dev/shm already half used by another job counts half)
        cap = min(cap, max(RAY_SHM_FLOOR, 0.95 * shutil.disk_usage(shm).free))
    except OSError:
        pass
    return min(RAY_DEFAULT_STORE_FRACTION * total, cap)


def check_memory(ctx: Context) -> list[Finding]:
    from r3_rl.doctor.gpu import needed_gpus_here
    from r3_rl.doctor.ray_check import uses_ray
    from r3_rl.errors import UserError
    from r3_rl.plan.render import advice
    from r3_rl.plan.report import GB, USABLE, make_plan

    recipe = ctx.recipe
    need, _ = needed_gpus_here(recipe)
    gpus = ctx.gpus() if need else []
    if len(gpus) < need:
        gpus = []  # too few: the gpus check says so, and a plan on them would only repeat it
    try:
        if gpus:
            memory_gb = min(g.total for g in gpus) / GB
            plan = make_plan(recipe, len(gpus), memory_gb)
        else:
            plan = make_plan(recipe, max(need, 1), 80.0)  # the host figures do not depend on the GPUs
    except (UserError, OSError, ValueError):
        return [skipped("needs the policy's shape (see weights)")]
    found = []
    if not need:
        found.append(skipped("GPU memory: the recipe puts nothing on a GPU of this machine"))
    elif not gpus:
        found.append(skipped(f"GPU memory: the recipe needs {need} GPU(s) here (see gpus)"))
    else:
        what, most = max(plan.gpu_totals(), key=lambda row: row[1])
        line = (f"GPU memory: the fullest GPU holds {what}, {most / GB:.1f} GB by `r3-rl plan`, against "
                f"{USABLE:.0%} of this machine's {memory_gb:.1f} GB GPUs")
        if plan.fits:
            found.append(ok(line))
        else:
            changes = advice(plan) if not plan.errors else plan.errors
            found.append(problem(line, "; ".join(changes[:2]) or "see `r3-rl plan` for what to change"))
    found += _host(recipe, plan.host, ctx.host_memory(), uses_ray(recipe))
    for f in found:
        f.check = "memory"
    return found


def _host(recipe: Any, host: dict[str, float], total: int, ray: bool) -> list[Finding]:
    from r3_rl.plan.report import GB  # lazily, as in check_memory: the plan imports the policies

    if recipe.ray.address:
        return [skipped(f"host memory: ray.address {recipe.ray.address} spreads the run over the cluster's nodes "
                        f"(`r3-rl plan` lists what each part needs)")]
    need = sum(host.values())
    if not need:
        return [ok(f"host memory: the run holds nothing beyond its processes' own; this machine has {total / GB:.1f} GB")]
    biggest = ", ".join(f"{k} {v / GB:.1f}" for k, v in sorted(host.items(), key=lambda kv: -kv[1])[:3])
    line = (f"host memory: the run holds {need / GB:.1f} GB beyond its processes' own"
            f"{f' ({biggest})' if biggest else ''}; this machine has {total / GB:.1f} GB")
    found = [problem(line, "a node with more memory, or what `r3-rl plan` lists: fewer learner.ranks, no "
                           "optimiser offload, a smaller tree.buffer_size or eval size")
             if need > total else ok(line)]
    store = host.get("Ray object store", 0.0)
    if ray and store:
        given = recipe.ray.object_store_gb
        has = given * GB if given is not None else ray_default_store(total)
        line = (f"Ray object store: the run keeps up to {store / GB:.1f} GB in it; a local Ray gets {has / GB:.1f} GB "
                + ("(ray.object_store_gb)" if given is not None else
                   "here (30% of the memory, at most 200 GB or what /dev/shm has free, never below 10 GB)"))
        found.append(ok(line) if store <= has else problem(
            line, f"--set ray.object_store_gb={-(-store * 1.25 // GB):.0f} (within the node's memory)"))
    return found
