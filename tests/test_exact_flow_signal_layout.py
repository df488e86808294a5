"""Exact small cases for the flow codec/trace/transition, the training signal, the Blocks detector and BAGEL's
layout, contexts and text actions (round 9D mutation audit: one surviving mutant or more per test).

Every expected value is worked out by hand (or from the module's documented formula written out with ``math``),
never by calling the function under test to get the expectation.
"""
from __future__ import annotations

import base64
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from r3_rl.flow.codec import decode_tensor, encode_tensor, encoded_size
from r3_rl.flow.guidance import FlowVelocity, Guidance
from r3_rl.flow.schedule import EtaSchedule
from r3_rl.flow.trace import DenoisingTrace, SdeStep, stack_steps

HALF_LOG_2PI = 0.5 * math.log(2.0 * math.pi)


# ================================================================================================ tensor codec
def test_codec_round_trips_an_empty_tensor():
    """Shape check `s > 0` instead of `s >= 0` would refuse a legitimate zero-size dimension."""
    d = encode_tensor(torch.zeros(0, 3))
    assert d == {"dtype": "float32", "shape": [0, 3], "b64": ""}
    back = decode_tensor(d)
    assert back.shape == (0, 3) and back.dtype == torch.float32


def test_codec_refuses_a_record_with_an_extra_key():
    """Key check loosened to a superset would silently accept foreign / misspelt records."""
    good = {"dtype": "float32", "shape": [1], "b64": base64.b64encode(b"\x00\x00\x80\x3f").decode()}
    assert decode_tensor(good).tolist() == [1.0]
    with pytest.raises(ValueError, match="expected a dict with keys b64, dtype, shape"):
        decode_tensor({**good, "mean": good}, "x_t")


def test_codec_refuses_more_bytes_than_the_shape_holds():
    """Byte-count check `<` instead of `!=` lets a too-long payload through to an opaque reshape error."""
    two = {"dtype": "float32", "shape": [1], "b64": base64.b64encode(b"\x00" * 8).decode()}
    with pytest.raises(ValueError, match="8 bytes do not fit shape \\[1\\] of float32 \\(4 bytes\\)"):
        decode_tensor(two, "x_t")


def test_encoded_size_is_the_padded_base64_length():
    """Floor instead of ceil in encoded_size undercounts: 8 raw bytes are 12 base64 characters ('AAAAAAAAAAA=')."""
    assert encoded_size(torch.zeros(2, dtype=torch.float32)) == 12  # ceil(8 / 3) * 4
    assert encoded_size(torch.zeros(1, dtype=torch.float16)) == 4  # 2 bytes -> 4 chars
    assert encoded_size(torch.zeros(3, dtype=torch.float32)) == 16  # 12 bytes -> 16 chars


# ================================================================================================ traces
def _step(index=0, t=0.5, delta=0.1, eta=0.5, x_t=(1.0, 2.0), x_next=(0.9, 1.8), logprob=0.25) -> SdeStep:
    return SdeStep(index=index, t=t, delta=delta, eta=eta, std=eta * math.sqrt(delta), logprob=logprob,
                   x_t=torch.tensor(x_t), x_next=torch.tensor(x_next))


def _trace(steps, guidance=None, shape=(2,)) -> DenoisingTrace:
    guidance = Guidance() if guidance is None else guidance
    return DenoisingTrace(latent_shape=shape, latent_dtype="float32", grid=(1.0, 0.5, 0.4, 0.0), guidance=guidance,
                          eta=EtaSchedule("constant", 0.5), init_seed=1, noise_seed=2, steps=list(steps))


def test_trace_refuses_a_step_whose_latent_is_transposed():
    """Checking only the number of dims lets a [4, 2] step into a [2, 4] trace (same ndim, other layout)."""
    step = _step(x_t=torch.zeros(4, 2).tolist(), x_next=torch.zeros(4, 2).tolist())
    d = _trace([step], shape=(2, 4)).to_dict()
    with pytest.raises(ValueError, match=r"step 0 has shape \(4, 2\), latent_shape is \(2, 4\)"):
        DenoisingTrace.from_dict(d)


def test_trace_refuses_a_string_init_seed():
    """Dropping the init_seed type check lets a string seed through to a later crash or a different noise."""
    d = _trace([_step()]).to_dict()
    d["init_seed"] = "7"
    with pytest.raises(ValueError, match="init_seed must be an integer or null, got '7'"):
        DenoisingTrace.from_dict(d)


