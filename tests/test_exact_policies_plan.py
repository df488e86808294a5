"""Exact checks (round 9C audit) of the Janus and tiny policies' prompt/mask/persistence rules and of the
planner's rendered numbers: r3_rl.policy.{janus,janus_engine,janus_prompts,tiny,tiny_tokenizer,tiny_mot} and
r3_rl.plan.{render,validate,measure,reward_models,bagel_shape}.  Every expected value is written out by hand
from the spec (module docstrings, transformers' Janus postprocess, the Blocks vocabulary layout)."""
from __future__ import annotations

import copy
import json
from collections import OrderedDict
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from test_janus_policy import (
    TEMPLATES as JANUS_TEMPLATES,  # the Janus tests' stage templates
)

from r3_rl.errors import UserError
from r3_rl.trajectory import PromptItem, SamplingParams, Segment

BOI, EOI, PLACE = "<begin_of_image>", "<end_of_image>", "<image_placeholder>"


# ============================================================================ Janus (tiny, built from config)
@pytest.fixture(scope="module")
def janus_path(tmp_path_factory) -> str:
    from r3_rl.policy.janus_tiny import make_tiny_janus

    torch.set_num_threads(1)
    return make_tiny_janus(tmp_path_factory.mktemp("janus9c") / "tiny")


@pytest.fixture(scope="module")
def janus(janus_path):
    from r3_rl.policy.janus import JanusPolicy

    return JanusPolicy.from_pretrained(janus_path, templates=JANUS_TEMPLATES, dtype="float32", device="cpu")


def _detached(janus):
    """A shallow copy with its own decoded-pixel cache (nothing leaks into the shared fixture)."""
    p = copy.copy(janus)
    p._decoded = OrderedDict()
    return p


def test_janus_text_mask_is_false_for_lm_head_rows_past_the_tokenizer(janus):
    """Catches ``arange(vocab) <= len(tok)``: the first lm_head row past the tokenizer would be sampleable text."""
    from transformers import JanusForConditionalGeneration

    from r3_rl.policy.janus import JanusPolicy
    from r3_rl.policy.janus_tiny import BOS, EOS, IMAGE_TOKENS, PAD, tiny_janus_config

    tok = janus.tok
    assert len(tok) == 266  # 256 byte symbols + 6 special tokens + 4 word tokens
    ids = tok.convert_tokens_to_ids
    torch.manual_seed(0)
    model = JanusForConditionalGeneration(tiny_janus_config(266 + 8, ids(PAD), ids(BOS), ids(EOS),
                                                            ids(IMAGE_TOKENS["image_token"])))
    policy = JanusPolicy(model, janus.processor, JANUS_TEMPLATES)
    assert policy.text_mask.shape == (274,)
    assert not bool(policy.text_mask[266:].any())
    assert int(policy.text_mask.sum()) == 266 - 5  # BOS, pad, placeholder, BOI, EOI masked; EOS allowed


def test_janus_decoded_pixel_cache_keeps_the_256_newest_images(janus):
    """Catches ``popitem()`` (LIFO): the image just decoded would be evicted and the lookup raise KeyError."""
    p = _detached(janus)
    p._decode = lambda t: np.full((t.shape[0], 2, 2, 3), int(t[0, 0]) % 251, dtype=np.uint8)
    for k in range(257):
        out = p._pixels({"tokens": [k, 0]})
        assert int(out[0, 0, 0]) == k % 251
    assert len(p._decoded) == 256
    assert (0, 0) not in p._decoded and (1, 0) in p._decoded and (256, 0) in p._decoded
    assert next(iter(p._decoded)) == (1, 0)


def test_janus_image_samples_decode_every_image_in_chunks_of_eight(janus):
    """Catches a chunk slice of DECODE_CHUNK - 1: the 8th image of each chunk would be lost and later ones shifted."""
    from r3_rl.policy import janus as janus_mod

    assert janus_mod.DECODE_CHUNK == 8
    p = _detached(janus)
    calls = []

    def fake_decode(tokens):
        calls.append(tokens.shape[0])
        return np.stack([np.full((2, 2, 3), int(row[0]), dtype=np.uint8) for row in tokens])

    p._decode = fake_decode
    segs = [Segment(modality="image", context={}, token_ids=[i] * 16, logprobs=[0.0] * 16,
                    sampling=SamplingParams()) for i in range(10)]
    out = p._image_samples(segs)
    assert calls == [8, 2]
    assert [int(o.image[0, 0, 0]) for o in out] == list(range(10))
    assert [o.image_tokens for o in out] == [[i] * 16 for i in range(10)]


