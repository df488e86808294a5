"""Exact resume: 4 steps straight == 2 steps + resume + 2 steps, bit for bit, on the real trainer."""
from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import tiny_overrides
from safetensors import safe_open
from safetensors.torch import load_model
from transformers import LlamaForCausalLM

from r3_rl.cli import main
from r3_rl.config import load_recipe
from r3_rl.environment import read_records
from r3_rl.errors import UserError
from r3_rl.learner.checkpoint import MARKER, checkpoints_before, complete_checkpoints, find_resume, prune
from r3_rl.trainer import Trainer

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "recipes" / "tiny_blocks.yaml"


def _overrides(tmp_path: Path, steps: int) -> list[str]:
    # threads=1: the same matmul blocking in every run, whatever else the machine is doing
    return tiny_overrides(tmp_path, steps) + ["threads=1", "eval.dump=0"]


def _assert_same(a: object, b: object, where: str) -> None:
    """Every tensor equal with torch.equal, recursively through dicts/lists/tuples; other leaves ==."""
    if isinstance(a, np.ndarray):
        assert isinstance(b, np.ndarray) and np.array_equal(a, b), where
    elif isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), where
        for k in a:
            _assert_same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


def test_resume_is_bit_identical_and_skips_interrupted_checkpoints(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    straight = Trainer(load_recipe(RECIPE, _overrides(tmp_path, 4)), tmp_path / "straight")
    straight.train()

    first = Trainer(load_recipe(RECIPE, _overrides(tmp_path, 2)), tmp_path / "first")
    first.train()
    ckpts = tmp_path / "first" / "checkpoints"
    assert [p.name for p in complete_checkpoints(ckpts)] == ["step_000002"]

    # a save that dies half-way (model written, learner state not) and a step folder without its marker
    def boom(path: Path) -> None:
        raise RuntimeError("killed while saving")
    monkeypatch.setattr(first.learner, "save", boom)
    with pytest.raises(RuntimeError):
        first.save_checkpoint(3)
    assert [p.name for p in ckpts.glob(".tmp-step_000003-*")], "the interrupted save should leave its temp dir"
    shutil.copytree(ckpts / "step_000002", ckpts / "step_000009")
    (ckpts / "step_000009" / MARKER).unlink()
    monkeypatch.undo()

    # resume in a NEW run dir (no warm-start cache there) through the CLI; auto must pick step 2
    ckpt, run_dir = find_resume(str(tmp_path / "first"), load_recipe(RECIPE, _overrides(tmp_path, 4)), None)
    assert ckpt == ckpts / "step_000002" and run_dir == tmp_path / "first"
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copytree(ckpts, resumed / "checkpoints")
    args = ["train", str(RECIPE), "--run-dir", str(resumed), "--resume", "auto"]
    for o in _overrides(tmp_path, 4):
        args += ["--set", o]
    assert main(args) == 0
    assert not list((resumed / "checkpoints").glob(".tmp-*")), "a later save cleans up interrupted ones"
    assert not (resumed / "trajectories" / "step_000001.jsonl").exists(), "steps 0-1 must not be re-run"
    # environment.json: a record per command; the same machine is no event
    assert [r["command"] for r in read_records(tmp_path / "straight")] == ["train"]
    assert [r["command"] for r in read_records(resumed)] == ["resume"]
    events = (resumed / "events.log").read_text() if (resumed / "events.log").exists() else ""
    assert "another environment" not in events

    end = resumed / "checkpoints" / "step_000004"
    assert json.loads((end / MARKER).read_text())["step"] == 4
    # policy weights: the from_pretrained export and the straight run's live weights, tensor by tensor
    exported = LlamaForCausalLM.from_pretrained(str(end / "model")).state_dict()
    _assert_same(straight.policy.model.state_dict(), exported, "policy")
    reference = copy.deepcopy(straight.reference.model)
    for t in reference.parameters():
        t.data.zero_()
    load_model(reference, str(end / "state" / "reference.safetensors"))
    _assert_same(straight.reference.model.state_dict(), reference.state_dict(), "reference")
    opt = torch.load(end / "state" / "learner" / "optimizer.pt", weights_only=True)
    _assert_same(straight.learner.optim.state_dict(), opt, "optimizer+scheduler")
    # trainer state (RNGs, sampler position, Tree-RL buffer, version, failure counts) == the straight run's own
    ts = torch.load(end / "state" / "trainer.pt", weights_only=True)
    ts_straight = torch.load(tmp_path / "straight" / "checkpoints" / "step_000004" / "state" / "trainer.pt",
                             weights_only=True)
    _assert_same(ts_straight, ts, "trainer")
    buffers: list[tuple[dict, dict]] = []
    for run in (end, tmp_path / "straight" / "checkpoints" / "step_000004"):  # the Tree-RL parent buffer
        with safe_open(str(run / "state" / "buffer.safetensors"), framework="pt") as f:
            buffers.append(({k: f.get_tensor(k) for k in f.keys()}, f.metadata()))
    _assert_same(buffers[0], buffers[1], "buffer")
    assert ts["policy_version"] == straight.policy.version == 4 and ts["data_position"] == straight.data.position


def _fake_ckpt(root: Path, step: int, complete: bool = True) -> Path:
    p = root / f"step_{step:06d}"
    p.mkdir(parents=True)
    if complete:
        (p / MARKER).write_text(json.dumps({"complete": True, "step": step}))
    return p


def test_find_resume_and_prune(tmp_path: Path) -> None:
    recipe = load_recipe(RECIPE, [f"out_dir={tmp_path}", "name=x"])
    assert find_resume("auto", recipe, None) == (None, None)  # nothing yet: a fresh run
    run = tmp_path / "x-20260101-000000"
    root = run / "checkpoints"
    for s in (1, 2, 3):
        _fake_ckpt(root, s)
    _fake_ckpt(root, 4, complete=False)
    (root / ".tmp-step_000005-1").mkdir()
    assert find_resume("auto", recipe, None) == (root / "step_000003", run)
    assert find_resume(str(run), recipe, None) == (root / "step_000003", run)
    assert find_resume(str(root / "step_000002"), recipe, str(tmp_path / "elsewhere")) == (
        root / "step_000002", tmp_path / "elsewhere")
    with pytest.raises(UserError, match="no complete checkpoint"):
        find_resume(str(tmp_path / "nowhere"), recipe, None)
    (root / "step_000004" / MARKER).write_text(json.dumps({"complete": False}))
    with pytest.raises(UserError, match="incomplete"):
        find_resume(str(root / "step_000004"), recipe, None)
    prune(root, 2)
    assert [p.name for p in complete_checkpoints(root)] == ["step_000002", "step_000003"]
    assert (root / "step_000004").is_dir()  # incomplete ones are neither counted nor deleted by prune


def test_resuming_an_earlier_step_sets_the_later_branch_aside(tmp_path: Path) -> None:
    """Resume step 1 of a run that reached step 3: steps 2-3 are the abandoned branch.  Left in place, a crash
    after the new branch's step 2 made ``--resume auto`` pick the old step 3 (logs already rewound to step 1)."""
    from r3_rl.learner.checkpoint import set_aside_later

    recipe = load_recipe(RECIPE, [f"out_dir={tmp_path}", "name=x"])
    run = tmp_path / "x-20260101-000000"
    root = run / "checkpoints"
    first = _fake_ckpt(root, 1)
    for s in (2, 3):
        _fake_ckpt(root, s)
    moved = set_aside_later(first, run)
    assert [p.name for p in moved] == ["abandoned-step_000002", "abandoned-step_000003"] and all(p.is_dir() for p in moved)
    assert find_resume("auto", recipe, None) == (first, run)
    _fake_ckpt(root, 2)  # the new branch saves step 2, then crashes
    assert find_resume("auto", recipe, None) == (root / "step_000002", run)
    assert set_aside_later(root / "step_000002", run) == []  # resuming the latest sets nothing aside


def test_cli_resume_path_without_checkpoint_is_one_line_error(tmp_path: Path,
                                                             capsys: pytest.CaptureFixture) -> None:
    code = main(["train", str(RECIPE), "--resume", str(tmp_path), "--set", f"out_dir={tmp_path}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "--resume" in err[0] and "no complete checkpoint" in err[0]


def test_resume_is_bit_identical_with_deepspeed_lora_and_ppo(tmp_path: Path) -> None:
    """The same guarantee through DeepSpeed's own checkpoint (ZeRO-2), LoRA adapters and the PPO critic."""
    pytest.importorskip("deepspeed")
    extra = ["learner.backend=deepspeed", "learner.lora={r: 4}", "learner.algorithm=ppo",
             "learner.refine_baseline=group", "learner.micro_batch_size=8"]
    straight = Trainer(load_recipe(RECIPE, _overrides(tmp_path, 4) + extra), tmp_path / "straight")
    straight.train()
    Trainer(load_recipe(RECIPE, _overrides(tmp_path, 2) + extra), tmp_path / "first").train()
    resumed = Trainer(load_recipe(RECIPE, _overrides(tmp_path, 4) + extra), tmp_path / "second")
    resumed.resume(tmp_path / "first" / "checkpoints" / "step_000002")
    resumed.train()
    assert resumed.policy.version == straight.policy.version == 4
    _assert_same(straight.policy.model.state_dict(), resumed.policy.model.state_dict(), "policy (base + LoRA)")
    _assert_same(straight.learner.modules["value_head"].state_dict(),
                 resumed.learner.modules["value_head"].state_dict(), "value head")

    def adam(t: Trainer) -> dict:
        opt = t.learner.optim.engine.optimizer
        return {i: s for i, s in enumerate(getattr(opt, "optimizer", opt).state.values())}
    _assert_same(adam(straight), adam(resumed), "DeepSpeed optimiser state")
    assert straight.learner.optim.engine.lr_scheduler.last_epoch == resumed.learner.optim.engine.lr_scheduler.last_epoch


def test_resume_is_bit_identical_with_torch_lora_from_the_adapters_alone(tmp_path: Path) -> None:
    """The torch backend's checkpoint keeps the LoRA adapters, not the base again: the resume rebuilds the base
    from the recipe, checks its fingerprint and goes on exactly as the run that was not cut."""
    extra = ["learner.lora={r: 4, dropout: 0.5}"]
    straight = Trainer(load_recipe(RECIPE, _overrides(tmp_path, 4) + extra), tmp_path / "straight")
    straight.train()
    Trainer(load_recipe(RECIPE, _overrides(tmp_path, 2) + extra), tmp_path / "first").train()
    ckpt = tmp_path / "first" / "checkpoints" / "step_000002"
    from safetensors import safe_open

    with safe_open(str(ckpt / "state" / "policy.safetensors"), framework="pt") as f:
        assert all("lora_" in k for k in f.keys())
    resumed = Trainer(load_recipe(RECIPE, _overrides(tmp_path, 4) + extra), tmp_path / "second")
    resumed.resume(ckpt)
    resumed.train()
    assert resumed.policy.version == straight.policy.version == 4
    _assert_same(straight.policy.model.state_dict(), resumed.policy.model.state_dict(), "policy (base + LoRA)")


def test_resume_refuses_an_incompatible_recipe(tmp_path: Path) -> None:
    from r3_rl.learner.checkpoint import check_compatible, structure

    recipe = load_recipe(RECIPE, [f"out_dir={tmp_path}", "steps=4"])
    meta = {"step": 2, "structure": structure(recipe)}
    check_compatible(meta, recipe, tmp_path)  # same recipe, more steps: fine
    with pytest.raises(UserError, match="recipe key 'learner.algorithm' is 'ppo'"):
        check_compatible(meta, load_recipe(RECIPE, ["steps=4", "learner.algorithm=ppo",
                                                           "learner.refine_baseline=group"]), tmp_path)
    with pytest.raises(UserError, match="checkpoint is at step 6 but the recipe has steps=4"):
        check_compatible({"step": 6}, recipe, tmp_path)
    # the critic's rate makes an optimiser group of its own: a resume cannot add, drop or change it
    with pytest.raises(UserError, match=r"recipe key 'learner.ppo.critic_lr' is 0.01 but .* with None"):
        check_compatible(meta, load_recipe(RECIPE, ["steps=4", "learner.ppo.critic_lr=1e-2"]), tmp_path)
    older = {"step": 2, "structure": {k: v for k, v in structure(recipe).items() if k != "learner.ppo.critic_lr"}}
    check_compatible(older, recipe, tmp_path)  # checkpoints written before the key: still resumable


def test_the_frozen_reference_is_written_once_and_linked_after(tmp_path: Path) -> None:
    """The KL reference (a policy-sized file, 29 GB for BAGEL) never changes within a run: the first save writes
    it, later saves -- and the saves of a run resumed from a checkpoint -- hard-link the file known to hold it."""
    run = Trainer(load_recipe(RECIPE, _overrides(tmp_path, 3) + ["save_every=1", "keep_last=2"]), tmp_path / "a")
    run.train()
    assert run.reference is not None
    refs = [p / "state" / "reference.safetensors" for p in complete_checkpoints(tmp_path / "a" / "checkpoints")]
    assert [p.parent.parent.name for p in refs] == ["step_000002", "step_000003"]  # step 1 pruned, its data kept
    assert refs[0].stat().st_ino == refs[1].stat().st_ino and refs[1].stat().st_nlink == 2
    with safe_open(str(refs[1]), framework="pt") as f:
        saved = {k: f.get_tensor(k) for k in f.keys()}
    _assert_same(saved, {k: v for k, v in run.reference.model.state_dict().items() if k in saved}, "reference")

    resumed = Trainer(load_recipe(RECIPE, _overrides(tmp_path, 4) + ["save_every=1"]), tmp_path / "b")
    resumed.resume(refs[1].parent.parent)
    resumed.train()
    (last,) = complete_checkpoints(tmp_path / "b" / "checkpoints")
    assert (last / "state" / "reference.safetensors").stat().st_ino == refs[1].stat().st_ino


def test_resume_auto_passes_over_a_damaged_newest_checkpoint(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """A crash before the disk flushed the newest checkpoint leaves a truncated file: ``--resume auto`` says so in
    one line and continues from the checkpoint before it (whose later, damaged one is then set aside); a recipe
    that does not fit is not damage and still stops."""
    run = tmp_path / "run"
    sets = [f"--set={s}" for s in _overrides(tmp_path, 2) + ["save_every=1", "keep_last=3"]]
    assert main(["train", str(RECIPE), "--run-dir", str(run), *sets]) == 0
    newest = run / "checkpoints" / "step_000002" / "state" / "trainer.pt"
    newest.write_bytes(newest.read_bytes()[:100])
    capsys.readouterr()
    more = [f"--set={s}" for s in _overrides(tmp_path, 3) + ["save_every=1", "keep_last=3"]]
    assert main(["train", str(RECIPE), "--run-dir", str(run), "--resume", "auto", *more]) == 0
    err = capsys.readouterr().err
    assert "--resume auto: " in err and "trainer.pt" in err and "trying step_000001" in err
    assert (run / "checkpoints" / "abandoned-step_000002").is_dir()
    assert [p.name for p in complete_checkpoints(run / "checkpoints")] == ["step_000001", "step_000002", "step_000003"]
    assert main(["train", str(RECIPE), "--run-dir", str(run), "--resume", "auto", *more,
                 "--set=learner.algorithm=ppo", "--set=learner.refine_baseline=group"]) == 2


def test_a_checkpoint_is_on_disk_before_it_is_named_complete(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every file and folder of a checkpoint is fsync'd before its folder is renamed into place, and the parent
    after the rename, before the older checkpoint is pruned: a power loss cannot leave a 'complete' checkpoint
    whose data never left the page cache, with the one before it already deleted."""
    import os

    import r3_rl.learner.checkpoint as checkpoint

    events: list[tuple[str, str]] = []
    real_fsync, real_rename, real_rmtree = os.fsync, Path.rename, shutil.rmtree
    monkeypatch.setattr(os, "fsync", lambda fd: events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
                        or real_fsync(fd))
    monkeypatch.setattr(Path, "rename", lambda self, dest: events.append(("rename", f"{self} -> {dest}"))
                        or real_rename(self, dest))
    monkeypatch.setattr(checkpoint.shutil, "rmtree", lambda p, *a, **kw: events.append(("rmtree", str(p)))
                        or real_rmtree(p, *a, **kw))
    Trainer(load_recipe(RECIPE, _overrides(tmp_path, 2) + ["save_every=1", "keep_last=1"]), tmp_path / "run").train()
    root = (tmp_path / "run" / "checkpoints").resolve()
    (final,) = complete_checkpoints(root)
    assert final.name == "step_000002"
    renamed = next(i for i, (kind, what) in enumerate(events) if kind == "rename" and what.endswith(f"-> {final}"))
    tmp = Path(events[renamed][1].split(" -> ")[0])
    synced_before = {what for kind, what in events[:renamed] if kind == "fsync"}
    on_disk = [tmp / p.relative_to(final) for p in final.rglob("*")] + [tmp]
    assert on_disk and not [str(p) for p in on_disk if str(p) not in synced_before]
    pruned = next(i for i, (kind, what) in enumerate(events) if kind == "rmtree" and what.endswith("step_000001"))
    assert ("fsync", str(root)) in events[renamed:pruned]


def test_a_run_cut_off_during_an_eval_keeps_the_steps_and_runs_the_eval_again(tmp_path: Path,
                                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """The checkpoint at an eval's step is written before the eval: a preemption during an hour-long eval loses
    the eval, not the steps since the last save.  ``--resume auto`` runs the cut-off eval first, logs it once,
    and ends bit-identical to a run that was never stopped (evals draw on their own generators)."""
    from r3_rl.eval.runner import Evaluator

    sets = _overrides(tmp_path, 4) + ["save_every=2", "eval.every=2"]
    straight = Trainer(load_recipe(RECIPE, sets), tmp_path / "straight")
    straight.train()

    real_run = Evaluator.run

    def preempted(self, name: str, step: int):  # noqa: ANN001, ANN202
        if name == "step_000002":
            raise KeyboardInterrupt  # the node goes away half-way through the eval
        return real_run(self, name, step)
    monkeypatch.setattr(Evaluator, "run", preempted)
    cut = tmp_path / "cut"
    with pytest.raises(KeyboardInterrupt):
        Trainer(load_recipe(RECIPE, sets), cut).train()
    monkeypatch.undo()
    assert [p.name for p in complete_checkpoints(cut / "checkpoints")] == ["step_000002"]
    assert not (cut / "eval" / "step_000002.json").exists()

    assert main(["train", str(RECIPE), "--run-dir", str(cut), "--resume", "auto"]
                + [a for s in sets for a in ("--set", s)]) == 0
    assert (cut / "eval" / "step_000002.json").is_file()
    rows = [json.loads(line) for line in (cut / "metrics.jsonl").read_text().splitlines()]
    eval_steps = [r["step"] for r in rows if any(k.startswith("eval/") for k in r)]
    assert eval_steps == [0, 2, 4]  # before, the eval run again at step 2, after: each once
    assert json.loads((cut / "eval" / "step_000002.json").read_text())["accuracy"] == json.loads(
        (tmp_path / "straight" / "eval" / "step_000002.json").read_text())["accuracy"]
    exported = LlamaForCausalLM.from_pretrained(str(cut / "checkpoints" / "step_000004" / "model")).state_dict()
    _assert_same(straight.policy.model.state_dict(), exported, "policy")


def test_an_unreadable_before_eval_stops_a_resume(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """A truncated eval/before.json used to be read as 'no before eval': the resumed run evaluated its resumed
    weights as the baseline and measured every gain against them, without a word."""
    sets = _overrides(tmp_path, 2) + ["save_every=1"]
    run = tmp_path / "run"
    Trainer(load_recipe(RECIPE, sets), run).train()
    before = run / "eval" / "before.json"
    assert not list(before.parent.glob(".*.tmp"))  # written whole, then renamed
    before.write_text(before.read_text()[:100])
    args = ["train", str(RECIPE), "--run-dir", str(run), "--resume", str(run / "checkpoints" / "step_000001")]
    from conftest import cli_one_line_error

    line = cli_one_line_error(args + [a for s in _overrides(tmp_path, 3) for a in ("--set", s)], capsys)
    assert "before.json: cannot be read" in line and "delete it" in line


def test_the_checkpoints_before_a_step_are_ordered_by_number(tmp_path: Path) -> None:
    """``--resume auto`` falls back from a damaged newest checkpoint to the ones before it; past step 999999 their
    names no longer sort as their steps (``step_1000000`` < ``step_999999`` as text), and the fallback had
    skipped every earlier one."""
    root = tmp_path / "checkpoints"
    for step in (999_998, 999_999, 1_000_000, 1_000_001):
        _fake_ckpt(root, step)
    assert [p.name for p in checkpoints_before(root / "step_1000001")] == [
        "step_1000000", "step_999999", "step_999998"]
    assert [p.name for p in checkpoints_before(root / "step_999999")] == ["step_999998"]


def test_the_trainer_seeds_every_global_generator_and_keeps_worker_restarts(tmp_path: Path) -> None:
    """Python's and numpy's global generators go into trainer.pt: unseeded, two runs of one recipe (and a run and
    its resume, each a new process) saved different states.  Workers restarted before a checkpoint stay counted
    after a resume (``rollout/worker_restarts`` began again at 0)."""
    import random

    random.seed(7)
    np.random.seed(7)  # whatever ran before in this process
    recipe = load_recipe(RECIPE, _overrides(tmp_path, 1))
    trainer = Trainer(recipe, tmp_path / "run")
    assert random.random() == random.Random(recipe.seed).random()
    assert np.random.random() == np.random.RandomState(recipe.seed).random_sample()

    class Restarted:
        restarts = 2
    trainer.parts.__dict__["engine"] = Restarted()  # a Ray engine that lost two workers
    state = trainer.state_dict()
    assert state["worker_restarts"] == 2
    again = Trainer(recipe, tmp_path / "again")
    assert again.worker_restarts() == 0 and "engine" not in again.parts.__dict__  # asking starts no engine
    again.load_state_dict(state)
    again.parts.__dict__["engine"] = Restarted()
    assert again.worker_restarts() == 4