def test_stack_steps_refuses_a_short_select():
    """The select-length check loosened to `>` turns one entry for two traces into an IndexError or a silent drop."""
    tr = _trace([_step()])
    with pytest.raises(ValueError, match="select has 1 entries for 2 traces"):
        stack_steps([tr, tr], select=[[0]])


# ================================================================================================ transition
def _hand_gaussian(x, v, t, delta, eta):
    """Module docstring's formulas: mean = x (1 - eta^2 delta / 2t) - v delta (1 + eta^2 (1 - t) / 2t)."""
    a = 1.0 - eta * eta * delta / (2.0 * t)
    b = -delta * (1.0 + eta * eta * (1.0 - t) / (2.0 * t))
    return [a * xi + b * vi for xi, vi in zip(x, v)], eta * math.sqrt(delta)


def _hand_logprob(sample, mean, std):
    zz = [((s - m) / std) ** 2 for s, m in zip(sample, mean)]
    return -0.5 * sum(zz) / len(zz) - math.log(std) - HALF_LOG_2PI


def test_sde_gaussian_mean_and_std_match_the_documented_formula():
    """Catches a dropped 2 in eta^2 delta/(2t), (1-t) -> t in the v term, and std eta*delta for eta*sqrt(delta)."""
    from r3_rl.flow.transition import sde_gaussian

    # t=0.5, delta=0.1, eta=0.5: a = 1 - 0.025 = 0.975, b = -0.1 * (1 + 0.125) = -0.1125, std = 0.5 sqrt(0.1)
    mean, std = sde_gaussian(torch.tensor([[1.0, 2.0]], dtype=torch.float64),
                             torch.tensor([[1.0, -1.0]], dtype=torch.float64), 0.5, 0.1, 0.5)
    assert mean[0].tolist() == pytest.approx([0.975 - 0.1125, 1.95 + 0.1125], abs=1e-12)
    assert std.shape == (1, 1) and float(std) == pytest.approx(0.5 * math.sqrt(0.1), abs=1e-15)
    # t=0.25, delta=0.2, eta=1: a = 1 - 0.4 = 0.6, b = -0.2 * (1 + 1.5) = -0.5
    mean, std = sde_gaussian(torch.tensor([[2.0]], dtype=torch.float64), torch.tensor([[1.0]], dtype=torch.float64),
                             0.25, 0.2, 1.0)
    assert float(mean) == pytest.approx(2 * 0.6 - 0.5, abs=1e-12)
    assert float(std) == pytest.approx(math.sqrt(0.2), abs=1e-15)


def test_gaussian_logprob_is_the_mean_per_element_log_density():
    """Catches sum instead of mean over elements, +log(2 pi)/2, and 2*log(std) for log(std)."""
    from r3_rl.flow.transition import gaussian_logprob

    std = 0.5 * math.sqrt(0.1)
    lp = gaussian_logprob(torch.tensor([[0.9, 1.8, 0.0]], dtype=torch.float64),
                          torch.tensor([[0.8625, 1.8375, 0.0]], dtype=torch.float64),
                          torch.tensor([[std]], dtype=torch.float64))
    # z^2 = 0.05625, 0.05625, 0  -> mean 0.0375
    expected = -0.5 * 0.0375 - math.log(std) - HALF_LOG_2PI
    assert float(lp) == pytest.approx(expected, abs=1e-12)
    assert float(lp) == pytest.approx(0.9067512, abs=1e-6)
    no_const = gaussian_logprob(torch.tensor([[0.9, 1.8, 0.0]], dtype=torch.float64),
                                torch.tensor([[0.8625, 1.8375, 0.0]], dtype=torch.float64),
                                torch.tensor([[std]], dtype=torch.float64), constants=False)
    assert float(no_const) == pytest.approx(-0.01875, abs=1e-12)


def test_euler_step_moves_against_the_velocity():
    """Catches x + delta*v for x - delta*v on the sampler's float-delta path."""
    from r3_rl.flow.transition import euler_step

    out = euler_step(torch.tensor([[1.0, 0.0]]), torch.tensor([[2.0, -4.0]]), 0.25)
    assert out.tolist() == [[0.5, 1.0]]
    out = euler_step(torch.tensor([[1.0], [1.0]]), torch.tensor([[2.0], [2.0]]), torch.tensor([0.25, 0.5]))
    assert out.tolist() == [[0.5], [0.0]]


