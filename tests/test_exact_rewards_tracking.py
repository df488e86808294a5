"""Exact checks of the checklist and self-consistency rewards, the detector helpers, the understanding figures and
the TensorBoard / HTML trajectory views (round 14E audit).

Each test pins one behaviour a plausible one-point bug changes; every expected value is written out by hand (or
taken from an independent peer such as ``html.escape``), never computed by the code under test.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from test_exact_eval_understanding import ScriptedPolicy, judged, pixel_reward

from r3_rl.errors import UserError
from r3_rl.eval.understanding import ask_yes_no
from r3_rl.rewards.base import Turn
from r3_rl.rewards.checklists import article, geneval_checklist, geneval_questions, load_records, tiif_questions
from r3_rl.rewards.detectors import mask2former_instances, normalize_label
from r3_rl.rewards.self_consistency import VerdictConsistencyReward
from test_exact_reward_models import _s


# ---------------------------------------------------------------------------------------------- checklists
def test_article_an_before_every_vowel_including_u() -> None:
    """Catches a vowel set missing 'u' ("a umbrella")."""
    assert [article(w) for w in ("umbrella", "apple", "elephant", "igloo", "orange", "cat")] == [
        "an umbrella", "an apple", "an elephant", "an igloo", "an orange", "a cat"]
    (q,) = geneval_questions({"include": [{"class": "umbrella", "count": 1}]})
    assert q.question == "Is there an umbrella in the image?"


def test_position_check_points_at_the_reference_object_whatever_its_index() -> None:
    """Catches the position clause of a question's check keeping the prompt's index (1) instead of 0, the index
    of the reference object inside the check's own two-object include list."""
    meta = {"include": [{"class": "dog", "count": 1}, {"class": "cat", "count": 1},
                        {"class": "bird", "count": 1, "position": ["above", 1]}]}
    pos = [q for q in geneval_questions(meta) if "above" in q.question]
    assert [q.question for q in pos] == ["Is the bird above the cat?"]
    assert pos[0].check == {"include": [{"class": "cat", "count": 1},
                                        {"class": "bird", "count": 1, "position": ["above", 0]}]}


def test_absence_question_kept_when_the_include_of_that_class_is_not_an_exact_count() -> None:
    """Catches an exclude clause dropped whenever its class is included at all, not only when it makes the
    include an exact count (one apple, fewer than three: "three or more apples?" must still be asked)."""
    meta = {"include": [{"class": "apple", "count": 1}], "exclude": [{"class": "apple", "count": 3}]}
    qs = geneval_questions(meta)
    assert [(q.question, q.answer) for q in qs] == [("Is there an apple in the image?", "yes"),
                                                     ("Are there three or more apples in the image?", "no")]
    assert qs[1].check == {"include": [{"class": "apple", "count": 3}]}
    assert geneval_checklist(meta) == ["an apple", "at most two apples"]


def test_checklist_spells_relations_out() -> None:
    """Catches the checklist writing the raw relation key ("left of") instead of "to the left of"."""
    meta = {"include": [{"class": "cup", "count": 1}, {"class": "fork", "count": 2, "position": ["left of", 0]}]}
    assert geneval_checklist(meta) == ["a cup", "two forks to the left of the cup"]


def test_load_records_checks_the_include_clauses_of_a_tiif_record(tmp_path: Path) -> None:
    """Catches load_records validating GenEval clauses only when a record has 'exclude': a TIIF record (questions
    from its own lists) carrying a broken 'include' is refused at its line."""
    f = tmp_path / "p.jsonl"
    good = {"prompt": "a cat", "yn_question_list": ["Is there a cat?"], "yn_answer_list": ["yes"]}
    f.write_text(json.dumps(good) + "\n" + json.dumps({**good, "include": [{"class": "cat"}]}) + "\n")
    with pytest.raises(UserError, match=r"p\.jsonl:2: .*count"):
        load_records(f)


def test_tiif_question_list_given_as_a_string_is_refused() -> None:
    """Catches the list check weakened to a None check: a string of two characters with two answers would become
    the questions 'I' and 's'."""
    with pytest.raises(UserError, match="needs lists 'yn_question_list' and 'yn_answer_list'"):
        tiif_questions({"yn_question_list": "Is", "yn_answer_list": ["yes", "no"]})
    with pytest.raises(UserError, match="needs lists"):
        tiif_questions({"yn_question_list": ["Is it red?"], "yn_answer_list": "y"})


