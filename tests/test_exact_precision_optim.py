"""Exact small cases for training precision, the optimiser drivers and their schedule, the DeepSpeed config and
driver helpers, and the learner ranks' bookkeeping (round 14B audit).

Each case pins a behaviour a one-point mutation of ``r3_rl/learner/{precision,optim,deepspeed_config,
deepspeed_learner,ray_ranks}.py`` changed without the suite noticing.  Expected values are worked by hand (bf16
values chosen so that fp32 and bf16 accumulation differ), or come from a peer: torch's own ``clip_grad_norm_`` /
vector norm, DeepSpeed's own engine, a reduction written out over a fake peer rank.
"""
from __future__ import annotations

import math
import os
from pathlib import Path
from types import SimpleNamespace as NS
from typing import Any

import pytest
import torch
from learner_helpers import learner_cfg

from r3_rl.errors import UserError

# ------------------------------------------------------------------------------------------------------ precision


def test_compute_dtype_without_floating_point_parameters_is_float32() -> None:
    from r3_rl.learner.precision import compute_dtype

    assert compute_dtype(torch.nn.Module()) == torch.float32
    frozen_int = torch.nn.Module()
    frozen_int.register_parameter("ids", torch.nn.Parameter(torch.arange(5), requires_grad=False))
    assert compute_dtype(frozen_int) == torch.float32
    mixed = torch.nn.ModuleList([torch.nn.Linear(4, 4).bfloat16(), torch.nn.Linear(1, 1)])  # 20 bf16, 2 fp32
    assert compute_dtype(mixed) == torch.bfloat16


def _bf16_weight(values: list[float]) -> torch.nn.Parameter:
    return torch.nn.Parameter(torch.tensor(values, dtype=torch.bfloat16))


def test_master_gradients_accumulate_micro_batches_in_fp32_and_free_the_bf16_gradient() -> None:
    """Two backward passes: the master's fp32 gradient is their sum, 1 + 2^-7 + 2^-9 (not a bf16 value: bf16 would
    round it to 1 + 2^-7), and the bf16 parameter holds no gradient after either."""
    from r3_rl.learner.precision import MasterWeights

    p = _bf16_weight([0.5, -0.25])
    mw = MasterWeights([p])
    (master,) = mw.params
    assert master.dtype == torch.float32 and mw.active
    a = torch.tensor([1.0 + 2 ** -7, 2.0], dtype=torch.bfloat16)
    b = torch.tensor([2 ** -9, -3.0], dtype=torch.bfloat16)
    (p * a).sum().backward()
    assert p.grad is None and master.grad.tolist() == [1.0 + 2 ** -7, 2.0]
    (p * b).sum().backward()
    assert p.grad is None
    assert master.grad.tolist() == [1.0 + 2 ** -7 + 2 ** -9, -1.0]
    mw.zero_grad()
    assert master.grad is None and p.grad is None


def test_a_second_master_copy_of_a_parameter_takes_over_its_gradients() -> None:
    """A newer optimiser over the same bf16 weights (a rebuilt learner) owns their gradients; the old hook is gone."""
    from r3_rl.learner.precision import MasterWeights

    p = _bf16_weight([1.0, 2.0])
    old, new = MasterWeights([p]), MasterWeights([p])
    (p * torch.tensor([3.0, 4.0], dtype=torch.bfloat16)).sum().backward()
    assert old.params[0].grad is None
    assert new.params[0].grad.tolist() == [3.0, 4.0] and p.grad is None


def test_master_weights_refuse_a_saved_state_of_another_length() -> None:
    from r3_rl.learner.precision import MasterWeights

    mw = MasterWeights([_bf16_weight([1.0]), torch.nn.Parameter(torch.zeros(2))])  # one bf16, one fp32 (no master)
    with pytest.raises(ValueError, match="^0 master weights saved, 1 expected$"):
        mw.load_state_dict([])
    with pytest.raises(ValueError, match="^2 master weights saved, 1 expected$"):
        mw.load_state_dict([torch.zeros(1), torch.zeros(1)])


