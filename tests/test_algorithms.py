"""Hand-computed cases and invariants for r3_rl.algorithms (advantages, KL, clipped loss, GAE, value loss)."""
from __future__ import annotations

import math
import random
import statistics

import pytest
import torch

from r3_rl.algorithms.advantages import group_advantages, group_stats
from r3_rl.algorithms.kl import kl_estimate
from r3_rl.algorithms.losses import aggregate, clipped_policy_loss
from r3_rl.algorithms.ppo import gae, value_clip_fraction, value_loss, whiten

NAN = math.nan
D = torch.float64


def close(a, b, tol=1e-12) -> bool:
    a, b = torch.as_tensor(a, dtype=D), torch.as_tensor(b, dtype=D)
    return a.shape == b.shape and bool(torch.allclose(a, b, atol=tol, rtol=0, equal_nan=True))


# ---------------------------------------------------------------- advantages
def test_group_advantages_hand_case_interleaved_groups_and_failures():
    # a: {1, 0, 0.5} mean 0.5; b: {2, 2} flat; c: {NaN, 3, 1} mean of valid = 2; groups interleaved.
    r = torch.tensor([1.0, 2.0, NAN, 0.0, 3.0, 2.0, 0.5, 1.0], dtype=D)
    g = ["a", "b", "c", "a", "c", "b", "a", "c"]
    assert close(group_advantages(r, g), [0.5, 0.0, NAN, -0.5, 1.0, 0.0, 0.0, -1.0])
    # unbiased std: a -> sqrt((.25+.25+0)/2) = 0.5; c -> sqrt((1+1)/1) = sqrt(2)
    s2 = math.sqrt(2)
    assert close(group_advantages(r, g, normalize_std=True, eps=0.0), [1.0, 0.0, NAN, -1.0, 1 / s2, 0.0, 0.0, -1 / s2])
    e = 1e-3
    assert close(group_advantages(r, g, normalize_std=True, eps=e)[0], 0.5 / (0.5 + e))


def test_group_advantages_degenerate_groups():
    r = torch.tensor([NAN, 0.7, NAN, NAN, 5.0], dtype=D)
    g = [1, 1, 2, 2, 3]  # one valid member; all failed; singleton
    for norm in (False, True):
        assert close(group_advantages(r, g, normalize_std=norm), [NAN, 0.0, NAN, NAN, 0.0])
    # all-equal rewards give exactly 0, not a rounding residue amplified by the std division
    r = torch.tensor([0.1 + 0.2, 0.1 + 0.2, 0.1 + 0.2], dtype=D)
    assert group_advantages(r, [0, 0, 0], normalize_std=True).eq(0).all()
    assert group_advantages(torch.zeros(0, dtype=D), []).numel() == 0


def test_group_advantages_random_vs_reference_and_zero_sum():
    """Against a plain-Python reference (statistics.mean/stdev, both the textbook definitions)."""
    rng = random.Random(0)
    for _ in range(200):
        n_groups = rng.randint(1, 5)
        groups = [rng.randrange(n_groups) for _ in range(rng.randint(1, 20))]
        rewards = [NAN if rng.random() < 0.2 else rng.choice([0.0, 1.0, rng.random()]) for _ in groups]
        norm, eps = rng.random() < 0.5, 1e-6
        adv = group_advantages(torch.tensor(rewards, dtype=D), groups, normalize_std=norm, eps=eps).tolist()
        for gid in set(groups):
            idx = [i for i, x in enumerate(groups) if x == gid]
            valid = [i for i in idx if not math.isnan(rewards[i])]
            vals = [rewards[i] for i in valid]
            assert all(math.isnan(adv[i]) for i in idx if i not in valid)
            if len(vals) < 2 or len(set(vals)) == 1:
                assert all(adv[i] == 0.0 for i in valid)
                continue
            mu, sd = statistics.mean(vals), statistics.stdev(vals)
            for i in valid:
                want = (rewards[i] - mu) / (sd + eps) if norm else rewards[i] - mu
                assert adv[i] == pytest.approx(want, abs=1e-12)
            assert abs(sum(adv[i] for i in valid)) < 1e-9  # advantages of a group sum to 0


