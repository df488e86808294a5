"""bf16 training through fp32 master weights, torch and DeepSpeed backends, at the width users run (2048).

The failure this guards against (main, reproduced by :func:`test_plain_adamw_on_bf16_weights_fails_the_check`):
AdamW applied to bf16 weights directly rounds away most RL-sized steps -- at lr 5e-6 ten steps on a
2048x2048 layer (init std 0.02) changed 7.5% of its weights and moved them about a quarter as far as fp32.

Tolerances (stated once, used everywhere): the update of a bf16 run (its fp32 master weights after the
steps minus before) must change >= 99% of the weights the fp32 run changes, have a norm within 5% of the
fp32 update's, and differ from it by at most ``LAYER_REL_ERR`` (relative L2) on a layer and ``POLICY_REL_ERR``
on the tiny policy.  What remains is bf16 rounding in the forward/backward, which Adam's normalisation
amplifies for near-zero gradients: measured 1.6% (layer) and 6% (tiny policy); plain AdamW on bf16: 97%.
"""
from __future__ import annotations

import copy
import math

import pytest
import torch
from learner_helpers import clone, learner_cfg, sample_items, tiny_policy

from r3_rl.errors import UserError
from r3_rl.learner.optim import TorchOptim
from r3_rl.learner.precision import check_precision
from r3_rl.learner.torch_learner import TorchLearner

WIDTH, LR, STEPS = 2048, 5e-6, 10
LAYER_REL_ERR, POLICY_REL_ERR = 0.05, 0.15


def _layer(dtype: torch.dtype) -> torch.nn.Linear:
    torch.manual_seed(0)
    lin = torch.nn.Linear(WIDTH, WIDTH, bias=False)
    torch.nn.init.normal_(lin.weight, std=0.02)
    return lin.to(dtype)


def _train_layer(lin: torch.nn.Linear, forward, backward, step) -> None:
    """``STEPS`` regression steps on fixed random batches, computed in the layer's dtype."""
    g = torch.Generator().manual_seed(1)
    for _ in range(STEPS):
        x, target = torch.randn(16, WIDTH, generator=g), torch.randn(16, WIDTH, generator=g)
        loss = forward(lambda: ((lin(x.to(lin.weight.dtype)).float() - target) ** 2).mean())  # noqa: B023
        backward(loss)
        step()


def _fp32_update() -> torch.Tensor:
    lin = _layer(torch.float32)
    w0 = lin.weight.detach().clone()
    opt = TorchOptim([lin], learner_cfg(lr=LR))
    _train_layer(lin, lambda f: f(), opt.backward, opt.step)
    return lin.weight.detach() - w0


@pytest.fixture(scope="module")
def fp32_update() -> torch.Tensor:
    torch.set_num_threads(1)
    return _fp32_update()


def assert_update_like_fp32(update: torch.Tensor, fp32: torch.Tensor, rel_err: float) -> None:
    moved = fp32 != 0
    assert float(moved.float().mean()) > 0.99  # fp32 itself moves (nearly) every weight
    assert float((update[moved] != 0).float().mean()) >= 0.99
    assert 0.95 <= float(update.norm() / fp32.norm()) <= 1.05
    assert float((update - fp32).norm() / fp32.norm()) <= rel_err


def test_plain_adamw_on_bf16_weights_fails_the_check(fp32_update) -> None:
    """Main's torch backend (AdamW on the bf16 weights, no master copy): the check must reject it."""
    lin = _layer(torch.bfloat16)
    w0 = lin.weight.detach().float().clone()
    opt = torch.optim.AdamW(lin.parameters(), lr=LR, betas=(0.9, 0.95), weight_decay=0.0)

    def step() -> None:
        opt.step()
        opt.zero_grad()
    _train_layer(lin, lambda f: f(), lambda loss: loss.backward(), step)
    update = lin.weight.detach().float() - w0
    assert float((update != 0).float().mean()) < 0.2
    with pytest.raises(AssertionError):
        assert_update_like_fp32(update, fp32_update, LAYER_REL_ERR)


def test_torch_backend_bf16_layer_trains_like_fp32(fp32_update) -> None:
    lin = _layer(torch.bfloat16)
    w0 = lin.weight.detach().float().clone()
    opt = TorchOptim([lin], learner_cfg(lr=LR))
    assert "masters" not in vars(opt)  # no fp32 copy until it trains (r3-rl eval builds a learner too)
    _train_layer(lin, lambda f: f(), opt.backward, opt.step)
    (master,) = opt.params
    assert master.dtype == torch.float32 and lin.weight.dtype == torch.bfloat16
    assert all(v.dtype == torch.float32 for v in opt.optimizer.state[master].values() if v.numel() > 1)
    assert torch.equal(lin.weight.detach(), master.detach().bfloat16())  # the forward uses the rounded masters
    assert_update_like_fp32(master.detach() - w0, fp32_update, LAYER_REL_ERR)


