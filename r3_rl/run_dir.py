"""Run directories: ``<out_dir>/<name>-<timestamp>/`` holding the resolved recipe and everything a run writes."""
from __future__ import annotations

import os
from pathlib import Path

from r3_rl.config import Recipe, recipe_yaml, save_recipe
from r3_rl.errors import UserError
from r3_rl.stamps import new_stamped_dir, stamped_path


def _refuse_links(path: Path) -> None:
    """A run dir that exists (a resume, or ``--run-dir`` again) must hold no symbolic link: the run writes
    ``recipe.yaml``, ``events.log``, ``final/``, ``trajectories/`` ... in place, and a link planted in a run dir
    someone else wrote would redirect those writes anywhere (the folder itself may be a link)."""
    for dirpath, dirnames, filenames in os.walk(path):
        for name in dirnames + filenames:
            if (Path(dirpath) / name).is_symlink():
                raise UserError(f"run dir {path}: {Path(dirpath, name).relative_to(path)} is a symbolic link; the "
                                f"run would write through it (replace it with a real file or folder)")


def _keep_previous_recipe(path: Path, recipe: Recipe) -> None:
    """On a resume with other settings (a lower learning rate, more steps) the run dir's ``recipe.yaml`` is
    rewritten; the one the earlier steps ran with is kept beside it as ``recipe.<time>.yaml``, so the run dir
    never claims its first steps ran with the new settings."""
    old = path / "recipe.yaml"
    if old.is_file() and old.read_text() != recipe_yaml(recipe):
        old.rename(stamped_path(path, "recipe", ".yaml", sep="."))


def make_run_dir(recipe: Recipe, run_dir: str | None = None) -> Path:
    path = Path(run_dir) if run_dir else Path(recipe.out_dir)
    try:
        if run_dir:
            if path.is_dir():
                _refuse_links(path)
            path.mkdir(parents=True, exist_ok=True)
        else:  # a new <name>-<time>; two runs in the same second get -1, -2, ...
            path = new_stamped_dir(path, recipe.name)
        _keep_previous_recipe(path, recipe)
        save_recipe(recipe, path / "recipe.yaml")
    except OSError as e:
        raise UserError(f"run dir {path}: cannot write there ({e.strerror or e})") from None
    return path
