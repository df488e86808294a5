"""Exact small cases for the memory planner, the doctor's Ray rule and the checkpoint checks -- each one a bug a
mutation audit (round 4, 2026-12-06) slipped past the suite.  Expected values are worked out by hand from what
each component holds (bytes per parameter), from Ray's own resolver, or from what a damaged checkpoint is."""
from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from r3_rl.config import load_recipe
from r3_rl.errors import UserError
from r3_rl.plan import memory
from r3_rl.plan.report import Plan, Process, host_memory, make_plan
from r3_rl.plan.shapes import ModelShape

REPO = Path(__file__).resolve().parents[1]
GENEVAL = REPO / "recipes" / "grpo_geneval.yaml"
B = 10 ** 9


def _shape(params: int = B, largest_weight: int = 10 ** 6, largest_layer: int = 10 ** 7, **kw: int) -> ModelShape:
    sizes = dict(hidden=64, layers=4, heads=4, kv_heads=4, head_dim=16, intermediate=128)
    sizes.update(kw)
    return ModelShape(source="hand", text_vocab=100, image_vocab=10, image_tokens=4, vision_tokens=4, params=params,
                      params_trained=params, params_vision=0, largest_layer=largest_layer,
                      largest_weight=largest_weight, **sizes)


STATES = ("weights", "gradients", "master weights", "optimizer (Adam)")


@pytest.mark.parametrize("bytes_, zero, ranks, want", [
    # torch AdamW, bf16: bf16 weights 2, fp32 gradients 4 (added into the masters' as backward makes them),
    # fp32 masters 4, two fp32 moments 8 -- 18 bytes a parameter, nothing sharded
    (2, None, 4, (2 * B, 4 * B, 4 * B, 8 * B)),
    (4, None, 1, (4 * B, 4 * B, 0, 8 * B)),  # fp32: no master copy, 16 bytes a parameter
    (4, 0, 4, (4 * B, 4 * B, 0, 8 * B)),  # ZeRO-0 shards nothing, whatever the ranks
    # ZeRO-1, bf16 (DeepSpeed's BF16_Optimizer): bf16 + fp32 gradients of the whole model, masters and moments / 4
    (2, 1, 4, (2 * B, 6 * B, 1 * B, 2 * B)),
    (4, 1, 4, (4 * B, 4 * B, 0, 2 * B)),  # ZeRO-1, fp32: only the moments are sharded
    (2, 2, 4, (2 * B, 1.5 * B, 1 * B, 2 * B)),  # ZeRO-2: the gradients (2 + 4 bytes) sharded too
])
def test_model_states_per_component(bytes_: int, zero: int | None, ranks: int, want: tuple) -> None:
    got = memory.model_states(_shape(), weight_bytes=bytes_, trained=B, zero_stage=zero, ranks=ranks)
    assert tuple(got[k] for k in STATES) == pytest.approx(want)


def test_offloaded_zero1_keeps_a_full_fp32_gradient_accumulator_on_the_gpu() -> None:
    """ZeRO-1 + ``offload_optimizer``, bf16, 8 ranks, 7 B trained: the rank's fp32 gradient partition (3.5 GB), a
    bf16 staging buffer of the largest weight, and every weight's whole fp32 ``grad_accum`` (28 GB)."""
    seven, largest = 7 * B, 10 ** 6
    one = memory.model_states(_shape(seven, largest), weight_bytes=2, trained=seven, zero_stage=1, ranks=8, offload=True)
    two = memory.model_states(_shape(seven, largest), weight_bytes=2, trained=seven, zero_stage=2, ranks=8, offload=True)
    assert one["gradients"] == pytest.approx(3.5 * B + 2 * largest + 28 * B)
    assert two["gradients"] == pytest.approx(3.5 * B + 2 * largest)
    assert one["weights"] == two["weights"] == 14 * B
    assert one["master weights"] == one["optimizer (Adam)"] == 0


def test_offloaded_states_in_cpu_memory() -> None:
    """Mixed precision: fp32 masters 4 + fp32 gradients 4 + moments 8 = 16 bytes; fp32 weights: 12 (no masters)."""
    assert memory.offloaded_states(B, 2, 4) == 4 * B
    assert memory.offloaded_states(B, 4, 1) == 12 * B


