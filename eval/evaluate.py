"""Per-round GenEval-style evaluation of R3 chains.

For each held-out prompt: one R3 chain with the eval sampling settings (greedy or low temperature,
up to ``eval.rounds`` refine rounds, stop on "no further edit needed").  Every image standing after
each round is scored with the recipe's eval rewards; a sample is correct when the eval reward reaches
``correct_threshold`` (GenEval's binary ``correct`` for the ``blocks``/``geneval`` rewards).

Reports overall and per-tag accuracy per round, improved / worse / unchanged counts between
consecutive rounds and between the first and the last round, stop rate and mean rounds used, and
understanding (the critic's verdicts and yes/no answers against the eval reward's ground truth, on the
chains' images and on a fixed reference set: :mod:`r3_rl.eval.understanding`), as a JSON-ready dict and a
markdown table.
"""
from __future__ import annotations

import json
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

from r3_rl.errors import UserError
from r3_rl.eval.understanding import (
    JudgedImage, ReferenceImage, ask_yes_no, chain_verdicts, reference_report, verdict_report,
)
from r3_rl.policy.base import ImageInput, Policy
from r3_rl.rewards.reward_set import RewardFailureError, RewardSet
from r3_rl.rollout.chain import images_by_round, r3_chains, rounds_used, stopped
from r3_rl.rollout.scoring import reward_sample
from r3_rl.rollout.tree_rl import StageSampling
from r3_rl.tracking.views import spread_sample
from r3_rl.trajectory import PromptItem, Tree


def score_chains(trees: list[Tree], rounds: int, rewards: RewardSet, correct_threshold: float) -> list[list[Any]]:
    """``correct[i][r]``: True/False per tree and round (None where the eval reward failed)."""
    unique: dict[tuple[str, str], Any] = {}
    for t in trees:
        for n in images_by_round(t, rounds):
            unique[(t.id, n.id)] = (t, n)
    keys = list(unique)
    results = rewards.score([reward_sample(*unique[k]) for k in keys]) if keys else []
    by_key = dict(zip(keys, results))
    for (tid, nid), res in by_key.items():
        node = unique[(tid, nid)][1]
        node.meta["eval_score"] = res.total
        node.meta["eval_parts"] = res.parts
        if res.failures:  # why, for the report's failure reasons and `r3-rl inspect`
            node.meta["eval_failure"] = "; ".join(f"{k}: {v}" for k, v in res.failures.items())
    out = []
    for t in trees:
        row = []
        for n in images_by_round(t, rounds):
            total = by_key[(t.id, n.id)].total
            row.append(None if total is None else bool(total >= correct_threshold))
        out.append(row)
    return out


def eval_scores(trees: list[Tree], rounds: int) -> list[list[float | None]]:
    """``score[i][r]``: the eval reward's total per tree and round (after :func:`score_chains`; None: failed)."""
    return [[n.meta.get("eval_score") for n in images_by_round(t, rounds)] for t in trees]


def changes(correct: list[list[Any]], first: int, last: int) -> tuple[int, int, int]:
    """(improved, worse, scored) between rounds ``first`` and ``last`` over the chains scored at both."""
    pairs = [(row[first], row[last]) for row in correct if row[first] is not None and row[last] is not None]
    return (sum(1 for a, b in pairs if not a and b), sum(1 for a, b in pairs if a and not b), len(pairs))


def tag_mean(per_tag: dict[str, list[float]], rounds: int) -> list[float]:
    """Per round, the mean of the tags' accuracies: GenEval's headline "Overall score (avg. over tasks)" in its
    ``summary_scores.py``.  ``accuracy`` is the mean over prompts, GenEval's "% correct images"; the two differ
    when tags hold different numbers of prompts.  NaN when a tag has no scored image that round (its eval
    reward failed on all of them): a mean over the other tags is not GenEval's overall score."""
    out = []
    for r in range(rounds + 1):
        vals = [v[r] for v in per_tag.values()]
        out.append(sum(vals) / len(vals) if vals and all(v == v for v in vals) else float("nan"))
    return out


