"""User-facing errors.  The CLI turns a :class:`UserError` into one line on stderr and exit code 2."""
from __future__ import annotations

import difflib
import traceback
from typing import Iterable

EXIT_USAGE = 2


class UserError(Exception):
    """Bad input from the user (recipe, data file, model path, CLI flag): one line, exit 2."""


def close_match(word: str, candidates: Iterable[str]) -> str:
    """`` (did you mean 'x'?)`` for the closest candidate, or an empty string."""
    best = difflib.get_close_matches(word, list(candidates), n=1, cutoff=0.6)
    return f" (did you mean {best[0]!r}?)" if best else ""


def shown(value: object, limit: int = 60) -> str:
    """``repr(value)`` for a one-line error, cut to ``limit`` characters: a 400-digit number or a long list
    given where a number belongs is named by its start, not echoed whole."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit - 3]}... ({len(text)} characters)"


def raised(e: BaseException) -> str:
    """``RuntimeError: cannot open x (pk/rw.py:3)``: what user code raised, first line only, and where -- the
    one line a plug-in's failure gets instead of a traceback."""
    frames = traceback.extract_tb(e.__traceback__)
    where = f" ({frames[-1].filename}:{frames[-1].lineno})" if frames else ""
    if isinstance(e, SyntaxError) and e.filename:
        where = f" ({e.filename}:{e.lineno})"
    text = (str(e).splitlines() or [""])[0][:200]
    return f"{type(e).__name__}{': ' + text if text else ''}{where}"
