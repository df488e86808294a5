"""Command-line parsing that fails the project's way: one line naming the flag and what is valid, exit 2.

argparse's own ``error`` prints the whole usage block before the message, and a size typed as a bare ``int``
accepts ``0`` or ``-3`` and fails later in a traceback (``--hidden 0`` in a benchmark divided by zero in the
model's constructor).  :class:`OneLineArgumentParser` keeps the message and drops the block (``--help`` still
prints it), and :func:`int_at_least`, :func:`int_between`, :func:`positive_float` and :func:`float_up_to`
reject a bad value while the arguments are parsed, before anything expensive runs.  Used by ``r3-rl`` and by
every script under ``benchmarks/``.
"""
from __future__ import annotations

import argparse
import math
from typing import Any, Callable, NoReturn

from r3_rl.errors import EXIT_USAGE


class OneLineArgumentParser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose errors are one line on stderr and exit 2 (sub-commands inherit it)."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} ('{self.prog} --help' lists the options)\n")

    def parse_args(self, args: Any = None, namespace: Any = None) -> argparse.Namespace:  # type: ignore[override]
        """As argparse's, except that an argument no parser knows is refused by the sub-command it followed:
        ``r3-rl rollout R --out x`` points to ``r3-rl rollout --help``, which lists rollout's options, not to
        ``r3-rl --help``, which lists only the sub-commands."""
        parsed, extra = self.parse_known_args(args, namespace)
        if extra:
            self._innermost(parsed).error(f"unrecognized arguments: {' '.join(extra)}")
        return parsed

    def _innermost(self, parsed: argparse.Namespace) -> argparse.ArgumentParser:
        for action in self._actions:
            if isinstance(action, argparse._SubParsersAction):  # the sub-commands (argparse has no public name)
                chosen = action.choices.get(getattr(parsed, action.dest, None) or "")
                if isinstance(chosen, OneLineArgumentParser):
                    return chosen._innermost(parsed)
        return self


def _checked(convert: Callable[[str], Any], accepts: Callable[[Any], bool], what: str) -> Callable[[str], Any]:
    """The one shape of every converter here: ``convert`` the text (None when it is no number of that kind) and
    refuse it unless ``accepts`` the value, naming ``what`` would be valid."""

    def parse(text: str) -> Any:
        value = convert(text)
        if value is None or not accepts(value):
            raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}")
        return value

    parse.__name__ = what.removeprefix("an ").removeprefix("a ")  # what argparse names in its fallback message
    return parse


def _integer(text: str) -> int | None:
    """``text`` as an int, or None when it is no integer ("1.5", "1e3", "")."""
    try:
        return int(text)
    except ValueError:
        return None


def _finite(text: str) -> float | None:
    """``text`` as a float, or None when it is no number or is nan/inf."""
    try:
        value = float(text)
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def _plain(number: float) -> str:
    """1048576.0 as '1048576' (``:g`` would print 1.04858e+06), 0.5 as '0.5'."""
    return str(int(number)) if float(number).is_integer() else f"{number:g}"


def int_at_least(low: int) -> Callable[[str], int]:
    """An argparse ``type``: an integer >= ``low`` (a size, a count, a repeat number)."""
    return _checked(_integer, lambda v: v >= low, f"an integer >= {low}")


def int_between(low: int, high: int) -> Callable[[str], int]:
    """An argparse ``type``: an integer from ``low`` to ``high`` inclusive (a port, a count with a sane ceiling)."""
    return _checked(_integer, lambda v: low <= v <= high, f"an integer from {low} to {high}")


def float_up_to(high: float) -> Callable[[str], float]:
    """An argparse ``type``: a finite number > 0 and <= ``high`` (a memory size, a timeout: ``inf`` or ``1e300``
    would pass ``positive_float`` and then mean nothing, or overflow where it becomes bytes or a deadline)."""
    return _checked(_finite, lambda v: 0 < v <= high, f"a number > 0 and <= {_plain(high)}")


#: An argparse ``type``: a finite number > 0 (a width, a scale, a memory size).
positive_float = _checked(_finite, lambda v: v > 0, "a finite number > 0")

#: An argparse ``type``: a finite number >= 0 (a guidance scale, where 0 turns it off).
non_negative_float = _checked(_finite, lambda v: v >= 0, "a finite number >= 0")
