"""Exact small cases for the flow library, the flow losses and the tiny flow policy (round 15 audit).

Each test pins one behaviour a one-point bug would change: validation of schedules and step choices, the edges
of the step selection, and hand-computed values of the Gaussian step and the losses.  Expected values are worked
out by hand or by an independent formula, never by calling the code under test a second time."""
from __future__ import annotations

import math

import pytest
import torch

from r3_rl.flow import EtaSchedule, StochasticSteps, timestep_grid
from r3_rl.flow.schedule import train_subset

D = torch.float64


# ----------------------------------------------------------------------------------------------- schedule
def test_one_point_grid_is_a_value_error_naming_num_points() -> None:
    """A one-point grid has no step: catches `< 2` loosened to `< 1` (then a ZeroDivisionError)."""
    with pytest.raises(ValueError, match="num_points must be >= 2"):
        timestep_grid(1)


@pytest.mark.parametrize("shift", [0.1, 0.2, 0.3])
def test_grid_ends_are_exactly_one_and_zero_for_any_shift(shift: float) -> None:
    """shift / (1 + (shift - 1)) rounds to 1 +- 2e-16 for these shifts; the ends are pinned to 1.0 and 0.0 (a
    t_0 above 1 fails check_grid): catches the end pinning dropped."""
    grid = timestep_grid(5, shift)
    assert grid[0] == 1.0 and grid[-1] == 0.0
    assert grid[1] == pytest.approx(shift * 0.75 / (1.0 + (shift - 1.0) * 0.75), abs=1e-15)


@pytest.mark.parametrize("field", ["count", "window", "stride", "shift_every"])
def test_stochastic_step_counts_of_zero_are_refused(field: str) -> None:
    """count/window/stride/shift_every of 0 are refused: catches `< 1` loosened to `< 0`."""
    with pytest.raises(ValueError, match=f"{field} must be >= 1"):
        StochasticSteps(**{field: 0})


def test_max_index_zero_and_negative_start_are_refused() -> None:
    """max_index is an exclusive bound >= 1, start >= 0: catches both checks loosened by one."""
    with pytest.raises(ValueError, match="max_index must be >= 1"):
        StochasticSteps(max_index=0)
    with pytest.raises(ValueError, match="start must be >= 0"):
        StochasticSteps(mode="sliding_window", start=-1)


def test_fixed_indices_must_be_distinct_and_non_negative() -> None:
    """Catches the negative-index and the duplicate checks of mode 'fixed' dropped."""
    with pytest.raises(ValueError, match="distinct indices >= 0"):
        StochasticSteps(mode="fixed", indices=(-1, 2))
    with pytest.raises(ValueError, match="distinct indices >= 0"):
        StochasticSteps(mode="fixed", indices=(1, 1))


def test_max_index_above_the_number_of_steps_is_capped() -> None:
    """limit = min(max_index, steps): catches the cap dropped ('all' would name steps the grid does not have)."""
    s = StochasticSteps(mode="all", max_index=20)
    assert s.limit(9) == 9
    assert s.choose(9) == tuple(range(9))
    assert s.possible(9) == tuple(range(9))


def test_possible_fixed_indices_exclude_the_limit_itself() -> None:
    """possible() of 'fixed' keeps indices < limit: catches `<` turned into `<=`."""
    assert StochasticSteps(mode="fixed", indices=(3, 0), max_index=3).possible(9) == (0,)
    assert StochasticSteps(mode="fixed", indices=(8, 2)).possible(9) == (2, 8)


def test_random_window_wider_than_the_limit_is_every_allowed_step() -> None:
    """A window wider than the allowed steps is truncated to them: catches `min(window, limit)` dropped."""
    for seed in range(3):
        assert StochasticSteps(mode="random_window", window=5, max_index=3).choose(9, seed=seed) == (0, 1, 2)


def test_random_train_subset_is_sorted_distinct_and_in_range() -> None:
    """Positions come back sorted: catches the `sorted` dropped from the random order."""
    seen = set()
    for seed in range(8):
        sub = train_subset(10, 0.5, order="random", seed=seed)
        assert len(sub) == 5 and len(set(sub)) == 5 and all(0 <= i < 10 for i in sub)
        assert list(sub) == sorted(sub)
        seen.add(sub)
    assert len(seen) > 1  # seeded, not constant


