"""Exact small cases for the GRPO/PPO maths in ``r3_rl.algorithms`` (advantages, signal, KL estimators, clipped
policy loss and its aggregation, GAE / value loss / whitening, flow-step losses) (round 18 audit).

Each test pins a behaviour that a one-point mutation of the code left untested: expectations are worked out by
hand from the formula the module docstring names (TRL's GRPO loss, Schulman's KL estimators, PPO2's value
clip, verl's whitening), or compared with an independent peer, never with the function under test itself.
The docstring of each test names the bug it catches.
"""
from __future__ import annotations

import math

import pytest
import torch

from r3_rl.algorithms.advantages import group_advantages, group_stats
from r3_rl.algorithms.flow_losses import flow_gaussian_kl, flow_policy_loss
from r3_rl.algorithms.kl import kl_by_modality, kl_estimate
from r3_rl.algorithms.losses import aggregate, clipped_policy_loss
from r3_rl.algorithms.ppo import gae, value_clip_fraction, value_loss

D = torch.float64
NAN = math.nan


# ------------------------------------------------------------------------------------------------ advantages
def test_infinite_reward_error_names_the_first_infinite_index() -> None:
    """With rewards [0, -inf, 1, inf] the error names reward 1 (the first bad one) and its value, not reward 3."""
    with pytest.raises(ValueError, match=r"^reward 1 is -inf: a reward must be finite"):
        group_advantages(torch.tensor([0.0, -math.inf, 1.0, math.inf], dtype=D), ["g"] * 4)


def test_group_stats_refuses_an_infinite_reward() -> None:
    """group_stats checks its rewards like group_advantages: +inf is a broken reward, not a valid member."""
    with pytest.raises(ValueError, match="finite"):
        group_stats(torch.tensor([1.0, math.inf], dtype=D), ["g", "g"])
    with pytest.raises(ValueError, match="1-D"):
        group_stats(torch.zeros(2, 2, dtype=D), ["g", "g"])


# ------------------------------------------------------------------------------------------------ KL
def test_kl_estimate_refuses_shapes_that_would_broadcast() -> None:
    """logp [2, 3] and ref_logp [2, 1] differ: refused, not broadcast into a [2, 3] KL against a wrong reference."""
    with pytest.raises(ValueError, match="differ"):
        kl_estimate(torch.zeros(2, 3, dtype=D), torch.zeros(2, 1, dtype=D))


def test_kl_by_modality_defaults_to_k3_and_means_over_valid_tokens() -> None:
    """x = logp - ref = 1 and -1 on the text row (third token masked): the default k3 = exp(-x) + x - 1 gives
    mean(1/e, e - 2); the image row's one valid token x = 0.5 gives exp(-0.5) - 0.5 (k1 would give 0 and 0.5)."""
    logp = torch.tensor([[0.0, -1.0, 7.0], [0.5, 0.0, 0.0]], dtype=D)
    ref = torch.tensor([[-1.0, 0.0, 0.0], [0.0, 0.0, 0.0]], dtype=D)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    out = kl_by_modality(logp, ref, mask, ["text", "image"])
    assert out["kl_text"] == pytest.approx((math.exp(-1) + math.e - 2) / 2, rel=1e-12)
    assert out["kl_image"] == pytest.approx(math.exp(-0.5) + 0.5 - 1, rel=1e-12)
    assert set(out) == {"kl_text", "kl_image"}


def test_kl_by_modality_leaves_out_a_modality_with_no_valid_token() -> None:
    """The image row is fully masked (e.g. its advantage was NaN): no 'kl_image' key at all, not a NaN (0/0)."""
    logp = torch.tensor([[0.5, 0.0], [3.0, 3.0]], dtype=D)
    out = kl_by_modality(logp, torch.zeros(2, 2, dtype=D), torch.tensor([[1, 1], [0, 0]]), ["text", "image"])
    assert set(out) == {"kl_text"}
    assert out["kl_text"] == pytest.approx((math.exp(-0.5) + 0.5 - 1) / 2, rel=1e-12)


# ------------------------------------------------------------------------------------------------ aggregate / loss
def test_aggregate_refuses_a_1d_per_token_tensor() -> None:
    """aggregate needs [B, T]: a 1-D per-token vector with a matching 1-D mask is refused, not silently reduced."""
    with pytest.raises(ValueError, match=r"\[B, T\]"):
        aggregate(torch.ones(3, dtype=D), torch.ones(3), "token_mean")


def test_dr_grpo_refuses_a_zero_per_row_length() -> None:
    """A per-row max_len of 0 (on a row without valid tokens) is refused: 0 / 0 would make the loss NaN."""
    per_token = torch.tensor([[1.0, 2.0], [3.0, 4.0]], dtype=D)
    mask = torch.tensor([[1, 1], [0, 0]])
    with pytest.raises(ValueError, match=">= 1"):
        aggregate(per_token, mask, "dr_grpo", torch.tensor([2, 0]))
    # the accepted neighbour: length 1 on the empty row -> (3/2 + 0/1) / 2 rows
    assert aggregate(per_token, mask, "dr_grpo", torch.tensor([2, 1])).item() == 0.75


def test_dr_grpo_refuses_a_zero_scalar_max_len() -> None:
    """max_len=0 with an all-padding batch is refused (0 / (rows * 0) would be NaN), not accepted."""
    with pytest.raises(ValueError, match="max_len=0"):
        aggregate(torch.ones(2, 3, dtype=D), torch.zeros(2, 3), "dr_grpo", 0)


