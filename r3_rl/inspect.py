"""``r3-rl inspect RUN_DIR``: read a run directory back and say what happened, in words and (optionally) HTML.

Reads only files a run writes (``recipe.yaml``, ``environment.json``, ``metrics.jsonl``, ``eval/*.json``,
``trajectories/step_XXXXXX.jsonl`` + PNGs, ``eval/<name>_trajectories.jsonl``), so it works on a run
that is still going, finished, or crashed, and on a copy without the model.
"""
from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

from r3_rl.environment import differences, read_records, summary_line
from r3_rl.errors import UserError
from r3_rl.eval.understanding import headline
from r3_rl.textfiles import utf8_lines
from r3_rl.tracking.console import STAGE_KEYS
from r3_rl.tracking.metrics import rollout_metrics
from r3_rl.tracking.views import fmt, image_caption, prompt_line, select_trajectories, text_label
from r3_rl.trajectory import Node, Tree, read_trees

_STEP_RE = re.compile(r"^step_(\d+)\.jsonl$")
# C0/C1 control characters (ESC starts terminal escape sequences: window titles, screen clears, ...) and
# Unicode bidi overrides, which reorder what a terminal shows; newlines and tabs are kept.
_CONTROL = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")


def printable(text: str) -> str:
    """``text`` without control characters: prompts and model outputs in a run dir are not trusted."""
    return _CONTROL.sub("", text)


def trajectory_files(run_dir: Path) -> dict[int, Path]:
    """Training trajectory dumps by step."""
    d = run_dir / "trajectories"
    out = {}
    if d.is_dir():
        for p in d.iterdir():
            m = _STEP_RE.match(p.name)
            if m:
                out[int(m.group(1))] = p
    return dict(sorted(out.items()))


def eval_files(run_dir: Path) -> dict[str, Path]:
    """Eval trajectory dumps by eval name (``before``, ``step_000050``, ``after``, ``eval``)."""
    d = run_dir / "eval"
    if not d.is_dir():
        return {}
    return {p.name[: -len("_trajectories.jsonl")]: p for p in sorted(d.glob("*_trajectories.jsonl"))}


def _correct_threshold(run_dir: Path) -> float:
    import yaml

    p = run_dir / "recipe.yaml"
    if p.is_file():
        try:
            rec = yaml.safe_load(p.read_text()) or {}
            return float(rec.get("rewards", {}).get("correct_threshold", 1.0))
        except (yaml.YAMLError, AttributeError, TypeError, ValueError):
            pass
    return 1.0


def _read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    p = run_dir / "metrics.jsonl"
    if not p.is_file():
        return []
    rows = []
    lines = list(utf8_lines(p, "metrics file"))  # bytes that are not UTF-8: one line naming file:line
    for lineno, line in lines:
        if line.strip():
            try:
                rows.append(json.loads(line))
            except (ValueError, RecursionError):  # a run killed mid-write leaves a partial last line
                if lineno != len(lines):
                    raise UserError(f"{p}:{lineno}: not valid JSON") from None
    return [r for r in rows if isinstance(r, dict) and type(r.get("step")) is int]  # not JSON true: bool is an int


