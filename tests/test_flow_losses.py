"""Image-action losses (r3_rl.algorithms.flow_losses) against Flow-GRPO's formulas and the closed-form KL.

The Flow-GRPO side is re-derived here from its training loop (scripts/train_sd3.py, notes section 3) on raw
tensors: per timestep j, ``policy_loss_j = mean_b(max(-A r, -A clip(r, 1 +- eps)))`` with ``A`` clamped to
``+-adv_clip_max``, ``kl_j = mean_b(mean_elements((mu - mu_ref)^2) / (2 std_dev_t^2))``, and the timesteps
accumulated into one optimizer step (their mean).  It never calls our functions.
"""
from __future__ import annotations

import math

import pytest
import torch

from r3_rl.algorithms.flow_losses import flow_gaussian_kl, flow_policy_loss, image_means

D = torch.float64


def flow_grpo_reference(log_prob, old_log_prob, advantages, mean, mean_ref, std_dev_t, *, clip_range, adv_clip_max,
                        beta):
    """Flow-GRPO's loss over ``[B, J]`` (image, trained timestep) tensors, one optimizer step over J timesteps."""
    total = 0.0
    num_timesteps = log_prob.shape[1]
    for j in range(num_timesteps):
        adv = torch.clamp(advantages, -adv_clip_max, adv_clip_max)
        ratio = torch.exp(log_prob[:, j] - old_log_prob[:, j])
        unclipped_loss = -adv * ratio
        clipped_loss = -adv * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
        policy_loss = torch.mean(torch.maximum(unclipped_loss, clipped_loss))
        kl = ((mean[:, j] - mean_ref[:, j]) ** 2).mean(dim=(1, 2, 3), keepdim=True) / (2 * std_dev_t[:, j] ** 2)
        loss = policy_loss + beta * torch.mean(kl)
        total = total + loss / num_timesteps  # gradient accumulation over the trained timesteps
    return total


def fixed_case():
    g = torch.Generator().manual_seed(0)
    b, j = 4, 3
    old = -0.9 + 0.01 * torch.randn(b, j, generator=g, dtype=D)
    new = (old + torch.tensor([[2e-4, -5e-5, 0.0], [-3e-4, 1e-5, 8e-5], [5e-5, 4e-4, -2e-4], [0.0, -1e-4, 3e-4]],
                              dtype=D)).requires_grad_(True)
    adv = torch.tensor([1.5, -0.5, 7.0, -6.0], dtype=D)  # two beyond the +-5 clip
    mean = torch.randn(b, j, 2, 3, 3, generator=g, dtype=D)
    mean_ref = mean + 0.01 * torch.randn(b, j, 2, 3, 3, generator=g, dtype=D)
    eta = torch.rand(b, j, generator=g, dtype=D) + 0.5  # Flow-GRPO's std_dev_t (no sqrt(delta))
    delta = torch.rand(b, j, generator=g, dtype=D) * 0.1 + 0.01
    return new, old, adv, mean, mean_ref, eta, delta


def test_flow_step_loss_equals_flow_grpo_value_and_gradient():
    new, old, adv, mean, mean_ref, eta, delta = fixed_case()
    eps, beta = 1e-4, 0.04
    expected = flow_grpo_reference(new, old, adv, mean, mean_ref, eta.view(4, 3, 1, 1, 1), clip_range=eps,
                                   adv_clip_max=5.0, beta=beta)
    (g_expected,) = torch.autograd.grad(expected, new)
    # ours: one row per (image, step); the Flow-GRPO KL is our Gaussian KL in its "flow_grpo" units
    std = eta * delta.sqrt()
    kl = flow_gaussian_kl(mean.reshape(12, 2, 3, 3), mean_ref.reshape(12, 2, 3, 3), std.reshape(12, 1, 1, 1),
                          kind="flow_grpo", delta=delta.reshape(12))
    ours, metrics = flow_policy_loss(new.reshape(12), old.reshape(12), adv.repeat_interleave(3), clip_low=eps,
                                     adv_clip=5.0, kl=kl, kl_coef=beta)
    (g_ours,) = torch.autograd.grad(ours, new)
    assert ours.item() == pytest.approx(expected.item(), abs=1e-14)
    assert torch.allclose(g_ours, g_expected, atol=1e-14, rtol=0)
    assert float(metrics["adv_clip_frac"]) == pytest.approx(0.5)
    assert 0 < float(metrics["clip_frac"]) < 1  # some ratios beyond 1 +- 1e-4 with the clip binding


