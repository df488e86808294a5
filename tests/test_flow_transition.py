"""The SDE step's Gaussian, its log-prob, the Euler step and CFG (r3_rl.flow.transition / guidance).

Peers: the hand-made case of /work/notes/flow.md section 4 (numbers computed there independently),
torch.distributions.Normal, and Flow-GRPO's and DanceGRPO's step formulas re-derived here from their papers'
equations (not from our functions).
"""
from __future__ import annotations

import math

import pytest
import torch

from r3_rl.flow.guidance import FlowVelocity, Guidance, guided_velocity
from r3_rl.flow.transition import euler_step, gaussian_logprob, sde_gaussian, step_logprobs

D = torch.float64
X = torch.tensor([[0.5, -1.0, 0.25, 2.0]], dtype=D)
V = torch.tensor([[1.0, 0.5, -0.5, 0.0]], dtype=D)
XI = torch.tensor([[0.1, -0.2, 0.3, 0.0]], dtype=D)
T, DELTA, ETA = 0.8, 0.2, 0.7 * math.sqrt(0.8 / 0.2)  # R3 schedule c = 0.7 -> eta = 1.4


def test_hand_case_mean_std_sample_and_logprob():
    mean, std = sde_gaussian(X, V, T, DELTA, ETA)
    assert torch.allclose(mean, torch.tensor([[0.1285, -0.8795, 0.31325, 1.51]], dtype=D), atol=1e-12, rtol=0)
    assert std.shape == (1, 1) and float(std) == pytest.approx(0.6260990337, abs=1e-10)
    sample = mean + std * XI
    assert torch.allclose(sample, torch.tensor([[0.191110, -1.004720, 0.501080, 1.51]], dtype=D), atol=1e-6)
    lp = gaussian_logprob(sample, mean, std)
    assert float(lp) == pytest.approx(-0.4681918136, abs=1e-9)
    peer = torch.distributions.Normal(mean, std.expand_as(mean)).log_prob(sample)
    assert float(lp) == pytest.approx(float(peer.mean()), abs=1e-14)
    assert float(peer.sum()) == pytest.approx(-1.8727672544, abs=1e-9)
    assert float(gaussian_logprob(sample, mean, std, constants=False)) == pytest.approx(-0.0175, abs=1e-12)
    # under the reference velocity the same sample scores -0.4707734 (ratio ref/sampled 0.9974217)
    v_ref = torch.tensor([[0.9, 0.5, -0.4, 0.1]], dtype=D)
    mean_ref, _ = sde_gaussian(X, v_ref, T, DELTA, ETA)
    assert torch.allclose(mean_ref, torch.tensor([[0.1534, -0.8795, 0.28835, 1.4851]], dtype=D), atol=1e-12)
    lp_ref = gaussian_logprob(sample, mean_ref, std)
    assert float(lp_ref) == pytest.approx(-0.4707734, abs=1e-7)
    assert math.exp(float(lp_ref - lp)) == pytest.approx(0.9974217, abs=1e-7)


def test_euler_step_and_eta_zero_limit():
    assert torch.equal(euler_step(X, V, DELTA), torch.tensor([[0.3, -1.1, 0.35, 2.0]], dtype=D))
    x, v = torch.randn(5, 3, 4, dtype=D), torch.randn(5, 3, 4, dtype=D)
    tiny = sde_gaussian(x, v, 0.6, 0.1, 1e-12)[0]
    assert torch.allclose(tiny, euler_step(x, v, 0.1), atol=1e-15, rtol=0)
    # eta^2 delta / (2 t) = 9 * 0.5 / 2 > 1: the mean would keep -1.25 x the latent
    for bad in ({"eta": 0.0}, {"t": 0.0}, {"delta": 0.0}, {"delta": 0.7}, {"t": 1.0, "delta": 0.5, "eta": 3.0}):
        kw = {"t": 0.6, "delta": 0.1, "eta": 0.5, **bad}
        with pytest.raises(ValueError, match="sde_gaussian"):
            sde_gaussian(x, v, **kw)


def test_mean_matches_flow_grpo_and_dance_forms_on_random_rows():
    torch.manual_seed(0)
    n = 6
    x, v = torch.randn(n, 2, 3, 3, dtype=D), torch.randn(n, 2, 3, 3, dtype=D)
    sigma = torch.rand(n, dtype=D) * 0.9 + 0.05
    delta = sigma * torch.rand(n, dtype=D) * 0.5
    a = 0.7
    std_dev_t = a * torch.sqrt(sigma / (1 - sigma))  # Flow-GRPO's eta
    mean, std = sde_gaussian(x, v, sigma, delta, std_dev_t)
    s4 = sigma.view(-1, 1, 1, 1)
    e4 = std_dev_t.view(-1, 1, 1, 1)
    dt = -delta.view(-1, 1, 1, 1)
    # Flow-GRPO sde_step_with_logprob: prev_mean = x (1 + std^2 dt / (2 sigma)) + v (1 + std^2 (1-sigma)/(2 sigma)) dt
    fg_mean = x * (1 + e4 ** 2 / (2 * s4) * dt) + v * (1 + e4 ** 2 * (1 - s4) / (2 * s4)) * dt
    assert torch.allclose(mean, fg_mean, atol=1e-13, rtol=0)
    # DanceGRPO / R3: score = -(x + (1 - t) v) / t; mean = x - delta (v - eta^2 score / 2)
    score = -(x + (1 - s4) * v) / s4
    assert torch.allclose(mean, x + dt * (v - 0.5 * e4 ** 2 * score), atol=1e-13, rtol=0)
    sample = fg_mean + e4 * torch.sqrt(-dt) * torch.randn_like(x)
    # Flow-GRPO's log-prob: -(prev - mean)^2 / (2 (std sqrt(-dt))^2) - log(std sqrt(-dt)) - log sqrt(2 pi), mean
    sd = e4 * torch.sqrt(-dt)
    fg_lp = (-((sample - fg_mean) ** 2) / (2 * sd ** 2) - torch.log(sd) - math.log(math.sqrt(2 * math.pi)))
    assert torch.allclose(gaussian_logprob(sample, mean, std), fg_lp.mean(dim=(1, 2, 3)), atol=1e-12, rtol=0)


