"""R3's claim is not luck: the demo recipe with several seeds and torch thread counts, the three figures of each.

Runs ``r3-rl train RECIPE --set seed=S --set threads=T`` for every seed and thread count (default 3 seeds x
{1, 2} threads = 6 runs, at most ``--parallel`` at once), reads each run's ``summary.json`` and prints, per run
and as mean / standard deviation / minimum over the runs:

* first-image accuracy after RL minus before RL (goal >= +10 points),
* after RL, final-round minus first-image accuracy (goal >= +5 points),
* the critic's verdict balanced accuracy after RL minus before RL (goal >= +10 points), with the same
  within tags (mean of the per-tag figures: what a critic that reads only the prompt cannot raise) and on
  the fixed reference images beside it, and the change in its yes/no answers about its own images
  (balanced accuracy),

and whether each goal holds on *every* run (the claim), not only on the mean.  Beside each figure's spread
between runs it prints the spread one eval's own sampling gives (the root mean square of the runs' standard
errors, :func:`r3_rl.eval.synergy.synergy_errors`): where the two are alike, the runs differ mostly by which
images the evals happened to sample; where the spread between runs is larger, training itself varies.  Wall
times are per run and include the warm start and every eval; runs that share the machine are slower than one
run alone.

    python benchmarks/r3_synergy.py [--seeds 0 1 2] [--threads 1 2] [--parallel 2] [--out runs/synergy]
                                    [--set key=value ...]

A run directory that already holds a ``summary.json`` is read, not run again (``--fresh`` to redo); its figures
are computed again from its ``eval/before.json`` and ``eval/after.json``.

Runs at once never ask for more torch threads than ``--cores`` (default: the machine's): a 2-thread run waits
until two cores are free.  Two 2-thread runs on 2 cores took about 8x as long each as one alone (OpenMP threads
that outnumber the cores spin against each other; measured 2026-12-04), so ``--parallel`` alone is not enough.

Bad input (a missing recipe, an unknown ``--set`` key, a seed list that is empty) is one line and exit 2 before
any run starts.  Ctrl-C or SIGTERM stops the runs under way as Ctrl-C stops ``r3-rl train`` (their clean-up
included), starts no more, and exits 130: killing the benchmark never leaves a training process behind.  A run
that fails starts no more either; those under way finish (a rerun reads them) and the benchmark exits 1.
"""
from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from r3_rl.arguments import OneLineArgumentParser, int_at_least  # noqa: E402
from r3_rl.environment import differences, read_records, summary_line  # noqa: E402
from r3_rl.errors import EXIT_USAGE, UserError  # noqa: E402
from r3_rl.eval.synergy import GOALS, near_miss, synergy_figures  # noqa: E402

FIGURES = ("first_image_gain", "refinement_after", "verdict_gain")
EXTRA = ("within_tag_verdict_gain", "reference_verdict_gain", "yes_no_gain", "stop_rate_after")


class CoreBudget:
    """The cores runs may share: ``hold(n)`` waits until ``n`` are free (``n`` capped at the total, so a run
    asking for more than the machine has still runs, alone)."""

    def __init__(self, cores: int) -> None:
        self.total = self.free = max(1, cores)
        self._cond = threading.Condition()

    @contextmanager
    def hold(self, n: int):
        n = min(max(1, n), self.total)
        with self._cond:
            self._cond.wait_for(lambda: self.free >= n)
            self.free -= n
        try:
            yield
        finally:
            with self._cond:
                self.free += n
                self._cond.notify_all()


