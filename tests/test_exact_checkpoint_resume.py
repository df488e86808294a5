"""Exact small cases for checkpoints and exact resume (round 11B audit).

What a checkpoint folder counts as complete, which one ``--resume`` picks (by step number, by run mtime), the
abandoned branch set aside, the metadata and state-file checks, retention, a save/load round trip of a real
torch learner (weights, reference, buffer, counters, Adam moments, learning rate), the optimiser's schedule and
step edges, the learner's per-step metrics and counters, the global RNG state and run-dir creation.
"""
from __future__ import annotations

import json
import math
import os
import random
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch
from learner_helpers import clone, learner_cfg, sample_items, tiny_policy

from r3_rl.config import Learner, load_recipe
from r3_rl.errors import UserError
from r3_rl.learner import checkpoint as ck
from r3_rl.learner.optim import TorchOptim, trainable, warmup_lambda
from r3_rl.learner.torch_learner import TorchLearner
from r3_rl.rollout.buffer import ParentBuffer

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "tiny_blocks.yaml"


def _recipe(tmp_path: Path, *sets: str) -> Any:
    return load_recipe(RECIPE, [f"out_dir={tmp_path}", "name=x", *sets])


def _ckpt(root: Path, step: int, meta: Any = None) -> Path:
    p = root / f"step_{step:06d}"
    p.mkdir(parents=True)
    (p / ck.MARKER).write_text(json.dumps({"complete": True, "step": step} if meta is None else meta))
    return p


# ---------------------------------------------------------------------------------------------- finding
def test_only_a_literal_complete_true_counts_and_an_unreadable_marker_is_skipped(tmp_path: Path) -> None:
    _ckpt(tmp_path, 1)
    _ckpt(tmp_path, 2, {"complete": "false", "step": 2})  # a truthy string is not true
    _ckpt(tmp_path, 3, {"complete": 1, "step": 3})
    (_ckpt(tmp_path, 4) / ck.MARKER).write_text("{not json")  # cut off mid-write
    assert [p.name for p in ck.complete_checkpoints(tmp_path)] == ["step_000001"]


def test_the_latest_checkpoint_is_the_highest_step_number(tmp_path: Path) -> None:
    recipe = _recipe(tmp_path)
    run = tmp_path / "x-1"
    root = run / "checkpoints"
    for s in (999999, 1000000, 5):
        _ckpt(root, s)
    assert [p.name for p in ck.complete_checkpoints(root)] == ["step_000005", "step_999999", "step_1000000"]
    assert ck.latest_checkpoint(run) == root / "step_1000000"
    assert ck.checkpoints_before(root / "step_1000000") == [root / "step_999999", root / "step_000005"]
    assert ck.checkpoints_before(root / "step_000005") == []
    assert ck.find_resume(str(run), recipe, None) == (root / "step_1000000", run)
    assert ck.find_resume(str(root), recipe, None) == (root / "step_1000000", run)


def test_resuming_a_checkpoint_folder_continues_in_its_own_run_dir(tmp_path: Path) -> None:
    root = tmp_path / "x-1" / "checkpoints"
    ckpt = _ckpt(root, 2)
    _ckpt(root, 3)
    assert ck.find_resume(str(ckpt), _recipe(tmp_path), None) == (ckpt, tmp_path / "x-1")


def test_a_checkpoint_copied_out_of_its_run_continues_in_a_new_run_dir(tmp_path: Path) -> None:
    """``--resume ~/saved/step_000005``: before session 53 the run continued in ``~`` (the folder's parent's
    parent), writing its recipe, metrics and trajectories there; now in a new run dir, or in ``--run-dir``."""
    ckpt = _ckpt(tmp_path / "home" / "saved", 5)
    assert ck.find_resume(str(ckpt), _recipe(tmp_path), None) == (ckpt, None)
    assert ck.find_resume(str(ckpt), _recipe(tmp_path), str(tmp_path / "r")) == (ckpt, tmp_path / "r")


