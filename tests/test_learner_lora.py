"""LoRA: only adapters train, the reference is the base model with adapters off (no copy), export is merged."""
from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch
from learner_helpers import clone, learner_cfg, sample_items, tiny_policy, weights
from transformers import LlamaForCausalLM

from r3_rl.errors import UserError
from r3_rl.learner.build import build_learner, needs_frozen_reference
from r3_rl.learner.lora import AdapterDisabledReference
from r3_rl.policy.tiny import TinyUnifiedPolicy


def _recipe(**learner):
    return SimpleNamespace(learner=learner_cfg(**learner))


def test_lora_trains_adapters_only_against_the_base_model(tmp_path) -> None:
    policy = tiny_policy()
    items = sample_items(policy)
    original = clone(policy)
    recipe = _recipe(lora={"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]}, kl_coef_text=0.5,
                     kl_coef_image=0.5)
    assert not needs_frozen_reference(recipe)
    original_module = policy.model
    learner = build_learner(policy, None, recipe)
    ref = learner.reference
    assert isinstance(ref, AdapterDisabledReference) and ref.model is policy.model  # no second copy
    trainable = {n for n, p in policy.model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    base_before = {k: v.clone() for k, v in weights(policy).items() if "lora_" not in k}

    for _ in range(3):
        learner.step(copy.deepcopy(items))
    after = weights(policy)
    for k, v in base_before.items():
        assert torch.equal(after[k], v), f"base weight {k} moved"
    assert any(not torch.equal(after[k], torch.zeros_like(after[k])) for k in after if "lora_B" in k)

    # the reference still computes the untouched base model's log-probs, while the policy has moved
    segs = [it.segment for it in items]
    with torch.no_grad():
        base_lp = original.segment_logprobs(segs)
        ref_lp = ref.segment_logprobs(segs)
        pol_lp = policy.segment_logprobs(segs)
    for b, r in zip(base_lp, ref_lp):
        torch.testing.assert_close(r, b, rtol=0, atol=1e-6)
    assert any(not torch.allclose(p, b, atol=1e-4) for p, b in zip(pol_lp, base_lp))

    # the learner's export writes merged weights that plain from_pretrained loads into the same model; the policy
    # itself is untouched by LoRA (no patched save_pretrained, no module swapped in behind its back)
    assert "save_pretrained" not in vars(policy) and policy.model is original_module
    learner.export(tmp_path / "merged")
    plain = LlamaForCausalLM.from_pretrained(str(tmp_path / "merged"))
    assert not any("lora" in k or "base_layer" in k for k in plain.state_dict())
    reloaded = TinyUnifiedPolicy.from_pretrained(str(tmp_path / "merged"), policy.templates)
    with torch.no_grad():
        for a, b in zip(reloaded.segment_logprobs(segs), pol_lp):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert "lora_A" in "".join(policy.model.state_dict())  # the live model kept its adapters


def test_lora_unknown_target_module_is_a_user_error() -> None:
    with pytest.raises(UserError, match="learner.lora.target_modules: 'qproj'"):
        build_learner(tiny_policy(), None, _recipe(lora={"target_modules": ["qproj"]}))


def test_lora_goes_into_the_language_model_of_janus_only(tmp_path) -> None:
    """Janus' SigLIP has q/k/v_proj too: the default targets must not wrap it (nor the VQ, aligners, heads)."""
    from test_janus_policy import TEMPLATES

    from r3_rl.config import LoraCfg
    from r3_rl.learner.lora import apply_lora
    from r3_rl.policy.janus import JanusPolicy
    from r3_rl.policy.janus_tiny import make_tiny_janus

    path = make_tiny_janus(tmp_path / "janus")

    def wrapped(**lora) -> list[str]:
        policy = JanusPolicy.from_pretrained(path, templates=TEMPLATES)
        apply_lora(policy, LoraCfg(**lora))
        trainable = {n for n, p in policy.model.named_parameters() if p.requires_grad}
        assert trainable and all("lora_" in n for n in trainable)
        return sorted(n for n, m in policy.model.named_modules() if hasattr(m, "lora_A"))

    lm = [f"model.language_model.layers.{i}.{m}" for i in (0, 1)
          for m in ("self_attn.k_proj", "self_attn.o_proj", "self_attn.q_proj", "self_attn.v_proj")]
    assert wrapped() == lm
    vision = [f"model.vision_model.encoder.layers.0.self_attn.{p}_proj" for p in "kqv"]
    assert wrapped(train_vision=True) == sorted(lm + vision)
    mlp = [f"model.language_model.layers.{i}.mlp.{m}_proj" for i in (0, 1) for m in ("down", "gate", "up")]
    assert wrapped(target_modules="all-linear") == sorted(lm + mlp)  # not lm_head, aligners or the image head
    with pytest.raises(UserError, match=r"'fc1' is not a module of the policy's language model"):
        wrapped(target_modules=["fc1"])  # the aligner's: outside the language model
    with pytest.raises(UserError, match="learner.lora.train_vision: a TinyUnifiedPolicy has no separate vision"):
        build_learner(tiny_policy(), None, _recipe(lora={"train_vision": True}))


def test_lora_checkpoint_keeps_the_adapters_not_the_base_and_checks_the_base(tmp_path) -> None:
    """The unmerged state beside the merged export is the adapters only (the base is 95%+ of a real model: 14.8 GB
    of Janus-Pro-7B at every save); a resume loads them onto the base from policy.model after checking, by the
    fingerprint in the file, that this base is the one they were trained on.  A whole-model file from before
    fingerprints still loads."""
    from safetensors import safe_open
    from safetensors.torch import save_model

    recipe = _recipe(lora={"r": 4, "alpha": 8})
    policy = tiny_policy()
    learner = build_learner(policy, None, recipe)
    items = sample_items(policy)
    for _ in range(2):
        learner.step(copy.deepcopy(items))
    saved = tmp_path / "policy.safetensors"
    learner.adapters.save(saved)
    trainable = {n for n, p in policy.model.named_parameters() if p.requires_grad}
    with safe_open(str(saved), framework="pt") as f:
        assert set(f.keys()) == trainable and all("lora_" in k for k in f.keys())
        assert len(f.metadata()["frozen_fingerprint"]) == 64
    whole = sum(v.numel() * v.element_size() for v in policy.model.state_dict().values())
    assert saved.stat().st_size < whole / 4

    def fresh(seed: int = 0):
        p = tiny_policy(seed)
        return p, build_learner(p, None, recipe)

    twin, twin_learner = fresh()
    assert not all(torch.equal(weights(twin)[k], v) for k, v in weights(policy).items())  # adapters start fresh
    twin_learner.adapters.load(saved)
    for k, v in weights(policy).items():
        assert torch.equal(weights(twin)[k], v), k

    other, other_learner = fresh(seed=1)  # another base under the same path
    with pytest.raises(UserError, match=r"policy.safetensors: the frozen \(base\) weights loaded from policy.model"):
        other_learner.adapters.load(saved)

    old = tmp_path / "old.safetensors"  # the format before: the whole unmerged model
    save_model(policy.model, str(old))
    old_twin, old_learner = fresh()
    old_learner.adapters.load(old)
    for k, v in weights(policy).items():
        assert torch.equal(weights(old_twin)[k], v), k


def test_the_frozen_fingerprint_sees_another_base_at_real_width() -> None:
    """At Janus-Pro's width in bf16: the same values give the same fingerprint whatever module holds them; a
    re-trained copy (every weight nudged), one re-trained column, another dtype or another name give another
    one; nothing frozen: None."""
    from r3_rl.learner.frozen import fingerprint

    gen = torch.Generator().manual_seed(0)
    w = (torch.randn(2048, 2048, generator=gen) * 0.02).to(torch.bfloat16)
    base = fingerprint([("q_proj.weight", w)])
    assert base == fingerprint([("q_proj.weight", w.clone())])
    nudged = (w.float() + torch.randn(2048, 2048, generator=gen) * 1e-3).to(torch.bfloat16)
    assert fingerprint([("q_proj.weight", nudged)]) != base
    assert fingerprint([("q_proj.weight", w.float())]) != base
    column = w.clone()
    column[:, 5] += 1  # one column re-trained: every row's sample must not sit in the same column
    assert fingerprint([("q_proj.weight", column)]) != base
    assert fingerprint([("k_proj.weight", w)]) != base
    assert fingerprint([]) is None


@pytest.mark.parametrize("backend", ["deepspeed", "torch"])
def test_rollout_workers_compute_the_adapters_as_the_learner_does(tmp_path, backend: str) -> None:
    """DeepSpeed casts every weight it wraps to bf16, LoRA adapters included, while peft builds them in fp32: a
    rollout worker (and the trainer's mirror of the ranks) computed fp32 adapters, the learner bf16 ones, so the
    sampler's log-probs were not the learner's even at equal weights.  Now each copy builds its adapters in the
    dtype the learner trains them in, and a worker holding the learner's weights scores exactly as the learner."""
    pytest.importorskip("deepspeed")
    from conftest import REPO, tiny_overrides

    from r3_rl.config import load_recipe
    from r3_rl.policy.registry import build_policy
    from r3_rl.rollout.ray_engine import worker_policy

    sets = [f"learner.backend={backend}", "learner.lora={r: 4}", "policy.dtype=bfloat16"]
    recipe = load_recipe(REPO / "recipes" / "tiny_blocks.yaml", tiny_overrides(tmp_path) + sets + (
        ["learner.deepspeed.dtype=bf16"] if backend == "deepspeed" else []))
    policy = build_policy(recipe)
    build_learner(policy, None, recipe)
    with torch.no_grad():  # adapters that matter: lora_B starts at 0
        for name, p in policy.model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn_like(p) * 0.5)
    worker = worker_policy(recipe)
    learner_dtypes = {n: p.dtype for n, p in policy.model.named_parameters() if "lora_" in n}
    assert learner_dtypes == {n: p.dtype for n, p in worker.model.named_parameters() if "lora_" in n}
    assert set(learner_dtypes.values()) == {torch.bfloat16 if backend == "deepspeed" else torch.float32}
    worker.load_state_dict(policy.trainable_state_dict(), partial=True)
    segs = [it.segment for it in sample_items(policy)]
    with torch.no_grad():
        for a, b in zip(worker.segment_logprobs(segs), policy.segment_logprobs(segs)):
            assert torch.equal(a, b)


def test_the_merged_export_copies_the_model_to_the_cpu_one_tensor_at_a_time(tmp_path, monkeypatch) -> None:
    """The export merges the adapters on a copy of the model.  ``copy.deepcopy`` made that copy on the model's own
    device -- 14.8 GB more on the trainer's GPU at every checkpoint for Janus-Pro-7B -- so no tensor may be
    deep-copied on its device now: each goes to host memory directly.  The export is the same as before."""
    from r3_rl.policy.base import host_copy

    policy = tiny_policy()
    learner = build_learner(policy, None, _recipe(lora={"r": 4, "alpha": 8}))
    learner.step(copy.deepcopy(sample_items(policy)))
    expected = copy.deepcopy(learner.adapters.peft_model).merge_and_unload().state_dict()  # the old way
    copied: list[torch.device] = []
    for kind in (torch.Tensor, torch.nn.Parameter):  # a parameter has a __deepcopy__ of its own
        monkeypatch.setattr(kind, "__deepcopy__",
                            lambda t, memo, real=kind.__deepcopy__: copied.append(t.device) or real(t, memo))
    host = host_copy(learner.adapters.peft_model)
    assert copied == []
    live = dict(learner.adapters.peft_model.named_parameters())
    for name, p in host.named_parameters():
        assert p.device.type == "cpu" and p.data_ptr() != live[name].data_ptr() and torch.equal(p, live[name])
    monkeypatch.undo()
    learner.export(tmp_path / "merged")
    plain = LlamaForCausalLM.from_pretrained(str(tmp_path / "merged"))
    got = plain.state_dict()
    for k, v in expected.items():
        assert torch.equal(got[k], v), k


def test_a_separate_ppo_critic_under_lora_is_checkpointed_without_its_frozen_base(tmp_path) -> None:
    """``ppo.critic: separate`` copies the LoRA-wrapped policy: its frozen base is the policy's (Janus-Pro-7B: 14.8
    GB), rebuilt from it on resume.  The torch backend's learner.pt keeps the critic's adapters (and the value
    head) only, a resume restores the critic exactly, and a learner.pt from before (whole critic) still loads."""
    recipe = _recipe(lora={"r": 4, "alpha": 8}, algorithm="ppo", ppo={"critic": "separate", "critic_lr": 1e-2})
    policy = tiny_policy()
    learner = build_learner(policy, None, recipe)
    items = sample_items(policy)
    for i, it in enumerate(items):
        it.episode, it.t, it.reward = f"e{i // 3}", i % 3, [0.1, 1.0, 0.0, 0.5, 0.1, -0.2][i]
    learner.step(copy.deepcopy(items))
    learner.save(tmp_path / "learner")
    critic = learner.modules["critic"]
    saved = torch.load(tmp_path / "learner" / "learner.pt", weights_only=True)["modules"]
    trained = {n for n, p in critic.named_parameters() if p.requires_grad}
    assert set(saved["critic"]) == trained and all("lora_" in k for k in trained)
    assert set(saved["value_head"]) == {"weight", "bias"}

    def resumed(state_file):
        twin = tiny_policy()
        twin_learner = build_learner(twin, None, recipe)
        twin_learner.load_state_dict(torch.load(state_file, weights_only=True))
        return twin_learner

    back = resumed(tmp_path / "learner" / "learner.pt")
    for name, tensor in critic.state_dict().items():
        assert torch.equal(back.modules["critic"].state_dict()[name], tensor), name
    old = tmp_path / "old.pt"  # the format before: the critic's whole state
    torch.save({**learner.state_dict(), "modules": {k: m.state_dict() for k, m in learner.modules.items()}}, old)
    assert len(torch.load(old, weights_only=True)["modules"]["critic"]) > len(trained)
    back_old = resumed(old)
    for name, tensor in critic.state_dict().items():
        assert torch.equal(back_old.modules["critic"].state_dict()[name], tensor), name
