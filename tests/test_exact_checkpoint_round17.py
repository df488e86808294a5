"""Exact small cases for finding, writing and checking checkpoints and for timestamped names (round 17 audit).

Each test pins a behaviour of ``r3_rl/learner/{checkpoint_find,checkpoint,manifest}.py`` or ``r3_rl/stamps.py``
that a plausible one-point bug changed without the rest of the suite noticing: which run ``--resume auto`` takes
when the newest run never saved, where a copied checkpoint branches, what ``checkpoint.json`` records, which
older checkpoints still load, and the stamp's format.  Expected values are worked out by hand from the
documented behaviour (module and function docstrings) or come from a peer (``time.strftime`` on a fixed time).
"""
from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from test_exact_checkpoint_resume import _Loop, _recipe

from r3_rl.errors import UserError
from r3_rl.learner import checkpoint as ck
from r3_rl.learner import checkpoint_find as cf
from r3_rl.learner import manifest
from r3_rl.rollout.buffer import ParentBuffer

def _ckpt(root: Path, name: str, meta: dict | None = None) -> Path:
    p = root / name
    p.mkdir(parents=True)
    (p / cf.MARKER).write_text(json.dumps({"complete": True, "step": 0} if meta is None else meta))
    return p


def _weightless_parts(step: int, buffer: Any = None) -> ck.CheckpointParts:
    """A learner that keeps its weights in its own files (no model to build): the checkpoint plumbing alone."""
    learner = SimpleNamespace(saves_weights=True, adapters=None, export=lambda folder: folder.mkdir(),
                              save=lambda d: d.mkdir(), load=lambda d: None)
    return ck.CheckpointParts(SimpleNamespace(version=4), None, learner, _Loop({"step": step}), buffer)


# ---------------------------------------------------------------------------------------------- which checkpoint
def test_resume_auto_passes_over_a_newer_run_that_never_saved(tmp_path: Path) -> None:
    """The newest ``x-*`` run crashed before its first save (no ``checkpoints/`` folder, or an empty one):
    ``--resume auto`` continues the older run that has a checkpoint, not a fresh run and not a crash."""
    old = tmp_path / "x-20260101-000000"
    ckpt = _ckpt(old / "checkpoints", "step_000002", {"complete": True, "step": 2})
    bare, empty = tmp_path / "x-20260102-000000", tmp_path / "x-20260103-000000"
    bare.mkdir()
    (empty / "checkpoints").mkdir(parents=True)
    now = time.time()
    os.utime(old, (now - 200, now - 200))
    os.utime(bare, (now - 100, now - 100))
    os.utime(empty, (now, now))
    assert cf.latest_checkpoint(bare) is None and cf.latest_checkpoint(empty) is None
    assert cf.find_resume("auto", SimpleNamespace(out_dir=str(tmp_path), name="x"), None) == (ckpt, old)



def test_resume_auto_finds_the_runs_of_a_recipe_whose_name_has_glob_characters(tmp_path: Path) -> None:
    """``name: exp[1]`` is a valid name (no slash, no space): its runs are ``exp[1]-<stamp>``.  The name is not a
    pattern: ``--resume auto`` continues that run, never ``exp1-<stamp>`` (another recipe's)."""
    mine = tmp_path / "exp[1]-20260101-000000"
    ckpt = _ckpt(mine / "checkpoints", "step_000003", {"complete": True, "step": 3})
    _ckpt(tmp_path / "exp1-20260101-000000" / "checkpoints", "step_000005", {"complete": True, "step": 5})
    assert cf.find_resume("auto", SimpleNamespace(out_dir=str(tmp_path), name="exp[1]"), None) == (ckpt, mine)
    assert cf.find_resume("auto", SimpleNamespace(out_dir=str(tmp_path), name="exp?"), None) == (None, None)

