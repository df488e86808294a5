"""Deterministic GenEval-style prompts for the Blocks world.

The prompt space is finite (3 shapes, 6 colours): every prompt of every tag is enumerated, each is
assigned to ``train`` or ``heldout`` by a stable hash of its text (stratified per tag so both splits
hold every tag), and prompts are drawn from a split's pool.  Texts and metadata follow GenEval's
``prompts/create_prompts.py`` and its jsonl files exactly:

* ``single_object``  "a photo of a square"                include [{class, count 1}]
* ``two_object``     "a photo of a square and a circle"   two different classes
* ``counting``       "a photo of three squares"           include count n, exclude count n + 1
* ``colors``         "a photo of a red square"            include [{class, count 1, color}]
* ``position``       "a photo of a circle right of a square"
                      include [{square, 1}, {circle, 1, position: ["right of", 0]}]
* ``color_attr``     "a photo of a red square and a blue circle"   different classes and colours

Metadata also carries ``prompt`` (GenEval's metadata lines do) so rewards can read it.
"""
from __future__ import annotations

import copy
import hashlib
import itertools
import math
from functools import lru_cache
from typing import Any, Iterator, Mapping

import numpy as np

from r3_rl.blocks.world import COLORS, PLURALS, SHAPES, article, number_word
from r3_rl.errors import UserError, close_match
from r3_rl.trajectory import PromptItem

TAGS: tuple[str, ...] = ("single_object", "two_object", "counting", "colors", "position", "color_attr")
SPLITS: tuple[str, ...] = ("train", "heldout")
DEFAULT_COUNTS: tuple[int, ...] = (2, 3, 4)  # GenEval counts two..four
DEFAULT_HELDOUT_FRACTION = 0.25
SPLIT_SALT = "blocks-v1"  # changing it reshuffles which prompts are held out


def _a(word: str) -> str:
    return f"{article(word)} {word}"


def _meta(tag: str, prompt: str, include: list[dict], exclude: list[dict] | None = None) -> dict[str, Any]:
    md: dict[str, Any] = {"tag": tag, "include": include}
    if exclude:
        md["exclude"] = exclude
    md["prompt"] = prompt
    return md


def enumerate_tag(tag: str, counts: tuple[int, ...] = DEFAULT_COUNTS) -> list[dict[str, Any]]:
    """Every metadata record of one tag, in a fixed order."""
    pairs = list(itertools.permutations(SHAPES, 2))
    out = []
    if tag == "single_object":
        for s in SHAPES:
            out.append(_meta(tag, f"a photo of {_a(s)}", [{"class": s, "count": 1}]))
    elif tag == "two_object":
        for a, b in pairs:
            out.append(_meta(tag, f"a photo of {_a(a)} and {_a(b)}", [{"class": a, "count": 1}, {"class": b, "count": 1}]))
    elif tag == "counting":
        for s in SHAPES:
            for n in counts:
                noun = PLURALS[s] if n != 1 else s
                out.append(_meta(tag, f"a photo of {number_word(n)} {noun}", [{"class": s, "count": n}],
                                 [{"class": s, "count": n + 1}]))
    elif tag == "colors":
        for s in SHAPES:
            for c in COLORS:
                out.append(_meta(tag, f"a photo of {_a(c)} {s}", [{"class": s, "count": 1, "color": c}]))
    elif tag == "position":
        for target, obj in pairs:
            for rel in ("left of", "right of", "above", "below"):
                out.append(_meta(tag, f"a photo of {_a(obj)} {rel} {_a(target)}",
                                 [{"class": target, "count": 1}, {"class": obj, "count": 1, "position": [rel, 0]}]))
    elif tag == "color_attr":
        for a, b in pairs:
            for ca, cb in itertools.permutations(COLORS, 2):
                out.append(_meta(tag, f"a photo of {_a(ca)} {a} and {_a(cb)} {b}",
                                 [{"class": a, "count": 1, "color": ca}, {"class": b, "count": 1, "color": cb}]))
    else:
        raise UserError(f"unknown blocks tag {tag!r}{close_match(tag, TAGS)}; valid tags: {', '.join(TAGS)}")
    return out


def _hash(text: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{SPLIT_SALT}:{text}".encode()).digest()[:8], "big")


@lru_cache(maxsize=64)
def _pools(counts: tuple[int, ...], heldout_fraction: float) -> dict[tuple[str, str], tuple[str, ...]]:
    """(split, tag) -> prompt texts.  Per tag, the prompts with the smallest hashes are held out."""
    out = {}
    for tag in TAGS:
        texts = sorted((md["prompt"] for md in enumerate_tag(tag, counts)), key=_hash)
        n_held = int(round(heldout_fraction * len(texts)))
        if len(texts) >= 2:
            n_held = min(max(n_held, 1), len(texts) - 1)  # both splits keep every tag
        out["heldout", tag] = tuple(texts[:n_held])
        out["train", tag] = tuple(texts[n_held:])
    return out


@lru_cache(maxsize=64)
def _by_text(counts: tuple[int, ...]) -> dict[str, dict[str, Any]]:
    return {md["prompt"]: md for tag in TAGS for md in enumerate_tag(tag, counts)}


def _check(split: str, tag_mix: Mapping[str, float] | None, counts: tuple[int, ...], frac: float) -> dict[str, float]:
    if split not in SPLITS:
        raise UserError(f"unknown blocks split {split!r}{close_match(split, SPLITS)}; valid: {', '.join(SPLITS)}")
    if not counts or any(not isinstance(n, int) or n < 1 for n in counts):
        raise UserError(f"blocks counts must be positive integers, got {list(counts)}")
    if not 0.0 < frac < 1.0:
        raise UserError(f"blocks heldout_fraction must lie in (0, 1), got {frac}")
    return check_tag_mix(tag_mix, "blocks tag_mix")


def check_tag_mix(tag_mix: Mapping[str, float] | None, what: str) -> dict[str, float]:
    """The tags drawn and their weights (all tags equally when None); ``what`` starts every error."""
    mix = dict(tag_mix) if tag_mix is not None else {t: 1.0 for t in TAGS}
    for tag, w in mix.items():
        if tag not in TAGS:
            raise UserError(f"{what}: unknown tag {tag!r}{close_match(tag, TAGS)}; valid tags: {', '.join(TAGS)}")
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w) or w < 0:
            raise UserError(f"{what}: weight of {tag!r} must be a finite number >= 0, got {w!r}")
    if sum(mix.values()) <= 0:
        raise UserError(f"{what}: at least one tag needs a positive weight")
    return {t: float(w) for t, w in mix.items() if w > 0}


