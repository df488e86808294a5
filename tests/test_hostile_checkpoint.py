"""Checkpoints that cannot run code, and resumes that do not replay steps in the logs.

A payload is a pickle whose ``__reduce__`` creates a marker file: the test first shows it *does* run with
``torch.load(weights_only=False)`` (what `--resume` used to do), then that every way r3-rl reads a checkpoint
refuses it in one line and the marker never appears.
"""
from __future__ import annotations

import copy
import json
import shutil
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from conftest import tiny_overrides
from r3_rl.cli import main
from r3_rl.errors import UserError
from r3_rl.learner.safe_load import safe_torch_load, scan_checkpoint


class Payload:
    """Unpickling this calls ``open(marker, "w")``: a file appears if the pickle's code runs."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):  # noqa: ANN204
        return (open, (self.marker, "w"))


def plant(path: Path, marker: Path) -> None:
    """Add a payload to a real checkpoint file, keeping everything else in it."""
    state = safe_torch_load(path, deepspeed=True)
    state["x"] = Payload(marker)
    torch.save(state, path)


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory, repo: Path) -> tuple[Path, list[str]]:
    """4 tiny steps, checkpoints at 2 and 4, an eval every 2 steps."""
    tmp = tmp_path_factory.mktemp("ckpt")
    sets = tiny_overrides(tmp, steps=4) + ["warmstart.steps=0", "data.eval_size=4", "save_every=2", "eval.every=2",
                                           "eval.dump=0", "log.trajectories_every=0"]
    args = ["train", str(repo / "recipes" / "tiny_blocks.yaml"), "--run-dir", str(tmp / "run")]
    args += [a for s in sets for a in ("--set", s)]
    assert main(args) == 0
    return tmp / "run", args


def test_a_planted_payload_never_runs_on_resume(run: tuple[Path, list[str]], tmp_path: Path,
                                                capsys: pytest.CaptureFixture) -> None:
    run_dir, args = run
    ckpt = tmp_path / "step_000004"
    shutil.copytree(run_dir / "checkpoints" / "step_000004", ckpt)
    marker = tmp_path / "pwned"
    plant(ckpt / "state" / "trainer.pt", marker)
    torch.load(ckpt / "state" / "trainer.pt", weights_only=False)  # the old loader: the payload runs
    assert marker.exists()
    marker.unlink()

    new_run = tmp_path / "resumed"
    argv = [a if a != str(run_dir) else str(new_run) for a in args] + ["--resume", str(ckpt)]
    capsys.readouterr()
    t0 = time.monotonic()
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "trainer.pt: refusing to load it: it references" in err[0] and "run code" in err[0], err
    assert time.monotonic() - t0 < 10 and not new_run.exists() and not marker.exists()
    with pytest.raises(UserError, match="refusing to load it"):  # without the scan: weights_only itself refuses
        safe_torch_load(ckpt / "state" / "trainer.pt")
    assert not marker.exists()


@pytest.mark.parametrize("name", ["learner/optimizer.pt", "learner/learner.pt"])
def test_learner_files_with_a_payload_are_refused(run: tuple[Path, list[str]], tmp_path: Path, name: str) -> None:
    ckpt = tmp_path / "ckpt"
    shutil.copytree(run[0] / "checkpoints" / "step_000004", ckpt)
    marker = tmp_path / "pwned"
    plant(ckpt / "state" / name, marker)
    with pytest.raises(UserError, match=f"{name}: refusing to load it"):
        scan_checkpoint(ckpt)
    with pytest.raises(UserError, match="refusing to load it"):
        safe_torch_load(ckpt / "state" / name)
    assert not marker.exists()


def test_format_1_trainer_state_with_numpy_arrays_still_loads(run: tuple[Path, list[str]], tmp_path: Path) -> None:
    """Checkpoints written before this change stored numpy's RNG state as an array: still accepted."""
    state = safe_torch_load(run[0] / "checkpoints" / "step_000004" / "state" / "trainer.pt")
    assert isinstance(state["numpy_rng"][1], list)  # format 2: plain lists
    old = dict(state, format=1, numpy_rng=np.random.get_state())
    torch.save(old, tmp_path / "trainer.pt")
    scan_checkpoint(tmp_path)
    back = safe_torch_load(tmp_path / "trainer.pt")
    assert np.array_equal(back["numpy_rng"][1], old["numpy_rng"][1]) and back["scorer"] == state["scorer"]


