"""The samplers write their KV cache in place (no per-step concatenation, CFG rows included), and the
training cache can be replayed (what activation checkpointing needs)."""
from __future__ import annotations

import pytest
import torch

from r3_rl.config import Templates
from r3_rl.policy.kv_cache import PreallocatedCache, ReplayCache
from r3_rl.trajectory import PromptItem, SamplingParams

IMAGE_SP = SamplingParams(temperature=1.0, top_k=50, cfg_scale=4.0)
TEXT_SP = SamplingParams(temperature=0.8, top_p=0.9, max_new_tokens=10)


def _no_cache_concatenation(monkeypatch: pytest.MonkeyPatch, made: list[PreallocatedCache], sample) -> None:
    """Run ``sample()``: no torch.cat along the sequence dim of 4-D (KV) tensors, and every layer's buffer
    stays where it was allocated.  (Rotary embeddings concatenate along the head dim: not the cache.)"""
    cats: list[tuple[int, ...]] = []
    real_cat = torch.cat

    def cat(tensors, dim=0, **k):
        tensors = list(tensors)
        if tensors and tensors[0].dim() == 4 and dim in (2, -2):
            cats.append(tuple(tensors[0].shape))
        return real_cat(tensors, dim, **k)
    monkeypatch.setattr(torch, "cat", cat)
    sample()
    monkeypatch.undo()
    assert made, "the sampler did not use a preallocated cache"
    assert not cats, f"KV concatenated while sampling: {cats[:3]}"
    for cache in made:
        for layer in cache.layers:
            assert layer.keys.data_ptr() == layer._k.data_ptr() and layer.length == layer.keys.shape[2]


def _recording(monkeypatch: pytest.MonkeyPatch, module) -> list[PreallocatedCache]:
    made: list[PreallocatedCache] = []

    class Recorded(PreallocatedCache):
        def __init__(self, *a):
            super().__init__(*a)
            made.append(self)
    monkeypatch.setattr(module, "PreallocatedCache", Recorded)
    return made


def test_janus_sampler_writes_its_kv_cache_in_place(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    import r3_rl.policy.janus_engine as engine
    from r3_rl.policy.janus import JanusPolicy
    from r3_rl.policy.janus_tiny import make_tiny_janus

    templates = {"reason": "{prompt}", "generate": "{prompt}", "generate_uncond": "", "reflect": "{prompt}",
                 "refine": "{prompt} {instruction}"}
    policy = JanusPolicy.from_pretrained(make_tiny_janus(tmp_path / "j"), templates=templates)
    prompts = [PromptItem("a", "a red cube"), PromptItem("b", "two green dogs on a big table")]  # padded rows
    made = _recording(monkeypatch, engine)
    images: list = []
    _no_cache_concatenation(monkeypatch, made, lambda: images.extend(
        policy.generate(prompts, [None, None], IMAGE_SP, torch.Generator().manual_seed(0))))
    assert made[0].layers[0].keys.shape[0] == 4, "CFG: cond and null rows share the one cache"
    assert made[0].layers[0].capacity == made[0].layers[0].length + 1  # context + every token but the last
    _no_cache_concatenation(monkeypatch, made, lambda: policy.reason(prompts, TEXT_SP, torch.Generator()))
    with torch.no_grad():  # and the recorded log-probs are still those of the training forward
        for s, lp in zip([im.segment for im in images], policy.segment_logprobs([im.segment for im in images])):
            torch.testing.assert_close(lp, torch.tensor(s.logprobs), atol=1e-5, rtol=0)


def test_tiny_sampler_writes_its_kv_cache_in_place(monkeypatch: pytest.MonkeyPatch) -> None:
    import r3_rl.policy.tiny as tiny

    policy = tiny.TinyUnifiedPolicy.build(Templates().model_dump(), rows=3, cols=3, hidden_size=32, num_layers=2,
                                          num_heads=2, intermediate_size=64)
    made = _recording(monkeypatch, tiny)
    prompts = [PromptItem("a", "two red squares"), PromptItem("b", "one blue circle left of a green square")]
    _no_cache_concatenation(monkeypatch, made, lambda: policy.generate(prompts, ["a plan", None], IMAGE_SP))
    _no_cache_concatenation(monkeypatch, made, lambda: policy.reason(prompts, TEXT_SP))


def test_preallocated_cache_refuses_overflow_and_replay_cache_rebuilds() -> None:
    cache = PreallocatedCache(1, capacity=3)
    k = torch.randn(2, 1, 2, 4)
    cache.update(k, k, 0)
    with pytest.raises(ValueError, match="capacity 3"):
        cache.update(k, k, 0)
    replay = ReplayCache(1)
    a, _ = replay.update(k, k, 0)
    rows = torch.tensor([1, 1, 0])
    shared = replay.select(rows)
    new = torch.randn(3, 1, 1, 4)
    first, _ = shared.update(new, new, 0)
    again, _ = shared.update(new, new, 0)  # what a checkpointed layer's recompute does
    assert torch.equal(first, again) and first.shape == (3, 1, 3, 4)
    assert torch.equal(first[:, :, :2], k[rows]) and replay.layers[0].keys is a, "the context cache is untouched"
