"""Understanding, measured in every evaluation: does the critic see what the eval reward sees?

R3's claim is that the loop improves generation *and* understanding.  Accuracy per round measures the
first; these measure the second, always against the eval reward's ground truth (for any policy and any
eval reward):

* **verdict** -- every reflect node's verdict ("no further edit needed" or an edit) against the eval
  reward's judgement of the image it critiqued: the stop rate on correct images, the edit rate on flawed
  images and their mean, the *balanced accuracy* (0.5 = a critic that cannot tell them apart, whatever
  its stop rate), overall, per round and per tag.  A critic that always stops scores 0.5, not its stop
  rate on a mostly-correct eval set.  The mean of the per-tag figures (*within tags*) is reported beside it:
  a critic that reads only the prompt's tag scores 0.5 there however the tags' base rates differ.
* **yes/no** -- where the prompt carries yes/no questions (TIIF lists, questions derived from GenEval /
  Blocks metadata by :mod:`r3_rl.rewards.checklists`), the policy's answers about its *own* images
  against the truth about that image.  A question derived from a GenEval clause carries that clause
  (``YesNo.check``), and its truth is the eval reward's verdict on the clause alone; a question without
  one (TIIF) is only counted on images the eval reward judges correct, where the expected answers hold.
* **reference** -- both measures on a fixed set of reference images, correct and deliberately flawed
  (:func:`r3_rl.blocks.reference.reference_pairs`, or a user's jsonl), so that understanding is measured
  on the same images before and after RL, not only on images the model happened to draw.

All maths here is pure (:func:`verdict_report`, :func:`yes_no_summary`); the functions that ask the
policy (:func:`ask_yes_no`, :func:`reference_report`) batch their calls and never sample beyond the
eval's own reflect settings.
"""
from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass
from typing import Any, Iterable

import numpy as np
import torch

from r3_rl.errors import UserError
from r3_rl.policy.base import ImageInput, Policy, parse_critique
from r3_rl.rewards.base import RewardSample
from r3_rl.rewards.checklists import YES, questions_for
from r3_rl.rewards.reward_set import RewardSet
from r3_rl.trajectory import PromptItem, ReferenceImage, SamplingParams, Tree


def _rate(hits: int, n: int) -> float:
    return hits / n if n else float("nan")


@dataclass
class VerdictTally:
    """Counts of critiques by (critiqued image correct?, verdict)."""

    correct: int = 0
    stop_on_correct: int = 0
    flawed: int = 0
    edit_on_flawed: int = 0

    def add(self, image_correct: bool, stop: bool) -> None:
        if image_correct:
            self.correct += 1
            self.stop_on_correct += stop
        else:
            self.flawed += 1
            self.edit_on_flawed += not stop

    def summary(self) -> dict[str, float]:
        stop_ok, edit_ok = _rate(self.stop_on_correct, self.correct), _rate(self.edit_on_flawed, self.flawed)
        n = self.correct + self.flawed
        stops = self.stop_on_correct + (self.flawed - self.edit_on_flawed)
        return {"correct_images": self.correct, "flawed_images": self.flawed,
                "stop_on_correct": stop_ok, "edit_on_flawed": edit_ok,
                "balanced_accuracy": (stop_ok + edit_ok) / 2,  # NaN unless both kinds were critiqued
                "accuracy": _rate(self.stop_on_correct + self.edit_on_flawed, n), "stop_rate": _rate(stops, n)}


Verdict = tuple[bool, bool, int, str]  # (critiqued image correct, stop, round, tag)


def verdict_report(verdicts: Iterable[Verdict]) -> dict[str, Any]:
    """``{"overall": summary, "per_round": {round: summary}, "per_tag": {tag: summary}}``.

    ``overall`` also carries ``within_tag_balanced_accuracy``: the mean of the per-tag balanced accuracies
    (tags with both correct and flawed images).  The pooled figure rewards a critic that reads only the
    prompt: when tags differ in how often their images are correct, "always stop on single objects, always
    edit on colour pairs" scores well above 0.5 pooled and exactly 0.5 within every tag.  Looking at the
    image is what raises the within-tag figure."""
    overall = VerdictTally()
    per_round: dict[int, VerdictTally] = defaultdict(VerdictTally)
    per_tag: dict[str, VerdictTally] = defaultdict(VerdictTally)
    for correct, stop, rnd, tag in verdicts:
        for tally in (overall, per_round[rnd], per_tag[tag]):
            tally.add(correct, stop)
    tags = {tag: t.summary() for tag, t in sorted(per_tag.items())}
    summary = overall.summary()
    summary["within_tag_balanced_accuracy"] = within_tag_balanced_accuracy(tags)
    return {"overall": summary, "per_round": {str(r): t.summary() for r, t in sorted(per_round.items())},
            "per_tag": tags}