def summarise(trees: list[Tree], correct: list[list[Any]], rounds: int,
              scores: list[list[float | None]] | None = None) -> dict[str, Any]:
    """The report's accuracy figures; with ``scores`` (:func:`eval_scores`) also ``score_mean`` overall and per
    tag: the mean eval reward, which for a fractional reward (TIIF's questions: the share answered right) is the
    benchmark's own headline, where ``accuracy`` counts a prompt only when every question is right."""
    n = len(trees)
    report: dict[str, Any] = {"prompts": n, "rounds": rounds, "accuracy": [], "per_tag": {}, "transitions": [],
                              "failed": [sum(1 for row in correct if row[r] is None) for r in range(rounds + 1)]}
    tags: dict[str, list[int]] = defaultdict(list)
    for i, t in enumerate(trees):
        tags[t.prompt.tag].append(i)

    def scored(idx: list[int], r: int) -> list[bool]:
        return [correct[i][r] for i in idx if correct[i][r] is not None]  # a failed eval reward is no draw

    def acc(idx: list[int], r: int) -> float:
        vals = scored(idx, r)
        return sum(vals) / len(vals) if vals else float("nan")

    everyone = list(range(n))
    report["accuracy"] = [acc(everyone, r) for r in range(rounds + 1)]
    report["per_tag"] = {tag: [acc(idx, r) for r in range(rounds + 1)] for tag, idx in sorted(tags.items())}
    report["accuracy_tag_mean"] = tag_mean(report["per_tag"], rounds)
    report["tag_counts"] = {tag: len(idx) for tag, idx in sorted(tags.items())}
    # per tag and round, the prompts whose image the eval reward scored (the accuracies' denominators)
    report["scored"] = {tag: [len(scored(idx, r)) for r in range(rounds + 1)] for tag, idx in sorted(tags.items())}
    for r in range(1, rounds + 1):
        imp, worse, scored = changes(correct, r - 1, r)
        report["transitions"].append({"round": r, "improved": imp, "worse": worse, "unchanged": scored - imp - worse})
    # first image against the last round, per prompt: the paired counts behind refinement's standard error
    imp, worse, scored = changes(correct, 0, rounds)
    report["refinement"] = {"improved": imp, "worse": worse, "pairs": scored}
    if scores is not None:
        def mean_score(idx: list[int], r: int) -> float:
            vals = [scores[i][r] for i in idx if scores[i][r] is not None]
            return sum(vals) / len(vals) if vals else float("nan")

        report["score_mean"] = [mean_score(everyone, r) for r in range(rounds + 1)]
        report["score_mean_per_tag"] = {tag: [mean_score(idx, r) for r in range(rounds + 1)]
                                        for tag, idx in sorted(tags.items())}
    report["stop_rate"] = sum(stopped(t) for t in trees) / n if n else 0.0
    report["mean_rounds_used"] = sum(rounds_used(t) for t in trees) / n if n else 0.0
    reasons = Counter(node.meta["eval_failure"] for t in trees for node in t.nodes.values()
                      if "eval_failure" in node.meta)  # per distinct image
    report["failure_reasons"] = {why[:200]: count for why, count in reasons.most_common(5)}
    return report


def check_failures(report: dict[str, Any], max_fraction: float, name: str) -> None:
    """Stop (one line, :class:`RewardFailureError`) when the eval reward failed on more than ``max_fraction`` of
    the eval's images (``rewards.max_failure_fraction``, as in training): a report of NaNs is not an eval."""
    images = report["prompts"] * (report["rounds"] + 1)
    failed = sum(report.get("failed", []))
    if images and failed / images > max_fraction:
        worst = next(iter(report.get("failure_reasons", {})), "unknown")
        raise RewardFailureError(f"eval {name}: the eval reward failed on {failed}/{images} images "
                                 f"({failed / images:.0%} > rewards.max_failure_fraction={max_fraction:g}); "
                                 f"most often: {worst}")


def reports_scores(report: dict[str, Any]) -> bool:
    """Whether ``score_mean`` says something ``accuracy`` does not (a fractional eval reward): only then is it
    shown and logged (a binary reward's mean score is its accuracy, a duplicate)."""
    return any(a != b and a == a for a, b in zip(report.get("score_mean", []), report["accuracy"]))


