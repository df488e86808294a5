"""Doctor check for Ray: the cluster at ``ray.address`` answers, and has the CPUs and GPUs that the recipe's
rollout workers, reward workers and learner ranks request.

Why it matters: Ray keeps an actor that asks for more than the cluster has *pending* forever, so a recipe
with eight 1-GPU ranks on a six-GPU cluster looks like a hung run, not an error.  Joining runs in a child
process with a timeout (``ray.init`` can block on an unreachable head), after a TCP probe that fails in
milliseconds when nothing listens.
"""
from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
from typing import Any

from r3_rl.doctor.base import Context, Finding, ok, problem, skipped
from r3_rl.gpu_layout import ActorKind, actor_gpus, actor_kinds

PROBE = """
import json, sys
import ray
ray.init(address=sys.argv[1], log_to_driver=False, configure_logging=False, logging_level="ERROR")
alive = [n for n in ray.nodes() if n.get("Alive")]
try:  # a private API: without it, the doctor checks the cluster's totals only
    from ray._private.state import available_resources_per_node
    per_node = [float(r.get("GPU", 0.0)) for r in available_resources_per_node().values()]
except Exception:
    per_node = None
print(json.dumps({"total": ray.cluster_resources(), "available": ray.available_resources(), "nodes": len(alive),
                  "free_gpus_per_node": per_node}))
ray.shutdown()
"""


def uses_ray(recipe: Any) -> bool:
    return recipe.rollout.backend == "ray" or recipe.learner.ranks > 1 or recipe.rollout.reward_workers > 0


def ray_demand(recipe: Any) -> tuple[dict[str, float], list[str]]:
    """CPUs and GPUs the run's Ray actors request (all alive at once), and where each comes from."""
    need = {"CPU": 0.0, "GPU": 0.0}
    why = []
    for kind in actor_kinds(recipe):
        if kind.count:
            need["CPU"] += kind.count * kind.cpus
            need["GPU"] += kind.count * kind.gpus
            why.append(f"{kind.key} {kind.count} x ({kind.cpus:g} CPU, {kind.gpus:g} GPU)")
    return need, why


def shortfall(need: dict[str, float], have: dict[str, float]) -> list[str]:
    """``"4 GPU requested, 2 free"`` for each resource the cluster lacks (float slack for fractional GPUs)."""
    return [f"{need[k]:g} {k} requested, {have.get(k, 0.0):g} free" for k in ("CPU", "GPU")
            if need[k] > have.get(k, 0.0) + 1e-6]


def unplaced_multi_gpu_actors(kinds: list[ActorKind], free_per_node: list[float]) -> list[str]:
    """The actors of ``kinds`` (:func:`gpu_layout.actor_kinds`) asking for more than one GPU that no node has
    room for: Ray puts all of one actor's GPUs on one node, so two 4-GPU ranks need two nodes with 4 free, and 8
    GPUs free as 4 + 2 + 2 hold one.  Placed largest first, each on the node with the least room that fits (best
    fit decreasing); one recipe key per actor left over.  Necessary, not sufficient: the 1-GPU actors Ray creates
    first may take a node's GPUs before a larger actor comes."""
    room = [math.floor(free + 1e-6) for free in free_per_node]
    wants = sorted(((math.ceil(share - 1e-9), key) for key, count, share, *_ in kinds if share > 1
                    for _ in range(count)), key=lambda w: -w[0])
    left: list[str] = []
    for n, key in wants:
        fits = [i for i, r in enumerate(room) if r >= n]
        if not fits:
            left.append(key)
            continue
        room[min(fits, key=room.__getitem__)] -= n
    return left


def host_port(address: str) -> tuple[str, int] | None:
    """``(host, port)`` of ``host:port`` or ``ray://host:port``; None for ``auto`` and other forms."""
    rest = address.split("://", 1)[1] if "://" in address else address
    host, sep, port = rest.rpartition(":")
    return (host.strip("[]"), int(port)) if sep and host and port.isdigit() else None


