"""Console progress: a line per step with ETA and current reward (rich when on a TTY, plain otherwise)."""
from __future__ import annotations

import sys
from typing import Any


class Console:
    def __init__(self, enabled: bool = True, every: int = 1) -> None:
        from rich.console import Console as RichConsole

        self.enabled = enabled
        self.every = every
        self._rich = RichConsole(highlight=False, soft_wrap=True)
        self.tty = sys.stdout.isatty()

    def print(self, msg: str) -> None:
        if self.enabled:
            self._rich.print(msg)

    def step(self, step: int, total: int, metrics: dict[str, Any], elapsed: float) -> None:
        if not self.enabled or (step % self.every and step + 1 != total):
            return
        done = step + 1
        eta = elapsed / done * (total - done)
        self._rich.print(
            f"step {done:>4}/{total}  reward A {metrics.get('reward/generate/mean', float('nan')):.3f}  "
            f"acc A {metrics.get('accuracy/generate', float('nan')):.3f}  "
            f"refine dR {metrics.get('reward/reflect/delta_mean', float('nan')):+.3f}  "
            f"loss {metrics.get('learner/loss', float('nan')):+.4f}  "
            f"{elapsed:6.1f}s  eta {eta:5.0f}s")
