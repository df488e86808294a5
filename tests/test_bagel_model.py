"""The BAGEL model package (r3_rl/policy/bagel): layout, routing, attention mask, cache, VAE, loading.

Peers where they exist: transformers' SigLIP (the ViT tower), diffusers' timestep / 2-D sin-cos functions and its
own BFL->diffusers VAE converter; the published key and parameter counts (1223 tensors, 14,607,260,128 parameters).
"""
from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from r3_rl.errors import UserError
from r3_rl.policy.bagel import (BagelModel, ContextCache, NoiseBlock, TextBlock, VaeBlock, VitBlock, load_bagel,
                                make_tiny_bagel, published_config, save_bagel)
from r3_rl.policy.bagel.embeddings import patchify, sincos_2d_table, timestep_sinusoid, unpatchify
from r3_rl.policy.bagel.layout import attention_mask, build_layout
from r3_rl.policy.bagel.tiny import build_tiny_tokenizer, tiny_bagel_config, tiny_flux_vae
from r3_rl.policy.bagel.vae import bfl_to_diffusers, diffusers_to_bfl, flux_kwargs

GEN_PREFIXES = ("vae2llm.", "llm2vae.", "time_embedder.")


def is_gen(name: str) -> bool:
    return "_moe_gen" in name or name.startswith(GEN_PREFIXES)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return make_tiny_bagel(tmp_path_factory.mktemp("bagel") / "tiny", seed=0)


@pytest.fixture(scope="module")
def bundle(tiny_dir):
    return load_bagel(tiny_dir, dtype=torch.float32)


def text(bundle, s: str) -> TextBlock:
    t = bundle.config.tokens
    return TextBlock([t.im_start, *bundle.tokenizer.encode(s, add_special_tokens=False), t.im_end])


def noise(model, grid=(2, 2), seed=0, t=0.7) -> NoiseBlock:
    g = torch.Generator().manual_seed(seed)
    return NoiseBlock(torch.randn(grid[0] * grid[1], model.config.patch_latent_dim, generator=g), t, grid)


