"""Exact small cases for the flow schedule, guidance, step log-prob, action scoring, tiny flow policy and flow
losses: every expected value is worked out by hand (or from the documented formula), never by the code under test."""
from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from r3_rl.algorithms.flow_losses import flow_policy_loss
from r3_rl.flow import EtaSchedule, FlowVelocity, Guidance, StochasticSteps, derive_seed, sample_flow, timestep_grid
from r3_rl.flow.action import flow_action, score_traces, segment_trace, unconditional_without_gradient
from r3_rl.flow.guidance import guided_velocity
from r3_rl.flow.schedule import check_grid, check_sde_steps, train_subset
from r3_rl.flow.transition import gaussian_logprob, sde_gaussian

D = torch.float64


# ----------------------------------------------------------------------------------------------- schedule
def test_two_points_make_one_step_grid() -> None:
    """num_points == 2 (one step) is valid: catches `< 2` turned into `<= 2`."""
    assert timestep_grid(2) == (1.0, 0.0)
    assert timestep_grid(3, shift=1.0) == (1.0, 0.5, 0.0)


def test_shift_zero_is_refused() -> None:
    """shift must be > 0: catches `not shift > 0` loosened to `>= 0` (an all-zero grid interior)."""
    with pytest.raises(ValueError, match="shift must be > 0"):
        timestep_grid(5, shift=0.0)


def test_check_grid_refuses_a_grid_below_zero() -> None:
    """A grid ending below 0 is refused: catches the dropped `grid[-1] < 0` check."""
    with pytest.raises(ValueError, match=r"must lie in \[0, 1\]"):
        check_grid((1.0, 0.5, -0.1))
    check_grid((1.0, 0.5, 0.0))


def test_eta_clamp_one_refused_and_scale_zero_allowed() -> None:
    """clamp must be < 1 (else 1/0 at t=1) and scale 0 is valid: catches `< 1` -> `<= 1` and `>= 0` -> `> 0`."""
    with pytest.raises(ValueError, match="clamp"):
        EtaSchedule("r3", 0.7, clamp=1.0)
    assert EtaSchedule("constant", 0.0).per_step((1.0, 0.5, 0.0)) == (0.0, 0.0)


def test_r3_eta_hand_values_use_the_steps_own_start_time() -> None:
    """r3 eta of step i uses t_i, min(t, clamp): catches t_{i+1} and max() in place of min()."""
    g = (1.0, 0.5, 0.0)
    eta = EtaSchedule("r3", 0.7).per_step(g)
    assert eta[0] == pytest.approx(0.7 * math.sqrt(20.0), rel=1e-12)  # 1 / (1 - 0.95)
    assert eta[1] == pytest.approx(0.7, rel=1e-12)  # sqrt(0.5 / 0.5)


def test_random_count_equal_to_the_limit_takes_every_step() -> None:
    """count == allowed steps is valid: catches `count > lim` turned into `>=`."""
    assert StochasticSteps("random", count=3).choose(3, seed=5) == (0, 1, 2)
    assert StochasticSteps("random", count=2, max_index=2).choose(9, seed=1) == (0, 1)


def test_random_window_reaches_the_last_window_and_fills_the_limit() -> None:
    """window starts cover [0, lim - w]: catches `lim - w + 1` -> `lim - w` (last window lost, crash at w == lim)."""
    assert StochasticSteps("random_window", window=4).choose(4, seed=0) == (0, 1, 2, 3)
    seen = {StochasticSteps("random_window", window=4).choose(5, seed=s) for s in range(60)}
    assert seen == {(0, 1, 2, 3), (1, 2, 3, 4)}


def test_fixed_index_at_the_limit_is_refused() -> None:
    """A fixed index equal to the limit is out of range: catches `>= lim` -> `> lim`."""
    with pytest.raises(ValueError, match="must be < 3"):
        StochasticSteps("fixed", indices=(3,)).choose(3)
    with pytest.raises(ValueError, match="must be < 2"):
        StochasticSteps("fixed", indices=(2,), max_index=2).choose(9)
    assert StochasticSteps("fixed", indices=(2,)).choose(3) == (2,)