def test_resume_auto_never_continues_another_recipes_run_whose_name_starts_the_same(tmp_path: Path) -> None:
    """Recipes ``x`` and ``x-lowlr`` in one out_dir: ``x-*`` matches both; ``--resume auto`` for ``x`` must not
    continue the newer ``x-lowlr`` run (its checkpoints name their recipe)."""
    recipe = _recipe(tmp_path)
    mine, other = tmp_path / "x-20260101-000000", tmp_path / "x-lowlr-20260102-000000"
    _ckpt(mine / "checkpoints", 2, {"complete": True, "step": 2, "recipe": "x"})
    _ckpt(other / "checkpoints", 5, {"complete": True, "step": 5, "recipe": "x-lowlr"})
    now = time.time()
    os.utime(mine, (now - 100, now - 100))
    os.utime(other, (now, now))
    assert ck.find_resume("auto", recipe, None) == (mine / "checkpoints" / "step_000002", mine)


def test_resume_auto_leaves_another_recipes_interrupted_swap_as_it_is(tmp_path: Path) -> None:
    """``x-lowlr``'s run, cut between the two renames of a re-save, keeps its ``.old-`` copy for ``x-lowlr``'s own
    resume: before session 53, ``--resume auto`` for ``x`` renamed it back and then did not resume that run."""
    recipe = _recipe(tmp_path)
    mine, other = tmp_path / "x-20260101-000000", tmp_path / "x-lowlr-20260102-000000"
    _ckpt(mine / "checkpoints", 2, {"complete": True, "step": 2, "recipe": "x"})
    _ckpt(other / "checkpoints", 4, {"complete": True, "step": 4, "recipe": "x-lowlr"})
    swapped = _ckpt(other / "checkpoints", 5, {"complete": True, "step": 5, "recipe": "x-lowlr"})
    swapped.rename(other / "checkpoints" / ".old-step_000005-123")
    now = time.time()
    os.utime(mine, (now - 100, now - 100))
    os.utime(other, (now, now))
    assert ck.find_resume("auto", recipe, None) == (mine / "checkpoints" / "step_000002", mine)
    assert sorted(p.name for p in (other / "checkpoints").iterdir()) == [".old-step_000005-123", "step_000004"]
    # the recipe that wrote it puts it back and resumes it; a swap's copy outranks the complete steps below it
    lowlr = _recipe(tmp_path, "name=x-lowlr")
    assert ck.find_resume("auto", lowlr, None) == (other / "checkpoints" / "step_000005", other)


def test_resume_auto_takes_the_most_recently_modified_run(tmp_path: Path) -> None:
    recipe = _recipe(tmp_path)
    old, new = tmp_path / "x-b", tmp_path / "x-a"  # the newer run sorts first by name
    _ckpt(old / "checkpoints", 9)
    _ckpt(new / "checkpoints", 1)
    now = time.time()
    os.utime(old, (now - 100, now - 100))
    os.utime(new, (now, now))
    assert ck.find_resume("auto", recipe, None) == (new / "checkpoints" / "step_000001", new)
    assert ck.find_resume("auto", recipe, str(old)) == (old / "checkpoints" / "step_000009", old)


def test_an_incomplete_checkpoint_named_on_the_command_line_is_refused(tmp_path: Path) -> None:
    ckpt = _ckpt(tmp_path / "x-1" / "checkpoints", 2, {"complete": False, "step": 2})
    with pytest.raises(UserError, match="incomplete"):
        ck.find_resume(str(ckpt), _recipe(tmp_path), None)


def test_setting_aside_keeps_the_resumed_step_and_never_overwrites_an_earlier_abandoned_one(tmp_path: Path) -> None:
    run = tmp_path / "run"
    root = run / "checkpoints"
    for s in (1, 2, 3):
        _ckpt(root, s)
    (root / "abandoned-step_000003").mkdir()
    (root / "abandoned-step_000003" / "older").write_text("kept")
    moved = ck.set_aside_later(root / "step_000002", run)
    assert len(moved) == 1 and moved[0].name.startswith("abandoned-step_000003-") and (moved[0] / ck.MARKER).is_file()
    assert (root / "abandoned-step_000003" / "older").read_text() == "kept"
    assert [p.name for p in ck.complete_checkpoints(root)] == ["step_000001", "step_000002"]


# ---------------------------------------------------------------------------------------------- metadata
@pytest.mark.parametrize("meta, match", [({"step": True}, "'step' must be a whole number"),
                                         ({"step": 1, "files": ["a"]}, "'files' must be a mapping"),
                                         ({"step": 1, "structure": []}, "'structure' must be a mapping")])
