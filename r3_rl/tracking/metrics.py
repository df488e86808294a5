"""Scalar metrics of a training step, computed from scored trees (pure), written to metrics.jsonl + TensorBoard.

Everything here is a pure function of the trees (and timings) so it can be tested on hand-built trees.
Names are grouped by TensorBoard section (the part before the first ``/``):

* ``reward/<stage>/{mean,std,count}``, ``reward_round/<stage>/round<r>/{mean,std}``,
  ``reward_component/<stage>/<reward name>``, ``accuracy/<stage>``
* ``advantage/<stage>/{mean,std,abs_max}``; ``groups/<stage>/{total,zero_signal}`` and
  ``groups/zero_signal_fraction`` -- sibling groups whose rewards are all equal give every member a
  zero advantage and so no gradient (the "silent zero" failure of UniRL PR #141 shows up here first)
* ``rollout/{failed_rewards,stop_rate,improved,worse,unchanged,trajectories,image_tokens,text_tokens}``
  and ``rollout/round<r>/{improved,worse,unchanged}`` (refined image vs the image it refined)
* ``throughput/{trajectories_per_s,image_tokens_per_s,text_tokens_per_s}``
* ``learner/*``: whatever the learner's ``step()`` returned, passed through unchanged.
"""
from __future__ import annotations

import json
import math
from collections import defaultdict
from pathlib import Path
from typing import Any

from r3_rl.algorithms.signal import SIGNAL_ATOL, has_signal
from r3_rl.trajectory import Node, Tree


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs) if xs else float("nan")


def _std(xs: list[float]) -> float:
    """Population standard deviation of the logged values: a description of this step's batch (the group
    normalisation of GRPO is another quantity, with Bessel's correction: :mod:`r3_rl.algorithms.advantages`)."""
    if not xs:
        return float("nan")
    m = _mean(xs)
    return math.sqrt(_mean([(x - m) ** 2 for x in xs]))


def sampled(node: Node) -> bool:
    """Nodes the current rollout produced (buffered parents carry ``policy_version == -1``)."""
    return node.policy_version >= 0


def previous_image(tree: Tree, node: Node) -> Node | None:
    """The image a refine node started from: the nearest ancestor holding an image."""
    cur = node.parent
    while cur is not None:
        anc = tree.nodes[cur]
        if anc.image is not None:
            return anc
        cur = anc.parent
    return None


def reward_metrics(trees: list[Tree], correct_threshold: float = 1.0) -> dict[str, float]:
    """Reward mean/std per stage and per (stage, round), reward components, accuracy per image stage."""
    by_stage: dict[str, list[float]] = defaultdict(list)
    by_round: dict[str, list[float]] = defaultdict(list)
    comps: dict[str, list[float]] = defaultdict(list)
    correct: dict[str, list[float]] = defaultdict(list)
    for t in trees:
        for n in t.nodes.values():
            if not sampled(n) or n.reward is None:
                continue
            by_stage[n.stage].append(n.reward)
            by_round[f"{n.stage}/round{n.round}"].append(n.reward)
            for k, v in n.rewards.items():
                comps[f"{n.stage}/{k}"].append(float(v))
            if n.stage in ("generate", "refine"):
                correct[n.stage].append(float(n.reward >= correct_threshold))
    out: dict[str, float] = {}
    for stage, xs in sorted(by_stage.items()):
        out[f"reward/{stage}/mean"] = _mean(xs)
        out[f"reward/{stage}/std"] = _std(xs)
        out[f"reward/{stage}/count"] = float(len(xs))
    for key, xs in sorted(by_round.items()):
        out[f"reward_round/{key}/mean"] = _mean(xs)
        out[f"reward_round/{key}/std"] = _std(xs)
    for key, xs in sorted(comps.items()):
        out[f"reward_component/{key}"] = _mean(xs)
    for stage, xs in sorted(correct.items()):
        out[f"accuracy/{stage}"] = _mean(xs)
    return out