# ----------------------------------------------------------------------------------------------- transition
def test_sde_gaussian_refuses_a_per_row_time_of_the_wrong_length() -> None:
    """A [1] tensor for a batch of 2 is refused, not broadcast: catches the shape check of `_rows` dropped."""
    from r3_rl.flow.transition import sde_gaussian

    x = torch.zeros(2, 3, dtype=D)
    with pytest.raises(ValueError, match=r"t must be a float or a \[2\] tensor"):
        sde_gaussian(x, x, torch.tensor([0.5], dtype=D), 0.1, 0.5)


HALF_LOG_2PI = 0.5 * math.log(2.0 * math.pi)


def test_gaussian_logprob_of_one_element_rows_keeps_the_half() -> None:
    """[B] samples (one element per row): -z^2/2 - log s - log(2 pi)/2; catches the 1-D branch losing the 1/2."""
    from r3_rl.flow.transition import gaussian_logprob

    lp = gaussian_logprob(torch.tensor([1.0, 0.0], dtype=D), torch.zeros(2, dtype=D), torch.tensor([1.0, 2.0], dtype=D))
    assert lp.tolist() == pytest.approx([-0.5 - HALF_LOG_2PI, -math.log(2.0) - HALF_LOG_2PI], abs=1e-12)


def test_gaussian_logprob_refuses_a_sample_shaped_unlike_the_mean() -> None:
    """A [2, 3] sample against a [2, 1] mean is refused, not broadcast: catches the shape check dropped."""
    from r3_rl.flow.transition import gaussian_logprob

    with pytest.raises(ValueError, match="differ"):
        gaussian_logprob(torch.zeros(2, 3, dtype=D), torch.zeros(2, 1, dtype=D), torch.ones(2, 1, dtype=D))


def test_step_logprobs_passes_constants_through() -> None:
    """t = delta = 0.5, eta = 0.5, v = 0: mean = 0.875 x, std = 0.5 sqrt(0.5); a sample one std off on each
    element has log-prob -1/2 without constants: catches `constants` not passed on by step_logprobs."""
    from r3_rl.flow import FlowVelocity, Guidance
    from r3_rl.flow.transition import step_logprobs

    s = 0.5 * math.sqrt(0.5)
    x = torch.tensor([[1.0, 2.0]], dtype=D)
    x_next = torch.tensor([[0.875 + s, 1.75 - s]], dtype=D)
    vel = FlowVelocity(cond=lambda xx, tt: torch.zeros_like(xx))
    lp, mean, std = step_logprobs(vel, Guidance(), x, x_next, 0.5, 0.5, 0.5, constants=False)
    assert mean.reshape(-1).tolist() == pytest.approx([0.875, 1.75], abs=1e-12)
    assert float(std.reshape(-1)[0]) == pytest.approx(s, abs=1e-12)
    assert lp.tolist() == pytest.approx([-0.5], abs=1e-12)
    lp_c, _, _ = step_logprobs(vel, Guidance(), x, x_next, 0.5, 0.5, 0.5)
    assert lp_c.tolist() == pytest.approx([-0.5 - math.log(s) - HALF_LOG_2PI], abs=1e-12)


# ----------------------------------------------------------------------------------------------- guidance
def test_global_renorm_factor_is_floored_at_renorm_min() -> None:
    """v_c = (1, 0), v_tu = 0, scale 3: v = (3, 0), |v_c| / |v| = 1/3 is floored at renorm_min 0.5 -> (1.5, 0);
    catches the clamp's lower bound dropped."""
    from r3_rl.flow import Guidance
    from r3_rl.flow.guidance import guided_velocity

    g = Guidance(3.0, 1.0, renorm="global", renorm_min=0.5)
    v = guided_velocity(g, torch.tensor([0.5], dtype=D), torch.tensor([[1.0, 0.0]], dtype=D),
                        torch.zeros(1, 2, dtype=D))
    assert v.reshape(-1).tolist() == pytest.approx([1.5, 0.0], abs=1e-12)


