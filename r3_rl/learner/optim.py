"""Optimiser drivers: what turns accumulated gradients into a weight update.

A learner (GRPO or PPO) computes micro-batch losses and hands them to a driver; the driver owns the
optimiser, the learning-rate schedule and gradient clipping, and it decides whether a step is applied.
:class:`TorchOptim` is a plain torch AdamW; :class:`r3_rl.learner.deepspeed_learner.DeepSpeedOptim`
is the same contract on a DeepSpeed engine.  Contract:

* ``forward(fn)`` runs a micro-batch's forward + loss ``fn() -> (loss, metrics, outputs)`` (DeepSpeed must see
  the forward: ZeRO bookkeeping happens in its forward and backward hooks);
* ``zero_grad()`` clears gradients before a mini-batch is accumulated;
* ``backward(loss)`` accumulates the gradient of an already-weighted micro-batch loss;
* ``step() -> (applied, grad_norm)`` clips and steps -- unless the gradient is non-finite, in which case
  the accumulated gradient is dropped and weights, optimiser state and schedule are left exactly as
  they were (``applied=False``);
* ``discard(outputs)`` drops the accumulated gradient without stepping (a non-finite loss was seen;
  ``outputs`` are differentiable outputs of the current graph, used by drivers that can only drop
  gradients through their own overflow path);
* ``save(dir)`` / ``load(dir)`` persist optimiser + schedule (+ fp32 master weights) for exact resume;
* ``gathered(modules)`` is a context in which the modules' full weights can be read (ZeRO-3 shards them).

Both drivers train a bf16 policy through fp32 master weights (:mod:`r3_rl.learner.precision`).
"""
from __future__ import annotations

import contextlib
import functools
import math
from pathlib import Path
from typing import Any, Callable, ContextManager

import torch

from r3_rl.learner.precision import MasterWeights, check_precision, compute_dtype


def warmup_lambda(warmup_steps: int, decay_steps: int = 0, final: float = 1.0) -> Callable[[int], float]:
    """Linear warm-up over ``warmup_steps`` optimiser steps, then constant (the reference's schedule) or, with
    ``decay_steps``, linear to ``final`` x lr at optimiser step ``decay_steps`` and constant after: the last
    updates are small, so where a run ends does not depend on the phase of a late oscillation."""
    warm = max(warmup_steps, 0)

    def factor(s: int) -> float:
        if warm and s + 1 < warm:
            return (s + 1) / warm
        if decay_steps <= warm:
            return 1.0
        return 1.0 - (1.0 - final) * min(1.0, max(0, s + 1 - warm) / (decay_steps - warm))
    return factor


def trainable(modules: list[torch.nn.Module], lrs: list[float | None] | None = None
              ) -> tuple[list[torch.nn.Parameter], list[float | None]]:
    """Trainable parameters of ``modules`` in order, each once (tied or shared weights: with the first module
    that holds them, so a PPO value head's shared trunk stays the policy's), and each one's learning rate
    (``lrs``, one per module; ``None``: ``learner.lr``)."""
    seen: set[int] = set()
    out, rates = [], []
    for m, lr in zip(modules, lrs or [None] * len(modules), strict=True):
        for p in m.parameters():
            if p.requires_grad and id(p) not in seen:
                seen.add(id(p))
                out.append(p)
                rates.append(lr)
    return out, rates


def make_adamw(params: list[torch.nn.Parameter], cfg: Any, lrs: list[float | None] | None = None, *,
               fused: bool = False) -> torch.optim.AdamW:
    """AdamW over ``params``; with ``lrs`` (one per parameter, ``None``: ``cfg.lr``) a parameter group per rate
    given, in first-seen order, kept apart even where a rate equals ``cfg.lr`` (a resume with another
    ``learner.lr`` then finds the same groups); the schedule scales every group alike.

    ``fused``: torch's one-kernel AdamW, for a step that runs on the CPU (DeepSpeed's optimiser offload): a ZeRO-2
    engine step 2.3x faster there than with the default per-tensor loop and within 7% of DeepSpeed's compiled
    ``DeepSpeedCPUAdam``, without the loop's transient copies (768 MB per 1e8 weights;
    ``benchmarks/offload_optimizer_step.py``).  Off elsewhere: its rounding differs from the default's in the
    last bit, and the drivers' steps are compared exactly."""
    groups: dict[float | None, list[torch.nn.Parameter]] = {}
    for p, lr in zip(params, lrs or [None] * len(params), strict=True):
        groups.setdefault(lr, []).append(p)
    return torch.optim.AdamW([{"params": ps, "lr": cfg.lr if lr is None else lr} for lr, ps in groups.items()],
                             lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay, fused=fused or None)