def pixels(seed=0, size=(32, 32)) -> torch.Tensor:
    return torch.rand(3, *size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


# ---------------------------------------------------------------------------------------------- layout and keys
def test_published_layout_file_and_key_names(tiny_dir, bundle):
    names = {p.name for p in __import__("pathlib").Path(tiny_dir).iterdir()}
    assert {"llm_config.json", "vit_config.json", "ema.safetensors", "ae.safetensors", "tokenizer.json",
            "tokenizer_config.json"} <= names
    keys = set(load_file(f"{tiny_dir}/ema.safetensors"))
    assert keys == set(bundle.model.state_dict())
    for key in ("language_model.model.layers.1.self_attn.q_proj_moe_gen.bias",
                "language_model.model.layers.0.self_attn.k_norm_moe_gen.weight",
                "language_model.model.layers.0.mlp_moe_gen.down_proj.weight",
                "language_model.model.norm_moe_gen.weight",
                "language_model.lm_head.weight", "vit_model.vision_model.encoder.layers.0.mlp.fc1.weight",
                "vit_model.vision_model.post_layernorm.bias", "connector.fc2.weight", "vit_pos_embed.pos_embed",
                "time_embedder.mlp.2.weight", "vae2llm.bias", "llm2vae.weight", "latent_pos_embed.pos_embed"):
        assert key in keys, key
    vit = json.loads(open(f"{tiny_dir}/vit_config.json").read())
    assert vit["num_hidden_layers"] == 2 and bundle.config.vit.num_hidden_layers == 1  # file says one more
    assert "vit_model.vision_model.encoder.layers.1.mlp.fc1.weight" not in keys
    ae = load_file(f"{tiny_dir}/ae.safetensors")
    assert ae["encoder.mid.attn_1.q.weight"].ndim == 4 and "decoder.up.3.upsample.conv.weight" in ae
    assert "encoder.down.3.downsample.conv.weight" not in ae and "decoder.up.0.upsample.conv.weight" not in ae


def test_published_config_counts_match_the_checkpoint():
    """On the meta device: BAGEL-7B-MoT has 1223 tensors and 14,607,260,128 parameters (29.2 GB in bf16)."""
    with torch.device("meta"):
        model = BagelModel(published_config())
    state = model.state_dict()
    assert len(state) == 1223
    assert sum(v.numel() for v in state.values()) == 14_607_260_128
    assert state["vit_model.vision_model.embeddings.patch_embedding.weight"].shape == (1152, 588)
    assert state["latent_pos_embed.pos_embed"].shape == (4096, 3584)
    assert state["vit_pos_embed.pos_embed"].shape == (4900, 3584)
    with torch.device("meta"):
        from diffusers import AutoencoderKL
        vae = AutoencoderKL(**flux_kwargs((128, 256, 512, 512), 2))
    assert sum(p.numel() for p in vae.parameters()) == 83_819_683


def test_layout_positions_blocks_and_exact_mask():
    rows = [[TextBlock([5, 6]), NoiseBlock(torch.zeros(1, 4), 0.5, (1, 1)), TextBlock([7])], [TextBlock([8])]]
    lay = build_layout(rows, vit_patch=4, marker_ids=(90, 91))
    assert lay.token_ids[0].tolist() == [5, 6, 90, 0, 91, 7]
    assert lay.position_ids[0].tolist() == [0, 1, 2, 2, 2, 2]  # image block: one position; noise: no advance
    assert lay.gen_mask[0].tolist() == [False, False, False, True, False, False]
    assert lay.valid[1].tolist() == [True] + [False] * 5
    mask = attention_mask(lay.block_ids, lay.modes, lay.block_ids, lay.modes, lay.valid)[:, 0].int().tolist()
    assert mask[0] == [[1, 0, 0, 0, 0, 0],
                       [1, 1, 0, 0, 0, 0],
                       [1, 1, 1, 1, 1, 0],   # the noised block: all earlier tokens + itself, both ways
                       [1, 1, 1, 1, 1, 0],
                       [1, 1, 1, 1, 1, 0],
                       [1, 1, 0, 0, 0, 1]]   # text after a noised block does not see it
    # pads are never keys; a pad query sees the valid keys before it and itself (no all-masked softmax row)
    assert mask[1] == [[1, 0, 0, 0, 0, 0]] + [[1] + [0] * (i - 1) + [1] + [0] * (5 - i) for i in range(1, 6)]
    lay2 = build_layout([[TextBlock([1, 2]), VitBlock(torch.zeros(3, 8, 8)), VaeBlock(torch.zeros(4, 64), (2, 2)),
                          TextBlock([3])]], vit_patch=4, marker_ids=(90, 91), start_position=[10], start_block=[3])
    assert lay2.position_ids[0].tolist() == [10, 11] + [12] * 6 + [13] * 6 + [14]
    assert lay2.block_ids[0].tolist() == [3, 3] + [4] * 6 + [5] * 6 + [6]
    assert lay2.next_position.tolist() == [15] and lay2.next_block.tolist() == [7]


def test_patchify_order_and_inverse():
    x = torch.arange(2 * 4 * 6, dtype=torch.float32).reshape(2, 4, 6)  # c=2, H=4, W=6, p=2 -> 2x3 patches
    tokens = patchify(x, 2)
    assert tokens.shape == (6, 8)
    assert tokens[1].tolist() == [x[c, r, 2 + q].item() for r in range(2) for q in range(2) for c in range(2)]
    assert torch.equal(unpatchify(tokens, (2, 3), 2), x)


# ---------------------------------------------------------------------------------------------- checkpoint
def test_save_load_round_trip_is_bit_identical(tmp_path):
    tok = build_tiny_tokenizer()
    torch.manual_seed(3)
    model = BagelModel(tiny_bagel_config(tok)).eval()
    vae = tiny_flux_vae().eval()
    save_bagel(tmp_path / "ck", model, vae, tok)
    loaded = load_bagel(tmp_path / "ck", dtype=torch.float32)
    assert loaded.tokenizer.convert_tokens_to_ids("<|vision_start|>") == model.config.tokens.vision_start
    for name, value in model.state_dict().items():
        assert torch.equal(value, loaded.model.state_dict()[name]), name
    t = model.config.tokens
    rows = [[TextBlock([t.im_start, 40, 41, t.im_end]), VitBlock(pixels(1)), noise(model, seed=2)]]
    with torch.no_grad():
        a, b = model(rows), loaded.model(rows)
        assert torch.equal(a.hidden, b.hidden)
        img = pixels(4, (64, 48))[None]
        assert torch.equal(vae.encode(img), loaded.vae.encode(img))


def _rewrite(src, dst, change):
    shutil.copytree(src, dst)
    state = load_file(f"{dst}/ema.safetensors")
    change(state)
    save_file(state, f"{dst}/ema.safetensors")
    return dst


@pytest.mark.parametrize("change,expected", [
    (lambda s: s.pop("language_model.model.layers.1.mlp_moe_gen.up_proj.weight"),
     "key 'language_model.model.layers.1.mlp_moe_gen.up_proj.weight' missing"),
    (lambda s: s.update({"llm2vae.weight": torch.zeros(64, 32)}), "key 'llm2vae.weight' has shape [64, 32]"),
    (lambda s: s.update({"module.extra.weight": torch.zeros(2)}), "unexpected key 'module.extra.weight'"),
])
def test_bad_weights_give_one_line_error_naming_the_key(tiny_dir, tmp_path, change, expected):
    bad = _rewrite(tiny_dir, tmp_path / "bad", change)
    with pytest.raises(UserError) as e:
        load_bagel(bad)
    assert expected in str(e.value) and "\n" not in str(e.value)


def test_bad_vae_and_config_files_give_one_line_errors(tiny_dir, tmp_path):
    bad = tmp_path / "badvae"
    shutil.copytree(tiny_dir, bad)
    ae = load_file(f"{bad}/ae.safetensors")
    ae["decoder.mid.attn_1.proj_out.bias"] = ae["decoder.mid.attn_1.proj_out.bias"][:8]
    save_file(ae, f"{bad}/ae.safetensors")
    with pytest.raises(UserError, match=r"ae.safetensors: key 'decoder.mid.attn_1.proj_out.bias' has shape \[8\]"):
        load_bagel(bad)
    (bad / "ae.safetensors").unlink()
    with pytest.raises(UserError, match="ae.safetensors: missing"):
        load_bagel(bad)
    (bad / "llm_config.json").write_text('{"hidden_size": 64,\n "vocab_size": }')
    with pytest.raises(UserError, match=r"llm_config.json:2: not valid JSON"):
        load_bagel(bad)
    (bad / "llm_config.json").unlink()
    with pytest.raises(UserError, match="llm_config.json: missing"):
        load_bagel(bad)


def test_bf16_load_keeps_fp32_rope_and_tracks_fp32(tiny_dir, bundle):
    half = load_bagel(tiny_dir, dtype=torch.bfloat16)
    assert half.model.language_model.lm_head.weight.dtype == torch.bfloat16
    assert half.model.language_model.model.rotary_emb.inv_freq.dtype == torch.float32
    rows = [[text(bundle, "a red cube"), noise(bundle.model)]]
    with torch.no_grad():
        v32 = bundle.model.velocity(bundle.model(rows).hidden[0, -5:-1])
        v16 = half.model.velocity(half.model(rows).hidden[0, -5:-1])
    assert v16.dtype == torch.float32
    assert (v16 - v32).norm() / v32.norm() < 0.05


# ---------------------------------------------------------------------------------------------- experts
def _grads(model):
    return {n: p.grad for n, p in model.named_parameters()}


def test_text_loss_from_text_only_rows_leaves_every_gen_weight_without_gradient(bundle):
    model = bundle.model
    model.zero_grad(set_to_none=True)
    out = model([[text(bundle, "think"), text(bundle, "more")], [text(bundle, "x")]])
    model.logits(out.hidden).logsumexp(-1).sum().backward()
    grads = _grads(model)
    gen = [n for n in grads if is_gen(n)]
    assert len(gen) == 2 * 14 + 1 + 4 + 2 + 2  # 14 twin tensors per layer, norm_moe_gen, flow heads
    assert all(grads[n] is None for n in gen)
    assert grads["language_model.model.layers.0.self_attn.q_proj.weight"].abs().sum() > 0
    assert grads["language_model.model.layers.1.mlp.down_proj.weight"].abs().sum() > 0
    model.zero_grad(set_to_none=True)


def test_text_before_a_noised_block_gives_gen_weights_zero_gradient(bundle):
    """Same row, the generation expert runs (on the noised block) but the text's loss cannot reach it."""
    model = bundle.model
    model.zero_grad(set_to_none=True)
    out = model([[text(bundle, "plan"), noise(model)]])
    span = out.layout.spans[0][0]
    model.logits(out.hidden[0, span.start:span.end]).logsumexp(-1).sum().backward()
    grads = _grads(model)
    assert all(grads[n] is None or not grads[n].any() for n in grads if is_gen(n))
    assert grads["language_model.model.layers.1.self_attn.o_proj_moe_gen.weight"] is not None  # it did run
    model.zero_grad(set_to_none=True)


def test_velocity_loss_reaches_every_gen_weight_but_not_the_text_head(bundle):
    """The joint gradient (no ``grad_expert``): the noised tokens attend to the context's keys/values and to the
    image markers, which the understanding expert computes, so a velocity loss does reach understanding
    attention/MLP weights; only the text-only outputs, lm_head and ``norm``, stay untouched.  ``grad_expert="gen"``
    cuts that path (next test)."""
    model = bundle.model
    model.zero_grad(set_to_none=True)
    out = model([[text(bundle, "a cat"), VitBlock(pixels(0)), noise(model)]])
    model.velocity(out.hidden[0, out.layout.spans[0][2].inner]).pow(2).sum().backward()
    grads = _grads(model)
    for n in grads:
        if is_gen(n):
            assert grads[n] is not None and grads[n].abs().sum() > 0, n
    assert grads["language_model.lm_head.weight"] is None
    assert not grads["language_model.model.norm.weight"].any()
    assert grads["language_model.model.layers.0.self_attn.k_proj.weight"].abs().sum() > 0  # via context K/V
    model.zero_grad(set_to_none=True)


def _edit_row(bundle):
    """An edit's row: clean VAE latents (generation expert), ViT tokens and text (understanding), a noised block."""
    lat = torch.randn(4, bundle.model.config.patch_latent_dim, generator=torch.Generator().manual_seed(3))
    return [VaeBlock(lat, (2, 2)), VitBlock(pixels(0)), text(bundle, "a cat"), noise(bundle.model)]


@pytest.mark.parametrize("grad_expert", [None, "gen", "und"])
def test_grad_expert_cuts_the_other_expert_out_of_the_gradient_and_changes_no_value(bundle, grad_expert):
    """``grad_expert="gen"``: a velocity loss trains the generation expert only (the understanding expert, the
    embeddings and the connector, which the joint forward reaches through the context K/V and the markers, get
    none); ``"und"``: a text loss after clean VAE latents reaches no generation weight.  Values are bit-identical."""
    model = bundle.model
    model.zero_grad(set_to_none=True)
    with torch.no_grad():
        reference = model([_edit_row(bundle)]).hidden
    out = model([_edit_row(bundle)], grad_expert=grad_expert)
    assert torch.equal(out.hidden, reference)
    spans = out.layout.spans[0]
    velocity = model.velocity(out.hidden[0, spans[3].inner]).pow(2).sum()
    text_loss = model.logits(out.hidden[0, spans[2].start:spans[2].end]).logsumexp(-1).sum()
    (text_loss if grad_expert == "und" else velocity).backward()
    moved = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.any()}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    gen = {n for n in trainable if is_gen(n)}
    und = trainable - gen
    assert {"language_model.model.embed_tokens.weight", "connector.fc1.weight",
            "language_model.model.layers.0.self_attn.k_proj.weight"} <= und
    if grad_expert == "gen":
        assert moved == gen
    elif grad_expert == "und":
        assert moved and moved <= und
    else:  # both experts: BAGEL's joint gradient
        assert gen <= moved and "language_model.model.layers.0.self_attn.k_proj.weight" in moved
        assert "connector.fc1.weight" in moved and "language_model.model.embed_tokens.weight" in moved
    model.zero_grad(set_to_none=True)


