"""Exact checks of the recipe / command-line front door (mutation audit of cli, validate, config, config_learner,
arguments, errors): each test pins one rule whose breaking the older tests let through -- a bound at its exact
limit, the key or flag a one-line error names, a ``--set`` edge, a check the CLI must make before any work.

No Ray, no model load, no training: recipes are loaded and checked in-process (torch is imported, nothing built).
"""
from __future__ import annotations

from pathlib import Path

import pytest
from conftest import cli_one_line_error

from r3_rl.cli import build_parser, main
from r3_rl.config import load_recipe
from r3_rl.errors import UserError, raised
from r3_rl.validate import (
    check_data,
    check_device,
    check_judge_protocol,
    check_numbers,
    check_regexes,
    check_rewards,
    check_run_dir,
)

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "recipes" / "tiny_blocks.yaml"
SRC = "r.yaml"


def _refused(sets: list[str], needle: str) -> str:
    """``load_recipe(tiny_blocks, sets)`` raises one line holding ``needle``; returns it."""
    with pytest.raises(UserError) as e:
        load_recipe(TINY, sets)
    msg = str(e.value)
    assert needle in msg and "\n" not in msg and str(TINY) in msg, msg
    return msg


def _numbers(sets: list[str]) -> None:
    check_numbers(load_recipe(TINY, sets).model_dump(mode="python"), SRC)


# ---------------------------------------------------------------- errors.py


def _inner() -> None:
    raise RuntimeError("cannot open x\nsecond line")


def _outer() -> None:
    _inner()


def test_raised_names_the_innermost_frame_and_the_first_line_only() -> None:
    try:
        _outer()
    except RuntimeError as e:
        text = raised(e)
    line = _inner.__code__.co_firstlineno + 1
    assert text == f"RuntimeError: cannot open x ({__file__}:{line})"


# ---------------------------------------------------------------- cli.py


def test_flag_defaults() -> None:
    p = build_parser()
    assert p.parse_args(["rollout", "r.yaml"]).num == 16
    assert p.parse_args(["inspect", "RUN"]).limit == 3
    a = p.parse_args(["plan", "r.yaml"])
    assert (a.gpus, a.gpu_memory) == (8, 80.0)


@pytest.fixture
def no_sampling(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """``eval`` / ``rollout`` stop with one line where their work would start (after every check)."""
    from r3_rl import cli

    reached: list[str] = []

    def stop(recipe, run_dir, command):
        reached.append(command)
        raise UserError("reached the sampling parts")
    monkeypatch.setattr(cli, "_sampling_parts", stop)
    return reached


def test_rollout_needs_no_held_out_set_but_train_does(tmp_path: Path, no_sampling: list[str],
                                                     capsys: pytest.CaptureFixture) -> None:
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "a red square", "tag": "colors", "include": [{"class": "square", "count": 1}]}\n')
    sets = ["--set", f"out_dir={tmp_path / 'runs'}", "--set", "data.source=geneval", "--set", f"data.train={prompts}"]
    assert cli_one_line_error(["rollout", str(TINY), *sets], capsys) == "r3-rl: error: reached the sampling parts"
    assert no_sampling == ["rollout"]
    err = cli_one_line_error(["train", str(TINY), *sets], capsys)
    assert "key 'data.eval': required for data.source='geneval'" in err


def test_eval_checks_the_checkpoint_as_policy_model_before_any_work(tmp_path: Path, no_sampling: list[str],
                                                                    capsys: pytest.CaptureFixture) -> None:
    empty = tmp_path / "ckpt"
    empty.mkdir()
    sets = ["--set", f"out_dir={tmp_path / 'runs'}"]
    err = cli_one_line_error(["eval", str(TINY), "--checkpoint", str(empty), *sets], capsys)
    assert err == (f"r3-rl: error: --checkpoint: cannot load '{empty}': no config.json there; give a directory "
                   f"written by save_pretrained"), err  # not "(or leave policy.model empty ...)": eval has none
    assert no_sampling == []
    err = cli_one_line_error(["eval", str(TINY), "--checkpoint", str(tmp_path / "nope"), *sets], capsys)
    assert err == f"r3-rl: error: --checkpoint {tmp_path / 'nope'}: no such directory"


