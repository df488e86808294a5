"""The tiny unified policy: exact log-probs (ratio == 1 before any update), padding invariance, I/O."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from r3_rl.config import Templates
from r3_rl.policy.base import ImageInput
from r3_rl.policy.tiny import TinyUnifiedPolicy
from r3_rl.trajectory import PromptItem, SamplingParams

PROMPTS = [PromptItem(id="a", prompt="a photo of a red square"),
           PromptItem(id="b", prompt="a photo of two blue circles and a green triangle right of the square"),
           PromptItem(id="c", prompt="a photo of a circle")]


@pytest.fixture(scope="module", params=["shared", "modality"])
def policy(request: pytest.FixtureRequest) -> TinyUnifiedPolicy:
    """Every test here runs on the shared model and on the Mixture-of-Transformers one (policy.tiny.experts)."""
    return TinyUnifiedPolicy.build(Templates().model_dump(), rows=4, cols=4, hidden_size=32, num_layers=2,
                                   num_heads=2, intermediate_size=64, seed=3, experts=request.param)


SAMPLERS = [
    SamplingParams(temperature=1.0, max_new_tokens=12),
    SamplingParams(temperature=0.7, top_p=0.8, max_new_tokens=12),
    SamplingParams(temperature=1.3, top_k=5, top_p=0.95, cfg_scale=2.5, max_new_tokens=12),
]


def _all_segments(policy: TinyUnifiedPolicy, sp: SamplingParams, seed: int):
    gen = torch.Generator().manual_seed(seed)
    plans = policy.reason(PROMPTS, sp, gen)
    images = policy.generate(PROMPTS, [p.text for p in plans], sp, gen)
    inputs = [ImageInput(im.image, im.image_tokens) for im in images]
    crits = policy.reflect(PROMPTS, inputs, sp, gen)
    refined = policy.refine(PROMPTS, inputs, ["add a red square", "remove the circle", "make the circle red"], sp,
                            gen)
    return [s.segment for s in plans + images + crits + refined], images


@pytest.mark.parametrize("sp", SAMPLERS, ids=["plain", "temp_top_p", "topk_cfg"])
def test_ratio_is_one_for_every_token_before_the_first_update(policy: TinyUnifiedPolicy, sp: SamplingParams) -> None:
    segments, _ = _all_segments(policy, sp, seed=11)
    assert {s.modality for s in segments} == {"text", "image"}
    with torch.no_grad():
        recomputed = policy.segment_logprobs(segments)
    for seg, lp in zip(segments, recomputed):
        assert lp.shape == (len(seg.token_ids),)
        ratio = torch.exp(lp - torch.tensor(seg.logprobs))
        assert torch.all((ratio - 1).abs() < 1e-5), (seg.modality, ratio)
        assert torch.all(torch.isfinite(lp))


def test_batch_equals_one_by_one(policy: TinyUnifiedPolicy) -> None:
    segments, _ = _all_segments(policy, SAMPLERS[1], seed=5)
    with torch.no_grad():
        together = policy.segment_logprobs(segments)
        alone = [policy.segment_logprobs([s])[0] for s in segments]
    for a, b in zip(together, alone):
        assert torch.allclose(a, b, atol=1e-5)


def test_modalities_are_respected_and_images_decode(policy: TinyUnifiedPolicy) -> None:
    segments, images = _all_segments(policy, SAMPLERS[0], seed=2)
    for im in images:
        assert len(im.image_tokens) == 16 and all(0 <= t < policy.num_image_tokens for t in im.image_tokens)
        assert im.image.dtype == np.uint8 and im.image.ndim == 3
    for seg in segments:
        img_ids = [t for t in seg.token_ids if policy.image_mask[t]]
        if seg.modality == "text":
            assert not img_ids
        else:
            assert len(img_ids) == len(seg.token_ids)


def test_same_seed_same_samples(policy: TinyUnifiedPolicy) -> None:
    a, _ = _all_segments(policy, SAMPLERS[2], seed=9)
    b, _ = _all_segments(policy, SAMPLERS[2], seed=9)
    assert [s.token_ids for s in a] == [s.token_ids for s in b]


def test_save_and_load_round_trip(policy: TinyUnifiedPolicy, tmp_path) -> None:
    policy.save_pretrained(str(tmp_path / "ckpt"))
    back = TinyUnifiedPolicy.from_pretrained(str(tmp_path / "ckpt"), policy.templates)
    for (k, v), (k2, v2) in zip(policy.model.state_dict().items(), back.model.state_dict().items()):
        assert k == k2 and torch.equal(v, v2)
    segments, _ = _all_segments(policy, SAMPLERS[0], seed=1)
    with torch.no_grad():
        for a, b in zip(policy.segment_logprobs(segments), back.segment_logprobs(segments)):
            assert torch.allclose(a, b)


def _sibling_segments(policy: TinyUnifiedPolicy, sp: SamplingParams, seed: int, group: int = 4):
    """Like a Tree-RL step: every prompt's stage is sampled ``group`` times from the same context."""
    prompts = [p for p in PROMPTS for _ in range(group)]
    gen = torch.Generator().manual_seed(seed)
    plans = policy.reason(prompts, sp, gen)
    images = policy.generate(prompts, [None] * len(prompts), sp, gen)  # siblings share the plan-free context
    first = [ImageInput(images[i].image, images[i].image_tokens) for i in range(0, len(prompts), group)]
    parents = [im for im in first for _ in range(group)]
    crits = policy.reflect(prompts, parents, sp, gen)
    return [s.segment for s in plans + images + crits]


