"""Supervised warm start of the tiny policy on synthetic R3 trajectories (Blocks world).

A real unified model arrives pretrained: it can already plan, draw, critique and edit, imperfectly.
The tiny model gets there with a short supervised stage on generated trajectories:

    plan -> first image (correct, or deliberately flawed with probability ``flaw_prob``)
         -> critique (what is wrong, or "no further edit needed"; with probability ``random_layouts`` of
            the same image content in a random layout, so the critic learns to see flaws rather than the
            canonical layout the generator is taught)
         -> refined image (the right fix with probability ``fix_prob``, else left unchanged) -> ...
    (a flawed image's critique is the lenient "no further edit needed" with probability ``miss_prob``, as
     pretrained critics tend to be; + with probability ``random_edits``: a random instruction applied exactly, a no-op when it does
       not apply; + ``questions`` yes/no questions about the first image, answered with the truth)

so the warm-started policy is non-trivial but imperfect, leaving RL something real to improve.  The
result is saved in the run directory (``warmstart/``) and reused when present with the same settings.

With ``describe`` every critique's think text first says what the image holds ("the image has a blue
triangle"; with ``counts``, each shape's total first: "the image has two triangles with ..."), so the verdict
compares two texts, the prompt and the description; ``critic_steps`` adds
steps after the main ones whose batches are half critiques (half of those of flawed images, the flaw kind --
add, remove, recolor, move, swap -- drawn evenly) and half the main steps' examples, so the rest is not
forgotten.  Without both, the 128-wide critic never learns to catch a wrong colour (README: R3 synergy).
"""
from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import numpy as np
import torch

from r3_rl.blocks import edits, synthesis
from r3_rl.data import BlocksPrompts
from r3_rl.errors import UserError, raised
from r3_rl.policy.base import ImageInput
from r3_rl.policy.tiny_tokenizer import image_token
from r3_rl.rewards.checklists import YES, questions_for
from r3_rl.trajectory import PromptItem

if TYPE_CHECKING:  # the tiny policy calls this module from its warm_start: no import back at run time
    from r3_rl.policy.tiny import TinyUnifiedPolicy


def _words(grid: np.ndarray) -> str:
    return " ".join(image_token(int(k)) for k in grid.reshape(-1))


LENIENT = f"<think> the image matches the prompt </think> {edits.STOP_TEXT}"  # what a correct image gets
_OFFSETS = {"right of": (0, 1), "left of": (0, -1), "above": (-1, 0), "below": (1, 0)}


