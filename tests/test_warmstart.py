"""The tiny policy's synthetic warm start: every example is labelled with the truth about its own image."""
from __future__ import annotations

import numpy as np
import pytest

from r3_rl.blocks import edits, synthesis
from r3_rl.config import Recipe
from r3_rl.data import BlocksPrompts
from r3_rl.policy.registry import build_policy
from r3_rl.policy.warmstart import question_examples, synthetic_examples


@pytest.fixture(scope="module")
def policy():  # noqa: ANN201
    r = Recipe()
    r.policy.tiny.hidden_size, r.policy.tiny.num_layers, r.policy.tiny.num_heads = 32, 1, 2
    return build_policy(r)


def _grid(policy, ids: list[int]) -> np.ndarray:  # noqa: ANN001
    words = policy.tok.convert_ids_to_tokens(ids)
    cells = [int(w[5:-1]) for w in words if w.startswith("<img_")]
    return np.asarray(cells[-16:], dtype=np.int64).reshape(4, 4)


def test_questions_are_answered_about_the_image_not_the_prompt(policy) -> None:  # noqa: ANN001
    meta = {"include": [{"class": "square", "count": 2}], "exclude": [{"class": "square", "count": 3}]}
    three = np.zeros((4, 4), np.int64)
    three[0, :3] = 1
    ((ctx, target),) = question_examples(policy, three, meta, 1, np.random.default_rng(0))
    assert policy.decode(target) == "no"  # the prompt expects yes; this image has three squares
    assert "are there exactly two squares in the image" in policy.decode(ctx)
    two = three.copy()
    two[0, 2] = 0
    assert policy.decode(question_examples(policy, two, meta, 1, np.random.default_rng(0))[0][1]) == "yes"
    assert question_examples(policy, two, meta, 0, np.random.default_rng(0)) == []


def test_random_layout_critiques_are_labelled_for_their_own_image(policy) -> None:  # noqa: ANN001
    r = Recipe()
    r.warmstart.random_layouts = 1.0
    prompts = BlocksPrompts(tags=r.data.blocks.tags, seed=0)
    rng = np.random.default_rng(1)
    critiques, moved = 0, 0
    for k in range(24):
        meta = prompts.train_prompt(k).metadata
        ex = synthetic_examples(policy, prompts, k, 1, r.warmstart, rng)
        drawn = next(_grid(policy, t) for _, t in ex if len(t) == 16)  # the generate example's image
        for ctx, target in ex:
            text = policy.decode(target)
            if "</think>" in text and not text.endswith("</think>"):  # a critique (a plan ends at </think>)
                grid = _grid(policy, ctx)
                assert text == edits.critique_text(grid, meta)  # the label is the truth about this image
                critiques += 1
                moved += not np.array_equal(grid, drawn)
                break  # the first critique is of the trajectory's first image
    assert critiques == 24 and moved >= 12  # critiqued images are laid out apart from the drawn canonical ones


def test_random_instructions_are_applied_exactly_and_are_no_ops_when_they_do_not_apply(policy) -> None:  # noqa: ANN001
    from r3_rl.blocks.world import token_of
    from r3_rl.policy.warmstart import instruction_example, random_instruction

    grid = np.zeros((4, 4), np.int64)
    grid[0, 0] = token_of("square", "red")
    rng = np.random.default_rng(3)
    kinds, unchanged = set(), 0
    for _ in range(60):
        state = rng.bit_generator.state
        ctx, target = instruction_example(policy, "a photo of a red square", grid, rng)
        rng2 = np.random.default_rng()
        rng2.bit_generator.state = state
        op = random_instruction(rng2)
        assert edits.parse_edit(edits.edit_text(op)) == op and edits.edit_text(op) in policy.decode(ctx)
        expected = edits.apply_edit(grid, op, rng2)  # the same draws as the example made
        assert np.array_equal(_grid(policy, target), expected)
        kinds.add(op.kind)
        unchanged += np.array_equal(expected, grid)
    assert kinds == set(edits.KINDS) and 10 <= unchanged < 60  # many instructions do not apply to this image
    recolor = edits.EditOp("recolor", "square", "yellow", new_color="red")  # there is no yellow square
    assert np.array_equal(edits.apply_edit(grid, recolor, rng), grid)


def test_a_lenient_critic_misses_flaws_at_the_configured_rate(policy) -> None:  # noqa: ANN001
    from r3_rl.policy.warmstart import LENIENT

    prompts = BlocksPrompts(tags=Recipe().data.blocks.tags, seed=0)
    for miss, want in ((1.0, 1.0), (0.0, 0.0)):
        r = Recipe()
        r.warmstart.flaw_prob, r.warmstart.miss_prob = 1.0, miss  # every first image flawed
        rng = np.random.default_rng(2)
        lenient = 0
        for k in range(16):
            meta = prompts.train_prompt(k).metadata
            ex = synthetic_examples(policy, prompts, k, 1, r.warmstart, rng)
            first = next((c, t) for c, t in ex if "</think>" in policy.decode(t)
                         and not policy.decode(t).endswith("</think>"))
            assert edits.diagnose(_grid(policy, first[0]), meta)  # the critiqued image is flawed
            lenient += policy.decode(first[1]) == LENIENT
        assert lenient / 16 == want


