"""Exact small cases for r3_rl/tracking (metrics, logger, console, views, TensorBoard pictures, HTML), r3_rl/data,
r3_rl/prompt_sets, eval/ (evaluate, synergy, understanding) and r3_rl/inspect that the other tests left open
(round 15 audit).

Each test pins a number, label, row or refusal that a plausible one-point bug in those modules changes and no
earlier test noticed; expected values are worked out by hand from the documented behaviour, on the hand-built
trees of test_tracking_metrics / test_tracking_inspect.
"""
from __future__ import annotations

import math

import pytest

from test_tracking_metrics import stage_a_tree


# ---------------------------------------------------------------------------------------------------- metrics
def test_a_component_equal_to_an_earlier_component_is_left_out() -> None:
    """``x`` and ``y`` carry the same values on every node (and differ from the reward): one name, ``x``."""
    from r3_rl.tracking.metrics import reward_metrics

    a = stage_a_tree()
    a.nodes["g0"].rewards = {"x": 0.3, "y": 0.3}
    a.nodes["g1"].rewards = {"x": 0.7, "y": 0.7}
    m = reward_metrics([a])
    assert m["reward_component/generate/x"] == pytest.approx(0.5)
    assert "reward_component/generate/y" not in m


def test_advantage_abs_max_is_the_largest_magnitude() -> None:
    from r3_rl.tracking.metrics import group_metrics

    a = stage_a_tree()
    a.nodes["g0"].advantage, a.nodes["g1"].advantage = -0.5, 0.25
    m = group_metrics([a])
    assert m["advantage/generate/abs_max"] == 0.5
    assert m["advantage/generate/mean"] == pytest.approx(-0.125)


def test_a_text_only_rollout_logs_zero_image_tokens_and_no_images_per_second() -> None:
    """No image tokens and no SDE steps: ``image_tokens`` is logged as 0 (a token policy that drew nothing); the
    image count has no per-second rate."""
    from r3_rl.tracking.metrics import throughput_metrics

    a = stage_a_tree()
    for j in range(3):
        del a.nodes[f"g{j}"]
    m = throughput_metrics([a], rollout_s=5.0)
    assert m["rollout/image_tokens"] == 0.0 and m["rollout/images"] == 0.0
    assert m["throughput/text_tokens_per_s"] == pytest.approx(3.0)  # 15 plan tokens in 5 s
    assert m["throughput/image_tokens_per_s"] == 0.0
    assert not any(k.startswith("throughput/images") for k in m)


def _binary_report() -> dict:
    return {"accuracy": [0.25, 0.5], "score_mean": [0.25, 0.5], "per_tag": {"colors": [0.0, 1.0]},
            "stop_rate": 0.5, "mean_rounds_used": 1.0, "transitions": [], "failed": [0, 0], "understanding": {}}


def test_eval_metrics_leave_out_a_binary_rewards_mean_score() -> None:
    """A mean score equal to the accuracy every round is a duplicate: not logged; a fractional one is."""
    from r3_rl.tracking.metrics import eval_metrics

    assert not any(k.startswith("eval/score_mean") for k in eval_metrics(_binary_report()))
    m = eval_metrics({**_binary_report(), "score_mean": [0.4, 0.5]})
    assert (m["eval/score_mean/round0"], m["eval/score_mean/round1"]) == (0.4, 0.5)


def test_eval_metrics_name_reference_kinds_as_folders() -> None:
    from r3_rl.tracking.metrics import eval_metrics

    overall = {"stop_on_correct": 0.75, "edit_on_flawed": 0.5, "balanced_accuracy": 0.625}
    report = {**_binary_report(), "understanding": {"reference": {
        "verdict": {"overall": overall, "per_round": {"1": overall}, "per_tag": {}},
        "per_kind": {"flawed:add": {"stop_rate": 0.25}, "correct": {"stop_rate": 1.0}}}}}
    m = eval_metrics(report)
    assert m["eval/reference/stop_rate/flawed/add"] == 0.25 and m["eval/reference/stop_rate/correct"] == 1.0
    assert (m["eval/reference/stop_on_correct"], m["eval/reference/edit_on_flawed"]) == (0.75, 0.5)
    assert not any(k.startswith("eval/verdict/") for k in m)  # per-round verdicts are the chains' only



def test_step_metrics_log_each_batch_count_and_timing_under_its_own_name() -> None:
    from r3_rl.learner.batch import BatchStats
    from r3_rl.tracking.metrics import step_metrics

    m = step_metrics([stage_a_tree()], 1.0, {}, BatchStats(items=7, stale_refused=2), {}, 3.0, 4.0, 1)
    assert (m["batch/items"], m["batch/stale_refused"]) == (7.0, 2.0)
    assert (m["time/rollout_s"], m["time/learner_s"], m["rollout/worker_restarts"]) == (3.0, 4.0, 1.0)
    assert m["throughput/trajectories_per_s"] == 1.0  # 3 sampled paths in 3 s

# ---------------------------------------------------------------------------------------------------- logger
def test_reopening_drops_only_the_cut_off_last_line(tmp_path) -> None:
    import json

    from r3_rl.tracking.logger import MetricsLogger

    (tmp_path / "metrics.jsonl").write_text('{"step": 0, "a": 1.0}\n{"step": 1, "a": 2')
    log = MetricsLogger(tmp_path, tensorboard=False)
    log.log({"a": 3.0}, 1)
    log.close()
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert rows == [{"step": 0, "a": 1.0}, {"step": 1, "a": 3.0}]