@pytest.mark.parametrize("zero_stage, offload", [(1, False), (2, False), (3, False), (2, True), (3, True)])
def test_deepspeed_bf16_layer_trains_like_fp32(fp32_update, zero_stage, offload) -> None:
    """DeepSpeed's bf16 optimisers (ZeRO-1: BF16_Optimizer, 2: ZeRO, 3: ZeRO-3) keep fp32 masters and state;
    with ``offload_optimizer`` the step on the CPU partition is torch's fused AdamW (the default loop elsewhere)."""
    pytest.importorskip("deepspeed")
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    from r3_rl.learner.deepspeed_learner import DeepSpeedOptim

    lin = _layer(torch.bfloat16)
    w0 = lin.weight.detach().float().clone()
    config = {"zero_optimization": {"offload_optimizer": {"device": "cpu"}}} if offload else {}
    cfg = learner_cfg(lr=LR, backend="deepspeed", micro_batch_size=16,
                      deepspeed={"zero_stage": zero_stage, "config": config})
    opt = DeepSpeedOptim({"policy": lin}, cfg)
    assert opt.engine.bfloat16_enabled() and opt.engine.get_data_types() == (torch.bfloat16, torch.float32)
    adamw = opt.engine.optimizer.optimizer
    assert isinstance(adamw, torch.optim.AdamW) and bool(adamw.defaults["fused"]) == offload
    _train_layer(lin, lambda f: opt.forward(lambda: (f(), {}, []))[0], opt.backward, opt.step)
    master = safe_get_full_fp32_param(lin.weight)
    assert master.dtype == torch.float32 and master.shape == (WIDTH, WIDTH)
    for key in ("exp_avg", "exp_avg_sq"):
        assert safe_get_full_optimizer_state(lin.weight, key).dtype == torch.float32
    assert_update_like_fp32(master - w0, fp32_update, LAYER_REL_ERR)


def _masters(learner: TorchLearner) -> torch.Tensor:
    if learner.optim.kind == "torch":
        return torch.cat([p.detach().float().reshape(-1) for p in learner.optim.params])
    from deepspeed.utils import safe_get_full_fp32_param

    return torch.cat([safe_get_full_fp32_param(p).reshape(-1) for p in learner.optim.params])


@pytest.mark.parametrize("backend", ["torch", "deepspeed"])
def test_bf16_policy_trains_like_fp32(backend) -> None:
    """The tiny policy, 3 GRPO steps at lr 5e-6 from the same (bf16-representable) weights and items."""
    if backend == "deepspeed":
        pytest.importorskip("deepspeed")
    from r3_rl.learner.build import build_learner

    base = tiny_policy()
    with torch.no_grad():
        for p in base.model.parameters():
            p.copy_(p.bfloat16().float())
    items = sample_items(base)
    updates = {}
    for dtype in (torch.float32, torch.bfloat16):
        policy = clone(base)
        policy.model.to(dtype)
        recipe = type("R", (), {"learner": learner_cfg(lr=LR, micro_batch_size=2, backend=backend,
                                                       deepspeed={"zero_stage": 2})})
        learner = build_learner(policy, policy.frozen_copy(), recipe)
        w0 = _masters(learner).clone()
        for _ in range(3):
            assert learner.step(copy.deepcopy(items))["learner/optimizer_steps"] == 1.0
        updates[dtype] = _masters(learner) - w0
        assert all(p.dtype == dtype for p in policy.model.parameters())
    assert_update_like_fp32(updates[torch.bfloat16], updates[torch.float32], POLICY_REL_ERR)


def test_recomputed_old_logprobs_make_the_first_bf16_ratio_exactly_one() -> None:
    """In bf16 the sampler (one token at a time, KV cache) and the training forward (whole sequences) round
    differently, so the sampler's log-probs give a first ratio off 1; ``learner.old_logp: recompute`` takes the
    old log-probs from the training forward itself (verl's way), and the first ratio is 1."""
    base = tiny_policy()
    base.model.to(torch.bfloat16)
    items = sample_items(base)
    ratios = {}
    for mode in ("sampler", "recompute"):
        learner = TorchLearner(clone(base), None, learner_cfg(micro_batch_size=2, old_logp=mode, lr=LR))
        m = learner.step(copy.deepcopy(items))
        ratios[mode] = max(abs(m["learner/ratio_min"] - 1), abs(m["learner/ratio_max"] - 1))
        if mode == "recompute":
            assert m["learner/sampler_logp_gap_max"] > 0 and m["learner/sampler_logp_gap_mean"] > 0
    assert ratios["sampler"] > 1e-4  # the test can fail: bf16 rounding shows in the sampler's numbers
    assert ratios["recompute"] < 1e-6