class _StubEngine:
    """Records what JanusPolicy hands its engine; returns fixed tokens."""

    def __init__(self):
        self.calls = []

    def sample(self, ids, images, modality, sp, steps, generator, null_ids=None, allowed=None, stop_id=None):
        self.calls.append({"ids": ids, "null_ids": null_ids, "steps": steps, "stop_id": stop_id})
        return [[1] * steps for _ in ids], [[0.0] * steps for _ in ids]


@pytest.mark.parametrize("cfg, guided", [(0.5, True), (0.0, True), (1.0, False), (3.0, True)])
def test_janus_any_cfg_scale_but_one_runs_the_null_stream(janus, cfg, guided):
    """Catches ``cfg_scale > 1.0``: a guidance scale below 1 (the recipe allows >= 0) would silently be ignored."""
    p = _detached(janus)
    p.engine = _StubEngine()
    bos, pad, boi = p.bos_id, p.pad_id, p.boi_id
    segs = p._sample("generate", [[bos, 70, 71, boi]], [None], "image", SamplingParams(cfg_scale=cfg), None)
    null = p.engine.calls[0]["null_ids"]
    if guided:
        assert null == [[bos, pad, pad, boi]]
        assert segs[0].context["uncond_ids"] == [bos, pad, pad, boi]
    else:
        assert null is None and "uncond_ids" not in segs[0].context


def test_janus_image_token_count_check_names_both_counts(janus_path):
    """Catches a dropped ``image_token_count`` check: a 576-token recipe on a 16-token checkpoint would load."""
    from r3_rl.policy.janus import JanusPolicy

    with pytest.raises(UserError, match=r"^policy.image_token_count: 576 but '.*' draws 16 tokens per image$"):
        JanusPolicy.from_pretrained(janus_path, templates=JANUS_TEMPLATES, image_token_count=576)
    assert JanusPolicy.from_pretrained(janus_path, templates=JANUS_TEMPLATES, image_token_count=16).num_image_tokens == 16


def test_janus_processor_and_vision_tower_token_counts_must_agree(janus):
    """Catches a dropped processor/vision-tower check: 9 placeholders for a 16-token tower would load silently."""
    from r3_rl.policy.janus import JanusPolicy

    proc = copy.copy(janus.processor)
    proc.num_image_tokens = 9
    with pytest.raises(UserError, match=r"^policy.model: processor expects 9 image tokens but the vision tower "
                                        r"makes 16$"):
        JanusPolicy(janus.model, proc, JANUS_TEMPLATES)


def test_janus_lora_scope_adds_siglip_only_with_train_vision(janus):
    """Catches an inverted ``train_vision`` in lora_scope (SigLIP adapted by default, frozen when asked to train)."""
    assert janus.lora_scope() == ["model.language_model"]
    assert janus.lora_scope(train_vision=True) == ["model.language_model", "model.vision_model"]


def test_janus_yes_no_question_puts_the_image_first_in_a_system_prompted_user_turn(janus):
    """Catches ``{prompt}{image}`` in answer_yes_no: Janus's VQA format puts the image before the question."""
    p = _detached(janus)
    seen = []

    class Stop(Exception):
        pass

    class Engine:
        def embed(self, ids, images, left=True):
            seen.append(ids)
            raise Stop

    p.engine = Engine()
    image = np.zeros((32, 32, 3), dtype=np.uint8)
    from r3_rl.policy.base import ImageInput

    with pytest.raises(Stop):
        p.answer_yes_no([ImageInput(image)], ["Is there a cube?"])
    ids = seen[0][0]
    assert ids[0] == p.bos_id
    assert p.tok.decode(ids[1:]) == ("You draw and check pictures.\n\n<|User|>: " + BOI + PLACE * 16 + EOI
                                     + "\nIs there a cube?\n\n<|Assistant|>:")


def test_janus_unknown_template_message_names_the_first_unknown_key_alphabetically():
    """Catches ``unknown[-1]``: the message must name the alphabetically first unknown key and list the valid ones."""
    from r3_rl.policy.janus_prompts import check_templates

    with pytest.raises(UserError) as e:
        check_templates({**JANUS_TEMPLATES, "zeta": "x", "alpha": "y"})
    assert str(e.value) == ("templates.alpha: unknown template for the Janus policy (valid: generate, generate_uncond, "
                            "reason, refine, reflect, stop_phrase, system)")


def test_janus_blank_text_after_the_image_is_left_out():
    """Catches ``if fill(after):``: whitespace after {image} would become an empty text part of the turn."""
    from r3_rl.policy.janus_prompts import user_content

    assert user_content("{prompt}{image}  ", {"prompt": "q"}, True) == [{"type": "text", "text": "q"},
                                                                       {"type": "image"}]
    assert user_content("{prompt}{image} {instruction} ", {"prompt": "q", "instruction": ""}, True) == [
        {"type": "text", "text": "q"}, {"type": "image"}]


