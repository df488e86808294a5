"""Exact checks of the Blocks world's edits, prompt splits and reference set, the tiny/Janus recipe halves and
PPO's stage chains (mutation audit of r3_rl.blocks.{edits,codec,detector,prompts,reference},
r3_rl.policy.{tiny_recipe,janus_prompts,janus_recipe} and r3_rl.learner.ppo_learner): each test pins one rule
whose breaking the older tests let through.  Expected values are worked out by hand in the comments.

No Ray, no training: grids are built by hand, recipes are only loaded and checked, the PPO critic is a tiny
policy's zero-initialised value head.
"""
from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from learner_helpers import ppo_learner

from r3_rl.blocks import prompts, reference, synthesis, world
from r3_rl.blocks.edits import EditOp, apply_edit, critique_text, diagnose, parse_edit
from r3_rl.blocks.synthesis import flaw_candidates
from r3_rl.errors import UserError
from r3_rl.trajectory import PromptItem

T = world.token_of
MD = {md["prompt"]: md for tag in prompts.TAGS for md in prompts.enumerate_tag(tag)}
REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "recipes" / "tiny_blocks.yaml"


# ------------------------------------------------------------------ edits: parsing and applying
def test_swap_of_a_shape_with_itself_does_not_parse():
    """Catches parse_edit accepting "swap the square and the square" (a no-op swap) as an instruction."""
    assert parse_edit("swap the square and the square") is None
    assert parse_edit("swap the square and the circle") == EditOp("swap", "square", target="circle")


def test_recolour_skips_objects_already_of_the_new_colour():
    """Catches "make the square red" recolouring the first square although it is red already (a no-op edit)."""
    g = np.zeros((2, 3), int)
    g[0, 0], g[0, 2] = T("square", "red"), T("square", "green")
    out = apply_edit(g, EditOp("recolor", "square", None, new_color="red"), np.random.default_rng(0))
    assert out[0, 0] == T("square", "red") and out[0, 2] == T("square", "red")


def test_move_may_keep_the_mover_in_a_cell_where_the_relation_holds():
    """Catches move_cells dropping the mover's own cell: "move the circle below the square" on a circle already
    straight below picks between its own cell (1, 0) and the free diagonal (1, 1), never (0, 1) beside the square."""
    g = np.zeros((2, 2), int)
    g[0, 0], g[1, 0] = T("square", "red"), T("circle", "red")
    seen = set()
    for s in range(20):
        out = apply_edit(g, EditOp("move", "circle", relation="below", target="square"), np.random.default_rng(s))
        seen |= {tuple(int(v) for v in p) for p in np.argwhere(out == T("circle", "red"))}
    assert seen == {(1, 0), (1, 1)}


# ------------------------------------------------------------------ edits: diagnosis and critique wording
def test_full_grid_removes_the_last_object_geneval_does_not_need():
    """Catches _clutter counting the k-th needed object as clutter: on a full 2x2 grid needing a circle, the fix
    removes the last unneeded object (the triangle at (1, 0)), not the one square the prompt asks for."""
    g = np.array([[T("triangle", "red"), T("triangle", "red")], [T("triangle", "red"), T("square", "green")]])
    md = MD["a photo of a square and a circle"]
    assert diagnose(g, md) == [EditOp("remove", "triangle", "red")]
    assert critique_text(g, md) == "<think> the grid is too full </think> remove a red triangle"


def test_clutter_keeps_the_largest_count_asked_of_a_class():
    """Catches _clutter keeping only the last clause's count of a class: two clauses ask for 2 squares and 1 red
    square, so both squares are needed and the last unneeded object is the triangle at (0, 1)."""
    md = {"include": [{"class": "square", "count": 2}, {"class": "square", "count": 1, "color": "red"},
                      {"class": "circle", "count": 1}]}
    g = np.array([[T("triangle", "blue"), T("triangle", "blue")], [T("square", "red"), T("square", "red")]])
    assert diagnose(g, md) == [EditOp("remove", "triangle", "blue")]


