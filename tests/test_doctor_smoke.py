"""The CPU-tested cores of the doctor's GPU checks (the all-reduce on gloo, the 2-step training on the tiny
policy, random models of a checkpoint's shape) and the checkpoint-size estimate against a real checkpoint."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from conftest import REPO, tiny_overrides
from r3_rl.blocks.world import CELL
from r3_rl.config import load_recipe
from r3_rl.doctor.gpu import all_reduce_check
from r3_rl.doctor.smoke import random_model_like, smoke_train
from r3_rl.trainer import Trainer
from r3_rl.weights import checkpoint_bytes, checkpoints_on_disk, safetensors_params


def folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def test_all_reduce_across_two_processes_on_gloo() -> None:
    assert all_reduce_check(2, backend="gloo", timeout=120) > 0


def test_two_step_training_and_the_checkpoint_estimate(tmp_path: Path) -> None:
    recipe = load_recipe(REPO / "recipes" / "tiny_blocks.yaml", tiny_overrides(tmp_path))
    steps = smoke_train(recipe, tmp_path / "smoke")
    assert [s["step"] for s in steps] == [0, 1] and all(s["batch/items"] > 0 for s in steps)

    (ckpt,) = (tmp_path / "smoke" / "run" / "checkpoints").glob("step_*")
    params = safetensors_params(ckpt / "model" / "model.safetensors")
    model = sum(p.numel() for p in _tiny_model(recipe).parameters())
    assert params == model  # the header count is the model's own count (tied embeddings stored once)
    parts = checkpoint_bytes(recipe, params, recipe.data.blocks.rows * recipe.data.blocks.cols * CELL * CELL)
    weights_and_optim = (folder_bytes(ckpt / "model") + (ckpt / "state" / "reference.safetensors").stat().st_size
                         + folder_bytes(ckpt / "state" / "learner"))
    estimate = parts["model"] + parts["reference"] + parts["optimiser"]
    assert weights_and_optim <= estimate * 1.15 and estimate <= weights_and_optim * 1.5, (estimate, weights_and_optim)
    with safe_open(str(ckpt / "state" / "buffer.safetensors"), framework="pt") as f:
        images = len(json.loads(f.metadata()["entries"]))
    per_image = parts["parent buffer"] / (2 * recipe.tree.buffer_size)
    assert images > 0
    assert (ckpt / "state" / "buffer.safetensors").stat().st_size == pytest.approx(images * per_image, rel=0.35)


def _tiny_model(recipe):
    from r3_rl.policy.registry import build_policy

    return build_policy(recipe).model


def test_checkpoints_on_disk_counts_kept_plus_the_one_being_written(tmp_path: Path) -> None:
    def count(*sets: str) -> int:
        return checkpoints_on_disk(load_recipe(REPO / "recipes" / "tiny_blocks.yaml", list(sets)))

    assert count("steps=10", "save_every=0") == 1  # only the final one
    assert count("steps=10", "save_every=5", "keep_last=3") == 2  # step 5, then step 10 beside it
    assert count("steps=100", "save_every=5", "keep_last=3") == 4


def test_random_model_like_keeps_widths_and_vocabulary(tmp_path: Path) -> None:
    from transformers import AutoConfig

    from r3_rl.policy.janus import JanusPolicy
    from r3_rl.policy.janus_tiny import make_tiny_janus

    src = Path(make_tiny_janus(tmp_path / "janus", num_layers=2))
    dst = random_model_like(src, tmp_path / "random", layers=1)
    a, b = AutoConfig.from_pretrained(src), AutoConfig.from_pretrained(dst)
    assert b.text_config.num_hidden_layers == 1 and a.text_config.num_hidden_layers == 2
    assert (b.text_config.hidden_size, b.text_config.vocab_size) == (a.text_config.hidden_size, a.text_config.vocab_size)
    assert b.vq_config.num_patches == a.vq_config.num_patches
    templates = load_recipe(REPO / "recipes" / "grpo_geneval.yaml").templates.model_dump()
    policy = JanusPolicy.from_pretrained(str(dst), templates=templates)  # the policy's own loader reads it
    original = JanusPolicy.from_pretrained(str(src), templates=templates)
    assert policy.num_image_tokens == original.num_image_tokens
    emb = "model.language_model.embed_tokens.weight"
    assert not torch.equal(policy.model.state_dict()[emb], original.model.state_dict()[emb])


def test_with_a_gpu_the_doctor_trains_a_random_janus_of_the_recipes_shape(tmp_path: Path,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """The GPU-only path, run on CPU: visible GPUs and the NCCL all-reduce are faked (the all-reduce itself is
    tested above on gloo); the 2-step training runs for real on a random model shaped like a tiny Janus."""
    import json

    from r3_rl.doctor import devices, doctor, gpu
    from r3_rl.policy.janus_tiny import make_tiny_janus

    monkeypatch.setattr(devices, "visible_gpus", lambda: [devices.GpuInfo(0, "fake", 80 * devices.GIB,
                                                                             79 * devices.GIB)])
    monkeypatch.setattr(gpu, "all_reduce_check", lambda world, backend="nccl", timeout=120.0: 0.1)
    from tiny_vision import save_tiny_clip

    janus = make_tiny_janus(tmp_path / "janus")
    clip = json.dumps([{"name": "clip", "options": {"model": save_tiny_clip(tmp_path / "clip"), "device": "cpu"}}])
    sets = [f"out_dir={tmp_path / 'runs'}", f"policy.model={janus}", "policy.device=cpu", "policy.dtype=float32",
            f"rewards.task={clip}", f"rewards.eval={clip}",
            "tree.group_size=2", "tree.prompts_per_step=1", "tree.refine_groups_per_step=1",
            "rollout.reason.max_new_tokens=4", "rollout.reflect.max_new_tokens=4", "learner.micro_batch_size=2",
            # not the recipe's 8 GPUs of Ray actors and bf16 DeepSpeed: one faked GPU, float32
            "learner.ranks=1", "rollout.backend=local", "learner.deepspeed.dtype=fp32"]
    found = []
    assert doctor(REPO / "recipes" / "grpo_geneval.yaml", sets, emit=found.append) == 0, [f.line() for f in found]
    train = {f.check: f for f in found}["train"]
    assert train.status == "ok" and "2 steps on a random 2-layer model" in train.detail
    assert not list((tmp_path / "runs").glob("r3rl-doctor-*"))  # its scratch folder is gone


@pytest.mark.parametrize("kl", [True, False], ids=["with KL", "no KL"])
def test_the_checkpoint_estimate_counts_each_deepspeed_file(tmp_path: Path, kl: bool) -> None:
    """DeepSpeed writes its own module file beside its optimiser shards, and the KL reference is written only
    when the run keeps a frozen copy: the estimate once left the first out and counted the second always, so
    with KL on the doctor passed a disk too small (BAGEL: 91 GB under the need).  Each part against its file
    (bf16, as users run; the tiny model's pickle headers are the slack)."""
    no_kl = [] if kl else ["learner.kl_coef_text=0", "learner.kl_coef_image=0"]
    recipe = load_recipe(REPO / "recipes" / "tiny_blocks.yaml", tiny_overrides(tmp_path) + [
        "learner.backend=deepspeed", "policy.dtype=bfloat16", "learner.deepspeed.dtype=bf16", *no_kl])
    Trainer(recipe, tmp_path / "run").train()
    (ckpt,) = (tmp_path / "run" / "checkpoints").glob("step_*")
    params = safetensors_params(ckpt / "model" / "model.safetensors")
    parts = checkpoint_bytes(recipe, params, recipe.data.blocks.rows * recipe.data.blocks.cols * CELL * CELL)
    engine = ckpt / "state" / "learner" / "deepspeed" / "state"
    reference = ckpt / "state" / "reference.safetensors"
    written = {"model": (ckpt / "model" / "model.safetensors").stat().st_size,
               "reference": reference.stat().st_size if reference.exists() else 0,
               "optimiser": sum(f.stat().st_size for f in engine.glob("*optim_states.pt")),
               "DeepSpeed module": (engine / "mp_rank_00_model_states.pt").stat().st_size}
    assert (written["reference"] > 0) == kl
    for part, size in written.items():
        assert parts[part] == pytest.approx(size, rel=0.25), (part, parts[part], size)


def test_the_checkpoint_estimate_counts_the_torch_backends_fp32_optimiser_state(tmp_path: Path) -> None:
    """The torch backend steps bf16 weights through fp32 masters with fp32 Adam moments: 12 bytes a parameter in
    optimizer.pt, where the estimate had counted 2 moments in bf16 (4 bytes: a full fine-tune's file 3x the
    estimate)."""
    recipe = load_recipe(REPO / "recipes" / "tiny_blocks.yaml", tiny_overrides(tmp_path) + [
        "policy.dtype=bfloat16", "learner.kl_coef_text=0", "learner.kl_coef_image=0"])
    Trainer(recipe, tmp_path / "run").train()
    (ckpt,) = (tmp_path / "run" / "checkpoints").glob("step_*")
    params = safetensors_params(ckpt / "model" / "model.safetensors")
    parts = checkpoint_bytes(recipe, params, recipe.data.blocks.rows * recipe.data.blocks.cols * CELL * CELL)
    written = (ckpt / "state" / "learner" / "optimizer.pt").stat().st_size
    assert parts["optimiser"] == 12 * params and parts["optimiser"] == pytest.approx(written, rel=0.25)


@pytest.mark.parametrize("backend", ["deepspeed", "torch"])
def test_a_lora_checkpoint_holds_the_merged_model_once(tmp_path: Path, backend: str) -> None:
    """With LoRA (bf16) the merged export is the only copy of the model in a checkpoint: DeepSpeed's module file
    and the torch backend's unmerged state hold the adapters, not the frozen base again (they did: the doctor
    counted a second model), and the estimate says so.  The resume that reads them back is tested in
    test_resume.py."""
    extra = [f"learner.backend={backend}", "learner.lora={r: 4}", "policy.dtype=bfloat16"]
    if backend == "deepspeed":
        extra.append("learner.deepspeed.dtype=bf16")
    recipe = load_recipe(REPO / "recipes" / "tiny_blocks.yaml", tiny_overrides(tmp_path) + extra)
    Trainer(recipe, tmp_path / "run").train()
    (ckpt,) = (tmp_path / "run" / "checkpoints").glob("step_*")
    from safetensors.torch import load_file

    from r3_rl.learner.safe_load import safe_torch_load

    def nbytes(tensors) -> int:
        return sum(t.numel() * t.element_size() for t in tensors if torch.is_tensor(t))

    model = nbytes(load_file(ckpt / "model" / "model.safetensors").values())
    if backend == "deepspeed":  # its module file: the module's state and ZeRO's frozen-parameter fragments
        (module_file,) = (ckpt / "state" / "learner").rglob("*model_states.pt")
        saved = safe_torch_load(module_file)
        beside = sum(nbytes((saved.get(k) or {}).values()) for k in ("module", "frozen_param_fragments"))
    else:
        beside = nbytes(load_file(ckpt / "state" / "policy.safetensors").values())
    assert 0 < beside < model / 2, (beside, model)  # adapters (and the tiny model's tied lm_head under DeepSpeed)
    parts = checkpoint_bytes(recipe, safetensors_params(ckpt / "model" / "model.safetensors"), 0)
    assert parts["model"] == pytest.approx(model, rel=0.25) and parts["optimiser"] == 0
    assert "DeepSpeed module" not in parts and parts["reference"] == 0