# ---------------------------------------------------------------------------------------------- mask and cache
def test_attention_rules_seen_in_outputs(bundle):
    model = bundle.model
    before, after = text(bundle, "before"), text(bundle, "after")
    with torch.no_grad():
        def hidden(mid):
            return model([[before, mid, after]]).hidden[0]
        a, b = hidden(noise(model, seed=1)), hidden(noise(model, seed=2))
        n = len(before.ids)
        assert torch.equal(a[:n], b[:n]) and torch.equal(a[-len(after.ids):], b[-len(after.ids):])  # noised: unseen
        assert not torch.allclose(a[n:-len(after.ids)], b[n:-len(after.ids)])
        c, d = hidden(VitBlock(pixels(1))), hidden(VitBlock(pixels(2)))
        assert torch.equal(c[:n], d[:n])                                         # causal: earlier text unchanged
        assert not torch.allclose(c[-len(after.ids):], d[-len(after.ids):])      # text after an image sees it
        lat = torch.randn(4, 64, generator=torch.Generator().manual_seed(5))
        e, f = hidden(VaeBlock(lat, (2, 2))), hidden(VaeBlock(lat + 1, (2, 2)))
        assert not torch.allclose(e[-len(after.ids):], f[-len(after.ids):])      # clean VAE context is seen


