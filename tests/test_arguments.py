"""Command-line flags: a bad value is one line naming the flag and what is valid, exit 2, before any work.

Covers ``r3_rl.arguments`` (the parser class and the checked ``type=`` converters), ``r3-rl`` (which uses
them) and every script under ``benchmarks/`` (a static scan: no bare ``int``/``float`` flag, no plain
``ArgumentParser``; and three scripts run with a bad size, which until session 32 ended in a traceback).
"""
from __future__ import annotations

import argparse
import ast
import subprocess
import sys
from pathlib import Path

import pytest

from r3_rl.arguments import (
    OneLineArgumentParser,
    float_up_to,
    int_at_least,
    int_between,
    non_negative_float,
    positive_float,
)
from r3_rl.cli import main

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("text, low, value", [("3", 1, 3), ("1", 1, 1), ("0", 0, 0), ("-2", -5, -2)])
def test_int_at_least_accepts(text: str, low: int, value: int) -> None:
    assert int_at_least(low)(text) == value


@pytest.mark.parametrize("text, low", [("0", 1), ("-3", 0), ("1.5", 1), ("x", 1), ("", 0)])
def test_int_at_least_refuses(text: str, low: int) -> None:
    with pytest.raises(argparse.ArgumentTypeError, match=f"must be an integer >= {low}, got {text!r}"):
        int_at_least(low)(text)


def test_floats() -> None:
    assert positive_float("2.5") == 2.5 and positive_float("1e-3") == 1e-3
    assert non_negative_float("0") == 0.0 and non_negative_float("7") == 7.0
    for bad in ("0", "-1", "nan", "inf", "-inf", "x"):
        with pytest.raises(argparse.ArgumentTypeError, match="must be a finite number > 0"):
            positive_float(bad)
    for bad in ("-0.5", "nan", "inf", "x"):
        with pytest.raises(argparse.ArgumentTypeError, match="must be a finite number >= 0"):
            non_negative_float(bad)


def test_int_between() -> None:
    port = int_between(0, 65535)
    assert port("0") == 0 and port("65535") == 65535 and port("8765") == 8765
    for bad in ("-1", "65536", "1e3", "x", ""):
        with pytest.raises(argparse.ArgumentTypeError, match=f"must be an integer from 0 to 65535, got {bad!r}"):
            port(bad)


def test_float_up_to() -> None:
    size = float_up_to(float(1 << 20))
    assert size("64") == 64.0 and size("0.5") == 0.5 and size("1048576") == 1048576.0
    for bad in ("0", "-1", "1048577", "1e300", "inf", "nan", "x"):
        # the ceiling printed as written, not as 1.04858e+06
        with pytest.raises(argparse.ArgumentTypeError, match=f"must be a number > 0 and <= 1048576, got {bad!r}"):
            size(bad)
    with pytest.raises(argparse.ArgumentTypeError, match="<= 0.5, got '0.6'"):
        float_up_to(0.5)("0.6")


def test_parser_error_is_one_line_exit_2_and_sub_commands_inherit(capsys: pytest.CaptureFixture) -> None:
    parser = OneLineArgumentParser(prog="tool")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run")
    run.add_argument("--size", type=int_at_least(1), default=4)
    assert parser.parse_args(["run", "--size", "8"]).size == 8
    for argv, names in ((["run", "--size", "0"], "tool run: error: argument --size: must be an integer >= 1, got '0'"),
                        (["walk"], "tool: error: argument command: invalid choice: 'walk'"),
                        # the sub-command's help lists --colour's neighbours; the top's lists only "run" (session 53)
                        (["run", "--colour", "red"], "tool run: error: unrecognized arguments: --colour red ('tool run "
                         "--help' lists the options)")):
        with pytest.raises(SystemExit) as e:
            parser.parse_args(argv)
        assert e.value.code == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith(names) and "--help' lists the options" in err, err


