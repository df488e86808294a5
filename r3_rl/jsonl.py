"""Reading JSON-lines files that users hand us (prompt sets, checklists, trajectory logs).

One reader so every such file fails the same way: a :class:`~r3_rl.errors.UserError` naming
``file:line`` and what is wrong, never a bare ``json`` traceback.  Blank lines are skipped; a ``.gz``
file is read through gzip (the built-in prompt sets ship that way).
"""
from __future__ import annotations

import gzip
import json
from pathlib import Path
from typing import Any, Iterator

from r3_rl.errors import UserError


def read_jsonl_objects(path: str | Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """``(line number, record)`` for every non-blank line of ``path``, each a JSON object."""
    opener = gzip.open if str(path).endswith(".gz") else open
    try:
        with opener(path, "rt", encoding="utf-8") as fh:
            for lineno, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError as e:
                    raise UserError(f"{path}:{lineno}: not valid JSON ({e.msg} at column {e.colno})") from None
                if not isinstance(rec, dict):
                    raise UserError(f"{path}:{lineno}: expected a JSON object, got {type(rec).__name__}")
                yield lineno, rec
    except (gzip.BadGzipFile, EOFError) as e:
        raise UserError(f"{path}: not a valid gzip file ({e})") from None
