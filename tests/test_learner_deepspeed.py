"""The DeepSpeed driver (CPU, gloo, ZeRO-2 and ZeRO-0): same update as torch, exact save/load, non-finite skips.

The first DeepSpeed use in a fresh checkout compiles its CPU shm comm op (~25 s, then cached under
TORCH_EXTENSIONS_DIR); afterwards one engine takes ~2 s to build.
"""
from __future__ import annotations

import copy
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from learner_helpers import clone, learner_cfg, sample_items, tiny_policy, weights

pytest.importorskip("deepspeed")

from r3_rl.learner.deepspeed_learner import DeepSpeedOptim, ds_config  # noqa: E402
from r3_rl.learner.torch_learner import TorchLearner  # noqa: E402


@pytest.fixture(scope="module")
def base():
    policy = tiny_policy()
    return policy, sample_items(policy)


def _ds_learner(policy, stage: int, dtype: str = "fp32", config: dict | None = None, **kw) -> TorchLearner:
    p = clone(policy)
    cfg = learner_cfg(backend="deepspeed", micro_batch_size=2,
                      deepspeed={"zero_stage": stage, "dtype": dtype, "config": config or {}}, **kw)
    return TorchLearner(p, p.frozen_copy(), cfg, DeepSpeedOptim({"policy": p.model}, cfg))


def _adam_state(learner: TorchLearner) -> tuple[dict, int]:
    engine = learner.optim.engine
    base = getattr(engine.optimizer, "optimizer", engine.optimizer)  # ZeRO wraps the torch AdamW
    state = {i: {k: (v.clone() if torch.is_tensor(v) else v) for k, v in s.items()}
             for i, s in enumerate(base.state.values())}
    return state, engine.lr_scheduler.last_epoch


def _assert_same_state(a: tuple[dict, int], b: tuple[dict, int]) -> None:
    assert a[1] == b[1] and a[0].keys() == b[0].keys()
    for i in a[0]:
        for k, v in a[0][i].items():
            assert torch.equal(torch.as_tensor(v), torch.as_tensor(b[0][i][k])), (i, k)


def test_ds_config_maps_the_recipe() -> None:
    cfg = learner_cfg(backend="deepspeed", micro_batch_size=4, grad_accum=3, grad_clip=0.5,
                      deepspeed={"zero_stage": 3, "dtype": "bf16",
                                 "config": {"zero_optimization": {"overlap_comm": True}}})
    c = ds_config(cfg, world_size=2)
    assert c["train_micro_batch_size_per_gpu"] == 4 and c["gradient_accumulation_steps"] == 3
    assert c["train_batch_size"] == 24 and c["gradient_clipping"] == 0.5 and c["bf16"] == {"enabled": True}
    assert c["zero_optimization"] == {"stage": 3, "overlap_comm": True} and c["managed_gradient_accumulation"] is False