def test_group_advantages_rejects_bad_input():
    with pytest.raises(ValueError, match="reward 1 is inf"):
        group_advantages(torch.tensor([0.0, math.inf]), [0, 0])
    with pytest.raises(ValueError, match="group_ids has 1"):
        group_advantages(torch.tensor([0.0, 1.0]), [0])
    with pytest.raises(ValueError, match="floating"):
        group_advantages(torch.tensor([0, 1]), [0, 0])


def test_group_stats_counts():
    r = torch.tensor([1.0, 0.0, 1.0, 1.0, NAN, NAN, NAN, 0.3, NAN, 0.2], dtype=D)
    g = ["ok", "ok", "flat", "flat", "dead", "dead", "single", "single", "x", "x"]
    assert group_stats(r, g) == {"samples": 10.0, "groups": 5.0, "failed_samples": 4.0, "all_failed_groups": 1.0,
                                 "single_valid_groups": 2.0, "zero_signal_groups": 1.0}
    adv = group_advantages(r, g)
    assert adv[:4].tolist() == [0.5, -0.5, 0.0, 0.0]


# ---------------------------------------------------------------- KL
def test_kl_hand_values():
    logp, ref = torch.tensor([math.log(0.5)], dtype=D), torch.tensor([math.log(0.25)], dtype=D)
    ln2 = math.log(2)
    assert close(kl_estimate(logp, ref, "k1"), [ln2])
    assert close(kl_estimate(logp, ref, "k2"), [0.5 * ln2 ** 2])
    assert close(kl_estimate(logp, ref, "k3"), [0.5 + ln2 - 1])  # r = ref/pi = 0.5: r - log r - 1
    for kind in ("k1", "k2", "k3"):
        assert kl_estimate(ref, ref, kind).eq(0).all()
    with pytest.raises(ValueError, match="unknown kind"):
        kl_estimate(logp, ref, "k4")  # type: ignore[arg-type]


def test_kl_k1_k3_unbiased_exact_expectation():
    """E_{y~pi}[k1] = E_{y~pi}[k3] = KL(pi||ref), computed exactly by enumerating a 7-token vocabulary."""
    g = torch.Generator().manual_seed(1)
    logpi = torch.log_softmax(torch.randn(7, generator=g, dtype=D), 0)
    logref = torch.log_softmax(torch.randn(7, generator=g, dtype=D), 0)
    pi = logpi.exp()
    kl = (pi * (logpi - logref)).sum()
    for kind in ("k1", "k3"):
        assert close((pi * kl_estimate(logpi, logref, kind)).sum(), kl)
    assert (kl_estimate(logpi, logref, "k3") >= 0).all() and (kl_estimate(logpi, logref, "k2") >= 0).all()


# ---------------------------------------------------------------- clipped policy loss
def hand_batch():
    """Ratios [[1.5, 0.5, 1.0], [1.1, 0.7, pad]], advantages [+1, -1], old_logp = 0."""
    ratios = torch.tensor([[1.5, 0.5, 1.0], [1.1, 0.7, 1.0]], dtype=D)
    logp = ratios.log().requires_grad_(True)
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]], dtype=D)
    return logp, torch.zeros_like(logp), torch.tensor([1.0, -1.0], dtype=D), mask


