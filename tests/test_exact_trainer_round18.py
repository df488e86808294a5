"""Exact small cases for the training loop's bookkeeping: the Ctrl-C/SIGTERM watchdog, stamped names and run
dirs, the global RNG state of ``trainer.pt`` and the Trainer's steps, evals, checkpoints and events (round 18 audit).

Each test pins one behaviour with a hand-worked expectation, on stand-in parts (``SimpleNamespace``): no model, no
Ray, no training.
"""
from __future__ import annotations

import signal
from pathlib import Path
from types import SimpleNamespace as NS
from typing import Any

import pytest

import r3_rl.trainer as tm

# ------------------------------------------------------------------------------------------ interrupts


def test_install_keeps_the_grace_it_was_given() -> None:
    """Catches ``install`` building the watchdog with the default 60 s whatever grace the caller asked for."""
    from r3_rl import interrupts

    old_int, old_term = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    try:
        dog = interrupts.install(grace_s=7.5)
        assert dog is not None and dog.grace_s == 7.5
        assert signal.getsignal(signal.SIGINT) is dog
    finally:
        interrupts._installed = None
        signal.signal(signal.SIGINT, old_int)
        signal.signal(signal.SIGTERM, old_term)


def test_the_grace_timer_waits_exactly_the_grace() -> None:
    """Catches the hard-exit timer armed for another interval than ``grace_s`` (the message names ``grace_s``)."""
    from r3_rl.interrupts import InterruptWatchdog

    exits: list[Any] = []
    dog = InterruptWatchdog(grace_s=42.0, exit_fn=lambda why, code: exits.append((why, code)))
    with pytest.raises(KeyboardInterrupt):
        dog(signal.SIGINT, None)
    try:
        assert dog.timer is not None
        assert dog.timer.interval == 42.0
        assert dog.timer.args == ("clean-up took over 42 s", 130)
    finally:
        dog.cancel()
    assert exits == []


# ------------------------------------------------------------------------------------------ Trainer.__init__


def _built(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, seed: int, eval_rounds: int, max_round: int) -> Any:
    """A Trainer built on a stand-in recipe, every part stubbed; returns it and the MetricsLogger's keywords."""
    seen: dict[str, Any] = {}
    parts = NS(task_rewards=NS(), eval_rewards=NS(), policy=NS(), reference=None, failures=NS(), scorer=NS(),
               algorithm=NS(), learner=NS())
    monkeypatch.setattr(tm, "check_recipe_precision", lambda recipe: None)
    monkeypatch.setattr(tm, "check_ranks", lambda learner: None)
    monkeypatch.setattr(tm, "Components", lambda *a, **k: parts)
    monkeypatch.setattr(tm, "ParentBuffer", lambda *a, **k: NS())
    monkeypatch.setattr(tm, "PromptSource", lambda recipe: NS())
    monkeypatch.setattr(tm, "MetricsLogger", lambda run_dir, **k: seen.update(k) or NS())
    monkeypatch.setattr(tm, "Evaluator", lambda *a, **k: NS())
    monkeypatch.setattr(tm, "stage_sampling", lambda recipe: None)
    monkeypatch.setattr(tm, "BackgroundWriter", lambda: NS())
    recipe = NS(threads=0, seed=seed, log=NS(console=False, tensorboard=False), eval=NS(rounds=eval_rounds),
                tree=NS(max_round=max_round, buffer_size=4), learner=NS())
    return tm.Trainer(recipe, tmp_path / "run", console=NS(enabled=False, print=lambda *a: None)), seen