# ----------------------------------------------------------------------------------------------- trace
def _step(index: int = 0, t: float = 0.5, delta: float = 0.25, lp: float = -1.0, value: float = 0.0,
          dtype: torch.dtype = torch.float32):
    from r3_rl.flow.trace import SdeStep

    return SdeStep(index=index, t=t, delta=delta, eta=0.5, std=0.5 * math.sqrt(delta), logprob=lp,
                   x_t=torch.full((2,), value, dtype=dtype), x_next=torch.full((2,), value + 1.0, dtype=dtype))


@pytest.mark.parametrize("key", ["logprob", "x_next", "index"])
def test_a_step_record_missing_a_key_is_a_value_error_naming_it(key: str) -> None:
    """Catches a key left out of the missing-key check (a bare KeyError instead of one line naming it)."""
    from r3_rl.flow.trace import SdeStep

    d = _step().to_dict()
    del d[key]
    with pytest.raises(ValueError, match=f"missing key\\(s\\) {key}"):
        SdeStep.from_dict(d)


def _trace(dtype: str = "float32", steps=None):
    from r3_rl.flow import Guidance
    from r3_rl.flow.trace import DenoisingTrace

    return DenoisingTrace(latent_shape=(2,), latent_dtype=dtype, grid=(1.0, 0.5, 0.25, 0.0), guidance=Guidance(),
                          eta=EtaSchedule("constant", 0.5), init_seed=None, noise_seed=0,
                          steps=[_step()] if steps is None else steps)


def test_stack_steps_refuses_traces_of_different_latent_dtypes() -> None:
    """Same guidance and shape, float32 vs bfloat16 latents: refused; catches the dtype left out of the check."""
    from r3_rl.flow.trace import stack_steps

    with pytest.raises(ValueError, match="differs from trace 0"):
        stack_steps([_trace("float32"), _trace("bfloat16")])


# ----------------------------------------------------------------------------------------------- sampler
def test_sample_flow_refuses_too_few_noise_seeds() -> None:
    """Two images and one SDE-noise seed: a ValueError naming the counts, not an IndexError half-way."""
    from r3_rl.flow import FlowVelocity, Guidance, sample_flow

    vel = FlowVelocity(cond=lambda x, t: torch.zeros_like(x))
    with pytest.raises(ValueError, match="noise_seeds"):
        sample_flow(vel, torch.zeros(2, 3), grid=(1.0, 0.5, 0.0), sde_steps=[(0,), (0,)],
                    eta=EtaSchedule("constant", 0.5), guidance=Guidance(), noise_seeds=[1])


# ----------------------------------------------------------------------------------------------- learner
def _one_step_case(ratio: float):
    """One image, one SDE step whose new log-prob is old + log(ratio), plus a counting reference."""
    from test_flow_learner import StubFlowPolicy, flow_item

    old = torch.tensor([[-1.0]], dtype=D)
    new = (old + math.log(ratio)).requires_grad_(True)
    mean, std, delta = torch.zeros(1, 1, 2, dtype=D), torch.ones(1, 1, dtype=D), torch.full((1, 1), 0.1, dtype=D)
    policy = StubFlowPolicy(new, mean, std, delta)
    reference = StubFlowPolicy(new.detach(), mean + 1.0, std, delta)
    calls = []
    ref_scores = reference.denoising_scores
    reference.denoising_scores = lambda segs: calls.append(len(segs)) or ref_scores(segs)
    return policy, reference, [flow_item(0, old[0], 1.0)], calls


def test_learner_flow_loss_uses_the_flow_clip_high() -> None:
    """Ratio 1.5, advantage 1, clip (0.1, 0.3): loss = -1.3; catches clip_high fed from clip_low (-1.1)."""
    from r3_rl.config import Learner
    from r3_rl.learner.flow_loss import flow_loss

    policy, _, items, _ = _one_step_case(1.5)
    cfg = Learner(kl_coef_image=0.0, loss_weight_image=1.0, flow={"clip_low": 0.1, "clip_high": 0.3})
    loss, metrics, _ = flow_loss(policy, None, items, [1.0], cfg)
    assert float(loss.detach()) == pytest.approx(-1.3, abs=1e-9)


