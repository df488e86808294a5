"""Our GRPO loss and advantages against TRL's own code (trl >= 1.0, ``trl/trainer/grpo_trainer.py``).

The loss is computed by TRL's real ``GRPOTrainer._compute_loss``, called unbound on a minimal stand-in for
the trainer: ``args`` is a real ``GRPOConfig``; the attributes that ``GRPOTrainer.__init__`` derives from it
(``beta``, ``epsilon_low``/``epsilon_high``, ``loss_type``, ``max_completion_length``, ...) are copied the way
``__init__`` does; ``_get_per_token_logps_and_entropies`` returns our log-prob tensor (so TRL's gradient
flows to the very leaf we differentiate), and the accelerator is the identity of a single process.  A
trainer built through ``__init__`` would need a model, a dataset and reward functions and would not change
the loss code path.  If a TRL release starts reading an attribute we do not set, the test fails with an
AttributeError naming it instead of silently testing something else.
"""
from __future__ import annotations

import types
from collections import defaultdict

import pytest
import torch
import trl.trainer.grpo_trainer as trl_grpo  # trl is a dependency: a missing trl must fail, not skip
from trl import GRPOConfig
from trl.trainer.utils import nanstd

from r3_rl.algorithms.advantages import group_advantages
from r3_rl.algorithms.losses import clipped_policy_loss

D = torch.float64
B, T, MAX_LEN = 6, 7, 9
EPS_LOW, EPS_HIGH, BETA = 0.2, 0.28, 0.04
OURS = {"bnpo": "token_mean", "dapo": "token_mean", "grpo": "seq_mean", "dr_grpo": "dr_grpo"}


def make_inputs(seed: int):
    g = torch.Generator().manual_seed(seed)
    old = -3 * torch.rand(B, T, generator=g, dtype=D)
    logp = old + 0.5 * torch.randn(B, T, generator=g, dtype=D)  # wide enough that both clip sides trigger
    ref = old + 0.3 * torch.randn(B, T, generator=g, dtype=D)
    lengths = torch.tensor([T, 1, 4, T - 1, 3, 5])  # right padding, varied lengths
    mask = (torch.arange(T)[None, :] < lengths[:, None]).long()
    adv = torch.randn(B, generator=g, dtype=D)
    return logp, old, ref, mask, adv


def trl_loss(loss_type: str, logp: torch.Tensor, old, ref, mask, adv,
             bias_correction_kl: bool) -> tuple[torch.Tensor, dict[str, list[float]]]:
    """TRL's loss on our tensors, and the metrics TRL logged while computing it."""
    args = GRPOConfig(output_dir="unused", beta=BETA, epsilon=EPS_LOW, epsilon_high=EPS_HIGH, loss_type=loss_type,
                      max_completion_length=MAX_LEN, use_bias_correction_kl=bias_correction_kl, report_to=[],
                      use_cpu=True)
    identity = types.SimpleNamespace(gather=lambda x: x, gather_for_metrics=lambda x: x,
                                     reduce=lambda x, reduction="sum": x, num_processes=1, is_main_process=True)
    trainer = types.SimpleNamespace(
        args=args, accelerator=identity, model=types.SimpleNamespace(training=True),
        _metrics={"train": defaultdict(list)},
        # derived from args exactly as GRPOTrainer.__init__ does
        beta=args.beta, epsilon_low=args.epsilon,
        epsilon_high=args.epsilon_high if args.epsilon_high is not None else args.epsilon,
        loss_type=args.loss_type, max_completion_length=args.max_completion_length,
        importance_sampling_level=args.importance_sampling_level, top_entropy_quantile=args.top_entropy_quantile,
        off_policy_mask_threshold=args.off_policy_mask_threshold, use_vllm=False,
        vllm_importance_sampling_correction=False, aux_loss_enabled=False, _entropy_bonus_enabled=False,
        current_gradient_accumulation_steps=1,
        _get_per_token_logps_and_entropies=lambda *a, **k: (logp, torch.zeros_like(logp), None),
    )
    inputs = {"prompt_ids": torch.zeros(B, 2, dtype=torch.long), "prompt_mask": torch.ones(B, 2, dtype=torch.long),
              "completion_ids": torch.zeros(B, T, dtype=torch.long), "completion_mask": mask,
              "advantages": adv, "old_per_token_logps": old, "ref_per_token_logps": ref,
              "num_items_in_batch": mask.sum()}  # dapo: the generation batch's token count (one process)
    loss = trl_grpo.GRPOTrainer._compute_loss(trainer, None, inputs)
    metrics = trainer._metrics["train"]
    assert metrics["clip_ratio/region_mean"], "TRL did not take the clipped-loss branch"
    return loss, metrics


