"""Exact cases for the reward rules, checklists, detectors, stage composition and self-consistency (round 16 audit).

A mutation audit of rewards/geneval_rules.py, checklists.py, detectors.py, compose.py and self_consistency.py made
one-point bugs that the existing tests let through; each test here fails on one of them.  Expected values are
worked out by hand (comments show the arithmetic) or follow GenEval's published rules
(djghosh13/geneval evaluation/evaluate_images.py) and Flow-GRPO's reward server (reward_server/gen_eval.py).
"""
from __future__ import annotations

import numpy as np
import pytest

from r3_rl.errors import UserError
from r3_rl.rewards.base import RewardSample
from r3_rl.rewards.compose import combine, reflect_own_reward, reflect_reward, verdict_term
from r3_rl.rewards.geneval_rules import Detection, evaluate, relative_position, validate_metadata
from r3_rl.rewards.self_consistency import SelfConsistencyReward


# ---------------------------------------------------------------- GenEval rules (geneval_rules.py)
def _box(label: str, x0: float, y0: float, x1: float, y1: float, color: str | None = None, score: float = 1.0) -> Detection:
    return Detection(label, (x0, y0, x1, y1), score, color)


def test_relation_needs_strictly_more_than_half_of_the_offset_on_each_side() -> None:
    """dx = -0.5 exactly is not "left of" (GenEval: ``dx < -0.5``); likewise on the three other sides.

    Equal 10 px boxes 4 px apart: margin 0.1 * (10 + 10) = 2, revised offset 4 - 2 = 2, 2 / 4 = 0.5 exactly."""
    base = (0, 0, 10, 10)
    assert relative_position(base, (4, 0, 14, 10)) == set()     # dx = -0.5
    assert relative_position((4, 0, 14, 10), base) == set()     # dx = +0.5
    assert relative_position(base, (0, 4, 10, 14)) == set()     # dy = -0.5
    assert relative_position((0, 4, 10, 14), base) == set()     # dy = +0.5
    # 5 px apart: (5 - 2) / 5 = 0.6 > 0.5 on every side
    assert relative_position(base, (5, 0, 15, 10)) == {"left of"}
    assert relative_position((0, 5, 10, 15), base) == {"below"}


@pytest.mark.parametrize("count", [True, False, 1.0, "1"])
def test_count_must_be_a_real_integer_not_a_bool(count: object) -> None:
    """``count: true`` is a bool (an int subclass in Python): refused, not read as 1."""
    with pytest.raises(UserError, match=r"^metadata include\[0\] needs an integer 'count' >= 1, got "):
        validate_metadata({"include": [{"class": "cat", "count": count}]})


@pytest.mark.parametrize("pos", [["left of", 0, 1], ["left of"], ["left of", "0"], ["left of", 0.0], ["left of", -1],
                                 "left of 0", ["left of", False]])
def test_position_must_be_exactly_relation_and_earlier_index(pos: object) -> None:
    """A 3-element position, a string index or a negative index is a UserError naming include[1], never a
    ValueError / TypeError later in evaluate(); ``false`` is no index 0 (until session 54 it was, while ``count``
    already refused a bool)."""
    md = {"include": [{"class": "cat", "count": 1}, {"class": "dog", "count": 1, "position": pos}]}
    with pytest.raises(UserError, match=r"^metadata include\[1\] 'position' must be \[relation, index"):
        evaluate([_box("cat", 0, 0, 10, 10), _box("dog", 50, 0, 60, 10)], md)


def test_inverted_box_has_zero_area_for_size() -> None:
    """A box given with x1 < x0 and y1 < y0 has area 0 (clamped), not the positive product of two negatives."""
    md = {"include": [{"class": "cat", "count": 1, "size": "larger"}, {"class": "dog", "count": 1, "size": "smaller"}]}
    cat, dog_inverted = _box("cat", 0, 0, 10, 10), _box("dog", 50, 50, 40, 40)  # area 0, not 100
    r = evaluate([cat, dog_inverted], md)
    assert (r.correct, r.strict_correct, r.score) == (True, True, 1.0)


