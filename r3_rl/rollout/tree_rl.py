"""Tree-RL rollout: sibling groups per R3 stage, as independent seeded work units.

A step is a list of :class:`RolloutTask` s.  Each task is a pure function of (policy weights, task):
  * ``kind="A"``: for each prompt, ``group_size`` siblings of reason -> generate
    (plan nodes compared among themselves, image nodes among themselves);
  * ``kind="BC"``: for each buffered parent image, ``group_size`` siblings of reflect -> refine.
    After "no further edit needed" the refined image is the parent image itself (no tokens sampled).
Each task carries its own seed, so any executor (in-process, Ray actors) that runs the same tasks
produces the same trees.  Scoring is separate (:mod:`r3_rl.rollout.scoring`).
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any

import torch

from r3_rl.policy.base import ImageInput, Policy, parse_critique
from r3_rl.rollout.buffer import BufferEntry
from r3_rl.trajectory import Node, PromptItem, SamplingParams, Tree


@dataclass
class StageSampling:
    reason: SamplingParams
    generate: SamplingParams
    reflect: SamplingParams
    refine: SamplingParams
    # critiques of a parent whose group all gave one verdict are sampled again with these (None = never)
    reflect_rescue: SamplingParams | None = None


def stage_sampling(recipe: Any, eval_mode: bool = False) -> StageSampling:
    """Per-stage sampling from ``rollout.<stage>``; ``eval_mode`` applies the eval temperatures (0 = greedy)
    and never re-samples a critique group."""
    r = recipe.rollout
    sp = {k: getattr(r, k).params() for k in ("reason", "generate", "reflect", "refine")}
    if eval_mode:
        for stage, p in sp.items():
            temp = recipe.eval.image_temperature if stage in ("generate", "refine") else recipe.eval.text_temperature
            p.greedy = temp == 0
            p.temperature = temp or 1.0
    elif r.verdict_rescue_temperature > 0:
        rescue = r.reflect.params()
        rescue.temperature, rescue.greedy = r.verdict_rescue_temperature, False
        sp["reflect_rescue"] = rescue
    return StageSampling(**sp)


@dataclass
class RolloutTask:
    kind: str  # "A" (reason -> generate) or "BC" (reflect -> refine)
    step: int
    index: int  # position of the task within its step (stable across executors)
    seed: int
    group_size: int
    prompts: list[PromptItem] = field(default_factory=list)  # kind A
    parents: list[BufferEntry] = field(default_factory=list)  # kind BC


def stages_at(schedule: str, step: int) -> tuple[bool, bool]:
    """Which stages step ``step`` (0-based) runs: ``(stage A, stages B+C)``.

    ``"together"``: both, every step.  ``"alternate"``: the reference's (sen-ye/R3, ``curr_step % rounds == 0``
    with rounds 2): A on even steps, B+C on odd ones, so each stage gets half the steps and B+C always critiques
    the images of the step before."""
    if schedule == "together":
        return True, True
    if schedule == "alternate":
        return step % 2 == 0, step % 2 == 1
    raise ValueError(f"unknown tree.schedule {schedule!r}; valid: together, alternate")


def plan_tasks(step: int, seed: int, prompts: list[PromptItem], parents: list[BufferEntry], group_size: int,
               groups_per_task: int) -> list[RolloutTask]:
    """Split a step's groups into tasks of at most ``groups_per_task`` groups, each with its own seed."""
    tasks: list[RolloutTask] = []
    for kind, items in (("A", prompts), ("BC", parents)):
        for start in range(0, len(items), groups_per_task):
            chunk = items[start:start + groups_per_task]
            index = len(tasks)
            task_seed = random.Random(f"{seed}/{step}/{kind}/{index}").getrandbits(63)
            tasks.append(RolloutTask(kind=kind, step=step, index=index, seed=task_seed, group_size=group_size,
                                     prompts=chunk if kind == "A" else [], parents=chunk if kind == "BC" else []))
    return tasks


def run_task(policy: Policy, task: RolloutTask, sampling: StageSampling, stop_phrase: str) -> list[Tree]:
    gen = torch.Generator().manual_seed(task.seed)
    if task.kind == "A":
        return _stage_a(policy, task, sampling, gen)
    return _stage_bc(policy, task, sampling, gen, stop_phrase)


