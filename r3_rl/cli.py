"""``r3-rl`` command line.  Bad input -> one line on stderr and exit code 2, never a traceback."""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
from pathlib import Path
from typing import Any, Callable

from r3_rl.arguments import OneLineArgumentParser, float_up_to, int_at_least, int_between
from r3_rl.errors import EXIT_USAGE, UserError

# Ceilings of the numeric flags: well past any real use, low enough that a typo (an extra zero, 1e300, inf) is
# refused while parsing instead of turning into a plan for a million GPUs or a byte count that overflows.
MAX_ROLLOUT_PROMPTS = 100_000
MAX_PLAN_GPUS = 4096
MAX_GPU_MEMORY_GB = 4096.0
MAX_SERVER_MIB = float(1 << 20)  # request bodies: 1 TiB
MAX_SERVER_COUNT = 1 << 20  # images per request, requests at once
MAX_SERVER_PIXELS = 1 << 31  # decoded pixels per image
MAX_CLIENT_TIMEOUT_S = 86_400.0


def _recipe(args: argparse.Namespace, model: str | None = None) -> Any:
    """Load the recipe (``model`` replaces ``policy.model``) and check all of it -- data, rewards, sizes, run dir --
    before any work is done."""
    from r3_rl.config import load_recipe
    from r3_rl.validate import check_run_dir, validate_recipe

    recipe = load_recipe(args.recipe, args.set)
    if model is not None:
        recipe.policy.model = model
    validate_recipe(recipe, args.recipe, needs_eval=args.command != "rollout")
    check_run_dir(recipe, getattr(args, "run_dir", None))
    return recipe


def cmd_train(args: argparse.Namespace) -> int:
    recipe = _recipe(args)  # before the heavy imports below: a bad recipe fails in a second or two
    from r3_rl.run_dir import make_run_dir
    from r3_rl.trainer import Trainer

    ckpt, resume_dir, checked = None, None, None
    if args.resume:
        from r3_rl.learner.checkpoint import check_resumable, find_resume, newest_sound

        ckpt, resume_dir = find_resume(args.resume, recipe, args.run_dir)
        if ckpt is not None and args.resume == "auto":  # a damaged newest checkpoint: the one before it, said
            ckpt, checked = newest_sound(ckpt, recipe, lambda m: print(f"r3-rl: {m}", file=sys.stderr))
        elif ckpt is not None:
            checked = check_resumable(ckpt, recipe)  # incompatible, damaged or a planted pickle: before any work
    target = str(resume_dir) if resume_dir is not None else args.run_dir
    if ckpt is not None and target is not None:  # the baseline the resumed run's gains are measured against
        from r3_rl.eval.evaluate import read_report

        read_report(Path(target) / "eval", "before")
    fresh = target is None or not Path(target).exists()
    run_dir = make_run_dir(recipe, target)
    try:
        trainer = Trainer(recipe, run_dir)
    except UserError:  # e.g. a reward server that is down: a run dir made for nothing is not left behind
        if fresh and [p.name for p in run_dir.iterdir()] == ["recipe.yaml"]:
            shutil.rmtree(run_dir)
        raise
    if ckpt is not None:
        trainer.resume(ckpt, checked)
    summary = trainer.train()
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    return 0


def _sampling_parts(recipe: Any, run_dir: str | None, command: str) -> tuple[Any, Any, Any]:
    """What ``eval`` and ``rollout`` run on: the run dir, the parts builder (which will build the policy and
    rewards, never an optimiser, a reference or learner ranks) and the prompt source."""
    import torch

    from r3_rl.components import Components
    from r3_rl.data import PromptSource
    from r3_rl.environment import record_environment
    from r3_rl.run_dir import make_run_dir
    from r3_rl.tracking.console import Console

    if recipe.threads:
        torch.set_num_threads(recipe.threads)
    torch.manual_seed(recipe.seed)
    out = make_run_dir(recipe, run_dir)
    record_environment(out, command)
    return out, Components(recipe, out, Console(enabled=recipe.log.console)), PromptSource(recipe)