def test_a_rank_recomputes_the_old_logprobs_of_its_own_micro_batches_only(monkeypatch) -> None:
    """Each learner rank receives the whole batch but trains every world-th micro-batch: recomputing the old
    log-probs of all of them doubled a rank's learner time (with 4 ranks) instead of adding a quarter.  Rank 1 of
    2 now rescores only its micro-batches, and each in the composition its loss runs."""
    import r3_rl.learner.algorithm as algorithm

    base = tiny_policy()
    base.model.to(torch.bfloat16)
    items = sample_items(base)
    assert len(items) >= 4
    seen: list[list[int]] = []
    real = algorithm.recomputed_logprobs
    monkeypatch.setattr(algorithm, "recomputed_logprobs",
                        lambda policy, rows: seen.append([items.index(r) for r in rows]) or real(policy, rows))
    cfg = learner_cfg(micro_batch_size=2, grad_accum=0, old_logp="recompute", lr=LR)  # one optimiser step: no shuffle
    learner = TorchLearner(clone(base), None, cfg)
    learner.rank, learner.world = 1, 2
    learner.optim.step = lambda: (True, 0.0)  # one rank alone: no all-reduce to wait for
    m = learner.step(list(items))
    mine = [list(c) for c in dict.fromkeys(c for mini in learner.minibatches(len(items))
                                           for c, _ in learner._my_chunks(mini))]  # its filler repeats one
    assert seen == mine and len({i for chunk in seen for i in chunk}) < len(items)
    assert m["learner/ratio_min"] == pytest.approx(1.0, abs=1e-6)
    assert m["learner/ratio_max"] == pytest.approx(1.0, abs=1e-6)


def test_the_ranks_sampler_gap_means_merge_weighted_by_the_actions_each_covers() -> None:
    """A rank's ``sampler_logp_gap_mean`` is over its own micro-batches' actions; the learner reports how many,
    and the ranks' merge weights by them: the mean one process would log over all of them."""
    from r3_rl.learner.ray_ranks import _merge

    base = tiny_policy()
    base.model.to(torch.bfloat16)
    items = sample_items(base)
    learner = TorchLearner(clone(base), None, learner_cfg(micro_batch_size=2, old_logp="recompute", lr=LR))
    m = learner.step(copy.deepcopy(items))
    key = "learner/sampler_logp_gap_mean"
    assert learner.metric_counts[key] == sum(it.segment.num_actions for it in items) and m[key] > 0
    merged = _merge([{key: 1.0, "learner/sampler_logp_gap_max": 2.0}, {key: 4.0, "learner/sampler_logp_gap_max": 5.0}],
                    [{key: 30}, {key: 10}])
    assert merged == {key: (30 * 1.0 + 10 * 4.0) / 40, "learner/sampler_logp_gap_max": 5.0}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_warmup_applies_from_the_first_step(dtype) -> None:
    """AdamW's first step moves every weight by exactly its lr: lr * 1/warmup_steps under a 4-step warm-up."""
    lin = torch.nn.Linear(8, 8, bias=False).to(dtype)
    opt = TorchOptim([lin], learner_cfg(lr=1e-2, warmup_steps=4))
    opt.zero_grad()
    w0 = lin.weight.detach().float().clone()
    opt.backward(lin(torch.ones(2, 8, dtype=dtype)).float().sum())
    assert opt.step()[0]
    torch.testing.assert_close((opt.params[0].detach() - w0).abs(), torch.full((8, 8), 2.5e-3), rtol=1e-3, atol=0)
    assert opt.lr() == pytest.approx(5e-3)


