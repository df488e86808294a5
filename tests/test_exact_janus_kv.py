"""Exact checks (round 14C audit) of the Janus-Pro policy on a tiny config (r3_rl.policy.janus), its engine
(janus_engine), prompts (janus_prompts), recipe half (janus_recipe), the KV caches (kv_cache) and the sampling
distribution (sampling).  Each test pins one rule a mutation audit found unpinned; expected values are written
out by hand (uniform distributions, hand-made prompts) or taken from an independent peer (the full-row forward,
PIL, the image processor itself)."""
from __future__ import annotations

import base64
import copy
import io
import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from test_exact_policies_plan import _detached, _StubEngine  # _StubEngine: what JanusPolicy hands its engine
from test_exact_sampling_ray import ScriptedHead, _swapped  # a head with scripted logits, swapped in for a block
from test_janus_policy import TEMPLATES

from r3_rl.errors import UserError
from r3_rl.trajectory import SamplingParams, Segment


@pytest.fixture(scope="module")
def janus(tmp_path_factory):
    from r3_rl.policy.janus import JanusPolicy
    from r3_rl.policy.janus_tiny import make_tiny_janus

    torch.set_num_threads(1)
    path = make_tiny_janus(tmp_path_factory.mktemp("janus14c") / "tiny")
    return JanusPolicy.from_pretrained(path, templates=TEMPLATES, dtype="float32", device="cpu")


# ============================================================================ prompts through the policy
def test_system_prompt_is_stripped_before_the_blank_line(janus):
    """``templates.system`` with surrounding whitespace: the turn is ``BOS system\\n\\n<|User|>: ...``."""
    from r3_rl.policy.janus import JanusPolicy

    p = JanusPolicy(janus.model, janus.processor, {**TEMPLATES, "system": "  Be brief.  \n"})
    ids = p._ids("reason", {"prompt": "a cube"}, False, False)
    assert ids[0] == p.bos_id
    assert p.tok.decode(ids[1:]) == "Be brief.\n\n<|User|>: Plan how to draw: a cube\n\n<|Assistant|>:"


def test_a_plan_placeholder_in_generate_places_the_plan_once(janus):
    """The plan joins the user turn at the end only when the template has no ``{plan}`` of its own."""
    from r3_rl.policy.janus import JanusPolicy

    p = JanusPolicy(janus.model, janus.processor, {**TEMPLATES, "generate": "{plan} then {prompt}"})
    ids = p._ids("generate", {"prompt": "a cube", "plan": "P1"}, False, True)
    assert p.tok.decode(ids[1:]) == "<|User|>: P1 then a cube\n\n<|Assistant|>:<begin_of_image>"


def test_decode_text_drops_pad_and_eos_and_strips_spaces(janus):
    tok = janus.tok
    ids = tok("  hello there ", add_special_tokens=False)["input_ids"]
    assert janus.decode_text(ids + [janus.eos_id, janus.pad_id]) == "hello there"
    assert janus.decode_text([janus.bos_id, janus.boi_id] + ids + [janus.eoi_id]) == "hello there"  # special tokens


# ============================================================================ what the policy hands its engine
def test_text_stages_sample_max_new_tokens_and_stop_at_eos(janus):
    p = _detached(janus)
    p.engine = _StubEngine()
    sp = SamplingParams(max_new_tokens=7)
    segs = p._sample("reason", [[p.bos_id, 70]], [None], "text", sp, None)
    call = p.engine.calls[0]
    assert call["steps"] == 7 and call["stop_id"] == p.eos_id and call["null_ids"] is None
    assert segs[0].token_ids == [1] * 7 and "uncond_ids" not in segs[0].context


