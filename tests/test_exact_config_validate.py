"""Exact checks of recipe loading and preflight (round 12A audit): config.py, config_learner.py, config_base.py,
validate.py and arguments.py.

Each test pins one rule a plausible one-point slip would break while every older test still passed: a bound at its
exact edge (0 allowed where it means "off", the seed ceiling 2**31 - 1), a default a recipe may leave out, the key
an error names and what it says to use instead, a ``--set`` corner (a value holding ``=``, an unparsable value kept
as text, a number that is not a section), every size limit enforced under its own recipe key, and the preflight
checks that must refuse (or must let through) a recipe before any work.  Recipes are loaded in-process from the
shipped tiny recipe; nothing is built, trained or downloaded.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from r3_rl.config import Eval, Recipe, Rollout, load_recipe, recipe_yaml
from r3_rl.errors import UserError
from r3_rl.policy.tiny_recipe import TinyRecipe
from r3_rl.validate import (
    LIMITS,
    check_data,
    check_device,
    check_numbers,
    check_plugins,
    check_run_dir,
    check_templates,
)

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "recipes" / "tiny_blocks.yaml"
BAGEL = REPO / "recipes" / "grpo_geneval_bagel.yaml"
SRC = "r.yaml"
GENEVAL_LINE = '{"prompt": "a red square", "tag": "colors", "include": [{"class": "square", "count": 1}]}\n'


def _refused(sets: list[str]) -> str:
    """``load_recipe(tiny_blocks, sets)`` fails with one line; returns it without the file prefix."""
    with pytest.raises(UserError) as e:
        load_recipe(TINY, sets)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"{TINY}: "), msg
    return msg[len(f"{TINY}: "):]


def _numbers(sets: list[str]) -> None:
    check_numbers(load_recipe(TINY, sets).model_dump(mode="python"), SRC)


# ---------------------------------------------------------------- config.py: bounds at their edges


@pytest.mark.parametrize("sets, value", [
    (["rollout.reason.temperature=0"], ("rollout", "reason", "temperature", 0.0)),  # 0 = greedy
    (["data.blocks.rows=8"], ("data", "blocks", "rows", 8)),
    (["warmstart.flaw_prob=1"], ("warmstart", "flaw_prob", None, 1.0)),
    (["tree.refine_groups_per_step=0"], ("tree", "refine_groups_per_step", None, 0)),  # stage A only ("together")
    (["tree.correct_parent_fraction=1"], ("tree", "correct_parent_fraction", None, 1.0)),
    (["seed=2147483647"], ("seed", None, None, 2**31 - 1)),
    (["warmstart.seed=2147483647"], ("warmstart", "seed", None, 2**31 - 1)),
    (["learner.grad_clip=0"], ("learner", "grad_clip", None, 0.0)),  # 0 = no clipping
    (["learner.ppo.value_clip=0"], ("learner", "ppo", "value_clip", 0.0)),
    (["learner.ppo.gamma=1"], ("learner", "ppo", "gamma", 1.0)),
    (["learner.critic_replay.examples=4096"], ("learner", "critic_replay", "examples", 4096)),
    (["learner.critic_replay.questions=16"], ("learner", "critic_replay", "questions", 16)),
    (["learner.deepspeed.zero_stage=3"], ("learner", "deepspeed", "zero_stage", 3)),
    (["ray.num_cpus=4", "ray.object_store_gb=2"], ("ray", "num_cpus", None, 4)),  # no address: a local Ray
])
def test_values_at_the_edge_are_accepted(sets: list[str], value: tuple) -> None:
    obj = load_recipe(TINY, sets)
    for part in value[:-1]:
        if part is not None:
            obj = getattr(obj, part)
    assert obj == value[-1] and type(obj) is type(value[-1])


@pytest.mark.parametrize("sets, key, msg", [
    (["rollout.generate.max_new_tokens=0"], "rollout.generate.max_new_tokens", "greater than or equal to 1"),
    (["data.blocks.rows=9"], "data.blocks.rows", "less than or equal to 8"),
    (["seed=2147483648"], "seed", "less than or equal to 2147483647"),
    (["warmstart.seed=2147483648"], "warmstart.seed", "less than or equal to 2147483647"),
    (["rewards.max_failure_fraction=1.5"], "rewards.max_failure_fraction", "less than or equal to 1"),
    (["rollout.workers=0"], "rollout.workers", "greater than or equal to 1"),
    (["rollout.cpus_per_worker=0"], "rollout.cpus_per_worker", "greater than 0"),
    (["eval.understanding.max_questions=0"], "eval.understanding.max_questions", "greater than or equal to 1"),
    (["learner.deepspeed.zero_stage=4"], "learner.deepspeed.zero_stage", "less than or equal to 3"),
    (["learner.lora={r: 0}"], "learner.lora.r", "greater than or equal to 1"),
    (["learner.lora={dropout: 1.0}"], "learner.lora.dropout", "less than 1"),
    (["learner.ppo.gamma=1.5"], "learner.ppo.gamma", "less than or equal to 1"),
    (["learner.flow.clip_low=1.0"], "learner.flow.clip_low", "less than 1"),
    (["learner.critic_replay.examples=4097"], "learner.critic_replay.examples", "less than or equal to 4096"),
    (["learner.critic_replay.coef=.inf"], "learner.critic_replay.coef", "a finite number"),
])
def test_values_past_the_edge_are_refused_naming_the_key(sets: list[str], key: str, msg: str) -> None:
    assert _refused(sets).startswith(f"key '{key}': Input should be {msg}")


def test_names_with_a_backslash_or_empty_are_refused() -> None:
    for bad in ("a\\\\b", "''"):
        assert _refused([f"name={bad}"]).startswith("key 'name': Value error, must be non-empty")
    assert load_recipe(TINY, ["name=run-1_a.b"]).name == "run-1_a.b"


def test_defaults_a_recipe_may_leave_out() -> None:
    """The sampling lengths per stage and the eval's refine rounds, as documented beside the fields."""
    r = Rollout()
    assert [(s.max_new_tokens, s.temperature) for s in (r.reason, r.generate, r.reflect, r.refine)] == [
        (16, 1.0), (32, 1.0), (24, 1.0), (32, 1.0)]
    assert Eval().rounds == 3 and Eval().size is None