def markdown_table(report: dict[str, Any]) -> str:
    rounds = report["rounds"]
    counts = report.get("tag_counts", {})
    head = "| tag | n | " + " | ".join(f"round {r}" for r in range(rounds + 1)) + " |"
    sep = "|---|---|" + "---|" * (rounds + 1)
    rows = [f"| {tag} | {counts.get(tag, '')} | " + " | ".join(f"{v:.3f}" for v in vals) + " |"
            for tag, vals in report["per_tag"].items()]
    rows.append(f"| **overall** | {report['prompts']} | " + " | ".join(f"**{v:.3f}**" for v in report["accuracy"])
                + " |")
    if "accuracy_tag_mean" in report and len(report["per_tag"]) > 1:  # reports written before session 34 lack it
        rows.append("| mean of tags (GenEval's overall score) | | " +
                    " | ".join(f"{v:.3f}" for v in report["accuracy_tag_mean"]) + " |")
    if reports_scores(report):
        rows.append("| mean eval score | | " +
                    " | ".join(f"{v:.3f}" for v in report["score_mean"]) + " |")
    trans = "| improved / worse / unchanged | | - | " + " | ".join(
        f"{t['improved']} / {t['worse']} / {t['unchanged']}" for t in report["transitions"]) + " |"
    pool = report.get("prompt_pool")
    of = f" of {pool}" if pool and pool > report["prompts"] else ""
    tail = f"\nstop rate {report['stop_rate']:.3f}, mean rounds used {report['mean_rounds_used']:.2f}, " \
           f"{report['prompts']}{of} prompts"
    if of:
        tail += " (a seeded subset: data.eval_size or eval.size; a published score uses the whole set)"
    if any(report.get("failed", [])):
        tail += (f"\neval reward failures per round, left out of every figure: "
                 f"{' / '.join(str(f) for f in report['failed'])}")
        tail += "".join(f"\n  {count} x {why}" for why, count in report.get("failure_reasons", {}).items())
    under = understanding_table(report)
    return "\n".join([head, sep, *rows, trans]) + "\n" + tail + "\n" + (f"\n{under}" if under else "")


def _f(x: Any) -> str:
    return f"{x:.3f}" if isinstance(x, (int, float)) and x == x else "-"


def understanding_table(report: dict[str, Any]) -> str:
    """The critic's verdicts per round (chains) and on the reference set, and yes/no accuracy, as markdown."""
    u = report.get("understanding")
    if not u:
        return ""
    cols = [("all", u["verdict"]["overall"])] + [(f"round {r}", v) for r, v in u["verdict"]["per_round"].items()]
    ref = u.get("reference")
    if ref:
        cols.append(("reference set", ref["verdict"]["overall"]))
    lines = ["| understanding (critic vs eval reward) | " + " | ".join(c for c, _ in cols) + " |",
             "|---|" + "---|" * len(cols)]
    for key, label in (("stop_on_correct", "stop on a correct image"), ("edit_on_flawed", "edit on a flawed image"),
                       ("balanced_accuracy", "**verdict balanced accuracy**"),
                       ("within_tag_balanced_accuracy", "balanced accuracy within tags (mean over tags)")):
        lines.append(f"| {label} | " + " | ".join(_f(v.get(key)) for _, v in cols) + " |")
    lines.append("| images critiqued (correct / flawed) | " + " | ".join(
        f"{v['correct_images']} / {v['flawed_images']}" for _, v in cols) + " |")
    kinds = (ref or {}).get("per_kind")
    if kinds:
        lines += ["", "| reference set, by how the image was built | images | judged correct | **stop rate** |",
                  "|---|---|---|---|"]
        lines += [f"| {kind} | {v['images']} | {_f(v['judged_correct'])} | {_f(v['stop_rate'])} |"
                  for kind, v in kinds.items()]
    for name, yn in (("own images", u.get("yes_no")), ("reference set", (ref or {}).get("yes_no"))):
        if yn and yn.get("available"):
            lines.append(f"\nyes/no accuracy on {name}: {_f(yn['accuracy'])} ({yn['questions']} questions; "
                         f"{_f(yn['accuracy_on_yes'])} where the truth is yes, {_f(yn['accuracy_on_no'])} where no)")
    return "\n".join(lines) + "\n"