def test_hand_edited_metadata_types_are_refused(tmp_path: Path, meta: dict, match: str) -> None:
    with pytest.raises(UserError, match=match):
        ck._check_meta(meta, tmp_path)


def test_a_finished_run_may_be_resumed_and_an_old_structure_key_is_ignored(tmp_path: Path) -> None:
    recipe = _recipe(tmp_path, "steps=4")
    saved = ck.structure(recipe)
    ck.check_compatible({"step": 4, "structure": {**saved, "policy.retired_key": 3}}, recipe, tmp_path)
    with pytest.raises(UserError, match="step 5 but the recipe has steps=4"):
        ck.check_compatible({"step": 5}, recipe, tmp_path)


@pytest.mark.parametrize("key, value", [("tree.buffer_size", 999), ("learner.ppo.critic_lr", 0.5), ("seed", 12345)])
def test_each_structural_key_must_match(tmp_path: Path, key: str, value: Any) -> None:
    recipe = _recipe(tmp_path)
    saved = {**ck.structure(recipe), key: value}
    with pytest.raises(UserError, match=f"recipe key '{key}'"):
        ck.check_compatible({"step": 0, "structure": saved}, recipe, tmp_path)


def test_resume_auto_stops_at_a_recipe_that_does_not_fit_without_trying_older_ones(tmp_path: Path) -> None:
    recipe = _recipe(tmp_path, "steps=4")
    root = tmp_path / "run" / "checkpoints"
    _ckpt(root, 2)
    latest = _ckpt(root, 6)
    warned: list[str] = []
    with pytest.raises(UserError, match="step_000006: checkpoint is at step 6"):
        ck.newest_sound(latest, recipe, warned.append)
    assert warned == []


def _state_only(path: Path, meta: dict, trainer_step: int, buffer: bool) -> Path:
    (path / "state").mkdir(parents=True)
    torch.save({"step": trainer_step}, path / "state" / "trainer.pt")
    if buffer:
        ParentBuffer(2).save(path / "state" / "buffer.safetensors")
    (path / ck.MARKER).write_text(json.dumps(meta))
    return path


def test_state_files_without_a_file_list_are_still_checked(tmp_path: Path) -> None:
    ck._check_state_files(_state_only(tmp_path / "ok", {"step": 3, "format": 3}, 3, True), {"step": 3, "format": 3})
    ck._check_state_files(_state_only(tmp_path / "f2", {"step": 3, "format": 2}, 3, False), {"step": 3, "format": 2})
    bad = _state_only(tmp_path / "nobuf", {"step": 3, "format": 3}, 3, False)
    with pytest.raises(UserError, match="buffer.safetensors: missing"):
        ck._check_state_files(bad, {"step": 3, "format": 3})
    other = _state_only(tmp_path / "other", {"step": 3, "format": 3}, 2, True)
    with pytest.raises(UserError, match="holds step 2, checkpoint.json says 3"):
        ck._check_state_files(other, {"step": 3, "format": 3})


def test_a_tied_output_layer_saved_once_loads(tmp_path: Path) -> None:
    policy, other = tiny_policy(seed=0), tiny_policy(seed=1)
    policy.save_pretrained(str(tmp_path))
    ck.load_exported(other.model, tmp_path)
    for k, v in policy.model.state_dict().items():
        assert torch.equal(other.model.state_dict()[k], v), k


