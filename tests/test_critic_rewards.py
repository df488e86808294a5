"""Rewards that keep the critic honest: the verdict rule, extra reflect rewards (verdict_consistency), the same
reflect reward under PPO as under GRPO, and the parent buffer's correct/flawed mix."""
from __future__ import annotations

import random

import numpy as np
import pytest

from r3_rl.config import load_recipe
from r3_rl.errors import UserError
from r3_rl.learner.ppo_learner import stage_reward
from r3_rl.rewards.compose import CriticRule, improvement, reflect_own_reward, reflect_reward, verdict_term
from r3_rl.rewards.reward_set import RewardSet
from r3_rl.rollout.buffer import BufferEntry, ParentBuffer
from r3_rl.rollout.scoring import StageScorer
from r3_rl.trajectory import Node, PromptItem, Segment, Tree

RULE = CriticRule(stop_correct=1.0, stop_flawed=-0.5, edit_correct=-0.25)


def test_verdict_term_table() -> None:
    assert [verdict_term(c, s, RULE) for c, s in ((True, True), (False, True), (True, False), (False, False))] == [
        1.0, -0.5, -0.25, 0.0]
    # the reference's rule: a correct stop scores 1, a stop on a flawed image 0 (its improvement)
    assert improvement(1.0, 1.0, True) == 1.0 and improvement(0.5, 0.5, True) == 0.0
    assert improvement(0.5, 0.75, False) == pytest.approx(0.25) and improvement(1.0, 0.5, False) == -0.5
    # under RULE
    assert improvement(0.5, 0.5, True, 1.0, RULE) == -0.5
    assert improvement(1.0, 0.5, False, 1.0, RULE) == pytest.approx(-0.75)
    assert improvement(0.5, 1.0, False, 1.0, RULE) == pytest.approx(0.5)
    assert reflect_reward(0.5, 0.5, True, True, 0.1, 1.0, RULE) == pytest.approx(0.1 - 0.5)
    assert reflect_reward(0.5, 0.5, True, False, 0.1, 1.0, RULE) == 0.0  # malformed critique: gated by format
    assert reflect_reward(None, 0.5, True, True, 0.1, 1.0, RULE) is None  # failure propagates


def _seg() -> Segment:
    return Segment(modality="text", context={"input_ids": [1]}, token_ids=[2, 3], logprobs=[-1.0, -1.0])


def bc_tree(parent_reward: float, verdicts: list[tuple[bool, float]]) -> Tree:
    """A refine-stage group on one parent: (stop, refined reward) per sibling, critiques well formed."""
    t = Tree(id="BC", prompt=PromptItem("p", "a photo of a square", {"include": [{"class": "square", "count": 1}]}))
    t.add(Node(id="root", parent=None, stage="generate", round=0, group_id="BC/root", policy_version=-1,
               image=np.zeros((32, 32, 3), np.uint8), reward=parent_reward))
    for j, (stop, r) in enumerate(verdicts):
        text = "<think> x </think> " + ("no further edit needed" if stop else "add a square")
        t.add(Node(id=f"c{j}", parent="root", stage="reflect", round=1, group_id="BC/reflect", policy_version=0,
                   segment=_seg(), text=text, stop=stop))
        t.add(Node(id=f"r{j}", parent=f"c{j}", stage="refine", round=1, group_id="BC/refine", policy_version=0,
                   segment=None if stop else _seg(), image=np.zeros((32, 32, 3), np.uint8),
                   reward=parent_reward if stop else r, meta={"copied": True} if stop else {}))
    return t


def scorer(extra: list[dict] | None = None) -> StageScorer:
    return StageScorer(RewardSet([]), 0.1, r"^<think>.*</think>$", r"^<think>.*</think>.+$", 1.0, RULE,
                       RewardSet.from_specs(extra or []))


def test_scorer_applies_the_rule_and_verdict_consistency() -> None:
    flawed = bc_tree(0.5, [(True, 0.5), (False, 1.0), (False, 0.25)])
    scorer([{"name": "verdict_consistency", "weight": 0.5}]).compose(flawed)
    n = flawed.nodes
    # stop on a flawed image: 0.1 format - 0.5 rule, and verdict_consistency 0 (wrong verdict)
    assert n["c0"].reward == pytest.approx(0.1 - 0.5 + 0.0)
    # edits of a flawed image: improvement, plus 0.5 x 1 for the right verdict
    assert n["c1"].reward == pytest.approx(0.1 + 0.5 + 0.5) and n["c2"].reward == pytest.approx(0.1 - 0.25 + 0.5)
    assert n["c1"].rewards["verdict_consistency"] == 1.0 and n["c1"].rewards["extra"] == 0.5
    correct = bc_tree(1.0, [(True, 1.0), (False, 0.5)])
    scorer().compose(correct)
    assert correct.nodes["c0"].reward == pytest.approx(1.1)
    assert correct.nodes["c1"].reward == pytest.approx(0.1 - 0.5 - 0.25)