class Runs:
    """The training processes under way, so that an interrupted benchmark stops them and starts no more.

    Each run is its own process group: a Ctrl-C in the terminal reaches the benchmark only, which passes one
    SIGINT to each run (``r3-rl train``'s clean-up path; a second would skip the clean-up)."""

    def __init__(self, grace_s: float = 75.0) -> None:
        self.grace_s = grace_s  # the CLI's own watchdog ends a stuck clean-up after 60 s
        self._lock = threading.Lock()
        self._live: set[subprocess.Popen] = set()
        self.stopping = False

    def run(self, cmd: list[str], log: Path, **popen: object) -> int:
        """Run ``cmd`` to its end, its output to ``log``; its exit code."""
        with self._lock:
            if self.stopping:  # before the log is opened: a run that never started leaves no file
                raise RuntimeError("benchmark interrupted: no more runs start")
            with open(log, "w") as out:
                proc = subprocess.Popen(cmd, start_new_session=True, stdout=out, stderr=subprocess.STDOUT, **popen)
            self._live.add(proc)
        try:
            return proc.wait()
        finally:
            with self._lock:
                self._live.discard(proc)

    def close(self) -> int:
        """No further run starts (the ones under way go on); how many are under way."""
        with self._lock:
            self.stopping = True
            return len(self._live)

    def stop(self) -> int:
        """Interrupt every run under way, wait for their clean-up (killed after ``grace_s``); how many there were."""
        with self._lock:
            self.stopping = True
            live = list(self._live)
        for proc in live:
            proc.send_signal(signal.SIGINT)
        deadline = time.time() + self.grace_s
        for proc in live:
            try:
                proc.wait(timeout=max(0.1, deadline - time.time()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        return len(live)


def check_inputs(recipe: str, seeds: list[int], threads: list[int], sets: list[str]) -> None:
    """What ``r3-rl train`` would refuse, refused before the first run: the recipe with every run's overrides,
    loaded and checked as the CLI does (no model is built); raises :class:`UserError`.

    The first run's recipe gets the CLI's whole check (prompt files read, plug-ins imported); the others differ
    from it only in ``seed`` and ``threads``, whose checks are the recipe's own bounds (at load) and the size
    limits of :func:`check_numbers`, so those are all they get.  (The parser already refused an empty list.)"""
    from r3_rl.config import load_recipe
    from r3_rl.validate import check_numbers, validate_recipe

    first, *others = [(seed, t) for seed in seeds for t in threads]
    validate_recipe(load_recipe(recipe, [*run_overrides(*first), *sets]), recipe)
    for seed, t in others:
        check_numbers(load_recipe(recipe, [*run_overrides(seed, t), *sets]).model_dump(mode="python"), recipe)


def run_overrides(seed: int, threads: int) -> list[str]:
    return [f"seed={seed}", f"threads={threads}", "log.console=false"]


def run_one(recipe: str, out: Path, seed: int, threads: int, sets: list[str], fresh: bool,
            cores: CoreBudget, runs: Runs) -> tuple[dict, float]:
    """Train one configuration (or read its finished run); returns (synergy figures, wall seconds)."""
    run_dir = out / f"seed{seed}-threads{threads}"
    summary = run_dir / "summary.json"
    if summary.is_file() and not fresh:
        data = json.loads(summary.read_text())
        return _figures(run_dir, data), float(data.get("wall_s", math.nan))
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    cmd = [sys.executable, "-m", "r3_rl.cli", "train", recipe, "--run-dir", str(run_dir)]
    for s in [*run_overrides(seed, threads), *sets]:
        cmd += ["--set", s]
    with cores.hold(threads):
        t0 = time.time()
        log = out / f"seed{seed}-threads{threads}.log"
        rc = runs.run(cmd, log, cwd=REPO, env=env)
        wall = time.time() - t0
    if rc != 0:
        raise SystemExit(f"run seed={seed} threads={threads} failed (exit {rc}); see {log}")
    data = json.loads(summary.read_text())
    data["wall_s"] = wall
    summary.write_text(json.dumps(data, indent=2))
    return _figures(run_dir, data), wall


def _figures(run_dir: Path, summary: dict) -> dict:
    """The figures from the run's eval reports (so a run from before a figure existed shows it too), else
    the ones its ``summary.json`` stored."""
    before, after = run_dir / "eval" / "before.json", run_dir / "eval" / "after.json"
    if before.is_file() and after.is_file():
        return synergy_figures(json.loads(before.read_text()), json.loads(after.read_text()))
    return summary["synergy"]


def print_environments(out: Path, configs: list[tuple[int, int]]) -> None:
    """Where the runs ran (their ``environment.json``): the figures hang on the CPU's kernels and the packages
    as well as on the seed, so a table that mixes machines says so.  Thread counts differ by design."""
    by_design = ("torch_threads", "OMP_NUM_THREADS", "MKL_NUM_THREADS")
    starts = {c: (read_records(out / f"seed{c[0]}-threads{c[1]}") or [None])[0] for c in configs}
    first = next((env for env in starts.values() if env is not None), None)
    if first is None:
        return
    print(f"\nenvironment: {summary_line(first)}")
    for (seed, threads), env in starts.items():
        run = f"seed {seed}, {threads} thread{'s' if threads != 1 else ''}"
        if env is None:
            print(f"  {run}: no environment.json (trained before runs recorded it)")
        elif moved := differences(first, env, ignore=by_design):
            print(f"  {run} ran elsewhere: {'; '.join(moved)}")


def launch_order(configs: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """(seed, threads) configurations in the order to start them: fewest threads first, so that 1-thread runs
    pair up on the cores.  In seed order seed 0's 2-thread run, queued second, holds the other worker while it
    waits for both cores, the next 1-thread run then waits behind it, and so on: every run trains alone (seen in
    session 30: seed 0's 1-thread run trained by itself)."""
    return sorted(configs, key=lambda c: c[1])


def run_all(recipe: str, out: Path, configs: list[tuple[int, int]], sets: list[str], fresh: bool, parallel: int,
            cores: CoreBudget) -> dict[tuple[int, int], tuple[dict, float]]:
    """Every configuration's (figures, wall seconds), at most ``parallel`` at once.  Ctrl-C or SIGTERM stops the
    runs under way (:class:`Runs`) and exits 130; a failed run starts no more, lets those under way finish (a
    rerun reads them) and exits 1."""
    runs = Runs()
    launch = launch_order(configs)
    pool = ThreadPoolExecutor(max_workers=max(1, parallel))

    def interrupted(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    def job(config: tuple[int, int]) -> tuple[dict, float]:
        try:
            return run_one(recipe, out, config[0], config[1], sets, fresh, cores, runs)
        except SystemExit:
            runs.close()  # here, before this worker takes the next configuration
            raise

    previous = signal.signal(signal.SIGTERM, interrupted)
    try:
        futures = {c: pool.submit(job, c) for c in launch}
        try:
            return {c: f.result() for c, f in futures.items()}
        except SystemExit as failed:  # a run failed: the table cannot be whole; the runs under way are kept
            under_way = runs.close()
            print(f"r3_synergy: {failed}; no further run starts, {under_way} under way finish first "
                  "(Ctrl-C stops them)", file=sys.stderr)
            pool.shutdown(wait=True, cancel_futures=True)
            raise SystemExit(1) from None
    except KeyboardInterrupt:
        stopped = runs.stop()
        pool.shutdown(wait=True, cancel_futures=True)
        print(f"r3_synergy: interrupted; stopped {stopped} run(s) under way; finished runs are kept in {out}",
              file=sys.stderr)
        sys.exit(130)
    finally:
        pool.shutdown(wait=False, cancel_futures=True)
        signal.signal(signal.SIGTERM, previous)


def stats(xs: list[float]) -> tuple[float, float, float]:
    m = sum(xs) / len(xs)
    sd = math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else 0.0
    return m, sd, min(xs)


def main() -> None:
    ap = OneLineArgumentParser(prog="r3_synergy", description=__doc__.split("\n\n")[0])
    ap.add_argument("--recipe", default=str(REPO / "recipes" / "tiny_blocks.yaml"))
    ap.add_argument("--seeds", type=int_at_least(0), nargs="+", default=[0, 1, 2])
    ap.add_argument("--threads", type=int_at_least(1), nargs="+", default=[1, 2])
    ap.add_argument("--parallel", type=int_at_least(1), default=2, help="runs at once (each uses its own thread count)")
    ap.add_argument("--cores", type=int_at_least(1), default=os.cpu_count() or 1,
                    help="torch threads all runs at once may use together (default: this machine's cores)")
    ap.add_argument("--out", default=str(REPO / "runs" / "synergy"))
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="recipe override for every run")
    ap.add_argument("--fresh", action="store_true", help="rerun configurations that already have a summary")
    args = ap.parse_args()
    try:
        check_inputs(args.recipe, args.seeds, args.threads, args.set)
    except UserError as e:
        print(f"r3_synergy: error: {e}", file=sys.stderr)
        sys.exit(EXIT_USAGE)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    configs = [(s, t) for s in args.seeds for t in args.threads]
    done = run_all(args.recipe, out, configs, args.set, args.fresh, args.parallel, CoreBudget(args.cores))
    results = [done[c] for c in configs]

    def pts(x: float, goal: float | None = None) -> str:
        if not math.isfinite(x):
            return "   nan"
        return f"{100 * x:+6.2f}" if goal is not None and near_miss(x, goal) else f"{100 * x:+6.1f}"

    head = ("| seed | threads | first image | refinement after RL | verdict | (within tags) | (reference set) "
            "| (yes/no, own images) | stop rate after | wall |")
    print(f"R3 synergy, {args.recipe}: figures in accuracy points (after RL minus before RL, except refinement)\n")
    print(head + "\n|" + "---|" * 10)
    for (seed, threads), (fig, wall) in zip(configs, results):
        goal_cells = " | ".join(pts(fig[k], GOALS[k]) for k in FIGURES)
        extra_cells = " | ".join(pts(fig.get(k, math.nan)) for k in EXTRA[:3])
        wall_cell = "-" if math.isnan(wall) else f"{wall / 60:.1f} min"  # a run trained elsewhere: not timed here
        print(f"| {seed} | {threads} | {goal_cells} | {extra_cells} | {fig['stop_rate_after']:.3f} | {wall_cell} |")
    print()
    every = {}
    for k in FIGURES + EXTRA[:3]:
        xs = [fig.get(k, math.nan) for fig, _ in results]
        m, sd, lo = stats(xs)
        goal = GOALS.get(k)
        every[k] = goal is not None and all(x >= goal for x in xs)
        verdict = f"goal >= {100 * goal:+.0f}: {'met on every run' if every[k] else 'NOT met on every run'}" \
            if goal is not None else "no goal"
        ses = [x for x in (fig.get(f"{k}_se", math.nan) for fig, _ in results) if math.isfinite(x)]
        # runs whose reports predate the errors are left out of this root mean square (and counted)
        part = f", {len(ses)} of {len(results)} runs" if 0 < len(ses) < len(results) else ""
        eval_sd = f"  (one eval's own sampling: sd {100 * math.sqrt(sum(x * x for x in ses) / len(ses)):.1f}{part})" \
            if ses else ""
        print(f"{k:24s} mean {pts(m)}  sd {100 * sd:5.1f}  min {pts(lo, goal)}   ({verdict}){eval_sd}")
    print_environments(out, configs)
    runs_ok = sum(all(fig[k] >= GOALS[k] for k in FIGURES) for fig, _ in results)
    print(f"\n{runs_ok} of {len(results)} runs meet all three goals: "
          + ("all goals met on every run" if all(every[k] for k in FIGURES) else "some goal missed on some run"))


if __name__ == "__main__":
    main()
