"""Exact checks of the recipe base section, one-line recipe errors, the tiny tokenizer and the memory
plan's validation harness (round 17 audit).

Each test pins a rule of config_base.py, config_errors.py, policy/tiny_tokenizer.py or plan/validate.py that a
plausible one-point slip broke while every older test still passed: a YAML boolean for an *optional* number
(``ray.num_cpus: yes`` read as one CPU), a boolean assigned into a tuple field, a recipe key that ends with a dot
named without it, the messages of a union whose branches say the same thing, a mapping of sections walked
through its keys rather than its values, the tiny tokenizer's special ids, and the predicted components of the
learner-step and sampling checks (context length, tokens per row, CFG rows, gradient bytes).  Recipes are loaded
in-process from the shipped tiny recipe; the two validation checks build a 128-wide, one-layer Janus-shaped
model on CPU; nothing is downloaded.
"""
from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError

from test_exact_config_validate import TINY, _refused  # a one-line refusal, less its file prefix
from r3_rl.config import load_recipe
from r3_rl.config_base import Section
from r3_rl.config_errors import one_line

BOOL_MSG = "Value error, must be a number, not true/false (YAML reads true/false/yes/no/on/off as booleans)"


# ---------------------------------------------------------------------------------------------- config_base.py
@pytest.mark.parametrize("key, word", [("ray.num_cpus", "yes"), ("learner.clip_high", "true"),
                                       ("ray.object_store_gb", "on"), ("eval.size", "true")])
def test_a_yaml_boolean_is_no_optional_number(key: str, word: str) -> None:
    """``int | None`` / ``float | None`` fields are unions too: ``ray.num_cpus: yes`` must not start one CPU."""
    assert _refused([f"{key}={word}"]) == f"key '{key}': {BOOL_MSG}, got True"


def test_a_boolean_assigned_into_a_tuple_or_a_number_is_refused() -> None:
    """Sections validate assignment; a tuple (not only a YAML list) of numbers is looked into."""
    recipe = load_recipe(TINY)
    with pytest.raises(ValidationError, match="must be a number, not true/false"):
        recipe.learner.betas = (0.9, False)
    with pytest.raises(ValidationError, match="must be a number, not true/false"):
        recipe.steps = True
    assert recipe.learner.betas == (0.9, 0.95) and recipe.steps == load_recipe(TINY).steps


class _Sizes(Section):
    sizes: tuple[int, ...] = ()
    flag_or_count: bool | int = 0  # a union that admits bool is left alone


def test_a_boolean_in_a_variable_length_tuple_of_numbers_is_refused() -> None:
    """``tuple[int, ...]``'s element type is its first argument (the last one is the ellipsis)."""
    with pytest.raises(ValidationError, match="must be a number, not true/false"):
        _Sizes(sizes=[1, True])
    assert _Sizes(sizes=[1, 2]).sizes == (1, 2)
    assert _Sizes(flag_or_count=True).flag_or_count is True


# --------------------------------------------------------------------------------------------- config_errors.py
def test_an_unknown_key_ending_in_a_dot_is_named_as_written() -> None:
    """``lr.`` is not ``lr``: the error must not name a valid key as the unknown one."""
    assert _refused(['learner={"lr.": 1}']) == "unknown key 'learner.lr.' (did you mean 'lr'?)"


class _Cell(Section):
    n: int = 1


class _Root(Section):
    twice: list[int] | list[str] = []
    cells: dict[str, _Cell] = {}
    spare: None | _Cell = None  # the section is not the union's first member


def _line(data: dict) -> str:
    with pytest.raises(ValidationError) as e:
        _Root.model_validate(data)
    return one_line(e.value, "r.yaml", _Root)


def test_union_branches_with_the_same_message_say_it_once() -> None:
    assert _line({"twice": 5}) == "r.yaml: key 'twice': Input should be a valid list, got 5"


def test_an_optional_section_written_none_first_still_lists_its_keys() -> None:
    assert _line({"spare": {"m": 1}}) == "r.yaml: unknown key 'spare.m' (valid: n)"


