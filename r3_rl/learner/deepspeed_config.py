"""The DeepSpeed config a learner's engine is built from, and DeepSpeed's own check of it before any work.

Apart from :mod:`r3_rl.learner.deepspeed_learner` so that recipe validation (:mod:`r3_rl.learner.precision`)
can ask DeepSpeed about ``learner.deepspeed.config`` without importing the engine's module.
"""
from __future__ import annotations

import os
from typing import Any

import torch

from r3_rl.errors import UserError, raised


def ds_config(cfg: Any, world_size: int = 1, dtype: str = "fp32") -> dict[str, Any]:
    """The DeepSpeed config dict for ``learner`` settings ``cfg`` (``learner.deepspeed.config`` merged last);
    ``dtype`` (``fp32``/``bf16``) is the policy's, used when ``learner.deepspeed.dtype`` is left out."""
    d = cfg.deepspeed
    bf16 = (d.dtype or dtype) == "bf16"
    gas = max(cfg.grad_accum, 1)
    conf: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": cfg.micro_batch_size,
        "gradient_accumulation_steps": gas,
        "train_batch_size": cfg.micro_batch_size * gas * world_size,
        "gradient_clipping": cfg.grad_clip if cfg.grad_clip > 0 else 0.0,
        "managed_gradient_accumulation": False,
        "zero_optimization": {"stage": d.zero_stage},
        "bf16": {"enabled": bf16},
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 2 ** 31 - 1,
        "wall_clock_breakdown": False,
    }
    if bf16:  # micro-batches accumulate into fp32 gradients (DeepSpeed's default would be bf16) and ranks reduce
        # them in fp32 (DeepSpeed's default casts them to bf16 for the all-reduce, even on one rank; verl reduces
        # in fp32): twice the gradient traffic, the torch backend's update
        conf["data_types"] = {"grad_accum_dtype": "fp32"}
        conf["communication_data_type"] = "fp32"
    for key, value in d.config.items():
        if isinstance(value, dict) and isinstance(conf.get(key), dict):
            conf[key] = {**conf[key], **value}
        else:
            conf[key] = value
    return conf


def optimizer_offload(conf: dict[str, Any]) -> str:
    """Where a DeepSpeed config (``ds_config``'s dict, or ``learner.deepspeed.config`` alone) puts the optimiser
    step: ``none`` (on the accelerator), ``cpu`` or ``nvme`` (``offload_optimizer.device``; both step on the CPU)."""
    zero = conf.get("zero_optimization") or {}
    return str((zero.get("offload_optimizer") or {}).get("device") or "none")


class _Ranks:
    """What DeepSpeed's config asks of a model-parallel unit: the world size, without a process group."""

    def __init__(self, ranks: int) -> None:
        self.ranks = ranks

    def get_data_parallel_world_size(self) -> int:
        return self.ranks

    def get_model_parallel_world_size(self) -> int:
        return 1


def pick_accelerator() -> bool:
    """Set ``DS_ACCELERATOR=cpu`` unless a GPU is there and not opted out; must run before deepspeed is
    imported (it picks its accelerator then).  True when DeepSpeed runs on the GPU."""
    gpu = torch.cuda.is_available() and os.environ.get("DS_ACCELERATOR", "cuda") != "cpu"
    if not gpu:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    return gpu


def check_ds_config(cfg: Any, dtype: str) -> None:
    """DeepSpeed's own validation of the config :func:`ds_config` builds (``learner.deepspeed.config`` merged),
    run before any model loads: a ``zero_optimization: {stage: 9}`` was a traceback after the warm start."""
    pick_accelerator()
    from deepspeed.runtime.config import DeepSpeedConfig
    from pydantic import ValidationError

    try:
        # as one rank's engine sees it (DeepSpeed reads the world size from its process group, absent here;
        # the batch arithmetic is ours either way)
        checked = DeepSpeedConfig(ds_config(cfg, 1, dtype), mpu=_Ranks(1))
    except ValidationError as e:
        err = e.errors()[0]
        where = ".".join(str(x) for x in err["loc"])
        raise UserError(f"key 'learner.deepspeed.config': DeepSpeed refuses it: {e.title}.{where}: {err['msg']}, "
                        f"got {str(err.get('input'))[:40]}") from None
    except Exception as e:  # noqa: BLE001 - DeepSpeed's own asserts and errors, in one line
        raise UserError(f"key 'learner.deepspeed.config': DeepSpeed refuses it: {raised(e)}") from None
    if getattr(checked, "managed_gradient_accumulation", True) is not False:  # older DeepSpeed ignores the key
        import deepspeed

        raise UserError(f"learner.backend: deepspeed {deepspeed.__version__} would manage gradient accumulation "
                        f"itself (the learner accumulates micro-batches; such an engine keeps only the last one's "
                        f"gradient): install deepspeed>=0.19.8 and leave managed_gradient_accumulation out of "
                        f"learner.deepspeed.config")
    zero = checked.zero_config
    if checked.zero_optimization_stage < 2 and zero.overlap_comm:  # the engine asserts this after the model load
        raise UserError("key 'learner.deepspeed.config': zero_optimization.overlap_comm needs ZeRO stage 2 with the "
                        "learner's own gradient accumulation; set it false or use zero_stage: 2")
