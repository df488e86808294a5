"""Exact small cases for ``r3-rl plan``'s arithmetic (round 14D audit): r3_rl.plan.{memory,shapes,bagel_shape,
reward_models,validate,render,report,measure}.  Each case is a one-point bug a mutation audit found the suite
letting through; every expected byte count is worked out by hand in the comments from what each component holds
(bytes per element, per token, per layer), or compared with a peer (peft's own adapters, DeepSpeed's config rules)."""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import pytest
from test_exact_plan_and_checkpoint import _shape  # a hand-sized ModelShape (64 wide, 4 layers, 4 x 16 heads)

from r3_rl.plan import memory

REPO = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------------------ plan/memory.py
def _gqa():
    """Grouped-query attention: 2 KV heads of 16 (32 wide) under a 64-wide model, so K/V width != hidden."""
    return _shape(hidden=64, layers=4, heads=4, kv_heads=2, head_dim=16, intermediate=128, largest_weight=1000)


def test_layer_activations_count_the_kv_width_not_the_hidden_width() -> None:
    """Catches ``2b*D`` for ``2b*D_kv``: a GQA layer keeps keys and values of its K/V width only."""
    # b = 2: (8 + 12) x 64 = 1,280; K and V 2 x 2 x 32 = 128; MLP 4 x 2 x 128 = 1,024 -> 2,432 bytes a token
    assert memory.layer_activations(_gqa(), 2) == 2432
    # b = 4: (8 + 24) x 64 = 2,048; 2 x 4 x 32 = 256; 4 x 4 x 128 = 2,048 -> 4,352
    assert memory.layer_activations(_gqa(), 4) == 4352


def test_backward_peak_is_two_largest_weight_gradients_plus_a_share_of_one_layer() -> None:
    """Catches one weight-sized gradient temporary for two (CFG uses the head twice), the recompute and backward
    fractions swapped, and LoRA (no weight gradients) still holding them."""
    per_layer = 2432  # bytes a token, b = 2 (above)
    kept, peak = memory.activations(_gqa(), tokens=10, b=2, checkpointing=False)
    assert kept == 10 * (4 * per_layer + 2 * 2 * 64)  # 98,560
    assert peak == 2 * 2 * 1000 + 0.25 * per_layer * 10  # 4,000 + 6,080 = 10,080
    kept, peak = memory.activations(_gqa(), tokens=10, b=2, checkpointing=True)
    assert kept == 10 * (2 * 4 + 5) * 2 * 64  # 16,640
    assert peak == 4000 + 0.75 * per_layer * 10  # one recomputed layer: 4,000 + 18,240 = 22,240
    _, lora = memory.activations(_gqa(), tokens=10, b=2, checkpointing=False, weight_grads=False)
    assert lora == 6080


def test_forward_temporaries_logits_and_learner_logit_chunks() -> None:
    """Catches a no-grad forward's ``5 x hidden`` read as 4, top-p's 9 float32 temporaries swapped with plain
    sampling's 4, and the learner's logit chunk not capped at the segment's new tokens."""
    # 10 tokens x (3 x 128 + 5 x 64 = 704) x 2 bytes
    assert memory.forward_temporaries(_gqa(), 10, 2) == 14080
    assert memory.logits(3, 100, True) == 3 * 100 * 4 * 9 == 10800
    assert memory.logits(3, 100, False) == 3 * 100 * 4 * 4 == 4800
    # 2^24 elements a chunk over a 100-entry vocabulary is 167,772 rows; a segment of 7 new tokens has 7
    assert memory.learner_logits(memory.Stage("reason", 96, 7, 1, 100, False)) == 7 * 100 * 4 * 4
    # a vocabulary wider than a chunk still takes one row at a time
    assert memory.learner_logits(memory.Stage("x", 1, 5, 1, (1 << 24) + 1, False)) == ((1 << 24) + 1) * 16


def test_vq_decode_keeps_six_full_resolution_feature_maps() -> None:
    # 2 images x 8 x 8 pixels x 3 channels x 2 bytes x 6 maps alive at once
    assert memory.vq_decode(_shape(image_side=8, vq_channels=3), 2, 2) == 4608


