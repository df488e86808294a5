"""``r3-rl plan``'s host-memory lines for the images the trainer keeps -- the full Tree-RL parent buffer and one
eval's chains -- against what the real code holds: a :class:`ParentBuffer` filled past its capacity, and the R3
chains a tiny BAGEL (flow images, PNG contexts) and the tiny Janus-like policy (token contexts) sample with every
critique editing."""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from r3_rl.config import load_recipe
from r3_rl.plan import memory
from r3_rl.plan.report import make_plan
from r3_rl.rollout.buffer import BufferEntry, ParentBuffer
from r3_rl.trajectory import PromptItem

REPO = Path(__file__).resolve().parents[1]
BAGEL = REPO / "recipes" / "grpo_geneval_bagel.yaml"
JANUS = REPO / "recipes" / "grpo_geneval.yaml"
TINY_OPTIONS = ("{image_size: 32, gen_steps: 6, edit_steps: 6, ode_steps: 4, vit_size: [32, 16, 4], "
                "vae_size: [32, 16, 16]}")


def _entries(n: int, side: int, tokens: int | None, seed: int = 0) -> list[BufferEntry]:
    rng = np.random.default_rng(seed)
    return [BufferEntry(PromptItem(id=str(i), prompt="p"), rng.integers(0, 256, (side, side, 3), dtype=np.uint8),
                        None if tokens is None else list(rng.integers(0, 1000, tokens)), 0.0, bool(i % 2), 0)
            for i in range(n)]


def _stored_bytes(buffer: ParentBuffer) -> int:
    kept = [*buffer.correct, *buffer.flawed]
    return sum((0 if s.png is None else len(s.png)) + (0 if s.tokens is None else s.tokens.nbytes) for s in kept)


def test_a_full_parent_buffer_is_what_the_plan_counts() -> None:
    """BAGEL's parents are PNG bytes (noise: PNG's worst case, so the bound is nearly reached); Janus' are int32
    token ids (its decoder rebuilds the pixels); the shipped recipes' figures at 2048 places of each kind."""
    bagel = replace(make_plan(load_recipe(BAGEL), 8, 80).shape, image_side=32)
    png = ParentBuffer(capacity=6)
    png.add_many(_entries(20, 32, None))  # more than fit: the oldest go
    planned = memory.parent_buffer(bagel, 6)
    assert 0.95 * planned <= _stored_bytes(png) <= planned

    janus = make_plan(load_recipe(JANUS), 8, 80).shape
    tokens = ParentBuffer(capacity=6, decode=lambda ids: np.zeros((janus.image_side, janus.image_side, 3)))
    tokens.add_many(_entries(20, 8, janus.image_tokens))
    assert _stored_bytes(tokens) == memory.parent_buffer(janus, 6) == 2 * 6 * 576 * 4

    # the shipped recipes (buffer_size 2048): BAGEL's 512 px PNGs at most 3.2 GB, Janus' token ids 9.4 MB
    assert make_plan(load_recipe(BAGEL), 8, 80).host["the trainer's parent buffer, full"] == pytest.approx(3.22e9, rel=0.01)
    assert make_plan(load_recipe(JANUS), 8, 80).host["the trainer's parent buffer, full"] == 2 * 2048 * 576 * 4


def _chain_bytes(trees: list) -> int:
    """Pixels of every image in the chains, plus every base64 PNG their segments' contexts carry (a dict the
    rows share counted once)."""
    seen: set[int] = set()
    total = 0
    for tree in trees:
        for node in tree.nodes.values():
            if node.image is not None:
                total += node.image.nbytes
            images = node.segment.context.get("images", {}) if node.segment is not None else {}
            if id(images) not in seen:
                seen.add(id(images))
                total += sum(len(ref.get("png", "")) for ref in images.values())
    return total


@pytest.mark.parametrize("kind", ["bagel", "tiny"])
def test_one_evals_chains_are_what_the_plan_counts(kind: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every critique edits (the parser is forced), so each chain holds rounds + 1 images and, for BAGEL, a PNG
    copy of each critiqued image in the critique's context and another in the edit's: the plan's figure is an
    upper bound that the chains nearly reach.  Counting pixels only would fall short of BAGEL's by half."""
    import torch

    from r3_rl.policy.registry import build_policy
    from r3_rl.rollout import chain
    from r3_rl.rollout.chain import r3_chains
    from r3_rl.rollout.tree_rl import stage_sampling

    torch.manual_seed(0)
    if kind == "bagel":
        from r3_rl.policy.bagel.tiny import make_tiny_bagel

        tiny = make_tiny_bagel(tmp_path / "tiny", seed=0)
        recipe = load_recipe(BAGEL, [f"policy.model={tiny}", "policy.device=cpu", "policy.dtype=float32",
                                     f"policy.options={TINY_OPTIONS}", "rollout.reason.max_new_tokens=4",
                                     "rollout.reflect.max_new_tokens=4"])
    else:
        recipe = load_recipe(REPO / "recipes" / "tiny_blocks.yaml")
    policy = build_policy(recipe)
    monkeypatch.setattr(chain, "parse_critique", lambda text, stop: ("make it red", False))
    prompts, rounds = [PromptItem(id=str(i), prompt=f"a photo of {i + 1} red cubes") for i in range(3)], 2
    trees = r3_chains(policy, prompts, stage_sampling(recipe, eval_mode=True), rounds, "no further edit needed")
    assert all(len([n for n in t.nodes.values() if n.image is not None]) == rounds + 1 for t in trees)

    shape = make_plan(recipe, 1, 80).shape
    side = trees[0].nodes["img0"].image.shape[0]
    planned = memory.eval_chains(replace(shape, image_side=side), len(prompts), rounds)
    measured = _chain_bytes(trees)
    assert 0.6 * planned <= measured <= planned
    pixels = len(prompts) * (rounds + 1) * 3 * side ** 2
    assert (measured > 1.5 * pixels) == (kind == "bagel")