def refine_metrics(trees: list[Tree]) -> dict[str, float]:
    """Stop ("no further edit") rate and improved / worse / unchanged refined images, overall and per round.

    A refined image is compared with the image it was made from; a "no further edit" copy counts as
    unchanged.  Pairs where either reward failed are left out (they are counted as failures elsewhere).
    """
    stops: list[float] = []
    deltas: list[float] = []
    moves: dict[str, int] = {"improved": 0, "worse": 0, "unchanged": 0}
    per_round: dict[int, dict[str, int]] = defaultdict(lambda: {"improved": 0, "worse": 0, "unchanged": 0})
    for t in trees:
        for n in t.nodes.values():
            if not sampled(n):
                continue
            if n.stage == "reflect":
                stops.append(float(bool(n.stop)))
            if n.stage != "refine" or n.reward is None:
                continue
            prev = previous_image(t, n)
            if prev is None or prev.reward is None:
                continue
            d = n.reward - prev.reward
            deltas.append(d)
            kind = "improved" if d > SIGNAL_ATOL else "worse" if d < -SIGNAL_ATOL else "unchanged"
            moves[kind] += 1
            per_round[n.round][kind] += 1
    out = {"rollout/stop_rate": _mean(stops), "reward/refine/delta_mean": _mean(deltas),
           # kept for the console line and older dashboards: same number as reward/refine/delta_mean
           "reward/reflect/delta_mean": _mean(deltas)}
    out.update({f"rollout/{k}": float(v) for k, v in moves.items()})
    for r, m in sorted(per_round.items()):
        out.update({f"rollout/round{r}/{k}": float(v) for k, v in m.items()})
    return out


def group_metrics(trees: list[Tree]) -> dict[str, float]:
    """Advantage statistics per stage and sibling groups that carry no learning signal.

    A group is "zero-signal" when it has at least two scored members and all their rewards are equal
    (:func:`r3_rl.algorithms.signal.has_signal`): every advantage is then zero and the group contributes no
    gradient.
    """
    groups: dict[str, list[Node]] = defaultdict(list)
    advs: dict[str, list[float]] = defaultdict(list)
    for t in trees:
        for n in t.nodes.values():
            if not sampled(n):
                continue
            groups[n.group_id].append(n)
            if n.advantage is not None:
                advs[n.stage].append(n.advantage)
    out: dict[str, float] = {}
    total = zero = 0
    per_stage: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for members in groups.values():
        rewards = [m.reward for m in members if m.reward is not None]
        if len(rewards) < 2:
            continue
        stage = members[0].stage
        flat = not has_signal(rewards)
        per_stage[stage][0] += 1
        per_stage[stage][1] += flat
        total += 1
        zero += flat
    for stage, (n_groups, n_zero) in sorted(per_stage.items()):
        out[f"groups/{stage}/total"] = float(n_groups)
        out[f"groups/{stage}/zero_signal"] = float(n_zero)
    out["groups/zero_signal"] = float(zero)
    out["groups/zero_signal_fraction"] = zero / total if total else float("nan")
    for stage, xs in sorted(advs.items()):
        out[f"advantage/{stage}/mean"] = _mean(xs)
        out[f"advantage/{stage}/std"] = _std(xs)
        out[f"advantage/{stage}/abs_max"] = max(abs(x) for x in xs)
    return out


def throughput_metrics(trees: list[Tree], rollout_s: float) -> dict[str, float]:
    """Trajectories (sampled root-to-leaf paths) and sampled tokens, in total and per second of rollout."""
    trajectories = image_tokens = text_tokens = 0
    for t in trees:
        trajectories += sum(1 for leaf in t.leaves() if sampled(leaf))
        for n in t.nodes.values():
            if sampled(n) and n.segment is not None:
                if n.segment.modality == "image":
                    image_tokens += len(n.segment.token_ids)
                else:
                    text_tokens += len(n.segment.token_ids)
    out = {"rollout/trajectories": float(trajectories), "rollout/image_tokens": float(image_tokens),
           "rollout/text_tokens": float(text_tokens)}
    if rollout_s > 0:
        out.update({"throughput/trajectories_per_s": trajectories / rollout_s,
                    "throughput/image_tokens_per_s": image_tokens / rollout_s,
                    "throughput/text_tokens_per_s": text_tokens / rollout_s})
    return out


def failed_reward_count(trees: list[Tree]) -> int:
    """Sampled images whose task reward failed (``reward is None``): excluded from the update, never zeroed."""
    return sum(1 for t in trees for n in t.nodes.values()
               if sampled(n) and n.image is not None and n.reward is None)


def rollout_metrics(trees: list[Tree], correct_threshold: float = 1.0, rollout_s: float = 0.0) -> dict[str, float]:
    """All per-step scalars that can be computed from the scored trees (see the module docstring)."""
    out = reward_metrics(trees, correct_threshold)
    out.update(refine_metrics(trees))
    out.update(group_metrics(trees))
    out.update(throughput_metrics(trees, rollout_s))
    out["rollout/failed_rewards"] = float(failed_reward_count(trees))
    return out