def test_sde_gaussian_boundaries_delta_equal_t_ok_zero_coefficient_and_zero_eta_refused():
    """Catches `delta >= t` refusing the last step to t=0, `a >= 0` accepting a zero x coefficient, `eta >= 0`."""
    from r3_rl.flow.transition import sde_gaussian

    x = torch.tensor([[1.0]], dtype=torch.float64)
    # delta == t (the step that ends at 0): a = 1 - 0.25 * 0.2 / 0.4 = 0.875, b = -0.2 * (1 + 0.25*0.8/0.4) = -0.3
    mean, std = sde_gaussian(x, x, 0.2, 0.2, 0.5)
    assert float(mean) == pytest.approx(0.875 - 0.3, abs=1e-12) and float(std) == pytest.approx(0.5 * math.sqrt(0.2))
    with pytest.raises(ValueError, match="must be < 1"):
        sde_gaussian(x, x, 0.5, 0.25, 2.0)  # eta^2 delta / 2t = 4 * 0.25 / 1 = 1 exactly: a = 0
    with pytest.raises(ValueError, match="eta must be finite and > 0"):
        sde_gaussian(x, x, 0.5, 0.1, 0.0)


# ================================================================================================ flow actions
def test_score_traces_keeps_each_kind_rows_and_recorded_delta():
    """Catches selecting a kind's rows by trace index instead of position, and delta taken from the wrong field."""
    from r3_rl.flow.action import score_traces

    g0, g1 = Guidance(), Guidance(text_scale=0.5)  # two kinds, neither guides (text_scale <= 1)
    traces = [_trace([_step(index=1, t=0.4, delta=0.4, eta=0.5, x_t=(0.0, 0.0), x_next=(0.0, 0.0))], g0),
              _trace([_step(index=3, t=0.5, delta=0.1, eta=0.5)], g1)]
    scores = score_traces(traces, lambda members, batch: FlowVelocity(lambda x, t: torch.ones_like(x)))
    mean, std = _hand_gaussian([1.0, 2.0], [1.0, 1.0], 0.5, 0.1, 0.5)
    assert scores[1].logp.shape == (1,)
    assert float(scores[1].logp[0]) == pytest.approx(_hand_logprob([0.9, 1.8], mean, std), abs=1e-5)
    assert scores[1].mean[0].tolist() == pytest.approx([0.8625, 1.8375], abs=1e-6)
    assert scores[1].delta.tolist() == [0.1] and scores[0].delta.tolist() == [0.4]
    assert scores[1].std.tolist() == pytest.approx([std], rel=1e-6)  # float32-rounded in the latent dtype


def test_detached_unconditional_branch_is_the_text_branch():
    """Catches swapping text_uncond for image_uncond when unconditional_without_gradient wraps the branches."""
    from r3_rl.flow.action import score_traces, unconditional_without_gradient

    tr = _trace([_step(index=0, t=0.5, delta=0.1, eta=0.5)], Guidance(text_scale=2.0))
    vel = FlowVelocity(lambda x, t: torch.ones_like(x), text_uncond=lambda x, t: torch.zeros_like(x))
    with unconditional_without_gradient():
        scores = score_traces([tr], lambda members, batch: vel)
    mean, std = _hand_gaussian([1.0, 2.0], [2.0, 2.0], 0.5, 0.1, 0.5)  # v = 0 + 2 * (1 - 0) = 2
    assert float(scores[0].logp[0]) == pytest.approx(_hand_logprob([0.9, 1.8], mean, std), abs=1e-5)


def test_segment_trace_refuses_more_logprobs_than_steps_and_foreign_kinds():
    """Catches the step/log-prob count check loosened to `<` (more steps than log-probs), and is_flow_segment keyed
    on a 'trace' field, not the kind."""
    from r3_rl.flow.action import flow_action, is_flow_segment, segment_trace

    one = _trace([_step()])
    with pytest.raises(ValueError, match="1 recorded SDE steps but 2 log-probs"):
        segment_trace(SimpleNamespace(action=flow_action(one), logprobs=[0.1, 0.2]))
    two = _trace([_step(index=0), _step(index=1)])
    with pytest.raises(ValueError, match="2 recorded SDE steps but 1 log-probs"):
        segment_trace(SimpleNamespace(action=flow_action(two), logprobs=[0.1]))
    assert segment_trace(SimpleNamespace(action=flow_action(two), logprobs=[0.1, 0.2])).sde_indices == (0, 1)
    assert not is_flow_segment(SimpleNamespace(action={"kind": "tokens", "trace": {}}))
    assert is_flow_segment(SimpleNamespace(action={"kind": "denoising", "trace": {}}))


