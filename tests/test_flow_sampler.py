"""The flow sampler with a fixed random velocity network (r3_rl.flow.sampler, trace.stack_steps, step_logprobs).

The central invariant: the learner's recomputation of each recorded SDE step's log-prob, under the same
guidance, gives ratio 1 before any update -- with CFG (text and image scales, interval, renorm) and without.
"""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from r3_rl.flow import (EtaSchedule, FlowVelocity, Guidance, StochasticSteps, derive_seed, initial_noise,
                        sample_flow, sibling_seeds, stack_steps, step_logprobs, timestep_grid)

LATENT = (3, 4)  # 3 tokens x 4 channels
COND = 6  # first 3 dims: "text", last 3: "image"
EDIT_CFG = Guidance(4.0, 1.5, interval=(0.4, 1.0), renorm="text_channel")
GEN_CFG = Guidance(4.0, 1.0, interval=(0.4, 1.0), renorm="global")


class TinyVelocity(nn.Module):
    """v(x, t, c) per token: an MLP on [x_token, t, c] (a fixed random network: nothing is trained)."""

    def __init__(self, channels: int = LATENT[1], hidden: int = 32):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(channels + 1 + COND, hidden), nn.SiLU(), nn.Linear(hidden, channels))

    def forward(self, x: torch.Tensor, t: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        p = next(self.parameters())
        b, n, _ = x.shape
        extra = torch.cat([t.view(b, 1).to(p.dtype), c.to(p.dtype)], dim=1)[:, None, :].expand(b, n, 1 + COND)
        return self.net(torch.cat([x.to(p.dtype), extra], dim=-1))


def branches(net: TinyVelocity, c: torch.Tensor) -> FlowVelocity:
    """cond: full condition; text-uncond: text part zeroed; image-uncond: image part zeroed (Bagel's contexts)."""
    c_tu, c_iu = c.clone(), c.clone()
    c_tu[:, :3] = 0
    c_iu[:, 3:] = 0
    return FlowVelocity(lambda x, t: net(x, t, c), lambda x, t: net(x, t, c_tu), lambda x, t: net(x, t, c_iu))


def sampler_noise(trace) -> torch.Tensor:
    """``[S, *latent]``: the standard normal draws of ``trace``'s SDE steps, regenerated from its noise seed (the
    sampler draws one per SDE step of the image, in denoising order, in the Gaussian's compute dtype)."""
    gen = torch.Generator().manual_seed(trace.noise_seed)
    dtype = torch.float64 if trace.latent_dtype == "float64" else torch.float32
    return torch.stack([torch.randn(trace.latent_shape, generator=gen, dtype=dtype) for _ in trace.steps])


def assert_sample_is_mean_plus_noise(mean: torch.Tensor, std: torch.Tensor, noise: torch.Tensor,
                                     x_next: torch.Tensor) -> None:
    """The recorded sample is the rescored mean plus the regenerated noise, up to the latent dtype's rounding
    (half a bf16 ulp is 2^-8 of the value): the learner's Gaussian is the one the sampler drew from."""
    std = std.reshape(-1, *([1] * (mean.dim() - 1))).to(mean.dtype)
    gap = (mean.detach().double() + (std * noise).double() - x_next.double()).abs()
    assert bool((gap <= 2e-5 + x_next.double().abs() * 2 ** -8).all()), float(gap.max())


@pytest.fixture
def net() -> TinyVelocity:
    torch.manual_seed(0)
    return TinyVelocity()


def run(net, c, guidance, sde_steps, *, dtype=torch.float32, seeds=None, eta=EtaSchedule("r3", 0.7), points=16):
    n = c.shape[0]
    init, noise = seeds or sibling_seeds(0, "g", size=n, share_initial_noise=False)
    x_T = initial_noise(LATENT, init, dtype=dtype)
    return sample_flow(branches(net, c), x_T, grid=timestep_grid(points), sde_steps=sde_steps, eta=eta,
                       guidance=guidance, noise_seeds=noise, init_seeds=init)


@pytest.mark.parametrize("guidance", [EDIT_CFG, GEN_CFG, Guidance()], ids=["edit_cfg", "gen_cfg", "no_cfg"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
def test_recomputed_logprob_gives_ratio_one(net, guidance, dtype):
    torch.manual_seed(1)
    c = torch.randn(6, COND)
    # steps inside (index < 13) and outside (13, 14) the CFG interval, one to three per image
    sde = [(0,), (5, 13), (14,), (1, 2, 3), (12, 13, 14), (7,)]
    out = run(net, c, guidance, sde, dtype=dtype)
    assert [tr.sde_indices for tr in out.traces] == sde
    # the recorded sample is exactly what the next step continued from (bf16 rounding included)
    for tr in out.traces:
        for a, b in zip(tr.steps, tr.steps[1:]):
            if b.index == a.index + 1:
                assert torch.equal(a.x_next, b.x_t)
    assert torch.equal(out.latents[4].float(), out.traces[4].steps[-1].x_next)  # its last step ends at t = 0
    batch = stack_steps(out.traces)
    assert batch.x_t.dtype == dtype and batch.image.tolist() == [0, 1, 1, 2, 3, 3, 3, 4, 4, 4, 5]
    lp, mean, std = step_logprobs(branches(net, c[batch.image]), batch.guidance, batch.x_t, batch.x_next,
                                  batch.t, batch.delta, batch.eta)
    ratio = torch.exp(lp.detach().double() - batch.logprob)
    assert float((ratio - 1).abs().max()) < 2e-6
    noise = torch.cat([sampler_noise(tr) for tr in out.traces])
    assert_sample_is_mean_plus_noise(mean, std, noise, batch.x_next)
    if dtype == torch.float32:  # the same check is tight where no rounding intervenes
        assert float((mean.detach() + std * noise - batch.x_next).abs().max()) < 1e-5
    # the trace keeps its latents in the latent's dtype (exact: the sampler holds the latent in it)
    assert {s.x_t.dtype for tr in out.traces for s in tr.steps} == {s.x_next.dtype for tr in out.traces
                                                                     for s in tr.steps} == {dtype}
    lp.sum().backward()  # differentiable through the velocity network
    assert all(p.grad is not None and bool(p.grad.abs().sum() > 0) for p in net.parameters())
    if guidance.text_scale > 1:  # rescoring without the sampled CFG (the R3 reference's mistake) is off
        lp_plain, _, _ = step_logprobs(branches(net, c[batch.image]), Guidance(), batch.x_t, batch.x_next,
                                       batch.t, batch.delta, batch.eta)
        inside = batch.t > 0.4
        log_ratio = (lp_plain.detach().double() - batch.logprob).abs()
        assert float(log_ratio[inside].min()) > 1e-4  # beyond a flow clip range: every such step is clipped
        assert float(log_ratio[~inside].max()) < 2e-6


def test_ratio_one_at_a_bagel_sized_latent_with_a_bf16_model():
    """256 tokens x 64 channels (a 512px BAGEL latent has 1024 x 64), a 2048-wide bf16 velocity MLP, edit CFG;
    the learner stacks the rows in a different batch than the sampler ran them in."""
    torch.manual_seed(3)
    big = TinyVelocity(channels=64, hidden=2048).to(torch.bfloat16).requires_grad_(False)
    c = torch.randn(3, COND)
    init, noise = sibling_seeds(1, "big", size=3)
    x_T = initial_noise((256, 64), init, dtype=torch.bfloat16)
    out = sample_flow(branches(big, c), x_T, grid=timestep_grid(8), sde_steps=[(0,), (2, 3), (6,)],
                      eta=EtaSchedule("r3", 0.7), guidance=EDIT_CFG, noise_seeds=noise, init_seeds=init)
    batch = stack_steps(out.traces[::-1])
    lp, _, _ = step_logprobs(branches(big, c.flip(0)[batch.image]), batch.guidance, batch.x_t, batch.x_next,
                             batch.t, batch.delta, batch.eta)
    assert lp.dtype == torch.float32 and batch.x_t.dtype == torch.bfloat16
    assert float((lp.double() - batch.logprob).abs().max()) < 1e-6


def test_ode_steps_carry_nothing_and_match_a_hand_euler_loop(net):
    net = net.double()
    torch.manual_seed(2)
    c = torch.randn(3, COND, dtype=torch.float64)
    g = Guidance(3.0, interval=(0.4, 1.0))
    out = run(net, c, g, [()] * 3, dtype=torch.float64, points=9)
    assert all(tr.steps == [] for tr in out.traces)
    init, _ = sibling_seeds(0, "g", size=3, share_initial_noise=False)
    x = torch.stack([torch.randn(LATENT, generator=torch.Generator().manual_seed(s)) for s in init]).double()
    c_tu = c.clone()
    c_tu[:, :3] = 0
    grid = timestep_grid(9)
    for i in range(8):
        t = torch.full((3,), grid[i], dtype=torch.float32)
        vc = net(x, t, c)
        v = net(x, t, c_tu) + 3.0 * (vc - net(x, t, c_tu)) if 0.4 < grid[i] <= 1.0 else vc
        x = x - (grid[i] - grid[i + 1]) * v
    assert torch.allclose(out.latents, x, atol=1e-12, rtol=0)


def test_sde_sampling_tends_to_the_ode_as_eta_goes_to_zero(net):
    """Every step stochastic with eta = 1e-9 ends where the pure ODE run ends (same x_T, same CFG)."""
    net = net.double()
    c = torch.randn(3, COND, dtype=torch.float64)
    ode = run(net, c, EDIT_CFG, [()] * 3, dtype=torch.float64)
    sde = run(net, c, EDIT_CFG, [tuple(range(15))] * 3, dtype=torch.float64, eta=EtaSchedule("constant", 1e-9))
    assert all(len(tr.steps) == 15 for tr in sde.traces)
    assert torch.allclose(sde.latents, ode.latents, atol=1e-7, rtol=0)
    assert not torch.equal(sde.latents, ode.latents)  # the noise did enter


def test_eta_zero_is_not_an_sde_step(net):
    with pytest.raises(ValueError, match="eta is 0 at SDE step"):
        run(net, torch.zeros(1, COND), Guidance(), [(3,)], eta=EtaSchedule("constant", 0.0))
    with pytest.raises(ValueError, match="outside 0..14"):
        run(net, torch.zeros(1, COND), Guidance(), [(15,)])


def test_shared_initial_noise_and_per_image_streams(net):
    init, noise = sibling_seeds(5, 17, "group3", size=4, share_initial_noise=True)
    assert len(set(init)) == 1 and len(set(noise)) == 4
    x_T = initial_noise(LATENT, init)
    assert all(torch.equal(x_T[0], x_T[k]) for k in range(4))
    init2, _ = sibling_seeds(5, 17, "group3", size=4, share_initial_noise=False)
    x2 = initial_noise(LATENT, init2)
    assert not any(torch.equal(x2[0], x2[k]) for k in range(1, 4))
    # siblings with one context and the same SDE index follow one ODE path, then differ by their own draw
    c = torch.randn(1, COND).expand(4, COND)
    idx = StochasticSteps("random").choose(15, seed=derive_seed(5, 17, "group3"))
    out = run(net, c, GEN_CFG, [idx] * 4, seeds=(init, noise))
    steps = [tr.steps[0] for tr in out.traces]
    assert all(torch.equal(steps[0].x_t, s.x_t) for s in steps)
    assert len({s.x_next.sum().item() for s in steps}) == 4
    # an image's draws do not depend on the rest of the batch
    alone = run(net, c[:1], GEN_CFG, [idx], seeds=([init[2]], [noise[2]]))
    assert torch.allclose(alone.traces[0].steps[0].x_next, steps[2].x_next, atol=1e-6, rtol=0)
    assert torch.allclose(alone.latents[0], out.latents[2], atol=1e-5, rtol=0)


def test_sde_step_distribution_matches_its_gaussian_empirically():
    """20k draws of the hand-case step (t 0.8 -> 0.6, eta 1.4, fixed v): mean and std match, log-prob is Normal's.

    One image of 20k identical rows: the SDE noise is iid per element, so its rows are 20k independent draws.
    """
    n = 20000
    x_t = torch.tensor([0.5, -1.0, 0.25, 2.0], dtype=torch.float64).expand(1, n, 4).clone()
    v = torch.tensor([1.0, 0.5, -0.5, 0.0], dtype=torch.float64)
    out = sample_flow(FlowVelocity(lambda x, t: v.expand_as(x)), x_t, grid=(0.8, 0.6, 0.0), sde_steps=[(0,)],
                      eta=EtaSchedule("r3", 0.7), guidance=Guidance(), noise_seeds=[11])
    step = out.traces[0].steps[0]
    x1 = step.x_next  # [n, 4]: a step record has no batch dim
    mu = torch.tensor([0.1285, -0.8795, 0.31325, 1.51], dtype=torch.float64)
    s = 1.4 * math.sqrt(0.2)
    assert torch.allclose(x1.mean(0), mu, atol=4 * s / math.sqrt(n), rtol=0)
    assert torch.allclose(x1.std(0), torch.full((4,), s, dtype=torch.float64), atol=0.015, rtol=0)
    assert torch.allclose(out.latents[0], x1 - 0.6 * v, atol=1e-12)  # then the ODE step to t = 0
    peer = torch.distributions.Normal(mu.expand(n, 4), s).log_prob(x1).mean()
    assert step.logprob == pytest.approx(float(peer), abs=1e-10) and step.std == pytest.approx(s, abs=1e-12)


M0, S0 = torch.tensor([1.0, -0.5], dtype=torch.float64), 0.5  # data x0 ~ N(M0, S0^2) per element


def gaussian_data_velocity(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact velocity of Gaussian data, ``v = alpha(t) x + beta(t)`` per element (``E[eps - x0 | x_t]``)."""
    t = t.double().view(-1, 1)
    alpha = (t - (1 - t) * S0 ** 2) / ((1 - t) ** 2 * S0 ** 2 + t ** 2)
    return alpha, -alpha * (1 - t) * M0 - M0


def chain_moments(grid, eta: EtaSchedule | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact mean/std after the discrete chain from N(0, 1) (``eta=None``: Euler ODE), per element.

    Each step is affine in x: x' = A x + B v(x) + s xi, with A, B, s read off ``sde_gaussian`` (A = mean at
    x=1, v=0; B = mean at x=0, v=1); Gaussians stay Gaussian, so mean and variance propagate exactly.
    """
    from r3_rl.flow.transition import sde_gaussian
    mu, var = torch.zeros(2, dtype=torch.float64), torch.ones(2, dtype=torch.float64)
    t = torch.tensor(grid[:-1], dtype=torch.float64)
    delta = t - torch.tensor(grid[1:], dtype=torch.float64)
    if eta is None:
        a, b, s = torch.ones_like(t), -delta, torch.zeros_like(t)
    else:
        n = t.shape[0]
        e = torch.tensor(eta.per_step(grid), dtype=torch.float64)
        a = sde_gaussian(torch.ones(n, 1, dtype=torch.float64), torch.zeros(n, 1, dtype=torch.float64), t, delta, e)[0]
        b, s = sde_gaussian(torch.zeros(n, 1, dtype=torch.float64), torch.ones(n, 1, dtype=torch.float64), t, delta, e)
        a, b, s = a.view(-1), b.view(-1), s.view(-1)
    alpha, beta = gaussian_data_velocity(t)
    for i in range(t.shape[0]):
        gain = a[i] + b[i] * alpha[i]
        mu, var = gain * mu + b[i] * beta[i], gain ** 2 * var + s[i] ** 2
    return mu, var.sqrt()


@pytest.mark.parametrize("eta", [None, EtaSchedule("r3", 0.7), EtaSchedule("flow_grpo", 0.7),
                                 EtaSchedule("constant", 0.3)], ids=["ode", "r3", "flow_grpo", "constant"])
def test_sde_step_keeps_the_flow_marginals(eta):
    """On a fine grid the SDE chain (any eta) and the ODE both carry N(0, 1) to the data N(M0, S0^2)."""
    mu, std = chain_moments(timestep_grid(2001), eta)
    assert torch.allclose(mu, M0, atol=2e-3, rtol=0) and torch.allclose(std, torch.full((2,), S0).double(), atol=2e-3)


@pytest.mark.parametrize("stochastic", [False, True], ids=["ode", "sde_every_step"])
def test_sampler_moments_match_the_exact_chain(stochastic):
    """20k samples (one image of 20k x 2 iid elements) through 30 steps: empirical moments = the chain's."""
    n, grid, eta = 20000, timestep_grid(31), EtaSchedule("r3", 0.7)

    def velocity(x, t):
        alpha, beta = gaussian_data_velocity(t)
        return alpha.view(-1, 1, 1) * x + beta.view(-1, 1, 2)

    x_T = initial_noise((n, 2), [derive_seed("lin")], dtype=torch.float64)
    sde = [tuple(range(30))] if stochastic else [()]
    out = sample_flow(FlowVelocity(velocity), x_T, grid=grid, sde_steps=sde, eta=eta, guidance=Guidance(),
                      noise_seeds=[3])
    mu, std = chain_moments(grid, eta if stochastic else None)
    x0 = out.latents[0]
    assert torch.allclose(x0.mean(0), mu, atol=4 * float(std.max()) / math.sqrt(n), rtol=0)
    assert torch.allclose(x0.std(0), std, atol=4 * float(std.max()) / math.sqrt(2 * n), rtol=0)
    assert len(out.traces[0].steps) == (30 if stochastic else 0)
