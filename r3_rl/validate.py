"""Preflight: every recipe error found before any work (warm start, model load, run dir), in one line.

:func:`load_recipe` checks keys and types; this module checks what a type cannot say, so a run does not die
(or hang, or eat the machine) minutes or hours in: reward names and options, data files (opened, every record
parsed), regexes, devices, finite numbers, sizes within bounds that a 2-core machine or a GPU cluster could
honour (the limit is named in the error), and the plug-ins: the policy (``policy.kind``: class found, options
match ``from_recipe``, template placeholders per stage, the family's own ``check_recipe``) and the algorithm
(``learner.algorithm``: class found, ``learner.options`` match its constructor).  The CLI calls
:func:`validate_recipe` and :func:`check_run_dir` before it creates the run dir; both raise
:class:`~r3_rl.errors.UserError` (exit 2) and have no side effects.
"""
from __future__ import annotations

import math
import os
import re
from pathlib import Path
from typing import Any

from r3_rl.errors import UserError
from r3_rl.gpu_layout import check_gpu_shares

# Upper bounds on sizes (dotted recipe key -> (limit, what it counts)).  Far above any real run, far below
# what makes a run allocate terabytes or loop for days before it notices.
LIMITS: dict[str, tuple[int, str]] = {
    "steps": (10_000_000, "training steps"),
    "keep_last": (1_000, "checkpoints kept"),
    "threads": (1_024, "torch threads"),
    "rollout.threads_per_worker": (1_024, "torch threads per rollout worker"),
    "policy.tiny.hidden_size": (8_192, "width of the tiny CPU policy"),
    "policy.tiny.num_layers": (128, "layers of the tiny CPU policy"),
    "policy.tiny.num_heads": (256, "attention heads of the tiny CPU policy"),
    "policy.tiny.intermediate_size": (32_768, "MLP width of the tiny CPU policy"),
    "policy.tiny.max_positions": (131_072, "context length of the tiny CPU policy"),
    "data.eval_size": (100_000, "held-out prompts per eval"),
    "eval.size": (100_000, "held-out prompts per eval"),
    "eval.rounds": (64, "refine rounds"),
    "eval.dump": (100_000, "eval chains dumped"),
    "eval.batch_size": (65_536, "prompts sampled together in an eval"),
    "eval.understanding.reference_size": (100_000, "held-out prompts of the reference set"),
    "eval.understanding.max_questions": (1_024, "yes/no questions per image"),
    "log.chains": (4_096, "R3 chains sampled for the logs"),
    "warmstart.questions": (1_024, "yes/no questions per warm-start image"),
    "warmstart.critic_steps": (10_000_000, "warm-start critic steps"),
    "warmstart.steps": (10_000_000, "warm-start steps"),
    "warmstart.batch_size": (65_536, "warm-start batch"),
    "warmstart.rounds": (64, "warm-start rounds"),
    "tree.group_size": (1_024, "siblings per group"),
    "tree.prompts_per_step": (65_536, "prompt groups per step"),
    "tree.refine_groups_per_step": (65_536, "refine groups per step"),
    "tree.buffer_size": (10_000_000, "buffered parent images"),
    "tree.max_round": (64, "refine rounds"),
    "learner.epochs": (1_000, "epochs per batch"),
    "learner.micro_batch_size": (65_536, "samples per micro-batch"),
    "learner.grad_accum": (65_536, "micro-batches per optimiser step"),
    "learner.ranks": (4_096, "data-parallel ranks"),
    "learner.lora.r": (4_096, "LoRA rank"),
    "rollout.workers": (4_096, "rollout actors"),
    "rollout.reward_workers": (4_096, "reward actors"),
    "rollout.groups_per_task": (65_536, "groups per rollout task"),
    "rollout.max_task_retries": (100, "retries of one rollout task"),
    **{f"rollout.{s}.max_new_tokens": (65_536, "tokens per sample") for s in ("reason", "generate", "reflect", "refine")},
    "ray.num_cpus": (1_048_576, "CPUs of a local Ray"),
    "ray.object_store_gb": (1_048_576, "GB of a local Ray's object store"),
}
MAX_SAMPLES_PER_STEP = 1 << 20  # group_size x (prompt groups + refine groups)
PLACEHOLDER = re.compile(r"\{([^{}\s]*)\}")