def canonical_grid(metadata: dict, rng: np.random.Generator, rows: int, cols: int) -> np.ndarray:
    """A correct grid with a low-entropy layout: objects in raster order, a position pair side by side.

    Colours not fixed by the prompt are random.  A pretrained model draws in its own habitual layouts;
    a canonical one gives the tiny model the same head start within a CPU-minute budget.  Falls back to
    :func:`synthesis.random_correct_grid` when the canonical layout does not satisfy the prompt.
    """
    from r3_rl.blocks.world import COLORS, token_of

    grid = np.zeros((rows, cols), dtype=np.int64)
    include = metadata.get("include", [])

    def tok(req: dict) -> int:
        return token_of(req["class"], req.get("color") or COLORS[int(rng.integers(len(COLORS)))])

    rel_req = next((q for q in include if q.get("position")), None)
    if rel_req is not None:
        relation, target_idx = rel_req["position"]
        r0, c0 = 1, 1
        dr, dc = _OFFSETS[relation]
        grid[r0, c0] = tok(include[target_idx])
        grid[r0 + dr, c0 + dc] = tok(rel_req)
    else:
        cells = iter(range(rows * cols))
        for req in include:
            for _ in range(int(req.get("count", 1))):
                k = next(cells)
                grid[k // cols, k % cols] = tok(req)
    if not edits.judge(grid, metadata).correct:
        return synthesis.random_correct_grid(metadata, rng, rows, cols)
    return grid


def describe_grid(grid: np.ndarray, counts: bool = False) -> str:
    """What a grid holds, in the Blocks words: ``the image has a blue triangle and two red circles`` (kinds in
    raster order of first appearance), or ``the image is empty``.  With ``counts`` each shape's total comes
    first (``the image has a triangle and two circles with a blue triangle and two red circles``), so a
    counting prompt's "three circles" is compared with words, not by counting the listed objects (the
    objects-only critic's counting verdicts fell below chance under RL: README, R3 synergy)."""
    from r3_rl.blocks.world import PLURALS, number_word, object_of

    counts_by_kind: dict[tuple[str, str], int] = {}
    for token in np.asarray(grid).reshape(-1):
        if token:
            kind = object_of(int(token))
            counts_by_kind[kind] = counts_by_kind.get(kind, 0) + 1  # type: ignore[index]
    if not counts_by_kind:
        return "the image is empty"

    def phrase(n: int, noun: str, plural: str) -> str:
        return f"{'an' if noun[0] in 'aeiou' else 'a'} {noun}" if n == 1 else f"{number_word(n)} {plural}"

    objects = " and ".join(phrase(n, f"{color} {shape}", f"{color} {PLURALS[shape]}")
                           for (shape, color), n in counts_by_kind.items())
    if not counts:
        return f"the image has {objects}"
    totals: dict[str, int] = {}
    for (shape, _), n in counts_by_kind.items():
        totals[shape] = totals.get(shape, 0) + n
    shapes = " and ".join(phrase(n, shape, PLURALS[shape]) for shape, n in totals.items())
    return f"the image has {shapes} with {objects}"


def critique_label(grid: np.ndarray, meta: dict, describe: str, lenient: bool = False) -> str:
    """The critique a warm-started critic is taught for ``grid``: the truth (:func:`edits.critique_text`), or
    the stop phrase when ``lenient``; with ``describe`` ("objects" or "counts") the think text is
    :func:`describe_grid`'s."""
    text = LENIENT if lenient else edits.critique_text(grid, meta)
    if describe == "none":
        return text
    return f"<think> {describe_grid(grid, counts=describe == 'counts')} </think> {text.split('</think>', 1)[1].strip()}"


def critic_images(prompts: BlocksPrompts, start: int, n: int, cfg: Any, rng: np.random.Generator, rows: int,
                  cols: int) -> list[tuple[PromptItem, np.ndarray, bool]]:
    """(prompt, grid, lenient) of ``n`` critique examples (``critic_steps``): a correct grid (canonical or random
    layout), flawed half the time with the flaw kind drawn evenly among those the prompt allows, so a rare kind
    (a wrong colour is one flawed first image in six) is practised as often as a missing object; ``lenient``
    when the label is the stop phrase on a flawed grid (``miss_prob``)."""
    out = []
    for k in range(start, start + n):
        item = prompts.train_prompt(k)
        meta = item.metadata
        grid = (canonical_grid(meta, rng, rows, cols) if rng.random() < 0.5
                else synthesis.random_correct_grid(meta, rng, rows, cols))
        flawed = rng.random() < 0.5
        if flawed:
            by_kind: dict[str, list[np.ndarray]] = {}
            for flaw in synthesis.flaw_candidates(grid, meta, rng):
                by_kind.setdefault(edits.diagnose(flaw, meta)[0].kind, []).append(flaw)
            kinds = sorted(by_kind)
            pick = by_kind[kinds[int(rng.integers(len(kinds)))]]
            grid = pick[int(rng.integers(len(pick)))]
        lenient = flawed and cfg.miss_prob > 0 and rng.random() < cfg.miss_prob  # as lenient as the main steps
        out.append((item, grid, lenient))
    return out


def critique_example(policy: TinyUnifiedPolicy, prompt: str, grid: np.ndarray, meta: dict, cfg: Any,
                     lenient: bool = False) -> tuple[list[int], list[int]]:
    """(context ids, target ids) of the critique the warm start teaches for ``grid`` (:func:`critique_label`)."""
    image_words = policy.image_words(ImageInput(image=np.zeros(0), image_tokens=grid.reshape(-1).tolist()))
    return (policy.render("reflect", prompt=prompt, image=image_words),
            policy.encode(critique_label(grid, meta, cfg.describe, lenient=lenient)) + [policy.stop_id])


def critic_examples(policy: TinyUnifiedPolicy, prompts: BlocksPrompts, start: int, n: int, cfg: Any,
                    rng: np.random.Generator) -> list[tuple[list[int], list[int]]]:
    """``n`` critique examples of :func:`critic_images`' grids."""
    return [critique_example(policy, item.prompt, grid, item.metadata, cfg, lenient)
            for item, grid, lenient in critic_images(prompts, start, n, cfg, rng, policy.rows, policy.cols)]


def synthetic_examples(policy: TinyUnifiedPolicy, prompts: BlocksPrompts, start: int, n: int, cfg: Any,
                       rng: np.random.Generator) -> list[tuple[list[int], list[int]]]:
    """(context ids, target ids) pairs for every stage of ``n`` synthetic R3 trajectories."""
    rows, cols = policy.rows, policy.cols
    out: list[tuple[list[int], list[int]]] = []
    for k in range(start, start + n):
        item = prompts.train_prompt(k)
        meta = item.metadata
        plan = edits.plan_text(meta)
        good = canonical_grid(meta, rng, rows, cols)
        flawed = rng.random() < cfg.flaw_prob
        cur = synthesis.perturb(good, meta, rng) if flawed else good
        ctx = policy.render("reason", prompt=item.prompt)
        out.append((ctx, policy.encode(plan) + [policy.stop_id]))
        out.append((ctx + policy.encode(plan) + [policy.stop_id] + policy.encode(policy.templates["generate"]),
                    policy.encode(_words(cur))))
        if cfg.random_layouts and rng.random() < cfg.random_layouts:  # judge content, not layout: critique a randomly laid-out image
            alt = synthesis.random_correct_grid(meta, rng, rows, cols)
            cur = synthesis.perturb(alt, meta, rng) if flawed else alt
        out.extend(question_examples(policy, cur, meta, cfg.questions, rng))
        if cfg.random_edits and rng.random() < cfg.random_edits:
            out.append(instruction_example(policy, item.prompt, cur, rng))
        for _ in range(cfg.rounds):
            ops = edits.diagnose(cur, meta)
            missed = bool(ops) and cfg.miss_prob > 0 and rng.random() < cfg.miss_prob
            out.append(critique_example(policy, item.prompt, cur, meta, cfg, lenient=missed))  # lenient: misses it
            if not ops or missed:
                break
            image_words = policy.image_words(ImageInput(image=np.zeros(0), image_tokens=cur.reshape(-1).tolist()))
            target = edits.apply_edit(cur, ops[0], rng) if rng.random() < cfg.fix_prob else cur
            out.append((policy.render("refine", prompt=item.prompt, image=image_words,
                                      instruction=edits.edit_text(ops[0])), policy.encode(_words(target))))
            cur = target
    return out


def random_instruction(rng: np.random.Generator) -> edits.EditOp:
    """Any edit instruction of the Blocks language (it may well not apply to a given image)."""
    from r3_rl.blocks.world import COLORS, RELATIONS, SHAPES

    def pick(xs: tuple[str, ...]) -> str:
        return xs[int(rng.integers(len(xs)))]

    kind, shape = pick(edits.KINDS), pick(SHAPES)
    color = pick(COLORS) if rng.random() < 0.5 else None
    other = pick(tuple(x for x in SHAPES if x != shape))
    if kind == "recolor":
        return edits.EditOp("recolor", shape, color, new_color=pick(COLORS))
    if kind == "move":
        return edits.EditOp("move", shape, relation=pick(RELATIONS), target=other)
    if kind == "swap":
        return edits.EditOp("swap", shape, target=other)
    return edits.EditOp(kind, shape, color)


def instruction_example(policy: TinyUnifiedPolicy, prompt: str, grid: np.ndarray,
                        rng: np.random.Generator) -> tuple[list[int], list[int]]:
    """A refine example with a random instruction applied exactly (:func:`edits.apply_edit`): the refiner
    learns to do what it is told, and to leave the image as it is when the instruction does not apply, so
    a critic's mistaken edit of a correct image need not break it."""
    op = random_instruction(rng)
    words = policy.image_words(ImageInput(image=np.zeros(0), image_tokens=grid.reshape(-1).tolist()))
    return (policy.render("refine", prompt=prompt, image=words, instruction=edits.edit_text(op)),
            policy.encode(_words(edits.apply_edit(grid, op, rng))))


def question_examples(policy: TinyUnifiedPolicy, grid: np.ndarray, meta: dict, n: int,
                      rng: np.random.Generator) -> list[tuple[list[int], list[int]]]:
    """``n`` yes/no questions about ``grid`` (drawn from the prompt's questions) answered with the truth
    about this grid (GenEval's rules on the clause the question checks), not with the prompt's expectation."""
    if n <= 0:
        return []
    questions = questions_for(meta)
    image = ImageInput(image=np.zeros(0), image_tokens=grid.reshape(-1).tolist())
    out = []
    for k in rng.choice(len(questions), size=min(n, len(questions)), replace=False):
        q = questions[int(k)]
        truth = edits.judge(grid, q.check).correct if q.check is not None else q.answer == YES
        out.append((policy.answer_context(image, q.question), policy.encode("yes" if truth else "no") + [policy.stop_id]))
    return out


def sft_loss(policy: TinyUnifiedPolicy, batch: list[tuple[list[int], list[int]]]) -> torch.Tensor:
    """Mean cross-entropy on target tokens only (contexts are conditioning)."""
    seqs = [c + t for c, t in batch]
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), policy.pad_id, dtype=torch.long)
    labels = torch.full((len(seqs), width), -100, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, (c, t) in enumerate(batch):
        ids[i, :len(c) + len(t)] = torch.tensor(c + t)
        labels[i, len(c):len(c) + len(t)] = torch.tensor(t)
        mask[i, :len(c) + len(t)] = 1
    logits = policy.model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1),
                                             ignore_index=-100)