def resume_with_recipe_hyperparameters(optimizer: torch.optim.Optimizer, scheduler: Any,
                                       load: Callable[[], Any]) -> Any:
    """Run ``load`` (the optimiser's and schedule's saved state) and keep this run's hyperparameters.

    A saved optimiser brings back its ``param_groups`` -- learning rate, betas, weight decay, the fused flag -- and
    ``LambdaLR`` its ``base_lrs``, so a resume with a lowered ``learner.lr`` (rolling back after a divergence)
    went on at the saved rate.  Kept from the checkpoint: Adam's moments and step counts, the schedule's position;
    taken from the recipe: every group option, and the rate ``base x schedule(position)`` (the schedule's shape
    is the recipe's already: ``LambdaLR`` saves no plain function)."""
    fresh = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
    out = load()
    for group, options, factor in zip(optimizer.param_groups, fresh, scheduler.lr_lambdas, strict=True):
        group.update(options)
        group["lr"] = group["initial_lr"] * factor(scheduler.last_epoch)
    scheduler.base_lrs = [g["initial_lr"] for g in optimizer.param_groups]
    scheduler._last_lr = [g["lr"] for g in optimizer.param_groups]
    return out


class TorchOptim:
    """AdamW + linear warm-up + global-norm clipping, all in-process; bf16 weights step through fp32 masters."""

    kind = "torch"

    def __init__(self, modules: list[torch.nn.Module], cfg: Any, lrs: list[float | None] | None = None) -> None:
        """``lrs``: one learning rate per module (``None``: ``cfg.lr``; :meth:`Algorithm.module_lr`)."""
        self.cfg = cfg
        check_precision(compute_dtype(modules[0]), cfg)
        self._trainable, self._lrs = trainable(modules, lrs)
        if not self._trainable:
            raise ValueError("no trainable parameters")

    # built on first use, so a trainer that never trains (r3-rl eval / rollout) holds no fp32 copy of the model
    @functools.cached_property
    def masters(self) -> MasterWeights:
        return MasterWeights(self._trainable)

    @property
    def params(self) -> list[torch.nn.Parameter]:
        """What AdamW steps: the fp32 masters of bf16 weights, fp32 weights themselves."""
        return self.masters.params

    @functools.cached_property
    def _optimizer_and_schedule(self) -> tuple[torch.optim.AdamW, torch.optim.lr_scheduler.LambdaLR]:
        optimizer = make_adamw(self.params, self.cfg, self._lrs)  # the schedule sets the warm-up lr before a step
        return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_lambda(
            self.cfg.warmup_steps, self.cfg.lr_decay_steps, self.cfg.lr_final))

    @property
    def optimizer(self) -> torch.optim.AdamW:
        return self._optimizer_and_schedule[0]

    @property
    def scheduler(self) -> torch.optim.lr_scheduler.LambdaLR:
        return self._optimizer_and_schedule[1]

    def backward(self, loss: torch.Tensor) -> None:
        _ = self.masters  # its gradient hooks must be in place before the first backward
        loss.backward()

    def step(self) -> tuple[bool, float]:
        max_norm = self.cfg.grad_clip if self.cfg.grad_clip > 0 else math.inf
        norm = float(torch.nn.utils.clip_grad_norm_(self.params, max_norm))
        if not math.isfinite(norm):
            self.discard()
            return False, norm
        self.optimizer.step()
        self.masters.copy_to_model()
        self.scheduler.step()
        self.zero_grad()
        return True, norm

    def forward(self, fn: Callable[[], Any]) -> Any:
        return fn()

    def zero_grad(self) -> None:
        self.masters.zero_grad()

    def discard(self, outputs: list[torch.Tensor] | None = None) -> None:
        self.zero_grad()

    def lr(self) -> float:
        return float(self.scheduler.get_last_lr()[0])

    def gathered(self, modules: list[torch.nn.Module]) -> ContextManager[Any]:
        return contextlib.nullcontext()

    def for_sampling(self, modules: list[torch.nn.Module]) -> ContextManager[Any]:
        """Nothing to do: the torch backend's weights are whole (:meth:`DeepSpeedOptim.for_sampling`)."""
        return contextlib.nullcontext()

    def state_dict(self) -> dict[str, Any]:
        state = {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict()}
        if self.masters.active:
            state["master_weights"] = self.masters.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        def load() -> None:
            self.optimizer.load_state_dict(state["optimizer"])
            self.scheduler.load_state_dict(state["scheduler"])
        resume_with_recipe_hyperparameters(self.optimizer, self.scheduler, load)
        if self.masters.active:
            self.masters.load_state_dict(state["master_weights"])

    def save(self, path: Path) -> None:
        torch.save(self.state_dict(), path / "optimizer.pt")

    def load(self, path: Path) -> None:
        from r3_rl.learner.safe_load import safe_torch_load

        # read onto the CPU: the optimiser moves each moment to its weight's device, the masters copy in place (on
        # the GPU the saved state beside the live one would be a second set: 3 x 4 bytes a parameter)
        self.load_state_dict(safe_torch_load(path / "optimizer.pt", map_location="cpu"))
