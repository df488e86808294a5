"""File writes the training loop hands off: a trajectory dump is written while the next step samples and learns.

Why: a logged step's dump (``log.dump_trees`` trees, ``trajectories/step_N.jsonl`` and its PNGs) is PNG
encoding -- about 0.16 s per 1024 px image, so a full dump of 1024 px images (64 trees of 8) blocks the loop for
a minute and a half (``python benchmarks/dump_writes.py``); the shipped BAGEL recipe's (4 trees of 16 images of
512 px a step) for a few seconds.  Pillow's encoder, zlib and the file writes release the GIL, so on a
thread they overlap the next step's GPU work.

Rules: one write at a time and none queued (``submit`` waits for the one under way first: besides the loop's
own trees, memory holds at most one dump's copy, whose images the loop already holds).  A write that fails is not lost: its error is raised by the next
``submit`` or by ``wait``, naming what was being written.  ``close(raise_errors=False)`` -- the trainer's clean-up,
which may run while another exception is under way -- reports it through ``on_error`` instead of raising.
"""
from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Callable


class BackgroundWriteError(RuntimeError):
    """A write handed to :class:`BackgroundWriter` failed; the message names it and its error."""


class BackgroundWriter:
    """Runs ``submit``-ted writes on one thread, in order, one at a time."""

    def __init__(self) -> None:
        self._pool: ThreadPoolExecutor | None = None
        self._pending: tuple[str, Future[Any]] | None = None

    def submit(self, what: str, fn: Callable[..., Any], *args: Any) -> None:
        """Start ``fn(*args)`` off the calling thread, once the previous write has finished (its error raised
        here).  ``what`` names the write in an error ("trajectories/step_000020.jsonl")."""
        self.wait()
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="r3rl-writer")
        self._pending = (what, self._pool.submit(fn, *args))

    def wait(self) -> None:
        """Block until the write under way (if any) has finished; raise :class:`BackgroundWriteError` if it failed."""
        if self._pending is None:
            return
        what, future = self._pending
        self._pending = None
        error = future.exception()
        if error is not None:
            raise BackgroundWriteError(f"writing {what} failed: {type(error).__name__}: {error}") from error

    def close(self, raise_errors: bool = True, on_error: Callable[[str], None] | None = None) -> None:
        """Finish the write under way and stop the thread; safe to call twice."""
        try:
            self.wait()
        except BackgroundWriteError as e:
            if raise_errors:
                raise
            if on_error is not None:
                on_error(str(e))
        finally:
            if self._pool is not None:
                self._pool.shutdown(wait=True)
                self._pool = None
