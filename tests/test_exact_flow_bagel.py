"""Exact small cases for flow matching, BAGEL, Janus and the tiny flow policy (one mutation-audit finding each).

Every expected value is derived by hand or from a public reference formula (Qwen2 RoPE, BAGEL's
``_forward_flow`` CFG renorm, the PPO/GRPO clipped objective, rectified-flow interpolation), never by calling the
function under test.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from r3_rl.flow.action import StepScores, unconditional_detached, unconditional_without_gradient
from r3_rl.flow.guidance import Guidance, guided_velocity
from r3_rl.trajectory import PromptItem, SamplingParams, Segment

REPO = Path(__file__).resolve().parents[1]


# ============================================================================================== BAGEL (tiny model)
@pytest.fixture(scope="module")
def bagel():
    """A seeded tiny BAGEL built in memory (no save/load: the tests read its modules directly)."""
    from r3_rl.policy.bagel import BagelModel
    from r3_rl.policy.bagel.tiny import build_tiny_tokenizer, tiny_bagel_config

    config = tiny_bagel_config(build_tiny_tokenizer())
    torch.manual_seed(0)
    return BagelModel(config).eval()


def _text_ids(model) -> list[int]:
    tok = model.config.tokens
    return [tok.im_start, 72, 105, 33, 40, 41, tok.im_end]  # <|im_start|> + 5 byte tokens + <|im_end|>


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return weight * (x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def test_bagel_cached_keys_are_qwen2_rope_of_the_normed_key_projection(bagel):
    """A sign slip in RoPE (-sin) rotates every cached key the wrong way: position-dependent attention breaks
    while position 0 (and every shape) still looks right."""
    from r3_rl.policy.bagel import TextBlock

    ids = _text_ids(bagel)
    with torch.no_grad():
        cache = bagel.extend_context(None, [[TextBlock(ids)]])
        cached = cache.kv[0][0][0]  # layer 0 keys of row 0: [kv_heads, L, head_dim], post-RoPE
        llm = bagel.config.llm
        lm = bagel.language_model.model
        layer, attn = lm.layers[0], lm.layers[0].self_attn
        eps = llm.rms_norm_eps
        hd = llm.hidden_size // llm.num_attention_heads
        rope = getattr(llm, "rope_parameters", None) or {}
        theta = float(rope.get("rope_theta", getattr(llm, "rope_theta", None)))
        assert theta == 1e6 and hd == 16  # the tiny config's Qwen2 settings
        h = lm.embed_tokens(torch.tensor(ids))
        x = _rms_norm(h, layer.input_layernorm.weight, eps)
        k = (x @ attn.k_proj.weight.T + attn.k_proj.bias).view(len(ids), llm.num_key_value_heads, hd)
        k = _rms_norm(k, attn.k_norm.weight, eps).transpose(0, 1)  # [kv_heads, L, hd]
        inv_freq = theta ** (-torch.arange(0, hd, 2, dtype=torch.float32) / hd)
        ang = torch.arange(len(ids), dtype=torch.float32)[:, None] * inv_freq[None]
        cos, sin = torch.cat([ang.cos()] * 2, -1), torch.cat([ang.sin()] * 2, -1)
        k1, k2 = k[..., : hd // 2], k[..., hd // 2:]
        expected = k * cos + torch.cat([-k2, k1], -1) * sin
    assert cached.shape == expected.shape
    torch.testing.assert_close(cached, expected, atol=1e-5, rtol=1e-5)


def test_bagel_clean_vae_latents_are_embedded_at_timestep_zero(bagel):
    """BAGEL conditions an edit's clean input latents at t = 0; another time would tell the model its input
    image is (partly) noise."""
    from r3_rl.policy.bagel import NoiseBlock, TextBlock, VaeBlock

    ids = _text_ids(bagel)
    lat = torch.randn(4, bagel.config.patch_latent_dim, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        clean = bagel([[TextBlock(ids), VaeBlock(lat, (2, 2))]]).hidden[0]
        at_zero = bagel([[TextBlock(ids), NoiseBlock(lat, 0.0, (2, 2))]]).hidden[0]
        at_one = bagel([[TextBlock(ids), NoiseBlock(lat, 1.0, (2, 2))]]).hidden[0]
    image = slice(len(ids), len(ids) + 6)  # <|vision_start|>, 4 latent tokens, <|vision_end|>
    assert clean.shape[0] == len(ids) + 6
    torch.testing.assert_close(clean[image], at_zero[image], atol=1e-5, rtol=1e-5)
    assert (clean[image] - at_one[image]).abs().max() > 1e-3  # the time really reaches these positions


def test_bagel_flow_settings_use_each_stage_own_eta():
    """Swapping gen_eta and edit_eta would draw first images with the edits' noise level and vice versa."""
    from r3_rl.flow import EtaSchedule
    from r3_rl.policy.bagel.image_actions import flow_settings
    from r3_rl.policy.bagel.recipe import BagelOptions

    opts = BagelOptions(gen_eta=0.6, edit_eta=0.9)
    assert flow_settings(opts, "generate", 4.0).eta == EtaSchedule("r3", 0.6)
    assert flow_settings(opts, "refine", 4.0).eta == EtaSchedule("r3", 0.9)


