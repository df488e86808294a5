"""The Tree-RL parent buffer keeps what rebuilds an image (token ids, PNG bytes), never the pixels.

A buffer of ``buffer_size: 2048`` Janus images (384x384) must checkpoint in at most 10 s and 200 MB; its
checkpoint is a safetensors file (no pickle), and save + load gives back the same parents, pixels included.
"""
from __future__ import annotations

import random
import time
import tracemalloc
from pathlib import Path

import numpy as np
import pytest

from r3_rl.rollout.buffer import BufferEntry, ParentBuffer
from r3_rl.trajectory import PromptItem

GRID, PATCH, CODEBOOK = 24, 16, 16384  # Janus-Pro: 24x24 VQ tokens of 16x16 pixels, 384x384 images
PALETTE = np.random.default_rng(0).integers(0, 256, size=(CODEBOOK, 3), dtype=np.uint8)


def vq_decode(tokens: list[int]) -> np.ndarray:
    """A stand-in for the VQ decoder: each token paints its 16x16 patch (deterministic, 384x384x3 uint8)."""
    grid = PALETTE[np.asarray(tokens).reshape(GRID, 1, GRID, 1)]  # [24, 1, 24, 1, 3]
    return np.ascontiguousarray(np.broadcast_to(grid, (GRID, PATCH, GRID, PATCH, 3))).reshape(384, 384, 3)


def entry(i: int, rng: np.random.Generator, tokens: bool = True, pixels: np.ndarray | None = None) -> BufferEntry:
    """Buffer entry ``i``: its image decoded from its tokens (or a copy of ``pixels``, which is cheaper)."""
    toks = rng.integers(0, CODEBOOK, GRID * GRID).tolist()
    if not tokens:
        image = rng.integers(0, 256, (12, 10, 3), dtype=np.uint8)
    else:
        image = vq_decode(toks) if pixels is None else pixels.copy()
    return BufferEntry(prompt=PromptItem(id=f"p{i}", prompt=f"a photo of {i} cats",
                                         metadata={"tag": "counting", "include": [{"class": "cat", "count": i}]}),
                       image=image, image_tokens=toks if tokens else None, reward=i / 7, correct=i % 3 == 0,
                       round=i % 3, source=f"t{i}/g0")


def same(a: BufferEntry, b: BufferEntry) -> bool:
    return (a.prompt == b.prompt and np.array_equal(a.image, b.image) and a.image_tokens == b.image_tokens
            and (a.reward, a.correct, a.round, a.source) == (b.reward, b.correct, b.round, b.source))


