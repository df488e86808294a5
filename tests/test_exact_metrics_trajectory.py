"""Exact small cases for r3_rl/tracking (metrics, TensorBoard pictures, views, console, logger), r3_rl/trajectory
and r3_rl/data that the other tests left open (round 11D audit).

Each test pins one number, label, pixel region, file row or refusal that a plausible one-point bug changes; the
expected values are worked out by hand from the documented behaviour (module and function docstrings), on the
hand-built trees of test_tracking_metrics / test_tracking_inspect and the dump helpers of test_exact_data_trajectory.
"""
from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from r3_rl.errors import UserError
from r3_rl.trajectory import Node, PromptItem, SamplingParams, Segment, Tree, read_trees, write_trees
from test_exact_data_trajectory import _png_b64, _tree
from test_tracking_inspect import chain
from test_tracking_metrics import stage_a_tree, stage_bc_tree, trees


class FakeWriter:
    """Records what a SummaryWriter would be given."""

    def __init__(self) -> None:
        self.images: list[str] = []
        self.texts: list[tuple[str, str]] = []

    def add_image(self, tag: str, img: np.ndarray, step: int, dataformats: str = "CHW") -> None:
        self.images.append(tag)

    def add_text(self, tag: str, text: str, step: int) -> None:
        self.texts.append((tag, text))


# ---------------------------------------------------------------------------------------------------- metrics
def test_an_absent_component_is_not_read_as_zero_when_deduplicating() -> None:
    """``b`` is 0.0 where ``a`` is absent and equals ``a`` elsewhere: not the same series, so both are logged."""
    from r3_rl.tracking.metrics import reward_metrics

    a = stage_a_tree()
    a.nodes["g0"].rewards = {"b": 0.0}
    a.nodes["g1"].rewards = {"a": 0.4, "b": 0.4}
    m = reward_metrics([a])
    assert m["reward_component/generate/a"] == pytest.approx(0.4)
    assert m["reward_component/generate/b"] == pytest.approx(0.2)


def test_understanding_counts_only_this_steps_critiques() -> None:
    """A critique carried over from an earlier step (policy_version -1) is not a verdict of this step."""
    from r3_rl.tracking.metrics import understanding_metrics

    bc = stage_bc_tree()
    bc.nodes["c1"].policy_version = -1  # the stop
    m = understanding_metrics([bc])
    assert m["3_understanding/edit_on_flawed"] == 1.0  # c0 and c2 edit a flawed (0.5) parent


def test_a_refine_from_a_parent_with_a_failed_reward_is_left_out() -> None:
    from r3_rl.tracking.metrics import refine_metrics

    bc = stage_bc_tree()
    bc.nodes["root"].reward = None
    m = refine_metrics([bc])
    assert m["6_refine/stop_rate"] == pytest.approx(1 / 3)
    assert math.isnan(m["6_refine/delta_mean"])
    assert (m["6_refine/improved"], m["6_refine/worse"], m["6_refine/unchanged"]) == (0.0, 0.0, 0.0)


def test_the_stop_rate_is_logged_when_every_refined_reward_failed() -> None:
    from r3_rl.tracking.metrics import refine_metrics

    bc = stage_bc_tree()
    for n in bc.nodes.values():
        if n.stage == "refine":
            n.reward = None
    m = refine_metrics([bc])
    assert m["6_refine/stop_rate"] == pytest.approx(1 / 3) and math.isnan(m["6_refine/delta_mean"])


def test_refine_counts_per_round_are_keyed_by_the_refined_images_round() -> None:
    """A refine-stage tree grown from a round-0 parent straight into round 2: its moves count for round 2."""
    from r3_rl.tracking.metrics import refine_metrics

    far = stage_bc_tree()
    for n in far.nodes.values():
        if n.stage in ("reflect", "refine"):
            n.round = 2
    m = refine_metrics([stage_bc_tree(), far])
    assert (m["refine_round/round2/improved"], m["refine_round/round2/worse"]) == (1.0, 1.0)
    assert (m["refine_round/round1/improved"], m["refine_round/round1/unchanged"]) == (1.0, 1.0)

