"""Measured peak memory of torch allocations on CPU, from the torch profiler's memory events.

Used to check :mod:`r3_rl.plan.memory`'s predictions (tests, ``benchmarks/plan_memory.py``): the profiler
records every CPU allocation and free with its size and time, so the running sum of those events is the
memory torch holds, and its maximum is the peak -- the CPU counterpart of ``torch.cuda.max_memory_allocated``.
Only tensors allocated and freed while profiling count (what existed before is the caller's baseline);
allocations made on other threads than the caller's are not seen (run with ``torch.set_num_threads(1)``).
"""
from __future__ import annotations

from typing import Any, Callable, TypeVar

T = TypeVar("T")


def measured_peak(fn: Callable[[], T]) -> tuple[T, int]:
    """``(fn(), peak bytes allocated by torch on CPU while it ran, above what was allocated before)``."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out = fn()
    events: list[Any] = prof.profiler.kineto_results.events()  # type: ignore[union-attr]
    changes = sorted((e.start_ns(), e.nbytes()) for e in events if e.name() == "[memory]")
    live = peak = 0
    for _, nbytes in changes:
        live += nbytes
        peak = max(peak, live)
    return out, peak
