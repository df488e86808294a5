"""Classifier-free guidance of a velocity field, as one function shared by the sampler and the learner.

The SDE mean is affine in the guided velocity, so the learner must rebuild the guided velocity exactly as the
sampler did -- same branches, scales, interval and renorm -- or the policy ratio is not 1 before the first
update (the R3 reference trains generation without the CFG it sampled with).  Both sides call
:func:`guided_velocity` through :meth:`FlowVelocity.guided`.

Bagel's rule (``Bagel._forward_flow``), generalised to a batch with one ``t`` per row:

* guidance is active on a row iff ``lo < t <= hi`` (one predicate for sampler and learner) and
  ``text_scale > 1``; otherwise the row gets the conditional velocity ``v_c`` unchanged;
* text: ``v_T = v_tu + g_T * (v_c - v_tu)``; image (only inside text guidance, when ``g_I > 1``):
  ``v = v_iu + g_I * (v_T - v_iu)``;
* renorm ``k = clamp(|v_c| / (|v| + 1e-8), renorm_min, 1)``: ``global`` one norm per image over all its
  elements, ``channel`` one per token over the last dim (after both guidances), ``text_channel`` per token on
  ``v_T`` only, before image guidance; ``none`` (SD3/FLUX) no renorm.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch

from r3_rl.flow.schedule import known_fields

RENORM_KINDS: tuple[str, ...] = ("none", "global", "channel", "text_channel")

Velocity = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""``v = f(x, t)``: latents ``x`` ``[B, ...]`` and times ``t`` ``[B]`` (float32, on ``x``'s device) -> ``[B, ...]``."""


@dataclass(frozen=True)
class Guidance:
    """CFG settings of one kind of image action (R3: generation 4.0 / 1 / global, edits 4.0 / 1.5 / text_channel)."""

    text_scale: float = 1.0
    image_scale: float = 1.0
    interval: tuple[float, float] = (0.0, 1.0)
    renorm: str = "none"
    renorm_min: float = 0.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "interval", tuple(float(v) for v in self.interval))
        if self.renorm not in RENORM_KINDS:
            raise ValueError(f"guidance renorm {self.renorm!r} is unknown; valid: {', '.join(RENORM_KINDS)}")
        lo, hi = self.interval if len(self.interval) == 2 else (1.0, 0.0)
        if not 0.0 <= lo < hi <= 1.0:
            raise ValueError(f"guidance interval must be two numbers 0 <= lo < hi <= 1, got {self.interval}")
        if self.text_scale < 0 or self.image_scale < 0 or not 0.0 <= self.renorm_min <= 1.0:
            raise ValueError("guidance scales must be >= 0 and renorm_min in [0, 1], got "
                             f"{self.text_scale}, {self.image_scale}, {self.renorm_min}")

    @property
    def uses_image_branch(self) -> bool:
        return self.text_scale > 1.0 and self.image_scale > 1.0

    def active(self, t: torch.Tensor) -> torch.Tensor:
        """``[B]`` bool: rows whose time lies in the guidance interval ``(lo, hi]`` (all False without guidance)."""
        lo, hi = self.interval
        on = (t > lo) & (t <= hi)
        return on if self.text_scale > 1.0 else torch.zeros_like(on)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["interval"] = list(self.interval)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Guidance:
        return cls(**known_fields(cls, d, "guidance"))


def _renorm_factor(v_ref: torch.Tensor, v: torch.Tensor, per_token: bool, lo: float) -> torch.Tensor:
    dims = -1 if per_token else tuple(range(1, v.dim()))
    ref = torch.linalg.vector_norm(v_ref, dim=dims, keepdim=True)
    cur = torch.linalg.vector_norm(v, dim=dims, keepdim=True)
    return (ref / (cur + 1e-8)).clamp(min=lo, max=1.0)


def guided_velocity(guidance: Guidance, t: torch.Tensor, v_cond: torch.Tensor,
                    v_text_uncond: torch.Tensor | None = None,
                    v_image_uncond: torch.Tensor | None = None) -> torch.Tensor:
    """The guided velocity (module docstring), computed in at least float32, ``[B, ...]``.

    ``t`` ``[B]`` gives each row's time; the unconditional branches may be ``None`` only where no row needs
    them (see :meth:`FlowVelocity.guided`, which evaluates just the branches needed).
    """
    if t.dim() != 1 or t.shape[0] != v_cond.shape[0]:
        raise ValueError(f"guided_velocity: t must be [B={v_cond.shape[0]}], got {tuple(t.shape)}")
    dtype = torch.promote_types(v_cond.dtype, torch.float32)
    v_c = v_cond.to(dtype)
    if guidance.text_scale <= 1.0:  # no guidance at any t
        return v_c
    active = guidance.active(t).to(v_c.device)
    if not bool(active.any()):
        return v_c
    if v_text_uncond is None or (guidance.uses_image_branch and v_image_uncond is None):
        raise ValueError("guided_velocity: guidance is active but an unconditional branch is missing")
    v_tu = v_text_uncond.to(dtype)
    v = v_tu + guidance.text_scale * (v_c - v_tu)
    if guidance.renorm == "text_channel":
        v = v * _renorm_factor(v_c, v, True, guidance.renorm_min)
    if guidance.uses_image_branch:
        v_iu = v_image_uncond.to(dtype)
        v = v_iu + guidance.image_scale * (v - v_iu)
    if guidance.renorm in ("global", "channel"):
        v = v * _renorm_factor(v_c, v, guidance.renorm == "channel", guidance.renorm_min)
    return torch.where(active.view(-1, *([1] * (v.dim() - 1))), v, v_c)


@dataclass
class FlowVelocity:
    """The velocity branches of one batch of images: conditional, text-unconditional, image-unconditional.

    A flow policy builds one per batch (closures bound to each row's context) for sampling and again for
    training; the branches it does not have stay ``None`` (then the guidance must not need them).
    """

    cond: Velocity
    text_uncond: Velocity | None = None
    image_uncond: Velocity | None = None

    def guided(self, guidance: Guidance, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Guided velocity at ``(x, t)``; runs an unconditional branch only if some row's guidance needs it.

        ``t`` is ``[B]`` float64 (the recorded times); the model gets it as float32 on ``x``'s device.
        """
        t_model = t.to(device=x.device, dtype=torch.float32)
        active = bool(guidance.active(t).any())
        need_image = active and guidance.uses_image_branch
        if (active and self.text_uncond is None) or (need_image and self.image_uncond is None):
            raise ValueError(f"guidance {guidance.to_dict()} needs a text-unconditional"
                             f"{' and an image-unconditional' if need_image else ''} velocity branch")
        v_c = self.cond(x, t_model)
        v_tu = self.text_uncond(x, t_model) if active else None
        v_iu = self.image_uncond(x, t_model) if need_image else None
        return guided_velocity(guidance, t, v_c, v_tu, v_iu)
