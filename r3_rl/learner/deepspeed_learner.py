"""The DeepSpeed optimiser driver: the learner's update on a DeepSpeed engine (ZeRO 0-3, fp32/bf16).

Same contract as :class:`r3_rl.learner.optim.TorchOptim`, so GRPO and PPO run unchanged on it.  Why
each choice:

* **Caller-owned accumulation** (``managed_gradient_accumulation: false``): the learner decides how
  many micro-batches make an optimiser step (``learner.grad_accum``; 0 = the whole rollout batch,
  whose size varies from step to step) and weights each micro-batch loss itself, so DeepSpeed must
  neither count micro-steps nor divide by ``gradient_accumulation_steps`` (``scale_wrt_gas=False``).
* **A torch AdamW handed to DeepSpeed**, not DeepSpeed's fused Adam: no 40-60 s op compile, and the
  same update rule as the torch backend.  Under ``offload_optimizer`` it is torch's fused AdamW: its step on the
  CPU partition within 7% of DeepSpeed's compiled ``DeepSpeedCPUAdam`` (the default per-tensor loop: 2.3x slower).
* **Non-finite steps use DeepSpeed's own overflow path**: with ZeRO >= 1 or bf16 DeepSpeed drops a
  step whose gradient norm is inf/NaN (gradients cleared, optimiser and scheduler untouched) and
  reports it through ``was_step_applied()``.  A non-finite *loss* is routed into that path by
  back-propagating NaN through the micro-batch's outputs.  ZeRO-0 fp32 has no overflow check, so the
  gradients are checked here (on several ranks the decision is all-reduced), and it reports no gradient
  norm, so the driver clips there itself, in the optimiser's pre-step hook (after the engine's all-reduce).
* **bf16 = bf16 weights, fp32 master weights, fp32 optimiser state, fp32 gradient accumulation**: the engine
  runs in the policy's dtype (``policy.dtype``); for bf16 DeepSpeed's bf16 optimiser keeps the fp32 masters
  and ``data_types.grad_accum_dtype: fp32`` makes micro-batches accumulate in fp32 (ZeRO-0 cannot; it is
  refused in :func:`r3_rl.learner.precision.check_precision`).
* **One gradient order on every rank**: DeepSpeed reduces gradients in buckets, in the order backward
  produces them, and assumes every rank produces the same ones in the same order.  R3 ranks run different
  micro-batches (a text stage without image on one, an image stage with an image context on another), so
  on several ranks each micro-batch also adds a zero-weighted use of every trainable parameter, made
  *before* the real forward: autograd runs it last, so every parameter's gradient completes there, in
  the same order on every rank (:func:`gradient_anchor`).
* **CPU**: ``DS_ACCELERATOR=cpu`` and gloo; the single-process rendezvous variables are filled in
  when absent (rank 0 of 1 on a free local port).  GPU runs use NCCL.
"""
from __future__ import annotations

import contextlib
import math
import os
import socket
from pathlib import Path
from typing import Any, Callable, ContextManager

import torch