def test_sampling_peak_counts_every_cfg_row_and_one_logit_row_per_segment() -> None:
    """A Janus image stage (2 CFG rows): the KV cache holds 3 segments x 2 rows x (10 + 4) positions; the prefill
    forwards the 6 rows' 10-position contexts; the logits are each segment's sampled row with its temporaries
    (top-p: 9) plus every row's raw float32 logits."""
    shape = _gqa()
    got = memory.sampling_peak(shape, memory.Stage("generate", 10, 4, 2, 10, True), 3, 2)
    kv = 6 * 14 * 4 * 2 * 2 * 16 * 2  # rows x positions x layers x (K, V) x kv_heads x head_dim x bytes = 43,008
    assert got == {"KV cache": kv, "prefill activations": 6 * 10 * 704 * 2, "logits": 3 * 10 * 4 * 9 + 6 * 10 * 4}


def test_a_flow_images_denoising_forward_covers_all_its_latent_positions() -> None:
    """BAGEL: a denoising step forwards the image's positions (the larger of context and latents, not their sum);
    its text stages (another vocabulary) forward their context alone."""
    shape = replace(_gqa(), flow=True, image_vocab=64, text_vocab=100)
    image = memory.sampling_peak(shape, memory.Stage("generate", 10, 30, 1, 64, False), 1, 2)
    assert image["prefill activations"] == 30 * 704 * 2
    text = memory.sampling_peak(shape, memory.Stage("reason", 10, 30, 1, 100, False), 1, 2)
    assert text["prefill activations"] == 10 * 704 * 2
    janus = memory.sampling_peak(_gqa(), memory.Stage("generate", 10, 30, 1, 10, False), 1, 2)
    assert janus["prefill activations"] == 10 * 704 * 2  # a token image samples after one prefill of its context


def test_png_bound_parent_buffer_and_eval_chains_by_hand() -> None:
    """Catches a PNG row's filter byte, zlib's last block or the chunk allowance dropped, one parent per slot, int16
    token ids, the initial image left out of a chain, and base64 length rounded down."""
    # 10 px: 10 rows of (3 x 10 + 1) = 310 bytes, one stored block (5 bytes), 128 of chunk headers
    assert memory.png_bytes_at_most(10) == 443
    # 148 px: 148 x 445 = 65,860 bytes = two 64 KB stored blocks
    assert memory.png_bytes_at_most(148) == 65860 + 10 + 128
    janus = _shape(image_side=10)  # 4 image tokens
    assert memory.parent_buffer(janus, 3) == 2 * 3 * 4 * 4  # correct + flawed, int32 ids
    flow = _shape(image_side=10, flow=True)
    assert memory.parent_buffer(flow, 3) == 2 * 3 * 443
    assert memory.parent_buffer(_shape(image_side=0), 3) == 0.0
    # Janus: pixels of rounds 0..2 (3 x 300 bytes) per prompt
    assert memory.eval_chains(janus, 2, 2) == 2 * 3 * 300
    # BAGEL: + each of 2 critiqued images twice as base64 of a 443-byte PNG: 4 x ceil(443 / 3) = 592 characters
    assert memory.eval_chains(flow, 2, 2) == 2 * (900 + 2 * 2 * 592)


def test_model_states_ignore_offload_where_there_is_none() -> None:
    """``offload`` means DeepSpeed's offload_optimizer: ZeRO-0 and the torch backend have none, so asking for it
    must not move their states off the GPU."""
    shape = _shape()
    for zero in (None, 0):
        off = memory.model_states(shape, weight_bytes=2, trained=10 ** 9, zero_stage=zero, ranks=2, offload=True)
        assert off == memory.model_states(shape, weight_bytes=2, trained=10 ** 9, zero_stage=zero, ranks=2)
    assert memory.model_states(shape, weight_bytes=2, trained=10 ** 9, zero_stage=None, ranks=2, offload=True)[
        "optimizer (Adam)"] == 8 * 10 ** 9


