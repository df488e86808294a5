"""Exact small cases of the BAGEL policy package (r3_rl/policy/bagel) left loose by earlier rounds (round 15 audit).

Each test pins one behaviour by a hand-computed value or an independent peer (a row run alone, PIL's own resize,
the log-softmax of the logits): the layout's refusal of empty text blocks and of latents that do not fill their
grid, a batch of empty rows, the counters of ``ContextCache.select`` / ``concat``, the unpatchify shape check,
next-token logits of a ragged batch, latent grids of equal token counts, the MoT routing's gradient switch in
its all-one-expert shortcuts, the array and PNG paths of a context image, the branches ``encode_branches``
encodes, the context rows of mixed-grid velocities, ``closed_block`` with an inner ``<|im_end|>``, the sampler's
check of broken logits, ``answer_yes_no``'s unsmoothed normaliser, the written ``llm_config.json``, the
tokenizer check with an ``unk`` fallback, the sliding-window refusal, and the bicubic resize.
"""
from __future__ import annotations

import pytest
import torch

from r3_rl.policy.bagel.layout import NoiseBlock, TextBlock, VaeBlock, build_layout


# ================================================================================================ layout
def test_build_layout_refuses_an_empty_text_block_anywhere_in_a_row():
    """An empty text block has no position to predict from.  Catches the ``n == 0`` check weakened."""
    with pytest.raises(ValueError, match="a text block needs at least one token"):
        build_layout([[TextBlock([5]), TextBlock([])]], vit_patch=4, marker_ids=(90, 91))
    with pytest.raises(ValueError, match="a text block needs at least one token"):
        build_layout([[TextBlock([])]], vit_patch=4, marker_ids=(90, 91))


@pytest.mark.parametrize("block", [VaeBlock(torch.zeros(3, 4), (2, 2)), NoiseBlock(torch.zeros(3, 4), 0.5, (2, 2)),
                                   VaeBlock(torch.zeros(5, 4), (2, 2))])
def test_build_layout_refuses_latents_that_do_not_fill_their_grid(block):
    """3 or 5 latent tokens for a 2x2 grid: refused by the layout, too few as well as too many.  Catches ``!=``
    weakened to ``>`` (too few tokens would reach the position table and fail there with a shape error)."""
    n = block.latents.shape[0]
    with pytest.raises(ValueError, match=rf"{n} latent tokens do not fill a \(2, 2\) grid"):
        build_layout([[TextBlock([1]), block]], vit_patch=4, marker_ids=(90, 91))
    ok = build_layout([[TextBlock([1]), VaeBlock(torch.zeros(4, 4), (2, 2))]], vit_patch=4, marker_ids=(90, 91))
    assert ok.token_ids.tolist() == [[1, 90, 0, 0, 0, 0, 91]]


# ================================================================================================ embeddings
def test_unpatchify_refuses_tokens_that_are_not_whole_patches():
    """12 values per token are not 2x2 patches of whole channels (and 5 tokens are not a 2x3 grid): one
    ValueError naming the grid.  Catches the ``d % (p * p)`` half of the check dropped (a reshape error instead)."""
    from r3_rl.policy.bagel.embeddings import unpatchify

    with pytest.raises(ValueError, match=r"6 tokens of 10 values do not form a 2x3 grid of 2x2 patches"):
        unpatchify(torch.zeros(6, 10), (2, 3), 2)
    with pytest.raises(ValueError, match=r"5 tokens of 8 values do not form a 2x3 grid of 2x2 patches"):
        unpatchify(torch.zeros(5, 8), (2, 3), 2)
    # 1x2 grid of 2x2 patches, 1 channel: token k's values fill patch k row by row
    out = unpatchify(torch.arange(8.0).reshape(1, 2, 4), (1, 2), 2)
    assert out.tolist() == [[[[0.0, 1.0, 4.0, 5.0], [2.0, 3.0, 6.0, 7.0]]]]