def test_bagel_detach_uncond_keeps_the_conditional_context_differentiable(bagel):
    """learner.flow.detach_uncond may drop the unconditional contexts' gradients only: detaching the
    conditional context too would silently stop training everything the prompt conditions."""
    from r3_rl.policy.bagel.contexts import ContextBuilder
    from r3_rl.policy.bagel.image_actions import encode_branches

    tok = bagel.config.tokens
    builder = ContextBuilder(bagel, None, (32, 16, 4), (32, 16, 16))  # text records only: no image is read
    contexts = [{"cond": [{"text": _text_ids(bagel)}], "text_uncond": [{"text": [tok.im_start, tok.im_end]}]}]
    guidance = Guidance(text_scale=4.0)
    params = [p for p in bagel.parameters() if p.requires_grad]
    grads, uncond_grad = {}, {}
    for detach in (False, True):
        with unconditional_without_gradient(detach):
            caches = encode_branches(builder, contexts, guidance)
        cond = sum(k.sum() + v.sum() for k, v in caches["cond"].kv)
        assert cond.requires_grad, f"detach_uncond={detach}: the conditional context lost its gradient"
        uncond_grad[detach] = caches["text_uncond"].kv[0][0].requires_grad
        grads[detach] = torch.autograd.grad(cond, params, allow_unused=True)
    assert uncond_grad == {False: True, True: False}
    assert any(g is not None and g.abs().sum() > 0 for g in grads[True])
    for a, b in zip(grads[False], grads[True]):
        assert (a is None) == (b is None)
        if a is not None:
            assert torch.equal(a, b)


# ============================================================================================== flow library
def test_learner_flow_loss_honours_detach_uncond():
    """learner.flow.detach_uncond must reach the policy's rescoring; ignored, the unconditional CFG branches
    keep (or lose) their gradient whatever the recipe says."""
    from r3_rl.config import Learner
    from r3_rl.flow.action import FLOW_ACTION_KIND
    from r3_rl.learner.batch import TrainItem
    from r3_rl.learner.flow_loss import flow_loss

    class Recorder:
        def __init__(self):
            self.seen: list[bool] = []

        def denoising_scores(self, segments):
            self.seen.append(unconditional_detached())
            return [StepScores(logp=torch.zeros(1, dtype=torch.float64, requires_grad=True),
                               mean=torch.zeros(1, 2), std=torch.ones(1, dtype=torch.float64),
                               delta=torch.full((1,), 0.1, dtype=torch.float64)) for _ in segments]

    item = TrainItem(Segment("image", {}, [], [0.0], action={"kind": FLOW_ACTION_KIND, "trace": {}}), 1.0,
                     "generate", 0)
    for detach in (True, False):
        policy = Recorder()
        flow_loss(policy, None, [item], [1.0], Learner(kl_coef_image=0.0, flow={"detach_uncond": detach}))
        assert policy.seen == [detach]
    assert unconditional_detached() is False  # the setting does not leak past the loss