def test_one_free_cell_is_room_for_the_missing_object():
    """Catches the add refused (and a removal proposed) when exactly one cell is free."""
    g = np.array([[T("triangle", "red"), T("triangle", "red")], [T("square", "green"), 0]])
    assert diagnose(g, MD["a photo of a square and a circle"]) == [EditOp("add", "circle")]


def test_metadata_with_unsupported_keys_is_refused():
    """Catches check_metadata letting a key the Blocks world cannot judge (e.g. GenEval-foreign "size") through."""
    with pytest.raises(UserError, match=r"has keys \['size'\] the Blocks world does not support"):
        diagnose(np.zeros((2, 2), int), {"include": [{"class": "square", "count": 1, "size": "big"}]})


def test_exclude_overflow_observation_names_the_needed_count():
    """Catches the exclude note saying "needs three" (the exclude count) instead of the count asked for."""
    g = np.zeros((4, 4), int)
    g[0, 0] = g[1, 1] = g[2, 2] = T("square", "red")
    assert critique_text(g, MD["a photo of two squares"]) == (
        "<think> the image has three squares but needs two </think> remove a square")


def test_wrong_colour_observation_names_the_first_wrong_object():
    """Catches the recolour note naming the last wrong object's colour instead of the first (the one fixed)."""
    md = {"include": [{"class": "square", "count": 2, "color": "red"}]}
    g = np.zeros((2, 2), int)
    g[0, 0], g[0, 1] = T("square", "green"), T("square", "blue")
    assert critique_text(g, md) == "<think> the square is green not red </think> make the square red"


def test_position_fix_removes_an_extra_target_first():
    """Catches _position_fix tolerating one extra target: with two squares, "the square" is ambiguous, so the
    first fix removes a square before any move."""
    g = np.zeros((4, 4), int)
    g[0, 1], g[1, 3], g[0, 0] = T("square", "red"), T("square", "blue"), T("circle", "green")
    md = MD["a photo of a circle right of a square"]
    assert diagnose(g, md) == [EditOp("remove", "square")]
    assert critique_text(g, md) == "<think> the image has two squares but needs one </think> remove a square"


def test_random_correct_grid_refuses_more_objects_than_cells():
    """Catches the capacity check letting rows*cols+1 objects through (200 hopeless tries, another message)."""
    md = {"prompt": "five squares", "include": [{"class": "square", "count": 5}]}
    with pytest.raises(UserError, match="needs more objects than a 2x2 grid holds"):
        synthesis.random_correct_grid(md, np.random.default_rng(0), rows=2, cols=2)


def test_flaw_candidates_include_the_missing_object():
    """Catches the "missing object" candidate removing none (have[k:]): one red square gives an empty grid, a
    recoloured square and a reshaped one -- object counts 0, 1, 1."""
    g = np.zeros((2, 2), int)
    g[0, 0] = T("square", "red")
    cands = flaw_candidates(g, MD["a photo of a red square"], np.random.default_rng(0))
    assert sorted(int(np.count_nonzero(c)) for c in cands) == [0, 1, 1]


def test_flaw_candidates_change_an_object_geneval_checks():
    """Catches the colour/shape mistake landing on an object beyond the first ``count`` (GenEval ignores it, so the
    variant is still correct and silently dropped): two red squares for "a red square" give exactly the empty grid
    and the first square recoloured (reshaping the first leaves the second, still correct)."""
    g = np.zeros((2, 2), int)
    g[0, 0] = g[0, 1] = T("square", "red")
    for s in range(8):
        cands = flaw_candidates(g, MD["a photo of a red square"], np.random.default_rng(s))
        assert len(cands) == 2 and not cands[0].any()
        first = world.object_of(cands[1][0, 0])
        assert first[0] == "square" and first[1] != "red" and cands[1][0, 1] == T("square", "red")


# ------------------------------------------------------------------ prompts: split, tag weights
def test_heldout_pool_sizes_per_tag():
    """Catches round -> floor in the held-out count: round(0.25 * n) with Python's round gives 1, 2, 2, 4, 6, 45
    of 3, 6, 9, 18, 24, 180 prompts (two_object: round(1.5) = 2, floor would give 1)."""
    sizes = {t: (len(prompts.prompt_pool("heldout", t)), len(prompts.prompt_pool("train", t))) for t in prompts.TAGS}
    assert sizes == {"single_object": (1, 2), "two_object": (2, 4), "counting": (2, 7), "colors": (4, 14),
                     "position": (6, 18), "color_attr": (45, 135)}


