"""Exact small cases of BAGEL's key check, ViT tower, model forward and checkpoint loading (r3_rl/policy/bagel:
state_check, vision, model, embeddings, checkpoint) left loose by earlier rounds (round 17 audit).

Each test pins one behaviour by a hand-written expected value or an independent peer: the three one-line errors of
``check_state_keys`` word for word (the file's names, both counts), the ViT read at a sub-grid of its position table
(peer: ``F.conv2d`` with the stock Conv2d kernel plus the table rows ``r*side + c`` written out), the flow time given
to clean VAE latents (0) and to a noised block, images of different sizes in one batch (peer: each row run alone),
float32 logits of a bf16 model, the gradient-checkpointing switch, which weight file wins when several are present,
a tokenizer given as ``tokenizer.json`` alone, the load's default dtypes and the refusal of a path that is a file;
and a weight file cut short, refused in one line naming it (a SafetensorError traceback before this round).
"""
from __future__ import annotations

import shutil

import pytest
import torch
import torch.nn.functional as F

from r3_rl.errors import UserError
from r3_rl.policy.bagel.layout import NoiseBlock, TextBlock, VaeBlock, VitBlock


@pytest.fixture(scope="module")
def tiny():
    """(model, tokenizer): the tiny BAGEL in fp32 (ViT: 4 px patches, 8x8 table), as the other exact tests build it."""
    from r3_rl.policy.bagel.tiny import tiny_bagel

    model, tok = tiny_bagel(seed=0)
    return model.eval(), tok


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    from r3_rl.policy.bagel import make_tiny_bagel

    return make_tiny_bagel(tmp_path_factory.mktemp("bagel17") / "tiny", seed=0)


# ================================================================================================ state_check
EXPECTED = {"a.weight": (2, 3), "b.bias": (4,)}


def _file_name(key: str) -> str:
    return "file." + key.replace(".", "_")


def test_missing_key_error_names_the_file_key_and_both_counts():
    """One key of two in the file: the message names the file's spelling (``rename``), the expected shape, the
    file's key count (1) and the model's (2).  Catches the model's name reported and the two counts swapped."""
    from r3_rl.policy.bagel.state_check import check_state_keys

    with pytest.raises(UserError) as e:
        check_state_keys(EXPECTED, {"a.weight": (2, 3)}, "w.safetensors", rename=_file_name)
    assert str(e.value) == ("w.safetensors: key 'file.b_bias' missing (expected shape [4]; 1 keys in the file, "
                            "the model has 2)")
    with pytest.raises(UserError) as e:  # both missing: the first in the model's order
        check_state_keys(EXPECTED, {}, "w", rename=_file_name)
    assert str(e.value) == "w: key 'file.a_weight' missing (expected shape [2, 3]; 0 keys in the file, the model has 2)"


def test_shape_and_unexpected_key_errors_are_word_for_word():
    """A transposed weight, then a third key the model lacks: ``has shape [3, 2], the model expects [2, 3]`` and
    ``unexpected key ... the model has 2 keys`` (the model's count, not the file's 3), both in the file's names."""
    from r3_rl.policy.bagel.state_check import check_state_keys

    with pytest.raises(UserError) as e:
        check_state_keys(EXPECTED, {"a.weight": (3, 2), "b.bias": (4,)}, "w", rename=_file_name)
    assert str(e.value) == "w: key 'file.a_weight' has shape [3, 2], the model expects [2, 3]"
    found = {"a.weight": (2, 3), "b.bias": (4,), "c.extra": (1,)}
    with pytest.raises(UserError) as e:
        check_state_keys(EXPECTED, found, "w", rename=_file_name)
    assert str(e.value) == "w: unexpected key 'file.c_extra' (not a BAGEL weight; the model has 2 keys)"
    check_state_keys(EXPECTED, {"b.bias": [4], "a.weight": [2, 3]}, "w")  # lists, other order: accepted


