"""The explicit package list and package data in pyproject.toml cover every package folder and data file."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tomllib
from fnmatch import fnmatch
from pathlib import Path


def test_every_package_folder_is_listed(repo: Path) -> None:
    cfg = tomllib.loads((repo / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(cfg["packages"])
    roots = {v: k for k, v in cfg["package-dir"].items()}  # folder -> package name
    found = set()
    for folder, pkg in roots.items():
        for init in (repo / folder).rglob("__init__.py"):
            rel = init.parent.relative_to(repo / folder)
            name = ".".join([pkg, *rel.parts]) if rel.parts else pkg
            # sub-folders of r3_rl that are mapped elsewhere are not nested packages
            found.add(name)
    missing = found - listed
    assert not missing, f"add to [tool.setuptools] packages in pyproject.toml: {sorted(missing)}"


def test_rewards_and_eval_import_under_r3_rl() -> None:
    import r3_rl.eval.evaluate as ev
    import r3_rl.rewards.base as rb

    assert Path(rb.__file__).parent.name == "rewards"
    assert Path(ev.__file__).parent.name == "eval"


def _package_data(repo: Path) -> list[str]:
    return tomllib.loads((repo / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["r3_rl.prompt_sets"]


def test_every_prompt_set_file_is_declared_package_data(repo: Path) -> None:
    folder = repo / "r3_rl" / "prompt_sets"
    files = [f.relative_to(folder).as_posix() for f in folder.rglob("*")
             if f.is_file() and f.suffix not in (".py", ".pyc")]
    assert len(files) >= 7  # six prompt sets and their README
    unmatched = [f for f in files if not any(fnmatch(f, pattern) for pattern in _package_data(repo))]
    assert not unmatched, f"add to [tool.setuptools.package-data] in pyproject.toml: {unmatched}"


def test_a_non_editable_install_carries_the_prompt_sets(repo: Path, tmp_path: Path) -> None:
    """`pip install .` (not -e) into a bare target: the built-in sets load from the installed copy."""
    src = tmp_path / "src"
    for name in ("pyproject.toml", "README.md"):
        (src / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(repo / name, src / name)
    for folder in ("r3_rl", "rewards", "eval"):  # a copy: the build must not write into the checkout
        shutil.copytree(repo / folder, src / folder, ignore=shutil.ignore_patterns("__pycache__"))
    target = tmp_path / "site"
    res = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                          "--no-index", "--target", str(target), str(src)], capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    code = ("import r3_rl; from r3_rl.data import load_prompts; print(r3_rl.__file__); "
            "print(len(load_prompts('geneval', 'geneval:train')), len(load_prompts('tiif', 'tiif:test')))")
    env = {**os.environ, "PYTHONPATH": str(target)}
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-2000:]
    where, counts = run.stdout.strip().splitlines()[-2:]
    assert where.startswith(str(target)) and counts == "12359 277"
    assert (target / "r3_rl" / "prompt_sets" / "README.md").is_file()
