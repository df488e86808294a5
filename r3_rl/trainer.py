"""The training loop: prompts -> rollout -> rewards -> advantages -> learner -> new weights -> rollout.

The loop itself holds no maths and no I/O detail: sampling lives in :mod:`r3_rl.rollout`, rewards
in :mod:`r3_rl.rewards`, advantages and losses in :mod:`r3_rl.algorithms`, the update in
:mod:`r3_rl.learner`, files in :mod:`r3_rl.run_dir`.
"""
from __future__ import annotations

import random
import time
from pathlib import Path
from typing import Any

import torch

from r3_rl.config import Recipe
from r3_rl.data import PromptSource
from r3_rl.errors import UserError
from r3_rl.eval.evaluate import evaluate, markdown_table, write_report
from r3_rl.eval.synergy import synergy_figures, synergy_lines
from r3_rl.eval.understanding import build_references
from r3_rl.learner.build import build_learner, needs_frozen_reference, prepare_batch
from r3_rl.learner.precision import check_recipe_precision
from r3_rl.policy.base import Policy
from r3_rl.ray_actors import ClusterError
from r3_rl.rewards.compose import CriticRule
from r3_rl.rewards.reward_set import RewardSet
from r3_rl.rollout.buffer import BufferEntry, ParentBuffer
from r3_rl.rollout.engine import RolloutEngine, build_engine, run_ordered
from r3_rl.rollout.scoring import StageScorer
from r3_rl.rollout.tree_rl import StageSampling, plan_tasks
from r3_rl.trajectory import Tree, write_trees
from r3_rl.tracking.console import Console
from r3_rl.tracking.metrics import MetricsLogger, step_metrics


def stage_sampling(recipe: Recipe, eval_mode: bool = False) -> StageSampling:
    r = recipe.rollout
    sp = {k: getattr(r, k).params() for k in ("reason", "generate", "reflect", "refine")}
    if eval_mode:
        for stage, p in sp.items():
            temp = recipe.eval.image_temperature if stage in ("generate", "refine") else recipe.eval.text_temperature
            p.greedy = temp == 0
            p.temperature = temp or 1.0
    return StageSampling(**sp)


def build_policy_for(recipe: Recipe, run_dir: Path, console: Console) -> Policy:
    from r3_rl.policy.tiny import build_policy

    policy = build_policy(recipe)
    if recipe.policy.kind == "tiny" and recipe.warmstart.steps > 0 and not recipe.policy.model:
        from r3_rl.policy.warmstart import warmstart_cached

        dtype = policy.model.dtype
        policy.model.float()  # the supervised warm start trains in fp32, then the policy computes in policy.dtype
        warmstart_cached(policy, recipe, run_dir / "warmstart", console)
        policy.model.to(dtype)
    return policy