def test_sliding_window_hand_sequence() -> None:
    """start 0, stride 2, window 2 over 5 steps: starts 0, 2, 4 then wrap; without roll-back it stays at 4."""
    roll = StochasticSteps("sliding_window", window=2, stride=2)
    assert [roll.choose(5, learner_step=k) for k in range(4)] == [(0, 1), (2, 3), (4,), (0, 1)]
    stay = StochasticSteps("sliding_window", window=2, stride=2, roll_back=False)
    assert [stay.choose(5, learner_step=k) for k in range(5)] == [(0, 1), (2, 3), (4,), (4,), (4,)]


def test_a_mean_coefficient_of_exactly_zero_is_refused() -> None:
    """1 - eta^2 delta / (2t) == 0 drops the latent: catches `not a > 0` -> `a < 0` and `a > 0` -> `a >= 0`."""
    grid, eta = (1.0, 0.5, 0.0), EtaSchedule("constant", 2.0)  # step 0: 1 - 4 * 0.5 / 2 = 0 exactly
    with pytest.raises(ValueError, match="SDE step 0"):
        check_sde_steps(grid, eta, StochasticSteps("fixed", indices=(0,)))
    x = torch.ones(1, 2, dtype=D)
    with pytest.raises(ValueError, match="coefficient"):
        sde_gaussian(x, x, 1.0, 0.5, 2.0)


def test_train_subset_of_one_recorded_step() -> None:
    """One recorded step trains that step: catches `num_recorded < 1` -> `<= 1`."""
    assert train_subset(1, 1.0) == (0,)
    assert train_subset(0, 1.0) == ()
    assert train_subset(4, 0.5) == (0, 1)


@pytest.mark.parametrize("kw", [{"fraction": 0.0}, {"fraction": 1.5}, {"fraction": 0.5, "order": "last"}])
def test_train_subset_refuses_a_bad_setting_even_with_no_recorded_step(kw) -> None:
    """Catches the settings checked only after the early return for an image with no SDE step recorded."""
    with pytest.raises(ValueError, match="train_subset: (fraction must lie in|order 'last' is unknown)"):
        train_subset(0, **kw)


def test_derive_seed_is_63_bit() -> None:
    """Seeds fit 63 bits: catches the dropped `>> 1` (2^-200 chance to pass by luck)."""
    assert all(0 <= derive_seed(7, k, "sde") < 2**63 for k in range(200))


# ----------------------------------------------------------------------------------------------- guidance
def test_renorm_never_scales_a_velocity_up() -> None:
    """k = clamp(|v_c| / |v|, min, 1): catches the dropped max=1 (here |v| = 0.4 < |v_c| = 1)."""
    vc = torch.tensor([[[1.0, 0.0]]], dtype=D)
    vu = torch.tensor([[[1.2, 0.0]]], dtype=D)  # v = 1.2 + 4 (1 - 1.2) = 0.4
    out = guided_velocity(Guidance(4.0, renorm="global"), torch.tensor([1.0], dtype=D), vc, vu)
    assert torch.allclose(out, torch.tensor([[[0.4, 0.0]]], dtype=D), atol=1e-12)


def test_global_renorm_is_one_norm_per_image_not_per_batch() -> None:
    """Global renorm normalises each image alone: catches a norm over the whole batch."""
    vc = torch.tensor([[[3.0, 4.0]], [[1.0, 0.0]]], dtype=D)
    vu = torch.tensor([[[3.0, 4.0]], [[0.8, 0.0]]], dtype=D)  # row 0: v = v_c; row 1: v = 1.6 -> scaled to 1
    out = guided_velocity(Guidance(4.0, renorm="global"), torch.tensor([1.0, 1.0], dtype=D), vc, vu)
    assert torch.allclose(out, torch.tensor([[[3.0, 4.0]], [[1.0, 0.0]]], dtype=D), atol=1e-7)


