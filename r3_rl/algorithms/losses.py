"""The clipped policy-gradient loss of GRPO/PPO, with an optional per-token KL penalty to a reference.

Per token (``r = exp(logp - old_logp)``, ``A`` the row's advantage)::

    loss_t = -min(r * A, clip(r, 1 - clip_low, 1 + clip_high) * A) + kl_coef_row * KL_t

which is TRL's ``GRPOTrainer._compute_loss`` for its clipped loss types (``grpo``/``bnpo``/``dr_grpo``/``dapo``)
at ``importance_sampling_level="token"``; ``tests/test_trl_parity.py`` checks loss and gradient against it.

Aggregation over the ``[B, T]`` tokens (``loss_type``) -- the choice changes how much long vs short
sequences weigh, see the Dr. GRPO paper:

* ``token_mean``: sum over valid tokens / number of valid tokens (TRL ``bnpo``; TRL ``dapo`` on one process,
  where its normaliser is the batch's token count).  Every token weighs the same.
* ``seq_mean``: mean over rows of each row's token mean (TRL ``grpo``, the original GRPO paper).  Every
  sequence weighs the same, so tokens of short sequences weigh more.
* ``dr_grpo``: sum over valid tokens / (rows * ``max_len``) (TRL ``dr_grpo``); a constant normaliser, so
  no length bias.  ``max_len`` is the maximum completion length (default: ``mask.shape[1]``), or a ``[B]`` tensor
  of one per row (R3's stages differ: a plan's most tokens, a critique's, an image's token count), each row's
  token sum divided by its own.

Failure semantics:

* A row whose advantage is NaN (failed reward, see :mod:`r3_rl.algorithms.advantages`) is dropped from the
  batch exactly as if it were not there: none of its tokens count, it does not count as a row for
  ``seq_mean``/``dr_grpo``, and its (possibly garbage) log-probs cannot leak a NaN into the loss or the gradient.
  If every row is dropped the loss is 0 (with a graph, so ``backward`` still works).
* Values at masked positions (padding) are ignored, even if non-finite.
* A NaN/inf anywhere that counts (a valid token's log-prob, a finite-advantage row's ratio, a KL weight)
  propagates to the loss: the learner checks ``isfinite(loss)`` and skips the step instead of training on it.
"""
from __future__ import annotations

from typing import Literal

import torch

from r3_rl.algorithms.kl import KL_KINDS, kl_estimate

LossType = Literal["token_mean", "seq_mean", "dr_grpo"]
LOSS_TYPES: tuple[str, ...] = ("token_mean", "seq_mean", "dr_grpo")


def binary_mask(mask: torch.Tensor) -> torch.Tensor:
    """Binary mask as bool.  Fractional weights are refused: they would be silently binarised."""
    if mask.dtype != torch.bool:
        if not bool(((mask == 0) | (mask == 1)).all()):
            raise ValueError("mask must hold only 0/1 (or be a bool tensor)")
        mask = mask != 0
    return mask


def kept_tokens(mask: torch.Tensor, advantages: torch.Tensor) -> torch.Tensor:
    """``[B, T]`` bool: the tokens :func:`clipped_policy_loss` trains on -- the mask's, in rows whose advantage is
    not NaN (a NaN advantage drops its row).  Figures logged beside the loss (the KL per modality) use the same."""
    return binary_mask(mask) & ~torch.isnan(advantages).unsqueeze(1)