def test_kv_cache_and_activation_bytes() -> None:
    shape = _shape(layers=2, kv_heads=4, head_dim=16)
    assert memory.kv_cache(shape, rows=3, length=10, b=2) == 3 * 10 * 2 * (2 * 4 * 16) * 2  # keys and values: 15,360
    shape = _shape(hidden=64, layers=4, kv_heads=4, head_dim=16, intermediate=128)
    per_layer = (8 + 6 * 2) * 64 + 2 * 2 * 64 + 4 * 2 * 128  # 2,560 bytes a token, b = 2
    kept, _ = memory.activations(shape, tokens=10, b=2, checkpointing=False)
    assert kept == 10 * (4 * per_layer + 2 * 2 * 64)  # 104,960
    kept, _ = memory.activations(shape, tokens=10, b=2, checkpointing=True)
    assert kept == 10 * (2 * 4 + 5) * 2 * 64  # each layer's input and the few tensors around them: 16,640


def _plan(processes: list[Process], gpus: int, needed: int) -> Plan:
    return Plan(recipe=None, shape=None, gpus=gpus, gpu_memory=80.0, processes=processes, gpus_needed=needed,
                errors=[])


def test_gpu_rows_count_every_process_a_gpu_holds_and_the_trainer_on_the_fullest() -> None:
    """Two learner ranks on each GPU (``gpus_per_rank: 0.5``) hold twice one rank's bytes; with no spare GPU the
    trainer process shares the fullest GPU (the worst case), not the emptiest."""
    ranks = Process("learner rank", per_gpu=2, resident={"weights": 10.0})
    worker = Process("rollout worker", per_gpu=1, resident={"weights": 30.0})
    trainer = Process("trainer process", per_gpu=1, resident={"weights": 5.0})
    assert _plan([ranks, worker, trainer], gpus=2, needed=2).gpu_totals() == [
        ("2 learner ranks", 20.0), ("1 rollout worker + the trainer process (GPU 0, worst case)", 35.0)]
    ranks.resident["weights"] = 20.0
    assert _plan([ranks, worker, trainer], gpus=2, needed=2).gpu_totals() == [
        ("2 learner ranks + the trainer process (GPU 0, worst case)", 45.0), ("1 rollout worker", 30.0)]
    assert _plan([ranks, worker, trainer], gpus=3, needed=2).gpu_totals()[-1] == (
        "the trainer process (alone on a spare GPU: Ray without it)", 5.0)


@pytest.fixture
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def test_lora_needs_no_reference_copy(offline: None) -> None:
    """Under LoRA the KL reference is the base with its adapters off: no second copy of the policy."""
    full = make_plan(load_recipe(GENEVAL, ["learner.kl_coef_text=0.01"]), 8, 80.0)
    lora = make_plan(load_recipe(GENEVAL, ["learner.kl_coef_text=0.01", "learner.lora={r: 16}"]), 8, 80.0)
    rank = {p.name: p for p in full.processes}["learner rank"]  # the recipe's learner: DeepSpeed ranks
    assert rank.resident["reference"] == 2 * full.shape.params  # bf16
    assert {p.name: p for p in lora.processes}["learner rank"].resident["reference"] == 0


def test_a_separate_critic_offloads_a_second_set_of_optimiser_states(offline: None) -> None:
    sets = ["learner.backend=deepspeed", "learner.deepspeed.zero_stage=2",
            "learner.deepspeed.config={zero_optimization: {offload_optimizer: {device: cpu}}}", "learner.algorithm=ppo"]
    head = load_recipe(GENEVAL, sets)
    separate = load_recipe(GENEVAL, sets + ["learner.ppo.critic=separate"])
    trained = make_plan(head, 8, 80.0).shape.params_trained
    assert host_memory(head, make_plan(head, 8, 80.0).shape)["offloaded optimiser states"] == 16 * trained
    assert host_memory(separate, make_plan(separate, 8, 80.0).shape)["offloaded optimiser states"] == 32 * trained


