"""``policy.tiny.image_input``: how the tiny policy's critic, refiner and yes/no answers read an image.

``tokens`` (the default) is the image's own generation tokens; ``words`` is a colour and a shape word per cell,
the tiny counterpart of a unified model's separate understanding encoder.  The words must be exact, in raster
order with a fixed width per cell, inside the vocabulary and the recipe's positions; the setting must survive
save / load; the default must leave cached warm starts valid; a recipe that cannot honour it is a one-line
error; and a run with it must train through the CLI with no image token in any context it reads.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import cli_one_line_error, tiny_overrides

from r3_rl.blocks.world import N_TOKENS, token_of
from r3_rl.cli import main
from r3_rl.config import load_recipe
from r3_rl.errors import UserError
from r3_rl.policy.base import ImageInput
from r3_rl.policy.registry import build_policy
from r3_rl.policy.tiny import GRID_FILE, TinyUnifiedPolicy, cell_words
from r3_rl.policy.tiny_tokenizer import image_token
from r3_rl.policy.warmstart import _key

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "recipes" / "tiny_blocks.yaml"


def _image(grid: np.ndarray) -> ImageInput:
    return ImageInput(image=np.zeros(0), image_tokens=np.asarray(grid).reshape(-1).tolist())


def test_cell_words_name_each_cell_in_raster_order_two_words_a_cell() -> None:
    grid = np.zeros((2, 3), dtype=np.int64)
    grid[0, 1] = token_of("square", "red")
    grid[1, 0] = token_of("triangle", "orange")
    grid[1, 2] = token_of("circle", "purple")
    assert cell_words(grid) == "empty empty red square empty empty orange triangle empty empty purple circle"
    every = np.arange(N_TOKENS)
    words = cell_words(every).split()
    assert len(words) == 2 * N_TOKENS  # a cell's place is its word offset / 2, whatever it holds
    assert words[2 * token_of("circle", "blue"):][:2] == ["blue", "circle"]


def test_words_policy_reads_images_as_words_inside_its_vocabulary_and_positions() -> None:
    recipe = load_recipe(TINY, ["policy.tiny.image_input=words"])
    policy = build_policy(recipe)
    plain = build_policy(load_recipe(TINY))
    busy = (np.arange(16).reshape(4, 4) % (N_TOKENS - 1)) + 1  # every cell an object: the longest image
    image_ids = set(range(policy.image_offset, policy.image_offset + N_TOKENS))
    prompt = "a photo of a red square to the left of a blue circle"
    contexts = [policy.render("reflect", prompt=prompt, image=policy.image_words(_image(busy))),
                policy.render("refine", prompt=prompt, image=policy.image_words(_image(busy)),
                              instruction="move the square left of the circle"),
                policy.answer_context(_image(busy), "Is there a red square?")]
    for ids in contexts:
        assert policy.tok.unk_token_id not in ids and not image_ids & set(ids)
    longest = len(contexts[1]) + policy.num_cells + 1  # the refined image and its end token
    assert max(len(contexts[0]) + recipe.rollout.reflect.max_new_tokens + 1, longest) <= recipe.policy.tiny.max_positions
    assert plain.image_words(_image(busy)) == " ".join(image_token(int(k)) for k in busy.reshape(-1))


def test_the_setting_survives_save_and_load_and_old_folders_read_tokens(tmp_path: Path) -> None:
    policy = build_policy(load_recipe(TINY, ["policy.tiny.image_input=words", "policy.tiny.hidden_size=32",
                                             "policy.tiny.num_layers=1", "policy.tiny.num_heads=2"]))
    policy.save_pretrained(str(tmp_path / "words"))
    loaded = TinyUnifiedPolicy.from_pretrained(str(tmp_path / "words"), policy.templates)
    assert loaded.image_input == "words"
    grid_file = tmp_path / "words" / GRID_FILE
    grid_file.write_text(json.dumps({"rows": 4, "cols": 4, "version": 0}))  # a folder saved before the option
    assert TinyUnifiedPolicy.from_pretrained(str(tmp_path / "words"), policy.templates).image_input == "tokens"
    grid_file.write_text(json.dumps({"rows": 4, "cols": 4, "image_input": "pixels"}))  # someone else's file
    with pytest.raises(UserError, match="r3_grid.json: image_input 'pixels' is not one of"):
        TinyUnifiedPolicy.from_pretrained(str(tmp_path / "words"), policy.templates)


def test_the_default_leaves_cached_warm_starts_valid_and_words_get_their_own() -> None:
    # the shipped recipe's warm-start key before the option existed (main at f380ac2): its cached warm starts
    # are reused, not retrained
    assert _key(load_recipe(TINY)) == "7686a5dd23a9e40a"
    assert _key(load_recipe(TINY, ["policy.tiny.image_input=words"])) != "7686a5dd23a9e40a"


@pytest.mark.parametrize("change, expected", [
    (["policy.tiny.image_input=pixels"], "key 'policy.tiny.image_input': Input should be 'tokens' or 'words'"),
    (["policy.kind=tiny_flow", "policy.tiny.image_input=words"],
     "key 'policy.tiny.image_input': 'words' is for policy.kind tiny"),
])
def test_a_setting_the_policy_cannot_honour_is_a_one_line_error(change: list[str], expected: str, tmp_path: Path,
                                                                capsys: pytest.CaptureFixture) -> None:
    args = ["train", str(TINY), "--run-dir", str(tmp_path / "run")]
    assert expected in cli_one_line_error([*args, *(a for c in change for a in ("--set", c))], capsys)
    assert not (tmp_path / "run").exists()


def test_a_saved_model_read_another_way_is_an_error_not_a_silent_switch(tmp_path: Path,
                                                                      capsys: pytest.CaptureFixture) -> None:
    policy = build_policy(load_recipe(TINY, tiny_overrides(tmp_path)))
    policy.save_pretrained(str(tmp_path / "tokens"))
    args = ["eval", str(TINY), "--checkpoint", str(tmp_path / "tokens"), "--set", "policy.tiny.image_input=words",
            *(a for o in tiny_overrides(tmp_path) for a in ("--set", o))]
    err = cli_one_line_error(args, capsys)
    assert "policy.tiny.image_input" in err and "'tokens'" in err, err


def test_a_words_run_trains_through_the_cli_and_no_context_holds_an_image_token(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every sampling context of the run (plans, images, critiques, refinements, before and after RL) is free of
    image tokens: the critic and the refiner read the words, the generated images are still tokens."""
    contexts: list[list[int]] = []
    real = TinyUnifiedPolicy._sample

    def recording(self, ctx, modality, *rest, **kw):
        contexts.extend(ctx)
        return real(self, ctx, modality, *rest, **kw)

    monkeypatch.setattr(TinyUnifiedPolicy, "_sample", recording)
    run = tmp_path / "run"
    overrides = [*tiny_overrides(tmp_path), "policy.tiny.image_input=words"]
    assert main(["train", str(TINY), "--run-dir", str(run), *(a for o in overrides for a in ("--set", o))]) == 0
    policy = TinyUnifiedPolicy.from_pretrained(str(run / "final"), load_recipe(TINY).templates.model_dump())
    assert policy.image_input == "words"
    image_ids = set(range(policy.image_offset, policy.image_offset + N_TOKENS))
    empty = policy.encode("empty")[0]
    assert contexts and not any(image_ids & set(c) for c in contexts)
    assert sum(empty in c for c in contexts) > 0  # critiques and refinements read images as words


def test_the_plan_sizes_the_longer_image_the_contexts_really_get() -> None:
    """``r3-rl plan`` counts an image read as words as long as the rendered contexts make it (two words a cell)."""
    from r3_rl.plan.shapes import model_shape

    grid = np.zeros((4, 4), dtype=np.int64)
    lengths, planned = {}, {}
    for mode in ("tokens", "words"):
        recipe = load_recipe(TINY, [f"policy.tiny.image_input={mode}"])
        policy = build_policy(recipe)
        lengths[mode] = len(policy.render("reflect", prompt="a photo of a cat", image=policy.image_words(_image(grid))))
        planned[mode] = model_shape(recipe).vision_tokens
    assert planned["words"] - planned["tokens"] == lengths["words"] - lengths["tokens"] == 16
