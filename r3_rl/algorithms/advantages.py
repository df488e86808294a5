"""Group-relative advantages (GRPO / Tree-RL): each sample is judged only against its siblings.

``A_i = r_i - mean(r_group)``, optionally divided by ``std(r_group) + eps``.  The R3 authors use the plain
difference (no std normalisation, the Dr. GRPO recommendation); TRL divides by the std by default
(``scale_rewards="group"``).

Conventions, and why:

* **Failed rewards are NaN, never 0.**  A failed/unscored sample is excluded from its group's mean and std
  (a 0 would bias the baseline and hand the failed sample a spurious advantage) and gets a NaN advantage so
  the loss drops its row (:func:`r3_rl.algorithms.losses.clipped_policy_loss` masks NaN-advantage rows).
  TRL does the same for the baseline (``nanmean``/``nanstd``) but then sets the failed sample's advantage to
  0, which keeps its KL term and its tokens in the loss denominators; we drop the row entirely.
* **std is the unbiased (Bessel, ``n - 1``) sample std over the valid members**, exactly TRL's ``nanstd``
  (``trl/trainer/utils.py``).  TRL adds ``1e-4`` to the std; our default ``eps`` is ``1e-6`` -- pass
  ``eps=1e-4`` to reproduce TRL's numbers.
* **No-signal groups get exactly 0** for their valid members: groups whose valid rewards are all equal
  to float rounding (:mod:`r3_rl.algorithms.signal`, the one definition the batch and the logs use too;
  ``r - mean`` could otherwise be a rounding residue like 1e-17, blown up by the std division) and groups
  with fewer than 2 valid members (a single sample has no sibling to be compared with; TRL's ``nanstd`` is
  NaN there and ``nan_to_num`` makes it 0 too).
* **+-inf rewards raise** ``ValueError``: an infinite reward is a broken reward function, and letting it
  through would turn a whole group's advantages into NaN -- i.e. silently "failed".
"""
from __future__ import annotations

import math
from collections.abc import Hashable, Sequence

import torch

from r3_rl.algorithms.signal import SIGNAL_ATOL


def _group_index(group_ids: Sequence[Hashable], n: int) -> tuple[torch.Tensor, int]:
    """Dense group index per sample (first-seen order) and the number of groups."""
    if len(group_ids) != n:
        raise ValueError(f"group_ids has {len(group_ids)} entries but rewards has {n}")
    seen: dict[Hashable, int] = {}
    idx = [seen.setdefault(g, len(seen)) for g in group_ids]
    return torch.tensor(idx, dtype=torch.long), len(seen)


def _check_rewards(rewards: torch.Tensor) -> None:
    if rewards.dim() != 1:
        raise ValueError(f"rewards must be 1-D, got shape {tuple(rewards.shape)}")
    if not rewards.is_floating_point():
        raise ValueError(f"rewards must be a floating tensor (NaN marks failures), got {rewards.dtype}")
    inf = torch.isinf(rewards)
    if bool(inf.any()):
        i = int(inf.nonzero()[0, 0])
        raise ValueError(f"reward {i} is {float(rewards[i])}: a reward must be finite, or NaN for a failure")


def _per_group(rewards: torch.Tensor, gidx: torch.Tensor, n_groups: int) -> dict[str, torch.Tensor]:
    """Per-group valid count, mean, unbiased std and 'all valid rewards equal' flag (NaNs excluded; equal to
    ``SIGNAL_ATOL``, as :func:`r3_rl.algorithms.signal.has_signal`)."""
    gidx = gidx.to(rewards.device)
    kw = {"dtype": rewards.dtype, "device": rewards.device}
    valid = ~torch.isnan(rewards)
    r0 = torch.where(valid, rewards, torch.zeros_like(rewards))
    count = torch.zeros(n_groups, **kw).index_add_(0, gidx, valid.to(rewards.dtype))
    mean = torch.zeros(n_groups, **kw).index_add_(0, gidx, r0) / count.clamp(min=1)
    dev = torch.where(valid, rewards - mean[gidx], torch.zeros_like(rewards))
    sq = torch.zeros(n_groups, **kw).index_add_(0, gidx, dev * dev)
    std = torch.sqrt(sq / (count - 1).clamp(min=1))
    big, small = torch.full_like(rewards, math.inf), torch.full_like(rewards, -math.inf)
    gmax = torch.full((n_groups,), -math.inf, **kw).scatter_reduce(
        0, gidx, torch.where(valid, rewards, small), reduce="amax")
    gmin = torch.full((n_groups,), math.inf, **kw).scatter_reduce(
        0, gidx, torch.where(valid, rewards, big), reduce="amin")
    return {"count": count, "mean": mean, "std": std, "flat": (gmax - gmin) <= SIGNAL_ATOL}