def test_janus_engine_refuses_a_row_whose_placeholders_do_not_match_the_vision_tokens(janus):
    """Catches a dropped placeholder-count check: 15 slots for 16 SigLIP features would fill silently."""
    ids = [janus.bos_id, janus.boi_id] + [janus.image_token_id] * 15 + [janus.eoi_id, 70]
    image = np.zeros((32, 32, 3), dtype=np.uint8)
    with pytest.raises(ValueError, match=r"image placeholders per row \[15\] do not match the vision tower's 16 tokens"):
        janus.engine.embed([ids], [image])


def test_janus_decoded_pixels_truncate_like_transformers_postprocess():
    """Catches rounding in decode_images: transformers' postprocess clips then casts to uint8 (truncates)."""
    from r3_rl.policy.janus_engine import JanusEngine

    pixels = torch.tensor([100.6, 0.9, 254.99, -3.0, 300.0, 17.5])  # wanted pixel values before the cast
    x = (pixels / 255.0 - 0.5) / 0.5  # normalised with mean = std = 0.5, rescale 1/255

    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lm_head = torch.nn.Linear(1, 1)
            self.model = torch.nn.Module()
            self.model.vqmodel = torch.nn.Module()
            self.model.vqmodel.quantize = torch.nn.Linear(1, 1)

        def decode_image_tokens(self, tokens):
            return x.view(1, 1, 6, 1).expand(1, 1, 6, 3).clone()

    out = JanusEngine(Model(), None, 0, 1).decode_images(torch.zeros((1, 4), dtype=torch.long), [0.5] * 3, [0.5] * 3,
                                                         1 / 255)
    assert out.dtype == np.uint8
    assert out[0, 0, :, 0].tolist() == [100, 0, 254, 0, 255, 17]  # rounding: 101, 1, 255, ..., 18


# ============================================================================ tiny unified policy
def _tiny_templates():
    from r3_rl.config import Templates

    return Templates().model_dump()


@pytest.fixture(scope="module")
def tiny():
    from r3_rl.policy.tiny import TinyUnifiedPolicy

    torch.set_num_threads(1)
    return TinyUnifiedPolicy.build(_tiny_templates(), rows=2, cols=3, hidden_size=16, num_layers=1, num_heads=2,
                                   intermediate_size=32, seed=0)


def _toks(policy, ids):
    return policy.tok.convert_ids_to_tokens(ids)


IMG6 = ["<img_0>", "<img_1>", "<img_2>", "<img_3>", "<img_4>", "<img_5>"]


def test_tiny_vocabulary_layout_and_masks(tiny):
    """Catches ``<image>`` left out of the text mask (text stages could emit an image marker) and any shift of the
    image-token range: specials 0-8, image cells 9-27, never text; <|im_end|>, <think>, </think> stay text."""
    vocab = tiny.tok.get_vocab()
    assert [vocab[s] for s in ("<pad>", "<unk>", "<bos>", "<|im_start|>", "<|im_end|>", "<think>", "</think>",
                               "<image>", "</image>", "<img_0>", "<img_18>")] == [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 27]
    assert torch.nonzero(tiny.image_mask).flatten().tolist() == list(range(9, 28))
    not_text = set(torch.nonzero(~tiny.text_mask).flatten().tolist())
    assert not_text == {0, 1, 2, 3, 7, 8, *range(9, 28)}
    assert (tiny.stop_id, tiny.pad_id, tiny.bos_id, tiny.image_offset) == (4, 0, 2, 9)


def test_tiny_save_load_keeps_grid_version_and_old_folders_default_to_4x4(tiny, tmp_path: Path):
    """Catches a grid file with rows/cols swapped, a version not read back, and a wrong default grid for folders
    saved without the grid file."""
    from r3_rl.policy.tiny import TinyUnifiedPolicy
    from r3_rl.policy.tiny_recipe import GRID_FILE

    tiny.version = 5
    try:
        tiny.save_pretrained(str(tmp_path / "ckpt"))
    finally:
        tiny.version = 0
    assert GRID_FILE == "r3_grid.json"
    grid = json.loads((tmp_path / "ckpt" / "r3_grid.json").read_text())
    assert grid == {"rows": 2, "cols": 3, "version": 5, "image_input": "tokens"}
    back = TinyUnifiedPolicy.from_pretrained(str(tmp_path / "ckpt"), _tiny_templates())
    assert (back.rows, back.cols, back.num_cells, back.version) == (2, 3, 6, 5)
    (tmp_path / "ckpt" / "r3_grid.json").unlink()
    old = TinyUnifiedPolicy.from_pretrained(str(tmp_path / "ckpt"), _tiny_templates())
    assert (old.rows, old.cols, old.version, old.image_input) == (4, 4, 0, "tokens")


