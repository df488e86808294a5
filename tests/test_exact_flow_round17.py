"""Exact small cases for the flow sampler, trace record, tensor codec and SDE transition (round 17 audit).

Covers r3_rl/flow/sampler.py, trace.py, codec.py and transition.py: bad input refused with a ValueError
naming it (empty seeds, negative SDE index, short/long seed lists and selects, infinite times, mismatched
shapes), the seeds and dtypes a trace records, trace tensors owning their memory, the sampler not building an
autograd graph, and hand-computed means, log-probs and size estimates.  Each test was checked to fail on a
one-point mutation of the code that the older tests let through; the trace fields read loosely (a step index
of 2.7 or true, a latent shape of floats, a dtype given as a list) are refused since this round.
"""
from __future__ import annotations

import json
import math

import pytest
import torch

from r3_rl.flow import (DenoisingTrace, EtaSchedule, FlowVelocity, Guidance, derive_seed, initial_noise,
                        sample_flow, sibling_seeds, stack_steps)
from r3_rl.flow.codec import decode_tensor, encode_tensor
from r3_rl.flow.transition import euler_step, gaussian_logprob, sde_gaussian

GRID = (1.0, 0.5, 0.25, 0.0)
ETA = EtaSchedule("constant", 0.5)


def const_velocity(value: float = 1.0) -> FlowVelocity:
    """v(x, t) = value everywhere (no guidance branches needed)."""
    return FlowVelocity(lambda x, t: torch.full_like(x, value))


def run(x_T: torch.Tensor, sde_steps, *, noise_seeds=None, init_seeds=None, velocity=None):
    n = x_T.shape[0]
    return sample_flow(velocity or const_velocity(), x_T, grid=GRID, sde_steps=sde_steps, eta=ETA,
                       guidance=Guidance(), noise_seeds=noise_seeds or list(range(10, 10 + n)),
                       init_seeds=init_seeds)


# ----------------------------------------------------------------------------------------------- sampler
def test_initial_noise_of_no_seeds_is_a_value_error() -> None:
    with pytest.raises(ValueError, match="initial_noise: no seeds"):
        initial_noise((2, 3), [])


def test_sibling_seeds_without_sharing_are_per_member_and_apart_from_the_sde_seeds() -> None:
    init, noise = sibling_seeds(7, "g", size=3, share_initial_noise=False)
    assert init == [derive_seed(7, "g", m, "init") for m in range(3)]
    assert noise == [derive_seed(7, "g", m, "sde") for m in range(3)]
    assert len(set(init)) == 3 and set(init).isdisjoint(noise)
    shared, noise2 = sibling_seeds(7, "g", size=3)
    assert shared == [derive_seed(7, "g", "init")] * 3 and noise2 == noise


def test_a_negative_sde_step_is_refused_not_silently_skipped() -> None:
    with pytest.raises(ValueError, match=r"image 0 has SDE step\(s\) \[-1\] outside 0..2"):
        run(torch.zeros(1, 2), [(-1,)])


@pytest.mark.parametrize("count", [1, 3])
def test_init_seeds_of_the_wrong_length_are_refused(count: int) -> None:
    with pytest.raises(ValueError, match=f"2 rows but sde_steps, noise_seeds and init_seeds have 2, 2 and {count}"):
        run(torch.zeros(2, 2), [(0,), ()], init_seeds=list(range(count)))


def test_the_trace_records_the_init_seed_given_and_the_per_image_noise_seed() -> None:
    out = run(torch.zeros(2, 2), [(0,), ()], noise_seeds=[21, 22], init_seeds=[5, None])
    assert [(tr.init_seed, tr.noise_seed) for tr in out.traces] == [(5, 21), (None, 22)]
    assert [tr.latent_shape for tr in out.traces] == [(2,), (2,)]


def test_recorded_step_tensors_own_their_memory() -> None:
    """Three images stochastic at the same step: each record is a copy, not a view into the batch."""
    out = run(torch.zeros(3, 4), [(0,), (0,), (0,)])
    for tr in out.traces:
        step = tr.steps[0]
        for x in (step.x_t, step.x_next):
            assert x.untyped_storage().nbytes() == 4 * x.element_size()


def test_sampling_builds_no_autograd_graph_through_a_trainable_velocity() -> None:
    w = torch.tensor(0.5, requires_grad=True)
    out = run(torch.ones(2, 3), [(0, 2), (1,)], velocity=FlowVelocity(lambda x, t: w * x))
    assert not out.latents.requires_grad
    assert not any(s.x_t.requires_grad or s.x_next.requires_grad for tr in out.traces for s in tr.steps)


# ----------------------------------------------------------------------------------------------- trace
def trace_dict() -> dict:
    return json.loads(json.dumps(run(torch.zeros(1, 2), [(0,)], init_seeds=[3]).traces[0].to_dict()))


@pytest.mark.parametrize("key", ["init_seed", "noise_seed", "steps", "latent_dtype"])
def test_a_trace_record_missing_a_key_is_a_value_error_naming_it(key: str) -> None:
    d = trace_dict()
    del d[key]
    with pytest.raises(ValueError, match=f"denoising trace: missing key\\(s\\) {key}$"):
        DenoisingTrace.from_dict(d)


def test_a_trace_of_an_unknown_latent_dtype_is_refused_even_with_valid_steps() -> None:
    with pytest.raises(ValueError, match="dtype 'float8' is unknown"):
        DenoisingTrace.from_dict({**trace_dict(), "latent_dtype": "float8"})