from r3_rl.learner.deepspeed_config import ds_config, optimizer_offload, pick_accelerator
from r3_rl.learner.frozen import check_loaded_keys, check_same_frozen, frozen_fingerprint, frozen_names
from r3_rl.learner.optim import make_adamw, resume_with_recipe_hyperparameters, trainable, warmup_lambda
from r3_rl.learner.precision import check_precision, compute_dtype


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on ``host`` now (``""`` = every interface), for a process-group rendezvous."""
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def ensure_dist_env() -> str:
    """Fill in the rendezvous variables of a single in-process rank; returns the comm backend to use."""
    gpu = pick_accelerator()
    for key, value in (("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0"), ("MASTER_ADDR", "127.0.0.1")):
        os.environ.setdefault(key, value)
    if "MASTER_PORT" not in os.environ:
        os.environ["MASTER_PORT"] = str(free_port())
    if "TORCH_EXTENSIONS_DIR" not in os.environ:  # the CPU shm comm op is compiled once, then cached here
        os.environ["TORCH_EXTENSIONS_DIR"] = str(Path.home() / ".cache" / "torch_extensions")
    return "nccl" if gpu else "gloo"


def gradient_anchor(params: list[torch.nn.Parameter]) -> torch.Tensor:
    """``0 * (one element of every parameter)``, to be made before the forward and added to its loss.

    Autograd runs the nodes of the earliest-made operations last, so every parameter's gradient then
    completes at the end of backward, in this fixed order, whatever the forward used (multi-rank DeepSpeed
    needs the same gradients in the same order on every rank)."""
    return torch.stack([p.reshape(-1)[0].float() for p in params]).sum() * 0.0


class _Closure(torch.nn.Module):
    """What the engine wraps: the trainable modules, and a forward that runs the learner's micro-batch closure.

    The learner computes log-probs through the policy's own methods, not through one ``module(x)`` call;
    routing that computation through ``engine(fn)`` still gives DeepSpeed its forward/backward hooks
    (without them ZeRO-3 silently loses gradients across micro-batches)."""

    def __init__(self, modules: dict[str, torch.nn.Module]) -> None:
        super().__init__()
        self.parts = torch.nn.ModuleDict(modules)

    def forward(self, fn: Callable[[], Any]) -> Any:
        return fn()


class DeepSpeedOptim:
    """AdamW + warm-up + clipping inside a DeepSpeed engine wrapping the policy (and any critic)."""

    kind = "deepspeed"

    def __init__(self, modules: dict[str, torch.nn.Module], cfg: Any, lrs: dict[str, float | None] | None = None
                 ) -> None:
        backend = ensure_dist_env()
        import deepspeed  # imported here: DS_ACCELERATOR must be set before deepspeed picks an accelerator

        if not torch.distributed.is_initialized():
            deepspeed.init_distributed(dist_backend=backend, verbose=False)
        self.cfg = cfg
        self.dtype = check_precision(compute_dtype(next(iter(modules.values()))), cfg)
        self.container = _Closure(modules)
        self.params, rates = trainable(list(modules.values()), [(lrs or {}).get(name) for name in modules])
        self.world_size = torch.distributed.get_world_size()
        self.manual_check = cfg.deepspeed.zero_stage == 0 and self.dtype == "fp32"
        config = ds_config(cfg, self.world_size, self.dtype)
        optimizer = make_adamw(self.params, cfg, rates, fused=optimizer_offload(config) != "none")
        self._clipped_norm = math.nan
        if self.manual_check:  # DeepSpeed's plain fp32 path clips but keeps no norm: the driver clips instead,
            config["gradient_clipping"] = 0.0  # inside the optimiser's step, after the engine's all-reduce
            optimizer.register_step_pre_hook(self._clip)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_lambda(cfg.warmup_steps, cfg.lr_decay_steps, cfg.lr_final))
        # read before ZeRO-3 partitions them: checkpoints leave the frozen weights (LoRA's base) out
        self.frozen_fingerprint = frozen_fingerprint(self.container)
        self.engine, _, _, _ = deepspeed.initialize(model=self.container, optimizer=optimizer,
                                                    lr_scheduler=scheduler, config=config)

    def _clip(self, *_: Any) -> None:
        """ZeRO-0 fp32: clip the reduced gradient as the torch driver does, and keep its norm for ``step``."""
        max_norm = self.cfg.grad_clip if self.cfg.grad_clip > 0 else math.inf
        self._clipped_norm = float(torch.nn.utils.clip_grad_norm_(self.params, max_norm))

    def _any_rank(self, flag: bool) -> bool:
        if self.world_size == 1:
            return flag
        t = torch.tensor([1.0 if flag else 0.0], device=self.engine.device)
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
        return bool(t.item() > 0)

    def forward(self, fn: Callable[[], Any]) -> Any:
        box: dict[str, Any] = {}

        def run() -> Any:
            anchor = gradient_anchor(self.params) if self.world_size > 1 else None  # made first: runs last
            loss, metrics, outputs = fn()
            box["metrics"] = metrics
            if anchor is None:
                return loss, outputs
            return loss + anchor, outputs + [anchor]  # a NaN-poisoned backward (see discard) keeps the order too
        loss, outputs = self.engine(run)
        return loss, box["metrics"], outputs

    def zero_grad(self) -> None:
        """Clear stale ``.grad`` left by code outside the engine (DeepSpeed's own buffers are reset by step)."""
        for p in self.params:
            p.grad = None

    def backward(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss, scale_wrt_gas=False)

    def step(self) -> tuple[bool, float]:
        if self.manual_check:
            bad = any(p.grad is not None and not bool(torch.isfinite(p.grad).all()) for p in self.params)
            if self._any_rank(bad):
                self.engine.zero_grad()
                return False, math.nan
        self.engine.step()
        norm = self._clipped_norm if self.manual_check else self.engine.get_global_grad_norm()
        norm = math.nan if norm is None else float(norm)
        return bool(self.engine.was_step_applied()), norm

    def discard(self, outputs: list[torch.Tensor] | None = None) -> None:
        """Drop the accumulated gradient: NaN through ``outputs`` makes DeepSpeed skip the step cleanly."""
        if self.manual_check:
            self.engine.zero_grad()
            return
        live = [o for o in outputs or [] if o.requires_grad]
        if not live:
            raise RuntimeError("DeepSpeedOptim.discard needs a differentiable output of the current micro-batch")
        poison = sum((o.float() * math.nan).sum() for o in live)
        self.engine.backward(poison, scale_wrt_gas=False)
        self.engine.step()
        if self.engine.was_step_applied():  # would be a DeepSpeed regression: weights just took a NaN step
            raise RuntimeError("DeepSpeed applied a step with NaN gradients; refusing to continue")

    def lr(self) -> float:
        return float(self.engine.get_lr()[0])

    def gathered(self, modules: list[torch.nn.Module]) -> ContextManager[Any]:
        """Under ZeRO-3 each rank holds a shard of every weight: gather them (read-only) for an export."""
        if self.engine.zero_optimization_stage() != 3:
            return contextlib.nullcontext()
        import deepspeed

        return deepspeed.zero.GatheredParameters([p for m in modules for p in m.parameters()], modifier_rank=None)

    def for_sampling(self, modules: list[torch.nn.Module]) -> ContextManager[Any]:
        """Sampling with ``modules`` in this process (the trainer's own rollout and evals) under ZeRO-3.

        ZeRO-3 hooks every submodule to fetch its shard before each call and release it after; sampling calls the
        model once per token, so a run's step spent its time in that bookkeeping -- 3.2x ZeRO-2's rollout time for
        the tiny recipe, and 13-33 s on one step after the first updates, where the hooks re-record their trace of
        module calls (``benchmarks/zero3_sampling.py``).  As TRL's ``unwrap_model_for_generation`` does, the
        weights are gathered once and the hooks removed for the duration, then put back (``trl.models.utils``).
        The whole policy is on the device meanwhile, as when it samples under ZeRO-2."""
        if self.engine.zero_optimization_stage() != 3:
            return contextlib.nullcontext()
        return _without_hooks(self.engine, self.gathered(modules))

    def save(self, path: Path) -> None:
        """DeepSpeed's checkpoint without the frozen weights (:mod:`r3_rl.learner.frozen`), their fingerprint in
        its client state."""
        self.engine.save_checkpoint(str(path / "deepspeed"), tag="state", save_latest=False,
                                    client_state={"frozen_fingerprint": self.frozen_fingerprint},
                                    exclude_frozen_parameters=self.frozen_fingerprint is not None)
        # DeepSpeed copies its recovery scripts beside the state; zero_to_fp32.py (zero_to_torch.py runs it)
        # unpickles whatever checkpoint it is pointed at (weights_only=False), and model/ holds the full weights
        for script in ("zero_to_fp32.py", "zero_to_torch.py"):
            (path / "deepspeed" / script).unlink(missing_ok=True)

    def load(self, path: Path) -> None:
        from r3_rl.learner.safe_load import make_deepspeed_loads_safe

        make_deepspeed_loads_safe(self.engine)  # DeepSpeed's own engine would torch.load(weights_only=False)
        inner = self.engine.optimizer
        adamw = getattr(inner, "optimizer", inner)  # ZeRO and BF16_Optimizer wrap the torch AdamW
        frozen = frozen_names(self.container)
        where = str(path / "deepspeed")

        def load_module(src: dict[str, Any], dst: torch.nn.Module) -> None:  # the frozen weights are not saved
            missing, unexpected = dst.load_state_dict(src, strict=False)
            check_loaded_keys(missing, unexpected, frozen, where)

        load_path, client = resume_with_recipe_hyperparameters(
            adamw, self.engine.lr_scheduler, lambda: self.engine.load_checkpoint(
                where, tag="state", load_optimizer_states=True, load_lr_scheduler_states=True,
                custom_load_fn=load_module))
        check_same_frozen((client or {}).get("frozen_fingerprint"), self.frozen_fingerprint, where)
        if hasattr(inner, "clip_grad"):  # ZeRO and BF16_Optimizer restore the saved clipping norm: the recipe's wins
            inner.clip_grad = self.engine.gradient_clipping()
        if load_path is None:
            raise FileNotFoundError(f"{path / 'deepspeed'}: no DeepSpeed state")


@contextlib.contextmanager
def _without_hooks(engine: Any, gathered: ContextManager[Any]) -> Any:
    from trl.models.utils import add_hooks, remove_hooks

    with gathered:
        remove_hooks(engine)
        try:
            yield
        finally:
            add_hooks(engine)