def aggregate(per_token: torch.Tensor, mask: torch.Tensor, loss_type: LossType,
              max_len: int | torch.Tensor | None = None, *, rows: torch.Tensor | None = None) -> torch.Tensor:
    """Reduce a ``[B, T]`` per-token quantity to a scalar according to ``loss_type`` (module docstring).

    ``mask`` ``[B, T]`` selects the valid tokens (masked values are ignored, even NaN); ``rows`` ``[B]`` bool
    selects the rows that count as part of the batch (default: all rows, as TRL: a row with no valid token
    still counts in ``seq_mean``'s and ``dr_grpo``'s row count).  Empty selections give 0, not NaN.
    """
    if per_token.dim() != 2 or per_token.shape != mask.shape:
        raise ValueError(f"aggregate: per_token {tuple(per_token.shape)} and mask {tuple(mask.shape)} must be the "
                         "same [B, T] shape")
    m = binary_mask(mask)
    if rows is not None:
        m = m & rows.to(torch.bool).unsqueeze(1)
    n_rows = per_token.new_tensor(per_token.shape[0]) if rows is None else rows.to(per_token.dtype).sum()
    masked = torch.where(m, per_token, torch.zeros_like(per_token))
    if loss_type == "token_mean":
        return masked.sum() / m.sum().clamp(min=1)
    if loss_type == "seq_mean":
        per_row = masked.sum(-1) / m.sum(-1).clamp(min=1)
        return per_row.sum() / n_rows.clamp(min=1)
    if loss_type == "dr_grpo":
        if isinstance(max_len, torch.Tensor):  # one constant per row
            lengths = max_len.to(device=per_token.device, dtype=per_token.dtype)
            if lengths.shape != (per_token.shape[0],) or bool((lengths < 1).any()) or bool((m.sum(-1) > lengths).any()):
                raise ValueError(f"aggregate: max_len per row must be [B={per_token.shape[0]}], >= 1 and >= each "
                                 "row's valid tokens")
            return (masked.sum(-1) / lengths).sum() / n_rows.clamp(min=1)
        max_len = per_token.shape[1] if max_len is None else max_len
        longest = int(m.sum(-1).max()) if m.numel() else 0
        if max_len < 1 or longest > max_len:
            raise ValueError(f"aggregate: max_len={max_len} must be >= 1 and >= the longest valid row ({longest})")
        return masked.sum() / (n_rows.clamp(min=1) * max_len)
    raise ValueError(f"unknown loss_type {loss_type!r}; valid: {', '.join(LOSS_TYPES)}")


def _masked_stat(x: torch.Tensor, m: torch.Tensor, how: str) -> torch.Tensor:
    """min/mean/max of ``x`` over ``m`` (NaN when ``m`` is empty: an undefined statistic, not a zero)."""
    if not bool(m.any()):
        return x.new_tensor(float("nan"))
    v = x[m]
    return {"min": v.min, "mean": v.mean, "max": v.max}[how]()


