"""Exact small cases of BAGEL's model pieces (r3_rl/policy/bagel: model, mot, embeddings, vae, images, contexts,
image_actions) (round 11F audit).

Each test pins a behaviour by a hand-computed value or an independent peer (diffusers' timestep features, the
formula of the 2-D position ids written out, ``F.gelu``), on non-square grids and images where a swapped row/column
would otherwise go unseen: ViT and latent position ids, the connector's activation, the VAE decode's inverse
scale/shift, the truncating uint8 conversion, the default ViT size of an understanding context, context caches of
rows with and without blocks, the expert isolation of a context encoding, and the per-stage flow settings and
seeds of image actions.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from r3_rl.errors import UserError
from r3_rl.policy.bagel import TextBlock
from r3_rl.policy.bagel.tiny import tiny_bagel, tiny_flux_vae

SCALE, SHIFT = 0.3611, 0.1159  # BAGEL's FLUX VAE constants


@pytest.fixture(scope="module")
def tiny():
    """(model, tokenizer): the tiny BAGEL in fp32 (ViT: 4 px patches, 8x8 table; latents: 8x8 table)."""
    model, tok = tiny_bagel(seed=0)
    return model.eval(), tok


@pytest.fixture(scope="module")
def vae():
    torch.manual_seed(1)
    return tiny_flux_vae().eval()


def _sinusoid_peer(t: torch.Tensor) -> torch.Tensor:
    from diffusers.models.embeddings import Timesteps

    return Timesteps(256, flip_sin_to_cos=True, downscale_freq_shift=0)(t)


# ================================================================================================ positions
def test_grid_position_ids_of_non_square_sub_grids():
    """Catches ``r * cols + c`` (right only for full-width grids) and a dropped column-bound check."""
    from r3_rl.policy.bagel.embeddings import grid_position_ids

    assert grid_position_ids(2, 3, 8).tolist() == [0, 1, 2, 8, 9, 10]
    assert grid_position_ids(3, 2, 8).tolist() == [0, 1, 8, 9, 16, 17]
    assert grid_position_ids(8, 8, 8).tolist() == list(range(64))
    for rows, cols in ((9, 2), (2, 9)):
        with pytest.raises(ValueError, match=f"a {rows}x{cols} grid does not fit the 8x8 position table"):
            grid_position_ids(rows, cols, 8)


def test_embed_images_of_a_wide_image_is_connector_gelu_plus_row_major_positions(tiny):
    """A 8x12 px image at 4 px patches is 2 rows x 3 columns: ids 0,1,2,8,9,10 of the 8x8 table, in the ViT and in
    ``vit_pos_embed``.  Catches height/width swapped, the LLM-side position table dropped, and the connector
    without its tanh-GELU."""
    model, _ = tiny
    img = torch.rand(1, 3, 8, 12, generator=torch.Generator().manual_seed(2)) * 2 - 1
    ids = torch.tensor([0, 1, 2, 8, 9, 10])
    with torch.no_grad():
        features = model.vit_model(img, ids)
        c = model.connector
        expected = F.linear(F.gelu(F.linear(features, c.fc1.weight, c.fc1.bias), approximate="tanh"),
                            c.fc2.weight, c.fc2.bias) + model.vit_pos_embed.pos_embed[ids]
        got = model.embed_images(img)
    assert got.shape == (1, 6, model.config.hidden_size)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_connector_applies_tanh_gelu_between_its_two_linears(tiny):
    model, _ = tiny
    c = model.connector
    x = torch.randn(3, c.fc1.in_features, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = F.linear(F.gelu(F.linear(x, c.fc1.weight, c.fc1.bias), approximate="tanh"), c.fc2.weight,
                            c.fc2.bias)
        torch.testing.assert_close(c(x), expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("grid,ids", [((1, 2), [0, 1]), ((2, 1), [0, 8])])
def test_embed_latents_is_vae2llm_plus_time_mlp_plus_row_major_position(tiny, grid, ids):
    """Catches the grid's rows/columns swapped in the latent positions and the time embedded as 1 - t."""
    model, _ = tiny
    lat = torch.randn(1, 2, model.config.patch_latent_dim, generator=torch.Generator().manual_seed(4))
    t = torch.tensor([0.3])
    mlp = model.time_embedder.mlp
    with torch.no_grad():
        time = F.linear(F.silu(F.linear(_sinusoid_peer(t), mlp[0].weight, mlp[0].bias)), mlp[2].weight, mlp[2].bias)
        expected = (F.linear(lat, model.vae2llm.weight, model.vae2llm.bias) + time[:, None]
                    + model.latent_pos_embed.pos_embed[ids][None])
        torch.testing.assert_close(model.embed_latents(lat, t, grid), expected, rtol=1e-5, atol=1e-5)


