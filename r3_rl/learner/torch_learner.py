"""The learner: an algorithm's micro-batch losses turned into weight updates, on any optimiser driver.

Each epoch walks the rollout batch in mini-batches of ``micro_batch_size * grad_accum`` items
(``grad_accum: 0`` = the whole batch, one optimiser step per epoch), each accumulated over
micro-batches -- never one packed sequence.  The algorithm (:mod:`r3_rl.learner.algorithm`,
``learner.algorithm``) weights each micro-batch's loss by its share of the mini-batch, so the accumulated
gradient equals the mini-batch gradient.  A non-finite loss or gradient skips the step and leaves
weights, optimiser state and schedule untouched (counted in ``learner/nonfinite_skipped``).

The driver (:mod:`r3_rl.learner.optim`) is a plain torch AdamW by default; ``build_learner`` swaps
in DeepSpeed.  Checkpoints go through :meth:`TorchLearner.save` / :meth:`TorchLearner.load` (optimiser,
schedule, counters, the algorithm's modules) and :meth:`TorchLearner.export` (the loadable policy folder).
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

from r3_rl.errors import UserError
from r3_rl.learner.actions import uses_kl
from r3_rl.learner.algorithm import Algorithm, LearnerModels
from r3_rl.learner.batch import TrainItem, shuffled_by_group
from r3_rl.learner.frozen import check_loaded_keys, frozen_names
from r3_rl.learner.optim import TorchOptim
from r3_rl.policy.base import Policy


def reduce_metric(key: str, values: list[float]) -> float:
    """One value for a metric logged per micro-batch (or per rank): *min -> min, *max -> max, else the mean."""
    if key.endswith("min"):
        return min(values)
    if key.endswith("max"):
        return max(values)
    return sum(values) / len(values)


class TorchLearner:
    """Updates of ``policy`` (KL to ``reference``; ``None`` = no KL) by ``algorithm`` through an optimiser driver.

    ``algorithm`` defaults to the one ``cfg.algorithm`` names; ``modules`` to the algorithm's own
    (:meth:`Algorithm.modules`; pass them when the driver was built around them).  ``adapters`` are the LoRA
    adapters when only they train (:mod:`r3_rl.learner.lora`): the export then merges them.
    """

    def __init__(self, policy: Policy, reference: Any, cfg: Any, optim: Any = None,
                 modules: dict[str, torch.nn.Module] | None = None, algorithm: Algorithm | None = None,
                 adapters: Any = None, replay: Any = None) -> None:
        if algorithm is None:
            from r3_rl.config import Recipe
            from r3_rl.learner.registry import load_algorithm

            algorithm = load_algorithm(Recipe(learner=cfg))
        self.policy, self.reference, self.cfg, self.algorithm = policy, reference, cfg, algorithm
        # extra trainable modules (a critic), checkpointed with the learner
        self.modules = modules if modules is not None else algorithm.modules(policy)
        self.adapters = adapters
        # learner.critic_replay: supervised critiques added to each optimiser step's loss (Policy.critique_replay)
        self.replay = replay if cfg.critic_replay.coef > 0 else None
        self.replay_draws = 0  # optimiser steps that drew rehearsal examples: the stream's position, checkpointed
        self.optim = optim if optim is not None else TorchOptim(
            [policy.model, *self.modules.values()], cfg, [None, *map(algorithm.module_lr, self.modules)])
        self.skipped_steps = 0  # optimiser steps skipped for a non-finite loss or gradient
        self.updates = 0  # optimiser steps applied
        # data-parallel position (r3_rl.learner.ray_ranks): this rank takes every world-th micro-batch
        self.rank, self.world = 0, 1
        self.metric_counts: dict[str, int] = {}  # the last step's micro-batches per logged mean

    @property
    def models(self) -> LearnerModels:
        """What the algorithm's learner side sees: policy, reference, its modules."""
        return LearnerModels(self.policy, self.reference, self.modules)

    # ------------------------------------------------------------------ batching
    def minibatches(self, n: int) -> list[range]:
        size = n if self.cfg.grad_accum == 0 else self.cfg.micro_batch_size * self.cfg.grad_accum
        return [range(s, min(s + size, n)) for s in range(0, n, size)]

    def _my_chunks(self, mini: range) -> list[tuple[range, float]]:
        """This rank's micro-batches of ``mini`` as (chunk, scale).

        One rank: every micro-batch, scale 1.  Several: every ``world``-th micro-batch; a rank with fewer
        than the others repeats its first chunk at scale 0, so every rank runs the same number of
        forward/backward passes (DeepSpeed's collectives must line up).  Losses stay weighted by their
        share of the whole mini-batch, so the ranks' gradients sum to the one-rank gradient.
        """
        mbs = self.cfg.micro_batch_size
        chunks = [range(s, min(s + mbs, mini.stop)) for s in range(mini.start, mini.stop, mbs)]
        if self.world == 1:
            return [(c, 1.0) for c in chunks]
        mine = chunks[self.rank::self.world]
        slots = -(-len(chunks) // self.world)
        filler = mine[0] if mine else chunks[0]
        return [(c, 1.0) for c in mine] + [(filler, 0.0)] * (slots - len(mine))

    def _set_train(self, train: bool) -> None:
        for m in (self.policy.model, *self.modules.values()):
            m.train(train)

    # ------------------------------------------------------------------ the update
    def step(self, items: list[TrainItem]) -> dict[str, float]:
        if not items:
            return {"learner/skipped_empty": 1.0}
        self._set_train(True)
        try:
            return self._step(items)
        finally:
            self._set_train(False)

    def _step(self, items: list[TrainItem]) -> dict[str, float]:
        cfg = self.cfg
        models = self.models
        if len(self.minibatches(len(items))) > 1:  # several optimiser steps: each a mix of stages and groups
            # the same order on every rank and on a resume: seeded by what every rank knows of the batch
            items = shuffled_by_group(items, f"{max(it.policy_version for it in items)}/{len(items)}")
        self._set_train(False)  # old log-probs and values as sampled: no dropout draw (LoRA dropout, a plug-in's)
        # what the step's micro-batches need is computed for this rank's only (4 ranks: a quarter of the batch each)
        models.chunks = [c for mini in self.minibatches(len(items)) for c, _ in self._my_chunks(mini)]
        try:
            ctx = self.algorithm.prepare(models, items)
        finally:
            self._set_train(True)
        sums: dict[str, list[float]] = {}
        losses: list[float] = []
        norms: list[float] = []
        skipped = 0
        for _ in range(cfg.epochs):
            for mini in self.minibatches(len(items)):
                step_sums: dict[str, list[float]] = {}
                total, finite = 0.0, True
                self.optim.zero_grad()  # never accumulate onto gradients left by anything else (e.g. warm start)
                rehearse = self._draw_rehearsal()
                for n_chunk, (chunk, scale) in enumerate(self._my_chunks(mini)):
                    extra = rehearse if n_chunk == 0 else None  # once per optimiser step, on every rank
                    loss, m, outputs = self.optim.forward(
                        lambda: self._loss(models, items, chunk, mini, ctx, extra))  # noqa: B023
                    value = float(loss.detach()) * scale
                    if not math.isfinite(value):
                        finite = False
                        if self.world == 1:
                            self.optim.discard(outputs)
                            break
                        # several ranks: stay in lockstep; a NaN gradient makes every rank skip the step
                        loss = sum((o.float() * math.nan).sum() for o in outputs if o.requires_grad)
                    self.optim.backward(loss * (scale * self.world))  # DeepSpeed averages over ranks
                    if scale and finite:
                        total += value
                        for k, v in m.items():
                            step_sums.setdefault(k, []).append(v)
                # several ranks always step together; the NaN gradient makes DeepSpeed skip it on every rank
                applied, norm = self.optim.step() if finite or self.world > 1 else (False, math.nan)
                applied = applied and finite
                if not applied:
                    skipped += 1
                    continue
                self.updates += 1
                losses.append(total)
                norms.append(norm)
                for k, v in step_sums.items():
                    sums.setdefault(k, []).extend(v)
        self.skipped_steps += skipped
        metrics = {f"learner/{k}": reduce_metric(k, v) for k, v in sums.items()}
        # how many micro-batches each of those means is over: ranks' means are merged weighted by them
        self.metric_counts = {f"learner/{k}": len(v) for k, v in sums.items()}
        if losses:  # the trainer bumps the policy version only when the weights moved
            metrics["learner/loss"] = sum(losses) / len(losses)
            metrics["learner/grad_norm"] = sum(norms) / len(norms)
        if skipped:
            metrics["learner/nonfinite_skipped"] = float(skipped)
        metrics["learner/optimizer_steps"] = float(len(losses))
        metrics["learner/lr"] = self.optim.lr()
        metrics.update(ctx.get("metrics", {}))
        self.metric_counts.update(ctx.get("metric_counts", {}))
        return metrics

    def _draw_rehearsal(self) -> Any:
        """This optimiser step's rehearsal (``learner.critic_replay``), or ``None`` when off."""
        if self.replay is None:
            return None
        self.replay_draws += 1
        return self.replay.examples(self.replay_draws - 1)

    def _loss(self, models: LearnerModels, items: list[TrainItem], chunk: range, mini: range, ctx: dict[str, Any],
              rehearse: Any) -> tuple[torch.Tensor, dict[str, float], list[torch.Tensor]]:
        """The algorithm's micro-batch loss, plus ``coef`` x the rehearsal's cross-entropy when given.  Every rank
        adds it divided by the rank count: the ranks' gradients sum to one ``coef`` x its gradient."""
        loss, metrics, outputs = self.algorithm.loss(models, items, chunk, mini, ctx)
        if rehearse is None:
            return loss, metrics, outputs
        ce = self.replay.loss(rehearse)
        metrics = {**metrics, "critic_replay_ce": float(ce.detach())}
        return loss + (self.cfg.critic_replay.coef / self.world) * ce, metrics, [*outputs, ce]

    # ------------------------------------------------------------------ persistence
    @property
    def saves_weights(self) -> bool:
        """Whether :meth:`save` holds the trained weights too: a DeepSpeed engine checkpoints the modules it
        wraps itself (and under ZeRO-3 only it can)."""
        return getattr(self.optim, "kind", "torch") != "torch"

    def export(self, folder: Path) -> None:
        """The policy as a folder ``from_pretrained`` loads: LoRA adapters merged, ZeRO-3 shards gathered."""
        with self.optim.gathered([self.policy.model]):
            if self.adapters is not None:
                self.adapters.export(str(folder))
            else:
                self.policy.save_pretrained(str(folder))

    def state_dict(self) -> dict[str, Any]:
        """Counters and, on the torch backend, the algorithm's modules -- what trains in them: a separate PPO
        critic under LoRA is a copy of the policy whose frozen base (14.8 GB at 7B) is the policy's, rebuilt from
        it on resume (:mod:`r3_rl.learner.frozen`)."""
        own = not self.saves_weights
        modules = {k: {n: t for n, t in m.state_dict().items() if n not in frozen_names(m)}
                   for k, m in self.modules.items()} if own else {}
        return {"skipped_steps": self.skipped_steps, "updates": self.updates, "replay_draws": self.replay_draws,
                "modules": modules}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.skipped_steps = state.get("skipped_steps", 0)
        self.updates = state.get("updates", 0)
        self.replay_draws = state.get("replay_draws", 0)
        for k, sd in state.get("modules", {}).items():  # older checkpoints hold the frozen weights too
            module = self.modules[k]
            missing, unexpected = module.load_state_dict(sd, strict=False)
            check_loaded_keys(missing, unexpected, frozen_names(module), f"learner.pt: module {k!r}")

    def save(self, path: Path) -> None:
        """Optimiser, schedule, counters and extra modules into directory ``path``."""
        path.mkdir(parents=True, exist_ok=True)
        torch.save(self.state_dict(), path / "learner.pt")
        self.optim.save(path)

    def load(self, path: Path) -> None:
        from r3_rl.learner.safe_load import safe_torch_load

        self.load_state_dict(safe_torch_load(path / "learner.pt"))
        self.optim.load(path)


def enable_checkpointing(policy: Policy, cfg: Any) -> None:
    """``learner.gradient_checkpointing``: recompute decoder activations in backward.  Call it before LoRA
    wraps the model; each learner rank enables its own."""
    if not cfg.gradient_checkpointing:
        return
    from r3_rl.policy.kv_cache import enable_gradient_checkpointing

    try:
        enable_gradient_checkpointing(policy.model)
    except ValueError as e:
        raise UserError(f"learner.gradient_checkpointing: {e}") from None


def learner_from_recipe(policy: Policy, reference: Any, recipe: Any, algorithm: Algorithm | None = None,
                        adapters: Any = None) -> TorchLearner:
    """The in-process learner for ``recipe.learner``: LoRA adapters injected into ``policy`` (the reference is
    then the base model with adapters off), the algorithm's modules, the optimiser driver (``learner.backend``).
    ``adapters``: LoRA adapters the caller injected already (a learner rank, before it loads the weights)."""
    from r3_rl.learner.registry import load_algorithm

    cfg = recipe.learner
    algorithm = algorithm if algorithm is not None else load_algorithm(recipe)
    if adapters is None:  # a caller that injected adapters enabled checkpointing before (it must precede LoRA)
        enable_checkpointing(policy, cfg)
    if adapters is None and cfg.lora is not None:
        from r3_rl.learner.lora import adapters_in_base_dtype, apply_lora

        adapters = apply_lora(policy, cfg.lora, adapters_in_base_dtype(cfg))
        reference = adapters.reference() if uses_kl(cfg) else None
    modules = algorithm.modules(policy)
    optim = None
    if cfg.backend == "deepspeed":
        from r3_rl.learner.deepspeed_learner import DeepSpeedOptim

        optim = DeepSpeedOptim({"policy": policy.model, **modules}, cfg, {n: algorithm.module_lr(n) for n in modules})
    replay = policy.critique_replay(recipe) if cfg.critic_replay.coef > 0 else None
    return TorchLearner(policy, reference, cfg, optim, modules, algorithm, adapters, replay)
