"""Full R3 chains: one trajectory per prompt, reason -> generate -> (reflect -> refine) x rounds.

Used by evaluation and ``r3-rl rollout``.  A chain stops early once the critique says no further edit
is needed; later rounds keep its last image (as the reference's eval does).
"""
from __future__ import annotations

import torch

from r3_rl.policy.base import ImageInput, Policy, parse_critique
from r3_rl.rollout.tree_rl import StageSampling
from r3_rl.trajectory import Node, PromptItem, Tree


def r3_chains(policy: Policy, prompts: list[PromptItem], sampling: StageSampling, rounds: int, stop_phrase: str,
              seed: int = 0, batch_size: int = 256, tag: str = "eval") -> list[Tree]:
    trees: list[Tree] = []
    gen = torch.Generator().manual_seed(seed)
    for start in range(0, len(prompts), batch_size):
        trees.extend(_chains(policy, prompts[start:start + batch_size], sampling, rounds, stop_phrase, gen,
                             tag, start))
    return trees


def _chains(policy: Policy, prompts: list[PromptItem], sp: StageSampling, rounds: int, stop_phrase: str,
            gen: torch.Generator, tag: str, offset: int) -> list[Tree]:
    v = policy.version
    trees = [Tree(id=f"{tag}-{offset + i}", prompt=p, meta={"kind": "chain"}) for i, p in enumerate(prompts)]
    plans = policy.reason(prompts, sp.reason, gen)
    images = policy.generate(prompts, [p.text for p in plans], sp.generate, gen)
    last: list[Node] = []
    for tree, plan, img in zip(trees, plans, images):
        tree.add(Node(id="plan", parent=None, stage="reason", round=0, group_id=f"{tree.id}/plan",
                      policy_version=v, segment=plan.segment, text=plan.text))
        last.append(tree.add(Node(id="img0", parent="plan", stage="generate", round=0, group_id=f"{tree.id}/img0",
                                  policy_version=v, segment=img.segment, image=img.image,
                                  image_tokens=img.image_tokens)))
    active = list(range(len(trees)))
    for rnd in range(1, rounds + 1):
        if not active:
            break
        inputs = [ImageInput(last[i].image, last[i].image_tokens) for i in active]
        crits = policy.reflect([prompts[i] for i in active], inputs, sp.reflect, gen)
        parsed = [parse_critique(c.text, stop_phrase) for c in crits]
        to_edit = [k for k, (_, stop) in enumerate(parsed) if not stop]
        edited = policy.refine([prompts[active[k]] for k in to_edit], [inputs[k] for k in to_edit],
                               [parsed[k][0] for k in to_edit], sp.refine, gen) if to_edit else []
        for k, i in enumerate(active):
            tree = trees[i]
            instruction, stop = parsed[k]
            tree.add(Node(id=f"crit{rnd}", parent=last[i].id, stage="reflect", round=rnd,
                          group_id=f"{tree.id}/crit{rnd}", policy_version=v, segment=crits[k].segment,
                          text=crits[k].text, edit_instruction=instruction, stop=stop))
        for k, img in zip(to_edit, edited):
            i = active[k]
            last[i] = trees[i].add(Node(id=f"img{rnd}", parent=f"crit{rnd}", stage="refine", round=rnd,
                                        group_id=f"{trees[i].id}/img{rnd}", policy_version=v, segment=img.segment,
                                        image=img.image, image_tokens=img.image_tokens))
        active = [active[k] for k in to_edit]
    return trees


def images_by_round(tree: Tree, rounds: int) -> list[Node]:
    """The image standing after each round 0..rounds (carried forward after a stop)."""
    out: list[Node] = []
    cur = tree.nodes["img0"]
    for r in range(rounds + 1):
        cur = tree.nodes.get(f"img{r}", cur)
        out.append(cur)
    return out


def rounds_used(tree: Tree) -> int:
    return sum(1 for n in tree.nodes.values() if n.stage == "reflect")


def stopped(tree: Tree) -> bool:
    return any(n.stop for n in tree.nodes.values() if n.stage == "reflect")
