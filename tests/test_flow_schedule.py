"""Timestep grids, eta schedules and the choice of stochastic steps (r3_rl.flow.schedule).

Expected numbers are the R3 reference values in /work/notes/flow.md section 1.4 (computed there independently).
"""
from __future__ import annotations

import math

import pytest

from r3_rl.flow.schedule import (EtaSchedule, StochasticSteps, check_sde_steps, derive_seed, sde_mean_coefficient,
                                 timestep_grid, train_subset)


def test_grid_matches_the_r3_generation_grid_and_its_stds():
    g = timestep_grid(16, shift=3.0)
    assert len(g) == 16 and g[0] == 1.0 and g[-1] == 0.0
    expected_t = [1.000, .977, .951, .923, .892, .857, .818, .774, .724, .667, .600, .522, .429, .316, .176]
    assert [round(t, 3) for t in g[:-1]] == expected_t
    eta = EtaSchedule("r3", 0.7)
    stds = [round(eta.at(i, g) * math.sqrt(g[i] - g[i + 1]), 3) for i in range(15)]
    assert stds == [.477, .494, .512, .428, .375, .338, .311, .290, .272, .256, .240, .223, .204, .178, .136]
    # the unshifted grid is plain linspace; shift moves every interior point towards the noise end
    assert timestep_grid(5, shift=1.0) == (1.0, 0.75, 0.5, 0.25, 0.0)
    assert all(a > b for a, b in zip(g[1:-1], timestep_grid(16, shift=1.0)[1:-1]))


def test_edit_grid_first_two_steps():
    g, eta = timestep_grid(21), EtaSchedule("r3", 1.0)
    assert g[0] - g[1] == pytest.approx(0.0172, abs=1e-4) and g[1] == pytest.approx(0.9828, abs=1e-4)
    assert eta.at(0, g) == pytest.approx(4.472, abs=1e-3) and eta.at(1, g) == pytest.approx(4.433, abs=1e-3)
    assert eta.at(0, g) * math.sqrt(g[0] - g[1]) == pytest.approx(0.587, abs=1e-3)
    assert eta.at(1, g) * math.sqrt(g[1] - g[2]) == pytest.approx(0.603, abs=1e-3)


def test_eta_kinds():
    g = (1.0, 0.8, 0.5, 0.0)
    fg = EtaSchedule("flow_grpo", 0.7)
    assert fg.at(0, g) == pytest.approx(0.7 * math.sqrt(1.0 / (1 - 0.8)))  # t = 1 uses 1 - t_1
    assert fg.at(1, g) == pytest.approx(0.7 * math.sqrt(0.8 / 0.2))
    r3 = EtaSchedule("r3", 0.7)
    assert r3.at(0, g) == pytest.approx(0.7 * math.sqrt(1.0 / 0.05))  # clamp at 0.95
    assert r3.per_step(g) == tuple(r3.at(i, g) for i in range(3))
    assert EtaSchedule("constant", 0.3).per_step(g) == (0.3, 0.3, 0.3)
    with pytest.raises(ValueError, match="valid: r3, flow_grpo, constant"):
        EtaSchedule("sde")
    with pytest.raises(ValueError, match="strictly decreasing"):
        r3.per_step((1.0, 1.0, 0.0))


def test_random_one_step_per_image_within_range():
    spec = StochasticSteps("random", count=1)
    picks = [spec.choose(15, seed=derive_seed(7, "img", k)) for k in range(400)]
    assert all(len(p) == 1 and 0 <= p[0] < 15 for p in picks)
    assert {p[0] for p in picks} == set(range(15))  # uniform over every step, the last one included
    assert spec.choose(15, seed=123) == spec.choose(15, seed=123)  # seeded: siblings sharing a seed share it
    edits = StochasticSteps("random", count=1, max_index=2)
    assert {edits.choose(20, seed=s)[0] for s in range(100)} == {0, 1}  # edits: only the first 2 steps
    three = StochasticSteps("random", count=3, max_index=6).choose(20, seed=5)
    assert len(set(three)) == 3 and list(three) == sorted(three) and max(three) < 6
    with pytest.raises(ValueError, match="exceeds"):
        StochasticSteps("random", count=3, max_index=2).choose(20)


def test_fixed_all_and_random_window():
    assert StochasticSteps("fixed", indices=(4, 1)).choose(10) == (1, 4)
    with pytest.raises(ValueError, match="must be < 3"):
        StochasticSteps("fixed", indices=(4,), max_index=3).choose(10)
    assert StochasticSteps("all").choose(5) == (0, 1, 2, 3, 4)
    assert StochasticSteps("all", max_index=3).choose(5) == (0, 1, 2)
    rw = StochasticSteps("random_window", window=3, max_index=7)
    starts = {rw.choose(14, seed=s)[0] for s in range(200)}
    assert starts == set(range(5))  # window [s, s+3) inside [0, 7)
    assert all(rw.choose(14, seed=s) == tuple(range(rw.choose(14, seed=s)[0], rw.choose(14, seed=s)[0] + 3))
               for s in range(20))


