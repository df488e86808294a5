"""PPO over R3 stages: stage-level rewards along each chain, GAE over stages, a value critic.

Where GRPO compares siblings, PPO treats each sampled chain of stages in a tree (plan -> image, or
critique -> refined image) as a short episode, one time step per stage, and learns a critic ``V(s_t)``
of the context each stage was sampled from.

Stage rewards are each stage's *own* contribution, so that the return of a chain is its outcome and
nothing is counted twice (the GRPO plan reward, for instance, already contains its image's reward):

* ``reason``: ``rewards.format_weight * format_ok``;
* ``reflect``: the same, plus the verdict's own reward and any extra reflect rewards
  (:func:`r3_rl.rewards.compose.reflect_own_reward`: a correct "no further edit" scores
  ``rewards.reflect.stop_correct`` as under GRPO);
* ``generate``: the image's task reward ``R``;
* ``refine``: the improvement ``R_new - R_old`` over the parent image (over a whole R3 chain these
  telescope to the final image's reward).

A chain with any failed reward is dropped whole (its returns are undefined) and counted as failed; a
chain with a stale node is refused whole.  A critique that stops ("no further edit") ends its chain.

Critic (``learner.ppo.critic``): ``head`` -- a linear value head on :meth:`Policy.value_features`, the
policy's last hidden state over the context (image features included: Janus reads its SigLIP features
there, exactly as when it sampled); the backbone is shared, so the value loss shapes the policy's
features, weighted by ``vf_coef``.  ``separate`` -- the same on a copy of the policy that trains what
the policy trains (its frozen towers stay frozen).  The value head starts at zero, so the first
advantages are the stage rewards' (gamma x lam)-discounted sums (the plain returns only with ``lam: 1``),
whitened when ``learner.ppo.normalize_advantages``.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch

from r3_rl.algorithms.ppo import gae, value_clip_fraction, value_loss, whiten
from r3_rl.errors import UserError
from r3_rl.learner.algorithm import GRPO, LearnerModels
from r3_rl.learner.batch import BatchStats, TrainItem, summarize
from r3_rl.policy.base import Policy
from r3_rl.rewards.compose import reflect_own_reward
from r3_rl.trajectory import Node, Tree


@dataclass
class ChainItem(TrainItem):
    """A train item that knows its place in its R3 chain: the stage's own reward, the episode, the time step."""

    reward: float | None = None
    episode: str = ""
    t: int = 0


# ---------------------------------------------------------------------------------------------- episodes
def stage_reward(tree: Tree, node: Node, format_weight: float) -> float | None:
    """The stage's own reward (module docstring); ``None`` when it cannot be known (a failed reward)."""
    if node.stage == "reflect":  # None when its GRPO reward failed too (e.g. the parent's reward failed)
        return None if node.reward is None else reflect_own_reward(node.rewards, format_weight)
    if node.stage == "reason":
        ok = node.rewards.get("format")
        return None if ok is None else format_weight * float(ok)
    if node.reward is None:
        return None
    if node.stage == "refine":
        parent = next((n for n in reversed(tree.path(node.id)[:-1]) if n.stage in ("generate", "refine")), None)
        if parent is None or parent.reward is None:
            return None
        return node.reward - parent.reward
    return node.reward


def _sampled(node: Node) -> bool:
    return node.segment is not None and node.segment.num_actions > 0 and node.policy_version >= 0


def chains(tree: Tree) -> list[list[Node]]:
    """Maximal chains of sampled nodes, each following its unique sampled descendant."""
    sampled = {nid: n for nid, n in tree.nodes.items() if _sampled(n)}

    def sampled_parent(n: Node) -> str | None:
        cur = n.parent
        while cur is not None and cur not in sampled:
            cur = tree.nodes[cur].parent
        return cur

    parent_of = {nid: sampled_parent(n) for nid, n in sampled.items()}
    kids: dict[str | None, list[Node]] = {}
    for nid, n in sampled.items():
        kids.setdefault(parent_of[nid], []).append(n)
    out = []
    for start in kids.get(None, []):
        chain = [start]
        while kids.get(chain[-1].id):
            nxt = kids[chain[-1].id]
            if len(nxt) > 1:
                raise ValueError(f"tree {tree.id}: node {chain[-1].id!r} has {len(nxt)} sampled children; PPO "
                                 f"episodes are chains")
            chain.append(nxt[0])
        out.append(chain)
    return out