def test_loaded_master_weights_are_rounded_into_the_model_at_once() -> None:
    """After a resume the forward must use the loaded weights before the first step, not the model's stale ones."""
    from r3_rl.learner.precision import MasterWeights

    p = _bf16_weight([0.0, 0.0])
    mw = MasterWeights([p])
    saved = torch.tensor([1.0 + 2 ** -10, -3.0])  # 1 + 2^-10 rounds to 1.0 in bf16
    mw.load_state_dict([saved])
    assert mw.params[0].tolist() == [1.0 + 2 ** -10, -3.0]
    assert p.dtype == torch.bfloat16 and p.tolist() == [1.0, -3.0]


def test_torch_optim_checks_the_precision_of_the_first_module() -> None:
    """The policy (first module) decides the compute dtype: an fp32 value head beside a bf16 policy does not turn a
    ``learner.deepspeed.dtype: fp32`` that disagrees with ``policy.dtype: bfloat16`` into an agreement."""
    from r3_rl.learner.optim import TorchOptim

    policy, head = torch.nn.Linear(4, 4).bfloat16(), torch.nn.Linear(4, 1)
    with pytest.raises(UserError, match="learner.deepspeed.dtype: fp32 disagrees with policy.dtype: bfloat16"):
        TorchOptim([policy, head], learner_cfg(deepspeed={"dtype": "fp32"}))


# ------------------------------------------------------------------------------------------- schedule and AdamW


def test_decay_ending_where_the_warm_up_ends_is_constant_after_it() -> None:
    from r3_rl.learner.optim import warmup_lambda

    same = warmup_lambda(3, 3, 0.5)
    assert [same(s) for s in range(5)] == pytest.approx([1 / 3, 2 / 3, 1.0, 1.0, 1.0])
    earlier = warmup_lambda(4, 2, 0.0)
    assert [earlier(s) for s in range(5)] == pytest.approx([0.25, 0.5, 0.75, 1.0, 1.0])


def test_a_negative_warm_up_counts_as_none() -> None:
    from r3_rl.learner.optim import warmup_lambda

    neg, none = warmup_lambda(-2, 4, 0.0), warmup_lambda(0, 4, 0.0)
    assert [neg(s) for s in range(5)] == [none(s) for s in range(5)] == pytest.approx([0.75, 0.5, 0.25, 0.0, 0.0])


def test_trainable_lists_a_shared_weight_once_with_the_first_modules_rate() -> None:
    """A value head over the policy's trunk: the trunk's weights are the policy's (lr None), listed once, and one
    AdamW step moves a shared weight by lr once (listed twice it stepped twice, by 2 lr)."""
    from r3_rl.learner.optim import TorchOptim, trainable

    trunk, head = torch.nn.Linear(2, 2, bias=False), torch.nn.Linear(2, 1, bias=False)
    frozen = torch.nn.Linear(2, 2, bias=False).requires_grad_(False)
    policy, critic = torch.nn.Sequential(trunk, frozen), torch.nn.Sequential(trunk, head)
    params, rates = trainable([policy, critic], [None, 0.5])
    assert [id(p) for p in params] == [id(trunk.weight), id(head.weight)] and rates == [None, 0.5]
    opt = TorchOptim([policy, critic], learner_cfg(lr=0.1))
    w0 = trunk.weight.detach().clone()
    opt.backward(critic(torch.ones(1, 2)).sum() * 3.0)
    assert opt.step()[0]
    torch.testing.assert_close((trunk.weight.detach() - w0).abs(), torch.full((2, 2), 0.1), rtol=1e-4, atol=0)