def test_round_trip_tokens_and_png(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    buf = ParentBuffer(4, decode=vq_decode)
    added = [entry(i, rng, tokens=i % 2 == 0) for i in range(12)]  # more than capacity: the oldest drop out
    for e in added:
        buf.add(e)
    assert len(buf) == 8
    assert all((s.tokens is None) == (s.png is not None) for s in (*buf.correct, *buf.flawed)), "tokens, not pixels"
    buf.save(tmp_path / "buffer.safetensors")
    back = ParentBuffer(1, decode=vq_decode)
    back.load(tmp_path / "buffer.safetensors")
    assert back.correct.maxlen == 4 and len(back) == 8
    a = buf.sample(32, 0.5, random.Random(3))
    b = back.sample(32, 0.5, random.Random(3))
    assert len(a) == 32 and all(same(x, y) for x, y in zip(a, b))
    kept = {e.source: e for e in added}
    assert all(same(x, kept[x.source]) for x in a), "drawn parents are the added ones, pixels rebuilt exactly"
    # no decoder: token images are kept as PNG (tokens too) and still come back exactly
    plain = ParentBuffer(4)
    plain.add(added[-2])
    assert [s.png is not None for s in (*plain.correct, *plain.flawed)] == [True]
    assert same(plain.sample(1, 0.5, random.Random(0))[0], added[-2])


def test_checkpoint_is_safetensors_not_pickle(tmp_path: Path) -> None:
    from safetensors import safe_open

    buf = ParentBuffer(8, decode=vq_decode)
    buf.add(entry(0, np.random.default_rng(0)))
    buf.save(tmp_path / "b.safetensors")
    with safe_open(str(tmp_path / "b.safetensors"), framework="pt") as f:
        assert set(f.keys()) == {"tokens", "png"} and f.metadata()["format"] == "1"
    (tmp_path / "bad.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}      ")
    with pytest.raises(Exception):
        ParentBuffer(8).load(tmp_path / "bad.safetensors")


@pytest.mark.parametrize("capacity", ["0", "10000001", "-3", "1e9"])
def test_a_capacity_no_recipe_could_set_is_refused(tmp_path: Path, capacity: str) -> None:
    """A saved capacity is a deque size allocated on load: the bound is the recipe's own for
    ``tree.buffer_size`` (an edited file cannot ask for more than a recipe could)."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    from r3_rl.validate import LIMITS

    buf = ParentBuffer(8, decode=vq_decode)
    buf.add(entry(0, np.random.default_rng(0)))
    buf.save(tmp_path / "b.safetensors")
    with safe_open(str(tmp_path / "b.safetensors"), framework="pt") as f:
        meta = dict(f.metadata())
    save_file(load_file(str(tmp_path / "b.safetensors")), str(tmp_path / "edited.safetensors"),
              metadata={**meta, "capacity": capacity})
    with pytest.raises(ValueError, match=f"capacity .* not a whole number in 1..{LIMITS['tree.buffer_size'][0]}"):
        ParentBuffer(8).load(tmp_path / "edited.safetensors")
    save_file(load_file(str(tmp_path / "b.safetensors")), str(tmp_path / "largest.safetensors"),
              metadata={**meta, "capacity": str(LIMITS["tree.buffer_size"][0])})
    largest = ParentBuffer(8)
    largest.load(tmp_path / "largest.safetensors")
    assert largest.correct.maxlen == LIMITS["tree.buffer_size"][0] and len(largest) == 1


def test_2048_janus_images_checkpoint_in_10s_and_200mb(tmp_path: Path) -> None:
    """buffer_size 2048 of 384x384 images: memory held, checkpoint time, its peak memory and file size."""
    rng = np.random.default_rng(0)
    buf = ParentBuffer(2048, decode=vq_decode)
    pixels = vq_decode(list(range(GRID * GRID)))
    tracemalloc.start()
    try:
        for i in range(2 * 2048):  # both pools full; every entry comes with its own 384x384 pixels
            e = entry(i, rng, pixels=pixels)
            e.correct = i % 2 == 0
            buf.add(e)
            if i == 63:  # fail early (before a pixel-keeping buffer could take GBs of a shared machine)
                assert tracemalloc.get_traced_memory()[0] < 200e6 * 64 / 4096, "the buffer keeps pixels"
        held = tracemalloc.get_traced_memory()[0]
        tracemalloc.reset_peak()
        t0 = time.perf_counter()
        buf.save(tmp_path / "buffer.safetensors")
        seconds = time.perf_counter() - t0
        save_peak = tracemalloc.get_traced_memory()[1] - held
    finally:
        tracemalloc.stop()
    size = (tmp_path / "buffer.safetensors").stat().st_size
    assert len(buf) == 4096
    # limits from the issue (10 s, 200 MB); measured here: ~0.1 s, ~15 MB held, ~25 MB file, on 2 shared cores
    assert seconds < 10.0, f"checkpoint took {seconds:.1f} s"
    assert held < 200e6 and save_peak < 200e6 and size < 200e6, (held, save_peak, size)
    t0 = time.perf_counter()
    back = ParentBuffer(1, decode=vq_decode)
    back.load(tmp_path / "buffer.safetensors")
    assert time.perf_counter() - t0 < 10.0
    a, b = buf.sample(8, 0.15, random.Random(5)), back.sample(8, 0.15, random.Random(5))
    assert all(same(x, y) for x, y in zip(a, b)) and a[0].image.shape == (384, 384, 3)
    assert all(np.array_equal(x.image, vq_decode(x.image_tokens)) for x in b), "pixels rebuilt from the tokens"


def test_checkpoints_of_formats_1_2_still_load() -> None:
    """Before the safetensors file the buffer sat in trainer.pt as entries with pixel lists."""
    from dataclasses import asdict

    rng = np.random.default_rng(2)
    added = [entry(i, rng, tokens=i % 2 == 0) for i in range(6)]
    legacy = {"capacity": 4, "correct": [], "flawed": []}
    for e in added:
        d = asdict(e)
        d["image"] = e.image.tolist()
        legacy["correct" if e.correct else "flawed"].append(d)
    buf = ParentBuffer(1, decode=vq_decode)
    buf.load_legacy(legacy)
    assert buf.correct.maxlen == 4 and len(buf) == 6
    kept = {e.source: e for e in added}
    assert all(same(x, kept[x.source]) for x in buf.sample(20, 0.5, random.Random(0)))


def test_a_format_2_checkpoint_resumes_with_its_buffer(tmp_path: Path) -> None:
    """Through the trainer: a checkpoint written before buffer.safetensors (the buffer as pixel lists inside
    trainer.pt) restores the same parents, read by the loop's own ``load_state_dict``."""
    import json
    from dataclasses import asdict

    import torch
    from conftest import REPO, tiny_overrides

    from r3_rl.config import load_recipe
    from r3_rl.learner.checkpoint import latest_checkpoint
    from r3_rl.trainer import Trainer

    recipe = load_recipe(REPO / "recipes" / "tiny_blocks.yaml", tiny_overrides(tmp_path, steps=1) + ["eval.size=2"])
    first = Trainer(recipe, tmp_path / "run")
    first.train()
    ckpt = latest_checkpoint(tmp_path / "run")
    state = ckpt / "state"
    saved = ParentBuffer(1, decode=first.buffer.decode)
    saved.load(state / "buffer.safetensors")
    assert len(saved) > 0
    legacy: dict = {"capacity": saved.correct.maxlen, "correct": [], "flawed": []}
    for pool in ("correct", "flawed"):  # what formats 1-2 wrote: every entry with its pixels as lists
        for s in getattr(saved, pool):
            e = saved._entry(s)
            legacy[pool].append({**asdict(e), "image": e.image.tolist()})
    old = torch.load(state / "trainer.pt", weights_only=True)
    torch.save({**old, "format": 2, "buffer": legacy}, state / "trainer.pt")
    (state / "buffer.safetensors").unlink()
    meta = json.loads((ckpt / "checkpoint.json").read_text())
    meta.pop("files")  # format 2 had no file list (session 34 added it)
    (ckpt / "checkpoint.json").write_text(json.dumps({**meta, "format": 2}))
    back = Trainer(recipe, tmp_path / "run2")
    back.resume(ckpt)
    assert len(back.buffer) == len(saved)
    a, b = back.buffer.sample(16, 0.5, random.Random(3)), saved.sample(16, 0.5, random.Random(3))
    assert [x.source for x in a] == [y.source for y in b]
    assert all(np.array_equal(x.image, y.image) and x.image_tokens == y.image_tokens for x, y in zip(a, b))


def test_adding_more_than_capacity_at_once_stores_only_the_survivors(monkeypatch) -> None:
    """add_many leaves the buffer as adding one by one does (each pool keeps its last ``capacity``), without
    encoding the images it would evict in the same call: 30 images into pools of 4 encode 8 PNGs, not 30."""
    from r3_rl.rollout import buffer as buffer_module

    rng = np.random.default_rng(0)
    entries = [entry(i, rng, tokens=False) for i in range(30)]
    one_by_one = ParentBuffer(4)
    for e in entries:
        one_by_one.add(e)
    encoded = []
    png = buffer_module._png
    monkeypatch.setattr(buffer_module, "_png", lambda image: (encoded.append(1), png(image))[1])
    at_once = ParentBuffer(4)
    at_once.add_many(iter(entries))
    assert len(encoded) == 8
    for a, b in ((one_by_one.correct, at_once.correct), (one_by_one.flawed, at_once.flawed)):
        assert [s.source for s in a] == [s.source for s in b] and [s.png for s in a] == [s.png for s in b]


@pytest.mark.parametrize("balance", ["pool", "tag"])
@pytest.mark.parametrize("fraction", [0.15, 0.5, 0.9])
def test_sample_draws_correct_parents_at_the_asked_rate(balance: str, fraction: float) -> None:
    """``tree.correct_parent_fraction`` of the parents the critic trains on are correct, from the whole pool or
    within each tag; an inverted draw (1 - fraction) once passed the whole suite (../shared/docs/findings.md).
    4000 draws: the rate is within 4 standard errors (2.3 points at 0.5)."""
    rng = np.random.default_rng(1)
    buffer = ParentBuffer(capacity=64)
    for i in range(60):  # a third correct (entry's i % 3 == 0); two tags, each with both kinds
        e = entry(i, rng, tokens=False)
        e.prompt.metadata["tag"] = "counting" if i % 2 else "colors"
        buffer.add(e)
    draws = buffer.sample(4000, fraction, random.Random(0), balance=balance)
    rate = sum(d.correct for d in draws) / len(draws)
    assert abs(rate - fraction) < 4 * (fraction * (1 - fraction) / len(draws)) ** 0.5, rate