def test_a_copied_checkpoint_whose_json_names_no_step_branches_at_step_zero(tmp_path: Path) -> None:
    """``checkpoint.json`` without ``step`` is a step-0 checkpoint (as ``_check_meta`` reads it): resuming a copy of
    it (not named ``step_N``) sets every step of the run aside."""
    run = tmp_path / "run"
    root = run / "checkpoints"
    for s in (1, 2):
        _ckpt(root, f"step_{s:06d}", {"complete": True, "step": s})
    copy = _ckpt(tmp_path, "start", {"complete": True})
    assert cf.set_aside_later(copy, run) == [root / "abandoned-step_000001", root / "abandoned-step_000002"]
    assert cf.complete_checkpoints(root) == []


def test_a_copy_named_like_a_step_with_a_suffix_branches_at_the_step_it_records(tmp_path: Path) -> None:
    """``step_000002.bak`` is not a ``step_N`` name: the step comes from its ``checkpoint.json`` (1 here), so step 2
    and step 3 are set aside and step 1 stays."""
    run = tmp_path / "run"
    root = run / "checkpoints"
    for s in (1, 2, 3):
        _ckpt(root, f"step_{s:06d}", {"complete": True, "step": s})
    copy = _ckpt(tmp_path, "step_000002.bak", {"complete": True, "step": 1})
    assert cf.set_aside_later(copy, run) == [root / "abandoned-step_000002", root / "abandoned-step_000003"]
    assert [p.name for p in cf.complete_checkpoints(root)] == ["step_000001"]


# ---------------------------------------------------------------------------------------------- file list
def test_a_dangling_link_in_place_of_a_listed_file_is_named_a_link(tmp_path: Path) -> None:
    """A listed file replaced by a link whose target is gone is refused as a link (not as missing)."""
    (tmp_path / "m.json").write_bytes(b"{}")
    meta = {"files": manifest.file_manifest(tmp_path)}
    (tmp_path / "m.json").unlink()
    (tmp_path / "m.json").symlink_to(tmp_path / "gone")
    with pytest.raises(UserError, match=r"m\.json: a symbolic link; the checkpoint is damaged"):
        manifest.verify_files(tmp_path, meta)


def test_the_file_list_leaves_out_folders_and_dangling_links(tmp_path: Path) -> None:
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "f").write_bytes(b"12")
    (tmp_path / "dangling").symlink_to(tmp_path / "gone")
    assert manifest.file_sizes(tmp_path) == {"d/f": 2}