# Found by round 17: these fields were read with int(), so 2.7 or true became a number, and a list as a dtype
# raised "unhashable type" instead of the record's one-line ValueError (the seeds were already strict).
@pytest.mark.parametrize("field, value, message", [
    ("version", True, "denoising trace: version must be one of 1, 2, got True"),
    ("latent_shape", [1, 2.7], r"denoising trace: latent_shape must be a list of non-negative ints, got \[1, 2.7\]"),
    ("latent_shape", [True, 2], r"latent_shape must be a list of non-negative ints, got \[True, 2\]"),
    ("latent_dtype", ["float32"], r"tensor codec: dtype \['float32'\] is unknown"),
])
def test_a_trace_field_of_the_wrong_kind_is_refused_not_coerced(field: str, value: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        DenoisingTrace.from_dict({**trace_dict(), field: value})


@pytest.mark.parametrize("index", [0.0, 0.7, True, "0"])
def test_an_sde_step_index_that_is_not_an_integer_is_refused(index: object) -> None:
    d = trace_dict()
    d["steps"][0]["index"] = index
    with pytest.raises(ValueError, match=f"SDE step: index must be an integer, got {index!r}"):
        DenoisingTrace.from_dict(d)
    assert DenoisingTrace.from_dict(trace_dict()).steps[0].index == 0


def test_a_tensor_record_whose_dtype_is_a_list_is_a_value_error() -> None:
    record = {**encode_tensor(torch.zeros(2)), "dtype": ["float32"]}
    with pytest.raises(ValueError, match=r"tensor codec: dtype \['float32'\] is unknown"):
        decode_tensor(record, "x")


def test_stack_steps_refuses_a_select_longer_than_the_traces() -> None:
    tr = run(torch.zeros(1, 2), [(0,)]).traces[0]
    with pytest.raises(ValueError, match="stack_steps: select has 2 entries for 1 traces"):
        stack_steps([tr], select=[[0], [0]])


def test_stack_steps_rows_follow_the_select_order() -> None:
    tr = run(torch.zeros(1, 2), [(0, 1, 2)]).traces[0]
    batch = stack_steps([tr, tr], select=[[2, 0], [1]])
    assert batch.step.tolist() == [2, 0, 1] and batch.image.tolist() == [0, 0, 1]
    assert batch.t.tolist() == [0.25, 1.0, 0.5] and batch.delta.tolist() == [0.25, 0.5, 0.25]
    assert batch.logprob.tolist() == [tr.steps[2].logprob, tr.steps[0].logprob, tr.steps[1].logprob]


def test_stack_steps_of_nothing_is_a_value_error() -> None:
    with pytest.raises(ValueError, match="stack_steps: no traces"):
        stack_steps([])
    tr = run(torch.zeros(1, 2), [(0,)]).traces[0]
    with pytest.raises(ValueError, match="the traces hold no selected SDE step"):
        stack_steps([tr], select=[[]])


# ----------------------------------------------------------------------------------------------- codec
def test_codec_encodes_a_tensor_that_requires_grad() -> None:
    w = torch.tensor([1.5, -2.0], requires_grad=True)
    back = decode_tensor(json.loads(json.dumps(encode_tensor(w * 2))))
    assert back.tolist() == [3.0, -4.0] and not back.requires_grad



# ----------------------------------------------------------------------------------------------- transition
def test_float16_latents_compute_the_gaussian_in_float32() -> None:
    """fp16 is narrower than float32: mean, std and Euler step come back in float32 (exact hand values)."""
    x = torch.tensor([[1.0, -2.0]], dtype=torch.float16)
    v = torch.tensor([[0.5, 0.25]], dtype=torch.float16)
    mean, std = sde_gaussian(x, v, 0.5, 0.25, 1.0)
    # a = 1 - 0.25 / 1 = 0.75; b = -0.25 * (1 + 0.5 / 1) = -0.375; std = sqrt(0.25) = 0.5
    assert mean.dtype == std.dtype == torch.float32
    assert mean.tolist() == [[0.75 - 0.1875, -1.5 - 0.09375]] and std.tolist() == [[0.5]]
    step = euler_step(x, v, 0.25)
    assert step.dtype == torch.float32 and step.tolist() == [[0.875, -2.0625]]


def test_a_per_row_time_with_an_extra_dimension_is_refused() -> None:
    x = torch.zeros(1, 2, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"t must be a float or a \[1\] tensor, got shape \(1, 2\)"):
        sde_gaussian(x, x, torch.tensor([[0.5, 0.5]]), 0.25, 0.5)


def test_an_infinite_time_is_refused_not_turned_into_a_nan_mean() -> None:
    x = torch.ones(1, 2, dtype=torch.float64)
    with pytest.raises(ValueError, match="sde_gaussian: t must be finite and > 0 on every row"):
        sde_gaussian(x, x, math.inf, 0.25, 0.5)


def test_a_velocity_shaped_unlike_the_latent_is_refused_not_broadcast() -> None:
    x = torch.ones(1, 2, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"x \(1, 2\) and v \(1, 1\) must have the same shape"):
        sde_gaussian(x, torch.ones(1, 1, dtype=torch.float64), 0.5, 0.25, 0.5)


def test_gaussian_logprob_of_bf16_inputs_computes_in_float32() -> None:
    sample = torch.tensor([[1.0, 2.0 ** -7]], dtype=torch.bfloat16)
    mean = torch.zeros(1, 2, dtype=torch.bfloat16)
    std = torch.full((1, 1), 0.5, dtype=torch.bfloat16)
    lp = gaussian_logprob(sample, mean, std)
    # z = (2, 2^-6): -0.5 * (4 + 2^-12) / 2 - log(0.5) - log(2 pi) / 2
    expected = -0.25 * (4 + 2.0 ** -12) + math.log(2.0) - 0.5 * math.log(2 * math.pi)
    assert lp.dtype == torch.float32 and float(lp) == pytest.approx(expected, abs=1e-6)