def test_a_group_with_one_scored_member_is_not_a_group() -> None:
    """Two siblings, one reward failed: fewer than two scored members, so no group at all (not a zero-signal one);
    a singleton group does not dilute the zero-signal fraction either."""
    from r3_rl.tracking.metrics import group_metrics

    t = Tree("t", PromptItem("p", "x"))
    t.add(Node("a", None, "generate", 0, "G", 0, reward=0.5))
    t.add(Node("b", None, "generate", 0, "G", 0, reward=None))
    m = group_metrics([t])
    assert "groups/generate/total" not in m and math.isnan(m["groups/zero_signal_fraction"])
    a, bc = trees()
    for n in bc.nodes.values():
        if n.stage == "refine":
            n.reward = 0.5  # the refine group is flat
    t.add(Node("c", None, "reason", 0, "single", 0, reward=1.0))  # a one-member group
    assert group_metrics([a, bc, t])["groups/zero_signal_fraction"] == pytest.approx(1 / 4)


def test_a_buffered_parents_advantage_is_not_this_steps() -> None:
    from r3_rl.tracking.metrics import group_metrics

    bc = stage_bc_tree()
    bc.nodes["root"].advantage = 0.7
    for n in bc.nodes.values():
        if n.stage == "refine":
            n.advantage = 0.25
    m = group_metrics([bc])
    assert "advantage/generate/mean" not in m and m["advantage/refine/mean"] == 0.25


def test_a_greedy_flow_image_adds_sde_steps_but_no_entropy() -> None:
    from r3_rl.flow.action import FLOW_ACTION_KIND
    from r3_rl.tracking.metrics import throughput_metrics

    t = stage_a_tree()
    for nid, logprobs, greedy in (("g0", [-1.0, -3.0], False), ("g1", [-5.0], True), ("g2", [-2.0], False)):
        t.nodes[nid].segment = Segment("image", {}, [], logprobs, SamplingParams(greedy=greedy),
                                       action={"kind": FLOW_ACTION_KIND})
    m = throughput_metrics([t], 0.0)
    assert m["rollout/sde_steps"] == 4
    assert m["5_entropy/image_sde"] == pytest.approx((1.0 + 3.0 + 0.0 + 2.0) / 4)


def test_a_buffered_parent_alone_is_no_trajectory_and_no_failed_reward() -> None:
    """A refine-stage tree whose buffered parent (not sampled this step, reward missing) has no children yet."""
    from r3_rl.tracking.metrics import failed_reward_count, throughput_metrics

    bc = stage_bc_tree()
    lone = Tree("lone", PromptItem("p", "x"))
    lone.add(Node("root", None, "generate", 0, "R", -1, image=np.zeros((4, 4, 3), np.uint8), reward=None))
    assert throughput_metrics([bc, lone], 0.0)["rollout/trajectories"] == 3
    assert failed_reward_count([bc, lone]) == 0


def test_step_metrics_keep_the_refine_stages_group_counts() -> None:
    from r3_rl.learner.batch import BatchStats
    from r3_rl.tracking.metrics import step_metrics

    groups = {"refine/single_valid_groups": 2.0, "reflect/all_failed_groups": 1.0}
    m = step_metrics(trees(), 1.0, {}, BatchStats(items=1), groups, 1.0, 1.0, 0)
    assert m["groups/refine/single_valid"] == 2.0 and m["groups/reflect/all_failed"] == 1.0


def test_eval_stop_rate_is_a_headline_figure() -> None:
    from r3_rl.tracking.metrics import eval_metrics

    report = {"accuracy": [0.5], "per_tag": {}, "stop_rate": 0.25, "mean_rounds_used": 0.0, "transitions": []}
    m = eval_metrics(report)
    assert m["0_eval/stop_rate"] == 0.25 and "eval/stop_rate" not in m


# ---------------------------------------------------------------------------------------------------- tensorboard
def test_an_unused_slots_caption_is_white() -> None:
    from r3_rl.tracking.tensorboard import CAPTION_H, CELL, HEADER_H, LINE, image_strip

    grid = image_strip([np.zeros((4, 4, 3), np.uint8)], ["r0"], slots=2)
    y_cap = 2 * LINE + HEADER_H + CELL + LINE
    x = LINE + CELL + LINE
    assert (grid[y_cap:y_cap + CAPTION_H, x:x + CELL] == 255).all()