def run_overview(run_dir: Path) -> str:
    """Recipe name, training progress and latest numbers, eval accuracy per round and understanding."""
    lines = [f"run {run_dir}"]
    records = read_records(run_dir)
    if records:  # what the numbers hang on besides the recipe; a resume or eval elsewhere is named
        lines.append(f"  environment: {summary_line(records[0])}")
        for r in records[1:]:
            changed = differences(records[0], r)
            if changed:
                lines.append(f"    {r.get('command')} at {r.get('when')} ran elsewhere: {'; '.join(changed)}")
    rows = [r for r in _read_metrics(run_dir) if "batch/items" in r or "1_reward/generate" in r or "learner/loss" in r]
    if rows:
        last = {"step": rows[-1]["step"]}
        for r in rows:  # each figure's latest value: under tree.schedule alternate a step runs one stage only
            last.update({k: r[k] for k in STAGE_KEYS if k in r})
        lines.append(f"  training: {len(rows)} steps logged, last step {last['step']}: "
                     f"reward A {fmtn(last.get('1_reward/generate'))}, "
                     f"acc A {fmtn(last.get('2_accuracy/round0'))}, "
                     f"refine dR {fmtn(last.get('6_refine/delta_mean'))}, "
                     f"verdict {fmtn(last.get('3_understanding/verdict_balanced_accuracy'))}, "
                     f"stop rate {fmtn(last.get('6_refine/stop_rate'))}")
    else:
        lines.append("  training: no steps logged")
    for p in sorted((run_dir / "eval").glob("*.json")) if (run_dir / "eval").is_dir() else []:
        try:  # every field read inside: a foreign report's "understanding": "x" was a traceback, not a line
            rep = json.loads(p.read_text())
            acc = " ".join(fmt(a) for a in rep["accuracy"])
            under = headline(rep)
            line = (f"  eval {p.stem}: accuracy per round {acc} (stop rate {fmt(rep.get('stop_rate'))}, "
                    f"{rep.get('prompts')} prompts); verdict balanced accuracy "
                    f"{fmtn(under['verdict_balanced_accuracy'])} "
                    f"(within tags {fmtn(under['verdict_within_tag_balanced_accuracy'])})"
                    + (f", reference set {fmtn(under['reference_balanced_accuracy'])}"
                       if "reference_balanced_accuracy" in under else ""))
            kinds = ((rep.get("understanding") or {}).get("reference") or {}).get("per_kind")
            by_kind = ", ".join(f"{kind} {fmt(v['stop_rate'])} ({v['images']})" for kind, v in kinds.items()) \
                if kinds else ""
        except (ValueError, KeyError, TypeError, AttributeError, RecursionError) as e:  # damaged or foreign: said
            lines.append(f"  eval {p.stem}: unreadable ({type(e).__name__}: {printable(str(e))[:80]})")
            continue
        lines.append(line)
        if by_kind:
            lines.append("    reference set, stop rate by kind: " + by_kind)
    steps = list(trajectory_files(run_dir))
    if steps:
        lines.append(f"  trajectory dumps: {len(steps)} (steps {steps[0]}..{steps[-1]})")
    evals = list(eval_files(run_dir))
    if evals:
        lines.append(f"  eval dumps: {', '.join(evals)}")
    return "\n".join(lines)


def fmtn(x: float | None) -> str:
    """A measured rate, or "-" where it is undefined (e.g. no correct image was critiqued)."""
    return "-" if x is None or not math.isfinite(x) else f"{x:.3f}"


def trajectory_text(tree: Tree, path: list[Node]) -> str:
    """One trajectory as indented lines: prompt, then plan / image / critique / image ..."""
    out = [f"  {prompt_line(tree)}   ({tree.id})"]
    prev: Node | None = None
    for n in path:
        if n.image is not None:
            out.append(f"    [image] {image_caption(n, prev)}")
            prev = n
        elif n.text is not None:
            text = n.text.replace("\n", " ")
            out.append(f"    [{text_label(n)}] {text[:200]}{'...' if len(text) > 200 else ''}")
            if len(text) > 200 and n.stage == "reflect" and n.edit_instruction:  # cut off after a long <think>
                out.append(f"      -> {n.edit_instruction.replace(chr(10), ' ')[:200]}")
    return "\n".join(out)