def test_two_larger_clauses_are_not_compared_with_each_other() -> None:
    """Size compares a "larger" clause only with "smaller" clauses: two "larger" objects of different areas
    both pass against a small one (terms [1, 1, 1, 1, 1] -> 1)."""
    md = {"include": [{"class": "cat", "count": 1, "size": "larger"}, {"class": "dog", "count": 1, "size": "larger"},
                      {"class": "bird", "count": 1, "size": "smaller"}]}
    dets = [_box("cat", 0, 0, 30, 30), _box("dog", 40, 0, 60, 20), _box("bird", 70, 0, 75, 5)]
    r = evaluate(dets, md)
    assert (r.correct, r.strict_correct, r.score, r.reasons) == (True, True, 1.0, [])
    # the bird too big for the dog: only dog's and bird's size fail (3 count terms + cat 1, dog 0, bird 0)
    r = evaluate(dets[:2] + [_box("bird", 70, 0, 95, 25)], md)
    assert r.reasons == ["expected dog to be larger", "expected bird to be smaller"]
    assert r.score == pytest.approx(4 / 6)


def test_position_reports_one_reason_per_failing_object_not_per_target() -> None:
    """GenEval breaks at the first failing target: a circle left of two squares gives ONE reason."""
    md = {"include": [{"class": "square", "count": 2}, {"class": "circle", "count": 1, "position": ["right of", 0]}]}
    dets = [_box("square", 100, 0, 110, 10), _box("square", 100, 50, 110, 60), _box("circle", 0, 20, 10, 30)]
    r = evaluate(dets, md)
    assert r.reasons == ["expected circle right of target, found left of target"]
    # score: [1 (squares), 1 (circle count), 0 (first failing pair), 1 (the server's sic 1)]
    assert (r.correct, r.strict_correct, r.score) == (False, False, 0.75)


def test_position_is_not_checked_once_the_colour_failed() -> None:
    """A clause whose colour failed is unmatched: its position is not examined (no second reason), in both
    the GenEval verdict and the score (terms [1, 1, 0]: no position terms)."""
    md = {"include": [{"class": "square", "count": 1},
                      {"class": "circle", "count": 1, "color": "red", "position": ["right of", 0]}]}
    dets = [_box("square", 100, 0, 110, 10, "blue"), _box("circle", 0, 0, 10, 10, "blue")]
    r = evaluate(dets, md)
    assert r.reasons == ["expected red circle>=1, found 0 red; and 1 blue"]
    assert r.score == pytest.approx(2 / 3)


def test_a_clause_that_failed_its_region_is_no_target_in_the_score() -> None:
    """Region failure unmatches the clause in the score too: a later position on it scores the server's
    "no target" 0 (and no sic 1).  Terms [1 cat, 0 region, 1 dog, 0 no target] -> 0.5."""
    md = {"include": [{"class": "cat", "count": 1, "region": "left"},
                      {"class": "dog", "count": 1, "position": ["right of", 0]}]}
    dets = [_box("cat", 60, 40, 70, 50), _box("dog", 85, 40, 95, 50)]  # cat centre x = 65 > 50: right half
    r = evaluate(dets, md, image_size=(100, 100))
    assert r.reasons == ["expected cat in the left region", "no target for dog to be right of"]
    assert (r.correct, r.strict_correct, r.score) == (False, False, 0.5)
    # with the cat on the left the same layout scores 1
    r = evaluate([_box("cat", 10, 40, 20, 50), _box("dog", 35, 40, 45, 50)], md, image_size=(100, 100))
    assert (r.correct, r.strict_correct, r.score) == (True, True, 1.0)


def test_score_size_skips_an_opposite_clause_whose_count_is_wrong() -> None:
    """The score judges size against the score's own matched groups: two dogs where one is asked leave the
    dog clause unmatched there, so the cat's size term is 1 (terms [1, 1 - |1-2|, 1] -> 2/3), while GenEval's
    verdict compares the cat with the most confident dog (400 px^2 > 100 px^2) and fails both size clauses."""
    md = {"include": [{"class": "cat", "count": 1, "size": "larger"}, {"class": "dog", "count": 1, "size": "smaller"}]}
    dets = [_box("cat", 0, 0, 10, 10), _box("dog", 20, 0, 40, 20, score=0.9), _box("dog", 50, 0, 55, 5, score=0.5)]
    r = evaluate(dets, md)
    assert r.reasons == ["expected cat to be larger", "expected dog to be smaller"]
    assert (r.correct, r.strict_correct) == (False, False)
    assert r.score == pytest.approx(2 / 3)