def test_a_caption_draws_both_of_its_lines() -> None:
    """The reward goes on a second line (13 px down): dark pixels in the caption's lower half."""
    from r3_rl.tracking.tensorboard import CAPTION_H, CELL, HEADER_H, LINE, image_strip

    grid = image_strip([np.full((4, 4, 3), 255, np.uint8)], ["r1 refine R=1.00 (+0.50)"])
    y_cap = 2 * LINE + HEADER_H + CELL + LINE
    caption = grid[y_cap:y_cap + CAPTION_H, LINE:LINE + CELL]
    assert (caption[:13] < 128).any() and (caption[14:] < 128).any()


def test_a_long_header_is_cut_to_the_band_with_a_tilde() -> None:
    """A 132-px grid has a 128-px header band: (128 - 4) // 6 = 20 characters, so 30 x's are drawn as 19 + "~"
    (drawn here independently with PIL's default font at (2, 1))."""
    from PIL import ImageDraw, ImageFont

    from r3_rl.tracking.tensorboard import HEADER_H, LINE, image_strip

    grid = image_strip([np.zeros((4, 4, 3), np.uint8)], ["r0"], header="x" * 30)
    width = grid.shape[1]
    expected = Image.new("RGB", (width - 2 * LINE, HEADER_H), (255, 255, 255))
    ImageDraw.Draw(expected).text((2, 1), "x" * 19 + "~", fill=(0, 0, 0), font=ImageFont.load_default())
    assert np.array_equal(grid[LINE:LINE + HEADER_H, LINE:width - LINE], np.asarray(expected))


def test_a_path_longer_than_the_slots_keeps_every_image() -> None:
    from r3_rl.tracking.tensorboard import grid_size, trajectory_image

    bc = stage_bc_tree()
    path = bc.path("r0")
    assert trajectory_image(bc, path, slots=1).shape == (*grid_size(2), 3)
    assert trajectory_image(bc, path, slots=3).shape == (*grid_size(3), 3)


def test_markdown_puts_a_multi_line_critique_on_one_line_and_marks_an_empty_one() -> None:
    from r3_rl.tracking.tensorboard import trajectory_markdown

    t = Tree("t", PromptItem("p", "a cat"))
    t.add(Node("c", None, "reflect", 1, "g", 0, text="first\nsecond", stop=False))
    t.add(Node("d", "c", "reflect", 2, "g", 0, text="", stop=True))
    lines = trajectory_markdown(t, t.path("d")).splitlines()
    assert lines[3:] == ["- **critique 1**: first second", "- **critique 2 (stop)**: _(empty)_"]


def test_a_trajectory_without_an_image_still_logs_its_text() -> None:
    from r3_rl.tracking.tensorboard import add_trajectories

    t = Tree("t", PromptItem("p", "a cat"))
    t.add(Node("plan", None, "reason", 0, "g", 0, text="<think>p</think>"))
    w = FakeWriter()
    assert add_trajectories(w, [t], 0) == 1
    assert w.images == [] and [tag for tag, _ in w.texts] == ["trajectories/0/text"]
    w = FakeWriter()
    assert add_trajectories(w, trees(), 0, limit=4) == 2 and w.images == ["trajectories/0", "trajectories/1"]


def test_histograms_leave_out_the_buffered_parent() -> None:
    from r3_rl.tracking.tensorboard import stage_values

    vals = stage_values([stage_bc_tree()], "reward")
    assert sorted(vals) == ["refine", "reflect"] and vals["refine"].tolist() == [1.0, 0.5, 0.25]


# ---------------------------------------------------------------------------------------------------- views
def test_each_image_is_paired_with_the_image_before_it_not_the_critique() -> None:
    from r3_rl.tracking.views import image_steps

    bc = stage_bc_tree()
    pairs = [(n.id, p.id if p is not None else None) for n, p in image_steps(bc.path("r0"))]
    assert pairs == [("root", None), ("r0", "root")]