def test_ppo_rewards_a_verdict_as_grpo_does() -> None:
    """PPO gives the improvement to the refine step and the verdict's own reward to the critique: their sum along
    a chain is the GRPO critique reward (format-gated improvement aside), and a stop scores the rule's value."""
    for parent in (1.0, 0.5):
        t = bc_tree(parent, [(True, parent), (False, 0.75)])
        scorer([{"name": "verdict_consistency", "weight": 0.5}]).compose(t)
        n = t.nodes
        stop_ppo = stage_reward(t, n["c0"], 0.1)
        assert stop_ppo == pytest.approx(n["c0"].reward)  # a stop ends the chain: one reward, the same
        edit_ppo = stage_reward(t, n["c1"], 0.1) + stage_reward(t, n["r1"], 0.1)
        assert edit_ppo == pytest.approx(n["c1"].reward)
    assert stage_reward(t, n["c0"], 0.1) == pytest.approx(0.1 - 0.5)  # stop on the flawed parent: the penalty
    assert reflect_own_reward({"format": 1.0}, 0.1) is None  # unscored critique: unknown, never 0


def test_an_edit_that_leaves_a_flawed_image_no_better_can_score_as_a_stop() -> None:
    """``edit_flawed_unimproved``: under a stop penalty an edit that changes nothing ("make the yellow square
    yellow" on a green square) scores 0, above the stop's -1; with the option it scores what the stop does (the
    same worse edit one step lower still), and an edit that helps keeps its improvement.  PPO sums to the same."""
    rule = CriticRule(stop_correct=1.0, stop_flawed=-1.0, edit_correct=-0.5, edit_flawed_unimproved=-1.0)
    assert verdict_term(False, False, rule, improved=False) == -1.0
    assert verdict_term(False, False, rule, improved=True) == 0.0
    assert verdict_term(False, False, rule) == 0.0  # unknown: counted as improved
    assert verdict_term(True, False, rule, improved=False) == -0.5  # correct parents keep edit_correct alone
    assert improvement(0.5, 0.5, False, 1.0, rule) == improvement(0.5, 0.5, True, 1.0, rule) == -1.0
    assert improvement(0.5, 0.25, False, 1.0, rule) == pytest.approx(-1.25)
    assert improvement(0.5, 0.75, False, 1.0, rule) == pytest.approx(0.25)
    assert improvement(0.5, 0.5, False, 1.0, CriticRule(stop_flawed=-1.0)) == 0.0  # the loophole, option off
    s = StageScorer(RewardSet([]), 0.1, r"^<think>.*</think>$", r"^<think>.*</think>.+$", 1.0, rule)
    t = bc_tree(0.5, [(True, 0.5), (False, 0.5), (False, 0.25), (False, 1.0)])
    s.compose(t)
    n = t.nodes
    assert [n[f"c{j}"].reward for j in range(4)] == pytest.approx([0.1 - 1.0, 0.1 - 1.0, 0.1 - 1.25, 0.1 + 0.5])
    for j in range(1, 4):
        assert stage_reward(t, n[f"c{j}"], 0.1) + stage_reward(t, n[f"r{j}"], 0.1) == pytest.approx(n[f"c{j}"].reward)


def test_the_recipe_key_reaches_the_scorer(tmp_path) -> None:
    from r3_rl.components import Components

    path = tmp_path / "r.yaml"
    path.write_text("name: t\npolicy: {kind: tiny}\nrewards: {reflect: {stop_flawed: -1.0, edit_flawed_unimproved: -1.0}}\n")
    rule = Components(load_recipe(path), tmp_path).scorer.rule
    assert rule == CriticRule(stop_correct=1.0, stop_flawed=-1.0, edit_correct=0.0, edit_flawed_unimproved=-1.0)