# ---------------------------------------------------------------------------------------------- stamps
def test_the_stamp_is_year_month_day_dash_hour_minute_second(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The stamp of 2026-03-04 05:06:07 (local time) is ``20260304-050607``; the peer is ``time.strftime`` itself
    on that fixed time, whatever format string the code passes."""
    from r3_rl import stamps

    fixed = time.struct_time((2026, 3, 4, 5, 6, 7, 2, 63, 0))
    real = time.strftime
    monkeypatch.setattr(stamps.time, "strftime", lambda fmt, *a: real(fmt, fixed))
    assert stamps.stamped_path(tmp_path, "x") == tmp_path / "x-20260304-050607"
    assert stamps.new_stamped_dir(tmp_path, "x") == tmp_path / "x-20260304-050607"
    assert stamps.stamped_path(tmp_path, "x") == tmp_path / "x-20260304-050607-1"


def test_a_real_stamp_has_the_documented_shape(tmp_path: Path) -> None:
    from r3_rl import stamps

    name = stamps.stamped_path(tmp_path, "recipe", ".yaml", sep=".").name
    assert re.fullmatch(r"recipe\.20\d\d[01]\d[0-3]\d-[0-2]\d[0-5]\d[0-6]\d\.yaml", name), name


# ---------------------------------------------------------------------------------------------- writing
def test_a_save_records_the_recipe_time_and_version_and_clears_leftovers(tmp_path: Path) -> None:
    """``checkpoint.json`` names the recipe (``--resume auto`` tells ``x`` from ``x-lowlr`` by it) and the time;
    a crashed save's ``.tmp-`` folder and a swap's ``.old-`` folder are removed by the next save."""
    root = tmp_path / "run" / "checkpoints"
    (root / ".tmp-step_000001-999").mkdir(parents=True)
    (root / ".old-step_000001-999").mkdir()
    before = time.strftime("%Y-%m-%dT%H:%M:%S")
    path = ck.save_checkpoint(tmp_path / "run", 1, 2, _weightless_parts(1), _recipe(tmp_path))
    after = time.strftime("%Y-%m-%dT%H:%M:%S")
    meta = json.loads((path / ck.MARKER).read_text())
    assert meta["recipe"] == "x" and meta["step"] == 1 and meta["policy_version"] == 4
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d", meta["time"]) and before <= meta["time"] <= after
    assert sorted(p.name for p in root.iterdir()) == ["step_000001"]


# ---------------------------------------------------------------------------------------------- checking
def test_step_zero_passes_the_metadata_check(tmp_path: Path) -> None:
    """``step`` must be a whole number >= 0: 0 (a checkpoint before any step) is accepted, -1 is not."""
    ck._check_meta({"step": 0, "files": {}, "structure": {}}, tmp_path)
    ck._check_meta({}, tmp_path)
    with pytest.raises(UserError, match="'step' must be a whole number >= 0, got '-1'"):
        ck._check_meta({"step": -1}, tmp_path)


def _state(path: Path, trainer: dict, buffer: bool = False) -> Path:
    (path / "state").mkdir(parents=True)
    torch.save(trainer, path / "state" / "trainer.pt")
    if buffer:
        ParentBuffer(2).save(path / "state" / "buffer.safetensors")
    return path


def test_a_checkpoint_that_names_no_format_is_format_1_and_needs_no_buffer_file(tmp_path: Path) -> None:
    """Format 1 checkpoints predate the ``format`` key and kept the buffer in ``trainer.pt``."""
    ck._check_state_files(_state(tmp_path / "old", {"step": 3}), {"step": 3})
    with pytest.raises(UserError, match="buffer.safetensors: missing"):
        ck._check_state_files(_state(tmp_path / "new", {"step": 3}), {"step": 3, "format": 3})


def test_a_loop_state_that_names_no_step_is_not_refused(tmp_path: Path) -> None:
    """The step check compares a step the loop's state holds; a state without one (nothing to compare) passes."""
    ck._check_state_files(_state(tmp_path / "a", {"rng": 1}, buffer=True), {"step": 3, "format": 3})
    with pytest.raises(UserError, match=r"holds step 4, checkpoint\.json says 3"):
        ck._check_state_files(_state(tmp_path / "b", {"step": 4}, buffer=True), {"step": 3, "format": 3})


def test_resume_auto_refuses_a_structure_that_is_not_a_mapping_in_one_line(tmp_path: Path) -> None:
    """A hand-edited ``structure: [...]`` is the metadata check's one-line refusal, not a crash in the recipe check."""
    recipe = _recipe(tmp_path, "steps=4")
    latest = _state(tmp_path / "run" / "checkpoints" / "step_000002", {"step": 2}, buffer=True)
    meta = {"complete": True, "step": 2, "format": 3, "structure": ["policy.kind"]}
    (latest / ck.MARKER).write_text(json.dumps(meta))
    warned: list[str] = []
    with pytest.raises(UserError, match="'structure' must be a mapping, got list"):
        ck.newest_sound(latest, recipe, warned.append)
    assert warned == []


# ---------------------------------------------------------------------------------------------- loading
def test_a_checkpoint_without_a_buffer_file_leaves_the_built_buffer_alone(tmp_path: Path) -> None:
    """Formats 1-2 kept the parent buffer in the loop's state: no ``buffer.safetensors`` is nothing to load."""
    recipe = _recipe(tmp_path, "steps=4")
    path = ck.save_checkpoint(tmp_path / "run", 2, 2, _weightless_parts(2), recipe)
    assert not (path / "state" / "buffer.safetensors").exists()
    meta = {**json.loads((path / ck.MARKER).read_text()), "format": 2}
    buffer, parts = ParentBuffer(5), _weightless_parts(0, ParentBuffer(5))
    parts.buffer = buffer
    assert ck.load_checkpoint(path, parts, recipe, checked=meta) is meta
    assert parts.loop.state == {"step": 2} and buffer.correct.maxlen == 5


def test_a_model_folder_without_weights_says_so(tmp_path: Path) -> None:
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text("{}")
    with pytest.raises(UserError, match=r"model: no \.safetensors weights"):
        ck.load_exported(torch.nn.Linear(1, 1), tmp_path / "model")


def test_a_checkpoint_json_that_is_a_folder_is_not_a_checkpoint(tmp_path: Path) -> None:
    """``--resume PATH``: a folder whose ``checkpoint.json`` is itself a folder is not a checkpoint folder; PATH is
    then read as a run dir, and that has no complete checkpoint."""
    (tmp_path / "c" / cf.MARKER).mkdir(parents=True)
    with pytest.raises(UserError, match="no complete checkpoint there"):
        cf.find_resume(str(tmp_path / "c"), SimpleNamespace(out_dir=str(tmp_path), name="x"), None)


def test_the_reference_is_linked_not_written_again(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With a file known to hold the frozen reference, a save hard-links it and writes nothing; without one (or with
    that file gone) it is written."""
    held = tmp_path / "held.safetensors"
    held.write_bytes(b"weights")
    written: list[str] = []
    monkeypatch.setattr(ck, "save_model", lambda model, dest: written.append(Path(dest).name))
    parts = ck.CheckpointParts(None, SimpleNamespace(model=None), None, _Loop({}), reference_file=held)
    ck._save_reference(parts, tmp_path / "linked.safetensors")
    assert written == [] and (tmp_path / "linked.safetensors").stat().st_ino == held.stat().st_ino
    parts.reference_file = tmp_path / "gone.safetensors"
    ck._save_reference(parts, tmp_path / "new.safetensors")
    assert written == ["new.safetensors"]


class _Payload:
    def __reduce__(self) -> tuple:
        return (os.getcwd, ())  # harmless if it ever ran: the point is that it is a callable outside the allowlist


def test_check_resumable_refuses_a_planted_pickle_the_file_list_does_not_name(tmp_path: Path) -> None:
    """A ``.pt`` added to a checkpoint after it was saved is in no file list: the pickle scan still refuses it,
    in one line naming the file, before anything is loaded."""
    recipe = _recipe(tmp_path, "steps=4")
    path = ck.save_checkpoint(tmp_path / "run", 1, 2, _weightless_parts(1, ParentBuffer(2)), recipe)
    assert ck.check_resumable(path, recipe)["step"] == 1
    torch.save({"x": _Payload()}, path / "state" / "learner" / "extra.pt")
    with pytest.raises(UserError, match=r"extra\.pt: refusing to load it: it references"):
        ck.check_resumable(path, recipe)



def test_check_resumable_refuses_a_listed_file_changed_since_the_save(tmp_path: Path) -> None:
    """The file list is checked before anything loads: a model file one byte longer is one line naming both sizes."""
    recipe = _recipe(tmp_path, "steps=4")
    parts = _weightless_parts(1, ParentBuffer(2))
    parts.learner.export = lambda folder: (folder.mkdir(), (folder / "config.json").write_text("{}"))
    path = ck.save_checkpoint(tmp_path / "run", 1, 2, parts, recipe)
    assert ck.check_resumable(path, recipe)["files"]["model/config.json"]["bytes"] == 2
    (path / "model" / "config.json").write_text("{} ")
    with pytest.raises(UserError, match=r"config\.json: 3 bytes, 2 when saved; the checkpoint is damaged"):
        ck.check_resumable(path, recipe)



def test_check_resumable_refuses_a_loop_state_of_another_step_without_a_file_list(tmp_path: Path) -> None:
    """A checkpoint written before the file list: ``trainer.pt`` holding another step than ``checkpoint.json`` is
    still one line before the trainer is built."""
    recipe = _recipe(tmp_path, "steps=4")
    path = ck.save_checkpoint(tmp_path / "run", 3, 2, _weightless_parts(3, ParentBuffer(2)), recipe)
    meta = json.loads((path / ck.MARKER).read_text())
    del meta["files"]
    (path / ck.MARKER).write_text(json.dumps(meta))
    assert ck.check_resumable(path, recipe)["step"] == 3
    torch.save({"step": 2}, path / "state" / "trainer.pt")
    with pytest.raises(UserError, match=r"trainer\.pt: holds step 2, checkpoint\.json says 3"):
        ck.check_resumable(path, recipe)