# ================================================================================================ training signal
def test_has_signal_needs_two_rewards_and_a_spread_beyond_rounding():
    """Catches `>= 1` reward (a lone member) and a zero tolerance (0.1 + 0.2 vs 0.3 counted as a spread)."""
    from r3_rl.algorithms.signal import has_signal

    assert not has_signal([1.0])
    assert not has_signal([0.1 + 0.2, 0.3])
    assert has_signal([0.0, 1.0])


# ================================================================================================ Blocks detector
def test_label_components_joins_a_u_shape():
    """Catches min-propagation over only the row above and the own row: the right arm of a U stays apart."""
    from r3_rl.blocks.detector import label_components

    m = np.zeros((4, 5), bool)
    m[:, 0] = m[:, 4] = m[3, :] = True  # a U: two arms joined only along the bottom row
    labels, n = label_components(m)
    assert n == 1
    assert set(labels[m].tolist()) == {0} and set(labels[~m].tolist()) == {-1}


def test_detect_sees_a_colour_that_shares_a_channel_with_the_background():
    """Catches .all(-1) for .any(-1): pure red (255, 0, 0) on white shares R and vanished."""
    from r3_rl.blocks.detector import detect

    img = np.full((10, 10, 3), 255, np.uint8)
    img[2:6, 3:7] = (255, 0, 0)
    dets = detect(img)
    assert len(dets) == 1
    assert dets[0].color == "red" and dets[0].label == "square" and dets[0].box == (3.0, 2.0, 7.0, 6.0)


def test_classify_shape_samples_rows_by_height_and_columns_by_width():
    """Catches rows sampled with the width (a 2x-wide triangle read as a square)."""
    from r3_rl.blocks.detector import classify_shape

    tri = np.array([[0, 0, 1, 1, 0, 0], [0, 0, 1, 1, 0, 0], [0, 1, 1, 1, 1, 0], [0, 1, 1, 1, 1, 0],
                    [1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]], bool)  # the 8 px cell's triangle sprite, by hand
    assert classify_shape(tri) == "triangle"
    assert classify_shape(np.repeat(tri, 2, axis=1)) == "triangle"  # stretched wide: still a triangle
    assert classify_shape(np.repeat(tri, 2, axis=0)) == "triangle"  # stretched tall


def test_classify_shape_treats_rows_and_columns_alike():
    """Catches a template side from the height only: a wide ellipse and its tall transpose got different labels."""
    from r3_rl.blocks.detector import classify_shape

    disc = np.array([[0, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1],
                     [1, 1, 1, 1, 1, 1], [0, 1, 1, 1, 1, 0]], bool)
    wide = np.repeat(disc, 2, axis=1)
    assert classify_shape(wide) == classify_shape(np.ascontiguousarray(wide.T))


# ================================================================================================ BAGEL layout
def _layout_rows():
    from r3_rl.policy.bagel.layout import NoiseBlock, TextBlock, VaeBlock

    return [[TextBlock([1, 2]), VaeBlock(torch.zeros(4, 3), (2, 2)), TextBlock([3]),
             NoiseBlock(torch.zeros(2, 3), 0.5, (1, 2)), TextBlock([4])],
            [TextBlock([5])]]


