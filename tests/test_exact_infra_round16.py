"""Exact small cases for the learner's infrastructure: which checkpoint ``--resume`` picks and where it continues,
a checkpoint's file list and fsync order, the DeepSpeed config and precision checks, the interrupt watchdog,
timestamped names, the background writer, text-length metrics and the trajectory views (round 16 audit).

Each test pins one value, name, order or refusal that a plausible one-point bug changes; the expected values are
worked out by hand from the documented behaviour (module and function docstrings).
"""
from __future__ import annotations

import json
import signal
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from r3_rl.learner import checkpoint_find as cf
from r3_rl.learner import manifest


def _ckpt(root: Path, name: str, meta: dict | None = None) -> Path:
    p = root / name
    p.mkdir(parents=True)
    (p / cf.MARKER).write_text(json.dumps({"complete": True, "step": 0} if meta is None else meta))
    return p


# ---------------------------------------------------------------------------------------------- which checkpoint
def test_resuming_a_checkpoint_path_in_a_named_run_dir_continues_there(tmp_path: Path) -> None:
    """``--resume PATH --run-dir D``: the checkpoint is PATH's, the run continues in D (not PATH's own run)."""
    ckpt = _ckpt(tmp_path / "a" / "checkpoints", "step_000002", {"complete": True, "step": 2})
    other = tmp_path / "b"
    recipe = SimpleNamespace(out_dir=str(tmp_path), name="x")
    assert cf.find_resume(str(ckpt), recipe, str(other)) == (ckpt, other)
    assert cf.find_resume(str(tmp_path / "a"), recipe, str(other)) == (ckpt, other)
    assert cf.find_resume(str(ckpt), recipe, None) == (ckpt, tmp_path / "a")


def test_a_checkpoint_not_named_after_its_step_branches_at_the_step_it_records(tmp_path: Path) -> None:
    """A copied checkpoint (``best/``) resumed into a run sets aside only the steps after the one its
    ``checkpoint.json`` names; the earlier ones and that step stay."""
    run = tmp_path / "run"
    root = run / "checkpoints"
    for s in (1, 2, 3):
        _ckpt(root, f"step_{s:06d}", {"complete": True, "step": s})
    best = _ckpt(tmp_path, "best", {"complete": True, "step": 2})
    assert cf.set_aside_later(best, run) == [root / "abandoned-step_000003"]
    assert [p.name for p in cf.complete_checkpoints(root)] == ["step_000001", "step_000002"]


def test_resume_auto_in_a_named_run_dir_puts_an_interrupted_swap_back(tmp_path: Path) -> None:
    """``--resume auto --run-dir D`` after a crash between a re-save's two renames: the old copy is renamed back
    and resumed, as ``--resume D`` and a plain ``--resume auto`` do."""
    run = tmp_path / "x-1"
    root = run / "checkpoints"
    _ckpt(root, "step_000001", {"complete": True, "step": 1})
    _ckpt(root, ".old-step_000003-42", {"complete": True, "step": 3})
    recipe = SimpleNamespace(out_dir=str(tmp_path), name="x")
    assert cf.find_resume("auto", recipe, str(run)) == (root / "step_000003", run)
    assert sorted(p.name for p in root.iterdir()) == ["step_000001", "step_000003"]


def test_resume_auto_never_takes_a_run_of_a_recipe_whose_name_only_starts_the_same(tmp_path: Path) -> None:
    """Runs of recipe ``x`` are ``x-<stamp>``: ``xy-<stamp>`` (recipe ``xy``, checkpoints naming no recipe) is not
    one of them, nor is a folder named ``x``."""
    _ckpt(tmp_path / "xy-20260101-000000" / "checkpoints", "step_000004", {"complete": True, "step": 4})
    _ckpt(tmp_path / "x" / "checkpoints", "step_000005", {"complete": True, "step": 5})
    assert cf.find_resume("auto", SimpleNamespace(out_dir=str(tmp_path), name="x"), None) == (None, None)
    mine = tmp_path / "x-20260101-000000"
    ckpt = _ckpt(mine / "checkpoints", "step_000001", {"complete": True, "step": 1})
    assert cf.find_resume("auto", SimpleNamespace(out_dir=str(tmp_path), name="x"), None) == (ckpt, mine)


