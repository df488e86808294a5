"""environment.json: what a run's numbers hang on besides the recipe, and a resume elsewhere named as an event."""
from __future__ import annotations

import json
from importlib import metadata
from pathlib import Path
from types import SimpleNamespace

import torch

from r3_rl.environment import (ENVIRONMENT_FILE, MAX_FILE_BYTES, MAX_RECORDS, describe_environment, differences,
                               read_records, record_environment, summary_line)
from r3_rl.inspect import run_overview
from r3_rl.trainer import Trainer


def fake_env(**changes: object) -> dict:
    env = {"r3_rl": {"version": "0.1.0", "commit": "0123456789abcdef", "uncommitted_changes": False},
           "python": "3.11.7", "platform": "Linux", "cpu": "AMD EPYC", "cpu_capability": "AVX2", "torch_threads": 1,
           "gpus": [], "cuda": None, "packages": {"torch": "2.13.0+cpu", "transformers": "5.25.0", "numpy": "2.4.6"},
           "variables": {}}
    env.update(changes)
    return env


def test_the_record_is_this_process_and_json_safe() -> None:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        env = describe_environment()
    finally:
        torch.set_num_threads(threads)
    assert env["torch_threads"] == 1
    assert env["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert env["packages"]["torch"] == metadata.version("torch")
    assert env["packages"]["transformers"] == metadata.version("transformers")
    assert env["r3_rl"]["version"] == metadata.version("r3-rl")
    assert json.loads(json.dumps(env)) == env


def test_differences_name_what_changed() -> None:
    assert differences(fake_env(), fake_env()) == []
    moved = fake_env(cpu_capability="AVX512", torch_threads=2,
                     packages={"torch": "2.14.1", "transformers": "5.25.0", "numpy": "2.4.6"},
                     variables={"ATEN_CPU_CAPABILITY": "default"})
    assert differences(fake_env(), moved) == ["cpu_capability AVX2 -> AVX512", "torch_threads 1 -> 2",
                                              "torch 2.13.0+cpu -> 2.14.1", "ATEN_CPU_CAPABILITY None -> default"]
    assert differences(fake_env(), moved, ignore=("torch_threads", "ATEN_CPU_CAPABILITY")) == [
        "cpu_capability AVX2 -> AVX512", "torch 2.13.0+cpu -> 2.14.1"]
    assert differences(fake_env(), fake_env(r3_rl={"version": "0.1.0", "commit": "fedcba9876543210",
                                                   "uncommitted_changes": False})) == [
        "r3_rl.commit 0123456789abcdef -> fedcba9876543210"]
    assert differences(fake_env(), fake_env(platform="Linux-6.1", when="later")) == [], "not what numbers hang on"
    # a torch built from source (or conda's) has no "+cu124" tag: the runtime version is the one that says it
    gpu = fake_env(gpus=["NVIDIA H100"], cuda="12.4", packages={"torch": "2.13.0", "transformers": "5.25.0",
                                                              "numpy": "2.4.6"})
    assert differences(gpu, {**gpu, "cuda": "12.8"}) == ["cuda 12.4 -> 12.8"]


def test_records_append_and_compare_with_the_start(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    first, changed = record_environment(run, "train", now=fake_env())
    assert changed == [] and first["command"] == "train"
    _, changed = record_environment(run, "resume", now=fake_env())
    assert changed == []
    _, changed = record_environment(run, "resume", now=fake_env(cpu_capability="AVX512"))
    assert changed == ["cpu_capability AVX2 -> AVX512"]
    _, changed = record_environment(run, "eval", now=fake_env(torch_threads=2))
    assert changed == ["torch_threads 1 -> 2"], "compared with the start, not with the last record"
    assert [r["command"] for r in read_records(run)] == ["train", "resume", "resume", "eval"]
    # resumed into a new run dir: the checkpoint's run dir is the start
    other = tmp_path / "other"
    other.mkdir()
    _, changed = record_environment(other, "resume", started_in=run, now=fake_env(python="3.12.1"))
    assert changed == ["python 3.11.7 -> 3.12.1"]
    assert [r["command"] for r in read_records(other)] == ["resume"]
    # a dir evaluated again and again keeps its start and the latest records
    for i in range(MAX_RECORDS + 5):
        record_environment(other, f"eval{i}", now=fake_env())
    commands = [r["command"] for r in read_records(other)]
    assert len(commands) == MAX_RECORDS and commands[0] == "resume" and commands[-1] == f"eval{MAX_RECORDS + 4}"
    assert not [p for p in other.iterdir() if p.name != ENVIRONMENT_FILE], "no temporary file left behind"


def test_a_malformed_or_oversized_file_is_started_afresh(tmp_path: Path) -> None:
    for content in ("{not json", "[1, 2]", '{"records": 5}', '{"records": [7, "x"]}', "\udcff"):
        (tmp_path / ENVIRONMENT_FILE).write_text(content, encoding="utf-8", errors="surrogateescape")
        assert read_records(tmp_path) == [], content
        _, changed = record_environment(tmp_path, "train", now=fake_env())
        assert changed == [] and len(read_records(tmp_path)) == 1
    (tmp_path / ENVIRONMENT_FILE).write_text(json.dumps({"records": [fake_env(), "x" * MAX_FILE_BYTES]}))
    assert read_records(tmp_path) == []
    # fields of the wrong type (an edited file): shown as missing, never a crash
    odd = fake_env(packages=5, gpus="A100", r3_rl=["x"], torch_threads=None)
    line = summary_line(odd)
    assert line.startswith("torch None (AVX2 kernels, None threads), transformers None") and "GPUs" not in line


def test_summary_line() -> None:
    assert summary_line(fake_env(gpus=["NVIDIA H200", "NVIDIA H200"],
                                 r3_rl={"commit": "0123456789abcdef", "uncommitted_changes": True})) == (
        "torch 2.13.0+cpu (AVX2 kernels, 1 thread), transformers 5.25.0, numpy 2.4.6, Python 3.11.7, CPU AMD EPYC, "
        "GPUs 2 x NVIDIA H200, r3-rl 01234567 + uncommitted changes")


def test_a_resume_in_another_environment_is_an_event(tmp_path: Path, monkeypatch) -> None:
    """The trainer's hook, without training: the first record's environment, then a resume on other kernels."""
    start = tmp_path / "start"
    start.mkdir()
    record_environment(start, "train", now=fake_env())
    events: list[str] = []
    printed: list[str] = []
    monkeypatch.setattr("r3_rl.environment.describe_environment", lambda: fake_env(cpu_capability="DEFAULT"))
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    loop = SimpleNamespace(run_dir=resumed, resumed_from=start / "checkpoints" / "step_000002",
                           console=SimpleNamespace(print=printed.append), log_event=events.append)
    Trainer._record_environment(loop)  # type: ignore[arg-type]
    assert printed == ["environment: torch 2.13.0+cpu (DEFAULT kernels, 1 thread), transformers 5.25.0, "
                       "numpy 2.4.6, Python 3.11.7, CPU AMD EPYC, r3-rl 01234567"]
    assert len(events) == 1 and "cpu_capability AVX2 -> DEFAULT" in events[0]
    assert [r["command"] for r in read_records(resumed)] == ["resume"]
    # the same environment: no event
    events.clear()
    monkeypatch.setattr("r3_rl.environment.describe_environment", lambda: fake_env())
    Trainer._record_environment(loop)  # type: ignore[arg-type]
    assert events == []


def test_inspect_shows_the_environment_and_where_a_resume_ran(tmp_path: Path) -> None:
    record_environment(tmp_path, "train", now=fake_env())
    record_environment(tmp_path, "resume", now=fake_env(packages={"torch": "2.14.1", "transformers": "5.25.0",
                                                                  "numpy": "2.4.6"}))
    text = run_overview(tmp_path)
    assert "  environment: torch 2.13.0+cpu (AVX2 kernels, 1 thread)" in text
    assert "ran elsewhere: torch 2.13.0+cpu -> 2.14.1" in text
