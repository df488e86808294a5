"""Policy loss and KL of image actions made of denoising (SDE) steps: Flow-GRPO, MixGRPO and R3 in one place.

Units.  A row is one recorded SDE step of one image; ``logp`` is its mean per-element Gaussian log-density
(:func:`r3_rl.flow.transition.gaussian_logprob`).  Because it is a *mean* over the latent elements, log-ratios
are tiny and flow RL clips at about 1e-4 (Flow-GRPO SD3 1e-4, its fast/Bagel configs 1e-5, Wan 1e-3) -- not at
the text clip of 0.2, which never binds for images (R3 uses 0.2 and gets away with it only because it makes one
update per rollout).  The clip range here is the image's own, separate from the text's.

Ratio unit (``ratio_unit``):

* ``step`` (default; Flow-GRPO, MixGRPO, DanceGRPO): one clipped ratio per (image, step), the loss is the mean
  over all kept (image, step) units -- the same as Flow-GRPO's per-timestep batch means accumulated over the
  trained timesteps when every image trains the same number of steps.
* ``image`` (the issue's reading of R3): the image's SDE-step log-probs are averaged first, one ratio per
  image.  With one SDE step per image (R3) the two coincide.

The loss per unit is ``-min(r A, clip(r, 1 - clip_low, 1 + clip_high) A)`` (:func:`clipped_policy_loss`, so
NaN advantages drop a unit exactly as they drop a text row), advantages optionally clipped to
``+-adv_clip`` first (Flow-GRPO and DanceGRPO use 5).  The modality weight (R3: 2.0 for images) is the
learner's business: it multiplies the returned loss.
"""
from __future__ import annotations

import torch

from r3_rl.algorithms.losses import clipped_policy_loss

FLOW_KL_KINDS: tuple[str, ...] = ("exact", "r3", "flow_grpo")
RATIO_UNITS: tuple[str, ...] = ("step", "image")


def flow_gaussian_kl(mean: torch.Tensor, mean_ref: torch.Tensor, std: torch.Tensor | float, *, kind: str = "exact",
                     delta: torch.Tensor | float | None = None) -> torch.Tensor:
    """``[N]`` KL between the policy's and the reference's step Gaussians, averaged over each row's elements.

    Both Gaussians share the std (it depends on ``t``, ``delta``, ``eta`` only), so per element the exact
    ``KL(N(mean, s^2) || N(mean_ref, s^2)) = (mean - mean_ref)^2 / (2 s^2)``.  Named variants, so the units are
    explicit (their coefficients are not interchangeable):

    * ``exact``: the formula above;
    * ``r3``: ``(mean - mean_ref)^2 / s^2``, twice the exact KL (R3 weights it 1e-3; ``exact`` with 2e-3 is
      the same penalty);
    * ``flow_grpo``: ``(mean - mean_ref)^2 / (2 eta^2) = delta * exact`` (Flow-GRPO divides by its
      ``std_dev_t``, which lacks the ``sqrt(delta)``); needs ``delta`` (``[N]`` or a float).
    """
    if mean.shape != mean_ref.shape:
        raise ValueError(f"flow_gaussian_kl: mean {tuple(mean.shape)} and mean_ref {tuple(mean_ref.shape)} differ")
    if kind not in FLOW_KL_KINDS:
        raise ValueError(f"flow_gaussian_kl: unknown kind {kind!r}; valid: {', '.join(FLOW_KL_KINDS)}")
    dtype = torch.promote_types(mean.dtype, torch.float32)
    s = torch.as_tensor(std, dtype=dtype, device=mean.device)
    per_elem = (mean.to(dtype) - mean_ref.to(dtype)) ** 2 / (2.0 * s * s)
    kl = per_elem.reshape(mean.shape[0], -1).mean(dim=1)
    if kind == "r3":
        return 2.0 * kl
    if kind == "flow_grpo":
        if delta is None:
            raise ValueError("flow_gaussian_kl: kind 'flow_grpo' needs delta (the step sizes)")
        return kl * torch.as_tensor(delta, dtype=dtype, device=mean.device)
    return kl


