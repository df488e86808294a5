"""Exact cases for `r3-rl inspect` and r3_rl/tracking that the other tracking tests left open (a mutation audit).

Each test pins one value, label, order, pixel block or escape that a plausible bug changes; the expected values
are worked out by hand from the documented behaviour (module and function docstrings), on the hand-built trees
of test_tracking_metrics / test_tracking_inspect.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from r3_rl.errors import UserError
from r3_rl.inspect import chains_summary, inspect_run, printable, run_overview, trajectory_text, trees_summary
from r3_rl.tracking.console import status_line
from r3_rl.tracking.html import trees_html
from r3_rl.tracking.logger import MetricsLogger
from r3_rl.tracking.metrics import eval_metrics, group_metrics, reward_metrics, throughput_metrics
from r3_rl.tracking.tensorboard import (CAPTION_H, CELL, HEADER_H, LINE, _text_band, as_rgb, fit_cell, image_strip,
                                        stage_values, trajectory_markdown)
from r3_rl.tracking.views import image_caption, select_trajectories
from r3_rl.trajectory import Node, PromptItem, SamplingParams, Tree, write_trees
from test_tracking_inspect import chain
from test_tracking_metrics import stage_a_tree, stage_bc_tree, trees


def events(tb_dir: Path) -> EventAccumulator:
    acc = EventAccumulator(str(tb_dir), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    return acc


# ---------------------------------------------------------------------------------------------------- inspect
def test_printable_strips_c1_controls_and_bidi_isolates() -> None:
    """C1 controls (0x9b is a one-byte CSI on some terminals, 0x85 NEL) and the bidi isolates U+2066..U+2069 go,
    like ESC and the bidi overrides; newlines and tabs stay."""
    assert printable("a\x9b2Jb\x85c") == "a2Jbc"
    assert printable("d\u2066e\u2067f\u2068g\u2069h") == "defgh"
    assert printable("x\ny\tz") == "x\ny\tz"


def test_inspect_judges_a_dump_by_the_recipes_correct_threshold(tmp_path: Path) -> None:
    """correct_threshold 0.5: first images 0.5 and 1.0 are both correct, refined 1.0 / 0.5 / 0.25 two of three,
    and the buffered parent (0.5) is correct, so the one stop of three critiques is a stop on a correct parent."""
    rd = tmp_path / "run"
    rd.mkdir()
    (rd / "recipe.yaml").write_text("name: demo\nrewards: {correct_threshold: 0.5}\n")
    write_trees(trees(), rd / "trajectories" / "step_000000.jsonl")
    text, _ = inspect_run(rd)
    assert "  accuracy round 0 1.000, round 1 0.667\n" in text
    assert "  critic: stop on correct parents 0.333, edit on flawed parents -, balanced accuracy -" in text


def test_inspect_refuses_a_damaged_line_in_the_middle_of_metrics(tmp_path: Path) -> None:
    """Only a last line cut off mid-write is forgiven; a bad line with rows after it is named file:line."""
    rd = tmp_path / "run"
    rd.mkdir()
    (rd / "metrics.jsonl").write_text('{"step": 0, "learner/loss": 0.5}\n{"step": 1, "lea\n'
                                      '{"step": 2, "learner/loss": 0.25}\n')
    with pytest.raises(UserError, match=r"metrics\.jsonl:2: not valid JSON"):
        inspect_run(rd)


def test_inspect_training_line_names_each_figure(tmp_path: Path) -> None:
    rd = tmp_path / "run"
    rd.mkdir()
    row = {"step": 3, "batch/items": 4.0, "1_reward/generate": 0.5, "2_accuracy/round0": 0.25,
           "2_accuracy/round1": 0.875, "6_refine/delta_mean": 0.125, "6_refine/stop_rate": 0.375,
           "3_understanding/verdict_balanced_accuracy": 0.75}
    (rd / "metrics.jsonl").write_text(json.dumps(row) + "\n")
    assert run_overview(rd).splitlines()[1] == ("  training: 1 steps logged, last step 3: reward A 0.500, acc A 0.250, "
                                                "refine dR 0.125, verdict 0.750, stop rate 0.375")



def test_inspect_training_line_shows_a_missing_or_undefined_figure_as_a_dash(tmp_path: Path) -> None:
    """As the console's status line does: a figure never logged (no refine stage) or undefined (NaN: no correct
    parent critiqued) is "-", not "failed", which would read as a reward failure (until 2026-12-06)."""
    rd = tmp_path / "run"
    rd.mkdir()
    (rd / "metrics.jsonl").write_text('{"step": 0, "batch/items": 4, "1_reward/generate": 0.5, "2_accuracy/round0": '
                                      '0.25, "3_understanding/verdict_balanced_accuracy": NaN}\n')
    assert run_overview(rd).splitlines()[1] == ("  training: 1 steps logged, last step 0: reward A 0.500, acc A 0.250, "
                                                "refine dR -, verdict -, stop rate -")

def test_inspect_eval_report_line_and_reference_kinds(tmp_path: Path) -> None:
    """Every figure of an eval report in its place: stop rate, prompts, pooled and within-tag verdict balanced
    accuracy, the reference set's, and its stop rate per kind with the number of images of the kind."""
    rd = tmp_path / "run"
    (rd / "eval").mkdir(parents=True)
    rep = {"accuracy": [0.25, 0.5], "stop_rate": 0.375, "prompts": 8, "mean_rounds_used": 1.5,
           "understanding": {"verdict": {"overall": {"balanced_accuracy": 0.75,
                                                     "within_tag_balanced_accuracy": 0.625}},
                             "reference": {"verdict": {"overall": {"balanced_accuracy": 0.5}},
                                           "per_kind": {"correct": {"stop_rate": 0.75, "images": 4},
                                                        "flawed:add": {"stop_rate": 0.125, "images": 8}}}}}
    (rd / "eval" / "after.json").write_text(json.dumps(rep))
    lines = run_overview(rd).splitlines()
    assert lines[2] == ("  eval after: accuracy per round 0.250 0.500 (stop rate 0.375, 8 prompts); verdict balanced "
                        "accuracy 0.750 (within tags 0.625), reference set 0.500")
    assert lines[3] == "    reference set, stop rate by kind: correct 0.750 (4), flawed:add 0.125 (8)"


