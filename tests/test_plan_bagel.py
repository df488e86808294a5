"""``r3-rl plan`` on BAGEL: the built-in BAGEL-7B-MoT shape against a hand count from its published configs, a
local checkpoint folder's shape against the real (tiny) model, CPU-offloaded model states against DeepSpeed's own
estimators, and the shipped recipe planned offline."""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from r3_rl.cli import main
from r3_rl.config import load_recipe
from r3_rl.errors import UserError
from r3_rl.plan import memory
from r3_rl.plan.bagel_shape import bagel_shape
from r3_rl.plan.report import make_plan

REPO = Path(__file__).resolve().parents[1]
BAGEL = REPO / "recipes" / "grpo_geneval_bagel.yaml"


def _hand_count_bagel_7b() -> tuple[int, int, int, int]:
    """(ema.safetensors tensors, trainable, LLM, LLM per token) of BAGEL-7B-MoT from its published llm_config.json
    (Qwen2.5-7B), vit_config.json (SigLIP so400m, 26 of 27 layers used) and the loader's constants."""
    h, i, layers, kv, hd, vocab = 3584, 18944, 28, 4 * 128, 128, 152064
    attn = (h * h + h) + 2 * (h * kv + kv) + h * h + 2 * hd  # q, k, v with bias; o without; q/k RMSNorms
    expert_layer = attn + 3 * h * i + 2 * h  # + SwiGLU MLP + two RMSNorms
    llm = 2 * layers * expert_layer + 2 * vocab * h + 2 * h  # both experts, embed + untied head, two final norms
    v, vi, patches = 1152, 4304, 70 * 70
    vit_layer = 4 * (v * v + v) + (v * vi + vi) + (vi * v + v) + 2 * 2 * v
    vit = 26 * vit_layer + (14 * 14 * 3 * v + v) + patches * v + 2 * v  # patch Linear, positions, post-LN
    heads = (v * h + h) + (h * h + h) + (256 * h + h) + (h * h + h) + (64 * h + h) + (h * 64 + 64)
    tables = patches * h + 64 * 64 * h  # vit_pos_embed, latent_pos_embed (frozen sin-cos)
    return llm + vit + heads + tables, llm + heads, llm, llm - layers * expert_layer - h


