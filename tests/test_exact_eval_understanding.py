"""Exact, hand-derived checks of the eval's understanding figures, its report maths and failure budget, the
geneval/CLIP reward glue, the background writer and the text-length metrics (round 9B mutation audit).

Every expected value below is worked out by hand in the comment beside it; no expectation is computed by the code
under test."""
from __future__ import annotations

import math
import threading
import time

import numpy as np
import pytest
import torch
from PIL import Image
from test_tracking_inspect import chain

from r3_rl.eval.evaluate import (
    chain_images,
    changes,
    check_failures,
    markdown_table,
    reports_scores,
    summarise,
    tag_mean,
)
from r3_rl.eval.understanding import (
    JudgedImage,
    ask_yes_no,
    balanced_accuracy_on_mix,
    chain_verdicts,
    headline,
    reference_report,
    verdict_report,
    within_tags,
    yes_no_summary,
)
from r3_rl.policy.base import ImageInput, Policy, TextSample
from r3_rl.rewards.registry import FunctionReward
from r3_rl.rewards.reward_set import RewardFailureError, RewardSet, WeightedReward
from r3_rl.trajectory import PromptItem, ReferenceImage, SamplingParams

NAN = float("nan")
CAT = {"tag": "single_object", "include": [{"class": "cat", "count": 1}]}  # one question: "Is there a cat ...?"


def pixel_reward(table: dict[int, float | None]) -> RewardSet:
    """A reward whose score is ``table[image[0, 0, 0]]`` (None: the reward fails on that image)."""
    def fn(samples, **_):
        return [table[int(s.image[0, 0, 0])] for s in samples]
    return RewardSet([WeightedReward(FunctionReward(fn, "px"), 1.0)])


def img(v: int) -> np.ndarray:
    return np.full((32, 32, 3), v, np.uint8)


class ScriptedPolicy(Policy):
    """Answers P(yes) = ``yes[pixel]``; critiques stop exactly where ``stop[pixel]``.  Records its batch sizes."""

    def __init__(self, yes: dict[int, float] | None = None, stop: dict[int, bool] | None = None) -> None:
        self.yes, self.stop, self.batches = yes or {}, stop or {}, []

    def answer_yes_no(self, images, questions):
        self.batches.append(len(images))
        return [self.yes.get(int(im.image[0, 0, 0]), 0.9) for im in images]

    def reflect(self, prompts, images, sampling, generator=None):
        self.batches.append(len(images))
        return [TextSample("<think> x </think> " + ("no further edit needed" if self.stop[int(im.image[0, 0, 0])]
                                                     else "make it red"), None) for im in images]

    def reason(self, *a, **k): raise NotImplementedError  # noqa: E704
    def generate(self, *a, **k): raise NotImplementedError  # noqa: E704
    def refine(self, *a, **k): raise NotImplementedError  # noqa: E704
    def segment_logprobs(self, *a, **k): raise NotImplementedError  # noqa: E704
    model = None  # type: ignore[assignment]


def judged(v: int, correct: bool | None, meta: dict | None = None, tag: str = "t") -> JudgedImage:
    return JudgedImage(PromptItem(f"p{v}", "a photo of a cat", {**(meta or CAT), "tag": tag}), ImageInput(img(v)), correct)


# ---------------------------------------------------------------------------------------------- yes/no
def test_yes_no_question_whose_clause_reward_failed_is_left_out() -> None:
    """Catches a failed clause reward counted as a "no" truth instead of being left out of every denominator."""
    # pixel 10: clause holds (truth yes); 20: clause fails (truth no); 30: the reward failed (no truth at all)
    rewards = pixel_reward({10: 1.0, 20: 0.0, 30: None})
    rep = ask_yes_no(ScriptedPolicy(), [judged(10, True), judged(20, False), judged(30, None)], rewards, 1.0)
    # the policy says yes (0.9) to all: right on 10, wrong on 20; 30 is not a question at all
    assert rep["available"] and rep["questions"] == 2 and rep["yes_truths"] == 1
    assert rep["accuracy"] == 0.5 and rep["accuracy_on_yes"] == 1.0 and rep["accuracy_on_no"] == 0.0