@pytest.mark.parametrize("bias_correction_kl", [False, True])
@pytest.mark.parametrize("trl_type", ["bnpo", "dapo", "grpo", "dr_grpo"])
def test_loss_and_gradient_match_trl(trl_type: str, bias_correction_kl: bool):
    for seed in range(3):
        logp, old, ref, mask, adv = make_inputs(seed)
        theirs_x = logp.clone().requires_grad_(True)
        theirs, _ = trl_loss(trl_type, theirs_x, old, ref, mask, adv, bias_correction_kl)
        (g_theirs,) = torch.autograd.grad(theirs, theirs_x)

        ours_x = logp.clone().requires_grad_(True)
        ours, m = clipped_policy_loss(ours_x, old, adv, mask, clip_low=EPS_LOW, clip_high=EPS_HIGH,
                                      loss_type=OURS[trl_type], max_len=MAX_LEN, ref_logp=ref, kl_coef=BETA,
                                      kl_importance_weight=bias_correction_kl)
        (g_ours,) = torch.autograd.grad(ours, ours_x)

        assert m["clip_frac_low"] > 0 and m["clip_frac_high"] > 0  # both clip sides are exercised
        assert ours.item() == pytest.approx(theirs.item(), abs=1e-6, rel=0)
        assert torch.allclose(g_ours, g_theirs, atol=1e-6, rtol=0)
        assert g_ours.abs().max() > 1e-3  # non-trivial gradient


def test_clip_and_kl_metrics_match_trl():
    """TRL logs these means in float32 (``bool.float()``), hence the 1e-6 tolerance."""
    logp, old, ref, mask, adv = make_inputs(7)
    _, theirs = trl_loss("bnpo", logp.clone().requires_grad_(True), old, ref, mask, adv, False)
    _, m = clipped_policy_loss(logp, old, adv, mask, clip_low=EPS_LOW, clip_high=EPS_HIGH, ref_logp=ref,
                               kl_coef=BETA)
    assert m["clip_frac_low"].item() == pytest.approx(theirs["clip_ratio/low_mean"][0], abs=1e-6)
    assert m["clip_frac_high"].item() == pytest.approx(theirs["clip_ratio/high_mean"][0], abs=1e-6)
    assert m["clip_frac"].item() == pytest.approx(theirs["clip_ratio/region_mean"][0], abs=1e-6)
    assert m["kl_mean"].item() == pytest.approx(theirs["kl"][0], abs=1e-6)


def test_group_advantages_match_trl_group_scaling():
    """TRL's ``scale_rewards="group"`` advantages (grpo_trainer.py, ``_generate_and_score_completions``):
    ``(r - nanmean(group)) / (nanstd(group) + 1e-4)``, then ``nan_to_num(0)``.  That block is inlined in a
    method that also generates and scores, so it cannot be called on its own; it is reproduced here with
    TRL's own ``nanstd``.  Failed samples differ by design: TRL gives them 0, we give NaN (row dropped)."""
    g = torch.Generator().manual_seed(0)
    n_gen = 4
    rewards = torch.rand(5 * n_gen, generator=g, dtype=D)
    rewards[3] = float("nan")  # a failed sample
    rewards[8:12] = 0.5  # a flat group
    rewards[13:16] = float("nan")  # one valid member left
    grouped = rewards.view(-1, n_gen)
    mean = torch.nanmean(grouped, dim=1).repeat_interleave(n_gen)
    std = nanstd(grouped, dim=1).repeat_interleave(n_gen)
    theirs = torch.nan_to_num((rewards - mean) / (std + 1e-4), nan=0.0)
    ids = [i // n_gen for i in range(rewards.numel())]
    ours = group_advantages(rewards, ids, normalize_std=True, eps=1e-4)
    failed = torch.isnan(rewards)
    assert torch.isnan(ours[failed]).all() and (theirs[failed] == 0).all()
    # TRL's nanstd computes its Bessel factor n/(n-1) from integer counts, i.e. in float32: ~1e-8 relative
    assert torch.allclose(ours[~failed], theirs[~failed], atol=1e-6, rtol=0)
    theirs_plain = torch.nan_to_num(rewards - mean, nan=0.0)  # scale_rewards="none"
    assert torch.allclose(group_advantages(rewards, ids)[~failed], theirs_plain[~failed], atol=1e-12, rtol=0)
