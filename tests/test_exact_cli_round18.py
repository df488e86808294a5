"""Exact cases for the command line, its one-line errors and ``r3-rl inspect``'s report (round 18 audit).

Each test pins one behaviour of r3_rl/cli.py, arguments.py, inspect.py, errors.py or config_errors.py that a
plausible one-point bug changed without the older tests noticing: a bound at its exact limit, the sub-command an
error points to, the flag a value is read from, a figure in the report.  Expected values are worked out by hand.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from r3_rl.arguments import OneLineArgumentParser, float_up_to, int_at_least, int_between
from r3_rl.errors import raised, shown
from r3_rl.inspect import printable


# ------------------------------------------------------------------------------------------------ arguments
def test_an_unknown_argument_points_to_the_innermost_of_nested_sub_commands(capsys: pytest.CaptureFixture) -> None:
    """``tool a b --x`` is refused by ``tool a b`` (whose help lists b's options), not by ``tool a``."""
    top = OneLineArgumentParser(prog="tool")
    a = top.add_subparsers(dest="first", required=True).add_parser("a")
    a.add_subparsers(dest="second", required=True).add_parser("b")
    with pytest.raises(SystemExit) as e:
        top.parse_args(["a", "b", "--x"])
    assert e.value.code == 2
    assert capsys.readouterr().err == ("tool a b: error: unrecognized arguments: --x ('tool a b --help' lists the "
                                       "options)\n")


def test_converters_are_named_without_their_article() -> None:
    """argparse names a converter by ``__name__`` in its fallback message: the bound without "a"/"an"."""
    assert int_at_least(1).__name__ == "integer >= 1"
    assert int_between(0, 9).__name__ == "integer from 0 to 9"
    assert float_up_to(2.5).__name__ == "number > 0 and <= 2.5"


# ------------------------------------------------------------------------------------------------ errors
def test_shown_keeps_a_repr_of_exactly_the_limit_whole() -> None:
    """repr('x' * 58) is 60 characters: at the limit it is not cut; at 61 it is cut to 57 + '...' + the length."""
    assert shown("x" * 58) == "'" + "x" * 58 + "'"
    assert shown("x" * 59) == "'" + "x" * 56 + "... (61 characters)"
    assert shown([1, 2, 3], limit=9) == "[1, 2, 3]"
    assert shown([1, 2, 3, 4], limit=9) == "[1, 2,... (12 characters)"


def test_raised_without_a_message_or_a_file_adds_nothing() -> None:
    """Never raised: no frame to name; an empty message: no ': '; a SyntaxError without a file: no '(None:None)'."""
    assert raised(ValueError()) == "ValueError"
    assert raised(SyntaxError("bad")) == "SyntaxError: bad"
    assert raised(SyntaxError("bad", ("p.py", 3, 1, "x ="))) == "SyntaxError: bad (p.py, line 3) (p.py:3)"


# ------------------------------------------------------------------------------------------------ cli flags
def test_flag_defaults_and_inclusive_bounds() -> None:
    """Defaults as --help states them; port 0 (any free port), --step 0 / --limit 0 and the pixel ceiling 2**31
    are valid, --gpus 0 is not."""
    from r3_rl.cli import build_parser

    p = build_parser()
    assert p.parse_args(["rollout", "r.yaml"]).num == 16
    plan = p.parse_args(["plan", "r.yaml"])
    assert (plan.gpus, plan.gpu_memory) == (8, 80.0)
    sr = p.parse_args(["serve-reward", "--reward", "x", "--port", "0", "--max-image-pixels", str(2**31)])
    assert (sr.port, sr.max_image_pixels) == (0, 2**31)
    ins = p.parse_args(["inspect", "RUN", "--step", "0", "--limit", "0"])
    assert (ins.step, ins.limit, ins.html) == (0, 0, None)
    assert p.parse_args(["inspect", "RUN", "--html"]).html == ""
    for argv in (["plan", "r.yaml", "--gpus", "0"],
                 ["serve-reward", "--reward", "x", "--max-image-pixels", str(2**31 + 1)]):
        with pytest.raises(SystemExit) as e:
            p.parse_args(argv)
        assert e.value.code == 2


# ------------------------------------------------------------------------------------------------ cli errors
@pytest.mark.parametrize("command, recipe, message, expected", [
    # a recipe named like a recipe section is still named once
    ("train", "data.yaml", "data.yaml: key 'x': bad", "data.yaml: key 'x': bad"),
    # a message whose head is no recipe key is left alone
    ("train", "r.yaml", "cuda: out of memory", "cuda: out of memory"),
    ("train", "r.yaml", "rewards[0]: no such reward", "r.yaml: rewards[0]: no such reward"),
    # the key must end at the colon: a sentence that merely starts with a dotted word is no "key: ..." message
    ("train", "r.yaml", "learner.deepspeed is not installed: pip install deepspeed",
     "learner.deepspeed is not installed: pip install deepspeed"),
    # only eval's policy.model is its --checkpoint; rollout's is the recipe's key
    ("rollout", "r.yaml", "policy.model: cannot load x", "r.yaml: policy.model: cannot load x"),
    ("eval", "r.yaml", "policy.model: cannot load x (or leave policy.model empty to build the tiny model)",
     "--checkpoint: cannot load x"),
])
def test_in_recipe_names_the_recipe_once_and_only_for_recipe_keys(command: str, recipe: str, message: str,
                                                                  expected: str) -> None:
    from r3_rl.cli import _in_recipe

    assert _in_recipe(message, argparse.Namespace(command=command, recipe=recipe)) == expected


# ------------------------------------------------------------------------------------------------ inspect
def test_printable_strips_delete_and_keeps_the_text_around_it() -> None:
    """DEL (0x7f) is a control character like ESC, U+202E reverses what follows; the characters just outside the
    stripped ranges stay."""
    assert printable("a\x7fb\x1b[2Jc") == "ab[2Jc"
    assert printable("x\u202ay\u202ez") == "xyz"  # the first and last bidi overrides (LRE, RLO)
    assert printable("~\xa0\u202f\u2065\u206a") == "~\xa0\u202f\u2065\u206a"


def test_a_boolean_step_is_no_logged_step(tmp_path: Path) -> None:
    """JSON true is no step number (Python's bool is an int): the row is skipped, not reported as 'last step True'."""
    from r3_rl.inspect import run_overview

    rd = tmp_path / "run"
    rd.mkdir()
    (rd / "metrics.jsonl").write_text('{"step": 0, "learner/loss": 0.5}\n{"step": true, "learner/loss": 0.25}\n')
    assert run_overview(rd).splitlines()[1] == ("  training: 1 steps logged, last step 0: reward A -, acc A -, "
                                                "refine dR -, verdict -, stop rate -")


def test_inspect_strips_control_characters_from_the_whole_report(tmp_path: Path) -> None:
    """A run dir's own name may hold an escape sequence: the report (not only a bare dump's) is printable."""
    from r3_rl.inspect import inspect_run

    rd = tmp_path / "run\x1b[2J"
    rd.mkdir()
    (rd / "metrics.jsonl").write_text('{"step": 0, "learner/loss": 0.5}\n')
    text, _ = inspect_run(rd)
    assert text.splitlines()[0] == f"run {tmp_path}/run[2J" and "\x1b" not in text


def test_a_rollout_run_dir_and_a_bare_dump_honour_limit(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """A dir holding only rollout.jsonl is a run dir (its trees are the run); ``--limit`` holds for a bare dump."""
    from test_tracking_metrics import trees

    from r3_rl.cli import main
    from r3_rl.inspect import inspect_run
    from r3_rl.trajectory import write_trees

    rd = tmp_path / "ro"
    rd.mkdir()
    write_trees(trees(), rd / "rollout.jsonl")
    for target, limit, n in ((rd, 3, 2), (rd / "rollout.jsonl", 1, 1), (rd / "rollout.jsonl", 0, 0)):
        assert main(["inspect", str(target), "--limit", str(limit)]) == 0
        out = capsys.readouterr().out.splitlines()
        assert sum(line.endswith(("(s0-t0-A0)", "(s0-t1-BC0)")) for line in out) == n, (target, limit)
    assert "rollout: " + str(rd / "rollout.jsonl") in inspect_run(rd)[0]


def test_a_long_critiques_edit_instruction_is_cut_to_200_characters() -> None:
    """After a critique cut off at 200 characters its edit instruction follows on one line of at most 200."""
    from r3_rl.inspect import trajectory_text
    from r3_rl.trajectory import Node, PromptItem, Tree

    t = Tree(id="t", prompt=PromptItem("p", "a cat", {}), meta={"kind": "chain"})
    t.add(Node(id="c", parent=None, stage="reflect", round=1, group_id="g", policy_version=0, text="y" * 201,
               edit_instruction="e\n" + "f" * 250))
    lines = trajectory_text(t, [t.nodes["c"]]).splitlines()
    assert lines[1:] == ["    [critique 1] " + "y" * 200 + "...", "      -> e " + "f" * 198]


def test_an_unreadable_correct_threshold_falls_back_to_1(tmp_path: Path) -> None:
    """recipe.yaml's rewards.correct_threshold 'abc' is no number: the dump is judged at 1.0, not a traceback."""
    from test_tracking_metrics import trees

    from r3_rl.inspect import inspect_run
    from r3_rl.trajectory import write_trees

    rd = tmp_path / "run"
    rd.mkdir()
    (rd / "recipe.yaml").write_text("name: demo\nrewards: {correct_threshold: abc}\n")
    write_trees(trees(), rd / "trajectories" / "step_000000.jsonl")
    assert "  accuracy round 0 0.500, round 1 0.333\n" in inspect_run(rd)[0]


def test_the_run_dir_flag_is_checked_before_any_work(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """``--run-dir`` under a file is refused by the up-front check, naming the flag (not out_dir, not mkdir's)."""
    from conftest import cli_one_line_error

    import r3_rl

    tiny = Path(r3_rl.__file__).resolve().parents[1] / "recipes" / "tiny_blocks.yaml"
    blocker = tmp_path / "f"
    blocker.write_text("x")
    err = cli_one_line_error(["rollout", str(tiny), "--set", f"out_dir={tmp_path / 'runs'}", "--run-dir",
                              str(blocker / "sub")], capsys)
    assert err == f"r3-rl: error: --run-dir {blocker / 'sub'}: {blocker} is not a directory"