def test_an_object_with_position_and_region_gets_both_questions() -> None:
    """Catches the region question dropped when the same object also has a position."""
    meta = {"include": [{"class": "cat", "count": 1},
                        {"class": "dog", "count": 1, "position": ["left of", 0], "region": "below"}]}
    assert [q.question for q in geneval_questions(meta)] == [
        "Is there a cat in the image?", "Is there a dog in the image?", "Is the dog to the left of the cat?",
        "Is the dog in the bottom half of the image?"]


# ---------------------------------------------------------------------------------------------- self-consistency
ROUND_TASK = '''
def refine_round_one(samples):
    """1 only for the critiqued image seen as itself: a refine sample of round 1."""
    return [float(s.stage == "refine" and s.round == 1) for s in samples]
'''


def test_verdict_task_reward_sees_the_critiqued_images_round(tmp_path: Path) -> None:
    """Catches the task sample built with round 0 instead of the critiqued image's own round."""
    f = tmp_path / "task.py"
    f.write_text(ROUND_TASK)
    im = np.zeros((4, 4, 3), np.uint8)
    hist = [Turn("generate", 0, image=im, reward=0.0), Turn("reflect", 1, text="<think>x</think>make it red"),
            Turn("refine", 1, image=im), Turn("reflect", 2, text="<think>y</think>no further edit needed")]
    (out,) = VerdictConsistencyReward(task={"name": f"{f}:refine_round_one"})([_s(None, {}, hist, "reflect", 2)])
    assert out.components == {"stop": 1.0, "correct": 1.0} and out.score == 1.0


# ---------------------------------------------------------------------------------------------- detectors
def test_normalize_label_reads_hyphens_as_spaces() -> None:
    """Catches hyphens kept in labels: 'tv-monitor' and 'hair-dryer' must map like 'tv monitor' / 'hair dryer'."""
    assert normalize_label("tv-monitor") == "tv"
    assert normalize_label("Hair-Dryer") == "hair drier"
    assert normalize_label("potted-plant") == "potted plant"
    assert normalize_label("TV__Monitor") == "tv"  # runs of separators are one space


def test_mask2former_keeps_several_classes_of_one_query() -> None:
    """Catches top-k taken over queries instead of (query, class) pairs: one query that is half cat, half dog
    yields both instances (mmdetection's flattened top-k)."""
    cls = torch.tensor([[0.0, 0.0, -20.0]])  # P(cat) = P(dog) = 0.5, no-object ~ 0
    masks = torch.full((1, 4, 4), 20.0)  # the whole image, mask probability ~1
    inst = mask2former_instances(cls, masks, (4, 4), (4, 4), (4, 4), top_k=100, min_score=0.1)
    assert sorted(lbl for lbl, _, _ in inst) == [0, 1]
    assert [round(s, 3) for _, s, _ in inst] == [0.5, 0.5]
    assert all(m.all() for _, _, m in inst)


@pytest.mark.filterwarnings("ignore::UserWarning")  # the PIL-resize fallback where scipy is missing
def test_owlv2_image_without_queries_finds_nothing(tmp_path: Path) -> None:
    """Catches an image with no class names sent as an empty query list (the processor then has no text and
    detect fails) instead of one blank query whose hits are dropped."""
    from PIL import Image
    from tiny_vision import save_tiny_owlv2

    from r3_rl.rewards.detectors import Owlv2Backend

    backend = Owlv2Backend(save_tiny_owlv2(tmp_path / "owl"), device="cpu")
    assert backend.detect([Image.fromarray(np.zeros((32, 32, 3), np.uint8))], [[]], min_score=0.0) == [[]]


class _NoResizeProcessor:
    """Refuses to resize (as transformers does without scipy / torchvision); records the images it is given."""

    class image_processor:  # noqa: N801
        size = {"height": 8, "width": 8}

    def __call__(self, text, images, return_tensors, **kw):
        if "do_resize" not in kw:
            raise ImportError("needs scipy\nsecond line")
        self.images, self.kw = images, kw
        return {}