def _critique_tree(text: str) -> Tree:
    t = Tree("t", PromptItem("p", "a red cat"))
    t.add(Node("c", None, "reflect", 1, "g", 0, text=text, edit_instruction="Do it.", stop=False))
    return t


def test_a_critique_of_exactly_200_characters_is_shown_whole() -> None:
    """200 characters: nothing cut, so no "..." and no instruction line; 201: cut, "..." and the instruction."""
    t = _critique_tree("x" * 200)
    assert trajectory_text(t, [t.nodes["c"]]) == "  a red cat   (t)\n    [critique 1] " + "x" * 200
    t = _critique_tree("x" * 201)
    assert trajectory_text(t, [t.nodes["c"]]) == ("  a red cat   (t)\n    [critique 1] " + "x" * 200 + "...\n"
                                                  "      -> Do it.")


def test_tree_kinds_are_listed_in_name_order() -> None:
    assert trees_summary([stage_bc_tree(), stage_a_tree()]).splitlines()[0] == \
        "  2 trees (1 A, 1 BC), 6 trajectories, 1 failed rewards"


def test_training_summary_counts_improved_before_worse() -> None:
    """Refined 1.0 and 0.75 from a 0.5 parent: two improved; the stop's copy (0.5) unchanged; none worse."""
    bc = stage_bc_tree()
    bc.nodes["r2"].reward = 0.75
    assert "  stop rate 0.333; refined images improved/worse/unchanged 2/0/1" in trees_summary([bc]).splitlines()


def test_chain_summary_lists_rounds_in_order() -> None:
    """A chain whose first image's eval reward failed counts only its round-2 move; the next chain's round 1
    still comes first."""
    a = chain(0, [None, 0.0, 1.0], None)  # type: ignore[list-item]
    b = chain(1, [0.0, 0.0], None)
    lines = chains_summary([a, b]).splitlines()
    assert lines[0] == "  2 R3 chains, 5 images scored by the eval reward (1 failed), stop rate 0.000"
    assert lines[1:3] == ["  round 1: refined images improved/worse/unchanged 0/0/1",
                          "  round 2: refined images improved/worse/unchanged 1/0/0"]


