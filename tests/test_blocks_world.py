"""The Blocks world: tokens, codec, pixel detector, prompts, plans/critiques/edits and the blocks reward."""
from __future__ import annotations

import itertools
import time
from collections import deque

import numpy as np
import pytest

from r3_rl.blocks import codec, detector, edits, prompts, synthesis, world
from r3_rl.blocks.edits import EditOp, apply_edit, critique_text, diagnose, edit_text, judge, parse_edit
from r3_rl.blocks.synthesis import perturb
from r3_rl.errors import UserError
from r3_rl.policy.base import parse_critique
from r3_rl.rewards.base import RewardSample
from r3_rl.rewards.blocks import BlocksReward, score_image

ALL_MD = [md for tag in prompts.TAGS for md in prompts.enumerate_tag(tag)]
T = world.token_of


def random_grid(rng, rows=4, cols=4, density=None):
    density = rng.random() if density is None else density
    return rng.integers(1, world.N_TOKENS, (rows, cols)) * (rng.random((rows, cols)) < density)


# ------------------------------------------------------------------ world + codec
def test_tokens_roundtrip_and_layout():
    assert world.N_TOKENS == 1 + len(world.SHAPES) * len(world.COLORS) and len(world.COLORS) >= 6
    seen = set()
    for s, c in itertools.product(world.SHAPES, world.COLORS):
        t = T(s, c)
        assert world.object_of(t) == (s, c) and t not in seen
        seen.add(t)
    assert T("square", "red") == 1 and T("circle", "red") == 1 + len(world.COLORS)
    assert world.object_of(0) is None and seen == set(range(1, world.N_TOKENS))
    with pytest.raises(ValueError):
        T("hexagon", "red")


def test_codec_roundtrip_batches_and_sizes():
    rng = np.random.default_rng(0)
    for cell, (rows, cols) in [(8, (4, 4)), (6, (3, 5)), (11, (2, 2)), (16, (5, 3))]:
        g = rng.integers(0, world.N_TOKENS, (7, rows, cols))
        img = codec.encode(g, cell)
        assert img.shape == (7, rows * cell, cols * cell, 3) and img.dtype == np.uint8
        assert np.array_equal(codec.decode(img, cell), g)
        assert np.array_equal(codec.decode(img[0], cell), g[0])
    # the tile for (row 1, col 2) sits at pixels [8:16, 16:24]
    g = np.zeros((4, 4), dtype=int)
    g[1, 2] = T("square", "blue")
    img = codec.encode(g)
    assert (img[9:15, 17:23] == world.PALETTE["blue"]).all()
    assert (img[8, 16:24] == world.BACKGROUND_RGB).all() and (img[15, 16:24] == world.BACKGROUND_RGB).all()
    assert (np.delete(img.reshape(-1, 3), np.ravel_multi_index(np.mgrid[9:15, 17:23].reshape(2, -1), (32, 32)), 0)
            == world.BACKGROUND_RGB).all()


def test_sprites_distinct_and_decode_robust_to_noise():
    m = codec.sprite_masks(8)
    assert m["square"].all() and not m["circle"][0, 0] and m["triangle"][-1, 0] and not m["triangle"][0, 0]
    assert len({v.tobytes() for v in m.values()}) == 3
    rng = np.random.default_rng(1)
    g = rng.integers(0, world.N_TOKENS, (16, 4, 4))
    noisy = np.clip(codec.encode(g).astype(int) + rng.integers(-20, 21, (16, 32, 32, 3)), 0, 255).astype(np.uint8)
    assert np.array_equal(codec.decode(noisy), g)


def test_codec_is_fast_and_validates():
    g = np.random.default_rng(2).integers(0, world.N_TOKENS, (256, 4, 4))
    codec.decode(codec.encode(g))  # warm caches
    t = time.perf_counter()
    assert np.array_equal(codec.decode(codec.encode(g)), g)
    assert time.perf_counter() - t < 0.5  # a few ms in practice; generous for a loaded CI machine
    with pytest.raises(ValueError):
        codec.encode(np.full((2, 2), world.N_TOKENS))
    with pytest.raises(ValueError):
        codec.decode(np.zeros((30, 32, 3), np.uint8))
    with pytest.raises(ValueError):
        codec.sprite_masks(5)