# ---------------------------------------------------------------------------------------------- retention
def test_prune_keeps_the_newest_and_clean_removes_both_kinds_of_leftover(tmp_path: Path) -> None:
    for s in (1, 2, 3, 4):
        _ckpt(tmp_path, s)
    ck.prune(tmp_path, 3)
    assert [p.name for p in ck.complete_checkpoints(tmp_path)] == ["step_000002", "step_000003", "step_000004"]
    ck.prune(tmp_path, 1)
    assert [p.name for p in ck.complete_checkpoints(tmp_path)] == ["step_000004"]
    for name in (".tmp-step_000005-1", ".old-step_000004-1", "abandoned-step_000009"):
        (tmp_path / name).mkdir()
    ck._clean_partials(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["abandoned-step_000009", "step_000004"]


# ---------------------------------------------------------------------------------------------- round trip
class _Loop:
    def __init__(self, state: dict) -> None:
        self.state = state

    def state_dict(self) -> dict:
        return dict(self.state)

    def load_state_dict(self, state: dict) -> None:
        self.state = dict(state)


def _learner(seed: int, **cfg: Any) -> tuple[Any, Any, TorchLearner]:
    policy = tiny_policy(seed=seed)
    reference = clone(tiny_policy(seed=seed + 10))
    return policy, reference, TorchLearner(policy, reference, learner_cfg(warmup_steps=4, **cfg))


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Any, Any, TorchLearner]:
    """A torch learner after one update, its reference and a capacity-3 buffer saved at step 3, twice (a re-save)."""
    tmp = tmp_path_factory.mktemp("rt")
    policy, reference, learner = _learner(0)
    learner.step(sample_items(policy))
    learner.skipped_steps, learner.replay_draws = 5, 7
    policy.version = 9
    parts = ck.CheckpointParts(policy, reference, learner, _Loop({"step": 3, "mark": "loop"}), ParentBuffer(3))
    recipe = _recipe(tmp, "steps=5")
    ck.save_checkpoint(tmp / "run", 3, 2, parts, recipe)
    path = ck.save_checkpoint(tmp / "run", 3, 2, parts, recipe)  # a finished run saved again: a swap
    return path, policy, reference, learner


def test_a_resave_of_a_step_leaves_one_folder_and_names_the_policy_version(saved: tuple) -> None:
    path, policy, _, _ = saved
    assert sorted(p.name for p in path.parent.iterdir()) == ["step_000003"]
    meta = json.loads((path / ck.MARKER).read_text())
    assert meta["step"] == 3 and meta["policy_version"] == 9 and meta["complete"] is True
    assert meta["format"] == ck.FORMAT == 3 and "state/buffer.safetensors" in meta["files"]