def test_global_renorm_factor_is_clamped_at_one():
    """BAGEL's renorm only shrinks a guided velocity (clamp(|v_c|/|v|, max=1)); unclamped it would blow a weak
    guided velocity up to the conditional norm."""
    g = Guidance(text_scale=4.0, renorm="global")
    v_c, v_tu = torch.tensor([[3.0, 4.0]]), torch.tensor([[3.75, 5.0]])
    # v = v_tu + 4 (v_c - v_tu) = [0.75, 1.0]; |v_c| / |v| = 5 / 1.25 = 4 -> clamped to 1: v unchanged
    v = guided_velocity(g, torch.tensor([1.0]), v_c, v_tu)
    torch.testing.assert_close(v, torch.tensor([[0.75, 1.0]]), atol=1e-6, rtol=0)


def test_flow_policy_loss_uses_clip_high_above_one():
    """An asymmetric clip range (DAPO-style clip_high > clip_low) must clip the ratio at 1 + clip_high."""
    from r3_rl.algorithms.flow_losses import flow_policy_loss

    logp, old, adv = (torch.tensor([v], dtype=torch.float64) for v in (0.1, 0.0, 1.0))
    loss, _ = flow_policy_loss(logp, old, adv, clip_low=0.01, clip_high=0.2)
    # ratio e^0.1 = 1.105171 < 1 + 0.2: unclipped, loss = -min(r A, clip(r) A) = -1.105171 (clip_low alone: -1.01)
    assert loss.item() == pytest.approx(-math.exp(0.1), abs=1e-9)


def test_euler_step_with_a_per_row_step_size():
    """A learner batch mixes images with different step sizes: each row moves by its own delta, toward data."""
    from r3_rl.flow.transition import euler_step

    x = torch.tensor([[1.0, 2.0], [3.0, 4.0]], dtype=torch.float64)
    v = torch.tensor([[1.0, 1.0], [2.0, 2.0]], dtype=torch.float64)
    out = euler_step(x, v, torch.tensor([0.5, 0.25], dtype=torch.float64))  # x - delta * v, as the float branch
    assert out.tolist() == [[0.5, 1.5], [2.5, 3.5]]
    assert euler_step(x[:1], v[:1], 0.5).tolist() == [[0.5, 1.5]]


# ============================================================================================== Janus (tiny)
JANUS_TEMPLATES = {"system": "You draw and check pictures.", "reason": "Plan how to draw: {prompt}",
                   "generate": "{prompt}", "generate_uncond": "",
                   "reflect": "Target: {prompt}. How to further edit the image?",
                   "refine": "{prompt}. Edit: {instruction}", "stop_phrase": "no further edit needed"}


@pytest.fixture(scope="module")
def janus(tmp_path_factory):
    from r3_rl.policy.janus import JanusPolicy
    from r3_rl.policy.janus_tiny import make_tiny_janus

    path = make_tiny_janus(tmp_path_factory.mktemp("janus") / "tiny")
    return JanusPolicy.from_pretrained(path, templates=JANUS_TEMPLATES, dtype="float32", device="cpu")


def test_janus_text_mask_excludes_exactly_the_image_and_padding_tokens(janus):
    """Text stages must never emit <end_of_image> (or BOS/pad/image markers); EOS stays allowed to stop."""
    from r3_rl.policy.janus_tiny import BOS, EOS, IMAGE_TOKENS, PAD

    ids = janus.tok.convert_tokens_to_ids
    special = {ids(BOS), ids(PAD), *(ids(t) for t in IMAGE_TOKENS.values())}
    assert len(special) == 5
    assert not bool(janus.text_mask[ids(IMAGE_TOKENS["eoi_token"])])
    n = len(janus.tok)
    masked = {i for i in range(n) if not bool(janus.text_mask[i])}
    assert masked == special
    assert bool(janus.text_mask[ids(EOS)])
    assert not bool(janus.text_mask[n:].any())  # lm_head rows past the tokenizer are never text