def test_describe_true_means_objects_and_false_none() -> None:
    assert load_recipe(TINY, ["warmstart.describe=true"]).warmstart.describe == "objects"
    assert load_recipe(TINY, ["warmstart.describe=false"]).warmstart.describe == "none"
    assert load_recipe(TINY, ["warmstart.describe=counts"]).warmstart.describe == "counts"


def test_critic_steps_without_main_warm_start_steps_are_refused() -> None:
    msg = _refused(["warmstart.steps=0", "warmstart.critic_steps=5"])
    assert msg == ("key 'warmstart': Value error, critic_steps=5 run after the main warm-start steps, but steps=0 (no "
                   "warm start); set steps >= 1 or critic_steps: 0")  # a section's error: no ", got {...}" dump
    assert load_recipe(TINY, ["warmstart.steps=1", "warmstart.critic_steps=5"]).warmstart.critic_steps == 5


def test_ray_with_an_address_names_both_local_sizes() -> None:
    msg = _refused(["ray.address=auto", "ray.num_cpus=4", "ray.object_store_gb=2"])
    assert msg == ("key 'ray': Value error, num_cpus and object_store_gb size a local Ray and cannot be set with "
                   "address 'auto' (give it to `ray start` on the cluster instead)")


def test_the_first_bad_key_in_recipe_order_is_the_one_named() -> None:
    assert _refused(["seed=-1", "steps=-2"]) == "key 'seed': Input should be greater than or equal to 0, got -1"


# ---------------------------------------------------------------- config.py: --set and recipe.yaml


def test_set_values_keep_every_equals_sign_after_the_first() -> None:
    assert load_recipe(TINY, ["templates.system=a=b=c"]).templates.system == "a=b=c"


def test_set_value_yaml_cannot_parse_is_kept_as_text() -> None:
    assert load_recipe(TINY, ["templates.system=[unclosed"]).templates.system == "[unclosed"
    assert load_recipe(TINY, ["templates.system=a: b: c"]).templates.system == "a: b: c"


def test_set_key_is_stripped_of_surrounding_spaces() -> None:
    assert load_recipe(TINY, [" steps =5"]).steps == 5