def test_plan_exit_code_says_whether_it_fits(capsys: pytest.CaptureFixture) -> None:
    geneval = str(REPO / "recipes" / "grpo_geneval.yaml")
    assert main(["plan", geneval, "--gpus", "8", "--gpu-memory", "80"]) == 0
    assert "verdict: fits" in capsys.readouterr().out
    assert main(["plan", geneval, "--gpus", "8", "--gpu-memory", "8"]) == 1  # 1, not the usage error's 2
    assert "verdict: does NOT fit" in capsys.readouterr().out


def test_plan_checks_the_policy_plugin_before_planning(capsys: pytest.CaptureFixture) -> None:
    err = cli_one_line_error(["plan", str(TINY), "--set", "templates.reason=<|im_start|> {nonexistent} {prompt}"],
                             capsys)
    assert "key 'templates.reason': placeholder {nonexistent} is not filled at this stage by the tiny policy" in err


# ---------------------------------------------------------------- config.py: --set and the one-line message


def test_set_into_a_value_that_is_not_a_section(capsys: pytest.CaptureFixture, tmp_path: Path) -> None:
    err = cli_one_line_error(["train", str(TINY), "--set", "steps.x=1", "--set", f"out_dir={tmp_path}"], capsys)
    assert err == "r3-rl: error: --set 'steps.x=1': 'steps' is not a section"


def test_set_nested_keeps_the_recipes_other_keys_and_empty_value_is_an_empty_string() -> None:
    r = load_recipe(TINY, ["policy.tiny.hidden_size=32", "templates.system="])
    assert r.policy.tiny.hidden_size == 32
    assert (r.policy.tiny.num_layers, r.policy.tiny.max_positions) == (4, 160)  # the recipe's, not the defaults
    assert r.templates.system == ""


def test_type_error_names_what_was_given() -> None:
    msg = _refused(["steps=abc"], "key 'steps': ")
    assert msg.endswith(", got 'abc'")


def test_section_bounds_and_cross_field_rules() -> None:
    _refused(["rollout.reason.top_p=0"], "key 'rollout.reason.top_p': Input should be greater than 0")
    assert load_recipe(TINY, ["rollout.reason.top_p=1"]).rollout.reason.top_p == 1.0
    _refused(["rollout.workers=1", "rollout.min_workers=2"], "min_workers=2 must be <= workers=1")
    assert load_recipe(TINY, ["rollout.workers=2", "rollout.min_workers=2"]).rollout.min_workers == 2
    _refused(["ray.address=auto", "ray.num_cpus=4"], "key 'ray': Value error, num_cpus sizes a local Ray")
    _refused(["tree.schedule=alternate", "tree.refine_groups_per_step=0"], "refine_groups_per_step must be >= 1")
    _refused(["name=my run"], "key 'name': Value error, must be non-empty with no '/', '\\', spaces or control characters")


# ---------------------------------------------------------------- config_learner.py


def test_learner_owned_deepspeed_key_names_the_recipe_key_to_use() -> None:
    _refused(["learner.backend=deepspeed", "learner.deepspeed.config={gradient_clipping: 1.0}"],
             "'gradient_clipping' is set by the learner: use learner.grad_clip instead")


def test_ppo_refuses_both_non_group_baselines() -> None:
    _refused(["learner.algorithm=ppo", "learner.refine_baseline=parent"], "refine_baseline: 'parent' replaces")
    _refused(["learner.algorithm=ppo", "learner.refine_baseline=group", "learner.critic_baseline=verdict"],
             "critic_baseline: 'verdict' replaces")


def test_stage_weight_zero_is_allowed_and_normalize_std_is_strictly_boolean() -> None:
    assert load_recipe(TINY, ["learner.stage_weights={reason: 0}"]).learner.stage_weights == {"reason": 0.0}
    _refused(["learner.normalize_std={reason: 1}"], "stage 'reason': expected true/false, got 1")


# ---------------------------------------------------------------- validate.py


def test_size_limits_are_inclusive_and_each_key_is_checked() -> None:
    _numbers(["tree.group_size=1024", "tree.prompts_per_step=1", "tree.refine_groups_per_step=1"])
    with pytest.raises(UserError, match=r"^r\.yaml: key 'tree\.group_size': 1025 is over the limit of 1024 "):
        _numbers(["tree.group_size=1025"])
    _numbers(["eval.rounds=64"])
    with pytest.raises(UserError, match=r"^r\.yaml: key 'eval\.rounds': 65 is over the limit of 64 \(refine rounds\)$"):
        _numbers(["eval.rounds=65"])