def test_velocity_with_cached_context_equals_one_forward(bundle):
    model = bundle.model
    ctx_rows = [[text(bundle, "system"), VitBlock(pixels(3)), text(bundle, "make it blue")],
                [text(bundle, "short")]]
    x = torch.randn(2, 4, 64, generator=torch.Generator().manual_seed(7))
    t = torch.tensor([0.9, 0.3])
    with torch.no_grad():
        cache = model.extend_context(None, ctx_rows)
        v = model.predict_velocity(cache, x, t, (2, 2))
        assert v.shape == (2, 4, 64) and v.dtype == torch.float32
        for i in range(2):
            full = model([ctx_rows[i] + [NoiseBlock(x[i], t[i], (2, 2))]])
            ref = model.velocity(full.hidden[0, full.layout.spans[0][-1].inner])
            torch.testing.assert_close(v[i], ref, rtol=1e-4, atol=1e-5)
        # the same context in pieces, then copied to CFG-like rows with select/concat
        step = model.extend_context(model.extend_context(None, [r[:1] for r in ctx_rows]), [r[1:] for r in ctx_rows])
        torch.testing.assert_close(model.predict_velocity(step, x, t, (2, 2)), v, rtol=1e-4, atol=1e-5)
        uncond = model.extend_context(None, [[text(bundle, "u")]])
        both = ContextCache.concat([cache.select([1, 0]), uncond])
        v2 = model.predict_velocity(both, torch.stack([x[1], x[0], x[0]]), torch.stack([t[1], t[0], t[0]]), (2, 2))
        torch.testing.assert_close(v2[:2], v.flip(0), rtol=1e-4, atol=1e-5)
        two = model([[text(bundle, "u"), NoiseBlock(x[0], t[0], (2, 2)), noise(model, seed=9, t=0.2)]])
        torch.testing.assert_close(model.velocity(two.hidden[0, two.layout.spans[0][1].inner]), v2[2],
                                   rtol=1e-4, atol=1e-5)  # a second noised copy in the row changes nothing


