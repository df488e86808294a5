"""Running an evaluation inside a run: held-out prompts -> R3 chains -> eval rewards -> ``eval/<name>.*`` + logs.

Shared by ``r3-rl train`` (before, every ``eval.every`` steps, after) and ``r3-rl eval``; it needs only the
policy, the eval rewards, the prompt source and the metrics logger, so an eval-only run builds nothing else.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from r3_rl.eval.evaluate import check_failures, evaluate, write_report
from r3_rl.eval.understanding import build_references
from r3_rl.rollout.tree_rl import stage_sampling


class Evaluator:
    def __init__(self, recipe: Any, policy: Any, rewards: Any, data: Any, metrics: Any, run_dir: Path) -> None:
        self.recipe, self.policy, self.rewards, self.data, self.metrics = recipe, policy, rewards, data, metrics
        self.run_dir = Path(run_dir)
        self.sampling = stage_sampling(recipe, eval_mode=True)
        self._references: list[Any] | None = None

    def run(self, name: str, step: int) -> dict[str, Any]:
        """Evaluate, write ``eval/<name>.*`` and log at ``step``: the number of updates the evaluated weights
        have had, so before/periodic/after evals share one x-axis."""
        e = self.recipe.eval
        prompts = self.data.eval_prompts(e.size or self.recipe.data.eval_size)
        if self._references is None:  # the same reference images for every eval of the run
            self._references = build_references(self.recipe, self.data.eval_prompts)
        report, trees = evaluate(self.policy, prompts, self.sampling, e.rounds, self.recipe.templates.stop_phrase,
                                 self.rewards, self.recipe.rewards.correct_threshold, seed=self.recipe.seed,
                                 references=self._references, yes_no=e.understanding.yes_no,
                                 max_questions=e.understanding.max_questions, batch_size=e.batch_size)
        report["prompt_pool"] = self.data.eval_pool_size()  # the set the prompts were drawn from (None: endless)
        write_report(report, self.run_dir / "eval", name, trees, e.dump)
        self.metrics.log_eval(report, step, trees, name)
        check_failures(report, self.recipe.rewards.max_failure_fraction, name)  # written first: it says why
        return report
