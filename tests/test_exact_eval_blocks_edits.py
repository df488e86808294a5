"""Exact small cases for the eval report (summarise / markdown / read and write), the synergy figures and their
standard errors, the Blocks world's edit language (parse, apply, diagnose, flaw candidates) and its prompt
enumeration and held-out split -- each pinning a behaviour a one-point bug would change silently
(round 11G audit)."""
from __future__ import annotations

import hashlib
import json
import math

import numpy as np
import pytest
from test_tracking_inspect import chain

from r3_rl.blocks import edits, prompts, synthesis
from r3_rl.blocks.edits import EditOp, apply_edit, critique_text, diagnose, parse_edit, plan_text
from r3_rl.blocks.synthesis import flaw_candidates
from r3_rl.blocks.world import objects, token_of
from r3_rl.errors import UserError
from r3_rl.eval import synergy
from r3_rl.eval.evaluate import markdown_table, read_report, reports_scores, summarise, write_report
from r3_rl.rewards.registry import FunctionReward
from r3_rl.rewards.reward_set import RewardSet, WeightedReward


def _grid(rows: int, cols: int, cells: dict[tuple[int, int], tuple[str, str]]) -> np.ndarray:
    g = np.zeros((rows, cols), np.int64)
    for (r, c), (shape, colour) in cells.items():
        g[r, c] = token_of(shape, colour)
    return g


# ============================================================================================ eval report
def test_failure_reasons_keep_the_five_most_common_cut_to_200_characters() -> None:
    trees = [chain(i, [0.0, 0.0, 0.0], None) for i in range(7)]
    long = "x" * 300
    reasons = [long] * 6 + ["b"] * 5 + ["c"] * 4 + ["d"] * 3 + ["e"] * 2 + ["f"]  # 21 images, distinct counts
    images = [t.nodes[f"img{r}"] for t in trees for r in range(3)]
    for node, why in zip(images, reasons):
        node.meta["eval_failure"] = why
    rep = summarise(trees, [[None, None, None]] * 7, 2)
    assert rep["failure_reasons"] == {"x" * 200: 6, "b": 5, "c": 4, "d": 3, "e": 2}
    assert rep["failed"] == [7, 7, 7]


def test_score_chains_joins_each_failing_reward_with_a_semicolon() -> None:
    from r3_rl.eval.evaluate import score_chains

    def bad(samples, **_):  # noqa: ANN001 - reward plug-in signature
        return [None for _ in samples]

    rewards = RewardSet([WeightedReward(FunctionReward(bad, "p"), 1.0), WeightedReward(FunctionReward(bad, "q"), 1.0)])
    t = chain(0, [0.0], None)
    assert score_chains([t], 0, rewards, 1.0) == [[None]]
    why = t.nodes["img0"].meta["eval_failure"]
    assert why.startswith("p: ") and "; q: " in why and ", q: " not in why


def test_reports_scores_only_for_a_fractional_reward() -> None:
    assert reports_scores({"accuracy": [0.5, 0.75], "score_mean": [0.5, 0.75]}) is False
    assert reports_scores({"accuracy": [0.5, 0.75], "score_mean": [0.5, 0.8]}) is True
    # a round whose every reward failed: NaN score and NaN accuracy are no difference
    assert reports_scores({"accuracy": [float("nan")], "score_mean": [float("nan")]}) is False


def test_markdown_single_tag_whole_pool_and_nan_cells() -> None:
    trees = [chain(i, [0.0], None) for i in (0, 2)]  # both counting
    rep = summarise(trees, [[True], [False]], 0)
    rep["prompt_pool"] = 2
    md = markdown_table(rep)
    assert "mean of tags" not in md  # one tag: the mean of tags is the accuracy
    assert "2 prompts" in md and " of 2" not in md and "seeded subset" not in md
    rep["prompt_pool"] = 3
    assert "2 of 3 prompts (a seeded subset" in markdown_table(rep)
    rep["understanding"] = {"verdict": {"overall": {"stop_on_correct": float("nan"), "edit_on_flawed": 0.5,
                                                    "balanced_accuracy": float("nan"), "correct_images": 0,
                                                    "flawed_images": 2}, "per_round": {}}}
    md = markdown_table(rep)
    assert "| stop on a correct image | - |" in md and "| edit on a flawed image | 0.500 |" in md


