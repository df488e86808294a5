"""One denoising transition: the Euler ODE step, and the SDE step's Gaussian and its log-prob.

The sampler draws from, and the learner scores against, the Gaussian built by :func:`sde_gaussian` from the
guided velocity of :meth:`FlowVelocity.guided` (:func:`step_distribution` composes the two): the same code
on both sides is what makes the ratio exactly 1 before the first update (the token analogue is
``r3_rl/policy/sampling.py``).

With ``delta = t - t_next > 0`` (Flow-GRPO writes ``dt = -delta``) the reverse-time SDE with the flow's
marginals, discretised by Euler-Maruyama (Flow-GRPO "sde", identical to the DanceGRPO/R3 score form)::

    mean = x * (1 - eta^2 * delta / (2 t)) - v * delta * (1 + eta^2 * (1 - t) / (2 t))
    std  = eta * sqrt(delta)

``eta = 0`` gives the Euler step ``x - delta * v`` but no density, so ODE steps never reach the log-prob.

Log-prob units (a decision, tied to the clip range): the per-element Gaussian log-density **averaged** over
all latent elements of an image, as Flow-GRPO, DanceGRPO, MixGRPO and R3 do.  A sum would make log-ratios
``D`` (the latent size) times larger; the flow clip ranges of about 1e-4 assume the mean.  The constants
``-log(std) - log(2 pi) / 2`` are kept by default (a true mean log-density, comparable with Flow-GRPO's
logs; R3 drops them).  They do not change a ratio or the closed-form KL: ``std`` depends only on
``(t, delta, eta)``, which the learner reads back from the record, never on the model, so they cancel.
All Gaussian arithmetic is in at least float32 (bf16 overflows and rounds away 1e-4 ratios); the times
and coefficients are float64 until they are multiplied in.
"""
from __future__ import annotations

import math

import torch

from r3_rl.flow.guidance import FlowVelocity, Guidance

_HALF_LOG_2PI = 0.5 * math.log(2.0 * math.pi)


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """float64 stays float64; anything narrower computes in float32."""
    return torch.promote_types(x.dtype, torch.float32)


def _rows(value: float | torch.Tensor, n: int, name: str) -> torch.Tensor:
    """A per-row float64 ``[n]`` tensor on the CPU from a float or an ``[n]`` tensor."""
    v = torch.as_tensor(value, dtype=torch.float64).detach().cpu()
    if v.dim() == 0:
        v = v.expand(n)
    if v.shape != (n,):
        raise ValueError(f"{name} must be a float or a [{n}] tensor, got shape {tuple(v.shape)}")
    return v