def test_yes_no_batches_cover_every_question() -> None:
    """Catches a batch slice that drops a question at each batch boundary (5 questions in batches of 2)."""
    policy = ScriptedPolicy()
    rewards = pixel_reward({v: 1.0 for v in (1, 2, 3, 4, 5)})
    rep = ask_yes_no(policy, [judged(v, True) for v in (1, 2, 3, 4, 5)], rewards, 1.0, batch_size=2)
    assert policy.batches == [2, 2, 1]  # ceil(5 / 2) calls, never more than 2 rows
    assert rep["questions"] == 5 and rep["accuracy"] == 1.0


def test_yes_no_tiif_questions_count_only_on_correct_images_and_max_questions() -> None:
    """Catches TIIF questions counted on flawed or unscored images, and a max_questions cap that is off by one."""
    tiif = {"yn_question_list": ["Is it red?", "Is it round?", "Is it big?"], "yn_answer_list": ["Yes", "No", "yes"]}
    policy = ScriptedPolicy(yes={1: 0.9, 2: 0.9, 3: 0.9})
    rewards = pixel_reward({})  # never asked: TIIF questions carry no clause
    images = [judged(1, True, tiif), judged(2, False, tiif), judged(3, None, tiif)]
    rep = ask_yes_no(policy, images, rewards, 1.0)
    # only image 1 (correct): 3 questions, truths yes/no/yes; "yes" to all -> 2 of 3 right
    assert rep["questions"] == 3 and rep["yes_truths"] == 2 and rep["accuracy"] == pytest.approx(2 / 3)
    assert rep["accuracy_on_no"] == 0.0 and rep["balanced_accuracy"] == pytest.approx(0.5)
    rep = ask_yes_no(policy, images, rewards, 1.0, max_questions=2)
    assert rep["questions"] == 2 and rep["accuracy"] == 0.5  # "Is it red?" yes (right), "Is it round?" no (wrong)


def test_yes_no_summary_empty_kind_and_tie() -> None:
    """Catches a missing truth kind scored 0 instead of NaN, and P(yes) = 0.5 read as a yes."""
    s = yes_no_summary([(0.9, True, "a"), (0.5, True, "b")])  # 0.5 is not a yes: wrong on a yes-truth
    assert s["questions"] == 2 and s["yes_truths"] == 2 and s["accuracy"] == 0.5
    assert s["accuracy_on_yes"] == 0.5 and math.isnan(s["accuracy_on_no"]) and math.isnan(s["balanced_accuracy"])
    assert s["per_tag"] == {"a": 1.0, "b": 0.0}


# ---------------------------------------------------------------------------------------------- verdicts
def test_verdicts_per_round_with_no_flawed_image_and_per_tag() -> None:
    """Catches a round without a flawed image scored as a number (0 or its accuracy) instead of NaN."""
    v = [(True, True, 1, "a"), (True, False, 1, "a"), (True, True, 1, "b"),  # round 1: only correct images
         (False, False, 2, "a"), (False, True, 2, "b"), (True, True, 2, "b")]
    rep = verdict_report(v)
    r1, r2 = rep["per_round"]["1"], rep["per_round"]["2"]
    assert (r1["correct_images"], r1["flawed_images"]) == (3, 0)
    assert r1["stop_on_correct"] == pytest.approx(2 / 3) and math.isnan(r1["edit_on_flawed"])
    assert math.isnan(r1["balanced_accuracy"]) and r1["accuracy"] == pytest.approx(2 / 3)
    assert r1["stop_rate"] == pytest.approx(2 / 3)
    # round 2: correct 1 (stopped), flawed 2 (one edit) -> (1 + 1/2) / 2
    assert r2["balanced_accuracy"] == pytest.approx(0.75) and r2["stop_rate"] == pytest.approx(2 / 3)
    assert list(rep["per_round"]) == ["1", "2"] and list(rep["per_tag"]) == ["a", "b"]
    a, b = rep["per_tag"]["a"], rep["per_tag"]["b"]
    # tag a: correct 2 (1 stop), flawed 1 (edited) -> 0.75; tag b: correct 2 (2 stops), flawed 1 (stopped) -> 0.5
    assert a["balanced_accuracy"] == pytest.approx(0.75) and b["balanced_accuracy"] == pytest.approx(0.5)
    assert rep["overall"]["within_tag_balanced_accuracy"] == pytest.approx((0.75 + 0.5) / 2)
    # overall: correct 4 (3 stops), flawed 2 (1 edit) -> (3/4 + 1/2) / 2; accuracy 4/6; stops 3 + 1 of 6
    o = rep["overall"]
    assert o["balanced_accuracy"] == pytest.approx(0.625) and o["accuracy"] == pytest.approx(4 / 6)
    assert o["stop_rate"] == pytest.approx(4 / 6)
    empty = verdict_report([])
    assert empty["per_round"] == {} and empty["per_tag"] == {} and math.isnan(empty["overall"]["accuracy"])
    assert math.isnan(empty["overall"]["within_tag_balanced_accuracy"])