def _group_table(rewards: torch.Tensor, ids: Sequence[Hashable]) -> tuple[torch.Tensor, dict[str, torch.Tensor] | None]:
    """Checked rewards -> (each sample's group index on the rewards' device, :func:`_per_group`; None if empty)."""
    _check_rewards(rewards)
    idx, n = _group_index(ids, rewards.numel())
    return idx.to(rewards.device), (_per_group(rewards, idx, n) if rewards.numel() else None)


def _failed_as_nan(rewards: torch.Tensor, adv: torch.Tensor) -> torch.Tensor:
    return torch.where(torch.isnan(rewards), torch.full_like(adv, math.nan), adv)


def group_advantages(rewards: torch.Tensor, group_ids: Sequence[Hashable], *, normalize_std: bool = False,
                     eps: float = 1e-6, std_pools: Sequence[Hashable] | None = None) -> torch.Tensor:
    """Advantage of each sample relative to the valid members of its group (same dtype as ``rewards``).

    ``rewards``: 1-D float, NaN = failed sample.  ``group_ids``: one hashable per sample; members of a group
    need not be contiguous.  Returns NaN for failed samples, 0 for valid members of no-signal groups (all
    equal or < 2 valid members), else ``r - mean`` (``/ (std + eps)`` with ``normalize_std``: the group's std,
    or with ``std_pools`` (one id per sample) the std of the valid rewards of the sample's pool, e.g. its stage
    across the batch: TRL's ``scale_rewards="batch"``).
    """
    gidx, g = _group_table(rewards, group_ids)
    if g is None:
        return rewards.clone()
    adv = rewards - g["mean"][gidx]
    if normalize_std:
        if std_pools is None:
            std = g["std"][gidx]
        else:
            pidx, pools = _group_table(rewards, std_pools)
            std = pools["std"][pidx]  # type: ignore[index]
        adv = adv / (std + eps)
    no_signal = (g["count"] < 2) | g["flat"]
    adv = torch.where(no_signal[gidx], torch.zeros_like(adv), adv)
    return _failed_as_nan(rewards, adv)


def leave_one_out_advantages(rewards: torch.Tensor, pool_ids: Sequence[Hashable]) -> torch.Tensor:
    """``r_i`` minus the mean of the *other* valid rewards of its pool (RLOO's baseline, over a pool of samples
    that need not share a prompt or an image).

    Why: a GRPO group whose members all earn the same reward teaches nothing, however wrong they all are.  For
    the critic that is the common case -- eight critiques of one flawed image that all say "no further edit
    needed" -- and greedy evaluation sees exactly those confident mistakes.  Pooling the critiques of every
    image with the same verdict (correct / flawed) gives such a group the advantage of its reward against the
    other images' critiques: the baseline does not depend on the sample's own action, so the policy gradient
    stays unbiased.  NaN rewards (failures) get NaN and are left out of every baseline; a pool with fewer than
    two valid rewards gives its valid member 0.
    """
    pidx, g = _group_table(rewards, pool_ids)
    if g is None:
        return rewards.clone()
    count = g["count"][pidx]
    others = (g["mean"][pidx] * count - torch.nan_to_num(rewards)) / (count - 1).clamp(min=1)
    adv = torch.where(count >= 2, rewards - others, torch.zeros_like(rewards))
    return _failed_as_nan(rewards, adv)


def group_stats(rewards: torch.Tensor, group_ids: Sequence[Hashable]) -> dict[str, float]:
    """Counts for logging; each group lands in exactly one of the last three group counts or none of them.

    * ``samples``, ``groups``, ``failed_samples`` (NaN rewards);
    * ``all_failed_groups``: no valid member at all;
    * ``single_valid_groups``: exactly one valid member (no sibling, advantage 0);
    * ``zero_signal_groups``: >= 2 valid members whose rewards are all equal (advantage 0 for all) -- the
      GRPO "dead group" whose share of the batch tells whether the task is too easy or too hard.
    """
    _check_rewards(rewards)
    gidx, n_groups = _group_index(group_ids, rewards.numel())
    out = {"samples": float(rewards.numel()), "groups": float(n_groups),
           "failed_samples": float(torch.isnan(rewards).sum()), "all_failed_groups": 0.0,
           "single_valid_groups": 0.0, "zero_signal_groups": 0.0}
    if rewards.numel() == 0:
        return out
    g = _per_group(rewards, gidx, n_groups)
    out["all_failed_groups"] = float((g["count"] == 0).sum())
    out["single_valid_groups"] = float((g["count"] == 1).sum())
    out["zero_signal_groups"] = float(((g["count"] >= 2) & g["flat"]).sum())
    return out