def test_a_crash_between_the_swaps_renames_leaves_the_old_copy_for_resume(tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """Re-saving step 3 with ``keep_last: 1`` dies after the old copy is renamed aside and before the new one is
    renamed in: ``--resume`` (auto and a path) still finds step 3, the old copy put back, not a fresh run."""
    policy, reference, learner = _learner(0)
    parts = ck.CheckpointParts(policy, reference, learner, _Loop({"step": 3}), ParentBuffer(3))
    recipe = _recipe(tmp_path, "steps=5")
    run = tmp_path / "x-1"
    first = ck.save_checkpoint(run, 3, 1, parts, recipe)
    first_meta = (first / ck.MARKER).read_text()
    real_rename = Path.rename

    def crash_on_the_second(self: Path, target: Any) -> Any:
        if self.name.startswith(".tmp-"):
            raise KeyboardInterrupt  # the process dies here
        return real_rename(self, target)

    monkeypatch.setattr(Path, "rename", crash_on_the_second)
    with pytest.raises(KeyboardInterrupt):
        ck.save_checkpoint(run, 3, 1, parts, recipe)
    monkeypatch.setattr(Path, "rename", real_rename)
    root = run / "checkpoints"
    assert not (root / "step_000003").exists() and ck.complete_checkpoints(root) == []  # the gap
    assert ck.find_resume(str(run), recipe, None) == (root / "step_000003", run)
    assert (root / "step_000003" / ck.MARKER).read_text() == first_meta  # the old copy, whole
    (root / "step_000003").rename(root / f".old-step_000003-{os.getpid()}")  # the gap again, now found by --resume auto
    assert ck.find_resume("auto", recipe, None) == (root / "step_000003", run)
    assert ck.restore_interrupted_swap(root) == []  # nothing left to restore; an incomplete .old- stays put
    (root / ".old-step_000007-1").mkdir()
    assert ck.restore_interrupted_swap(root) == [] and not (root / "step_000007").exists()


def test_a_round_trip_restores_weights_reference_buffer_counters_and_optimiser(saved: tuple, tmp_path: Path) -> None:
    path, policy, reference, learner = saved
    new_policy, new_reference, new_learner = _learner(1)
    buffer, loop = ParentBuffer(8), _Loop({})
    parts = ck.CheckpointParts(new_policy, new_reference, new_learner, loop, buffer)
    meta = ck.load_checkpoint(path, parts, _recipe(tmp_path, "steps=5"))
    assert meta["step"] == 3 and loop.state == {"step": 3, "mark": "loop"}
    for got, want in ((new_policy, policy), (new_reference, reference)):
        want_sd = want.model.state_dict()
        assert all(torch.equal(v, want_sd[k]) for k, v in got.model.state_dict().items())
    assert buffer.correct.maxlen == 3  # the saved buffer's capacity came back
    assert (new_learner.updates, new_learner.skipped_steps, new_learner.replay_draws) == (1, 5, 7)
    old_state, new_state = learner.optim.optimizer.state, new_learner.optim.optimizer.state
    for p_old, p_new in zip(learner.optim.params, new_learner.optim.params, strict=True):
        assert torch.equal(old_state[p_old]["exp_avg"], new_state[p_new]["exp_avg"])
    assert new_learner.optim.lr() == pytest.approx(1e-2 * 2 / 4)  # one step into a 4-step warm-up


def test_a_reference_absent_from_the_checkpoint_keeps_the_one_built(tmp_path: Path) -> None:
    policy, _, learner = _learner(0)
    parts = ck.CheckpointParts(policy, None, learner, _Loop({"step": 1}), ParentBuffer(2))
    recipe = _recipe(tmp_path, "steps=5")
    path = ck.save_checkpoint(tmp_path / "run", 1, 2, parts, recipe)
    assert not (path / "state" / "reference.safetensors").exists()
    new_policy, new_reference, new_learner = _learner(1)
    before = {k: v.clone() for k, v in new_reference.model.state_dict().items()}
    ck.load_checkpoint(path, ck.CheckpointParts(new_policy, new_reference, new_learner, _Loop({}), None), recipe)
    assert all(torch.equal(v, before[k]) for k, v in new_reference.model.state_dict().items())


def test_a_learner_that_saves_its_own_weights_gets_no_adapter_file(tmp_path: Path) -> None:
    saved_adapters: list[Path] = []
    learner = SimpleNamespace(saves_weights=True, adapters=SimpleNamespace(save=saved_adapters.append),
                              export=lambda folder: folder.mkdir(), save=lambda d: d.mkdir())
    parts = ck.CheckpointParts(SimpleNamespace(version=0), None, learner, _Loop({"step": 1}), ParentBuffer(2))
    path = ck.save_checkpoint(tmp_path / "run", 1, 2, parts, _recipe(tmp_path))
    assert saved_adapters == [] and not (path / "state" / "policy.safetensors").exists()


# ---------------------------------------------------------------------------------------------- optimiser
def test_the_schedule_edges() -> None:
    assert [warmup_lambda(2, 2, 0.0)(s) for s in range(3)] == [0.5, 1.0, 1.0]  # decay ending at warm-up: flat
    assert [warmup_lambda(-3, 4, 0.2)(s) for s in range(5)] == pytest.approx([0.8, 0.6, 0.4, 0.2, 0.2])


def test_trainable_leaves_frozen_weights_out() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 1))
    model[0].weight.requires_grad_(False)
    params, rates = trainable([model])
    assert [id(p) for p in params] == [id(model[0].bias), id(model[1].weight), id(model[1].bias)]
    assert rates == [None, None, None]


def _linear(weight: float) -> torch.nn.Linear:
    model = torch.nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        model.weight.fill_(weight)
    return model


def test_grad_clip_zero_means_no_clipping() -> None:
    model = _linear(1.0)
    opt = TorchOptim([model], Learner(lr=0.1, grad_clip=0.0, betas=(0.9, 0.95)))
    opt.backward((model(torch.ones(1, 1)) * 1000.0).sum())
    applied, norm = opt.step()
    assert applied and norm == pytest.approx(1000.0)
    assert model.weight.item() == pytest.approx(0.9, abs=1e-6)  # Adam's first step: lr x sign(gradient)
    assert model.weight.grad is None and opt.params[0].grad is None  # gradient memory released before rollout


def test_an_infinite_gradient_is_skipped_and_changes_nothing() -> None:
    model = _linear(1.0)
    opt = TorchOptim([model], Learner(lr=0.1, warmup_steps=4))
    opt.backward((model(torch.ones(1, 1)) * math.inf).sum())
    applied, norm = opt.step()
    assert not applied and norm == math.inf
    assert model.weight.item() == 1.0 and opt.scheduler.last_epoch == 0 and opt.lr() == pytest.approx(0.1 / 4)
    assert model.weight.grad is None or float(model.weight.grad.abs().sum()) == 0.0


