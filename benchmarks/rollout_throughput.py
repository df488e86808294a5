"""Rollout throughput (R3 trajectories/s) of the tiny blocks recipe: local vs 1 and 2 Ray workers, one run.

What is timed is what a training step's rollout costs: a weight sync (as after every learner step) and
then the step's Tree-RL tasks -- ``tree.prompts_per_step`` reason->generate groups and
``tree.refine_groups_per_step`` reflect->refine groups on buffered parents, ``group_size`` siblings each.
Every mode runs the very same tasks with the very same weights (they give identical trees; see
``tests/test_rollout_ray.py``), each sampler on one torch thread, so the ratios isolate Ray's cost
(1 worker vs local) and its scaling (2 workers vs 1; the physical limit on 2 cores is 2.0).  The modes take
turns, round after round, and each ratio is the median over rounds of the ratio within a round: one pass
of each, one after the other, swung the overhead between +10% and +18% on a quiet 2-core machine.

A trajectory is one Tree-RL tree (a prompt's group, or a parent's group).  The policy is the recipe's
tiny model at its random initialisation (no warm start): texts run to ``max_new_tokens``, the costly case.

    python benchmarks/rollout_throughput.py [--steps 8] [--rounds 3] [--groups-per-task 2] [--workers 1 2]
"""
from __future__ import annotations

import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from r3_rl.arguments import OneLineArgumentParser, int_at_least  # noqa: E402
from r3_rl.config import load_recipe  # noqa: E402
from r3_rl.data import PromptSource  # noqa: E402
from r3_rl.policy.registry import build_policy  # noqa: E402
from r3_rl.rollout.buffer import BufferEntry  # noqa: E402
from r3_rl.rollout.engine import LocalEngine, RolloutEngine, run_ordered  # noqa: E402
from r3_rl.rollout.tree_rl import RolloutTask, plan_tasks  # noqa: E402
from r3_rl.rollout.tree_rl import stage_sampling  # noqa: E402


def step_tasks(recipe, policy, steps: int) -> list[list[RolloutTask]]:
    t = recipe.tree
    src = PromptSource(recipe)
    seed_prompts = src.next_batch(t.refine_groups_per_step)
    first = run_ordered(LocalEngine(policy, recipe.templates.stop_phrase),
                        plan_tasks(0, 1, seed_prompts, [], 1, len(seed_prompts)), stage_sampling(recipe))
    parents = [BufferEntry(prompt=tr.prompt, image=tr.nodes["g0"].image, image_tokens=tr.nodes["g0"].image_tokens,
                           reward=0.0, correct=False, round=0, source=tr.id) for tr in first]
    return [plan_tasks(s, recipe.seed, src.next_batch(t.prompts_per_step), parents, t.group_size,
                       recipe.rollout.groups_per_task) for s in range(steps + 1)]


def measure(engine: RolloutEngine, policy, recipe, steps: list[list[RolloutTask]]) -> float:
    """Trajectories/s over all but the first (warm-up) step."""
    sampling = stage_sampling(recipe)
    run_ordered(engine, steps[0], sampling)
    n, t0 = 0, time.perf_counter()
    for tasks in steps[1:]:
        engine.sync(policy)
        n += len(run_ordered(engine, tasks, sampling))
    return n / (time.perf_counter() - t0)


def main() -> None:
    ap = OneLineArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int_at_least(1), default=8)
    ap.add_argument("--rounds", type=int_at_least(1), default=3)
    ap.add_argument("--groups-per-task", type=int_at_least(1), default=2)
    ap.add_argument("--workers", type=int_at_least(1), nargs="+", default=[1, 2])
    args = ap.parse_args()
    recipe = load_recipe(REPO / "recipes" / "tiny_blocks.yaml", [
        f"rollout.groups_per_task={args.groups_per_task}", "rollout.threads_per_worker=1",
        f"ray.num_cpus={max(2, sum(args.workers))}", "ray.log_to_driver=false"])
    torch.manual_seed(0)
    policy = build_policy(recipe)
    torch.set_num_threads(1)  # local mode samples on one thread, like one worker
    steps = step_tasks(recipe, policy, args.steps)
    t = recipe.tree
    print(f"tiny_blocks rollout: {args.steps} steps x ({t.prompts_per_step} + {t.refine_groups_per_step} groups of "
          f"{t.group_size}), {len(steps[0])} tasks/step, {os.cpu_count()} cores, {args.rounds} rounds")
    from r3_rl.rollout.ray_engine import RayEngine

    engines: dict[str, RolloutEngine] = {"local": LocalEngine(policy, recipe.templates.stop_phrase)}
    try:
        for w in args.workers:  # all alive at once (idle workers cost nothing), so the modes take turns
            recipe.rollout.workers = w
            engines[f"ray x{w}"] = RayEngine(recipe, policy, lambda m: print("event:", m))
        rounds = [{name: measure(engine, policy, recipe, steps) for name, engine in engines.items()}
                  for _ in range(args.rounds)]
    finally:
        for engine in reversed(list(engines.values())):  # the engine that started Ray stops it, last
            engine.close()
    import ray

    ray.shutdown()
    print(f"{'round':6s} " + " ".join(f"{name:>9s}" for name in engines) + "   trajectories/s")
    for i, result in enumerate(rounds):
        print(f"{i + 1:<6d} " + " ".join(f"{result[name]:9.2f}" for name in engines))
    if "ray x1" in engines:  # a ratio per round (the modes ran side by side in time), then their median
        overhead = statistics.median(r["local"] / r["ray x1"] - 1 for r in rounds)
        print(f"Ray overhead at 1 worker vs local: {100 * overhead:+.1f}% (median of {args.rounds} rounds; "
              f"goal <= 15%)")
    if "ray x1" in engines and "ray x2" in engines:
        scaling = statistics.median(r["ray x2"] / r["ray x1"] for r in rounds)
        print(f"2 workers / 1 worker: {scaling:.2f}x (median of {args.rounds} rounds; physical limit 2.0; "
              f"goal >= 1.6)")


if __name__ == "__main__":
    main()