def test_within_tags_and_mix_figures() -> None:
    """Catches the within-tag mean over the wrong tags or denominators and the mix figure's NaN rules."""
    per_tag = {"a": {"correct_images": 2, "flawed_images": 2, "balanced_accuracy": 1.0},
               "b": {"correct_images": 3, "flawed_images": 0, "balanced_accuracy": NAN},
               "c": {"correct_images": 1, "flawed_images": 1, "balanced_accuracy": 0.5}}
    assert within_tags({"overall": {}, "per_tag": per_tag}) == pytest.approx(0.75)  # (1 + 0.5) / 2, b left out
    assert within_tags({"overall": {"within_tag_balanced_accuracy": 0.25}, "per_tag": per_tag}) == 0.25
    assert math.isnan(within_tags({"overall": {}}))
    rates = {"a": {"stop_on_correct": 1.0, "edit_on_flawed": 0.5}, "b": {"stop_on_correct": 0.0, "edit_on_flawed": NAN}}
    counts = {"a": {"correct_images": 1, "flawed_images": 2}, "b": {"correct_images": 3, "flawed_images": 0}}
    # correct: (1 * 1.0 + 3 * 0.0) / 4 = 0.25; flawed: 2 * 0.5 / 2 = 0.5 -> 0.375 (b's NaN edit rate is never needed)
    assert balanced_accuracy_on_mix(rates, counts) == pytest.approx(0.375)
    assert math.isnan(balanced_accuracy_on_mix(rates, {"b": {"correct_images": 3, "flawed_images": 0}}))
    assert math.isnan(balanced_accuracy_on_mix(rates, {"b": {"correct_images": 0, "flawed_images": 1}}))


def test_chain_verdicts_threshold_is_inclusive_and_failed_images_left_out() -> None:
    """Catches a strict threshold on the critiqued image's score and critiques of failed images kept."""
    t = chain(0, [0.5, 0.7, 0.0], None)  # crit1 critiques img0 (0.5), crit2 critiques img1 (0.7)
    assert sorted(chain_verdicts([t], 0.5)) == [(True, False, 1, "counting"), (True, False, 2, "counting")]
    assert sorted(chain_verdicts([t], 0.7)) == [(False, False, 1, "counting"), (True, False, 2, "counting")]
    t.nodes["img1"].meta["eval_score"] = None
    assert chain_verdicts([t], 0.7) == [(False, False, 1, "counting")]