def test_build_layout_positions_sources_blocks_and_spans_by_hand():
    """Catches noise blocks advancing the position, markers tagged as latents, latent items at the marker, wrong
    inner slice, wrong last index and pads in block 0."""
    from r3_rl.policy.bagel.layout import build_layout

    lay = build_layout(_layout_rows(), vit_patch=16, marker_ids=(100, 101))
    T, L, C, F, N = 1, 3, 0, 1, 2
    assert lay.token_ids.tolist() == [[1, 2, 100, 0, 0, 0, 0, 101, 3, 100, 0, 0, 101, 4],
                                      [5] + [0] * 13]
    assert lay.source.tolist() == [[T, T, T, L, L, L, L, T, T, T, L, L, T, T], [T] + [0] * 13]
    assert lay.position_ids.tolist() == [[0, 1, 2, 2, 2, 2, 2, 2, 3, 4, 4, 4, 4, 4], [0] * 14]
    assert lay.block_ids.tolist() == [[0, 0, 1, 1, 1, 1, 1, 1, 2, 3, 3, 3, 3, 4], [0] + [-1] * 13]
    assert lay.modes.tolist() == [[C, C, F, F, F, F, F, F, C, N, N, N, N, C], [C] * 14]
    assert [(s.kind, s.start, s.end) for s in lay.spans[0]] == [("text", 0, 2), ("vae", 2, 8), ("text", 8, 9),
                                                                 ("noise", 9, 13), ("text", 13, 14)]
    assert lay.spans[0][1].inner == slice(3, 7) and lay.spans[0][0].inner == slice(0, 2)
    assert [(r, i) for r, i, _ in lay.latent_items] == [(0, 3), (0, 10)]
    assert lay.next_position.tolist() == [5, 1] and lay.next_block.tolist() == [5, 1]
    assert lay.last_index.tolist() == [13, 0]


def test_build_layout_counts_vit_tokens_of_a_non_square_image():
    """Catches (h/p)^2 for (h/p)*(w/p): a 32x64 image at patch 16 has 2*4 = 8 tokens, not 4."""
    from r3_rl.policy.bagel.layout import VitBlock, build_layout

    lay = build_layout([[VitBlock(torch.zeros(3, 32, 64))]], vit_patch=16, marker_ids=(100, 101))
    assert lay.token_ids.shape == (1, 10)
    assert lay.source.tolist() == [[1] + [2] * 8 + [1]]
    assert [(r, i) for r, i, _ in lay.vit_items] == [(0, 1)]


def test_attention_mask_by_hand():
    """Catches text made bidirectional inside its block, a noise block hidden from itself, and queries not aligned
    to the last keys of a cache."""
    from r3_rl.policy.bagel.layout import CAUSAL, NOISE, attention_mask

    blk = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 2]])
    mode = torch.tensor([[CAUSAL] * 3 + [NOISE] * 4 + [CAUSAL]])
    valid = torch.ones(1, 8, dtype=torch.bool)
    m = attention_mask(blk, mode, blk, mode, valid)[0, 0].int().tolist()
    assert m == [[1, 0, 0, 0, 0, 0, 0, 0],
                 [1, 1, 0, 0, 0, 0, 0, 0],
                 [1, 1, 1, 0, 0, 0, 0, 0],
                 [1, 1, 1, 1, 1, 1, 1, 0],
                 [1, 1, 1, 1, 1, 1, 1, 0],
                 [1, 1, 1, 1, 1, 1, 1, 0],
                 [1, 1, 1, 1, 1, 1, 1, 0],
                 [1, 1, 1, 0, 0, 0, 0, 1]]
    # queries are the last 2 of 5 keys (a cached context of 3): causal text sees everything up to itself
    k_blk, k_mode = torch.zeros(1, 5, dtype=torch.long), torch.zeros(1, 5, dtype=torch.long)
    k_valid = torch.tensor([[True, False, True, True, True]])
    m = attention_mask(k_blk[:, 3:], k_mode[:, 3:], k_blk, k_mode, k_valid)[0, 0].int().tolist()
    assert m == [[1, 0, 1, 1, 0], [1, 0, 1, 1, 1]]


def test_context_cache_concat_pads_invalid_and_appended_takes_the_new_counters():
    """Catches pads of a shorter cache marked valid, and an appended cache keeping the old next positions."""
    from r3_rl.policy.bagel.layout import ContextCache, TextBlock, build_layout

    def cache(n, pos):
        z = torch.zeros(1, n, dtype=torch.long)
        return ContextCache(None, z, z.clone(), torch.ones(1, n, dtype=torch.bool), torch.tensor([pos]),
                            torch.tensor([1]))

    both = ContextCache.concat([cache(2, 7), cache(3, 9)])
    assert both.valid.tolist() == [[True, True, False], [True, True, True]]
    assert both.block_ids.tolist() == [[0, 0, -1], [0, 0, 0]]
    assert both.next_position.tolist() == [7, 9]
    lay = build_layout([[TextBlock([1, 2, 3])]], vit_patch=16, marker_ids=(100, 101), start_position=[7],
                       start_block=[1])
    assert lay.position_ids.tolist() == [[7, 8, 9]]
    grown = cache(2, 7).appended(lay, [])
    assert grown.next_position.tolist() == [10] and grown.next_block.tolist() == [2]
    assert grown.valid.tolist() == [[True] * 5]