def _get(dump: dict[str, Any], key: str) -> Any:
    value: Any = dump
    for part in key.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    return value


def _numbers(obj: Any, where: str = "") -> list[tuple[str, float]]:
    if isinstance(obj, dict):
        return [x for k, v in obj.items() for x in _numbers(v, f"{where}.{k}" if where else str(k))]
    if isinstance(obj, (list, tuple)):
        return [x for i, v in enumerate(obj) for x in _numbers(v, f"{where}[{i}]")]
    return [(where, obj)] if isinstance(obj, float) else []


def check_numbers(dump: dict[str, Any], source: str) -> None:
    """Every float finite (``1e999`` is inf in YAML), every size within :data:`LIMITS`."""
    for key, value in _numbers(dump):
        if not math.isfinite(value):
            raise UserError(f"{source}: key '{key}': {value} is not a finite number")
    for key, (limit, what) in LIMITS.items():
        value = _get(dump, key)
        if isinstance(value, (int, float)) and value > limit:
            raise UserError(f"{source}: key '{key}': {value} is over the limit of {limit} ({what})")
    t = dump["tree"]
    per_step = t["group_size"] * (t["prompts_per_step"] + t["refine_groups_per_step"])
    if per_step > MAX_SAMPLES_PER_STEP:
        raise UserError(f"{source}: tree.group_size x (prompts_per_step + refine_groups_per_step) = {per_step} "
                        f"samples a step, over the limit of {MAX_SAMPLES_PER_STEP}")


DEVICE = re.compile(r"^(cpu|cuda|mps)(?::(\d+))?$")


def check_device(recipe: Any, source: str, count_gpus: bool = True) -> None:
    """``policy.device`` names a device (and, with ``count_gpus``, one this machine has: torch is imported only
    to count CUDA devices)."""
    name = recipe.policy.device
    m = DEVICE.match(name)
    if m is None:
        raise UserError(f"{source}: key 'policy.device': {name!r} is not a device (cpu, cuda, cuda:N, mps)")
    if count_gpus and m.group(1) == "cuda":
        import torch

        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if int(m.group(2) or 0) >= count:
            raise UserError(f"{source}: key 'policy.device': {name!r} but this machine has {count} CUDA device(s)")


def check_templates(recipe: Any, fields: dict[str, set[str]], source: str) -> None:
    """Every ``{name}`` in a template must be one the policy fills at that stage (``Policy.template_fields``)."""
    templates = recipe.templates.model_dump()
    for stage, text in templates.items():
        for name in PLACEHOLDER.findall(text):
            allowed = fields.get(stage, set())
            if name not in allowed:
                avail = ", ".join("{" + f + "}" for f in sorted(allowed)) or "none"
                raise UserError(f"{source}: key 'templates.{stage}': placeholder {{{name}}} is not filled at this "
                                f"stage by the {recipe.policy.kind} policy (available: {avail})")