def cmd_eval(args: argparse.Namespace) -> int:
    if not Path(args.checkpoint).is_dir():
        raise UserError(f"--checkpoint {args.checkpoint}: no such directory")
    recipe = _recipe(args, model=str(args.checkpoint))
    from r3_rl.eval.evaluate import markdown_table
    from r3_rl.eval.runner import Evaluator
    from r3_rl.tracking.logger import MetricsLogger

    recipe.name = f"{recipe.name}-eval"
    run_dir, parts, data = _sampling_parts(recipe, args.run_dir, args.command)
    metrics = MetricsLogger(run_dir, tensorboard=recipe.log.tensorboard)
    try:
        report = Evaluator(recipe, parts.policy, parts.eval_rewards, data, metrics, run_dir).run("eval", 0)
    finally:
        parts.close()
        metrics.close()  # flush the TensorBoard event file
    print(markdown_table(report))
    print(f"report: {run_dir / 'eval' / 'eval.json'} (+ .md, .html, TensorBoard in {run_dir / 'tb'})")
    return 0


def cmd_rollout(args: argparse.Namespace) -> int:
    recipe = _recipe(args)
    from r3_rl.eval.evaluate import score_chains
    from r3_rl.rollout.chain import r3_chains
    from r3_rl.rollout.tree_rl import stage_sampling
    from r3_rl.trajectory import write_trees

    recipe.name = f"{recipe.name}-rollout"
    run_dir, parts, data = _sampling_parts(recipe, args.run_dir, args.command)
    try:
        trees = r3_chains(parts.policy, data.next_batch(args.num), stage_sampling(recipe), recipe.eval.rounds,
                          recipe.templates.stop_phrase, seed=recipe.seed, batch_size=recipe.eval.batch_size,
                          tag="rollout")
        score_chains(trees, recipe.eval.rounds, parts.eval_rewards, recipe.rewards.correct_threshold)
    finally:
        parts.close()
    out = write_trees(trees, run_dir / "rollout.jsonl")
    print(f"wrote {len(trees)} trajectories to {out}")
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    from r3_rl.inspect import inspect_run

    text, _ = inspect_run(args.run_dir, step=args.step, eval_name=args.eval, html=args.html, limit=args.limit)
    print(text)
    return 0


def cmd_rewards(args: argparse.Namespace) -> int:
    from r3_rl.rewards.registry import available

    for name, desc in available().items():
        print(f"{name:20s} {desc}")
    return 0


def cmd_plugins(args: argparse.Namespace) -> int:
    from r3_rl.learner.registry import ALGORITHMS
    from r3_rl.policy.registry import POLICIES
    from r3_rl.rewards.registry import REWARDS

    for key, registry in (("policy.kind", POLICIES), ("learner.algorithm", ALGORITHMS), ("rewards[].name", REWARDS)):
        print(f"{key} (or pkg.module:{registry.example}, path/file.py:{registry.example}; entry points "
              f"{registry.group}):")
        for name, desc in registry.available().items():
            print(f"  {name:20s} {desc}")
    return 0


def cmd_serve_reward(args: argparse.Namespace) -> int:
    from r3_rl.rewards.server import Limits, parse_option_args, serve

    limits = Limits(max_request_bytes=int(args.max_request_mb * 2**20), max_inflight_bytes=int(args.max_inflight_mb * 2**20),
                    max_images=args.max_images, max_image_pixels=args.max_image_pixels,
                    max_concurrency=args.max_concurrency, client_timeout=args.client_timeout)
    serve(args.reward, host=args.host, port=args.port, options=parse_option_args(args.option), limits=limits,
          verbose=args.verbose)
    return 0


def cmd_doctor(args: argparse.Namespace) -> int:
    from r3_rl.doctor import doctor

    return doctor(args.recipe, args.set)