def test_the_trainer_seeds_torch_python_numpy_and_its_own_generator_with_the_recipe_seed(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Catches a global generator left unseeded (or seeded off by one) and the loop's own ``rng`` unseeded: two
    runs of one recipe would draw different parents and save different RNG states."""
    import random

    import numpy as np
    import torch

    saved = random.getstate(), np.random.get_state(), torch.get_rng_state()
    try:
        random.seed(999)
        np.random.seed(999)
        torch.manual_seed(999)
        tr, _ = _built(monkeypatch, tmp_path, seed=5, eval_rounds=1, max_round=1)
        assert torch.initial_seed() == 5
        assert random.random() == random.Random(5).random()
        assert np.random.random_sample() == np.random.RandomState(5).random_sample()
        assert tr.rng.random() == random.Random(5).random()
        assert tr.step == 0 and tr.restarts_before == 0 and tr.eval_pending is False
    finally:
        random.setstate(saved[0])
        np.random.set_state(saved[1])
        torch.set_rng_state(saved[2])


@pytest.mark.parametrize("eval_rounds,max_round,slots", [(1, 3, 4), (4, 2, 5), (2, 2, 3)])
def test_the_metrics_keep_one_slot_per_round_of_eval_or_training_whichever_is_longer(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path, eval_rounds: int, max_round: int, slots: int) -> None:
    """Rounds 0..R are R + 1 slots, R the larger of ``eval.rounds`` and ``tree.max_round``: catches the + 1 dropped
    (the last round's accuracy has no slot) or one of the two ignored."""
    import random

    import numpy as np
    import torch

    saved = random.getstate(), np.random.get_state(), torch.get_rng_state()
    try:
        _, seen = _built(monkeypatch, tmp_path, seed=0, eval_rounds=eval_rounds, max_round=max_round)
    finally:
        random.setstate(saved[0])
        np.random.set_state(saved[1])
        torch.set_rng_state(saved[2])
    assert seen == {"tensorboard": False, "slots": slots}


# ------------------------------------------------------------------------------------------ events, state


def test_an_event_is_one_stamped_line_naming_the_step(tmp_path: Path) -> None:
    """Catches events.log lines run together (no newline), the wrong step, or the console's colour markup shown on a
    plain console (and missing on a rich one)."""
    import re

    printed: list[str] = []
    tr = tm.Trainer.__new__(tm.Trainer)
    tr.run_dir, tr.step = tmp_path, 3
    tr.console = NS(enabled=False, print=printed.append)
    tr.log_event("worker 1 restarted")
    tr.step = 4
    tr.console.enabled = True
    tr.log_event("task 2 reissued")
    lines = (tmp_path / "events.log").read_text().split("\n")
    assert len(lines) == 3 and lines[2] == ""
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d step 3 worker 1 restarted", lines[0]), lines[0]
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d step 4 task 2 reissued", lines[1]), lines[1]
    assert printed == ["worker 1 restarted", "[yellow]event[/] task 2 reissued"]


def test_state_dict_holds_the_loops_counters_and_the_whole_runs_worker_restarts() -> None:
    """Catches trainer.pt saving another policy version, the restarts of the resumed-from runs only (this run's
    engine's dropped), or the failure counts of something else."""
    import random

    tr = tm.Trainer.__new__(tm.Trainer)
    tr.step, tr.policy, tr.rng = 6, NS(version=4), random.Random(3)
    tr.data, tr.failures = NS(position=17), NS(state_dict=lambda: {"failed": 2, "scored": 9})
    tr.restarts_before, tr.parts = 2, NS(engine=NS(restarts=3))
    state = tr.state_dict()
    assert (state["step"], state["policy_version"], state["data_position"]) == (6, 4, 17)
    assert state["scorer"] == {"failed": 2, "scored": 9}
    assert state["worker_restarts"] == 5
    assert state["rng"] == random.Random(3).getstate()
    assert {"python_rng", "numpy_rng", "torch_rng", "cuda_rng", "format"} <= set(state)


def test_sampling_weights_use_the_optimisers_gather_only_where_it_has_one() -> None:
    """Catches an optimiser without ``for_sampling`` (plain torch) asked for it, or the gather given other modules."""
    import contextlib

    tr = tm.Trainer.__new__(tm.Trainer)
    tr.policy = NS(model="M")
    tr.learner = NS()
    assert isinstance(tr.sampling_weights(), contextlib.nullcontext)
    tr.learner = NS(optim=NS())
    assert isinstance(tr.sampling_weights(), contextlib.nullcontext)
    tr.learner = NS(optim=NS(for_sampling=lambda modules: ("gathered", modules)))
    assert tr.sampling_weights() == ("gathered", ["M"])


def test_save_checkpoint_names_the_step_it_was_given_and_remembers_the_reference_file(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Catches ``save_checkpoint(step)`` saving under the loop's old step, and a reference file remembered that the
    checkpoint does not hold (the next save would link a missing file) or held without a frozen reference."""
    import r3_rl.learner.checkpoint as ck

    calls: list[Any] = []

    def save(run_dir, step, keep_last, parts, recipe):
        calls.append((run_dir, step, keep_last))
        path = run_dir / "checkpoints" / f"step_{step:06d}"
        (path / "state").mkdir(parents=True, exist_ok=True)
        return path
    monkeypatch.setattr(ck, "save_checkpoint", save)
    tr = tm.Trainer.__new__(tm.Trainer)
    tr.run_dir, tr.step, tr.recipe, tr.reference = tmp_path, 2, NS(keep_last=3), NS()
    tr._checkpoint_parts = lambda: None
    path = tr.save_checkpoint(5)
    assert calls == [(tmp_path, 5, 3)] and tr.step == 5 and path == tmp_path / "checkpoints" / "step_000005"
    assert tr.reference_file is None  # no reference.safetensors written there
    (path / "state" / "reference.safetensors").write_bytes(b"x")
    tr.save_checkpoint()
    assert calls[-1] == (tmp_path, 5, 3) and tr.reference_file == path / "state" / "reference.safetensors"
    tr.reference = None  # a run without a frozen reference links nothing, whatever the folder holds
    tr.save_checkpoint()
    assert tr.reference_file is None


# ------------------------------------------------------------------------------------------ resume


def _resumed(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, *, at: int, later: list[Path], engine_built: bool,
             reference: Any, steps: int = 10, every: int = 0) -> tuple[tm.Trainer, list[Any]]:
    """``Trainer.resume`` on stand-ins: the checkpoint load only sets the step; returns the trainer and its events."""
    import r3_rl.learner.checkpoint as ck

    ev: list[Any] = []
    tr = tm.Trainer.__new__(tm.Trainer)
    tr.recipe, tr.run_dir, tr.step, tr.reference = NS(steps=steps, eval=NS(every=every)), tmp_path, 0, reference
    tr.console = NS(print=lambda *a, **k: None, enabled=False)
    tr.policy = NS(version=at)
    tr.metrics = NS(rewind=lambda step, keep_evals: ev.append(("rewind", step, keep_evals)))
    tr.parts = NS(built=lambda part: engine_built and part == "engine",
                  engine=NS(sync=lambda policy, **k: ev.append(("sync", policy, k))))
    tr._checkpoint_parts = lambda: None
    tr.log_event = lambda message: ev.append(("event", message))
    tr._relog_eval_summaries = lambda name: ev.append(("relog", name))

    def load(path, parts, recipe, checked):
        tr.step = at
    monkeypatch.setattr(ck, "load_checkpoint", load)
    monkeypatch.setattr(ck, "set_aside_later", lambda path, run_dir: later)
    ckpt = tmp_path / "checkpoints" / f"step_{at:06d}"
    (ckpt / "state").mkdir(parents=True)
    (ckpt / "state" / "reference.safetensors").write_bytes(b"ref")
    tr.resume(ckpt)
    return tr, ev


def test_a_resume_names_each_abandoned_checkpoint_by_its_step_and_syncs_a_started_engine(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Catches the event naming the set-aside folder's new ``abandoned-`` name as the later checkpoint, a started
    rollout engine left on the weights it had before the resume (a whole sync, not the trainable part only), and
    the checkpoint's reference file not remembered for the next save's link."""
    root = tmp_path / "checkpoints"
    later = [root / "abandoned-step_000006", root / "abandoned-step_000008-20260101-000000"]
    tr, ev = _resumed(monkeypatch, tmp_path, at=4, later=later, engine_built=True, reference=NS())
    assert ev == [
        ("event", (f"resumed at step 4: the later checkpoint step_000006 belongs to the abandoned branch; set aside "
                   f"as {later[0]} (--resume auto skips it; delete it when it is not needed)")),
        ("event", (f"resumed at step 4: the later checkpoint step_000008-20260101-000000 belongs to the abandoned "
                   f"branch; set aside as {later[1]} (--resume auto skips it; delete it when it is not needed)")),
        ("rewind", 4, True),
        ("sync", tr.policy, {})]
    assert tr.resumed_from == root / "step_000004"
    assert tr.reference_file == root / "step_000004" / "state" / "reference.safetensors"


def test_a_resume_starts_no_engine_and_links_no_reference_it_does_not_have(monkeypatch: pytest.MonkeyPatch,
                                                                          tmp_path: Path) -> None:
    """Catches a resume that builds the rollout engine (minutes, Ray workers) just to sync it."""
    tr, ev = _resumed(monkeypatch, tmp_path, at=3, later=[], engine_built=False, reference=None)
    assert ev == [("rewind", 3, True)]
    assert tr.reference_file is None


def test_a_resumed_run_without_a_before_report_evaluates_under_the_resume_name(monkeypatch: pytest.MonkeyPatch,
                                                                              tmp_path: Path) -> None:
    """Catches a resumed run's fresh evaluation filed as ``before`` (it is of the resumed weights, not the
    pre-RL ones), and step 0 reading an old report instead of evaluating."""
    import r3_rl.eval.evaluate as evm

    monkeypatch.setattr(evm, "read_report", lambda folder, name: None)
    names: list[str] = []
    tr = tm.Trainer.__new__(tm.Trainer)
    tr.step, tr.run_dir = 12, tmp_path
    tr.run_eval = lambda name, step=None: names.append(name) or {"accuracy": [0.5]}
    assert tr._eval_before() == {"accuracy": [0.5]}
    monkeypatch.setattr(evm, "read_report", lambda folder, name: {"accuracy": [0.0]})
    tr.step = 0
    assert tr._eval_before() == {"accuracy": [0.5]}
    assert names == ["resume_000012", "before"]


# ------------------------------------------------------------------------------------------ the loop


def _run_loop(monkeypatch: pytest.MonkeyPatch, steps: int, *, schedule: str = "together", dump_trees: int = 0,
              traj_every: int = 0) -> list[Any]:
    """``_train`` on stand-in parts with a fake clock (a rollout takes 10 s, an update 3 s); returns, in order, what
    the loop passed to ``step_metrics``, logged, dumped and waited for."""
    ev: list[Any] = []
    clock = [100.0]
    monkeypatch.setattr(tm, "time", NS(time=lambda: clock[0]))
    monkeypatch.setattr(tm, "step_metrics", lambda trees, thr, learn, b, a, roll_s, learn_s, restarts:
                        ev.append(("metrics", roll_s, learn_s, restarts)) or {"m": 1.0})
    for name in ("markdown_table", "goals_brief", "understanding_line"):
        monkeypatch.setattr(tm, name, lambda *a: "")
    monkeypatch.setattr(tm, "synergy_figures", lambda before, rep: {k: 0.0 for k in tm.GOALS})
    monkeypatch.setattr(tm, "synergy_lines", lambda fig: [])

    def rollout(step: int) -> list[Any]:
        clock[0] += 10.0
        return [f"tree{step}"]

    def learn(items: Any) -> dict[str, float]:
        clock[0] += 3.0
        return {"learner/loss": 1.0}
    tr = tm.Trainer.__new__(tm.Trainer)
    tr.recipe = NS(name="t", steps=steps, save_every=0, eval=NS(every=0),
                   log=NS(trajectories_every=traj_every, dump_trees=dump_trees),
                   tree=NS(schedule=schedule, parent_balance="none"), rewards=NS(correct_threshold=0.5))
    tr.step, tr.eval_pending, tr.run_dir = 0, False, Path("/nonexistent-run")
    tr.console = NS(print=lambda *a, **k: None, step=lambda *a, **k: None, enabled=False)
    tr._record_environment = lambda: None
    tr.run_eval = lambda name, step=None: {"accuracy": [0.0]}
    tr.metrics = NS(log=lambda m, step: ev.append(("log", step, dict(m))) if "m" in m else None,
                    log_trajectories=lambda trees, step: ev.append(("traj", step)))
    tr.buffer = NS(shortcut_accuracy=lambda balance: {"tag": 0.25, "round": 0.75})
    tr.rollout = rollout
    tr.algorithm = NS(batch=lambda trees, version: ([], {}, {}))
    tr.learner = NS(step=learn, export=lambda folder: None)
    tr.policy = NS(version=0)
    tr.parts = NS(engine=NS(sync=lambda policy, trainable_only=False: None))
    tr.worker_restarts = lambda: 2
    tr.save_checkpoint = lambda step=None: ev.append(("save", tr.step))
    tr._sample_chains = lambda step, trees: []
    tr._dump = lambda step, trees: ev.append(("dump", step, list(trees)))
    tr.dumps = NS(wait=lambda: ev.append(("wait",)))
    tr._train()
    return ev


def test_each_steps_metrics_get_rollout_then_learner_seconds_and_the_parent_shortcuts_only_on_bc_steps(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Catches the two timings swapped, the critic-shortcut figures dropped, or logged on the alternate schedule's
    stage-A steps (which draw no parents) instead of its B+C steps."""
    ev = _run_loop(monkeypatch, 3, schedule="alternate")
    u = tm.UNDERSTANDING
    shortcut = {"m": 1.0, f"{u}/shortcut_tag": 0.25, f"{u}/shortcut_round": 0.75}
    assert [e for e in ev if e[0] in ("metrics", "log")] == [
        ("metrics", 10.0, 3.0, 2), ("log", 0, {"m": 1.0}),
        ("metrics", 10.0, 3.0, 2), ("log", 1, shortcut),
        ("metrics", 10.0, 3.0, 2), ("log", 2, {"m": 1.0})]
    ev = _run_loop(monkeypatch, 1, schedule="together")
    assert [e for e in ev if e[0] == "log"] == [("log", 0, shortcut)]


def test_trajectory_dumps_follow_dump_trees_and_are_waited_for_before_the_final_save(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Catches a dump written with ``log.dump_trees: 0`` (none asked for), and the final save not waiting for the
    dump under way (a dump that failed would not fail the run)."""
    ev = _run_loop(monkeypatch, 2, dump_trees=0, traj_every=1)
    assert [e[0] for e in ev if e[0] in ("dump", "traj", "wait", "save")] == ["traj", "traj", "wait", "save"]
    ev = _run_loop(monkeypatch, 2, dump_trees=3, traj_every=1)
    assert [e for e in ev if e[0] in ("dump", "traj", "wait", "save")] == [
        ("dump", 0, ["tree0"]), ("traj", 0), ("dump", 1, ["tree1"]), ("traj", 1), ("wait",), ("save", 2)]


def test_log_goals_logs_the_three_figures_at_the_step_it_is_given_else_the_current_one(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Catches the series start (``step=0``) logged at the loop's current step instead."""
    monkeypatch.setattr(tm, "synergy_figures", lambda before, rep: {**{k: 0.5 for k in tm.GOALS}, "extra": 1.0})
    logged: list[Any] = []
    tr = tm.Trainer.__new__(tm.Trainer)
    tr.step, tr.metrics = 4, NS(log=lambda m, step: logged.append((step, m)))
    assert tr._log_goals({}, {}, step=0)["extra"] == 1.0
    tr._log_goals({}, {})
    want = {f"{tm.EVAL}/synergy/{k}": 0.5 for k in tm.GOALS}
    assert logged == [(0, want), (4, want)]


def test_an_old_trainer_pt_brings_its_parent_buffer_back(monkeypatch: pytest.MonkeyPatch) -> None:
    """Formats 1-2 kept the parent buffer inside trainer.pt: catches a resume from such a checkpoint that starts
    stages B+C with an empty buffer (and a format-3 state asking the buffer to load a key it does not have)."""
    import random

    import r3_rl.rng_state as rs

    monkeypatch.setattr(rs, "set_global_rng_state", lambda state: None)
    loaded: list[Any] = []
    tr = tm.Trainer.__new__(tm.Trainer)
    tr.policy, tr.rng, tr.data = NS(version=0), random.Random(0), NS(position=0)
    tr.buffer = NS(load_legacy=loaded.append)
    tr.failures = NS(load_state_dict=lambda s: loaded.append(("scorer", s)))
    state = {"step": 2, "policy_version": 2, "rng": random.Random(1).getstate(), "data_position": 4,
             "scorer": {"failed": 1}, "buffer": {"entries": ["e1", "e2"]}}
    tr.load_state_dict(state)
    assert loaded == [{"entries": ["e1", "e2"]}, ("scorer", {"failed": 1})]
    del state["buffer"]
    loaded.clear()
    tr.load_state_dict(state)
    assert loaded == [("scorer", {"failed": 1})]
    assert tr.rng.getstate() == random.Random(1).getstate() and (tr.step, tr.data.position) == (2, 4)


@pytest.mark.parametrize("steps,want", [
    (8, [("rewind", 4, True), ("relog", "step_000004")]),  # the kept eval's table and grids come back
    (4, [("rewind", 4, False)]),  # the final step: its lines go (the 'after' eval runs again), nothing relogged
])
def test_a_written_eval_at_the_resumed_step_is_shown_again_only_when_it_is_kept(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path, steps: int, want: list[Any]) -> None:
    """Catches the kept eval's summaries relogged after a rewind that dropped its lines (a checkpoint at the last
    step whose run dir holds that step's report from a longer earlier run)."""
    (tmp_path / "eval").mkdir()
    (tmp_path / "eval" / "step_000004.json").write_text("{}")
    _, ev = _resumed(monkeypatch, tmp_path, at=4, later=[], engine_built=False, reference=None, steps=steps,
                     every=2)
    assert ev == want


def test_relog_shows_a_kept_report_with_its_dumped_chains_and_nothing_without_one(monkeypatch: pytest.MonkeyPatch,
                                                                                   tmp_path: Path) -> None:
    """Catches the relog condition inverted (a missing report relogged as ``None``, a present one not shown)."""
    import r3_rl.eval.evaluate as evm
    import r3_rl.trajectory as trm

    reports = {"step_000004": {"accuracy": [0.5]}}
    monkeypatch.setattr(evm, "read_report", lambda folder, name: reports.get(name))
    monkeypatch.setattr(trm, "read_trees", lambda path: iter([f"tree of {path.name}"]))
    shown: list[Any] = []
    tr = tm.Trainer.__new__(tm.Trainer)
    tr.run_dir, tr.step = tmp_path, 4
    tr.metrics = NS(log_eval_summaries=lambda report, step, trees, name: shown.append((report, step, trees, name)))
    tr.log_event = lambda message: shown.append(("event", message))
    (tmp_path / "eval").mkdir()
    tr._relog_eval_summaries("step_000004")
    assert shown == [({"accuracy": [0.5]}, 4, [], "step_000004")]
    (tmp_path / "eval" / "step_000004_trajectories.jsonl").write_text("")
    tr._relog_eval_summaries("step_000004")
    assert shown[-1] == ({"accuracy": [0.5]}, 4, ["tree of step_000004_trajectories.jsonl"], "step_000004")
    shown.clear()
    tr._relog_eval_summaries("step_000002")
    assert shown == []


@pytest.mark.parametrize("n,shown", [(0, None), (1, "c0"), (6, "c0; c1; c2; c3; c4; c5"),
                                     (7, "c0; c1; c2; c3; c4; c5; 1 more")])
def test_the_environment_event_lists_up_to_six_changes_and_counts_only_a_real_rest(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path, n: int, shown: str | None) -> None:
    """Catches "; 0 more" after exactly six changes, and an event for a resume where nothing changed."""
    import r3_rl.environment as envm

    monkeypatch.setattr(envm, "record_environment", lambda run_dir, kind, started_in: ({}, [f"c{i}" for i in
                                                                                           range(n)]))
    monkeypatch.setattr(envm, "summary_line", lambda env: "S")
    events: list[str] = []
    printed: list[str] = []
    tr = tm.Trainer.__new__(tm.Trainer)
    tr.run_dir, tr.resumed_from, tr.console, tr.log_event = tmp_path, None, NS(print=printed.append), events.append
    tr._record_environment()
    assert printed == ["environment: S"]
    want = [] if shown is None else [
        (f"resumed in another environment than the run started in ({shown}; environment.json): it goes on, but its "
         "numbers will not match an uninterrupted run's bit for bit")]
    assert events == want


def test_the_resume_hint_names_the_latest_checkpoint_and_the_run_dir(monkeypatch: pytest.MonkeyPatch,
                                                                    tmp_path: Path) -> None:
    """Catches the hint's two branches swapped (a run with checkpoints told to set save_every, or the reverse)."""
    import r3_rl.learner.checkpoint as ck

    tr = tm.Trainer.__new__(tm.Trainer)
    tr.run_dir = tmp_path
    monkeypatch.setattr(ck, "latest_checkpoint", lambda run_dir: run_dir / "checkpoints" / "step_000008")
    assert tr._resume_hint() == f"continue from step_000008 with --run-dir {tmp_path} --resume auto"
    monkeypatch.setattr(ck, "latest_checkpoint", lambda run_dir: None)
    assert tr._resume_hint() == "no checkpoint to continue from yet (set save_every)"
