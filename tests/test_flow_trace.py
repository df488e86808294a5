"""Serialisation of denoising traces (r3_rl.flow.trace) and the tensor codec (r3_rl.flow.codec)."""
from __future__ import annotations

import json
import math

import pytest
import torch

from r3_rl.flow import (DenoisingTrace, EtaSchedule, FlowVelocity, Guidance, sample_flow, stack_steps,
                        timestep_grid)
from r3_rl.flow.codec import decode_tensor, encode_tensor


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int64,
                                   torch.uint8, torch.bool])
def test_codec_round_trip_is_bit_exact(dtype):
    src = torch.randn(3, 5, dtype=torch.float64) * 100
    t = src.to(dtype) if dtype.is_floating_point else (src > 0 if dtype == torch.bool else src.to(dtype))
    if dtype.is_floating_point:
        t[0, 0], t[0, 1], t[0, 2] = math.nan, -0.0, math.inf
    d = json.loads(json.dumps(encode_tensor(t)))
    back = decode_tensor(d)
    assert back.dtype == dtype and back.shape == t.shape
    if dtype.is_floating_point:
        assert torch.equal(back.view(torch.uint8) if dtype != torch.bfloat16 else back.view(torch.int16),
                           t.view(torch.uint8) if dtype != torch.bfloat16 else t.view(torch.int16))
    else:
        assert torch.equal(back, t)
    assert decode_tensor(encode_tensor(t[:, 1:3])).shape == (3, 2)  # non-contiguous input


def test_codec_rejects_bad_records():
    good = encode_tensor(torch.ones(4))
    with pytest.raises(ValueError, match="do not fit shape"):
        decode_tensor({**good, "shape": [5]}, "x_t")
    with pytest.raises(ValueError, match="dtype 'float8' is unknown"):
        decode_tensor({**good, "dtype": "float8"})
    with pytest.raises(ValueError, match="not valid base64"):
        decode_tensor({**good, "b64": "@@@"})
    with pytest.raises(ValueError, match="expected a dict with keys"):
        decode_tensor([1.0, 2.0], "mean")


def sampled_traces(n=3, dtype=torch.float32):
    torch.manual_seed(0)
    w = torch.randn(8, 8) * 0.3

    def v(x, t):
        return torch.tanh(x.float().flatten(1) @ w).view(x.shape) * t.view(-1, 1, 1)

    x_T = torch.randn(n, 2, 4).to(dtype)
    out = sample_flow(FlowVelocity(v, v), x_T, grid=timestep_grid(8), sde_steps=[(0,), (2, 3), ()][:n],
                      eta=EtaSchedule("r3", 0.7), guidance=Guidance(2.0, interval=(0.5, 1.0)),
                      noise_seeds=[10, 11, 12][:n], init_seeds=[None, 5, 6][:n])
    return out.traces


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
def test_trace_round_trip_is_exact_json_and_smaller_than_float_lists(dtype):
    traces = sampled_traces(dtype=dtype)
    for tr in traces:
        text = json.dumps(tr.to_dict())
        back = DenoisingTrace.from_dict(json.loads(text))
        assert back.to_dict() == tr.to_dict()
        assert (back.grid, back.guidance, back.eta, back.init_seed, back.noise_seed, back.latent_dtype) == (
            tr.grid, tr.guidance, tr.eta, tr.init_seed, tr.noise_seed, tr.latent_dtype)
        for a, b in zip(back.steps, tr.steps):
            assert (a.index, a.t, a.delta, a.eta, a.std, a.logprob) == (b.index, b.t, b.delta, b.eta, b.std, b.logprob)
            assert all(torch.equal(getattr(a, k), getattr(b, k)) for k in ("x_t", "x_next"))
        if tr.steps:
            floats = {**tr.to_dict(), "steps": [{**s.to_dict(), **{k: getattr(s, k).tolist()
                                                                    for k in ("x_t", "x_next")}}
                                                for s in tr.steps]}
            assert len(text) < len(json.dumps(floats))
        assert abs(tr.size_bytes() - len(text)) <= 0.05 * len(text) + 40
    # the round-tripped traces stack and rescore exactly like the originals
    a = stack_steps(traces)
    b = stack_steps([DenoisingTrace.from_dict(json.loads(json.dumps(t.to_dict()))) for t in traces])
    assert all(torch.equal(getattr(a, k), getattr(b, k)) for k in ("x_t", "x_next", "t", "delta", "eta",
                                                                     "logprob", "image", "step"))
    assert a.image.tolist() == [0, 1, 1] and a.step.tolist() == [0, 2, 3]


def test_size_estimate_on_a_large_latent_and_ratio_to_float_lists():
    torch.manual_seed(1)
    x_T = torch.randn(1, 256, 16)
    out = sample_flow(FlowVelocity(lambda x, t: -x), x_T, grid=timestep_grid(16), sde_steps=[(3,)],
                      eta=EtaSchedule("r3", 0.7), guidance=Guidance(), noise_seeds=[1])
    tr = out.traces[0]
    text = json.dumps(tr.to_dict())
    as_floats = json.dumps([getattr(tr.steps[0], k).tolist() for k in ("x_t", "x_next")])
    assert abs(tr.size_bytes() - len(text)) <= 0.01 * len(text)
    assert len(text) < 0.4 * len(as_floats)  # base64 of float32 vs decimal floats


