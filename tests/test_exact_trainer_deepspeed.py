"""Exact, fast checks of the train loop's bookkeeping, the component wiring, the DeepSpeed driver's helpers,
the ZeRO-3 gather and the learner's batching/accumulation (round 9A audit).

Every expectation is worked out by hand from the documented contract; no Ray, no DeepSpeed engine, no training.
The loop and the drivers run on stand-ins (``SimpleNamespace``) for their parts.
"""
from __future__ import annotations

import contextlib
import math
import random
from pathlib import Path
from types import SimpleNamespace as NS
from typing import Any

import pytest
import torch

import r3_rl.trainer as tm
from r3_rl.learner.batch import TrainItem
from r3_rl.learner.torch_learner import TorchLearner, reduce_metric

# ------------------------------------------------------------------ the train loop, on stand-in parts


def _loop(monkeypatch: pytest.MonkeyPatch, steps: int, *, start: int = 0, save_every: int = 0, eval_every: int = 0,
          traj_every: int = 0, schedule: str = "together", learn: dict[str, float] | None = None,
          pending: bool = False) -> tuple[tm.Trainer, list[tuple[Any, ...]]]:
    """A Trainer whose parts are stand-ins that record, in order, what the loop asks of them; runs ``_train``."""
    monkeypatch.setattr(tm, "step_metrics", lambda *a, **k: {"m": 1.0})
    monkeypatch.setattr(tm, "markdown_table", lambda rep: "")
    monkeypatch.setattr(tm, "goals_brief", lambda fig: "")
    monkeypatch.setattr(tm, "synergy_figures", lambda before, rep: {k: 0.0 for k in tm.GOALS})
    monkeypatch.setattr(tm, "understanding_line", lambda fig: "")
    monkeypatch.setattr(tm, "synergy_lines", lambda fig: [])
    ev: list[tuple[Any, ...]] = []
    tr = tm.Trainer.__new__(tm.Trainer)
    tr.recipe = NS(name="t", steps=steps, save_every=save_every, eval=NS(every=eval_every),
                   log=NS(trajectories_every=traj_every, dump_trees=0),
                   tree=NS(schedule=schedule, parent_balance="none"), rewards=NS(correct_threshold=0.5))
    tr.step, tr.eval_pending, tr.run_dir = start, pending, Path("/nonexistent-run")
    tr.console = NS(print=lambda *a, **k: None, step=lambda *a, **k: None, enabled=False)
    tr._record_environment = lambda: None
    tr._eval_before = lambda: {"accuracy": [0.0]}
    tr.run_eval = lambda name, step=None: ev.append(("eval", name, tr.step)) or {"accuracy": [0.0]}
    tr.metrics = NS(log=lambda m, step: ev.append(("log", step, tuple(sorted(m)))),
                    log_trajectories=lambda trees, step: ev.append(("traj", step)))
    tr.buffer = NS(shortcut_accuracy=lambda balance: {"tag": 0.5})
    tr.rollout = lambda step: ev.append(("rollout", step)) or []
    tr.algorithm = NS(batch=lambda trees, version: ([], {}, {}))
    tr.learner = NS(step=lambda items: dict(learn if learn is not None else {"learner/loss": 1.0}),
                    export=lambda folder: ev.append(("export",)))
    tr.policy = NS(version=0)
    tr.parts = NS(engine=NS(sync=lambda policy, trainable_only=False: ev.append(("sync", trainable_only))))
    tr.worker_restarts = lambda: 0
    tr.save_checkpoint = lambda step=None: ev.append(("save", tr.step))
    tr._sample_chains = lambda step, trees: []
    tr._dump = lambda step, trees: ev.append(("dump", step))
    tr.dumps = NS(wait=lambda: None)
    tr._train()
    return tr, ev


def _kinds(ev: list[tuple[Any, ...]], *kinds: str) -> list[tuple[Any, ...]]:
    return [e for e in ev if e[0] in kinds]


def test_saves_and_evals_land_on_every_nth_completed_step_and_the_last_step_is_left_to_the_final_save() -> None:
    """Catches eval/save every-N off by one (step vs steps done) and a mid-loop save/eval at the last step."""
    with pytest.MonkeyPatch.context() as mp:
        tr, ev = _loop(mp, 6, save_every=2, eval_every=2)
    assert _kinds(ev, "save", "eval") == [
        ("save", 2), ("eval", "step_000002", 2),
        ("save", 4), ("eval", "step_000004", 4),
        ("save", 6), ("eval", "after", 6)]
    assert tr.step == 6


def test_eval_due_is_strictly_inside_the_run() -> None:
    """Catches _eval_due accepting the final step (which the 'after' eval covers) or step 0, or a shifted modulus."""
    tr = tm.Trainer.__new__(tm.Trainer)
    tr.recipe = NS(steps=6, eval=NS(every=3))
    assert [s for s in range(8) if tr._eval_due(s)] == [3]
    tr.recipe = NS(steps=6, eval=NS(every=0))
    assert [s for s in range(8) if tr._eval_due(s)] == []