def test_the_reported_rate_is_the_policys_group_not_a_critics() -> None:
    opt = TorchOptim([_linear(1.0), _linear(2.0)], Learner(lr=0.1, warmup_steps=2), [None, 0.5])
    assert [g["lr"] for g in opt.optimizer.param_groups] == pytest.approx([0.05, 0.25])
    assert opt.lr() == pytest.approx(0.05)


def test_a_resume_with_a_lower_rate_keeps_it_after_the_next_step() -> None:
    model = _linear(1.0)
    first = TorchOptim([model], Learner(lr=1e-2, warmup_steps=4))
    first.backward(model(torch.ones(1, 1)).sum())
    assert first.step()[0]
    second = TorchOptim([model], Learner(lr=1e-4, warmup_steps=4))
    second.load_state_dict(first.state_dict())
    assert second.lr() == pytest.approx(1e-4 * 2 / 4)  # before any step: what the next update uses
    second.backward(model(torch.ones(1, 1)).sum())
    assert second.step()[0]
    assert second.lr() == pytest.approx(1e-4 * 3 / 4)


def test_bf16_master_weights_come_back_on_resume(tmp_path: Path) -> None:
    model = _linear(1.0).to(torch.bfloat16)
    first = TorchOptim([model], Learner(lr=1e-3))
    first.backward(model(torch.ones(1, 1, dtype=torch.bfloat16)).float().sum())
    assert first.step()[0]
    master = first.params[0].detach().clone()
    assert master.dtype == torch.float32 and master.item() != model.weight.float().item()  # below bf16's step
    first.save(tmp_path)
    second = TorchOptim([_linear(1.0).to(torch.bfloat16)], Learner(lr=1e-3))
    second.load(tmp_path)
    assert torch.equal(second.params[0].detach(), master)


# ---------------------------------------------------------------------------------------------- learner
@pytest.fixture(scope="module")
def items() -> tuple[Any, list]:
    policy = tiny_policy()
    return policy, sample_items(policy)


def test_grad_accum_one_is_one_micro_batch_per_optimiser_step(items: tuple) -> None:
    policy, _ = items
    learner = TorchLearner(clone(policy), None, learner_cfg(micro_batch_size=2, grad_accum=1))
    assert learner.minibatches(5) == [range(0, 2), range(2, 4), range(4, 5)]


def test_loss_and_grad_norm_are_means_over_the_applied_steps(items: tuple) -> None:
    policy, batch = items
    learner = TorchLearner(clone(policy), None, learner_cfg(micro_batch_size=3, grad_accum=1))
    norms, real = iter([1.0, 3.0]), learner.optim.step
    learner.optim.step = lambda: (real()[0], next(norms))
    m = learner.step(batch)
    assert m["learner/optimizer_steps"] == 2.0 and m["learner/grad_norm"] == 2.0
    counts = {k: v for k, v in learner.metric_counts.items() if k.startswith("learner/")}
    assert counts and set(counts.values()) == {2}  # two micro-batches behind each logged mean


def test_skipped_steps_add_up_and_optimizer_steps_are_per_call(items: tuple) -> None:
    policy, batch = items
    learner = TorchLearner(clone(policy), None, learner_cfg())
    real = learner.optim.step
    learner.optim.step = lambda: (False, math.inf)
    for _ in range(2):
        assert learner.step(batch)["learner/nonfinite_skipped"] == 1.0
    assert learner.skipped_steps == 2 and learner.updates == 0
    learner.optim.step = real
    learner.step(batch)
    assert learner.step(batch)["learner/optimizer_steps"] == 1.0 and learner.updates == 2
    assert learner.step([]) == {"learner/skipped_empty": 1.0}


def test_learner_state_keeps_what_trains_in_its_modules_not_the_frozen_rest(items: tuple) -> None:
    policy, _ = items
    critic = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 1))
    critic[0].requires_grad_(False)  # a frozen trunk (LoRA's base), rebuilt from the policy on resume
    learner = TorchLearner(clone(policy), None, learner_cfg(), modules={"critic": critic})
    assert sorted(learner.state_dict()["modules"]["critic"]) == ["1.bias", "1.weight"]


