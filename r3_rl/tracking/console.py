"""Console progress: a rich progress bar (ETA, current reward) on a terminal, a plain line every N steps otherwise.

When stdout is not a terminal (CI, ``nohup``, a pipe into a log file) a redrawn bar would flood the log
with control codes, so the console then writes one plain line every ``every`` steps (auto: about twenty
lines per run) plus the last step.
"""
from __future__ import annotations

import atexit
import math
import sys
from typing import IO, Any


def _f(metrics: dict[str, Any], key: str, spec: str = ".3f") -> str:
    v = metrics.get(key)
    if not isinstance(v, (int, float)) or not math.isfinite(v):
        return "-"
    return format(v, spec)


STAGE_KEYS = ("1_reward/generate", "2_accuracy/round0", "6_refine/delta_mean",
              "3_understanding/verdict_balanced_accuracy", "6_refine/stop_rate")  # status-line figures of a stage


def status_line(metrics: dict[str, Any], carried: frozenset[str] = frozenset()) -> str:
    """The per-step numbers worth watching: first-image reward/accuracy, refinement gain, the critic's verdict
    balanced accuracy, stop rate, loss (names: :mod:`r3_rl.tracking.metrics`); a figure of ``carried`` (from an
    earlier step: this one ran the other stage) is marked ``*``."""
    def f(key: str, spec: str = ".3f") -> str:
        return _f(metrics, key, spec) + ("*" if key in carried else "")

    return (f"reward A {f('1_reward/generate')}  acc A {f('2_accuracy/round0')}  "
            f"refine dR {f('6_refine/delta_mean', '+.3f')}  "
            f"verdict {f('3_understanding/verdict_balanced_accuracy', '.2f')}  "
            f"stop {f('6_refine/stop_rate', '.2f')}  loss {f('learner/loss', '+.4f')}")


def fmt_seconds(s: float) -> str:
    if not math.isfinite(s):
        return "?"
    s = int(round(s))
    h, rem = divmod(s, 3600)
    m, sec = divmod(rem, 60)
    return f"{h}:{m:02d}:{sec:02d}" if h else f"{m}:{sec:02d}"


class Console:
    """``print`` for messages, ``step`` after every training step, ``close`` at the end.

    ``every``: steps between plain lines when not on a terminal (0 = about twenty lines per run).
    ``file``/``tty`` exist for tests; by default the console writes to stdout and asks it whether it is a TTY.
    """

    def __init__(self, enabled: bool = True, every: int = 0, file: IO[str] | None = None,
                 tty: bool | None = None) -> None:
        from rich.console import Console as RichConsole

        self.enabled = enabled
        self.every = every
        self.file = file if file is not None else sys.stdout
        self.tty = self.file.isatty() if tty is None else tty
        self._rich = RichConsole(file=file, highlight=False, soft_wrap=True,
                                 force_terminal=True if tty else None)
        self._progress: Any = None
        self._task: Any = None
        self._first_step: int | None = None
        # the latest value of each status-line figure: a step that runs one stage only (tree.schedule: alternate)
        # shows the other stage's figures from the step that last had them
        self._latest: dict[str, Any] = {}

    def print(self, msg: str) -> None:
        if self.enabled:
            self._rich.print(msg)  # while a bar is live, rich prints above it

    def _interval(self, total: int) -> int:
        return self.every if self.every > 0 else max(1, total // 20)

    def step(self, step: int, total: int, metrics: dict[str, Any], elapsed: float) -> None:
        """Report training step ``step`` (0-based) of ``total``; ``elapsed`` seconds since this process started
        training (ETA is extrapolated from the steps done in this process, so it is right after a resume)."""
        if not self.enabled:
            return
        if self._first_step is None:
            self._first_step = step
        done = step + 1
        self._latest.update({k: v for k, v in metrics.items() if k in STAGE_KEYS})
        carried = frozenset(k for k in self._latest if k not in metrics)
        info = status_line({**self._latest, "learner/loss": metrics.get("learner/loss")}, carried)  # loss: this step's
        if self.tty:
            self._bar(done, total, info)
            return
        if done % self._interval(total) and done != total and step != self._first_step:
            return
        here = done - self._first_step
        eta = elapsed / here * (total - done) if here > 0 else float("nan")
        print(f"step {done:>{len(str(total))}}/{total}  {info}  elapsed {fmt_seconds(elapsed)}  "
              f"eta {fmt_seconds(eta)}", file=self.file, flush=True)

    def _bar(self, done: int, total: int, info: str) -> None:
        if self._progress is None:
            from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                                       TimeRemainingColumn)
            from rich.table import Column

            # the numbers fold onto a second line on narrow terminals instead of squeezing the bar away
            self._progress = Progress(TextColumn("[bold]train"), BarColumn(bar_width=24), MofNCompleteColumn(),
                                      TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(),
                                      TextColumn("{task.fields[info]}", table_column=Column(overflow="fold")),
                                      console=self._rich)
            self._progress.start()
            atexit.register(self.close)  # a run that dies mid-bar must not leave the terminal cursor hidden
            self._task = self._progress.add_task("train", total=total, completed=done - 1, info="")
        self._progress.update(self._task, completed=done, info=info)
        if done >= total:
            self.close()

    def close(self) -> None:
        """Stop a live progress bar (idempotent)."""
        if self._progress is not None:
            self._progress.stop()
            self._progress = None
