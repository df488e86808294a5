"""Ctrl-C and SIGTERM that always end the process, after clean-up.

The first SIGINT raises ``KeyboardInterrupt`` as usual, so the trainer's ``finally`` stops rollout workers,
learner ranks and the Ray it started, and the CLI exits 130.  It also arms a watchdog: if that clean-up has not
ended the process within ``grace_s`` (a Ray shutdown stuck on an interrupted call has been seen to hang), the
watchdog says so in one line and exits 130 at once, so a user or a test harness is never left with a process
that ignores Ctrl-C.  A second Ctrl-C does the same without waiting.

SIGTERM (``kill PID``, a batch scheduler's preemption or time limit) takes the same path, as :class:`Terminated`,
and exits 143 (128 + 15).  Python's default for SIGTERM is to die on the spot, with no ``finally``: rollout
workers, reward actors and the run's Ray were left running.  No checkpoint is written on the way out (the
signal can land inside an optimiser update); a run resumes from its last ``save_every`` checkpoint.
"""
from __future__ import annotations

import os
import signal
import sys
import threading
from typing import Any, Callable

EXIT_INTERRUPTED = 130  # 128 + SIGINT
EXIT_TERMINATED = 143  # 128 + SIGTERM


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where Ctrl-C raises ``KeyboardInterrupt``: the same clean-up, exit code 143."""


def exit_code(signum: int) -> int:
    return EXIT_TERMINATED if signum == signal.SIGTERM else EXIT_INTERRUPTED


def _hard_exit(reason: str, code: int = EXIT_INTERRUPTED) -> None:
    try:
        print(f"r3-rl: interrupted ({reason}); exiting", file=sys.stderr, flush=True)
    finally:
        os._exit(code)


class InterruptWatchdog:
    """SIGINT and SIGTERM handler: a ``KeyboardInterrupt`` (:class:`Terminated` for SIGTERM) first, a hard exit if
    clean-up outlasts ``grace_s`` or on a second signal.  ``exit_fn(reason, code)`` is replaceable for tests."""

    def __init__(self, grace_s: float = 60.0, exit_fn: Callable[[str, int], None] = _hard_exit) -> None:
        self.grace_s = grace_s
        self.exit_fn = exit_fn
        self.timer: threading.Timer | None = None

    def __call__(self, signum: int, frame: Any) -> None:
        code = exit_code(signum)
        if self.timer is not None:  # a second signal: the user (or scheduler) does not want to wait for clean-up
            self.timer.cancel()
            name = "Ctrl-C" if signum == signal.SIGINT else signal.Signals(signum).name
            self.exit_fn(f"second {name} during clean-up", code)
            return
        self.timer = threading.Timer(self.grace_s, self.exit_fn,
                                     args=(f"clean-up took over {self.grace_s:g} s", code))
        self.timer.daemon = True
        self.timer.start()
        raise Terminated if signum == signal.SIGTERM else KeyboardInterrupt

    def cancel(self) -> None:
        """Clean-up ended in time: no hard exit."""
        if self.timer is not None:
            self.timer.cancel()


_installed: InterruptWatchdog | None = None  # the process's watchdog, once the CLI installed it


def install(grace_s: float = 60.0) -> InterruptWatchdog | None:
    """Install the watchdog as the SIGINT and SIGTERM handler (main thread only; elsewhere Python keeps its own)."""
    global _installed
    if threading.current_thread() is not threading.main_thread():
        return None
    _installed = InterruptWatchdog(grace_s)
    reclaim()
    return _installed


def reclaim() -> None:
    """Set the installed watchdog as the SIGINT and SIGTERM handler; called again after a library replaced it
    below Python: ``ray.init`` puts a C++ failure handler on SIGTERM in the driver, which logs a stack and aborts
    (exit -6) with no clean-up, leaving the run's workers and Ray behind.  Python's ``getsignal`` does not see
    that, so the handlers are set anew.  A no-op where :func:`install` was not called (tests, notebooks) or off
    the main thread."""
    if _installed is None or threading.current_thread() is not threading.main_thread():
        return
    signal.signal(signal.SIGINT, _installed)
    signal.signal(signal.SIGTERM, _installed)