def test_make_adamw_takes_the_recipes_options_and_groups_rates_in_first_seen_order() -> None:
    from r3_rl.learner.optim import make_adamw

    ps = [torch.nn.Parameter(torch.zeros(1)) for _ in range(4)]
    opt = make_adamw(ps, learner_cfg(lr=0.1, betas=(0.8, 0.9), weight_decay=0.01), [0.5, None, 0.5, None])
    assert [(g["lr"], [id(p) for p in g["params"]]) for g in opt.param_groups] == [
        (0.5, [id(ps[0]), id(ps[2])]), (0.1, [id(ps[1]), id(ps[3])])]
    assert all(g["betas"] == (0.8, 0.9) and g["weight_decay"] == 0.01 for g in opt.param_groups)


def _linear_optim(**cfg: Any) -> tuple[torch.nn.Linear, Any]:
    from r3_rl.learner.optim import TorchOptim

    torch.manual_seed(0)
    lin = torch.nn.Linear(3, 2, bias=False)
    return lin, TorchOptim([lin], learner_cfg(**cfg))


def test_grad_clip_zero_leaves_the_gradient_whole() -> None:
    """``grad_clip: 0`` is no clipping: AdamW's first step then moves every weight by lr (a max norm of 0 would zero
    the gradient and move nothing); the reported norm is the gradient's own, 5 * sqrt(2 * 3)."""
    lin, opt = _linear_optim(lr=0.1, grad_clip=0.0)
    w0 = lin.weight.detach().clone()
    opt.backward((lin(torch.full((1, 3), 5.0)) * torch.tensor([1.0, -1.0])).sum())
    applied, norm = opt.step()
    assert applied and norm == pytest.approx(5.0 * math.sqrt(6.0))
    torch.testing.assert_close(lin.weight.detach() - w0, torch.tensor([[-0.1] * 3, [0.1] * 3]), rtol=1e-4, atol=0)


def test_an_applied_step_frees_the_gradients() -> None:
    """After a step nothing holds a gradient (fp32 masters' gradients are a full model copy kept through rollout)."""
    lin, opt = _linear_optim(lr=0.1)
    opt.backward(lin(torch.ones(1, 3)).sum())
    assert opt.step()[0]
    assert all(p.grad is None for p in opt.params) and lin.weight.grad is None


def test_lr_reports_the_policys_rate_not_the_critics() -> None:
    from r3_rl.learner.optim import TorchOptim

    opt = TorchOptim([torch.nn.Linear(2, 2), torch.nn.Linear(2, 1)], learner_cfg(lr=0.1, warmup_steps=2), [None, 0.5])
    assert opt.lr() == pytest.approx(0.05)
    assert [g["lr"] for g in opt.optimizer.param_groups] == pytest.approx([0.05, 0.25])


def test_a_resume_reports_and_goes_on_at_the_recipes_rate(tmp_path: Path) -> None:
    """Saved at lr 0.1 after one step of a 4-step warm-up, resumed with lr 0.2: the rate is 0.2 x schedule at once
    (``lr()`` before any step) and after the next step."""
    lin, opt = _linear_optim(lr=0.1, warmup_steps=4)
    opt.backward(lin(torch.ones(1, 3)).sum())
    opt.step()
    opt.save(tmp_path)
    lin2, opt2 = _linear_optim(lr=0.2, warmup_steps=4)
    opt2.load(tmp_path)
    assert opt2.lr() == pytest.approx(0.2 * 2 / 4)
    opt2.backward(lin2(torch.ones(1, 3)).sum())
    opt2.step()
    assert opt2.lr() == pytest.approx(0.2 * 3 / 4)


# --------------------------------------------------------------------------------------------- DeepSpeed config


def test_ds_config_without_grad_accum_is_one_micro_batch_per_rank_step() -> None:
    from r3_rl.learner.deepspeed_config import ds_config

    c = ds_config(learner_cfg(backend="deepspeed", micro_batch_size=3, grad_accum=0), world_size=2)
    assert c["gradient_accumulation_steps"] == 1 and c["train_batch_size"] == 6