def test_lora_without_kl_builds_no_reference() -> None:
    from r3_rl.learner.build import build_learner

    lora = {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]}
    no_kl = build_learner(tiny_policy(), None, SimpleNamespace(learner=learner_cfg(lora=lora, kl_coef_text=0.0,
                                                                                   kl_coef_image=0.0)))
    with_kl = build_learner(tiny_policy(), None, SimpleNamespace(learner=learner_cfg(lora=lora)))
    assert no_kl.reference is None and with_kl.reference is not None


# ---------------------------------------------------------------------------------------------- RNG, run dirs
def test_global_rng_state_keeps_numpys_cached_normal() -> None:
    from r3_rl.rng_state import global_rng_state, set_global_rng_state

    np.random.seed(3)
    np.random.standard_normal()  # draws a pair, keeps the second for the next call
    state = global_rng_state()
    want = (np.random.standard_normal(), random.random(), torch.rand(1).item())
    np.random.seed(4)
    random.seed(4)
    torch.manual_seed(4)
    set_global_rng_state(state)
    assert (np.random.standard_normal(), random.random(), torch.rand(1).item()) == want


def test_a_linked_folder_inside_a_run_dir_is_refused(tmp_path: Path) -> None:
    from r3_rl.run_dir import make_run_dir

    run = tmp_path / "run"
    run.mkdir()
    (tmp_path / "elsewhere").mkdir()
    (run / "trajectories").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    with pytest.raises(UserError, match="trajectories is a symbolic link"):
        make_run_dir(_recipe(tmp_path), str(run))


def test_three_runs_in_the_same_second_get_three_folders(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from r3_rl import run_dir, stamps

    monkeypatch.setattr(stamps.time, "strftime", lambda fmt: "20260101-000000")
    recipe = _recipe(tmp_path)
    got = [run_dir.make_run_dir(recipe).name for _ in range(3)]
    assert got == ["x-20260101-000000", "x-20260101-000000-1", "x-20260101-000000-2"]


def test_a_run_dir_taken_by_another_process_between_check_and_mkdir_is_not_shared(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two runs started in the same second (a benchmark's parallel runs): the other process creates the name this
    one found free; this run must make the next name, not write into the other run's folder."""
    from r3_rl import run_dir, stamps

    monkeypatch.setattr(stamps.time, "strftime", lambda fmt: "20260101-000000")
    real_mkdir, raced = Path.mkdir, []

    def other_process_first(self: Path, *args: Any, **kwargs: Any) -> None:
        if self.name == "x-20260101-000000" and not raced:
            raced.append(self)
            real_mkdir(self)
            (self / "recipe.yaml").write_text("theirs")
        real_mkdir(self, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", other_process_first)
    got = run_dir.make_run_dir(_recipe(tmp_path))
    assert got == tmp_path / "x-20260101-000000-1"
    assert (tmp_path / "x-20260101-000000" / "recipe.yaml").read_text() == "theirs"


def test_two_resumes_with_changed_settings_in_one_second_keep_both_earlier_recipes(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from r3_rl import run_dir, stamps

    monkeypatch.setattr(stamps.time, "strftime", lambda fmt: "20260101-000000")
    run = tmp_path / "run"
    texts = []
    for lr in ("0.001", "0.002", "0.003"):
        run_dir.make_run_dir(_recipe(tmp_path, f"learner.lr={lr}"), str(run))
        texts.append((run / "recipe.yaml").read_text())
    assert sorted(p.name for p in run.iterdir()) == ["recipe.20260101-000000-1.yaml", "recipe.20260101-000000.yaml",
                                                     "recipe.yaml"]
    assert (run / "recipe.20260101-000000.yaml").read_text() == texts[0]
    assert (run / "recipe.20260101-000000-1.yaml").read_text() == texts[1]


def test_two_abandons_of_one_step_in_one_second_keep_all_three_branches(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from r3_rl import stamps

    monkeypatch.setattr(stamps.time, "strftime", lambda fmt: "20260101-000000")
    root = tmp_path / "checkpoints"
    for branch in ("first", "second", "third"):
        (_ckpt(root, 2) / "branch").write_text(branch)
        ck.set_aside_later(_ckpt(root, 1) if branch == "first" else root / "step_000001", tmp_path)
    kept = {p.name: (p / "branch").read_text() for p in root.iterdir() if p.name.startswith("abandoned-")}
    assert kept == {"abandoned-step_000002": "first", "abandoned-step_000002-20260101-000000": "second",
                    "abandoned-step_000002-20260101-000000-1": "third"}
