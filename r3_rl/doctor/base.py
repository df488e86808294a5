"""What every doctor check shares: a :class:`Finding` per printed line, and the :class:`Context` of facts
(the recipe, visible GPUs, the policy's size) computed once and reused by the checks that need them."""
from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal

from r3_rl.doctor.devices import physical_memory

Status = Literal["ok", "skipped", "problem"]


@dataclass
class Finding:
    status: Status
    detail: str
    fix: str = ""
    check: str = ""  # filled in with the check's name unless the check names its findings itself

    def line(self) -> str:
        text = f"{self.status:8s} {self.check:9s} {self.detail}"
        return text + (f"; fix: {self.fix}" if self.fix else "")


def ok(detail: str) -> Finding:
    return Finding("ok", detail)


def skipped(detail: str) -> Finding:
    return Finding("skipped", detail)


def problem(detail: str, fix: str = "") -> Finding:
    return Finding("problem", detail, fix)


def disk_free(path: Path) -> int:
    """Free bytes on the file system holding ``path`` (its nearest existing ancestor)."""
    path = path.resolve()
    while not path.exists():
        path = path.parent
    return shutil.disk_usage(path).free


@dataclass
class Context:
    """What the checks share: the recipe, and facts computed once (GPUs, model size) on first use."""

    recipe_path: Path
    recipe: Any
    free_bytes: Callable[[Path], int] = disk_free  # tests inject a full disk here
    host_memory: Callable[[], int] = physical_memory  # tests inject a small node
    timeout: float = 3.0  # seconds for a network probe (a TCP connect, a health check)
    ray_timeout: float = 30.0  # seconds to join a Ray cluster and read its resources
    problems: int = 0  # problems found by the checks so far
    _memo: dict[str, Any] = field(default_factory=dict)

    def memo(self, key: str, compute: Callable[[], Any]) -> Any:
        if key not in self._memo:
            try:
                self._memo[key] = compute()
            except Exception as e:  # noqa: BLE001 - kept and re-raised to every check that needs it
                self._memo[key] = e
        value = self._memo[key]
        if isinstance(value, Exception):
            raise value
        return value

    def gpus(self) -> list[Any]:
        from r3_rl.doctor import devices

        return self.memo("gpus", devices.visible_gpus)

    def model(self) -> Any:
        """:class:`r3_rl.weights.ModelFacts` of the policy; raises :class:`r3_rl.weights.WeightsMissing`."""
        from r3_rl.weights import policy_facts

        return self.memo("model", lambda: policy_facts(self.recipe))
