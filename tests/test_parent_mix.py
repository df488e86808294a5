"""What a parent's tag, prompt or round alone tells the critic's verdict (:mod:`r3_rl.rollout.parent_mix`).

The formula is checked on hand-computed cases and against the buffer's own sampler: the best one-feature
rule, fitted on many parents that ``ParentBuffer.sample`` draws, must score what the formula predicts.
"""
from __future__ import annotations

import math
import random
from collections import Counter

import numpy as np
import pytest

from r3_rl.rollout.buffer import BufferEntry, ParentBuffer
from r3_rl.rollout.parent_mix import parent_feature, shortcut_balanced_accuracy
from r3_rl.trajectory import PromptItem


def _entry(i: int, tag: str, rnd: int, correct: bool, prompt: str | None = None) -> BufferEntry:
    return BufferEntry(prompt=PromptItem(id=f"p{i}", prompt=prompt or f"prompt {i % 7}", metadata={"tag": tag}),
                       image=np.zeros((2, 2, 3), dtype=np.uint8), image_tokens=None, reward=float(correct),
                       correct=correct, round=rnd, source=f"t{i}/n")


def test_hand_computed_case() -> None:
    # correct parents: rounds 0, 0, 0, 1; flawed: 1, 1, 2, 0.  c = {0: 3/4, 1: 1/4}, f = {0: 1/4, 1: 1/2, 2: 1/4}:
    # say "flawed" on rounds 1 and 2 -> (3/4 + 1/2 + 1/4) / 2 = 0.75
    assert shortcut_balanced_accuracy([([0, 0, 0, 1], [1, 1, 2, 0])]) == pytest.approx(0.75)
    # two groups drawn equally often, each its own mix: c = {a: 1/2 + 1/2 * 1/2, b: 1/2 * 1/2} = {a: 3/4, b: 1/4},
    # f = {b: 1/2 + 1/2 * 3/4, a: 1/2 * 1/4} = {b: 7/8, a: 1/8} -> (3/4 + 7/8) / 2 = 13/16
    assert shortcut_balanced_accuracy([(["a"], ["b"]), (["a", "b"], ["a", "b", "b", "b"])]) == pytest.approx(13 / 16)


def test_bounds() -> None:
    assert shortcut_balanced_accuracy([([1, 2, 3], [3, 2, 1])]) == pytest.approx(0.5)  # the same mix: nothing told
    assert shortcut_balanced_accuracy([(["x"] * 5, ["y"] * 2)]) == pytest.approx(1.0)  # the value is the verdict
    # a group is the feature's own key (balanced by it): within each, one value, so nothing told
    assert shortcut_balanced_accuracy([(["a"] * 9, ["a"]), (["b"], ["b"] * 9)]) == pytest.approx(0.5)
    assert math.isnan(shortcut_balanced_accuracy([]))
    assert math.isnan(shortcut_balanced_accuracy([([0], [])]))  # no group with both kinds
    with pytest.raises(ValueError, match="valid are tag, prompt, round"):
        parent_feature(_entry(0, "t", 0, True), "colour")


def _depth_skewed_buffer() -> ParentBuffer:
    """As after RL: correct parents mostly first images, flawed ones mostly refined images; tags skewed too."""
    buf = ParentBuffer(4096)
    i = 0
    for tag, rnd, n_correct, n_flawed in (("easy", 0, 300, 40), ("easy", 1, 20, 60), ("easy", 2, 10, 90),
                                          ("hard", 0, 100, 120), ("hard", 1, 10, 80), ("hard", 2, 5, 110)):
        for correct, n in ((True, n_correct), (False, n_flawed)):
            for _ in range(n):
                buf.add(_entry(i, tag, rnd, correct))
                i += 1
    return buf


def _fitted_rule_accuracy(parents: list[BufferEntry], feature: str) -> float:
    """Balanced accuracy of the best one-feature rule fitted on the drawn parents themselves."""
    correct = Counter(parent_feature(p, feature) for p in parents if p.correct)
    flawed = Counter(parent_feature(p, feature) for p in parents if not p.correct)
    nc, nf = sum(correct.values()), sum(flawed.values())
    return 0.5 * sum(max(correct[v] / nc, flawed[v] / nf) for v in set(correct) | set(flawed))


@pytest.mark.parametrize("balance", ["pool", "tag", "prompt"])
def test_formula_matches_the_buffers_own_draw(balance: str) -> None:
    buf = _depth_skewed_buffer()
    predicted = buf.shortcut_accuracy(balance)
    parents = buf.sample(40_000, 0.5, random.Random(3), balance=balance)
    for feature in ("tag", "prompt", "round"):
        assert _fitted_rule_accuracy(parents, feature) == pytest.approx(predicted[feature], abs=0.01), feature
    if balance == "tag":
        assert predicted["tag"] == pytest.approx(0.5)  # balanced by tag: the tag tells nothing ...
    assert predicted["round"] > 0.7  # ... but the round still gives most verdicts away, whatever the balance


def test_depth_shortcut_on_the_pool_draw_exactly() -> None:
    buf = _depth_skewed_buffer()
    c = {0: 400 / 445, 1: 30 / 445, 2: 15 / 445}
    f = {0: 160 / 500, 1: 140 / 500, 2: 200 / 500}
    assert buf.shortcut_accuracy("pool")["round"] == pytest.approx(0.5 * sum(max(c[r], f[r]) for r in c))
    assert all(math.isnan(v) for v in ParentBuffer(8).shortcut_accuracy("pool").values())


def test_the_shortcut_is_the_same_number_in_every_process() -> None:
    """Feature values are prompts (strings), whose set order changes with PYTHONHASHSEED, so a plain sum over the
    set gave other last digits in another process -- a resumed run logged 0.8200000000000001 where the straight
    run had 0.8200000000000002.  Three processes, three hash seeds, one number."""
    import subprocess
    import sys

    code = ("from r3_rl.rollout.parent_mix import shortcut_balanced_accuracy as s\n"
            "groups = [([f'p{i}' for i in range(40) if i % 3], [f'p{i}' for i in range(40) if i % 7]),\n"
            "          ([f'q{i}' for i in range(25)], [f'q{i}' for i in range(0, 25, 2)])]\n"
            "print(repr(s(groups)))")
    outs = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                           env={**__import__("os").environ, "PYTHONHASHSEED": seed}).stdout for seed in "123"}
    assert len(outs) == 1, outs
