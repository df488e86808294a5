"""Training precision: the dtype weights compute in, and the fp32 master weights behind them.

``policy.dtype`` is the compute dtype of rollout and learner alike.  A bf16 policy trains with fp32
master weights and fp32 optimiser state in both backends -- the torch backend through
:class:`MasterWeights` here, DeepSpeed through its bf16 optimiser with fp32 gradient accumulation --
because AdamW applied to bf16 weights directly drops most RL-sized updates: a 5e-6 step is below half
a bf16 ulp of a weight of 0.02 (ulp 1.2e-4), so on main 10 such steps changed 7.5% of a 2048x2048
layer (``tests/test_precision.py`` measures both).  The bf16 weights the forward uses are the masters
rounded after every step, so they move once the masters have moved by half an ulp.

Combinations the learner cannot honour stop with one line (:func:`check_precision`) before any model
is loaded: float16 (it would need loss scaling), a ``learner.deepspeed.dtype`` that disagrees with
``policy.dtype``, and DeepSpeed ZeRO-0 in bf16 (DeepSpeed would accumulate gradients in bf16 there).
"""
from __future__ import annotations

import weakref
from typing import Any

import torch

from r3_rl.errors import UserError
from r3_rl.policy.base import DTYPES

_DS_NAME = {torch.float32: "fp32", torch.bfloat16: "bf16"}
_POLICY_NAME = {v: k for k, v in DTYPES.items()}


def compute_dtype(module: torch.nn.Module) -> torch.dtype:
    """The dtype a module computes in: that of most of its floating-point parameters (fp32 LoRA adapters on a
    bf16 model leave it bf16)."""
    counts: dict[torch.dtype, int] = {}
    for p in module.parameters():
        if p.is_floating_point():
            counts[p.dtype] = counts.get(p.dtype, 0) + p.numel()
    return max(counts, key=counts.__getitem__) if counts else torch.float32


def check_precision(dtype: torch.dtype, cfg: Any) -> str:
    """DeepSpeed's name (``fp32``/``bf16``) for a policy computing in ``dtype`` under ``learner`` settings ``cfg``;
    a :class:`UserError` for a combination that cannot train."""
    name = _POLICY_NAME.get(dtype, str(dtype))
    if dtype not in _DS_NAME:
        raise UserError(f"policy.dtype: {name} is not supported (training in it would need loss scaling); use "
                        f"bfloat16 (bf16 weights, fp32 master weights and optimiser state) or float32")
    ds_name = _DS_NAME[dtype]
    ds = cfg.deepspeed
    if ds.dtype is not None and ds.dtype != ds_name:
        raise UserError(f"learner.deepspeed.dtype: {ds.dtype} disagrees with policy.dtype: {name} (the compute "
                        f"dtype of rollout and learner); set learner.deepspeed.dtype: {ds_name} or leave it out")
    if cfg.backend == "deepspeed" and ds_name == "bf16" and ds.zero_stage == 0:
        raise UserError("learner.deepspeed.zero_stage: 0 with bf16 accumulates gradients in bf16; use zero_stage 1 "
                        "(fp32 master weights and gradient accumulation, no more memory than ZeRO-0 on one rank) "
                        "or 2-3")
    return ds_name


def check_recipe_precision(recipe: Any) -> None:
    """:func:`check_precision` on a recipe, before anything is loaded; under DeepSpeed its config too."""
    dtype = check_precision(DTYPES[recipe.policy.dtype], recipe.learner)
    if recipe.learner.backend == "deepspeed":
        from r3_rl.learner.deepspeed_config import check_ds_config

        check_ds_config(recipe.learner, dtype)


_HOOKS: dict[int, tuple[Any, Any]] = {}  # id(parameter) -> (weak reference to it, its master's gradient hook)


class MasterWeights:
    """fp32 master copies of a model's low-precision trainable parameters: what the optimiser updates.

    As soon as backward has produced a bf16 parameter's gradient, a post-accumulate hook adds it into its
    master's fp32 ``.grad`` and frees it, so micro-batches accumulate in fp32.  After each optimiser step
    :meth:`copy_to_model` rounds the masters into the model.  fp32 parameters are their own masters.
    The masters are the truth: weights loaded into the model behind the optimiser's back are overwritten at
    the next step (resume goes through :meth:`load_state_dict`).
    """

    def __init__(self, params: list[torch.nn.Parameter]) -> None:
        self.model_params = params
        self.params: list[torch.nn.Parameter] = []  # what the optimiser steps
        self._pairs: list[tuple[torch.nn.Parameter, torch.nn.Parameter]] = []
        for key in [k for k, (owner, _) in _HOOKS.items() if owner() is None]:  # parameters gone since
            del _HOOKS[key]
        for p in params:
            if p.dtype == torch.float32:
                self.params.append(p)
                continue
            master = torch.nn.Parameter(p.detach().float().clone())
            self.params.append(master)
            self._pairs.append((p, master))
            owner, old = _HOOKS.pop(id(p), (None, None))
            if old is not None and owner() is p:  # a newer optimiser of this parameter owns its gradients now
                old.remove()
            _HOOKS[id(p)] = (weakref.ref(p), p.register_post_accumulate_grad_hook(self._accumulate_into(master)))

    @staticmethod
    def _accumulate_into(master: torch.nn.Parameter) -> Any:
        def hook(p: torch.Tensor) -> None:
            grad = p.grad.float()
            if master.grad is None:
                master.grad = grad
            else:
                master.grad.add_(grad)
            p.grad = None
        return hook

    @property
    def active(self) -> bool:
        return bool(self._pairs)

    @torch.no_grad()
    def copy_to_model(self) -> None:
        for p, master in self._pairs:
            p.copy_(master)

    def zero_grad(self) -> None:
        for p in self.model_params:
            p.grad = None
        for p in self.params:
            p.grad = None

    def state_dict(self) -> list[torch.Tensor]:
        """The live fp32 masters (no copy: ``torch.save`` writes them synchronously; a clone cost a second set of
        masters on the GPU at every save, 29.6 GB for a 7B model)."""
        return [m.detach() for _, m in self._pairs]

    @torch.no_grad()
    def load_state_dict(self, state: list[torch.Tensor]) -> None:
        if len(state) != len(self._pairs):
            raise ValueError(f"{len(state)} master weights saved, {len(self._pairs)} expected")
        for (_, master), saved in zip(self._pairs, state):
            master.copy_(saved)
        self.copy_to_model()