def test_inspect_shows_the_latest_step_by_default(tmp_path: Path) -> None:
    rd = tmp_path / "run"
    write_trees(trees(), rd / "trajectories" / "step_000000.jsonl")
    write_trees([stage_a_tree()], rd / "trajectories" / "step_000010.jsonl")
    text, _ = inspect_run(rd)
    assert f"\nstep 10: {rd / 'trajectories' / 'step_000010.jsonl'}\n" in text
    assert "  1 trees (1 A), 3 trajectories, 1 failed rewards" in text


# ---------------------------------------------------------------------------------------------------- metrics
def test_a_component_equal_to_an_earlier_component_is_left_out() -> None:
    a = stage_a_tree()
    a.nodes["g0"].rewards = {"a": 0.2, "b": 0.2}
    a.nodes["g1"].rewards = {"a": 0.4, "b": 0.4}
    m = reward_metrics([a])
    assert sorted(k for k in m if k.startswith("reward_component/generate/")) == ["reward_component/generate/a"]
    assert m["reward_component/generate/a"] == pytest.approx(0.3)


def test_reward_detail_per_round_is_each_rounds_mean() -> None:
    deeper = stage_bc_tree()
    for n in deeper.nodes.values():
        n.round += 1
        if n.stage == "refine":
            n.reward = 0.0
    m = reward_metrics([stage_bc_tree(), deeper])
    assert m["reward_detail/refine/round1"] == pytest.approx((1.0 + 0.5 + 0.25) / 3)
    assert m["reward_detail/refine/round2"] == 0.0
    assert m["1_reward/refine"] == pytest.approx(1.75 / 6)


def test_advantage_abs_max_is_the_largest_magnitude() -> None:
    a = stage_a_tree()
    a.nodes["g0"].advantage, a.nodes["g1"].advantage = -0.5, 0.25
    m = group_metrics([a])
    assert m["advantage/generate/abs_max"] == 0.5 and m["advantage/generate/mean"] == pytest.approx(-0.125)


def test_a_token_step_with_no_image_sampled_logs_zero_image_tokens() -> None:
    """Every critique stopped: no refine image was sampled; a token policy's run says 0 (only a flow policy's run
    leaves the name out)."""
    bc = stage_bc_tree()
    for n in bc.nodes.values():
        if n.stage == "refine":
            n.segment = None
    m = throughput_metrics([bc], rollout_s=0.0)
    assert m["rollout/image_tokens"] == 0.0 and m["rollout/images"] == 0.0 and m["rollout/text_tokens"] == 21.0


def test_throughput_names_per_second() -> None:
    m = throughput_metrics(trees(), rollout_s=2.0)
    assert sorted(k for k in m if k.startswith("throughput/")) == [
        "throughput/image_tokens_per_s", "throughput/text_tokens_per_s", "throughput/trajectories_per_s"]
    assert m["throughput/text_tokens_per_s"] == pytest.approx((3 * 5 + 3 * 7) / 2)


def test_greedy_tokens_add_no_entropy() -> None:
    """A greedy plan records the tempered log-probs of its argmax tokens (-2 here); it sampled nothing, so its 5
    tokens count with -log p = 0: (0 + 5 + 5) / 15."""
    a = stage_a_tree()
    a.nodes["p0"].segment.logprobs = [-2.0] * 5
    a.nodes["p0"].segment.sampling = SamplingParams(greedy=True)
    assert throughput_metrics([a], 0.0)["5_entropy/text"] == pytest.approx(10 / 15)


