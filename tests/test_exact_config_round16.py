"""Exact checks of recipe schema bounds and defaults, ``--set``, recipe files, plug-in names and parser errors
(round 16 audit).

Each test pins a rule of config.py, config_learner.py, textfiles.py, plugins.py or arguments.py that a plausible
one-point slip broke while every older test still passed: a bound at its exact edge (``tree.group_size`` 1,
``keep_last`` 0, ``ray.object_store_gb`` 0, ``learner.epochs`` 0, ``learner.lr_final`` past 1, ...), a value
the schema must offer (``policy.dtype: float16``, ``cfg_scale: 0``), the defaults README.md documents, a
``--set`` into a section the recipe wrote as ``null``, learner-owned DeepSpeed keys, stage names (case, close
match), a stage weight too large for a float (an OverflowError traceback before this audit, now one line), the
one-line errors of a recipe file that is missing, a folder, nested too deeply or a list, a plug-in spec with two
colons, the names an unknown plug-in error lists, and the parser's ``--help`` hint.  Recipes are loaded
in-process from the shipped tiny recipe; nothing is built, trained or downloaded.
"""
from __future__ import annotations

from pathlib import Path

import pytest

from test_exact_config_validate import TINY, _refused  # a one-line refusal, less its file prefix
from r3_rl.arguments import OneLineArgumentParser, int_at_least
from r3_rl.config import Recipe, load_recipe
from r3_rl.errors import UserError
from r3_rl.plugins import Registry
from r3_rl.textfiles import read_recipe_yaml


# ---------------------------------------------------------------- config.py / config_learner.py: bounds


@pytest.mark.parametrize("sets, line", [
    (["tree.group_size=1"], "key 'tree.group_size': Input should be greater than or equal to 2, got 1"),
    (["keep_last=0"], "key 'keep_last': Input should be greater than or equal to 1, got 0"),
    (["ray.object_store_gb=0"], "key 'ray.object_store_gb': Input should be greater than 0, got 0"),
    (["warmstart.lr=0"], "key 'warmstart.lr': Input should be greater than 0, got 0"),
    (["learner.lr_final=1.5"], "key 'learner.lr_final': Input should be less than or equal to 1, got 1.5"),
    (["learner.betas=[1.0, 0.9]"], "key 'learner.betas[0]': Input should be less than 1, got 1.0"),
    (["learner.clip_low=1"], "key 'learner.clip_low': Input should be less than 1, got 1"),
    (["policy.dtype=float64"], "key 'policy.dtype': Input should be 'float32', 'bfloat16' or 'float16', "
                               "got 'float64'"),
    (["tree.buffer_size=0"], "key 'tree.buffer_size': Input should be greater than or equal to 1, got 0"),
    (["tree.max_round=0"], "key 'tree.max_round': Input should be greater than or equal to 1, got 0"),
    (["ray.placement_timeout_s=0"], "key 'ray.placement_timeout_s': Input should be greater than 0, got 0"),
    (["learner.ppo.critic_lr=0"], "key 'learner.ppo.critic_lr': Input should be greater than 0, got 0"),
    (["learner.flow.clip_high=0"], "key 'learner.flow.clip_high': Input should be greater than 0, got 0"),
    (["learner.flow.adv_clip=0"], "key 'learner.flow.adv_clip': Input should be greater than 0, got 0"),
    (["learner.micro_batch_size=0"], "key 'learner.micro_batch_size': Input should be greater than or equal to 1, "
                                     "got 0"),
    (["learner.epochs=0"], "key 'learner.epochs': Input should be greater than or equal to 1, got 0"),
    (["learner.cpus_per_rank=0"], "key 'learner.cpus_per_rank': Input should be greater than 0, got 0"),
    (["learner.lora={alpha: 0}"], "key 'learner.lora.alpha': Input should be greater than 0, got 0"),
    (["learner.weight_decay=-0.1"], "key 'learner.weight_decay': Input should be greater than or equal to 0, "
                                    "got -0.1"),
    (["learner.ppo.lam=1.5"], "key 'learner.ppo.lam': Input should be less than or equal to 1, got 1.5"),
    (["warmstart.describe=1"], "key 'warmstart.describe': Input should be 'none', 'objects' or 'counts', got 1"),
    (["warmstart.random_layouts=1.5"], "key 'warmstart.random_layouts': Input should be less than or equal to 1, "
                                       "got 1.5"),
])
def test_values_past_the_edge_are_refused_with_the_exact_line(sets: list[str], line: str) -> None:
    assert _refused(sets) == line


