"""The training loop: prompts -> rollout -> rewards -> advantages -> learner -> new weights -> rollout.

The loop itself holds no maths and no I/O detail: its parts are built by :class:`r3_rl.components.Components`
(the same builder eval and rollout use), sampling lives in :mod:`r3_rl.rollout`, rewards in
:mod:`r3_rl.rewards`, advantages and losses in the algorithm (:mod:`r3_rl.learner.algorithm`), the update in
:mod:`r3_rl.learner`, files in :mod:`r3_rl.run_dir` and :mod:`r3_rl.learner.checkpoint`.
"""
from __future__ import annotations

import contextlib
import copy
import random
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from r3_rl.components import Components
from r3_rl.config import Recipe
from r3_rl.config_learner import check_ranks
from r3_rl.data import PromptSource
from r3_rl.errors import UserError
from r3_rl.eval.evaluate import markdown_table
from r3_rl.eval.runner import Evaluator
from r3_rl.eval.synergy import GOALS, goals_brief, synergy_figures, synergy_lines, understanding_line
from r3_rl.learner.precision import check_recipe_precision
from r3_rl.ray_actors import ClusterError
from r3_rl.rollout.buffer import BufferEntry, ParentBuffer
from r3_rl.rollout.engine import RolloutEngine, run_ordered
from r3_rl.rollout.tree_rl import plan_tasks, stage_sampling, stages_at
from r3_rl.trajectory import Tree, write_trees
from r3_rl.tracking.background import BackgroundWriter
from r3_rl.tracking.console import Console
from r3_rl.tracking.logger import MetricsLogger
from r3_rl.tracking.metrics import EVAL, UNDERSTANDING, step_metrics
from r3_rl.tracking.views import spread_sample