def image_means(values: torch.Tensor, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean of ``values`` ``[N]`` over the rows of each image (``image`` ``[N]``, any ids); returns
    ``(per_image [M], inverse [N])`` with images in order of first id value (``torch.unique``).  Differentiable.
    """
    if values.shape != image.shape or values.dim() != 1:
        raise ValueError(f"image_means: values {tuple(values.shape)} and image {tuple(image.shape)} must be [N]")
    ids, inverse = torch.unique(image, return_inverse=True)
    count = torch.zeros(ids.shape[0], dtype=values.dtype, device=values.device).index_add_(
        0, inverse, torch.ones_like(values))
    total = torch.zeros(ids.shape[0], dtype=values.dtype, device=values.device).index_add_(0, inverse, values)
    return total / count, inverse


def _image_advantages(advantages: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
    """One advantage per image; the rows of an image must all carry the same one (NaN included)."""
    per_image, inverse = image_means(advantages, image)
    back = per_image[inverse]
    same = torch.where(torch.isnan(advantages), torch.isnan(back), advantages == back)
    if not bool(same.all()):
        raise ValueError("flow_policy_loss: the SDE steps of one image carry different advantages; "
                         "ratio_unit='image' needs one advantage per image")
    return per_image


def flow_policy_loss(
    logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, *, clip_low: float = 1e-4,
    clip_high: float | None = None, adv_clip: float | None = 5.0, ratio_unit: str = "step",
    image: torch.Tensor | None = None, kl: torch.Tensor | None = None, kl_coef: float = 0.0,
    policy_weight: float | torch.Tensor = 1.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``policy_weight`` * clipped surrogate + ``kl_coef`` * mean KL over SDE-step rows; returns ``(loss, metrics)``.

    ``policy_weight`` is the image modality weight (R3: ``loss = 1.0 text + 2.0 image + 1e-3 image KL``: the
    weight does not multiply the KL).  A ``[N]`` tensor weighs each row (one value per image: the image's stage
    weight times the modality weight, ``learner.stage_weights``).

    Shapes: ``logp``, ``old_logp``, ``advantages`` (the image's advantage on each of its rows; NaN drops the
    row), ``kl`` (per row, from :func:`flow_gaussian_kl`) and ``image`` (which image a row belongs to; needed
    for ``ratio_unit='image'``) are all ``[N]``.  ``clip_high`` defaults to ``clip_low``.  The KL is averaged over
    the same kept units as the surrogate.  Metrics: those of :func:`clipped_policy_loss` (``clip_frac*``,
    ``ratio_*``, ``policy_loss``), plus ``adv_clip_frac`` and, with ``kl``, ``kl_mean``.
    """
    clip_high = clip_low if clip_high is None else clip_high
    if logp.dim() != 1:
        raise ValueError(f"flow_policy_loss: logp must be [N] (one row per SDE step), got {tuple(logp.shape)}")
    for name, t in (("old_logp", old_logp), ("advantages", advantages), ("image", image), ("kl", kl)):
        if t is not None and t.shape != logp.shape:
            raise ValueError(f"flow_policy_loss: {name} {tuple(t.shape)} must match logp {tuple(logp.shape)}")
    if ratio_unit not in RATIO_UNITS:
        raise ValueError(f"flow_policy_loss: unknown ratio_unit {ratio_unit!r}; valid: {', '.join(RATIO_UNITS)}")
    if adv_clip is not None and not adv_clip > 0:
        raise ValueError(f"flow_policy_loss: adv_clip must be > 0 or None, got {adv_clip}")
    row_weight = policy_weight if isinstance(policy_weight, torch.Tensor) else None
    if row_weight is not None:
        if row_weight.shape != logp.shape:
            raise ValueError(f"flow_policy_loss: policy_weight {tuple(row_weight.shape)} must be a float or match "
                             f"logp {tuple(logp.shape)}")
        if not bool((row_weight >= 0).all()):
            raise ValueError("flow_policy_loss: policy_weight must be >= 0 on every row")
    elif not policy_weight >= 0:
        raise ValueError(f"flow_policy_loss: policy_weight must be >= 0, got {policy_weight}")
    if kl_coef != 0 and kl is None:
        raise ValueError("flow_policy_loss: kl_coef is non-zero but no kl was given")

    adv = advantages.to(logp.dtype)
    if adv_clip is not None:
        clipped_adv = adv.clamp(-adv_clip, adv_clip)
        adv_clip_frac = ((clipped_adv != adv) & ~torch.isnan(adv)).to(logp.dtype).mean()
        adv = clipped_adv
    else:
        adv_clip_frac = logp.new_zeros(())
    old = old_logp.to(logp.dtype)
    if ratio_unit == "image":
        if image is None:
            raise ValueError("flow_policy_loss: ratio_unit='image' needs image (which image each row belongs to)")
        adv = _image_advantages(adv, image)
        logp, _ = image_means(logp, image)
        old, _ = image_means(old, image)
        kl = image_means(kl.to(logp.dtype), image)[0] if kl is not None else None
        row_weight = image_means(row_weight.to(logp.dtype), image)[0] if row_weight is not None else None

    mask = torch.ones(logp.shape[0], 1, dtype=torch.bool, device=logp.device)
    loss, metrics = clipped_policy_loss(logp.unsqueeze(1), old.unsqueeze(1), adv, mask, clip_low=clip_low,
                                        clip_high=clip_high, loss_type="token_mean", row_weight=row_weight)
    if row_weight is None:
        loss = loss * policy_weight
    metrics["adv_clip_frac"] = adv_clip_frac.detach()
    if kl is not None:
        kept = ~torch.isnan(adv)
        kl_kept = torch.where(kept, kl.to(loss.dtype), torch.zeros_like(kl, dtype=loss.dtype))
        kl_mean = kl_kept.sum() / kept.sum().clamp(min=1)
        if kl_coef != 0:
            loss = loss + kl_coef * kl_mean
        metrics["kl_mean"] = kl_mean.detach()
    return loss, metrics
