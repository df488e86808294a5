"""Scalar metrics: computed from trees (pure) and written to metrics.jsonl + TensorBoard."""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from r3_rl.trajectory import Tree


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs) if xs else float("nan")


def rollout_metrics(trees: list[Tree], correct_threshold: float = 1.0) -> dict[str, float]:
    """Reward mean/std per stage and round, components, stop rate, improved/worse/unchanged."""
    out: dict[str, float] = {}
    by_stage: dict[str, list[float]] = {}
    by_round: dict[str, list[float]] = {}
    comps: dict[str, list[float]] = {}
    deltas, stops, failed = [], [], 0
    moves = {"improved": 0, "worse": 0, "unchanged": 0}
    for t in trees:
        for n in t.nodes.values():
            if n.policy_version < 0:
                continue
            if n.reward is None:
                failed += n.image is not None
                continue
            by_stage.setdefault(n.stage, []).append(n.reward)
            by_round.setdefault(f"{n.stage}/round{n.round}", []).append(n.reward)
            for k, v in n.rewards.items():
                comps.setdefault(f"{n.stage}/{k}", []).append(v)
            if n.stage == "reflect":
                stops.append(float(bool(n.stop)))
                if "delta" in n.rewards:
                    d = n.rewards["delta"]
                    deltas.append(d)
                    moves["improved" if d > 0 else "worse" if d < 0 else "unchanged"] += 1
            if n.stage in ("generate", "refine") and n.segment is not None:
                out.setdefault("_correct_" + n.stage, 0.0)
                out.setdefault("_count_" + n.stage, 0.0)
                out["_correct_" + n.stage] += float(n.reward >= correct_threshold)
                out["_count_" + n.stage] += 1
    for stage, xs in by_stage.items():
        m = _mean(xs)
        out[f"reward/{stage}/mean"] = m
        out[f"reward/{stage}/std"] = math.sqrt(_mean([(x - m) ** 2 for x in xs]))
    for key, xs in by_round.items():
        out[f"reward_round/{key}"] = _mean(xs)
    for key, xs in comps.items():
        out[f"reward_component/{key}"] = _mean(xs)
    for stage in ("generate", "refine"):
        c, n = out.pop("_correct_" + stage, None), out.pop("_count_" + stage, None)
        if n:
            out[f"accuracy/{stage}"] = c / n
    out["reward/reflect/delta_mean"] = _mean(deltas)
    out["rollout/stop_rate"] = _mean(stops)
    out["rollout/failed_rewards"] = float(failed)
    out.update({f"rollout/{k}": float(v) for k, v in moves.items()})
    return out


class MetricsLogger:
    def __init__(self, run_dir: Path, tensorboard: bool = True) -> None:
        run_dir.mkdir(parents=True, exist_ok=True)
        self.jsonl = open(run_dir / "metrics.jsonl", "a")
        self.tb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(log_dir=str(run_dir / "tb"))

    def log(self, metrics: dict[str, Any], step: int) -> None:
        clean = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))}
        self.jsonl.write(json.dumps({"step": step, **clean}) + "\n")
        self.jsonl.flush()
        if self.tb is not None:
            for k, v in clean.items():
                if math.isfinite(v):
                    self.tb.add_scalar(k, v, step)

    def log_eval(self, report: dict[str, Any], step: int) -> None:
        m = {f"eval/accuracy_round{r}": a for r, a in enumerate(report["accuracy"])}
        for tag, vals in report["per_tag"].items():
            m.update({f"eval/{tag}/round{r}": a for r, a in enumerate(vals)})
        m["eval/stop_rate"] = report["stop_rate"]
        m["eval/mean_rounds_used"] = report["mean_rounds_used"]
        self.log(m, step)

    def close(self) -> None:
        self.jsonl.close()
        if self.tb is not None:
            self.tb.close()
