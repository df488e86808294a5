"""benchmarks/colour_binding.py: the teacher-forced colour probabilities, against the warm start's own loss, and
on a refiner taught to recolour (the figure rises from chance to near 1)."""
from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from r3_rl.blocks.world import COLORS, token_of
from r3_rl.config import Templates
from r3_rl.policy.base import ImageInput
from r3_rl.policy.tiny import TinyUnifiedPolicy
from r3_rl.policy.tiny_tokenizer import image_token
from r3_rl.policy.warmstart import sft_loss

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "colour_binding.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("colour_binding", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)  # type: ignore[union-attr]
    return mod


def tiny() -> TinyUnifiedPolicy:
    return TinyUnifiedPolicy.build(Templates().model_dump(), rows=4, cols=4, hidden_size=32, num_layers=1,
                                   num_heads=2, intermediate_size=64, max_positions=128, seed=1)


def one_object(policy: TinyUnifiedPolicy, shape: str, colour: str) -> str:
    """Image words of a 4x4 grid holding one ``colour`` ``shape`` in its top-left cell, built here rather than by
    the benchmark's own helper, so the peer contexts below do not share its code."""
    grid = np.zeros(16, dtype=np.int64)
    grid[0] = token_of(shape, colour)
    return policy.image_words(ImageInput(image=np.zeros(0), image_tokens=grid.tolist()))


def refine_example(policy: TinyUnifiedPolicy, prompt: str, shape: str, want: str,
                   drawn: str) -> tuple[list[int], list[int]]:
    words = one_object(policy, shape, drawn)
    return (policy.render("refine", prompt=prompt, image=words, instruction=f"make the {shape} {want}"),
            policy.encode(image_token(token_of(shape, want))))


def teach(policy: TinyUnifiedPolicy, examples: list[tuple[list[int], list[int]]]) -> None:
    """150 full-batch AdamW steps of the warm start's loss on ``examples``."""
    opt = torch.optim.AdamW(policy.model.parameters(), lr=1e-2)
    torch.manual_seed(0)
    for _ in range(150):
        opt.zero_grad()
        sft_loss(policy, examples).backward()
        opt.step()


def test_cases_cover_every_single_colour_prompt_of_the_split_and_every_other_colour(bench) -> None:
    for split, prompts in (("train", 14), ("heldout", 4)):
        cases = bench.recolour_cases(split)
        assert len(cases) == prompts * (len(COLORS) - 1)
        assert all(want != drawn and f"{want} {shape}" in prompt for prompt, shape, want, drawn in cases)
    assert not {c[0] for c in bench.recolour_cases("train")} & {c[0] for c in bench.recolour_cases("heldout")}


def test_the_refiner_figure_is_the_mean_of_the_warm_starts_own_cross_entropy(bench) -> None:
    """Peer: :func:`sft_loss` (the warm start's loss: padded batch, attention mask, labels) on the same one-token
    targets; exp(-CE) per case, averaged, is the benchmark's ``refiner_asked``."""
    policy = tiny()
    got = bench.binding(policy, "heldout")
    with torch.no_grad():
        probs = [math.exp(-float(sft_loss(policy, [refine_example(policy, *case)])))
                 for case in bench.recolour_cases("heldout")]
    assert got["refiner_asked"] == pytest.approx(float(np.mean(probs)), rel=1e-4)
    assert 0.0 < got["critic_prompt_colour"] < 1.0 and got["cases"] == 20


def critic_example(policy: TinyUnifiedPolicy, prompt: str, shape: str, colour: str, said: str,
                   target: str) -> tuple[list[int], list[int]]:
    """The reflect context of an image holding one ``colour`` ``shape`` (top-left), the critique begun with
    ``said``, and the one-word ``target``."""
    words = one_object(policy, shape, colour)
    return policy.render("reflect", prompt=prompt, image=words) + policy.encode(said), policy.encode(target)


def test_the_critic_reading_figures_are_the_warm_starts_own_cross_entropy(bench) -> None:
    """Peer: :func:`sft_loss` on contexts built here: reading the drawn colour W after "the S is" on the W S image,
    and beginning a recolour ("the" -> S) on the correct C S image."""
    policy = tiny()
    got = bench.binding(policy, "heldout")
    cases = bench.recolour_cases("heldout")
    with torch.no_grad():
        reads = [math.exp(-float(sft_loss(policy, [critic_example(policy, p, s, w, f"<think> the {s} is", w)])))
                 for p, s, _c, w in cases]
        begun = [math.exp(-float(sft_loss(policy, [critic_example(policy, p, s, c, "<think> the", s)])))
                 for p, s, c, _w in cases]
    assert got["critic_reads_drawn"] == pytest.approx(float(np.mean(reads)), rel=1e-4)
    assert got["recolour_begun_right"] == pytest.approx(float(np.mean(begun)), rel=1e-4)


def test_a_critic_taught_to_read_reads_the_drawn_colour_not_the_prompts(bench) -> None:
    policy = tiny()
    before = bench.binding(policy, "train")
    examples = [critic_example(policy, p, s, w, f"<think> the {s} is", w) for p, s, _c, w in bench.recolour_cases("train")]
    teach(policy, examples)
    after = bench.binding(policy, "train")
    assert before["critic_reads_drawn"] < 0.05 and after["critic_reads_drawn"] > 0.9
    assert after["critic_copies_prompt"] < 0.05


def test_a_refiner_taught_to_recolour_scores_near_one_and_an_untrained_one_near_chance(bench) -> None:
    policy = tiny()
    before = bench.binding(policy, "train")["refiner_asked"]
    examples = [refine_example(policy, *case) for case in bench.recolour_cases("train")]
    teach(policy, examples)
    after = bench.binding(policy, "train")["refiner_asked"]
    assert before < 0.05 and after > 0.9


def test_a_folder_that_is_no_saved_policy_is_one_line_and_exit_2_before_any_is_measured(tmp_path: Path) -> None:
    import subprocess
    import sys

    good = tmp_path / "good"
    tiny().save_pretrained(str(good))
    res = subprocess.run([sys.executable, str(SCRIPT), str(good), str(tmp_path / "missing")],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 2 and res.stdout == ""  # the good folder was not measured first
    last = res.stderr.strip().splitlines()[-1]  # above it only transformers' loading bar of the good folder
    assert "Traceback" not in res.stderr and last.startswith("colour_binding: error: ")
    assert "missing" in last and "no config.json" in last