def cmd_data(args: argparse.Namespace) -> int:
    from r3_rl.data import builtin_summary

    rows = builtin_summary()
    if args.name:
        rows = [r for r in rows if r[0].name == args.name]
        if not rows:
            from r3_rl.errors import close_match
            from r3_rl.prompt_sets import BUILTIN

            raise UserError(f"no built-in prompt set {args.name!r}{close_match(args.name, BUILTIN)} "
                            f"(built-in: {', '.join(BUILTIN)})")
    for s, n, tags in rows:
        shown = tags.most_common() if args.name else tags.most_common(8)
        more = f", +{len(tags) - len(shown)} more (r3-rl data {s.name})" if len(tags) > len(shown) else ""
        print(f"{s.name:16s} {n:>6,} prompts  format {s.format:8s} {s.about}")
        print(f"{'':16s} {len(tags)} tags: " + ", ".join(f"{t} {c}" for t, c in shown) + more)
    print("use in a recipe: data.train / data.eval (data.source follows); attribution: r3_rl/prompt_sets/README.md")
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    from r3_rl.config import load_recipe  # the recipe's keys only: a plan needs neither weights nor data
    from r3_rl.learner.precision import check_recipe_precision
    from r3_rl.plan.render import render
    from r3_rl.plan.report import make_plan
    from r3_rl.validate import check_learner_ranks, check_plugins

    recipe = load_recipe(args.recipe, args.set)
    check_learner_ranks(recipe, args.recipe)  # a layout the trainer refuses is not planned
    check_plugins(recipe, args.recipe, weights=False)  # policy.kind / learner.algorithm by name, options checked
    check_recipe_precision(recipe)  # a precision the learner refuses is not planned
    plan = make_plan(recipe, args.gpus, args.gpu_memory)
    print(render(plan))
    return 0 if plan.fits else 1


COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "train": cmd_train, "eval": cmd_eval, "rollout": cmd_rollout, "rewards": cmd_rewards, "plugins": cmd_plugins,
    "inspect": cmd_inspect,
    "serve-reward": cmd_serve_reward, "doctor": cmd_doctor, "data": cmd_data, "plan": cmd_plan,
}


def build_parser() -> argparse.ArgumentParser:
    p = OneLineArgumentParser(prog="r3-rl", description="RL fine-tuning of unified multimodal models with R3.")
    sub = p.add_subparsers(dest="command", required=True)

    def with_recipe(sp: argparse.ArgumentParser) -> argparse.ArgumentParser:
        sp.add_argument("recipe", help="YAML recipe")
        sp.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a recipe key, e.g. --set learner.lr=1e-4 (repeatable)")
        sp.add_argument("--run-dir", default=None, help="write here instead of <out_dir>/<name>-<timestamp>/")
        return sp

    tr = with_recipe(sub.add_parser("train", help="train a policy with R3 + Tree-RL"))
    tr.add_argument("--resume", default=None, metavar="auto|PATH",
                    help="continue from a checkpoint: 'auto' = the latest complete one of --run-dir (or of the newest "
                         "<out_dir>/<name>-* run; none = start fresh), or a checkpoint / run dir PATH")
    ev = with_recipe(sub.add_parser("eval", help="per-round evaluation of a checkpoint"))
    ev.add_argument("--checkpoint", required=True, help="directory written by save_pretrained")
    ro = with_recipe(sub.add_parser("rollout", help="sample R3 trajectories without training and dump them"))
    ro.add_argument("--num", type=int_between(1, MAX_ROLLOUT_PROMPTS), default=16,
                    help="number of prompts (default 16)")
    sub.add_parser("rewards", help="list registered rewards")
    sub.add_parser("plugins", help="list registered policies, algorithms and rewards")
    ins = sub.add_parser("inspect", help="summarise a run directory; --html writes a page of trajectories")
    ins.add_argument("run_dir", help="a run directory (written by train, eval or rollout)")
    ins.add_argument("--step", type=int_at_least(0), default=None, help="training step dump to show (default: the latest)")
    ins.add_argument("--eval", default=None, metavar="NAME", help="show an eval dump instead (before, after, ...)")
    ins.add_argument("--html", nargs="?", const="", default=None, metavar="PATH",
                     help="also write a static HTML page (default path: RUN_DIR/inspect/<dump>.html)")
    ins.add_argument("--limit", type=int_at_least(0), default=3, help="trajectories printed as text (default 3)")
    pl = sub.add_parser("plan", help="per-GPU memory of a recipe's processes, component by component; exit 1 if it "
                                     "does not fit")
    pl.add_argument("recipe", help="YAML recipe")
    pl.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a recipe key (repeatable)")
    pl.add_argument("--gpus", type=int_between(1, MAX_PLAN_GPUS), default=8,
                    help="GPUs on the machine (default 8)")
    pl.add_argument("--gpu-memory", type=float_up_to(MAX_GPU_MEMORY_GB), default=80.0, metavar="GB",
                    help="memory per GPU in GB (default 80)")
    sr = sub.add_parser("serve-reward", help="serve a reward over JSON HTTP (recipe reward name 'remote')")
    sr.add_argument("--reward", required=True, help="reward name, pkg.mod:fn or path/to/file.py:fn")
    sr.add_argument("--port", type=int_between(0, 65535), default=8765,
                    help="port (default 8765; 0 = any free port)")
    sr.add_argument("--host", default="127.0.0.1",
                    help="address to bind (default 127.0.0.1; the server has no authentication)")
    sr.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                    help="reward option, e.g. --option detector=owlv2 (repeatable)")
    sr.add_argument("--max-request-mb", type=float_up_to(MAX_SERVER_MIB), default=64.0,
                    help="largest request body accepted (MiB)")
    sr.add_argument("--max-inflight-mb", type=float_up_to(MAX_SERVER_MIB), default=256.0,
                    help="request bodies admitted at once, in MiB (more: 503 busy)")
    sr.add_argument("--max-images", type=int_between(1, MAX_SERVER_COUNT), default=64,
                    help="images per request (default 64)")
    sr.add_argument("--max-image-pixels", type=int_between(1, MAX_SERVER_PIXELS), default=1024 * 1024,
                    help="decoded pixels per image, checked in the PNG header (default 1048576 = 1024x1024)")
    sr.add_argument("--max-concurrency", type=int_between(1, MAX_SERVER_COUNT), default=64,
                    help="scoring requests admitted at once (more: 503)")
    sr.add_argument("--client-timeout", type=float_up_to(MAX_CLIENT_TIMEOUT_S), default=30.0,
                    help="seconds a client has to send a request head, and again its body (default 30)")
    sr.add_argument("--verbose", action="store_true", help="log every request")
    dr = sub.add_parser("doctor", help="preflight: check weights, GPUs, NCCL, Ray, rewards, memory and disk before a run")
    dr.add_argument("recipe", help="YAML recipe")
    dr.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override a recipe key, as for train (repeatable)")
    da = sub.add_parser("data", help="list the prompt sets shipped with r3-rl (sizes, tags)")
    da.add_argument("name", nargs="?", default=None, help="one set, with all its tags (e.g. tiif:train)")
    return p