def test_tiny_generate_contexts_close_the_plan_with_the_stop_token(tiny):
    """Catches a plan not closed by <|im_end|> and an unconditional context without BOS."""
    ctx, unc = tiny.generate_contexts([PromptItem("a", "a red square"), PromptItem("b", "a red square")],
                                      ["red square", None])
    assert _toks(tiny, ctx[0]) == ["<bos>", "<|im_start|>", "a", "red", "square", "<|im_end|>", "<|im_start|>",
                                   "red", "square", "<|im_end|>", "<image>"]
    assert _toks(tiny, ctx[1]) == ["<bos>", "<|im_start|>", "a", "red", "square", "<|im_end|>", "<|im_start|>",
                                   "<image>"]
    assert [_toks(tiny, u) for u in unc] == [["<bos>", "<|im_start|>", "<|im_end|>", "<image>"]] * 2


def test_tiny_refine_null_context_drops_prompt_and_instruction_but_keeps_the_image(tiny, monkeypatch):
    """Catches the refine CFG null context keeping the prompt (guidance would then push only on the instruction)."""
    from r3_rl.policy.base import ImageInput

    seen = {}

    def fake_sample(contexts, modality, sp, generator, uncond=None):
        seen.update(contexts=contexts, uncond=uncond, modality=modality)
        return []

    monkeypatch.setattr(tiny, "_sample", fake_sample)
    tiny.refine([PromptItem("a", "a red square")], [ImageInput(None, [0, 1, 2, 3, 4, 5])], ["add a red circle"],
                SamplingParams(cfg_scale=2.0))
    assert seen["modality"] == "image"
    assert _toks(tiny, seen["contexts"][0]) == ["<bos>", "<|im_start|>", "a", "red", "square", "<image>", *IMG6,
                                                "</image>", "add", "a", "red", "circle", "<|im_end|>", "<image>"]
    assert _toks(tiny, seen["uncond"][0]) == ["<bos>", "<|im_start|>", "<image>", *IMG6, "</image>", "<|im_end|>",
                                              "<image>"]


def test_tiny_answer_context_and_question_words(tiny):
    """Catches digits dropped from questions and an answer template that does not open the assistant turn."""
    from r3_rl.policy.base import ImageInput
    from r3_rl.policy.tiny import question_words

    assert question_words("How many 2-cubes? IS it Red!") == "how many 2 cubes is it red"
    ids = tiny.answer_context(ImageInput(None, [0, 1, 2, 3, 4, 5]), "Is there a red square?")
    assert _toks(tiny, ids) == ["<bos>", "<|im_start|>", "<image>", *IMG6, "</image>", "is", "there", "a", "red",
                                "square", "<|im_end|>", "<|im_start|>"]


def test_tiny_decode_drops_pad_and_the_stop_token(tiny):
    """Catches <|im_end|> kept in decoded text (the critique would end with a marker)."""
    vocab = tiny.tok.get_vocab()
    assert tiny.decode([vocab["red"], vocab["square"], vocab["<|im_end|>"], vocab["<pad>"]]) == "red square"
    assert tiny.decode([vocab["<think>"], vocab["red"], vocab["</think>"]]) == "<think> red </think>"


def assert_each_sampling_scored_as_alone(policy, samplings: list[SamplingParams]) -> None:
    """Two segments of one plan that differ only in their sampling settings: scored in one batch, each gets the
    log-probs it gets alone, and the two differ (the setting matters)."""
    vocab = policy.tok.get_vocab()
    ctx = policy.render("reason", prompt="a red square")
    targets = [vocab["red"], vocab["square"], vocab["<|im_end|>"]]
    segs = [Segment(modality="text", context={"input_ids": ctx}, token_ids=targets, logprobs=[], sampling=sp)
            for sp in samplings]
    with torch.no_grad():
        together = policy.segment_logprobs(segs)
        alone = [policy.segment_logprobs([s])[0] for s in segs]
    for a, b in zip(together, alone):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)
    assert not torch.allclose(alone[0], alone[1])


def test_tiny_segments_differing_only_in_top_p_keep_their_own_distribution(tiny):
    """Catches grouping segments without top_p: a batch would score a segment under another segment's top_p."""
    assert_each_sampling_scored_as_alone(tiny, [SamplingParams(temperature=1.0, top_p=tp) for tp in (1.0, 0.2)])