def test_clipped_loss_refuses_a_ref_logp_of_the_wrong_shape() -> None:
    """ref_logp [2, 1] against logp [2, 3] is refused by name, not broadcast into every token's KL."""
    z = torch.zeros(2, 3, dtype=D)
    with pytest.raises(ValueError, match="ref_logp"):
        clipped_policy_loss(z, z, torch.ones(2, dtype=D), torch.ones(2, 3), ref_logp=torch.zeros(2, 1, dtype=D),
                            kl_coef=0.1)


def test_clipped_loss_refuses_an_unknown_kl_kind_even_without_a_reference() -> None:
    """kl_kind='k4' is a typo: refused up front, not accepted silently because no ref_logp was passed."""
    z = torch.zeros(1, 2, dtype=D)
    with pytest.raises(ValueError, match="unknown kl_kind 'k4'"):
        clipped_policy_loss(z, z, torch.ones(1, dtype=D), torch.ones(1, 2), kl_kind="k4")



def test_clip_frac_low_ignores_rows_with_zero_advantage() -> None:
    """clip_frac_low counts ratio < 1 - clip_low only where A < 0: a zero-advantage row (a flat group) below the
    range has no gradient to clip, so with one such token among two the fraction is 0, not 1/2."""
    logp = torch.tensor([[math.log(0.5)], [0.0]], dtype=D)
    _, m = clipped_policy_loss(logp, torch.zeros(2, 1, dtype=D), torch.tensor([0.0, -1.0], dtype=D), torch.ones(2, 1))
    assert m["clip_frac_low"].item() == 0.0 and m["clip_frac"].item() == 0.0 and m["ratio_min"].item() == 0.5


# ------------------------------------------------------------------------------------------------ PPO
def test_gae_refuses_a_batch_of_episodes() -> None:
    """gae runs over one episode [T]: a [2, T] batch is refused (its time loop would run over the batch axis)."""
    with pytest.raises(ValueError, match="1-D"):
        gae(torch.zeros(2, 3, dtype=D), torch.zeros(2, 3, dtype=D))


def test_value_loss_refuses_a_mask_of_another_shape() -> None:
    """A [1] mask against [2] values is refused, not broadcast over both entries."""
    v = torch.zeros(2, dtype=D)
    with pytest.raises(ValueError, match="mask"):
        value_loss(v, v, v, torch.ones(1))


def test_value_clip_fraction_of_nothing_is_zero() -> None:
    """An empty batch has clip fraction 0.0, not the NaN mean of an empty tensor."""
    e = torch.zeros(0, dtype=D)
    assert value_clip_fraction(e, e, e, 0.2) == 0.0


# ------------------------------------------------------------------------------------------------ flow losses
def test_flow_gaussian_kl_of_float16_means_computes_in_float32() -> None:
    """float16 means 1e-4 apart: (1e-4)^2 = 1e-8 underflows to 0 in float16; computed in float32 the KL is
    d^2 / (2 s^2) with d the float16 value of 1e-4 (peer: the same formula in float64), in a float32 result."""
    mean = torch.tensor([[1e-4, 0.0]], dtype=torch.float16)
    ref = torch.zeros(1, 2, dtype=torch.float16)
    kl = flow_gaussian_kl(mean, ref, 0.01)
    d = float(mean[0, 0])
    assert kl.dtype == torch.float32
    assert kl.item() == pytest.approx((d * d / (2 * 0.01 ** 2) + 0.0) / 2, rel=1e-5) and kl.item() > 0


def test_image_ratio_unit_accepts_an_image_whose_advantage_is_nan_on_every_step() -> None:
    """A failed image (NaN on all its SDE steps) is one advantage per image (NaN), dropped like any NaN unit:
    the loss is the other image's alone.  Image 1: ratio exp(mean(1e-5, 3e-5)) = exp(2e-5) inside the 1e-4 clip,
    A = 2, so loss = -2 exp(2e-5)."""
    old = torch.zeros(4, dtype=D)
    logp = torch.tensor([0.5, -0.5, 1e-5, 3e-5], dtype=D)
    adv = torch.tensor([NAN, NAN, 2.0, 2.0], dtype=D)
    loss, m = flow_policy_loss(logp, old, adv, ratio_unit="image", image=torch.tensor([0, 0, 1, 1]))
    assert loss.item() == pytest.approx(-2 * math.exp(2e-5), rel=1e-12)
    assert m["ratio_max"].item() == pytest.approx(math.exp(2e-5), rel=1e-12)


def test_flow_policy_loss_refuses_a_negative_float_policy_weight() -> None:
    """A negative scalar policy_weight (it would flip every image update) is refused like a negative per-row one."""
    z = torch.zeros(2, dtype=D)
    with pytest.raises(ValueError, match="policy_weight must be >= 0, got -1.0"):
        flow_policy_loss(z, z, torch.ones(2, dtype=D), policy_weight=-1.0)


def test_flow_policy_loss_refuses_an_unknown_ratio_unit() -> None:
    """ratio_unit='images' (a typo) is refused, not silently trained per step."""
    z = torch.zeros(2, dtype=D)
    with pytest.raises(ValueError, match="unknown ratio_unit 'images'"):
        flow_policy_loss(z, z, torch.ones(2, dtype=D), ratio_unit="images", image=torch.tensor([0, 1]))
