"""The GRPO learner: clipped token-level surrogate + KL to a frozen reference, on any optimiser driver.

Each epoch walks the rollout batch in mini-batches of ``micro_batch_size * grad_accum`` items
(``grad_accum: 0`` = the whole batch, one optimiser step per epoch), each accumulated over
micro-batches -- never one packed sequence.  Each micro-batch's loss is weighted by its share of the
mini-batch (tokens for ``token_mean``, rows otherwise) so the accumulated gradient equals the
mini-batch gradient for every loss aggregation.  A non-finite loss or gradient skips the step and
leaves weights, optimiser state and schedule untouched (counted in ``learner/nonfinite_skipped``).

The driver (:mod:`r3_rl.learner.optim`) is a plain torch AdamW by default; ``build_learner`` swaps
in DeepSpeed.  :class:`r3_rl.learner.ppo_learner.PPOLearner` overrides :meth:`TorchLearner._prepare`
and :meth:`TorchLearner._micro_loss` to add a critic.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

from r3_rl.algorithms.kl import kl_by_modality
from r3_rl.algorithms.losses import clipped_policy_loss
from r3_rl.learner.batch import TrainItem
from r3_rl.learner.optim import TorchOptim
from r3_rl.policy.base import Policy


def pad(rows: list[torch.Tensor], value: float = 0.0) -> torch.Tensor:
    return torch.nn.utils.rnn.pad_sequence(rows, batch_first=True, padding_value=value)


def micro_batch_inputs(policy: Policy, reference: Any, items: list[TrainItem], kl_text: float,
                       kl_image: float) -> dict[str, torch.Tensor | None]:
    """Current, old and reference log-probs ``[B, T]`` with mask, advantages and per-row KL weights."""
    segs = [it.segment for it in items]
    logp = pad(policy.segment_logprobs(segs))
    old = pad([torch.tensor(s.logprobs, dtype=torch.float32) for s in segs]).to(logp.device)
    mask = pad([torch.ones(len(s.token_ids)) for s in segs]).to(logp.device)
    use_kl = reference is not None and (kl_text > 0 or kl_image > 0)
    kl_coef = torch.tensor([(kl_image if s.modality == "image" else kl_text) if use_kl else 0.0 for s in segs],
                           device=logp.device)
    ref = None
    if use_kl:
        with torch.no_grad():
            ref = pad(reference.segment_logprobs(segs)).to(logp.device)
    adv = torch.tensor([it.advantage for it in items], dtype=torch.float32, device=logp.device)
    return {"logp": logp, "old_logp": old, "mask": mask, "advantages": adv, "ref_logp": ref, "kl_coef": kl_coef}


def reduce_metric(key: str, values: list[float]) -> float:
    """One value for a metric logged per micro-batch (or per rank): *min -> min, *max -> max, else the mean."""
    if key.endswith("min"):
        return min(values)
    if key.endswith("max"):
        return max(values)
    return sum(values) / len(values)


class TorchLearner:
    """GRPO updates of ``policy`` (KL to ``reference``; ``None`` = no KL) through an optimiser driver."""

    def __init__(self, policy: Policy, reference: Any, cfg: Any, optim: Any = None,
                 modules: dict[str, torch.nn.Module] | None = None) -> None:
        self.policy, self.reference, self.cfg = policy, reference, cfg
        self.modules = modules or {}  # extra trainable modules (PPO critic), checkpointed with the learner
        self.optim = optim if optim is not None else TorchOptim([policy.model, *self.modules.values()], cfg)
        self.skipped_steps = 0  # optimiser steps skipped for a non-finite loss or gradient
        self.updates = 0  # optimiser steps applied
        # data-parallel position (r3_rl.learner.ray_ranks): this rank takes every world-th micro-batch
        self.rank, self.world = 0, 1

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

    def _weight(self, items: list[TrainItem], chunk: range, mini: range) -> float:
        if self.cfg.loss_type == "token_mean":
            return (sum(len(items[i].segment.token_ids) for i in chunk)
                    / sum(len(items[i].segment.token_ids) for i in mini))
        return len(chunk) / len(mini)

    # ------------------------------------------------------------------ objective (PPO overrides these)
    def _prepare(self, items: list[TrainItem]) -> dict[str, Any]:
        """Per-batch quantities computed once before the epochs (GRPO: nothing beyond the items)."""
        return {}

    def _micro_loss(self, items: list[TrainItem], chunk: range, mini: range, max_len: int,
                    ctx: dict[str, Any]) -> tuple[torch.Tensor, dict[str, float], list[torch.Tensor]]:
        """Loss of micro-batch ``chunk`` weighted by its share of mini-batch ``mini``, its metrics, and its
        differentiable outputs."""
        cfg = self.cfg
        weight = self._weight(items, chunk, mini)
        inp = micro_batch_inputs(self.policy, self.reference, [items[i] for i in chunk], cfg.kl_coef_text,
                                 cfg.kl_coef_image)
        if "advantages" in ctx:  # computed per batch (PPO) rather than carried by the items
            inp["advantages"] = ctx["advantages"][chunk.start:chunk.stop].to(inp["logp"].device)
        loss, m = clipped_policy_loss(
            inp["logp"], inp["old_logp"], inp["advantages"], inp["mask"], clip_low=cfg.clip_low,
            clip_high=cfg.clip_high, loss_type=cfg.loss_type, max_len=max_len, ref_logp=inp["ref_logp"],
            kl_coef=inp["kl_coef"], kl_kind=cfg.kl_kind)
        metrics = {k: float(v) for k, v in m.items()}
        if inp["ref_logp"] is not None:  # KL per modality (text and image tokens weigh differently)
            metrics.update(kl_by_modality(inp["logp"], inp["ref_logp"], inp["mask"],
                                          [items[i].segment.modality for i in chunk], cfg.kl_kind))
        return loss * weight, metrics, [inp["logp"]]

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
        max_len = max(len(i.segment.token_ids) for i in items)
        ctx = self._prepare(items)
        sums: dict[str, list[float]] = {}
        losses: list[float] = []
        norms: list[float] = []
        skipped = 0
        for _ in range(cfg.epochs):
            for mini in self.minibatches(len(items)):
                step_sums: dict[str, list[float]] = {}
                total, finite = 0.0, True
                self.optim.zero_grad()  # never accumulate onto gradients left by anything else (e.g. warm start)
                for chunk, scale in self._my_chunks(mini):
                    loss, m, outputs = self.optim.forward(
                        lambda: self._micro_loss(items, chunk, mini, max_len, ctx))  # noqa: B023
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
        if losses:  # the trainer bumps the policy version only when the weights moved
            metrics["learner/loss"] = sum(losses) / len(losses)
            metrics["learner/grad_norm"] = sum(norms) / len(norms)
        if skipped:
            metrics["learner/nonfinite_skipped"] = float(skipped)
        metrics["learner/optimizer_steps"] = float(len(losses))
        metrics["learner/lr"] = self.optim.lr()
        return metrics

    # ------------------------------------------------------------------ persistence
    def state_dict(self) -> dict[str, Any]:
        # a DeepSpeed engine checkpoints the modules it wraps itself (and under ZeRO-3 only it can)
        own = getattr(self.optim, "kind", "torch") == "torch"
        return {"skipped_steps": self.skipped_steps, "updates": self.updates,
                "modules": {k: m.state_dict() for k, m in self.modules.items()} if own else {}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.skipped_steps = state.get("skipped_steps", 0)
        self.updates = state.get("updates", 0)
        for k, sd in state.get("modules", {}).items():
            self.modules[k].load_state_dict(sd)

    def save(self, path: Path) -> None:
        """Optimiser, schedule, counters and extra modules into directory ``path``."""
        path.mkdir(parents=True, exist_ok=True)
        torch.save(self.state_dict(), path / "learner.pt")
        self.optim.save(path)

    def load(self, path: Path) -> None:
        from r3_rl.learner.safe_load import safe_torch_load

        self.load_state_dict(safe_torch_load(path / "learner.pt"))
        self.optim.load(path)