def test_zero2_step_matches_torch_resumes_exactly_and_skips_nonfinite(base, tmp_path: Path) -> None:
    policy, items = base
    ds = _ds_learner(policy, stage=2)
    ref = clone(policy)
    torch_learner = TorchLearner(ref, ref.frozen_copy(), learner_cfg(micro_batch_size=2))
    m = ds.step(copy.deepcopy(items))
    torch_learner.step(copy.deepcopy(items))
    assert m["learner/optimizer_steps"] == 1.0 and math.isfinite(m["learner/grad_norm"])
    for k, v in weights(torch_learner.policy).items():  # same maths, different gradient bucketing
        torch.testing.assert_close(weights(ds.policy)[k], v, rtol=1e-4, atol=1e-5)

    # exact resume: save after one step, load into a fresh engine, take the same next step on both
    ds.save(tmp_path / "learner")
    assert not list((tmp_path / "learner").rglob("zero_to_*.py"))  # DeepSpeed's scripts unpickle what they read
    twin = _ds_learner(policy, stage=2)
    twin.load(tmp_path / "learner")
    for k, v in weights(ds.policy).items():
        assert torch.equal(weights(twin.policy)[k], v), k
    _assert_same_state(_adam_state(ds), _adam_state(twin))
    ds.step(copy.deepcopy(items))
    twin.step(copy.deepcopy(items))
    for k, v in weights(ds.policy).items():
        assert torch.equal(weights(twin.policy)[k], v), k

    # a non-finite loss, then a non-finite gradient: skipped, weights and optimiser state untouched
    w, st = weights(ds.policy), _adam_state(ds)
    bad = copy.deepcopy(items)
    bad[3].segment.logprobs[1] = math.nan
    m = ds.step(bad)
    assert m["learner/nonfinite_skipped"] == 1.0 and "learner/loss" not in m
    hook = ds.policy.model.model.norm.weight.register_hook(lambda g: torch.full_like(g, math.inf))
    m = ds.step(copy.deepcopy(items))
    hook.remove()
    assert m["learner/nonfinite_skipped"] == 1.0 and "learner/loss" not in m
    for k, v in weights(ds.policy).items():
        assert torch.equal(v, w[k]), k
    _assert_same_state(st, _adam_state(ds))
    # and the engine carries no poisoned leftovers: the next good step equals the twin's
    ds.step(copy.deepcopy(items))
    twin.step(copy.deepcopy(items))
    for k, v in weights(ds.policy).items():
        assert torch.equal(weights(twin.policy)[k], v), k


def test_offloaded_fused_adamw_resumes_exactly(base, tmp_path: Path) -> None:
    """``offload_optimizer``: the CPU step is torch's fused AdamW, and a resume takes the same next step."""
    policy, items = base
    offload = {"config": {"zero_optimization": {"offload_optimizer": {"device": "cpu"}}}}
    ds, twin = _ds_learner(policy, stage=2, **offload), _ds_learner(policy, stage=2, **offload)
    assert ds.optim.engine.optimizer.optimizer.defaults["fused"] is True
    ds.step(copy.deepcopy(items))
    ds.save(tmp_path / "learner")
    twin.load(tmp_path / "learner")
    _assert_same_state(_adam_state(ds), _adam_state(twin))
    ds.step(copy.deepcopy(items))
    twin.step(copy.deepcopy(items))
    for k, v in weights(ds.policy).items():
        assert torch.equal(weights(twin.policy)[k], v), k


def test_zero0_checks_gradients_itself(base) -> None:
    policy, items = base
    ds = _ds_learner(policy, stage=0, grad_clip=0.05)
    ref = clone(policy)
    torch_learner = TorchLearner(ref, ref.frozen_copy(), learner_cfg(micro_batch_size=2, grad_clip=0.05))
    m_ds, m_t = ds.step(copy.deepcopy(items)), torch_learner.step(copy.deepcopy(items))
    # DeepSpeed's fp32 ZeRO-0 keeps no norm (it logged NaN): the driver clips and reports it, as the torch driver
    assert m_t["learner/grad_norm"] > 0.05 and m_ds["learner/grad_norm"] == pytest.approx(m_t["learner/grad_norm"],
                                                                                          rel=1e-5)
    clipped = torch_learner.optim.optimizer.state  # Adam's first moment is (1 - beta1) x the clipped gradient
    for (i, s), t in zip(_adam_state(ds)[0].items(), clipped.values(), strict=True):
        torch.testing.assert_close(s["exp_avg"], t["exp_avg"], rtol=1e-4, atol=1e-7, msg=str(i))
    w, st = weights(ds.policy), _adam_state(ds)
    hook = ds.policy.model.model.norm.weight.register_hook(lambda g: torch.full_like(g, math.nan))
    m = ds.step(copy.deepcopy(items))
    hook.remove()
    assert m["learner/nonfinite_skipped"] == 1.0
    for k, v in weights(ds.policy).items():
        assert torch.equal(v, w[k]), k
    _assert_same_state(st, _adam_state(ds))