def test_tiny_yes_no_needs_both_words_in_the_vocabulary():
    """Catches ``and`` in the yes/no vocabulary check: a vocabulary with 'yes' but no 'no' must raise
    NotImplementedError, not a KeyError after a forward."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from r3_rl.policy.base import ImageInput
    from r3_rl.policy.tiny import TinyUnifiedPolicy
    from r3_rl.policy.tiny_tokenizer import build_tokenizer

    tok = build_tokenizer({"yes", "red", "is"}, 19)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok.get_vocab()), hidden_size=8, intermediate_size=16,
                                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2))
    policy = TinyUnifiedPolicy(model, tok, _tiny_templates(), 2, 3)
    with pytest.raises(NotImplementedError, match="no 'yes'/'no'"):
        policy.answer_yes_no([ImageInput(None, [0] * 6)], ["is it red"])


def test_tiny_tokenizer_vocabulary_and_template_words():
    """Catches image words in the text list (duplicate ids), {instruction} kept as a word, and placeholders glued to
    their neighbours instead of splitting them."""
    from r3_rl.policy.tiny_tokenizer import build_tokenizer, template_words

    vocab = build_tokenizer(["red", "<img_0>", "<pad>", "blue"], 3).get_vocab()
    assert vocab == {"<pad>": 0, "<unk>": 1, "<bos>": 2, "<|im_start|>": 3, "<|im_end|>": 4, "<think>": 5,
                     "</think>": 6, "<image>": 7, "</image>": 8, "<img_0>": 9, "<img_1>": 10, "<img_2>": 11,
                     "blue": 12, "red": 13}
    assert template_words(["{instruction} fix it", "a{prompt}b {image}{plan}"]) == {"fix", "it", "a", "b"}


# ============================================================================ tiny Mixture-of-Transformers
def test_mot_route_covers_exactly_the_image_token_span():
    """Catches ``<= end`` / ``> first`` in the routing mask and an off-by-one span in modality_config."""
    from transformers import LlamaConfig

    from r3_rl.policy.tiny_mot import ROUTE_KEY, MoTLlamaForCausalLM, modality_config

    config = modality_config(LlamaConfig(vocab_size=40, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=2), 9, 19)
    assert config.r3_image_token_span == [9, 28]
    model = MoTLlamaForCausalLM(config)
    ids = torch.tensor([[8, 9, 10, 27, 28, 39]])
    _, kwargs = model._add_route(model.model, (), {"input_ids": ids})
    assert kwargs[ROUTE_KEY].tolist() == [[False, True, True, True, False, False]]


def test_mot_experts_send_each_row_through_its_own_copy():
    """Catches an all-image batch sent through the text copy (or mixed rows crossed over)."""
    from r3_rl.policy.tiny_mot import ModalityExperts, Route

    route = Route()
    torch.manual_seed(0)
    experts = ModalityExperts(torch.nn.Linear(3, 2), route)
    with torch.no_grad():
        experts.image.weight.add_(1.0)
    x = torch.randn(1, 4, 3)
    with torch.no_grad():
        text, image = experts.text(x), experts.image(x)
        for mask in ([[True] * 4], [[False] * 4], [[True, False, False, True]]):
            route.image = torch.tensor(mask)
            m = route.image.unsqueeze(-1)
            torch.testing.assert_close(experts(x), torch.where(m, image, text), atol=1e-6, rtol=0)


def test_mot_layers_route_attention_mlp_and_both_norms():
    """Catches a layer whose norms (or projections) stay shared between the modalities."""
    from transformers import LlamaConfig

    from r3_rl.policy.tiny_mot import (
        ModalityExperts,
        MoTLlamaForCausalLM,
        modality_config,
    )

    config = modality_config(LlamaConfig(vocab_size=40, hidden_size=8, intermediate_size=16, num_hidden_layers=2,
                                         num_attention_heads=2, num_key_value_heads=2), 9, 19)
    for layer in MoTLlamaForCausalLM(config).model.layers:
        for mod in (layer.input_layernorm, layer.post_attention_layernorm, layer.self_attn.q_proj,
                    layer.self_attn.k_proj, layer.self_attn.v_proj, layer.self_attn.o_proj, layer.mlp.gate_proj,
                    layer.mlp.up_proj, layer.mlp.down_proj):
            assert isinstance(mod, ModalityExperts)


# ============================================================================ plan: rendered report
def _shape(**kw):
    from r3_rl.plan.shapes import ModelShape

    sizes = dict(source="hand", hidden=64, layers=4, heads=4, kv_heads=4, head_dim=16, intermediate=128,
                 text_vocab=100, image_vocab=10, image_tokens=4, vision_tokens=4, params=3 * 10 ** 9,
                 params_trained=2 * 10 ** 9, params_vision=0, largest_layer=10, largest_weight=10)
    sizes.update(kw)
    return ModelShape(**sizes)


def _plan(processes, gpus=2, needed=1, memory=10.0, host=None, address=None, store_gb=None, shape=None):
    from r3_rl.plan.report import Plan

    recipe = SimpleNamespace(name="r9", policy=SimpleNamespace(dtype="bfloat16", device="cuda"),
                             ray=SimpleNamespace(address=address, object_store_gb=store_gb))
    return Plan(recipe, shape or _shape(), gpus, memory, processes, needed, [], host or {})


def test_render_numbers_units_and_the_90_percent_boundary():
    """Catches GiB instead of GB, ``<`` for ``<=`` at exactly 90%, the header's usable figure, a CPU process shown
    per GPU and flow models' images called tokens."""
    from r3_rl.plan.render import render
    from r3_rl.plan.report import Process

    worker = Process("rollout worker", per_gpu=1, resident={"weights": 2.5e9})
    cpu = Process("reward worker", per_gpu=0, resident={"weights": 1e9})
    trainer = Process("trainer process", per_gpu=1, resident={"weights": 9e9})
    lines = render(_plan([worker, cpu, trainer], shape=_shape(flow=True, image_tokens=1024))).splitlines()
    assert lines[0] == "r3-rl plan: r9, 2 GPU(s) of 10 GB, policy bfloat16 on cuda"
    assert lines[2] == ("       3.00 B parameters (2.00 B trainable; frozen: 1.00 B), width 64, 4 layers, "
                        "1024 latent positions per image")
    assert "rollout worker (1 per GPU)".ljust(46) + "GB" in lines
    assert "reward worker (on CPU)".ljust(46) + "GB" in lines
    assert "trainer process (on GPU 0)".ljust(46) + "GB" in lines
    assert "  " + "weights".ljust(28) + " " + "2.50".rjust(9) + "   " in lines  # GB = 10^9 bytes, not GiB
    assert "  " + "peak".ljust(28) + " " + "9.00".rjust(9) in lines
    assert "per GPU (fits under 90% of 10 GB = 9 GB):" in lines
    rows = [ln for ln in lines if ln.endswith("  ok") or ln.endswith("  OVER")]
    assert [ln.split()[-3:] for ln in rows] == [["2.5", "GB", "ok"], ["9.0", "GB", "ok"]]
    assert lines[-1] == "verdict: fits"


