"""Which checkpoint ``--resume`` continues: complete checkpoints of a run, ``auto`` and ``PATH``, the abandoned
branch set aside when an earlier step is resumed, and a re-saved step's interrupted swap put back.

Layout and writing: :mod:`r3_rl.learner.checkpoint` (which re-exports these names).
"""
from __future__ import annotations

import glob
import json
import re
from pathlib import Path
from typing import Any

from r3_rl.errors import UserError
from r3_rl.stamps import stamped_path

CKPT_DIR = "checkpoints"
MARKER = "checkpoint.json"
STEP_RE = re.compile(r"^step_(\d+)$")
OLD_RE = re.compile(r"^\.old-(step_\d+)-\d+$")  # a re-saved step's previous copy, set aside for the swap


def _meta(path: Path) -> dict[str, Any] | None:
    try:
        meta = json.loads((path / MARKER).read_text())
    except (OSError, ValueError):
        return None
    return meta if isinstance(meta, dict) and meta.get("complete") is True else None


def complete_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints under ``root`` (a ``checkpoints/`` folder), oldest first."""
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir()
             if p.is_dir() and (m := STEP_RE.match(p.name)) and _meta(p) is not None]
    return [p for _, p in sorted(found)]


def checkpoints_before(latest: Path) -> list[Path]:
    """The complete checkpoints beside ``latest`` with a lower step, newest first: compared as numbers, since
    names compare wrongly past step 999999 (``step_1000000`` sorts before ``step_999999``)."""
    step = int(STEP_RE.match(latest.name).group(1))  # type: ignore[union-attr]
    return [p for p in reversed(complete_checkpoints(latest.parent))
            if int(STEP_RE.match(p.name).group(1)) < step]  # type: ignore[union-attr]


def restore_interrupted_swap(root: Path) -> list[Path]:
    """Put back a re-saved step whose swap a crash cut in two; returns the folders restored.

    Re-saving ``step_N`` renames it to ``.old-step_N-PID`` and then the new copy to ``step_N``: a crash between
    the two renames leaves no ``step_N`` at all, and with ``keep_last: 1`` no checkpoint to resume from.  The
    old copy was complete (it had been named ``step_N``), so it is renamed back; the next save would delete it.
    """
    restored = []
    for old, step_name in _interrupted_swaps(root):
        old.rename(root / step_name)
        restored.append(root / step_name)
    return restored


def _interrupted_swaps(root: Path) -> list[tuple[Path, str]]:
    """``(.old-step_N-PID folder, "step_N")`` for each complete old copy whose ``step_N`` is gone, in name order."""
    if not root.is_dir():
        return []
    return [(p, m.group(1)) for p in sorted(root.iterdir())
            if (m := OLD_RE.match(p.name)) and p.is_dir() and _meta(p) is not None and not (root / m.group(1)).exists()]


def _resumable_as_is(root: Path) -> Path | None:
    """What :func:`_latest_to_resume` would pick under ``root``, found without renaming anything: the newest complete
    checkpoint or interrupted swap's old copy (a swap's copy of step N outranks the complete steps below N)."""
    found = [(int(p.name[len("step_"):]), p) for p in complete_checkpoints(root)]
    found += [(int(step_name[len("step_"):]), old) for old, step_name in _interrupted_swaps(root)]
    return max(found, key=lambda x: x[0])[1] if found else None


def latest_checkpoint(run_dir: Path) -> Path | None:
    done = complete_checkpoints(Path(run_dir) / CKPT_DIR)
    return done[-1] if done else None


def _latest_to_resume(run_dir: Path) -> Path | None:
    """:func:`latest_checkpoint` once an interrupted swap is put back: only a resume renames anything."""
    restore_interrupted_swap(Path(run_dir) / CKPT_DIR)
    return latest_checkpoint(run_dir)


def find_resume(where: str, recipe: Any, run_dir: str | None) -> tuple[Path | None, Path | None]:
    """``--resume auto|PATH`` -> (checkpoint to load or None, run dir to continue in or None for a new one).

    ``auto``: the latest complete checkpoint of ``run_dir`` when given, else of the newest
    ``<out_dir>/<name>-*`` run that has one written by this recipe name; nothing found = a fresh run.
    ``PATH``: a checkpoint folder, a run dir or its ``checkpoints/`` folder (then its latest complete
    checkpoint); nothing there is an error.  A checkpoint folder outside any ``checkpoints/`` folder continues
    in a new run dir unless ``run_dir`` is given.
    """
    if where == "auto":
        if run_dir is not None:
            return _latest_to_resume(Path(run_dir)), Path(run_dir)
        # the name is not a pattern: recipe ``exp[1]``'s runs are ``exp[1]-*``, never ``exp1-*``
        runs = sorted(Path(recipe.out_dir).glob(f"{glob.escape(recipe.name)}-*"), key=lambda p: p.stat().st_mtime,
                      reverse=True)
        for run in runs:
            # ``x-*`` also matches recipe ``x-lowlr``'s runs: a checkpoint names the recipe that wrote it, and
            # another recipe's run is left as it is (its interrupted swap too) until that recipe resumes it
            ckpt = _resumable_as_is(run / CKPT_DIR)
            if ckpt is not None and (_meta(ckpt) or {}).get("recipe", recipe.name) == recipe.name:
                return _latest_to_resume(run), run
        return None, None
    p = Path(where)
    if (p / MARKER).is_file():
        if _meta(p) is None:
            raise UserError(f"--resume {where}: checkpoint is incomplete (interrupted while saving); use --resume auto")
        ckpt = p
    else:
        root = p if p.name == CKPT_DIR else p / CKPT_DIR
        restore_interrupted_swap(root)
        done = complete_checkpoints(root)
        if not done:
            raise UserError(f"--resume {where}: no complete checkpoint there (expected a checkpoint folder with "
                            f"{MARKER}, or a run dir with {CKPT_DIR}/step_*)")
        ckpt = done[-1]
    if run_dir is not None:
        return ckpt, Path(run_dir)
    # a checkpoint copied out of its run (``~/saved/step_000005``) starts a new run: its folder's parent is no run
    # dir, and continuing there would write the recipe, metrics and trajectories into an unrelated folder
    return ckpt, ckpt.parent.parent if ckpt.parent.name == CKPT_DIR else None


def set_aside_later(ckpt: Path, run_dir: Path) -> list[Path]:
    """Resuming ``ckpt`` in ``run_dir`` branches at its step: the complete checkpoints of later steps there are the
    abandoned branch's, and ``--resume auto`` (latest step first) would pick one after a crash while the logs were
    rewound to the branch point.  They are renamed ``abandoned-step_N`` (kept, not deleted); returns the new paths."""
    at = int(ckpt.name[len("step_"):]) if STEP_RE.match(ckpt.name) else int((_meta(ckpt) or {}).get("step", 0))
    root, moved = Path(run_dir) / CKPT_DIR, []
    for p in complete_checkpoints(root):
        if int(p.name[len("step_"):]) > at:
            dest = root / f"abandoned-{p.name}"
            dest = dest if not dest.exists() else stamped_path(root, f"abandoned-{p.name}")
            p.rename(dest)
            moved.append(dest)
    return moved