def prompt_pool(split: str, tag: str, counts: tuple[int, ...] = DEFAULT_COUNTS,
                heldout_fraction: float = DEFAULT_HELDOUT_FRACTION) -> list[dict[str, Any]]:
    """All metadata records of ``tag`` in ``split`` (fixed order)."""
    counts = tuple(counts)
    _check(split, {tag: 1.0}, counts, heldout_fraction)
    by_text = _by_text(counts)
    return [by_text[t] for t in _pools(counts, heldout_fraction)[split, tag]]


def _item(md: dict[str, Any], split: str, index: int) -> PromptItem:
    md = copy.deepcopy(md)  # pools are cached; callers may mutate their copy
    return PromptItem(id=f"blocks-{split}-{index:06d}", prompt=md["prompt"], metadata=md, source="blocks")


def iter_prompts(split: str = "train", seed: int = 0, tag_mix: Mapping[str, float] | None = None,
                 counts: tuple[int, ...] = DEFAULT_COUNTS,
                 heldout_fraction: float = DEFAULT_HELDOUT_FRACTION) -> Iterator[PromptItem]:
    """Endless stream: tag drawn by ``tag_mix`` weight, then a prompt uniformly from that tag's pool."""
    counts = tuple(counts)
    mix = _check(split, tag_mix, counts, heldout_fraction)
    tags = list(mix)
    p = np.array([mix[t] for t in tags]) / sum(mix.values())
    pools = {t: prompt_pool(split, t, counts, heldout_fraction) for t in tags}
    rng = np.random.default_rng(seed)
    for index in itertools.count():
        pool = pools[tags[int(rng.choice(len(tags), p=p))]]
        yield _item(pool[int(rng.integers(len(pool)))], split, index)


def sample_prompts(n: int, split: str = "train", seed: int = 0, tag_mix: Mapping[str, float] | None = None,
                   counts: tuple[int, ...] = DEFAULT_COUNTS,
                   heldout_fraction: float = DEFAULT_HELDOUT_FRACTION) -> list[PromptItem]:
    """The first ``n`` prompts of :func:`iter_prompts` (i.i.d. draws, repeats possible)."""
    return list(itertools.islice(iter_prompts(split, seed, tag_mix, counts, heldout_fraction), n))


def heldout_prompts(size: int, seed: int = 0, tag_mix: Mapping[str, float] | None = None,
                    counts: tuple[int, ...] = DEFAULT_COUNTS,
                    heldout_fraction: float = DEFAULT_HELDOUT_FRACTION) -> list[PromptItem]:
    """A fixed evaluation list: per-tag quotas proportional to ``tag_mix`` (largest remainder), each
    tag cycling through its seeded shuffle of the held-out pool (so prompts repeat only after the
    whole pool was used, like GenEval's several samples per prompt).  Tags are interleaved."""
    counts = tuple(counts)
    mix = _check("heldout", tag_mix, counts, heldout_fraction)
    if size < 0:
        raise UserError(f"blocks heldout size must be >= 0, got {size}")
    tags = [t for t in TAGS if t in mix]
    total = sum(mix.values())
    exact = [size * mix[t] / total for t in tags]
    quota = [int(x) for x in exact]
    for i in sorted(range(len(tags)), key=lambda i: (-(exact[i] - quota[i]), i))[: size - sum(quota)]:
        quota[i] += 1
    rng = np.random.default_rng(seed)
    per_tag = {}
    for t, q in zip(tags, quota):
        pool = prompt_pool("heldout", t, counts, heldout_fraction)
        order = rng.permutation(len(pool))
        per_tag[t] = [pool[order[j % len(pool)]] for j in range(q)]
    out, index = [], 0
    for j in range(max(quota, default=0)):
        for t in tags:
            if j < len(per_tag[t]):
                out.append(_item(per_tag[t][j], "heldout", index))
                index += 1
    return out


def split_of(prompt: str, counts: tuple[int, ...] = DEFAULT_COUNTS,
             heldout_fraction: float = DEFAULT_HELDOUT_FRACTION) -> str | None:
    """Which split a prompt text belongs to (``None`` if it is not a Blocks prompt)."""
    pools = _pools(tuple(counts), heldout_fraction)
    for (split, _), texts in pools.items():
        if prompt in texts:
            return split
    return None