def test_rays_store_on_a_small_dev_shm_is_rays_floor(monkeypatch: pytest.MonkeyPatch) -> None:
    """Docker's 64 MB /dev/shm: Ray caps its store at 95% of what /dev/shm has free but never below 10 GB.  Peer:
    Ray's own resolver, fed the same /dev/shm."""
    import shutil

    from r3_rl.doctor import memory_check
    from r3_rl.doctor.memory_check import ray_default_store

    small = shutil._ntuple_diskusage(64 * 2 ** 20, 10 * 2 ** 20, 54 * 2 ** 20)  # total, used, free
    monkeypatch.setattr(memory_check.shutil, "disk_usage", lambda path: small)
    assert ray_default_store(100 * B) == pytest.approx(10 * B)
    roomy = shutil._ntuple_diskusage(100 * B, 60 * B, 40 * B)  # another job holds 60 GB of it
    monkeypatch.setattr(memory_check.shutil, "disk_usage", lambda path: roomy)
    assert ray_default_store(200 * B) == pytest.approx(0.95 * 40 * B)
    try:
        from ray._private import utils as ray_utils
    except ImportError:
        return
    for free, total in ((54 * 2 ** 20, 100 * B), (40 * B, 200 * B)):
        monkeypatch.setattr(ray_utils, "get_shared_memory_bytes", lambda f=free: f)
        monkeypatch.setattr(memory_check.shutil, "disk_usage", lambda path, f=free: shutil._ntuple_diskusage(
            2 * f, f, f))
        assert ray_default_store(total) == pytest.approx(ray_utils.resolve_object_store_memory(total), rel=1e-6)


def test_image_side_and_bin_parameter_counts(tmp_path: Path) -> None:
    from r3_rl.weights import count_params, image_side

    # Janus-Pro: 24 x 24 VQ tokens, four 2x upsamplings (five channel multipliers) -> 384 px
    assert image_side({"vq_config": {"num_patches": 24, "channel_multiplier": [1, 1, 2, 2, 4]}}) == 384
    assert image_side({"vq_config": {"num_patches": 16, "channel_multiplier": [1, 2, 4]}}) == 64
    weights = tmp_path / "pytorch_model.bin"
    weights.write_bytes(b"\0" * 1000)
    assert count_params([weights], {"torch_dtype": "bfloat16"}) == 500
    assert count_params([weights], {"torch_dtype": "float32"}) == 250


