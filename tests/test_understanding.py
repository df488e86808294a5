"""Understanding metrics: critic verdicts and yes/no answers against the eval reward's ground truth, exact on
hand-built cases, and the fixed Blocks reference set."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from r3_rl.blocks import codec, edits
from r3_rl.blocks.prompts import heldout_prompts
from r3_rl.blocks.reference import reference_pairs
from r3_rl.eval.evaluate import markdown_table, summarise, understanding_table
from r3_rl.eval.synergy import goals_met, synergy_figures, synergy_lines, understanding_line
from r3_rl.eval.understanding import (
    JudgedImage, ask_yes_no, chain_verdicts, headline, per_kind_report, verdict_report, yes_no_summary,
)
from r3_rl.policy.base import ImageInput, Policy
from r3_rl.rewards.checklists import geneval_questions
from r3_rl.rewards.reward_set import RewardSet
from r3_rl.trajectory import PromptItem
from test_tracking_inspect import chain

BLOCKS_BINARY = [{"name": "blocks", "options": {"binary": True}}]


def test_verdict_report_counts_rates_and_balanced_accuracy() -> None:
    # correct images: 3 critiques, 2 stop; flawed: 4 critiques, 1 edits
    verdicts = [(True, True, 1, "a"), (True, True, 1, "a"), (True, False, 2, "b"),
                (False, True, 1, "a"), (False, True, 1, "b"), (False, True, 2, "b"), (False, False, 2, "b")]
    rep = verdict_report(verdicts)
    o = rep["overall"]
    assert (o["correct_images"], o["flawed_images"]) == (3, 4)
    assert o["stop_on_correct"] == pytest.approx(2 / 3) and o["edit_on_flawed"] == pytest.approx(1 / 4)
    assert o["balanced_accuracy"] == pytest.approx((2 / 3 + 1 / 4) / 2)
    assert o["accuracy"] == pytest.approx(3 / 7) and o["stop_rate"] == pytest.approx(5 / 7)
    r1 = rep["per_round"]["1"]
    assert (r1["correct_images"], r1["flawed_images"], r1["stop_on_correct"], r1["edit_on_flawed"]) == (2, 2, 1.0, 0.0)
    assert rep["per_round"]["2"]["balanced_accuracy"] == pytest.approx((0.0 + 0.5) / 2)
    assert rep["per_tag"]["a"]["flawed_images"] == 1 and rep["per_tag"]["b"]["correct_images"] == 1
    # a critic that always stops is at chance, however many images are correct
    always = verdict_report([(True, True, 1, "t")] * 9 + [(False, True, 1, "t")])["overall"]
    assert always["accuracy"] == pytest.approx(0.9) and always["balanced_accuracy"] == pytest.approx(0.5)
    # one kind missing: the balanced accuracy is undefined, not a number that looks measured
    assert math.isnan(verdict_report([(True, True, 1, "t")])["overall"]["balanced_accuracy"])


def test_within_tag_balanced_accuracy_sees_through_a_critic_that_reads_only_the_prompt() -> None:
    """Tag "easy": 90 correct / 10 flawed images, the critic always stops; tag "hard": 10 / 90, it always
    edits.  Pooled, that critic looks good (0.9 on both kinds); within each tag it is at chance."""
    shortcut = ([(True, True, 1, "easy")] * 90 + [(False, True, 1, "easy")] * 10
                + [(True, False, 1, "hard")] * 10 + [(False, False, 1, "hard")] * 90)
    o = verdict_report(shortcut)["overall"]
    assert o["balanced_accuracy"] == pytest.approx(0.9)
    assert o["within_tag_balanced_accuracy"] == pytest.approx(0.5)
    # a critic that reads the image: right on 80% of each tag's correct and 60% of its flawed images
    reads = ([(True, True, 1, t)] * 8 + [(True, False, 1, t)] * 2 + [(False, False, 1, t)] * 6
             + [(False, True, 1, t)] * 4 for t in ("easy", "hard"))
    o = verdict_report([v for tag in reads for v in tag])["overall"]
    assert o["within_tag_balanced_accuracy"] == pytest.approx(0.7) == o["balanced_accuracy"]
    # tags with only one kind of image have no balanced accuracy and are left out of the mean
    o = verdict_report(shortcut + [(True, True, 1, "single")] * 5)["overall"]
    assert o["within_tag_balanced_accuracy"] == pytest.approx(0.5)
    assert math.isnan(verdict_report([(True, True, 1, "t")])["overall"]["within_tag_balanced_accuracy"])
    # a report written before the figure existed: the synergy figures compute it from its per-tag block
    old = verdict_report(shortcut)
    del old["overall"]["within_tag_balanced_accuracy"]
    report = {"accuracy": [0.5], "stop_rate": 0.5, "understanding": {"verdict": old}}
    assert synergy_figures(report, report)["within_tag_verdict_after"] == pytest.approx(0.5)
    assert headline(report)["verdict_within_tag_balanced_accuracy"] == pytest.approx(0.5)


def test_chain_verdicts_judge_the_critiqued_image() -> None:
    trees = [chain(0, [0.0, 1.0, 1.0], 2),  # edits a flawed image, then stops on the (correct) refined one
             chain(1, [1.0, 1.0], 1),  # stops on a correct first image
             chain(2, [1.0, 0.0, 0.0], None)]  # edits a correct image (breaks it), edits the flawed result
    v = chain_verdicts(trees, correct_threshold=1.0)
    assert sorted(v) == sorted([(False, False, 1, "counting"), (True, True, 2, "counting"),
                                (True, True, 1, "colors"), (True, False, 1, "counting"),
                                (False, False, 2, "counting")])
    trees[0].nodes["img0"].meta["eval_score"] = None  # the eval reward failed on it: its critique is left out
    assert len(chain_verdicts(trees, 1.0)) == 4


def test_yes_no_summary_exact() -> None:
    rows = [(0.9, True, "a"), (0.2, True, "a"), (0.1, False, "b"), (0.7, False, "b"), (0.3, False, "b")]
    s = yes_no_summary(rows)
    assert s["questions"] == 5 and s["yes_truths"] == 2
    assert s["accuracy"] == pytest.approx(3 / 5)
    assert s["accuracy_on_yes"] == pytest.approx(0.5) and s["accuracy_on_no"] == pytest.approx(2 / 3)
    assert s["balanced_accuracy"] == pytest.approx((0.5 + 2 / 3) / 2)
    assert s["per_tag"] == {"a": pytest.approx(0.5), "b": pytest.approx(2 / 3)}


class CountingPolicy(Policy):
    """Answers "yes" exactly when the image holds at least one object (reads the pixels; no model)."""

    def __init__(self) -> None:
        self.asked: list[str] = []

    def answer_yes_no(self, images: list[ImageInput], questions: list[str]) -> list[float]:
        self.asked.extend(questions)
        return [0.9 if codec.decode(im.image).any() else 0.1 for im in images]

    def reason(self, *a, **k): raise NotImplementedError  # noqa: E704
    def generate(self, *a, **k): raise NotImplementedError  # noqa: E704
    def reflect(self, *a, **k): raise NotImplementedError  # noqa: E704
    def refine(self, *a, **k): raise NotImplementedError  # noqa: E704
    def segment_logprobs(self, *a, **k): raise NotImplementedError  # noqa: E704
    model = None  # type: ignore[assignment]


def test_yes_no_truth_is_about_the_image_not_the_prompt() -> None:
    meta = {"tag": "counting", "include": [{"class": "square", "count": 2}], "exclude": [{"class": "square", "count": 3}]}
    (q,) = geneval_questions(meta)
    assert q.question == "Are there exactly two squares in the image?" and q.check is not None
    two, three = np.zeros((4, 4), np.int64), np.zeros((4, 4), np.int64)
    two[0, :2] = 1
    three[0, :3] = 1
    assert edits.judge(two, q.check).correct and not edits.judge(three, q.check).correct
    prompt = PromptItem("p", "a photo of two squares", meta)
    images = [JudgedImage(prompt, ImageInput(codec.encode(g)), ok) for g, ok in ((two, True), (three, False))]
    rewards = RewardSet.from_specs(BLOCKS_BINARY)
    policy = CountingPolicy()
    rep = ask_yes_no(policy, images, rewards, 1.0)
    # the policy says "yes" to both; the truth is yes for two squares and no for three
    assert rep["available"] and rep["questions"] == 2 and rep["accuracy"] == pytest.approx(0.5)
    assert rep["accuracy_on_yes"] == 1.0 and rep["accuracy_on_no"] == 0.0
    # TIIF questions carry no clause: they count only on images the eval reward judges correct
    tiif = PromptItem("t", "x", {"yn_question_list": ["Is there a square?"], "yn_answer_list": ["Yes"],
                                 "include": [{"class": "square", "count": 2}]})
    rep = ask_yes_no(policy, [JudgedImage(tiif, ImageInput(codec.encode(two)), True),
                              JudgedImage(tiif, ImageInput(codec.encode(three)), False)], rewards, 1.0)
    assert rep["questions"] == 1 and rep["accuracy"] == 1.0


def test_policy_without_answers_is_reported_not_raised() -> None:
    class Mute(CountingPolicy):
        def answer_yes_no(self, images, questions):  # noqa: ANN001
            return Policy.answer_yes_no(self, images, questions)

    p = PromptItem("p", "a photo of a square", {"include": [{"class": "square", "count": 1}]})
    rep = ask_yes_no(Mute(), [JudgedImage(p, ImageInput(codec.encode(np.zeros((4, 4), np.int64))), False)],
                     RewardSet.from_specs(BLOCKS_BINARY), 1.0)
    assert rep == {"available": False, "why": "Mute cannot answer questions about images"}


def test_reference_pairs_are_fixed_and_judged_as_built() -> None:
    prompts = heldout_prompts(24, seed=3)
    a, b = reference_pairs(prompts, 7, 4, 4), reference_pairs(prompts, 7, 4, 4)
    assert [r.image_tokens for r in a] == [r.image_tokens for r in b]  # deterministic
    assert [r.image_tokens for r in reference_pairs(prompts, 8, 4, 4)] != [r.image_tokens for r in a]
    assert [r.kind.split(":")[0] for r in a[:4]] == ["correct", "flawed", "correct", "flawed"]
    for r in a:  # a flawed image is named by the first fix the Blocks world would make on it
        grid = np.asarray(r.image_tokens).reshape(4, 4)
        fixes = edits.diagnose(grid, r.prompt.metadata)
        assert r.kind == ("correct" if not fixes else f"flawed:{fixes[0].kind}")
    assert len({r.kind for r in reference_pairs(heldout_prompts(96, seed=0), 0, 4, 4)}) >= 4
    from r3_rl.rewards.base import RewardSample

    scored = RewardSet.from_specs(BLOCKS_BINARY).score(
        [RewardSample(r.prompt.prompt, r.prompt.metadata, "generate", 0, r.image) for r in a])
    assert [s.total for s in scored] == [1.0 if r.kind == "correct" else 0.0 for r in a]
    assert all(np.array_equal(codec.decode(r.image).reshape(-1), r.image_tokens) for r in a)


def test_per_kind_report_counts_stops_and_the_rewards_agreement() -> None:
    rows = [("correct", True, True), ("correct", True, False), ("flawed:add", False, False),
            ("flawed:recolor", False, True), ("flawed:recolor", False, True), ("flawed:recolor", True, True)]
    assert per_kind_report(rows) == {
        "correct": {"images": 2, "judged_correct": 1.0, "stop_rate": 0.5},
        "flawed:add": {"images": 1, "judged_correct": 0.0, "stop_rate": 0.0},
        "flawed:recolor": {"images": 3, "judged_correct": pytest.approx(1 / 3), "stop_rate": 1.0}}
    assert per_kind_report([]) == {}


def test_reference_report_says_which_mistakes_a_critic_passes() -> None:
    """A critic that sees everything but colour: it passes exactly the recoloured reference images."""
    from r3_rl.eval.understanding import reference_report
    from r3_rl.policy.base import TextSample
    from r3_rl.tracking.metrics import eval_metrics
    from r3_rl.trajectory import SamplingParams

    class ColourBlind(CountingPolicy):
        def reflect(self, prompts, images, sampling, generator=None):  # noqa: ANN001, ANN201
            out = []
            for p, im in zip(prompts, images):
                fixes = edits.diagnose(np.asarray(im.image_tokens).reshape(4, 4), p.metadata)
                stop = not fixes or fixes[0].kind == "recolor"
                out.append(TextSample("<think> look </think> " + ("no further edit needed" if stop else "fix it"),
                                      None))
            return out

    refs = reference_pairs(heldout_prompts(96, seed=0), 0, 4, 4)
    rep = reference_report(ColourBlind(), refs, SamplingParams(greedy=True), "no further edit needed",
                           RewardSet.from_specs(BLOCKS_BINARY), 1.0, yes_no=False)
    kinds = rep["per_kind"]
    assert sum(v["images"] for v in kinds.values()) == len(refs) and kinds["correct"]["images"] == 96
    assert kinds["flawed:recolor"]["images"] > 0 and kinds["flawed:add"]["images"] > 0
    for kind, v in kinds.items():
        assert v["judged_correct"] == (1.0 if kind == "correct" else 0.0)
        assert v["stop_rate"] == (1.0 if kind in ("correct", "flawed:recolor") else 0.0), kind
    n_recolor = kinds["flawed:recolor"]["images"]
    assert rep["verdict"]["overall"]["edit_on_flawed"] == pytest.approx(1 - n_recolor / 96)
    report = {"accuracy": [0.5], "stop_rate": 1.0, "per_tag": {}, "transitions": [], "mean_rounds_used": 0.0,
              "prompts": 96, "understanding": {"verdict": rep["verdict"], "reference": rep}}
    md = understanding_table(report)
    assert f"| flawed:recolor | {n_recolor} | 0.000 | 1.000 |" in md and "| correct | 96 | 1.000 | 1.000 |" in md
    m = eval_metrics(report)
    assert m["eval/reference/stop_rate/flawed/recolor"] == 1.0 and m["eval/reference/stop_rate/correct"] == 1.0


def test_tiny_answer_is_the_yes_share_of_the_next_word() -> None:
    from r3_rl.policy.tiny import TinyUnifiedPolicy, question_words
    from r3_rl.config import Templates

    policy = TinyUnifiedPolicy.build(Templates().model_dump(), 4, 4, hidden_size=32, num_layers=1, num_heads=2,
                                     intermediate_size=64)
    grid = np.zeros((4, 4), np.int64)
    grid[1, 2] = 5
    ims = [ImageInput(codec.encode(grid)), ImageInput(codec.encode(np.zeros((4, 4), np.int64)))]
    qs = ["Is there a red square in the image?", "Are there three or more circles in the image?"]
    got = policy.answer_yes_no(ims, qs)
    assert question_words(qs[1]) == "are there three or more circles in the image"
    unk = policy.tok.get_vocab()["<unk>"]
    vocab = policy.tok.get_vocab()
    for im, q, p in zip(ims, qs, got):
        ids = policy.answer_context(im, q)
        assert unk not in ids
        with torch.no_grad():  # one plain forward over the unpadded context
            logits = policy.model(input_ids=torch.tensor([ids])).logits[0, -1]
        e_yes, e_no = logits[vocab["yes"]].exp(), logits[vocab["no"]].exp()
        assert p == pytest.approx(float(e_yes / (e_yes + e_no)), abs=1e-5)


def test_report_table_and_synergy_figures() -> None:
    trees = [chain(0, [0.0, 1.0], None), chain(1, [1.0, 1.0], 1)]
    rep = summarise(trees, [[False, True], [True, True]], 1)
    rep["understanding"] = {"verdict": verdict_report(chain_verdicts(trees, 1.0)),
                            "yes_no": {"available": True, **yes_no_summary([(0.9, True, "colors")])}}
    md = markdown_table(rep)
    assert "| **verdict balanced accuracy** | 1.000 | 1.000 |" in md
    # each tag saw one kind of image only: no within-tag figure (and none per round: it is overall only)
    assert "| balanced accuracy within tags (mean over tags) | - | - |" in md
    assert "| images critiqued (correct / flawed) | 1 / 1 | 1 / 1 |" in md
    assert "yes/no accuracy on own images: 1.000 (1 questions" in md
    assert headline(rep)["verdict_balanced_accuracy"] == 1.0
    assert math.isnan(headline(rep)["verdict_within_tag_balanced_accuracy"])
    before = {"accuracy": [0.4, 0.5], "stop_rate": 0.9,
              "understanding": {"verdict": {"overall": {"balanced_accuracy": 0.6}}}}
    after = {"accuracy": [0.55, 0.62], "stop_rate": 0.5,
             "understanding": {"verdict": {"overall": {"balanced_accuracy": 0.65,
                                                       "within_tag_balanced_accuracy": 0.52}}}}
    fig = synergy_figures(before, after)
    assert math.isnan(fig["within_tag_verdict_gain"])  # a report from before the figure existed: not a number
    before["understanding"]["verdict"]["overall"]["within_tag_balanced_accuracy"] = 0.55
    fig = synergy_figures(before, after)
    assert fig["within_tag_verdict_gain"] == pytest.approx(-0.03)
    assert fig["first_image_gain"] == pytest.approx(0.15) and fig["refinement_after"] == pytest.approx(0.07)
    assert fig["verdict_gain"] == pytest.approx(0.05) and math.isnan(fig["reference_verdict_gain"])
    assert goals_met(fig) == {"first_image_gain": True, "refinement_after": True, "verdict_gain": False}
    lines = synergy_lines(fig)
    assert len(lines) == 3 and "+15.0 points" in lines[0] and "NOT met" in lines[2]
    assert understanding_line(fig) is None  # no yes/no answers measured
    assert "within tags 0.550 -> 0.520 (-3.0 points)" in lines[2] and "reference images" not in lines[2]


def test_understanding_line_reports_yes_no_before_and_after() -> None:
    """The yes/no answers' balanced accuracy (on own images and the reference set) before and after RL; a
    policy that cannot answer (``available: False``) leaves its part out."""
    def rep(own: float, ref: float | None) -> dict:
        u = {"verdict": {"overall": {"balanced_accuracy": 0.6}},
             "yes_no": {"available": True, "balanced_accuracy": own, "accuracy": 0.99}}
        u["reference"] = {"verdict": {"overall": {"balanced_accuracy": 0.7}},
                          "yes_no": {"available": ref is not None, "balanced_accuracy": ref}}
        return {"accuracy": [0.4, 0.5], "stop_rate": 0.8, "understanding": u}

    fig = synergy_figures(rep(0.786, 0.842), rep(0.615, 0.824))
    assert fig["yes_no_gain"] == pytest.approx(-0.171) and fig["reference_yes_no_gain"] == pytest.approx(-0.018)
    line = understanding_line(fig)
    assert line == ("yes/no answers about the image (balanced accuracy), before -> after RL: on its own images "
                    "0.786 -> 0.615 (-17.1 points); on the reference images 0.842 -> 0.824 (-1.8 points)")
    line = understanding_line(synergy_figures(rep(0.5, None), rep(0.75, None)))
    assert line is not None and line.endswith("on its own images 0.500 -> 0.750 (+25.0 points)")
