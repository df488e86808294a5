"""The explicit package list in pyproject.toml must cover every package folder."""
from __future__ import annotations

import tomllib
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
