"""Doctor checks that need no GPU and no cluster: prompt data, policy weights, rewards, disk for checkpoints."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from r3_rl.doctor.base import Context, Finding, ok, problem, skipped
from r3_rl.errors import UserError


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    raise AssertionError("unreachable")


def check_values(ctx: Context) -> Finding:
    """The recipe's numbers, sizes, regexes, policy and algorithm pass ``r3-rl train``'s up-front validation.

    The model, rewards and data parts of that validation are the checks below, with a fix each."""
    from r3_rl import validate

    source = str(ctx.recipe_path)
    validate.check_numbers(ctx.recipe.model_dump(mode="python"), source)
    validate.check_regexes(ctx.recipe, source)
    validate.check_learner_ranks(ctx.recipe, source)
    validate.check_plugins(ctx.recipe, source, weights=False)
    return ok(f"numbers finite and within bounds, regexes valid, policy {ctx.recipe.policy.kind} and algorithm "
              f"{ctx.recipe.learner.algorithm} accept the recipe")


def check_data(ctx: Context) -> Finding:
    """The training and held-out prompts load and pass their format checks (every line)."""
    from r3_rl.data import PromptSource

    d = ctx.recipe.data
    if d.source == "blocks":
        from r3_rl.validate import check_data as validate_data

        try:  # a data.train / data.eval file beside the generator would never be read: train refuses it
            validate_data(ctx.recipe, str(ctx.recipe_path))
        except UserError as e:
            return problem(str(e), "set data.source to the file's format, or leave data.train / data.eval out")
        return ok(f"Blocks generator, {d.blocks.rows}x{d.blocks.cols} grid, tags {', '.join(d.blocks.tags)}")
    fix = "use a built-in set (`r3-rl data` lists them), or fix the file / dataset named above"
    try:
        source = PromptSource(ctx.recipe)
        held_out = source.eval_prompts(ctx.recipe.eval.size or d.eval_size)
    except UserError as e:
        return problem(str(e), fix)
    eval_name = d.eval or f"{d.train} [{d.eval_split}]"
    return ok(f"train {d.train}: {len(source.train_items or []):,} prompts; eval {eval_name}: "
              f"{len(held_out):,} prompts per eval")


def check_weights(ctx: Context) -> Finding:
    """The policy's weights are on this machine: a folder, or complete in the hub cache (never downloaded)."""
    from r3_rl.weights import WeightsMissing

    try:
        facts = ctx.model()
    except WeightsMissing as e:
        return problem(str(e), e.fix)
    return ok(f"policy {facts.where}: {facts.params / 1e6:,.1f} M parameters")


def _present(model: str, key: str) -> str | None:
    """Why hub id / folder ``model`` cannot be loaded offline, or None when its weights are all here."""
    from r3_rl.weights import WeightsMissing, locate, weight_files

    try:
        weight_files(locate(model, key, local="point the reward's model option at a local folder"), key)
    except WeightsMissing as e:
        return f"{e}; fix: {e.fix}"
    return None


def _reward_fix(spec: Any) -> str:
    url = spec.options.get("url")
    if url:
        return (f"start the server at {url} (a served reward: `r3-rl serve-reward --reward NAME --port PORT`) "
                f"or correct options.url")
    return "correct the reward's name or options (`r3-rl rewards` lists the names)"


def check_rewards(ctx: Context) -> list[Finding]:
    """Every task and eval reward is constructed (options checked) and set up: models load, a remote reward
    or VLM judge answers its health check.  Weights a reward declares are looked up first, so a missing
    detector is reported with the download command instead of a loader's traceback."""
    from r3_rl.rewards.registry import load_reward

    r = ctx.recipe.rewards
    specs: dict[str, tuple[Any, list[str]]] = {}
    for role, spec_list in (("task", r.task), ("eval", r.eval)):
        for spec in spec_list:
            key = f"{spec.name} {sorted(spec.options.items())!r}"
            specs.setdefault(key, (spec, []))[1].append(role)
    out = []
    for spec, roles in specs.values():
        label = f"reward {spec.name} ({'+'.join(roles)})"
        try:
            reward = load_reward(spec.name, **spec.options)
            missing = [why for w in reward.weights() if (why := _present(w, f"reward {spec.name}"))]
            if missing:
                detail, _, fix = missing[0].partition("; fix: ")
                out.append(Finding("problem", detail, fix, label))
                continue
            t0 = time.perf_counter()
            reward.setup()
            took = time.perf_counter() - t0
            reward.teardown()
        except UserError as e:
            out.append(Finding("problem", str(e), _reward_fix(spec), label))
            continue
        except Exception as e:  # noqa: BLE001 - a reward's own loader can raise anything
            first = (str(e).strip().splitlines() or [""])[0]
            out.append(Finding("problem", f"setup failed: {type(e).__name__}: {first}", _reward_fix(spec), label))
            continue
        out.append(Finding("ok", f"constructed and set up in {took:.1f} s", "", label))
    return out


def check_disk(ctx: Context) -> Finding:
    """Room under ``out_dir`` for the most checkpoints on disk at once (``keep_last`` + the one being written)
    plus the final export, from the policy's parameter count, dtypes and optimiser (an upper bound)."""
    from r3_rl.weights import DTYPE_BYTES, WeightsMissing, checkpoint_bytes, checkpoints_on_disk

    recipe = ctx.recipe
    try:
        facts = ctx.model()
    except WeightsMissing:
        return skipped("needs the policy's size (see weights)")
    parts = checkpoint_bytes(recipe, facts.params, facts.image_pixels)
    one = sum(parts.values())
    n = checkpoints_on_disk(recipe)
    final = facts.params * DTYPE_BYTES[recipe.policy.dtype]
    need = n * (one - parts["reference"]) + parts["reference"] + final  # every checkpoint links one reference file
    where = Path(recipe.out_dir)
    free = ctx.free_bytes(where)
    biggest = ", ".join(f"{k} {human_bytes(v)}" for k, v in sorted(parts.items(), key=lambda kv: -kv[1])[:3] if v)
    detail = (f"{recipe.out_dir}: needs up to {human_bytes(need)} ({n} checkpoint(s) of ~{human_bytes(one)}: "
              f"{biggest}; + final weights), {human_bytes(free)} free")
    if free < need:
        return problem(detail, f"free space, or --set out_dir=/larger/disk; fewer kept checkpoints "
                               f"(keep_last={recipe.keep_last}) or a smaller tree.buffer_size shrink it")
    return ok(detail)
