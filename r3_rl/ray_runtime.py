"""The Ray runtime at the edge of the system: start or join it, kill our actors, stop what we started.

Rollout workers (:mod:`r3_rl.rollout.ray_engine`) and learner ranks (:mod:`r3_rl.learner.ray_ranks`)
share one Ray per run.  Whoever calls :func:`start_ray` first and gets ``True`` owns it and shuts it
down at the end; a Ray started by the caller (tests, notebooks) or a joined cluster is never stopped.
"""
from __future__ import annotations

import os
from typing import Any

from r3_rl.errors import UserError


def start_ray(ray_cfg: Any) -> bool:
    """Start (or join) Ray for ``ray_cfg`` (the recipe's ``ray`` section); True when this call started it."""
    import ray

    if ray.is_initialized():
        return False
    kw: dict[str, Any] = {"include_dashboard": False, "log_to_driver": ray_cfg.log_to_driver,
                          "configure_logging": False}
    if ray_cfg.address:
        kw["address"] = ray_cfg.address
    else:
        kw["num_cpus"] = ray_cfg.num_cpus or os.cpu_count() or 1
    try:
        ray.init(**kw)
    except (ConnectionError, RuntimeError, ValueError) as e:
        where = f"ray.address: cannot join {ray_cfg.address!r}" if ray_cfg.address else "ray: cannot start a local Ray"
        hint = ("start one with `ray start --head` or remove ray.address to start a local Ray"
                if "Authentication" not in f"{e} {e.__cause__}" else  # Ray >= 2.60 turns token auth on by itself
                "the cluster uses token authentication: set RAY_AUTH_MODE=token with its token in ~/.ray/auth_token")
        raise UserError(f"{where} ({str(e).splitlines()[0] if str(e) else type(e).__name__}); {hint}") from None
    return True


def cpu_state(state: dict[str, Any]) -> dict[str, Any]:
    """A state dict as detached CPU tensors: what goes through Ray's object store to other processes."""
    return {k: v.detach().to("cpu") for k, v in state.items()}


def stop_ray(owned: bool) -> bool:
    """Shut Ray down if ``owned`` (this run started it); returns the new ownership (always False)."""
    import ray

    if owned and ray.is_initialized():
        ray.shutdown()
    return False


def kill_actors(actors: list[Any]) -> None:
    """Kill actors without restart; ones already dead (or a Ray already down) are fine."""
    import ray

    if not ray.is_initialized():
        return
    for a in actors:
        try:
            ray.kill(a, no_restart=True)
        except Exception:  # already gone
            pass


def actor_died(e: BaseException) -> bool:
    """Whether a Ray error means the actor process is gone (and its work must be redone elsewhere)."""
    import ray.exceptions as rex

    return isinstance(e, (rex.RayActorError, getattr(rex, "ActorUnavailableError", rex.RayActorError)))