def test_sincos_table_refuses_a_width_not_divisible_by_four_and_patchify_checks_both_sides():
    """Catches ``dim % 2`` (a width-6 table silently 4 wide) and a patchify that checks the height only."""
    from r3_rl.policy.bagel.embeddings import patchify, sincos_2d_table

    with pytest.raises(ValueError, match="divisible by 4, got 6"):
        sincos_2d_table(6, 2)
    assert sincos_2d_table(8, 2).shape == (4, 8)
    with pytest.raises(ValueError, match="a 4x6 grid is not a multiple of the patch size 4"):
        patchify(torch.zeros(3, 4, 6), 4)
    with pytest.raises(ValueError, match="a 6x4 grid is not a multiple of the patch size 4"):
        patchify(torch.zeros(3, 6, 4), 4)


# ================================================================================================ model / MoT
def test_forward_refuses_rows_that_do_not_match_the_cache(tiny):
    model, _ = tiny
    with torch.no_grad():
        cache = model.extend_context(None, [[TextBlock([1, 2])], [TextBlock([3])]])
        with pytest.raises(ValueError, match="1 rows after a context cache of 2 rows"):
            model([[TextBlock([4])]], cache)


def test_text_block_is_im_start_bytes_im_end(tiny):
    from r3_rl.policy.bagel.model import text_block

    model, tok = tiny
    t = model.config.tokens
    block = text_block(tok, "ab", t)
    assert list(block.ids) == [t.im_start, *tok.convert_tokens_to_ids(["a", "b"]), t.im_end]
    assert tok.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"]) == [t.im_start, t.im_end]


def test_expert_grad_validates_the_name_and_cuts_only_the_other_expert():
    """Catches a misspelt ``grad_expert`` accepted (and silently training both experts) and None cutting one."""
    from r3_rl.policy.bagel.mot import Routing, expert_grad

    w = torch.ones(2, requires_grad=True)
    for expert, grad_expert, grad in (("und", None, True), ("gen", None, True), ("und", "und", True),
                                      ("und", "gen", False), ("gen", "und", False), ("gen", "gen", True)):
        with expert_grad(expert, grad_expert):
            assert (w * 2).requires_grad is grad, (expert, grad_expert)
    for bad in ("GEN", "both", ""):
        with pytest.raises(ValueError, match="is not one of"):
            expert_grad("und", bad)
        with pytest.raises(ValueError, match="is not one of"):
            Routing(torch.zeros(1, 2, dtype=torch.bool), bad)


def test_text_loss_of_the_understanding_expert_trains_the_token_embedding(tiny):
    """With ``grad_expert="und"`` a text loss still reaches ``embed_tokens`` (an understanding weight), exactly as
    without isolation.  Catches the token embedding run under the generation expert's gradient switch."""
    model, _ = tiny
    row = [TextBlock([5, 6, 7, 8])]
    grads = {}
    for grad_expert in (None, "und"):
        model.zero_grad(set_to_none=True)
        out = model([row], grad_expert=grad_expert)
        model.logits(out.hidden[0]).logsumexp(-1).sum().backward()
        grads[grad_expert] = model.language_model.model.embed_tokens.weight.grad
        assert grads[grad_expert] is not None and grads[grad_expert][[5, 6, 7, 8]].abs().sum() > 0
    torch.testing.assert_close(grads["und"], grads[None], rtol=1e-6, atol=1e-7)
    model.zero_grad(set_to_none=True)