def test_segments_keep_their_own_copy_of_the_sampling_params(janus):
    """A caller reusing (and changing) its SamplingParams must not rewrite what earlier segments sampled with."""
    p = _detached(janus)
    p.engine = _StubEngine()
    sp = SamplingParams(temperature=0.7, max_new_tokens=3)
    segs = p._sample("reason", [[p.bos_id, 70]], [None], "text", sp, None)
    sp.temperature = 1.5
    assert segs[0].sampling.temperature == 0.7 and segs[0].sampling.max_new_tokens == 3


def test_with_model_scores_with_the_new_models_trunk_and_heads(janus):
    """``with_model(m)``: log-probs come from ``m`` -- here a copy whose trunk's final norm is zeroed, so every
    position's hidden state is 0 and every step's logits are the generation head of a zero vector."""
    m = copy.deepcopy(janus.model)
    with torch.no_grad():
        m.model.language_model.norm.weight.zero_()
        want_lp = torch.log_softmax(m.model.generation_head(torch.zeros(1, janus.feature_size)).float(), -1)[0]
    other = janus.with_model(m)
    ctx = janus._ids("generate", {"prompt": "a cube", "plan": ""}, False, True)
    tokens = [3, 1, 4, 1, 5]
    seg = Segment(modality="image", context={"stage": "generate", "input_ids": ctx, "image": None},
                  token_ids=tokens, logprobs=[0.0] * 5, sampling=SamplingParams())
    with torch.no_grad():
        got = other.segment_logprobs([seg])[0]
        mine = janus.segment_logprobs([seg])[0]
    torch.testing.assert_close(got, want_lp[tokens], atol=1e-5, rtol=0)
    assert (mine - want_lp[tokens]).abs().max() > 1e-3  # the original model differs: the copy really was used
    assert other.model is m and janus.model is not m


def test_yes_no_with_neither_answer_possible_is_zero_not_nan(janus):
    """P(yes) = P(no) = 0 (every first answer token at -inf): the normalised score is 0, never NaN."""
    from torch import nn

    from r3_rl.policy.base import ImageInput

    ids = janus.tok.convert_tokens_to_ids
    vocab = janus.model.lm_head.out_features
    logits = torch.zeros(vocab)
    logits[[ids("Y"), ids("y"), ids("N"), ids("n"), ids("Ġ")]] = float("-inf")

    class FixedHead(nn.Module):
        weight = janus.model.lm_head.weight

        def forward(self, hidden):
            return logits.expand(hidden.shape[0], -1)

    image = np.zeros((32, 32, 3), dtype=np.uint8)
    with _swapped(janus.model, "lm_head", FixedHead()):
        p = janus.answer_yes_no([ImageInput(image)], ["Is there a cube?"])
    assert p == [0.0]


def test_value_features_are_each_contexts_last_hidden_state_whatever_the_padding(janus):
    """Contexts of different lengths in one batch: each feature is the last hidden state of its context run alone."""
    ctxs = [janus._ids("reason", {"prompt": p}, False, False) for p in ("a red cube", "two blue spheres on a table")]
    segs = [Segment(modality="text", context={"stage": "reason", "input_ids": c, "image": None}, token_ids=[70],
                    logprobs=[0.0], sampling=SamplingParams()) for c in ctxs]
    with torch.no_grad():
        got = janus.value_features(segs)
        for c, f in zip(ctxs, got):
            emb, mask, pos = janus.engine.embed([c], [None])
            alone = janus.model.model.language_model(inputs_embeds=emb, attention_mask=mask,
                                                     position_ids=pos).last_hidden_state[0, -1]
            torch.testing.assert_close(f, alone, atol=1e-5, rtol=0)
    assert got.shape == (2, janus.feature_size)