def test_heldout_membership_is_the_smallest_salted_sha256():
    """Catches the split ordered by anything but the salted hash (sorted by text, other digest bytes): per tag the
    held-out prompts are those with the smallest big-endian first 8 bytes of sha256("blocks-v1:" + text)."""
    import hashlib

    for tag in prompts.TAGS:
        texts = [md["prompt"] for md in prompts.enumerate_tag(tag)]
        held = {md["prompt"] for md in prompts.prompt_pool("heldout", tag)}
        by_hash = sorted(texts, key=lambda t: hashlib.sha256(f"blocks-v1:{t}".encode()).digest()[:8])
        assert held == set(by_hash[:len(held)]), tag


def test_prompt_items_do_not_share_the_cached_metadata():
    """Catches PromptItems handed the cached pool records: a caller editing its item's metadata would change every
    later prompt drawn from that pool."""
    item = prompts.sample_prompts(1, seed=0, tag_mix={"counting": 1})[0]
    item.metadata["include"][0]["count"] = 99
    item.metadata["prompt"] = "edited"
    assert all(md["include"][0]["count"] in (2, 3, 4) and md["prompt"] != "edited"
               for split in prompts.SPLITS for md in prompts.prompt_pool(split, "counting"))


def test_a_large_heldout_fraction_keeps_a_training_prompt_per_tag():
    """Catches the cap at len - 1 lost: at 0.9, round(2.7) = 3 of single_object's 3 prompts would all be held out."""
    assert len(prompts.prompt_pool("train", "single_object", heldout_fraction=0.9)) == 1
    assert len(prompts.prompt_pool("heldout", "single_object", heldout_fraction=0.9)) == 2
    assert len(prompts.sample_prompts(3, tag_mix={"single_object": 1}, heldout_fraction=0.9)) == 3


@pytest.mark.parametrize("frac", [0.0, 1.0])
def test_heldout_fraction_bounds_are_exclusive(frac):
    """Catches heldout_fraction 0 (nothing held out) or 1 (nothing to train on) being accepted."""
    with pytest.raises(UserError, match=r"heldout_fraction must lie in \(0, 1\)"):
        prompts.prompt_pool("train", "colors", heldout_fraction=frac)


def test_color_attr_pairs_two_different_colours():
    """Catches color_attr enumerating same-colour pairs: 6 ordered shape pairs x 6 * 5 ordered colour pairs = 180."""
    recs = prompts.enumerate_tag("color_attr")
    assert len(recs) == 180
    assert all(r["include"][0]["color"] != r["include"][1]["color"] for r in recs)


def test_zero_weight_tags_are_dropped():
    """Catches zero-weight tags kept in the mix: they would still consume the seeded shuffle, so listing one
    would change which held-out prompts another tag gets."""
    assert prompts.check_tag_mix({"single_object": 0, "counting": 2}, "x") == {"counting": 2.0}
    with_zero = prompts.heldout_prompts(12, seed=3, tag_mix={"single_object": 0, "counting": 1})
    without = prompts.heldout_prompts(12, seed=3, tag_mix={"counting": 1})
    assert [p.prompt for p in with_zero] == [p.prompt for p in without]


def test_heldout_quotas_use_the_largest_remainder():
    """Catches the remainder handed to the smallest fraction: 4 prompts at 1:2 are exactly 1.33 and 2.67, so
    quotas 1 and 2 plus the spare one to position (remainder .67 > .33) -> 1 counting, 3 position."""
    tags = [p.metadata["tag"] for p in prompts.heldout_prompts(4, tag_mix={"counting": 1, "position": 2})]
    assert sorted(tags) == ["counting", "position", "position", "position"]