def test_failed_extra_reward_fails_the_critique() -> None:
    t = bc_tree(0.5, [(True, 0.5), (False, 1.0)])
    t.nodes["root"].reward = None  # verdict_consistency cannot judge without the parent's reward
    s = scorer([{"name": "verdict_consistency"}])
    s.compose(t)
    assert t.nodes["c0"].reward is None and "verdict_consistency" in t.nodes["c0"].reward_failures
    assert s.failures.failed == 2


def _entry(correct: bool) -> BufferEntry:
    return BufferEntry(prompt=PromptItem("p", "x"), image=np.zeros((1, 1, 3), np.uint8), image_tokens=None,
                       reward=1.0 if correct else 0.0, correct=correct, round=0)


@pytest.mark.parametrize("fraction", [0.15, 0.5, 0.9])
def test_parent_buffer_draws_correct_parents_at_the_configured_rate(fraction: float) -> None:
    buf = ParentBuffer(64)
    for k in range(40):
        buf.add(_entry(k % 4 == 0))  # 10 correct, 30 flawed: the pools' sizes must not matter
    drawn = buf.sample(20000, fraction, random.Random(0))
    share = sum(e.correct for e in drawn) / len(drawn)
    assert share == pytest.approx(fraction, abs=0.015)  # binomial sd <= 0.0036


def test_parent_buffer_falls_back_to_the_other_kind() -> None:
    buf = ParentBuffer(8)
    buf.add(_entry(False))
    assert all(not e.correct for e in buf.sample(10, 1.0, random.Random(0)))
    assert ParentBuffer(8).sample(3, 0.5, random.Random(0)) == []


def test_recipe_reflect_keys_are_checked(repo, tmp_path) -> None:  # noqa: ANN001
    r = load_recipe(repo / "recipes" / "tiny_blocks.yaml", ["rewards.reflect.stop_flawed=-0.3"])
    assert r.rewards.reflect.stop_flawed == -0.3
    with pytest.raises(UserError, match="unknown key 'rewards.reflect.stop_flaw'"):
        load_recipe(repo / "recipes" / "tiny_blocks.yaml", ["rewards.reflect.stop_flaw=-0.3"])


def test_correct_part_judges_images_as_the_eval_does() -> None:
    """Partial credit gives two squares for "a photo of a square" 0, GenEval calls it correct: with
    ``correct_part: blocks/correct`` the critic's verdict (and the buffer split) follow GenEval."""
    from r3_rl.blocks import codec

    grid = np.zeros((4, 4), np.int64)
    grid[0, 0] = grid[2, 2] = 1  # two red squares
    t = bc_tree(0.0, [(True, 0.0)])
    g = Tree(id="A", prompt=t.prompt)
    g.add(Node(id="g0", parent=None, stage="generate", round=0, group_id="A/g", policy_version=0,
               segment=_seg(), image=codec.encode(grid)))
    task = RewardSet.from_specs([{"name": "blocks"}])
    plain = StageScorer(task, 0.1, ".*", ".*", 1.0, RULE)
    plain.score_images([(g, g.nodes["g0"])])
    assert g.nodes["g0"].reward == 0.0 and g.nodes["g0"].meta["correct"] is False
    by_part = StageScorer(task, 0.1, ".*", ".*", 1.0, RULE, correct_part="blocks/correct")
    by_part.score_images([(g, g.nodes["g0"])])
    assert g.nodes["g0"].reward == 0.0 and g.nodes["g0"].meta["correct"] is True
    # a critique's verdict is judged by the parent's flag: a stop on it is a correct stop
    t.nodes["root"].meta["correct"] = True
    by_part.compose(t)
    assert t.nodes["c0"].rewards["verdict_term"] == RULE.stop_correct
    with pytest.raises(UserError, match="correct_part: 'blocks/right' is not a part of the task reward"):
        StageScorer(task, 0.1, ".*", ".*", 1.0, RULE, correct_part="blocks/right").score_images(
            [(g, g.nodes["g0"])])