def test_routing_sends_each_token_to_its_own_expert_also_when_all_are_generation_tokens():
    """Catches the all-generation shortcut running the understanding expert."""
    from r3_rl.policy.bagel.mot import Routing

    x = torch.arange(6, dtype=torch.float32).reshape(1, 3, 2)

    def und(t):
        return t * 10

    def gen(t):
        return t + 100
    assert Routing(torch.ones(1, 3, dtype=torch.bool))(x, und, gen).tolist() == [[[100, 101], [102, 103],
                                                                                  [104, 105]]]
    assert Routing(torch.zeros(1, 3, dtype=torch.bool))(x, und, gen).tolist() == [[[0, 10], [20, 30], [40, 50]]]
    mixed = Routing(torch.tensor([[False, True, False]]))(x, und, gen)
    assert mixed.tolist() == [[[0, 10], [102, 103], [40, 50]]]


# ================================================================================================ VAE
def test_vae_decode_inverts_bagel_scale_and_shift(vae):
    """decode(z) = decoder(z / 0.3611 + 0.1159); catches z * scale + shift or (z - shift) / scale."""
    from r3_rl.policy.bagel.vae import FluxVAE

    wrapped = FluxVAE(vae.autoencoder)
    assert (wrapped.scale, wrapped.shift, wrapped.downsample) == (SCALE, SHIFT, 8)
    z = torch.randn(1, 16, 2, 3, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        expected = vae.autoencoder.decode(z / SCALE + SHIFT).sample
    torch.testing.assert_close(wrapped.decode(z), expected, rtol=1e-5, atol=1e-5)


def test_vae_shapes_without_encoder_blocks_are_refused_by_name():
    from r3_rl.policy.bagel.vae import autoencoder_kwargs

    shapes = {"encoder.down.0.downsample.conv.weight": (8, 8, 3, 3), "encoder.conv_in.weight": (8, 3, 3, 3)}
    with pytest.raises(UserError, match=r"ae: no encoder\.down\.N\.block\.M tensors"):
        autoencoder_kwargs(shapes)


# ================================================================================================ images
def test_to_uint8_truncates_and_clamps():
    """BAGEL: (x * 0.5 + 0.5).clamp(0, 1) * 255, truncated: 0 -> 127 (127.5), not rounded to 128."""
    from r3_rl.policy.bagel.images import to_uint8

    x = torch.tensor([-2.0, -1.0, -0.999, 0.0, 0.999, 1.0, 3.0]).reshape(1, 1, 1, 7).expand(1, 3, 1, 7)
    out = to_uint8(x)
    assert out.shape == (1, 1, 7, 3) and out.dtype == np.uint8
    assert out[0, 0, :, 0].tolist() == [0, 0, 0, 127, 254, 255, 255]


def test_understanding_context_reads_images_at_r3_vit_size_by_default(tiny):
    """R3's ViT size (504, 252, 14): a 100x60 image goes up to a 252 px short side (BAGEL's would be 224)."""
    from PIL import Image

    from r3_rl.policy.bagel.images import understanding_blocks
    from r3_rl.policy.bagel.layout import VitBlock

    model, tok = tiny
    image = Image.new("RGB", (100, 60), (255, 0, 0))
    blocks = understanding_blocks(tok, model, [image, "is it red"])
    assert isinstance(blocks[0], VitBlock) and blocks[0].pixels.shape == (3, 252, 420)
    assert list(blocks[1].ids)[0] == model.config.tokens.im_start


def test_decode_latents_of_a_wide_grid_is_a_wide_image(vae):
    """Tokens of a 1x2 grid of 2x2 latent patches -> a 16x32 px image; catches the grid read as (w, h)."""
    from r3_rl.policy.bagel.embeddings import patchify
    from r3_rl.policy.bagel.images import decode_latents
    from r3_rl.policy.bagel.vae import FluxVAE

    wrapped = FluxVAE(vae.autoencoder)
    z = torch.randn(1, 16, 2, 4, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        out = decode_latents(wrapped, patchify(z, 2), (1, 2), 2)
        torch.testing.assert_close(out, wrapped.decode(z), rtol=1e-5, atol=1e-5)
    assert out.shape == (1, 3, 16, 32)


def test_latent_grid_of_a_tall_image(tiny):
    from r3_rl.policy.bagel.images import latent_grid

    model, _ = tiny
    assert latent_grid(48, 32, model) == (3, 2)
    with pytest.raises(ValueError, match="a 48x40 image is not a multiple of 16 px"):
        latent_grid(48, 40, model)


# ================================================================================================ contexts
def test_context_of_rows_with_and_without_blocks_keeps_the_non_empty_rows(tiny):
    """A batch where one row has no context: that row is all invalid keys, the other keeps its tokens.  Catches
    ``not all(rows)`` (every row's context dropped as soon as one row is empty)."""
    from r3_rl.policy.bagel.contexts import ContextBuilder

    model, _ = tiny
    builder = ContextBuilder(model, None, (32, 16, 4), (32, 16, 16))
    with torch.no_grad():
        cache = builder.encode([[TextBlock([5, 6, 7])], []])
        assert cache.valid.tolist() == [[True, True, True], [False, False, False]]
        assert cache.next_position.tolist() == [3, 0] and cache.next_block.tolist() == [1, 0]
        empty = builder.encode([[], []])
    assert empty.kv is None and empty.length == 0 and empty.batch_size == 2


def test_context_encoding_passes_grad_expert_to_the_model(tiny):
    """A text context encoded for the generation expert carries no gradient (every computation is the
    understanding expert's); for both experts it does.  Catches ``grad_expert`` dropped by ``encode``."""
    from r3_rl.policy.bagel.contexts import ContextBuilder

    model, _ = tiny
    builder = ContextBuilder(model, None, (32, 16, 4), (32, 16, 16))
    joint = builder.encode([[TextBlock([5, 6, 7])]])
    gen_only = builder.encode([[TextBlock([5, 6, 7])]], "gen")
    assert joint.kv[0][0].requires_grad and joint.kv[1][1].requires_grad
    assert not gen_only.kv[0][0].requires_grad and not gen_only.kv[1][1].requires_grad
    torch.testing.assert_close(gen_only.kv[1][0], joint.kv[1][0].detach(), rtol=0, atol=0)


def test_stored_per_row_shares_one_record_per_distinct_image():
    from r3_rl.policy.bagel.contexts import stored_per_row

    a, b = np.zeros((2, 2, 3), np.uint8), np.full((2, 2, 3), 9, np.uint8)
    out = stored_per_row([a, a.copy(), b])
    assert out[0] is out[1] and out[2] is not out[0]
    assert list(out[0]) == ["0"] and out[0] != out[2]


# ================================================================================================ image actions
def test_flow_settings_take_each_stage_own_options():
    """Catches generation given the edit's image-CFG, SDE window, step count or renorm (and vice versa)."""
    from r3_rl.flow import timestep_grid
    from r3_rl.policy.bagel.image_actions import flow_settings
    from r3_rl.policy.bagel.recipe import BagelOptions

    opts = BagelOptions(gen_steps=5, edit_steps=7, ode_steps=3, timestep_shift=2.0, gen_sde_count=2,
                        edit_sde_count=3, edit_sde_max_index=4, image_cfg=1.7, gen_renorm="global",
                        edit_renorm="text_channel", cfg_interval=(0.25, 1.0))
    gen, edit = flow_settings(opts, "generate", 4.0), flow_settings(opts, "refine", 3.0)
    assert (gen.guidance.text_scale, gen.guidance.image_scale, gen.guidance.renorm) == (4.0, 1.0, "global")
    assert (edit.guidance.text_scale, edit.guidance.image_scale, edit.guidance.renorm) == (3.0, 1.7, "text_channel")
    assert gen.guidance.interval == edit.guidance.interval == (0.25, 1.0)
    assert (gen.steps.count, gen.steps.max_index) == (2, None)
    assert (edit.steps.count, edit.steps.max_index) == (3, 4)
    # t = s u / (1 + (s - 1) u) on u = 1, 3/4, ..., 0 with s = 2
    assert gen.grid == pytest.approx((1.0, 6 / 7, 2 / 3, 0.4, 0.0))
    assert len(edit.grid) == 7 and flow_settings(opts, "refine", 3.0, stochastic=False).grid == timestep_grid(3, 2.0)


def test_group_seeds_share_within_consecutive_keys_in_draw_order():
    """Seeds drawn in order (init, choice per new group; init per image unless shared; noise per image), checked
    against the generator's own draws.  Catches groups that ignore the key, or unshared init noise when shared."""
    from r3_rl.policy.bagel.image_actions import SEED_RANGE, group_seeds

    def draws(n):
        g = torch.Generator().manual_seed(11)
        return [int(torch.randint(0, SEED_RANGE, (1,), generator=g)) for _ in range(n)]
    d = draws(12)
    keys = ["a", "a", "b"]
    assert group_seeds(keys, True, torch.Generator().manual_seed(11)) == (
        [d[0], d[0], d[4]], [d[1], d[1], d[5]], [d[2], d[3], d[6]])
    assert group_seeds(keys, False, torch.Generator().manual_seed(11)) == (
        [d[2], d[4], d[8]], [d[1], d[1], d[7]], [d[3], d[5], d[9]])


def test_vae_latent_cache_keeps_a_recently_read_image_over_an_older_one(monkeypatch):
    """Least recently *used*, not first in: image 0 read again just before the cache overflows stays cached and
    image 1 is the one evicted.  Catches a dropped ``move_to_end`` (a FIFO that re-encodes the hot parent)."""
    from test_exact_flow_signal_layout import _stub_builder

    from r3_rl.policy.bagel.contexts import LATENT_CACHE

    builder, calls = _stub_builder(monkeypatch)
    imgs = [np.full((1, 1, 3), k, np.uint8) for k in range(LATENT_CACHE + 1)]
    for img in imgs[:LATENT_CACHE]:
        builder.vae_block(img)
    builder.vae_block(imgs[0])  # a hit: now the most recently used
    builder.vae_block(imgs[LATENT_CACHE])  # overflow: evicts image 1
    assert calls == [float(k) for k in range(LATENT_CACHE + 1)]
    builder.vae_block(imgs[0])
    assert len(calls) == LATENT_CACHE + 1  # still cached
    builder.vae_block(imgs[1])
    assert calls[-1] == 1.0 and len(calls) == LATENT_CACHE + 2


def test_vae_with_wrong_latent_channels_is_refused():
    """A 4-channel (SD-style) VAE with FLUX's 8x downsampling: refused by its channel count.  Catches the
    ``latent_channels != z_channels`` half of the check dropped."""
    from r3_rl.policy.bagel.vae import autoencoder_kwargs, build_flux_vae, diffusers_to_bfl, flux_kwargs

    with torch.device("meta"):
        four = build_flux_vae(flux_kwargs((32,) * 4, 1, latent_channels=4))
    shapes = {k: tuple(v.shape) for k, v in diffusers_to_bfl(four.autoencoder.state_dict()).items()}
    assert shapes["decoder.conv_in.weight"][1] == 4
    with pytest.raises(UserError, match="a VAE with 4 latent channels and 8x downsampling; BAGEL needs 16 and 8x"):
        autoencoder_kwargs(shapes)
    shapes16 = {k: tuple(v.shape) for k, v in diffusers_to_bfl(tiny_flux_vae().autoencoder.state_dict()).items()}
    assert autoencoder_kwargs(shapes16)["latent_channels"] == 16


def test_policy_freezes_the_vit_unless_train_vit(tiny, vae):
    """R3 freezes SigLIP: with ``train_vit`` off no ``vit_model`` weight requires grad (the connector and the LLM
    do); with it on they all do.  Catches the freeze dropped."""
    import copy

    from r3_rl.policy.bagel.checkpoint import LoadedBagel
    from r3_rl.policy.bagel.policy import BagelPolicy
    from r3_rl.policy.bagel.recipe import BagelOptions

    model, tok = tiny
    templates = {"system": "", "reason": "{prompt}", "reflect": "{prompt}", "refine": "{instruction}"}
    for train_vit in (False, True):
        m = copy.deepcopy(model)
        BagelPolicy(LoadedBagel(m, vae, tok, m.config), templates, BagelOptions(image_size=32, train_vit=train_vit))
        assert all(p.requires_grad is train_vit for p in m.vit_model.parameters())
        assert m.connector.fc1.weight.requires_grad and m.language_model.lm_head.weight.requires_grad