def test_owlv2_fallback_pads_bottom_right_before_resizing() -> None:
    """Catches the PIL fallback centring the image on its square canvas: OWLv2 pads bottom-right, so a tall image
    keeps its left edge at x = 0 and the grey padding is on the right."""
    from PIL import Image

    from r3_rl.rewards.detectors import Owlv2Backend

    b = Owlv2Backend("unused", device="cpu")
    b.processor = _NoResizeProcessor()
    with pytest.warns(UserWarning, match=r"falls back to PIL resizing \(needs scipy\)"):
        b._inputs([Image.new("RGB", (2, 4), (255, 0, 0))], [["a photo of a cat"]])
    (sq,) = b.processor.images
    px = np.asarray(sq)
    assert px.shape == (8, 8, 3) and b.processor.kw == {"do_resize": False, "do_pad": False}
    assert tuple(px[0, 0]) == (255, 0, 0) and tuple(px[7, 0]) == (255, 0, 0)  # the image: left half
    assert tuple(px[0, 7]) == (128, 128, 128) and tuple(px[7, 7]) == (128, 128, 128)  # padding: right half


# ---------------------------------------------------------------------------------------------- understanding
def test_yes_no_without_any_question_is_reported_unavailable() -> None:
    """Catches ask_yes_no calling a set with no question 'available' (a TIIF prompt on a flawed image has no
    known truth; a prompt without metadata has no questions)."""
    tiif = {"yn_question_list": ["Is it red?"], "yn_answer_list": ["yes"]}
    policy = ScriptedPolicy()
    rep = ask_yes_no(policy, [judged(1, False, tiif), judged(2, None, tiif), judged(3, True, {"x": 1})],
                     pixel_reward({}), 1.0)
    assert rep == {"available": False, "why": "no yes/no questions for these prompts"}
    assert policy.batches == []  # the policy was never asked


def test_yes_no_per_tag_key_of_an_untagged_prompt_is_all() -> None:
    """Catches the per-tag yes/no figures keyed by the raw metadata tag ('None') instead of the prompt's tag
    ('all' without one), the key every other per-tag eval figure uses."""
    from r3_rl.eval.understanding import JudgedImage
    from r3_rl.policy.base import ImageInput
    from r3_rl.trajectory import PromptItem

    untagged = JudgedImage(PromptItem("p", "a cat", {"include": [{"class": "cat", "count": 1}]}),
                           ImageInput(np.full((4, 4, 3), 7, np.uint8)), True)
    rep = ask_yes_no(ScriptedPolicy(yes={7: 0.9}), [untagged], pixel_reward({7: 1.0}), 1.0)
    assert rep["per_tag"] == {"all": 1.0}


# ---------------------------------------------------------------------------------------------- views
def test_spread_sample_reaches_a_kinds_second_tag_when_another_kind_has_one() -> None:
    """Catches the (kind, tag) groups interleaved with zip instead of zip_longest: the A trees' second tag is
    dropped because the BC trees have only one tag, and the third pick repeats A's first tag."""
    from r3_rl.tracking.views import spread_sample
    from r3_rl.trajectory import PromptItem, Tree

    spec = [("a0", "A", "x"), ("a1", "A", "x"), ("a2", "A", "y"), ("b0", "BC", "x")]
    ts = [Tree(i, PromptItem(i, "p", {"tag": tag}), meta={"kind": k}) for i, k, tag in spec]
    picked = spread_sample(ts, 3, lambda t: (t.meta["kind"], t.prompt.metadata["tag"]))
    assert [t.id for t in picked] == ["a0", "a2", "b0"]  # A/x, BC/x, A/y in turn, returned in file order


def test_a_zero_reward_is_a_score_not_a_failure() -> None:
    """Catches node_score testing the reward's truth value: a training image with reward 0.0 (and no eval
    score) must read R=0.00, not 'failed', and its refinement's change is measured from 0."""
    from r3_rl.trajectory import Node

    from r3_rl.tracking.views import image_caption, node_score

    img = np.zeros((2, 2, 3), np.uint8)
    first = Node(id="g", parent=None, stage="generate", round=0, group_id="g", policy_version=0, image=img, reward=0.0)
    again = Node(id="r", parent="g", stage="refine", round=1, group_id="r", policy_version=0, image=img, reward=1.0)
    assert node_score(first) == 0.0
    assert image_caption(first) == "r0 generate R=0.00"
    assert image_caption(again, first) == "r1 refine R=1.00 (+1.00)"