def test_trajectories_are_logged_on_step_multiples_and_under_alternate_the_step_after() -> None:
    """Catches the trajectory every-N test shifted by one, or the alternate-schedule extra step applied to 'together'."""
    with pytest.MonkeyPatch.context() as mp:
        _, ev = _loop(mp, 7, traj_every=3)
    assert [e[1] for e in _kinds(ev, "traj")] == [0, 3, 6]
    with pytest.MonkeyPatch.context() as mp:
        _, ev = _loop(mp, 7, traj_every=3, schedule="alternate")
    assert [e[1] for e in _kinds(ev, "traj")] == [0, 1, 3, 4, 6]


def test_policy_version_moves_only_when_the_learner_reports_a_loss() -> None:
    """Catches the version bump / engine sync done for a step whose update was skipped (no learner/loss)."""
    with pytest.MonkeyPatch.context() as mp:
        tr, ev = _loop(mp, 3, learn={"learner/skipped_empty": 1.0})
    assert tr.policy.version == 0 and _kinds(ev, "sync") == []
    with pytest.MonkeyPatch.context() as mp:
        tr, ev = _loop(mp, 3)
    assert tr.policy.version == 3 and _kinds(ev, "sync") == [("sync", True)] * 3


def test_a_resumed_loop_replays_from_its_step_and_does_not_relog_the_series_start() -> None:
    """Catches a resumed run skipping its first step, or re-logging the step-0 synergy point."""
    with pytest.MonkeyPatch.context() as mp:
        _, ev = _loop(mp, 5, start=2)
    assert [e[1] for e in _kinds(ev, "rollout")] == [2, 3, 4]
    synergy_at_0 = [e for e in _kinds(ev, "log") if e[1] == 0]
    assert synergy_at_0 == []
    with pytest.MonkeyPatch.context() as mp:
        _, ev = _loop(mp, 2)
    assert next(e for e in _kinds(ev, "log") if e[1] == 0) == (
        "log", 0, tuple(sorted(f"{tm.EVAL}/synergy/{k}" for k in tm.GOALS)))


def _resume(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, at: int, steps: int, every: int,
            eval_written: bool) -> tm.Trainer:
    import r3_rl.learner.checkpoint as ck

    calls: dict[str, Any] = {}
    tr = tm.Trainer.__new__(tm.Trainer)
    tr.recipe = NS(steps=steps, eval=NS(every=every))
    tr.run_dir = tmp_path
    tr.step = 0
    tr.reference = None
    tr.console = NS(print=lambda *a, **k: None, enabled=False)
    tr.policy = NS(version=at)
    tr.metrics = NS(rewind=lambda step, keep_evals: calls.update(rewind=(step, keep_evals)))
    tr.parts = NS(built=lambda part: False)
    tr._checkpoint_parts = lambda: None

    def load(path, parts, recipe, checked):
        tr.step = at
    monkeypatch.setattr(ck, "load_checkpoint", load)
    monkeypatch.setattr(ck, "set_aside_later", lambda path, run_dir: [])
    if eval_written:
        (tmp_path / "eval").mkdir()
        (tmp_path / "eval" / f"step_{at:06d}.json").write_text("{}")
    tr.resume(tmp_path / "checkpoints" / f"step_{at:06d}")
    tr.calls = calls
    return tr


@pytest.mark.parametrize("at,written,pending,keep", [
    (4, False, True, False),   # eval due at 4 was cut off: run it again, drop its partial lines
    (4, True, False, True),    # eval due at 4 was written: keep it, do not run it again
    (3, False, False, True),   # no eval due at 3: keep what was logged there
    (6, False, False, False),  # the final checkpoint: its 'after' eval runs again, its lines go
])
def test_resume_decides_which_eval_to_rerun_and_which_eval_lines_to_keep(
        tmp_path: Path, at: int, written: bool, pending: bool, keep: bool) -> None:
    """Catches eval_pending ignoring a written report, and keep_evals kept at the final step."""
    with pytest.MonkeyPatch.context() as mp:
        tr = _resume(mp, tmp_path, at, steps=6, every=2, eval_written=written)
    assert tr.eval_pending is pending
    assert tr.calls["rewind"] == (at, keep)


def test_worker_restarts_add_the_runs_before_and_never_start_the_engine() -> None:
    """Catches worker_restarts dropping the resumed-from count, or building the engine to count."""
    tr = tm.Trainer.__new__(tm.Trainer)
    tr.restarts_before = 2
    tr.parts = NS()
    assert tr.worker_restarts() == 2
    tr.parts = NS(engine=NS(restarts=3))
    assert tr.worker_restarts() == 5