def test_torch_master_weights_resume_exactly_and_skip_nonfinite_steps(tmp_path) -> None:
    def bf16_learner() -> TorchLearner:
        p = tiny_policy()
        p.model.to(torch.bfloat16)
        return TorchLearner(p, p.frozen_copy(), learner_cfg(lr=1e-3, micro_batch_size=2))

    items = sample_items(tiny_policy())
    a = bf16_learner()
    a.step(copy.deepcopy(items))
    saved = a.optim.masters.state_dict()  # the live masters, not a second set (29.6 GB more at 7B on every save)
    assert [m.data_ptr() for m in saved] == [m.data_ptr() for _, m in a.optim.masters._pairs]
    a.save(tmp_path / "learner")
    b = bf16_learner()
    import r3_rl.learner.safe_load as safe_load

    reads: list = []
    real = safe_load.safe_torch_load
    with pytest.MonkeyPatch.context() as mp:  # the saved state is read onto the CPU, not beside the live one
        mp.setattr(safe_load, "safe_torch_load", lambda path, **kw: reads.append(kw) or real(path, **kw))
        b.load(tmp_path / "learner")  # the masters come back from the optimiser state, not from the bf16 weights
    assert {"map_location": "cpu"} in reads
    assert torch.equal(_masters(a), _masters(b))
    a.step(copy.deepcopy(items))
    b.step(copy.deepcopy(items))
    assert torch.equal(_masters(a), _masters(b))
    assert all(torch.equal(x, y) for x, y in zip(a.policy.model.parameters(), b.policy.model.parameters()))

    before = _masters(a).clone()
    norm = a.policy.model.model.norm.weight
    hook = norm.register_hook(lambda g: torch.full_like(g, math.inf))
    m = a.step(copy.deepcopy(items))
    hook.remove()
    assert m["learner/nonfinite_skipped"] == 1.0 and torch.equal(_masters(a), before)
    assert all(p.grad is None for p in a.optim.params)


@pytest.mark.parametrize("policy_dtype, learner, match", [
    ("float16", {}, "policy.dtype: float16 is not supported"),
    ("float16", {"backend": "deepspeed"}, "policy.dtype: float16 is not supported"),
    ("float32", {"backend": "deepspeed", "deepspeed": {"dtype": "bf16"}},
     "learner.deepspeed.dtype: bf16 disagrees with policy.dtype: float32"),
    ("bfloat16", {"deepspeed": {"dtype": "fp32"}}, "learner.deepspeed.dtype: fp32 disagrees with policy.dtype"),
    ("bfloat16", {"backend": "deepspeed", "deepspeed": {"zero_stage": 0}}, "zero_stage: 0 with bf16"),
])
def test_combinations_that_cannot_train_are_one_line_errors(policy_dtype, learner, match) -> None:
    from r3_rl.policy.base import DTYPES

    with pytest.raises(UserError, match=match) as e:
        check_precision(DTYPES[policy_dtype], learner_cfg(**learner))
    assert "\n" not in str(e.value)


def test_cli_refuses_before_loading_anything(tmp_path, capsys) -> None:
    from conftest import REPO

    from r3_rl.cli import main

    run = tmp_path / "run"
    code = main(["train", str(REPO / "recipes" / "tiny_blocks.yaml"), "--run-dir", str(run),
                 "--set", "policy.dtype=bfloat16", "--set", "learner.backend=deepspeed",
                 "--set", "learner.deepspeed.dtype=fp32"])
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].endswith(
        "tiny_blocks.yaml: learner.deepspeed.dtype: fp32 disagrees with policy.dtype: bfloat16 (the compute dtype of "
        "rollout and learner); set learner.deepspeed.dtype: bf16 or leave it out")
    assert not run.exists()  # refused in the preflight, before the run dir or any model


def test_deepspeed_reduces_bf16_gradients_in_fp32() -> None:
    """ZeRO-1's fp32-accumulated gradient reaches the optimiser in fp32: DeepSpeed's default cast it to bf16 for
    the reduction, even on one rank (its grad norm was the fp32 one rounded to bf16, 1.4e-4 off the torch
    driver's; now equal).  ZeRO-2 reduces each micro-batch as backward makes it: on one rank the setting changes
    nothing there (its norm is 8e-5 off either way), across ranks the reduction is now in fp32 too."""
    zero_stage = 1
    pytest.importorskip("deepspeed")
    from r3_rl.learner.deepspeed_learner import DeepSpeedOptim

    g = torch.Generator().manual_seed(2)
    batches = [(torch.randn(16, WIDTH, generator=g), torch.randn(16, WIDTH, generator=g)) for _ in range(3)]

    def loss_of(lin):
        return lambda x, t: ((lin(x.bfloat16()).float() - t) ** 2).mean() / len(batches)

    mine = _layer(torch.bfloat16)
    torch_opt = TorchOptim([mine], learner_cfg(lr=LR))
    for x, t in batches:
        torch_opt.backward(loss_of(mine)(x, t))
    _, torch_norm = torch_opt.step()
    theirs = _layer(torch.bfloat16)
    ds = DeepSpeedOptim({"policy": theirs}, learner_cfg(lr=LR, backend="deepspeed", micro_batch_size=16,
                                                         deepspeed={"zero_stage": zero_stage}))
    assert ds.engine.communication_data_type == torch.float32
    for x, t in batches:
        ds.backward(ds.forward(lambda: (loss_of(theirs)(x, t), {}, []))[0])  # noqa: B023
    _, ds_norm = ds.step()
    assert ds_norm == pytest.approx(torch_norm, rel=2e-6)
