"""Run directories: ``<out_dir>/<name>-<timestamp>/`` holding the resolved recipe and everything a run writes."""
from __future__ import annotations

import os
from pathlib import Path

from r3_rl.config import Recipe, recipe_yaml, save_recipe
from r3_rl.errors import UserError
from r3_rl.stamps import new_stamped_dir, stamped_path


def _refuse_redirects(path: Path) -> None:
    """A run dir that exists (a resume, or ``--run-dir`` again) must hold no symbolic link (nor FIFO): the run writes
    ``recipe.yaml``, ``events.log``, ``final/``, ``trajectories/`` ... in place, and a link planted in a run dir
    someone else wrote would redirect those writes anywhere (the folder itself may be a link)."""
    for dirpath, dirnames, filenames in os.walk(path):
        for name in dirnames + filenames:
            entry = Path(dirpath) / name
            if entry.is_symlink():
                raise UserError(f"run dir {path}: {entry.relative_to(path)} is a symbolic link; the "
                                f"run would write through it (replace it with a real file or folder)")
            if not (entry.is_dir() or entry.is_file()):  # a FIFO named recipe.yaml: writing it waits for ever
                raise UserError(f"run dir {path}: {entry.relative_to(path)} is not a regular file or folder "
                                f"(a FIFO, socket or device); the run would block or write into it (remove it)")


def _keep_previous_recipe(path: Path, recipe: Recipe) -> None:
    """On a resume with other settings (a lower learning rate, more steps) the run dir's ``recipe.yaml`` is
    rewritten; the one the earlier steps ran with is kept beside it as ``recipe.<time>.yaml``, so the run dir
    never claims its first steps ran with the new settings."""
    old = path / "recipe.yaml"
    if old.is_file() and old.read_bytes() != recipe_yaml(recipe).encode():  # bytes: any file, UTF-8 or not
        old.rename(stamped_path(path, "recipe", ".yaml", sep="."))


def make_run_dir(recipe: Recipe, run_dir: str | None = None) -> Path:
    path = Path(run_dir) if run_dir else Path(recipe.out_dir)
    try:
        if run_dir:
            if path.is_dir():
                _refuse_redirects(path)
            path.mkdir(parents=True, exist_ok=True)
        else:  # a new <name>-<time>; two runs in the same second get -1, -2, ...
            path = new_stamped_dir(path, recipe.name)
        _keep_previous_recipe(path, recipe)
        save_recipe(recipe, path / "recipe.yaml")
    except OSError as e:
        raise UserError(f"run dir {path}: cannot write there ({e.strerror or e})") from None
    return path