def test_image_guidance_builds_on_the_text_guided_velocity() -> None:
    """v = v_iu + g_I (v_T - v_iu) with v_T = v_tu + g_T (v_c - v_tu): catches v_c for v_T and swapped branches."""
    t = torch.tensor([1.0], dtype=D)
    vc, vu, vi = (torch.tensor([[[a]]], dtype=D) for a in (1.0, 0.8, 0.9))
    out = guided_velocity(Guidance(4.0, 1.5), t, vc, vu, vi)  # v_T = 1.6, v = 0.9 + 1.5 * 0.7 = 1.95
    assert float(out) == pytest.approx(1.95, abs=1e-12)
    fv = FlowVelocity(lambda x, s: vc.expand_as(x), lambda x, s: vu.expand_as(x), lambda x, s: vi.expand_as(x))
    assert float(fv.guided(Guidance(4.0, 1.5), torch.zeros(1, 1, 1, dtype=D), t)) == pytest.approx(1.95, abs=1e-6)


def test_guidance_settings_validation() -> None:
    """An empty interval and renorm_min > 1 are refused: catches `lo < hi` -> `lo <= hi` and a dropped `<= 1`."""
    with pytest.raises(ValueError, match="0 <= lo < hi <= 1"):
        Guidance(4.0, interval=(0.5, 0.5))
    with pytest.raises(ValueError, match="renorm_min"):
        Guidance(4.0, renorm="global", renorm_min=1.5)


def test_text_scale_one_is_no_guidance_and_needs_no_unconditional_branch() -> None:
    """text_scale 1 is off: catches `text_scale > 1` -> `>= 1` in active() (it would demand a missing branch)."""
    t = torch.tensor([1.0, 0.5], dtype=D)
    assert Guidance(1.0).active(t).tolist() == [False, False]
    vc = torch.tensor([[[0.25]], [[0.5]]], dtype=D)
    out = FlowVelocity(lambda x, s: vc.to(x.dtype)).guided(Guidance(1.0), torch.zeros(2, 1, 1, dtype=D), t)
    assert out.tolist() == [[[0.25]], [[0.5]]]


# ----------------------------------------------------------------------------------------------- step log-prob
def test_gaussian_logprob_hand_value_is_a_per_element_mean_with_constants() -> None:
    """z = (1, -2), std 0.5: -(1 + 4)/4 - log 0.5 - log(2 pi)/2; catches sum for mean and lost/doubled constants."""
    sample = torch.tensor([[0.5, -1.0]], dtype=D)
    std = torch.tensor([[0.5]], dtype=D)
    lp = gaussian_logprob(sample, torch.zeros_like(sample), std)
    assert float(lp) == pytest.approx(-1.25 + math.log(2.0) - 0.5 * math.log(2.0 * math.pi), abs=1e-12)
    assert float(gaussian_logprob(sample, torch.zeros_like(sample), std, constants=False)) == pytest.approx(-1.25)


def test_last_step_to_zero_is_a_valid_sde_step_with_hand_mean_and_std() -> None:
    """delta == t (the step to t = 0) is allowed; a = 0.875, b = -0.34375, std = 0.25 for t = delta = 0.25, eta 0.5."""
    x = torch.tensor([[1.0, 2.0]], dtype=D)
    v = torch.tensor([[4.0, -8.0]], dtype=D)
    mean, std = sde_gaussian(x, v, 0.25, 0.25, 0.5)
    assert torch.allclose(mean, torch.tensor([[0.875 - 1.375, 1.75 + 2.75]], dtype=D), atol=1e-12)
    assert float(std.reshape(-1)[0]) == pytest.approx(0.25, abs=1e-12)


# ----------------------------------------------------------------------------------------------- action scoring
GRID = (1.0, 0.5, 0.25, 0.0)
ETA = EtaSchedule("constant", 0.5)