def test_heldout_prompts_follow_a_seeded_shuffle():
    """Catches the per-tag shuffle lost (every seed listing the pool in its fixed order)."""
    pool = [md["prompt"] for md in prompts.prompt_pool("heldout", "position")]
    orders = [[p.prompt for p in prompts.heldout_prompts(6, seed=s, tag_mix={"position": 1})] for s in range(4)]
    assert all(sorted(o) == sorted(pool) for o in orders)  # each seed uses the whole pool once
    assert any(o != pool for o in orders) and len({tuple(o) for o in orders}) > 1


# ------------------------------------------------------------------ reference set
def _items(texts):
    return [PromptItem(id=f"p{i}", prompt=t, metadata=copy.deepcopy(MD[t])) for i, t in enumerate(texts)]


def test_reference_kind_names_the_first_fix(monkeypatch):
    """Catches the flawed kind taken from the last fix: a red and a blue circle for "a red square and a blue
    circle" first needs a square added (include order), then the first circle recoloured -> flawed:add."""
    bad = np.zeros((4, 4), int)
    bad[0, 0], bad[1, 1] = T("circle", "red"), T("circle", "blue")
    monkeypatch.setattr(synthesis, "perturb", lambda grid, md, rng: bad.copy())
    refs = reference.reference_pairs(_items(["a photo of a red square and a blue circle"]), 0, 4, 4)
    assert [r.kind for r in refs] == ["correct", "flawed:add"]
    assert refs[1].image_tokens == bad.reshape(-1).tolist()


def test_reference_layouts_differ_between_prompts():
    """Catches the layout rng seeded by the seed alone: the six "a COLOUR square" prompts would all put their
    square in the same cell."""
    refs = reference.reference_pairs(_items([f"a photo of {world.article(c)} {c} square" for c in world.COLORS]),
                                     0, 4, 4)
    cells = {int(np.flatnonzero(r.image_tokens)[0]) for r in refs[::2]}
    assert len(cells) > 1


# ------------------------------------------------------------------ tiny recipe checks
def _tiny(sets):
    from r3_rl.config import load_recipe

    return load_recipe(TINY, sets)


def _check_tiny(sets):
    from r3_rl.policy.tiny_recipe import TinyRecipe

    TinyRecipe.check_recipe(_tiny(sets), "r.yaml")


BIG = ["policy.tiny.hidden_size=4096", "policy.tiny.intermediate_size=11008", "policy.tiny.num_heads=32"]


def test_tiny_parameter_estimate_and_limit():
    """Catches the size estimate losing its 3 * h * i MLP term or modality experts' second copy: per layer
    4 * 4096^2 + 3 * 4096 * 11008 = 202_375_168, so 8 shared layers (1.62e9) pass, 10 (2.02e9) or 8 with modality
    experts (3.24e9) exceed 2e9."""
    _check_tiny(BIG + ["policy.tiny.num_layers=8"])
    with pytest.raises(UserError, match="about 2.02e\\+09 parameters"):
        _check_tiny(BIG + ["policy.tiny.num_layers=10"])
    with pytest.raises(UserError, match="about 3.24e\\+09 parameters"):
        _check_tiny(BIG + ["policy.tiny.num_layers=8", "policy.tiny.experts=modality"])


def test_reflect_room_for_described_critiques_is_exactly_forty():
    """Catches the described-critique room check off by one: 39 new tokens are refused, 40 pass."""
    with pytest.raises(UserError, match="39 cuts short the critiques"):
        _check_tiny(["warmstart.describe=objects", "rollout.reflect.max_new_tokens=39"])
    _check_tiny(["warmstart.describe=objects", "rollout.reflect.max_new_tokens=40"])


def test_saved_model_image_input_mismatch_is_refused(tmp_path):
    """Catches the saved-model image_input check lost: a folder saved with 'tokens' asked to read 'words'."""
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "r3_grid.json").write_text(json.dumps({"image_input": "tokens"}))
    with pytest.raises(UserError, match="trained with 'tokens'"):
        _check_tiny([f"policy.model={tmp_path}", "policy.tiny.image_input=words"])
    _check_tiny([f"policy.model={tmp_path}", "policy.tiny.image_input=tokens"])


