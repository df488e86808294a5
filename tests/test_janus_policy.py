"""Janus-Pro policy on a tiny random Janus built from config, saved and loaded through the real path.

The central property: log-probs recorded while sampling equal the training forward's log-probs
(fp32, 1e-5) for text and image tokens, with CFG, temperature, top-k and top-p all active and
prompts of different lengths in one batch.  Peers: transformers' own ``generate(generation_mode=
"image")`` (greedy tokens must match ours) and ``JanusForConditionalGeneration.forward`` with
``pixel_values`` (the understanding path must give the same logits).
"""
from __future__ import annotations

import dataclasses
import json
import time

import numpy as np
import pytest
import torch

from r3_rl.errors import UserError
from r3_rl.policy.base import ImageInput
from r3_rl.policy.janus import JanusPolicy
from r3_rl.policy.janus_tiny import make_tiny_janus
from r3_rl.trajectory import PromptItem, SamplingParams, Segment

TEMPLATES = {
    "system": "You draw and check pictures.",
    "reason": "Plan how to draw: {prompt}",
    "generate": "{prompt}",
    "generate_uncond": "",
    "reflect": "Target: {prompt}. How to further edit the image?",
    "refine": "{prompt}. Edit: {instruction}",
    "stop_phrase": "no further edit needed",
}
PROMPTS = [PromptItem("a", "a red cube"),
           PromptItem("b", "two blue spheres to the left of a very small green dog on a table"),
           PromptItem("c", "cat")]
TEXT_SP = SamplingParams(temperature=0.7, top_k=40, top_p=0.9, max_new_tokens=12)
IMAGE_SP = SamplingParams(temperature=0.8, top_k=200, top_p=0.95, cfg_scale=3.0)


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory) -> str:
    return make_tiny_janus(tmp_path_factory.mktemp("janus") / "tiny")


@pytest.fixture(scope="module")
def policy(tiny_path) -> JanusPolicy:
    torch.set_num_threads(1)
    return JanusPolicy.from_pretrained(tiny_path, templates=TEMPLATES, dtype="float32", device="cpu")


@pytest.fixture(scope="module")
def rollout(policy):
    """All four stages for three prompts of very different lengths, sampled in one batch each."""
    g = torch.Generator().manual_seed(0)
    plans = policy.reason(PROMPTS, TEXT_SP, g)
    images = policy.generate(PROMPTS, [p.text for p in plans], IMAGE_SP, g)
    inputs = [ImageInput(im.image, im.image_tokens) for im in images]
    inputs[2] = ImageInput(images[2].image, None)  # a picture the policy did not draw: stored as PNG
    critiques = policy.reflect(PROMPTS, inputs, TEXT_SP, g)
    refined = policy.refine(PROMPTS, inputs, [c.text for c in critiques], IMAGE_SP, g)
    return plans, images, critiques, refined


def _segments(rollout) -> list[Segment]:
    return [s.segment for stage in rollout for s in stage]


def _roundtrip(seg: Segment) -> Segment:
    d = json.loads(json.dumps(dataclasses.asdict(seg)))
    d["sampling"] = SamplingParams(**d["sampling"])
    return Segment(**d)


def test_all_four_stages_run(policy, rollout):
    plans, images, critiques, refined = rollout
    side = 2 * policy.model.config.vq_config.num_patches
    codebook = policy.model.config.vq_config.num_embeddings
    for im in images + refined:
        assert im.image.shape == (side, side, 3) and im.image.dtype == np.uint8
        assert len(im.image_tokens) == policy.num_image_tokens == 16
        assert all(0 <= t < codebook for t in im.image_tokens)
        np.testing.assert_array_equal(im.image, policy._decode(torch.tensor([im.image_tokens]))[0])
    for t in plans + critiques:
        ids = t.segment.token_ids
        assert isinstance(t.text, str)
        assert len(ids) == TEXT_SP.max_new_tokens or ids[-1] == policy.eos_id
        assert policy.eos_id not in ids[:-1]
        assert not any(policy.text_mask.logical_not()[i] for i in ids)  # text stages never emit image tokens
    assert critiques[0].segment.context["image"] == {"tokens": images[0].image_tokens}
    assert "png" in critiques[2].segment.context["image"]
    assert refined[0].segment.context["uncond_ids"] != refined[0].segment.context["input_ids"]