def test_set_into_a_zero_or_empty_value_is_not_a_section() -> None:
    """``seed`` is 0 in the tiny recipe and ``templates.system`` '' once set so: falsy values are no sections."""
    for sets, key in ((["seed.x=1"], "seed"), (["templates.system=", "templates.system.x=1"], "system")):
        with pytest.raises(UserError) as e:
            load_recipe(TINY, sets)
        assert str(e.value) == f"--set {sets[-1]!r}: '{key}' is not a section"


def test_an_alias_bomb_given_with_set_is_refused() -> None:
    """The recipe file is checked as it is read; a ``--set`` value is YAML too, and is checked after it is merged."""
    levels = ["&a [x, x, x, x, x, x, x, x, x, x]"] + [f"&{c} [{', '.join(['*' + p] * 10)}]"
                                                      for p, c in zip("abcde", "bcdef")]
    with pytest.raises(UserError) as e:
        load_recipe(TINY, [f"templates.system=[{', '.join(levels)}]"])
    assert str(e.value) == (f"{TINY}: the recipe expands to more than 100000 values (YAML aliases?); write it out "
                            f"without '*alias' chains")


def test_recipe_yaml_keeps_field_order_and_round_trips() -> None:
    r = load_recipe(TINY, ["learner.betas=[0.8, 0.9]", "learner.lora={r: 4}"])
    text = recipe_yaml(r)
    data = yaml.safe_load(text)
    assert text.startswith("name: tiny_blocks\nseed: 0\nsteps: 300\n")
    assert list(data) == ["name", "seed", "steps", "save_every", "keep_last", "out_dir", "threads", "policy",
                          "templates", "data", "warmstart", "tree", "rewards", "learner", "rollout", "ray", "eval",
                          "log"]
    assert data["learner"]["betas"] == [0.8, 0.9] and data["learner"]["lora"]["r"] == 4
    assert Recipe.model_validate(data) == r


def test_assignment_is_validated_too() -> None:
    r = load_recipe(TINY)
    with pytest.raises(ValidationError):
        r.steps = -1
    with pytest.raises(ValidationError):
        r.policy.tiny.num_heads = 0
    assert (r.steps, r.policy.tiny.num_heads) == (300, 4)


# ---------------------------------------------------------------- config_learner.py


@pytest.mark.parametrize("key, use", [
    ("train_batch_size", "learner.micro_batch_size"),
    ("gradient_accumulation_steps", "learner.grad_accum"),
    ("fp16", "learner.deepspeed.dtype"),
    ("scheduler", "learner.warmup_steps, learner.lr_decay_steps and learner.lr_final"),
    ("communication_data_type", "learner.deepspeed.dtype (gradients are reduced in fp32)"),
])
def test_each_learner_owned_deepspeed_key_names_its_recipe_key(key: str, use: str) -> None:
    msg = _refused([f"learner.deepspeed.config={{{key}: 1}}"])
    assert msg == f"key 'learner.deepspeed.config': Value error, {key!r} is set by the learner: use {use} instead"


def test_two_owned_keys_name_the_first_with_its_own_recipe_key() -> None:
    msg = _refused(["learner.deepspeed.config={optimizer: {type: Adam}, scheduler: {type: WarmupLR}}"])
    assert msg.startswith("key 'learner.deepspeed.config': Value error, 'optimizer' is set by the learner: use "
                          "learner.lr, learner.betas and learner.weight_decay instead")


def test_a_null_zero_optimization_section_is_no_stage() -> None:
    r = load_recipe(TINY, ["learner.deepspeed.config={zero_optimization: null}"])
    assert r.learner.deepspeed.config == {"zero_optimization": None}


def test_stage_mappings_name_the_bad_stage_with_a_close_match_and_the_valid_ones() -> None:
    msg = _refused(["learner.stage_weights={reflct: 1.5}"])
    assert msg.startswith("key 'learner.stage_weights': Value error, unknown stage 'reflct' (did you mean 'reflect'?) "
                          "(valid: reason, generate, reflect, refine)")


@pytest.mark.parametrize("weights, got", [("{reason: true}", "True"), ("{reason: .inf}", "inf"),
                                          ("{reason: .nan}", "nan"), ("{reason: '2'}", "'2'")])