def test_zero0_bf16_and_zero3_states_by_hand() -> None:
    """ZeRO-0 in bf16 keeps bf16 and fp32 gradients unsharded (2 + 4 bytes); ZeRO-3 shards weights and the fp32
    gradients and adds one gathered layer of bf16 weights and gradients; fp32 ZeRO-3 has fp32 gradients only."""
    shape, n = _shape(params=8000, largest_layer=100), 4
    z0 = memory.model_states(shape, weight_bytes=2, trained=8000, zero_stage=0, ranks=n)
    assert z0 == {"weights": 16000, "gradients": 48000, "master weights": 32000, "optimizer (Adam)": 64000}
    z3 = memory.model_states(shape, weight_bytes=2, trained=8000, zero_stage=3, ranks=n)
    assert z3 == {"weights": 4000 + 200, "gradients": 8000 + 200, "master weights": 8000, "optimizer (Adam)": 16000}
    f3 = memory.model_states(shape, weight_bytes=4, trained=8000, zero_stage=3, ranks=n)
    assert f3 == {"weights": 8000 + 400, "gradients": 8000 + 400, "master weights": 0, "optimizer (Adam)": 16000}
    # ZeRO-3 + offload: the bf16 shard and one gathered layer (and its gradients); the rest is on the CPU
    o3 = memory.model_states(shape, weight_bytes=2, trained=8000, zero_stage=3, ranks=n, offload=True)
    assert o3 == {"weights": 4000 + 200, "gradients": 200, "master weights": 0, "optimizer (Adam)": 0}
    # ZeRO-2 + offload in fp32: no fp32 gradient partition or staging buffer on the accelerator
    for zero in (1, 2):  # ZeRO-1/2 + offload in fp32: no fp32 gradient accumulator or staging buffer on the GPU
        o = memory.model_states(shape, weight_bytes=4, trained=8000, zero_stage=zero, ranks=n, offload=True)
        assert o == {"weights": 32000, "gradients": 0.0, "master weights": 0, "optimizer (Adam)": 0}


@pytest.mark.parametrize("zero, b, offload, conf, want", [
    (1, 2, False, {"zero_optimization": {"reduce_bucket_size": 1000}}, 0.0),  # BF16_Optimizer: no bucket
    (1, 2, True, {"zero_optimization": {"reduce_bucket_size": 1000}}, 4000),  # fp32 staging
    (1, 4, False, {"zero_optimization": {"reduce_bucket_size": "2e3"}}, 8000),  # YAML's "2e3" is a string
    (2, 2, False, {}, 500_000_000 * 2),  # DeepSpeed's default bucket, in the weights' dtype
    (2, 2, False, {"zero_optimization": {"reduce_bucket_size": 1000, "overlap_comm": True}}, 4000),
    (3, 2, False, {"zero_optimization": {"reduce_bucket_size": 1000}}, 0.0),
    (0, 4, False, None, 0.0)])
def test_reduction_bucket_by_hand(zero: int, b: int, offload: bool, conf: dict, want: float) -> None:
    assert memory.reduction_bucket(zero, b, offload, conf) == want


# ------------------------------------------------------------------------------------------------ plan/shapes.py
def _narrow_heads_config():
    """A Llama whose attention is narrower than its width: 4 heads of 8 (q 32 wide) and 2 KV heads (16 wide)."""
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=50, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, head_dim=8, tie_word_embeddings=False)


def test_shape_from_a_config_with_narrow_heads_by_hand() -> None:
    """Catches the config's ``head_dim`` and ``num_key_value_heads`` replaced by hidden / heads and heads."""
    from r3_rl.plan.shapes import shape_from_config

    shape = shape_from_config(_narrow_heads_config(), "hand")
    assert (shape.heads, shape.kv_heads, shape.head_dim) == (4, 2, 8)
    # a layer: q 64x32 + k, v 64x16 + o 32x64 + gate, up, down 3 x 64x96 + 2 norms of 64 = 24,704
    assert shape.largest_layer == 24704 and shape.largest_weight == 64 * 96
    # embeddings 50 x 64, 2 layers, the final norm, an untied head 50 x 64
    assert shape.params == 3200 + 2 * 24704 + 64 + 3200 == shape.params_trained