def test_deepspeed_checkpoint_loads_go_through_weights_only(tmp_path: Path) -> None:
    pytest.importorskip("deepspeed")
    from learner_helpers import clone, learner_cfg, sample_items, tiny_policy

    from r3_rl.learner.deepspeed_learner import DeepSpeedOptim
    from r3_rl.learner.torch_learner import TorchLearner

    policy = tiny_policy()

    def learner() -> TorchLearner:
        p = clone(policy)
        cfg = learner_cfg(backend="deepspeed", micro_batch_size=2, deepspeed={"zero_stage": 2})
        return TorchLearner(p, p.frozen_copy(), cfg, DeepSpeedOptim({"policy": p.model}, cfg))
    ds = learner()
    ds.step(copy.deepcopy(sample_items(policy)))
    ds.save(tmp_path / "learner")
    twin = learner()
    twin.load(tmp_path / "learner")  # a clean ZeRO-2 checkpoint loads with weights_only=True
    for k, v in ds.policy.model.state_dict().items():
        assert torch.equal(twin.policy.model.state_dict()[k], v), k
    marker = tmp_path / "pwned"
    for f in sorted((tmp_path / "learner" / "deepspeed").rglob("*.pt")):
        plant(f, marker)
    with pytest.raises(UserError, match="refusing to load it"):
        twin.load(tmp_path / "learner")
    assert not marker.exists()


def test_resume_does_not_replay_steps_in_metrics_or_tensorboard(run: tuple[Path, list[str]]) -> None:
    """Resume from step 2 in the same run dir (steps 2-3 and the final eval run again): each step logged once."""
    run_dir, args = run
    assert main(args + ["--resume", str(run_dir / "checkpoints" / "step_000002")]) == 0
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train = [r["step"] for r in rows if "learner/lr" in r]
    evals = [r["step"] for r in rows if "0_eval/accuracy_round0" in r]
    assert train == [0, 1, 2, 3] and evals == [0, 2, 4]
    acc = EventAccumulator(str(run_dir / "tb"), size_guidance={"scalars": 0})
    acc.Reload()
    assert [e.step for e in acc.Scalars("learner/lr")] == [0, 1, 2, 3]
    assert [e.step for e in acc.Scalars("0_eval/accuracy_round0")] == [0, 2, 4]


# ---------------------------------------------------------------- damaged checkpoints and run dirs (session 34)
def _resume(run: tuple[Path, list[str]], tmp_path: Path, capsys: pytest.CaptureFixture, damage: Any,
            sets: tuple[str, ...] = (), before_work: bool = True) -> str:
    """Copy the step-4 checkpoint, ``damage(ckpt)``, resume from it in a new run dir: the one error line.
    Each used to resume silently from a state nobody saved, or to end in a traceback, often after the model
    was built."""
    run_dir, args = run
    ckpt = tmp_path / "step_000004"
    shutil.copytree(run_dir / "checkpoints" / "step_000004", ckpt)
    damage(ckpt)
    new_run = tmp_path / "resumed"
    argv = [a if a != str(run_dir) else str(new_run) for a in args] + ["--resume", str(ckpt)]
    argv += [a for s in sets for a in ("--set", s)]
    capsys.readouterr()
    t0 = time.monotonic()
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and time.monotonic() - t0 < 10, err
    assert not new_run.exists() or not before_work, err
    return err[0]


def _edit_meta(ckpt: Path, **changes: Any) -> None:
    meta = json.loads((ckpt / "checkpoint.json").read_text())
    meta.update(changes)
    (ckpt / "checkpoint.json").write_text(json.dumps({k: v for k, v in meta.items() if v is not None}))


def _resave_trainer_state(ckpt: Path, **changes: Any) -> None:
    path = ckpt / "state" / "trainer.pt"
    torch.save({**safe_torch_load(path), **changes}, path)


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _lying_buffer(ckpt: Path, lie: Callable[[dict], None] = lambda e: e.update(tokens=[0, 10 ** 9])) -> None:
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    path = ckpt / "state" / "buffer.safetensors"
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    entries = json.loads(meta["entries"])
    lie(entries[0])
    save_file(load_file(str(path)), str(path), metadata={**meta, "entries": json.dumps(entries)})
    _edit_meta(ckpt, files=None)  # as an attacker would: the file list goes too


DAMAGE = {
    "buffer missing": (lambda c: (c / "state" / "buffer.safetensors").unlink(),
                       "buffer.safetensors: missing; the checkpoint is damaged"),
    "buffer missing, no file list": (lambda c: ((c / "state" / "buffer.safetensors").unlink(), _edit_meta(c, files=None)),
                                     "buffer.safetensors: missing (format 3 keeps the parent buffer there)"),
    "weights truncated": (lambda c: _truncate(c / "model" / "model.safetensors"), " when saved; the checkpoint is damaged"),
    "weights truncated, no file list": (lambda c: (_truncate(c / "model" / "model.safetensors"),
                                                   _edit_meta(c, files=None)),
                                        "cannot restore this checkpoint (SafetensorError"),
    "trainer state edited": (lambda c: _resave_trainer_state(c, step=1),
                             "trainer.pt: contents changed since it was saved (SHA-256 differs)"),
    "trainer state edited, no file list": (lambda c: (_resave_trainer_state(c, step=1), _edit_meta(c, files=None)),
                                           "trainer.pt: holds step 1, checkpoint.json says 4"),
    "a step that is not a number": (lambda c: _edit_meta(c, step="4"), "'step' must be a whole number >= 0, got '4'"),
    "a structure that is not a mapping": (lambda c: _edit_meta(c, structure=[1]), "'structure' must be a mapping"),
    "a buffer span past its data": (_lying_buffer, "entry 0: 'tokens' span [0, 1000000000] is not within the file's"),
    # a flawed image filed among the correct parents would be taught as "no further edit needed"
    "a buffer entry in the other pool": (lambda c: _lying_buffer(c, lambda e: e.update(correct=not e["correct"])),
                                         "entry 0: in pool "),
}