def _traces(guidances: list[Guidance], steps: list[list[int]], dtype: torch.dtype = torch.float32,
            shape: tuple[int, ...] = (2, 3)):
    vel = FlowVelocity(lambda x, t: 0.5 * x, lambda x, t: 0.25 * x, lambda x, t: 0.125 * x)
    out = []
    for k, (g, s) in enumerate(zip(guidances, steps)):
        x = torch.randn(1, *shape, generator=torch.Generator().manual_seed(k)).to(dtype)
        out.append(sample_flow(vel, x, grid=GRID, sde_steps=[s], eta=ETA, guidance=g, noise_seeds=[k]).traces[0])
    return out, vel


def test_score_traces_returns_each_traces_own_steps_and_step_sizes() -> None:
    """Two kinds scored apart keep their rows, recorded deltas and log-probs: catches rows picked by the trace's
    index instead of its position in its kind, delta filled with t, and an empty trace's mean losing its shape."""
    traces, vel = _traces([Guidance(), Guidance(2.0, interval=(0.0, 0.4)), Guidance()], [[0, 2], [1, 2], []])
    scores = score_traces(traces, lambda members, batch: vel)
    assert [s.logp.shape[0] for s in scores] == [2, 2, 0]
    assert scores[0].delta.tolist() == [0.5, 0.25] and scores[1].delta.tolist() == [0.25, 0.25]
    for tr, sc in zip(traces[:2], scores[:2]):
        assert torch.allclose(sc.logp.double(), torch.tensor([s.logprob for s in tr.steps], dtype=D), atol=1e-6)
    assert tuple(scores[2].mean.shape) == (0, 2, 3)


def test_score_traces_keeps_latent_dtypes_apart() -> None:
    """A float32 and a float64 trace are scored as two kinds: catches a kind key without the latent dtype."""
    a, vel = _traces([Guidance()], [[1]])
    b, _ = _traces([Guidance()], [[1]], dtype=torch.float64)
    scores = score_traces(a + b, lambda members, batch: vel)
    assert [s.logp.shape[0] for s in scores] == [1, 1]


def test_segment_trace_refuses_more_logprobs_than_steps() -> None:
    """A segment whose log-probs outnumber its recorded steps is refused: catches `!=` weakened to `>`."""
    (tr,), _ = _traces([Guidance()], [[0]])
    seg = SimpleNamespace(action=flow_action(tr), logprobs=[tr.steps[0].logprob, 0.0])
    with pytest.raises(ValueError, match="1 recorded SDE steps but 2"):
        segment_trace(seg)


def test_detached_unconditional_branches_carry_no_gradient_image_branch_included() -> None:
    """Under unconditional_without_gradient only the conditional branch gets gradient: catches an undetached
    image-unconditional branch."""
    (tr,), _ = _traces([Guidance(4.0, 1.5)], [[1]])
    w = [torch.tensor(v, dtype=torch.float32, requires_grad=True) for v in (0.5, 0.25, 0.125)]
    vel = FlowVelocity(lambda x, t: w[0] * x, lambda x, t: w[1] * x, lambda x, t: w[2] * x)
    with unconditional_without_gradient():
        (sc,) = score_traces([tr], lambda m, b: vel)
    sc.logp.sum().backward()
    assert w[0].grad is not None and w[1].grad is None and w[2].grad is None


# ----------------------------------------------------------------------------------------------- tiny flow
SMALL = ["policy.tiny.hidden_size=32", "policy.tiny.num_layers=1", "policy.tiny.num_heads=2",
         "policy.tiny.intermediate_size=48", "policy.options.head_width=64"]


@pytest.fixture(scope="module")
def tiny():
    from pathlib import Path

    from r3_rl.config import load_recipe
    from r3_rl.policy.registry import build_policy

    recipe = Path(__file__).resolve().parents[1] / "recipes" / "tiny_flow_blocks.yaml"
    return build_policy(load_recipe(recipe, SMALL + [
        "data.blocks.rows=2", "data.blocks.cols=3", "policy.options.eta=0.5", "policy.options.cfg_text=3.0",
        "policy.options.cfg_image=1.5", "policy.options.cfg_interval=[0.3,1.0]",
        "policy.options.sde_refine={mode: random, count: 1}"]))


