"""Per-token estimators of KL(pi || ref) from tokens sampled by pi (Schulman, "Approximating KL divergence", 2020).

With ``x = logp - ref_logp`` (log pi(y) - log ref(y) of a sampled token y):

* ``k1 = x``                     -- unbiased, high variance, can be negative per token.
* ``k2 = 0.5 * x**2``            -- biased, low variance, always >= 0.
* ``k3 = exp(-x) + x - 1``       -- unbiased and always >= 0; the form used by TRL's GRPOTrainer
  (``exp(ref - logp) - (ref - logp) - 1``) and by the R3 authors (weight 1e-3).

Gradients flow through ``logp`` only in the usual way (``ref_logp`` comes from a frozen model, the caller
detaches it).  All three are exactly 0 where ``logp == ref_logp``.
"""
from __future__ import annotations

from typing import Literal

import torch

KLKind = Literal["k1", "k2", "k3"]
KL_KINDS: tuple[str, ...] = ("k1", "k2", "k3")


def kl_estimate(logp: torch.Tensor, ref_logp: torch.Tensor, kind: KLKind = "k3") -> torch.Tensor:
    """Per-token KL estimate, same shape as ``logp``; see the module docstring for the three kinds."""
    if logp.shape != ref_logp.shape:
        raise ValueError(f"kl_estimate: logp {tuple(logp.shape)} and ref_logp {tuple(ref_logp.shape)} differ")
    x = logp - ref_logp
    if kind == "k1":
        return x
    if kind == "k2":
        return 0.5 * x * x
    if kind == "k3":
        d = ref_logp - logp  # written as TRL writes it, so parity is bit-for-bit in practice
        return torch.exp(d) - d - 1.0
    raise ValueError(f"kl_estimate: unknown kind {kind!r}; valid: {', '.join(KL_KINDS)}")


def kl_by_modality(logp: torch.Tensor, ref_logp: torch.Tensor, mask: torch.Tensor, modalities: list[str],
                   kind: KLKind = "k3") -> dict[str, float]:
    """Mean per-token KL over the valid tokens of each modality's rows: ``{"kl_text": .., "kl_image": ..}``
    (a modality with no rows is left out, not reported as 0).  ``logp``/``ref_logp``/``mask`` are ``[B, T]``."""
    with torch.no_grad():
        kl = kl_estimate(logp.detach(), ref_logp.detach(), kind)
        out = {}
        for modality in sorted(set(modalities)):
            rows = torch.tensor([m == modality for m in modalities], device=mask.device).unsqueeze(1)
            m = mask.to(torch.bool) & rows
            if bool(m.any()):
                out[f"kl_{modality}"] = float(torch.where(m, kl, torch.zeros_like(kl)).sum() / m.sum())
        return out