# ---------------------------------------------------------------------------------------------------- synergy
def test_a_gain_of_exactly_the_goal_meets_it() -> None:
    """Accuracy 0.2 -> 0.3 is a gain of exactly 10 points, and 0.3 -> 0.35 a refinement of exactly 5: both goals
    met.  In floating point 0.3 - 0.2 is 0.09999999999999998, which read "+10.00 points (goal >= +10: NOT met)"."""
    from r3_rl.eval.synergy import goals_brief, goals_met, synergy_figures, synergy_lines

    fig = synergy_figures({"accuracy": [0.2, 0.2], "stop_rate": 0.5}, {"accuracy": [0.3, 0.35], "stop_rate": 0.5})
    assert fig["first_image_gain"] == 0.1 and fig["refinement_after"] == 0.05
    assert goals_met(fig) == {"first_image_gain": True, "refinement_after": True, "verdict_gain": False}
    lines = synergy_lines(fig)
    assert "(+10.0 points) (goal >= +10: met)" in lines[0]
    assert "(+5.0 points; before RL +0.0 points) (goal >= +5: met)" in lines[1]
    assert goals_brief(fig) == "first image +10.0, refinement +5.0, verdict +nan (< +10)"


def test_accuracy_variance_skips_an_unscored_tag_but_not_a_single_prompt_one() -> None:
    """A tag with no scored image adds nothing; one scored prompt gives no variance estimate (n - 1 = 0): NaN."""
    from r3_rl.eval.synergy import accuracy_variance

    nan = float("nan")
    rep = {"accuracy": [0.5], "per_tag": {"a": [nan], "b": [0.5]}, "scored": {"a": [0], "b": [4]}}
    assert accuracy_variance(rep, 0) == pytest.approx(0.25 / 3)  # (4/4)^2 * 0.5 * 0.5 / (4 - 1)
    rep = {"accuracy": [0.4], "per_tag": {"a": [0.0], "b": [0.5]}, "scored": {"a": [1], "b": [4]}}
    assert math.isnan(accuracy_variance(rep, 0))


# ---------------------------------------------------------------------------------------------------- TensorBoard
def test_shrinking_averages_thin_stripes_instead_of_picking_one() -> None:
    """1-px black/white columns shrunk 4 -> 2 px are grey (an area average), not all black or all white."""
    import numpy as np

    from r3_rl.tracking.tensorboard import fit_cell

    stripes = np.zeros((4, 4, 3), dtype=np.uint8)
    stripes[:, 1::2] = 255
    out = fit_cell(stripes, side=2)
    assert out.shape == (2, 2, 3) and set(np.unique(out).tolist()) <= {127, 128}


# ---------------------------------------------------------------------------------------------------- data
def test_a_builtin_set_of_the_other_format_is_named_as_such() -> None:
    from r3_rl.data import load_prompts
    from r3_rl.errors import UserError

    with pytest.raises(UserError) as e:
        load_prompts("tiif", "geneval:test553")
    assert str(e.value) == "'geneval:test553' is a geneval-format prompt set; set data.source: geneval"



# ---------------------------------------------------------------------------------------------------- understanding
def test_reference_verdicts_are_round_one_critiques() -> None:
    """A reference image is critiqued as a first image is in a chain: its verdicts are round 1's, tagged by prompt."""
    from r3_rl.eval.understanding import reference_report
    from r3_rl.trajectory import PromptItem, ReferenceImage, SamplingParams
    from test_exact_eval_understanding import CAT, ScriptedPolicy, img, pixel_reward

    refs = [ReferenceImage(PromptItem(f"r{v}", "a photo of a cat", CAT), img(v), None, "correct") for v in (10, 20)]
    rep = reference_report(ScriptedPolicy(stop={10: True, 20: True}), refs, SamplingParams(greedy=True),
                           "no further edit needed", pixel_reward({10: 1.0, 20: 0.0}), 1.0, yes_no=False)
    assert list(rep["verdict"]["per_round"]) == ["1"] and list(rep["verdict"]["per_tag"]) == ["single_object"]
    assert rep["verdict"]["per_round"]["1"]["balanced_accuracy"] == 0.5 and "yes_no" not in rep


def test_a_reference_lines_kind_is_not_metadata(tmp_path) -> None:
    import json

    import numpy as np
    from PIL import Image

    from r3_rl.eval.understanding import load_references

    Image.fromarray(np.full((2, 2, 3), 9, np.uint8)).save(tmp_path / "a.png")
    (tmp_path / "refs.jsonl").write_text(json.dumps({"prompt": "a cat", "image": "a.png", "kind": "flawed:add",
                                                     "tag": "single_object"}) + "\n")
    (ref,) = load_references(str(tmp_path / "refs.jsonl"))
    assert (ref.prompt.id, ref.prompt.prompt, ref.prompt.metadata, ref.kind) == (
        "ref-1", "a cat", {"tag": "single_object"}, "flawed:add")
    assert ref.image.tolist() == [[[9, 9, 9]] * 2] * 2
