"""The in-process learner: GRPO updates with a plain torch AdamW.

One optimiser step per epoch over the whole rollout batch, accumulated over micro-batches (never one
packed sequence).  Each micro-batch's loss is weighted by its share of the batch so the accumulated
gradient equals the full-batch gradient for every loss aggregation.  A non-finite loss or gradient
skips the step and leaves weights and optimiser state untouched.
"""
from __future__ import annotations

import math
from typing import Any

import torch

from r3_rl.algorithms.losses import clipped_policy_loss
from r3_rl.learner.batch import TrainItem
from r3_rl.policy.base import Policy


def pad(rows: list[torch.Tensor], value: float = 0.0) -> torch.Tensor:
    return torch.nn.utils.rnn.pad_sequence(rows, batch_first=True, padding_value=value)


def micro_batch_inputs(policy: Policy, reference: Policy | None, items: list[TrainItem], kl_text: float,
                       kl_image: float) -> dict[str, torch.Tensor]:
    """Current, old and reference log-probs ``[B, T]`` with mask, advantages and per-row KL weights."""
    segs = [it.segment for it in items]
    logp = pad(policy.segment_logprobs(segs))
    old = pad([torch.tensor(s.logprobs, dtype=torch.float32) for s in segs])
    mask = pad([torch.ones(len(s.token_ids)) for s in segs])
    kl_coef = torch.tensor([kl_image if s.modality == "image" else kl_text for s in segs])
    ref = None
    if reference is not None and (kl_text > 0 or kl_image > 0):
        with torch.no_grad():
            ref = pad(reference.segment_logprobs(segs))
    adv = torch.tensor([it.advantage for it in items], dtype=torch.float32)
    return {"logp": logp, "old_logp": old, "mask": mask, "advantages": adv, "ref_logp": ref, "kl_coef": kl_coef}


class TorchLearner:
    def __init__(self, policy: Policy, reference: Policy | None, cfg: Any) -> None:
        self.policy, self.reference, self.cfg = policy, reference, cfg
        params = [p for p in policy.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(params, lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay)
        warm = max(cfg.warmup_steps, 0)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: min(1.0, (s + 1) / warm) if warm else 1.0)
        self.skipped_steps = 0

    def _weights(self, chunk: list[TrainItem], items: list[TrainItem]) -> float:
        if self.cfg.loss_type == "token_mean":
            return sum(len(i.segment.token_ids) for i in chunk) / sum(len(i.segment.token_ids) for i in items)
        return len(chunk) / len(items)

    def step(self, items: list[TrainItem]) -> dict[str, float]:
        if not items:
            return {"learner/skipped_empty": 1.0}
        cfg = self.cfg
        self.policy.model.train()
        max_len = max(len(i.segment.token_ids) for i in items)
        metrics: dict[str, float] = {}
        for _ in range(cfg.epochs):
            self.optimizer.zero_grad(set_to_none=True)
            sums: dict[str, list[float]] = {}
            total_loss = 0.0
            for start in range(0, len(items), cfg.micro_batch_size):
                chunk = items[start:start + cfg.micro_batch_size]
                inp = micro_batch_inputs(self.policy, self.reference, chunk, cfg.kl_coef_text, cfg.kl_coef_image)
                loss, m = clipped_policy_loss(
                    inp["logp"], inp["old_logp"], inp["advantages"], inp["mask"], clip_low=cfg.clip_low,
                    clip_high=cfg.clip_high, loss_type=cfg.loss_type, max_len=max_len, ref_logp=inp["ref_logp"],
                    kl_coef=inp["kl_coef"], kl_kind=cfg.kl_kind)
                w = self._weights(chunk, items)
                (loss * w).backward()
                total_loss += float(loss.detach()) * w
                for k, v in m.items():
                    sums.setdefault(k, []).append(float(v))
            grad_norm = torch.nn.utils.clip_grad_norm_(self.policy.model.parameters(), cfg.grad_clip)
            if not (math.isfinite(total_loss) and math.isfinite(float(grad_norm))):
                self.optimizer.zero_grad(set_to_none=True)
                self.skipped_steps += 1
                metrics["learner/nonfinite_skipped"] = metrics.get("learner/nonfinite_skipped", 0.0) + 1
                continue
            self.optimizer.step()
            self.scheduler.step()
            metrics.update({f"learner/{k}": (min(v) if k.endswith("min") else max(v) if k.endswith("max")
                                             else sum(v) / len(v)) for k, v in sums.items()})
            metrics["learner/loss"] = total_loss
            metrics["learner/grad_norm"] = float(grad_norm)
        metrics["learner/lr"] = self.scheduler.get_last_lr()[0]
        self.policy.model.eval()
        return metrics

    def state_dict(self) -> dict[str, Any]:
        return {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                "skipped_steps": self.skipped_steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.skipped_steps = state.get("skipped_steps", 0)
