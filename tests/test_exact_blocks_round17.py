"""Exact small cases for the Blocks world's codec, pixel detector, prompt split, reference pairs, edit language and
grid synthesis: input checks that must refuse (negative tokens, odd widths, unknown colours/tags/counts), the
detector's foreground, per-component masks and small-blob templates, the nearest colour by Euclidean distance, the
reference set's seeding, grid shape and flaw kind, the synthesis of custom prompts (a position against a later
clause, every shape mentioned or excluded, a full grid with distractors), first-clause critiques, tag weights and the
held-out list's tie-break -- each pinning a behaviour a one-point bug changed without any other test noticing
(round 17 audit)."""
from __future__ import annotations

import math
import zlib

import numpy as np
import pytest

from r3_rl.blocks import codec, detector, prompts, reference, synthesis
from r3_rl.blocks.edits import EditOp, apply_edit, check_metadata, critique_text, diagnose, judge
from r3_rl.blocks.world import COLORS, PALETTE, SHAPES, objects, token_of
from r3_rl.errors import UserError
from r3_rl.trajectory import PromptItem


def _grid(rows: int, cols: int, cells: dict[tuple[int, int], tuple[str, str]]) -> np.ndarray:
    g = np.zeros((rows, cols), np.int64)
    for (r, c), (shape, colour) in cells.items():
        g[r, c] = token_of(shape, colour)
    return g


def _item(md: dict) -> PromptItem:
    return PromptItem(id="p", prompt=md["prompt"], metadata=md, source="blocks")


# ============================================================================================ codec
def test_encode_refuses_a_negative_token() -> None:
    """A negative token indexed the tile table from the end: -1 rendered as the last tile (an orange triangle)."""
    with pytest.raises(ValueError, match=r"grid tokens must lie in \[0, 19\), got \[-1, 0\]"):
        codec.encode(np.array([[-1, 0]]))


def test_encode_of_an_empty_batch_is_an_empty_batch_of_images() -> None:
    out = codec.encode(np.zeros((0, 2, 3), np.int64), 6)
    assert out.shape == (0, 12, 18, 3) and out.dtype == np.uint8


def test_encode_names_the_shape_it_needs_for_a_one_dimensional_grid() -> None:
    with pytest.raises(ValueError, match=r"grid must have shape \(\.\.\., rows, cols\), got \(4,\)"):
        codec.encode(np.zeros(4, np.int64))


def test_decode_refuses_a_width_that_is_not_a_multiple_of_the_cell() -> None:
    with pytest.raises(ValueError, match="image size 16x20 is not a multiple of the cell size 8"):
        codec.decode(np.zeros((16, 20, 3), np.uint8))


def test_decode_refuses_an_image_with_four_channels() -> None:
    with pytest.raises(ValueError, match=r"image must have shape \(\.\.\., H, W, 3\), got \(16, 16, 4\)"):
        codec.decode(np.zeros((16, 16, 4), np.uint8))


# ============================================================================================ detector
def test_a_pixel_that_differs_from_the_background_in_one_channel_is_foreground() -> None:
    """(255, 255, 0) differs from white only in blue: still an object (nearest palette colour yellow)."""
    img = np.full((10, 10, 3), 255, np.uint8)
    img[2:5, 3:7] = (255, 255, 0)
    dets = detector.detect(img)
    assert [(d.box, d.color) for d in dets] == [((3.0, 2.0, 7.0, 5.0), "yellow")]


def test_a_component_is_classified_by_its_own_pixels_not_its_neighbours_in_the_box() -> None:
    """An L (left column and bottom row of an 8x8 box) reads as a triangle; a separate 3x3 block inside its box
    (top right, not touching) is another object and must not join the L's mask (with it the L reads as a square)."""
    ell = np.zeros((8, 8), bool)
    ell[:, 0] = ell[7, :] = True
    img = np.full((12, 12, 3), 255, np.uint8)
    img[2:10, 2:10][ell] = PALETTE["red"]
    alone = detector.detect(img.copy())
    img[2:5, 7:10] = PALETTE["blue"]
    dets = detector.detect(img)
    assert [(d.label, d.color, d.box) for d in alone] == [("triangle", "red", (2.0, 2.0, 10.0, 10.0))]
    assert [(d.label, d.color, d.box) for d in dets] == [("triangle", "red", (2.0, 2.0, 10.0, 10.0)),
                                                          ("square", "blue", (7.0, 2.0, 10.0, 5.0))]