def test_stage_weights_must_be_finite_numbers(weights: str, got: str) -> None:
    msg = _refused([f"learner.stage_weights={weights}"])
    assert msg.startswith(f"key 'learner.stage_weights': Value error, stage 'reason': expected a finite weight >= 0, "
                          f"got {got}")


def test_stage_weights_come_back_as_floats() -> None:
    w = load_recipe(TINY, ["learner.stage_weights={reflect: 2, refine: 1.5}"]).learner.stage_weights
    assert w == {"reflect": 2.0, "refine": 1.5} and all(type(x) is float for x in w.values())


@pytest.mark.parametrize("value", ["1", "0", "yes_please", "[reason]"])
def test_normalize_std_is_a_bool_or_a_stage_mapping(value: str) -> None:
    assert "must be true/false or a mapping of stage -> true/false" in _refused([f"learner.normalize_std={value}"])
    assert load_recipe(TINY, ["learner.normalize_std={reflect: true}"]).learner.normalize_std == {"reflect": True}


# ---------------------------------------------------------------- validate.py: sizes and numbers

# every size validate.py bounds, written out here: a key dropped from LIMITS or misspelt there is not checked
BOUNDED = ["steps", "keep_last", "threads", "policy.tiny.hidden_size", "policy.tiny.num_layers",
           "policy.tiny.num_heads", "policy.tiny.intermediate_size", "policy.tiny.max_positions", "data.eval_size",
           "eval.size", "eval.rounds", "eval.dump", "eval.batch_size", "eval.understanding.reference_size",
           "eval.understanding.max_questions", "log.chains", "warmstart.questions", "warmstart.critic_steps",
           "warmstart.steps", "warmstart.batch_size", "warmstart.rounds", "tree.group_size", "tree.prompts_per_step",
           "tree.refine_groups_per_step", "tree.buffer_size", "tree.max_round", "learner.epochs",
           "learner.micro_batch_size", "learner.grad_accum", "learner.ranks", "learner.lora.r", "rollout.workers",
           "rollout.reward_workers", "rollout.groups_per_task", "rollout.max_task_retries",
           "rollout.reason.max_new_tokens", "rollout.generate.max_new_tokens", "rollout.reflect.max_new_tokens",
           "rollout.refine.max_new_tokens", "ray.num_cpus", "ray.object_store_gb",
           "rollout.threads_per_worker"]  # fixed in this audit: 10**9 torch threads a worker passed the check


def test_every_size_is_bounded() -> None:
    assert sorted(LIMITS) == sorted(BOUNDED)


@pytest.mark.parametrize("key", BOUNDED)
def test_each_limit_is_checked_under_its_own_recipe_key(key: str) -> None:
    limit, what = LIMITS[key]
    _numbers([f"{key}={limit}"])  # at the limit: accepted
    with pytest.raises(UserError) as e:
        _numbers([f"{key}={limit + 1}"])
    shown = float(limit + 1) if key == "ray.object_store_gb" else limit + 1
    assert str(e.value) == f"r.yaml: key '{key}': {shown} is over the limit of {limit} ({what})"


def test_numbers_inside_lists_are_checked_with_their_index() -> None:
    with pytest.raises(UserError) as e:
        _numbers(["rewards.task=[{name: blocks}, {name: blocks, weight: .inf}]"])
    assert str(e.value) == "r.yaml: key 'rewards.task[1].weight': inf is not a finite number"


def test_nan_is_not_a_finite_number() -> None:
    with pytest.raises(UserError) as e:
        _numbers(["rewards.format_weight=.nan"])
    assert str(e.value) == "r.yaml: key 'rewards.format_weight': nan is not a finite number"


# ---------------------------------------------------------------- validate.py: device, templates, plug-ins