def test_lora_parameters_of_narrow_heads_by_hand_and_against_peft() -> None:
    """Catches o_proj sized (hidden, hidden) and k_proj sized like q_proj: both differ from the truth only when the
    attention is narrower than the model.  Peer: peft's adapters on the same Llama."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    from r3_rl.plan.shapes import shape_from_config

    shape = shape_from_config(_narrow_heads_config(), "hand")
    # r = 2 per layer: q 2(64 + 32), k and v 2(64 + 16), o 2(32 + 64), gate/up/down 2(64 + 96)
    assert shape.lora_params(2, "o_proj") == 2 * 192
    assert shape.lora_params(2, ["k_proj"]) == 2 * 160
    assert shape.lora_params(2, "all-linear") == 2 * (192 + 160 + 160 + 192 + 3 * 320) == 3328
    torch.manual_seed(0)
    for targets in (["o_proj"], ["k_proj", "v_proj"], ["q_proj", "down_proj"]):
        model = get_peft_model(LlamaForCausalLM(_narrow_heads_config()), LoraConfig(r=2, target_modules=targets))
        assert shape.lora_params(2, targets) == sum(p.numel() for p in model.parameters() if p.requires_grad)
    # a MoT shape (BAGEL): a name, or its generation expert's name, stands for both experts' copies
    mot = replace(shape, params_llm=1)
    assert mot.lora_params(2, ["o_proj_moe_gen"]) == mot.lora_params(2, ["o_proj"]) == 2 * 2 * 192


def test_builtin_janus_decoder_width_is_the_first_channel_multiplier() -> None:
    """Catches the VQ decoder's full-resolution width read from the last multiplier (128 x 4) instead of the first
    (JanusVQVAEConfig: base 128, multipliers 1, 1, 2, 2, 4; the highest-resolution block has 128 channels)."""
    from transformers import JanusConfig

    from r3_rl.plan.shapes import BUILTIN, shape_from_config

    shape = shape_from_config(JanusConfig(**BUILTIN["deepseek-community/Janus-Pro-1B"]), "hand")
    assert (shape.vq_channels, shape.image_side, shape.image_tokens, shape.vision_tokens) == (128, 384, 576, 576)


def test_lora_on_a_tiny_mot_policy_counts_both_experts_adapters() -> None:
    """``policy.tiny.experts: modality``: a target name stands for its text and image copies, and the learner adapts
    both (:func:`r3_rl.learner.lora.lora_targets`), so the plan must count twice a shared model's adapters.  Peer:
    the adapters ``apply_lora`` puts on the built policy."""
    from r3_rl.config import LoraCfg, load_recipe
    from r3_rl.learner.lora import apply_lora
    from r3_rl.plan.shapes import model_shape
    from r3_rl.policy.registry import build_policy

    for experts in ("shared", "modality"):
        recipe = load_recipe(REPO / "recipes" / "tiny_blocks.yaml", [
            f"policy.tiny.experts={experts}", "policy.tiny.hidden_size=64", "policy.tiny.intermediate_size=96",
            "policy.tiny.num_heads=2"])
        policy = build_policy(recipe)
        apply_lora(policy, LoraCfg(r=4, target_modules=["q_proj", "v_proj"]))
        trained = sum(p.numel() for p in policy.model.parameters() if p.requires_grad)
        # q and v: 4 x (64 + 64) each, per layer, per copy
        assert model_shape(recipe).lora_params(4, ["q_proj", "v_proj"]) == trained == (
            2 * 4 * 128 * recipe.policy.tiny.num_layers * (2 if experts == "modality" else 1))


# ------------------------------------------------------------------------------------------------ plan/bagel_shape.py
def _bagel(name: str = "ByteDance-Seed/BAGEL-7B-MoT", **options):
    from r3_rl.plan.bagel_shape import bagel_shape

    return bagel_shape(SimpleNamespace(policy=SimpleNamespace(model=name, options=options)))


def test_bagel_shape_sde_steps_decode_chunk_experts_and_frozen_tables() -> None:
    """Catches the edit's SDE steps read from ``gen_sde_count``, the FLUX VAE given Janus' decode chunk (0) instead
    of all images of a call (-1), "active" parameters counting both experts, the frozen sin-cos tables counted as
    trained, and a built-in checkpoint's name given as a missing path not recognised."""
    shape = _bagel("/nowhere/BAGEL-7B-MoT", gen_sde_count=2, edit_sde_count=3)
    assert shape.source == ("built-in shape of ByteDance-Seed/BAGEL-7B-MoT (its published configs; "
                            "/nowhere/BAGEL-7B-MoT is not on this machine)")
    assert (shape.gen_sde_steps, shape.edit_sde_steps, shape.decode_chunk, shape.flow) == (2, 3, -1, True)
    # Qwen2-7B's 7.6 B parameters pass a token; both experts' 14.1 B are weights (the module docstring's figures)
    assert 7.5e9 < shape.params_active < 7.7e9 and 14.0e9 < shape.params_llm < 14.2e9
    # frozen: the ViT (train_vit off), the VAE, and the 64 x 64 latent and 70 x 70 ViT position tables of width 3584
    from r3_rl.plan.bagel_shape import FLUX_BLOCKS, FLUX_WIDTHS
    from r3_rl.policy.bagel.vae import build_flux_vae, flux_kwargs

    vae = sum(p.numel() for p in build_flux_vae(flux_kwargs(FLUX_WIDTHS, FLUX_BLOCKS)).parameters())
    assert shape.params - shape.params_trained - shape.params_vision == vae + (64 * 64 + 70 * 70) * 3584
    # a checkpoint's own ae.safetensors: its count and decoder width, not FLUX.1's
    from r3_rl.plan.bagel_shape import bagel_shape_from_config
    from r3_rl.policy.bagel.config import published_config
    from r3_rl.policy.bagel.recipe import bagel_options

    own = bagel_shape_from_config(published_config(), bagel_options({}), "hand", vae_params=1000, vae_channels=64)
    assert (own.vq_channels, own.params) == (64, shape.params - vae + 1000)