# ---------------------------------------------------------------------------------------------- reference set
def test_reference_report_excludes_failed_images_exactly() -> None:
    """Catches a failed reference image counted as flawed or as a verdict, a wrong failed count, a strict
    threshold, and per-kind judged_correct counting stops."""
    rewards = pixel_reward({10: 1.0, 20: 0.0, 30: None, 40: 1.0})
    policy = ScriptedPolicy(stop={10: True, 20: True, 30: True, 40: False}, yes={10: 0.9, 20: 0.9, 30: 0.9, 40: 0.1})
    refs = [ReferenceImage(PromptItem(f"r{v}", "a photo of a cat", CAT), img(v), None, kind)
            for v, kind in ((10, "correct"), (20, "flawed:add"), (30, "correct"), (40, "correct"))]
    rep = reference_report(policy, refs, SamplingParams(greedy=True), "no further edit needed", rewards, 1.0,
                           batch_size=3)
    assert rep["images"] == 4 and rep["failed"] == 1
    assert rep["per_image"] == {"judged_correct": [True, False, None, True], "stop": [True, True, None, False]}
    o = rep["verdict"]["overall"]
    # correct: 10 (stop), 40 (edit) -> 1/2; flawed: 20 (stop) -> 0/1
    assert (o["correct_images"], o["flawed_images"]) == (2, 1)
    assert o["stop_on_correct"] == 0.5 and o["edit_on_flawed"] == 0.0 and o["balanced_accuracy"] == 0.25
    assert rep["per_kind"] == {"correct": {"images": 2, "judged_correct": 1.0, "stop_rate": 0.5},
                               "flawed:add": {"images": 1, "judged_correct": 0.0, "stop_rate": 1.0}}
    # yes/no: truths 10 yes, 20 no, 40 yes (30 failed); answers yes, yes, no -> 1 of 3 right
    yn = rep["yes_no"]
    assert yn["questions"] == 2 + 1 and yn["accuracy"] == pytest.approx(1 / 3) and yn["yes_truths"] == 2
    assert policy.batches[:2] == [3, 1]  # reflect in batches of 3


def test_headline_reads_balanced_accuracy_of_reference_set() -> None:
    """Catches the headline taking the reference set's plain accuracy instead of its balanced accuracy."""
    ref_verdict = verdict_report([(True, True, 1, "t")] * 9 + [(False, True, 1, "t")])  # always stops
    report = {"understanding": {"verdict": ref_verdict, "yes_no": {"available": False},
                                "reference": {"verdict": ref_verdict, "yes_no": {"available": True, "accuracy": 0.75}}}}
    h = headline(report)
    assert h["reference_balanced_accuracy"] == 0.5 and h["verdict_balanced_accuracy"] == 0.5
    assert h["reference_yes_no_accuracy"] == 0.75 and math.isnan(h["yes_no_accuracy"])


# ---------------------------------------------------------------------------------------------- report maths
def test_summarise_leaves_failed_rewards_out_of_every_denominator() -> None:
    """Catches a failed eval reward counted as a wrong image, as a failure when merely wrong, or scored as 0."""
    trees = [chain(i, [0.0, 0.0, 0.0], None) for i in range(4)]  # even i: counting, odd: colors
    correct = [[None, True, False],  # counting: failed in round 0
               [False, None, True],  # colors
               [False, False, None],  # counting
               [True, True, True]]  # colors
    scores = [[None, 1.0, 0.0], [0.25, None, 1.0], [0.5, 0.0, None], [1.0, 1.0, 1.0]]
    rep = summarise(trees, correct, 2, scores)
    assert rep["failed"] == [1, 1, 1]
    assert rep["accuracy"] == pytest.approx([1 / 3, 2 / 3, 2 / 3])
    assert rep["per_tag"] == {"colors": pytest.approx([0.5, 1.0, 1.0]), "counting": pytest.approx([0.0, 0.5, 0.0])}
    assert rep["scored"] == {"colors": [2, 1, 2], "counting": [1, 2, 1]}
    assert rep["score_mean"] == pytest.approx([(0.25 + 0.5 + 1.0) / 3, 2 / 3, 2 / 3])
    assert rep["accuracy_tag_mean"] == pytest.approx([0.25, 0.75, 0.5])
    # pairs scored in both rounds: round 0->1: trees 2 (F,F), 3 (T,T) -> 0/0/2; round 1->2: 0 (T,F), 2... failed,
    # 3 (T,T) -> worse 1, unchanged 1; round 0->2: 1 (F,T) improved, 3 (T,T) -> 1/0 of 2
    assert rep["transitions"] == [{"round": 1, "improved": 0, "worse": 0, "unchanged": 2},
                                  {"round": 2, "improved": 0, "worse": 1, "unchanged": 1}]
    assert rep["refinement"] == {"improved": 1, "worse": 0, "pairs": 2}