def test_tiny_flow_options_reach_its_schedule_and_guidance(tiny) -> None:
    """eta and the CFG scales land where named: catches a dropped eta option and swapped text/image scales."""
    assert tiny.eta == EtaSchedule("r3", 0.5)
    assert tiny.guidance["generate"] == Guidance(3.0, 1.0, interval=(0.3, 1.0))
    assert tiny.guidance["refine"] == Guidance(3.0, 1.5, interval=(0.3, 1.0))
    assert tiny.latent_shape == (6, 8)


def test_tiny_flow_default_edits_pick_among_the_first_two_steps() -> None:
    """Without sde_refine, edits use one of the first two steps (R3): catches a default max_index of 1."""
    from pathlib import Path

    from r3_rl.config import load_recipe
    from r3_rl.policy.tiny_flow import TinyFlowPolicy

    recipe = load_recipe(Path(__file__).resolve().parents[1] / "recipes" / "tiny_flow_blocks.yaml",
                         SMALL + ["policy.options={}", "policy.options.head_width=64"])
    policy = TinyFlowPolicy.from_recipe(recipe, head_width=64)
    assert policy.steps["refine"] == StochasticSteps("random", 1, max_index=2)
    assert policy.steps["generate"] == StochasticSteps("random", 1)


@pytest.mark.parametrize("option", ["policy.options.latent_dim=0", "policy.options.head_width=0"])
def test_tiny_flow_refuses_a_zero_width_latent_or_head(option: str) -> None:
    """latent_dim and head_width must be >= 1: catches the bound loosened to `< 0` (a head of zero width)."""
    from pathlib import Path

    from r3_rl.config import load_recipe
    from r3_rl.errors import UserError
    from r3_rl.policy.registry import build_policy

    recipe = Path(__file__).resolve().parents[1] / "recipes" / "tiny_flow_blocks.yaml"
    with pytest.raises(UserError, match="latent_dim and head_width must be >= 1"):
        build_policy(load_recipe(recipe, SMALL + [option]))


def test_decode_latents_reads_the_nearest_code_in_raster_order(tiny) -> None:
    """Latents equal to codes decode to those codes' tokens, [B, rows, cols]: catches argmax and rows/cols swapped."""
    tokens = torch.tensor([[5, 0, 3, 1, 4, 2], [2, 2, 0, 1, 1, 0]])
    out = tiny.decode_latents(tiny.codes[tokens] + 0.01)
    assert out.tolist() == [[[5, 0, 3], [1, 4, 2]], [[2, 2, 0], [1, 1, 0]]]


def test_palette_codes_have_norm_sqrt_dim_and_the_widest_gap_of_the_tries() -> None:
    """Each code has norm sqrt(dim), and the set beats its first try's minimum gap: catches a norm over the wrong
    dim and a gap that ignores the diagonal (which keeps the first try)."""
    from r3_rl.policy.tiny_flow import palette_codes

    codes = palette_codes(12, 4, seed=2, tries=16)
    assert torch.allclose(codes.norm(dim=1), torch.full((12,), 2.0), atol=1e-5)
    gen = torch.Generator().manual_seed(2)
    tries = [torch.randn(12, 4, generator=gen) for _ in range(16)]  # the docstring's candidate sets, in draw order
    tries = [c / c.norm(dim=1, keepdim=True) * 2.0 for c in tries]
    gap = lambda c: min(float((c[i] - c[j]).norm()) for i in range(12) for j in range(i + 1, 12))  # noqa: E731
    gaps = [gap(c) for c in tries]
    assert max(gaps) > gaps[0]  # the case is not trivial: the first try is not the widest
    assert gap(codes) == pytest.approx(max(gaps), abs=1e-5)