def test_read_report_rejects_what_is_not_an_eval_report(tmp_path) -> None:
    assert read_report(tmp_path, "before") is None
    for text in ('{"accuracy": 0.5}', "[1, 2]", "{not json"):
        (tmp_path / "before.json").write_text(text)
        with pytest.raises(UserError, match="before.json: cannot be read"):
            read_report(tmp_path, "before")
    (tmp_path / "before.json").write_text('{"accuracy": [0.25]}')
    assert read_report(tmp_path, "before") == {"accuracy": [0.25]}


def test_write_report_without_dump_writes_exactly_json_and_md(tmp_path) -> None:
    trees = [chain(i, [0.0], None) for i in range(2)]
    rep = summarise(trees, [[True], [False]], 0)
    write_report(rep, tmp_path, "after", trees, dump=0)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["after.json", "after.md"]
    assert json.loads((tmp_path / "after.json").read_text())["accuracy"] == [0.5]


def test_evaluator_passes_the_recipe_seed_and_settings(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    from types import SimpleNamespace

    from r3_rl.eval import runner

    monkeypatch.setattr(runner, "stage_sampling", lambda recipe, eval_mode: SimpleNamespace(reflect=None))
    monkeypatch.setattr(runner, "build_references", lambda recipe, eval_prompts: ["ref"])
    seen: list[tuple] = []
    monkeypatch.setattr(runner, "evaluate", lambda *a, **k: seen.append((a, k)) or (
        {"prompts": 1, "rounds": 1, "failed": [0, 0]}, []))
    monkeypatch.setattr(runner, "write_report", lambda *a: None)
    data = SimpleNamespace(eval_prompts=lambda n: ["p"] * n, eval_pool_size=lambda: None)
    metrics = SimpleNamespace(log_eval=lambda *a: None)
    recipe = SimpleNamespace(
        eval=SimpleNamespace(size=2, rounds=3, batch_size=5, dump=0,
                             understanding=SimpleNamespace(yes_no=False, max_questions=7)),
        data=SimpleNamespace(eval_size=9), templates=SimpleNamespace(stop_phrase="halt"), seed=42,
        rewards=SimpleNamespace(correct_threshold=0.75, max_failure_fraction=0.0))
    runner.Evaluator(recipe, "pol", "rw", data, metrics, tmp_path).run("x", 3)
    (a, k), = seen
    assert a == ("pol", ["p", "p"], a[2], 3, "halt", "rw", 0.75)
    assert k == {"seed": 42, "references": ["ref"], "yes_no": False, "max_questions": 7, "batch_size": 5}


# ============================================================================================ synergy
def test_refinement_without_pairs_is_last_minus_first_round() -> None:
    rep = {"accuracy": [0.2, 0.5, 0.9]}
    assert synergy._refinement(rep) == pytest.approx(0.7)
    assert synergy._refinement({**rep, "refinement": {"improved": 3, "worse": 1, "pairs": 8}}) == 0.25


def test_accuracy_variance_uses_that_rounds_scored_counts() -> None:
    rep = {"per_tag": {"a": [0.5, 0.5], "b": [1.0, 0.5]}, "scored": {"a": [2, 2], "b": [2, 4]},
           "accuracy": [0.75, 0.5], "prompts": 4}
    assert synergy.accuracy_variance(rep, 1) == pytest.approx((2 / 6) ** 2 * 0.25 + (4 / 6) ** 2 * 0.25 / 3)
    assert synergy.accuracy_variance(rep, 0) == pytest.approx(0.25 * 0.25)
    # counts that do not name the same tags as per_tag: one binomial over all prompts
    odd = {"per_tag": {"a": [0.5]}, "tag_counts": {"z": 4}, "accuracy": [0.25], "prompts": 4}
    assert synergy.accuracy_variance(odd, 0) == pytest.approx(0.1875 / 3)


def test_refinement_variance_needs_two_pairs() -> None:
    assert math.isnan(synergy.refinement_variance({"refinement": {"improved": 1, "worse": 0, "pairs": 1}}))
    # diffs +1, 0: mean 1/2, sample variance 1/2, of the mean 1/4
    assert synergy.refinement_variance({"refinement": {"improved": 1, "worse": 0, "pairs": 2}}) == 0.25


def _ref(judged: list, stop: list) -> dict:
    return {"understanding": {"reference": {"per_image": {"judged_correct": judged, "stop": stop}}}}


def test_reference_gain_variance_pairs_per_image() -> None:
    # correct images: stop 0->1, 1->1, 0->0: diffs +1, 0, 0 (var of mean (1/3)/3); flawed: stop 1->0, 0->0
    # (edit became right: +1, 0: var of mean (1/2)/2); image 5 unjudged: left out
    b = _ref([True, True, True, False, False, None], [False, True, False, True, False, True])
    a = _ref([True, True, True, False, False, None], [True, True, False, False, False, False])
    assert synergy.reference_gain_variance(b, a) == pytest.approx(0.25 * (1 / 9 + 1 / 4))
    other = _ref([True, True, True, False, True, None], a["understanding"]["reference"]["per_image"]["stop"])
    assert math.isnan(synergy.reference_gain_variance(b, other))  # other judged images: no pairs


def test_synergy_errors_use_the_after_reports_own_figures() -> None:
    before = {"accuracy": [0.5, 0.5], "prompts": 3, "refinement": {"improved": 0, "worse": 0, "pairs": 3}}
    after = {"accuracy": [0.25, 1.0], "prompts": 5, "refinement": {"improved": 2, "worse": 0, "pairs": 4}}
    se = synergy.synergy_errors(before, after)
    assert se["first_image_gain_se"] == pytest.approx(math.sqrt(0.25 / 2 + 0.1875 / 4))
    # diffs 1, 1, 0, 0: mean 1/2, sample variance 1/3, of the mean 1/12
    assert se["refinement_after_se"] == pytest.approx(math.sqrt(1 / 12))


def test_figures_stop_rates_yes_no_and_goal_boundaries() -> None:
    before = {"accuracy": [0.5, 0.5], "stop_rate": 0.25,
              "understanding": {"yes_no": {"available": False, "balanced_accuracy": 0.9}}}
    after = {"accuracy": [0.6, 0.7], "stop_rate": 0.75,
             "understanding": {"yes_no": {"available": True, "balanced_accuracy": 0.8}}}
    fig = synergy.synergy_figures(before, after)
    assert (fig["stop_rate_before"], fig["stop_rate_after"]) == (0.25, 0.75)
    assert math.isnan(fig["yes_no_before"]) and fig["yes_no_after"] == 0.8
    assert synergy.understanding_line(fig) is None  # no gain measured: nothing to print
    assert synergy.goals_met({"first_image_gain": 0.1, "refinement_after": 0.05, "verdict_gain": math.nan}) == {
        "first_image_gain": True, "refinement_after": True, "verdict_gain": False}
    assert synergy.near_miss(0.0996, 0.10) and not synergy.near_miss(0.0994, 0.10)
    assert not synergy.near_miss(0.10, 0.10)
    assert synergy._points({"g": 0.1, "g_se": math.inf}, "g") == "+10.0 points"
    assert synergy._points({"g": -0.05, "g_se": 0.01}, "g") == "-5.0 ± 1.0 points"


# ============================================================================================ blocks edits
def test_plan_text_names_the_position_target_clause_and_exactly() -> None:
    md = {"include": [{"class": "circle", "count": 1}, {"class": "square", "count": 2},
                      {"class": "triangle", "count": 1, "position": ["above", 1]}],
          "exclude": [{"class": "square", "count": 3}]}
    assert plan_text(md) == ("<think> one circle and exactly two squares and one triangle above the square"
                             " </think>")


@pytest.mark.parametrize("text", ["add a red square now", "remove an orange", "move the square left of the square",
                                  "swap the square and the circle please", "swap the circle and the circle",
                                  "make the square", "make the red square purple now"])
def test_parse_edit_rejects_malformed_instructions(text: str) -> None:
    assert parse_edit(text) is None


def test_parse_edit_round_trips_every_kind() -> None:
    ops = [EditOp("add", "square", "orange"), EditOp("remove", "circle"), EditOp("recolor", "triangle", None, "red"),
           EditOp("recolor", "square", "blue", "green"), EditOp("move", "circle", relation="left of", target="square"),
           EditOp("swap", "square", target="triangle")]
    for op in ops:
        assert parse_edit(edits.edit_text(op)) == op


def test_apply_edit_picks_last_to_remove_and_first_to_recolour() -> None:
    rng = np.random.default_rng(0)
    g = _grid(2, 3, {(0, 0): ("square", "red"), (0, 2): ("square", "blue"), (1, 1): ("square", "red")})
    out = apply_edit(g, EditOp("remove", "square", "red"), rng)
    assert objects(out) == [(0, 0, "square", "red"), (0, 2, "square", "blue")]
    out = apply_edit(g, EditOp("recolor", "square", None, "red"), rng)  # the first one not already red
    assert objects(out) == [(0, 0, "square", "red"), (0, 2, "square", "red"), (1, 1, "square", "red")]
    out = apply_edit(g, EditOp("recolor", "square", None, "green"), rng)
    assert objects(out)[:2] == [(0, 0, "square", "green"), (0, 2, "square", "blue")]
    assert objects(out)[2] == (1, 1, "square", "red")
    # the input grid is left alone
    assert objects(g)[0] == (0, 0, "square", "red")


def test_move_goes_relative_to_the_first_target_only() -> None:
    # circles at (0,1) and (0,3); the square moves "left of the circle": left of (0,1) only, i.e. column 0
    g = _grid(2, 4, {(1, 3): ("square", "red"), (0, 1): ("circle", "blue"), (0, 3): ("circle", "blue")})
    seen = set()
    for seed in range(12):
        out = apply_edit(g, EditOp("move", "square", relation="left of", target="circle"), np.random.default_rng(seed))
        sq = [o for o in objects(out) if o[2] == "square"]
        seen.add(sq[0][:2])
    assert seen == {(0, 0), (1, 0)}


def test_move_cells_include_the_movers_own_but_can_move_does_not() -> None:
    # a 1x2 grid: square at column 0, circle at column 1; "left of" holds only where the square already is
    g = _grid(1, 2, {(0, 0): ("square", "red"), (0, 1): ("circle", "blue")})
    sq, ci = objects(g)[0], objects(g)[1]
    assert edits.move_cells(g, sq, [ci], "left of", 8) == [(0, 0)]
    assert not edits._can_move(g, sq, [ci], "left of", 8)


def test_clutter_is_the_last_object_beyond_the_largest_count() -> None:
    objs = [(0, 0, "square", "red"), (0, 1, "square", "red"), (0, 2, "circle", "red"), (1, 0, "square", "blue"),
            (1, 1, "circle", "blue")]
    include = [{"class": "square", "count": 2}, {"class": "square", "count": 1}, {"class": "circle", "count": 1}]
    assert edits._clutter(objs, include) == (1, 1, "circle", "blue")
    assert edits._clutter(objs[:3], include) is None


def test_critique_of_an_overflowing_count() -> None:
    md = {"include": [{"class": "square", "count": 2}], "exclude": [{"class": "square", "count": 3}]}
    g = _grid(2, 2, {(0, 0): ("square", "red"), (0, 1): ("square", "red"), (1, 0): ("square", "red")})
    assert critique_text(g, md) == "<think> the image has three squares but needs two </think> remove a square"
    g = _grid(2, 2, {(0, 0): ("square", "red"), (0, 1): ("square", "red")})
    assert diagnose(g, md) == []
    g = _grid(2, 2, {(0, 0): ("square", "red")})
    assert critique_text(g, md) == "<think> the image has one square but needs two </think> add a square"


def test_critique_of_a_wrong_colour_names_the_seen_colour() -> None:
    md = {"include": [{"class": "square", "count": 1, "color": "red"}]}
    g = _grid(2, 2, {(0, 0): ("square", "blue"), (1, 1): ("square", "red")})
    assert critique_text(g, md) == "<think> the square is blue not red </think> make the square red"


def test_position_fix_moves_the_target_when_the_object_cannot_move() -> None:
    # 1x3: circle at column 2 must be left of the square at column 1 -- no free cell left of (0,1) for the
    # circle except column 0, which is free: the circle moves.  Fill column 0 so the circle cannot move;
    # then the square moves right of the circle?  Column 2 is the circle's: no room, so swap.
    md = {"include": [{"class": "square", "count": 1}, {"class": "circle", "count": 1, "position": ["left of", 0]}]}
    g = _grid(1, 3, {(0, 1): ("square", "red"), (0, 2): ("circle", "blue")})
    assert diagnose(g, md) == [EditOp("move", "circle", relation="left of", target="square")]
    g = _grid(2, 2, {(0, 0): ("triangle", "red"), (0, 1): ("circle", "blue"), (1, 0): ("triangle", "red"),
                     (1, 1): ("square", "red")})
    md2 = {"include": [{"class": "square", "count": 1}, {"class": "circle", "count": 1, "position": ["below", 0]}]}
    assert diagnose(g, md2) == [EditOp("swap", "circle", target="square")]


def test_random_correct_grid_fills_a_grid_exactly_and_adds_the_distractors() -> None:
    md = {"include": [{"class": "square", "count": 4}], "exclude": [{"class": "square", "count": 5}]}
    g = synthesis.random_correct_grid(md, np.random.default_rng(0), rows=2, cols=2)
    assert (g > 0).all()
    one = {"include": [{"class": "square", "count": 1}]}
    g = synthesis.random_correct_grid(one, np.random.default_rng(1), distractors=2)
    assert len(objects(g)) == 3 and sum(o[2] == "square" for o in objects(g)) == 1


def test_flaw_candidates_are_one_mistake_each_and_all_flawed() -> None:
    md = {"include": [{"class": "square", "count": 2}], "exclude": [{"class": "square", "count": 3}]}
    g = _grid(2, 3, {(0, 0): ("square", "red"), (0, 2): ("square", "red"), (1, 2): ("circle", "blue")})
    for seed in range(6):
        cands = synthesis._mutations(g, md, np.random.default_rng(seed), 8)
        counts = [len([o for o in objects(c) if o[2] == "square"]) for c in cands]
        assert counts[0] == 1  # missing: one fewer than asked
        assert counts[-1] == 3  # extra: exactly the excluded count
        recolored = cands[1]
        diff = [(o, p) for o, p in zip(objects(g), objects(recolored)) if o != p]
        assert len(diff) == 1 and diff[0][0][:3] == diff[0][1][:3] and diff[0][1][3] != "red"
        assert diff[0][0][:2] in ((0, 0), (0, 2))
    for seed in range(6):
        got = flaw_candidates(g, md, np.random.default_rng(seed))
        assert got and all(not edits.judge(c, md).correct for c in got)


def test_wrong_colour_candidate_touches_only_the_counted_objects() -> None:
    md = {"include": [{"class": "square", "count": 1, "color": "red"}]}
    g = _grid(2, 3, {(0, 0): ("square", "red"), (0, 1): ("square", "red"), (0, 2): ("square", "red")})
    for seed in range(10):
        cand = synthesis._mutations(g, md, np.random.default_rng(seed), 8)[1]
        assert objects(cand)[0][3] != "red" and [o[3] for o in objects(cand)[1:]] == ["red", "red"]


# ============================================================================================ blocks prompts
def test_enumerated_tags_follow_geneval() -> None:
    counting = prompts.enumerate_tag("counting", (2,))
    assert counting[0] == {"tag": "counting", "include": [{"class": "square", "count": 2}],
                           "exclude": [{"class": "square", "count": 3}], "prompt": "a photo of two squares"}
    pos = prompts.enumerate_tag("position")
    assert pos[1] == {"tag": "position", "prompt": "a photo of a circle right of a square",
                      "include": [{"class": "square", "count": 1},
                                  {"class": "circle", "count": 1, "position": ["right of", 0]}]}
    attr = prompts.enumerate_tag("color_attr")
    assert len(attr) == 6 * 30 and all(m["include"][0]["color"] != m["include"][1]["color"] for m in attr)


def _held(tag: str, frac: float = prompts.DEFAULT_HELDOUT_FRACTION) -> list[str]:
    """Independent: sha256 of "blocks-v1:<text>", first 8 bytes big-endian, smallest held out."""
    texts = [m["prompt"] for m in prompts.enumerate_tag(tag)]
    key = {t: int(hashlib.sha256(f"blocks-v1:{t}".encode()).hexdigest()[:16], 16) for t in texts}
    n = min(max(int(round(frac * len(texts))), 1), len(texts) - 1)
    return sorted(texts, key=key.__getitem__)[:n]


@pytest.mark.parametrize("tag", prompts.TAGS)
def test_heldout_pool_is_the_smallest_hashes(tag: str) -> None:
    assert [m["prompt"] for m in prompts.prompt_pool("heldout", tag)] == _held(tag)
    assert prompts.split_of(_held(tag)[0]) == "heldout"


def test_heldout_sizes_round_and_keep_one_per_tag() -> None:
    assert len(prompts.prompt_pool("heldout", "two_object")) == 2  # round(0.25 * 6) = 2 (1.5 rounds to 2)
    assert len(prompts.prompt_pool("heldout", "single_object", heldout_fraction=0.1)) == 1  # 0.3 -> at least 1
    assert len(prompts.prompt_pool("train", "single_object", heldout_fraction=0.9)) == 1


@pytest.mark.parametrize("bad", [{"counts": (0,)}, {"heldout_fraction": 0.0}, {"heldout_fraction": 1.0}])
def test_prompt_pool_rejects_bad_settings(bad: dict) -> None:
    with pytest.raises(UserError):
        prompts.prompt_pool("train", "counting", **bad)


def test_check_tag_mix_zero_weights_and_empty() -> None:
    assert prompts.check_tag_mix({"colors": 0, "counting": 2}, "x") == {"counting": 2.0}
    with pytest.raises(UserError, match="at least one tag"):
        prompts.check_tag_mix({}, "x")
    with pytest.raises(UserError, match="at least one tag"):
        prompts.check_tag_mix({"colors": 0}, "x")


@pytest.mark.parametrize("weight", [math.nan, math.inf, True])
def test_check_tag_mix_refuses_a_weight_that_is_not_a_finite_number(weight: object) -> None:
    """A NaN weight passed the check and failed only when prompts were drawn; a bool is not a weight."""
    with pytest.raises(UserError, match="weight of 'colors' must be a finite number >= 0"):
        prompts.check_tag_mix({"colors": weight, "counting": 1.0}, "x")


def test_heldout_prompts_quota_ids_order_and_copies() -> None:
    got = prompts.heldout_prompts(2, tag_mix={"single_object": 1, "two_object": 2})
    assert [p.metadata["tag"] for p in got] == ["single_object", "two_object"]  # largest remainder: 2/3 > 1/3
    assert [p.id for p in got] == ["blocks-heldout-000000", "blocks-heldout-000001"]
    # a zero weight draws nothing and changes nothing
    assert got == prompts.heldout_prompts(2, tag_mix={"colors": 0, "single_object": 1, "two_object": 2})
    assert prompts.heldout_prompts(0) == []
    got[0].metadata["include"].clear()
    again = prompts.heldout_prompts(2, tag_mix={"single_object": 1, "two_object": 2})
    assert again[0].metadata["include"] == [{"class": again[0].metadata["include"][0]["class"], "count": 1}]


def test_heldout_prompts_shuffle_each_tags_pool() -> None:
    pool = [m["prompt"] for m in prompts.prompt_pool("heldout", "position")]
    orders = []
    for seed in range(4):
        got = [p.prompt for p in prompts.heldout_prompts(len(pool), seed=seed, tag_mix={"position": 1})]
        assert sorted(got) == sorted(pool)
        orders.append(got)
    assert any(o != pool for o in orders)


def test_position_against_two_targets_needs_every_target() -> None:
    # the circle must be right of both squares: right of (0,0) but not of (1,2) -- still a failing clause
    md = {"include": [{"class": "square", "count": 2}, {"class": "circle", "count": 1, "position": ["right of", 0]}]}
    g = _grid(2, 4, {(0, 0): ("square", "red"), (1, 2): ("square", "red"), (0, 1): ("circle", "blue")})
    assert critique_text(g, md) == ("<think> the circle is not right of the square </think> "
                                    "move the circle right of the square")


def test_a_position_clause_against_two_targets_that_no_move_can_fix_is_redrawn_not_a_crash() -> None:
    """"a circle left of two squares" with both squares in column 0: no cell is left of them, and a move or swap
    names one target.  ``diagnose`` raised "found no fix"; now the circle is taken out (the next round adds it)."""
    meta = {"prompt": "two squares and a circle left of the squares",
            "include": [{"class": "square", "count": 2}, {"class": "circle", "count": 1, "position": ["left of", 0]}]}
    grid = _grid(4, 4, {(0, 0): ("square", "red"), (3, 0): ("square", "red"), (1, 2): ("circle", "blue")})
    assert diagnose(grid, meta) == [EditOp("remove", "circle")]
    assert critique_text(grid, meta) == ("<think> the circle is not left of the square </think> "
                                         f"{edits.edit_text(EditOp('remove', 'circle'))}")
    removed = apply_edit(grid, EditOp("remove", "circle"), np.random.default_rng(0))
    assert diagnose(removed, meta) == [EditOp("add", "circle", None)]