@pytest.fixture(scope="module")
def tiny():
    """(model, tokenizer): the tiny BAGEL in fp32, as the other exact BAGEL tests build it."""
    from r3_rl.policy.bagel.tiny import tiny_bagel

    model, tok = tiny_bagel(seed=0)
    return model.eval(), tok


def test_cache_select_takes_each_row_own_next_position_and_next_block():
    """``select([1, 1, 0])`` of a cache whose rows continue at positions (7, 12) and blocks (2, 5): the counters
    are picked per row, the next block from ``next_block``.  Catches next_block taken from next_position."""
    from r3_rl.policy.bagel.layout import ContextCache

    z = torch.zeros(2, 3, dtype=torch.long)
    valid = torch.tensor([[True, True, False], [True, True, True]])
    cache = ContextCache(None, torch.tensor([[0, 1, -1], [0, 1, 4]]), z, valid, torch.tensor([7, 12]),
                         torch.tensor([2, 5]))
    picked = cache.select([1, 1, 0])
    assert picked.next_position.tolist() == [12, 12, 7]
    assert picked.next_block.tolist() == [5, 5, 2]
    assert picked.block_ids.tolist() == [[0, 1, 4], [0, 1, 4], [0, 1, -1]]
    assert picked.valid.tolist() == [[True, True, True], [True, True, True], [True, True, False]]


def test_a_batch_of_empty_rows_is_one_padding_column(tiny):
    """Rows without blocks lay out as one invalid pad each (never a zero-length batch), so a forward of them
    runs and appends one invalid key per row.  Catches the ``max(1, ...)`` floor on the length dropped (the
    forward then fails to reshape a zero-length batch)."""
    lay = build_layout([[], []], vit_patch=4, marker_ids=(90, 91))
    assert lay.token_ids.tolist() == [[0], [0]] and lay.valid.tolist() == [[False], [False]]
    assert lay.block_ids.tolist() == [[-1], [-1]] and lay.last_index.tolist() == [0, 0]
    model, _ = tiny
    with torch.no_grad():
        cache = model.extend_context(None, [[], []])
    assert cache.valid.tolist() == [[False], [False]]
    assert cache.next_position.tolist() == [0, 0] and cache.next_block.tolist() == [0, 0]
    assert cache.kv[0][0].shape == (2, 2, 1, 16)