# ============================================================================ engine
def test_single_token_targets_of_two_shared_contexts_each_read_their_own_context(janus):
    """Siblings of two different prompts, every target one token long (the shared-context forward's shortcut):
    each row's hidden state is its own context's last one, as the full-row forward of that row alone gives."""
    eng = janus.engine
    c1 = janus._ids("reason", {"prompt": "a red cube"}, False, False)
    c2 = janus._ids("reason", {"prompt": "two dogs"}, False, False)
    ids, targets = [c1, c1, c2, c2], [[70], [71], [72], [73]]
    with torch.no_grad():
        together = eng.target_hidden(ids, [None] * 4, targets, ["text"] * 4)
        for c, t, h in zip(ids, targets, together):
            alone = eng.target_hidden([c], [None], [t], ["text"])[0]
            assert h.shape == (1, janus.feature_size)
            torch.testing.assert_close(h, alone, atol=1e-5, rtol=0)
    assert (together[0] - together[2]).abs().max() > 1e-3  # the two contexts really differ


def test_a_nan_logit_stops_janus_sampling_with_a_clear_error(janus):
    vocab = janus.model.config.vq_config.num_embeddings
    script = [torch.full((2, vocab), float("nan")) for _ in range(3)]
    ctx = [janus._ids("generate", {"prompt": "a cube", "plan": ""}, False, True)]
    with _swapped(janus.model.model, "generation_head", ScriptedHead(script)):
        with pytest.raises(RuntimeError, match="^Janus sampling: a sampled token has a non-finite log-prob"):
            janus.engine.sample(ctx, [None], "image", SamplingParams(cfg_scale=2.0), 3, torch.Generator(),
                                null_ids=[janus._null(ctx[0])])


def test_placeholders_in_a_row_without_an_image_are_refused(janus):
    """Row 0 holds an image and its 16 placeholders; row 1 has placeholders but no image: refused, by count."""
    block = [janus.boi_id] + [janus.image_token_id] * 16 + [janus.eoi_id]
    ids = [[janus.bos_id] + block + [70], [janus.bos_id] + block + [71]]
    image = np.zeros((32, 32, 3), dtype=np.uint8)
    with pytest.raises(ValueError, match=r"image placeholders per row \[16, 16\] do not match"):
        janus.engine.embed(ids, [image, None])


def test_pixel_values_are_in_the_models_dtype(janus):
    """SigLIP inputs are cast to the model's dtype (a bf16 model must not get float32 pixels)."""
    from r3_rl.policy.janus_engine import JanusEngine

    stub = SimpleNamespace(lm_head=torch.nn.Linear(1, 1), dtype=torch.bfloat16)
    ip = janus.processor.image_processor
    image = np.random.default_rng(0).integers(0, 256, (20, 24, 3), dtype=np.uint8)
    pv = JanusEngine(stub, ip, janus.pad_id, janus.image_token_id).pixel_values([image])
    from PIL import Image

    want = ip(images=[Image.fromarray(image)], return_tensors="pt")["pixel_values"]
    assert pv.dtype == torch.bfloat16 and pv.shape == want.shape
    assert torch.equal(pv, want.to(torch.bfloat16))


# ============================================================================ prompts (pure functions)
def test_a_missing_stage_template_is_a_user_error():
    from r3_rl.policy.janus_prompts import check_templates

    with pytest.raises(UserError, match=r"^templates.refine: missing; the Janus policy needs reason, generate"):
        check_templates({k: v for k, v in TEMPLATES.items() if k != "refine"})


def test_a_value_not_given_renders_empty():
    from r3_rl.policy.janus_prompts import user_content

    assert user_content("{prompt}: {instruction}", {"prompt": "x"}, False) == [{"type": "text", "text": "x: "}]


def test_image_ref_stores_numpy_tokens_as_json_ints():
    from r3_rl.policy.janus_prompts import image_ref

    ref = image_ref(np.zeros((2, 2, 3), np.uint8), np.array([3, 70000], dtype=np.int64))
    assert json.loads(json.dumps(ref)) == {"tokens": [3, 70000]}
    assert all(type(t) is int for t in ref["tokens"])