def test_only_an_exact_set_aside_name_is_put_back(tmp_path: Path) -> None:
    """``.old-step_N-PID`` is the swap's name; a backup ``.old-step_N-PID.bak`` or one without a PID is left alone."""
    root = tmp_path / "checkpoints"
    _ckpt(root, ".old-step_000003-7.bak", {"complete": True, "step": 3})
    _ckpt(root, ".old-step_000004-", {"complete": True, "step": 4})
    assert cf.restore_interrupted_swap(root) == []
    assert sorted(p.name for p in root.iterdir()) == [".old-step_000003-7.bak", ".old-step_000004-"]
    _ckpt(root, ".old-step_000005-12", {"complete": True, "step": 5})
    assert cf.restore_interrupted_swap(root) == [root / "step_000005"]


# ---------------------------------------------------------------------------------------------- file list
def test_a_file_of_exactly_the_hash_limit_is_hashed_and_one_byte_more_is_not(tmp_path: Path,
                                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    import hashlib

    monkeypatch.setattr(manifest, "HASH_MAX_BYTES", 3)
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "a.bin").write_bytes(b"abc")
    (tmp_path / "b.bin").write_bytes(b"abcd")
    assert manifest.file_manifest(tmp_path) == {
        "b.bin": {"bytes": 4, "sha256": None},
        "sub/a.bin": {"bytes": 3, "sha256": hashlib.sha256(b"abc").hexdigest()}}