def test_clipped_loss_hand_case_all_aggregations():
    # per-token: row0 (A=+1): -min(1.5,1.2)=-1.2, -min(.5,.8)=-.5, -1
    #            row1 (A=-1): -min(-1.1,-1.1)=1.1, -min(-.7,-.8)=.8
    want = {"token_mean": -0.8 / 5, "seq_mean": (-2.7 / 3 + 1.9 / 2) / 2, "dr_grpo": -0.8 / (2 * 4)}
    for loss_type, value in want.items():
        logp, old, adv, mask = hand_batch()
        loss, m = clipped_policy_loss(logp, old, adv, mask, loss_type=loss_type, max_len=4)
        assert loss.item() == pytest.approx(value, abs=1e-12)
        assert m["policy_loss"].item() == pytest.approx(value, abs=1e-12)
    logp, old, adv, mask = hand_batch()
    loss, m = clipped_policy_loss(logp, old, adv, mask)
    assert m["clip_frac_high"].item() == pytest.approx(1 / 5)  # r=1.5 with A>0
    assert m["clip_frac_low"].item() == pytest.approx(1 / 5)  # r=0.7 with A<0 (r=0.5 with A>0 is NOT clipped)
    assert m["clip_frac"].item() == pytest.approx(2 / 5)
    assert (m["ratio_min"].item(), m["ratio_max"].item()) == pytest.approx((0.5, 1.5))
    assert m["ratio_mean"].item() == pytest.approx((1.5 + 0.5 + 1.0 + 1.1 + 0.7) / 5)
    assert "kl_mean" not in m
    loss.backward()
    # d(-r A)/dlogp = -r A on unclipped tokens, 0 on clipped ones and padding; token_mean divides by 5
    assert close(logp.grad, torch.tensor([[0.0, -0.5, -1.0], [1.1, 0.0, 0.0]], dtype=D) / 5)


def test_asymmetric_clip_range():
    logp, old, adv, mask = hand_batch()
    _, m = clipped_policy_loss(logp, old, adv, mask, clip_low=0.2, clip_high=0.6)
    assert m["clip_frac_high"].item() == 0.0 and m["clip_frac_low"].item() == pytest.approx(1 / 5)
    loss, m = clipped_policy_loss(logp, old, adv, mask, clip_low=0.35, clip_high=0.2)
    assert m["clip_frac_low"].item() == 0.0  # 0.7 > 1 - 0.35
    assert loss.item() == pytest.approx((-1.2 - 0.5 - 1.0 + 1.1 + 0.7) / 5, abs=1e-12)


def random_batch(seed: int, b: int = 5, t: int = 6, spread: float = 0.4):
    g = torch.Generator().manual_seed(seed)
    old = -torch.rand(b, t, generator=g, dtype=D) * 3
    logp = (old + spread * torch.randn(b, t, generator=g, dtype=D)).requires_grad_(True)
    lengths = torch.randint(1, t + 1, (b,), generator=g)
    mask = (torch.arange(t)[None, :] < lengths[:, None]).to(D)
    adv = torch.randn(b, generator=g, dtype=D)
    ref = old + 0.3 * torch.randn(b, t, generator=g, dtype=D)
    return logp, old, adv, mask, ref


def test_ratio_is_one_before_the_first_update():
    for seed in range(5):
        _, old, adv, mask, _ = random_batch(seed)
        logp = old.clone().requires_grad_(True)
        loss, m = clipped_policy_loss(logp, old, adv, mask, loss_type="token_mean")
        assert m["ratio_min"].item() == m["ratio_max"].item() == m["ratio_mean"].item() == 1.0
        assert m["clip_frac"].item() == 0.0
        assert loss.item() == pytest.approx(-(adv[:, None] * mask).sum().item() / mask.sum().item(), abs=1e-12)
        loss.backward()  # on-policy gradient: -A / N on every valid token
        assert close(logp.grad, -(adv[:, None] * mask) / mask.sum())


def test_gradient_is_zero_exactly_on_clipped_tokens():
    for seed in range(10):
        logp, old, adv, mask, _ = random_batch(seed, spread=0.6)
        loss, _ = clipped_policy_loss(logp, old, adv, mask, clip_low=0.2, clip_high=0.28)
        loss.backward()
        r = (logp - old).exp().detach()
        a = adv[:, None].expand_as(r)
        clipped = ((r < 0.8) & (a < 0)) | ((r > 1.28) & (a > 0))
        valid = mask.bool()
        assert (logp.grad[clipped & valid] == 0).all()
        assert (logp.grad[~valid] == 0).all()
        assert (logp.grad[~clipped & valid] != 0).all()
        assert (clipped & valid).any() and (~clipped & valid).any()  # the case is not vacuous


