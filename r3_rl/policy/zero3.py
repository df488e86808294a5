"""Reading a ZeRO-3-partitioned weight whole, where code reads ``module.weight`` instead of calling the module.

Under DeepSpeed ZeRO-3 (one learner rank: the trainer's own policy is the partitioned module) every parameter is
an empty shard outside DeepSpeed's hooks, which gather a module's weights only while that module is *called*.
Code that reads a weight directly -- transformers' Janus VQ quantizer reads ``embedding.weight.shape`` to
look codes up -- sees a tensor of shape ``(0,)``.  :func:`gathered` makes such a read see the full weight.
The trainer samples with every weight gathered already (``Trainer.sampling_weights``); this covers what runs
outside that, such as the parent buffer decoding a drawn parent's tokens.
"""
from __future__ import annotations

import contextlib
from typing import Any, ContextManager

import torch


def gathered(module: torch.nn.Module) -> ContextManager[Any]:
    """The full weights of ``module`` for reading inside the block (a no-op when nothing is partitioned, or when
    an outer gather -- the trainer's sampling context -- has them whole already: DeepSpeed refuses nested gathers
    of one parameter)."""
    params = [p for p in module.parameters() if hasattr(p, "ds_id")]
    if not params:
        return contextlib.nullcontext()
    import deepspeed
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    shards = [p for p in params if p.ds_status == ZeroParamStatus.NOT_AVAILABLE]
    return deepspeed.zero.GatheredParameters(shards, modifier_rank=None) if shards else contextlib.nullcontext()