def test_velocity_head_time_features_are_sin_and_cos_of_pi_powers_of_two() -> None:
    """The head's input is [x_cell, x, h_last, sin(pi 2^k t), cos(pi 2^k t), h_cell, cell emb]: catches cos -> sin."""
    from r3_rl.policy.tiny_flow import VelocityHead

    head = VelocityHead(hidden=1, cells=1, latent_dim=1, width=4)
    width = 2 + 2 + 16 + 16
    lin = nn.Linear(width, width, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.eye(width))
    head.net = nn.Sequential(lin)
    out = head(torch.tensor([[[2.0]]]), torch.tensor([0.25]), torch.tensor([[3.0]]), torch.tensor([[[5.0]]]))[0, 0].detach()
    r = math.sqrt(0.5)
    assert out[:3].tolist() == [2.0, 2.0, 3.0]
    assert torch.allclose(out[3:11], torch.tensor([r, 1.0, 0, 0, 0, 0, 0, 0]), atol=1e-4)  # sin(pi/4), sin(pi/2), ...
    assert torch.allclose(out[11:19], torch.tensor([r, 0, -1.0, 1, 1, 1, 1, 1]), atol=1e-4)  # cos(pi/4), cos(pi/2), ...
    assert float(out[19]) == 5.0


def test_conditions_take_each_contexts_last_token_under_left_padding(tiny) -> None:
    """h_last is the hidden state of each context's last token: catches position 0 (a pad for the shorter one)."""
    tiny.model.eval()
    ctxs = [[5, 6, 7], [5, 6, 7, 8, 9]]
    h_last, _ = tiny.conditions(ctxs)
    with torch.no_grad():
        for row, c in enumerate(ctxs):
            alone = tiny.model.get_decoder()(input_ids=torch.tensor([c]), use_cache=False).last_hidden_state[0, -1]
            assert torch.allclose(h_last[row].float(), alone.float(), atol=1e-4)


def test_flow_sft_loss_is_flow_matching_on_the_documented_interpolation(tiny, monkeypatch) -> None:
    """With a head returning x_t the loss is mean((x_t - (eps - x0))^2), x_t = (1-t) x0 + t eps: catches swapped
    interpolation ends and a target of x0 - eps."""
    from r3_rl.policy.tiny_flow import flow_sft_loss

    class Echo(nn.Module):
        def forward(self, x, t, h_last, h_cells):
            return x

    monkeypatch.setattr(tiny.model, "flow_head", Echo())
    cells = [[0, 1, 2, 3, 4, 5], [5, 5, 1, 0, 2, 3]]
    batch = [([5, 6, 7], [tiny.image_offset + k for k in c]) for c in cells]
    x0 = tiny.codes[torch.tensor(cells)]
    torch.manual_seed(11)
    t = torch.rand(2)
    eps = torch.randn(2, 6, 8)
    x_t = (1 - t)[:, None, None] * x0 + t[:, None, None] * eps
    expected = float(((x_t - (eps - x0)) ** 2).mean())
    torch.manual_seed(11)
    assert float(flow_sft_loss(tiny, batch)) == pytest.approx(expected, rel=1e-5)


# ----------------------------------------------------------------------------------------------- flow losses
def test_flow_policy_loss_clip_high_is_its_own_bound() -> None:
    """ratio 1.5 with clip_low 0.1, clip_high 0.3, A = 1: loss = -1.3; catches clip_high forced to clip_low."""
    logp = torch.tensor([math.log(1.5)], dtype=D)
    loss, _ = flow_policy_loss(logp, torch.zeros(1, dtype=D), torch.ones(1, dtype=D), clip_low=0.1, clip_high=0.3,
                               adv_clip=None)
    assert float(loss) == pytest.approx(-1.3, abs=1e-12)


def test_flow_policy_loss_refuses_adv_clip_zero() -> None:
    """adv_clip must be > 0 or None: catches `not adv_clip > 0` -> `adv_clip < 0` (0 would zero every advantage)."""
    with pytest.raises(ValueError, match="adv_clip"):
        flow_policy_loss(torch.zeros(1), torch.zeros(1), torch.ones(1), adv_clip=0.0)