# ------------------------------------------------------------------ detector
def _bfs_components(mask):
    """Peer implementation: plain BFS flood fill, 8-connectivity."""
    lab = -np.ones(mask.shape, int)
    n = 0
    for y, x in zip(*np.nonzero(mask)):
        if lab[y, x] >= 0:
            continue
        lab[y, x] = n
        q = deque([(y, x)])
        while q:
            cy, cx = q.popleft()
            for dy, dx in itertools.product((-1, 0, 1), repeat=2):
                ny, nx = cy + dy, cx + dx
                if 0 <= ny < mask.shape[0] and 0 <= nx < mask.shape[1] and mask[ny, nx] and lab[ny, nx] < 0:
                    lab[ny, nx] = n
                    q.append((ny, nx))
        n += 1
    return lab, n


def test_label_components_matches_bfs():
    rng = np.random.default_rng(3)
    for _ in range(60):
        mask = rng.random((int(rng.integers(1, 30)), int(rng.integers(1, 30)))) < rng.random()
        assert all(np.array_equal(a, b) for a, b in zip(detector.label_components(mask), _bfs_components(mask)))
    spiral = np.zeros((9, 9), bool)  # a long winding component
    spiral[0, :] = spiral[:, 8] = spiral[8, :] = spiral[2:, 0] = spiral[2, :7] = spiral[2:7, 6] = True
    assert detector.label_components(spiral)[1] == _bfs_components(spiral)[1] == 1


def test_detector_finds_exactly_the_rendered_objects():
    g = np.zeros((4, 4), dtype=int)
    g[0, 0], g[0, 1], g[3, 2] = T("circle", "orange"), T("square", "green"), T("triangle", "purple")
    dets = detector.detect(codec.encode(g))
    assert [(d.label, d.color, d.box, d.score) for d in dets] == [
        ("circle", "orange", (1.0, 1.0, 7.0, 7.0), 1.0),
        ("square", "green", (9.0, 1.0, 15.0, 7.0), 1.0),
        ("triangle", "purple", (17.0, 25.0, 23.0, 31.0), 1.0),
    ]
    rng = np.random.default_rng(4)
    for rows, cols, cell in [(4, 4, 8)] * 150 + [(3, 6, 6), (5, 5, 12), (6, 3, 9)] * 20:
        g = random_grid(rng, rows, cols)
        dets = detector.detect(codec.encode(g, cell))
        assert dets == detector.grid_detections(g, cell)
        assert len(dets) == np.count_nonzero(g)
    full = np.full((4, 4), T("square", "red"))  # sprites of all 16 neighbouring cells stay apart
    assert len(detector.detect(codec.encode(full))) == 16


def test_detector_is_honest_on_other_images():
    img = np.full((20, 20, 3), 255, np.uint8)
    img[2:8, 2:8] = world.PALETTE["red"]
    img[8:12, 6:10] = world.PALETTE["blue"]  # touches the red block: one component, as for a real detector
    img[15:18, 15:18] = (0, 0, 0)
    dets = detector.detect(img)
    assert len(dets) == 2 and dets[0].box == (2.0, 2.0, 10.0, 12.0) and dets[0].color == "red"
    assert detector.detect(np.full((16, 16, 3), 255, np.uint8)) == []


# ------------------------------------------------------------------ prompts
def test_prompt_texts_and_metadata_follow_geneval():
    by = {md["prompt"]: md for md in ALL_MD}
    assert by["a photo of two squares"] == {"tag": "counting", "include": [{"class": "square", "count": 2}],
                                            "exclude": [{"class": "square", "count": 3}], "prompt": "a photo of two squares"}
    assert by["a photo of a red circle"]["include"] == [{"class": "circle", "count": 1, "color": "red"}]
    assert by["a photo of a circle right of a square"]["include"] == [
        {"class": "square", "count": 1}, {"class": "circle", "count": 1, "position": ["right of", 0]}]
    assert by["a photo of an orange square and a blue circle"]["tag"] == "color_attr"
    assert by["a photo of a square and a triangle"]["tag"] == "two_object"
    assert "exclude" not in by["a photo of a square"]
    assert len(by) == len(ALL_MD)  # no duplicate texts