def tcp_probe(host: str, port: int, timeout: float) -> str | None:
    """Why nothing answers at ``host:port`` (refused, timed out, unknown host), or None when it accepts."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return None
    except OSError as e:
        return f"{type(e).__name__}: {e.strerror or e}" if e.strerror else f"{type(e).__name__}: {e}"


def cluster_resources(address: str, timeout: float) -> dict[str, Any]:
    """``{"total", "available", "nodes"}`` of the Ray cluster at ``address``, read by a short-lived driver
    in a child process; :class:`RuntimeError` with one line when it cannot join within ``timeout`` s."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    try:
        res = subprocess.run([sys.executable, "-c", PROBE, address], capture_output=True, text=True,
                             timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"no answer from Ray at {address!r} within {timeout:g} s") from None
    if res.returncode != 0:
        lines = [ln for ln in res.stderr.strip().splitlines() if ln.strip()]
        errors = [ln for ln in lines if "Error" in ln.split(":")[0]]
        raise RuntimeError((errors or lines or [f"exit code {res.returncode}"])[-1].strip()[:300])
    return json.loads(res.stdout.strip().splitlines()[-1])


def check_ray(ctx: Context) -> Finding:
    recipe = ctx.recipe
    if not uses_ray(recipe):
        return skipped("the recipe uses no Ray (rollout.backend local, learner.ranks 1, no reward workers)")
    need, why = ray_demand(recipe)
    asks = f"the recipe requests {need['CPU']:g} CPU, {need['GPU']:g} GPU ({'; '.join(why)})"
    fix_size = "add nodes (`ray start --address=HEAD:6379` on each), or lower rollout.workers / learner.ranks"
    address = recipe.ray.address
    if not address:
        cpus = recipe.ray.num_cpus or os.cpu_count() or 1
        gpus = len(ctx.gpus())
        lacks = shortfall(need, {"CPU": float(cpus), "GPU": float(gpus)})
        where = f"a local Ray will start here with {cpus} CPU, {gpus} GPU"
        if lacks:
            return problem(f"{where}; {asks}: {', '.join(lacks)}",
                           "set ray.address to a cluster with room (`ray start --head` there), ray.num_cpus, or "
                           "lower rollout.workers / learner.ranks")
        return ok(f"{where}; {asks}")
    hp = host_port(address)
    if hp is not None:
        why_down = tcp_probe(*hp, timeout=ctx.timeout)
        if why_down:
            return problem(f"ray.address {address!r}: nothing answers ({why_down})",
                           "start the head node with `ray start --head --port=PORT` or correct ray.address")
    try:
        info = cluster_resources(address, ctx.ray_timeout)
    except RuntimeError as e:
        return problem(f"ray.address {address!r}: cannot join ({e})",
                       "check the cluster with `ray status`; the Ray and Python versions must match the cluster's")
    total, free = info["total"], info["available"]
    have = (f"cluster at {address}: {info['nodes']} node(s), {total.get('CPU', 0):g} CPU "
            f"({free.get('CPU', 0):g} free), {total.get('GPU', 0):g} GPU ({free.get('GPU', 0):g} free)")
    lacks = shortfall(need, free)
    packed = actor_gpus(recipe)  # each actor's GPU share sits on one GPU: three 0.6 shares need three GPUs
    if not lacks and packed > free.get("GPU", 0.0) + 1e-6:
        lacks = [f"the GPU shares pack onto {packed} whole GPUs (one actor's share never spans two), "
                 f"{free.get('GPU', 0.0):g} free"]
    per_node = info.get("free_gpus_per_node")
    if not lacks and per_node:
        left = unplaced_multi_gpu_actors(actor_kinds(recipe), per_node)
        if left:
            counts = ", ".join(f"{left.count(k)} of {k}" for k in dict.fromkeys(left))
            lacks = [f"{counts} fit on no node (one actor's GPUs sit on one node; GPUs free per node: "
                     f"{', '.join(f'{g:g}' for g in sorted(per_node, reverse=True))})"]
    if lacks:
        return problem(f"{have}; {asks}: {', '.join(lacks)} (pending actors would wait forever)", fix_size)
    return ok(f"{have}; {asks}")
