"""Exact small cases for the ``r3-rl`` command line (flags, exit codes, what each subcommand hands on) and for the
readers of user files and run folders (``textfiles``, ``jsonl``, ``run_dir``, ``stamps``) -- each one a bug a
mutation audit (round 13A audit) slipped past the suite, or a real bug it found.  Expected values are worked out
by hand (byte counts, names, exit codes)."""
from __future__ import annotations

import gzip
from pathlib import Path
from typing import ClassVar

import pytest
from conftest import cli_one_line_error

from r3_rl.errors import UserError

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "recipes" / "tiny_blocks.yaml"


def _corrupt_gzip(path: Path) -> bytes:
    """A gzip file whose header is sound and whose deflate stream is not: zlib refuses it mid-read."""
    good = gzip.compress(b'{"prompt": "a red square"}\n' * 40)
    bad = bytearray(good)
    bad[10] ^= 0xFF  # the first byte after the 10-byte header: the deflate block header
    path.write_bytes(bytes(bad))
    return bytes(bad)


# ------------------------------------------------------------------------------------------------ textfiles / jsonl
def test_a_jsonl_gz_with_a_corrupt_deflate_stream_is_one_line(tmp_path: Path) -> None:
    """A real bug: ``zlib.error`` (a damaged block, not a bad header or a short file) escaped as a traceback."""
    from r3_rl.jsonl import read_jsonl_objects

    p = tmp_path / "p.jsonl.gz"
    _corrupt_gzip(p)
    with pytest.raises(UserError) as e:
        list(read_jsonl_objects(p))
    assert str(e.value).startswith(f"{p}: not a valid gzip file (")