def test_summarise_tag_with_every_reward_failed_is_nan_not_zero() -> None:
    """Catches an all-failed tag/round scored 0 accuracy (or left out of the mean of tags)."""
    trees = [chain(i, [0.0], None) for i in range(2)]  # 0: counting, 1: colors
    rep = summarise(trees, [[None], [True]], 0, [[None], [1.0]])
    assert math.isnan(rep["per_tag"]["counting"][0]) and rep["per_tag"]["colors"] == [1.0]
    assert rep["accuracy"] == [1.0] and math.isnan(rep["accuracy_tag_mean"][0])
    assert math.isnan(rep["score_mean_per_tag"]["counting"][0])
    assert changes([[True, None], [None, False], [False, True]], 0, 1) == (1, 0, 1)
    assert tag_mean({"a": [1.0, NAN], "b": [0.0, 1.0]}, 1)[0] == 0.5 and math.isnan(tag_mean({"a": [1.0, NAN],
                                                                                            "b": [0.0, 1.0]}, 1)[1])


def test_summarise_with_no_prompts() -> None:
    """Catches an empty eval's stop rate and rounds used turning into NaN or a crash."""
    rep = summarise([], [], 1)
    assert rep["stop_rate"] == 0.0 and rep["mean_rounds_used"] == 0.0 and rep["failed"] == [0, 0]
    check_failures(rep, 0.0, "empty")  # no images: no budget to exceed, no division by zero


def test_failure_budget_is_a_strict_bound_over_every_round() -> None:
    """Catches the budget counting rounds + 0 images, or stopping at exactly the allowed fraction."""
    rep = {"prompts": 4, "rounds": 1, "failed": [0, 1], "failure_reasons": {}}  # 1 of 8 images
    check_failures(rep, 0.125, "x")  # exactly at the budget: allowed
    check_failures({"prompts": 4, "rounds": 1, "failed": [0, 0]}, 0.0, "x")  # none failed, zero budget: fine
    with pytest.raises(RewardFailureError, match=r"failed on 1/8 images \(12% > rewards.max_failure_fraction=0.12\);"
                                                 r" most often: unknown"):
        check_failures(rep, 0.12, "x")
    rep3 = {"prompts": 2, "rounds": 2, "failed": [1, 0, 0], "failure_reasons": {}}  # 1 of 6 images
    check_failures(rep3, 1 / 6 + 1e-9, "x")
    with pytest.raises(RewardFailureError, match=r"1/6 images"):
        check_failures(rep3, 0.16, "x")


def test_mean_score_row_only_where_it_differs_from_a_measured_accuracy() -> None:
    """Catches a NaN round (every reward failed) making a binary reward's score row look different."""
    assert not reports_scores({"accuracy": [NAN, 1.0], "score_mean": [NAN, 1.0]})
    assert reports_scores({"accuracy": [NAN, 1.0], "score_mean": [NAN, 0.5]})


def test_chain_images_threshold_inclusive_and_unscored_left_out() -> None:
    """Catches a strict threshold in the verdict handed to the yes/no questions."""
    t = chain(0, [1.0, 0.5], None)
    t.nodes["img1"].meta["eval_score"] = None
    t2 = chain(1, [0.999], None)
    del t2.nodes["img0"].meta["eval_score"]  # never scored: not asked about
    got = [(j.prompt.id, j.correct) for j in chain_images([t, t2], 1.0)]
    assert got == [("e0", True), ("e0", None)]


def test_markdown_names_failures_per_round() -> None:
    """Catches the failure line of the table dropping a round."""
    trees = [chain(i, [0.0, 0.0], None) for i in range(2)]
    md = markdown_table(summarise(trees, [[None, True], [True, None]], 1))
    assert "eval reward failures per round, left out of every figure: 1 / 1" in md
    assert "| **overall** | 2 | **1.000** | **1.000** |" in md