def test_nan_advantage_rows_are_dropped_exactly():
    for loss_type in ("token_mean", "seq_mean", "dr_grpo"):
        logp, old, adv, mask, ref = random_batch(3)
        keep = torch.tensor([True, False, True, True, False])
        adv_nan = torch.where(keep, adv, torch.full_like(adv, NAN))
        garbage = logp.detach().clone()
        garbage[~keep] = NAN  # a failed row's log-probs may be anything
        garbage[0, -1] = math.inf if mask[0, -1] == 0 else garbage[0, -1]
        full = garbage.clone().requires_grad_(True)
        kw = dict(loss_type=loss_type, max_len=8, ref_logp=ref, kl_coef=0.05)
        loss, m = clipped_policy_loss(full, old, adv_nan, mask, **kw)
        sub = logp.detach()[keep].clone().requires_grad_(True)
        want, m_sub = clipped_policy_loss(sub, old[keep], adv[keep], mask[keep], ref_logp=ref[keep],
                                          **{k: v for k, v in kw.items() if k != "ref_logp"})
        assert loss.item() == pytest.approx(want.item(), abs=1e-12)
        loss.backward()
        want.backward()
        assert torch.isfinite(full.grad).all()
        assert (full.grad[~keep] == 0).all()
        assert close(full.grad[keep], sub.grad)
        assert m["kl_mean"].item() == pytest.approx(m_sub["kl_mean"].item(), abs=1e-12)


def test_all_rows_failed_gives_zero_loss_with_graph():
    logp, old, _, mask, _ = random_batch(4)
    loss, m = clipped_policy_loss(logp, old, torch.full((5,), NAN, dtype=D), mask, loss_type="seq_mean")
    assert loss.item() == 0.0 and math.isnan(m["ratio_mean"].item())
    loss.backward()
    assert (logp.grad == 0).all()


def test_nan_in_a_counted_token_propagates():
    logp, old, adv, mask, ref = random_batch(5)
    bad = logp.detach().clone()
    bad[0, 0] = NAN  # row 0 is kept and token 0 is always valid
    loss, _ = clipped_policy_loss(bad, old, adv, mask)
    assert math.isnan(loss.item())
    bad_ref = ref.clone()
    bad_ref[1, 0] = NAN
    loss, _ = clipped_policy_loss(logp, old, adv, mask, ref_logp=bad_ref, kl_coef=0.1)
    assert math.isnan(loss.item())


def test_kl_penalty_scalar_and_per_row_weights():
    logp, old, adv, mask, ref = random_batch(6)
    base, _ = clipped_policy_loss(logp, old, adv, mask)
    kl = kl_estimate(logp, ref, "k3")
    n = mask.sum()
    loss, m = clipped_policy_loss(logp, old, adv, mask, ref_logp=ref, kl_coef=0.1)
    assert loss.item() == pytest.approx((base + 0.1 * (kl * mask).sum() / n).item(), abs=1e-12)
    assert m["kl_mean"].item() == pytest.approx(((kl * mask).sum() / n).item(), abs=1e-12)
    assert m["policy_loss"].item() == pytest.approx(base.item(), abs=1e-12)
    coef = torch.tensor([0.1, 0.0, 2.0, 0.5, 0.1], dtype=D)  # e.g. text vs image rows
    loss, _ = clipped_policy_loss(logp, old, adv, mask, ref_logp=ref, kl_coef=coef, kl_kind="k2")
    k2 = kl_estimate(logp, ref, "k2")
    assert loss.item() == pytest.approx((base + (coef[:, None] * k2 * mask).sum() / n).item(), abs=1e-12)
    # importance-weighted KL (TRL's use_bias_correction_kl): KL_t * r_t
    loss, _ = clipped_policy_loss(logp, old, adv, mask, ref_logp=ref, kl_coef=0.1, kl_importance_weight=True)
    r = (logp - old).exp()
    assert loss.item() == pytest.approx((base + 0.1 * (kl * r * mask).sum() / n).item(), abs=1e-12)
    # ref given, coefficient 0: the KL is reported but does not change the loss
    loss, m = clipped_policy_loss(logp, old, adv, mask, ref_logp=ref, kl_coef=torch.zeros(5, dtype=D))
    assert loss.item() == base.item() and m["kl_mean"].item() > 0


