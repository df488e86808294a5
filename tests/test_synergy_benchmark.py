"""``benchmarks/r3_synergy.py`` shares the machine's cores between runs: two 2-thread runs never share 2 cores
(measured: each about 8x slower than alone, OpenMP threads spinning against each other)."""
from __future__ import annotations

import importlib.util
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "r3_synergy.py"


def _bench():
    spec = importlib.util.spec_from_file_location("r3_synergy_bench", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _budget_class():
    return _bench().CoreBudget


def _peak_threads(cores: int, asks: list[int]) -> int:
    """Run one short job per entry of ``asks`` (its thread count), all submitted at once; the most threads
    held at the same moment."""
    budget = _budget_class()(cores)
    lock, held, peak = threading.Lock(), [0], [0]

    def job(n: int) -> None:
        with budget.hold(n):
            with lock:
                held[0] += min(n, cores)
                peak[0] = max(peak[0], held[0])
            time.sleep(0.05)
            with lock:
                held[0] -= min(n, cores)

    with ThreadPoolExecutor(max_workers=len(asks)) as pool:
        list(pool.map(job, asks))
    assert budget.free == budget.total  # every hold given back
    return peak[0]


def test_two_thread_runs_never_share_two_cores() -> None:
    assert _peak_threads(2, [2, 2, 2]) == 2  # one at a time
    assert _peak_threads(2, [1, 1, 1, 1]) == 2  # two 1-thread runs side by side
    assert _peak_threads(4, [2, 2, 1, 1]) <= 4


def test_a_run_asking_for_more_than_the_machine_still_runs_alone() -> None:
    assert _peak_threads(2, [8, 8]) == 2  # capped at the total, one at a time, no deadlock


def test_runs_start_fewest_threads_first_so_one_thread_runs_pair_up() -> None:
    """In seed order, the second of two workers takes seed 0's 2-thread run, which waits for both cores while
    seed 0's 1-thread run trains alone; fewest threads first, the 1-thread runs share the cores."""
    configs = [(s, t) for s in (0, 1, 2) for t in (1, 2)]
    launch = _bench().launch_order(configs)
    assert launch == [(0, 1), (1, 1), (2, 1), (0, 2), (1, 2), (2, 2)]
    assert _peak_threads(2, [t for _, t in launch][:2]) == 2  # the first two side by side
