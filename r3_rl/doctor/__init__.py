"""``r3-rl doctor RECIPE``: everything a long GPU run needs, checked in seconds before it starts.

Each check is a small function ``check(ctx) -> Finding | list[Finding]`` in :data:`CHECKS`, run in order;
one printed line per finding: ``ok``, ``skipped`` (does not apply here, e.g. no GPU) or ``problem`` with
how to fix it.  The exit code is 0 only when nothing is a problem (2 otherwise, like every bad input).
Adding a check is one function and one entry in :data:`CHECKS`.

Why a preflight: each of these failures otherwise shows up minutes or hours into a run (a missing shard
when the policy loads, a dead reward server at the first score, a full disk at the first checkpoint).
The doctor never downloads anything: it runs with the hub offline and only looks in the local cache.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any, Callable

from r3_rl.doctor import checks, gpu, memory_check, ray_check
from r3_rl.doctor.base import Context, Finding, problem
from r3_rl.errors import EXIT_USAGE, UserError

CheckFn = Callable[[Context], "Finding | list[Finding]"]

# In order; each gets the shared Context.  "train" is last: the slowest, and only run when all above passed.
CHECKS: list[tuple[str, CheckFn]] = [
    ("values", checks.check_values),
    ("data", checks.check_data),
    ("weights", checks.check_weights),
    ("rewards", checks.check_rewards),
    ("gpus", gpu.check_gpus),
    ("nccl", gpu.check_nccl),
    ("ray", ray_check.check_ray),
    ("memory", memory_check.check_memory),
    ("disk", checks.check_disk),
    ("train", gpu.check_train),
]


def offline() -> None:
    """The doctor never downloads: hub libraries see offline mode from here on."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    if "huggingface_hub.constants" in sys.modules:  # already imported: its flags were read at import
        sys.modules["huggingface_hub.constants"].HF_HUB_OFFLINE = True


def run_checks(ctx: Context, emit: Callable[[Finding], None]) -> list[Finding]:
    """Every check in order; an unexpected error in a check is that check's problem, never a traceback."""
    found = []
    for name, fn in CHECKS:
        try:
            result = fn(ctx)
        except UserError as e:
            result = problem(str(e))
        except Exception as e:  # noqa: BLE001 - one line per check, whatever broke
            first = (str(e).strip().splitlines() or [""])[0]
            result = problem(f"the check itself failed: {type(e).__name__}: {first}")
        for f in result if isinstance(result, list) else [result]:
            f.check = f.check or name
            ctx.problems += f.status == "problem"
            emit(f)
            found.append(f)
    return found


def doctor(recipe_path: str | Path, overrides: list[str] | None = None,
           emit: Callable[[Finding], None] | None = None, **context: Any) -> int:
    """Run the preflight for a recipe; prints one line per finding and returns the exit code (0 or 2)."""
    from r3_rl.config import load_recipe

    emit = emit or (lambda f: print(f.line(), flush=True))
    offline()
    try:
        recipe = load_recipe(recipe_path, overrides)
    except UserError as e:
        emit(Finding("problem", str(e), "fix the recipe (or the --set value) named above", "recipe"))
        print("r3-rl doctor: the recipe does not load; nothing else was checked", flush=True)
        return EXIT_USAGE
    emit(Finding("ok", f"{recipe_path}: {recipe.name}, {recipe.steps} steps, policy {recipe.policy.kind}", "", "recipe"))
    ctx = Context(Path(recipe_path), recipe, **context)
    found = run_checks(ctx, emit)
    bad = [f for f in found if f.status == "problem"]
    n_skipped = sum(f.status == "skipped" for f in found)
    if bad:
        print(f"r3-rl doctor: {len(bad)} problem(s): the run cannot start as it is", flush=True)
        return EXIT_USAGE
    print(f"r3-rl doctor: every check passed ({n_skipped} skipped): the run can start", flush=True)
    return 0