def test_samples_a_step_count_the_refine_groups() -> None:
    with pytest.raises(UserError, match=r"= 1049600 samples a step, over the limit of 1048576$"):
        _numbers(["tree.group_size=1024", "tree.prompts_per_step=1", "tree.refine_groups_per_step=1024"])
    _numbers(["tree.group_size=1024", "tree.prompts_per_step=1", "tree.refine_groups_per_step=1023"])  # 2^20


def test_device_names_and_gpu_count(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    for bad in ("cuda:0x", "cpu0", "gpu"):
        with pytest.raises(UserError, match="key 'policy.device': .* is not a device"):
            check_device(load_recipe(TINY, [f"policy.device={bad}"]), SRC, count_gpus=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    check_device(load_recipe(TINY, ["policy.device=cuda:0"]), SRC)
    with pytest.raises(UserError, match=r"'cuda:1' but this machine has 1 CUDA device\(s\)"):
        check_device(load_recipe(TINY, ["policy.device=cuda:1"]), SRC)


def test_both_format_regexes_are_checked() -> None:
    with pytest.raises(UserError, match=r"key 'rewards\.reflect_format': not a valid regular expression"):
        check_regexes(load_recipe(TINY, ["rewards.reflect_format=(unclosed"]), SRC)


def test_reward_errors_name_their_list_and_correct_part_takes_a_component() -> None:
    with pytest.raises(UserError, match=r"^r\.yaml: rewards\.eval: .*unknown option 'bnary'"):
        check_rewards(load_recipe(TINY, ["rewards.eval=[{name: blocks, options: {bnary: true}}]"]), SRC)
    with pytest.raises(UserError, match=r"^r\.yaml: rewards\.reflect\.extra: "):
        check_rewards(load_recipe(TINY, ["rewards.reflect.extra=[{name: nope}]"]), SRC)
    check_rewards(load_recipe(TINY, ["rewards.reflect.correct_part=blocks/correct"]), SRC)


@pytest.mark.parametrize("train,held_out", [("geneval:train", "geneval++:test"),  # held-out prompts
                                             ("geneval++:test", "geneval:test")])  # training prompts (round 12A)
def test_geneval_plus_plus_judge_needs_a_mode_in_the_task_rewards_too(train: str, held_out: str) -> None:
    sets = ["data.source=geneval", f"data.train={train}", f"data.eval={held_out}",
            "rewards.task=[{name: vlm_judge, options: {url: 'http://127.0.0.1:9', model: m}}]"]
    with pytest.raises(UserError, match=r"^r\.yaml: key 'rewards\.task\[0\]\.options\.mode': geneval\+\+:test prompts"):
        check_judge_protocol(load_recipe(TINY, sets), SRC)


def test_hf_data_needs_no_held_out_set() -> None:
    check_data(load_recipe(TINY, ["data.source=hf", "data.train=org/prompts"]), SRC)


def test_run_dir_must_be_writable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    from r3_rl import validate

    recipe = load_recipe(TINY)
    check_run_dir(recipe, str(tmp_path / "a" / "b"))
    monkeypatch.setattr(validate.os, "access", lambda path, mode: not mode & os.W_OK)  # readable, not writable
    with pytest.raises(UserError, match=rf"^--run-dir {tmp_path / 'a' / 'b'}: {tmp_path} is not writable$"):
        check_run_dir(recipe, str(tmp_path / "a" / "b"))


def test_unknown_keys_in_optional_sections_and_list_entries_say_what_is_valid() -> None:
    """An unknown key inside ``learner.lora`` (a section that may be null) or inside a list entry
    (``rewards.task``, ``rewards.reflect.extra``) gets its did-you-mean and the entry's index as the validator
    writes it (``rewards.task[0]``); they used to say only ``unknown key 'rewards.task.0.wieght'``."""
    _refused(["learner.lora={rr: 4}"], "unknown key 'learner.lora.rr' (did you mean 'r'?)")
    msg = _refused(["learner.lora={r: 4, zzz: 1}"], "unknown key 'learner.lora.zzz' (valid: r, alpha, ")
    assert msg.endswith("train_vision)")
    _refused(["rewards.task=[{name: blocks}, {name: blocks, wieght: 1}]"],
             "unknown key 'rewards.task[1].wieght' (did you mean 'weight'?)")
    _refused(["rewards.reflect.extra=[{name: verdict_consistency, optons: {}}]"],
             "unknown key 'rewards.reflect.extra[0].optons' (did you mean 'options'?)")
    _refused(["rewards.task=[{name: blocks, weight: abc}]"], "key 'rewards.task[0].weight': ")


def test_an_error_raised_while_building_a_recipe_key_names_the_recipe_file(tmp_path: Path, capsys: pytest.CaptureFixture
                                                                          ) -> None:
    """A load-time error about ``policy.model`` (not the validator's) said only ``policy.model: ...``: which recipe
    it came from was left to the user; the CLI now prefixes the file, as the validator's errors do."""
    empty = tmp_path / "model"
    empty.mkdir()
    sets = ["--set", f"out_dir={tmp_path / 'runs'}", "--set", f"policy.model={empty}"]
    err = cli_one_line_error(["train", str(TINY), *sets], capsys)
    assert err == (f"r3-rl: error: {TINY}: policy.model: cannot load '{empty}': no config.json there; give a "
                   f"directory written by save_pretrained (or leave policy.model empty to build the tiny model)"), err
    err = cli_one_line_error(["train", str(TINY), "--set", "steps=-1"], capsys)  # already named: not twice
    assert err == f"r3-rl: error: {TINY}: key 'steps': Input should be greater than or equal to 0, got -1"


@pytest.mark.parametrize("message, expected", [
    ("policy.model: x", "R.yaml: policy.model: x"),
    ("rewards[0]: unknown key(s) ['z']", "R.yaml: rewards[0]: unknown key(s) ['z']"),
    ("learner.lora.target_modules: 'q' matches nothing", "R.yaml: learner.lora.target_modules: 'q' matches nothing"),
    ("R.yaml: key 'steps': bad", "R.yaml: key 'steps': bad"),
    ("dataset 'a/b' (split 'train'): cannot load", "dataset 'a/b' (split 'train'): cannot load"),
    ("--run-dir /x: not a directory", "--run-dir /x: not a directory"),
    ("learner.algorithm=ppo: a X has no value head", "R.yaml: learner.algorithm=ppo: a X has no value head"),
    ("rollout worker 3 could not be restarted: no node", "rollout worker 3 could not be restarted: no node"),
    ("learner rank 1 was lost during the learner step", "learner rank 1 was lost during the learner step"),
])
def test_only_messages_that_start_with_a_recipe_key_get_the_file(message: str, expected: str) -> None:
    """The prefix goes on ``section.key:`` / ``section[i]:`` messages only, never twice, never on a flag's or a
    dataset's error (``dataset`` is not a recipe section), nor on a run-time failure whose first word happens to be
    a section's name (``rollout worker 3``, ``learner rank 1``)."""
    from argparse import Namespace

    from r3_rl.cli import _in_recipe

    assert _in_recipe(message, Namespace(command="train", recipe="R.yaml")) == expected
    assert _in_recipe(message, Namespace(command="serve")) == message  # no recipe argument: as raised


@pytest.mark.parametrize("sets,line", [
    # pydantic's loc carried the union branch it tried ("target_modules.list[str]") and the first branch's reason
    (["learner.lora={target_modules: 5}"],
     "key 'learner.lora.target_modules': Input should be a valid list or a valid string, got 5"),
    (["learner.lora={r: 8, target_modules: [1]}"], "key 'learner.lora.target_modules[0]': Input should be a valid "
                                                   "string, got 1"),
    (["data.blocks.tags={colors: x}"], "key 'data.blocks.tags.colors': Input should be a valid number, unable to "
                                       "parse string as a number, got 'x'"),  # a mapping key is kept
    (["learner.lora={rr: 8}"], "unknown key 'learner.lora.rr' (did you mean 'r'?)"),
])
def test_a_union_fields_error_names_the_recipe_key_and_every_branchs_reason(sets: list[str], line: str) -> None:
    assert _refused(sets, line) == f"{TINY}: {line}"