# ================================================================================================ model
def test_latent_blocks_of_equal_token_counts_in_different_grids_keep_their_own_positions(tiny):
    """A 2x8 and a 4x4 VAE block (16 tokens each) in one batch: each row's hidden states equal that row run alone
    (each grid embeds with its own 2-D position ids).  Catches latent blocks grouped by token count (one grid's
    positions used for both)."""
    from r3_rl.policy.bagel.layout import VaeBlock

    model, _ = tiny
    g = torch.Generator().manual_seed(3)
    a, b = torch.randn(16, 64, generator=g), torch.randn(16, 64, generator=g)
    rows = [[TextBlock([5]), VaeBlock(a, (2, 8))], [TextBlock([5]), VaeBlock(b, (4, 4))]]
    with torch.no_grad():
        both = model(rows).hidden
        alone = [model([row]).hidden[0] for row in rows]
    torch.testing.assert_close(both[0], alone[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(both[1], alone[1], rtol=1e-5, atol=1e-5)
    assert (both[0, 2:18] - both[1, 2:18]).abs().max() > 1e-3  # the two grids are told apart


def test_next_token_logits_read_each_row_last_real_token_in_a_ragged_batch(tiny):
    """Rows of 1 and 4 text tokens: each row's next-token logits equal the lm head at its own last real token
    (peer: the same row run alone), not at the batch's last (padded) column."""
    model, _ = tiny
    rows = [[TextBlock([7])], [TextBlock([7, 8, 9, 10])]]
    with torch.no_grad():
        logits, cache = model.next_token_logits(None, rows)
        alone = [model.next_token_logits(None, [row])[0][0] for row in rows]
    torch.testing.assert_close(logits[0], alone[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(logits[1], alone[1], rtol=1e-5, atol=1e-5)
    assert cache.next_position.tolist() == [1, 4] and cache.valid.tolist() == [[True, False, False, False],
                                                                                 [True] * 4]


# ================================================================================================ MoT routing
@pytest.mark.parametrize("mask", [[[True, True, True]], [[False, False, False]], [[False, True, False]]])
def test_routing_cuts_the_gradient_of_the_other_expert_only_in_every_shortcut(mask):
    """All-generation, all-understanding and mixed rows under each ``grad_expert``: a token's output carries a
    gradient iff its own expert is trained.  Catches a shortcut (all tokens of one expert) run under the other
    expert's gradient switch (e.g. an all-generation batch training nothing under ``grad_expert="gen"``)."""
    from r3_rl.policy.bagel.mot import Routing

    gen_mask = torch.tensor(mask)
    x = torch.ones(1, 3, 2)
    w_und, w_gen = torch.tensor(2.0, requires_grad=True), torch.tensor(3.0, requires_grad=True)
    for grad_expert in (None, "und", "gen"):
        w_und.grad = w_gen.grad = None
        out = Routing(gen_mask, grad_expert)(x, lambda t: t * w_und, lambda t: t * w_gen)
        expect = torch.where(gen_mask[..., None], 3.0, 2.0).expand(1, 3, 2)
        assert torch.equal(out.detach(), expect)
        if out.requires_grad:
            out.sum().backward()
        n_gen, n_und = 2 * sum(mask[0]), 2 * (3 - sum(mask[0]))
        und_grad = float(w_und.grad) if w_und.grad is not None else 0.0
        gen_grad = float(w_gen.grad) if w_gen.grad is not None else 0.0
        assert und_grad == (n_und if grad_expert in (None, "und") else 0), (mask, grad_expert)
        assert gen_grad == (n_gen if grad_expert in (None, "gen") else 0), (mask, grad_expert)


# ================================================================================================ contexts
def test_context_blocks_read_an_array_and_its_stored_png_as_the_same_pixels(monkeypatch):
    """A row's image given as pixels (``answer_yes_no``) or as the stored PNG record (a segment) must rebuild the
    same ViT block, equal to the image itself.  Catches the array path transforming the image (a flipped copy)."""
    import numpy as np
    from test_exact_flow_signal_layout import _stub_builder

    from r3_rl.policy.bagel.contexts import store_images

    builder, _ = _stub_builder(monkeypatch)
    img = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3) * 7
    direct = builder.blocks([{"vit": 0}], {"0": img})[0].pixels
    stored = builder.blocks([{"vit": 0}], store_images([img]))[0].pixels
    assert torch.equal(direct, stored)
    assert direct.permute(1, 2, 0).tolist() == img.astype(np.float32).tolist()


# ================================================================================================ image actions
def _recording_builder():
    from types import SimpleNamespace

    encoded = []

    def encode(rows, grad_expert=None):
        encoded.append([list(r) for r in rows])
        return f"cache{len(encoded)}"
    return SimpleNamespace(blocks=lambda records, images: list(records), encode=encode), encoded


@pytest.mark.parametrize("text_scale,image_scale,names", [(1.0, 1.0, ["cond"]), (4.0, 1.0, ["cond", "text_uncond"]),
                                                          (1.0, 1.5, ["cond"]),
                                                          (4.0, 1.5, ["cond", "text_uncond", "image_uncond"])])
def test_encode_branches_encodes_only_the_branches_the_guidance_uses(text_scale, image_scale, names):
    """Without text CFG (scale 1) the text-unconditional context is not encoded (a wasted context forward per
    batch; the image branch needs text CFG too); each needed branch is encoded once, from its own records.
    Catches ``text_scale >= 1.0``."""
    from r3_rl.flow import Guidance
    from r3_rl.policy.bagel.image_actions import encode_branches

    builder, encoded = _recording_builder()
    ctx = {"cond": ["c"], "text_uncond": ["t"], "image_uncond": ["i"]}
    caches = encode_branches(builder, [ctx], Guidance(text_scale=text_scale, image_scale=image_scale))
    assert list(caches) == names
    assert encoded == [[[n[0]]] for n in names]


def test_mixed_grids_pick_each_latent_context_row_through_the_image_index():
    """Rows 0..2 of a batch read context rows (2, 0, 1) (``batch.image``) in grids 2x8, 4x4, 2x8: each row's
    velocity comes from its own context row and grid.  Catches the per-grid rows passed to ``select`` instead of
    the context rows they index."""
    from types import SimpleNamespace

    from r3_rl.policy.bagel.image_actions import _mixed_grids
    from r3_rl.policy.bagel.layout import ContextCache

    def predict_velocity(cache, x, t, grid, grad_expert=None):
        return (cache.next_position.float() * 10 + grid[0])[:, None, None].expand_as(x).clone()

    model = SimpleNamespace(predict_velocity=predict_velocity)
    z = torch.zeros(3, 0, dtype=torch.long)
    cache = ContextCache(None, z, z, z.bool(), torch.tensor([100, 200, 300]), torch.tensor([1, 1, 1]))
    f = _mixed_grids(model, {"cond": cache}, [(2, 8), (4, 4), (2, 8)], torch.tensor([2, 0, 1]))
    assert f.text_uncond is None and f.image_uncond is None
    v = f.cond(torch.zeros(3, 16, 1), torch.full((3,), 0.5))
    assert v[:, 0, 0].tolist() == [3002.0, 1004.0, 2002.0]


# ================================================================================================ text actions
def test_closed_block_closes_a_block_whose_last_token_is_not_im_end():
    """A plan re-encoded from text may hold ``<|im_end|>`` inside: only a *final* ``<|im_end|>`` closes the block.
    Catches ``im_end in ids`` (a block left open, the generation context running on into the next block)."""
    from types import SimpleNamespace

    from r3_rl.policy.bagel.text_actions import closed_block

    tokens = SimpleNamespace(im_start=258, im_end=257)
    assert closed_block([65, 257, 66], tokens) == [258, 65, 257, 66, 257]
    assert closed_block([257], tokens) == [258, 257]
    assert closed_block((65, 66), tokens) == [258, 65, 66, 257]


# ================================================================================================ policy
def test_answer_yes_no_is_exact_when_both_answers_are_unlikely(monkeypatch):
    """P(yes) = 3e-9 and P(no) = 1e-9 (the rest of the mass elsewhere): the answer is 3/4, and 0 when neither
    answer has any mass.  Catches a smoothing term in the normaliser (``+ 1e-6`` gives ~0.003)."""
    from types import SimpleNamespace

    import numpy as np
    from test_exact_policy_glue_weights import _bagel

    from r3_rl.policy.base import ImageInput

    pol = _bagel(monkeypatch)  # its tokenizer: Yes/yes -> 1, " Yes" -> 2, " yes" -> 3, No/no -> 4, 5, 6
    for yes, no, want in ((1e-9, 1e-9 / 3, 0.75), (0.0, 0.0, 0.0)):
        probs = torch.full((60,), (1 - 3 * yes - 3 * no) / 54, dtype=torch.float64)
        probs[[1, 2, 3]], probs[[4, 5, 6]] = yes, no
        logits = probs.log()
        pol._model = SimpleNamespace(next_token_logits=lambda rows, tails: (logits.expand(len(rows), -1), None))
        out = pol.answer_yes_no([ImageInput(np.zeros((2, 2, 3), np.uint8))], ["is it red"])
        assert out == pytest.approx([want], rel=1e-6, abs=1e-12)


# ================================================================================================ checkpoint files
def test_llm_config_json_written_back_keeps_the_model_own_layers_and_rope_theta():
    """A 3-layer LLM with rope_theta 5e5 is written as published (same keys) with ``max_window_layers`` = its own
    layer count and its own rope_theta, and reads back to the same numbers.  Catches BAGEL-7B's 28 layers or its
    1e6 rope_theta written for every model."""
    from r3_rl.policy.bagel.checkpoint import llm_config_to_dict
    from r3_rl.policy.bagel.config import llm_config_from_dict, published_llm_dict

    data = {**published_llm_dict(), "num_hidden_layers": 3, "rope_theta": 500000.0, "hidden_size": 256,
            "intermediate_size": 512, "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 151680}
    out = llm_config_to_dict(llm_config_from_dict(data))
    assert set(out) == set(published_llm_dict())
    assert out["max_window_layers"] == 3 and out["num_hidden_layers"] == 3
    assert out["rope_theta"] == 500000.0 and isinstance(out["rope_theta"], float)
    assert (out["hidden_size"], out["num_key_value_heads"], out["vocab_size"]) == (256, 2, 151680)
    again = llm_config_from_dict(out)
    assert again.rope_parameters["rope_theta"] == 500000.0 and again.num_hidden_layers == 3


def test_tokenizer_with_an_unknown_token_fallback_still_must_hold_bagel_markers(tmp_path):
    """A tokenizer that maps unknown strings to its ``unk`` id (here ``<|endoftext|>``) and lacks
    ``<|vision_end|>``: refused by name, not loaded with the unk id as the image marker.  Catches the
    ``unk_token_id`` comparison dropped."""
    from tokenizers import AddedToken, pre_tokenizers
    from transformers import Qwen2Tokenizer

    from r3_rl.errors import UserError
    from r3_rl.policy.bagel.checkpoint import load_tokenizer

    vocab = {ch: i for i, ch in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    vocab["<|endoftext|>"] = len(vocab)
    tok = Qwen2Tokenizer(vocab=vocab, merges=[], eos_token="<|im_end|>", pad_token="<|endoftext|>",
                         unk_token="<|endoftext|>")
    tok.add_special_tokens({"additional_special_tokens": [AddedToken(s, special=True, normalized=False) for s in
                                                          ("<|im_start|>", "<|im_end|>", "<|vision_start|>")]})
    tok.save_pretrained(str(tmp_path))
    assert tok.convert_tokens_to_ids("<|vision_end|>") == tok.unk_token_id == 256
    with pytest.raises(UserError, match=r"the tokenizer has no <\|vision_end\|> token"):
        load_tokenizer(tmp_path)


def test_llm_config_with_sliding_window_is_refused_by_name():
    """BAGEL attends over the whole sequence: a config asking for sliding-window attention is refused, one with
    it off is read.  Catches the ``use_sliding_window`` check dropped (the flag silently ignored)."""
    from r3_rl.errors import UserError
    from r3_rl.policy.bagel.config import llm_config_from_dict, published_llm_dict

    with pytest.raises(UserError, match=r"^llm_config.json: use_sliding_window=true is not supported"):
        llm_config_from_dict({**published_llm_dict(), "use_sliding_window": True})
    assert llm_config_from_dict({**published_llm_dict(), "use_sliding_window": False}).num_hidden_layers == 28


def test_cache_concat_stacks_each_cache_own_counters():
    """Caches of rows continuing at (position, block) = (7, 2) and (12, 5), (3, 1): stacked in order, each
    counter from its own field.  Catches ``next_block`` filled from ``next_position``."""
    from r3_rl.policy.bagel.layout import ContextCache

    def cache(n, pos, blk):
        z = torch.zeros(len(pos), n, dtype=torch.long)
        return ContextCache(None, z, z.clone(), torch.ones(len(pos), n, dtype=torch.bool), torch.tensor(pos),
                            torch.tensor(blk))
    both = ContextCache.concat([cache(1, [7, 12], [2, 5]), cache(2, [3], [1])])
    assert both.next_position.tolist() == [7, 12, 3] and both.next_block.tolist() == [2, 5, 1]
    assert both.valid.tolist() == [[True, False], [True, False], [True, True]]


def test_sample_text_refuses_broken_logits_and_stops_each_row_at_im_end():
    """A model whose logits are NaN: the sampler raises instead of returning token 0 with a NaN log-prob.  With
    finite logits (greedy), row 0 picks <|im_end|> (id 2) at once and stops while row 1 picks id 3 up to
    ``max_new_tokens``; log-probs are the log-softmax of the logits.  Catches ``check_sampled`` dropped."""
    from types import SimpleNamespace

    from r3_rl.policy.bagel.text_actions import sample_text
    from r3_rl.trajectory import SamplingParams

    row = torch.tensor([[0.0, 0.0, 3.0, 1.0, 0.0], [0.0, 0.0, 1.0, 3.0, 0.0]])

    def model_of(logits):
        return SimpleNamespace(config=SimpleNamespace(tokens=SimpleNamespace(im_start=1, im_end=2)),
                               next_token_logits=lambda cache, rows: (logits[:len(rows)], cache))
    cache, allowed = SimpleNamespace(batch_size=2), torch.ones(5, dtype=torch.bool)
    ids, logps = sample_text(model_of(row), cache, SamplingParams(greedy=True, max_new_tokens=3), allowed, None)
    assert ids == [[2], [3, 3, 3]]
    want = float(row[0].log_softmax(-1)[2])
    assert logps[0] == pytest.approx([want]) and logps[1] == pytest.approx([want] * 3)
    with pytest.raises(RuntimeError, match="BAGEL text sampling: a sampled token has a non-finite log-prob"):
        sample_text(model_of(torch.full((2, 5), float("nan"))), cache, SamplingParams(max_new_tokens=2), allowed,
                    torch.Generator().manual_seed(0))


# ================================================================================================ images
def test_image_tensor_resizes_with_pil_bicubic_as_bagel_does():
    """A 20x10 random image at (max 32, min 16, stride 16) becomes 32x16: exactly PIL's own bicubic resize mapped
    to [-1, 1] (peer: PIL called directly).  Catches another resampling filter (bilinear)."""
    import numpy as np
    from PIL import Image

    from r3_rl.policy.bagel.images import image_tensor

    rng = np.random.default_rng(5)
    img = Image.fromarray(rng.integers(0, 256, (10, 20, 3), dtype=np.uint8))
    out = image_tensor(img, (32, 16, 16))
    want = np.asarray(img.resize((32, 16), Image.BICUBIC), dtype=np.float32) / 255.0 * 2.0 - 1.0
    assert out.shape == (3, 16, 32)
    assert torch.equal(out, torch.from_numpy(want).permute(2, 0, 1))


def test_routing_returns_the_understanding_expert_dtype_for_mixed_rows():
    """Experts answering in different dtypes (float64 / float32): the mixed output takes the understanding
    expert's dtype and keeps each value.  Catches the generation output's cast dropped (index_copy then fails)."""
    from r3_rl.policy.bagel.mot import Routing

    x = torch.arange(6, dtype=torch.float32).reshape(1, 3, 2)
    out = Routing(torch.tensor([[False, True, False]]))(x, lambda t: t.double() * 10, lambda t: t + 100)
    assert out.dtype == torch.float64 and out.tolist() == [[[0, 10], [102, 103], [40, 50]]]


def test_unknown_context_record_is_refused_by_name(monkeypatch):
    """A block record that is none of text / vit / vae is an error naming its keys, never silently skipped (the
    training forward would then see a different context than the sampler)."""
    import numpy as np
    from test_exact_flow_signal_layout import _stub_builder

    builder, _ = _stub_builder(monkeypatch)
    with pytest.raises(ValueError, match=r"unknown block record \['image'\] \(expected text, vit or vae\)"):
        builder.blocks([{"text": [1]}, {"image": 0}], {"0": np.zeros((1, 1, 3), np.uint8)})


def test_denoising_scores_give_each_batch_row_its_own_context_grid(monkeypatch):
    """A learner batch whose rows (``batch.image`` = [1, 0]) read a 4x4 and a 2x8 context: the per-row grids go
    to the mixed-grid velocity in row order; two equal grids take the single-grid path.  Catches every row given
    the first context's grid."""
    from types import SimpleNamespace

    import r3_rl.policy.bagel.image_actions as ia
    from r3_rl.flow import Guidance

    batch = SimpleNamespace(guidance=Guidance(), image=torch.tensor([1, 0]))
    monkeypatch.setattr(ia, "score_traces", lambda traces, velocity_for, device: velocity_for([0, 1], batch))
    monkeypatch.setattr(ia, "encode_branches", lambda builder, ctxs, guidance, grad_expert=None: {})
    monkeypatch.setattr(ia, "_mixed_grids", lambda model, caches, grids, image, grad_expert=None: ("mixed", grids))
    monkeypatch.setattr(ia, "velocity_field", lambda model, caches, grid, rows=None, grad_expert=None: ("one", grid))
    model = SimpleNamespace(device="cpu")
    got = ia.denoising_scores(model, None, [{"grid": [2, 8]}, {"grid": [4, 4]}], [None, None])
    assert got == ("mixed", [(4, 4), (2, 8)])
    assert ia.denoising_scores(model, None, [{"grid": [4, 4]}, {"grid": [4, 4]}], [None, None]) == ("one", (4, 4))


def test_sample_images_draws_each_sibling_group_sde_steps_from_its_choice_seed(monkeypatch):
    """Two siblings (same key) and one other image: the SDE steps handed to the sampler are
    ``steps.choose(seed=choice seed)`` of ``group_seeds`` (peer: the same generator), so siblings share them.
    Catches the steps chosen from the per-image noise seeds."""
    from types import SimpleNamespace

    import r3_rl.policy.bagel.image_actions as ia
    from r3_rl.flow import EtaSchedule, Guidance, StochasticSteps

    seen = {}

    def fake_sample_flow(velocity, x_T, **kw):
        seen.update(kw)
        return SimpleNamespace(latents=x_T, traces=["tr"] * x_T.shape[0])
    monkeypatch.setattr(ia, "encode_branches", lambda builder, contexts, guidance: {})
    monkeypatch.setattr(ia, "velocity_field", lambda model, caches, grid: None)
    monkeypatch.setattr(ia, "sample_flow", fake_sample_flow)
    monkeypatch.setattr(ia, "decode_latents", lambda vae, latents, grid, patch: torch.zeros(latents.shape[0], 3, 2, 2))
    model = SimpleNamespace(device="cpu", config=SimpleNamespace(patch_latent_dim=4, latent_patch_size=2))
    steps = StochasticSteps("random", count=2)
    settings = ia.FlowSettings((1.0, 0.8, 0.6, 0.4, 0.2, 0.1, 0.0), EtaSchedule("r3", 0.5), steps, Guidance())
    keys = ["a", "a", "b"]
    _, traces = ia.sample_images(model, None, None, [{}] * 3, (1, 1), settings, keys, True, True,
                                 torch.Generator().manual_seed(4))
    init, choice, noise = ia.group_seeds(keys, True, torch.Generator().manual_seed(4))
    assert seen["sde_steps"] == [steps.choose(6, seed=s) for s in choice]
    assert seen["sde_steps"][0] == seen["sde_steps"][1] and len(seen["sde_steps"][2]) == 2
    assert seen["noise_seeds"] == noise and seen["init_seeds"] == init and traces == ["tr"] * 3
