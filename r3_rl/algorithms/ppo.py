"""PPO with a critic over R3 stages: generalised advantage estimation and the clipped value loss.

An R3 episode is a short chain of stages (plan -> image -> critique -> refined image -> ...); each stage is
one time step with its own reward (e.g. the improvement reward of a refine step) and its own value
estimate.  GRPO needs neither function (the sibling group is the baseline); PPO uses them instead of
:func:`r3_rl.algorithms.advantages.group_advantages`.
"""
from __future__ import annotations

import torch

from r3_rl.algorithms.losses import binary_mask


def gae(rewards: torch.Tensor, values: torch.Tensor, *, gamma: float = 1.0, lam: float = 0.95,
        last_value: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation (Schulman et al. 2016) over one episode of ``T`` stages.

    ``delta_t = r_t + gamma * V_{t+1} - V_t`` with ``V_T = last_value`` (0 for an episode that ended, the
    critic's estimate for one cut off), ``A_t = delta_t + gamma * lam * A_{t+1}``, ``returns = A + V`` (the
    value targets).  Both outputs are detached: they are regression/advantage *targets*, and gradients
    through them would let the critic move its own target.  NaN rewards or values propagate.
    """
    if rewards.dim() != 1 or rewards.shape != values.shape:
        raise ValueError(f"gae: rewards {tuple(rewards.shape)} and values {tuple(values.shape)} must be the same "
                         "1-D [T] shape (one episode)")
    if not (0.0 <= gamma <= 1.0 and 0.0 <= lam <= 1.0):
        raise ValueError(f"gae: gamma and lam must lie in [0, 1], got gamma={gamma}, lam={lam}")
    r = rewards.detach()
    v = values.detach().to(r.dtype)
    next_v = torch.cat([v[1:], v.new_tensor([float(last_value)])])
    delta = r + gamma * next_v - v
    adv = torch.empty_like(delta)
    running = delta.new_zeros(())
    for t in range(r.shape[0] - 1, -1, -1):  # T is a handful of stages; a loop is clearest
        running = delta[t] + gamma * lam * running
        adv[t] = running
    return adv, adv + v


def value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor,
               mask: torch.Tensor | None = None, *, clip: float | None = 0.2) -> torch.Tensor:
    """PPO value loss ``0.5 * mean(max((V - R)^2, (V_clip - R)^2))``, ``V_clip = V_old + clip(V - V_old, +-clip)``.

    The clipped term keeps the critic from moving further than ``clip`` from the values seen at rollout
    time in one update (OpenAI baselines PPO2 ``vpredclipped``; the pessimistic max means clipping can only
    remove gradient, never add it).  ``clip=None`` gives the plain ``0.5 * (V - R)^2``.  ``mask`` (0/1, same
    shape) selects the entries that count; the mean is over them (0 when there are none).
    """
    if values.shape != old_values.shape or values.shape != returns.shape:
        raise ValueError(f"value_loss: values {tuple(values.shape)}, old_values {tuple(old_values.shape)} and "
                         f"returns {tuple(returns.shape)} must have the same shape")
    if clip is not None and clip < 0:
        raise ValueError(f"value_loss: clip must be >= 0 or None, got {clip}")
    loss = (values - returns) ** 2
    if clip is not None:
        v_clip = old_values + torch.clamp(values - old_values, -clip, clip)
        loss = torch.maximum(loss, (v_clip - returns) ** 2)
    if mask is None:
        return 0.5 * loss.mean()
    if mask.shape != values.shape:
        raise ValueError(f"value_loss: mask {tuple(mask.shape)} must match values {tuple(values.shape)}")
    m = binary_mask(mask)  # fractional weights refused, as in the policy loss: they would be silently binarised
    masked = torch.where(m, loss, torch.zeros_like(loss))
    return 0.5 * masked.sum() / m.sum().clamp(min=1)


def value_clip_fraction(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, clip: float) -> float:
    """Share of entries whose value loss takes the clipped branch of :func:`value_loss` (verl's ``vf_clipfrac``,
    TRL's ``val/clipfrac``): how often ``value_clip`` held the critic back."""
    v_clip = old_values + torch.clamp(values - old_values, -clip, clip)
    return float(((v_clip - returns) ** 2 > (values - returns) ** 2).float().mean()) if values.numel() else 0.0


def whiten(advantages: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Advantages shifted to mean 0 and scaled by ``rsqrt(var + eps)`` (unbiased variance), as verl's
    ``masked_whiten`` and TRL's ``whiten`` do.  ``eps`` under the square root, not added to the standard
    deviation: advantages that differ only by rounding (~1e-8) stay near 0 instead of being blown up to
    order-1 values of one sign.  At least two values (one has no variance)."""
    if advantages.numel() < 2:
        raise ValueError(f"whiten: needs at least two advantages, got {advantages.numel()}")
    return (advantages - advantages.mean()) * torch.rsqrt(advantages.var() + eps)