def test_janus_answer_yes_no_is_the_normalised_yes_probability(janus):
    """The yes/no judge reads P(yes) / (P(yes) + P(no)); raw P(yes) or P(no) would score every image wrong."""
    from torch import nn

    from r3_rl.policy.base import ImageInput

    ids = janus.tok.convert_tokens_to_ids
    vocab = janus._model.lm_head.out_features
    probs = torch.full((vocab,), 0.0)
    probs[[ids("Y"), ids("y")]] = 0.1  # first tokens of "Yes" / "yes" (byte-level tokenizer)
    probs[[ids("N"), ids("n")]] = 0.025  # ... of "No" / "no"
    probs[ids("Ġ")] = 0.3  # the space that starts both " Yes" and " No": counts for neither
    rest = probs == 0
    probs[rest] = 0.45 / int(rest.sum())
    logits = probs.log()

    class FixedHead(nn.Module):
        weight = janus._model.lm_head.weight  # the engine reads the head's device from it

        def forward(self, hidden):
            return logits.expand(hidden.shape[0], -1)

    image = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    head = janus._model.lm_head
    janus._model.lm_head = FixedHead()
    try:
        p = janus.answer_yes_no([ImageInput(image)], ["Is there a cube?"])
    finally:
        janus._model.lm_head = head
    assert p == pytest.approx([0.2 / (0.2 + 0.05)], abs=1e-6)


# ============================================================================================== tiny flow policy
TINY_FLOW = REPO / "recipes" / "tiny_flow_blocks.yaml"
SMALL = ["policy.tiny.hidden_size=32", "policy.tiny.num_layers=1", "policy.tiny.num_heads=2",
         "policy.tiny.intermediate_size=48", "policy.options.head_width=64"]


def _tiny_flow(*extra: str):
    from r3_rl.config import load_recipe
    from r3_rl.policy.registry import build_policy

    return build_policy(load_recipe(TINY_FLOW, SMALL + list(extra)))


@pytest.fixture(scope="module")
def flow_policy():
    return _tiny_flow()


def test_tiny_flow_warm_start_interpolates_from_data_to_noise_and_regresses_eps_minus_x0(flow_policy):
    """The sampler walks x <- x - delta v from noise (t = 1) to data (t = 0), so the warm start must train
    v = eps - x0 at x_t = (1 - t) x0 + t eps; either sign flipped trains a velocity the sampler runs backwards."""
    from torch import nn

    from r3_rl.blocks import world
    from r3_rl.policy.tiny_flow import flow_sft_loss

    policy = flow_policy
    calls = []

    class OnesHead(nn.Module):
        def forward(self, x, t, h_last, h_cells):
            calls.append((x.detach().clone(), t.detach().clone()))
            return torch.ones_like(x)

    lo = policy.image_offset
    cells = torch.tensor([[k % world.N_TOKENS for k in range(policy.num_cells)],
                          [(3 * k + 1) % world.N_TOKENS for k in range(policy.num_cells)]])
    context = policy.generate_contexts([PromptItem("a", "a photo of a red square")], [None])[0][0]
    batch = [(context, [lo + int(c) for c in row]) for row in cells]
    head = policy.model.flow_head
    policy.model.flow_head = OnesHead()  # swapped by hand: the module fixture's policy gets its head back
    try:
        torch.manual_seed(123)
        loss = flow_sft_loss(policy, batch)
    finally:
        policy.model.flow_head = head
    torch.manual_seed(123)  # the same draws, in the loss's order: t [2], then eps like x0 [2, cells, latent_dim]
    t = torch.rand(2)
    eps = torch.randn(2, policy.num_cells, policy.flow["latent_dim"])
    x0 = policy.codes[cells]
    (x_t, t_seen), = calls
    torch.testing.assert_close(t_seen, t)
    torch.testing.assert_close(x_t, (1 - t)[:, None, None] * x0 + t[:, None, None] * eps, atol=1e-6, rtol=1e-6)
    assert loss.item() == pytest.approx(((1.0 - (eps - x0)) ** 2).mean().item(), rel=1e-5)


