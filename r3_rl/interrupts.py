"""Ctrl-C that always ends the process.

The first SIGINT raises ``KeyboardInterrupt`` as usual, so the trainer's ``finally`` stops rollout workers,
learner ranks and the Ray it started, and the CLI exits 130.  It also arms a watchdog: if that clean-up has not
ended the process within ``grace_s`` (a Ray shutdown stuck on an interrupted call has been seen to hang), the
watchdog says so in one line and exits 130 at once, so a user or a test harness is never left with a process
that ignores Ctrl-C.  A second Ctrl-C does the same without waiting.
"""
from __future__ import annotations

import os
import signal
import sys
import threading
from typing import Any, Callable

EXIT_INTERRUPTED = 130


def _hard_exit(reason: str) -> None:
    try:
        print(f"r3-rl: interrupted ({reason}); exiting", file=sys.stderr, flush=True)
    finally:
        os._exit(EXIT_INTERRUPTED)


class InterruptWatchdog:
    """SIGINT handler: a ``KeyboardInterrupt`` first, a hard exit if clean-up outlasts ``grace_s`` or on a second
    Ctrl-C.  ``exit_fn`` is replaceable for tests."""

    def __init__(self, grace_s: float = 60.0, exit_fn: Callable[[str], None] = _hard_exit) -> None:
        self.grace_s = grace_s
        self.exit_fn = exit_fn
        self.timer: threading.Timer | None = None

    def __call__(self, signum: int, frame: Any) -> None:
        if self.timer is not None:  # a second Ctrl-C: the user does not want to wait for clean-up
            self.timer.cancel()
            self.exit_fn("second Ctrl-C during clean-up")
            return
        self.timer = threading.Timer(self.grace_s, self.exit_fn, args=(f"clean-up took over {self.grace_s:g} s",))
        self.timer.daemon = True
        self.timer.start()
        raise KeyboardInterrupt

    def cancel(self) -> None:
        """Clean-up ended in time: no hard exit."""
        if self.timer is not None:
            self.timer.cancel()


def install(grace_s: float = 60.0) -> InterruptWatchdog | None:
    """Install the watchdog as the SIGINT handler (main thread only; elsewhere Python keeps its own)."""
    if threading.current_thread() is not threading.main_thread():
        return None
    watchdog = InterruptWatchdog(grace_s)
    signal.signal(signal.SIGINT, watchdog)
    return watchdog