def test_prompt_generator_every_tag_deterministic_disjoint():
    a = prompts.sample_prompts(300, seed=5)
    assert [p.prompt for p in a] == [p.prompt for p in prompts.sample_prompts(300, seed=5)]
    assert [p.prompt for p in a] != [p.prompt for p in prompts.sample_prompts(300, seed=6)]
    assert {p.metadata["tag"] for p in a} == set(prompts.TAGS)
    assert all(p.prompt == p.metadata["prompt"] and p.source == "blocks" for p in a)
    held = prompts.heldout_prompts(120, seed=0)
    assert [p.prompt for p in held] == [p.prompt for p in prompts.heldout_prompts(120, seed=0)]
    assert {p.metadata["tag"] for p in held} == set(prompts.TAGS) and len(held) == 120
    assert len({p.id for p in held}) == 120
    train_texts = {md["prompt"] for t in prompts.TAGS for md in prompts.prompt_pool("train", t)}
    held_texts = {md["prompt"] for t in prompts.TAGS for md in prompts.prompt_pool("heldout", t)}
    assert not train_texts & held_texts and train_texts | held_texts == {md["prompt"] for md in ALL_MD}
    assert {p.prompt for p in a} <= train_texts and {p.prompt for p in held} <= held_texts
    assert prompts.split_of(held[0].prompt) == "heldout" and prompts.split_of("a photo of a dog") is None
    # every held-out prompt is used before any repeats
    colors_held = [p.prompt for p in prompts.heldout_prompts(24, seed=1, tag_mix={"colors": 1})]
    assert len(set(colors_held)) == len(prompts.prompt_pool("heldout", "colors")) == 4


def test_prompt_tag_mix_and_errors():
    got = prompts.sample_prompts(200, seed=0, tag_mix={"counting": 1, "position": 3})
    tags = [p.metadata["tag"] for p in got]
    assert set(tags) == {"counting", "position"} and tags.count("position") > tags.count("counting")
    held = prompts.heldout_prompts(10, tag_mix={"counting": 1, "position": 4})
    assert sorted(p.metadata["tag"] for p in held) == ["counting"] * 2 + ["position"] * 8
    with pytest.raises(UserError, match="did you mean 'counting'"):
        prompts.sample_prompts(1, tag_mix={"countin": 1})
    with pytest.raises(UserError):
        prompts.sample_prompts(1, split="test")
    got[0].metadata["include"][0]["count"] = 99  # callers get copies
    assert all(r["count"] < 99 for md in ALL_MD for r in md["include"])


# ------------------------------------------------------------------ texts
def test_every_generated_text_uses_only_words():
    words = set(world.WORDS)
    assert len(world.WORDS) == len(words) and all(w == w.lower() and " " not in w for w in words)
    rng = np.random.default_rng(6)
    for md in ALL_MD:
        texts = [md["prompt"], edits.plan_text(md)]
        g = synthesis.random_correct_grid(md, rng, distractors=1)
        texts += [critique_text(g, md), critique_text(perturb(g, md, rng), md), critique_text(random_grid(rng), md)]
        for t in texts:
            assert set(t.split()) <= words, t
        assert len(texts[1].split()) <= 16 and all(len(t.split()) <= 20 for t in texts[2:])


def test_plan_and_critique_texts():
    md = {"tag": "position", "include": [{"class": "square", "count": 1},
                                         {"class": "circle", "count": 1, "position": ["right of", 0]}]}
    assert edits.plan_text(md) == "<think> one square and one circle right of the square </think>"
    count = prompts.enumerate_tag("counting")[1]  # three squares
    assert edits.plan_text(count) == "<think> exactly three squares </think>"
    g = np.zeros((4, 4), int)
    g[0, 3], g[0, 0] = T("square", "red"), T("circle", "blue")  # circle left of the square
    text = critique_text(g, md)
    assert text.startswith("<think> the circle is not right of the square </think> ")
    instruction, stop = parse_critique(text)
    assert not stop and parse_edit(instruction) == diagnose(g, md)[0]
    g2 = apply_edit(g, parse_edit(instruction), np.random.default_rng(0))
    assert judge(g2, md).correct
    assert critique_text(g2, md) == "<think> the image matches the prompt </think> no further edit needed"
    assert parse_critique(critique_text(g2, md))[1]


