"""Run directories: ``<out_dir>/<name>-<timestamp>/`` holding the resolved recipe and everything a run writes."""
from __future__ import annotations

import time
from pathlib import Path

from r3_rl.config import Recipe, save_recipe
from r3_rl.errors import UserError


def make_run_dir(recipe: Recipe, run_dir: str | None = None) -> Path:
    if run_dir:
        path = Path(run_dir)
    else:
        stamp = time.strftime("%Y%m%d-%H%M%S")
        path = Path(recipe.out_dir) / f"{recipe.name}-{stamp}"
        n = 1
        while path.exists():  # two runs in the same second
            path = Path(recipe.out_dir) / f"{recipe.name}-{stamp}-{n}"
            n += 1
    try:
        path.mkdir(parents=True, exist_ok=True)
        save_recipe(recipe, path / "recipe.yaml")
    except OSError as e:
        raise UserError(f"run dir {path}: cannot write there ({e.strerror or e})") from None
    return path