@pytest.mark.parametrize("sets, path, value", [
    (["tree.group_size=2"], ("tree", "group_size"), 2),
    (["keep_last=1"], ("keep_last",), 1),
    (["learner.lr=0"], ("learner", "lr"), 0.0),  # the schema's floor: 0 is allowed (ge=0)
    (["learner.lr_final=1"], ("learner", "lr_final"), 1.0),
    (["learner.betas=[0, 0.999]"], ("learner", "betas"), (0.0, 0.999)),
    (["policy.dtype=float16"], ("policy", "dtype"), "float16"),
    (["policy.tiny.image_input=words"], ("policy", "tiny", "image_input"), "words"),
    (["rollout.generate.cfg_scale=0"], ("rollout", "generate", "cfg_scale"), 0.0),  # ge=0: 0 is allowed
    (["eval.dump=0"], ("eval", "dump"), 0),  # 0 = no eval chains written
    (["learner.ppo.vf_coef=0"], ("learner", "ppo", "vf_coef"), 0.0),
])
def test_values_at_the_edge_are_accepted(sets: list[str], path: tuple[str, ...], value: object) -> None:
    obj: object = load_recipe(TINY, sets)
    for part in path:
        obj = getattr(obj, part)
    assert obj == value and type(obj) is type(value)


def test_defaults_the_readme_documents() -> None:
    """Defaults a recipe may leave out, as README.md states them (its TRL table, the reflect-reward and
    understanding blocks, the refine-stage and eval-size notes) and GenEval's six tags at weight 1."""
    r = Recipe()
    lr = r.learner
    assert (lr.lr, lr.betas, lr.kl_coef_text, lr.kl_coef_image, lr.kl_importance_weight, lr.normalize_std,
            lr.lr_decay_steps, lr.grad_accum, lr.kl_kind, r.save_every) == (
        5e-4, (0.9, 0.95), 1e-3, 1e-3, False, False, 0, 0, "k3", 0)
    assert (lr.loss_weight_text, lr.loss_weight_image) == (1.0, 1.0)  # R3's 2.0 image weight is opt-in
    lora = load_recipe(TINY, ["learner.lora={}"]).learner.lora
    assert lora is not None and (lora.r, lora.alpha, lora.target_modules) == (8, 16.0, ["q_proj", "k_proj", "v_proj",
                                                                                     "o_proj"])
    assert (r.rewards.reflect.stop_correct, r.rewards.reflect.stop_flawed,
            r.rewards.reflect.edit_flawed_unimproved) == (1.0, 0.0, 0.0)
    assert r.tree.correct_parent_fraction == 0.15 and r.data.eval_size == 192
    # the eval judges with GenEval's binary verdict; an image is correct at a task reward of 1 (full credit)
    assert [(s.name, s.weight, s.options) for s in r.rewards.eval] == [("blocks", 1.0, {"binary": True})]
    assert [(s.name, s.weight, s.options) for s in r.rewards.task] == [("blocks", 1.0, {})]
    assert r.rewards.correct_threshold == 1.0 and r.rollout.groups_per_task == 4
    # held-out prompts come from the test split; eval texts greedy, eval images sampled at temperature 1
    assert (r.data.train_split, r.data.eval_split) == ("train", "test")
    assert (r.eval.text_temperature, r.eval.image_temperature) == (0.0, 1.0)
    assert r.log.trajectories_every == 10
    assert (r.warmstart.flaw_prob, r.warmstart.fix_prob) == (0.5, 0.7)  # first images flawed half the time
    u = r.eval.understanding
    assert (u.yes_no, u.max_questions, u.reference, u.reference_size) == (True, None, "auto", 96)
    assert r.data.blocks.tags == {"single_object": 1.0, "two_object": 1.0, "counting": 1.0, "colors": 1.0,
                                  "position": 1.0, "color_attr": 1.0}


@pytest.mark.parametrize("key", ["bf16", "zero_allow_untested_optimizer"])
def test_these_learner_owned_deepspeed_keys_are_refused_too(key: str) -> None:
    use = {"bf16": "learner.deepspeed.dtype", "zero_allow_untested_optimizer": "the learner's own AdamW (leave the "
                                                                              "key out)"}[key]
    assert _refused([f"learner.deepspeed.config={{{key}: true}}"]) == (
        f"key 'learner.deepspeed.config': Value error, {key!r} is set by the learner: use {use} instead")


def test_normalize_std_names_an_unknown_stage_with_a_close_match() -> None:
    assert _refused(["learner.normalize_std={reflct: true}"]) == (
        "key 'learner.normalize_std': Value error, unknown stage 'reflct' (did you mean 'reflect'?) (valid: reason, "
        "generate, reflect, refine)")


def test_stage_names_are_case_sensitive() -> None:
    """``Reflect`` is no stage: a weight under it would weigh nothing (stages not listed weigh 1)."""
    msg = _refused(["learner.stage_weights={Reflect: 2}"])
    assert msg == ("key 'learner.stage_weights': Value error, unknown stage 'Reflect' (did you mean 'reflect'?) "
                   "(valid: reason, generate, reflect, refine)")  # a mapping: no ", got {...}" dump


def test_a_stage_weight_too_large_for_a_float_is_one_line_not_a_traceback() -> None:
    """A 400-digit integer passed ``x < inf`` and then overflowed ``float(x)``: an OverflowError traceback."""
    big = "1" + "0" * 400
    msg = _refused([f"learner.stage_weights={{refine: {big}}}"])
    assert msg == (f"key 'learner.stage_weights': Value error, stage 'refine': expected a finite weight >= 0, "
                   f"got {big[:57]}... (401 characters)")  # named by its start, not echoed whole (session 53)
    top = int(1.7976931348623157e308)  # the largest float, as an integer: still a weight
    assert load_recipe(TINY, [f"learner.stage_weights={{refine: {top}}}"]).learner.stage_weights == {
        "refine": 1.7976931348623157e308}