def test_eval_metrics_tag_mean_and_verdict_rates() -> None:
    overall = {"balanced_accuracy": 0.75, "stop_on_correct": 1.0, "edit_on_flawed": 0.5}
    report = {"accuracy": [0.25, 0.5], "accuracy_tag_mean": [0.125, 0.375], "per_tag": {}, "stop_rate": 0.5,
              "mean_rounds_used": 1.0, "transitions": [],
              "understanding": {"verdict": {"overall": overall, "per_round": {}, "per_tag": {}},
                                "reference": {"verdict": {"overall": {"balanced_accuracy": 0.5, "stop_on_correct": 0.25,
                                                                      "edit_on_flawed": 0.75}}}}}
    m = eval_metrics(report)
    assert (m["eval/accuracy_tag_mean/round0"], m["eval/accuracy_tag_mean/round1"]) == (0.125, 0.375)
    assert (m["eval/verdict/stop_on_correct"], m["eval/verdict/edit_on_flawed"]) == (1.0, 0.5)
    assert (m["eval/reference/stop_on_correct"], m["eval/reference/edit_on_flawed"]) == (0.25, 0.75)


def test_step_metrics_timings_keep_their_names() -> None:
    from r3_rl.learner.batch import BatchStats
    from r3_rl.tracking.metrics import step_metrics

    m = step_metrics(trees(), 1.0, {}, BatchStats(items=7), {}, rollout_s=1.5, learner_s=4.0, restarts=2)
    assert (m["time/rollout_s"], m["time/learner_s"], m["rollout/worker_restarts"]) == (1.5, 4.0, 2.0)


# ---------------------------------------------------------------------------------------------------- tensorboard
def test_an_rgba_image_keeps_its_colour() -> None:
    rgba = np.zeros((4, 4, 4), np.uint8)
    rgba[...] = (10, 20, 30, 255)
    assert as_rgb(rgba)[0, 0].tolist() == [10, 20, 30]
    assert (fit_cell(rgba) == (10, 20, 30)).all()


def test_markdown_escapes_the_prompt() -> None:
    t = Tree("t", PromptItem("p", "a <b> & c"))
    assert trajectory_markdown(t, []).splitlines()[0] == "**prompt:** a &lt;b&gt; &amp; c  "


def test_a_caption_is_drawn_as_two_lines_split_before_the_reward() -> None:
    grid = image_strip([np.zeros((4, 4, 3), np.uint8)], ["r1 refine R=1.00 (+0.50)"], header="h")
    y_cap = 2 * LINE + HEADER_H + CELL + LINE
    assert np.array_equal(grid[y_cap:y_cap + CAPTION_H, LINE:LINE + CELL],
                          _text_band(CELL, CAPTION_H, ["r1 refine", "R=1.00 (+0.50)"]))


def test_the_header_row_shows_the_prompt() -> None:
    grid = image_strip([np.zeros((4, 4, 3), np.uint8)] * 2, ["r0 generate", "r1 refine"], header="two cats")
    width = grid.shape[1]
    header = grid[LINE:LINE + HEADER_H, LINE:width - LINE]
    assert np.array_equal(header, _text_band(width - 2 * LINE, HEADER_H, ["two cats"]))
    assert not np.array_equal(header, _text_band(width - 2 * LINE, HEADER_H, ["r0 generate"]))


def test_histogram_values_leave_out_non_finite_rewards() -> None:
    a = stage_a_tree()
    a.nodes["g0"].reward = float("nan")
    assert stage_values([a], "reward")["generate"].tolist() == [1.0]


# ---------------------------------------------------------------------------------------------------- views
def test_longest_chains_come_first() -> None:
    c0, c1, c2 = chain(0, [0.0], None), chain(1, [0.0, 0.0, 1.0], None), chain(2, [0.0, 1.0], None)
    assert [t.id for t, _ in select_trajectories([c0, c1, c2], 3)] == ["eval-1", "eval-2", "eval-0"]


def test_chains_take_half_the_grids_when_other_trees_are_there() -> None:
    chains = [chain(i, [0.0, 1.0], None) for i in range(3)]
    chosen = select_trajectories(chains + [stage_a_tree(), stage_bc_tree()], 4)
    assert [t.meta["kind"] for t, _ in chosen] == ["chain", "chain", "A", "BC"]