def test_load_state_dict_restores_the_worker_restart_count() -> None:
    """Catches load_state_dict forgetting the checkpoint's worker_restarts (older checkpoints: 0)."""
    from r3_rl.rng_state import global_rng_state

    tr = tm.Trainer.__new__(tm.Trainer)
    tr.policy, tr.rng, tr.data = NS(version=0), random.Random(0), NS(position=0)
    tr.failures = NS(load_state_dict=lambda s: None)
    state = {"step": 7, "policy_version": 5, "rng": random.Random(1).getstate(), **global_rng_state(),
             "data_position": 11, "scorer": {}, "worker_restarts": 4}
    tr.load_state_dict(state)
    assert (tr.step, tr.policy.version, tr.data.position, tr.restarts_before) == (7, 5, 11, 4)
    del state["worker_restarts"]
    tr.load_state_dict(state)
    assert tr.restarts_before == 0


def test_rollout_fills_the_buffer_per_schedule(monkeypatch: pytest.MonkeyPatch) -> None:
    """Catches the alternate schedule refilling the buffer on B+C steps instead of stage-A steps."""
    ev: list[Any] = []
    monkeypatch.setattr(tm, "plan_tasks", lambda *a, **k: [])
    monkeypatch.setattr(tm, "run_ordered", lambda engine, tasks, sampling, on_task: ["tree"])
    tr = tm.Trainer.__new__(tm.Trainer)
    tr.data = NS(next_batch=lambda n: ["p"] * n)
    tr.buffer = NS(sample=lambda *a: [], clear=lambda: ev.append("clear"))
    tr.rng, tr.sampling = random.Random(0), None
    tr.parts = NS(engine=None)
    tr.failures = NS(check=lambda: None)
    tr._fill_buffer = lambda trees: ev.append("fill")
    for schedule, want in (("alternate", [["clear", "fill"], [], ["clear", "fill"]]), ("together", [["fill"]] * 3)):
        tr.recipe = NS(seed=0, tree=NS(schedule=schedule, prompts_per_step=1, refine_groups_per_step=1,
                                       correct_parent_fraction=0.5, parent_balance="none", group_size=2),
                       rollout=NS(groups_per_task=1, backend="ray"))
        got = []
        for step in range(3):
            ev.clear()
            tr.rollout(step)
            got.append(list(ev))
        assert got == want, schedule


def _node(round_: int, reward: float | None = 0.5, image: Any = "img", segment: Any = "seg", nid: str = "n") -> NS:
    return NS(image=image, image_tokens=None, reward=reward, meta={"correct": True}, round=round_, segment=segment,
              id=nid)


def test_fill_buffer_keeps_scored_images_below_the_last_round() -> None:
    """Catches images of the last round (which no later round can refine) entering the parent buffer."""
    tr = tm.Trainer.__new__(tm.Trainer)
    tr.recipe = NS(tree=NS(max_round=2))
    got: list[Any] = []
    tr.buffer = NS(add_many=lambda entries: got.extend(entries))
    nodes = {"a": _node(0, nid="a"), "b": _node(1, nid="b"), "c": _node(2, nid="c"),
             "d": _node(1, reward=None, nid="d"), "e": _node(0, image=None, nid="e")}
    tr._fill_buffer([NS(prompt="p", id="t", nodes=nodes)])
    assert [(e.source, e.round) for e in got] == [("t/a", 0), ("t/b", 1)]