def trees_summary(trees: list[Tree], correct_threshold: float = 1.0) -> str:
    """Counts and reward statistics of one dump (training step, or eval chains: :func:`chains_summary`)."""
    if trees and all(t.meta.get("kind") == "chain" for t in trees):
        return chains_summary(trees, correct_threshold)
    m = rollout_metrics(trees, correct_threshold)
    kinds: dict[str, int] = {}
    for t in trees:
        kinds[str(t.meta.get("kind", "?"))] = kinds.get(str(t.meta.get("kind", "?")), 0) + 1
    lines = [f"  {len(trees)} trees ({', '.join(f'{v} {k}' for k, v in sorted(kinds.items()))}), "
             f"{int(m['rollout/trajectories'])} trajectories, {int(m['rollout/failed_rewards'])} failed rewards"]
    for stage in ("reason", "generate", "reflect", "refine"):
        if f"1_reward/{stage}" in m:
            lines.append(f"  {stage:8s} reward {fmt(m[f'1_reward/{stage}'])} +- "
                         f"{fmt(m[f'reward_detail/{stage}/std'])} (n={int(m[f'reward_detail/{stage}/count'])})")
    acc = [f"round {k[len('2_accuracy/round'):]} {fmt(v)}" for k, v in m.items() if k.startswith("2_accuracy/")]
    if acc:
        lines.append("  accuracy " + ", ".join(acc))
    if "6_refine/stop_rate" in m:
        lines.append(f"  stop rate {fmt(m['6_refine/stop_rate'])}; refined images improved/worse/unchanged "
                     f"{int(m['6_refine/improved'])}/{int(m['6_refine/worse'])}/{int(m['6_refine/unchanged'])}")
    if "3_understanding/verdict_balanced_accuracy" in m:
        lines.append(f"  critic: stop on correct parents {fmtn(m['3_understanding/stop_on_correct'])}, edit on "
                     f"flawed parents {fmtn(m['3_understanding/edit_on_flawed'])}, balanced accuracy "
                     f"{fmtn(m['3_understanding/verdict_balanced_accuracy'])}")
    return "\n".join(lines)


def chains_summary(trees: list[Tree], correct_threshold: float = 1.0) -> str:
    """Eval chains are scored after the fact (``node.meta["eval_score"]``, not ``node.reward``): images scored
    and failed, improved / worse / unchanged per round, stop rate and the critic's verdicts."""
    from r3_rl.eval.understanding import chain_verdicts, verdict_report
    from r3_rl.rollout.chain import stopped

    scores = [n.meta.get("eval_score") for t in trees for n in t.nodes.values() if n.image is not None]
    failed = sum(1 for x in scores if x is None)
    lines = [f"  {len(trees)} R3 chains, {len(scores)} images scored by the eval reward ({failed} failed), "
             f"stop rate {fmt(sum(stopped(t) for t in trees) / len(trees))}"]
    moves: dict[int, list[int]] = {}
    for t in trees:
        for n in t.nodes.values():
            if n.stage != "refine" or n.parent is None:
                continue
            prev = t.nodes[t.nodes[n.parent].parent] if t.nodes[n.parent].parent else None
            a, b = (prev.meta.get("eval_score") if prev else None), n.meta.get("eval_score")
            if a is None or b is None:
                continue
            ok_a, ok_b = a >= correct_threshold, b >= correct_threshold
            counts = moves.setdefault(n.round, [0, 0, 0])
            counts[0 if (ok_b and not ok_a) else 1 if (ok_a and not ok_b) else 2] += 1
    for r, (imp, worse, same) in sorted(moves.items()):
        lines.append(f"  round {r}: refined images improved/worse/unchanged {imp}/{worse}/{same}")
    v = verdict_report(chain_verdicts(trees, correct_threshold))["overall"]
    lines.append(f"  critic: stop on correct images {fmtn(v['stop_on_correct'])} (of {v['correct_images']}), "
                 f"edit on flawed images {fmtn(v['edit_on_flawed'])} (of {v['flawed_images']}), "
                 f"balanced accuracy {fmtn(v['balanced_accuracy'])} "
                 f"(within tags {fmtn(v['within_tag_balanced_accuracy'])})")
    return "\n".join(lines)