def ppo_items(trees: list[Tree], current_version: int, max_staleness: int,
              format_weight: float) -> tuple[list[TrainItem], BatchStats]:
    stats = BatchStats()
    items: list[TrainItem] = []
    for tree in trees:
        for chain in chains(tree):
            rewards = [stage_reward(tree, n, format_weight) for n in chain]
            if any(r is None for r in rewards):
                stats.failed_rewards += len(chain)
                continue
            if any(current_version - n.policy_version > max_staleness for n in chain):
                stats.stale_refused += len(chain)
                continue
            for t, (n, r) in enumerate(zip(chain, rewards)):
                items.append(ChainItem(n.segment, 0.0, n.stage, n.policy_version,  # type: ignore[arg-type]
                                       group=n.group_id, reward=r, episode=f"{tree.id}/{chain[0].id}", t=t))
                stats.per_stage[n.stage] = stats.per_stage.get(n.stage, 0) + 1
    summarize(items, stats)
    return items, stats


# ---------------------------------------------------------------------------------------------- critic
class ValueHead(torch.nn.Linear):
    """``Linear(hidden, 1)`` that computes in float32 whatever dtype its weights were given.

    A bf16 DeepSpeed engine casts every module it trains to bf16, this head included; computed in bf16 a value
    in [0.5, 1) could only move in steps of 2^-8, noise the critic could not fit below and GAE would carry into
    every advantage.  Its weights keep their names (``value_head.weight`` / ``.bias``: checkpoints load as
    before) and it is still called as a module (ZeRO-3 gathers its weights in the module's forward hook)."""

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.linear(features.float(), self.weight.float(), self.bias.float())


def critic_modules(policy: Policy, cfg: Any) -> dict[str, torch.nn.Module]:
    """The critic's trainable modules: ``value_head`` (zero-initialised), plus ``critic`` (a copy of the policy's
    module) for ``learner.ppo.critic: separate``."""
    try:
        hidden = policy.feature_size
    except NotImplementedError:
        raise UserError(f"learner.algorithm=ppo: a {type(policy).__name__} policy exposes no hidden states "
                        f"for a critic (Policy.value_features)") from None
    head = ValueHead(hidden, 1, device=next(policy.model.parameters()).device)
    torch.nn.init.zeros_(head.weight)
    torch.nn.init.zeros_(head.bias)
    out: dict[str, torch.nn.Module] = {"value_head": head}
    if cfg.ppo.critic == "separate":
        body = copy.deepcopy(policy.model)
        for p, q in zip(policy.model.parameters(), body.parameters()):
            q.requires_grad_(p.requires_grad)
        out["critic"] = body
    return out