def test_ds_config_merges_a_users_section_the_learner_does_not_write() -> None:
    from r3_rl.learner.deepspeed_config import ds_config

    cfg = learner_cfg(backend="deepspeed", deepspeed={"zero_stage": 1, "config": {
        "flops_profiler": {"enabled": False}, "zero_optimization": {"reduce_bucket_size": 1000}}})
    c = ds_config(cfg)
    assert c["flops_profiler"] == {"enabled": False}
    assert c["zero_optimization"] == {"stage": 1, "reduce_bucket_size": 1000}


def test_ds_config_bf16_accumulates_and_reduces_in_fp32_and_fp32_sets_neither() -> None:
    from r3_rl.learner.deepspeed_config import ds_config

    cfg = learner_cfg(backend="deepspeed")
    bf16, fp32 = ds_config(cfg, 1, "bf16"), ds_config(cfg, 1, "fp32")
    assert bf16["bf16"] == {"enabled": True} and bf16["data_types"] == {"grad_accum_dtype": "fp32"}
    assert bf16["communication_data_type"] == "fp32"
    assert fp32["bf16"] == {"enabled": False} and "data_types" not in fp32 and "communication_data_type" not in fp32


def test_optimizer_offload_reads_the_optimizer_device_only() -> None:
    from r3_rl.learner.deepspeed_config import optimizer_offload

    zero = {"offload_optimizer": {"device": "nvme"}, "offload_param": {"device": "cpu"}}
    assert optimizer_offload({"zero_optimization": zero}) == "nvme"
    assert optimizer_offload({"zero_optimization": {"offload_param": {"device": "cpu"}}}) == "none"
    assert optimizer_offload({"zero_optimization": None}) == optimizer_offload({}) == "none"


def test_pick_accelerator_uses_a_gpu_unless_ds_accelerator_is_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    from r3_rl.learner.deepspeed_config import pick_accelerator

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.delenv("DS_ACCELERATOR", raising=False)
    assert pick_accelerator() is True and "DS_ACCELERATOR" not in os.environ
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    assert pick_accelerator() is False
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.delenv("DS_ACCELERATOR")
    assert pick_accelerator() is False and os.environ["DS_ACCELERATOR"] == "cpu"


def test_deepspeeds_refusal_quotes_the_first_40_characters_of_the_value() -> None:
    pytest.importorskip("deepspeed")
    from r3_rl.learner.deepspeed_config import check_ds_config

    value = "a-bucket-size-of-many-bytes-written-out-in-words"  # 48 characters
    cfg = learner_cfg(backend="deepspeed", deepspeed={"config": {"zero_optimization": {"reduce_bucket_size": value}}})
    with pytest.raises(UserError) as got:
        check_ds_config(cfg, "fp32")
    assert str(got.value) == ("key 'learner.deepspeed.config': DeepSpeed refuses it: DeepSpeedZeroConfig.reduce_bucket_size: "
                              "Input should be a valid integer, unable to parse string as an integer, got " + value[:40])


# --------------------------------------------------------------------------------------------- DeepSpeed driver


def test_ensure_dist_env_keeps_a_given_extensions_dir_and_defaults_to_the_home_cache(
        monkeypatch: pytest.MonkeyPatch) -> None:
    import r3_rl.learner.deepspeed_learner as dsm

    monkeypatch.setattr(dsm, "pick_accelerator", lambda: False)
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", "/somewhere/ext")
    dsm.ensure_dist_env()
    assert os.environ["TORCH_EXTENSIONS_DIR"] == "/somewhere/ext"
    monkeypatch.delenv("TORCH_EXTENSIONS_DIR")
    dsm.ensure_dist_env()
    assert os.environ["TORCH_EXTENSIONS_DIR"] == str(Path.home() / ".cache" / "torch_extensions")


def _ds(**kw: Any) -> Any:
    from r3_rl.learner.deepspeed_learner import DeepSpeedOptim

    obj = DeepSpeedOptim.__new__(DeepSpeedOptim)
    obj.__dict__.update(kw)
    return obj