def test_a_recolour_names_the_shape_and_the_needed_colour_not_the_wrong_one():
    """The critique of a wrong colour instructs "make the square red": a critic that knows the colour is wrong
    but misreads which colour it is still writes an instruction that fixes the image, and the same instruction
    on a square that is already red changes nothing (the observation keeps the colour it sees)."""
    md = {"tag": "color_attr", "include": [{"class": "square", "count": 1, "color": "red"},
                                           {"class": "circle", "count": 1, "color": "blue"}]}
    g = np.zeros((4, 4), int)
    g[0, 0], g[2, 2] = T("square", "green"), T("circle", "blue")
    assert critique_text(g, md) == "<think> the square is green not red </think> make the square red"
    assert diagnose(g, md)[0] == EditOp("recolor", "square", None, new_color="red")
    fixed = apply_edit(g, parse_edit("make the square red"), np.random.default_rng(0))
    assert judge(fixed, md).correct and fixed[0, 0] == T("square", "red")
    assert (apply_edit(fixed, parse_edit("make the square red"), np.random.default_rng(0)) == fixed).all()
    # the old form with a misread from-colour matches no object: the edit the demo's critic learnt to write
    assert (apply_edit(g, parse_edit("make the yellow square red"), np.random.default_rng(0)) == g).all()


# ------------------------------------------------------------------ edits
def test_edit_text_parse_roundtrip():
    ops = [EditOp(k, s, c) for k in ("add", "remove") for s in world.SHAPES for c in (None, *world.COLORS)]
    ops += [EditOp("recolor", s, c, new_color=n) for s in world.SHAPES for c in (None, *world.COLORS) for n in world.COLORS]
    ops += [EditOp("move", a, relation=r, target=b) for a, b in itertools.permutations(world.SHAPES, 2) for r in world.RELATIONS]
    ops += [EditOp("swap", a, target=b) for a, b in itertools.permutations(world.SHAPES, 2)]
    for op in ops:
        assert parse_edit(edit_text(op)) == op, op
    assert edit_text(EditOp("add", "circle", "orange")) == "add an orange circle"
    assert parse_edit("Move the circle right of the square.") == EditOp("move", "circle", relation="right of", target="square")
    for junk in ("no further edit needed", "", "add a dog", "make the square", "move the square right of the square",
                 "swap the circle", "add a red square please", "make it red"):
        assert parse_edit(junk) is None, junk


def test_apply_edit_exact_cases():
    rng = np.random.default_rng(0)
    g = np.zeros((2, 3), int)
    g[0, 0], g[0, 2], g[1, 2] = T("square", "red"), T("square", "blue"), T("circle", "red")
    out = apply_edit(g, EditOp("remove", "square"), rng)  # removes the LAST square
    assert out[0, 2] == 0 and out[0, 0] == g[0, 0]
    out = apply_edit(g, EditOp("recolor", "square", new_color="green"), rng)  # recolours the FIRST
    assert out[0, 0] == T("square", "green") and out[0, 2] == g[0, 2]
    out = apply_edit(g, EditOp("recolor", "square", "blue", new_color="green"), rng)
    assert out[0, 2] == T("square", "green") and out[0, 0] == g[0, 0]
    out = apply_edit(g, EditOp("swap", "square", target="circle"), rng)
    assert out[1, 2] == T("square", "red") and out[0, 0] == T("circle", "red")
    out = apply_edit(g, EditOp("add", "triangle", "yellow"), rng)
    assert np.count_nonzero(out) == 4 and (out == T("triangle", "yellow")).sum() == 1
    below = {"include": [{"class": "square", "count": 1}, {"class": "circle", "count": 1, "position": ["below", 0]}]}
    assert not judge(g, below).correct  # (1, 2) is "right of" the first square at (0, 0), not "below"
    moved_to = set()
    for _ in range(20):  # (1, 0) straight below; (1, 1) diagonal counts as below AND right of
        out = apply_edit(g, EditOp("move", "circle", relation="below", target="square"), rng)
        assert np.count_nonzero(out) == 3 and judge(out, below).correct and out[1, 2] == 0
        moved_to |= {tuple(p) for p in np.argwhere(out == T("circle", "red"))}
    assert moved_to == {(1, 0), (1, 1)}
    # the circle cannot go above the top-row square: unchanged; nor can anything be added to a full grid
    assert np.array_equal(apply_edit(g, EditOp("move", "circle", relation="above", target="square"), rng), g)
    full = np.full((2, 2), T("circle", "red"))
    assert np.array_equal(apply_edit(full, EditOp("add", "square"), rng), full)
    assert np.array_equal(apply_edit(g, EditOp("remove", "triangle"), rng), g)
    assert g[0, 0] == T("square", "red")  # inputs are never modified