def test_learner_flow_loss_skips_the_reference_when_the_image_kl_is_off() -> None:
    """kl_coef_image 0: the reference is not run and no KL metric is logged; 0.5: KL = |1|^2 / 2 = 0.5 per element
    (means differ by 1, std 1), loss = -1 + 0.5 * 0.5.  Catches `> 0` loosened to `>= 0`."""
    from r3_rl.config import Learner
    from r3_rl.learner.flow_loss import flow_loss

    policy, reference, items, calls = _one_step_case(1.0)
    loss, metrics, _ = flow_loss(policy, reference, items, [1.0], Learner(kl_coef_image=0.0, loss_weight_image=1.0))
    assert calls == [] and "flow_kl_mean" not in metrics
    assert float(loss.detach()) == pytest.approx(-1.0, abs=1e-9)
    loss, metrics, _ = flow_loss(policy, reference, items, [1.0], Learner(kl_coef_image=0.5, loss_weight_image=1.0))
    assert calls == [1] and metrics["flow_kl_mean"] == pytest.approx(0.5, abs=1e-9)
    assert float(loss.detach()) == pytest.approx(-1.0 + 0.25, abs=1e-9)


# ----------------------------------------------------------------------------------------------- action
def test_score_traces_gives_a_trace_without_steps_empty_scores() -> None:
    """An ODE-only trace (greedy) scores to empty tensors without calling the model; catches the `if tr.steps`
    filter dropped (stack_steps would refuse a kind with no step)."""
    from r3_rl.flow.action import score_traces

    def velocity_for(members, batch):
        raise AssertionError("no velocity is needed for a trace without steps")

    (sc,) = score_traces([_trace(steps=[])], velocity_for)
    assert sc.logp.shape == (0,) and sc.mean.shape == (0, 2) and sc.std.shape == (0,) and sc.delta.shape == (0,)
    assert sc.std.dtype == D and sc.delta.dtype == D


# ----------------------------------------------------------------------------------------------- flow losses
def test_adv_clip_frac_counts_only_kept_rows_clipped() -> None:
    """Advantages (NaN, 10, 1, -1), adv_clip 5: one row of four is clipped -> 0.25; catches NaN counted as
    clipped (NaN != NaN) -> 0.5."""
    from r3_rl.algorithms.flow_losses import flow_policy_loss

    z = torch.zeros(4, dtype=D)
    _, m = flow_policy_loss(z, z, torch.tensor([float("nan"), 10.0, 1.0, -1.0], dtype=D), adv_clip=5.0)
    assert float(m["adv_clip_frac"]) == pytest.approx(0.25, abs=1e-12)


def test_policy_weight_zero_keeps_only_the_kl_term() -> None:
    """policy_weight 0 is allowed (a stage weighted out): loss = kl_coef * mean KL = 0.1 * 2; catches `>= 0`
    tightened to `> 0`."""
    from r3_rl.algorithms.flow_losses import flow_policy_loss

    z = torch.zeros(2, dtype=D)
    loss, _ = flow_policy_loss(z, z, torch.ones(2, dtype=D), kl=torch.tensor([1.0, 3.0], dtype=D), kl_coef=0.1,
                               policy_weight=0.0)
    assert float(loss) == pytest.approx(0.2, abs=1e-12)


def test_flow_policy_loss_refuses_a_kl_coefficient_without_a_kl() -> None:
    """Catches the `kl_coef != 0 and kl is None` check dropped (the KL would silently vanish)."""
    from r3_rl.algorithms.flow_losses import flow_policy_loss

    z = torch.zeros(2, dtype=D)
    with pytest.raises(ValueError, match="kl_coef is non-zero but no kl"):
        flow_policy_loss(z, z, torch.ones(2, dtype=D), kl_coef=0.1)


def test_flow_policy_loss_refuses_a_negative_row_weight() -> None:
    """Catches the per-row `policy_weight >= 0` check dropped (a negative weight flips a row's update)."""
    from r3_rl.algorithms.flow_losses import flow_policy_loss

    z = torch.zeros(2, dtype=D)
    with pytest.raises(ValueError, match="policy_weight must be >= 0 on every row"):
        flow_policy_loss(z, z, torch.ones(2, dtype=D), policy_weight=torch.tensor([1.0, -1.0], dtype=D))