def test_a_three_pixel_blob_is_matched_against_side_four_templates() -> None:
    """A 3x3 blob is sampled to 4x4 (rows and columns 0, 0, 1, 2) and compared with the side-4 sprites (cell 6):
    [[0,1,0],[1,1,1],[1,1,0]] -> [[0,0,1,0],[0,0,1,0],[1,1,1,1],[1,1,1,0]] differs from the triangle
    [[0,1,1,0],[0,1,1,0],[1,1,1,1],[1,1,1,1]] in 3 pixels, from the circle (all but the corners) in 5 and from the
    square in 7: a triangle (at side 5 the triangle and the circle tie and the circle would win)."""
    blob = np.array([[0, 1, 0], [1, 1, 1], [1, 1, 0]], bool)
    assert detector.classify_shape(blob) == "triangle"
    img = np.full((7, 7, 3), 255, np.uint8)
    img[2:5, 2:5][blob] = PALETTE["green"]
    assert [(d.label, d.color, d.box) for d in detector.detect(img)] == [("triangle", "green", (2.0, 2.0, 5.0, 5.0))]


def test_nearest_colour_is_euclidean() -> None:
    """(128, 155, 248) is nearer blue than purple in RGB distance (but nearer purple by the L1 norm)."""
    rgb = (128, 155, 248)
    peer = min(COLORS, key=lambda c: math.dist(PALETTE[c], rgb))
    assert detector.nearest_color(np.array(rgb)) == peer == "blue"
    img = np.full((8, 8, 3), 255, np.uint8)
    img[1:7, 1:7] = rgb
    assert [(d.label, d.color) for d in detector.detect(img)] == [("square", "blue")]


# ============================================================================================ reference pairs
def test_reference_grid_is_drawn_from_the_prompt_text_and_seed_at_the_requested_shape() -> None:
    """The correct image is ``random_correct_grid`` under ``default_rng([seed, crc32(prompt)])`` on a rows x cols grid
    (2 x 4 here: a swapped rows/cols shows), and its tokens are the decoded image in raster order."""
    md = prompts.enumerate_tag("two_object")[0]
    refs = reference.reference_pairs([_item(md)], 5, 2, 4)
    rng = np.random.default_rng([5, zlib.crc32(md["prompt"].encode())])
    want = synthesis.random_correct_grid(md, rng, 2, 4)
    assert [r.kind for r in refs][0] == "correct"
    assert refs[0].image.shape == (16, 32, 3) and refs[0].image_tokens == want.reshape(-1).tolist()
    for r in refs:
        assert codec.decode(r.image).reshape(-1).tolist() == r.image_tokens


def test_reference_pairs_of_two_prompts_with_the_same_clauses_differ() -> None:
    """Two colour prompts with one shape each are seeded by their own texts, not by the seed alone."""
    a, b = (m for m in prompts.enumerate_tag("colors") if m["prompt"] in ("a photo of a red square",
                                                                         "a photo of a green square"))
    layouts = []
    for md in (a, b):
        ref = reference.reference_pairs([_item(md)], 0, 4, 4)[0]
        layouts.append([o[:2] for o in objects(np.array(ref.image_tokens).reshape(4, 4))])
    peers = [[o[:2] for o in objects(synthesis.random_correct_grid(
        md, np.random.default_rng([0, zlib.crc32(md["prompt"].encode())]), 4, 4))] for md in (a, b)]
    assert layouts == peers


def test_flawed_reference_kind_is_the_first_fix_when_two_clauses_fail() -> None:
    """"a red square and a green circle", seed 0, 2 x 3: the flawed image has a green square before the red one and
    no circle -- the colour clause (first) and the circle's count fail: kind is the first fix, a recolour."""
    md = prompts.enumerate_tag("color_attr")[0]
    assert md["prompt"] == "a photo of a red square and a green circle"
    refs = reference.reference_pairs([_item(md)], 0, 2, 3)
    bad = np.array(refs[1].image_tokens).reshape(2, 3)
    assert objects(bad) == [(0, 1, "square", "green"), (1, 2, "square", "red")]
    assert [op.kind for op in diagnose(bad, md)] == ["recolor", "add"]
    assert [r.kind for r in refs] == ["correct", "flawed:recolor"]
    # and the critique speaks of the first failing clause too
    assert critique_text(bad, md) == "<think> the square is green not red </think> make the square red"


# ============================================================================================ synthesis
def test_a_position_against_a_later_clause_is_placed_against_that_clause() -> None:
    """"a triangle above the square" (clause 1), with a circle as clause 0, in a 2 x 2 grid: the triangle is placed
    above the square only, so the circle may share the triangle's row (it cannot if placed above the circle)."""
    md = {"prompt": "x", "include": [{"class": "circle", "count": 1}, {"class": "square", "count": 1},
                                     {"class": "triangle", "count": 1, "position": ["above", 1]}]}
    circle_rows = set()
    for seed in range(6):
        g = synthesis.random_correct_grid(md, np.random.default_rng(seed), 2, 2)
        assert judge(g, md).correct
        at = {o[2]: o[:2] for o in objects(g)}
        assert at["triangle"][0] == 0 and at["square"][0] == 1
        circle_rows.add(at["circle"][0])
    assert circle_rows == {0, 1}