# ================================================================================================ vision
def test_vit_tower_reads_a_wide_image_with_the_top_left_sub_grid_of_its_table(tiny):
    """An 8x12 px image at 4 px patches (2 rows x 3 columns of the 8x8 table) equals the stock SigLIP pieces
    computed independently: ``F.conv2d`` with the Conv2d form of the patch kernel, plus table rows 0, 1, 2, 8, 9, 10,
    then the encoder and the final norm.  Catches the first 6 table rows used (right only for full-width images)."""
    model, _ = tiny
    vm = model.vit_model.vision_model
    emb = vm.embeddings
    p = model.config.vit.patch_size
    img = torch.rand(1, 3, 8, 12, generator=torch.Generator().manual_seed(7)) * 2 - 1
    ids = torch.tensor([0, 1, 2, 8, 9, 10])
    with torch.no_grad():
        # the Linear weight [hidden, (kh, kw, c)] back to a Conv2d kernel [hidden, c, kh, kw]
        kernel = emb.patch_embedding.weight.reshape(-1, p, p, 3).permute(0, 3, 1, 2)
        conv = F.conv2d(img, kernel, emb.patch_embedding.bias, stride=p)  # [1, hidden, 2, 3]
        x = conv.flatten(2).transpose(1, 2) + emb.position_embedding.weight[[0, 1, 2, 8, 9, 10]]
        expected = vm.post_layernorm(vm.encoder(inputs_embeds=x).last_hidden_state)
        got = model.vit_model(img, ids)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