@pytest.mark.parametrize("mode", ["L", "RGBA"])
def test_png_pixels_are_always_rgb(mode):
    """A PNG reference in grey or with alpha comes back as HxWx3 uint8 (what PIL's own RGB conversion gives)."""
    from PIL import Image

    from r3_rl.policy.janus_prompts import png_pixels

    rng = np.random.default_rng(1)
    arr = rng.integers(0, 256, (3, 5) if mode == "L" else (3, 5, 4), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr, mode=mode).save(buf, format="PNG")
    got = png_pixels({"png": base64.b64encode(buf.getvalue()).decode("ascii")})
    assert got.shape == (3, 5, 3) and got.dtype == np.uint8
    np.testing.assert_array_equal(got, np.asarray(Image.fromarray(arr, mode=mode).convert("RGB")))


# ============================================================================ recipe half: resolve_model
def test_a_file_is_not_a_model_directory(tmp_path):
    from r3_rl.policy.janus_recipe import resolve_model

    (tmp_path / "weights.bin").write_text("x")
    with pytest.raises(UserError, match=r"cannot load '.*weights.bin': not a directory; give a local path"):
        resolve_model(str(tmp_path / "weights.bin"))


def test_a_directory_named_config_json_is_not_a_config(tmp_path):
    from r3_rl.policy.janus_recipe import resolve_model

    (tmp_path / "config.json").mkdir()
    with pytest.raises(UserError, match="no config.json in that directory"):
        resolve_model(str(tmp_path))


def test_a_home_relative_directory_is_expanded(tmp_path, monkeypatch):
    from r3_rl.policy.janus_recipe import resolve_model

    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text("{}")
    assert resolve_model("~/m") == (str(tmp_path / "m"), True)


def test_a_known_missing_hub_file_is_not_a_cached_model(monkeypatch):
    """``try_to_load_from_cache`` answers a non-path sentinel for "known not to exist": not in the cache."""
    import huggingface_hub
    from huggingface_hub import constants

    from r3_rl.policy.janus_recipe import resolve_model

    monkeypatch.setattr(huggingface_hub, "try_to_load_from_cache", lambda repo, name: object())
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(UserError, match="not in the hub cache"):
        resolve_model("some-org/some-model")


def test_hub_reachable_connects_to_the_schemes_default_port(monkeypatch):
    import socket

    from r3_rl.policy.janus_recipe import _hub_reachable

    for k in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(k, raising=False)
    seen = []

    class Conn:
        def close(self):
            pass

    monkeypatch.setattr(socket, "create_connection", lambda addr, timeout: seen.append((addr, timeout)) or Conn())
    assert _hub_reachable("http://hub.example", timeout=2.0)
    assert _hub_reachable("https://hub.example")
    assert _hub_reachable("https://hub.example:8443")
    assert seen == [(("hub.example", 80), 2.0), (("hub.example", 443), 3.0), (("hub.example", 8443), 3.0)]

    def refuse(addr, timeout):
        raise OSError("unreachable")

    monkeypatch.setattr(socket, "create_connection", refuse)
    assert not _hub_reachable("https://hub.example")
    monkeypatch.setenv("https_proxy", "http://proxy:3128")  # behind a proxy: only the proxy can tell
    assert _hub_reachable("https://hub.example")


def test_check_recipe_resolves_the_model_only_when_weights_are_checked():
    from r3_rl.policy.janus_recipe import JanusRecipe

    recipe = SimpleNamespace(policy=SimpleNamespace(model=""))
    JanusRecipe.check_recipe(recipe, "r.yaml", weights=False)  # nothing to resolve: no error
    with pytest.raises(UserError, match="^policy.model: empty"):
        JanusRecipe.check_recipe(recipe, "r.yaml")


def test_from_recipe_passes_model_templates_dtype_and_device():
    from r3_rl.policy.janus_recipe import JanusRecipe

    class Rec(JanusRecipe):
        @classmethod
        def from_pretrained(cls, model, **kw):
            return model, kw

    recipe = SimpleNamespace(policy=SimpleNamespace(model="m", dtype="bfloat16", device="cuda:1"),
                             templates=SimpleNamespace(model_dump=lambda: {"reason": "r"}))
    assert Rec.from_recipe(recipe) == ("m", {"templates": {"reason": "r"}, "dtype": "bfloat16", "device": "cuda:1"})