# ------------------------------------------------------------------------------------------------ plan/reward_models.py
def test_geneval_reads_its_clip_backend_from_clip_backend() -> None:
    """Catches geneval's ``clip_backend`` read as ``backend`` (the ``clip`` reward's name for it)."""
    from r3_rl.plan import reward_models as rm

    roles = [m.role for m in rm.models_of(SimpleNamespace(name="geneval", options={"clip_backend": "open_clip"}))]
    assert roles == ["CLIP (open_clip)", "geneval detector (mask2former)"]
    roles = [m.role for m in rm.models_of(SimpleNamespace(name="geneval", options={"backend": "open_clip"}))]
    assert roles == ["geneval detector (mask2former)", "CLIP"]
    assert [m.role for m in rm.models_of(SimpleNamespace(name="clip", options={"backend": "open_clip"}))] == [
        "CLIP (open_clip)"]


def test_a_local_reward_model_with_a_broken_config_is_not_counted_rather_than_a_crash(tmp_path: Path) -> None:
    """A folder whose config.json is not JSON (a ValueError) is a model the plan cannot size: listed, not raised."""
    import torch
    from safetensors.torch import save_file

    from r3_rl.plan import reward_models as rm

    folder = tmp_path / "clip"
    folder.mkdir()
    save_file({"w": torch.zeros(4, 4)}, str(folder / "model.safetensors"))
    (folder / "config.json").write_text("{not json")
    got = rm.models_of(SimpleNamespace(name="clip", options={"model": str(folder)}))
    assert [(m.model, m.params, m.sized_from) for m in got] == [(str(folder), None, "not on this machine")]


# ------------------------------------------------------------------------------------------------ plan/report.py
def _recipe(**learner):
    """The round-9 learner recipe (2 segments a micro-batch, float32, KL on images), with ``learner`` changed."""
    from test_exact_plan_report_files import _learner_recipe

    recipe = _learner_recipe()
    for k, v in learner.items():
        setattr(recipe.learner, k, v)
    return recipe


def test_a_process_peaks_at_its_largest_phase_in_total_not_its_largest_part() -> None:
    from r3_rl.plan.report import Process

    p = Process("w", 1.0, resident={"weights": 1.0}, phases={"a": {"x": 5.0, "y": 5.0}, "b": {"x": 8.0}})
    assert p.peak_phase() == ("a", {"x": 5.0, "y": 5.0}) and p.total == 11.0


