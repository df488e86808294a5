"""Reading JSON-lines files that users hand us (prompt sets, checklists, trajectory logs).

One reader so every such file fails the same way: a :class:`~r3_rl.errors.UserError` naming
``file:line`` and what is wrong (bad UTF-8 included), never a bare ``json`` traceback.  Blank lines are skipped;
a ``.gz`` file is read through gzip (the built-in prompt sets ship that way).
"""
from __future__ import annotations

import gzip
import json
from pathlib import Path
from typing import Any, Iterator

from r3_rl.errors import UserError
from r3_rl.textfiles import utf8_lines


def read_jsonl_objects(path: str | Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """``(line number, record)`` for every non-blank line of ``path``, each a JSON object."""
    try:
        for lineno, line in utf8_lines(path):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"{path}:{lineno}: not valid JSON ({e.msg} at column {e.colno})") from None
            except (ValueError, RecursionError) as e:  # a 5,000-digit number, 100,000-deep nesting
                raise UserError(f"{path}:{lineno}: not valid JSON ({type(e).__name__}: {str(e)[:80]})") from None
            if not isinstance(rec, dict):
                raise UserError(f"{path}:{lineno}: expected a JSON object, got {type(rec).__name__}")
            yield lineno, rec
    except (gzip.BadGzipFile, EOFError) as e:
        raise UserError(f"{path}: not a valid gzip file ({e})") from None