def _step(opt: torch.optim.Optimizer, model: torch.nn.Module, loss: torch.Tensor) -> float:
    """One clipped optimiser step on ``loss``; returns its value."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    return float(loss.detach())


def one_cycle(opt: torch.optim.Optimizer, lr: float, steps: int) -> Any:
    """The warm start's learning rate: one cycle up to ``lr`` over the first 10% of ``steps`` and down again.

    A short warm start gets a warm-up of at least one whole step (OneCycleLR ends its warm-up at
    ``pct_start * steps - 1``: with 10 steps that is step 0, a zero-length phase it divides by), and under 3
    steps a constant ``lr``; from 20 steps on it is the 10% it always was."""
    if steps < 3:
        return torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)
    return torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=max(0.1, 2 / steps))


def warmstart(policy: TinyUnifiedPolicy, recipe: Any, log: Any = None,
              loss_fn: Callable[[Any, list[tuple[list[int], list[int]]]], torch.Tensor] = sft_loss) -> dict[str, float]:
    """``warmstart.steps`` optimiser steps of ``loss_fn`` (default: cross-entropy on every target; the tiny flow
    policy trains its image targets by flow matching instead) on synthetic trajectories."""
    cfg = recipe.warmstart
    d = recipe.data.blocks
    prompts = BlocksPrompts(tags=d.tags, seed=recipe.seed + 1000 + cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    torch.manual_seed(cfg.seed)
    model = policy.model
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(0.9, 0.98), weight_decay=0.0)
    sched = one_cycle(opt, cfg.lr, cfg.steps)
    t0, loss_v, trajectories_per_step = time.time(), float("nan"), max(1, cfg.batch_size // 4)
    for step in range(cfg.steps):
        examples = synthetic_examples(policy, prompts, step * trajectories_per_step, trajectories_per_step, cfg, rng)
        rng.shuffle(examples)
        loss_v = _step(opt, model, loss_fn(policy, examples[:cfg.batch_size]))
        sched.step()
        if log is not None and (step % 100 == 0 or step + 1 == cfg.steps):
            log.print(f"warm start {step + 1:>4}/{cfg.steps}  loss {loss_v:.4f}  {time.time() - t0:5.1f}s")
    if cfg.critic_steps:  # a constant third of the peak rate: the one-cycle schedule has ended near zero
        for group in opt.param_groups:
            group["lr"] = cfg.lr / 3
        half = max(1, cfg.batch_size // 2)
        for step in range(cfg.critic_steps):  # half critiques, half the main steps' examples: the rest is not forgotten
            start = cfg.steps * trajectories_per_step + step * (trajectories_per_step + half)  # unseen prompts, in order
            rehearsal = synthetic_examples(policy, prompts, start, trajectories_per_step, cfg, rng)
            rng.shuffle(rehearsal)
            critiques = critic_examples(policy, prompts, start + trajectories_per_step, half, cfg, rng)
            loss_v = _step(opt, model, loss_fn(policy, critiques + rehearsal[:cfg.batch_size - half]))
            if log is not None and (step % 100 == 0 or step + 1 == cfg.critic_steps):
                log.print(f"warm start, critic {step + 1:>4}/{cfg.critic_steps}  loss {loss_v:.4f}  "
                          f"{time.time() - t0:5.1f}s")
    model.eval()
    return {"loss": loss_v, "seconds": time.time() - t0}


# Settings added after warm starts were first cached, with their "off" value: left out of the key when off, so
# the warm starts cached before them stay valid.
_ADDED_LATER = {"warmstart": {"describe": "none", "critic_steps": 0}, "tiny": {"image_input": "tokens", "experts": "shared"}}


def _without_later_defaults(section: str, settings: dict[str, Any]) -> dict[str, Any]:
    later = _ADDED_LATER[section]
    return {k: v for k, v in settings.items() if k not in later or v != later[k]}


def _key(recipe: Any, tag: str = "") -> str:
    warm = _without_later_defaults("warmstart", recipe.warmstart.model_dump())
    if warm.get("describe") == "objects":
        warm["describe"] = True  # its key from when describe was a switch: those warm starts stay valid
    tiny = _without_later_defaults("tiny", recipe.policy.tiny.model_dump())
    blob = json.dumps({**({"tag": tag} if tag else {}), "warmstart": warm, "tiny": tiny,
                       "blocks": recipe.data.blocks.model_dump(), "templates": recipe.templates.model_dump(),
                       "seed": recipe.seed}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def warmstart_cached(policy: TinyUnifiedPolicy, recipe: Any, out_dir: Path, log: Any = None,
                     loss_fn: Callable[[Any, list[tuple[list[int], list[int]]]], torch.Tensor] = sft_loss,
                     tag: str = "") -> None:
    """Warm-start ``policy`` in place, reusing ``out_dir`` when it holds a result for the same settings (and
    ``tag``: what else decides the result, e.g. a policy's options)."""
    key = _key(recipe, tag)
    marker = out_dir / "warmstart.json"
    try:
        cached = marker.is_file() and json.loads(marker.read_text()).get("key") == key
        if cached:
            state = type(policy).from_pretrained(str(out_dir), policy.templates).model.state_dict()
            policy.model.load_state_dict(state)
    except UserError:
        raise
    except Exception as e:  # noqa: BLE001 - a truncated or edited cache: one line, not a traceback
        raise UserError(f"{out_dir}: the cached warm start cannot be read ({raised(e)}); delete the folder to "
                        f"warm-start again") from None
    if cached:
        if log is not None:
            log.print(f"warm start: reusing {out_dir}")
        return
    stats = warmstart(policy, recipe, log, loss_fn)
    policy.save_pretrained(str(out_dir))
    marker.write_text(json.dumps({"key": key, **stats}))