def _per_row(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``[B]`` -> ``[B, 1, ..., 1]`` in ``like``'s dtype and device, to broadcast over each row's elements."""
    return v.to(device=like.device, dtype=like.dtype).view(-1, *([1] * (like.dim() - 1)))


def euler_step(x: torch.Tensor, v: torch.Tensor, delta: float | torch.Tensor) -> torch.Tensor:
    """Deterministic ODE step ``x - delta * v`` (in :func:`compute_dtype`); it has no log-prob."""
    dtype = compute_dtype(x)
    x, v = x.to(dtype), v.to(dtype)
    if isinstance(delta, float):  # the sampler's case: one step size for the whole batch
        return x - delta * v
    return x - _per_row(_rows(delta, x.shape[0], "delta"), x) * v


def sde_gaussian(x: torch.Tensor, v: torch.Tensor, t: float | torch.Tensor, delta: float | torch.Tensor,
                 eta: float | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean ``[B, ...]`` and std ``[B, 1, ..., 1]`` of the SDE step from ``x`` at time ``t`` (module docstring).

    ``t``, ``delta``, ``eta`` are floats or per-row ``[B]`` tensors (a learner batch mixes steps of several
    images).  Refuses ``t <= 0``, ``delta <= 0`` and ``eta <= 0``: those are not stochastic steps (a zero std
    has no density; ``1 / t`` blows up at the data end); and an ``x`` coefficient ``<= 0`` (a grid too coarse
    for its eta: the step would drop or flip the latent).
    """
    if x.shape != v.shape:
        raise ValueError(f"sde_gaussian: x {tuple(x.shape)} and v {tuple(v.shape)} must have the same shape")
    n = x.shape[0]
    t64, d64, e64 = _rows(t, n, "t"), _rows(delta, n, "delta"), _rows(eta, n, "eta")
    for name, val in (("t", t64), ("delta", d64), ("eta", e64)):
        if not bool((val > 0).all()) or not bool(torch.isfinite(val).all()):
            raise ValueError(f"sde_gaussian: {name} must be finite and > 0 on every row (an SDE step), got "
                             f"{val.tolist()}")
    if bool((d64 > t64).any()):
        raise ValueError("sde_gaussian: delta must not exceed t (the step ends at t - delta >= 0)")
    e2 = e64 * e64
    a = 1.0 - e2 * d64 / (2.0 * t64)
    if not bool((a > 0).all()):  # recipes are checked (schedule.check_sde_steps); this guards direct callers
        raise ValueError(f"sde_gaussian: eta^2 delta / (2 t) must be < 1 (the mean keeps > 0 times x), got a "
                         f"coefficient of {float(a.min()):+.3g}; use a finer grid or a smaller eta")
    b = -d64 * (1.0 + e2 * (1.0 - t64) / (2.0 * t64))
    s = e64 * torch.sqrt(d64)
    dtype = compute_dtype(x)
    x, v = x.to(dtype), v.to(dtype)
    mean = _per_row(a, x) * x + _per_row(b, x) * v
    return mean, _per_row(s, x)


def gaussian_logprob(sample: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, *,
                     constants: bool = True) -> torch.Tensor:
    """``[B]`` per-element Gaussian log-density of ``sample`` averaged over each row (module docstring).

    ``std`` broadcasts against ``mean`` and is constant within a row (``[B, 1, ..., 1]`` as returned by
    :func:`sde_gaussian`).  ``constants=False`` gives R3's ``-mean((x - mean)^2 / std^2) / 2``.
    """
    if sample.shape != mean.shape:
        raise ValueError(f"gaussian_logprob: sample {tuple(sample.shape)} and mean {tuple(mean.shape)} differ")
    dtype = compute_dtype(mean)
    z = (sample.to(dtype) - mean.to(dtype)) / std.to(dtype)
    dims = tuple(range(1, z.dim()))
    lp = -0.5 * (z * z).mean(dim=dims) if dims else -0.5 * z * z
    if constants:
        row_std = std.to(dtype).expand(z.shape[0], *std.shape[1:]).reshape(z.shape[0], -1)[:, 0]
        lp = lp - torch.log(row_std) - _HALF_LOG_2PI
    return lp


def step_distribution(velocity: FlowVelocity, guidance: Guidance, x_t: torch.Tensor, t: float | torch.Tensor,
                      delta: float | torch.Tensor, eta: float | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and std of the SDE step from ``x_t`` under the guided velocity: the one definition for both sides.

    ``x_t`` is passed to the velocity branches as it is (the sampler's working dtype; the learner casts the
    recorded float32 latent back to it, which is exact).
    """
    t64 = _rows(t, x_t.shape[0], "t")
    v = velocity.guided(guidance, x_t, t64)
    return sde_gaussian(x_t, v, t64, delta, eta)


def step_logprobs(velocity: FlowVelocity, guidance: Guidance, x_t: torch.Tensor, x_next: torch.Tensor,
                  t: float | torch.Tensor, delta: float | torch.Tensor, eta: float | torch.Tensor, *,
                  constants: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Learner side: ``(logp [N], mean [N, ...], std [N, 1, ...])`` of recorded transitions ``x_t -> x_next``.

    Differentiable through the velocity model; pass a reference model's :class:`FlowVelocity` (under
    ``torch.no_grad``) to get ``mean_ref`` for the closed-form KL.
    """
    mean, std = step_distribution(velocity, guidance, x_t, t, delta, eta)
    return gaussian_logprob(x_next, mean, std, constants=constants), mean, std