class Trainer:
    """Runs a recipe's training; ``policy``, ``reference``, ``learner``, ... are the parts it was built from."""

    def __init__(self, recipe: Recipe, run_dir: Path, console: Console | None = None) -> None:
        self.recipe = recipe
        self.run_dir = run_dir
        run_dir.mkdir(parents=True, exist_ok=True)  # events.log: reward actors log as they start, below
        self.console = console or Console(enabled=recipe.log.console)
        if recipe.threads:
            torch.set_num_threads(recipe.threads)
        check_recipe_precision(recipe)  # a precision the learner cannot train fails before any model loads
        check_ranks(recipe.learner)  # so does a learner-rank layout it cannot run
        torch.manual_seed(recipe.seed)
        # Python's and numpy's global generators too: nothing here draws from them, but a plug-in may, and they
        # go into trainer.pt -- seeded, two runs of one recipe save the same state
        random.seed(recipe.seed)
        np.random.seed(recipe.seed)
        self.step = 0
        self.restarts_before = 0  # rollout workers restarted before the checkpoint this run resumed from
        self.parts = Components(recipe, run_dir, self.console, self.log_event)
        # rewards set up before the warm start: a reward server that is down, a detector path that is wrong,
        # fails in one line now, not after minutes of warm start (rewards that ask the policy build it first)
        self.task_rewards = self.parts.task_rewards
        self.eval_rewards = self.parts.eval_rewards
        for rewards in (self.task_rewards, self.eval_rewards):
            getattr(rewards, "setup", lambda: None)()
        self.policy = self.parts.policy
        self.reference = self.parts.reference
        self.failures = self.parts.failures
        self.scorer = self.parts.scorer
        # parents are kept as image tokens when the policy can rebuild pixels from them (else as PNG bytes)
        self.buffer = ParentBuffer(recipe.tree.buffer_size, decode=getattr(self.policy, "decode_image_tokens", None))
        self.data = PromptSource(recipe)
        self.algorithm = self.parts.algorithm
        self.learner = self.parts.learner
        self.metrics = MetricsLogger(run_dir, tensorboard=recipe.log.tensorboard,
                                     slots=max(recipe.eval.rounds, recipe.tree.max_round) + 1)
        self.evaluator = Evaluator(recipe, self.policy, self.eval_rewards, self.data, self.metrics, run_dir)
        self.rng = random.Random(recipe.seed)
        self.sampling = stage_sampling(recipe)
        self.resumed_from: Path | None = None  # the checkpoint this run continues (see resume)
        self.eval_pending = False  # resumed from a checkpoint whose step's eval was cut off: run it first
        self.reference_file: Path | None = None  # holds exactly self.reference's weights (see _remember_reference)
        self.dumps = BackgroundWriter()  # trajectory dumps are written while the next step runs

    # ------------------------------------------------------------------ rollout
    @property
    def engine(self) -> RolloutEngine:
        """The rollout engine (``rollout.backend``), started with the policy's current weights on first use."""
        return self.parts.engine

    def worker_restarts(self) -> int:
        """Rollout workers restarted in the whole run, the runs it resumed from included (never starts the engine)."""
        engine = self.parts.__dict__.get("engine")  # Components.engine is a cached_property: started on first use
        return self.restarts_before + (engine.restarts if engine is not None else 0)

    def log_event(self, message: str) -> None:
        """Something a user must be able to find later (worker restarts, reissued tasks): console + events.log."""
        self.console.print(f"[yellow]event[/] {message}" if self.console.enabled else message)
        with open(self.run_dir / "events.log", "a") as f:
            f.write(f"{time.strftime('%Y-%m-%dT%H:%M:%S')} step {self.step} {message}\n")

    def rollout(self, step: int) -> list[Tree]:
        """Sample the step's Tree-RL groups; each task's images are scored as soon as the task is back."""
        t = self.recipe.tree
        run_a, run_bc = stages_at(t.schedule, step)
        prompts = self.data.next_batch(t.prompts_per_step) if run_a else []
        parents = (self.buffer.sample(t.refine_groups_per_step, t.correct_parent_fraction, self.rng, t.parent_balance)
                   if run_bc else [])
        tasks = plan_tasks(step, self.recipe.seed, prompts, parents, t.group_size,
                           groups_per_task=self.recipe.rollout.groups_per_task)
        local = self.recipe.rollout.backend == "local"  # Ray workers sample with their own whole weights
        with self.sampling_weights() if local else contextlib.nullcontext():
            trees = run_ordered(self.engine, tasks, self.sampling, on_task=self._score_task)
        self.failures.check()  # a run whose rewards keep failing stops here (rewards.max_failure_fraction)
        if t.schedule != "alternate":
            self._fill_buffer(trees)
        elif run_a:  # the reference's: parents are the last stage-A step's first images only (its only trees)
            self.buffer.clear()
            self._fill_buffer(trees)
        return trees

    def _score_task(self, trees: list[Tree]) -> None:
        self.scorer.score_images((tr, n) for tr in trees for n in tr.nodes.values()
                                 if n.image is not None and n.reward is None and n.segment is not None)
        for tr in trees:
            self.scorer.compose(tr)

    def close(self) -> None:
        """Finish the dump under way, stop rollout workers, reward actors, learner ranks (and a Ray this run
        started), flush logs; safe to call twice.  A failed dump is an event here, not an error: close may run
        while another error is on its way out (a run that ends normally has raised it already, in ``_train``)."""
        try:
            self.dumps.close(raise_errors=False, on_error=self.log_event)
        finally:
            self.parts.close()
            self.metrics.close()

    def _dump(self, step: int, trees: list[Tree]) -> None:
        """A sample of the step's trees to ``trajectories/step_N.jsonl``, written on the writer's thread.  The
        sample is copied first (its images shared, not copied): nothing the loop does later can change a tree
        while the thread reads it."""
        dumped = spread_sample(trees, self.recipe.log.dump_trees, lambda t: (t.meta.get("kind"), t.prompt.tag))
        images = {id(n.image): n.image for t in dumped for n in t.nodes.values() if n.image is not None}
        path = self.run_dir / "trajectories" / f"step_{step:06d}.jsonl"
        self.dumps.submit(str(path.relative_to(self.run_dir)), write_trees, copy.deepcopy(dumped, images), path)

    def _fill_buffer(self, trees: list[Tree]) -> None:
        self.buffer.add_many(
            BufferEntry(prompt=tr.prompt, image=n.image, image_tokens=n.image_tokens, reward=n.reward,
                        correct=bool(n.meta.get("correct")), round=n.round, source=f"{tr.id}/{n.id}")
            for tr in trees for n in tr.nodes.values()
            if n.image is not None and n.reward is not None and n.segment is not None
            and n.round < self.recipe.tree.max_round)

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
        with self.sampling_weights():
            chains = r3_chains(self.policy, prompts, self.sampling, rounds, self.recipe.templates.stop_phrase,
                               seed=self.recipe.seed * 1_000_003 + step, tag=f"chain-s{step}")
        score_chains(chains, rounds, self.eval_rewards, self.recipe.rewards.correct_threshold)
        return chains

    # ------------------------------------------------------------------ evaluation
    def run_eval(self, name: str, step: int | None = None) -> dict[str, Any]:
        """Evaluate the current weights (``eval/<name>.*``), logged at ``step`` (default ``self.step``)."""
        with self.sampling_weights():
            return self.evaluator.run(name, self.step if step is None else step)

    def sampling_weights(self) -> Any:
        """The context this process samples in: under single-rank ZeRO-3 the policy's weights gathered once and
        DeepSpeed's per-call hooks off (:meth:`r3_rl.learner.deepspeed_learner.DeepSpeedOptim.for_sampling`);
        otherwise nothing."""
        optim = getattr(self.learner, "optim", None)
        if optim is None or not hasattr(optim, "for_sampling"):  # learner ranks: the mirror's weights are whole
            return contextlib.nullcontext()
        return optim.for_sampling([self.policy.model])

    def _log_goals(self, before: dict[str, Any], report: dict[str, Any], step: int | None = None) -> dict[str, Any]:
        """The demo's three figures of ``report`` against ``before`` (:mod:`r3_rl.eval.synergy`), logged as
        ``0_eval/synergy/<figure>`` (fractions) at the eval's step; returns all of them."""
        fig = synergy_figures(before, report)
        self.metrics.log({f"{EVAL}/synergy/{k}": fig[k] for k in GOALS}, self.step if step is None else step)
        return fig

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        """The loop's own state (``state/trainer.pt``): steps done, policy version, RNGs, prompt-sampler position,
        reward-failure counts.  Weights and optimiser belong to the learner, the parent buffer writes its own file."""
        from r3_rl.learner.checkpoint import FORMAT
        from r3_rl.rng_state import global_rng_state

        return {"format": FORMAT, "step": self.step, "policy_version": self.policy.version,
                "rng": self.rng.getstate(), **global_rng_state(), "data_position": self.data.position,
                "scorer": self.failures.state_dict(), "worker_restarts": self.worker_restarts()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        from r3_rl.rng_state import set_global_rng_state

        self.step = state["step"]
        self.policy.version = state["policy_version"]
        self.rng.setstate(state["rng"])
        set_global_rng_state(state)
        self.data.position = state["data_position"]
        if "buffer" in state:  # formats 1-2 kept the parent buffer here (3: state/buffer.safetensors)
            self.buffer.load_legacy(state["buffer"])
        self.failures.load_state_dict(state["scorer"])
        self.restarts_before = int(state.get("worker_restarts", 0))  # checkpoints before 2026-12-06 have none

    def _checkpoint_parts(self) -> Any:
        from r3_rl.learner.checkpoint import CheckpointParts

        return CheckpointParts(policy=self.policy, reference=self.reference, learner=self.learner, loop=self,
                               buffer=self.buffer, reference_file=self.reference_file)

    def save_checkpoint(self, step: int | None = None) -> Path:
        """Full state after ``step`` completed steps (default: ``self.step``) -> ``checkpoints/step_NNNNNN``
        (atomic, keeps the last ``keep_last``)."""
        from r3_rl.learner.checkpoint import save_checkpoint

        if step is not None:
            self.step = step
        path = save_checkpoint(self.run_dir, self.step, self.recipe.keep_last, self._checkpoint_parts(), self.recipe)
        self._remember_reference(path)
        return path

    def _remember_reference(self, checkpoint: Path) -> None:
        """The checkpoint's reference file holds exactly this run's frozen reference: the next save links it."""
        ref = checkpoint / "state" / "reference.safetensors"
        self.reference_file = ref if self.reference is not None and ref.is_file() else None

    def resume(self, path: Path, checked: dict[str, Any] | None = None) -> None:
        """Continue exactly where checkpoint ``path`` left off (same recipe; ``steps`` may be larger);
        ``checked``: what ``check_resumable`` returned for it, when the caller has run it."""
        from r3_rl.learner.checkpoint import load_checkpoint, set_aside_later

        load_checkpoint(path, self._checkpoint_parts(), self.recipe, checked)
        self.resumed_from = path
        self._remember_reference(path)
        for later in set_aside_later(path, self.run_dir):
            self.log_event(f"resumed at step {self.step}: the later checkpoint {later.name.removeprefix('abandoned-')} "
                           f"belongs to the abandoned branch; set aside as {later} (--resume auto skips it; "
                           f"delete it when it is not needed)")
        # the steps after the checkpoint are run again: log them once.  Every eval at a checkpoint's step came
        # after it: a mid-run eval whose report was written is kept; one cut off (a preemption during an hour-long
        # eval) runs again first, as does a finished run's "after" eval (an extended run keeps it)
        due = self._eval_due(self.step)
        done = (self.run_dir / "eval" / f"step_{self.step:06d}.json").is_file()
        self.eval_pending = due and not done
        keep_evals = self.step < self.recipe.steps and (done or not due)
        self.metrics.rewind(self.step, keep_evals=keep_evals)
        if keep_evals and done:
            self._relog_eval_summaries(f"step_{self.step:06d}")
        if self.parts.built("engine"):
            self.engine.sync(self.policy)
        self.console.print(f"resumed from {path}: step {self.step}, policy version {self.policy.version}")

    def _relog_eval_summaries(self, name: str) -> None:
        """TensorBoard's purge at the resumed step hid the kept eval's table and grids with its scalars; the rewind
        logs the scalars again, and these come back from the eval's files (the grids from the chains it dumped,
        ``eval.dump``: none where it dumped none)."""
        from r3_rl.eval.evaluate import read_report
        from r3_rl.trajectory import read_trees

        dumped = self.run_dir / "eval" / f"{name}_trajectories.jsonl"
        try:
            report = read_report(self.run_dir / "eval", name)
            trees = list(read_trees(dumped)) if dumped.is_file() else []
        except UserError as e:  # a damaged file costs only the pictures: the run goes on, and says so
            self.log_event(f"resumed: the eval {name}'s table and grids are not shown again in TensorBoard ({e})")
            return
        if report is not None:
            self.metrics.log_eval_summaries(report, self.step, trees, name)

    def _eval_due(self, step: int) -> bool:
        every = self.recipe.eval.every
        return bool(every) and 0 < step < self.recipe.steps and step % every == 0

    def _eval_step(self, before: dict[str, Any]) -> None:
        rep = self.run_eval(f"step_{self.step:06d}")
        fig = self._log_goals(before, rep)
        self.console.print(f"eval @ {self.step}: accuracy per round " + " ".join(f"{a:.3f}" for a in rep["accuracy"])
                           + "; against before RL: " + goals_brief(fig))

    def _eval_before(self) -> dict[str, Any]:
        """The pre-RL eval; a resumed run reuses its run dir's, or evaluates the resumed weights."""
        if self.step == 0:
            return self.run_eval("before")
        from r3_rl.eval.evaluate import read_report

        return read_report(self.run_dir / "eval", "before") or self.run_eval(f"resume_{self.step:06d}")

    def _record_environment(self) -> None:
        """``environment.json``: what the numbers hang on besides the recipe; a resume elsewhere is an event."""
        from r3_rl.environment import record_environment, summary_line

        started_in = self.resumed_from.parent.parent if self.resumed_from is not None else None
        env, changed = record_environment(self.run_dir, "resume" if self.resumed_from else "train", started_in)
        self.console.print(f"environment: {summary_line(env)}")
        if changed:
            shown = "; ".join(changed[:6]) + (f"; {len(changed) - 6} more" if len(changed) > 6 else "")
            self.log_event(f"resumed in another environment than the run started in ({shown}; environment.json): "
                           "it goes on, but its numbers will not match an uninterrupted run's bit for bit")

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
        self._record_environment()
        before = self._eval_before()
        self.console.print("eval before RL:\n" + markdown_table(before))
        if self.step == 0:  # the series start (no gain yet, refinement before RL); a resume has logged it
            self._log_goals(before, before, step=0)
        if self.eval_pending:  # resumed from the checkpoint an eval was cut off after
            self._eval_step(before)
        t0 = time.time()
        for step in range(self.step, r.steps):
            self.step = step
            t_roll = time.time()
            # what the parents' tag / prompt / round alone would tell the critic, on the draw rollout makes next
            draws_parents = stages_at(r.tree.schedule, step)[1]  # only where stages B+C draw parents this step
            shortcuts = ({f"{UNDERSTANDING}/shortcut_{k}": v
                          for k, v in self.buffer.shortcut_accuracy(r.tree.parent_balance).items()}
                         if draws_parents else {})
            trees = self.rollout(step)
            items, batch_stats, adv_stats = self.algorithm.batch(trees, self.policy.version)
            t_learn = time.time()
            learn = self.learner.step(items)
            if "learner/loss" in learn:
                self.policy.version += 1
                self.engine.sync(self.policy, trainable_only=True)  # the next step samples the new weights
            done = time.time()
            # the learner's numbers pass through: PPO logs the advantages it trains on (its GAE) there
            m = step_metrics(trees, r.rewards.correct_threshold, learn, batch_stats, adv_stats,
                             t_learn - t_roll, done - t_learn, self.worker_restarts())
            m.update(shortcuts)
            self.metrics.log(m, step)
            every = r.log.trajectories_every  # under tree.schedule alternate, the B+C step after it too
            if every and (step % every == 0 or (r.tree.schedule == "alternate" and step % every == 1)):
                if r.log.dump_trees:  # a sample: every tree of a large step is minutes of PNG encoding
                    self._dump(step, trees)
                self.metrics.log_trajectories(trees + self._sample_chains(step, trees), step)
            self.console.step(step, r.steps, m, time.time() - t0)
            self.step = step + 1  # steps completed: what evals and checkpoints from here on describe
            if r.save_every and self.step % r.save_every == 0 and self.step < r.steps:
                self.save_checkpoint()  # before the eval: a run cut off during it loses the eval, not the steps
            if self._eval_due(self.step):
                self._eval_step(before)
        self.step = r.steps
        self.dumps.wait()  # a dump that failed fails the run, as it did when it was written on the loop
        self.save_checkpoint()
        after = self.run_eval("after")
        self.console.print("eval after RL:\n" + markdown_table(after))
        self.learner.export(self.run_dir / "final")  # LoRA merged, ZeRO-3 gathered
        fig = self._log_goals(before, after)
        summary = {"before": before["accuracy"], "after": after["accuracy"], "run_dir": str(self.run_dir),
                   "synergy": fig}
        self.console.print(f"run dir {self.run_dir}; R3 synergy on held-out prompts:")
        for line in [understanding_line(fig), *synergy_lines(fig)]:  # the three goal figures last
            if line:
                self.console.print("  " + line)
        return summary