def test_a_long_value_is_named_by_its_start_and_a_short_one_whole() -> None:
    """The value a recipe key refuses is echoed up to 60 characters (session 53): a 100-number list given for the
    learning rate filled the terminal."""
    long = "[" + ", ".join(str(i) for i in range(100)) + "]"
    assert _refused([f"learner.lr={long}"]) == (
        f"key 'learner.lr': Input should be a valid number, got {long[:57]}... ({len(long)} characters)")
    assert _refused(["learner.lr=abc"]) == ("key 'learner.lr': Input should be a valid number, "
                                            "unable to parse string as a number, got 'abc'")
    assert _refused(["learner.normalize_std={refine: " + "x" * 70 + "}"]) == (
        "key 'learner.normalize_std': Value error, stage 'refine': expected true/false, got '" + "x" * 56
        + "... (72 characters)")


# ---------------------------------------------------------------- config.py: --set


def test_set_into_a_section_the_recipe_wrote_as_null(tmp_path: Path) -> None:
    """``learner:`` left empty (YAML null) or ``lora: null`` is an unset section, not a value: --set fills it."""
    recipe = tmp_path / "r.yaml"
    recipe.write_text("name: r\nlearner:\n  lora: null\nlog:\n")
    r = load_recipe(recipe, ["learner.lora.r=4", "log.chains=3"])
    assert r.learner.lora is not None and r.learner.lora.r == 4 and r.log.chains == 3


def test_set_value_yaml_cannot_parse_is_kept_verbatim() -> None:
    assert load_recipe(TINY, ["templates.system= [unclosed "]).templates.system == " [unclosed "


def test_a_set_value_nested_too_deeply_is_one_line_not_a_traceback() -> None:
    """Session 52: PyYAML's RecursionError on thousands of "[" escaped ``parse_override`` (the recipe file's
    loader already caught it)."""
    with pytest.raises(UserError, match=r"^--set learner\.lr=\.\.\.: value nested too deeply \(3000 characters\)$"):
        load_recipe(TINY, ["learner.lr=" + "[" * 3000])


@pytest.mark.parametrize("name", ["run\tone", "run\none", "run\x00", "my run"])
def test_a_run_name_with_whitespace_or_a_control_character_is_refused(name: str) -> None:
    """Session 52: the name starts the run folder's name; a tab or newline was accepted (only ' ' was refused)."""
    with pytest.raises(UserError, match="must be non-empty with no '/', '\\\\', spaces or control characters"):
        load_recipe(TINY, [f"name={name}"])


# ---------------------------------------------------------------- textfiles.py


def test_recipe_file_errors_name_what_is_wrong(tmp_path: Path) -> None:
    cases = {tmp_path / "missing.yaml": "recipe file not found", tmp_path: "recipe is not a regular file"}
    deep = tmp_path / "deep.yaml"
    deep.write_text("a: " + "[" * 5000 + "]" * 5000 + "\n")
    cases[deep] = "YAML nested too deeply"
    listed = tmp_path / "list.yaml"
    listed.write_text("- name: a\n- steps: 3\n")
    cases[listed] = "a recipe must be a mapping of sections, got list"
    for path, what in cases.items():
        with pytest.raises(UserError) as e:
            read_recipe_yaml(path)
        assert str(e.value) == f"{path}: {what}"


# ---------------------------------------------------------------- plugins.py


def test_a_spec_with_two_colons_is_a_path() -> None:
    reg = Registry("reward", "r3_rl.test_round16_none", {}, "fn")
    reg.check_name("dir:x/file.py:fn")  # a path: nothing is imported or listed here
    with pytest.raises(UserError, match=r"^unknown reward 'nope'"):
        reg.check_name("nope")


def test_an_unknown_name_lists_registered_names_as_well_as_built_ins() -> None:
    reg = Registry("reward", "r3_rl.test_round16_none", {"blocks": ("rewards.blocks:BlocksReward", "Blocks")}, "fn")
    reg.register("mine", "a reward of mine")(lambda: None)
    with pytest.raises(UserError) as e:
        reg.check_name("mines")
    assert str(e.value) == ("unknown reward 'mines' (did you mean 'mine'?); use a registered name (blocks, mine), "
                            "'pkg.module:fn' or 'path/file.py:fn'")


# ---------------------------------------------------------------- arguments.py


def test_a_parser_error_says_how_to_list_the_options(capsys: pytest.CaptureFixture) -> None:
    parser = OneLineArgumentParser(prog="r3-rl plan")
    parser.add_argument("--gpus", type=int_at_least(1))
    with pytest.raises(SystemExit) as e:
        parser.parse_args(["--gpus", "0"])
    assert e.value.code == 2
    assert capsys.readouterr().err == ("r3-rl plan: error: argument --gpus: must be an integer >= 1, got '0' "
                                       "('r3-rl plan --help' lists the options)\n")