def test_mps_and_a_bare_cuda_are_devices(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    for name in ("mps", "mps:0", "cpu", "cpu:0"):
        check_device(load_recipe(TINY, [f"policy.device={name}"]), SRC, count_gpus=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    check_device(load_recipe(TINY, ["policy.device=cuda"]), SRC)  # cuda = cuda:0, which this machine has
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    with pytest.raises(UserError, match=r"'cuda' but this machine has 0 CUDA device\(s\)$"):
        check_device(load_recipe(TINY, ["policy.device=cuda"]), SRC)


def test_an_empty_placeholder_is_refused() -> None:
    """``{}`` is a positional field: ``str.format(prompt=...)`` raises IndexError on it mid-run."""
    recipe = load_recipe(TINY, ["templates.reason={} {prompt}"])
    with pytest.raises(UserError) as e:
        check_templates(recipe, TinyRecipe.template_fields, SRC)
    assert str(e.value) == ("r.yaml: key 'templates.reason': placeholder {} is not filled at this stage by the tiny "
                            "policy (available: {prompt})")


def test_ppo_with_the_tiny_policy_and_critic_replay_off_with_janus_pass_the_plugin_checks() -> None:
    check_plugins(load_recipe(TINY, ["learner.algorithm=ppo", "learner.refine_baseline=group"]), SRC)
    check_plugins(load_recipe(REPO / "recipes" / "grpo_geneval.yaml", ["learner.critic_replay.coef=0"]), SRC,
                  weights=False)


def test_lora_targets_wait_for_the_weights_where_they_are_not_here() -> None:
    """``weights=False`` (plan, doctor): the BAGEL skeleton reads the checkpoint, absent here -- not an error."""
    check_plugins(load_recipe(BAGEL, ["learner.lora={r: 4}"]), SRC, weights=False)


# ---------------------------------------------------------------- validate.py: data and run dir


def test_a_null_reference_set_is_none_not_a_file() -> None:
    check_data(load_recipe(TINY, ["eval.understanding.reference=null"]), SRC)


def test_a_missing_held_out_file_is_refused(tmp_path: Path) -> None:
    good = tmp_path / "good.jsonl"
    good.write_text(GENEVAL_LINE)
    missing = tmp_path / "held_out.jsonl"
    with pytest.raises(UserError, match="held_out.jsonl: prompt file not found"):
        check_data(load_recipe(TINY, ["data.source=geneval", f"data.train={good}", f"data.eval={missing}"]), SRC)


@pytest.mark.parametrize("suffix", [".csv", ".json", ".parquet", ".jsonl"])
def test_hf_data_files_must_exist(tmp_path: Path, suffix: str) -> None:
    name = tmp_path / f"prompts{suffix}"
    with pytest.raises(UserError) as e:
        check_data(load_recipe(TINY, ["data.source=hf", f"data.train={name}"]), SRC)
    assert str(e.value) == f"r.yaml: dataset file {name} not found"


def test_run_dir_must_be_searchable_as_well_as_writable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from r3_rl import validate

    monkeypatch.setattr(validate.os, "access", lambda path, mode: not mode & os.X_OK)  # writable, not searchable
    with pytest.raises(UserError, match=rf"^--run-dir {tmp_path / 'r'}: {tmp_path} is not writable$"):
        check_run_dir(load_recipe(TINY), str(tmp_path / "r"))


# ---------------------------------------------------------------- bugs fixed in this audit


@pytest.mark.parametrize("key", ["train", "eval"])
def test_a_prompt_file_with_the_blocks_generator_is_refused_not_ignored(tmp_path: Path, key: str) -> None:
    """``data: {train: p.jsonl}`` leaves ``source`` at ``blocks``, which generates its prompts: the file was never
    read and the run trained (or evaluated) on Blocks prompts without a word."""
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(GENEVAL_LINE)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"data:\n  {key}: {prompts}\n")
    loaded = load_recipe(recipe)
    assert loaded.data.source == "blocks"
    with pytest.raises(UserError) as e:
        check_data(loaded, SRC)
    assert str(e.value) == (f"r.yaml: key 'data.{key}': {str(prompts)!r} is not read with data.source 'blocks' (its "
                            f"prompts are generated); set data.source: geneval, tiif or hf to use it")


@pytest.mark.parametrize("zero", ["5", "[stage]", "stage"])
def test_a_zero_optimization_that_is_no_mapping_is_no_traceback(zero: str) -> None:
    """``"stage" in 5`` raised a TypeError out of the recipe check (a traceback, not one line); a string was
    searched for the word ``stage``.  Not a mapping: no learner-owned stage (DeepSpeed's own check refuses it)."""
    r = load_recipe(TINY, [f"learner.deepspeed.config={{zero_optimization: {zero}}}"])
    assert r.learner.deepspeed.config == {"zero_optimization": yaml.safe_load(zero)}