def test_a_no_further_edit_copy_is_marked() -> None:
    bc = stage_bc_tree()
    assert image_caption(bc.nodes["r1"], bc.nodes["root"]) == "r1 refine R=0.50 (+0.00) copy"
    assert image_caption(bc.nodes["r0"], bc.nodes["root"]) == "r1 refine R=1.00 (+0.50)"


# ---------------------------------------------------------------------------------------------------- html
def test_html_escapes_the_edit_instruction() -> None:
    page = trees_html([chain(1, [0.0, 1.0], None)], "t")
    assert '<div class="cap">edit: fix &lt;1&gt;</div>' in page and "fix <1>" not in page


def test_html_escapes_the_title() -> None:
    page = trees_html([], "run <x> & y")
    assert "<h1>run &lt;x&gt; &amp; y</h1>" in page and "<x>" not in page


def test_html_says_more_only_when_paths_are_left_out() -> None:
    assert "more</div>" not in trees_html([stage_a_tree()], "t", max_paths=3)
    assert '<div class="meta">... 1 more</div>' in trees_html([stage_a_tree()], "t", max_paths=2)


def test_html_counts_the_trees() -> None:
    assert "<p class='meta'>2 trees</p>" in trees_html(trees(), "t")


# ---------------------------------------------------------------------------------------------------- console
def test_status_line_exact() -> None:
    m = {"1_reward/generate": 0.5, "2_accuracy/round0": 0.25, "6_refine/delta_mean": 0.125,
         "6_refine/stop_rate": 0.375, "3_understanding/verdict_balanced_accuracy": 0.75, "learner/loss": -0.01}
    assert status_line(m) == ("reward A 0.500  acc A 0.250  refine dR +0.125  verdict 0.75  stop 0.38  "
                              "loss -0.0100")


def test_status_line_shows_an_undefined_figure_as_a_dash() -> None:
    """No correct parent this step: the verdict balanced accuracy is NaN, shown as "-" (not "nan")."""
    line = status_line({"3_understanding/verdict_balanced_accuracy": math.nan, "learner/loss": math.inf})
    assert "verdict -  " in line and line.endswith("loss -") and "nan" not in line and "inf" not in line


# ---------------------------------------------------------------------------------------------------- logger
def test_a_rewind_logs_the_kept_eval_to_tensorboard_again(tmp_path: Path) -> None:
    """purge_step hides every older event at or past the step; the eval kept in metrics.jsonl is written again."""
    logger = MetricsLogger(tmp_path, tensorboard=True)
    logger.log({"1_reward/generate": 0.5}, 4)
    logger.log({"eval/accuracy/round0": 0.3}, 5)
    logger.log({"1_reward/generate": 0.6}, 5)  # replayed after the resume
    logger.rewind(5, keep_evals=True)
    logger.log({"1_reward/generate": 0.7}, 5)
    logger.close()
    acc = events(tmp_path / "tb")
    assert [(e.step, e.value) for e in acc.Scalars("eval/accuracy/round0")] == [(5, pytest.approx(0.3))]
    assert [(e.step, e.value) for e in acc.Scalars("1_reward/generate")] == [(4, 0.5), (5, pytest.approx(0.7))]


def test_the_eval_table_is_titled_with_the_evals_name(tmp_path: Path) -> None:
    report = {"prompts": 4, "rounds": 1, "accuracy": [0.25, 0.5], "per_tag": {"colors": [0.0, 1.0]},
              "tag_counts": {"colors": 4}, "stop_rate": 0.5, "mean_rounds_used": 1.0, "failed": [0, 0],
              "transitions": [{"round": 1, "improved": 1, "worse": 0, "unchanged": 3}]}
    logger = MetricsLogger(tmp_path, tensorboard=True)
    logger.log_eval(report, 3, name="after")
    logger.close()
    table = events(tmp_path / "tb").Tensors("eval/table/text_summary")[0].tensor_proto.string_val[0].decode()
    assert table.startswith("**after**\n\n|")


def _python_loader(tb_dir: Path) -> Any:
    """The run as TensorBoard's Python loader reads it (``tensorboard --load_fast=false``): unlike the legacy
    ``EventAccumulator`` it purges text and images too, and it takes a run's first SessionLog START as its start."""
    from tensorboard.backend.event_processing.plugin_event_accumulator import EventAccumulator as PluginAccumulator

    acc = PluginAccumulator(str(tb_dir), size_guidance={"tensors": 0})
    acc.Reload()
    return acc


