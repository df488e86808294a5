"""What a run's numbers hang on besides its recipe: the machine, its CPU kernels, threads and packages.

Why it is recorded: with ``threads: 1`` a run prints the same numbers every time *on one machine*, but the
same recipe and seed on another CPU (other SIMD kernels: AVX-512, AVX2, or torch's ``default``), with other
package versions or another thread count, rounds floats differently from the first matmul on, and the tiny
demo's warm start, then everything after it, lands elsewhere (README: "Reproducing a run's numbers").  So
every run dir gets ``environment.json``: one record per command that wrote into it (``train``, ``resume``,
``eval``, ``rollout``), and a resumed run whose environment differs from the one it started in says so in
``events.log`` and on the console (it goes on: the weights are still valid, only bit-for-bit equality with
an uninterrupted run is lost).
"""
from __future__ import annotations

import json
import os
import platform
import subprocess
import tempfile
import time
from importlib import metadata
from pathlib import Path
from typing import Any

ENVIRONMENT_FILE = "environment.json"
MAX_FILE_BYTES = 1_000_000  # a run dir may be someone else's: an oversized file is not read, only replaced
MAX_RECORDS = 200  # the first record and the latest ones (about 1 KB each): a dir evaluated again and again stays small
# Packages whose versions change what a run computes (kernels, model code, tokenizers, numerics).
NUMERIC_PACKAGES = ("torch", "transformers", "numpy", "tokenizers", "safetensors", "trl", "peft", "accelerate",
                    "deepspeed", "diffusers", "datasets", "ray")
# Environment variables that pick kernels, thread pools or reduction orders.
NUMERIC_VARIABLES = ("ATEN_CPU_CAPABILITY", "MKL_CBWR", "MKL_NUM_THREADS", "OMP_NUM_THREADS",
                     "CUBLAS_WORKSPACE_CONFIG", "NVIDIA_TF32_OVERRIDE", "TORCH_ALLOW_TF32_CUBLAS_OVERRIDE")
# The fields two records are compared on (``when`` and ``command`` describe the record, not the machine).
# the CUDA runtime too: torch's "+cuXXX" tag names it for a wheel, not for a build from source or a conda package
COMPARED = ("r3_rl", "python", "cpu", "cpu_capability", "torch_threads", "gpus", "cuda", "packages", "variables")


def package_version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo`` on Linux), else what ``platform`` knows."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def code_revision() -> dict[str, Any]:
    """r3-rl's version, and its git commit (with uncommitted changes or not) when it runs from a checkout."""
    here = Path(__file__).resolve().parent
    out: dict[str, Any] = {"version": package_version("r3-rl")}
    def git(*args: str) -> str | None:
        done = subprocess.run(["git", "-C", str(here), *args], capture_output=True, text=True, timeout=5)
        return done.stdout.strip() if done.returncode == 0 else None

    try:
        top = git("rev-parse", "--show-toplevel")
        # only r3-rl's own checkout: an installed copy may sit in some other repository (a venv inside one)
        if top and Path(top).resolve() == here.parent and (commit := git("rev-parse", "HEAD")):
            out["commit"] = commit
            status = git("status", "--porcelain")  # untracked files count: a new module changes the code too
            out["uncommitted_changes"] = bool(status) if status is not None else None
    except (OSError, subprocess.TimeoutExpired):  # no git, or a slow file system: the version is enough
        pass
    return out


def describe_environment() -> dict[str, Any]:
    """This process's environment as JSON-safe values; torch's thread count as it is now (set it first)."""
    import torch

    gpus = ([torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
            if torch.cuda.is_available() else [])
    return {
        "r3_rl": code_revision(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu": cpu_model(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "torch_threads": torch.get_num_threads(),
        "gpus": gpus,
        "cuda": torch.version.cuda if gpus else None,
        "packages": {name: package_version(name) for name in NUMERIC_PACKAGES},
        "variables": {k: os.environ[k] for k in NUMERIC_VARIABLES if k in os.environ},
    }


def differences(before: dict[str, Any], now: dict[str, Any], ignore: tuple[str, ...] = ()) -> list[str]:
    """What changed between two records, one short phrase each (``torch 2.13.0 -> 2.14.1``); [] if nothing.

    ``ignore`` names fields (``torch_threads``) or packages / variables (``OMP_NUM_THREADS``) that may differ."""
    out = []
    for key in COMPARED:
        if key in ignore:
            continue
        a, b = before.get(key), now.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            for sub in sorted(set(a) | set(b)):
                if a.get(sub) != b.get(sub) and sub not in ignore:
                    name = sub if key in ("packages", "variables") else f"{key}.{sub}"
                    out.append(f"{name} {a.get(sub)} -> {b.get(sub)}")
        elif a != b:
            out.append(f"{key} {a} -> {b}")
    return out


def read_records(run_dir: Path) -> list[dict[str, Any]]:
    """The records in ``run_dir/environment.json``; [] for a missing, oversized or malformed file."""
    path = run_dir / ENVIRONMENT_FILE
    try:
        if not path.is_file() or path.stat().st_size > MAX_FILE_BYTES:
            return []
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return []
    records = data.get("records") if isinstance(data, dict) else None
    return [r for r in records if isinstance(r, dict)] if isinstance(records, list) else []


def record_environment(run_dir: Path, command: str, started_in: Path | None = None,
                       now: dict[str, Any] | None = None) -> tuple[dict[str, Any], list[str]]:
    """Append this process's environment to ``run_dir/environment.json`` as a ``command`` record.

    Returns the record and how it differs from the environment the run started in: the first record of
    ``started_in`` (the run dir a resumed checkpoint came from), else of ``run_dir``; [] when there is none or
    nothing changed.  A malformed file (killed mid-write, or edited) is started afresh."""
    records = read_records(run_dir)
    baseline = (read_records(started_in) if started_in is not None else []) or records
    now = {"command": command, "when": time.strftime("%Y-%m-%dT%H:%M:%S"),
           **(now if now is not None else describe_environment())}
    changed = differences(baseline[0], now) if baseline else []
    kept = records[:1] + records[1:][-(MAX_RECORDS - 2):] + [now]  # the start, and the latest commands
    fd, tmp = tempfile.mkstemp(dir=run_dir, prefix=f".{ENVIRONMENT_FILE}.")  # a fresh file: never a planted link
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        json.dump({"records": kept}, f, indent=2)
    os.replace(tmp, run_dir / ENVIRONMENT_FILE)
    return now, changed


def summary_line(env: dict[str, Any]) -> str:
    """One line for the console and ``r3-rl inspect``: the facts that most often explain different numbers.

    Any record is accepted (``inspect`` shows files that may have been edited): a field of the wrong type is
    shown as missing."""
    def field(key: str, kind: type) -> Any:
        value = env.get(key)
        return value if isinstance(value, kind) else kind()

    packages = field("packages", dict)
    threads = env.get("torch_threads")
    kernels = f"{env.get('cpu_capability')} kernels, {threads} thread{'s' if threads != 1 else ''}"
    parts = [f"torch {packages.get('torch')} ({kernels})", f"transformers {packages.get('transformers')}",
             f"numpy {packages.get('numpy')}", f"Python {env.get('python')}", f"CPU {env.get('cpu')}"]
    gpus = field("gpus", list)
    if gpus:
        parts.append(f"GPUs {len(gpus)} x {gpus[0]}")
    revision = field("r3_rl", dict)
    if revision.get("commit"):
        dirty = " + uncommitted changes" if revision.get("uncommitted_changes") else ""
        parts.append(f"r3-rl {str(revision['commit'])[:8]}{dirty}")
    return ", ".join(parts)
