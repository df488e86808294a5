"""Per-round GenEval-style evaluation of R3 chains.

For each held-out prompt: one R3 chain with the eval sampling settings (greedy or low temperature,
up to ``eval.rounds`` refine rounds, stop on "no further edit needed").  Every image standing after
each round is scored with the recipe's eval rewards; a sample is correct when the eval reward reaches
``correct_threshold`` (GenEval's binary ``correct`` for the ``blocks``/``geneval`` rewards).

Reports overall and per-tag accuracy per round, improved / worse / unchanged counts between
consecutive rounds, stop rate and mean rounds used, as a JSON-ready dict and a markdown table.
"""
from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from typing import Any

from r3_rl.policy.base import Policy
from r3_rl.rewards.reward_set import RewardSet
from r3_rl.rollout.chain import images_by_round, r3_chains, rounds_used, stopped
from r3_rl.rollout.scoring import reward_sample
from r3_rl.rollout.tree_rl import StageSampling
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
    out = []
    for t in trees:
        row = []
        for n in images_by_round(t, rounds):
            total = by_key[(t.id, n.id)].total
            row.append(None if total is None else bool(total >= correct_threshold))
        out.append(row)
    return out


def summarise(trees: list[Tree], correct: list[list[Any]], rounds: int) -> dict[str, Any]:
    n = len(trees)
    report: dict[str, Any] = {"prompts": n, "rounds": rounds, "accuracy": [], "per_tag": {}, "transitions": [],
                              "failed": [sum(1 for row in correct if row[r] is None) for r in range(rounds + 1)]}
    tags: dict[str, list[int]] = defaultdict(list)
    for i, t in enumerate(trees):
        tags[str(t.prompt.metadata.get("tag", "all"))].append(i)

    def acc(idx: list[int], r: int) -> float:
        vals = [correct[i][r] for i in idx if correct[i][r] is not None]
        return sum(vals) / len(vals) if vals else float("nan")

    everyone = list(range(n))
    report["accuracy"] = [acc(everyone, r) for r in range(rounds + 1)]
    report["per_tag"] = {tag: [acc(idx, r) for r in range(rounds + 1)] for tag, idx in sorted(tags.items())}
    report["tag_counts"] = {tag: len(idx) for tag, idx in sorted(tags.items())}
    for r in range(1, rounds + 1):
        pairs = [(row[r - 1], row[r]) for row in correct if row[r - 1] is not None and row[r] is not None]
        imp = sum(1 for a, b in pairs if not a and b)
        worse = sum(1 for a, b in pairs if a and not b)
        report["transitions"].append({"round": r, "improved": imp, "worse": worse,
                                      "unchanged": len(pairs) - imp - worse})
    report["stop_rate"] = sum(stopped(t) for t in trees) / n if n else 0.0
    report["mean_rounds_used"] = sum(rounds_used(t) for t in trees) / n if n else 0.0
    return report


def markdown_table(report: dict[str, Any]) -> str:
    rounds = report["rounds"]
    counts = report.get("tag_counts", {})
    head = "| tag | n | " + " | ".join(f"round {r}" for r in range(rounds + 1)) + " |"
    sep = "|---|---|" + "---|" * (rounds + 1)
    rows = [f"| {tag} | {counts.get(tag, '')} | " + " | ".join(f"{v:.3f}" for v in vals) + " |"
            for tag, vals in report["per_tag"].items()]
    rows.append(f"| **overall** | {report['prompts']} | " + " | ".join(f"**{v:.3f}**" for v in report["accuracy"])
                + " |")
    trans = "| improved / worse / unchanged | | - | " + " | ".join(
        f"{t['improved']} / {t['worse']} / {t['unchanged']}" for t in report["transitions"]) + " |"
    tail = f"\nstop rate {report['stop_rate']:.3f}, mean rounds used {report['mean_rounds_used']:.2f}, " \
           f"{report['prompts']} prompts"
    return "\n".join([head, sep, *rows, trans]) + "\n" + tail + "\n"


def evaluate(policy: Policy, prompts: list[PromptItem], sampling: StageSampling, rounds: int, stop_phrase: str,
             rewards: RewardSet, correct_threshold: float = 1.0, seed: int = 0,
             batch_size: int = 256) -> tuple[dict[str, Any], list[Tree]]:
    trees = r3_chains(policy, prompts, sampling, rounds, stop_phrase, seed=seed, batch_size=batch_size)
    correct = score_chains(trees, rounds, rewards, correct_threshold)
    return summarise(trees, correct, rounds), trees


def write_report(report: dict[str, Any], out_dir: str | Path, name: str, trees: list[Tree] | None = None,
                 dump: int = 0) -> None:
    """``<name>.json`` + ``<name>.md``; with ``trees`` and ``dump > 0`` also the first ``dump`` chains as
    ``<name>_trajectories.jsonl`` + PNGs (what ``r3-rl inspect --eval`` reads) and a static ``<name>.html``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(report, indent=2))
    (out / f"{name}.md").write_text(markdown_table(report))
    if trees and dump > 0:
        from r3_rl.tracking.html import write_html
        from r3_rl.trajectory import write_trees

        write_trees(trees[:dump], out / f"{name}_trajectories.jsonl")
        write_html(trees[:dump], out / f"{name}.html", title=f"eval {name}", max_paths=1)