def test_tiny_flow_sliding_window_follows_the_learner_step():
    """MixGRPO's sliding window moves with training; stuck at learner step 0 it would train the same two steps
    forever."""
    from r3_rl.flow.action import segment_trace

    policy = _tiny_flow("policy.options.sde_generate={mode: sliding_window, window: 2}")
    prompt = [PromptItem("a", "a photo of a red square")]
    # 10 grid points: 9 steps; window 2, start 0, stride 1, shift_every 1: the window starts at version mod 9
    for version, expected in ((0, [0, 1]), (3, [3, 4]), (10, [1, 2])):
        policy.version = version
        seg = policy.generate(prompt, [None], SamplingParams(), torch.Generator().manual_seed(0))[0].segment
        assert [s.index for s in segment_trace(seg).steps] == expected, version
        assert len(seg.logprobs) == 2


def test_tiny_flow_greedy_sampling_records_no_sde_step(flow_policy):
    """greedy (with temperature 1) means the plain ODE: no stochastic step, so no action for the learner."""
    from r3_rl.flow.action import segment_trace

    prompt = [PromptItem("a", "a photo of a red square")]
    seg = flow_policy.generate(prompt, [None], SamplingParams(temperature=1.0, greedy=True),
                               torch.Generator().manual_seed(0))[0].segment
    assert seg.logprobs == [] and segment_trace(seg).steps == []
    sampled = flow_policy.generate(prompt, [None], SamplingParams(temperature=1.0),
                                   torch.Generator().manual_seed(0))[0].segment
    assert len(sampled.logprobs) == 2  # the recipe's sde_generate count: the same call without greedy records


def test_tiny_flow_refine_text_unconditional_context_keeps_the_input_image(flow_policy):
    """Edit CFG contrasts the instruction with 'same image, no instruction'; dropping the image from the text-
    unconditional branch would guide away from the input image itself."""
    from r3_rl.blocks import codec, world
    from r3_rl.policy.base import ImageInput

    policy = flow_policy
    grid = (np.arange(policy.num_cells) % world.N_TOKENS).reshape(policy.rows, policy.cols)
    image = ImageInput(codec.encode(grid), [int(k) for k in grid.reshape(-1)])
    seg = policy.refine([PromptItem("a", "a photo of a red square")], [image], ["add a blue circle"],
                        SamplingParams(), torch.Generator().manual_seed(0))[0].segment
    lo, hi = policy.image_offset, policy.image_offset + policy.num_image_tokens
    expected = [lo + int(k) for k in grid.reshape(-1)]  # one cell token per cell, row-major

    def cells(ids):
        return [i for i in ids if lo <= i < hi]

    assert cells(seg.context["uncond_ids"]) == expected
    assert cells(seg.context["input_ids"]) == expected
    assert cells(seg.context["image_uncond_ids"]) == []


def test_tiny_flow_conditions_read_each_prompt_last_real_token(flow_policy):
    """Padding must not change a prompt's conditioning: batched with a longer prompt, a short prompt's
    h_last is still its own last token's hidden state."""
    policy = flow_policy
    short = policy.render("reason", prompt="red square")
    long = policy.render("reason", prompt="a photo of two blue circles and a red square")
    assert len(long) > len(short) + 3
    with torch.no_grad():
        alone, _ = policy.conditions([short])
        batched, _ = policy.conditions([long, short])
        long_alone, _ = policy.conditions([long])
    torch.testing.assert_close(batched[1], alone[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(batched[0], long_alone[0], atol=1e-5, rtol=1e-5)


def test_tiny_flow_velocity_head_depends_on_t():
    """A velocity field blind to t cannot denoise: the same x_t at t = 0.2 and t = 0.8 needs different v."""
    from r3_rl.policy.tiny_flow import VelocityHead

    torch.manual_seed(0)
    head = VelocityHead(hidden=8, cells=4, latent_dim=2, width=16)
    x, h_last, h_cells = torch.randn(1, 4, 2), torch.randn(1, 8), torch.randn(1, 4, 8)
    with torch.no_grad():
        early = head(x, torch.tensor([0.2]), h_last, h_cells)
        late = head(x, torch.tensor([0.8]), h_last, h_cells)
    assert (early - late).abs().max() > 1e-4