def test_float32_latents_compute_in_float32_and_bf16_upcasts():
    x, v = torch.randn(2, 8).to(torch.bfloat16), torch.randn(2, 8).to(torch.bfloat16)
    mean, std = sde_gaussian(x, v, 0.5, 0.1, 0.7)
    assert mean.dtype == torch.float32 and std.dtype == torch.float32
    assert gaussian_logprob(mean, mean, std).dtype == torch.float32


# ---------------------------------------------------------------- CFG (notes section 2 hand check)
VC = torch.tensor([[[1.0, 0.5], [-0.5, 0.0]]], dtype=D)
VU = torch.tensor([[[0.8, 0.3], [-0.4, 0.2]]], dtype=D)
VI = torch.tensor([[[0.9, 0.4], [-0.6, 0.1]]], dtype=D)
T1 = torch.tensor([1.0], dtype=D)


def test_cfg_hand_values_for_every_renorm():
    raw = guided_velocity(Guidance(4.0), T1, VC, VU)
    assert torch.allclose(raw, torch.tensor([[[1.6, 1.1], [-0.8, -0.6]]], dtype=D), atol=1e-12)
    glob = guided_velocity(Guidance(4.0, renorm="global"), T1, VC, VU)
    assert torch.allclose(glob, torch.tensor([[[.897235, .616849], [-.448618, -.336463]]], dtype=D), atol=1e-6)
    chan = guided_velocity(Guidance(4.0, renorm="channel"), T1, VC, VU)
    assert torch.allclose(chan, torch.tensor([[[.921307, .633398], [-.4, -.3]]], dtype=D), atol=1e-6)
    edit = guided_velocity(Guidance(4.0, 1.5, renorm="text_channel"), T1, VC, VU, VI)
    assert torch.allclose(edit, torch.tensor([[[.931960, .750098], [-.3, -.5]]], dtype=D), atol=1e-6)
    # Bagel: image guidance only inside text guidance
    assert torch.equal(guided_velocity(Guidance(1.0, 1.5), T1, VC, VU, VI), VC)


def test_cfg_interval_edges_per_row():
    g = Guidance(4.0, interval=(0.4, 1.0))
    t = torch.tensor([1.0, 0.4, 0.41, 0.2], dtype=D)
    vc, vu = VC.expand(4, 2, 2), VU.expand(4, 2, 2)
    out = guided_velocity(g, t, vc, vu)
    guided = VU + 4.0 * (VC - VU)
    assert torch.equal(out[0], guided[0]) and torch.equal(out[2], guided[0])  # t = 1 and 0.41: guided
    assert torch.equal(out[1], VC[0]) and torch.equal(out[3], VC[0])  # t = 0.4 (open end) and 0.2: not
    assert g.active(t).tolist() == [True, False, True, False]
    with pytest.raises(ValueError, match="0 <= lo < hi <= 1"):
        Guidance(4.0, interval=(0.5, 0.4))
    with pytest.raises(ValueError, match="valid: none, global, channel, text_channel"):
        Guidance(4.0, renorm="text_channe")  # R3's default typo fails loudly here


def test_flow_velocity_runs_only_needed_branches_and_refuses_missing_ones():
    calls: list[str] = []

    def branch(name: str, v: torch.Tensor):
        def f(x, t):
            calls.append(name)
            assert t.dtype == torch.float32
            return v.expand_as(x)
        return f

    fv = FlowVelocity(branch("c", VC), branch("tu", VU), branch("iu", VI))
    g = Guidance(4.0, 1.5, interval=(0.4, 1.0))
    x = torch.zeros(1, 2, 2, dtype=D)
    fv.guided(g, x, torch.tensor([0.3], dtype=D))
    assert calls == ["c"]  # outside the interval: the conditional branch only
    fv.guided(g, x, torch.tensor([0.9], dtype=D))
    assert calls == ["c", "c", "tu", "iu"]
    with pytest.raises(ValueError, match="needs a text-unconditional"):
        FlowVelocity(branch("c", VC)).guided(g, x, torch.tensor([0.9], dtype=D))
    # step_logprobs composes guidance and the Gaussian: same as doing it by hand
    x_next = torch.randn(1, 2, 2, dtype=D)
    lp, mean, std = step_logprobs(fv, g, x, x_next, 0.9, 0.1, 0.8)
    v = guided_velocity(g, torch.tensor([0.9], dtype=D), VC, VU, VI)
    m2, s2 = sde_gaussian(x, v, 0.9, 0.1, 0.8)
    assert torch.equal(mean, m2) and torch.equal(lp, gaussian_logprob(x_next, m2, s2))
