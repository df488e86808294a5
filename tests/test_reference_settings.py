"""The real-model recipes score texts as the reference does (sen-ye/R3 ``train/online_rl.py`` and
``rollout_controller.py``): a critique stops when it contains "no further edit" in any case, a text's format is
one ``<think>`` block with no think tag inside or after it, and the format weight is 1.0.  The expected values
below are the reference's rules applied by hand to each case, not our functions' outputs."""
from __future__ import annotations

import pytest
from conftest import REPO

from r3_rl.config import load_recipe
from r3_rl.policy.base import parse_critique
from r3_rl.rewards.compose import format_ok

REAL = ["grpo_geneval.yaml", "grpo_geneval_7b.yaml", "grpo_geneval_bagel.yaml"]

# critique -> does the reference stop ("no further edit" in the text after the last </think>, lower-cased)
STOPS = [("<think>ok</think> no further edit needed", True),
         ("<think>ok</think> No further edit is needed.", True),
         ("<think>ok</think> no further edits needed", True),
         ("<think>ok</think> NO FURTHER EDIT", True),
         ("<think>no further edit</think> make the dog red", False),  # the phrase inside the thinking only
         ("<think>ok</think> add a further edit to the cat", False)]

# (text, reason format ok, reflect format ok) under the reference's get_think_format_reward
FORMATS = [("<think>a plan</think>", True, False),
           ("<think>a\nplan</think>", True, False),
           ("  <think>a plan</think>  ", True, False),  # the reference strips first
           ("<think>a</think><think>b</think>", False, False),
           ("<think>a <think> b</think>", False, False),
           ("<think>look</think> make it red", False, True),
           ("<think>look</think> make it red </think>", False, False),
           ("<think>look</think> <think>again</think> no", False, False),
           ("no think at all", False, False)]


@pytest.mark.parametrize("name", REAL)
def test_real_recipes_stop_and_format_as_the_reference(name: str) -> None:
    recipe = load_recipe(REPO / "recipes" / name)
    stop_phrase, rw = recipe.templates.stop_phrase, recipe.rewards
    assert [parse_critique(text, stop_phrase)[1] for text, _ in STOPS] == [stop for _, stop in STOPS]
    assert [format_ok(t, rw.reason_format) for t, _, _ in FORMATS] == [r for _, r, _ in FORMATS]
    assert [format_ok(t, rw.reflect_format) for t, _, _ in FORMATS] == [f for _, _, f in FORMATS]
    assert rw.format_weight == 1.0


def test_bagel_recipe_alternates_stages_as_the_reference() -> None:
    assert load_recipe(REPO / "recipes" / "grpo_geneval_bagel.yaml").tree.schedule == "alternate"