# ---------------------------------------------------------------------------------------------- runner
def test_evaluator_size_budget_and_write_before_raise(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    """Catches eval.size losing to data.eval_size, the budget not being the recipe's, or the check running first."""
    from types import SimpleNamespace

    from r3_rl.eval import runner

    calls: list[str] = []
    monkeypatch.setattr(runner, "stage_sampling", lambda recipe, eval_mode: SimpleNamespace(reflect=None))
    monkeypatch.setattr(runner, "build_references", lambda recipe, eval_prompts: calls.append("refs") or [])
    report = {"prompts": 4, "rounds": 1, "failed": [0, 1], "failure_reasons": {"px: boom": 1}}  # 1 of 8 images
    monkeypatch.setattr(runner, "evaluate", lambda *a, **k: (dict(report), []))
    monkeypatch.setattr(runner, "write_report", lambda rep, out, name, trees, dump: calls.append(f"write {name}"))
    sizes: list[int] = []
    data = SimpleNamespace(eval_prompts=lambda n: sizes.append(n) or [], eval_pool_size=lambda: 10)
    metrics = SimpleNamespace(log_eval=lambda rep, step, trees, name: calls.append(f"log {step}"))

    def recipe(size, budget):
        return SimpleNamespace(
            eval=SimpleNamespace(size=size, rounds=1, batch_size=2, dump=0,
                                 understanding=SimpleNamespace(yes_no=False, max_questions=None)),
            data=SimpleNamespace(eval_size=7), templates=SimpleNamespace(stop_phrase="stop"), seed=0,
            rewards=SimpleNamespace(correct_threshold=1.0, max_failure_fraction=budget))

    ev = runner.Evaluator(recipe(3, 0.2), None, None, data, metrics, tmp_path)
    assert ev.run("before", 0)["prompt_pool"] == 10 and sizes == [3]
    ev.run("step_1", 1)
    assert calls == ["refs", "write before", "log 0", "write step_1", "log 1"]  # references built once
    ev = runner.Evaluator(recipe(None, 0.1), None, None, data, metrics, tmp_path)
    calls.clear()
    with pytest.raises(RewardFailureError, match=r"eval after: the eval reward failed on 1/8 images"):
        ev.run("after", 2)
    assert sizes[-1] == 7 and calls == ["refs", "write after", "log 2"]  # written and logged first: it says why


# ---------------------------------------------------------------------------------------------- geneval glue
def _geneval_reward(objects, **kw):
    from test_rewards_models import scripted_reward
    return scripted_reward(objects, **kw)


def test_geneval_binary_strict_and_partial_on_an_extra_object() -> None:
    """Catches binary/partial scores swapped and strict_correct reported as GenEval's correct."""
    from test_rewards_models import sample

    from r3_rl.rewards.detectors import DetectedObject

    two_cats = [DetectedObject("cat", (0, 0, 10, 10), 0.95), DetectedObject("cat", (20, 20, 30, 30), 0.9)]
    meta = {"tag": "single_object", "include": [{"class": "cat", "count": 1}]}
    # GenEval: at least one cat -> correct; the server: exactly one -> not strict, score 1 - |1 - 2| / 1 = 0
    for binary, score in ((False, 0.0), (True, 1.0)):
        out = _geneval_reward([list(two_cats)], binary=binary)([sample(img(255), **meta)])[0]
        assert out.score == score
        assert out.components == {"correct": 1.0, "strict_correct": 0.0, "partial": 0.0}


def test_geneval_batch_asks_the_detector_at_the_lowest_threshold_and_keeps_per_tag() -> None:
    """Catches a mixed batch (counting + other tags) queried at the highest threshold, dropping objects."""
    from test_rewards_models import sample

    from r3_rl.rewards.detectors import DetectedObject

    cat = [DetectedObject("cat", (0, 0, 10, 10), 0.5)]  # passes 0.3 (single_object), not 0.9 (counting)
    r = _geneval_reward([list(cat), list(cat)], batch_size=2)
    one = {"include": [{"class": "cat", "count": 1}]}
    out = r([sample(img(255), tag="counting", **one), sample(img(255), tag="single_object", **one)])
    assert r.backend.calls == [(2, [["cat"], ["cat"]], 0.3)]
    assert [o.components["correct"] for o in out] == [0.0, 1.0]
    assert _geneval_reward([], batch_size=0).batch_size == 1  # 0 would make range() step 0


def test_colour_weights_average_each_colours_templates_and_degenerate_crop() -> None:
    """Catches the template embeddings grouped by template instead of by colour, and a 0-pixel crop of a flat box."""
    from test_rewards_models import StubEncoder

    from r3_rl.rewards.detectors import DetectedObject
    from r3_rl.rewards.geneval import ColorClassifier

    clf = ColorClassifier(StubEncoder())  # type: ignore[arg-type]
    # every template of colour c embeds to one-hot(c): their mean, renormalised, is one-hot(c) again
    assert torch.equal(clf.weights("car"), torch.eye(10))
    crop = clf.crop(Image.new("RGB", (20, 20), (250, 250, 250)), DetectedObject("car", (5, 5, 5, 5), 0.9))
    assert crop.size == (1, 1)


# ---------------------------------------------------------------------------------------------- CLIP
WORDS = {"red": 0, "blue": 1, "mix": 2}  # the stub tokenizer's vocabulary


class _Proc:
    class image_processor:
        def __new__(cls, images, return_tensors):
            return {"pixel_values": torch.tensor(np.array([np.asarray(im, float).reshape(-1, 3).mean(0) for im in images]))}

    class tokenizer:
        def __new__(cls, batch, padding, truncation, return_tensors):
            ids = torch.tensor([[WORDS[t]] for t in batch])
            return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


class _Clip(torch.nn.Module):
    TEXT = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0], [6.0, 8.0, 0.0]])

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[int] = []

    def get_image_features(self, pixel_values):
        self.calls.append(len(pixel_values))
        return pixel_values

    def get_text_features(self, input_ids, attention_mask):
        self.calls.append(len(input_ids))
        return self.TEXT[input_ids[:, 0]]