def clipped_policy_loss(
    logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, *,
    clip_low: float = 0.2, clip_high: float = 0.2, loss_type: LossType = "token_mean",
    max_len: int | torch.Tensor | None = None,
    ref_logp: torch.Tensor | None = None, kl_coef: float | torch.Tensor = 0.0, kl_kind: str = "k3",
    kl_importance_weight: bool = False, row_weight: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO-clip loss with KL penalty, aggregated by ``loss_type``; returns ``(loss, metrics)``.

    Shapes: ``logp``, ``old_logp``, ``ref_logp``, ``mask`` ``[B, T]``; ``advantages`` ``[B]`` (NaN = drop the
    row); ``kl_coef`` a float or a ``[B]`` tensor of per-row weights (text and image rows differ).  ``ref_logp``
    is required when any ``kl_coef`` is non-zero; when given with ``kl_coef == 0`` the KL is only reported.

    ``row_weight`` ``[B]`` (>= 0) multiplies each row's clipped term, not its KL: the recipe's modality weights
    (``learner.loss_weight_text`` / ``loss_weight_image``; R3 weighs image rows 2.0).  ``policy_loss`` is reported
    unweighted.

    ``kl_importance_weight`` multiplies each token's KL by the (differentiable) ratio ``r``, which makes the KL
    gradient the unbiased reverse-KL gradient when tokens were sampled by the old policy (DeepSeek-V3.2;
    TRL's ``use_bias_correction_kl``, default True there).  Off by default: the R3 authors use plain k3.

    Metrics (detached scalars, over valid tokens of kept rows): ``clip_frac_low`` (ratio below ``1 - clip_low``
    with ``A < 0``), ``clip_frac_high`` (ratio above ``1 + clip_high`` with ``A > 0``), ``clip_frac`` (either) --
    i.e. the tokens whose gradient the clip zeroes, TRL's ``clip_ratio/{low,high,region}_mean``;
    ``ratio_min/mean/max``; ``policy_loss`` (the aggregated clipped term without KL); ``kl_mean`` (when
    ``ref_logp`` is given).  All are means/extremes, so averaging them over micro-batches is meaningful.
    """
    if logp.dim() != 2:
        raise ValueError(f"logp must be [B, T], got {tuple(logp.shape)}")
    for name, t in (("old_logp", old_logp), ("mask", mask), ("ref_logp", ref_logp)):
        if t is not None and t.shape != logp.shape:
            raise ValueError(f"{name} {tuple(t.shape)} must match logp {tuple(logp.shape)}")
    if advantages.shape != (logp.shape[0],):
        raise ValueError(f"advantages must be [B={logp.shape[0]}], got {tuple(advantages.shape)}")
    if kl_kind not in KL_KINDS:
        raise ValueError(f"unknown kl_kind {kl_kind!r}; valid: {', '.join(KL_KINDS)}")
    if clip_low < 0 or clip_low >= 1 or clip_high < 0:
        raise ValueError(f"clip range must satisfy 0 <= clip_low < 1 and clip_high >= 0, got {clip_low}, {clip_high}")
    coef = torch.as_tensor(kl_coef, dtype=logp.dtype, device=logp.device)
    if coef.dim() not in (0, 1) or (coef.dim() == 1 and coef.shape[0] != logp.shape[0]):
        raise ValueError(f"kl_coef must be a float or a [B={logp.shape[0]}] tensor, got shape {tuple(coef.shape)}")
    use_kl = bool((coef != 0).any())
    if use_kl and ref_logp is None:
        raise ValueError("kl_coef is non-zero but ref_logp is None: the KL penalty needs reference log-probs")

    rows = ~torch.isnan(advantages)
    m = kept_tokens(mask, advantages)
    adv = torch.where(rows, advantages, torch.zeros_like(advantages)).to(logp.dtype).unsqueeze(1)
    # Zero the inputs (not only the outputs) at ignored positions: a NaN/inf there would otherwise reach the
    # gradient through exp()'s backward (0 * inf = NaN) even though torch.where discards its value.
    zero = torch.zeros_like(logp)
    lp = torch.where(m, logp, zero)
    old = torch.where(m, old_logp.to(logp.dtype), zero)

    ratio = torch.exp(lp - old)
    clipped = torch.clamp(ratio, 1.0 - clip_low, 1.0 + clip_high)
    pg = -torch.minimum(ratio * adv, clipped * adv)
    per_token = pg
    if row_weight is not None:
        if row_weight.shape != (logp.shape[0],):
            raise ValueError(f"row_weight must be [B={logp.shape[0]}], got {tuple(row_weight.shape)}")
        per_token = pg * row_weight.to(device=logp.device, dtype=logp.dtype).unsqueeze(1)
    kl = None
    if ref_logp is not None:
        kl = kl_estimate(lp, torch.where(m, ref_logp.to(logp.dtype), zero), kl_kind)
        if kl_importance_weight:
            kl = kl * ratio
        if use_kl:
            row_coef = coef.unsqueeze(1) if coef.dim() == 1 else coef
            per_token = per_token + row_coef * kl

    loss = aggregate(per_token, m, loss_type, max_len, rows=rows)

    with torch.no_grad():
        low = (ratio < 1.0 - clip_low) & (adv < 0) & m
        high = (ratio > 1.0 + clip_high) & (adv > 0) & m
        n_tok = m.sum().clamp(min=1).to(logp.dtype)
        metrics = {
            "clip_frac_low": low.sum() / n_tok, "clip_frac_high": high.sum() / n_tok,
            "clip_frac": (low | high).sum() / n_tok,
            "ratio_min": _masked_stat(ratio, m, "min"), "ratio_mean": _masked_stat(ratio, m, "mean"),
            "ratio_max": _masked_stat(ratio, m, "max"),
            "policy_loss": aggregate(pg.detach(), m, loss_type, max_len, rows=rows),
        }
        if kl is not None:
            metrics["kl_mean"] = _masked_stat(kl.detach(), m, "mean")
    return loss, metrics