def test_a_resumed_run_reuses_its_before_report(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Catches a resume re-evaluating 'before' (minutes) instead of reading the run dir's report."""
    import r3_rl.eval.evaluate as evm

    monkeypatch.setattr(evm, "read_report", lambda folder, name: {"accuracy": [0.25]} if name == "before" else None)
    tr = tm.Trainer.__new__(tm.Trainer)
    tr.step, tr.run_dir = 3, tmp_path
    tr.run_eval = lambda name, step=None: pytest.fail(f"evaluated {name}")
    assert tr._eval_before() == {"accuracy": [0.25]}


def test_environment_record_names_the_run_dir_the_resumed_checkpoint_is_in(monkeypatch: pytest.MonkeyPatch,
                                                                          tmp_path: Path) -> None:
    """Catches the resumed run's origin taken as checkpoints/ instead of the run dir holding it."""
    import r3_rl.environment as envm

    seen: dict[str, Any] = {}
    monkeypatch.setattr(envm, "record_environment",
                        lambda run_dir, kind, started_in: seen.update(kind=kind, started_in=started_in) or ({}, []))
    monkeypatch.setattr(envm, "summary_line", lambda env: "")
    tr = tm.Trainer.__new__(tm.Trainer)
    tr.run_dir, tr.console = tmp_path, NS(print=lambda *a, **k: None)
    tr.resumed_from = tmp_path / "old" / "checkpoints" / "step_000004"
    tr._record_environment()
    assert seen == {"kind": "resume", "started_in": tmp_path / "old"}


def test_sample_chains_use_this_steps_stage_a_prompts_and_none_without_refinement(monkeypatch: pytest.MonkeyPatch
                                                                                  ) -> None:
    """Catches chains drawn from refine trees' prompts, or drawn when refine_groups_per_step is 0."""
    import r3_rl.eval.evaluate as evm
    import r3_rl.rollout.chain as chm

    seen: list[Any] = []
    monkeypatch.setattr(chm, "r3_chains", lambda policy, prompts, *a, **k: seen.append(list(prompts)) or ["c"])
    monkeypatch.setattr(evm, "score_chains", lambda *a, **k: None)
    tr = tm.Trainer.__new__(tm.Trainer)
    tr.policy, tr.sampling, tr.eval_rewards = NS(), None, None
    tr.sampling_weights = contextlib.nullcontext
    trees = [NS(prompt="pA1", meta={"kind": "A"}), NS(prompt="pB", meta={"kind": "B"}),
             NS(prompt="pA2", meta={"kind": "A"}), NS(prompt="pA3", meta={"kind": "A"})]
    tr.recipe = NS(seed=1, log=NS(chains=2), tree=NS(refine_groups_per_step=1, max_round=2),
                   templates=NS(stop_phrase="stop"), rewards=NS(correct_threshold=0.5))
    assert tr._sample_chains(3, trees) == ["c"]
    assert seen == [["pA1", "pA2"]]
    tr.recipe.tree.refine_groups_per_step = 0
    assert tr._sample_chains(3, trees) == []
    assert len(seen) == 1


# ------------------------------------------------------------------ components


def _parts(tmp_path: Path, **recipe: Any) -> Any:
    from r3_rl.components import Components

    return Components(NS(**recipe), tmp_path)


def test_components_reference_is_host_resident_only_with_several_learner_ranks(monkeypatch: pytest.MonkeyPatch,
                                                                               tmp_path: Path) -> None:
    """Catches the single-rank frozen reference put in host memory (every KL forward then on the CPU)."""
    import r3_rl.components as cm

    monkeypatch.setattr(cm, "needs_frozen_reference", lambda recipe: True)
    for ranks, on_host in ((1, False), (2, True)):
        c = _parts(tmp_path, learner=NS(ranks=ranks))
        c.__dict__["policy"] = NS(frozen_copy=lambda on_host: ("ref", on_host))
        assert c.reference == ("ref", on_host)
    monkeypatch.setattr(cm, "needs_frozen_reference", lambda recipe: False)
    c = _parts(tmp_path, learner=NS(ranks=1))
    c.__dict__["policy"] = NS(frozen_copy=lambda on_host: pytest.fail("built a reference"))
    assert c.reference is None


def test_components_built_does_not_build(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Catches built('engine') constructing the engine (starting workers) to answer."""
    import r3_rl.components as cm

    calls: list[Any] = []
    monkeypatch.setattr(cm, "build_engine", lambda *a: calls.append(a) or "e")
    c = _parts(tmp_path, rollout=NS(backend="local"))
    c.__dict__["policy"] = "p"
    assert c.built("engine") is False
    assert calls == []
    c.__dict__["engine"] = "e"
    assert c.built("engine") is True


def test_components_reward_set_binds_the_policy_only_when_asked(monkeypatch: pytest.MonkeyPatch,
                                                                tmp_path: Path) -> None:
    """Catches self-consistency rewards left unbound to the live policy."""
    import r3_rl.components as cm

    bound: list[Any] = []
    monkeypatch.setattr(cm, "reward_specs", lambda recipe, specs: specs)
    for needs in (True, False):
        monkeypatch.setattr(cm.RewardSet, "from_specs", staticmethod(
            lambda specs, needs=needs: NS(needs_policy=needs, bind_policy=bound.append)))
        c = _parts(tmp_path)
        c.__dict__["policy"] = "the-policy"
        c._reward_set([])
    assert bound == ["the-policy"]


def test_components_close_stops_rewards_engine_and_learner(tmp_path: Path) -> None:
    """Catches close() leaving learner ranks (or reward actors / workers) running."""
    closed: list[str] = []
    c = _parts(tmp_path)
    for part in ("task_rewards", "engine", "learner"):
        c.__dict__[part] = NS(close=lambda part=part: closed.append(part))
    c.close()
    assert closed == ["task_rewards", "engine", "learner"]


def test_components_scorer_gets_reason_and_reflect_formats_in_order(monkeypatch: pytest.MonkeyPatch,
                                                                    tmp_path: Path) -> None:
    """Catches the plan and critique format patterns swapped when the scorer is wired."""
    import r3_rl.components as cm
    from r3_rl.config import Recipe

    got: list[Any] = []
    monkeypatch.setattr(cm, "StageScorer", lambda *a, **k: got.append(a))
    rec = Recipe()
    c = cm.Components(rec, tmp_path)
    c.__dict__["task_rewards"] = "task"
    monkeypatch.setattr(c, "_reward_set", lambda specs: "extra")
    c.scorer  # noqa: B018
    a = got[0]
    assert a[0] == "task" and a[1] == rec.rewards.format_weight
    assert a[2] == r"^<think>.*</think>$" and a[3] == r"^<think>.*</think>.+$"


def test_components_keep_owning_a_ray_they_started(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Catches a second part's start_ray (Ray already up: False) making close() leave this run's Ray running."""
    import r3_rl.gpu_layout as gl
    import r3_rl.ray_runtime as rr

    answers = iter([True, False])
    monkeypatch.setattr(rr, "start_ray", lambda cfg, gpus: next(answers))
    monkeypatch.setattr(gl, "gpus_for_local_ray", lambda recipe: 0)
    c = _parts(tmp_path, ray=None)
    c._start_ray()
    c._start_ray()
    assert c._owns_ray is True


# ------------------------------------------------------------------ algorithm registry


def test_registry_rejects_a_class_that_is_not_an_algorithm(tmp_path: Path) -> None:
    """Catches algorithm_class accepting any class (a crash later, far from the recipe key)."""
    from r3_rl.errors import UserError
    from r3_rl.learner.registry import algorithm_class

    with pytest.raises(UserError, match="expected a subclass of r3_rl.learner.algorithm.Algorithm"):
        algorithm_class("collections:OrderedDict")


# ------------------------------------------------------------------ the DeepSpeed driver's helpers


def test_gradient_anchor_is_zero_and_leaves_zero_gradients() -> None:
    """Catches the anchor losing its 0x factor (every parameter's first element then trained)."""
    from r3_rl.learner.deepspeed_learner import gradient_anchor

    a = torch.nn.Parameter(torch.tensor([3.0, 4.0]))
    b = torch.nn.Parameter(torch.tensor([[5.0]]))
    anchor = gradient_anchor([a, b])
    assert float(anchor.detach()) == 0.0
    anchor.backward()
    assert a.grad.tolist() == [0.0, 0.0] and b.grad.tolist() == [[0.0]]


def _ds(**kw: Any) -> Any:
    from r3_rl.learner.deepspeed_learner import DeepSpeedOptim

    obj = DeepSpeedOptim.__new__(DeepSpeedOptim)
    obj.__dict__.update(kw)
    return obj


def test_forward_adds_the_anchor_only_on_several_ranks() -> None:
    """Catches the gradient anchor dropped on multi-rank (ranks then reduce gradients in different orders)."""
    p = torch.nn.Parameter(torch.tensor([2.0]))
    for world, n_out in ((1, 1), (2, 2)):
        ds = _ds(params=[p], world_size=world, engine=lambda run: run())
        loss, metrics, outputs = ds.forward(lambda: (p.sum() * 3.0, {"k": 1.0}, [p * 1.0]))
        assert float(loss.detach()) == 6.0 and metrics == {"k": 1.0} and len(outputs) == n_out


def test_manual_clip_with_grad_clip_zero_does_not_clip() -> None:
    """Catches grad_clip 0 (off) read as a max norm of 0 that zeroes every gradient."""
    p = torch.nn.Parameter(torch.zeros(2))
    p.grad = torch.tensor([3.0, 4.0])
    ds = _ds(cfg=NS(grad_clip=0.0), params=[p])
    ds._clip()
    assert ds._clipped_norm == 5.0 and p.grad.tolist() == [3.0, 4.0]
    ds.cfg = NS(grad_clip=1.0)
    ds._clip()
    assert ds._clipped_norm == 5.0 and p.grad.tolist() == pytest.approx([0.6, 0.8], rel=1e-5)


def _engine(applied: bool = True, norm: Any = 2.5, stage: int = 2) -> NS:
    ev: list[str] = []
    return NS(ev=ev, zero_grad=lambda: ev.append("zero_grad"), step=lambda: ev.append("step"),
              get_global_grad_norm=lambda: norm, was_step_applied=lambda: applied,
              zero_optimization_stage=lambda: stage)


def test_manual_step_skips_when_any_gradient_element_is_non_finite() -> None:
    """Catches the ZeRO-0 fp32 finite check needing every element bad (one inf slipped into the weights)."""
    p = torch.nn.Parameter(torch.zeros(3))
    p.grad = torch.tensor([1.0, math.inf, 2.0])
    eng = _engine()
    ds = _ds(manual_check=True, params=[p], world_size=1, engine=eng, _clipped_norm=7.0)
    applied, norm = ds.step()
    assert applied is False and math.isnan(norm) and eng.ev == ["zero_grad"]
    p.grad = torch.tensor([1.0, 0.0, 2.0])
    assert ds.step() == (True, 7.0) and eng.ev == ["zero_grad", "step"]


def test_step_reports_what_deepspeed_applied_and_its_norm() -> None:
    """Catches a DeepSpeed overflow-skipped step reported as applied."""
    ds = _ds(manual_check=False, params=[], world_size=1, engine=_engine(applied=False, norm=None))
    applied, norm = ds.step()
    assert applied is False and math.isnan(norm)
    ds = _ds(manual_check=False, params=[], world_size=1, engine=_engine(applied=True, norm=2.5))
    assert ds.step() == (True, 2.5)


def test_for_sampling_is_a_no_op_below_zero3() -> None:
    """Catches ZeRO-1/2 sampling routed through the ZeRO-3 gather-and-unhook path."""
    for stage in (0, 1, 2):
        ds = _ds(engine=_engine(stage=stage))
        assert isinstance(ds.for_sampling([torch.nn.Linear(1, 1)]), contextlib.nullcontext)
        assert isinstance(ds.gathered([torch.nn.Linear(1, 1)]), contextlib.nullcontext)


def test_save_excludes_frozen_weights_only_when_there_are_some_and_removes_the_pickle_scripts(tmp_path: Path) -> None:
    """Catches frozen weights saved in full (or trainable ones left out) and DeepSpeed's unpickling scripts kept."""
    seen: list[Any] = []

    def save_checkpoint(where, tag, save_latest, client_state, exclude_frozen_parameters):
        seen.append((where, tag, save_latest, client_state, exclude_frozen_parameters))
        for script in ("zero_to_fp32.py", "zero_to_torch.py", "keep.txt"):
            (Path(where) / script).write_text("")
    (tmp_path / "deepspeed").mkdir()
    for fp, exclude in ((None, False), ("abc", True)):
        _ds(engine=NS(save_checkpoint=save_checkpoint), frozen_fingerprint=fp).save(tmp_path)
        assert seen[-1] == (str(tmp_path / "deepspeed"), "state", False, {"frozen_fingerprint": fp}, exclude)
        assert sorted(p.name for p in (tmp_path / "deepspeed").iterdir()) == ["keep.txt"]


def test_load_restores_the_recipes_clipping_norm(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Catches a resumed ZeRO/bf16 optimiser keeping the checkpoint's clip norm instead of the recipe's."""
    import r3_rl.learner.deepspeed_learner as dsm
    import r3_rl.learner.safe_load as sl

    monkeypatch.setattr(sl, "make_deepspeed_loads_safe", lambda engine: None)
    monkeypatch.setattr(dsm, "frozen_names", lambda container: set())
    monkeypatch.setattr(dsm, "resume_with_recipe_hyperparameters", lambda opt, sched, load: ("p", {}))
    monkeypatch.setattr(dsm, "check_same_frozen", lambda *a: None)
    inner = NS(optimizer=NS(), clip_grad=9.0)
    ds = _ds(engine=NS(optimizer=inner, lr_scheduler=None, gradient_clipping=lambda: 1.5), container=None,
             frozen_fingerprint=None)
    ds.load(tmp_path)
    assert inner.clip_grad == 1.5


def test_ensure_dist_env_fills_a_free_port_and_keeps_a_given_one(monkeypatch: pytest.MonkeyPatch) -> None:
    """Catches a fixed MASTER_PORT (two single-rank runs on one host then collide)."""
    import r3_rl.learner.deepspeed_learner as dsm

    monkeypatch.setattr(dsm, "pick_accelerator", lambda: False)
    monkeypatch.setattr(dsm, "free_port", lambda host="127.0.0.1": 43210)
    monkeypatch.delenv("MASTER_PORT", raising=False)
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR"):
        monkeypatch.delenv(key, raising=False)
    assert dsm.ensure_dist_env() == "gloo"
    import os

    assert [os.environ[k] for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")] == [
        "0", "1", "0", "127.0.0.1", "43210"]
    monkeypatch.setenv("MASTER_PORT", "1234")
    dsm.ensure_dist_env()
    assert os.environ["MASTER_PORT"] == "1234"


# ------------------------------------------------------------------ ZeRO-3 gather for reads


def test_zero3_gathered_fetches_only_the_shards_not_available(monkeypatch: pytest.MonkeyPatch) -> None:
    """Catches a gather of parameters an outer gather holds already (DeepSpeed refuses nested gathers)."""
    import deepspeed
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    from r3_rl.policy.zero3 import gathered

    seen: list[Any] = []
    monkeypatch.setattr(deepspeed.zero, "GatheredParameters",
                        lambda params, modifier_rank: seen.append((params, modifier_rank)) or "G")
    m = torch.nn.Linear(2, 2)
    assert isinstance(gathered(m), contextlib.nullcontext)  # nothing partitioned
    for p, status in ((m.weight, ZeroParamStatus.AVAILABLE), (m.bias, ZeroParamStatus.NOT_AVAILABLE)):
        p.ds_id, p.ds_status = 1, status
    assert gathered(m) == "G"
    assert len(seen) == 1 and len(seen[0][0]) == 1 and seen[0][0][0] is m.bias and seen[0][1] is None
    m.bias.ds_status = ZeroParamStatus.AVAILABLE
    assert isinstance(gathered(m), contextlib.nullcontext) and len(seen) == 1


# ------------------------------------------------------------------ the learner's batching and accumulation


def test_reduce_metric_min_max_and_mean() -> None:
    """Catches *_min metrics reduced with max (or the other way round)."""
    assert reduce_metric("ratio_min", [3.0, 1.0, 2.0]) == 1.0
    assert reduce_metric("ratio_max", [3.0, 1.0, 2.0]) == 3.0
    assert reduce_metric("kl", [3.0, 1.0, 2.0]) == 2.0


def _learner(mbs: int = 2, accum: int = 0, world: int = 1, rank: int = 0) -> TorchLearner:
    lr = TorchLearner.__new__(TorchLearner)
    lr.cfg = NS(micro_batch_size=mbs, grad_accum=accum, epochs=1, critic_replay=NS(coef=0.0))
    lr.world, lr.rank = world, rank
    return lr


def test_minibatches_are_micro_batch_size_times_grad_accum() -> None:
    """Catches the optimiser-step size taken as one micro-batch (grad_accum ignored)."""
    assert _learner(2, 3).minibatches(7) == [range(6), range(6, 7)]
    assert _learner(2, 0).minibatches(7) == [range(7)]


def test_my_chunks_pad_short_ranks_with_zero_scale_repeats() -> None:
    """Catches a rank with fewer micro-batches running fewer passes (ranks' collectives then hang)."""
    assert _learner(1, world=2, rank=1)._my_chunks(range(5)) == [
        (range(1, 2), 1.0), (range(3, 4), 1.0), (range(1, 2), 0.0)]
    assert _learner(1, world=2, rank=0)._my_chunks(range(5)) == [
        (range(1), 1.0), (range(2, 3), 1.0), (range(4, 5), 1.0)]
    assert _learner(2)._my_chunks(range(5)) == [(range(2), 1.0), (range(2, 4), 1.0), (range(4, 5), 1.0)]


class _Optim:
    """A driver stand-in: records each backward's loss; step answers from ``answers`` ((applied, norm) per call)."""

    def __init__(self, answers: list[tuple[bool, float]]) -> None:
        self.answers, self.backwards, self.discards = list(answers), [], 0

    def zero_grad(self) -> None:
        pass

    def forward(self, fn):
        return fn()

    def backward(self, loss) -> None:
        self.backwards.append(float(loss.detach()))

    def step(self):
        return self.answers.pop(0)

    def discard(self, outputs=None) -> None:
        self.discards += 1

    def lr(self) -> float:
        return 0.5


class _Algo:
    """Loss of a micro-batch = the sum of its items' advantages; metrics 'a' = that sum; records the orders seen."""

    def __init__(self) -> None:
        self.seen: list[list[float]] = []

    def prepare(self, models, items):
        return {}

    def loss(self, models, items, chunk, mini, ctx):
        self.seen.append([items[i].advantage for i in chunk])
        x = torch.tensor(sum(items[i].advantage for i in chunk), requires_grad=True)
        return x * 1.0, {"a": float(x.detach())}, [x]


def _run(answers: list[tuple[bool, float]], n: int = 4, mbs: int = 1, accum: int = 0, world: int = 1, rank: int = 0,
         replay: Any = None, coef: float = 0.0, versions: list[int] | None = None, one_group: bool = False
         ) -> tuple[TorchLearner, dict]:
    lr = _learner(mbs, accum, world, rank)
    lr.cfg.critic_replay = NS(coef=coef)
    lr.policy, lr.reference, lr.modules = NS(model=torch.nn.Linear(1, 1)), None, {}
    lr.algorithm, lr.optim = _Algo(), _Optim(answers)
    lr.replay, lr.replay_draws, lr.skipped_steps, lr.updates = replay, 0, 0, 0
    items = [TrainItem(segment=None, advantage=float(k + 1), stage="A",
                       policy_version=(versions[k] if versions else 0), group="g" if one_group else f"g{k}")
             for k in range(n)]
    return lr, lr._step(items)


def test_a_single_optimiser_step_keeps_the_item_order() -> None:
    """Catches a one-step batch shuffled anyway (its micro-batches, their min/max metrics and rounding then change)."""
    lr, _ = _run([(True, 1.0)], n=4)
    assert lr.algorithm.seen == [[1.0], [2.0], [3.0], [4.0]]


def test_step_metrics_are_means_over_applied_steps_and_skips_are_counted() -> None:
    """Catches loss/grad_norm taken from the last step only, skipped steps counted as optimiser steps, or the
    skip counter reset each call."""
    # one sibling group: the shuffle keeps it whole, so the mini-batches are [1,2], [3,4], [5,6]: totals 3, 7, 11
    lr, m = _run([(True, 1.0), (False, math.nan), (True, 3.0)], n=6, mbs=1, accum=2, one_group=True)
    # the second step skipped: loss (3 + 11) / 2, grad norm (1 + 3) / 2
    assert m["learner/loss"] == 7.0 and m["learner/grad_norm"] == 2.0
    assert m["learner/optimizer_steps"] == 2.0 and m["learner/nonfinite_skipped"] == 1.0
    assert (lr.updates, lr.skipped_steps) == (2, 1)
    lr.optim.answers = [(False, math.nan)]
    lr._step([TrainItem(segment=None, advantage=1.0, stage="A", policy_version=0)])
    assert lr.skipped_steps == 2


def test_several_ranks_scale_backward_by_world_and_leave_filler_out_of_metrics() -> None:
    """Catches the rank-average undone wrongly (loss not x world) or a zero-scale filler's loss/metrics logged."""
    # 3 micro-batches of one item, 2 ranks: rank 1 runs chunk 1 (loss 2) and a zero-scale repeat of it
    lr, m = _run([(True, 1.0)], n=3, mbs=1, world=2, rank=1)
    assert lr.optim.backwards == [4.0, 0.0]
    assert m["learner/loss"] == 2.0 and m["learner/a"] == 2.0 and lr.metric_counts["learner/a"] == 1


class _Replay:
    def __init__(self) -> None:
        self.drawn: list[int] = []
        self.losses = 0

    def examples(self, k: int) -> str:
        self.drawn.append(k)
        return f"ex{k}"

    def loss(self, ex: str) -> torch.Tensor:
        self.losses += 1
        return torch.tensor(4.0, requires_grad=True)


def test_rehearsal_is_drawn_once_per_optimiser_step_from_position_zero_and_split_over_ranks() -> None:
    """Catches rehearsal added to every micro-batch, the stream starting at 1, or coef not divided by ranks."""
    rep = _Replay()
    lr, _ = _run([(True, 1.0)] * 2, n=4, mbs=1, accum=2, replay=rep, coef=0.5, one_group=True)
    assert rep.drawn == [0, 1] and rep.losses == 2 and lr.replay_draws == 2
    # the first micro-batch of each optimiser step carries + 0.5 * 4
    assert lr.optim.backwards == [1.0 + 2.0, 2.0, 3.0 + 2.0, 4.0]
    rep = _Replay()
    lr, _ = _run([(True, 1.0)], n=2, mbs=1, world=2, rank=0, replay=rep, coef=0.5)
    # rank 0 runs chunk 0 (loss 1) + (0.5 / 2) * 4, times world 2
    assert lr.optim.backwards == [(1.0 + 1.0) * 2]


def test_learner_state_round_trip_keeps_counters() -> None:
    """Catches a counter read back under the wrong key (a resumed run's update count restarting at 0)."""
    lr = _learner()
    lr.optim, lr.modules = NS(kind="deepspeed"), {}
    lr.skipped_steps, lr.updates, lr.replay_draws = 2, 5, 3
    state = lr.state_dict()
    assert state == {"skipped_steps": 2, "updates": 5, "replay_draws": 3, "modules": {}}
    other = _learner()
    other.modules = {}
    other.load_state_dict(state)
    assert (other.skipped_steps, other.updates, other.replay_draws) == (2, 5, 3)


def test_trainer_sizes_trajectory_grids_for_every_round_plus_the_first_image(monkeypatch: pytest.MonkeyPatch,
                                                                              tmp_path: Path) -> None:
    """Catches the metrics logger's grid slots set to the round count (the last round's image then has no cell)."""
    seen: dict[str, Any] = {}
    for name in ("check_recipe_precision", "check_ranks", "ParentBuffer", "PromptSource", "Evaluator",
                 "stage_sampling", "BackgroundWriter"):
        monkeypatch.setattr(tm, name, lambda *a, **k: NS())
    monkeypatch.setattr(tm, "Components", lambda *a, **k: NS(task_rewards=NS(), eval_rewards=NS(), policy=NS(),
                                                              reference=None, failures=None, scorer=None,
                                                              algorithm=None, learner=None))
    monkeypatch.setattr(tm, "MetricsLogger", lambda run_dir, tensorboard, slots: seen.update(slots=slots))
    recipe = NS(threads=0, seed=0, log=NS(console=False, tensorboard=False), tree=NS(buffer_size=4, max_round=3),
                eval=NS(rounds=2), learner=None)
    tm.Trainer(recipe, tmp_path, console=NS())
    assert seen == {"slots": 4}
    recipe.eval.rounds = 5
    tm.Trainer(recipe, tmp_path, console=NS())
    assert seen == {"slots": 6}