def check_plugins(recipe: Any, source: str, weights: bool = True) -> None:
    """``policy.kind`` and ``learner.algorithm`` import, take their options, and accept the recipe (``weights``:
    the policy's weights are on this machine too).  Built-ins are checked without importing torch."""
    from r3_rl.learner.registry import check_algorithm
    from r3_rl.policy.registry import check_policy_options

    try:
        policy = check_policy_options(recipe)
        check_algorithm(recipe)
    except UserError as e:
        raise UserError(f"{source}: {e}") from None
    check_templates(recipe, policy.template_fields, source)
    if recipe.learner.critic_replay.coef > 0 and not getattr(policy, "replays_critiques", False):
        raise UserError(f"{source}: key 'learner.critic_replay.coef': policy.kind {recipe.policy.kind!r} has no "
                        f"supervised critiques to rehearse (the tiny policies have: kind tiny or tiny_flow); "
                        f"set it to 0")
    if recipe.learner.algorithm == "ppo" and getattr(policy, "critic_features", None) is False:
        raise UserError(f"{source}: key 'learner.algorithm': ppo needs a critic that reads the policy's hidden "
                        f"states, which policy.kind {recipe.policy.kind!r} does not expose (Policy.value_features); "
                        f"use grpo")
    policy.check_recipe(recipe, source, weights)
    if weights and recipe.learner.lora is not None:
        check_lora_targets(recipe, source)


def check_lora_targets(recipe: Any, source: str) -> None:
    """``learner.lora``'s modules against the policy's own, on its module built on the meta device
    (:meth:`Policy.skeleton`): a misspelt target, or ``train_vision`` for a policy without a vision tower, is
    refused before the model load and the warm start instead of after them."""
    from r3_rl.learner.lora import lora_targets
    from r3_rl.policy.registry import policy_class

    try:
        skeleton = policy_class(recipe.policy.kind).skeleton(recipe)
        if skeleton is not None:
            lora_targets(skeleton, recipe.learner.lora)
    except UserError as e:
        raise UserError(f"{source}: {e}") from None


def check_regexes(recipe: Any, source: str) -> None:
    for key in ("reason_format", "reflect_format"):
        pattern = getattr(recipe.rewards, key)
        try:
            re.compile(pattern)
        except re.error as e:
            raise UserError(f"{source}: key 'rewards.{key}': not a valid regular expression ({e})") from None


def check_learner_ranks(recipe: Any, source: str) -> None:
    """``learner.ranks > 1`` only with DeepSpeed ZeRO 0-2 (:func:`r3_rl.config_learner.check_ranks`)."""
    from r3_rl.config_learner import check_ranks

    try:
        check_ranks(recipe.learner)
    except UserError as e:
        raise UserError(f"{source}: {e}") from None


def check_judge_protocol(recipe: Any, source: str) -> None:
    """GenEval++ is scored by one verdict for the whole checklist (Echo-4o's protocol): a ``vlm_judge`` left on
    its default ``mode: questions`` would score it by derived yes/no questions instead, a number not comparable
    with published ones.  Refused unless the entry names its mode."""
    sets = [s for s in (recipe.data.train, recipe.data.eval) if isinstance(s, str) and s.startswith("geneval++")]
    if not sets:
        return
    for key, specs in (("task", recipe.rewards.task), ("eval", recipe.rewards.eval)):
        for i, spec in enumerate(specs):
            if spec.name == "vlm_judge" and "mode" not in spec.options:
                raise UserError(f"{source}: key 'rewards.{key}[{i}].options.mode': {sets[0]} prompts are judged by "
                                f"their checklist (GenEval++'s protocol); set mode: checklist, or mode: questions to "
                                f"ask derived yes/no questions instead")


def check_rewards(recipe: Any, source: str) -> None:
    """Names resolve and options match each reward's signature (constructs them; models load in ``setup``)."""
    from r3_rl.rewards.reward_set import RewardSet, reward_specs

    if not recipe.rewards.task:
        raise UserError(f"{source}: key 'rewards.task': at least one reward, e.g. [{{name: blocks}}] (with none every "
                        f"sample scores 0 and nothing is learnt)")
    for key, specs in (("task", recipe.rewards.task), ("eval", recipe.rewards.eval),
                       ("reflect.extra", recipe.rewards.reflect.extra)):
        try:
            built = RewardSet.from_specs(reward_specs(recipe, specs))
        except UserError as e:
            raise UserError(f"{source}: rewards.{key}: {e}") from None
        part = recipe.rewards.reflect.correct_part
        if key == "task" and part is not None:  # its component is known only once scored; its reward now
            names = [m.reward.name for m in built.members]
            if part not in names and part.partition("/")[0] not in names:
                raise UserError(f"{source}: key 'rewards.reflect.correct_part': {part!r} names no task reward; "
                                f"expected REWARD or REWARD/COMPONENT of {', '.join(names)} (e.g. blocks/correct)")