def test_clip_reward_is_scale_times_cosine_in_batches() -> None:
    """Catches the scale dropped or applied to the cosine, embeddings normalised across the batch, and batches
    that drop rows."""
    from r3_rl.rewards.base import RewardSample
    from r3_rl.rewards.clip import ClipReward

    r = ClipReward(device="cpu", batch_size=2, scale=2.5)
    r.encoder.model, r.encoder.processor = _Clip(), _Proc()
    px = [(3, 4, 0), (0, 0, 5), None, (0, 5, 0)]
    words = ["red", "blue", "red", "mix"]
    samples = [RewardSample(prompt=w, metadata={}, stage="generate", round=0,
                            image=None if p is None else np.full((2, 2, 3), p, np.uint8)) for p, w in zip(px, words)]
    out = r(samples)
    # cos: (0.6, 0.8, 0)·(1, 0, 0) = 0.6; (0, 0, 1)·(0, 0, 1) = 1; (0, 1, 0)·(0.6, 0.8, 0) = 0.8
    assert out[2].failed and out[2].failure == "no image to score"
    for o, cos in zip([out[0], out[1], out[3]], (0.6, 1.0, 0.8)):
        assert o.components["cosine"] == pytest.approx(cos, abs=1e-6) and o.score == pytest.approx(2.5 * cos, abs=1e-6)
    assert r.encoder.model.calls == [2, 1, 2, 1]  # images 2 + 1, texts 2 + 1
    r.teardown()
    assert r.encoder.model is None  # unload lets the shared copy go


