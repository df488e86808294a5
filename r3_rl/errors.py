"""User-facing errors.  The CLI turns a :class:`UserError` into one line on stderr and exit code 2."""
from __future__ import annotations

import difflib
from typing import Iterable

EXIT_USAGE = 2


class UserError(Exception):
    """Bad input from the user (recipe, data file, model path, CLI flag): one line, exit 2."""


def close_match(word: str, candidates: Iterable[str]) -> str:
    """`` (did you mean 'x'?)`` for the closest candidate, or an empty string."""
    best = difflib.get_close_matches(word, list(candidates), n=1, cutoff=0.6)
    return f" (did you mean {best[0]!r}?)" if best else ""
