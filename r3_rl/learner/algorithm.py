"""The algorithm plug-in contract (``learner.algorithm``) and GRPO, the default.

An algorithm decides which sampled actions train, with which advantages, under which loss; the learner
around it (:class:`~r3_rl.learner.torch_learner.TorchLearner`: mini/micro-batches, epochs, optimiser driver,
non-finite skips, data-parallel ranks) is the same for all.  A new algorithm, or a GRPO variant, is one file:
a subclass of :class:`Algorithm` (usually of :class:`GRPO`, overriding one method) registered under a name
(:mod:`r3_rl.learner.registry`).  The two halves run in different places:

* driver side, where the scored trees are (no model): :meth:`Algorithm.batch` -- trees to train items;
* learner side, in every learner process: :meth:`Algorithm.modules` (extra trainable modules, e.g. a
  critic), :meth:`Algorithm.prepare` (per-batch quantities before the epochs) and :meth:`Algorithm.loss`
  (one micro-batch).

Nothing here assumes tokens: a loss reads per-action log-probs (:mod:`r3_rl.learner.actions`), and image actions
made of denoising steps train with their own clip range, weight and Gaussian KL (:mod:`r3_rl.learner.flow_loss`).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any

import torch

from r3_rl.algorithms.kl import kl_by_modality
from r3_rl.algorithms.losses import clipped_policy_loss, kept_tokens
from r3_rl.flow.action import is_flow_segment, unconditional_without_gradient
from r3_rl.learner.actions import micro_batch_inputs, micro_share, most_actions, recomputed_logprobs
from r3_rl.learner.batch import BatchStats, TrainItem, assign_advantages, collect_items, policy_weight
from r3_rl.learner.flow_loss import flow_loss, flow_share
from r3_rl.trajectory import Tree


@dataclass
class LearnerModels:
    """What an algorithm's learner side may use: the policy being trained, its KL reference (``None`` = no
    KL) and the algorithm's own trainable modules (built by :meth:`Algorithm.modules`)."""

    policy: Any
    reference: Any = None
    modules: dict[str, torch.nn.Module] = field(default_factory=dict)
    # the micro-batches of the coming step this learner runs (a rank: every world-th); None: all of them
    chunks: list[range] | None = None

    def own_chunks(self, n: int, micro_batch_size: int) -> list[range]:
        """What :meth:`Algorithm.prepare` computes per micro-batch for ``n`` items: :attr:`chunks`, or else every
        micro-batch of ``micro_batch_size``."""
        if self.chunks is not None:
            return self.chunks
        return [range(s, min(s + micro_batch_size, n)) for s in range(0, n, micro_batch_size)]


class Algorithm:
    """Base of every ``learner.algorithm``.  ``recipe`` is the whole recipe (``recipe.learner`` holds the
    shared learner settings).  A subclass with settings of its own takes them as keyword arguments of its
    ``__init__`` (``def __init__(self, recipe, clip=0.5)``): the recipe's ``learner.options``, checked against
    that signature before any work."""

    def __init__(self, recipe: Any) -> None:
        self.recipe, self.cfg = recipe, recipe.learner

    # ------------------------------------------------------------------ driver side
    def batch(self, trees: list[Tree], version: int) -> tuple[list[TrainItem], BatchStats, dict[str, float]]:
        """Scored trees -> (train items, batch counts, group statistics for the logs)."""
        raise NotImplementedError(f"{type(self).__name__} does not define batch(trees, version)")

    # ------------------------------------------------------------------ learner side
    def modules(self, policy: Any) -> dict[str, torch.nn.Module]:
        """Extra trainable modules (a critic), optimised and checkpointed with the policy; default none."""
        return {}

    def module_lr(self, name: str) -> float | None:
        """Learning rate of the extra module ``name`` (of :meth:`modules`); ``None``: ``learner.lr``."""
        return None

    def prepare(self, models: LearnerModels, items: list[TrainItem]) -> dict[str, Any]:
        """Quantities computed once per batch, before the epochs; a ``"metrics"`` entry is logged."""
        return {}

    def loss(self, models: LearnerModels, items: list[TrainItem], chunk: range, mini: range,
             ctx: dict[str, Any]) -> tuple[torch.Tensor, dict[str, float], list[torch.Tensor]]:
        """Loss of micro-batch ``items[chunk]`` weighted by its share of mini-batch ``mini``, its metrics
        (means or extremes, averaged over micro-batches) and its differentiable outputs."""
        raise NotImplementedError(f"{type(self).__name__} does not define loss(...)")