def test_sync_tree_flushes_files_then_folders_deepest_first_then_the_folder(tmp_path: Path,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """A folder's fsync makes the names in it durable: its children's entries go first, the top folder last."""
    (tmp_path / "a" / "b").mkdir(parents=True)
    (tmp_path / "a" / "b" / "f").write_text("1")
    (tmp_path / "g").write_text("2")
    (tmp_path / "link").symlink_to(tmp_path / "g")
    synced: list[str] = []
    monkeypatch.setattr(manifest, "sync_path", lambda p: synced.append(Path(p).relative_to(tmp_path).as_posix()))
    manifest.sync_tree(tmp_path)
    assert synced == ["a/b/f", "g", "a/b", "a", "."]


# ---------------------------------------------------------------------------------------------- DeepSpeed config
def test_ds_config_takes_learner_deepspeed_dtype_over_the_policys() -> None:
    """``dtype`` is used only when ``learner.deepspeed.dtype`` is left out."""
    from r3_rl.learner.deepspeed_config import ds_config

    def cfg(dtype: str | None, grad_clip: float = 1.0) -> Any:
        return SimpleNamespace(micro_batch_size=2, grad_accum=3, grad_clip=grad_clip,
                               deepspeed=SimpleNamespace(dtype=dtype, zero_stage=1, config={}))

    assert ds_config(cfg("bf16"), 1, "fp32")["bf16"] == {"enabled": True}
    conf = ds_config(cfg("fp32"), 1, "bf16")
    assert conf["bf16"] == {"enabled": False} and "data_types" not in conf
    assert ds_config(cfg(None), 1, "bf16")["bf16"] == {"enabled": True}
    assert ds_config(cfg(None), 2)["train_batch_size"] == 12


def test_ds_config_clips_at_learner_grad_clip_and_zero_means_no_clipping() -> None:
    from r3_rl.learner.deepspeed_config import ds_config

    def cfg(grad_clip: float) -> Any:
        return SimpleNamespace(micro_batch_size=1, grad_accum=1, grad_clip=grad_clip,
                               deepspeed=SimpleNamespace(dtype=None, zero_stage=2, config={}))

    assert ds_config(cfg(0.5))["gradient_clipping"] == 0.5
    assert ds_config(cfg(0.0))["gradient_clipping"] == 0.0

# ---------------------------------------------------------------------------------------------- precision
def test_compute_dtype_counts_elements_not_tensors() -> None:
    """fp32 LoRA-style adapters (two small tensors) on one bf16 weight: 64 bf16 elements against 16 fp32 ones."""
    import torch

    from r3_rl.learner.precision import compute_dtype

    m = torch.nn.Module()
    m.base = torch.nn.Parameter(torch.zeros(8, 8, dtype=torch.bfloat16))
    m.lora_a = torch.nn.Parameter(torch.zeros(1, 8))
    m.lora_b = torch.nn.Parameter(torch.zeros(8, 1))
    m.steps = torch.nn.Parameter(torch.zeros(100, dtype=torch.int64), requires_grad=False)  # not floating point
    assert compute_dtype(m) == torch.bfloat16
    assert compute_dtype(torch.nn.Module()) == torch.float32


# ---------------------------------------------------------------------------------------------- interrupts
def test_the_grace_timer_never_keeps_the_process_alive() -> None:
    """The watchdog's timer is a daemon thread: a clean-up that ended without ``cancel`` must not make the interpreter
    wait ``grace_s`` at exit and then exit 130 anyway."""
    from r3_rl.interrupts import InterruptWatchdog

    dog = InterruptWatchdog(grace_s=60.0, exit_fn=lambda why, code: None)
    with pytest.raises(KeyboardInterrupt):
        dog(signal.SIGINT, None)
    try:
        assert dog.timer is not None and dog.timer.daemon is True and dog.timer.is_alive()
    finally:
        dog.cancel()


def test_cancel_before_any_signal_is_a_no_op() -> None:
    """The CLI's clean-up may end with no signal received: ``cancel`` then has no timer to stop."""
    from r3_rl.interrupts import InterruptWatchdog

    calls: list[Any] = []
    dog = InterruptWatchdog(grace_s=0.01, exit_fn=lambda why, code: calls.append(code))
    dog.cancel()
    assert dog.timer is None and calls == []


def test_install_off_the_main_thread_installs_nothing() -> None:
    import threading

    from r3_rl import interrupts

    got: list[Any] = []
    old = interrupts._installed
    try:
        interrupts._installed = None
        t = threading.Thread(target=lambda: got.append(interrupts.install(grace_s=5)))
        t.start()
        t.join(10)
        assert got == [None] and interrupts._installed is None
    finally:
        interrupts._installed = old


# ---------------------------------------------------------------------------------------------- stamped names
def test_a_dangling_link_takes_its_name(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A symbolic link whose target is gone still holds its name: the next free one is ``-1``."""
    from r3_rl import stamps

    monkeypatch.setattr(stamps.time, "strftime", lambda fmt: "20260101-000000")
    (tmp_path / "x-20260101-000000").symlink_to(tmp_path / "gone")
    assert stamps.stamped_path(tmp_path, "x") == tmp_path / "x-20260101-000000-1"
    assert stamps.stamped_path(tmp_path, "recipe", ".yaml", sep=".") == tmp_path / "recipe.20260101-000000.yaml"
    assert stamps.new_stamped_dir(tmp_path, "x") == tmp_path / "x-20260101-000000-1"
    assert (tmp_path / "x-20260101-000000-1").is_dir()


# ---------------------------------------------------------------------------------------------- background writer
def test_a_writer_closed_once_takes_new_writes() -> None:
    from r3_rl.tracking.background import BackgroundWriter

    done: list[int] = []
    writer = BackgroundWriter()
    writer.submit("one", done.append, 1)
    writer.close()
    writer.submit("two", done.append, 2)
    writer.close()
    assert done == [1, 2]


# ---------------------------------------------------------------------------------------------- views
def test_a_chain_with_branches_shows_its_first_path() -> None:
    """Deterministic: the first path of each tree, chains included (``stage_a_tree`` has three paths)."""
    from test_tracking_metrics import stage_a_tree

    from r3_rl.tracking.views import select_trajectories

    t = stage_a_tree()
    t.meta["kind"] = "chain"
    ((got, path),) = select_trajectories([t], 1)
    assert got is t and [n.id for n in path] == ["p0", "g0"]


def test_a_failed_refinement_of_a_scored_image_is_captioned_without_a_change() -> None:
    """The refined image's reward failed: ``R=failed`` and no ``(+x)`` against the image it refined (no crash)."""
    from r3_rl.tracking.views import image_caption
    from r3_rl.trajectory import Node

    before = Node(id="a", parent=None, stage="generate", round=0, group_id="g", policy_version=0, reward=0.5)
    failed = Node(id="b", parent="a", stage="refine", round=1, group_id="g", policy_version=0,
                  reward_failures={"blocks": "timed out"})
    assert image_caption(failed, before) == "r1 refine R=failed"
    assert image_caption(before, failed) == "r0 generate R=0.50"
