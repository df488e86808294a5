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


# import name -> the distribution that pyproject.toml declares for it, where the two differ
_DISTRIBUTIONS = {"yaml": "pyyaml", "PIL": "pillow", "open_clip": "open-clip-torch"}


def _declared(repo: Path) -> set[str]:
    """Distribution names of ``dependencies`` and every extra, lower-case, ``-`` for ``_``."""
    import re

    project = tomllib.loads((repo / "pyproject.toml").read_text())["project"]
    specs = [*project["dependencies"], *(s for extra in project["optional-dependencies"].values() for s in extra)]
    return {re.match(r"[A-Za-z0-9_.-]+", s).group(0).lower().replace("_", "-") for s in specs}


def test_every_third_party_import_is_declared(repo: Path) -> None:
    """Each package the shipped code imports (at module level or inside a function) is a declared dependency or
    extra: one that only arrives through another package's dependencies (h11 through uvicorn, anyio through
    starlette, huggingface_hub through transformers) can be dropped by that package's next release."""
    import ast

    local = {"r3_rl", "rewards", "eval", "__future__"}
    imported: dict[str, str] = {}
    for folder in ("r3_rl", "rewards", "eval"):
        for path in sorted((repo / folder).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text())):
                names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                         [node.module] if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module else [])
                for name in names:
                    top = name.split(".")[0]
                    if top not in local and top not in sys.stdlib_module_names:
                        imported.setdefault(top, str(path.relative_to(repo)))
    declared = _declared(repo)
    missing = {top: where for top, where in imported.items()
               if _DISTRIBUTIONS.get(top, top).lower().replace("_", "-") not in declared}
    assert not missing, f"imported but not declared in pyproject.toml: {missing}"


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