# ---------------------------------------------------------------------------------------------- background writer
def test_background_writer_bounds_the_queue_and_flushes() -> None:
    """Catches submit not waiting for the write under way, wait() not blocking, and an error raised twice or lost."""
    from r3_rl.tracking.background import BackgroundWriteError, BackgroundWriter

    done: list[str] = []
    threads: set[threading.Thread] = set()

    def slow(name: str) -> None:
        threads.add(threading.current_thread())
        time.sleep(0.3)
        done.append(name)

    w = BackgroundWriter()
    w.submit("a", slow, "a")
    w.submit("b", slow, "b")  # returns only once "a" is written: at most one write in flight
    assert done == ["a"]
    w.wait()
    assert done == ["a", "b"]

    def boom() -> None:
        raise OSError("disk full")

    w.submit("step_1.jsonl", boom)
    with pytest.raises(BackgroundWriteError, match=r"^writing step_1.jsonl failed: OSError: disk full$"):
        w.submit("step_2.jsonl", slow, "c")  # the next submit raises the failed write's error
    assert done == ["a", "b"]  # and does not start its own
    w.wait()  # raised once, not again
    w.submit("x", boom)
    seen: list[str] = []
    w.close(raise_errors=False, on_error=seen.append)
    assert seen == ["writing x failed: OSError: disk full"]
    w.close()  # twice: fine, nothing pending
    w.submit("again", slow, "d")  # a closed writer starts a fresh thread on the next write
    w.close()
    assert done[-1] == "d"
    assert threads and all(t.name.startswith("r3rl-writer") and not t.is_alive() for t in threads)  # joined by close


def test_background_writer_close_raises_by_default() -> None:
    """Catches close() swallowing a failed write when raise_errors is True."""
    from r3_rl.tracking.background import BackgroundWriteError, BackgroundWriter

    w = BackgroundWriter()
    w.submit("f", lambda: 1 / 0)
    with pytest.raises(BackgroundWriteError, match="writing f failed: ZeroDivisionError"):
        w.close()
    w.close()


# ---------------------------------------------------------------------------------------------- text lengths
def test_text_lengths_skip_empty_texts_and_count_the_limit_inclusively() -> None:
    """Catches an empty text counted as a 0-token text, and the token limit compared strictly."""
    from r3_rl.tracking.text_lengths import text_length_metrics
    from r3_rl.trajectory import Node, Segment, Tree

    t = Tree(id="t", prompt=PromptItem("p", "x", {}))
    for i, n in enumerate((4, 0, 2, 3)):  # reflect texts of 4 and 2 tokens (limit 4); 0 tokens: nothing sampled
        seg = Segment("text", {}, list(range(n)), [0.0] * n, SamplingParams(max_new_tokens=4))
        t.add(Node(id=f"c{i}", parent=None, stage="reflect" if i < 3 else "reason", round=1, group_id="g",
                   policy_version=0, text="x", segment=seg))
    m = text_length_metrics([t])
    assert m == {"rollout/text_tokens/reason": 3.0, "rollout/at_token_limit/reason": 0.0,
                 "rollout/text_tokens/reflect": 3.0, "rollout/at_token_limit/reflect": 0.5}


def test_max_questions_bounds_the_reference_sets_questions_too(monkeypatch: pytest.MonkeyPatch) -> None:
    """Catches eval.understanding.max_questions ignored on the reference set (a bug until session 46: evaluate()
    never passed it to reference_report(), so its yes/no figure was measured on more questions than the recipe
    asked for and than the own-images figure it is compared with)."""
    from types import SimpleNamespace

    import r3_rl.eval.evaluate as ev

    monkeypatch.setattr(ev, "r3_chains", lambda *a, **k: [])  # no chains: only the reference set is asked
    tiif = {"yn_question_list": ["Is it red?", "Is it round?", "Is it big?"], "yn_answer_list": ["yes", "no", "yes"]}
    refs = [ReferenceImage(PromptItem(f"r{v}", "x", tiif), img(v), None, "correct") for v in (1, 2)]
    report, _ = ev.evaluate(ScriptedPolicy(stop={1: True, 2: True}), [], SimpleNamespace(reflect=SamplingParams()), 1,
                            "no further edit needed", pixel_reward({1: 1.0, 2: 1.0}), 1.0, references=refs,
                            max_questions=1)
    assert report["understanding"]["reference"]["yes_no"]["questions"] == 2  # 1 per image, not 3
