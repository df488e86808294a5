"""Per-action log-probabilities of a micro-batch, padded to ``[B, A]``: what every policy-gradient loss reads.

An action is whatever the policy sampled one log-prob for (a token, a denoising step, a latent); a segment
holds ``num_actions`` of them.  Nothing here knows what an action is: the policy recomputes the log-probs
(:meth:`~r3_rl.policy.base.Policy.segment_logprobs`) and the recorded ones come from the segment.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from r3_rl.learner.batch import TrainItem


def uses_kl(cfg: Any) -> bool:
    """Whether ``learner`` settings ``cfg`` penalise the KL to a reference at all."""
    return cfg.kl_coef_text > 0 or cfg.kl_coef_image > 0


def pad(rows: list[torch.Tensor], value: float = 0.0) -> torch.Tensor:
    return torch.nn.utils.rnn.pad_sequence(rows, batch_first=True, padding_value=value)


def max_actions(items: list[TrainItem]) -> int:
    """The most actions any item of ``items`` took (``dr_grpo``'s normaliser until session 35; kept for plug-ins)."""
    return max(it.segment.num_actions for it in items)


def most_actions(item: TrainItem, rollout: Any) -> int:
    """``dr_grpo``'s constant normaliser of ``item``: the most actions its stage can take -- a text stage's
    ``rollout.<stage>.max_new_tokens``, an image's own token count (a token image is always complete) -- so it
    does not change with what else the batch holds (TRL divides by ``max_completion_length``)."""
    stage = getattr(rollout, item.stage, None)
    most = getattr(stage, "max_new_tokens", None) if item.segment.modality == "text" else None
    return max(int(most or 0), item.segment.num_actions, 1)


def micro_share(items: list[TrainItem], chunk: Sequence[int], mini: Sequence[int], loss_type: str) -> float:
    """Weight of micro-batch ``chunk`` within mini-batch ``mini``: its share of actions for ``token_mean``, of
    rows otherwise, so the accumulated gradient equals the mini-batch gradient for every aggregation."""
    if loss_type == "token_mean":
        return (sum(items[i].segment.num_actions for i in chunk)
                / sum(items[i].segment.num_actions for i in mini))
    return len(chunk) / len(mini)


def micro_batch_inputs(policy: Any, reference: Any, items: list[TrainItem], kl_text: float,
                       kl_image: float, old_logps: list[torch.Tensor] | None = None) -> dict[str, torch.Tensor | None]:
    """Current, old and reference log-probs ``[B, A]`` with mask, advantages and per-row KL weights.  The old
    log-probs are the sampler's unless ``old_logps`` gives them (``learner.old_logp: recompute``)."""
    segs = [it.segment for it in items]
    logp = pad(policy.segment_logprobs(segs))
    if old_logps is None:
        old_logps = [torch.tensor(s.logprobs, dtype=torch.float32) for s in segs]
    old = pad([o.float() for o in old_logps]).to(logp.device)
    mask = pad([torch.ones(s.num_actions) for s in segs]).to(logp.device)
    use_kl = reference is not None and (kl_text > 0 or kl_image > 0)
    kl_coef = torch.tensor([(kl_image if s.modality == "image" else kl_text) if use_kl else 0.0 for s in segs],
                           device=logp.device)
    ref = None
    if use_kl:
        with torch.no_grad():
            ref = pad(reference.segment_logprobs(segs)).to(logp.device)
    adv = torch.tensor([it.advantage for it in items], dtype=torch.float32, device=logp.device)
    return {"logp": logp, "old_logp": old, "mask": mask, "advantages": adv, "ref_logp": ref, "kl_coef": kl_coef}


@torch.no_grad()
def recomputed_logprobs(policy: Any, items: list[TrainItem]) -> list[torch.Tensor]:
    """``items``' log-probs under the current weights by the training forward without gradient, as one batch:
    given one micro-batch's token rows, the padding (and so the numbers) are those of the update's forward."""
    if not items:
        return []
    return [lp.detach().float().cpu() for lp in policy.segment_logprobs([it.segment for it in items])]