def evaluate(policy: Policy, prompts: list[PromptItem], sampling: StageSampling, rounds: int, stop_phrase: str,
             rewards: RewardSet, correct_threshold: float = 1.0, seed: int = 0,
             references: list[ReferenceImage] | None = None, yes_no: bool = True,
             max_questions: int | None = None, batch_size: int = 256) -> tuple[dict[str, Any], list[Tree]]:
    trees = r3_chains(policy, prompts, sampling, rounds, stop_phrase, seed=seed, batch_size=batch_size)
    correct = score_chains(trees, rounds, rewards, correct_threshold)
    report = summarise(trees, correct, rounds, eval_scores(trees, rounds))
    u: dict[str, Any] = {"verdict": verdict_report(chain_verdicts(trees, correct_threshold))}
    if yes_no:  # the same batch bound as the chains: the GPU was sized for eval.batch_size (r3-rl plan)
        u["yes_no"] = ask_yes_no(policy, chain_images(trees, correct_threshold), rewards, correct_threshold,
                                 max_questions, batch_size=batch_size)
    if references:
        u["reference"] = reference_report(policy, references, sampling.reflect, stop_phrase, rewards,
                                          correct_threshold, seed=seed, yes_no=yes_no, batch_size=batch_size,
                                          max_questions=max_questions)
    report["understanding"] = u
    return report, trees


def chain_images(trees: list[Tree], correct_threshold: float) -> list[JudgedImage]:
    """Every distinct image of the eval chains, with the eval reward's verdict (after :func:`score_chains`)."""
    out = []
    for t in trees:
        for n in t.nodes.values():
            if n.image is not None and "eval_score" in n.meta:
                s = n.meta["eval_score"]
                out.append(JudgedImage(t.prompt, ImageInput(n.image, n.image_tokens),
                                       None if s is None else bool(s >= correct_threshold)))
    return out


def read_report(out_dir: str | Path, name: str) -> dict[str, Any] | None:
    """The ``<name>.json`` :func:`write_report` wrote, or None where there is none (a resumed run reuses its run
    dir's ``before``).  One that cannot be read is an error: a resumed run would otherwise measure its gains
    against the resumed weights instead of the weights before RL, and say nothing."""
    path = Path(out_dir) / f"{name}.json"
    if not path.exists():
        return None
    try:
        report = json.loads(path.read_text())
        if not isinstance(report, dict) or not isinstance(report.get("accuracy"), list):
            raise ValueError("not an eval report")
        return report
    except (OSError, ValueError) as e:
        raise UserError(f"{path}: cannot be read ({str(e).splitlines()[0][:120]}); restore it, or delete it to "
                        f"measure this run's gains against the resumed weights instead") from None


def spread_over_tags(trees: list[Tree], n: int) -> list[Tree]:
    """``n`` of ``trees``, taken in turn from each prompt tag, in file order (:func:`spread_sample`).

    The eval's dump sample: GenEval's file is sorted by tag, so its first 64 chains of 553 were all
    ``single_object`` -- the easiest tag, with the least to refine -- in every dump, HTML page and
    ``r3-rl inspect --eval``.  The pick depends only on the prompts, so every eval of a run dumps the same ones.
    """
    return spread_sample(trees, n, lambda tree: tree.prompt.tag)


def write_report(report: dict[str, Any], out_dir: str | Path, name: str, trees: list[Tree] | None = None,
                 dump: int = 0) -> None:
    """``<name>.json`` + ``<name>.md``; with ``trees`` and ``dump > 0`` also ``dump`` chains spread over the
    prompt tags (:func:`spread_over_tags`) as ``<name>_trajectories.jsonl`` + PNGs (what ``r3-rl inspect
    --eval`` reads) and a static ``<name>.html``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for path, text in ((out / f"{name}.json", json.dumps(report, indent=2)),
                       (out / f"{name}.md", markdown_table(report))):
        tmp = path.with_name(f".{path.name}.tmp")  # whole or not at all: a resumed run reads before.json back
        tmp.write_text(text)
        tmp.replace(path)
    if trees and dump > 0:
        from r3_rl.tracking.html import write_html
        from r3_rl.trajectory import write_trees

        sample = spread_over_tags(trees, dump)
        write_trees(sample, out / f"{name}_trajectories.jsonl")
        write_html(sample, out / f"{name}.html", title=f"eval {name}", max_paths=1)