def test_a_resumed_run_replaces_the_replayed_steps_in_tensorboards_python_loader(tmp_path: Path) -> None:
    """A run logs steps 0-5, a new process resumes from step 2 and logs 2-4 again.  The rewind's purge was the run's
    first SessionLog START, which that loader ignores: steps 2-5 were drawn twice, old values and new.  The run's
    first writer now marks the start, so the rewind's purge counts (TensorBoard's default Rust loader showed the
    new values either way; checked by hand with ``tensorboard --load_fast=true`` and ``false``)."""
    logger = MetricsLogger(tmp_path, tensorboard=True)
    for step in range(6):
        logger.log({"r": float(step)}, step)
    logger.close()
    resumed = MetricsLogger(tmp_path, tensorboard=True)  # events already there: no second start
    resumed.rewind(2, keep_evals=True)
    for step in range(2, 5):
        resumed.log({"r": 10.0 + step}, step)
    resumed.close()
    from tensorboard.util.tensor_util import make_ndarray

    got = [(e.step, float(make_ndarray(e.tensor_proto))) for e in _python_loader(tmp_path / "tb").Tensors("r")]
    assert got == [(0, 0.0), (1, 1.0), (2, 12.0), (3, 13.0), (4, 14.0)]


def test_a_resume_shows_the_kept_evals_table_and_grids_again(tmp_path: Path) -> None:
    """The purge at the resumed step hides the kept eval's table and grids along with its scalars; the rewind logged
    the scalars again, and until 2026-12-07 the table and the grids stayed hidden.  Now they come back from the
    eval's files; a damaged dump costs only the pictures, with an event saying so."""
    from types import SimpleNamespace

    from r3_rl.eval.evaluate import write_report
    from r3_rl.trainer import Trainer

    report = {"prompts": 4, "rounds": 1, "accuracy": [0.25, 0.5], "per_tag": {"colors": [0.0, 1.0]},
              "tag_counts": {"colors": 4}, "stop_rate": 0.5, "mean_rounds_used": 1.0, "failed": [0, 0],
              "transitions": [{"round": 1, "improved": 1, "worse": 0, "unchanged": 3}]}
    chains = trees()
    write_report(report, tmp_path / "eval", "step_000002", chains, dump=4)
    logger = MetricsLogger(tmp_path, tensorboard=True)
    logger.log_eval(report, 2, chains, "step_000002")
    logger.log({"1_reward/generate": 0.5}, 2)  # the step the resume replays
    logger.close()
    said: list[str] = []

    def resume_at_step_2() -> None:  # a new process: the rewind, then the trainer's re-log of the kept eval
        logger = MetricsLogger(tmp_path, tensorboard=True)
        logger.rewind(2, keep_evals=True)
        Trainer._relog_eval_summaries(SimpleNamespace(run_dir=tmp_path, metrics=logger, step=2,
                                                      log_event=said.append), "step_000002")
        logger.close()

    resume_at_step_2()
    acc = _python_loader(tmp_path / "tb")
    grids = [t for t in acc.Tags()["tensors"] if t.startswith("eval_trajectories/") and "/text" not in t]
    assert [e.step for e in acc.Tensors("eval/table/text_summary")] == [2] and said == []
    assert grids and all([e.step for e in acc.Tensors(t)] == [2] for t in grids)
    table = acc.Tensors("eval/table/text_summary")[0].tensor_proto.string_val[0].decode()
    assert table.startswith("**step_000002**\n\n|")
    assert [e.step for e in acc.Tensors("0_eval/accuracy_round0")] == [2]  # the rewind's own re-log, once

    (tmp_path / "eval" / "step_000002_trajectories.jsonl").write_text("{not json\n")
    resume_at_step_2()
    assert len(said) == 1 and said[0].startswith("resumed: the eval step_000002's table and grids are not shown "
                                                 "again in TensorBoard (")