def test_clipped_loss_rejects_bad_arguments():
    logp, old, adv, mask, _ = random_batch(7)
    with pytest.raises(ValueError, match="ref_logp is None"):
        clipped_policy_loss(logp, old, adv, mask, kl_coef=0.1)
    clipped_policy_loss(logp, old, adv, mask, kl_coef=torch.zeros(5))  # zero weights need no reference
    with pytest.raises(ValueError, match="advantages must be"):
        clipped_policy_loss(logp, old, adv[:3], mask)
    with pytest.raises(ValueError, match="unknown loss_type"):
        clipped_policy_loss(logp, old, adv, mask, loss_type="sum")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="kl_coef must be"):
        clipped_policy_loss(logp, old, adv, mask, kl_coef=torch.ones(2), ref_logp=old)
    with pytest.raises(ValueError, match="0/1"):
        clipped_policy_loss(logp, old, adv, mask * 0.5)
    with pytest.raises(ValueError, match="max_len"):
        clipped_policy_loss(logp, old, adv, torch.ones_like(mask), loss_type="dr_grpo", max_len=3)


def test_aggregate_hand_cases():
    x = torch.tensor([[1.0, 3.0, 9.0], [4.0, NAN, NAN], [7.0, 7.0, 7.0]], dtype=D)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0], [0, 0, 0]], dtype=D)  # row 2 has no valid token but counts as a row
    assert aggregate(x, mask, "token_mean").item() == pytest.approx(8 / 3)
    assert aggregate(x, mask, "seq_mean").item() == pytest.approx((2 + 4 + 0) / 3)
    assert aggregate(x, mask, "dr_grpo", max_len=5).item() == pytest.approx(8 / 15)
    assert aggregate(x, mask, "dr_grpo").item() == pytest.approx(8 / 9)  # default max_len = T
    # one constant per row: each row's sum by its own, then the mean over rows
    lengths = torch.tensor([4.0, 8.0, 3.0])
    assert aggregate(x, mask, "dr_grpo", max_len=lengths).item() == pytest.approx((4 / 4 + 4 / 8 + 0 / 3) / 3)
    with pytest.raises(ValueError, match="max_len per row"):
        aggregate(x, mask, "dr_grpo", max_len=torch.tensor([1.0, 1.0, 1.0]))
    rows = torch.tensor([True, True, False])
    assert aggregate(x, mask, "seq_mean", rows=rows).item() == pytest.approx(3.0)
    assert aggregate(x, torch.zeros_like(mask), "token_mean").item() == 0.0


def test_micro_batch_weighting_reproduces_full_batch_loss():
    """What the learner relies on: a weighted sum of micro-batch losses equals the full-batch loss."""
    logp, old, adv, mask, ref = random_batch(8, b=7, t=5)
    for loss_type in ("token_mean", "seq_mean", "dr_grpo"):
        kw = dict(loss_type=loss_type, max_len=5, kl_coef=0.02)
        full, _ = clipped_policy_loss(logp, old, adv, mask, ref_logp=ref, **kw)
        total = 0.0
        for sl in (slice(0, 3), slice(3, 5), slice(5, 7)):
            part, _ = clipped_policy_loss(logp[sl], old[sl], adv[sl], mask[sl], ref_logp=ref[sl], **kw)
            w = mask[sl].sum() / mask.sum() if loss_type == "token_mean" else (sl.stop - sl.start) / 7
            total = total + part * w
        assert total.item() == pytest.approx(full.item(), abs=1e-12)


# ---------------------------------------------------------------- PPO
def test_gae_hand_cases():
    r, v = torch.tensor([0.0, 0.0, 1.0], dtype=D), torch.tensor([0.5, 0.5, 0.5], dtype=D)
    adv, ret = gae(r, v, gamma=1.0, lam=1.0)  # lam=1: Monte-Carlo return minus value
    assert close(adv, [0.5, 0.5, 0.5]) and close(ret, [1.0, 1.0, 1.0])
    adv, ret = gae(r, v, gamma=0.9, lam=0.0, last_value=2.0)  # lam=0: one-step TD error
    assert close(adv, [0.9 * 0.5 - 0.5, 0.9 * 0.5 - 0.5, 1.0 + 0.9 * 2.0 - 0.5])
    assert close(ret, adv + v)


