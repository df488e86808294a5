"""Trajectory dumps written off the training loop (:mod:`r3_rl.tracking.background`): the loop is not blocked,
writes keep their order, a failed write is raised (named) and not lost, and a dumped tree cannot change after the
loop has handed it over."""
from __future__ import annotations

import threading
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from conftest import tiny_overrides
from r3_rl.cli import main
from r3_rl.tracking.background import BackgroundWriteError, BackgroundWriter
from r3_rl.trainer import Trainer
from r3_rl.trajectory import Node, PromptItem, Tree, read_trees


def test_submit_returns_while_the_write_runs_on_another_thread() -> None:
    release, started = threading.Event(), threading.Event()
    ran_on: list[str] = []

    def write() -> None:
        ran_on.append(threading.current_thread().name)
        started.set()
        assert release.wait(10)

    writer = BackgroundWriter()
    writer.submit("a", write)  # returns with the write still blocked: the loop goes on
    assert started.wait(10)
    release.set()
    writer.close()
    assert ran_on and ran_on[0] != threading.current_thread().name and ran_on[0].startswith("r3rl-writer")


def test_a_second_write_starts_after_the_first_has_finished() -> None:
    events: list[str] = []
    release = threading.Event()

    def first() -> None:
        assert release.wait(10)
        events.append("first done")

    writer = BackgroundWriter()
    writer.submit("first", first)
    threading.Timer(0.2, release.set).start()
    writer.submit("second", lambda: events.append("second ran"))  # waits for the first: one dump in memory
    events.append("second submitted")
    writer.close()
    assert events == ["first done", "second submitted", "second ran"]


def test_a_failed_write_is_raised_by_the_next_call_with_its_name() -> None:
    def full_disk() -> None:
        raise OSError(28, "No space left on device")

    writer = BackgroundWriter()
    writer.submit("trajectories/step_000020.jsonl", full_disk)
    with pytest.raises(BackgroundWriteError, match=r"writing trajectories/step_000020\.jsonl failed: OSError: .*"
                                                   r"No space left on device"):
        writer.submit("trajectories/step_000040.jsonl", lambda: None)
    writer.submit("next", full_disk)
    with pytest.raises(BackgroundWriteError, match="writing next failed"):
        writer.wait()
    writer.wait()  # reported once
    writer.close()


def test_close_without_raising_reports_the_failure() -> None:
    reported: list[str] = []
    writer = BackgroundWriter()
    writer.submit("step.jsonl", lambda: 1 / 0)
    writer.close(raise_errors=False, on_error=reported.append)
    assert reported == ["writing step.jsonl failed: ZeroDivisionError: division by zero"]
    writer.close()  # twice is fine


def _tree() -> Tree:
    tree = Tree(id="t0", prompt=PromptItem(id="p0", prompt="a photo of a cat", metadata={"tag": "single"}))
    tree.add(Node(id="plan", parent=None, stage="reason", round=0, group_id="g0", policy_version=3, text="a plan"))
    tree.add(Node(id="img", parent="plan", stage="generate", round=0, group_id="g1", policy_version=3,
                  image=np.full((8, 8, 3), 7, np.uint8), reward=0.25, meta={"correct": False}))
    return tree


def test_the_dumped_trees_are_a_copy_the_loop_cannot_change(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The loop goes on while the dump is written; a tree it changes later (a reward, a meta entry) is written as
    it was when the step handed it over, and the images are shared, not copied."""
    from r3_rl import trainer as trainer_module

    release = threading.Event()
    seen: list[list[Tree]] = []
    real_write = trainer_module.write_trees

    def slow_write(trees: list[Tree], path: Path) -> Path:
        assert release.wait(10)
        seen.append(trees)
        return real_write(trees, path)

    monkeypatch.setattr(trainer_module, "write_trees", slow_write)
    tree = _tree()
    fake = SimpleNamespace(recipe=SimpleNamespace(log=SimpleNamespace(dump_trees=64)), run_dir=tmp_path,
                           dumps=BackgroundWriter())
    Trainer._dump(fake, 7, [tree])  # type: ignore[arg-type]
    tree.nodes["img"].reward = 1.0  # the loop changes its own trees meanwhile
    tree.nodes["img"].meta["correct"] = True
    tree.nodes["plan"].text = "changed"
    release.set()
    fake.dumps.close()
    assert seen[0][0].nodes["img"].image is tree.nodes["img"].image
    (back,) = read_trees(tmp_path / "trajectories" / "step_000007.jsonl")
    assert back.nodes["img"].reward == 0.25 and back.nodes["img"].meta == {"correct": False}
    assert back.nodes["plan"].text == "a plan"
    assert np.array_equal(back.nodes["img"].image, np.full((8, 8, 3), 7, np.uint8))


def test_a_dump_that_fails_fails_the_run_naming_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                         repo: Path) -> None:
    """The last step's dump fails while nothing is left to submit: the run's end raises it, as a dump written on
    the loop did, rather than leaving it to the clean-up."""
    from r3_rl import trainer as trainer_module

    real_write = trainer_module.write_trees

    def no_space_at_the_end(trees: list[Tree], path: Path) -> Path:
        if path.name == "step_000001.jsonl":
            raise OSError(28, "No space left on device")
        return real_write(trees, path)

    monkeypatch.setattr(trainer_module, "write_trees", no_space_at_the_end)
    with pytest.raises(BackgroundWriteError, match=r"writing trajectories/step_000001\.jsonl failed: OSError"):
        main(["train", str(repo / "recipes" / "tiny_blocks.yaml")]
             + [a for s in tiny_overrides(tmp_path, steps=2) for a in ("--set", s)])