def test_token_by_token_decoding_matches_the_full_forward(bundle):
    model = bundle.model
    prompt, answer = text(bundle, "describe"), [bundle.config.tokens.im_start, 70, 71, 72]
    with torch.no_grad():
        full = model([[VitBlock(pixels(0)), prompt, TextBlock(answer)]])
        ref = model.logits(full.hidden[0, -len(answer):])
        logits, cache = model.next_token_logits(None, [[VitBlock(pixels(0)), prompt, TextBlock(answer[:1])]])
        steps = [logits[0]]
        for tok in answer[1:]:
            logits, cache = model.next_token_logits(cache, [[TextBlock([tok])]])
            steps.append(logits[0])
    torch.testing.assert_close(torch.stack(steps), ref, rtol=1e-4, atol=1e-4)
    assert cache.next_position.tolist() == [1 + len(prompt.ids) + len(answer)]


# ---------------------------------------------------------------------------------------------- peers
def test_vae_loads_from_the_bfl_layout_and_round_trips_shapes(tiny_dir, bundle):
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    raw = load_file(f"{tiny_dir}/ae.safetensors")
    ours = bfl_to_diffusers(raw)
    peer = convert_ldm_vae_checkpoint({f"first_stage_model.{k}": v for k, v in raw.items()},
                                      dict(bundle.vae.autoencoder.config))
    assert set(ours) == set(peer) == set(bundle.vae.autoencoder.state_dict())
    assert all(torch.equal(ours[k], peer[k]) for k in ours)
    back = diffusers_to_bfl(ours)
    assert set(back) == set(raw) and all(torch.equal(back[k], raw[k]) for k in raw)
    img = pixels(0, (64, 48))[None]
    z = bundle.vae.encode(img)
    assert z.shape == (1, 16, 8, 6)
    assert bundle.vae.decode(z).shape == (1, 3, 64, 48)
    mean = bundle.vae.autoencoder.encode(img).latent_dist.mean
    torch.testing.assert_close(z, 0.3611 * (mean - 0.1159))  # BAGEL's scale/shift on the posterior mean