def test_learner_phase_by_hand_override_ppo_reference_forward_and_logits() -> None:
    """Catches the advice's micro-batch override ignored, the critic's forward counted per CFG row, the KL
    reference's no-grad forward left out of the backward temporaries, the logit chunk taken from the worst stage
    instead of the largest, and the other checkpointing setting's figure computed with the same setting."""
    from r3_rl.plan.report import Process, add_learner

    shape = _shape(params=3 * 10 ** 9, largest_weight=10)
    # worst stage: refine, 2 rows x (96 + 6 + 30 + 4 - 1) = 135 shifted positions a row
    one = add_learner(Process("t", 1.0), _recipe(), shape, micro_batch=1)
    assert one.phases["learner micro-batch"]["activations"] == 1 * 2 * 135 * 13 * 4 * 64
    ppo = add_learner(Process("t", 1.0), _recipe(algorithm="ppo"), shape)
    # + the critic over each of the 2 segments' 132-position contexts, once per segment
    assert ppo.phases["learner micro-batch"]["activations"] == (540 + 2 * 132) * 13 * 4 * 64
    off = add_learner(Process("t", 1.0), _recipe(gradient_checkpointing=False), shape)
    phase = off.phases["learner micro-batch"]
    # float32 layer: (8 + 24) x 64 + 2 x 4 x 64 + 4 x 4 x 128 = 4,608 bytes a token; backward 2 x 4 x 10 + 0.25 x
    # 4,608 x 540 = 622,160; the reference's forward 540 x (3 x 128 + 5 x 64) x 4 = 1,520,640 is larger
    assert phase["activations"] == 540 * (4 * 4608 + 2 * 4 * 64)
    assert phase["backward temporaries"] == 540 * 704 * 4
    # logits: the reflect stage's 30 text tokens x 100 words x 4 bytes x 4 (no top-p), not refine's 4 x 10 x 16
    assert phase["logits"] == 30 * 100 * 4 * 4
    big = add_learner(Process("t", 1.0), _recipe(), shape, micro_batch=1000)
    # 1000 x 2 x 135 = 270,000 tokens: checkpointed 0.9 GB; without, 270,000 x (4 x 4,608 + 512) = 5.1 GB
    assert big.notes["activations"] == "1000 refine segment(s) x 2 x 136 tokens, checkpointing on (off: 5.1 GB)"


def test_the_worst_stage_is_the_most_rows_times_positions() -> None:
    """Catches the learner's worst stage chosen by positions alone: a 1-row generate of 200 positions beats a
    2-row refine of 136 only on positions; 2 x 136 = 272 is more."""
    from r3_rl.plan.report import Process, add_learner

    recipe = _recipe()
    recipe.rollout.reason.max_new_tokens = 100
    recipe.rollout.generate.cfg_scale = 1.0
    p = add_learner(Process("t", 1.0), recipe, _shape(params=3 * 10 ** 9))
    assert p.notes["activations"].startswith("2 refine segment(s) x 2 x 136 tokens")


def test_stages_count_a_cfg_row_for_a_scale_below_one() -> None:
    """Catches ``cfg_scale > 1.0`` for ``!= 1.0``: any scale but one runs the null stream."""
    from r3_rl.plan.report import stages

    recipe = _recipe()
    recipe.rollout.generate.cfg_scale = 0.5
    assert [s.rows for s in stages(recipe, _shape())] == [1, 2, 1, 2]


def test_learner_positions_rescore_each_flow_images_own_sde_steps() -> None:
    """Catches an edit's positions multiplied by the generation's SDE steps: BAGEL rescores ``gen_sde_count``
    steps of a generated image and ``edit_sde_count`` of an edited one, each over all its latent positions."""
    from r3_rl.plan.memory import Stage
    from r3_rl.plan.report import learner_positions

    flow = _shape(flow=True, gen_sde_steps=2, edit_sde_steps=3)
    assert learner_positions(Stage("generate", 10, 4, 2, 10, False), flow) == 10 + 2 * 4
    assert learner_positions(Stage("refine", 10, 4, 2, 10, False), flow) == 10 + 3 * 4
    assert learner_positions(Stage("reflect", 10, 4, 1, 100, False), flow) == 14
    assert learner_positions(Stage("refine", 10, 4, 2, 10, False), replace(flow, flow=False)) == 14  # Janus: once


def test_flow_sampling_notes_give_the_kv_bytes_a_position_and_the_cfg_rows() -> None:
    from r3_rl.plan.report import Process, add_sampling

    shape = _shape(flow=True, image_side=16, vq_channels=4)
    p = add_sampling(Process("w", 1.0), _recipe(), shape, 2, "sampling")
    # keys and values of 4 layers x 4 heads x 16 x 4 bytes = 2,048 bytes a position
    assert p.notes["KV cache"].startswith("every row's context + image positions, 2 KB a position")
    phase = next(k for k in p.phases if k.startswith("sampling"))
    rows = int(phase.split(" x ")[1].split()[0])
    assert p.notes["KV cache"].endswith(f" ({rows} CFG rows)") == (rows > 1)
    assert p.notes["VAE decode"] == "4-byte FLUX decoder, all images of a call at once"


def test_reward_models_the_plan_cannot_size_add_no_resident_bytes_or_notes() -> None:
    from r3_rl.plan.report import Process, add_reward_models

    p = add_reward_models(Process("t", 1.0), [SimpleNamespace(name="clip", options={"backend": "open_clip"})])
    assert [m.params for m in p.reward_models] == [None]
    assert "reward models" not in p.resident and "reward models" not in p.notes