@pytest.mark.parametrize("mine, peer, want", [(False, 1.0, True), (True, 0.0, True), (False, 0.0, False)])
def test_any_rank_is_true_when_any_rank_saw_a_bad_gradient(monkeypatch: pytest.MonkeyPatch, mine: bool, peer: float,
                                                           want: bool) -> None:
    """The flag all-reduced over two ranks (the peer's flag given here): a MAX, so one bad rank skips every rank."""
    import torch.distributed as dist

    combine = {dist.ReduceOp.MAX: max, dist.ReduceOp.MIN: min, dist.ReduceOp.SUM: lambda a, b: a + b}

    def all_reduce(t: torch.Tensor, op: Any) -> None:
        t.fill_(combine[op](float(t), peer))
    monkeypatch.setattr(dist, "all_reduce", all_reduce)
    assert _ds(world_size=2, engine=NS(device="cpu"))._any_rank(mine) is want


def test_zero0_discard_clears_the_engines_gradient() -> None:
    ev: list[str] = []
    _ds(manual_check=True, engine=NS(zero_grad=lambda: ev.append("zero_grad"))).discard(None)
    assert ev == ["zero_grad"]


def test_lr_reports_the_first_groups_rate() -> None:
    assert _ds(engine=NS(get_lr=lambda: [0.1, 0.5])).lr() == 0.1


def test_load_without_a_deepspeed_state_is_an_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """DeepSpeed's ``load_checkpoint`` returns no path for a folder without its state: a resume must not go on
    from freshly initialised optimiser state."""
    import r3_rl.learner.deepspeed_learner as dsm
    import r3_rl.learner.safe_load as sl

    monkeypatch.setattr(sl, "make_deepspeed_loads_safe", lambda engine: None)
    monkeypatch.setattr(dsm, "frozen_names", lambda container: set())
    monkeypatch.setattr(dsm, "resume_with_recipe_hyperparameters", lambda opt, sched, load: (None, None))
    ds = _ds(engine=NS(optimizer=NS(), lr_scheduler=None), container=None, frozen_fingerprint=None)
    with pytest.raises(FileNotFoundError, match="no DeepSpeed state"):
        ds.load(tmp_path)


def test_zero0_fp32_reports_the_unclipped_norm_and_clips_once() -> None:
    """ZeRO-0 fp32: the driver clips (DeepSpeed's own clipping off) and reports the gradient's norm before clipping,
    as the torch driver does; the gradient the step uses has norm grad_clip."""
    pytest.importorskip("deepspeed")
    from r3_rl.learner.deepspeed_learner import DeepSpeedOptim

    torch.manual_seed(0)
    lin = torch.nn.Linear(3, 2, bias=False)
    opt = DeepSpeedOptim({"policy": lin}, learner_cfg(backend="deepspeed", micro_batch_size=1, grad_clip=1.0,
                                                       deepspeed={"zero_stage": 0}))
    assert opt.manual_check and opt.engine.gradient_clipping() == 0.0
    seen: list[float] = []
    opt.engine.optimizer.register_step_pre_hook(lambda *_: seen.append(float(lin.weight.grad.norm())))
    x = torch.full((1, 3), 5.0)
    loss = opt.forward(lambda: ((lin(x) * torch.tensor([1.0, -1.0])).sum(), {}, []))[0]
    opt.backward(loss)
    applied, norm = opt.step()
    assert applied and norm == pytest.approx(5.0 * math.sqrt(6.0)) and seen[0] == pytest.approx(1.0, rel=1e-5)


def test_deepspeed_leaves_the_weighted_loss_undivided_by_grad_accum() -> None:
    """The learner weights each micro-batch loss itself: with ``grad_accum: 3`` DeepSpeed must not divide it by 3 again
    (``scale_wrt_gas=False``); the ZeRO-2 engine's gradient norm is the loss's own, 5 * sqrt(6)."""
    pytest.importorskip("deepspeed")
    from r3_rl.learner.deepspeed_learner import DeepSpeedOptim

    torch.manual_seed(0)
    lin = torch.nn.Linear(3, 2, bias=False)
    opt = DeepSpeedOptim({"policy": lin}, learner_cfg(backend="deepspeed", micro_batch_size=1, grad_accum=3,
                                                       grad_clip=0.0, deepspeed={"zero_stage": 2}))
    assert opt.engine.gradient_accumulation_steps() == 3
    x = torch.full((1, 3), 5.0)
    opt.backward(opt.forward(lambda: ((lin(x) * torch.tensor([1.0, -1.0])).sum(), {}, []))[0])
    applied, norm = opt.step()
    assert applied and norm == pytest.approx(5.0 * math.sqrt(6.0), rel=1e-5)