@pytest.mark.parametrize("region", ["left", "right", "above", "below"])
def test_a_centre_exactly_on_the_midline_is_in_neither_half(region: str) -> None:
    """Box centre (50, 50) in a 100 x 100 image: ``cx < w/2`` and ``cx > w/2`` are both false, so every region
    fails -- in the verdict, the strict verdict and the score (terms [1 count, 0 region] -> 0.5)."""
    md = {"include": [{"class": "cat", "count": 1, "region": region}]}
    r = evaluate([_box("cat", 45, 45, 55, 55)], md, image_size=(100, 100))
    assert (r.correct, r.strict_correct, r.score) == (False, False, 0.5)
    assert r.reasons == [f"expected cat in the {region} region"]
    # one pixel off the midline towards the asked half passes
    shift = {"left": (-1, 0), "right": (1, 0), "above": (0, -1), "below": (0, 1)}[region]
    r = evaluate([_box("cat", 45 + shift[0], 45 + shift[1], 55 + shift[0], 55 + shift[1])], md, image_size=(100, 100))
    assert (r.correct, r.strict_correct, r.score) == (True, True, 1.0)


def test_region_is_not_checked_once_the_colour_failed() -> None:
    """A clause whose colour failed gets no region reason on top (GenEval stops at the first failed check)."""
    md = {"include": [{"class": "cat", "count": 1, "color": "red", "region": "left"}]}
    r = evaluate([_box("cat", 80, 40, 90, 50, "blue")], md, image_size=(100, 100))
    assert r.reasons == ["expected red cat>=1, found 0 red; and 1 blue"]
    assert (r.correct, r.strict_correct, r.score) == (False, False, 0.5)  # terms [1 count, 0 colour]


# ---------------------------------------------------------------- stage composition (compose.py)
@pytest.mark.parametrize("fmt", [True, False])
@pytest.mark.parametrize("parent_correct", [True, False])
def test_ppo_critique_reward_of_a_stop_equals_grpos_with_the_extra_ungated(fmt: bool, parent_correct: bool) -> None:
    """For a stop (no improvement part) PPO's own critique reward is GRPO's reflect reward plus the extra reward
    sets -- which are NOT multiplied by the format indicator (combine() adds them as they are).
    By hand, badly formed: 0.2 * 0 + 1 * 0 + 0.5 = 0.5; well formed on a correct parent: 0.2 + 1 + 0.5 = 1.7."""
    r_old = 1.0 if parent_correct else 0.25
    grpo = combine(reflect_reward(r_old, r_old, True, fmt, 0.2), 0.5)
    term = verdict_term(parent_correct, True)
    ppo = reflect_own_reward({"format": float(fmt), "verdict_term": term, "extra": 0.5}, 0.2)
    assert ppo == pytest.approx(grpo)
    assert reflect_own_reward({"format": 0.0, "verdict_term": 1.0, "extra": 0.5}, 0.2) == 0.5


def test_combine_is_none_when_any_one_of_several_extras_failed() -> None:
    """One failed extra among several makes the whole stage reward unknown (None), never a TypeError or a sum."""
    assert combine(0.6, 0.2, None) is None
    assert combine(0.6, None, 0.2) is None
    assert combine(0.6, 0.25, 0.125) == 0.975


# ---------------------------------------------------------------- self-consistency (self_consistency.py)
class _Asked:
    """answer_yes_no stand-in: P(yes) from a fixed table by question text; records every call's questions."""

    def __init__(self, table: dict[str, float]) -> None:
        self.table, self.calls = table, []

    def answer_yes_no(self, images, questions):
        self.calls.append(list(questions))
        return [self.table[q] for q in questions]


_TIIF3 = {"yn_question_list": ["Q one?", "Q two?", "Q three?"], "yn_answer_list": ["yes", "no", "yes"]}


def _sample(meta: dict) -> RewardSample:
    return RewardSample(prompt="p", metadata=meta, stage="generate", round=0, image=np.zeros((4, 4, 3), np.uint8),
                        history=[])


def test_max_questions_asks_exactly_that_many_first_questions() -> None:
    """max_questions=1 asks only "Q one?" (P(yes) 0.8 -> soft 0.8); 2 asks the first two: (0.8 + (1 - 0.3)) / 2."""
    table = {"Q one?": 0.8, "Q two?": 0.3, "Q three?": 0.1}
    r = SelfConsistencyReward(max_questions=1)
    r.bind_policy(pol := _Asked(table))
    (out,) = r([_sample(_TIIF3)])
    assert pol.calls == [["Q one?"]]
    assert out.score == pytest.approx(0.8) and out.components["questions"] == 1.0
    r = SelfConsistencyReward(max_questions=2)
    r.bind_policy(pol := _Asked(table))
    (out,) = r([_sample(_TIIF3)])
    assert pol.calls == [["Q one?", "Q two?"]]
    assert out.score == pytest.approx(0.75) and out.components == {"soft": pytest.approx(0.75), "accuracy": 1.0,
                                                                    "questions": 2.0}