def test_render_host_memory_and_ray_object_store_advice():
    """Catches MiB for MB, a node size of store*0.3 instead of store/0.3, a floored object-store setting, ``<`` for
    ``<=`` when the store exactly fills ray.object_store_gb, and a joined cluster's store read from the recipe."""
    from r3_rl.plan.render import render
    from r3_rl.plan.report import Process

    procs = [Process("trainer process", per_gpu=1, resident={"weights": 1e9})]
    host = {"Ray object store": 2.5e9, "pinned buffers": 1e7}
    lines = render(_plan(procs, gpus=1, host=host)).splitlines()
    assert ("host (CPU) memory of the node beyond the processes: 2.5 GB (Ray object store 2.5; pinned buffers "
            "10.0 MB)") in lines
    assert ("  Ray's default object store is 30% of the node's memory: 2.5 GB in it needs a node of 8 GB or more "
            "(or --set ray.object_store_gb=3; on a cluster ray start --object-store-memory)") in lines
    lines = render(_plan(procs, gpus=1, host=host, store_gb=2.5)).splitlines()
    assert "  ray.object_store_gb gives the object store 2.5 GB: room for the 2.5 GB" in lines
    lines = render(_plan(procs, gpus=1, host=host, store_gb=2.0)).splitlines()
    assert "  ray.object_store_gb gives the object store 2 GB: less than the 2.5 GB it needs" in lines
    text = render(_plan(procs, gpus=1, host=host, address="auto", store_gb=2.0))
    assert "ray.object_store_gb gives" not in text and "Ray's default object store is 30%" in text


def _advice_plan(backend="ray", ranks=2, gpus=8):
    learner = SimpleNamespace(gradient_checkpointing=False, micro_batch_size=1, ranks=ranks, backend="deepspeed",
                              deepspeed=SimpleNamespace(zero_stage=2), gpus_per_rank=1.0, lora=None)
    recipe = SimpleNamespace(learner=learner, eval=SimpleNamespace(batch_size=8),
                             rollout=SimpleNamespace(groups_per_task=5, backend=backend, workers=2,
                                                     gpus_per_worker=1.0))
    return SimpleNamespace(recipe=recipe, gpus=gpus)