def test_a_described_critique_names_every_object_then_gives_the_true_verdict() -> None:
    from r3_rl.blocks.world import token_of
    from r3_rl.policy.warmstart import critique_label, describe_grid

    grid = np.zeros((4, 4), np.int64)
    grid[0, 0] = token_of("triangle", "blue")
    grid[1, 1] = grid[2, 3] = token_of("circle", "orange")
    assert describe_grid(grid) == "the image has a blue triangle and two orange circles"
    assert describe_grid(np.zeros((4, 4), np.int64)) == "the image is empty"
    meta = {"include": [{"class": "triangle", "count": 1, "color": "purple"}]}
    plain = edits.critique_text(grid, meta)
    assert plain == "<think> the triangle is blue not purple </think> make the triangle purple"  # a wrong colour
    assert critique_label(grid, meta, describe="none") == plain
    assert critique_label(grid, meta, describe="objects") == (
        "<think> the image has a blue triangle and two orange circles </think> make the triangle purple")
    assert critique_label(grid, meta, describe="objects", lenient=True).endswith("</think> no further edit needed")


def test_a_counted_description_totals_each_shape_before_listing_the_objects() -> None:
    from r3_rl.blocks.world import token_of
    from r3_rl.policy.warmstart import critique_label, describe_grid

    grid = np.zeros((4, 4), np.int64)
    grid[0, 1] = token_of("circle", "green")
    grid[0, 3] = token_of("triangle", "orange")
    grid[1, 0] = grid[3, 2] = token_of("circle", "red")
    assert describe_grid(grid, counts=True) == (
        "the image has three circles and a triangle with a green circle and an orange triangle and two red circles")
    assert describe_grid(np.zeros((4, 4), np.int64), counts=True) == "the image is empty"
    three, four = ({"include": [{"class": "circle", "count": n}]} for n in (3, 4))
    assert critique_label(grid, three, describe="counts").endswith("</think> no further edit needed")
    assert critique_label(grid, four, describe="counts") == (
        f"<think> {describe_grid(grid, counts=True)} </think> add a circle")


def test_describe_takes_the_old_switch_and_refuses_an_unknown_style() -> None:
    import pydantic

    from r3_rl.config import Warmstart

    assert Warmstart(describe=True).describe == "objects" and Warmstart(describe=False).describe == "none"
    assert Warmstart(describe="counts").describe == "counts"
    with pytest.raises(pydantic.ValidationError, match="objects"):
        Warmstart(describe="maybe")


def test_critic_steps_draw_flaw_kinds_evenly_and_label_each_image_with_its_truth(policy) -> None:  # noqa: ANN001
    from r3_rl.policy.warmstart import critic_examples, describe_grid

    r = Recipe()
    r.warmstart.describe = "objects"
    prompts = BlocksPrompts(tags={"color_attr": 1.0}, seed=0)  # one object kind, coloured: add / recolor / ...
    rng = np.random.default_rng(0)
    kinds: dict[str, int] = {}
    examples = critic_examples(policy, prompts, 0, 400, r.warmstart, rng)
    for k, (ctx, target) in enumerate(examples):
        meta, grid = prompts.train_prompt(k).metadata, _grid(policy, ctx)
        text = policy.decode(target)
        verdict = edits.critique_text(grid, meta).split("</think>")[1].strip()
        assert text == f"<think> {describe_grid(grid)} </think> {verdict}"  # the truth about this image
        ops = edits.diagnose(grid, meta)
        kind = ops[0].kind if ops else "correct"
        kinds[kind] = kinds.get(kind, 0) + 1
    assert 160 <= kinds.pop("correct") <= 240  # half the images are left correct
    assert set(kinds) == {"add", "recolor"} and abs(kinds["add"] - kinds["recolor"]) <= 40  # even, not 2:1


def test_flaw_candidates_are_all_judged_incorrect_and_hold_what_perturb_draws() -> None:
    meta = {"include": [{"class": "circle", "count": 1, "color": "red"}, {"class": "square", "count": 1}]}
    grid = synthesis.random_correct_grid(meta, np.random.default_rng(0))
    cands = synthesis.flaw_candidates(grid, meta, np.random.default_rng(1))
    assert cands and all(not edits.judge(c, meta).correct for c in cands)
    drawn = synthesis.perturb(grid, meta, np.random.default_rng(1))  # the same draws, one candidate picked
    assert any(np.array_equal(drawn, c) for c in cands)


def test_the_new_warm_start_options_change_its_cache_key_only_when_set() -> None:
    from r3_rl.policy.warmstart import _key

    def warm() -> Recipe:  # critic steps need main steps to follow
        return Recipe(warmstart={"steps": 5})

    r = warm()
    base = _key(r)
    assert "describe" not in base and _key(warm()) == base
    r.warmstart.describe = "objects"
    assert _key(r) != base
    counted = warm()
    counted.warmstart.describe = "counts"
    assert _key(counted) not in (base, _key(r))
    r2 = warm()
    r2.warmstart.critic_steps = 10
    assert _key(r2) not in (base, _key(r))


def test_a_described_warm_start_needs_room_for_the_critique(tmp_path) -> None:  # noqa: ANN001
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "r3_rl.cli", "train", "recipes/tiny_blocks.yaml", "--run-dir",
                          str(tmp_path / "run"), "--set", "warmstart.describe=true"], capture_output=True, text=True)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert "rollout.reflect.max_new_tokens" in out.stderr and len(out.stderr.strip().splitlines()) == 1


def test_critic_steps_are_as_lenient_as_the_main_steps(policy) -> None:  # noqa: ANN001
    from r3_rl.policy.warmstart import critic_examples

    r = Recipe()
    r.warmstart.miss_prob = 1.0
    prompts = BlocksPrompts(tags={"colors": 1.0}, seed=0)
    flawed = 0
    for k, (ctx, target) in enumerate(critic_examples(policy, prompts, 0, 60, r.warmstart, np.random.default_rng(4))):
        flawed += bool(edits.diagnose(_grid(policy, ctx), prompts.train_prompt(k).metadata))
        assert policy.decode(target).endswith("</think> no further edit needed")  # flawed or not
    assert 15 <= flawed <= 45