@pytest.mark.parametrize("argv, names", [
    (["inspect", "RUN", "--step", "-3"], "r3-rl inspect: error: argument --step: must be an integer >= 0, got '-3'"),
    (["train"], "r3-rl train: error: the following arguments are required: recipe"),
    (["rollout", "recipes/tiny_blocks.yaml", "--out", "x"],
     "r3-rl rollout: error: unrecognized arguments: --out x ('r3-rl rollout --help' lists the options)"),
    (["rewards", "extra"], "r3-rl rewards: error: unrecognized arguments: extra ('r3-rl rewards --help' lists"),
    (["trian", "recipes/tiny_blocks.yaml"], "r3-rl: error: argument command: invalid choice: 'trian'"),
    # until session 33 these were checked after parsing (--gpu-memory inf and --gpus 10**12 were planned as fitting)
    (["inspect", "RUN", "--limit", "-1"], "r3-rl inspect: error: argument --limit: must be an integer >= 0, got '-1'"),
    (["rollout", "recipes/tiny_blocks.yaml", "--num", "0"],
     "r3-rl rollout: error: argument --num: must be an integer from 1 to 100000, got '0'"),
    (["plan", "recipes/grpo_geneval.yaml", "--gpus", "1000000000000"],
     "r3-rl plan: error: argument --gpus: must be an integer from 1 to 4096, got '1000000000000'"),
    (["plan", "recipes/grpo_geneval.yaml", "--gpu-memory", "inf"],
     "r3-rl plan: error: argument --gpu-memory: must be a number > 0 and <= 4096, got 'inf'"),
    (["serve-reward", "--reward", "blocks", "--port", "65536"],
     "r3-rl serve-reward: error: argument --port: must be an integer from 0 to 65535, got '65536'"),
    (["serve-reward", "--reward", "blocks", "--max-request-mb", "1e300"],
     "r3-rl serve-reward: error: argument --max-request-mb: must be a number > 0 and <= 1048576, got '1e300'"),
    (["serve-reward", "--reward", "blocks", "--max-images", "0"],
     "r3-rl serve-reward: error: argument --max-images: must be an integer from 1 to 1048576, got '0'"),
    (["serve-reward", "--reward", "blocks", "--client-timeout", "-5"],
     "r3-rl serve-reward: error: argument --client-timeout: must be a number > 0 and <= 86400, got '-5'"),
])
def test_r3_rl_flag_errors_are_one_line(argv: list[str], names: str, tmp_path: Path,
                                        capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as e:
        main([str(tmp_path) if a == "RUN" else a for a in argv])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(names), err  # no usage block before it


def _flag_types(path: Path) -> tuple[list[str], list[tuple[str, str]]]:
    """The parser classes a script constructs, and (flag, type expression) for each typed ``add_argument``."""
    tree = ast.parse(path.read_text(), filename=str(path))
    parsers, typed = [], []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        name = ast.unparse(node.func)
        if name.endswith("ArgumentParser"):
            parsers.append(name)
        if name.endswith(".add_argument"):
            for kw in node.keywords:
                if kw.arg == "type":
                    flag = ast.literal_eval(node.args[0]) if node.args else "?"
                    typed.append((flag, ast.unparse(kw.value)))
    return parsers, typed


@pytest.mark.parametrize("script", sorted(p.name for p in (REPO / "benchmarks").glob("*.py")))
def test_every_benchmark_checks_its_flags(script: str) -> None:
    parsers, typed = _flag_types(REPO / "benchmarks" / script)
    assert all(p == "OneLineArgumentParser" for p in parsers), f"{script}: {parsers}"
    unchecked = [(flag, t) for flag, t in typed if t in ("int", "float")]
    assert not unchecked, f"{script}: flags without a checked type (a bad value would end in a traceback): {unchecked}"


def test_r3_rl_checks_its_flags() -> None:
    """The command line itself: every numeric flag has a checked type (until session 33 six were bare)."""
    parsers, typed = _flag_types(REPO / "r3_rl" / "cli.py")
    assert parsers == ["OneLineArgumentParser"]
    assert len(typed) >= 11  # --num, --step, --limit, --gpus, --gpu-memory, --port and the server's limits
    assert not [(flag, t) for flag, t in typed if t in ("int", "float")], typed


def test_the_scan_sees_flags() -> None:
    """The scan above would pass vacuously on a script it cannot read: it sees r3_synergy's flags."""
    parsers, typed = _flag_types(REPO / "benchmarks" / "r3_synergy.py")
    assert parsers == ["OneLineArgumentParser"]
    assert ("--parallel", "int_at_least(1)") in typed and ("--seeds", "int_at_least(0)") in typed


@pytest.mark.parametrize("script, argv, names", [
    ("learner_step.py", ["--hidden", "0"], "argument --hidden: must be an integer >= 1, got '0'"),
    ("flow_sampler.py", ["--points", "-4"], "argument --points: must be an integer >= 1, got '-4'"),
    ("janus_sampling.py", ["--cfg", "nan"], "argument --cfg: must be a finite number >= 0, got 'nan'"),
])
def test_benchmark_bad_size_is_one_line_exit_2(script: str, argv: list[str], names: str) -> None:
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / script), *argv], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"{script}: error: {names}"), proc.stderr
