"""Denoise a batch of latents from noise to data with Euler ODE steps and recorded SDE steps.

The sampler is model-agnostic: it takes the velocity branches as callables (:class:`FlowVelocity`), so a tiny
flow policy and BAGEL use it alike.  Each image has its own SDE-noise generator (seeded from
``noise_seeds``), so its draws do not depend on what else is in the batch; the initial noise comes from
``init_seeds`` (equal seeds, equal ``x_T``: siblings share their initial noise when the caller gives them the
same seed, see :func:`sibling_seeds`).

What an SDE step records (:class:`r3_rl.flow.trace.SdeStep`) is scored the way the learner will score it: the
sample is first cast to the working dtype the next step continues from (e.g. bf16), and the log-prob is of
that stored value (the R3 reference scores the float32 sample, then trains on the rounded one).
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from r3_rl.flow.codec import dtype_name
from r3_rl.flow.guidance import FlowVelocity, Guidance
from r3_rl.flow.schedule import EtaSchedule, check_grid, derive_seed
from r3_rl.flow.trace import DenoisingTrace, SdeStep
from r3_rl.flow.transition import compute_dtype, euler_step, gaussian_logprob, sde_gaussian


def initial_noise(latent_shape: Sequence[int], seeds: Sequence[int], *, device: torch.device | str | None = None,
                  dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``[B, *latent_shape]`` standard normal noise, image ``b`` drawn on the CPU from a generator seeded ``seeds[b]``.

    Drawing on the CPU makes ``x_T`` identical on every device; equal seeds give equal noise.
    """
    rows = [torch.randn(tuple(latent_shape), generator=torch.Generator().manual_seed(int(s)), dtype=torch.float32)
            for s in seeds]
    if not rows:
        raise ValueError("initial_noise: no seeds")
    return torch.stack(rows).to(device=device, dtype=dtype)


def sibling_seeds(*parts: int | str, size: int, share_initial_noise: bool = True) -> tuple[list[int], list[int]]:
    """``(init_seeds, noise_seeds)`` for the ``size`` members of one sibling group.

    ``parts`` identify the group (run seed, learner step, group id, ...).  With ``share_initial_noise`` all
    members get one initial-noise seed (R3: siblings start from the same ``x_T``); the SDE-noise seeds always
    differ per member.
    """
    init = [derive_seed(*parts, "init") if share_initial_noise else derive_seed(*parts, m, "init")
            for m in range(size)]
    return init, [derive_seed(*parts, m, "sde") for m in range(size)]


@dataclass
class FlowSample:
    """The sampler's output: final latents ``[B, ...]`` (working dtype) and one trace per image."""

    latents: torch.Tensor
    traces: list[DenoisingTrace]


def _check(x: torch.Tensor, grid: Sequence[float], sde_steps: Sequence[Sequence[int]], etas: Sequence[float],
           noise_seeds: Sequence[int], init_seeds: Sequence[int | None]) -> list[frozenset[int]]:
    n = x.shape[0]
    if len(sde_steps) != n or len(noise_seeds) != n or len(init_seeds) != n:
        raise ValueError(f"sample_flow: x_T has {n} rows but sde_steps, noise_seeds and init_seeds have "
                         f"{len(sde_steps)}, {len(noise_seeds)} and {len(init_seeds)} entries")
    sets = []
    for b, idx in enumerate(sde_steps):
        s = frozenset(int(i) for i in idx)
        bad = sorted(i for i in s if not 0 <= i < len(grid) - 1)
        if bad:
            raise ValueError(f"sample_flow: image {b} has SDE step(s) {bad} outside 0..{len(grid) - 2}")
        zero = sorted(i for i in s if not etas[i] > 0)
        if zero:
            raise ValueError(f"sample_flow: eta is 0 at SDE step(s) {zero} of image {b}; a step with eta 0 is an "
                             "ODE step (leave it out of sde_steps)")
        sets.append(s)
    return sets


def _own(t: torch.Tensor) -> torch.Tensor:
    """A CPU copy that owns its memory (a view would keep the whole batch alive inside the trace)."""
    return t.to("cpu", copy=True)


@torch.no_grad()
def sample_flow(velocity: FlowVelocity, x_T: torch.Tensor, *, grid: Sequence[float],
                sde_steps: Sequence[Sequence[int]], eta: EtaSchedule, guidance: Guidance,
                noise_seeds: Sequence[int], init_seeds: Sequence[int | None] | None = None) -> FlowSample:
    """Denoise ``x_T`` ``[B, *latent_shape]`` along ``grid``; ``sde_steps[b]`` are image ``b``'s stochastic steps.

    All other steps are Euler ODE steps.  The latent stays in ``x_T``'s dtype between steps (the model's
    input dtype); every Gaussian quantity is float32 (float64 for a float64 ``x_T``).  ``init_seeds`` only
    goes into the traces (pass the seeds ``x_T`` was drawn from, or ``None`` entries).
    """
    check_grid(grid)
    n = x_T.shape[0]
    init_seeds = [None] * n if init_seeds is None else list(init_seeds)
    etas = eta.per_step(grid)
    sets = _check(x_T, grid, sde_steps, etas, noise_seeds, init_seeds)
    gens = [torch.Generator().manual_seed(int(s)) for s in noise_seeds]
    traces = [DenoisingTrace(latent_shape=tuple(x_T.shape[1:]), latent_dtype=dtype_name(x_T.dtype), grid=tuple(grid),
                             guidance=guidance, eta=eta, init_seed=init_seeds[b], noise_seed=int(noise_seeds[b]))
              for b in range(n)]
    work = compute_dtype(x_T)
    x = x_T
    for i in range(len(grid) - 1):
        t, delta = float(grid[i]), float(grid[i]) - float(grid[i + 1])
        t_rows = torch.full((n,), t, dtype=torch.float64)
        v = velocity.guided(guidance, x, t_rows)
        x_next = euler_step(x, v, delta)
        rows = [b for b in range(n) if i in sets[b]]
        if rows:
            # index_select / index_copy_, not x[idx]: on CPU advanced indexing of wide rows measured 40x slower
            idx = torch.tensor(rows, device=x.device)
            x_in = x.index_select(0, idx).to(work)
            mean, std = sde_gaussian(x_in, v.index_select(0, idx), t, delta, etas[i])
            xi = torch.stack([torch.randn(tuple(x.shape[1:]), generator=gens[b], dtype=work) for b in rows])
            stored = (mean + std * xi.to(x.device)).to(x.dtype).to(work)  # what the next step continues from
            logp = gaussian_logprob(stored, mean, std)
            x_next.index_copy_(0, idx, stored)
            std_value = float(std.reshape(-1)[0])  # one (t, delta, eta) per step: the same std on every row
            for j, (b, lp) in enumerate(zip(rows, logp.tolist())):
                traces[b].steps.append(SdeStep(
                    index=i, t=t, delta=delta, eta=etas[i], std=std_value, logprob=lp,
                    x_t=_own(x_in[j].to(x_T.dtype)), x_next=_own(stored[j].to(x_T.dtype))))  # exact: see trace.py
        x = x_next.to(x_T.dtype)
    return FlowSample(latents=x, traces=traces)