def test_score_traces_keeps_a_float64_std_unrounded() -> None:
    """float64 latents: the rescored std is eta sqrt(delta) in float64 (0.5 sqrt(0.1), not its float32 rounding,
    which is 2e-9 off); catches the std passed through float32 on its way to StepScores."""
    from r3_rl.flow import FlowVelocity
    from r3_rl.flow.action import score_traces

    tr = _trace("float64", steps=[_step(t=0.5, delta=0.1, dtype=D)])
    (sc,) = score_traces([tr], lambda members, batch: FlowVelocity(cond=lambda x, t: torch.zeros_like(x)))
    assert sc.std.dtype == D
    assert abs(float(sc.std[0]) - 0.5 * math.sqrt(0.1)) < 1e-15
    assert float(sc.delta[0]) == 0.1


# ----------------------------------------------------------------------------------------------- tiny flow
def test_tiny_flow_checks_the_edit_steps_against_the_grid_too() -> None:
    """grid_points 3, shift 1: t = (1, 0.5, 0); step 0 has eta 0.7 sqrt(1 / 0.05) and delta 0.5, so its mean
    keeps 1 - 9.8 * 0.5 / 2 < 0 times the latent; step 1 keeps 1 - 0.49 * 0.5 = 0.755.  Generation fixed at
    step 1 passes; the default edits (among steps 0 and 1) must be refused: catches sde_refine left unchecked."""
    from types import SimpleNamespace

    from r3_rl.errors import UserError
    from r3_rl.policy.tiny_flow import TinyFlowPolicy

    with pytest.raises(UserError, match=r"\(sde_refine\): SDE step 0"):
        TinyFlowPolicy.from_recipe(SimpleNamespace(seed=0), grid_points=3, shift=1.0,
                                   sde_generate={"mode": "fixed", "indices": [1]})


@pytest.fixture(scope="module")
def shift_one():
    """A tiny flow policy on a 10-point grid without shift (t = 1 - i / 9)."""
    from test_exact_policy_base_flow import _flow_recipe

    from r3_rl.policy.registry import build_policy

    return build_policy(_flow_recipe("policy.options.shift=1.0", "policy.options.grid_points=10"))


def test_tiny_flow_grid_uses_the_shift_option(shift_one) -> None:
    """shift 1 gives the plain linspace 1 - i / 9: catches the grid built with the default shift 3."""
    assert len(shift_one.grid) == 10
    assert list(shift_one.grid) == pytest.approx([1.0 - i / 9 for i in range(10)], abs=1e-12)


def test_conditions_do_not_count_the_first_word_after_the_image_tokens_as_a_cell(shift_one) -> None:
    """Token id image_offset + N is the first plain word, not a cell: a context of one image followed by it keeps
    the image's cell states (the Llama is causal, so they equal those of the context without the word); catches
    `<` turned into `<=` (five 'cells', the image ignored)."""
    p = shift_one
    lo, n = p.image_offset, p.num_image_tokens
    image = [p.bos_id] + [lo + k % n for k in range(p.num_cells)]
    with torch.no_grad():
        _, with_word = p.conditions([image + [lo + n]])
        _, without = p.conditions([image])
    assert torch.count_nonzero(without) > 0
    torch.testing.assert_close(with_word, without)


@pytest.mark.parametrize("key, value", [("noise_seed", "5"), ("noise_seed", 5.7), ("noise_seed", True),
                                        ("noise_seed", None), ("init_seed", True), ("init_seed", "1")])
def test_a_trace_seed_of_another_type_is_refused_by_name(key, value) -> None:
    """Seeds are read exactly: ``int("5")`` or ``int(5.7)`` would replay other noise than the one sampled."""
    from test_flow_trace import sampled_traces

    from r3_rl.flow import DenoisingTrace

    d = sampled_traces(2)[1].to_dict()
    with pytest.raises(ValueError, match=f"{key} must be an integer"):
        DenoisingTrace.from_dict({**d, key: value})


def test_a_tensor_record_with_true_in_its_shape_is_refused() -> None:
    """``true`` is an int to Python (1): a shape of ``[true, 2]`` must not pass for ``[1, 2]``."""
    from r3_rl.flow.codec import decode_tensor, encode_tensor

    record = encode_tensor(torch.zeros(1, 2))
    with pytest.raises(ValueError, match="shape must be a list of non-negative ints, got \\[True, 2\\]"):
        decode_tensor({**record, "shape": [True, 2]})