def eval_metrics(report: dict[str, Any]) -> dict[str, float]:
    """TensorBoard scalars of an evaluation report (see :func:`r3_rl.eval.evaluate.summarise`)."""
    m = {f"eval/accuracy/round{r}": a for r, a in enumerate(report["accuracy"])}
    for tag, vals in report["per_tag"].items():
        m.update({f"eval_tag/{tag}/round{r}": a for r, a in enumerate(vals)})
    for t in report["transitions"]:
        m.update({f"eval/round{t['round']}/{k}": float(t[k]) for k in ("improved", "worse", "unchanged")})
    for r, f in enumerate(report.get("failed", [])):
        m[f"eval/failed/round{r}"] = float(f)
    m["eval/stop_rate"] = report["stop_rate"]
    m["eval/mean_rounds_used"] = report["mean_rounds_used"]
    return m


class MetricsLogger:
    """Writes scalars to ``metrics.jsonl`` (always) and TensorBoard (``log.tensorboard``), plus rich summaries.

    Non-finite values are kept in the JSONL (as ``NaN``, which Python's json reads back) but not sent to
    TensorBoard, whose charts break on them.
    """

    def __init__(self, run_dir: Path, tensorboard: bool = True) -> None:
        run_dir.mkdir(parents=True, exist_ok=True)
        self.run_dir = run_dir
        self.jsonl = open(run_dir / "metrics.jsonl", "a")
        self.tb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(log_dir=str(run_dir / "tb"))

    def rewind(self, step: int) -> None:
        """Forget what was logged after the checkpoint at ``step``: a resumed run replays those steps.

        ``metrics.jsonl`` keeps lines with ``step < step`` and the evals logged at ``step`` (before the
        checkpoint was written; training line ``step`` is replayed), so no step appears twice.  TensorBoard
        gets ``purge_step=step`` (it hides every older event at or past ``step``), and the kept evals at
        ``step`` are logged again after the purge.
        """
        path = self.run_dir / "metrics.jsonl"
        self.jsonl.close()
        kept, evals = [], []
        for line in path.read_text().splitlines():
            try:
                row = json.loads(line)
                at = int(row["step"])
            except (ValueError, KeyError, TypeError):
                continue  # a run killed mid-write leaves a partial last line
            is_eval = any(k.startswith(("eval/", "eval_tag/")) for k in row)
            if at < step or (at == step and is_eval):
                kept.append(line)
                if at == step:
                    evals.append(row)
        tmp = path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(f"{line}\n" for line in kept))
        tmp.replace(path)
        self.jsonl = open(path, "a")
        if self.tb is not None:
            from torch.utils.tensorboard import SummaryWriter

            self.tb.close()
            self.tb = SummaryWriter(log_dir=str(self.run_dir / "tb"), purge_step=step)
            for row in evals:
                for k, v in row.items():
                    if k != "step" and isinstance(v, (int, float)) and math.isfinite(v):
                        self.tb.add_scalar(k, v, step)

    def log(self, metrics: dict[str, Any], step: int) -> None:
        clean = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))}  # bools become 0/1
        self.jsonl.write(json.dumps({"step": step, **clean}) + "\n")
        self.jsonl.flush()
        if self.tb is not None:
            for k, v in clean.items():
                if math.isfinite(v):
                    self.tb.add_scalar(k, v, step)

    def log_trajectories(self, trees: list[Tree], step: int, prefix: str = "trajectories", limit: int = 4) -> None:
        """A few full trajectories as captioned image grids + markdown text, and reward/advantage histograms."""
        if self.tb is None:
            return
        from r3_rl.tracking.tensorboard import add_histograms, add_trajectories

        add_trajectories(self.tb, trees, step, prefix=prefix, limit=limit)
        if prefix == "trajectories":
            add_histograms(self.tb, trees, step)
        self.tb.flush()

    def log_eval(self, report: dict[str, Any], step: int, trees: list[Tree] | None = None, name: str = "eval") -> None:
        """Eval scalars, the per-round table as text and (when given) a few eval trajectories."""
        self.log(eval_metrics(report), step)
        if self.tb is None:
            return
        from r3_rl.eval.evaluate import markdown_table

        self.tb.add_text("eval/table", f"**{name}**\n\n" + markdown_table(report), step)
        if trees:
            self.log_trajectories(trees, step, prefix="eval_trajectories")
        self.tb.flush()

    def close(self) -> None:
        self.jsonl.close()
        if self.tb is not None:
            self.tb.close()