def old_logps(policy: Any, items: list[TrainItem], chunks: list[range], detach_uncond: bool = False
              ) -> list[torch.Tensor]:
    """``learner.old_logp: recompute``: the old log-probs of the items in ``chunks`` by the training forward,
    without gradient, in those micro-batches as :meth:`GRPO.loss` will run them (token rows together; flow items'
    denoising steps together, ``detach_uncond`` as the loss); other items get an empty tensor.  bf16 rounds a
    forward by its batch: a BAGEL image rescored in another batch than it was sampled in moves its ratio off 1 by
    more than ``flow.clip_low`` (``benchmarks/flow_old_logp.py``).  A learner rank passes only its own micro-batches."""
    out: list[torch.Tensor] = [torch.empty(0)] * len(items)
    # each once (a rank's filler repeats one): ranks may then run different numbers of forwards here, which holds
    # because these forwards have no collective (ZeRO-3, whose forwards gather, is refused with several ranks)
    for chunk in dict.fromkeys(chunks):
        tokens = [i for i in chunk if not is_flow_segment(items[i].segment)]
        for i, lp in zip(tokens, recomputed_logprobs(policy, [items[i] for i in tokens])):
            out[i] = lp
        flows = [i for i in chunk if is_flow_segment(items[i].segment)]
        if flows:
            with torch.no_grad(), unconditional_without_gradient(detach_uncond):
                scores = policy.denoising_scores([items[i].segment for i in flows])
            for i, score in zip(flows, scores):
                out[i] = score.logp.detach()
    return out