# ================================================================================================ BAGEL contexts
@pytest.fixture(scope="module")
def tiny():
    """A seeded tiny BAGEL built in memory, with its tokenizer."""
    from r3_rl.policy.bagel.tiny import tiny_bagel

    model, tok = tiny_bagel(seed=0)
    return model.eval(), tok


def test_text_record_closes_the_block():
    """Catches a text record without its <|im_end|>."""
    from r3_rl.policy.bagel.contexts import text_record
    from r3_rl.policy.bagel.tiny import build_tiny_tokenizer

    tok = build_tiny_tokenizer()
    tokens = SimpleNamespace(im_start=tok.convert_tokens_to_ids("<|im_start|>"),
                             im_end=tok.convert_tokens_to_ids("<|im_end|>"))
    body = tok.encode("Hi", add_special_tokens=False)
    assert len(body) == 2
    assert text_record(tok, "Hi", tokens) == {"text": [tokens.im_start, *body, tokens.im_end]}


def test_image_digest_tells_shapes_apart():
    """Catches a digest of the bytes only: a 2x3 and a 3x2 black image shared one cached latent."""
    from r3_rl.policy.bagel.contexts import image_digest

    assert image_digest(np.zeros((2, 3, 3), np.uint8)) != image_digest(np.zeros((3, 2, 3), np.uint8))
    assert image_digest(np.zeros((2, 3, 3), np.uint8)) == image_digest(np.zeros((2, 3, 3), np.uint8))


def _stub_builder(monkeypatch):
    import r3_rl.policy.bagel.contexts as cx

    calls = []

    def fake_image_tensor(image, size):
        return torch.from_numpy(np.asarray(image, dtype=np.float32)).permute(2, 0, 1)

    def fake_encode(vae, pixels, patch):
        calls.append(float(pixels[0, 0, 0, 0]))
        return pixels.flatten(2).transpose(1, 2), (pixels.shape[-2], pixels.shape[-1])

    monkeypatch.setattr(cx, "image_tensor", fake_image_tensor)
    monkeypatch.setattr(cx, "encode_latents", fake_encode)
    model = SimpleNamespace(device="cpu", config=SimpleNamespace(latent_patch_size=1))
    return cx.ContextBuilder(model, None, (8, 8, 1), (8, 8, 1)), calls


def test_vae_latent_cache_evicts_the_least_recently_used(monkeypatch):
    """Catches popitem(last=True): the entry just added was evicted (and the builder then crashed)."""
    from r3_rl.policy.bagel.contexts import LATENT_CACHE

    builder, calls = _stub_builder(monkeypatch)
    imgs = [np.full((1, 1, 3), k, np.uint8) for k in range(LATENT_CACHE + 1)]
    for img in imgs:
        builder.vae_block(img)
    assert len(calls) == LATENT_CACHE + 1 and len(builder._latents) == LATENT_CACHE
    builder.vae_block(imgs[-1])  # newest: cached
    builder.vae_block(imgs[1])  # second oldest: still cached
    assert len(calls) == LATENT_CACHE + 1
    builder.vae_block(imgs[0])  # oldest: evicted, encoded again
    assert calls[-1] == 0.0 and len(calls) == LATENT_CACHE + 2


def test_context_blocks_map_records_to_block_kinds(monkeypatch):
    """Catches a 'vae' record rebuilt as a ViT block (an edit's input read by the understanding path)."""
    from r3_rl.policy.bagel.layout import TextBlock, VaeBlock, VitBlock

    builder, _ = _stub_builder(monkeypatch)
    img = np.full((2, 2, 3), 3, np.uint8)
    out = builder.blocks([{"text": [1, 2]}, {"vae": 0}, {"vit": 0}], {"0": img})
    assert isinstance(out[0], TextBlock) and list(out[0].ids) == [1, 2]
    assert isinstance(out[1], VaeBlock) and out[1].grid == (2, 2) and out[1].latents.shape == (4, 3)
    assert isinstance(out[2], VitBlock)


