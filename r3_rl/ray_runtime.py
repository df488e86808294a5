"""The Ray runtime at the edge of the system: start or join it, kill our actors, stop what we started.

Rollout workers (:mod:`r3_rl.rollout.ray_engine`) and learner ranks (:mod:`r3_rl.learner.ray_ranks`)
share one Ray per run.  Whoever calls :func:`start_ray` first and gets ``True`` owns it and shuts it
down at the end; a Ray started by the caller (tests, notebooks) or a joined cluster is never stopped.
"""
from __future__ import annotations

import os
from typing import Any

from r3_rl import interrupts
from r3_rl.errors import UserError


def start_ray(ray_cfg: Any, gpus: list[str] | None = None) -> bool:
    """Start (or join) Ray for ``ray_cfg`` (the recipe's ``ray`` section); True when this call started it.

    ``gpus``: the GPU ids a local Ray may hand out (:func:`r3_rl.gpu_layout.gpus_for_local_ray`: all but the
    trainer's); Ray reads them from ``CUDA_VISIBLE_DEVICES`` as it starts, which is set for that moment only."""
    import ray

    if ray.is_initialized():
        return False
    kw: dict[str, Any] = {"include_dashboard": False, "log_to_driver": ray_cfg.log_to_driver,
                          "configure_logging": False}
    restrict = gpus is not None and not ray_cfg.address  # a joined cluster keeps what `ray start` gave it
    if ray_cfg.address:
        kw["address"] = ray_cfg.address
    else:
        kw["num_cpus"] = ray_cfg.num_cpus or os.cpu_count() or 1
        if ray_cfg.object_store_gb is not None:
            kw["object_store_memory"] = int(ray_cfg.object_store_gb * 1e9)
    before = os.environ.get("CUDA_VISIBLE_DEVICES")
    try:
        if restrict:
            kw["num_gpus"] = len(gpus or [])
            os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(gpus or [])
        ray.init(**kw)
        interrupts.reclaim()  # ray.init's SIGTERM handler aborts without clean-up: Ctrl-C's path is ours again
    except (ConnectionError, RuntimeError, ValueError) as e:
        where = f"ray.address: cannot join {ray_cfg.address!r}" if ray_cfg.address else "ray: cannot start a local Ray"
        hint = ("start one with `ray start --head` or remove ray.address to start a local Ray"
                if "Authentication" not in f"{e} {e.__cause__}" else  # Ray >= 2.60 turns token auth on by itself
                "the cluster uses token authentication: set RAY_AUTH_MODE=token with its token in ~/.ray/auth_token")
        raise UserError(f"{where} ({str(e).splitlines()[0] if str(e) else type(e).__name__}); {hint}") from None
    finally:
        if restrict:  # the trainer's own view of its GPUs is unchanged
            if before is None:
                os.environ.pop("CUDA_VISIBLE_DEVICES", None)
            else:
                os.environ["CUDA_VISIBLE_DEVICES"] = before
    return True


# A state dict packed for Ray's object store: per entry (dtype name, shape, the bytes as a flat uint8 numpy array)
Packed = dict[str, tuple[str, tuple[int, ...], Any]]


def pack_state(state: dict[str, Any]) -> Packed:
    """A state dict as numpy bytes, for ``ray.put`` or an actor's return value.

    Ray stores numpy arrays and hands them back as views of its shared memory (pickle protocol 5's out-of-band
    buffers); torch tensors are pickled into private copies on both sides.  996 MB of bf16 weights to 2 workers
    (``benchmarks/weight_sync.py``, 2 cores, two runs): as pickled tensors they cost the driver 1.6-2.0 GB and each
    worker 1.1 GB of private memory, the put 1.4-1.8 s and the loads 2.6-3.2 s; as these bytes, no private memory
    beyond the driver's CPU copy of GPU tensors, 0.1-0.4 s and 0.2-0.3 s."""
    import torch

    out: Packed = {}
    for k, v in state.items():
        t = v.detach().to("cpu").contiguous()
        out[k] = (str(t.dtype).removeprefix("torch."), tuple(t.shape), t.reshape(-1).view(torch.uint8).numpy())
    return out


def unpack_state(packed: Packed) -> dict[str, Any]:
    """The tensors of :func:`pack_state`, as read-only views of the arrays (``load_state_dict`` copies them in)."""
    import warnings

    import torch

    out = {}
    for k, (dtype_name, shape, data) in packed.items():
        dtype = getattr(torch, dtype_name, None)
        if not isinstance(dtype, torch.dtype):
            raise ValueError(f"state entry {k!r}: {dtype_name!r} is not a torch dtype")
        with warnings.catch_warnings():  # Ray's arrays are read-only; nothing writes to these views
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
            flat = torch.from_numpy(data) if data.size else torch.empty(0, dtype=torch.uint8)  # (numpy's stride 0)
            out[k] = flat.view(dtype).reshape(shape)
    return out


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