def test_modality_experts_only_for_kind_tiny():
    """Catches policy.tiny.experts=modality accepted for another policy kind (tiny_flow)."""
    with pytest.raises(UserError, match="'modality' is for policy.kind tiny"):
        _check_tiny(["policy.kind=tiny_flow", "policy.tiny.experts=modality"])


# ------------------------------------------------------------------ Janus prompts and model resolution
JANUS_TEMPLATES = {"reason": "{prompt}", "generate": "{prompt}", "generate_uncond": "", "reflect": "{prompt}",
                   "refine": "{prompt} {instruction}"}


def test_cfg_null_stream_pads_everything_outside_keep():
    """Catches the null stream keeping a token that is not BOS / an image boundary (here the first prompt token)."""
    from r3_rl.policy.janus_prompts import uncond_ids

    assert uncond_ids([5, 1, 2, 9, 3, 9], keep={9}, pad_id=0) == [0, 0, 0, 9, 0, 9]


def test_janus_templates_refuse_a_generate_uncond_and_an_image_in_generate():
    """Catches a non-blank generate_uncond accepted (Janus pads the prompt instead), and {image} allowed in the
    generate template (generate has no input image)."""
    from r3_rl.policy.janus_prompts import check_templates

    with pytest.raises(UserError, match="templates.generate_uncond"):
        check_templates({**JANUS_TEMPLATES, "generate_uncond": "a photo"})
    with pytest.raises(UserError, match=r"templates.generate: placeholder \{image\} is not available"):
        check_templates({**JANUS_TEMPLATES, "generate": "{image} {prompt}"})


def test_resolve_model_local_paths(tmp_path):
    """Catches a directory without config.json passed on, and a three-part id treated as a hub id (not a path)."""
    from r3_rl.policy.janus_recipe import resolve_model

    with pytest.raises(UserError, match="no config.json in that directory"):
        resolve_model(str(tmp_path))
    (tmp_path / "config.json").write_text("{}")
    assert resolve_model(str(tmp_path)) == (str(tmp_path), True)
    with pytest.raises(UserError, match="no such directory"):
        resolve_model("org/name/extra")


@pytest.mark.parametrize("value", ["yes", "on", "TRUE"])
def test_resolve_model_reads_every_offline_spelling(monkeypatch, value):
    """Catches HF_HUB_OFFLINE=yes/on not counting as offline (huggingface_hub accepts 1/true/yes/on)."""
    from huggingface_hub import constants

    from r3_rl.policy import janus_recipe

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_HUB_OFFLINE", value)
    monkeypatch.setattr(janus_recipe, "_hub_reachable", lambda endpoint, timeout=3.0: True)
    with pytest.raises(UserError, match="HF_HUB_OFFLINE is set"):
        janus_recipe.resolve_model("nobody-r3-audit/not-cached-model")


# ------------------------------------------------------------------ PPO: chains, GAE inputs, value loss
def _seg():
    from r3_rl.trajectory import Segment

    return Segment(modality="text", context={"input_ids": [1, 2]}, token_ids=[3, 4], logprobs=[-1.0, -1.0])


def test_chains_skip_nodes_of_policy_version_minus_one():
    """Catches a given (not sampled, policy_version -1) image with tokens starting a PPO chain."""
    from r3_rl.learner.ppo_learner import chains
    from r3_rl.trajectory import Node, Tree

    tree = Tree(id="T", prompt=PromptItem(id="p", prompt="x"))
    tree.add(Node(id="root", parent=None, stage="generate", round=0, group_id="T/root", policy_version=-1,
                  segment=_seg(), reward=0.4))
    tree.add(Node(id="c", parent="root", stage="reflect", round=1, group_id="T/reflect", policy_version=2,
                  segment=_seg(), rewards={"format": 1.0, "verdict_term": 0.0}, reward=0.1))
    tree.add(Node(id="r", parent="c", stage="refine", round=1, group_id="T/refine", policy_version=2,
                  segment=_seg(), reward=0.9))
    assert [[n.id for n in c] for c in chains(tree)] == [["c", "r"]]