def test_sampling_and_training_logprobs_agree(policy, rollout):
    """Text and image tokens, CFG + temperature + top-k + top-p, mixed lengths, JSON round trip."""
    segs = [_roundtrip(s) for s in _segments(rollout)]
    lens = {len(s.context["input_ids"]) for s in segs if s.context["stage"] == "reason"}
    assert len(lens) == 3  # prompts of three different lengths share each batch (padding)
    policy.model.train()  # the learner's mode: must not change the distribution (no dropout in play)
    try:
        got = policy.segment_logprobs(segs)
    finally:
        policy.model.eval()
    for s, lp in zip(segs, got):
        assert lp.shape == (len(s.token_ids),)
        torch.testing.assert_close(lp.detach(), torch.tensor(s.logprobs), atol=1e-5, rtol=0)


def test_batch_equals_one_by_one(policy, rollout):
    segs = _segments(rollout)
    batched = policy.segment_logprobs(segs)
    for s, lp in zip(segs, batched):
        torch.testing.assert_close(policy.segment_logprobs([s])[0].detach(), lp.detach(), atol=1e-5, rtol=0)
    greedy_text = dataclasses.replace(TEXT_SP, greedy=True)
    greedy_img = dataclasses.replace(IMAGE_SP, greedy=True)
    together = policy.reason(PROMPTS, greedy_text) + policy.generate(PROMPTS, [None] * 3, greedy_img)
    alone = ([policy.reason([p], greedy_text)[0] for p in PROMPTS]
             + [policy.generate([p], [None], greedy_img)[0] for p in PROMPTS])
    for a, b in zip(together, alone):
        assert a.segment.token_ids == b.segment.token_ids
        np.testing.assert_allclose(a.segment.logprobs, b.segment.logprobs, atol=1e-5)


def test_guidance_and_sampling_params_are_part_of_the_logprob(policy, rollout):
    """Recomputing under other CFG / temperature / top-p must change the numbers (nothing ignored)."""
    seg = rollout[1][1].segment
    base = policy.segment_logprobs([seg])[0]
    for change in ({"cfg_scale": 1.5}, {"temperature": 1.0}, {"top_p": 1.0, "top_k": 0}):
        other = dataclasses.replace(seg, sampling=dataclasses.replace(seg.sampling, **change))
        assert (policy.segment_logprobs([other])[0] - base).abs().max() > 1e-3, change
    no_null = dataclasses.replace(seg, context={k: v for k, v in seg.context.items() if k != "uncond_ids"})
    assert (policy.segment_logprobs([no_null])[0] - base).abs().max() > 1e-3


def test_training_forward_is_differentiable_and_vq_frozen(policy, rollout):
    policy.model.zero_grad()
    loss = sum(lp.sum() for lp in policy.segment_logprobs(_segments(rollout)))
    loss.backward()
    m = policy.model.model
    assert m.generation_head.vision_head.weight.grad.abs().sum() > 0
    assert policy.model.lm_head.weight.grad.abs().sum() > 0
    assert m.aligner.fc1.weight.grad.abs().sum() > 0  # reflect/refine see the image through the aligner
    assert all(not p.requires_grad for p in m.vqmodel.parameters())
    assert all(not p.requires_grad for p in m.vision_model.parameters())
    policy.model.zero_grad(set_to_none=True)


def test_greedy_image_tokens_match_transformers_generate(policy):
    """Peer check: our CFG loop picks the tokens transformers' image-mode generate picks."""
    prompts = [PromptItem("x", "a red cube"), PromptItem("y", "a tan ball")]  # equal length: no padding
    sp = SamplingParams(greedy=True, cfg_scale=4.0)
    ours = [s.image_tokens for s in policy.generate(prompts, [None, None], sp)]
    ids = torch.tensor([policy._ids("generate", {"prompt": p.prompt}, False, True) for p in prompts])
    theirs = policy.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), generation_mode="image",
                                   do_sample=False, guidance_scale=4.0)
    assert ours == theirs.tolist()


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_fast_decode_matches_reference_forward(policy, attn):
    """The direct decoder-layer step equals ``LlamaModel.forward`` (both mask paths)."""
    lm = policy.model.model.language_model
    before = lm.config._attn_implementation
    policy.engine.use_fast_decode = False
    try:
        slow = policy.generate(PROMPTS, [None] * 3, IMAGE_SP, torch.Generator().manual_seed(3))
        policy.engine.use_fast_decode = True
        lm.set_attn_implementation(attn)
        fast = policy.generate(PROMPTS, [None] * 3, IMAGE_SP, torch.Generator().manual_seed(3))
    finally:
        policy.engine.use_fast_decode = True
        lm.set_attn_implementation(before)
    assert lm.config._attn_implementation == before
    for a, b in zip(fast, slow):
        assert a.image_tokens == b.image_tokens
        np.testing.assert_allclose(a.segment.logprobs, b.segment.logprobs, atol=1e-5)