def test_builtin_bagel_7b_shape_matches_a_hand_count_of_the_published_configs() -> None:
    shape = bagel_shape(load_recipe(BAGEL))
    file_total, trained, llm, active = _hand_count_bagel_7b()
    assert file_total == 14_607_260_128  # the hub file's 29.21 GB in bf16
    assert shape.params == file_total + 83_819_683  # + FLUX.1's VAE (ae.safetensors)
    assert shape.params_trained == trained  # ViT, VAE and the sin-cos tables frozen (train_vit: false)
    assert (shape.params_llm, shape.params_active) == (llm, active)
    assert shape.params_llm > 1.85 * shape.params_active  # MoT: the layers' weights twice
    assert "built-in shape of ByteDance-Seed/BAGEL-7B-MoT" in shape.source
    assert shape.image_tokens == (512 // 16) ** 2 and shape.edit_tokens == (512 // 16) ** 2 + 2
    assert shape.vision_tokens == 36 * 36 and shape.image_cfg_rows == 1 and shape.flow


def test_a_local_bagel_folder_gives_the_real_models_count(tmp_path: Path) -> None:
    import torch

    from r3_rl.policy.bagel.checkpoint import load_bagel
    from r3_rl.policy.bagel.tiny import make_tiny_bagel

    path = make_tiny_bagel(tmp_path / "tiny", hidden_size=64, num_layers=3)
    shape = bagel_shape(load_recipe(BAGEL, [f"policy.model={path}"]))
    loaded = load_bagel(path, dtype=torch.float32)
    model = loaded.model
    tables = sum(t.numel() for n, t in model.named_buffers() if n.endswith("pos_embed"))
    real = sum(p.numel() for p in model.parameters()) + tables + sum(p.numel() for p in loaded.vae.parameters())
    assert shape.params == real and "llm_config.json" in shape.source
    assert (shape.hidden, shape.layers) == (64, 3)
    assert shape.vq_channels == loaded.vae.autoencoder.decoder.conv_out.in_channels  # the tiny VAE's 32
    vit = sum(p.numel() for p in model.vit_model.parameters())
    assert shape.params_trained == sum(p.numel() for p in model.parameters()) - vit
    gen = sum(p.numel() for n, p in model.named_parameters() if "moe_gen" in n)
    assert shape.params_active == sum(p.numel() for p in model.language_model.parameters()) - gen


def test_an_unknown_bagel_model_is_a_one_line_error() -> None:
    with pytest.raises(UserError, match="not a BAGEL checkpoint folder.*ByteDance-Seed/BAGEL-7B-MoT"):
        bagel_shape(load_recipe(BAGEL, ["policy.model=/nowhere/SomethingElse"]))


@pytest.mark.parametrize("params, ranks", [(14_691_079_811, 4), (1_234_567_891, 3)])
def test_offloaded_model_states_equal_deepspeeds_own_estimators(params: int, ranks: int) -> None:
    """offload_optimizer: {device: cpu}: GPU and CPU bytes = estimate_zero2/3_model_states_mem_needs(cpu_offload),
    plus under ZeRO-2 what that estimator leaves out and the engine allocates on the accelerator in mixed precision
    (the rank's fp32 gradient partition, a bf16 staging buffer of the largest weight: the test below)."""
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    shape = replace(bagel_shape(load_recipe(BAGEL)), params=params, largest_layer=params // 20)
    z2 = memory.model_states(shape, weight_bytes=2, trained=params, zero_stage=2, ranks=ranks, offload=True)
    z3 = memory.model_states(shape, weight_bytes=2, trained=params, zero_stage=3, ranks=ranks, offload=True)
    cpu2, gpu2 = estimate_zero2_model_states_mem_needs(params, num_gpus_per_node=ranks, cpu_offload=True)
    cpu3, gpu3, _ = estimate_zero3_model_states_mem_needs(params, params // 20, num_gpus_per_node=ranks,
                                                          cpu_offload=True, cpu_offload_params=False,
                                                          zero_init=True)
    staging = 4 * params / ranks + 2 * shape.largest_weight
    assert sum(z2.values()) == pytest.approx(gpu2 + staging, abs=2) and sum(z3.values()) == pytest.approx(gpu3, abs=2)
    # DeepSpeed counts the whole node's CPU memory (ZeRO-3: 18 bytes/param with zero_init, ZeRO-2: 16 + 2 bf16)
    assert memory.offloaded_states(params, 2, ranks) * ranks == pytest.approx(16 * params)
    assert cpu3 >= memory.offloaded_states(params, 2, ranks) * ranks


@pytest.mark.parametrize("zero_stage", [1, 2])
def test_offload_keeps_fp32_gradients_on_the_accelerator(zero_stage: int) -> None:
    """Peer for the plan's offload gradients: DeepSpeed itself, bf16 with fp32 accumulation and offload_optimizer.
    After a backward ZeRO-2 holds an fp32 buffer the size of the rank's partition, ZeRO-1 a full-size fp32
    ``grad_accum`` on every trained weight (here the CPU is the accelerator; on a GPU it is GPU memory)."""
    pytest.importorskip("deepspeed")
    import torch
    from learner_helpers import learner_cfg

    from r3_rl.learner.deepspeed_learner import DeepSpeedOptim

    lin = torch.nn.Linear(64, 48).to(torch.bfloat16)
    cfg = learner_cfg(backend="deepspeed", micro_batch_size=4, deepspeed={
        "zero_stage": zero_stage, "dtype": "bf16",
        "config": {"zero_optimization": {"offload_optimizer": {"device": "cpu"}}}})
    opt = DeepSpeedOptim({"policy": lin}, cfg)
    x = torch.randn(4, 64).bfloat16()
    opt.backward(opt.forward(lambda: (lin(x).float().pow(2).mean(), {}, []))[0])
    opt.backward(opt.forward(lambda: (lin(x).float().pow(2).mean(), {}, []))[0])  # a second micro-batch
    if zero_stage == 2:
        flat = [getattr(g, "flat_partition", None) for g in opt.engine.optimizer.averaged_gradients.values()]
        assert [(t.dtype, t.numel(), t.device.type) for t in flat] == [(torch.float32, 64 * 48 + 48, "cpu")]
    else:
        accum = [getattr(p, "grad_accum", None) for p in lin.parameters()]
        assert [(t.dtype, t.shape) for t in accum] == [(torch.float32, p.shape) for p in lin.parameters()]


@pytest.mark.parametrize("zero_stage, dtype, offload, overlap", [
    (1, "bf16", False, False), (1, "bf16", True, False), (1, "fp32", False, False), (2, "bf16", False, False),
    (2, "bf16", True, True), (2, "fp32", False, True)])
def test_the_reduction_bucket_is_what_deepspeed_allocates(zero_stage: int, dtype: str, offload: bool,
                                                          overlap: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """Peer for the plan's reduction bucket: the buffers DeepSpeed's ZeRO-1/2 optimiser allocates at a backward
    (reduce_bucket_size elements whatever the model's size; fp32 under ZeRO-1, the weights' dtype under ZeRO-2,
    twice with overlap_comm; none for ZeRO-1's BF16_Optimizer)."""
    pytest.importorskip("deepspeed")
    import torch
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer
    from learner_helpers import learner_cfg

    from r3_rl.learner.deepspeed_learner import DeepSpeedOptim

    seen: list[int] = []
    real = DeepSpeedZeroOptimizer.setup_buckets

    def spy(self):  # noqa: ANN001, ANN202
        real(self)
        seen.append(sum(t.numel() * t.element_size() for b in self.ipg_buckets.values() for t in b.buffer))
    monkeypatch.setattr(DeepSpeedZeroOptimizer, "setup_buckets", spy)
    zero = {"reduce_bucket_size": 1000, "overlap_comm": overlap}
    if offload:
        zero["offload_optimizer"] = {"device": "cpu"}
    config = {"zero_optimization": zero}
    lin = torch.nn.Linear(64, 48).to(torch.bfloat16 if dtype == "bf16" else torch.float32)
    opt = DeepSpeedOptim({"policy": lin}, learner_cfg(backend="deepspeed", micro_batch_size=4, deepspeed={
        "zero_stage": zero_stage, "dtype": dtype, "config": config}))
    x = torch.randn(4, 64).to(lin.weight.dtype)
    opt.backward(opt.forward(lambda: (lin(x).float().pow(2).mean(), {}, []))[0])
    planned = memory.reduction_bucket(zero_stage, 2 if dtype == "bf16" else 4, offload, config)
    assert (seen[-1] if seen else 0) == planned


def test_the_shipped_bagel_recipe_is_planned_offline_and_fits_8_gpus_of_80gb(capsys: pytest.CaptureFixture) -> None:
    assert main(["plan", str(BAGEL), "--gpus", "8", "--gpu-memory", "80"]) == 0
    out = capsys.readouterr().out
    for part in ("Mixture-of-Transformers", "offloaded", "reference", "activations", "KV cache", "VAE decode",
                 "refine: 16 x 3 rows", "the trainer process (alone on a spare GPU", "verdict: fits"):
        assert part in out, part
    plan = make_plan(load_recipe(BAGEL), 8, 80)
    learner = plan.processes[0]
    assert learner.resident["master weights"] == learner.resident["optimizer (Adam)"] == 0.0  # on CPU
    # ZeRO-2 over 4 ranks (ZeRO-3 is refused with ranks > 1): whole bf16 weights + the rank's fp32 gradient
    # partition (DeepSpeed accumulates there before the copy to CPU) + 1 segment; no KL reference
    assert "DeepSpeed ZeRO-2, 4 rank(s)" in out and "1 refine segment(s) x 3 x 3828 tokens" in out
    assert learner.resident["weights"] == pytest.approx(29.38e9, rel=1e-3) and learner.resident["reference"] == 0
    assert learner.resident["gradients"] == pytest.approx(4 * 14.172e9 / 4 + 2 * bagel_shape(
        load_recipe(BAGEL)).largest_weight, rel=1e-3)
    assert learner.resident["reduction bucket"] == 2 * 500e6  # DeepSpeed's default bucket, bf16 under ZeRO-2
    assert learner.total == pytest.approx(55.4e9, rel=2e-3) and learner.total <= 0.9 * 80e9
    # the reference's KL 1e-3 adds its frozen copy: over on 80 GB GPUs, fits on 141 GB ones
    kl = ["learner.kl_coef_text=1e-3", "learner.kl_coef_image=1e-3"]
    assert not make_plan(load_recipe(BAGEL, kl), 8, 80).fits and make_plan(load_recipe(BAGEL, kl), 8, 141).fits
    # without the offload the optimiser state stays on the GPU and the learner rank no longer fits
    on_gpu = make_plan(load_recipe(BAGEL, ["learner.deepspeed.config={}"]), 8, 80)
    assert not on_gpu.fits and on_gpu.processes[0].total > learner.total + 40e9
    # 7 GPUs: no spare one, the trainer shares GPU 0 with an actor and it does not fit
    assert not make_plan(load_recipe(BAGEL), 7, 80).fits


def test_every_sde_step_an_image_trains_counts_in_the_learners_activations() -> None:
    """R3 trains 1 SDE step per image; Flow-GRPO-style recipes train several, all rescored in one forward
    against the image's context (tests/test_bagel_policy.py checks that forward).  The refine segment's learner
    positions: 2804 context + 1024 latent positions per step, 3 CFG rows; activations in proportion."""
    base = make_plan(load_recipe(BAGEL), 8, 80).processes[0]
    sets = ["policy.options.gen_sde_count=4", "policy.options.edit_sde_count=4"]
    four = make_plan(load_recipe(BAGEL, sets), 8, 80).processes[0]
    assert "1 refine segment(s) x 3 x 3828 tokens, checkpointing on" in base.notes["activations"]
    assert "1 refine segment(s) x 3 x 6900 tokens (4 SDE steps), checkpointing on" in four.notes["activations"]
    act = lambda p: p.phases["learner micro-batch"]["activations"]  # noqa: E731
    assert act(four) / act(base) == pytest.approx((6900 - 1) / (3828 - 1), rel=1e-9)
    assert four.total > base.total + 4e9  # 5.0 -> 9.1 GB of activations
    # sampling is unchanged: a denoising step is one forward whichever steps are stochastic
    assert make_plan(load_recipe(BAGEL, sets), 8, 80).processes[1].total == make_plan(
        load_recipe(BAGEL), 8, 80).processes[1].total


def test_the_plan_counts_the_nodes_host_memory() -> None:
    """BAGEL (14.69 B parameters, 14.17 B trained, bf16, 4 ranks, offload): 4 ranks x 16 bytes x 14.17 B / 4 of
    offloaded states; in the object store the pinned full state (29.4 GB) and rank 0's trained weights on their
    way to the mirror (28.3 GB); the trainer's CPU copy of its weights during a full sync.  Janus-Pro-7B with LoRA
    r 64 on q/k/v/o (30 layers, width 4096): the adapters (62.9 M) sit beside the full state, bf16 in the driver
    (the learner's dtype under DeepSpeed) and from rank 0.  With 4 ranks and KL the trainer's reference is in host
    memory, not on its GPU."""
    plan = make_plan(load_recipe(BAGEL), 8, 80)
    assert {k: round(v / 1e9, 1) for k, v in plan.host.items()} == {
        "offloaded optimiser states": 226.8, "Ray object store": 57.7, "the trainer's CPU copy during a full sync": 29.4,
        "the trainer's parent buffer, full": 3.2, "the trainer's eval chains": 5.2}  # tests/test_plan_host_images.py
    lora = make_plan(load_recipe(REPO / "recipes" / "grpo_geneval_7b.yaml"), 8, 80)
    adapters = 30 * 4 * 64 * (4096 + 4096)
    assert lora.host["Ray object store"] == pytest.approx(2 * lora.shape.params + (2 + 2) * adapters)
    assert lora.host["the trainer's CPU copy during a full sync or a LoRA export"] == 2 * lora.shape.params
    janus = make_plan(load_recipe(REPO / "recipes" / "grpo_geneval.yaml"), 8, 80)  # 4 ranks, KL, full fine-tune
    trainer = next(p for p in janus.processes if p.name == "trainer process")
    assert trainer.resident["reference"] == 0 and janus.host["the trainer's KL reference"] == 2 * janus.shape.params


def test_lora_adapts_both_experts_and_the_plan_counts_them(tmp_path: Path) -> None:
    """BAGEL's image actions train the generation expert only and its text actions the understanding expert only
    (``expert_isolation``), so a LoRA target names both experts' copy: ``q_proj`` and ``q_proj_moe_gen``.  With
    adapters on the understanding expert alone (until 2026-12-06) every image-only micro-batch failed its
    backward at step 0 (the run test: tests/test_bagel_recipe.py's LoRA variant).  The plan counts the adapters
    of both, as peft makes them."""
    from r3_rl.learner.lora import apply_lora
    from r3_rl.policy.bagel.tiny import make_tiny_bagel
    from r3_rl.policy.registry import build_policy

    path = make_tiny_bagel(tmp_path / "tiny", hidden_size=64, num_layers=2)
    for targets in ("[q_proj, v_proj]", "[q_proj_moe_gen, gate_proj]", "all-linear"):
        recipe = load_recipe(BAGEL, [f"policy.model={path}", "policy.device=cpu", "policy.dtype=float32",
                                     "policy.options={image_size: 32, gen_steps: 6, edit_steps: 6, ode_steps: 4, "
                                     "vit_size: [32, 16, 4], vae_size: [32, 16, 16]}",
                                     f"learner.lora={{r: 4, target_modules: {targets}}}"])
        policy = build_policy(recipe)
        adapters = apply_lora(policy, recipe.learner.lora)
        names = [n for n, p in adapters.peft_model.named_parameters() if p.requires_grad]
        trained = sum(p.numel() for p in adapters.peft_model.parameters() if p.requires_grad)
        assert any("_moe_gen." in n or "mlp_moe_gen" in n for n in names), targets
        assert any("_moe_gen" not in n for n in names), targets
        if targets != "all-linear":  # all-linear also adapts BAGEL's connectors and latent heads, which the plan leaves out
            assert bagel_shape(recipe).lora_params(4, recipe.learner.lora.target_modules) == trained, targets