def _eval_summary(path: Path) -> str:
    rep_path = path.with_name(path.name[: -len("_trajectories.jsonl")] + ".md")
    return rep_path.read_text() if rep_path.is_file() else ""


def inspect_run(run_dir: str | Path, step: int | None = None, eval_name: str | None = None,
                html: str | Path | None = None, limit: int = 3) -> tuple[str, Path | None]:
    """The text summary of a run (and one dump: ``step``, else ``eval_name``, else the latest step), and the
    HTML page written (when ``html`` is a path; ``""`` means ``RUN_DIR/inspect/<dump>.html``)."""
    run_dir = Path(run_dir)
    if run_dir.is_file() and run_dir.suffix == ".jsonl":  # a bare dump, e.g. `r3-rl rollout`'s rollout.jsonl
        return _inspect_dump(run_dir, html, limit)
    if not run_dir.is_dir():
        raise UserError(f"{run_dir}: no such run directory")
    if not any((run_dir / f).exists() for f in ("recipe.yaml", "metrics.jsonl", "trajectories", "eval",
                                                "rollout.jsonl")):
        raise UserError(f"{run_dir}: not an r3-rl run directory (no recipe.yaml, metrics.jsonl, trajectories/, "
                        f"eval/ or rollout.jsonl)")
    text = [run_overview(run_dir)]
    steps, evals = trajectory_files(run_dir), eval_files(run_dir)
    dump: Path | None = None
    label = ""
    if eval_name is not None:
        if eval_name not in evals:
            raise UserError(f"--eval {eval_name}: no eval dump of that name in {run_dir / 'eval'} "
                            f"(available: {', '.join(evals) or 'none'})")
        dump, label = evals[eval_name], f"eval {eval_name}"
    elif step is not None:
        if step not in steps:
            near = min(steps, key=lambda s: abs(s - step)) if steps else None
            hint = f"; nearest is {near}" if near is not None else ""
            raise UserError(f"--step {step}: no trajectories/step_{step:06d}.jsonl in {run_dir}{hint} "
                            f"(trajectories are dumped every log.trajectories_every steps)")
        dump, label = steps[step], f"step {step}"
    elif steps:
        dump, label = steps[max(steps)], f"step {max(steps)}"
    elif (run_dir / "rollout.jsonl").is_file():  # `r3-rl rollout`'s run dir: its trees are the run
        dump, label = run_dir / "rollout.jsonl", "rollout"
    html_path = None
    if dump is not None:
        trees = list(read_trees(dump))
        text.append(f"\n{label}: {dump}")
        if eval_name is not None:
            text.append(_eval_summary(dump).rstrip())
        text.append(trees_summary(trees, _correct_threshold(run_dir)))
        for tree, path in select_trajectories(trees, limit):
            text.append(trajectory_text(tree, path))
        if html is not None:
            from r3_rl.tracking.html import write_html

            html_path = Path(html) if str(html) else run_dir / "inspect" / f"{dump.stem}.html"
            write_html(trees, html_path, title=f"{run_dir.name}: {label}")
            text.append(f"\nwrote {html_path}")
    elif html is not None:
        raise UserError(f"--html: {run_dir} has no trajectory dumps yet (trajectories/, eval/*_trajectories.jsonl "
                        f"or rollout.jsonl)")
    return printable("\n".join(text)), html_path


def _inspect_dump(path: Path, html: str | Path | None, limit: int) -> tuple[str, Path | None]:
    trees = list(read_trees(path))
    text = [f"{path}", trees_summary(trees)]
    text.extend(trajectory_text(t, p) for t, p in select_trajectories(trees, limit))
    html_path = None
    if html is not None:
        from r3_rl.tracking.html import write_html

        html_path = write_html(trees, Path(html) if str(html) else path.with_suffix(".html"), title=path.name)
        text.append(f"\nwrote {html_path}")
    return printable("\n".join(text)), html_path