# ----------------------------------------------------------------------------------------------- learner ranks


def test_merge_takes_the_min_of_a_min_even_with_counts() -> None:
    """The learner counts every per-micro-batch metric, mins and maxes too: they merge as min / max, not means."""
    from r3_rl.learner.ray_ranks import _merge

    merged = _merge([{"learner/ratio_min": 0.5, "learner/ratio_max": 1.5}, {"learner/ratio_min": 0.25,
                                                                            "learner/ratio_max": 1.25}],
                    [{"learner/ratio_min": 2, "learner/ratio_max": 2}, {"learner/ratio_min": 1, "learner/ratio_max": 1}])
    assert merged == {"learner/ratio_min": 0.25, "learner/ratio_max": 1.5}


def test_merge_keeps_a_metric_only_a_later_rank_logged() -> None:
    """Ranks run different micro-batches: with text on rank 0 and images on rank 1 only rank 1 logs ``kl_image``
    (``kl_by_modality`` leaves a modality without rows out).  One learner would log it: so must the merge (it
    iterated rank 0's keys only and dropped it)."""
    from r3_rl.learner.ray_ranks import _merge

    merged = _merge([{"learner/kl_text": 0.5, "learner/loss": 1.0}, {"learner/kl_image": 0.25, "learner/loss": 2.0,
                                                                       "learner/ratio_max": 1.5}],
                    [{"learner/kl_text": 1}, {"learner/kl_image": 1, "learner/ratio_max": 1}])
    assert merged == {"learner/kl_text": 0.5, "learner/kl_image": 0.25, "learner/loss": 3.0, "learner/ratio_max": 1.5}


def _rank(rank: int, **kw: Any) -> Any:
    from r3_rl.learner.ray_ranks import LearnerRank

    r = LearnerRank.__new__(LearnerRank)
    r.rank, r.world = rank, 2
    r.__dict__.update(kw)
    return r


def test_rank_0_saves_the_learner_and_other_ranks_their_deepspeed_state_each_with_its_rng(tmp_path: Path) -> None:
    from r3_rl.learner.safe_load import safe_torch_load

    calls: list[tuple[str, Path]] = []

    def save(p: Path) -> None:  # the learner's own save makes its folder
        calls.append(("learner", p))
        p.mkdir(parents=True)
    learner = NS(save=save, optim=NS(save=lambda p: calls.append(("optim", p))))
    _rank(0, learner=learner).save(str(tmp_path / "a"))
    _rank(1, learner=learner).save(str(tmp_path / "b"))
    assert calls == [("learner", tmp_path / "a"), ("optim", tmp_path / "b")]
    assert sorted(p.name for p in (tmp_path / "b").iterdir()) == ["rng_rank1.pt"]
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["rng_rank0.pt"]
    assert torch.equal(safe_torch_load(tmp_path / "b" / "rng_rank1.pt")["torch_rng"], torch.get_rng_state())


def test_a_rank_restores_its_own_rng_when_the_checkpoint_has_it(tmp_path: Path) -> None:
    from r3_rl.rng_state import global_rng_state

    learner = NS(load=lambda p: None)
    _rank(1, learner=learner, reference_is_copy=False).load(str(tmp_path), None)  # no rng file: an old checkpoint
    torch.manual_seed(123)
    torch.save(global_rng_state(), tmp_path / "rng_rank1.pt")
    want = torch.rand(3)
    torch.manual_seed(7)
    _rank(1, learner=learner, reference_is_copy=False).load(str(tmp_path), None)
    assert torch.equal(torch.rand(3), want)