def test_distractors_when_the_prompt_mentions_every_shape() -> None:
    """No shape is left for a distractor: none is drawn (it raised on an empty choice)."""
    md = {"prompt": "y", "include": [{"class": s, "count": 1} for s in SHAPES]}
    g = synthesis.random_correct_grid(md, np.random.default_rng(0), distractors=2)
    assert sorted(o[2] for o in objects(g)) == sorted(SHAPES) and judge(g, md).correct


def test_distractors_on_a_grid_the_prompt_fills() -> None:
    md = {"prompt": "z", "include": [{"class": "square", "count": 4}]}
    g = synthesis.random_correct_grid(md, np.random.default_rng(0), 2, 2, distractors=1)
    assert [o[2] for o in objects(g)] == ["square"] * 4


def test_no_distractor_when_every_other_shape_is_excluded() -> None:
    """"a square, no circle, no triangle": an excluded shape is no distractor (drawing one can never be correct,
    so the 200 tries ran out with "cannot place")."""
    md = {"prompt": "q", "include": [{"class": "square", "count": 1}],
          "exclude": [{"class": "circle", "count": 1}, {"class": "triangle", "count": 1}]}
    g = synthesis.random_correct_grid(md, np.random.default_rng(0), distractors=1)
    assert [o[2] for o in objects(g)] == ["square"]


def test_misplaced_candidate_moves_the_first_object_of_the_clause() -> None:
    """"two circles right of the square": the last candidate moves the FIRST circle (the swap before it too)."""
    md = {"include": [{"class": "square", "count": 1}, {"class": "circle", "count": 2, "position": ["right of", 0]}]}
    g = _grid(3, 4, {(0, 0): ("square", "red"), (0, 2): ("circle", "blue"), (2, 3): ("circle", "blue")})
    for seed in range(4):
        moved = synthesis._mutations(g, md, np.random.default_rng(seed), 8)[-1]
        assert moved[0, 2] == 0 and moved[2, 3] == g[2, 3] and moved[0, 0] == g[0, 0]
        assert np.count_nonzero(moved) == 3


def test_perturb_and_flaw_candidates_return_int64_copies() -> None:
    md = prompts.enumerate_tag("single_object")[0]
    g = _grid(2, 2, {(0, 0): ("square", "red")}).astype(np.int32)
    bad = synthesis.perturb(g, md, np.random.default_rng(0))
    assert bad.dtype == np.int64 and g[0, 0] == token_of("square", "red")
    assert all(c.dtype == np.int64 for c in synthesis.flaw_candidates(g, md, np.random.default_rng(0)))


# ============================================================================================ edits
@pytest.mark.parametrize("md, match", [
    ({"include": [{"class": "square", "count": 1, "color": "pink"}]}, r"include\[0\] color 'pink' is not a Blocks"),
    ({"include": [{"class": "square", "count": 1, "region": "above"}]}, r"keys \['region'\] the Blocks world"),
    ({"exclude": [{"class": "dog", "count": 1}]}, r"exclude\[0\] class 'dog' is not a Blocks shape"),
])
def test_check_metadata_refuses_what_the_blocks_world_cannot_draw(md: dict, match: str) -> None:
    with pytest.raises(UserError, match=match):
        check_metadata(md)


def test_an_empty_grid_has_zero_squares_plural() -> None:
    md = {"include": [{"class": "square", "count": 1}]}
    assert critique_text(np.zeros((2, 2), np.int64), md) == (
        "<think> the image has zero squares but needs one </think> add a square")


def test_a_wrong_colour_among_two_names_the_first_wrong_one() -> None:
    md = {"include": [{"class": "square", "count": 2, "color": "red"}]}
    g = _grid(2, 2, {(0, 0): ("square", "blue"), (1, 1): ("square", "green")})
    assert critique_text(g, md) == "<think> the square is blue not red </think> make the square red"


def test_a_recolour_without_a_new_colour_and_a_swap_without_a_partner_change_nothing() -> None:
    g = _grid(2, 2, {(0, 0): ("square", "red"), (1, 1): ("circle", "blue")})
    rng = np.random.default_rng(0)
    assert np.array_equal(apply_edit(g, EditOp("recolor", "square"), rng), g)
    assert np.array_equal(apply_edit(g, EditOp("swap", "square", target="triangle"), rng), g)
    assert np.array_equal(apply_edit(g, EditOp("swap", "triangle", target="square"), rng), g)