def test_understanding_path_matches_transformers_forward(policy, rollout):
    seg = rollout[2][0].segment
    image = policy._pixels(seg.context["image"])
    ids = torch.tensor([seg.context["input_ids"]])
    ref = policy.model(input_ids=ids, pixel_values=policy.engine.pixel_values([image])).logits[0, -1]
    emb, mask, pos = policy.engine.embed([seg.context["input_ids"]], [image])
    ours = policy.model.lm_head(policy.engine._trunk(emb, mask, pos).last_hidden_state[0, -1])
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=0)
    p = policy.answer_yes_no([ImageInput(image)], ["Is there a cube?"])
    assert len(p) == 1 and 0.0 < p[0] < 1.0


def test_prompt_layout(policy):
    tok = policy.tok
    reason = policy._ids("reason", {"prompt": "a red cube"}, False, False)
    assert reason[0] == policy.bos_id
    assert tok.decode(reason[1:]) == ("You draw and check pictures.\n\n<|User|>: Plan how to draw: a red cube\n\n"
                                      "<|Assistant|>:")
    gen = policy._ids("generate", {"prompt": "a red cube", "plan": "<think> one cube </think>"}, False, True)
    assert tok.decode(gen[1:]) == "<|User|>: a red cube <think> one cube </think>\n\n<|Assistant|>:<begin_of_image>"
    null = policy._null(gen)
    assert null == [policy.bos_id] + [policy.pad_id] * (len(gen) - 2) + [policy.boi_id]
    refine = policy._ids("refine", {"prompt": "a cat", "instruction": "make it red"}, True, True)
    block = [policy.boi_id] + [policy.image_token_id] * 16 + [policy.eoi_id]
    start = refine.index(policy.boi_id)
    assert refine[start:start + 18] == block and refine[-1] == policy.boi_id
    null = policy._null(refine)
    assert null[start:start + 18] == block and null[0] == policy.bos_id
    assert set(null) == {policy.bos_id, policy.pad_id, policy.boi_id, policy.eoi_id, policy.image_token_id}


def test_save_and_reload_keeps_weights_and_version(policy, tmp_path):
    policy.version = 7
    try:
        policy.save_pretrained(str(tmp_path / "ckpt"))
    finally:
        policy.version = 0
    again = JanusPolicy.from_pretrained(str(tmp_path / "ckpt"), templates=TEMPLATES)
    assert again.version == 7
    a, b = policy.model.state_dict(), again.model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ref = policy.frozen_copy()
    assert all(not p.requires_grad for p in ref.model.parameters())
    assert any(p.requires_grad for p in policy.model.parameters())
    # nothing shared, frozen towers included (DeepSpeed may cast or partition every tensor of the policy)
    assert not {t.data_ptr() for t in ref.model.state_dict().values()} & {
        t.data_ptr() for t in policy.model.state_dict().values()}
    segs = [s.segment for s in policy.generate(PROMPTS[:2], [None, None], IMAGE_SP, torch.Generator().manual_seed(1))]
    for a, b in zip(ref.segment_logprobs(segs), policy.segment_logprobs(segs)):
        torch.testing.assert_close(a, b.detach(), atol=1e-6, rtol=0)


@pytest.mark.parametrize("model, reason", [
    ("/definitely/not/here", "no such directory"),
    ("nobody-org/no-such-janus", "not in the hub cache"),
])
def test_missing_model_is_one_line_user_error(model, reason, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    t0 = time.perf_counter()
    with pytest.raises(UserError) as e:
        JanusPolicy.from_pretrained(model, templates=TEMPLATES)
    assert time.perf_counter() - t0 < 10
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"policy.model: cannot load '{model}': ") and reason in msg
    assert msg.endswith("give a local path or a hub id available offline")


def test_wrong_directory_is_user_error(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no config.json"):
        JanusPolicy.from_pretrained(str(tmp_path / "empty"), templates=TEMPLATES)
    from transformers import LlamaConfig

    LlamaConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                vocab_size=32).save_pretrained(tmp_path / "llama")
    with pytest.raises(UserError, match="'llama' model, not Janus"):
        JanusPolicy.from_pretrained(str(tmp_path / "llama"), templates=TEMPLATES)