def tags_with_both_kinds(per_tag: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """The per-tag summaries with both correct and flawed images: those the within-tag figure averages."""
    return [v for v in per_tag.values() if v.get("correct_images") and v.get("flawed_images")]


def within_tag_balanced_accuracy(per_tag: dict[str, dict[str, Any]]) -> float:
    """Mean balanced accuracy over the tags that have both correct and flawed images (NaN if none does)."""
    both = [v["balanced_accuracy"] for v in tags_with_both_kinds(per_tag)]
    return sum(both) / len(both) if both else float("nan")


def balanced_accuracy_on_mix(rates: dict[str, dict[str, Any]], counts: dict[str, dict[str, Any]]) -> float:
    """The pooled verdict balanced accuracy a critic with per-tag ``rates`` (``stop_on_correct``,
    ``edit_on_flawed``) would score on images in the per-tag numbers of ``counts`` (``correct_images``,
    ``flawed_images``); both are a :func:`verdict_report`'s ``per_tag``.

    Why: the pooled figure moves when the generator changes which tags its flaws fall in, even if the critic
    reads no better or worse.  The before-RL critic's rates on the after-RL images' counts is what the flaw mix
    alone does to the pooled figure (README: R3 synergy, session 28; ``benchmarks/verdict_mix.py``).  With a
    report's own rates and counts it is that report's pooled balanced accuracy.  NaN when ``counts`` has images
    of a kind in a tag whose rate for that kind ``rates`` lacks, or no images of one kind at all."""
    totals = {"correct": 0.0, "flawed": 0.0}
    hits = {"correct": 0.0, "flawed": 0.0}
    for tag, c in counts.items():
        for kind, rate_key in (("correct", "stop_on_correct"), ("flawed", "edit_on_flawed")):
            n = c.get(f"{kind}_images") or 0
            if not n:
                continue
            rate = rates.get(tag, {}).get(rate_key)
            if rate is None or rate != rate:  # missing or NaN: that tag's critic never judged such an image
                return float("nan")
            totals[kind] += n
            hits[kind] += n * rate
    if not totals["correct"] or not totals["flawed"]:
        return float("nan")
    return (hits["correct"] / totals["correct"] + hits["flawed"] / totals["flawed"]) / 2


def within_tags(block: dict[str, Any]) -> float:
    """A verdict block's within-tag figure; a report written before the figure existed gets it from its
    per-tag summaries."""
    overall = block.get("overall", {})
    if "within_tag_balanced_accuracy" in overall or not block.get("per_tag"):
        return float(overall.get("within_tag_balanced_accuracy", float("nan")))
    return within_tag_balanced_accuracy(block["per_tag"])


def chain_verdicts(trees: list[Tree], correct_threshold: float) -> list[Verdict]:
    """Every critique of an eval chain against the eval score of the image it critiqued (set by
    :func:`r3_rl.eval.evaluate.score_chains`); critiques of an image whose eval reward failed are left out."""
    out: list[Verdict] = []
    for t in trees:
        for n in t.nodes.values():
            if n.stage != "reflect" or n.parent is None:
                continue
            score = t.nodes[n.parent].meta.get("eval_score")
            if isinstance(score, (int, float)):
                out.append((score >= correct_threshold, bool(n.stop), n.round, t.prompt.tag))
    return out


# ---------------------------------------------------------------------------------------------- yes/no
@dataclass
class JudgedImage:
    """An image to ask questions about: its prompt, pixels (+ tokens) and the eval reward's verdict."""

    prompt: PromptItem
    image: ImageInput
    correct: bool | None  # None: the eval reward failed on it


def yes_no_summary(answers: list[tuple[float, bool, str]]) -> dict[str, float]:
    """``answers``: (P(yes), truth is yes, tag) per question -> accuracy overall, on yes- and no-truths,
    their balanced mean, and per tag."""
    def acc(rows: list[tuple[float, bool, str]]) -> float:
        return _rate(sum((p > 0.5) == truth for p, truth, _ in rows), len(rows))

    yes = [a for a in answers if a[1]]
    no = [a for a in answers if not a[1]]
    out: dict[str, Any] = {"questions": len(answers), "accuracy": acc(answers), "yes_truths": len(yes),
                           "accuracy_on_yes": acc(yes), "accuracy_on_no": acc(no),
                           "balanced_accuracy": (acc(yes) + acc(no)) / 2}
    tags = sorted({t for _, _, t in answers})
    out["per_tag"] = {t: acc([a for a in answers if a[2] == t]) for t in tags}
    return out


def ask_yes_no(policy: Policy, images: list[JudgedImage], rewards: RewardSet, correct_threshold: float,
               max_questions: int | None = None, batch_size: int = 256) -> dict[str, Any]:
    """The policy's yes/no answers about ``images`` against their truth (module docstring); a policy that
    cannot answer questions gives ``{"available": False, "why": ...}``."""
    asks: list[tuple[int, str, bool | None]] = []  # (image index, question, truth if known now)
    checks: list[tuple[int, RewardSample]] = []  # (position in asks, sample judging the question's clause)
    for i, im in enumerate(images):
        try:
            questions = questions_for(im.prompt.metadata)[:max_questions]
        except UserError:
            continue  # a prompt without questions
        tag = im.prompt.metadata.get("tag")  # judged as the eval reward judges the prompt (GenEval: counting threshold)
        for q in questions:
            if q.check is not None:
                meta = q.check if tag is None else {**q.check, "tag": tag}
                checks.append((len(asks), RewardSample(prompt=im.prompt.prompt, metadata=meta, stage="generate",
                                                       round=0, image=im.image.image)))
                asks.append((i, q.question, None))
            elif im.correct:  # no clause to judge: the expected answers hold on a correct image only
                asks.append((i, q.question, q.answer == YES))
    if not asks:
        return {"available": False, "why": "no yes/no questions for these prompts"}
    truths: list[bool | None] = [t for _, _, t in asks]
    for (k, _), res in zip(checks, rewards.score([s for _, s in checks]) if checks else []):
        truths[k] = None if res.total is None else bool(res.total >= correct_threshold)
    keep = [k for k, t in enumerate(truths) if t is not None]
    probs: list[float] = []
    try:
        for start in range(0, len(keep), batch_size):
            chunk = keep[start:start + batch_size]
            probs.extend(policy.answer_yes_no([images[asks[k][0]].image for k in chunk], [asks[k][1] for k in chunk]))
    except NotImplementedError as e:
        return {"available": False, "why": str(e)}
    rows = [(float(p), bool(truths[k]), images[asks[k][0]].prompt.tag) for k, p in zip(keep, probs)]
    return {"available": True, **yes_no_summary(rows)}


# ---------------------------------------------------------------------------------------------- reference set
def reference_report(policy: Policy, refs: list[ReferenceImage], reflect: SamplingParams, stop_phrase: str,
                     rewards: RewardSet, correct_threshold: float, seed: int = 0, yes_no: bool = True,
                     batch_size: int = 256, max_questions: int | None = None) -> dict[str, Any]:
    """Verdicts (and yes/no answers, at most ``max_questions`` per image as on the model's own images) of
    ``policy`` on the reference images, judged by the eval reward."""
    scored = rewards.score([RewardSample(prompt=r.prompt.prompt, metadata=r.prompt.metadata, stage="generate",
                                         round=0, image=r.image) for r in refs])
    correct = [None if s.total is None else bool(s.total >= correct_threshold) for s in scored]
    inputs = [ImageInput(r.image, r.image_tokens) for r in refs]
    gen = torch.Generator().manual_seed(seed)
    verdicts: list[Verdict] = []
    kinds: list[tuple[str, bool, bool]] = []  # (built kind, judged correct, stopped)
    stops: list[bool | None] = [None] * len(refs)
    for start in range(0, len(refs), batch_size):
        idx = range(start, min(start + batch_size, len(refs)))
        crits = policy.reflect([refs[i].prompt for i in idx], [inputs[i] for i in idx], reflect, gen)
        for i, c in zip(idx, crits):
            if correct[i] is not None:
                stop = stops[i] = parse_critique(c.text, stop_phrase)[1]
                verdicts.append((bool(correct[i]), stop, 1, refs[i].prompt.tag))
                kinds.append((refs[i].kind, bool(correct[i]), stop))
    # per image, in the set's order: the before/after change is then a paired difference on the same images
    # (:func:`r3_rl.eval.synergy.reference_gain_variance`); None where the eval reward failed
    out: dict[str, Any] = {"images": len(refs), "failed": sum(c is None for c in correct),
                           "verdict": verdict_report(verdicts), "per_kind": per_kind_report(kinds),
                           "per_image": {"judged_correct": correct, "stop": stops}}
    if yes_no:
        out["yes_no"] = ask_yes_no(policy, [JudgedImage(r.prompt, x, c) for r, x, c in zip(refs, inputs, correct)],
                                   rewards, correct_threshold, max_questions, batch_size=batch_size)
    return out


def per_kind_report(rows: Iterable[tuple[str, bool, bool]]) -> dict[str, dict[str, float]]:
    """``{kind: {"images", "judged_correct", "stop_rate"}}`` over (built kind, judged correct, stopped) rows:
    which mistakes the critic passes.  A reference image's kind is how it was built (Blocks: ``correct`` or
    ``flawed:<first fix>``; a user's jsonl: its ``kind`` field); ``judged_correct`` is the eval reward's share,
    a check that the label and the reward agree."""
    tally: dict[str, list[int]] = defaultdict(lambda: [0, 0, 0])
    for kind, judged_correct, stop in rows:
        t = tally[kind]
        t[0], t[1], t[2] = t[0] + 1, t[1] + judged_correct, t[2] + stop
    return {kind: {"images": n, "judged_correct": ok / n, "stop_rate": stops / n}
            for kind, (n, ok, stops) in sorted(tally.items())}


def headline(report: dict[str, Any]) -> dict[str, float]:
    """The understanding figures a reader looks at first, flat (NaN where not measured)."""
    u = report.get("understanding", {})
    nan = float("nan")
    verdict = u.get("verdict", {})
    out = {"verdict_balanced_accuracy": verdict.get("overall", {}).get("balanced_accuracy", nan),
           "verdict_within_tag_balanced_accuracy": within_tags(verdict)}
    yn = u.get("yes_no", {})
    out["yes_no_accuracy"] = yn.get("accuracy", nan) if yn.get("available") else nan
    ref = u.get("reference")
    if ref:
        out["reference_balanced_accuracy"] = ref["verdict"]["overall"]["balanced_accuracy"]
        ryn = ref.get("yes_no", {})
        out["reference_yes_no_accuracy"] = ryn.get("accuracy", nan) if ryn.get("available") else nan
    return {k: (float(v) if isinstance(v, (int, float)) and math.isfinite(v) else nan) for k, v in out.items()}


def load_references(path: str) -> list[ReferenceImage]:
    """A user's reference set: jsonl lines ``{"prompt", "image": PNG path (relative to the file), "kind"?,
    "metadata"?}`` (without ``metadata`` the line's other keys are the metadata, as in GenEval files)."""
    from pathlib import Path

    from PIL import Image

    from r3_rl.jsonl import read_jsonl_objects
    from r3_rl.textfiles import NotRegularFile, open_if_regular

    p = Path(path)
    if not p.is_file():
        raise UserError(f"eval.understanding.reference: {path}: file not found (a jsonl of {{prompt, image}} lines, "
                        f"'auto' or null)")
    out = []
    for lineno, rec in read_jsonl_objects(p):
        if not isinstance(rec.get("prompt"), str) or not isinstance(rec.get("image"), str):
            raise UserError(f"{p}:{lineno}: needs string fields 'prompt' and 'image' (a PNG path)")
        img_path = p.parent / rec["image"]
        try:  # a FIFO named as an image would block the eval before it starts: refused
            with open_if_regular(img_path) as fh, Image.open(fh) as im:
                pixels = np.asarray(im.convert("RGB"), dtype=np.uint8)
        except (OSError, NotRegularFile, Image.DecompressionBombError) as e:
            raise UserError(f"{p}:{lineno}: cannot read image {img_path}: {e}") from None
        meta = rec.get("metadata") or {k: v for k, v in rec.items() if k not in ("prompt", "image", "kind")}
        out.append(ReferenceImage(PromptItem(id=f"ref-{lineno}", prompt=rec["prompt"], metadata=meta), pixels, None,
                                  str(rec.get("kind", "unknown"))))
    return out


def build_references(recipe: Any, eval_prompts: Any) -> list[ReferenceImage]:
    """The reference set ``eval.understanding.reference`` names (``eval_prompts(n)`` gives held-out prompts)."""
    u = recipe.eval.understanding
    if u.reference is None:
        return []
    if u.reference != "auto":
        return load_references(u.reference)
    if recipe.data.source != "blocks":
        return []
    from r3_rl.blocks.reference import reference_pairs

    b = recipe.data.blocks
    return reference_pairs(eval_prompts(u.reference_size), recipe.seed, b.rows, b.cols)