# ---------------------------------------------------------------------------------------------- html
def test_html_shows_the_first_paths_and_counts_the_rest() -> None:
    """Catches the page showing the last ``max_paths`` trajectories instead of the first ones."""
    from test_tracking_metrics import stage_a_tree

    from r3_rl.tracking.html import trees_html

    page = trees_html([stage_a_tree()], "t", max_paths=2)  # plans 0, 1, 2: one path each
    assert "plan 0" in page and "plan 1" in page and "plan 2" not in page
    assert page.count('<div class="path">') == 2 and "... 1 more" in page
    assert "&middot; 3 trajectories</div>" in page  # the tree's count, not the number shown


def test_yes_no_clause_truth_uses_the_prompts_tag_like_the_eval_reward() -> None:
    """A counting prompt's only question ("exactly three cats?") must be true exactly when the eval reward judges
    the image correct: GenEval counts at its counting threshold (0.9) on a 'counting' tag, so the clause must be
    judged with the prompt's tag too.  Before the fix the clause went without its tag, was counted at 0.3 and a
    fourth, faint cat (0.5) made the truth "no" on an image the eval reward calls correct."""
    from test_rewards_models import scripted_reward

    from r3_rl.rewards.base import RewardSample
    from r3_rl.rewards.detectors import DetectedObject
    from r3_rl.rewards.reward_set import RewardSet, WeightedReward

    def cats() -> list[DetectedObject]:
        return [DetectedObject("cat", (20 * i, 0, 20 * i + 10, 10), s) for i, s in enumerate((0.95, 0.95, 0.95, 0.5))]

    meta = {"include": [{"class": "cat", "count": 3}], "exclude": [{"class": "cat", "count": 4}]}
    im = np.full((32, 96, 3), 128, np.uint8)
    # the peer: the eval reward on the whole prompt calls the image correct (three cats above 0.9)
    (whole,) = scripted_reward([cats()])([RewardSample("three cats", {**meta, "tag": "counting"}, "generate", 0, im)])
    assert whole.score == 1.0
    rewards = RewardSet([WeightedReward(scripted_reward([cats()]), 1.0)])
    image = judged(1, True, meta, tag="counting")
    image.image.image = im
    rep = ask_yes_no(ScriptedPolicy(yes={128: 0.9}), [image], rewards, 1.0)
    assert rep["questions"] == 1 and rep["yes_truths"] == 1 and rep["accuracy"] == 1.0


# ---------------------------------------------------------------------------------------------- tensorboard
class _Writer:
    def __init__(self) -> None:
        self.hists: dict[str, list[float]] = {}

    def add_histogram(self, tag: str, values: np.ndarray, step: int) -> None:
        self.hists[tag] = [float(v) for v in values]


def test_histograms_log_advantages_under_their_own_name() -> None:
    """Catches hist_advantage filled with rewards: stage A's images have rewards 0.5, 1.0 and advantages
    -0.25, 0.25 (the failed image and the advantage-less plans are left out)."""
    from test_tracking_metrics import stage_a_tree

    from r3_rl.tracking.tensorboard import add_histograms

    w = _Writer()
    add_histograms(w, [stage_a_tree()], 3)
    assert w.hists == {"hist_reward/generate": [0.5, 1.0], "hist_reward/reason": [0.6, 1.1],
                       "hist_advantage/generate": [-0.25, 0.25]}



def test_markdown_prompt_line_carries_the_tag() -> None:
    """Catches the markdown's prompt line without the tag the image grid's header shows."""
    from test_tracking_metrics import stage_bc_tree

    from r3_rl.tracking.tensorboard import trajectory_markdown
    from r3_rl.tracking.views import trajectory_paths

    tree = stage_bc_tree()
    md = trajectory_markdown(tree, trajectory_paths(tree)[0])
    assert md.splitlines()[:2] == ["**prompt:** a blue circle  [tag: colors]  ", "tree `s0-t1-BC0`"]