def test_random_correct_grids_and_perturbations():
    rng = np.random.default_rng(7)
    for md in ALL_MD:
        for distractors in (0, 2):
            g = synthesis.random_correct_grid(md, rng, distractors=distractors)
            assert judge(g, md).correct and diagnose(g, md) == []
            bad = perturb(g, md, rng)
            assert not judge(bad, md).correct and diagnose(bad, md)
            img_res = score_image(codec.encode(bad), md)  # the pixel pipeline agrees
            assert img_res.correct is False and img_res.score == judge(bad, md).score
    with pytest.raises(UserError, match="Blocks shape"):
        diagnose(np.zeros((4, 4), int), {"include": [{"class": "dog", "count": 1}]})
    with pytest.raises(UserError, match="cannot place"):
        synthesis.random_correct_grid(prompts.enumerate_tag("position")[2], rng, rows=1, cols=4)  # "above" in 1 row


@pytest.mark.parametrize("rows, cols, n", [(4, 4, 600), (3, 3, 150), (5, 5, 150), (3, 6, 150), (6, 2, 150)])
def test_repeated_diagnose_and_edit_converges(rows, cols, n):
    rng = np.random.default_rng(rows * 10 + cols)
    worst = 0
    for i in range(n):
        md = ALL_MD[int(rng.integers(len(ALL_MD)))]
        if i % 2:
            g = perturb(synthesis.random_correct_grid(md, rng, rows, cols, distractors=int(rng.integers(3))), md, rng)
            limit = 4  # one mistake takes a few rounds at most
        else:
            g = random_grid(rng, rows, cols)
            limit = rows * cols + 4
        for step in range(limit + 1):
            ops = diagnose(g, md)
            if not ops:
                break
            nxt = apply_edit(g, ops[0], rng)
            assert not np.array_equal(nxt, g), (g.tolist(), md, ops[0])  # every proposed op applies
            g = nxt
        assert judge(g, md).correct, (md, g.tolist())
        worst = max(worst, step)
    assert worst >= 2  # the property is exercised on grids needing several rounds


# ------------------------------------------------------------------ reward
def test_blocks_reward():
    rng = np.random.default_rng(8)
    md = prompts.enumerate_tag("color_attr")[0]
    good = synthesis.random_correct_grid(md, rng)
    bad = perturb(good, md, rng)
    samples = [RewardSample(prompt=md["prompt"], metadata=md, stage="generate", round=0, image=codec.encode(g))
               for g in (good, bad)]
    samples.append(RewardSample(prompt=md["prompt"], metadata=md, stage="generate", round=0, image=None))
    coco = {"tag": "single_object", "include": [{"class": "dog", "count": 1}]}
    samples.append(RewardSample(prompt="a photo of a dog", metadata=coco, stage="generate", round=0,
                                image=codec.encode(good)))
    out = BlocksReward()(samples)
    assert BlocksReward.name == "blocks"
    assert out[0].score == 1.0 and out[0].components == {"correct": 1.0, "score": 1.0, "strict_correct": 1.0}
    assert out[0].reason is None
    partial = judge(bad, md)
    assert out[1].score == partial.score < 1.0 and out[1].components["correct"] == 0.0
    assert out[1].reason == "; ".join(partial.reasons) and out[1].reason
    assert out[2].failed and "no image" in out[2].failure
    assert out[3].failed and "dog" in out[3].failure
    binary = BlocksReward(binary=True)(samples[:2])
    assert [o.score for o in binary] == [1.0, 0.0]