def test_offload_needs_a_zero_stage() -> None:
    from r3_rl.plan.report import offloads_optimizer

    cfg = SimpleNamespace(deepspeed=SimpleNamespace(config={"zero_optimization": {"offload_optimizer": {"device": "cpu"}}}))
    assert [offloads_optimizer(cfg, z) for z in (None, 0, 1, 2)] == [False, False, True, True]


def test_make_plan_sizes_sampling_by_the_group_and_reward_workers_by_their_count(monkeypatch: pytest.MonkeyPatch) -> None:
    """Catches the rollout's segments per call taken as groups_per_task alone (not x tree.group_size), four reward
    workers a GPU counted for one worker at 0.25 GPU, and exactly enough GPUs refused."""
    from r3_rl.config import load_recipe
    from r3_rl.gpu_layout import actor_gpus
    from r3_rl.plan.report import make_plan

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    recipe = load_recipe(REPO / "recipes" / "grpo_geneval.yaml", [
        "rollout.reward_workers=1", "rollout.gpus_per_reward_worker=0.25", "tree.group_size=3",
        "rollout.groups_per_task=2"])
    plan = make_plan(recipe, actor_gpus(recipe), 80.0, _shape(params=10 ** 6, image_side=8, vq_channels=2))
    procs = {p.name: p for p in plan.processes}
    assert procs["reward worker"].per_gpu == 1
    assert any(k.startswith("sampling (") and ": 6 x " in k for k in procs["rollout worker"].phases)
    assert plan.errors == [] and plan.gpus_needed == actor_gpus(recipe)



def test_the_trainers_cpu_copy_of_the_policy_is_only_for_a_gpu_policy(monkeypatch: pytest.MonkeyPatch) -> None:
    """Catches the host's extra full copy counted for a policy already on the CPU (nothing to copy off a GPU)."""
    from r3_rl.config import load_recipe
    from r3_rl.plan.report import host_memory

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    key = "the trainer's CPU copy during a full sync"
    gpu = load_recipe(REPO / "recipes" / "grpo_geneval.yaml", ["rollout.backend=ray", "policy.device=cuda"])
    assert host_memory(gpu, _shape(params=1000))[key] == 2 * 1000  # bf16
    cpu = load_recipe(REPO / "recipes" / "grpo_geneval.yaml", ["rollout.backend=ray", "policy.device=cpu"])
    assert key not in host_memory(cpu, _shape(params=1000))

# ------------------------------------------------------------------------------------------------ plan/render.py
def _rendered(processes, shape=None, host=None, errors=()):
    from test_exact_plan_and_checkpoint import _plan

    plan = _plan(processes, gpus=1, needed=1)
    plan.recipe = SimpleNamespace(name="r14", policy=SimpleNamespace(dtype="bfloat16", device="cuda"),
                                  ray=SimpleNamespace(address=None, object_store_gb=None))
    plan.shape, plan.host, plan.errors = shape or _shape(), host or {}, list(errors)
    return plan


def test_advice_lines_name_the_fullest_gpu_not_the_emptiest() -> None:
    from r3_rl.plan.render import _line
    from r3_rl.plan.report import Process

    plan = _rendered([Process("rollout worker", 1, {"w": 30e9}), Process("learner rank", 1, {"w": 50e9}),
                      Process("trainer process", 0, {"w": 1.0})])
    assert _line({"eval.batch_size": 2}, plan) == "eval.batch_size: 2  -> fullest GPU 50.0 GB"


def test_render_lists_the_other_phases_the_mot_line_small_host_parts_and_errors() -> None:
    """Catches the peak phase listed among the "other phases", the MoT line's both-experts figure taken from the
    active parameters, a host part of exactly 0.05 GB shown in MB, and a layout error reported as "does not fit"."""
    from r3_rl.plan.render import render
    from r3_rl.plan.report import Process

    trainer = Process("trainer process", 1, {"weights": 1e9},
                      phases={"eval sampling (x)": {"a": 2e9}, "VQ decode (8 images at a time)": {"b": 0.5e9}})
    shape = _shape(params_llm=14 * 10 ** 9, params_active=7 * 10 ** 9)
    lines = render(_rendered([trainer], shape=shape, host={"pinned": 5e7, "tiny": 4.9e7})).splitlines()
    assert ("       Mixture-of-Transformers language model: 14.00 B parameters (both experts: what weights, "
            "gradients and optimiser state count), 7.00 B per token") in lines
    assert "  + largest phase: eval sampling (x)" in lines
    assert "    (other phases: VQ decode 0.5 GB)" in lines
    assert "host (CPU) memory of the node beyond the processes: 0.1 GB (pinned 0.1; tiny 49.0 MB)" in lines
    lines = render(_rendered([trainer], errors=["bad layout"])).splitlines()
    assert lines[-2:] == ["error: bad layout", "verdict: will not run as configured"]