def modality_mean_loss(items: list[TrainItem], tok_chunk: list[int], tok_mini: list[int], inp: dict[str, Any],
                       adv: torch.Tensor, weight: torch.Tensor, cfg: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """``loss_type: modality_mean``: this micro-batch's share of (the token mean over the mini-batch's text
    tokens) + (the token mean over its image tokens), clipped term and KL alike; and the sum of the two
    modalities' clipped terms in this micro-batch (the ``policy_loss`` metric).  With Janus a 100-token plan
    then weighs as much against its 576-token image as text against images in the reference's loss."""
    total: torch.Tensor | float = 0.0
    policy = torch.zeros(())
    for modality in ("text", "image"):
        rows = [k for k, i in enumerate(tok_chunk) if items[i].segment.modality == modality]
        if not rows:
            continue
        at = torch.tensor(rows, device=adv.device)
        ref = inp["ref_logp"][at] if inp["ref_logp"] is not None else None
        part, m = clipped_policy_loss(
            inp["logp"][at], inp["old_logp"][at], adv[at], inp["mask"][at], clip_low=cfg.clip_low,
            clip_high=cfg.clip_high, loss_type="token_mean", ref_logp=ref, kl_coef=inp["kl_coef"][at],
            kl_kind=cfg.kl_kind, kl_importance_weight=cfg.kl_importance_weight, row_weight=weight[at])
        mini = [i for i in tok_mini if items[i].segment.modality == modality]
        total = total + part * micro_share(items, [tok_chunk[k] for k in rows], mini, "token_mean")
        policy = policy + m["policy_loss"].detach().cpu()
    return total, policy  # type: ignore[return-value]


class GRPO(Algorithm):
    """Group-relative advantages among Tree-RL siblings; clipped surrogate with a KL penalty to the reference.

    Variants override one step: :meth:`advantages` (the baseline), :meth:`batch` (which nodes train) or
    :meth:`loss`.
    """

    def advantages(self, trees: list[Tree]) -> dict[str, float]:
        """Fill ``node.advantage`` among siblings (``learner.normalize_std``; critiques per
        ``learner.critic_baseline``, refined images per ``learner.refine_baseline``); returns group statistics."""
        return assign_advantages(trees, self.cfg.normalize_std, self.cfg.critic_baseline, self.cfg.refine_baseline,
                                 self.cfg.std_scope)

    def batch(self, trees: list[Tree], version: int) -> tuple[list[TrainItem], BatchStats, dict[str, float]]:
        stats = self.advantages(trees)
        pooled = frozenset(stage for stage, own_baseline in (("reflect", self.cfg.critic_baseline == "verdict"),
                                                             ("refine", self.cfg.refine_baseline == "parent"))
                           if own_baseline)  # baselines beyond the group: a group that agrees still trains
        items, counts = collect_items(trees, version, self.cfg.max_staleness, pooled_stages=pooled)
        stats["zero_signal_items"] = float(counts.zero_signal_items)
        return items, counts, stats

    def prepare(self, models: LearnerModels, items: list[TrainItem]) -> dict[str, Any]:
        rollout = getattr(self.recipe, "rollout", None)  # None: each item's own length
        ctx: dict[str, Any] = {"max_len": [most_actions(it, rollout) for it in items]}  # dr_grpo's, per item
        if self.cfg.old_logp == "recompute":
            chunks = models.own_chunks(len(items), self.cfg.micro_batch_size)
            ctx["old_logp"] = old_logps(models.policy, items, chunks, self.cfg.flow.detach_uncond)
            ctx["metrics"], ctx["metric_counts"] = {}, {}
            for kind, flow in (("", False), ("flow_", True)):  # how far the sampler's numbers were from the trainer's
                gaps = [(o.cpu().double() - torch.tensor(it.segment.logprobs, dtype=torch.float64)).abs()
                        for it, o in zip(items, ctx["old_logp"]) if o.numel() and is_flow_segment(it.segment) == flow]
                if gaps:
                    every = torch.cat(gaps)
                    ctx["metrics"].update({f"learner/sampler_{kind}logp_gap_mean": float(every.mean()),
                                           f"learner/sampler_{kind}logp_gap_max": float(every.max())})
                    # a rank's mean is over its own micro-batches' actions: ranks merge weighted by these
                    ctx["metric_counts"][f"learner/sampler_{kind}logp_gap_mean"] = int(every.numel())
        return ctx

    def loss(self, models: LearnerModels, items: list[TrainItem], chunk: range, mini: range,
             ctx: dict[str, Any]) -> tuple[torch.Tensor, dict[str, float], list[torch.Tensor]]:
        """Token rows: the clipped surrogate with per-row weights (modality x stage) and the per-token KL.  Image
        rows made of denoising steps: the flow loss (:mod:`r3_rl.learner.flow_loss`).  The two kinds' means add."""
        cfg = self.cfg
        flow = {i: is_flow_segment(items[i].segment) for i in (*chunk, *mini)}  # not the whole batch: per call
        tok_chunk, tok_mini = [i for i in chunk if not flow[i]], [i for i in mini if not flow[i]]
        flow_chunk, flow_mini = [i for i in chunk if flow[i]], [i for i in mini if flow[i]]

        def advantage(i: int) -> float:  # computed per batch (PPO) rather than carried by the items
            return float(ctx["advantages"][i]) if "advantages" in ctx else items[i].advantage

        total: torch.Tensor | float = 0.0
        metrics: dict[str, float] = {}
        outputs: list[torch.Tensor] = []
        if tok_chunk:
            rows = [items[i] for i in tok_chunk]
            old = [ctx["old_logp"][i] for i in tok_chunk] if "old_logp" in ctx else None
            inp = micro_batch_inputs(models.policy, models.reference, rows, cfg.kl_coef_text, cfg.kl_coef_image, old)
            dev = inp["logp"].device
            adv = torch.tensor([advantage(i) for i in tok_chunk], dtype=torch.float32, device=dev)
            weight = torch.tensor([policy_weight(cfg, it) for it in rows], device=dev)
            most = ctx["max_len"]  # dr_grpo's normaliser: one per row (or one int, from a plug-in's prepare)
            most = most if isinstance(most, int) else torch.tensor([most[i] for i in tok_chunk], device=dev)
            by_modality = cfg.loss_type == "modality_mean"
            pooled = "token_mean" if by_modality else cfg.loss_type  # modality_mean: pooled for the metrics only
            with torch.no_grad() if by_modality else contextlib.nullcontext():
                loss, m = clipped_policy_loss(
                    inp["logp"], inp["old_logp"], adv, inp["mask"], clip_low=cfg.clip_low, clip_high=cfg.clip_high,
                    loss_type=pooled, max_len=most, ref_logp=inp["ref_logp"],
                    kl_coef=inp["kl_coef"], kl_kind=cfg.kl_kind, kl_importance_weight=cfg.kl_importance_weight,
                    row_weight=weight)
            if by_modality:
                total, m["policy_loss"] = modality_mean_loss(items, tok_chunk, tok_mini, inp, adv, weight, cfg)
            else:
                total = loss * micro_share(items, tok_chunk, tok_mini, cfg.loss_type)
            metrics.update({k: float(v) for k, v in m.items()})
            if inp["ref_logp"] is not None:  # KL per modality (text and image tokens weigh differently), over the
                # rows the loss keeps: a row without an advantage is dropped there, and its log-probs may be garbage
                metrics.update(kl_by_modality(inp["logp"], inp["ref_logp"], kept_tokens(inp["mask"], adv),
                                              [it.segment.modality for it in rows], cfg.kl_kind))
            outputs.append(inp["logp"])
        if flow_chunk:
            old_flow = [ctx["old_logp"][i] for i in flow_chunk] if "old_logp" in ctx else None
            loss, m, out = flow_loss(models.policy, models.reference, [items[i] for i in flow_chunk],
                                     [advantage(i) for i in flow_chunk], cfg, old_flow)
            total = total + loss * flow_share(items, flow_chunk, flow_mini, cfg.flow.ratio_unit)
            metrics.update(m)
            outputs.extend(out)
        if not outputs:
            raise ValueError("GRPO.loss: an empty micro-batch")
        return total, metrics, outputs  # type: ignore[return-value]
