"""``benchmarks/r3_synergy.py`` shares the machine's cores between runs: two 2-thread runs never share 2 cores
(measured: each about 8x slower than alone, OpenMP threads spinning against each other)."""
from __future__ import annotations

import importlib.util
import os
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from sim_cluster import processes_under

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


def _run_bench(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(BENCH), *args], capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("args, names", [
    (["--recipe", "{tmp}/missing.yaml"], "missing.yaml: recipe file not found"),
    (["--set", "learner.lrr=1e-4"], "unknown key 'learner.lrr'"),
    (["--threads", "-1"], "argument --threads: must be an integer >= 1, got '-1'"),
    (["--parallel", "0"], "argument --parallel: must be an integer >= 1, got '0'"),
    (["--cores", "0"], "argument --cores: must be an integer >= 1, got '0'"),
    (["--seeds", "0", "-1"], "argument --seeds: must be an integer >= 0, got '-1'"),
    (["--seeds", "0", "2147483648"], "key 'seed'"),  # every run's recipe is checked, not only the first
])
def test_bad_input_is_one_line_and_exit_2_before_any_run(tmp_path: Path, args: list[str], names: str) -> None:
    out = tmp_path / "out"
    proc = _run_bench(*[a.format(tmp=tmp_path) for a in args], "--out", str(out))
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("r3_synergy: error: ") and names in lines[0], proc.stderr
    assert not out.exists()  # no run directory, no log: nothing started


def _wait_for(path: Path, timeout: float = 30) -> None:
    """Until the child has written ``path`` (it is up and has installed its SIGINT handler)."""
    deadline = time.time() + timeout
    while not path.exists():
        assert time.time() < deadline, f"{path} never appeared"
        time.sleep(0.05)


_INTERRUPTIBLE = """
import pathlib, signal, sys, time
def cleanup(signum, frame):
    pathlib.Path(sys.argv[1]).write_text("cleaned up")
    sys.exit(130)
signal.signal(signal.SIGINT, cleanup)
pathlib.Path(sys.argv[2]).write_text("started")
time.sleep(120)
"""


def test_stopping_interrupts_runs_under_way_once_and_starts_no_more(tmp_path: Path) -> None:
    """One SIGINT reaches each run (the CLI's clean-up path), the benchmark waits for it, and no run starts after."""
    runs = _bench().Runs(grace_s=30)
    cleaned, started = tmp_path / "cleaned", tmp_path / "started"
    codes: list[int] = []
    worker = threading.Thread(target=lambda: codes.append(
        runs.run([sys.executable, "-c", _INTERRUPTIBLE, str(cleaned), str(started)], tmp_path / "a.log")))
    worker.start()
    _wait_for(started)
    assert runs.stop() == 1
    worker.join(timeout=30)
    assert codes == [130] and cleaned.read_text() == "cleaned up"
    with pytest.raises(RuntimeError, match="no more runs start"):
        runs.run([sys.executable, "-c", "pass"], tmp_path / "b.log")
    assert not (tmp_path / "b.log").exists()


def test_a_run_that_ignores_the_interrupt_is_killed_after_the_grace(tmp_path: Path) -> None:
    runs = _bench().Runs(grace_s=0.5)
    started = tmp_path / "started"
    stubborn = ("import pathlib, signal, sys, time; signal.signal(signal.SIGINT, signal.SIG_IGN); "
                "pathlib.Path(sys.argv[1]).write_text('x'); time.sleep(120)")
    codes: list[int] = []
    worker = threading.Thread(target=lambda: codes.append(runs.run([sys.executable, "-c", stubborn, str(started)],
                                                                   tmp_path / "a.log")))
    worker.start()
    _wait_for(started)
    t0 = time.time()
    assert runs.stop() == 1
    worker.join(timeout=30)
    assert codes == [-signal.SIGKILL] and time.time() - t0 < 10


def test_sigterm_stops_the_training_process_too(tmp_path: Path) -> None:
    """Killing the benchmark by its PID used to leave its ``r3-rl train`` child training (session 30)."""
    out = tmp_path / "out"
    bench = subprocess.Popen([sys.executable, str(BENCH), "--seeds", "0", "--threads", "1", "--out", str(out),
                              "--set", "warmstart.steps=100000"], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    run_dir = str(out / "seed0-threads1")
    try:
        deadline = time.time() + 60
        # the run dir's recipe.yaml: the CLI has checked the recipe and is starting the warm start
        while not (processes_under(run_dir) and (out / "seed0-threads1" / "recipe.yaml").exists()):
            assert time.time() < deadline and bench.poll() is None, "the training run did not start"
            time.sleep(0.2)
        time.sleep(2)  # inside the warm start
        bench.send_signal(signal.SIGTERM)
        _, err = bench.communicate(timeout=120)
        assert bench.returncode == 130, err
        assert "stopped 1 run(s) under way" in err
        assert processes_under(run_dir) == []
        assert "interrupted" in (out / "seed0-threads1.log").read_text()  # the CLI's own clean-up path ran
    finally:  # a failing test leaves nothing training
        bench.kill()
        for pid in processes_under(run_dir):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def test_a_failed_run_starts_no_more_and_lets_the_runs_under_way_finish(tmp_path: Path, capsys) -> None:
    bench = _bench()
    finished: list[tuple[int, int]] = []

    def fake_run_one(recipe, out, seed, threads, sets, fresh, cores, runs):
        if seed == 0:
            time.sleep(0.2)  # seed 1 is under way by then
            raise SystemExit(f"run seed={seed} threads={threads} failed (exit 1); see LOG")
        runs.run([sys.executable, "-c", "import time; time.sleep(1)"], out / f"seed{seed}.log")
        finished.append((seed, threads))
        return {}, 1.0

    bench.run_one = fake_run_one
    with pytest.raises(SystemExit) as e:
        bench.run_all("r.yaml", tmp_path, [(0, 1), (1, 1), (2, 1)], [], False, 2, bench.CoreBudget(2))
    assert e.value.code == 1
    assert finished == [(1, 1)]  # seed 1 finished; seed 2 never started
    assert not (tmp_path / "seed2.log").exists()
    err = capsys.readouterr().err
    assert "run seed=0 threads=1 failed" in err and "1 under way finish first" in err