def test_gae_returns_are_advantages_plus_values_and_episodes_end_at_zero(ppo_base):
    """Catches the returns set to the advantages (no + V) and a finished episode bootstrapped from its own last
    value.  V = 0.5 everywhere (a zero head with bias 0.5), gamma 0.9, lam 0.5: deltas r + 0.45 - 0.5 (last:
    r - 0.5), A_t = delta_t + 0.45 A_{t+1}; episode (0.1, 1, 0): A = (0.37625, 0.725, -0.5), R = A + 0.5;
    episode (0.5, 0.1, -0.2): A = (0.33075, -0.265, -0.7)."""
    policy, items = ppo_base
    learner = ppo_learner(policy, gamma=0.9, lam=0.5, normalize_advantages=False)
    with torch.no_grad():
        learner.modules["value_head"].bias.fill_(0.5)
    ctx = learner.algorithm.prepare(learner.models, copy.deepcopy(items))
    adv = [0.37625, 0.725, -0.5, 0.33075, -0.265, -0.7]
    assert ctx["old_values"].tolist() == pytest.approx([0.5] * 6, abs=1e-6)
    assert ctx["advantages"].tolist() == pytest.approx(adv, abs=1e-5)
    assert ctx["returns"].tolist() == pytest.approx([a + 0.5 for a in adv], abs=1e-5)


def test_two_items_are_whitened(ppo_base):
    """Catches whitening skipped for a batch of two: any two distinct advantages whiten to -1/sqrt(2), +1/sqrt(2)
    (unbiased variance (a - b)^2 / 2)."""
    policy, items = ppo_base
    two = copy.deepcopy(items[:2])
    for k, it in enumerate(two):
        it.episode, it.t = f"solo{k}", 0  # rewards 0.1, 1.0; a fresh critic: advantages = rewards
    learner = ppo_learner(policy, gamma=1.0, lam=1.0, normalize_advantages=True)
    ctx = learner.algorithm.prepare(learner.models, two)
    assert ctx["advantages"].tolist() == pytest.approx([-(0.5 ** 0.5), 0.5 ** 0.5], abs=1e-4)


def test_value_loss_is_weighted_by_the_micro_batch_share(ppo_base):
    """Catches the value loss added unweighted per micro-batch (counted once per micro-batch instead of once per
    mini-batch).  gamma = lam = 0 and a zero critic: returns = rewards, values 0, so the value loss of items 0-1 is
    0.5 * (0.1^2 + 1^2) / 2 = 0.2525, added as vf_coef 1 x 0.2525 x 2/6."""
    from r3_rl.learner.algorithm import GRPO

    policy, items = ppo_base
    learner = ppo_learner(policy, gamma=0.0, lam=0.0, normalize_advantages=False, vf_coef=1.0)
    its = copy.deepcopy(items)
    alg, models = learner.algorithm, learner.models
    ctx = alg.prepare(models, its)
    chunk, mini = range(0, 2), range(0, 6)
    with torch.no_grad():
        total, m, _ = alg.loss(models, its, chunk, mini, ctx)
        base, _, _ = GRPO.loss(alg, models, its, chunk, mini, ctx)
    assert m["value_loss"] == pytest.approx(0.2525, abs=1e-6)
    assert float(total - base) == pytest.approx(0.2525 * 2 / 6, abs=1e-6)


# Found by round 8C: _position_fix tested the swap with ``move_cells(...)[:-1]`` to leave out the mover's own
# cell, but move_cells lists that cell only when the relation already holds there (never, on this branch), so
# [:-1] dropped a real free cell instead.  Here the only fix after a swap is moving the square to (1, 2): diagnose
# missed it and reported "the grid is too full" (removing the unrelated triangle) on a grid with two free cells.
def test_position_fix_swaps_when_one_cell_works_after_the_swap():
    """Circle (0, 0) left of the square (0, 1), triangles below both: neither moves directly (nothing above row 0,
    the cells below the circle are taken); after a swap the square can go to (1, 2), diagonally below the circle."""
    g = np.array([[T("circle", "blue"), T("square", "red"), 0], [T("triangle", "green"), T("triangle", "green"), 0]])
    md = MD["a photo of a circle above a square"]
    assert critique_text(g, md) == "<think> the circle is not above the square </think> swap the circle and the square"