class Trainer:
    def __init__(self, recipe: Recipe, run_dir: Path, console: Console | None = None) -> None:
        self.recipe = recipe
        self.run_dir = run_dir
        self.console = console or Console(enabled=recipe.log.console)
        if recipe.threads:
            torch.set_num_threads(recipe.threads)
        check_recipe_precision(recipe)  # a precision the learner cannot train fails before any model loads
        torch.manual_seed(recipe.seed)
        self.policy = build_policy_for(recipe, run_dir, self.console)
        self.reference = (self.policy.frozen_copy() if hasattr(self.policy, "frozen_copy")
                          and needs_frozen_reference(recipe) else None)  # LoRA: base model, adapters off
        self.task_rewards = RewardSet.from_specs([s.model_dump() for s in recipe.rewards.task])
        self.eval_rewards = RewardSet.from_specs([s.model_dump() for s in recipe.rewards.eval])
        for rewards in (self.task_rewards, self.eval_rewards):
            if rewards.needs_policy:  # self-consistency asks the live policy about its own images
                rewards.bind_policy(self.policy)
        rw = recipe.rewards
        rule = CriticRule(rw.reflect.stop_correct, rw.reflect.stop_flawed, rw.reflect.edit_correct)
        self.scorer = StageScorer(self.task_rewards, rw.format_weight, rw.reason_format, rw.reflect_format,
                                  rw.correct_threshold, rule,
                                  RewardSet.from_specs([s.model_dump() for s in rw.reflect.extra]),
                                  rw.reflect.correct_part)
        self._engine: RolloutEngine | None = None  # started on the first rollout (eval-only runs need none)
        self._remote_rewards: Any = None
        # parents are kept as image tokens when the policy can rebuild pixels from them (else as PNG bytes)
        self.buffer = ParentBuffer(recipe.tree.buffer_size, decode=getattr(self.policy, "decode_image_tokens", None))
        self.data = PromptSource(recipe)
        self.learner = build_learner(self.policy, self.reference, recipe)
        self.metrics = MetricsLogger(run_dir, tensorboard=recipe.log.tensorboard,
                                     slots=max(recipe.eval.rounds, recipe.tree.max_round) + 1)
        self.rng = random.Random(recipe.seed)
        self.step = 0
        self.sampling = stage_sampling(recipe)
        self.eval_sampling = stage_sampling(recipe, eval_mode=True)
        self._references: list[Any] | None = None

    # ------------------------------------------------------------------ rollout
    @property
    def engine(self) -> RolloutEngine:
        """The rollout engine (``rollout.backend``), started with the policy's current weights on first use."""
        if self._engine is None:
            self._engine = build_engine(self.recipe, self.policy, self.log_event)
            if self.recipe.rollout.reward_workers:
                from r3_rl.rollout.ray_rewards import RayRewardSet

                self._remote_rewards = RayRewardSet([s.model_dump() for s in self.recipe.rewards.task],
                                                    self.recipe.rollout.reward_workers,
                                                    self.recipe.rollout.threads_per_worker, self.log_event,
                                                    self.recipe.ray, self.recipe.rollout.max_task_retries)
                self.scorer.task = self._remote_rewards  # type: ignore[assignment]
        return self._engine

    def log_event(self, message: str) -> None:
        """Something a user must be able to find later (worker restarts, reissued tasks): console + events.log."""
        self.console.print(f"[yellow]event[/] {message}" if self.console.enabled else message)
        with open(self.run_dir / "events.log", "a") as f:
            f.write(f"{time.strftime('%Y-%m-%dT%H:%M:%S')} step {self.step} {message}\n")

    def rollout(self, step: int) -> list[Tree]:
        """Sample the step's Tree-RL groups; each task's images are scored as soon as the task is back."""
        t = self.recipe.tree
        prompts = self.data.next_batch(t.prompts_per_step)
        parents = self.buffer.sample(t.refine_groups_per_step, t.correct_parent_fraction, self.rng)
        tasks = plan_tasks(step, self.recipe.seed, prompts, parents, t.group_size,
                           groups_per_task=self.recipe.rollout.groups_per_task)
        trees = run_ordered(self.engine, tasks, self.sampling, on_task=self._score_task)
        self._check_failures()
        self._fill_buffer(trees)
        return trees

    def _score_task(self, trees: list[Tree]) -> None:
        self.scorer.score_images((tr, n) for tr in trees for n in tr.nodes.values()
                                 if n.image is not None and n.reward is None and n.segment is not None)
        for tr in trees:
            self.scorer.compose(tr)

    def close(self) -> None:
        """Stop rollout workers (and a Ray this run started), flush logs; safe to call twice."""
        if self._remote_rewards is not None:
            self._remote_rewards.close()
            self._remote_rewards = None
        if self._engine is not None:
            self._engine.close()
            self._engine = None
        if hasattr(self.learner, "close"):  # learner ranks on Ray actors
            self.learner.close()
        self.metrics.close()

    def _check_failures(self) -> None:
        f = self.scorer.failures
        limit = self.recipe.rewards.max_failure_fraction
        if f.scored >= 16 and f.failed / f.scored > limit:
            reason = self.scorer.failure_reasons[-1] if self.scorer.failure_reasons else "unknown"
            raise UserError(f"rewards: {f.failed}/{f.scored} reward calls failed (> rewards.max_failure_fraction="
                            f"{limit}); last failure: {reason}")

    def _fill_buffer(self, trees: list[Tree]) -> None:
        for tr in trees:
            for n in tr.nodes.values():
                if n.image is None or n.reward is None or n.segment is None:
                    continue
                if n.round >= self.recipe.tree.max_round:
                    continue
                self.buffer.add(BufferEntry(prompt=tr.prompt, image=n.image, image_tokens=n.image_tokens,
                                            reward=n.reward, correct=bool(n.meta.get("correct")), round=n.round,
                                            source=f"{tr.id}/{n.id}"))

    def _sample_chains(self, step: int, trees: list[Tree]) -> list[Tree]:
        """A few full R3 chains (training sampling, up to ``tree.max_round`` rounds) on this step's prompts,
        scored with the eval reward, for the logs: Tree-RL's groups hold one or two images each, a chain shows
        what the policy does over all rounds now.  Not trained on."""
        from r3_rl.eval.evaluate import score_chains
        from r3_rl.rollout.chain import r3_chains

        n = self.recipe.log.chains
        if not n or self.recipe.tree.refine_groups_per_step == 0:
            return []
        prompts = [t.prompt for t in trees if t.meta.get("kind") == "A"][:n]  # this step's prompts
        rounds = self.recipe.tree.max_round
        chains = r3_chains(self.policy, prompts, self.sampling, rounds, self.recipe.templates.stop_phrase,
                           seed=self.recipe.seed * 1_000_003 + step, tag=f"chain-s{step}")
        score_chains(chains, rounds, self.eval_rewards, self.recipe.rewards.correct_threshold)
        return chains

    # ------------------------------------------------------------------ evaluation
    def run_eval(self, name: str, step: int | None = None) -> dict[str, Any]:
        """Evaluate, write ``eval/<name>.*`` and log at ``step`` (default ``self.step``): the number of updates
        the evaluated weights have had, so before/periodic/after evals share one x-axis."""
        e = self.recipe.eval
        prompts = self.data.eval_prompts(e.size or self.recipe.data.eval_size)
        if self._references is None:  # the same reference images for every eval of the run
            self._references = build_references(self.recipe, self.data.eval_prompts)
        report, trees = evaluate(self.policy, prompts, self.eval_sampling, e.rounds,
                                 self.recipe.templates.stop_phrase, self.eval_rewards,
                                 self.recipe.rewards.correct_threshold, seed=self.recipe.seed,
                                 references=self._references, yes_no=e.understanding.yes_no,
                                 max_questions=e.understanding.max_questions, batch_size=e.batch_size)
        write_report(report, self.run_dir / "eval", name, trees, e.dump)
        self.metrics.log_eval(report, self.step if step is None else step, trees, name)
        return report

    # ------------------------------------------------------------------ checkpoints
    def save_checkpoint(self, step: int) -> Path:
        """Full state after ``step`` completed steps -> ``checkpoints/step_NNNNNN`` (atomic, keeps the last K)."""
        from r3_rl.learner.checkpoint import save_checkpoint

        return save_checkpoint(self, step, self.recipe.keep_last)

    def resume(self, path: Path) -> None:
        """Continue exactly where checkpoint ``path`` left off (same recipe; ``steps`` may be larger)."""
        from r3_rl.learner.checkpoint import load_checkpoint

        load_checkpoint(self, path)
        self.metrics.rewind(self.step)  # the steps after the checkpoint are run again: log them once
        if self._engine is not None:
            self._engine.sync(self.policy)
        self.console.print(f"resumed from {path}: step {self.step}, policy version {self.policy.version}")

    def _eval_before(self) -> dict[str, Any]:
        """The pre-RL eval; a resumed run reuses its run dir's, or evaluates the resumed weights."""
        if self.step == 0:
            return self.run_eval("before")
        from r3_rl.learner.checkpoint import previous_report

        return previous_report(self.run_dir, "before") or self.run_eval(f"resume_{self.step:06d}")

    # ------------------------------------------------------------------ loop
    def train(self) -> dict[str, Any]:
        """Run the recipe to the end; workers and Ray are shut down however it ends (Ctrl-C included)."""
        try:
            return self._train()
        except ClusterError as e:  # a node lost beyond what the recipe allows: say where to continue from
            self.log_event(f"stopped: {e}")
            raise ClusterError(f"{e}; {self._resume_hint()}") from None
        finally:
            self.close()

    def _resume_hint(self) -> str:
        from r3_rl.learner.checkpoint import latest_checkpoint

        ckpt = latest_checkpoint(self.run_dir)
        if ckpt is None:
            return "no checkpoint to continue from yet (set save_every)"
        return f"continue from {ckpt.name} with --run-dir {self.run_dir} --resume auto"

    def _train(self) -> dict[str, Any]:
        r = self.recipe
        self.console.print(f"[bold]r3-rl[/] {r.name}: {r.steps} steps -> {self.run_dir}")
        before = self._eval_before()
        self.console.print("eval before RL:\n" + markdown_table(before))
        t0 = time.time()
        for step in range(self.step, r.steps):
            self.step = step
            t_roll = time.time()
            trees = self.rollout(step)
            items, batch_stats, adv_stats = prepare_batch(trees, r, self.policy.version)
            t_learn = time.time()
            learn = self.learner.step(items)
            if "learner/loss" in learn:
                self.policy.version += 1
                self.engine.sync(self.policy)  # workers sample the next step with the new weights
            done = time.time()
            m = step_metrics(trees, r.rewards.correct_threshold, learn, batch_stats, adv_stats,
                             t_learn - t_roll, done - t_learn, self.engine.restarts)
            self.metrics.log(m, step)
            if r.log.trajectories_every and step % r.log.trajectories_every == 0:
                write_trees(trees, self.run_dir / "trajectories" / f"step_{step:06d}.jsonl")
                self.metrics.log_trajectories(trees + self._sample_chains(step, trees), step)
            self.console.step(step, r.steps, m, time.time() - t0)
            if r.eval.every and (step + 1) % r.eval.every == 0 and step + 1 < r.steps:
                rep = self.run_eval(f"step_{step + 1:06d}", step + 1)
                self.console.print(f"eval @ {step + 1}: accuracy per round " +
                                   " ".join(f"{a:.3f}" for a in rep["accuracy"]))
            if r.save_every and (step + 1) % r.save_every == 0 and step + 1 < r.steps:
                self.save_checkpoint(step + 1)
        self.step = r.steps
        self.save_checkpoint(r.steps)
        after = self.run_eval("after")
        self.console.print("eval after RL:\n" + markdown_table(after))
        self.policy.save_pretrained(str(self.run_dir / "final"))
        fig = synergy_figures(before, after)
        summary = {"before": before["accuracy"], "after": after["accuracy"], "run_dir": str(self.run_dir),
                   "synergy": fig}
        self.console.print(f"run dir {self.run_dir}; R3 synergy on held-out prompts:")
        for line in synergy_lines(fig):
            self.console.print("  " + line)
        return summary