def test_advice_candidates_count_the_free_gpus_and_halve_to_one():
    """Catches a learner.ranks range that stops one short, Ray workers' GPUs taken off a local rollout, and halvings
    that stop at 2."""
    from r3_rl.plan.render import _candidates, _halvings, _yaml

    assert _candidates(_advice_plan()) == [
        ("learner.gradient_checkpointing", [True]), ("eval.batch_size", [4, 2, 1]),
        ("rollout.groups_per_task", [2, 1]), ("learner.ranks", [3, 4, 5, 6]), ("learner.lora", [{"r": 16}])]
    assert dict(_candidates(_advice_plan(backend="local")))["learner.ranks"] == [3, 4, 5, 6, 7, 8]
    assert _halvings(5) == [2, 1] and _halvings(3) == [1] and _halvings(1) == []
    assert (_yaml(True), _yaml(False), _yaml(0.5), _yaml(2.0), _yaml({"r": 16})) == ("true", "false", "0.5", "2",
                                                                                      "{r: 16}")


# ============================================================================ plan: validation harness, measure
def test_validate_check_errors_are_relative_to_the_measurement():
    """Catches an error ratio inverted (measured / predicted) in the plan-vs-measurement check."""
    from r3_rl.plan.validate import Check

    c = Check("learner step", 64, 2, False, before=100.0, predicted_growth=20.0, measured_growth=10.0, parts={})
    assert (c.predicted, c.measured) == (120.0, 110.0)
    assert c.error == pytest.approx(120 / 110 - 1, abs=1e-12)
    assert c.growth_error == pytest.approx(1.0, abs=1e-12)


def test_validate_janus_shaped_model_has_janus_pro_proportions(monkeypatch, tmp_path: Path):
    """Catches a head count of width // 64: Janus-Pro's heads are 128 wide, MLP 2.75 x width, codebook 16,384."""
    from r3_rl.plan import validate
    from r3_rl.policy import janus_tiny

    seen = {}
    monkeypatch.setattr(janus_tiny, "make_tiny_janus", lambda path, **kw: seen.update(kw) or str(path))
    validate.janus_shaped(tmp_path / "j", 1024, 3, 8)
    assert seen == {"hidden_size": 1024, "num_layers": 3, "grid": 8, "heads": 8, "kv_heads": 8, "intermediate": 2816,
                    "codebook": 16384}
    validate.janus_shaped(tmp_path / "j", 64, 1, 4)
    assert (seen["heads"], seen["kv_heads"], seen["intermediate"]) == (1, 1, 176)


def test_measured_peak_is_the_high_water_mark_not_the_final_level():
    """Catches ``peak = live``: the peak must be the largest running total, not what is left at the end."""
    from r3_rl.plan.measure import measured_peak

    def work():
        big = torch.empty(1_000_000, dtype=torch.float32)  # 4,000,000 bytes
        del big
        return torch.empty(250_000, dtype=torch.float32)  # 1,000,000 bytes, still alive

    out, peak = measured_peak(work)
    assert out.numel() == 250_000
    assert 4_000_000 <= peak < 5_000_000


# ============================================================================ plan: reward models
def test_reward_model_bytes_and_description():
    """Catches bytes always at 4 per parameter and sizes in MiB instead of millions."""
    from r3_rl.plan.reward_models import CLIP_L14, RewardModel

    assert RewardModel("CLIP", "m", "bfloat16", 10, "x").bytes == 20.0
    assert RewardModel("CLIP", "m", "float16", 10, "x").bytes == 20.0
    assert RewardModel("CLIP", "m", "float32", 10, "x").bytes == 40.0
    assert RewardModel("CLIP", "m", "float32", None, "x").bytes == 0.0
    assert (RewardModel("CLIP", CLIP_L14, "float32", 427_616_513, "published config").describe()
            == "CLIP: openai/clip-vit-large-patch14, 428 M, float32 (published config)")