def test_a_rank_sends_its_trainable_weights_or_all_of_them() -> None:
    from r3_rl.ray_runtime import unpack_state

    t = torch.tensor([1.0, 2.0])
    policy = NS(trainable_state_dict=lambda: {"lora": t}, state_dict=lambda: {"lora": t, "base": t * 3})
    r = _rank(0, policy=policy)
    assert sorted(unpack_state(r.weights(trainable_only=True))) == ["lora"]
    full = unpack_state(r.weights())
    assert sorted(full) == ["base", "lora"] and full["base"].tolist() == [3.0, 6.0]


def test_a_rank_step_returns_its_metrics_and_the_counts_behind_them() -> None:
    learner = NS(step=lambda items: {"learner/kl_mean": 0.5}, metric_counts={"learner/kl_mean": 3})
    assert _rank(1, learner=learner).step(["x"]) == ({"learner/kl_mean": 0.5}, {"learner/kl_mean": 3})


def test_a_rank_set_up_joins_as_its_rank_and_trains_as_one_of_world(monkeypatch: pytest.MonkeyPatch) -> None:
    """The rank's learner must know its rank and the world (it takes every world-th micro-batch and scales its loss
    by world); the policy it builds is one process's (``learner.ranks`` 1)."""
    import r3_rl.config as config
    import r3_rl.learner.ray_ranks as rk
    import r3_rl.policy.registry as registry
    from r3_rl.ray_runtime import pack_state

    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.setenv(key, "unset")  # restored after the test
    recipe = NS(ray=NS(collective_timeout_s=5.0), learner=NS(lora=None, ranks=2))
    monkeypatch.setattr(config.Recipe, "model_validate", classmethod(lambda cls, data: recipe))
    built: list[Any] = []
    monkeypatch.setattr(registry, "build_policy", lambda r: built.append(r.learner.ranks) or NS(
        load_state_dict=lambda state, version: built.append((sorted(state), version))))
    monkeypatch.setattr(rk, "join_process_group", lambda timeout_s: built.append(os.environ["RANK"]))
    monkeypatch.setattr(rk, "bound_all_collectives", lambda timeout_s: None)
    learner = NS()
    monkeypatch.setattr(rk, "learner_from_recipe", lambda policy, reference, r, adapters: learner)
    r = _rank(1, recipe_data={})
    assert r.setup(("10.0.0.1", 29500), pack_state({"w": torch.zeros(1)}), None, 7) is True
    assert (learner.rank, learner.world) == (1, 2) and r.learner is learner and r.reference is None
    assert built == ["1", 1, (["w"], 7)]
    assert [os.environ[k] for k in ("WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")] == ["2", "10.0.0.1", "29500"]


def test_a_checkpoint_file_the_trainer_cannot_see_names_its_rank_and_node(tmp_path: Path,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    import r3_rl.learner.ray_ranks as rk
    from r3_rl.ray_actors import ClusterError

    monkeypatch.setattr(rk, "kill_actors", lambda actors: None)
    (tmp_path / "learner.pt").write_bytes(b"1234")
    files = [{"learner.pt": 4}, {"learner.pt": 4, "deepspeed/a.pt": 2, "deepspeed/b.pt": 3}]
    lr = rk.RankedLearner.__new__(rk.RankedLearner)
    lr.nodes = ["n0", "n1"]
    lr.ranks = [NS(save=NS(remote=lambda path: "saved"), files=NS(remote=lambda path, k=k: k)) for k in (0, 1)]
    lr._all = lambda refs, what: [files[r] if isinstance(r, int) else r for r in refs]
    with pytest.raises(ClusterError) as got:
        lr.save(tmp_path)
    assert str(got.value) == ("learner rank 1 (node n1) wrote deepspeed/a.pt where the trainer cannot see it (2 file(s) "
                              "in all): out_dir must be a folder every node shares; the checkpoint was not completed")