def test_a_gz_recipe_that_is_not_gzip_is_a_one_line_error(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """A real bug: a recipe named ``*.gz`` is read through gzip, and a bad one was a ``BadGzipFile`` traceback."""
    p = tmp_path / "r.yaml.gz"
    p.write_bytes(b"steps: 2\n")
    err = cli_one_line_error(["plan", str(p)], capsys)
    assert err.startswith(f"r3-rl: error: {p}: not a valid gzip file (")
    _corrupt_gzip(p)
    err = cli_one_line_error(["plan", str(p)], capsys)
    assert err.startswith(f"r3-rl: error: {p}: not a valid gzip file (")



def test_jsonl_a_huge_number_is_named_with_its_reason_cut_at_80_characters(tmp_path: Path) -> None:
    """Catches the reason cut much shorter (``Exceeds ``): the limit and the digit count are what say why."""
    from r3_rl.jsonl import read_jsonl_objects

    p = tmp_path / "n.jsonl"
    p.write_text('{"a": 1}\n{"a": ' + "7" * 5000 + "}\n")
    with pytest.raises(UserError) as e:
        list(read_jsonl_objects(p))
    assert str(e.value) == (f"{p}:2: not valid JSON (ValueError: Exceeds the limit (4300 digits) for integer string "
                            f"conversion: value has 5000 di)")


# ------------------------------------------------------------------------------------------------ run_dir / stamps
def _tiny_recipe(out_dir: Path):
    from r3_rl.config import load_recipe

    return load_recipe(TINY, [f"out_dir={out_dir}"])


def test_a_new_run_dir_is_named_by_the_second_in_a_nested_new_out_dir(tmp_path: Path) -> None:
    """Catches the stamp cut to minutes (two runs a minute apart would be -1 of each other) and an ``out_dir``
    two levels deep not made."""
    import re
    import time

    from r3_rl.run_dir import make_run_dir

    before = time.strftime("%Y%m%d-%H%M%S")
    got = make_run_dir(_tiny_recipe(tmp_path / "a" / "b"))
    after = time.strftime("%Y%m%d-%H%M%S")
    assert got.parent == tmp_path / "a" / "b" and re.fullmatch(r"tiny_blocks-\d{8}-\d{6}", got.name), got.name
    assert before <= got.name.removeprefix("tiny_blocks-") <= after


def test_a_given_run_dir_two_levels_deep_is_made_and_an_empty_one_means_none(tmp_path: Path,
                                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """Catches ``--run-dir a/b`` not made with its parents, and ``--run-dir ''`` taken as the current folder."""
    from r3_rl.run_dir import make_run_dir

    deep = tmp_path / "x" / "y"
    assert make_run_dir(_tiny_recipe(tmp_path / "runs"), str(deep)) == deep
    assert sorted(p.name for p in deep.iterdir()) == ["recipe.yaml"]
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    got = make_run_dir(_tiny_recipe(tmp_path / "runs"), "")
    assert got.parent == tmp_path / "runs" and list(cwd.iterdir()) == []


def test_a_link_deep_in_a_run_dir_is_named_by_its_path_inside_it(tmp_path: Path) -> None:
    """Catches the refusal naming only the link's own name (``x.png``), not where it is in the run dir."""
    from r3_rl.run_dir import make_run_dir

    run = tmp_path / "run"
    (run / "trajectories" / "step_1").mkdir(parents=True)
    (run / "trajectories" / "step_1" / "x.png").symlink_to(tmp_path / "elsewhere.png")
    with pytest.raises(UserError) as e:
        make_run_dir(_tiny_recipe(tmp_path), str(run))
    assert str(e.value) == (f"run dir {run}: trajectories/step_1/x.png is a symbolic link; the run would write "
                            f"through it (replace it with a real file or folder)")


@pytest.mark.timeout(30)
def test_a_fifo_planted_in_a_run_dir_is_refused_not_waited_on(tmp_path: Path) -> None:
    """A FIFO named ``recipe.yaml`` in an existing ``--run-dir``: writing the recipe blocked for ever."""
    import os

    from r3_rl.run_dir import make_run_dir

    run = tmp_path / "run"
    run.mkdir()
    os.mkfifo(run / "recipe.yaml")
    with pytest.raises(UserError) as e:
        make_run_dir(_tiny_recipe(tmp_path), str(run))
    assert str(e.value) == (f"run dir {run}: recipe.yaml is not a regular file or folder (a FIFO, socket or "
                            f"device); the run would block or write into it (remove it)")


def test_a_run_dirs_recipe_that_is_not_utf8_is_kept_aside_not_a_traceback(tmp_path: Path) -> None:
    """``recipe.yaml`` holding bytes that are not UTF-8 raised UnicodeDecodeError out of the comparison."""
    from r3_rl.run_dir import make_run_dir

    run = tmp_path / "run"
    run.mkdir()
    (run / "recipe.yaml").write_bytes(b"name: x\nseed: \xff\n")
    assert make_run_dir(_tiny_recipe(tmp_path), str(run)) == run
    kept = [p for p in run.iterdir() if p.name != "recipe.yaml"]
    assert len(kept) == 1 and kept[0].name.startswith("recipe.") and kept[0].read_bytes() == b"name: x\nseed: \xff\n"


def test_a_dangling_link_holds_its_stamped_name(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Catches ``exists()`` alone (False for a link to nothing): the name would be handed out and a rename or a
    ``mkdir`` would go through the link, or ``mkdir`` fail on it for ever."""
    from r3_rl import stamps

    monkeypatch.setattr(stamps.time, "strftime", lambda fmt: "20260101-000000")
    (tmp_path / "recipe.20260101-000000.yaml").symlink_to(tmp_path / "nowhere")
    assert stamps.stamped_path(tmp_path, "recipe", ".yaml", sep=".") == tmp_path / "recipe.20260101-000000-1.yaml"
    (tmp_path / "r-20260101-000000").symlink_to(tmp_path / "nowhere2")
    assert stamps.stamped_path(tmp_path, "r") == tmp_path / "r-20260101-000000-1"

# ------------------------------------------------------------------------------------------------ cli.py: serve-reward
def test_serve_reward_hands_every_flag_to_the_server_in_bytes_and_seconds(monkeypatch: pytest.MonkeyPatch) -> None:
    """Catches a MiB converted as 10^6 bytes, the in-flight cap taken from the request flag, two count flags
    swapped, or the client timeout / options / verbose flag dropped on the way to ``serve``."""
    from r3_rl.cli import main
    from r3_rl.rewards import server

    got: dict = {}
    monkeypatch.setattr(server, "serve", lambda reward, **kw: got.update(reward=reward, **kw))
    assert main(["serve-reward", "--reward", "format", "--port", "0", "--host", "0.0.0.0", "--option", "k=3",
                 "--max-request-mb", "1.5", "--max-inflight-mb", "3", "--max-images", "5",
                 "--max-image-pixels", "77", "--max-concurrency", "6", "--client-timeout", "2.5", "--verbose"]) == 0
    lim = got.pop("limits")
    assert got == {"reward": "format", "host": "0.0.0.0", "port": 0, "options": {"k": 3}, "verbose": True}
    assert (lim.max_request_bytes, lim.max_inflight_bytes) == (1572864, 3145728)  # 1.5 x 2^20, 3 x 2^20
    assert (lim.max_images, lim.max_image_pixels, lim.max_concurrency, lim.client_timeout) == (5, 77, 6, 2.5)
    main(["serve-reward", "--reward", "format"])
    lim = got["limits"]
    assert (got["port"], got["host"], got["options"], got["verbose"]) == (8765, "127.0.0.1", {}, False)
    assert (lim.max_request_bytes, lim.max_inflight_bytes, lim.max_images, lim.max_image_pixels,
            lim.max_concurrency, lim.client_timeout) == (64 << 20, 256 << 20, 64, 1 << 20, 64, 30.0)


# ------------------------------------------------------------------------------------------------ cli.py: train
class _FakeTrainer:
    """Stands in for ``Trainer``: records what ``train`` hands it; ``fail`` / ``writes`` make its constructor refuse."""
    log: ClassVar[list] = []
    fail = False
    writes: str | None = None

    def __init__(self, recipe, run_dir: Path) -> None:
        if self.writes:
            (run_dir / self.writes).write_text("x")
        if self.fail:
            raise UserError("reward server is down")
        self.run_dir = run_dir
        self.log.append(("init", run_dir))

    def resume(self, ckpt, checked) -> None:
        self.log.append(("resume", ckpt, checked))

    def train(self) -> dict:
        return {"steps": 2, "ok": True}


@pytest.fixture
def fake_trainer(monkeypatch: pytest.MonkeyPatch) -> type[_FakeTrainer]:
    from r3_rl import trainer

    class T(_FakeTrainer):
        log: ClassVar[list] = []
    monkeypatch.setattr(trainer, "Trainer", T)
    return T


def test_train_writes_the_summary_in_its_new_run_dir(tmp_path: Path, fake_trainer, capsys) -> None:
    """Catches the summary dropped or written elsewhere, and the run dir named without the recipe's name."""
    from r3_rl.cli import main

    assert main(["train", str(TINY), "--set", f"out_dir={tmp_path}"]) == 0
    (run,) = tmp_path.iterdir()
    assert run.name.startswith("tiny_blocks-2") and fake_trainer.log == [("init", run)]
    assert (run / "summary.json").read_text() == '{\n  "steps": 2,\n  "ok": true\n}'
    assert sorted(p.name for p in run.iterdir()) == ["recipe.yaml", "summary.json"]


def test_a_run_dir_made_for_nothing_is_removed_but_a_given_or_used_one_is_kept(tmp_path: Path, fake_trainer,
                                                                               capsys) -> None:
    """Catches the clean-up after a refused start removing an existing ``--run-dir`` (a resumed run's) or a run
    dir the trainer already wrote into, or not removing a fresh one."""
    fake_trainer.fail = True
    sets = ["--set", f"out_dir={tmp_path / 'runs'}"]
    assert cli_one_line_error(["train", str(TINY), *sets], capsys) == "r3-rl: error: reward server is down"
    assert list((tmp_path / "runs").iterdir()) == []
    new = tmp_path / "new"
    assert cli_one_line_error(["train", str(TINY), *sets, "--run-dir", str(new)], capsys).endswith("is down")
    assert not new.exists()
    old = tmp_path / "old"
    old.mkdir()
    assert cli_one_line_error(["train", str(TINY), *sets, "--run-dir", str(old)], capsys).endswith("is down")
    assert sorted(p.name for p in old.iterdir()) == ["recipe.yaml"]
    fake_trainer.writes = "events.log"
    assert cli_one_line_error(["train", str(TINY), *sets, "--run-dir", str(new)], capsys).endswith("is down")
    assert sorted(p.name for p in new.iterdir()) == ["events.log", "recipe.yaml"]


def test_resume_checks_auto_and_a_path_differently_and_reads_the_baseline(tmp_path: Path, fake_trainer,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """Catches ``--resume auto`` and ``--resume PATH`` swapped (auto must fall back past a damaged checkpoint,
    a PATH must not), the baseline eval report not read first, or the checkpoint not handed to the trainer."""
    from r3_rl.cli import main
    from r3_rl.eval import evaluate
    from r3_rl.learner import checkpoint

    run = tmp_path / "run"
    ckpt = run / "checkpoints" / "step_000002"
    calls: list = []
    monkeypatch.setattr(checkpoint, "find_resume", lambda where, recipe, rd: (calls.append(("find", where, rd))
                                                                              or (ckpt, run)))
    monkeypatch.setattr(checkpoint, "newest_sound", lambda c, recipe, warn: (calls.append(("sound", c))
                                                                             or (c, {"by": "sound"})))
    monkeypatch.setattr(checkpoint, "check_resumable", lambda c, recipe: (calls.append(("check", c))
                                                                          or {"by": "check"}))
    monkeypatch.setattr(evaluate, "read_report", lambda folder, name: calls.append(("report", folder, name)))
    sets = ["--set", f"out_dir={tmp_path / 'runs'}"]
    assert main(["train", str(TINY), *sets, "--resume", "auto"]) == 0
    assert calls == [("find", "auto", None), ("sound", ckpt), ("report", run / "eval", "before")]
    assert fake_trainer.log == [("init", run), ("resume", ckpt, {"by": "sound"})]
    calls.clear()
    fake_trainer.log.clear()
    assert main(["train", str(TINY), *sets, "--resume", str(ckpt)]) == 0
    assert calls == [("find", str(ckpt), None), ("check", ckpt), ("report", run / "eval", "before")]
    assert fake_trainer.log == [("init", run), ("resume", ckpt, {"by": "check"})]
    assert (run / "summary.json").is_file() and not (tmp_path / "runs").exists()


# ------------------------------------------------------------------------------------------------ cli.py: rollout
def test_rollout_samples_num_prompts_into_a_run_dir_named_for_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                capsys: pytest.CaptureFixture) -> None:
    """Catches ``--num`` ignored (the default 16 sampled), the ``-rollout`` suffix dropped from the run's name, the
    eval settings not handed to the chains, or the parts left open."""
    from types import SimpleNamespace

    from r3_rl import cli, trajectory
    from r3_rl.eval import evaluate
    from r3_rl.rollout import chain

    seen: dict = {}

    class Data:
        def next_batch(self, n: int) -> list:
            seen["n"] = n
            return ["p"] * n

    def parts(recipe, run_dir, command):
        seen.update(name=recipe.name, run_dir=run_dir, command=command)
        return tmp_path, SimpleNamespace(policy="policy", eval_rewards="rw", close=lambda: seen.update(closed=1)), Data()

    def chains(policy, prompts, sampling, rounds, stop, seed, batch_size, tag):
        seen.update(prompts=len(prompts), rounds=rounds, seed=seed, batch_size=batch_size, tag=tag)
        return ["t1", "t2"]
    monkeypatch.setattr(cli, "_sampling_parts", parts)
    monkeypatch.setattr(chain, "r3_chains", chains)
    monkeypatch.setattr(evaluate, "score_chains", lambda trees, rounds, rw, thr: seen.update(scored=(trees, rw)))
    monkeypatch.setattr(trajectory, "write_trees", lambda trees, path: path)
    run = str(tmp_path / "r")
    assert cli.main(["rollout", str(TINY), "--num", "3", "--run-dir", run, "--set", f"out_dir={tmp_path}",
                     "--set", "seed=7", "--set", "eval.rounds=2", "--set", "eval.batch_size=5"]) == 0
    assert seen == {"name": "tiny_blocks-rollout", "run_dir": run, "command": "rollout", "n": 3, "prompts": 3,
                    "rounds": 2, "seed": 7, "batch_size": 5, "tag": "rollout", "scored": (["t1", "t2"], "rw"),
                    "closed": 1}
    assert capsys.readouterr().out == f"wrote 2 trajectories to {tmp_path / 'rollout.jsonl'}\n"


# ------------------------------------------------------------------------------------------------ cli.py: inspect
def test_inspect_hands_its_flags_on_and_a_bare_html_means_the_default_page(monkeypatch: pytest.MonkeyPatch,
                                                                          capsys: pytest.CaptureFixture) -> None:
    """Catches ``--html`` alone turned into None (no page), ``--step 0`` refused, or a flag not handed on."""
    from r3_rl import inspect
    from r3_rl.cli import main

    got: list = []
    monkeypatch.setattr(inspect, "inspect_run", lambda run_dir, **kw: (got.append((run_dir, kw)) or ("TEXT", None)))
    assert main(["inspect", "RUN"]) == 0
    assert main(["inspect", "RUN", "--html", "--step", "0", "--limit", "0"]) == 0
    assert main(["inspect", "RUN", "--html", "p.html", "--eval", "before"]) == 0
    assert got == [("RUN", {"step": None, "eval_name": None, "html": None, "limit": 3}),
                   ("RUN", {"step": 0, "eval_name": None, "html": "", "limit": 0}),
                   ("RUN", {"step": None, "eval_name": "before", "html": "p.html", "limit": 3})]
    assert capsys.readouterr().out == "TEXT\nTEXT\nTEXT\n"


# ------------------------------------------------------------------------------------------------ cli.py: main
@pytest.mark.parametrize("exc, code, line", [(KeyboardInterrupt(), 130, "r3-rl: interrupted"),
                                             ("terminated", 143, "r3-rl: terminated (SIGTERM)"),
                                             (UserError("no such thing"), 2, "r3-rl: error: no such thing")])
def test_main_turns_a_stop_into_its_exit_code_and_one_line_on_stderr(exc, code: int, line: str,
                                                                      monkeypatch: pytest.MonkeyPatch,
                                                                      capsys: pytest.CaptureFixture) -> None:
    """Catches SIGTERM reported (and exited) as Ctrl-C, or the one line printed on stdout."""
    from r3_rl import cli
    from r3_rl.interrupts import Terminated

    err = Terminated() if exc == "terminated" else exc

    def stop(args):
        raise err
    monkeypatch.setitem(cli.COMMANDS, "rewards", stop)
    assert cli.main(["rewards"]) == code
    out = capsys.readouterr()
    assert (out.out, out.err) == ("", line + "\n")


def test_doctor_exit_code_is_the_doctors(monkeypatch: pytest.MonkeyPatch) -> None:
    """Catches ``doctor``'s verdict (1 = a check failed) replaced by 0, or its recipe / ``--set`` not handed on."""
    import r3_rl.doctor as doctor_module
    from r3_rl.cli import main

    got: list = []
    monkeypatch.setattr(doctor_module, "doctor", lambda recipe, sets: got.append((recipe, sets)) or 1)
    assert main(["doctor", "r.yaml", "--set", "a=1", "--set", "b=2"]) == 1
    assert got == [("r.yaml", ["a=1", "b=2"])]


def test_eval_loads_the_checkpoint_as_the_policy_and_names_its_run_dir_for_it(tmp_path: Path,
                                                                             monkeypatch: pytest.MonkeyPatch,
                                                                             capsys: pytest.CaptureFixture) -> None:
    """Catches ``--checkpoint`` not put in ``policy.model``, a file accepted as a checkpoint folder, or the
    ``-eval`` suffix dropped from the run's name."""
    from r3_rl import cli
    from r3_rl.config import load_recipe

    seen: list = []

    def recipe(args, model=None):
        seen.append(model)
        return load_recipe(TINY, [f"out_dir={tmp_path}"])

    def parts(recipe, run_dir, command):
        seen.append((recipe.name, run_dir, command))
        raise UserError("stop here")
    monkeypatch.setattr(cli, "_recipe", recipe)
    monkeypatch.setattr(cli, "_sampling_parts", parts)
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    assert cli_one_line_error(["eval", str(TINY), "--checkpoint", str(ckpt)], capsys) == "r3-rl: error: stop here"
    assert seen == [str(ckpt), ("tiny_blocks-eval", None, "eval")]
    (tmp_path / "file").write_text("")
    err = cli_one_line_error(["eval", str(TINY), "--checkpoint", str(tmp_path / "file")], capsys)
    assert err == f"r3-rl: error: --checkpoint {tmp_path / 'file'}: no such directory" and len(seen) == 2


# ------------------------------------------------------------------------------------------------ cli.py: data
def test_data_lists_all_tags_of_one_named_set_and_says_more_only_when_some_are_left_out(
        capsys: pytest.CaptureFixture) -> None:
    """Catches ``+0 more`` printed for a set of 6 tags, a named set cut to 8 tags, or a name matched as a
    substring (``tiif`` is not a set)."""
    from r3_rl.cli import main

    assert main(["data"]) == 0
    tag_lines = [line for line in capsys.readouterr().out.splitlines() if " tags: " in line]
    assert len(tag_lines) == 6 and sum("more (r3-rl data" in line for line in tag_lines) == 2  # the two tiif sets
    assert tag_lines[2] == (" " * 17 + "6 tags: position 100, color_attr 100, two_object 99, colors 94, "
                            "single_object 80, counting 80")
    assert main(["data", "tiif:test"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("tiif:test           277 prompts  format ")
    assert lines[1].startswith(" " * 17 + "39 tags: style 30, text 30, real_world 25, ")
    assert lines[1].count(", ") == 38 and "more" not in lines[1]
    assert main(["data", "tiif"]) == 2
    assert capsys.readouterr().out == ""


def test_only_the_real_train_process_installs_the_interrupt_handlers(tmp_path: Path, fake_trainer,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """Catches the ``argv is None`` test inverted: handlers installed in a caller's process, none in the CLI's."""
    import sys

    from r3_rl import interrupts
    from r3_rl.cli import main

    installed: list = []
    monkeypatch.setattr(interrupts, "install", lambda: installed.append(1))
    args = ["train", str(TINY), "--set", f"out_dir={tmp_path}"]
    assert main(args) == 0 and installed == []
    monkeypatch.setattr(sys, "argv", ["r3-rl", *args])
    assert main() == 0 and installed == [1]
    monkeypatch.setattr(sys, "argv", ["r3-rl", "rewards"])
    assert main() == 0 and installed == [1]


def test_sampling_parts_set_torch_threads_only_when_the_recipe_names_a_count(tmp_path: Path) -> None:
    """Catches the ``threads`` test inverted: 0 (torch's default) handed to ``set_num_threads``, 2 ignored."""
    import torch

    from r3_rl import cli
    from r3_rl.config import load_recipe

    before = torch.get_num_threads()
    try:
        for threads, want in ((0, before), (2, 2)):
            recipe = load_recipe(TINY, [f"out_dir={tmp_path}", f"threads={threads}"])
            out, parts, _ = cli._sampling_parts(recipe, str(tmp_path / f"r{threads}"), "rollout")
            parts.close()
            assert out == tmp_path / f"r{threads}" and torch.get_num_threads() == want
    finally:
        torch.set_num_threads(before)