def test_timestep_embedding_and_sincos_table_match_diffusers():
    from diffusers.models.embeddings import Timesteps, get_2d_sincos_pos_embed

    t = torch.tensor([0.0, 0.05, 0.4, 0.999, 1.0])
    peer = Timesteps(256, flip_sin_to_cos=True, downscale_freq_shift=0)(t)
    torch.testing.assert_close(timestep_sinusoid(t, 256), peer, rtol=0, atol=1e-6)
    for dim, side in ((64, 8), (3584, 64)):
        table = get_2d_sincos_pos_embed(dim, side, base_size=side, interpolation_scale=1.0, output_type="pt")
        torch.testing.assert_close(sincos_2d_table(dim, side), table.float(), rtol=0, atol=1e-6)


def test_vit_tower_matches_transformers_siglip_on_a_full_size_image(bundle):
    """At the table's full size BAGEL's sub-grid positions are all of them: our tower must equal the stock model."""
    from transformers import SiglipVisionModel

    from r3_rl.policy.bagel.embeddings import grid_position_ids
    from r3_rl.policy.bagel.vision import conv_patch_weight_to_linear

    cfg = bundle.config.vit
    torch.manual_seed(0)
    stock = SiglipVisionModel(cfg).eval()
    tower = bundle.model.vit_model
    state = {k: v for k, v in stock.state_dict().items()}
    state["embeddings.patch_embedding.weight"] = conv_patch_weight_to_linear(state["embeddings.patch_embedding.weight"])
    backup = {k: v.clone() for k, v in tower.vision_model.state_dict().items()}
    tower.vision_model.load_state_dict(state)
    try:
        img = pixels(5, (cfg.image_size, cfg.image_size))[None]
        side = cfg.image_size // cfg.patch_size
        with torch.no_grad():
            ours = tower(img, grid_position_ids(side, side, side))
            ref = stock(pixel_values=img).last_hidden_state
        torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)
    finally:
        tower.vision_model.load_state_dict(backup)