def test_image_ratio_unit_averages_logprobs_before_the_ratio():
    new, old, adv, *_ = fixed_case()
    ours, _ = flow_policy_loss(new.reshape(12), old.reshape(12), adv.repeat_interleave(3), clip_low=1e-4,
                               adv_clip=None, ratio_unit="image", image=torch.arange(4).repeat_interleave(3))
    r = torch.exp(new.mean(1) - old.mean(1))  # one ratio per image from its mean SDE-step log-prob (R3)
    expected = torch.maximum(-adv * r, -adv * r.clamp(1 - 1e-4, 1 + 1e-4)).mean()
    assert ours.item() == pytest.approx(expected.item(), abs=1e-14)
    # with one step per image both units agree
    one_step = dict(clip_low=1e-4, adv_clip=None, image=torch.arange(4))
    a, _ = flow_policy_loss(new[:, 0], old[:, 0], adv, ratio_unit="step", **one_step)
    b, _ = flow_policy_loss(new[:, 0], old[:, 0], adv, ratio_unit="image", **one_step)
    assert a.item() == b.item()
    with pytest.raises(ValueError, match="different advantages"):
        flow_policy_loss(new.reshape(12), old.reshape(12), torch.arange(12, dtype=D), ratio_unit="image",
                         image=torch.arange(4).repeat_interleave(3))


def test_nan_advantage_drops_the_unit_and_its_kl():
    new, old, adv, mean, mean_ref, eta, _ = fixed_case()
    kl = torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=D)
    adv = adv.clone()
    adv[1] = math.nan
    loss, m = flow_policy_loss(new[:, 0], old[:, 0], adv, adv_clip=None, kl=kl, kl_coef=2.0)
    keep = torch.tensor([0, 2, 3])
    sub, _ = flow_policy_loss(new[keep, 0], old[keep, 0], adv[keep], adv_clip=None, kl=kl[keep], kl_coef=2.0)
    assert loss.item() == pytest.approx(sub.item(), abs=1e-15)
    assert float(m["kl_mean"]) == pytest.approx((0.1 + 0.3 + 0.4) / 3)


def test_ratio_one_gives_minus_mean_advantage_and_clip_range_is_the_images_own():
    old = torch.full((4,), -0.5, dtype=D)
    adv = torch.tensor([1.0, -2.0, 3.0, 0.5], dtype=D)
    loss, m = flow_policy_loss(old.clone(), old, adv)
    assert loss.item() == pytest.approx(-adv.mean().item(), abs=1e-15) and float(m["clip_frac"]) == 0.0
    # a log-ratio of 1e-3 is clipped at the image default (1e-4) but not at the text one (0.2)
    new = (old + 1e-3).requires_grad_(True)
    clipped, m = flow_policy_loss(new, old, torch.ones(4, dtype=D))
    assert float(m["clip_frac"]) == 1.0
    assert torch.autograd.grad(clipped, new)[0].abs().max() == 0
    free, m = flow_policy_loss(new, old, torch.ones(4, dtype=D), clip_low=0.2)
    assert float(m["clip_frac"]) == 0.0 and torch.autograd.grad(free, new)[0].abs().min() > 0


def test_gaussian_kl_closed_form_and_variants():
    # notes section 4: x_t, v, v_ref at t = 0.8, delta = 0.2, eta = 1.4
    mean = torch.tensor([[0.1285, -0.8795, 0.31325, 1.51]], dtype=D)
    mean_ref = torch.tensor([[0.1534, -0.8795, 0.28835, 1.4851]], dtype=D)
    s = 1.4 * math.sqrt(0.2)
    exact = flow_gaussian_kl(mean, mean_ref, s)
    assert float(exact) == pytest.approx(5.931218e-4, rel=1e-6)
    normal = torch.distributions.Normal
    peer = torch.distributions.kl_divergence(normal(mean, s), normal(mean_ref, s))
    assert float(exact) == pytest.approx(float(peer.mean()), abs=1e-16)
    assert float(flow_gaussian_kl(mean, mean_ref, s, kind="r3")) == pytest.approx(1.186244e-3, rel=1e-6)
    flow_grpo = flow_gaussian_kl(mean, mean_ref, s, kind="flow_grpo", delta=0.2)
    assert float(flow_grpo) == pytest.approx(1.186244e-4, rel=1e-6)
    same = torch.randn(3, 2, 5, dtype=D)
    zero = flow_gaussian_kl(same, same.clone(), torch.full((3, 1, 1), 0.3, dtype=D))
    assert torch.equal(zero, torch.zeros(3, dtype=D))
    with pytest.raises(ValueError, match="needs delta"):
        flow_gaussian_kl(mean, mean_ref, s, kind="flow_grpo")
    with pytest.raises(ValueError, match="valid: exact, r3, flow_grpo"):
        flow_gaussian_kl(mean, mean_ref, s, kind="k3")


def test_image_means_any_ids():
    vals = torch.tensor([1.0, 2.0, 3.0, 5.0], dtype=D)
    per, inv = image_means(vals, torch.tensor([7, 3, 7, 3]))
    assert per.tolist() == [3.5, 2.0] and inv.tolist() == [1, 0, 1, 0]
