"""Timestamped names that never overwrite: ``<stem>-<YYYYmmdd-HHMMSS>[-N]<suffix>``.

Run dirs, a resumed run's previous ``recipe.yaml`` and an abandoned branch's checkpoints are named by the second
they were made.  Two in the same second (two runs started together, two resumes with changed settings within a
second) would otherwise share a name: a run dir would be reused, a rename would replace the earlier file, or
fail on a non-empty folder.  The first free name gets ``-1``, ``-2``, ... appended.
"""
from __future__ import annotations

import time
from pathlib import Path


def stamped_path(folder: Path, stem: str, suffix: str = "", sep: str = "-") -> Path:
    """The first of ``folder/<stem><sep><stamp><suffix>``, ``...<stamp>-1<suffix>``, ... that does not exist."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    path, n = Path(folder) / f"{stem}{sep}{stamp}{suffix}", 1
    while path.exists() or path.is_symlink():
        path = Path(folder) / f"{stem}{sep}{stamp}-{n}{suffix}"
        n += 1
    return path


def new_stamped_dir(folder: Path, stem: str) -> Path:
    """Create and return the first free ``folder/<stem>-<stamp>[-N]``: made with ``mkdir`` that fails on an
    existing folder, so two processes starting in the same second (a benchmark's parallel runs) never share one."""
    Path(folder).mkdir(parents=True, exist_ok=True)
    while True:
        path = stamped_path(folder, stem)
        try:
            path.mkdir()
            return path
        except FileExistsError:  # another process took it between the check and the mkdir
            continue