def test_an_integer_eval_score_is_a_score() -> None:
    from r3_rl.tracking.views import image_caption

    n = Node("i", None, "generate", 0, "g", 0, image=np.zeros((2, 2, 3), np.uint8), meta={"eval_score": 1})
    assert image_caption(n) == "r0 generate R=1.00"


def test_one_grid_goes_to_a_chain_when_other_trees_are_there() -> None:
    from r3_rl.tracking.views import select_trajectories

    chosen = select_trajectories([stage_a_tree(), chain(0, [0.0, 1.0], None)], 1)
    assert [t.meta["kind"] for t, _ in chosen] == ["chain"]


def test_the_first_path_of_a_tree_is_shown() -> None:
    from r3_rl.tracking.views import select_trajectories

    ((_, path),) = select_trajectories([stage_a_tree()], 1)
    assert [n.id for n in path] == ["p0", "g0"]


def test_a_copy_flag_set_false_adds_no_copy_and_no_tag_adds_no_tag() -> None:
    from r3_rl.tracking.views import image_caption, prompt_line

    n = Node("i", None, "generate", 0, "g", 0, image=np.zeros((2, 2, 3), np.uint8), reward=0.5,
             meta={"copied": False})
    assert image_caption(n) == "r0 generate R=0.50"
    assert prompt_line(Tree("t", PromptItem("p", "a cat"))) == "a cat"


def _kinds(*kinds: str) -> list[Tree]:
    return [Tree(f"t{i}", PromptItem(f"p{i}", "x", {"tag": "a"}), meta={"kind": k}) for i, k in enumerate(kinds)]


def test_a_spread_sample_takes_tree_kinds_in_turn_and_keeps_file_order() -> None:
    """Key (kind, tag): the first part spreads first, so with two picks one is BC however many A tags there are;
    the picks come back in file order."""
    from r3_rl.tracking.views import spread_sample

    ts = [Tree(f"a{i}", PromptItem(f"p{i}", "x", {"tag": f"tag{i}"}), meta={"kind": "A"}) for i in range(3)]
    ts.append(Tree("bc", PromptItem("q", "x", {"tag": "tag0"}), meta={"kind": "BC"}))
    picked = spread_sample(ts, 2, lambda t: (t.meta["kind"], t.prompt.tag))
    assert [t.id for t in picked] == ["a0", "bc"]
    ts = _kinds("A", "A", "BC", "A")
    assert [t.id for t in spread_sample(ts, 3, lambda t: t.meta["kind"])] == ["t0", "t1", "t2"]


# ---------------------------------------------------------------------------------------------------- console
def test_seconds_are_rounded_not_truncated() -> None:
    from r3_rl.tracking.console import fmt_seconds

    assert fmt_seconds(59.6) == "1:00" and fmt_seconds(3599.5) == "1:00:00" and fmt_seconds(0.4) == "0:00"


def test_a_run_of_fewer_than_twenty_steps_prints_every_step() -> None:
    import io

    from r3_rl.tracking.console import Console

    buf = io.StringIO()
    c = Console(file=buf, tty=False)
    for step in range(5):
        c.step(step, 5, {}, elapsed=float(step + 1))
    assert [line.split()[1] for line in buf.getvalue().splitlines()] == ["1/5", "2/5", "3/5", "4/5", "5/5"]


# ---------------------------------------------------------------------------------------------------- logger
def test_a_rewind_without_keep_evals_drops_the_eval_at_the_step(tmp_path: Path) -> None:
    from r3_rl.tracking.logger import MetricsLogger

    logger = MetricsLogger(tmp_path, tensorboard=False)
    logger.log({"1_reward/generate": 0.5}, 4)
    logger.log({"0_eval/accuracy_round0": 0.3}, 5)
    logger.rewind(5, keep_evals=False)
    logger.close()
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert rows == [{"step": 4, "1_reward/generate": 0.5}]