def test_zero3_accumulates_micro_batches_like_torch(base) -> None:
    """ZeRO-3 partitions the weights; its gradient over several micro-batches must still be the full one."""
    import deepspeed

    policy, items = base
    ds = _ds_learner(policy, stage=3)
    ref = clone(policy)
    torch_learner = TorchLearner(ref, ref.frozen_copy(), learner_cfg(micro_batch_size=2))
    m_ds = ds.step(copy.deepcopy(items))
    m_t = torch_learner.step(copy.deepcopy(items))
    assert m_ds["learner/grad_norm"] == pytest.approx(m_t["learner/grad_norm"], rel=1e-5)
    with deepspeed.zero.GatheredParameters(list(ds.policy.model.parameters())):
        got = weights(ds.policy)
    for k, v in weights(torch_learner.policy).items():
        torch.testing.assert_close(got[k], v, rtol=1e-4, atol=1e-5)


def test_ppo_critic_lr_under_zero2_matches_torch(base) -> None:
    """``learner.ppo.critic_lr`` reaches DeepSpeed's optimiser as a parameter group of its own: a ZeRO-2 PPO step
    with a separate critic rate gives the torch driver's weights, value head included."""
    from r3_rl.config import Recipe
    from r3_rl.learner.registry import load_algorithm

    policy, items = base
    items = copy.deepcopy(items)
    for i, it in enumerate(items):  # two 3-stage episodes, as tests/test_learner_ppo.py builds them
        it.episode, it.t, it.reward = f"e{i // 3}", i % 3, [0.1, 1.0, 0.0, 0.5, 0.1, -0.2][i]
    ppo = {"critic_lr": 1e-2, "normalize_advantages": False}
    cfg_t = learner_cfg(algorithm="ppo", micro_batch_size=2, lr=1e-4, ppo=ppo)
    cfg_d = learner_cfg(algorithm="ppo", micro_batch_size=2, lr=1e-4, ppo=ppo, backend="deepspeed",
                        deepspeed={"zero_stage": 2, "dtype": "fp32"})
    torch_learner = TorchLearner(clone(policy), None, cfg_t)
    p = clone(policy)
    algorithm = load_algorithm(Recipe(learner=cfg_d))
    modules = algorithm.modules(p)
    optim = DeepSpeedOptim({"policy": p.model, **modules}, cfg_d, {n: algorithm.module_lr(n) for n in modules})
    ds = TorchLearner(p, None, cfg_d, optim, modules, algorithm)
    base_opt = getattr(optim.engine.optimizer, "optimizer", optim.engine.optimizer)
    assert sorted(g["lr"] for g in base_opt.param_groups) == [1e-4, 1e-2]
    torch_learner.step(copy.deepcopy(items))
    ds.step(copy.deepcopy(items))
    head_t, head_d = torch_learner.modules["value_head"], ds.modules["value_head"]
    assert float(head_d.bias.detach().abs().max()) > 5e-3  # moved at the critic's rate, not learner.lr's
    torch.testing.assert_close(head_d.bias.detach(), head_t.bias.detach(), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(head_d.weight.detach(), head_t.weight.detach(), rtol=1e-4, atol=1e-5)
    for k, v in weights(torch_learner.policy).items():
        torch.testing.assert_close(weights(ds.policy)[k], v, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("width", [32, 2048])
def test_a_bf16_engine_leaves_the_value_head_computing_in_float32(base, width: int) -> None:
    """DeepSpeed's bf16 engine casts the value head to bf16 with everything it trains; the head still computes in
    float32, so a value moves by less than bf16's 2^-8 step in [0.5, 1) -- values that bf16 could not hold.  At
    the test width and at Janus-Pro-1B's (2048)."""
    from r3_rl.config import Recipe, Templates
    from r3_rl.learner.algorithm import LearnerModels
    from r3_rl.learner.registry import load_algorithm
    from r3_rl.policy.tiny import TinyUnifiedPolicy

    policy, items = base
    if width != 32:
        policy = TinyUnifiedPolicy.build(Templates().model_dump(), rows=2, cols=2, hidden_size=width, num_layers=1,
                                         num_heads=16, intermediate_size=2 * width, max_positions=128, seed=0)
        items = sample_items(policy)
    items = copy.deepcopy(items)
    for i, it in enumerate(items):
        it.episode, it.t, it.reward = f"e{i // 3}", i % 3, [0.1, 1.0, 0.0, 0.5, 0.1, -0.2][i]
    cfg = learner_cfg(algorithm="ppo", micro_batch_size=2, lr=1e-4, ppo={"critic_lr": 1e-2}, backend="deepspeed",
                      deepspeed={"zero_stage": 2, "dtype": "bf16"})
    p = clone(policy)
    p.model.to(torch.bfloat16)
    algorithm = load_algorithm(Recipe(learner=cfg))
    modules = algorithm.modules(p)
    optim = DeepSpeedOptim({"policy": p.model, **modules}, cfg, {n: algorithm.module_lr(n) for n in modules})
    learner = TorchLearner(p, None, cfg, optim, modules, algorithm)
    learner.step(copy.deepcopy(items))
    head = learner.modules["value_head"]
    assert head.weight.dtype == torch.bfloat16 and float(head.weight.detach().abs().max()) > 0
    with torch.no_grad():
        values = algorithm.values(LearnerModels(p, None, modules), items)
    assert values.dtype == torch.float32
    assert not torch.equal(values, values.bfloat16().float())  # bf16 arithmetic would have rounded every one


@pytest.mark.parametrize("backend", ["torch", "deepspeed"])
def test_resume_takes_the_recipes_learning_rate_and_betas(base, tmp_path: Path, backend: str) -> None:
    """Rolling back with a lower ``learner.lr``: the saved param_groups and schedule bases used to win (the resumed
    run went on at the saved rate).  Now the recipe's rate (x the schedule at the saved position), betas, weight
    decay and clipping norm apply, while Adam's moments and the schedule's position come from the checkpoint."""
    policy, items = base
    schedule = {"warmup_steps": 4, "lr_decay_steps": 10, "lr_final": 0.1}

    def learner(lr: float, betas: list[float], grad_clip: float = 1.0) -> TorchLearner:
        if backend == "deepspeed":
            return _ds_learner(policy, stage=2, lr=lr, betas=betas, weight_decay=0.0, grad_clip=grad_clip, **schedule)
        p = clone(policy)
        return TorchLearner(p, p.frozen_copy(), learner_cfg(micro_batch_size=2, lr=lr, betas=betas, weight_decay=0.0,
                                                            grad_clip=grad_clip, **schedule))

    def adamw(t: TorchLearner) -> torch.optim.AdamW:
        return t.optim.optimizer if backend == "torch" else t.optim.engine.optimizer.optimizer

    saved = learner(1e-2, [0.9, 0.95])
    saved.step(copy.deepcopy(items))  # schedule position 1 of a 4-step warm-up: factor 2/4
    saved.save(tmp_path / "learner")
    lowered = learner(1e-3, [0.8, 0.99], grad_clip=0.5)
    lowered.load(tmp_path / "learner")
    if backend == "deepspeed":  # ZeRO restores its saved clipping norm; the torch driver reads the recipe's
        assert lowered.optim.engine.optimizer.clip_grad == 0.5
    assert lowered.optim.lr() == pytest.approx(1e-3 * 2 / 4) and saved.optim.lr() == pytest.approx(1e-2 * 2 / 4)
    (group,) = adamw(lowered).param_groups
    assert group["betas"] == (0.8, 0.99) and group["initial_lr"] == 1e-3
    moments = [s["exp_avg"] for s in adamw(saved).state.values()]
    assert all(torch.equal(a, s["exp_avg"]) for a, s in zip(moments, adamw(lowered).state.values(), strict=True))
    assert lowered.step(copy.deepcopy(items))["learner/lr"] == pytest.approx(1e-3 * 3 / 4)


def test_zero3_lora_weights_for_the_workers_gather_only_the_adapters(base, monkeypatch: pytest.MonkeyPatch) -> None:
    """After a LoRA step under ZeRO-3 the rollout workers need only the adapters: gathering every weight to send
    them (as ``state_dict`` does) would put the whole model on one GPU at once.  What is gathered is the adapters,
    and their values equal a full gather's; the full size is counted without gathering."""
    import deepspeed

    from r3_rl.learner.build import build_learner

    policy, items = base
    p = clone(policy)
    cfg = learner_cfg(backend="deepspeed", micro_batch_size=2, lora={"r": 4, "alpha": 8},
                      deepspeed={"zero_stage": 3, "dtype": "fp32", "config": {}})
    build_learner(p, None, SimpleNamespace(learner=cfg)).step(copy.deepcopy(items))
    gathered: list[list[torch.nn.Parameter]] = []
    real = deepspeed.zero.GatheredParameters
    monkeypatch.setattr(deepspeed.zero, "GatheredParameters",
                        lambda params, *a, **kw: gathered.append(list(params)) or real(params, *a, **kw))
    update = p.trainable_state_dict()
    assert len(gathered) == 1 and gathered[0] and all(q.requires_grad for q in gathered[0])
    full = p.state_dict()  # every weight, gathered
    assert len(gathered[1]) > len(gathered[0])
    assert set(update) == {k for k in full if "lora_" in k}
    assert any(float(v.abs().max()) > 0 for k, v in update.items() if "lora_B" in k)  # the step moved them
    for k, v in update.items():
        assert torch.equal(v, full[k]), k
    assert p.weight_nbytes() == sum(v.numel() * v.element_size() for v in full.values())


@pytest.mark.parametrize("stage", [2, 3])
def test_lora_checkpoint_leaves_the_frozen_base_out_and_checks_it(base, tmp_path: Path, stage: int) -> None:
    """bf16 LoRA under ZeRO-2 and ZeRO-3: DeepSpeed's checkpoint held the frozen base twice over (its module file,
    and ZeRO's frozen-parameter fragments) beside the merged export -- 14.8 GB more for Janus-Pro-7B at every
    save.  Now it holds what trains and the base's fingerprint: a twin built on the same base resumes exactly,
    one built on another base stops in one line."""
    from r3_rl.errors import UserError
    from r3_rl.learner.build import build_learner
    from r3_rl.learner.safe_load import safe_torch_load

    _, items = base
    cfg = learner_cfg(backend="deepspeed", micro_batch_size=2, lora={"r": 4, "alpha": 8},
                      deepspeed={"zero_stage": stage, "dtype": "bf16", "config": {}})

    def bf16_learner(seed: int = 0):
        p = tiny_policy(seed)
        p.model.to(torch.bfloat16)
        return p, build_learner(p, None, SimpleNamespace(learner=cfg))

    policy, learner = bf16_learner()
    frozen = {n for n, q in policy.model.named_parameters() if not q.requires_grad}
    learner.step(copy.deepcopy(items))
    learner.optim.save(tmp_path / "learner")
    (module_file,) = (tmp_path / "learner").rglob("*model_states.pt")
    saved = safe_torch_load(module_file)
    assert not saved.get("frozen_param_fragments")
    assert not any(k.removeprefix("parts.policy.") in frozen for k in (saved.get("module") or {}))
    assert saved["frozen_fingerprint"]
    whole = sum(v.numel() * v.element_size() for v in policy.model.state_dict().values())
    kept = sum(v.numel() * v.element_size() for v in (saved.get("module") or {}).values())
    assert kept < whole / 2  # the adapters, and the tied lm_head's second name (DeepSpeed skips only the first)

    twin_policy, twin = bf16_learner()
    twin.optim.load(tmp_path / "learner")
    with learner.optim.gathered([policy.model]), twin.optim.gathered([twin_policy.model]):
        for k, v in policy.model.state_dict().items():
            assert torch.equal(twin_policy.model.state_dict()[k], v), k
    _assert_same_state(_adam_state(learner), _adam_state(twin))

    _, other = bf16_learner(seed=1)
    with pytest.raises(UserError, match=r"the frozen \(base\) weights loaded from policy.model are not those"):
        other.optim.load(tmp_path / "learner")