def check_data(recipe: Any, source: str, needs_eval: bool = True) -> None:
    """Prompt files opened and every record parsed (``file:line`` errors); local datasets exist."""
    from r3_rl.data import load_prompts

    d = recipe.data
    reference = recipe.eval.understanding.reference
    if reference not in (None, "auto"):  # read now (every line and image): an eval after the warm start needs it
        from r3_rl.eval.understanding import load_references

        try:
            load_references(reference)
        except UserError as e:
            raise UserError(f"{source}: {e}") from None
    if d.source == "blocks":
        from r3_rl.blocks.prompts import check_tag_mix

        check_tag_mix(d.blocks.tags, f"{source}: key 'data.blocks.tags'")
        for key in ("train", "eval"):  # never read: the run would use Blocks prompts without a word
            if getattr(d, key):
                raise UserError(f"{source}: key 'data.{key}': {getattr(d, key)!r} is not read with data.source "
                                f"'blocks' (its prompts are generated); set data.source: geneval, tiif or hf to use it")
        return
    if not d.train:
        raise UserError(f"{source}: key 'data.train': required for data.source={d.source!r} (a jsonl path or dataset)")
    for name in [d.train] + ([d.eval] if d.eval else []):
        if d.source == "hf":
            p = Path(name)
            if p.suffix in (".jsonl", ".json", ".csv", ".parquet") and not p.is_file():
                raise UserError(f"{source}: dataset file {name} not found")
            continue
        load_prompts(d.source, name, d.prompt_column)  # built-in set names (geneval:train) included
    if needs_eval and not d.eval and d.source != "hf":
        raise UserError(f"{source}: key 'data.eval': required for data.source={d.source!r} (a held-out jsonl); "
                        f"evaluating on training prompts would overstate accuracy")


def validate_recipe(recipe: Any, path: str | Path, needs_eval: bool = True) -> None:
    """Everything a run would trip over later, checked now; raises :class:`UserError` with one line."""
    source = str(path)
    dump = recipe.model_dump(mode="python")
    check_numbers(dump, source)
    check_device(recipe, source, count_gpus=False)
    check_regexes(recipe, source)
    check_learner_ranks(recipe, source)
    check_gpu_shares(recipe, source)
    check_rewards(recipe, source)
    check_judge_protocol(recipe, source)
    check_data(recipe, source, needs_eval)
    check_plugins(recipe, source)  # imports the policy's code (torch): after the checks that import none
    check_device(recipe, source)
    check_precision(recipe, source)


def check_precision(recipe: Any, source: str) -> None:
    """``policy.dtype`` and ``learner.deepspeed.*`` make a precision the learner trains in (last: it imports torch,
    which a valid run imports next anyway)."""
    from r3_rl.learner.precision import check_recipe_precision

    try:
        check_recipe_precision(recipe)
    except UserError as e:
        raise UserError(f"{source}: {e}") from None


def check_run_dir(recipe: Any, run_dir: str | None) -> None:
    """The run dir (``--run-dir`` or ``out_dir``) can be created and written, without creating it."""
    target = Path(run_dir) if run_dir else Path(recipe.out_dir)
    flag = "--run-dir" if run_dir else "out_dir"
    probe = target
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if probe.exists() and not probe.is_dir():
        raise UserError(f"{flag} {target}: {probe} is not a directory")
    if probe.is_dir() and not os.access(probe, os.W_OK | os.X_OK):
        raise UserError(f"{flag} {target}: {probe} is not writable")