# ============================================================================ KV cache helpers
def test_gradient_checkpointing_refuses_a_model_without_support():
    from r3_rl.policy.kv_cache import enable_gradient_checkpointing

    with pytest.raises(ValueError, match="^Linear does not support gradient checkpointing$"):
        enable_gradient_checkpointing(torch.nn.Linear(2, 2))


# ============================================================================ sampling distribution
def test_top_k_one_keeps_only_the_argmax():
    from r3_rl.policy.sampling import sampling_logprobs

    lp = sampling_logprobs(torch.tensor([[0.0, 2.0, 1.0, -1.0]]), SamplingParams(top_k=1))
    assert lp.tolist() == [[float("-inf"), 0.0, float("-inf"), float("-inf")]]


def test_bf16_logits_give_float32_logprobs_computed_in_float32():
    from r3_rl.policy.sampling import sampling_logprobs

    logits = torch.tensor([[0.0, 1.0, 2.0, 3.0]], dtype=torch.bfloat16)
    lp = sampling_logprobs(logits, SamplingParams(temperature=0.7))
    assert lp.dtype == torch.float32
    torch.testing.assert_close(lp, torch.log_softmax(logits.float() / 0.7, -1), atol=1e-6, rtol=0)


def test_no_rows_give_an_empty_float32_tensor():
    from r3_rl.policy.sampling import token_logprobs

    head = torch.nn.Linear(4, 6).to(torch.bfloat16)
    out = token_logprobs(torch.zeros(0, 4, dtype=torch.bfloat16), head, 6, torch.zeros(0, dtype=torch.long),
                         SamplingParams())
    assert out.dtype == torch.float32 and out.shape == (0,)


def test_a_minus_infinite_sampled_logprob_is_refused_too():
    """A row with no allowed token samples a token of log-prob -inf (not NaN): refused like a NaN."""
    from r3_rl.policy.sampling import check_sampled

    for bad in ([[-0.5, float("-inf")]], torch.tensor([[-0.1, float("inf")]])):
        with pytest.raises(RuntimeError, match="^where: a sampled token has a non-finite log-prob"):
            check_sampled(bad, "where")
    check_sampled([[-0.5, -30.0]], "where")


def test_decoded_pixels_use_mean_and_std_in_their_places(janus, monkeypatch):
    """``(x * std + mean) / rescale``, mean 0.5, std 0.125: x = 1 -> 159.375, x = -1 -> 95.625, x = 0 -> 127.5 (then
    truncated); mean and std swapped would give 159, 0, 31."""
    x = torch.tensor([[[[1.0, -1.0, 0.0]]]])  # [B=1, H=1, W=1, 3]
    monkeypatch.setattr(janus.model, "decode_image_tokens", lambda tokens: x)
    out = janus.engine.decode_images(torch.zeros(1, 4, dtype=torch.long), [0.5] * 3, [0.125] * 3, 1 / 255)
    assert out.tolist() == [[[[159, 95, 127]]]]


def test_yes_no_of_questions_of_different_lengths_equals_each_alone(janus):
    """Questions of different lengths share one left-padded batch: each score is the score of that question alone."""
    from r3_rl.policy.base import ImageInput

    rng = np.random.default_rng(3)
    images = [ImageInput(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)) for _ in range(2)]
    questions = ["Is it red?", "Is there a very small green dog to the left of two blue spheres?"]
    together = janus.answer_yes_no(images, questions)
    alone = [janus.answer_yes_no([im], [q])[0] for im, q in zip(images, questions)]
    assert together == pytest.approx(alone, abs=1e-6)
    assert abs(together[0] - together[1]) > 1e-6  # two different states