def test_real_width_bf16_cached_velocity_and_decoding_track_the_full_forward():
    """BAGEL-7B's head geometry (128-dim heads, 8 query heads per KV head here) at width 2048, in bf16."""
    from r3_rl.policy.bagel import TokenIds
    from r3_rl.policy.bagel.tiny import bagel_shaped_config

    config = bagel_shaped_config(2048, 1, 512, TokenIds(1, 2, 3, 4), intermediate_size=4096)
    assert (config.llm.num_attention_heads, config.llm.num_key_value_heads) == (16, 2)
    torch.manual_seed(0)
    model = BagelModel(config).to(torch.bfloat16).eval()
    ctx = [TextBlock([1] + list(range(10, 40)) + [2]), VitBlock(pixels(0))]
    x = torch.randn(1, 4, 64, generator=torch.Generator().manual_seed(1))

    def rel(a, b):
        return ((a - b).norm() / b.norm()).item()
    with torch.no_grad():
        cache = model.extend_context(None, [ctx])
        v = model.predict_velocity(cache, x, 0.6, (2, 2))
        full = model([ctx + [NoiseBlock(x[0], 0.6, (2, 2))]])
        assert rel(v[0], model.velocity(full.hidden[0, full.layout.spans[0][-1].inner])) < 5e-3
        logits, cache = model.next_token_logits(cache, [[TextBlock([1, 50])]])
        ref = model([ctx + [TextBlock([1, 50])]])
        assert rel(logits[0], model.logits(ref.hidden[0, -1])) < 5e-3


def test_resize_rule_and_editing_context(bundle):
    from PIL import Image

    from r3_rl.policy.bagel.images import (BAGEL_VAE_SIZE, BAGEL_VIT_SIZE, R3_VAE_SIZE, R3_VIT_SIZE, decode_latents,
                                           editing_blocks, image_tensor, target_size, to_uint8, understanding_blocks)

    assert target_size(512, 512, *R3_VIT_SIZE) == (504, 504)      # R3: 36x36 ViT patches of a 512 px image
    assert target_size(512, 512, *R3_VAE_SIZE) == (512, 512)      # R3: 32x32 generation tokens
    assert target_size(1000, 600, *BAGEL_VAE_SIZE) == (992, 608)  # round half to even, as the reference
    assert target_size(300, 200, *BAGEL_VIT_SIZE) == (336, 224)   # short side up to 224
    # the pixel cap binds for very long images: the reference's data/transforms.py gives these (session 35 ran it)
    assert [target_size(w, h, *BAGEL_VAE_SIZE) for w, h in ((1500, 200), (9000, 1024), (4000, 224))] == [
        (1024, 128), (1024, 112), (1024, 64)]
    # as the reference's pil_img2rgb: an LA image's alpha is dropped; a transparency key is composited on white
    la = image_tensor(Image.new("LA", (16, 16), (0, 0)), (16, 16, 8))
    assert torch.equal(la, -torch.ones_like(la))
    keyed = Image.new("RGB", (16, 16), (10, 20, 30))
    keyed.info["transparency"] = (10, 20, 30)
    assert torch.equal(image_tensor(keyed, (16, 16, 8)), torch.ones(3, 16, 16))
    rgba = Image.new("RGBA", (40, 24), (255, 0, 0, 0))            # fully transparent: composited on white
    x = image_tensor(rgba, (40, 16, 8))
    assert x.shape == (3, 24, 40) and torch.allclose(x, torch.ones_like(x))
    model, vae, tok = bundle.model, bundle.vae, bundle.tokenizer
    image = Image.fromarray((torch.rand(48, 64, 3, generator=torch.Generator().manual_seed(0)) * 255).byte().numpy())
    blocks, grid = editing_blocks(tok, model, vae, image, "make it blue", vae_size=(64, 32, 16), vit_size=(32, 16, 4))
    assert grid == (3, 4) and [type(b).__name__ for b in blocks] == ["VaeBlock", "VitBlock", "TextBlock"]
    assert blocks[1].pixels.shape == (3, 24, 32)
    assert blocks[2].ids[0] == model.config.tokens.im_start and blocks[2].ids[-1] == model.config.tokens.im_end
    with torch.no_grad():
        cache = model.extend_context(None, [blocks, understanding_blocks(tok, model, ["make it blue"])])
        v = model.predict_velocity(cache, torch.randn(2, 12, 64), 1.0, grid)
        out = decode_latents(vae, torch.randn(1, 12, 64) - v[:1], grid, 2)
    assert out.shape == (1, 3, 48, 64) and to_uint8(out).shape == (1, 48, 64, 3)