# ================================================================================================ BAGEL text actions
def test_text_vocabulary_is_the_tokenizer_minus_three_markers(tiny):
    """Catches `<=` len(tokenizer) (a spare embedding row allowed) and <|vision_end|> left samplable."""
    from r3_rl.policy.bagel.text_actions import text_vocabulary

    model, tok = tiny
    assert len(tok) == 261 and model.language_model.lm_head.out_features == 264
    allowed = text_vocabulary(model, tok)
    assert allowed.shape == (264,) and int(allowed.sum()) == 258
    assert not allowed[258:].any()  # im_start 258, vision_start 259, vision_end 260, spare 261..263
    assert bool(allowed[257]) and bool(allowed[0])  # im_end and byte tokens stay


def test_closed_block_of_an_empty_and_a_cut_answer():
    """Catches `ids[-1]` without the emptiness guard (crash on an empty answer)."""
    from r3_rl.policy.bagel.text_actions import closed_block

    tokens = SimpleNamespace(im_start=258, im_end=257)
    assert closed_block([], tokens) == [258, 257]
    assert closed_block([65, 66], tokens) == [258, 65, 66, 257]
    assert closed_block([65, 257], tokens) == [258, 65, 257]


def test_text_logprobs_match_incremental_decoding(tiny):
    """Catches the teacher-forced hidden states read one position late (position j must predict ids[j])."""
    from r3_rl.policy.bagel.layout import TextBlock
    from r3_rl.policy.bagel.text_actions import text_logprobs, text_vocabulary
    from r3_rl.trajectory import SamplingParams

    model, tok = tiny
    allowed = text_vocabulary(model, tok)
    ctx = [TextBlock([258, 72, 105, 257])]
    ids = [65, 66, 257]
    with torch.no_grad():
        got = text_logprobs(model, [ctx], [ids], [SamplingParams()], allowed)[0]
        cache = model.extend_context(None, [ctx])
        expected, feed = [], [258]
        for tid in ids:
            logits, cache = model.next_token_logits(cache, [[TextBlock(feed)]])
            lp = torch.log_softmax(logits[0].float().masked_fill(~allowed, float("-inf")), -1)
            expected.append(float(lp[tid]))
            feed = [tid]
    assert got.tolist() == pytest.approx(expected, abs=1e-4)


def test_isolated_text_logprobs_train_the_understanding_expert(tiny):
    """Catches isolate routing the gradient to the generation expert (the understanding weights got none)."""
    from r3_rl.policy.bagel.layout import TextBlock
    from r3_rl.policy.bagel.text_actions import text_logprobs, text_vocabulary
    from r3_rl.trajectory import SamplingParams

    model, tok = tiny
    model.zero_grad(set_to_none=True)
    lp = text_logprobs(model, [[TextBlock([258, 72, 257])]], [[65]], [SamplingParams()],
                       text_vocabulary(model, tok), isolate=True)[0]
    lp.sum().backward()
    q = model.language_model.model.layers[0].self_attn.q_proj.weight
    assert q.grad is not None and float(q.grad.abs().sum()) > 0
    model.zero_grad(set_to_none=True)


def test_sample_text_stops_each_row_at_its_im_end(tiny):
    """Catches a finished row that kept appending tokens after its <|im_end|>."""
    from r3_rl.policy.bagel.layout import TextBlock
    from r3_rl.policy.bagel.text_actions import sample_text
    from r3_rl.trajectory import SamplingParams

    model, _ = tiny
    allowed = torch.zeros(264, dtype=torch.bool)
    allowed[[65, 257]] = True  # 'b'-ish byte or <|im_end|>
    n = 6
    with torch.no_grad():
        cache = model.extend_context(None, [[TextBlock([258, 72, 257])]] * n)
        ids, logps = sample_text(model, cache, SamplingParams(temperature=5.0, max_new_tokens=12), allowed,
                                 torch.Generator().manual_seed(3))
    lengths = [len(r) for r in ids]
    assert len(set(lengths)) > 1  # rows finish at different steps (what the test needs)
    for r in range(n):
        assert len(logps[r]) == len(ids[r])
        assert all(t in (65, 257) for t in ids[r])
        assert 257 not in ids[r][:-1]
