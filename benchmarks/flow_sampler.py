"""Denoising steps/s of the flow sampler (r3_rl.flow.sample_flow) against a bare Euler loop on the same model.

The velocity model is a small per-token MLP conditioned on t and a condition vector; latents are
``[batch, tokens, dim]``.  Rows: ODE only, one SDE step per image (R3), every step SDE (Flow-GRPO original),
each without CFG and with text + image CFG (three branches, interval (0.4, 1], text_channel renorm).  The
peer is a plain ``x -= delta * v`` loop with the same branches and the CFG formula written inline: the ratio
is what the library (guidance predicate, per-image noise generators, recording, float32 Gaussian) costs.

    python benchmarks/flow_sampler.py [--batch 8] [--tokens 16] [--dim 16] [--hidden 64] [--points 16]
                                      [--repeats 5] [--threads 1]

Steps/s counts image-steps: batch x (points - 1) per call.  ``--dim 2048 --hidden 2048`` approaches a real
latent width (the MLP, not the sampler, then dominates).
"""
from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from torch import nn  # noqa: E402

from r3_rl.arguments import OneLineArgumentParser, int_at_least  # noqa: E402
from r3_rl.flow import (EtaSchedule, FlowVelocity, Guidance, StochasticSteps, initial_noise,  # noqa: E402
                        sample_flow, sibling_seeds, timestep_grid)

COND = 8


class TokenVelocity(nn.Module):
    """v(x, t, c) per token: MLP([x_token, t, c]) -> dim."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim + 1 + COND, hidden), nn.SiLU(), nn.Linear(hidden, dim))

    def forward(self, x: torch.Tensor, t: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        extra = torch.cat([t.view(b, 1).to(x.dtype), c.to(x.dtype)], dim=1)[:, None, :].expand(b, n, 1 + COND)
        return self.net(torch.cat([x, extra], dim=-1))


def branches(net: TokenVelocity, c: torch.Tensor) -> FlowVelocity:
    c_tu, c_iu = c.clone(), c.clone()
    c_tu[:, : COND // 2] = 0
    c_iu[:, COND // 2:] = 0
    return FlowVelocity(lambda x, t: net(x, t, c), lambda x, t: net(x, t, c_tu), lambda x, t: net(x, t, c_iu))


@torch.no_grad()
def bare_euler(net: TokenVelocity, c: torch.Tensor, x: torch.Tensor, grid, cfg: Guidance | None) -> torch.Tensor:
    """The peer: Euler with the same forwards, CFG and text_channel renorm written inline, nothing recorded."""
    fv = branches(net, c)
    for i in range(len(grid) - 1):
        t = torch.full((x.shape[0],), grid[i])
        v = fv.cond(x, t)
        if cfg is not None and cfg.interval[0] < grid[i] <= cfg.interval[1]:
            vtu = fv.text_uncond(x, t)
            vt = vtu + cfg.text_scale * (v - vtu)
            vt = vt * (v.norm(dim=-1, keepdim=True) / (vt.norm(dim=-1, keepdim=True) + 1e-8)).clamp(max=1.0)
            vi = fv.image_uncond(x, t)
            v = vi + cfg.image_scale * (vt - vi)
        x = x - (grid[i] - grid[i + 1]) * v
    return x


def timed(fns: dict, repeats: int) -> dict[str, float]:
    """Median seconds per call; calls interleaved so machine load hits every row alike."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    for fn in fns.values():
        fn()  # warm-up
    for _ in range(repeats):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def main() -> None:
    ap = OneLineArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int_at_least(1), default=8)
    ap.add_argument("--tokens", type=int_at_least(1), default=16, help="latent tokens per image")
    ap.add_argument("--dim", type=int_at_least(1), default=16, help="latent channels per token")
    ap.add_argument("--hidden", type=int_at_least(1), default=64, help="velocity MLP width")
    ap.add_argument("--points", type=int_at_least(1), default=16, help="grid points (points - 1 denoising steps)")
    ap.add_argument("--repeats", type=int_at_least(1), default=5)
    ap.add_argument("--threads", type=int_at_least(1), default=1)
    a = ap.parse_args()
    for name in ("batch", "tokens", "dim", "hidden", "repeats", "threads"):
        if getattr(a, name) < 1:
            ap.error(f"--{name} must be >= 1")
    if a.points < 2:
        ap.error("--points must be >= 2")
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    net = TokenVelocity(a.dim, a.hidden).eval()
    c = torch.randn(a.batch, COND)
    grid, eta = timestep_grid(a.points), EtaSchedule("r3", 0.7)
    init, noise = sibling_seeds(0, "bench", size=a.batch, share_initial_noise=True)
    x_T = initial_noise((a.tokens, a.dim), init)
    n_steps = a.points - 1
    cfgs = {"no CFG": Guidance(), "CFG text+image": Guidance(4.0, 1.5, interval=(0.4, 1.0), renorm="text_channel")}
    one = [StochasticSteps("random").choose(n_steps, seed=s) for s in noise]
    plans = {"ODE only": [()] * a.batch, "1 SDE step": one, "all SDE": [tuple(range(n_steps))] * a.batch}

    def ours(plan, g):
        return lambda: sample_flow(branches(net, c), x_T, grid=grid, sde_steps=plan, eta=eta, guidance=g,
                                   noise_seeds=noise, init_seeds=init)

    fns = {}
    for cname, g in cfgs.items():
        fns[("bare Euler", cname)] = lambda g=g, cname=cname: bare_euler(
            net, c, x_T, grid, None if cname == "no CFG" else g)
        for pname, plan in plans.items():
            fns[(pname, cname)] = ours(plan, g)
    t = timed(fns, a.repeats)
    work = a.batch * n_steps
    print(f"flow sampler: batch {a.batch}, latent {a.tokens}x{a.dim}, MLP hidden {a.hidden}, {n_steps} steps, "
          f"{a.threads} thread(s), median of {a.repeats}")
    print(f"{'':12} {'CFG':16} {'steps/s':>10} {'ms/call':>9} {'vs bare':>8}")
    for (pname, cname), sec in t.items():
        ratio = t[("bare Euler", cname)] / sec
        print(f"{pname:12} {cname:16} {work / sec:10.0f} {sec * 1e3:9.2f} {ratio:8.2f}x")


if __name__ == "__main__":
    main()