@pytest.mark.parametrize("key", ["eval_tag/colors/round0", "0_eval/synergy/first_image_gain"])
def test_a_rewind_keeps_an_eval_tag_row_at_the_step(tmp_path: Path, key: str) -> None:
    """Eval rows (``eval_tag/``, and ``0_eval/`` ones such as a synergy-only row; round 15 audit) are logged before
    the checkpoint at their step: a rewind to that step keeps them and drops the training row."""
    from r3_rl.tracking.logger import MetricsLogger

    logger = MetricsLogger(tmp_path, tensorboard=False)
    logger.log({key: 0.5}, 5)
    logger.log({"1_reward/generate": 0.6}, 5)
    logger.rewind(5)
    logger.close()
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert rows == [{"step": 5, key: 0.5}]

def test_a_rewind_skips_a_row_that_is_not_an_object(tmp_path: Path) -> None:
    from r3_rl.tracking.logger import MetricsLogger

    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "a": 1.0}\n[1, 2]\n')
    logger = MetricsLogger(tmp_path, tensorboard=False)
    logger.rewind(3)
    logger.close()
    assert (tmp_path / "metrics.jsonl").read_text() == '{"step": 1, "a": 1.0}\n'


def test_a_kept_nan_eval_is_not_sent_to_tensorboard_again(tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from r3_rl.tracking.logger import MetricsLogger

    logger = MetricsLogger(tmp_path, tensorboard=True)
    logger.log({"eval/a": math.nan, "eval/b": 0.25}, 5)
    logger.rewind(5, keep_evals=True)
    logger.close()
    acc = EventAccumulator(str(tmp_path / "tb"), size_guidance={"scalars": 0})
    acc.Reload()
    assert "eval/a" not in acc.Tags()["scalars"]
    assert [(e.step, e.value) for e in acc.Scalars("eval/b")] == [(5, 0.25)]


def test_a_logged_row_is_on_disk_before_close(tmp_path: Path) -> None:
    """``r3-rl inspect`` reads metrics.jsonl while the run goes on."""
    from r3_rl.tracking.logger import MetricsLogger

    logger = MetricsLogger(tmp_path, tensorboard=False)
    logger.log({"a": 0.5}, 0)
    try:
        assert json.loads((tmp_path / "metrics.jsonl").read_text()) == {"step": 0, "a": 0.5}
    finally:
        logger.close()


def test_numpy_scalars_are_logged_and_text_is_not(tmp_path: Path) -> None:
    """A plug-in's figures are often numpy scalars (``np.float32`` is not a Python float): logged, not dropped."""
    from r3_rl.tracking.logger import MetricsLogger

    logger = MetricsLogger(tmp_path, tensorboard=False)
    logger.log({"a": np.float32(0.5), "b": np.int64(3), "c": True, "d": "text", "e": [1.0]}, 2)
    logger.close()
    assert json.loads((tmp_path / "metrics.jsonl").read_text()) == {"step": 2, "a": 0.5, "b": 3.0, "c": 1.0}


# ---------------------------------------------------------------------------------------------------- trajectory
def _dump_with_image(tmp_path: Path) -> tuple[Path, Path]:
    path = write_trees([_tree(images=(np.full((4, 4, 3), 9, np.uint8),))], tmp_path / "d.jsonl")
    return path, tmp_path / "d_images" / "t0" / "g0.png"


def test_an_absolute_image_path_is_refused_even_inside_the_dump(tmp_path: Path) -> None:
    path, png = _dump_with_image(tmp_path)
    d = json.loads(path.read_text())
    d["nodes"][1]["image"] = str(png.resolve())
    path.write_text(json.dumps(d) + "\n")
    with pytest.raises(UserError, match="outside the dump's folder"):
        next(read_trees(path))


def test_a_dump_named_by_a_relative_path_reads_its_images(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``r3-rl inspect runs/x`` from the runs' parent folder: the dump's folder is relative, its images are inside."""
    monkeypatch.chdir(tmp_path)
    write_trees([_tree(images=(np.full((4, 4, 3), 9, np.uint8),))], Path("rel") / "d.jsonl")
    assert (next(read_trees(Path("rel") / "d.jsonl")).nodes["g0"].image == 9).all()

def test_an_image_of_exactly_the_pixel_cap_is_read(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from r3_rl import trajectory

    path, _ = _dump_with_image(tmp_path)
    monkeypatch.setattr(trajectory, "MAX_IMAGE_PIXELS", 16)
    assert next(read_trees(path)).nodes["g0"].image.shape == (4, 4, 3)
    monkeypatch.setattr(trajectory, "MAX_IMAGE_PIXELS", 15)
    with pytest.raises(UserError, match="4x4 pixels, over 15"):
        next(read_trees(path))


def test_a_grey_png_reads_back_as_a_writable_rgb_image(tmp_path: Path) -> None:
    path, png = _dump_with_image(tmp_path)
    Image.fromarray(np.full((4, 4), 77, np.uint8), mode="L").save(png)
    img = next(read_trees(path)).nodes["g0"].image
    assert img.shape == (4, 4, 3) and img.dtype == np.uint8 and (img == 77).all()
    img[0, 0] = 1  # a node's image is the caller's to change


def test_a_context_image_of_exactly_the_byte_cap_is_read(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import base64

    from r3_rl import trajectory

    b64 = _png_b64((8, 8, 3))
    path = write_trees([_tree(context={"input": {"png": b64}})], tmp_path / "d.jsonl")
    monkeypatch.setattr(trajectory, "MAX_CONTEXT_PNG_BYTES", len(base64.b64decode(b64)))
    assert next(read_trees(path)).nodes["r0"].segment.context == {"input": {"png": b64}}


def test_only_a_lone_png_key_and_nested_lists_are_moved_to_files(tmp_path: Path) -> None:
    """``{"png": ..., "x": 1}`` is not an image reference (kept inline and whole); a PNG inside a list of lists
    is one (written to a file)."""
    b64 = _png_b64((8, 8, 3))
    other = _png_b64((4, 4, 3))
    context = {"mixed": {"png": other, "x": 1}, "nested": [[{"png": b64}]]}
    path = write_trees([_tree(context=context)], tmp_path / "d.jsonl")
    text = path.read_text()
    assert other in text and b64 not in text and text.count('"png_file"') == 1
    assert next(read_trees(path)).nodes["r0"].segment.context == context


def test_a_tree_line_without_meta_reads_with_empty_meta(tmp_path: Path) -> None:
    path = write_trees([_tree()], tmp_path / "d.jsonl")
    d = json.loads(path.read_text())
    del d["meta"]
    path.write_text(json.dumps(d) + "\n")
    assert next(read_trees(path)).meta == {}


def test_numpy_scalars_in_a_tree_are_written_as_json_numbers(tmp_path: Path) -> None:
    t = _tree()
    t.meta = {"n": np.int64(3), "ok": np.bool_(True), "x": np.float32(0.5)}
    back = next(read_trees(write_trees([t], tmp_path / "d.jsonl")))
    assert back.meta == {"n": 3, "ok": True, "x": 0.5} and type(back.meta["n"]) is int


def test_prompt_tag_default_and_children() -> None:
    assert PromptItem("p", "x").tag == "all" and PromptItem("p", "x", {"tag": "colors"}).tag == "colors"
    t = Tree("t", PromptItem("p", "x"))
    t.add(Node("root", None, "generate", 0, "g", 0))
    for i in range(3):
        t.add(Node(f"c{i}", "root", "reflect", 1, "g", 0))
    assert [n.id for n in t.children("root")] == ["c0", "c1", "c2"] and [n.id for n in t.children(None)] == ["root"]


# ---------------------------------------------------------------------------------------------------- data
TIIF = {"type": "color", "short_description": "A red cup.", "yn_question_list": ["Is there a cup?"],
        "yn_answer_list": ["yes"]}


def _jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@pytest.mark.parametrize("change, message", [
    ({"yn_question_list": [], "yn_answer_list": []}, "TIIF record needs non-empty"),
    ({"yn_question_list": ["   "]}, "'yn_question_list' must hold non-empty strings"),
])
def test_tiif_refuses_empty_questions(tmp_path: Path, change: dict, message: str) -> None:
    from r3_rl.data import read_jsonl_prompts

    p = _jsonl(tmp_path / "t.jsonl", [dict(TIIF, **change)])
    with pytest.raises(UserError, match=rf"t\.jsonl:1: {re.escape(message)}"):
        read_jsonl_prompts(p, "tiif")


def test_tiif_answers_are_stripped_and_the_default_tag_is_tiif(tmp_path: Path) -> None:
    from r3_rl.data import read_jsonl_prompts

    rec = {k: v for k, v in TIIF.items() if k != "type"}
    rec.update(yn_question_list=[" Is there a cup? ", "Is it red?"], yn_answer_list=[" Yes ", "NO"])
    (item,) = read_jsonl_prompts(_jsonl(tmp_path / "t.jsonl", [rec]), "tiif")
    assert item.metadata["yn_answer_list"] == ["yes", "no"] and item.metadata["tag"] == "tiif"
    assert item.metadata["yn_question_list"] == ["Is there a cup?", "Is it red?"]


def test_geneval_prompt_text_is_stripped_and_blank_text_refused(tmp_path: Path) -> None:
    from r3_rl.data import read_jsonl_prompts

    (item,) = read_jsonl_prompts(_jsonl(tmp_path / "g.jsonl", [{"prompt": "  a cat \n"}]), "geneval")
    assert item.prompt == "a cat"
    with pytest.raises(UserError, match=r"b\.jsonl:1: missing prompt text"):
        read_jsonl_prompts(_jsonl(tmp_path / "b.jsonl", [{"prompt": "   "}]), "geneval")


def test_hf_prompts_strip_text_and_leave_out_binary_columns(tmp_path: Path) -> None:
    import datasets

    from r3_rl.data import read_hf_prompts

    datasets.Dataset.from_dict({"text": ["  a cat "], "blob": [b"\x00\x01"], "n": [1]}).save_to_disk(
        str(tmp_path / "ds"))
    (item,) = read_hf_prompts(str(tmp_path / "ds"), "text")
    assert item.prompt == "a cat" and item.metadata == {"n": 1}


def test_an_empty_dataset_and_a_missing_file_are_one_line_errors(tmp_path: Path) -> None:
    import datasets

    from r3_rl.data import load_prompts, read_hf_prompts

    datasets.Dataset.from_dict({"text": ["a"]}).filter(lambda row: False).save_to_disk(str(tmp_path / "empty"))
    with pytest.raises(UserError, match=r"\(split 'train'\): no rows"):
        read_hf_prompts(str(tmp_path / "empty"), "text")
    with pytest.raises(UserError, match=r"nope\.jsonl: file not found"):
        load_prompts("hf", str(tmp_path / "nope.jsonl"))


def test_eval_prompts_are_the_seeded_subset_not_the_first_lines(tmp_path: Path) -> None:
    """A held-out file sorted by tag (10 x "a", then 10 x "b"): 10 of its 20 prompts are the seeded subset of
    held_out_subset, which covers both tags (the first 10 lines would be one tag)."""
    from types import SimpleNamespace

    from r3_rl.data import PromptSource, held_out_subset, read_jsonl_prompts

    recs = [{"prompt": f"p{i}", "tag": "a" if i < 10 else "b"} for i in range(20)]
    test = _jsonl(tmp_path / "test.jsonl", recs)
    data = SimpleNamespace(source="geneval", train=str(_jsonl(tmp_path / "train.jsonl", recs[:2])), eval=str(test),
                           prompt_column="prompt", train_split="train", eval_split="test")
    src = PromptSource(SimpleNamespace(seed=0, data=data))
    chosen = src.eval_prompts(10)
    assert chosen == held_out_subset(read_jsonl_prompts(test, "geneval"), 10, 0)
    assert {p.metadata["tag"] for p in chosen} == {"a", "b"} and src.eval_pool_size() == 20


def test_an_hf_prompt_file_may_be_gzipped(tmp_path: Path) -> None:
    """``.jsonl.gz`` works wherever ``.jsonl`` does (module docstring), ``data.source: hf`` included: it was sent
    to the hub loader as a dataset name ("cannot load: Couldn't find any data file", until round 11D)."""
    import gzip

    from r3_rl.data import load_prompts

    (tmp_path / "p.jsonl.gz").write_bytes(gzip.compress(b'{"prompt": "a cat", "tag": "x"}\n'))
    (item,) = load_prompts("hf", str(tmp_path / "p.jsonl.gz"))
    assert item.prompt == "a cat" and item.metadata == {"tag": "x"} and item.id == "p.jsonl.gz:0"