def test_sliding_window_moves_with_the_learner_step():
    # MixGRPO-like: window 4, shift by 1 every 2 learner steps, allowed steps [0, 6)
    mix = StochasticSteps("sliding_window", window=4, shift_every=2, stride=1, max_index=6)
    seq = [mix.choose(10, learner_step=s) for s in range(14)]
    assert seq[:2] == [(0, 1, 2, 3)] * 2
    assert seq[2:4] == [(1, 2, 3, 4)] * 2
    assert seq[6] == (3, 4, 5)  # truncated at the limit, as MixGRPO
    assert seq[10] == (5,)  # last start: never empty
    assert seq[12] == (0, 1, 2, 3)  # rolled back to the start
    assert mix.choose(10, seed=1, learner_step=5) == mix.choose(10, seed=2, learner_step=5)  # seed plays no part
    stuck = StochasticSteps("sliding_window", window=2, shift_every=1, stride=2, roll_back=False, start=1)
    assert [stuck.choose(6, learner_step=s) for s in range(5)] == [(1, 2), (3, 4), (5,), (5,), (5,)]


def test_derive_seed_and_train_subset():
    assert derive_seed(1, "a", 3) == derive_seed(1, "a", 3)
    assert len({derive_seed(1, "a", k) for k in range(100)}) == 100
    assert derive_seed(1, 23) != derive_seed(12, 3)  # parts are separated, not concatenated
    assert 0 <= derive_seed("x") < 2**63
    assert train_subset(10, 0.99) == tuple(range(9))  # Flow-GRPO: first int(N * fraction)
    assert train_subset(1, 0.1) == (0,)  # at least one (R3's max(1, int(0.1)))
    r = train_subset(10, 0.6, order="random", seed=3)
    assert len(r) == 6 and len(set(r)) == 6 and r == train_subset(10, 0.6, order="random", seed=3)
    assert r != train_subset(10, 0.6, order="random", seed=4) or r != train_subset(10, 0.6, order="random", seed=5)


def test_round_trip_and_bad_keys():
    for obj in (EtaSchedule("flow_grpo", 1.3), StochasticSteps("fixed", indices=(0, 2), max_index=4)):
        assert type(obj).from_dict(obj.to_dict()) == obj
    with pytest.raises(ValueError, match="did you mean 'window'"):
        StochasticSteps.from_dict({"mode": "sliding_window", "windw": 3})
    with pytest.raises(ValueError, match="valid: random, fixed"):
        StochasticSteps("slide")


def test_a_grid_too_coarse_for_its_eta_is_refused_with_what_would_pass():
    """3 points, shift 3: step 0 has t = 1, delta = 0.25; R3's eta there is 0.7 sqrt(1 / 0.05) = 3.130, so the
    mean keeps 1 - 9.8 * 0.25 / 2 = -0.225 times the latent (sign flipped); scale < sqrt(8) / sqrt(20) = 0.632."""
    coarse, eta, every = timestep_grid(3), EtaSchedule("r3", 0.7), StochasticSteps("all")
    assert sde_mean_coefficient(1.0, 0.25, eta.at(0, coarse)) == pytest.approx(-0.225, abs=1e-12)
    with pytest.raises(ValueError, match=r"SDE step 0 \(t=1, delta=0.25\) has eta=3.13, so its mean keeps -0.225 x "
                                         r"the latent .* use an eta scale below 0.632 or at least 4 grid points"):
        check_sde_steps(coarse, eta, every, shift=3.0)
    # what the error proposes passes, and just past it does not
    check_sde_steps(coarse, EtaSchedule("r3", 0.632), every)
    with pytest.raises(ValueError, match="below 0.632"):
        check_sde_steps(coarse, EtaSchedule("r3", 0.633), every)
    check_sde_steps(timestep_grid(4), eta, every)
    # only the steps the sampler may pick count: step 1 (t = 0.75, delta = 0.75) keeps 1 - 0.49 * 3 * 0.75 / 1.5
    check_sde_steps(coarse, eta, StochasticSteps("fixed", indices=(1,)))
    assert StochasticSteps("fixed", indices=(1,)).possible(2) == (1,)
    assert StochasticSteps("random", max_index=2).possible(20) == (0, 1)
    # R3's own grids keep 0.81-0.89 on every step their samplers may pick
    for points, scale, steps in ((16, 0.7, StochasticSteps("random")), (21, 1.0, StochasticSteps("random", max_index=2))):
        grid, sched = timestep_grid(points), EtaSchedule("r3", scale)
        kept = [sde_mean_coefficient(grid[i], grid[i] - grid[i + 1], sched.at(i, grid)) for i in steps.possible(points - 1)]
        assert 0.8 < min(kept) and max(kept) < 1.0
        check_sde_steps(grid, sched, steps, shift=3.0)