def _in_recipe(message: str, args: argparse.Namespace) -> str:
    """An error about a recipe key (``policy.model: cannot load ...``, raised while the run is built) names the
    recipe file too, as the validator's errors do; ``eval``'s ``policy.model`` is its ``--checkpoint``, not the
    recipe's."""
    recipe = getattr(args, "recipe", None)
    head = re.match(r"([a-z_]+)(?:[.\[][^\s:]*)?:", message)  # "policy.model:", "rewards[0]:", not "learner rank 1"
    if recipe is None or head is None or message.startswith(str(recipe)):
        return message
    from r3_rl.config import Recipe

    if head.group(1) not in Recipe.model_fields:
        return message
    if args.command == "eval" and message.startswith("policy.model"):
        from r3_rl.policy.tiny_recipe import BUILD_TINY_HINT

        # the message names the path itself; "leave policy.model empty" is no advice for a checkpoint
        return f"--checkpoint{message.removeprefix('policy.model').replace(BUILD_TINY_HINT, '')}"
    return f"{recipe}: {message}"


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "train" and argv is None:  # the real CLI process (tests call main() in-process)
        from r3_rl import interrupts

        interrupts.install()  # Ctrl-C or SIGTERM cleans up, and the process ends even if clean-up hangs
    try:
        return COMMANDS[args.command](args)
    except UserError as e:
        print(f"r3-rl: error: {_in_recipe(str(e), args)}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt as e:
        from r3_rl.interrupts import EXIT_INTERRUPTED, EXIT_TERMINATED, Terminated

        terminated = isinstance(e, Terminated)
        print(f"r3-rl: {'terminated (SIGTERM)' if terminated else 'interrupted'}", file=sys.stderr)
        return EXIT_TERMINATED if terminated else EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
