"""self_consistency (the policy answers questions about its own image) and verdict_consistency.

The policy here is a small fake :class:`Policy` subclass whose ``answer_yes_no`` reads the image (mean
red channel) and the question, so expected scores can be computed by hand.  (The real policies'
``answer_yes_no`` is tested with those policies.)
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from r3_rl.errors import UserError
from r3_rl.policy.base import Policy
from r3_rl.rewards.base import RewardSample, Turn
from r3_rl.rewards.registry import load_reward
from r3_rl.rewards.reward_set import RewardSet
from r3_rl.rewards.self_consistency import agreement


class QuizPolicy(Policy):
    """P(yes) = 0.9 for questions mentioning 'cat' on a reddish image, 0.2 otherwise; records calls."""

    def __init__(self, bad: bool = False) -> None:
        self.calls: list[int] = []
        self.bad = bad

    def answer_yes_no(self, images, questions):
        self.calls.append(len(questions))
        if self.bad:
            return [1.5 for _ in questions]
        return [0.9 if ("cat" in q and im.image[..., 0].mean() > 128) else 0.2 for im, q in zip(images, questions)]

    def reason(self, *a, **k): raise NotImplementedError
    def generate(self, *a, **k): raise NotImplementedError
    def reflect(self, *a, **k): raise NotImplementedError
    def refine(self, *a, **k): raise NotImplementedError
    def segment_logprobs(self, *a, **k): raise NotImplementedError

    @property
    def model(self):
        raise NotImplementedError


RED = np.zeros((8, 8, 3), np.uint8) + np.array([200, 0, 0], np.uint8)
BLUE = np.zeros((8, 8, 3), np.uint8) + np.array([0, 0, 200], np.uint8)
CAT_NO_DOG = {"include": [{"class": "cat", "count": 1}], "exclude": [{"class": "dog", "count": 1}]}
TIIF = {"yn_question_list": ["Is there a cat?", "Is the sky green?", "Is there a dog?"], "yn_answer_list": ["Yes", "no", "yes"]}


def s(image, meta, history=None) -> RewardSample:
    return RewardSample(prompt="p", metadata=meta, stage="generate", round=0, image=image, history=history or [])


def test_agreement_soft_and_hard() -> None:
    assert agreement([0.9, 0.2], ["yes", "no"]) == pytest.approx((0.9 + 0.8) / 2)
    assert agreement([0.9, 0.6], ["yes", "no"], hard=True) == 0.5
    with pytest.raises(ValueError):
        agreement([0.5], ["yes", "no"])


def test_self_consistency_scores_by_hand() -> None:
    policy = QuizPolicy()
    rs = RewardSet.from_specs([{"name": "self_consistency", "options": {"batch_size": 2}}])
    assert rs.needs_policy
    rs.bind_policy(policy)
    out = rs.score([s(RED, CAT_NO_DOG), s(BLUE, CAT_NO_DOG), s(RED, TIIF), s(None, TIIF), s(RED, {"tag": "x"})])
    # red: cat? p=.9 (yes) ; dog? p=.2 (expected no -> .8)   blue: .2 and .8
    assert out[0].total == pytest.approx((0.9 + 0.8) / 2) and out[0].parts["self_consistency/accuracy"] == 1.0
    assert out[1].total == pytest.approx((0.2 + 0.8) / 2) and out[1].parts["self_consistency/accuracy"] == 0.5
    # TIIF: "Yes" matches case-insensitively; cat .9, green sky .2 -> .8, dog .2 (expected yes)
    assert out[2].total == pytest.approx((0.9 + 0.8 + 0.2) / 3) and out[2].parts["self_consistency/questions"] == 3
    assert out[3].total is None and "no image" in out[3].failures["self_consistency"]
    assert out[4].total is None and "no questions" in out[4].failures["self_consistency"]
    assert policy.calls == [2, 2, 2, 1]  # 7 questions in batches of 2


def test_self_consistency_hard_max_questions_and_failures() -> None:
    hard = load_reward("self_consistency", hard=True, max_questions=1)
    hard.bind_policy(QuizPolicy())
    assert hard([s(RED, TIIF)])[0].score == 1.0
    bad = load_reward("self_consistency")
    bad.bind_policy(QuizPolicy(bad=True))
    assert bad([s(RED, TIIF)])[0].failed
    unbound = RewardSet.from_specs([{"name": "self_consistency"}]).score([s(RED, TIIF)])[0]
    assert unbound.total is None and "bind_policy" in unbound.failures["self_consistency"]


def history(verdict: str, reward: float | None) -> list[Turn]:
    return [Turn("reason", 0, text="<think>plan</think>"), Turn("generate", 0, image=RED, reward=reward),
            Turn("reflect", 1, text=f"<think>look</think>{verdict}")]


def test_verdict_consistency_from_history_rewards() -> None:
    r = load_reward("verdict_consistency", correct_threshold=1.0)
    out = r([s(None, {}, history("No further edit needed.", 1.0)),  # stop on a correct image: agree
             s(None, {}, history("No further edit needed.", 0.5)),  # stop on a wrong image: disagree
             s(None, {}, history("Make the cat red.", 0.5)),  # edit a wrong image: agree
             s(None, {}, history("Make the cat red.", 1.0)),  # edit a correct image: disagree
             s(None, {}, history("Make the cat red.", None)),  # no task reward known, no task option
             s(None, {}, [Turn("generate", 0, image=RED, reward=1.0)])])  # no critique at all
    assert [o.score for o in out[:4]] == [1.0, 0.0, 1.0, 0.0]
    assert out[0].components == {"stop": 1.0, "correct": 1.0}
    assert out[4].failed and "no task reward" in out[4].failure
    assert out[5].failed and "no critique" in out[5].failure


def test_verdict_consistency_scores_missing_rewards_with_task(tmp_path: Path) -> None:
    f = tmp_path / "task.py"
    f.write_text("def redness(samples):\n    return [float(s.image[..., 0].mean() > 128) for s in samples]\n")
    r = load_reward("verdict_consistency", task={"name": f"{f}:redness"})
    blue_hist = [Turn("generate", 0, image=BLUE), Turn("reflect", 1, text="<think>x</think>Make it red."),
                 Turn("refine", 1, image=RED)]  # a refine sample: the critique is judged against the image before it
    out = r([s(RED, {}, history("no further edit needed", None)), s(RED, {}, blue_hist)])
    assert [o.score for o in out] == [1.0, 1.0]
    with pytest.raises(UserError, match="task must be"):
        load_reward("verdict_consistency", task="geneval")


def test_the_rollout_scorer_fills_turn_reward_for_verdict_consistency() -> None:
    """``Turn.reward`` is documented as the task reward the scorer already computed: the sample built from a
    scored tree carries it, so verdict_consistency needs no ``task`` option to re-score the image."""
    from r3_rl.rollout.scoring import reward_sample
    from r3_rl.trajectory import Node, PromptItem, Tree

    tree = Tree(id="t", prompt=PromptItem("p", "a red square"))
    tree.add(Node(id="root", parent=None, stage="generate", round=0, group_id="g0", policy_version=-1, image=RED,
                  reward=1.0))
    tree.add(Node(id="c0", parent="root", stage="reflect", round=1, group_id="g1", policy_version=0,
                  text="<think>fine</think> no further edit needed"))
    sample = reward_sample(tree, tree.nodes["c0"])
    assert [t.reward for t in sample.history] == [1.0, None]  # images carry their reward, texts none
    out = load_reward("verdict_consistency")([sample])
    assert not out[0].failed and out[0].score == 1.0  # a stop on a correct image


def test_verdict_consistency_stops_on_the_recipes_stop_phrase() -> None:
    """A real recipe stops on "no further edit" in any wording; verdict_consistency in its ``reflect.extra`` read
    "No further edit is needed." as an edit (its own default phrase) until the recipe's phrase reached it."""
    from r3_rl.config import load_recipe
    from r3_rl.rewards.reward_set import reward_specs

    recipes = Path(__file__).resolve().parents[1] / "recipes"
    extra = "rewards.reflect.extra=[{name: verdict_consistency, weight: 0.5}]"
    real = load_recipe(recipes / "grpo_geneval.yaml", [extra])
    (spec,) = reward_specs(real, real.rewards.reflect.extra)
    assert spec == {"name": "verdict_consistency", "weight": 0.5, "options": {"stop_phrase": "no further edit"}}
    reward = RewardSet.from_specs([spec]).members[0].reward
    out = reward([s(None, {}, history("No further edit is needed.", 1.0)),  # the reference's stop, correct image
                  s(None, {}, history("Make the cat red.", 1.0))])
    assert [o.score for o in out] == [1.0, 0.0]
    mine = load_recipe(recipes / "grpo_geneval.yaml",
                       ["rewards.reflect.extra=[{name: verdict_consistency, options: {stop_phrase: all good}}]"])
    # the entry's own phrase wins
    assert reward_specs(mine, mine.rewards.reflect.extra)[0]["options"] == {"stop_phrase": "all good"}
    tiny = load_recipe(recipes / "tiny_blocks.yaml", [extra])
    assert reward_specs(tiny, tiny.rewards.reflect.extra)[0]["options"] == {"stop_phrase": "no further edit needed"}
    # rewards that take no such option are passed through untouched
    assert reward_specs(tiny, tiny.rewards.task)[0]["options"] == tiny.rewards.task[0].options
    with pytest.raises(UserError, match="verdict_consistency option stop_phrase: '  ' is blank"):
        load_reward("verdict_consistency", stop_phrase="  ")  # in every critique: every critique would stop


def test_the_runs_reward_sets_carry_the_recipes_stop_phrase(tmp_path: Path) -> None:
    """Where the run builds its rewards (``Components``: the critique rewards of ``reflect.extra``, the eval's),
    not only ``reward_specs``: a real recipe's phrase reaches verdict_consistency."""
    from r3_rl.components import Components
    from r3_rl.config import load_recipe

    recipe = load_recipe(Path(__file__).resolve().parents[1] / "recipes" / "tiny_blocks.yaml",
                         ['templates.stop_phrase="no further edit"',
                          "rewards.reflect.extra=[{name: verdict_consistency, weight: 0.5}]",
                          "rewards.eval=[{name: blocks, options: {binary: true}}, {name: verdict_consistency}]"])
    parts = Components(recipe, tmp_path)
    assert [m.reward.stop_phrase for m in parts.scorer.reflect_extra.members] == ["no further edit"]
    assert [m.reward.stop_phrase for m in parts.eval_rewards.members if m.reward.name == "verdict_consistency"] \
        == ["no further edit"]