def test_a_mapping_of_sections_is_walked_through_its_values() -> None:
    assert _line({"cells": {"k": {"n": "z"}}}) == ("r.yaml: key 'cells.k.n': Input should be a valid integer, "
                                                   "unable to parse string as an integer, got 'z'")


# ------------------------------------------------------------------------------------------ policy/tiny_tokenizer.py
def test_tiny_tokenizer_special_ids_and_unknown_words() -> None:
    """An unknown word is ``<unk>`` (id 1), not padding; pad/unk/bos/eos are the documented specials."""
    from r3_rl.policy.tiny_tokenizer import build_tokenizer

    tok = build_tokenizer(["red"], 2)  # specials 0-8, <img_0> 9, <img_1> 10, red 11
    assert tok("red blue <img_1>", add_special_tokens=False).input_ids == [11, 1, 10]
    assert (tok.pad_token_id, tok.unk_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2, 4)


# --------------------------------------------------------------------------------------------- plan/validate.py
@pytest.fixture(scope="module")
def janus(tmp_path_factory: pytest.TempPathFactory):
    from transformers import AutoConfig

    from r3_rl.plan import validate
    from r3_rl.plan.shapes import shape_from_config

    torch.set_num_threads(1)
    from r3_rl.policy.janus import JanusPolicy

    path = validate.janus_shaped(tmp_path_factory.mktemp("janus") / "j", 128, 1, 2)
    policy = JanusPolicy.from_pretrained(path, templates=validate.TEMPLATES)  # for its prompt ids and sizes
    return path, shape_from_config(AutoConfig.from_pretrained(path), "validation"), policy


def test_learner_check_predicts_two_cfg_rows_of_the_longest_context(janus, monkeypatch) -> None:
    """Two refine items (micro-batch 1 x 2), CFG (2 rows each), context + image tokens - 1 positions a row, fp32
    gradients of every trained parameter, and the larger of backward and the reference's forward."""
    from r3_rl.plan import memory, validate

    path, shape, policy = janus
    longest = max(len(policy._ids("refine", {"prompt": p, "instruction": "add a dog"}, True, True))
                  for p in ("photo 0 of ", "photo 1 of a cat "))  # the two items' prompts
    tokens = 1 * 2 * (longest + 4 - 1)  # micro-batch x CFG rows x (context + 4 image tokens - 1)
    seen = []
    real = memory.forward_temporaries
    monkeypatch.setattr(memory, "forward_temporaries",
                        lambda s, t, b: seen.append((t, b)) or real(s, t, b) + 10**12)  # the reference's forward wins
    check = validate.learner_check(path, shape, False, 1)
    assert seen == [(tokens, 4)]
    trained = sum(p.numel() for p in policy.model.parameters() if p.requires_grad)
    assert check.parts == {"gradients": 4 * trained,
                           "activations": memory.activations(shape, tokens, 4, False)[0],
                           "backward / reference forward": real(shape, tokens, 4) + 10**12,
                           "logits": 4 * 16384 * 4 * 9}  # 4 image rows x codebook x fp32 x top-p temporaries


def test_sampling_check_predicts_cfg_rows_in_float32(janus) -> None:
    from r3_rl.plan import validate

    path, shape, policy = janus
    check = validate.sampling_check(path, shape, 2)
    ctx = len(policy._ids("generate", {"prompt": "a photo of a red cat next to a blue dog", "plan": ""}, False, True))
    rows = 2 * 2  # two prompts, CFG
    assert (shape.layers, shape.kv_heads, shape.head_dim, shape.hidden, shape.intermediate) == (1, 1, 128, 128, 352)
    assert check.parts == {"KV cache": rows * (ctx + 4) * 1 * 2 * 1 * 128 * 4,
                           "prefill activations": rows * ctx * (3 * 352 + 5 * 128) * 4,
                           "logits": 2 * 16384 * 4 * 9 + rows * 16384 * 4}
    assert check.before == sum(t.nbytes for t in (*policy.model.parameters(), *policy.model.buffers()))