def _logprobs_and_grads(policy: TinyUnifiedPolicy, segments):
    policy.model.zero_grad()
    lps = policy.segment_logprobs(segments)
    sum(((lp - 0.1) ** 2).sum() for lp in lps).backward()
    return [lp.detach() for lp in lps], [p.grad.clone() for p in policy.model.parameters()]


def test_siblings_share_their_context_forward_with_the_same_logprobs_and_gradients(policy, monkeypatch) -> None:
    segments = _sibling_segments(policy, SAMPLERS[2], seed=4)
    distinct_contexts_run = []
    real = TinyUnifiedPolicy._shared_context_logits
    monkeypatch.setattr(TinyUnifiedPolicy, "_shared_context_logits",
                        lambda self, prefixes, *a: distinct_contexts_run.append(len(prefixes)) or real(self, prefixes, *a))
    shared_lp, shared_grad = _logprobs_and_grads(policy, segments)
    assert distinct_contexts_run, "siblings with one context each did not take the shared-context forward"
    assert all(n < len(segments) for n in distinct_contexts_run)

    monkeypatch.setattr(TinyUnifiedPolicy, "_token_logits", TinyUnifiedPolicy._full_row_logits)  # one forward per row
    full_lp, full_grad = _logprobs_and_grads(policy, segments)
    for a, b, seg in zip(shared_lp, full_lp, segments):
        assert a.shape == (len(seg.token_ids),)
        torch.testing.assert_close(a, b, atol=2e-5, rtol=0)
    for a, b in zip(shared_grad, full_grad):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("sp", SAMPLERS, ids=["plain", "temp_top_p", "topk_cfg"])
def test_ratio_is_one_for_siblings_sharing_a_context(policy: TinyUnifiedPolicy, sp: SamplingParams) -> None:
    segments = _sibling_segments(policy, sp, seed=8)
    with torch.no_grad():
        recomputed = policy.segment_logprobs(segments)
    for seg, lp in zip(segments, recomputed):
        ratio = torch.exp(lp - torch.tensor(seg.logprobs))
        assert torch.all((ratio - 1).abs() < 1e-5), (seg.modality, ratio)


def test_shared_context_rows_decides_by_repeats_and_tokens() -> None:
    from r3_rl.policy.shared_context import first_rows, shared_context_rows

    # 2 distinct contexts of 10 tokens, 4 rows with 5-token targets: 2*10 + 4*4 = 36 < 4*15 = 60 tokens
    assert shared_context_rows(["a", "a", "b", "b"], [10] * 4, [5] * 4, [15] * 4) == [0, 0, 1, 1]
    assert first_rows([0, 1, 0, 2, 1]) == [0, 1, 3]
    assert shared_context_rows(["a", "b", "c"], [10] * 3, [5] * 3, [15] * 3) is None  # nothing repeats
    # repeats, but short contexts and long targets: 2*2 + 3*49 = 151 >= 3*50 = 150 tokens
    assert shared_context_rows(["a", "a", "b"], [2] * 3, [50] * 3, [50] * 3) is None


def test_sampling_refuses_broken_logits_instead_of_drawing_token_zero(policy: TinyUnifiedPolicy,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """NaN logits (a bf16 overflow) used to stop ``torch.multinomial``; the sampler without its host reads checks
    the sampled log-probs once per call and stops the same way, rather than drawing token 0 on."""
    import r3_rl.policy.tiny as tiny

    real = tiny.sampling_logprobs
    monkeypatch.setattr(tiny, "sampling_logprobs", lambda logits, *a, **kw: real(logits * float("nan"), *a, **kw))
    with pytest.raises(RuntimeError, match="tiny policy sampling: a sampled token has a non-finite log-prob"):
        policy.reason(PROMPTS, SamplingParams(temperature=1.0, max_new_tokens=4), torch.Generator().manual_seed(0))