# ------------------------------------------------------------------------------------------------ checkpoints
def test_an_exported_model_with_an_extra_tensor_is_refused(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    from r3_rl.learner.checkpoint import load_exported

    model = torch.nn.Linear(2, 2)
    save_file({**{k: v.clone() for k, v in model.state_dict().items()}, "extra.w": torch.zeros(1)},
              str(tmp_path / "model.safetensors"))
    with pytest.raises(UserError, match=r"unexpected \['extra\.w'\]"):
        load_exported(model, tmp_path)


def test_a_negative_step_in_checkpoint_json_is_refused(tmp_path: Path) -> None:
    from r3_rl.learner.checkpoint import _check_meta

    with pytest.raises(UserError, match="'step' must be a whole number >= 0, got '-1'"):
        _check_meta({"step": -1}, tmp_path)
    _check_meta({"step": 0}, tmp_path)


def _manifest(folder: Path, files: dict[str, bytes]) -> dict:
    from r3_rl.learner.manifest import file_manifest

    for rel, data in files.items():
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        (folder / rel).write_bytes(data)
    return {"files": file_manifest(folder)}


def test_a_manifest_entry_outside_the_checkpoint_is_refused(tmp_path: Path) -> None:
    """``files`` names what resume stats and hashes: a ``../`` or absolute entry would read outside the folder."""
    from r3_rl.learner.manifest import verify_files

    ckpt = tmp_path / "step_000002"
    meta = _manifest(ckpt, {"state/trainer.pt": b"abc"})
    (tmp_path / "x").write_bytes(b"abc")
    for bad in ("../x", str(tmp_path / "x")):
        with pytest.raises(UserError, match="bad entry"):
            verify_files(ckpt, {"files": {**meta["files"], bad: meta["files"]["state/trainer.pt"]}})
    verify_files(ckpt, meta)


def test_a_state_file_replaced_by_a_symbolic_link_is_refused(tmp_path: Path) -> None:
    from r3_rl.learner.manifest import verify_files

    ckpt = tmp_path / "step_000002"
    meta = _manifest(ckpt, {"state/trainer.pt": b"abc"})
    (tmp_path / "copy.pt").write_bytes(b"abc")  # the same bytes: size and hash agree
    (ckpt / "state" / "trainer.pt").unlink()
    (ckpt / "state" / "trainer.pt").symlink_to(tmp_path / "copy.pt")
    with pytest.raises(UserError, match="a symbolic link"):
        verify_files(ckpt, meta)


def test_deepspeed_universal_checkpoints_are_refused() -> None:
    from r3_rl.learner.safe_load import make_deepspeed_loads_safe

    with pytest.raises(UserError, match="universal checkpoints"):
        make_deepspeed_loads_safe(SimpleNamespace(load_universal_checkpoint=lambda: True,
                                                  checkpoint_engine=SimpleNamespace()))
    engine = SimpleNamespace(load_universal_checkpoint=lambda: False, checkpoint_engine=SimpleNamespace())
    make_deepspeed_loads_safe(engine)
    assert callable(engine.checkpoint_engine.load)


def test_loaded_keys_beyond_the_frozen_ones_must_match() -> None:
    """A LoRA checkpoint without one adapter, or with a key the model lacks, would leave adapters untrained."""
    from r3_rl.learner.frozen import check_loaded_keys

    check_loaded_keys(["x.base.weight"], [], {"x.base.weight"}, "f")  # frozen weights are not saved: fine
    with pytest.raises(RuntimeError, match=r"missing \['x\.lora_A\.weight'\]"):
        check_loaded_keys(["x.lora_A.weight"], [], {"x.base.weight"}, "f")
    with pytest.raises(RuntimeError, match=r"unexpected \['foo'\]"):
        check_loaded_keys([], ["foo"], set(), "f")


def test_the_frozen_fingerprint_sees_shape_and_dtype() -> None:
    from r3_rl.learner.frozen import fingerprint

    t = torch.arange(8, dtype=torch.float32)
    assert fingerprint([("w", t)]) != fingerprint([("w", t.reshape(2, 4))])
    assert fingerprint([("w", t)]) != fingerprint([("w", t.view(torch.int32))])  # the same bytes, another dtype
    assert fingerprint([("w", t)]) == fingerprint([("w", t.clone())])


# --------------------------------------------------------------------------------------------------- optimiser
def test_a_resume_takes_the_recipes_learning_rate_betas_and_weight_decay() -> None:
    """Rolling back after a divergence with a lowered ``learner.lr`` (and other betas) must train at those, with the
    saved Adam moments and schedule position."""
    from r3_rl.config_learner import Learner
    from r3_rl.learner.optim import TorchOptim

    torch.manual_seed(0)
    model = torch.nn.Linear(3, 1)
    first = TorchOptim([model], Learner(lr=1e-3, betas=(0.9, 0.95), weight_decay=0.0, warmup_steps=4))
    first.backward(model(torch.ones(1, 3)).sum())
    assert first.step()[0]
    saved = first.state_dict()
    second = TorchOptim([model], Learner(lr=1e-4, betas=(0.8, 0.99), weight_decay=0.1, warmup_steps=4))
    second.load_state_dict(saved)
    group = second.optimizer.param_groups[0]
    assert group["lr"] == pytest.approx(1e-4 * 2 / 4)  # one step done: warm-up factor (1 + 1) / 4
    assert tuple(group["betas"]) == (0.8, 0.99) and group["weight_decay"] == 0.1
    assert second.optimizer.state[second.params[0]]["step"] == 1  # the moments came back


def test_a_parameter_shared_by_two_modules_is_stepped_once() -> None:
    from r3_rl.learner.optim import trainable

    shared = torch.nn.Linear(2, 2)
    first, second = torch.nn.Sequential(shared), torch.nn.Sequential(shared, torch.nn.Linear(2, 1))
    params, rates = trainable([first, second], [None, 0.5])
    assert [id(p) for p in params] == [id(p) for p in (*shared.parameters(), *second[1].parameters())]
    assert rates == [None, None, 0.5, 0.5]  # the shared weights keep the first module's rate