def test_trace_rejects_bad_records():
    d = sampled_traces(2)[1].to_dict()
    with pytest.raises(ValueError, match="version must be one of 1, 2, got 3"):
        DenoisingTrace.from_dict({**d, "version": 3})
    with pytest.raises(ValueError, match="did you mean 'noise_seed'"):
        DenoisingTrace.from_dict({**d, "noise_sed": 1})
    with pytest.raises(ValueError, match="missing key"):
        DenoisingTrace.from_dict({k: v for k, v in d.items() if k != "grid"})
    bad_step = {**d["steps"][0], "x_t": encode_tensor(torch.zeros(3, 3))}
    with pytest.raises(ValueError, match="same shape"):
        DenoisingTrace.from_dict({**d, "steps": [bad_step]})
    with pytest.raises(ValueError, match="differs from trace 0"):
        t0, t1 = sampled_traces(2)
        t1.guidance = Guidance()
        stack_steps([t0, t1])


def test_detached_unconditional_branch_gives_flow_grpos_gradient():
    """``learner.flow.detach_uncond`` (Flow-GRPO's ``noise_pred_uncond.detach()``): the same log-probs, and the
    gradient of a model whose unconditional branch uses a frozen copy of the shared weights; off, the gradient
    runs through both branches and differs."""
    from r3_rl.flow.action import score_traces, unconditional_without_gradient

    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(8, 8) * 0.3)

    def branch(weight, shift):
        return lambda x, t: torch.tanh(x.float().flatten(1) @ weight + shift).view(x.shape) * t.view(-1, 1, 1)

    shared = FlowVelocity(branch(w, 0.5), branch(w, 0.0))  # conditional and unconditional share the weights
    with torch.no_grad():
        traces = sample_flow(shared, torch.randn(2, 2, 4), grid=timestep_grid(6), sde_steps=[(0, 1), (1,)],
                             eta=EtaSchedule("r3", 0.7), guidance=Guidance(3.0, interval=(0.0, 1.0)),
                             noise_seeds=[1, 2]).traces

    def grad(velocity, detach):
        w.grad = None
        with unconditional_without_gradient(detach):
            logp = torch.cat([s.logp for s in score_traces(traces, lambda members, batch: velocity)])
        logp.sum().backward()
        return logp.detach(), w.grad.clone()

    lp_exact, g_exact = grad(shared, False)
    lp_detached, g_detached = grad(shared, True)
    frozen = FlowVelocity(branch(w, 0.5), branch(w.detach(), 0.0))  # the peer: Flow-GRPO's form written out
    lp_peer, g_peer = grad(frozen, False)
    torch.testing.assert_close(lp_detached, lp_exact)
    torch.testing.assert_close(lp_peer, lp_exact)
    torch.testing.assert_close(g_detached, g_peer)
    assert float((g_exact - g_detached).abs().max()) > 1e-3


def version_1_record(trace: DenoisingTrace) -> dict:
    """``trace`` as version 1 wrote it: float32 latents and the behaviour mean beside them on every step."""
    d = trace.to_dict()
    steps = [{**s.to_dict(), "x_t": encode_tensor(s.x_t.float()), "x_next": encode_tensor(s.x_next.float()),
              "mean": encode_tensor(s.x_next.float() * 0.5)} for s in trace.steps]
    return {**d, "version": 1, "steps": steps}


def test_a_bf16_trace_is_a_third_of_version_1_and_version_1_records_still_rescore_alike():
    """Version 2 keeps two latents per SDE step in the latent's own dtype; version 1 kept three float32 tensors.
    A version-1 record (a buffer saved before) loads, drops its mean, and stacks to the same learner batch."""
    torch.manual_seed(3)
    x_T = torch.randn(2, 256, 16).to(torch.bfloat16)
    out = sample_flow(FlowVelocity(lambda x, t: -x.float()), x_T, grid=timestep_grid(16), sde_steps=[(0, 3), (5,)],
                      eta=EtaSchedule("r3", 0.7), guidance=Guidance(), noise_seeds=[1, 2])
    for tr in out.traces:
        new, old = json.dumps(tr.to_dict()), json.dumps(version_1_record(tr))
        assert len(new) < 0.35 * len(old)  # 4 bytes an element against 12, plus the head
        assert {s.x_t.dtype for s in tr.steps} == {torch.bfloat16}
    legacy = [DenoisingTrace.from_dict(json.loads(json.dumps(version_1_record(tr)))) for tr in out.traces]
    assert [s.x_t.dtype for s in legacy[0].steps] == [torch.float32, torch.float32]
    a, b = stack_steps(out.traces), stack_steps(legacy)
    for k in ("x_t", "x_next", "t", "delta", "eta", "logprob", "image", "step"):
        assert getattr(a, k).dtype == getattr(b, k).dtype and torch.equal(getattr(a, k), getattr(b, k)), k
    assert a.x_t.dtype == torch.bfloat16 and a.x_next.dtype == torch.float32
    # a version-2 record carrying a mean is foreign, not silently accepted
    d = out.traces[0].to_dict()
    d["steps"][0]["mean"] = d["steps"][0]["x_t"]
    with pytest.raises(ValueError, match="SDE step: unknown key 'mean'"):
        DenoisingTrace.from_dict(d)