def test_a_second_counted_object_out_of_place_is_diagnosed() -> None:
    """"two circles right of the square": the first circle is right of it, the second (1, 0) is not -- the clause
    fails and diagnose must say so (checking the first circle only found no fix and raised)."""
    md = {"include": [{"class": "square", "count": 1}, {"class": "circle", "count": 2, "position": ["right of", 0]}]}
    g = _grid(2, 3, {(0, 1): ("square", "red"), (0, 2): ("circle", "blue"), (1, 0): ("circle", "blue")})
    assert not judge(g, md).correct
    assert diagnose(g, md) == [EditOp("move", "circle", relation="right of", target="square")]
    assert critique_text(g, md) == ("<think> the circle is not right of the square </think> "
                                    "move the circle right of the square")


def test_an_unfixable_two_target_position_first_clears_the_clutter() -> None:
    """"a circle left of two squares" with both squares in column 0 and a triangle no clause counts: the clutter goes
    first ("too full" note); only without clutter is the circle itself taken out."""
    meta = {"include": [{"class": "square", "count": 2}, {"class": "circle", "count": 1, "position": ["left of", 0]}]}
    g = _grid(4, 4, {(0, 0): ("square", "red"), (3, 0): ("square", "red"), (1, 2): ("circle", "blue"),
                     (2, 3): ("triangle", "green")})
    assert diagnose(g, meta) == [EditOp("remove", "triangle", "green")]
    assert critique_text(g, meta) == "<think> the grid is too full </think> remove a green triangle"


# ============================================================================================ prompts
@pytest.mark.parametrize("counts", [(), (2.0,), (2, 3.5)])
def test_prompt_counts_must_be_a_non_empty_tuple_of_positive_ints(counts: tuple) -> None:
    with pytest.raises(UserError, match="blocks counts must be positive integers"):
        prompts.prompt_pool("train", "counting", counts=counts)


def test_prompt_pool_names_an_unknown_tag() -> None:
    with pytest.raises(UserError, match="unknown tag 'colours'.*did you mean 'colors'"):
        prompts.prompt_pool("train", "colours")


def test_sampling_draws_every_prompt_of_a_pool_including_the_last() -> None:
    pool = [m["prompt"] for m in prompts.prompt_pool("train", "single_object")]
    assert len(pool) == 2  # three shapes, round(0.75) = 1 held out
    got = {p.prompt for p in prompts.sample_prompts(40, seed=0, tag_mix={"single_object": 1})}
    assert got == set(pool)


def test_sampling_follows_the_tag_weights() -> None:
    """Weights 1 : 9 draw about one prompt in ten from the first tag (40 of 400 expected; 200 if drawn evenly)."""
    tags = [p.metadata["tag"] for p in prompts.sample_prompts(400, seed=1, tag_mix={"counting": 1, "position": 9})]
    assert set(tags) == {"counting", "position"}
    assert 15 <= tags.count("counting") <= 70


def test_heldout_list_does_not_depend_on_the_order_of_the_tag_mix() -> None:
    """Quotas 1.5 / 1.5 of 3: the tie goes to the tag first in TAGS (single_object), and the list is the same
    whichever order the mix names its tags in."""
    a = prompts.heldout_prompts(3, seed=2, tag_mix={"single_object": 1, "two_object": 1})
    b = prompts.heldout_prompts(3, seed=2, tag_mix={"two_object": 1, "single_object": 1})
    assert [p.metadata["tag"] for p in a] == ["single_object", "two_object", "single_object"]
    assert [(p.id, p.prompt) for p in a] == [(p.id, p.prompt) for p in b]
    one = prompts.heldout_prompts(1, tag_mix={"two_object": 1, "single_object": 1})
    assert [p.metadata["tag"] for p in one] == ["single_object"]


def test_heldout_size_must_not_be_negative() -> None:
    with pytest.raises(UserError, match="blocks heldout size must be >= 0, got -1"):
        prompts.heldout_prompts(-1)


def test_position_prompts_cover_four_relations_per_ordered_pair() -> None:
    pos = prompts.enumerate_tag("position")
    assert len(pos) == 6 * 4
    assert sorted({m["include"][1]["position"][0] for m in pos}) == ["above", "below", "left of", "right of"]
    assert pos[3]["prompt"] == "a photo of a circle below a square"


def test_a_count_of_one_is_written_in_the_singular() -> None:
    """Found by round 17: ``counts=(1, ...)`` wrote "a photo of one squares"; the default counts (2-4) keep their
    texts, and so the held-out split."""
    texts = [md["prompt"] for md in prompts.enumerate_tag("counting", counts=(1, 2))]
    assert texts[:2] == ["a photo of one square", "a photo of two squares"]
    assert [md["prompt"] for md in prompts.enumerate_tag("counting")][:3] == [
        "a photo of two squares", "a photo of three squares", "a photo of four squares"]