def test_gae_matches_naive_sum_of_discounted_deltas():
    rng = random.Random(1)
    for _ in range(50):
        t = rng.randint(1, 8)
        r = [rng.uniform(-1, 1) for _ in range(t)]
        v = [rng.uniform(-1, 1) for _ in range(t)]
        gamma, lam, last = rng.random(), rng.random(), rng.uniform(-1, 1)
        vv = v + [last]
        delta = [r[i] + gamma * vv[i + 1] - vv[i] for i in range(t)]
        want = [sum((gamma * lam) ** (k - i) * delta[k] for k in range(i, t)) for i in range(t)]
        values = torch.tensor(v, dtype=D, requires_grad=True)
        adv, ret = gae(torch.tensor(r, dtype=D), values, gamma=gamma, lam=lam, last_value=last)
        assert close(adv, want, 1e-12) and close(ret, [a + b for a, b in zip(want, v)], 1e-12)
        assert not adv.requires_grad and not ret.requires_grad


def test_value_loss_clipping():
    old, ret = torch.tensor([0.5, 0.5], dtype=D), torch.tensor([2.0, 0.0], dtype=D)
    v = torch.tensor([1.0, 1.0], dtype=D, requires_grad=True)
    loss = value_loss(v, old, ret, clip=0.2)
    # row 0: max((1-2)^2, (0.7-2)^2) = 1.69 (clipped branch); row 1: max(1, 0.49) = 1
    assert loss.item() == pytest.approx(0.5 * (1.69 + 1.0) / 2)
    loss.backward()
    assert close(v.grad, [0.0, 0.5 * 2 * 1.0 / 2])  # no gradient through the saturated clip
    assert value_loss(v, old, ret, clip=None).item() == pytest.approx(0.5 * (1 + 1) / 2)
    mask = torch.tensor([1.0, 0.0], dtype=D)
    assert value_loss(v, old, ret, mask, clip=0.2).item() == pytest.approx(0.5 * 1.69)
    with pytest.raises(ValueError, match="same shape"):
        value_loss(v, old[:1], ret)
    assert value_clip_fraction(v.detach(), old, ret, 0.2) == 0.5  # row 0 took the clipped branch, row 1 did not
    assert value_clip_fraction(old, old, ret, 0.2) == 0.0  # values that have not moved are never clipped


def test_whiten_matches_verl_masked_whiten_and_leaves_rounding_noise_small():
    """Peer: verl's ``masked_whiten`` (``verl/utils/torch_functional.py``) with an all-ones mask, written out:
    mean, unbiased variance, ``(x - mean) * rsqrt(var + 1e-8)``."""
    def verl(x: torch.Tensor) -> torch.Tensor:
        mean = x.mean()
        var = ((x - mean) ** 2).sum() * (x.numel() / (x.numel() - 1)) / x.numel()
        return (x - mean) * torch.rsqrt(var + 1e-8)

    g = torch.Generator().manual_seed(0)
    for n in (2, 3, 17, 64):
        x = torch.randn(n, generator=g) * 3 + 1
        assert torch.allclose(whiten(x), verl(x), atol=1e-6, rtol=0)
        assert abs(float(whiten(x).mean())) < 1e-6 and float(whiten(x).std()) == pytest.approx(1.0, abs=1e-6)
    # equal advantages up to float32 rounding (a batch whose chains all scored alike): they stay about 0
    # (eps added to the std instead turned ~1e-8 differences into values of order 1, all of one sign)
    for x in (torch.full((64,), 1 / 3) + torch.tensor([0.0, 3e-8] * 32), torch.full((37,), 0.1)):
        assert float(whiten(x).abs().max()) < 1e-3
    with pytest.raises(ValueError, match="at least two"):
        whiten(torch.tensor([1.0]))