def test_a_weight_file_cut_short_is_user_error(tiny_path, tmp_path):
    """A ``model.safetensors`` cut in half by a copy: a one-line UserError (a SafetensorError traceback until
    session 53)."""
    import shutil

    d = tmp_path / "cut"
    shutil.copytree(tiny_path, d)
    data = (d / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match=f"^policy.model: cannot load '{d}': .*incomplete metadata"):
        JanusPolicy.from_pretrained(str(d), templates=TEMPLATES)


@pytest.mark.parametrize("change, match", [
    ({"reflect": "{instruction}"}, r"templates.reflect: placeholder \{instruction\}"),
    ({"generate_uncond": "<|User|>:"}, "templates.generate_uncond"),
    ({"refin": "x"}, "templates.refin: unknown"),
])
def test_bad_templates_are_user_errors(policy, change, match):
    with pytest.raises(UserError, match=match):
        JanusPolicy(policy.model, policy.processor, {**TEMPLATES, **change})


def test_bad_dtype_and_device(tiny_path):
    with pytest.raises(UserError, match="policy.dtype"):
        JanusPolicy.from_pretrained(tiny_path, templates=TEMPLATES, dtype="fp8")
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="policy.device"):
            JanusPolicy.from_pretrained(tiny_path, templates=TEMPLATES, device="cuda")


def test_vq_token_equal_to_placeholder_id_is_not_an_image_slot(policy, rollout):
    """VQ ids and text ids share no table: a drawn token numerically equal to ``<image_placeholder>``
    must be embedded as a VQ token, not filled with SigLIP features."""
    seg = rollout[3][0].segment  # refine: its prompt holds a real image block
    assert policy.image_token_id < policy.model.config.vq_config.num_embeddings
    odd = dataclasses.replace(seg, token_ids=[policy.image_token_id] * len(seg.token_ids))
    lp = policy.segment_logprobs([odd])[0]
    assert lp.shape == (len(seg.token_ids),) and bool(torch.isfinite(lp).all())


def test_siblings_share_their_context_forward_with_the_same_logprobs_and_gradients(policy, monkeypatch):
    """Tree-RL siblings (same prompt, same parent image) take the shared-context training forward,
    which must give what each row gives alone (the full-row forward), log-probs and gradients."""
    from r3_rl.policy.janus_engine import JanusEngine

    g = torch.Generator().manual_seed(7)
    prompts = [p for p in PROMPTS[:2] for _ in range(3)]
    plans = policy.reason(prompts, TEXT_SP, g)
    images = policy.generate(prompts, [None] * len(prompts), IMAGE_SP, g)
    parents = [ImageInput(images[i].image, images[i].image_tokens) for i in (0, 0, 0, 3, 3, 3)]
    critiques = policy.reflect(prompts, parents, TEXT_SP, g)
    refined = policy.refine(prompts, parents, ["make it red"] * len(prompts), IMAGE_SP, g)
    segs = [s.segment for stage in (plans, images, critiques, refined) for s in stage]
    shared_calls = []
    real = JanusEngine._shared_context_hidden
    monkeypatch.setattr(JanusEngine, "_shared_context_hidden",
                        lambda self, ids, *a: shared_calls.append(len(ids)) or real(self, ids, *a))

    policy.model.zero_grad()
    together = policy.segment_logprobs(segs)
    sum(((lp - 0.1) ** 2).sum() for lp in together).backward()
    shared_grad = [p.grad.clone() if p.grad is not None else None for p in policy.model.parameters()]
    assert shared_calls, "siblings did not take the shared-context forward"
    calls = len(shared_calls)
    policy.model.zero_grad()
    for s in segs:  # alone: nothing repeats, so the full-row forward
        lp = policy.segment_logprobs([s])[0]
        ((lp - 0.1) ** 2).sum().backward()
    assert len(shared_calls) == calls
    for s, lp in zip(segs, together):
        torch.testing.assert_close(lp.detach(), torch.tensor(s.logprobs), atol=1e-5, rtol=0)
    for (name, p), a in zip(policy.model.named_parameters(), shared_grad):
        if a is not None:  # float32 sums in another order: equal to 1e-5 of the gradient's size
            assert (a - p.grad).norm() <= 1e-5 * p.grad.norm() + 1e-7, (name, (a - p.grad).norm(), p.grad.norm())
    policy.model.zero_grad(set_to_none=True)