def test_critic_flaw_kinds_groups_critiques_by_the_parents_first_fix() -> None:
    """``benchmarks/critic_flaw_kinds.py``: a green-circle prompt, a red circle (a recolour flaw) critiqued three
    times (all stop: no right verdict) and a green circle critiqued twice (one stop: one right verdict)."""
    import importlib.util
    from pathlib import Path

    from r3_rl.blocks import world
    from r3_rl.trajectory import Node, PromptItem, Tree

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "critic_flaw_kinds.py"
    spec = importlib.util.spec_from_file_location("critic_flaw_kinds", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    md = {"tag": "colors", "include": [{"class": "circle", "count": 1, "color": "green"}]}
    tree = Tree(id="t", prompt=PromptItem(id="p", prompt="a photo of a green circle", metadata=md))
    for img, colour, stops in (("bad", "red", [True, True, True]), ("good", "green", [True, False])):
        grid = world.empty_grid()
        grid[0, 0] = world.token_of("circle", colour)
        tree.add(Node(id=img, parent=None, stage="generate", round=0, group_id="g", policy_version=0,
                      image_tokens=grid.reshape(-1).tolist()))
        for j, stop in enumerate(stops):
            tree.add(Node(id=f"{img}{j}", parent=img, stage="reflect", round=1, group_id=f"{img}/c",
                          policy_version=0, stop=stop))
    assert dict(mod.critique_groups([tree], (4, 4))) == {"recolor": [(0, 3)], "correct": [(1, 2)]}


def test_critic_probe_counts_each_flaw_kind_and_reads_the_critics_verdict() -> None:
    """``benchmarks/critic_probe.py`` on a scripted critic that stops exactly on correct images: every kind's
    stop rate is 1 on ``correct`` and 0 on each flaw, and each layout counts every image once."""
    import importlib.util
    from pathlib import Path

    from r3_rl.blocks import edits
    from r3_rl.config import Recipe
    from r3_rl.data import BlocksPrompts
    from r3_rl.policy.base import TextSample

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "critic_probe.py"
    spec = importlib.util.spec_from_file_location("critic_probe", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)

    class TruthfulCritic:
        rows, cols = 4, 4
        seen: set[str] = set()

        def reflect(self, prompts, images, sampling):  # noqa: ANN001, ANN201
            out = []
            for p, im in zip(prompts, images):
                self.seen.add(p.prompt)
                grid = np.asarray(im.image_tokens).reshape(4, 4)
                out.append(TextSample(text=edits.critique_text(grid, p.metadata), segment=None))
            return out

    rates = mod.stop_rates(TruthfulCritic(), BlocksPrompts(tags=Recipe().data.blocks.tags, seed=3), 150)
    for layout in ("canonical", "random"):
        assert sum(total for (lay, _), (total, _) in rates.items() if lay == layout) == 150
    assert {kind for _, kind in rates} >= {"correct", "add", "recolor"}
    assert all(rate == (1.0 if kind == "correct" else 0.0) for (_, kind), (_, rate) in rates.items())
    counting = BlocksPrompts(tags={"counting": 1.0}, seed=3)
    held = {item.prompt for item in counting.held_out(50)}
    critic = TruthfulCritic()
    critic.seen = set()
    rates = mod.stop_rates(critic, counting, 50, split="heldout")  # the eval's prompts, none of training's
    assert critic.seen == held and not held & {counting.train_prompt(k).prompt for k in range(200)}
    assert sum(total for (lay, _), (total, _) in rates.items() if lay == "random") == 50


@pytest.mark.parametrize("extra, says", [
    ("[{name: verdict_consistency, options: {correct_treshold: 0.5}}]",
     "unknown option 'correct_treshold' (did you mean 'correct_threshold'?)"),
    ("[{name: verdict_consistency, options: {task: geneval}}]", "option task must be {name: <reward>"),
    ("[{name: verdict_consistancy}]", "did you mean 'verdict_consistency'?"),
])
def test_a_bad_reflect_extra_is_a_recipe_error_before_any_work(extra: str, says: str) -> None:
    """rewards.reflect.extra is checked with the task and eval rewards, before the warm start (it once was not:
    a misspelt option surfaced only when the first critique was scored, minutes in)."""
    from pathlib import Path

    from r3_rl.validate import validate_recipe

    path = Path(__file__).resolve().parents[1] / "recipes" / "tiny_blocks.yaml"
    recipe = load_recipe(path, [f"rewards.reflect.extra={extra}"])
    with pytest.raises(UserError, match=r"tiny_blocks.yaml: rewards.reflect.extra: ") as err:
        validate_recipe(recipe, path)
    assert says in str(err.value) and "\n" not in str(err.value)


def test_critic_probe_names_a_folder_that_is_no_saved_policy_in_one_line_and_exits_2(tmp_path) -> None:  # noqa: ANN001
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "critic_probe.py"
    res = subprocess.run([sys.executable, str(script), str(tmp_path / "missing")], capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 2 and res.stdout == "" and "Traceback" not in res.stderr
    assert res.stderr.strip().startswith("critic_probe: error: ") and "no config.json" in res.stderr
    assert res.stderr.strip().count("\n") == 0