@pytest.mark.parametrize("case", list(DAMAGE))
def test_a_damaged_checkpoint_is_one_line_before_any_work(run: tuple[Path, list[str]], tmp_path: Path,
                                                          capsys: pytest.CaptureFixture, case: str) -> None:
    damage, needle = DAMAGE[case]
    # without a file list a truncated shard is found while the weights load, once the model is built
    line = _resume(run, tmp_path, capsys, damage, before_work=case != "weights truncated, no file list")
    assert needle in line, line


def test_resuming_with_another_seed_is_refused(run: tuple[Path, list[str]], tmp_path: Path,
                                               capsys: pytest.CaptureFixture) -> None:
    """The seed draws every step's tasks: a resume with another one is not the run its checkpoints name."""
    line = _resume(run, tmp_path, capsys, lambda c: None, ("seed=7",))
    assert "recipe key 'seed' is 7 but the checkpoint was written with 0" in line, line


def test_a_symbolic_link_in_a_run_dir_is_refused(run: tuple[Path, list[str]], tmp_path: Path,
                                                 capsys: pytest.CaptureFixture) -> None:
    """A run dir from someone else with ``events.log`` linked to another file: resuming there would append to
    it (and ``final/``, ``trajectories/`` linked elsewhere would receive the model and the rollouts)."""
    run_dir, args = run
    copy_dir = tmp_path / "copy"
    shutil.copytree(run_dir, copy_dir)
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me\n")
    (copy_dir / "events.log").unlink(missing_ok=True)
    (copy_dir / "events.log").symlink_to(victim)
    argv = [a if a != str(run_dir) else str(copy_dir) for a in args] + ["--resume", "auto"]
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "events.log is a symbolic link" in err[0], err
    assert victim.read_text() == "keep me\n"


def test_a_resume_with_other_settings_keeps_the_recipe_the_first_steps_ran_with(run: tuple[Path, list[str]],
                                                                                tmp_path: Path) -> None:
    run_dir, args = run
    copy_dir = tmp_path / "copy"
    shutil.copytree(run_dir, copy_dir)
    before = (copy_dir / "recipe.yaml").read_text()
    argv = [a if a != str(run_dir) else str(copy_dir) for a in args] + ["--resume", "auto", "--set", "steps=5",
                                                                          "--set", "learner.lr=1.0e-5"]
    assert main(argv) == 0
    kept = [p for p in copy_dir.glob("recipe.*.yaml")]
    assert len(kept) == 1 and kept[0].read_text() == before
    assert "1.0e-05" in (copy_dir / "recipe.yaml").read_text() and "lr: 1.0e-05" not in before


def test_a_damaged_model_folder_or_warm_start_cache_is_one_line(run: tuple[Path, list[str]], tmp_path: Path,
                                                                 repo: Path, capsys: pytest.CaptureFixture) -> None:
    """`r3-rl eval --checkpoint` on a truncated model, and a run dir whose cached warm start is truncated: each
    was a SafetensorError traceback."""
    from conftest import cli_one_line_error

    model = tmp_path / "model"
    shutil.copytree(run[0] / "checkpoints" / "step_000004" / "model", model)
    _truncate(model / "model.safetensors")
    recipe = str(repo / "recipes" / "tiny_blocks.yaml")
    line = cli_one_line_error(["eval", recipe, "--checkpoint", str(model), "--run-dir", str(tmp_path / "ev")]
                              + [a for s in tiny_overrides(tmp_path) for a in ("--set", s)], capsys)
    assert f"--checkpoint: {model}: cannot load it (SafetensorError" in line, line

    args = ["train", recipe, "--run-dir", str(tmp_path / "r")] + [a for s in tiny_overrides(tmp_path, steps=1)
                                                                   for a in ("--set", s)]
    assert main(args) == 0
    _truncate(tmp_path / "r" / "warmstart" / "model.safetensors")
    line = cli_one_line_error(args, capsys)
    assert "warmstart: the cached warm start cannot be read (SafetensorError" in line and "delete the folder" in line


def test_resuming_a_finished_run_logs_its_final_eval_once(run: tuple[Path, list[str]], tmp_path: Path) -> None:
    """The final checkpoint is written before the "after" eval, which a resumed finished run runs again: it
    was then in metrics.jsonl twice."""
    run_dir, args = run
    copy_dir = tmp_path / "copy"
    shutil.copytree(run_dir, copy_dir)
    argv = [a if a != str(run_dir) else str(copy_dir) for a in args] + ["--resume", "auto"]
    assert main(argv) == 0
    rows = [json.loads(x) for x in (copy_dir / "metrics.jsonl").read_text().splitlines()]
    evals = [r["step"] for r in rows if "0_eval/accuracy_round0" in r]
    assert evals == [0, 2, 4], evals