def _stage_a(policy: Policy, task: RolloutTask, sp: StageSampling, gen: torch.Generator) -> list[Tree]:
    g = task.group_size
    prompts = [p for p in task.prompts for _ in range(g)]
    plans = policy.reason(prompts, sp.reason, gen)
    images = policy.generate(prompts, [p.text for p in plans], sp.generate, gen)
    trees = []
    for i, prompt in enumerate(task.prompts):
        tid = f"s{task.step}-t{task.index}-A{i}"
        tree = Tree(id=tid, prompt=prompt, meta={"kind": "A", "step": task.step})
        for j in range(g):
            k = i * g + j
            plan, img = plans[k], images[k]
            tree.add(Node(id=f"p{j}", parent=None, stage="reason", round=0, group_id=f"{tid}/plan",
                          policy_version=policy.version, segment=plan.segment, text=plan.text))
            tree.add(Node(id=f"g{j}", parent=f"p{j}", stage="generate", round=0, group_id=f"{tid}/image",
                          policy_version=policy.version, segment=img.segment, image=img.image,
                          image_tokens=img.image_tokens))
        trees.append(tree)
    return trees


def _stage_bc(policy: Policy, task: RolloutTask, sp: StageSampling, gen: torch.Generator,
              stop_phrase: str) -> list[Tree]:
    g = task.group_size
    prompts = [e.prompt for e in task.parents for _ in range(g)]
    inputs = [ImageInput(image=e.image, image_tokens=e.image_tokens) for e in task.parents for _ in range(g)]
    critiques = list(policy.reflect(prompts, inputs, sp.reflect, gen))
    parsed = [parse_critique(c.text, stop_phrase) for c in critiques]
    rescued = _rescue_unanimous(policy, task, sp, gen, stop_phrase, prompts, inputs, critiques, parsed)
    edit_idx = [k for k, (_, stop) in enumerate(parsed) if not stop]
    edited = policy.refine([prompts[k] for k in edit_idx], [inputs[k] for k in edit_idx],
                           [parsed[k][0] for k in edit_idx], sp.refine, gen) if edit_idx else []
    by_k = dict(zip(edit_idx, edited))
    trees = []
    for i, parent in enumerate(task.parents):
        tid = f"s{task.step}-t{task.index}-BC{i}"
        rnd = parent.round + 1
        tree = Tree(id=tid, prompt=parent.prompt, meta={"kind": "BC", "step": task.step, "parent": parent.source,
                                                        **({"rescued": i in rescued} if sp.reflect_rescue else {})})
        tree.add(Node(id="root", parent=None, stage="generate" if parent.round == 0 else "refine",
                      round=parent.round, group_id=f"{tid}/root", policy_version=-1, image=parent.image,
                      image_tokens=parent.image_tokens, reward=parent.reward, meta={"correct": parent.correct}))
        for j in range(g):
            k = i * g + j
            instruction, stop = parsed[k]
            tree.add(Node(id=f"c{j}", parent="root", stage="reflect", round=rnd, group_id=f"{tid}/reflect",
                          policy_version=policy.version, segment=critiques[k].segment, text=critiques[k].text,
                          edit_instruction=instruction, stop=stop))
            if stop:  # "no further edit needed": the image stays as it was, nothing sampled
                tree.add(Node(id=f"r{j}", parent=f"c{j}", stage="refine", round=rnd, group_id=f"{tid}/refine",
                              policy_version=policy.version, image=parent.image, image_tokens=parent.image_tokens,
                              reward=parent.reward, meta={"copied": True, "correct": parent.correct}))
            else:
                img = by_k[k]
                tree.add(Node(id=f"r{j}", parent=f"c{j}", stage="refine", round=rnd, group_id=f"{tid}/refine",
                              policy_version=policy.version, segment=img.segment, image=img.image,
                              image_tokens=img.image_tokens))
        trees.append(tree)
    return trees


def _rescue_unanimous(policy: Policy, task: RolloutTask, sp: StageSampling, gen: torch.Generator, stop_phrase: str,
                      prompts: list[PromptItem], inputs: list[ImageInput], critiques: list[Any],
                      parsed: list[tuple[str, bool]]) -> set[int]:
    """``rollout.verdict_rescue_temperature``: sample again, at that temperature, the critiques of every parent
    whose ``group_size`` critiques all gave the same verdict (in place); returns those parents' indices.

    Why: GRPO learns nothing from a group that agrees, and a critic that is sure of a wrong verdict (eight
    "no further edit needed" on a wrongly coloured image) agrees every time, so the flaws it cannot see are the
    ones RL never shows it.  The hotter group is trained on as sampled (its segments record the temperature, and
    the learner scores them under it), like any other group; the discarded group had no signal to give."""
    if sp.reflect_rescue is None:
        return set()
    g = task.group_size
    again = [i for i in range(len(task.parents)) if len({parsed[i * g + j][1] for j in range(g)}) == 1]
    idx = [i * g + j for i in again for j in range(g)]
    if idx:
        redo = policy.reflect([prompts[k] for k in idx], [inputs[k] for k in idx], sp.reflect_rescue, gen)
        for k, c in zip(idx, redo):
            critiques[k], parsed[k] = c, parse_critique(c.text, stop_phrase)
    return set(again)