# ================================================================================================ model
def test_forward_feeds_the_llm_each_block_embedding_at_its_own_positions(tiny):
    """The input rows the LLM receives, captured by a pre-hook, written out by hand: token embeddings at the text
    and marker positions, ``embed_images`` at the 6 ViT positions, ``embed_latents`` at t = 0 for clean VAE latents
    and at t = 0.7 for the noised block, and zeros at a shorter row's pads.  Catches the blocks written one
    position late, clean latents embedded as noise (t = 1) and pads given a token embedding."""
    model, _ = tiny
    tok = model.config.tokens
    g = torch.Generator().manual_seed(8)
    img = torch.rand(3, 8, 12, generator=g) * 2 - 1
    lat, noisy = torch.randn(4, 64, generator=g), torch.randn(2, 64, generator=g)
    rows = [[TextBlock([5]), VitBlock(img), TextBlock([6]), VaeBlock(lat, (2, 2)), NoiseBlock(noisy, 0.7, (1, 2))],
            [TextBlock([7])]]
    seen = []
    handle = model.language_model.model.register_forward_pre_hook(lambda mod, args: seen.append(args[0].clone()))
    try:
        with torch.no_grad():
            model(rows)
            emb = model.language_model.model.embed_tokens
            vs, ve = tok.vision_start, tok.vision_end
            ids = [5, vs, 0, 0, 0, 0, 0, 0, ve, 6, vs, 0, 0, 0, 0, ve, vs, 0, 0, ve]
            expected = emb(torch.tensor(ids))
            expected[2:8] = model.embed_images(img[None])[0]
            expected[11:15] = model.embed_latents(lat[None], torch.tensor([0.0]), (2, 2))[0]
            expected[17:19] = model.embed_latents(noisy[None], torch.tensor([0.7]), (1, 2))[0]
            pad_row = torch.cat([emb(torch.tensor([7])), torch.zeros(19, expected.shape[1])])
    finally:
        handle.remove()
    assert len(seen) == 1 and seen[0].shape == (2, 20, expected.shape[1])
    torch.testing.assert_close(seen[0][0], expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(seen[0][1], pad_row, rtol=0, atol=0)


def test_images_of_different_sizes_in_one_batch_each_match_their_row_alone(tiny):
    """Rows holding an 8x8 and an 8x12 px image (same height) and a 12x8 one: each row's hidden states equal the
    row run alone.  Catches ViT blocks grouped by part of their shape (the images then cannot be stacked)."""
    model, _ = tiny
    g = torch.Generator().manual_seed(9)
    rows = [[TextBlock([5]), VitBlock(torch.rand(3, h, w, generator=g) * 2 - 1), TextBlock([6])]
            for h, w in ((8, 8), (8, 12), (12, 8))]
    with torch.no_grad():
        both = model(rows).hidden
        for i, row in enumerate(rows):
            alone = model([row]).hidden[0]
            torch.testing.assert_close(both[i, :alone.shape[0]], alone, rtol=1e-5, atol=1e-5)


def test_logits_and_velocities_of_a_bf16_model_come_back_in_float32(tiny):
    """The docstring's promise: next-token logits and velocities are float32 even when the model runs in bf16,
    and equal the bf16 heads' outputs widened; the flow time stays float32.  Catches the ``.float()`` of the lm head
    dropped and the time cast to the model's dtype."""
    import copy

    model, _ = tiny
    half = copy.deepcopy(model).to(torch.bfloat16)
    times = []
    half.time_embedder.register_forward_pre_hook(lambda mod, args: times.append(args[0].clone()))
    with torch.no_grad():
        logits, cache = half.next_token_logits(None, [[TextBlock([5, 6, 7])]])
        ref = half(([[TextBlock([5, 6, 7])]])).hidden[0, -1]
        v = half.predict_velocity(cache, torch.randn(1, 2, 64, generator=torch.Generator().manual_seed(1)), 0.7,
                                  (1, 2))
    assert logits.dtype == torch.float32 and v.dtype == torch.float32
    # the flow time reaches the sinusoid as float32 0.7, not rounded to bf16 (0.69921875) first
    assert len(times) == 1 and times[0].dtype == torch.float32 and times[0].tolist() == [torch.tensor(0.7).item()]
    assert torch.equal(logits[0], half.language_model.lm_head(ref).float())


def test_a_text_loss_after_an_image_trains_the_connector_under_the_understanding_expert(tiny):
    """With ``grad_expert="und"`` a text loss after an image reaches the ViT connector (an understanding weight)
    exactly as without isolation.  Catches the ViT blocks embedded under the generation expert's switch."""
    model, _ = tiny
    img = torch.rand(3, 8, 8, generator=torch.Generator().manual_seed(10)) * 2 - 1
    grads = {}
    for grad_expert in (None, "und"):
        model.zero_grad(set_to_none=True)
        out = model([[VitBlock(img), TextBlock([5, 6])]], grad_expert=grad_expert)
        model.logits(out.hidden[0, -2:]).logsumexp(-1).sum().backward()
        grads[grad_expert] = model.connector.fc1.weight.grad
        assert grads[grad_expert] is not None and grads[grad_expert].abs().sum() > 0, grad_expert
    model.zero_grad(set_to_none=True)
    torch.testing.assert_close(grads["und"], grads[None], rtol=1e-6, atol=1e-7)


def test_predict_velocity_under_the_generation_expert_trains_only_generation_weights(tiny):
    """``predict_velocity(..., grad_expert="gen")``: a velocity loss gives the understanding expert (which runs the
    image markers) no gradient, while the joint call (None) does reach it.  Catches ``grad_expert`` not passed
    on to the forward."""
    model, _ = tiny
    with torch.no_grad():
        cache = model.extend_context(None, [[TextBlock([5, 6])]])
    x = torch.randn(1, 2, 64, generator=torch.Generator().manual_seed(11))
    und = model.language_model.model.layers[0].self_attn.q_proj.weight
    gen = model.language_model.model.layers[0].self_attn.q_proj_moe_gen.weight
    for grad_expert, und_moves in ((None, True), ("gen", False)):
        model.zero_grad(set_to_none=True)
        model.predict_velocity(cache, x, 0.5, (1, 2), grad_expert=grad_expert).pow(2).sum().backward()
        assert gen.grad is not None and gen.grad.abs().sum() > 0, grad_expert
        assert (und.grad is not None and bool(und.grad.abs().sum() > 0)) is und_moves, grad_expert
    model.zero_grad(set_to_none=True)


def test_forward_keeps_the_cache_only_when_asked(tiny):
    """``keep_cache`` off (the default, every training and velocity forward): no cache in the output, so no keys
    and values are held; on: the extended cache.  Catches the cache always built."""
    model, _ = tiny
    with torch.no_grad():
        assert model([[TextBlock([5, 6])]]).cache is None
        kept = model([[TextBlock([5, 6])]], keep_cache=True).cache
    assert kept is not None and kept.next_position.tolist() == [2] and kept.valid.tolist() == [[True, True]]


def test_gradient_checkpointing_switch_turns_on_and_off(tiny):
    """``set_gradient_checkpointing(False)`` turns recomputation off again; ``activation_checkpointing_enable``
    (transformers' switch) turns it on.  Catches the flag set on whatever is asked."""
    model, _ = tiny
    lm = model.language_model.model
    try:
        model.set_gradient_checkpointing(True)
        assert lm.gradient_checkpointing is True
        model.set_gradient_checkpointing(False)
        assert lm.gradient_checkpointing is False
        model.activation_checkpointing_enable({"use_reentrant": False})
        assert lm.gradient_checkpointing is True
    finally:
        model.set_gradient_checkpointing(False)


# ================================================================================================ checkpoint
def test_ema_weights_win_over_model_safetensors_when_both_are_present(tiny_dir, tmp_path):
    """A folder holding ``ema.safetensors`` and a stray ``model.safetensors`` (as another trainer writes it): the
    published EMA file is the weight set, every key mapped to it.  Catches the preference order reversed."""
    from safetensors.torch import load_file, save_file

    from r3_rl.policy.bagel.checkpoint import weight_files

    d = tmp_path / "ck"
    shutil.copytree(tiny_dir, d)
    save_file({"other.weight": torch.zeros(2)}, str(d / "model.safetensors"))
    files = weight_files(d)
    assert set(files) == set(load_file(str(d / "ema.safetensors")))
    assert set(files.values()) == {d / "ema.safetensors"}
    (d / "ema.safetensors").unlink()
    assert weight_files(d) == {"other.weight": d / "model.safetensors"}


def test_tokenizer_json_alone_is_enough_and_no_tokenizer_file_is_refused(tiny_dir, tmp_path):
    """A checkpoint with ``tokenizer.json`` but no ``vocab.json``/``merges.txt`` loads (its special-token ids
    resolved); with neither file it is one error naming both.  Catches ``and`` written as ``or``."""
    from r3_rl.policy.bagel.checkpoint import load_tokenizer

    d = tmp_path / "tok"
    d.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(f"{tiny_dir}/{name}", d / name)
    tok, ids = load_tokenizer(d)
    assert tok.convert_tokens_to_ids("<|vision_start|>") == ids.vision_start
    assert (ids.im_start, ids.im_end) == tuple(tok.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"]))
    (d / "tokenizer.json").unlink()
    with pytest.raises(UserError, match=r"no tokenizer \(expected tokenizer.json or vocab.json \+ merges.txt\)"):
        load_tokenizer(d)


def test_load_bagel_defaults_to_a_bf16_model_and_an_fp32_vae(tiny_dir):
    """``load_bagel(path)`` with no dtypes: the model's floating weights in bf16 (buffers too, RoPE kept fp32), the
    VAE in fp32, as documented.  Catches either default changed."""
    from r3_rl.policy.bagel.checkpoint import load_bagel

    loaded = load_bagel(tiny_dir)
    m = loaded.model
    assert {p.dtype for p in m.parameters()} == {torch.bfloat16}
    assert m.latent_pos_embed.pos_embed.dtype == torch.bfloat16
    assert m.language_model.model.rotary_emb.inv_freq.dtype == torch.float32
    assert {p.dtype for p in loaded.vae.parameters()} == {torch.float32}
    assert not m.training


def test_a_checkpoint_path_that_is_a_file_is_refused_by_name(tiny_dir):
    """Pointing at ``ema.safetensors`` itself instead of its folder: one UserError saying it is not a directory.
    Catches the directory check dropped (then a 'no BAGEL weights' message about a file's children)."""
    from pathlib import Path

    from r3_rl.policy.bagel.checkpoint import bagel_skeleton

    f = Path(tiny_dir) / "ema.safetensors"
    with pytest.raises(UserError) as e:
        bagel_skeleton(f)
    assert str(e.value) == f"{f}: not a directory (expected a BAGEL checkpoint such as BAGEL-7B-MoT)"


def test_fp32_load_gives_owned_aligned_copies_of_the_file_tensors(tiny_dir):
    """Loading in the file's own dtype still copies each tensor into an allocator-aligned buffer (the file's
    tensors sit at the header's offset, here not 64-byte aligned, and CPU GEMM kernels round differently on them);
    the values are the file's, bit for bit.  Catches the copy dropped (the weights left at the file's offsets)."""
    from safetensors.torch import load_file

    from r3_rl.policy.bagel.checkpoint import load_bagel

    raw = load_file(f"{tiny_dir}/ema.safetensors")
    model = load_bagel(tiny_dir, dtype=torch.float32).model
    state = model.state_dict()
    assert set(state) == set(raw)
    for key, value in raw.items():
        assert torch.equal(state[key], value), key
        assert state[key].data_ptr() % 64 == 0, key


def test_loaded_model_rebuilds_the_buffers_no_file_holds_as_a_fresh_model_has_them(tiny, tiny_dir):
    """SigLIP's ``position_ids`` (0 .. 63 for the 8x8 table) and the RoPE frequencies are not in the file: after
    a bf16 load they equal a freshly built model's (peer: transformers' own constructors), RoPE in float32.
    Catches a rebuilt ``position_ids`` one short."""
    from r3_rl.policy.bagel.checkpoint import load_bagel

    fresh, _ = tiny
    model = load_bagel(tiny_dir).model
    ids = model.vit_model.vision_model.embeddings.position_ids
    assert torch.equal(ids, fresh.vit_model.vision_model.embeddings.position_ids)
    assert ids.tolist() == [list(range(64))]
    rope, fresh_rope = model.language_model.model.rotary_emb, fresh.language_model.model.rotary_emb
    assert rope.inv_freq.dtype == torch.float32 and torch.equal(rope.inv_freq, fresh_rope.inv_freq)


def test_llm_config_json_written_back_keeps_every_field_of_the_model():
    """A config differing from BAGEL-7B's in every field ``llm_config.json`` carries: each is written as the
    model has it (peer: the dict it was read from), and reads back the same.  Catches a field dropped from the
    copied list (BAGEL-7B's value then written for it: eps 1e-6, 32768 positions, Qwen's bos/eos ids)."""
    from r3_rl.policy.bagel.checkpoint import llm_config_to_dict
    from r3_rl.policy.bagel.config import llm_config_from_dict, published_llm_dict

    mine = {"attention_dropout": 0.125, "bos_token_id": 7, "eos_token_id": 8, "hidden_act": "gelu",
            "hidden_size": 256, "initializer_range": 0.05, "intermediate_size": 512, "max_position_embeddings": 4096,
            "num_attention_heads": 4, "num_hidden_layers": 3, "num_key_value_heads": 2, "rms_norm_eps": 1e-5,
            "vocab_size": 1000, "rope_theta": 500000.0, "max_window_layers": 3}
    assert all(published_llm_dict()[k] != v for k, v in mine.items())
    out = llm_config_to_dict(llm_config_from_dict({**published_llm_dict(), **mine}))
    assert {k: out[k] for k in mine} == mine
    assert set(out) == set(published_llm_dict())
    again = llm_config_to_dict(llm_config_from_dict(out))
    assert again == out


# Found by round 17: a weight file cut short by a copy (or not a safetensors file at all) escaped as a bare
# SafetensorError traceback ("Error while deserializing header") from the load and from `r3-rl plan`.
@pytest.mark.parametrize("name", ["ema.safetensors", "ae.safetensors"])
def test_a_damaged_weight_file_is_one_line_naming_it(tiny_dir, tmp_path, name, capsys):
    from pathlib import Path

    from r3_rl.cli import main
    from r3_rl.policy.bagel.checkpoint import load_bagel

    d = tmp_path / "bagel"
    shutil.copytree(tiny_dir, d)
    data = (d / name).read_bytes()
    (d / name).write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match=f"^{d / name}: not a readable safetensors file \\(Error while deserializing "
                                        f"header: incomplete metadata, file not fully covered\\); copy it again"):
        load_bagel(d, dtype=torch.float32)
    if name == "ae.safetensors":  # the planner reads only the VAE's header (the rest from the configs)
        recipe = Path(__file__).resolve().parent.parent / "recipes" / "grpo_geneval_bagel.yaml"
        capsys.readouterr()
        assert main(["plan", str(recipe), "--set", f"policy.model={d}"]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and f"{d / name}: not a readable safetensors file" in err, err


@pytest.mark.parametrize("size", [[980, True, 14], [980, 224, 14.0], [980, 224], [224, 980, 14]])
def test_a_bagel_image_size_option_is_three_positive_integers_not_booleans(size: list) -> None:
    """``vit_size: [980, true, 14]`` is refused (until session 54 ``true`` passed as a min side of 1), as are a
    float, a missing stride and min > max."""
    from r3_rl.policy.bagel.recipe import bagel_options

    with pytest.raises(UserError, match=r"^policy\.options\.vit_size: expected \[max_side, min_side, stride\]"):
        bagel_options({"vit_size": size})