class PPO(GRPO):
    """GRPO's clipped surrogate with GAE advantages over each chain's stages, plus ``vf_coef`` times the
    clipped value loss of a critic (``learner.ppo``)."""

    def __init__(self, recipe: Any) -> None:
        super().__init__(recipe)
        self._critic: Any = None  # the policy computing with the separate critic's body (learner.ppo.critic)

    def batch(self, trees: list[Tree], version: int) -> tuple[list[TrainItem], BatchStats, dict[str, float]]:
        stats = self.advantages(trees)  # sibling-group counts are logged under PPO too
        items, counts = ppo_items(trees, version, self.cfg.max_staleness, self.recipe.rewards.format_weight)
        return items, counts, stats

    def modules(self, policy: Any) -> dict[str, torch.nn.Module]:
        return critic_modules(policy, self.cfg)

    def module_lr(self, name: str) -> float | None:
        return self.cfg.ppo.critic_lr  # value_head and critic: every module PPO adds is the critic's

    def values(self, models: LearnerModels, items: list[TrainItem]) -> torch.Tensor:
        """``V(s)`` per item from the critic's hidden state over the item's sampling context, ``[B]`` float32."""
        body = models.modules.get("critic")
        if body is None:
            critic = models.policy
        else:
            if self._critic is None or self._critic.model is not body:
                self._critic = models.policy.with_model(body)
            critic = self._critic
        head = models.modules["value_head"]
        features = critic.value_features([it.segment for it in items])
        return head(features).squeeze(-1)  # float32 (ValueHead)

    def old_values(self, models: LearnerModels, items: list[TrainItem]) -> torch.Tensor:
        """``[B]`` float32 on the CPU: every item's value before the update, each micro-batch computed once.

        GAE needs every item's value on every rank, but a rank computes only its own micro-batches
        (``models.chunks``) and the ranks add theirs up (each position divided by how many ranks filled it:
        a rank with fewer micro-batches repeats one at weight 0).  Before, every rank ran the critic over the
        whole batch: at 8 ranks about a third more learner forward work per step."""
        chunks = models.own_chunks(len(items), self.cfg.micro_batch_size)
        old, filled = torch.zeros(len(items)), torch.zeros(len(items))
        for c in dict.fromkeys(chunks):
            old[c.start:c.stop] = self.values(models, items[c.start:c.stop]).cpu()
            filled[c.start:c.stop] = 1.0
        dist = torch.distributed
        if models.chunks is not None and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            nccl = dist.get_backend() == "nccl"  # NCCL reduces CUDA tensors only
            both = torch.stack([old, filled]).to(f"cuda:{torch.cuda.current_device()}" if nccl else "cpu")
            dist.all_reduce(both)
            old, filled = both.cpu().unbind(0)
        if not bool((filled > 0).all()):
            raise RuntimeError(f"PPO: {int((filled == 0).sum())} of {len(items)} items got no value from any rank")
        return old / filled

    def prepare(self, models: LearnerModels, items: list[TrainItem]) -> dict[str, Any]:
        """GAE advantages and returns from the critic's values before the update; the advantages trained on
        (after ``normalize_advantages``) are logged as ``advantage/mean`` and ``advantage/std``."""
        p = self.cfg.ppo
        ctx = super().prepare(models, items)
        with torch.no_grad():
            old = self.old_values(models, items)
        adv = torch.zeros(len(items))
        ret = torch.zeros(len(items))
        episodes: dict[str, list[int]] = {}
        for i, it in enumerate(items):
            episodes.setdefault(it.episode, []).append(i)  # type: ignore[attr-defined]
        for idx in episodes.values():
            idx.sort(key=lambda i: items[i].t)  # type: ignore[attr-defined]
            r = torch.tensor([items[i].reward for i in idx], dtype=torch.float32)  # type: ignore[attr-defined]
            a, R = gae(r, old[idx], gamma=p.gamma, lam=p.lam, last_value=0.0)
            adv[idx], ret[idx] = a, R
        if p.normalize_advantages and len(items) > 1:
            adv = whiten(adv)
        for it, a in zip(items, adv.tolist()):
            it.advantage = a
        summary = BatchStats()
        summarize(items, summary)
        ctx.update(advantages=adv, returns=ret, old_values=old,
                   metrics={**ctx.get("metrics", {}), "advantage/mean": summary.advantage_mean,
                            "advantage/std": summary.advantage_std})
        return ctx

    def loss(self, models: LearnerModels, items: list[TrainItem], chunk: range, mini: range,
             ctx: dict[str, Any]) -> tuple[torch.Tensor, dict[str, float], list[torch.Tensor]]:
        loss, m, outputs = super().loss(models, items, chunk, mini, ctx)
        p = self.cfg.ppo
        v = self.values(models, [items[i] for i in chunk])
        sl = slice(chunk.start, chunk.stop)
        old, ret = ctx["old_values"][sl].to(v.device), ctx["returns"][sl].to(v.device)
        vl = value_loss(v, old, ret, clip=p.value_clip)
        m.update({"value_loss": float(vl.detach()), "value_mean": float(v.detach().mean()),
                  "return_mean": float(ret.mean())})
        if p.value_clip is not None:
            m["value_clipfrac"] = value_clip_fraction(v.detach(), old, ret, p.value_clip)
        return loss + p.vf_coef * vl * (len(chunk) / len(mini)), m, outputs + [v]
