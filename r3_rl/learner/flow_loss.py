"""The learner's loss on image actions made of denoising steps (flow-matching policies), next to the token loss.

A micro-batch is split by action kind (:func:`r3_rl.flow.action.is_flow_segment`): token segments (text, image
tokens, other continuous actions) keep the token loss; flow segments train here, with the recipe's
``learner.flow`` settings -- their own clip range (~1e-4: a step's log-prob is a mean over the latent), advantage
clip and ratio unit -- and the closed-form KL between the policy's and the reference's step Gaussians
(``kl_kind``, coefficient ``learner.kl_coef_image``).  ``learner.loss_weight_image`` (times the stage's
``learner.stage_weights``) multiplies the policy term, not the KL, so the R3 recipe is
``loss = 1.0 text + 2.0 image + 1e-3 image KL``.

Each kind is a mean over its own units within the mini-batch (tokens or rows per ``loss_type`` for tokens;
SDE steps or images per ``ratio_unit`` for flow), and the two means add: a micro-batch contributes its share of
each kind's units (:func:`flow_share`), so accumulated micro-batches give the mini-batch loss exactly.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from r3_rl.algorithms.flow_losses import flow_gaussian_kl, flow_policy_loss
from r3_rl.flow.action import StepScores, unconditional_without_gradient
from r3_rl.learner.batch import TrainItem, policy_weight


def flow_units(item: TrainItem, ratio_unit: str) -> int:
    """How many loss units a flow item contributes: its SDE steps (``step``) or one (``image``)."""
    return item.segment.num_actions if ratio_unit == "step" else 1


def flow_share(items: Sequence[TrainItem], chunk: Sequence[int], mini: Sequence[int], ratio_unit: str) -> float:
    """Weight of the flow rows ``chunk`` within the flow rows ``mini`` of a mini-batch (shares of units)."""
    total = sum(flow_units(items[i], ratio_unit) for i in mini)
    return sum(flow_units(items[i], ratio_unit) for i in chunk) / total if total else 0.0


def _rows(scores: list[StepScores], values: Sequence[float], dtype: torch.dtype,
          device: torch.device) -> torch.Tensor:
    """Each segment's value repeated over its recorded steps, ``[N]``."""
    return torch.cat([torch.full((s.logp.shape[0],), float(v), dtype=dtype, device=device)
                      for s, v in zip(scores, values)])


def flow_loss(policy: Any, reference: Any, items: Sequence[TrainItem], advantages: Sequence[float],
              cfg: Any, old_logps: Sequence[torch.Tensor] | None = None
              ) -> tuple[torch.Tensor, dict[str, float], list[torch.Tensor]]:
    """Loss of flow ``items`` (their ``advantages``) under learner settings ``cfg``: ``(loss, metrics, outputs)``.
    The ratio's old log-probs are the sampler's, or ``old_logps`` (``learner.old_logp: recompute``).

    The loss is ``loss_weight_image`` * the stage's ``learner.stage_weights`` * the clipped surrogate +
    ``kl_coef_image`` * the mean Gaussian KL, both means over the kept units of these items
    (:func:`~r3_rl.algorithms.flow_losses.flow_policy_loss`).
    """
    segs = [it.segment for it in items]
    with unconditional_without_gradient(cfg.flow.detach_uncond):
        scores = policy.denoising_scores(segs)
    logp = torch.cat([s.logp for s in scores])
    dev = logp.device
    if old_logps is None:
        old = torch.cat([torch.tensor(s.logprobs, dtype=logp.dtype) for s in segs]).to(dev)
    else:
        old = torch.cat([o.to(dev, logp.dtype) for o in old_logps])
    if old.shape != logp.shape:
        raise ValueError(f"flow loss: the policy rescored {logp.shape[0]} SDE steps but the segments recorded "
                         f"{old.shape[0]}")
    adv = _rows(scores, advantages, logp.dtype, dev)
    image = _rows(scores, range(len(scores)), torch.long, dev)
    kl = None
    f = cfg.flow
    if reference is not None and cfg.kl_coef_image > 0:
        with torch.no_grad():
            ref = reference.denoising_scores(segs)
        mean = torch.cat([s.mean for s in scores])
        mean_ref = torch.cat([s.mean for s in ref]).to(mean.device)
        std = torch.cat([s.std for s in scores]).to(mean.device).view(-1, *([1] * (mean.dim() - 1)))
        delta = torch.cat([s.delta for s in scores]).to(mean.device)
        kl = flow_gaussian_kl(mean, mean_ref, std, kind=f.kl_kind, delta=delta)
    weights = [policy_weight(cfg, it) for it in items]  # one per image: its modality's and its stage's
    weight = weights[0] if len(set(weights)) == 1 else _rows(scores, weights, logp.dtype, dev)
    loss, m = flow_policy_loss(logp, old, adv, clip_low=f.clip_low, clip_high=f.clip_high, adv_clip=f.adv_clip,
                               ratio_unit=f.ratio_unit, image=image, kl=kl,
                               kl_coef=cfg.kl_coef_image if kl is not None else 0.0,
                               policy_weight=weight)
    return loss, {f"flow_{k}": float(v) for k, v in m.items()}, [logp]
