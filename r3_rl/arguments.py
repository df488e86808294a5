"""Command-line parsing that fails the project's way: one line naming the flag and what is valid, exit 2.

argparse's own ``error`` prints the whole usage block before the message, and a size typed as a bare ``int``
accepts ``0`` or ``-3`` and fails later in a traceback (``--hidden 0`` in a benchmark divided by zero in the
model's constructor).  :class:`OneLineArgumentParser` keeps the message and drops the block (``--help`` still
prints it), and :func:`int_at_least` / :func:`positive_float` reject a bad value while the arguments are parsed,
before anything expensive runs.  Used by ``r3-rl`` and by every script under ``benchmarks/``.
"""
from __future__ import annotations

import argparse
import math
from typing import Callable, NoReturn

from r3_rl.errors import EXIT_USAGE


class OneLineArgumentParser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose errors are one line on stderr and exit 2 (sub-commands inherit it)."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} ('{self.prog} --help' lists the options)\n")


def int_at_least(low: int) -> Callable[[str], int]:
    """An argparse ``type``: an integer >= ``low`` (a size, a count, a repeat number)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < low:
            raise argparse.ArgumentTypeError(f"must be an integer >= {low}, got {text!r}")
        return value

    parse.__name__ = f"integer >= {low}"  # what argparse names in its fallback message
    return parse


def positive_float(text: str) -> float:
    """An argparse ``type``: a finite number > 0 (a width, a scale, a memory size)."""
    value = _finite(text)
    if value is None or value <= 0:
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text!r}")
    return value


def non_negative_float(text: str) -> float:
    """An argparse ``type``: a finite number >= 0 (a guidance scale, where 0 turns it off)."""
    value = _finite(text)
    if value is None or value < 0:
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text!r}")
    return value


def _finite(text: str) -> float | None:
    """``text`` as a float, or None when it is no number or is nan/inf."""
    try:
        value = float(text)
    except ValueError:
        return None
    return value if math.isfinite(value) else None