def test_one_definition_of_a_group_with_no_signal_everywhere() -> None:
    """Advantages, the learner batch and the logs agree on which groups carry no signal, rounding included:
    0.1 + 0.2 and 0.3 are the same reward (the batch used exact equality, the logs a tolerance)."""
    from r3_rl.algorithms.signal import has_signal
    from r3_rl.learner.batch import collect_items, no_signal_groups
    from r3_rl.tracking.metrics import group_metrics
    from r3_rl.trajectory import Node, PromptItem, Segment, Tree

    near, real = [0.1 + 0.2, 0.3], [0.3, 0.4]
    assert near[0] != near[1] and not has_signal(near) and has_signal(real)
    tree = Tree(id="t", prompt=PromptItem("p", "p"))
    for gid, rewards in (("near", near), ("real", real)):
        for j, r in enumerate(rewards):
            seg = Segment("text", {"input_ids": [1]}, [3], [-1.0])
            tree.add(Node(id=f"{gid}{j}", parent=None, stage="reason", round=0, group_id=gid, policy_version=0,
                          segment=seg, reward=r))
    nodes = list(tree.nodes.values())
    rewards = torch.tensor([n.reward for n in nodes], dtype=torch.float64)
    groups = [n.group_id for n in nodes]
    assert group_advantages(rewards, groups)[:2].tolist() == [0.0, 0.0]  # exactly 0, no rounding residue
    assert group_stats(rewards, groups)["zero_signal_groups"] == 1.0
    assert no_signal_groups(nodes) == {"near"}
    assert group_metrics([tree])["groups/reason/zero_signal"] == 1.0
    for n, a in zip(nodes, group_advantages(rewards, groups).tolist()):
        n.advantage = a
    items, stats = collect_items([tree], 0, 0)
    assert [it.segment for it in items] == [tree.nodes["real0"].segment, tree.nodes["real1"].segment]
    assert stats.zero_signal_groups == 1 and stats.zero_signal_items == 2


def test_leave_one_out_advantages_hand_case_and_naive_peer():
    """Each reward against the mean of the other valid rewards of its pool; failures NaN and left out of every
    baseline; a pool with one valid reward gives it 0.  Checked against a plain Python loop on random pools."""
    from r3_rl.algorithms.advantages import leave_one_out_advantages

    r = torch.tensor([1.0, 2.0, 3.0, math.nan, 5.0], dtype=torch.float64)
    out = leave_one_out_advantages(r, ["a", "a", "a", "a", "b"])
    assert out[:3].tolist() == [1.0 - 2.5, 2.0 - 2.0, 3.0 - 1.5] and math.isnan(out[3]) and out[4] == 0.0
    rng = random.Random(3)
    vals = [rng.choice([math.nan, rng.uniform(-2, 2)]) if rng.random() < 0.2 else rng.uniform(-2, 2) for _ in range(60)]
    pools = [rng.choice("xyz") for _ in vals]
    got = leave_one_out_advantages(torch.tensor(vals, dtype=torch.float64), pools).tolist()
    for i, (v, p) in enumerate(zip(vals, pools)):
        others = [w for j, (w, q) in enumerate(zip(vals, pools)) if j != i and q == p and not math.isnan(w)]
        want = math.nan if math.isnan(v) else (v - sum(others) / len(others) if others else 0.0)
        assert (math.isnan(got[i]) and math.isnan(want)) or abs(got[i] - want) < 1e-12


def test_batch_std_divides_by_the_pools_std_not_the_groups():
    """TRL's scale_rewards="batch" / Flow-GRPO's global_std: group means, one std per pool (a stage), by hand."""
    r = torch.tensor([1.0, 0.0, 0.5, 0.3, 2.0, 4.0], dtype=D)
    groups = ["a", "a", "b", "b", "c", "c"]
    pools = ["img", "img", "img", "img", "txt", "txt"]
    adv = group_advantages(r, groups, normalize_std=True, std_pools=pools)
    img_std = math.sqrt((0.55 ** 2 + 0.45 ** 2 + 0.05 ** 2 + 0.15 ** 2) / 3)  # [1, 0, .5, .3], unbiased
    txt_std = math.sqrt(2.0)  # [2, 4]
    expected = [0.5 / img_std, -0.5 / img_std, 0.1 / img_std, -0.1 / img_std, -1 / txt_std, 1 / txt_std]
    torch.testing.assert_close(adv, torch.tensor(expected, dtype=D), rtol=1e-5, atol=1e-6)
    by_group = group_advantages(r, groups, normalize_std=True)  # the group's own std blows group b up to +-0.71
    assert float(by_group[2]) == pytest.approx(0.1 / math.sqrt(0.02), rel=1e-4)