def test_advice_never_proposes_more_ranks_under_zero0() -> None:
    """Catches ``learner.ranks`` advised under ZeRO-0, which shards nothing: more ranks save no memory."""
    from r3_rl.plan.render import _candidates

    learner = SimpleNamespace(gradient_checkpointing=True, micro_batch_size=1, ranks=2, backend="deepspeed",
                              deepspeed=SimpleNamespace(zero_stage=0), gpus_per_rank=1.0, lora=None)
    recipe = SimpleNamespace(learner=learner, eval=SimpleNamespace(batch_size=1),
                             rollout=SimpleNamespace(groups_per_task=1, backend="local", workers=0, gpus_per_worker=1.0))
    assert _candidates(SimpleNamespace(recipe=recipe, gpus=8)) == [("learner.lora", [{"r": 16}])]
    learner.deepspeed.zero_stage = 1
    assert dict(_candidates(SimpleNamespace(recipe=recipe, gpus=8)))["learner.ranks"] == [3, 4, 5, 6, 7, 8]


# ------------------------------------------------------------------------------------------------ plan/validate.py
def test_validate_parts_use_top_p_logits_and_float32_sampling(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Catches the harness's learner logits sized without top-p (its SamplingParams have top_p 0.95: 9 float32
    temporaries, not 4), the KL reference's forward left out, and its float32 sampling sized in 2-byte elements."""
    import torch
    from transformers import AutoConfig

    from r3_rl.plan import validate
    from r3_rl.plan.shapes import shape_from_config
    from r3_rl.policy.janus import JanusPolicy

    torch.set_num_threads(1)
    path = validate.janus_shaped(tmp_path / "j", 128, 1, 2)
    shape = shape_from_config(AutoConfig.from_pretrained(path), "validation")
    # a reference forward larger than the backward's temporaries (long contexts) is the part's size
    monkeypatch.setattr(validate.memory, "forward_temporaries", lambda *a: 1e15)
    learner = validate.learner_check(path, shape, False, 1)
    assert learner.parts["backward / reference forward"] == 1e15
    # a refine segment's 4 new tokens (2 x 2 grid), the 16,384-entry codebook, float32, top-p: 9 temporaries
    assert learner.parts["logits"] == 4 * 16384 * 4 * 9
    check = validate.sampling_check(path, shape, 1)
    policy = JanusPolicy.from_pretrained(path, templates=validate.TEMPLATES)
    context = len(policy._ids("generate", {"prompt": "a photo of a red cat next to a blue dog", "plan": ""}, False,
                              True))
    # 2 CFG rows x (context + 4 image tokens) x 1 layer x (K, V) x 1 head x 128 x 4 bytes
    assert check.parts["KV cache"] == 2 * (context + 4) * 2 * 128 * 4


# ------------------------------------------------------------------------------------------------ plan/measure.py
def test_measured_peak_orders_memory_events_by_time(monkeypatch: pytest.MonkeyPatch) -> None:
    """The profiler's events need not come in time order: a free listed before its allocation must not hide the
    peak.  A fake profiler hands out 100 bytes at t=1, frees them at t=2 and takes 50 at t=3 (listed out of
    order, with a non-memory event): the peak is 100."""
    import torch.profiler

    from r3_rl.plan.measure import measured_peak

    def event(name, start, nbytes):
        return SimpleNamespace(name=lambda: name, start_ns=lambda: start, nbytes=lambda: nbytes)

    events = [event("[memory]", 2, -100), event("aten::add", 0, 999), event("[memory]", 3, 50),
              event("[memory]", 1, 100)]

    class FakeProfile:
        def __init__(self, **kw):
            self.profiler = SimpleNamespace(kineto_results=SimpleNamespace(events=lambda: events))

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    monkeypatch.setattr(torch.profiler, "profile", FakeProfile)
    assert measured_peak(lambda: "done") == ("done", 100)
