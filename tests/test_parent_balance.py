"""``tree.parent_balance: tag``: the refine stage's parents are balanced within every prompt tag.

From the global pools, easy tags give mostly correct parents and hard tags mostly flawed ones, so a critic
can earn its verdict reward by reading the prompt alone.  Balanced per tag, the tag carries no information
about the verdict.
"""
from __future__ import annotations

import random
from collections import Counter

import numpy as np

from r3_rl.rollout.buffer import BufferEntry, ParentBuffer
from r3_rl.trajectory import PromptItem


def _entry(i: int, tag: str | None, correct: bool) -> BufferEntry:
    metadata = {"tag": tag} if tag is not None else {}
    return BufferEntry(prompt=PromptItem(id=f"p{i}", prompt=f"prompt {i}", metadata=metadata),
                       image=np.full((2, 2, 3), i % 256, dtype=np.uint8), image_tokens=None, reward=float(correct),
                       correct=correct, round=0, source=f"t{i}/g0")


def _skewed_buffer() -> ParentBuffer:
    """``easy``: 60 correct, 4 flawed; ``hard``: 4 correct, 60 flawed; ``only_flawed``: 20 flawed."""
    buf = ParentBuffer(512)
    i = 0
    for tag, n_correct, n_flawed in (("easy", 60, 4), ("hard", 4, 60), ("only_flawed", 0, 20)):
        for correct, n in ((True, n_correct), (False, n_flawed)):
            for _ in range(n):
                buf.add(_entry(i, tag, correct))
                i += 1
    return buf


def _shares(parents: list[BufferEntry]) -> tuple[Counter, Counter]:
    tags = Counter(p.prompt.metadata["tag"] for p in parents)
    correct = Counter(p.prompt.metadata["tag"] for p in parents if p.correct)
    return tags, correct


def test_tag_balance_gives_every_tag_the_correct_fraction() -> None:
    n = 4000
    parents = _skewed_buffer().sample(n, 0.5, random.Random(0), balance="tag")
    assert len(parents) == n
    tags, correct = _shares(parents)
    assert set(tags) == {"easy", "hard"}, "a tag without both kinds of parent cannot be balanced: left out"
    for tag in ("easy", "hard"):
        assert abs(tags[tag] / n - 0.5) < 0.03  # tags drawn uniformly (binomial sd 0.008)
        assert abs(correct[tag] / tags[tag] - 0.5) < 0.04  # within the tag, half correct (sd 0.011)
    # the correct fraction is honoured within tags at other values too
    parents = _skewed_buffer().sample(n, 0.2, random.Random(1), balance="tag")
    tags, correct = _shares(parents)
    assert all(abs(correct[t] / tags[t] - 0.2) < 0.04 for t in ("easy", "hard"))


def test_pool_balance_lets_the_tag_tell_the_verdict() -> None:
    """The default draws from the global pools: the same buffer gives easy prompts' parents mostly correct."""
    n = 4000
    tags, correct = _shares(_skewed_buffer().sample(n, 0.5, random.Random(0)))
    assert correct["easy"] / tags["easy"] > 0.8 and correct["hard"] / tags["hard"] < 0.2


def test_tag_balance_falls_back_to_the_pools_without_a_tag_holding_both_kinds() -> None:
    buf = ParentBuffer(64)
    for i in range(10):
        buf.add(_entry(i, None if i % 2 else "counting", correct=i < 5))  # untagged prompts share the tag ""
    for i in range(10, 14):
        buf.add(_entry(i, "colors", correct=False))
    a = [p.source for p in buf.sample(50, 0.5, random.Random(7), balance="tag")]
    tags = Counter(p.prompt.metadata.get("tag", "") for p in buf.sample(2000, 0.5, random.Random(8), balance="tag"))
    assert set(tags) == {"", "counting"}  # both hold correct and flawed parents; "colors" only flawed ones
    only_correct = ParentBuffer(8)
    for i in range(3):
        only_correct.add(_entry(i, "colors", correct=True))
    b = [p.source for p in only_correct.sample(5, 0.5, random.Random(7), balance="tag")]
    c = [p.source for p in only_correct.sample(5, 0.5, random.Random(7), balance="pool")]
    assert b == c and len(b) == 5 and len(a) == 50


def _prompt_skewed_buffer() -> ParentBuffer:
    """One tag, two prompts: "four squares" drawn right 4 times in 64, "two squares" 60 times in 64; and a
    prompt only ever drawn wrong.  Balanced per tag the prompt still tells the verdict."""
    buf = ParentBuffer(512)
    i = 0
    for text, n_correct, n_flawed in (("four squares", 4, 60), ("two squares", 60, 4), ("three circles", 0, 20)):
        for correct, n in ((True, n_correct), (False, n_flawed)):
            for _ in range(n):
                buf.add(BufferEntry(prompt=PromptItem(id=f"p{i}", prompt=text, metadata={"tag": "counting"}),
                                    image=np.zeros((2, 2, 3), dtype=np.uint8), image_tokens=None,
                                    reward=float(correct), correct=correct, round=0, source=f"t{i}/g0"))
                i += 1
    return buf


def test_prompt_balance_gives_every_prompt_the_correct_fraction() -> None:
    n = 4000
    by_prompt = lambda ps: (Counter(p.prompt.prompt for p in ps),  # noqa: E731
                            Counter(p.prompt.prompt for p in ps if p.correct))
    seen, correct = by_prompt(_prompt_skewed_buffer().sample(n, 0.5, random.Random(0), balance="prompt"))
    assert set(seen) == {"four squares", "two squares"}, "a prompt without both kinds cannot be balanced: left out"
    for text in seen:
        assert abs(seen[text] / n - 0.5) < 0.03  # prompts drawn uniformly
        assert abs(correct[text] / seen[text] - 0.5) < 0.04  # within the prompt, half correct
    # balanced per tag, the same buffer still lets the prompt tell the verdict
    seen, correct = by_prompt(_prompt_skewed_buffer().sample(n, 0.5, random.Random(0), balance="tag"))
    assert correct["four squares"] / seen["four squares"] < 0.2 and correct["two squares"] / seen["two squares"] > 0.8


def test_prompt_balance_falls_back_to_the_pools_without_a_prompt_holding_both_kinds() -> None:
    buf = ParentBuffer(64)
    for i in range(6):
        buf.add(_entry(i, "counting", correct=i < 3))  # every prompt text differs: none holds both kinds
    a = [p.source for p in buf.sample(20, 0.5, random.Random(3), balance="prompt")]
    b = [p.source for p in buf.sample(20, 0.5, random.Random(3), balance="pool")]
    assert a == b and len(a) == 20