def test_reward_models_options_device_order_and_dtype_copies(monkeypatch):
    """Catches the default device read as cpu, clip/geneval option prefixes swapped, the detector listed after CLIP,
    geneval's ``model`` option ignored, and two dtypes of one model merged."""
    from r3_rl.plan import reward_models as rm

    monkeypatch.setattr(rm, "_params", lambda model: (None, "not on this machine"))
    spec = SimpleNamespace

    def pairs(s):
        return [(m.role, m.model, m.dtype) for m in rm.models_of(s)]

    assert pairs(spec(name="clip", options=None)) == [("CLIP", rm.CLIP_L14, "float32")]
    assert pairs(spec(name="clip", options={"model": "me/clip", "clip_model": "me/other"})) == [
        ("CLIP", "me/clip", "float32")]
    assert pairs(spec(name="clip", options={"device": "cpu"})) == []
    assert pairs(spec(name="geneval", options={"model": "me/det", "clip_model": "me/c", "dtype": "bfloat16"})) == [
        ("geneval detector (mask2former)", "me/det", "bfloat16"), ("CLIP", "me/c", "bfloat16")]
    assert pairs(spec(name="geneval", options={"detector": "owlv2"})) == [
        ("geneval detector (owlv2)", rm.OWLV2_B16, "float32"), ("CLIP", rm.CLIP_L14, "float32")]
    both = rm.reward_models([spec(name="clip", options={}), spec(name="clip", options={"dtype": "bfloat16"}),
                             spec(name="clip", options={"dtype": "bfloat16"})])
    assert [(m.model, m.dtype) for m in both] == [(rm.CLIP_L14, "float32"), (rm.CLIP_L14, "bfloat16")]


# ============================================================================ plan: BAGEL shape helpers
def test_bagel_vit_tokens_take_the_max_side():
    """Catches the min side used for the largest SigLIP image (980 // 14 = 70 a side, not 224 // 14 = 16)."""
    from r3_rl.plan.bagel_shape import _vit_tokens

    assert _vit_tokens((980, 224, 14)) == 4900


def test_bagel_vae_header_counts_and_reads_the_decoder_width(tmp_path: Path):
    """Catches the output-channel dimension (3) read instead of conv_out's input channels."""
    from safetensors.torch import save_file

    from r3_rl.plan.bagel_shape import _vae_header

    save_file({"decoder.conv_out.weight": torch.zeros(3, 64, 3, 3), "encoder.conv_in.bias": torch.zeros(10)},
              str(tmp_path / "ae.safetensors"))
    assert _vae_header(tmp_path / "ae.safetensors") == (3 * 64 * 9 + 10, 64)


def test_bagel_existing_folder_named_like_the_builtin_is_not_the_builtin(tmp_path: Path):
    """Catches a local folder named BAGEL-7B-MoT (missing its configs) silently planned as the built-in shape."""
    from r3_rl.plan.bagel_shape import bagel_shape

    folder = tmp_path / "BAGEL-7B-MoT"
    folder.mkdir()
    recipe = SimpleNamespace(policy=SimpleNamespace(model=str(folder), options={}))
    with pytest.raises(UserError, match=r"is not a BAGEL checkpoint folder \(no llm_config.json\)"):
        bagel_shape(recipe)


def test_validate_learner_check_counts_the_policy_and_its_reference_before_the_step(tmp_path: Path):
    """Catches ``before`` counting the weights once: the policy and its KL reference (a full copy) both exist."""
    from transformers import AutoConfig

    from r3_rl.plan import validate
    from r3_rl.plan.shapes import shape_from_config
    from r3_rl.policy.janus import JanusPolicy

    torch.set_num_threads(1)
    path = validate.janus_shaped(tmp_path / "j", 128, 1, 2)
    shape = shape_from_config(AutoConfig.from_pretrained(path), "validation")
    check = validate.learner_check(path, shape, False, 1)
    policy = JanusPolicy.from_pretrained(path, templates=validate.TEMPLATES)
    weights = 4 * (sum(p.numel() for p in policy.model.parameters())
                   + sum(b.numel() for b in policy.model.buffers()))  # float32
    trained = sum(p.numel() for p in policy.model.parameters() if p.requires_grad)
    adam = 2 * 4 * trained  # two fp32 moments (plus a few bytes of step counters); fp32 weights: no masters
    assert abs(check.before - (2 * weights + adam)) < 0.01 * weights


def test_bagel_image_cfg_needs_its_row_only_above_one_and_fp16_vae_decodes_in_two_bytes():
    """Catches ``image_cfg != 1.0`` for ``> 1.0`` (at 1 the image-unconditional branch is never encoded), a scale
    below 1 accepted (BAGEL ignores it), and fp16 VAE counted as 4 bytes an element."""
    from r3_rl.plan.bagel_shape import bagel_shape

    def shape(**options):
        return bagel_shape(SimpleNamespace(policy=SimpleNamespace(model="ByteDance-Seed/BAGEL-7B-MoT",
                                                                  options=options)))

    half = shape(image_cfg=1.2, vae_dtype="float16")
    assert (half.image_cfg_rows, half.decode_bytes) == (1, 2)
    with pytest.raises(UserError, match=r"policy.options.image_cfg: expected a number >= 1 .*got 0.5"):
        shape(image_cfg=0.5)
    off = shape(image_cfg=1.0, vae_dtype="bfloat16")
    assert (off.image_cfg_rows, off.decode_bytes) == (0, 2)
