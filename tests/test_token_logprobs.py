"""Log-probs of sampled tokens in row chunks (``token_logprobs``): equal to the one-tensor computation, top-k /
top-p / CFG included, gradients too, and without a full-vocabulary float32 tensor for the whole batch."""
from __future__ import annotations

import pytest
import torch

from r3_rl.plan.measure import measured_peak
from r3_rl.policy.sampling import cfg_logits, sampling_logprobs, token_logprobs
from r3_rl.trajectory import SamplingParams

SAMPLERS = [SamplingParams(), SamplingParams(temperature=0.7, top_k=50, top_p=0.9),
            SamplingParams(temperature=1.1, top_p=0.8, cfg_scale=4.0)]


def _whole(hidden, head, tokens, sp, allowed, uncond):
    """The computation before chunking: one [N, V] float32 tensor through sampling_logprobs."""
    logits = head(hidden).float()
    if uncond is not None:
        logits = cfg_logits(logits, head(uncond).float(), sp.cfg_scale)
    return sampling_logprobs(logits, sp, allowed, keep=tokens).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)


@pytest.mark.parametrize("sp", SAMPLERS, ids=["plain", "topk_topp", "cfg_topp"])
def test_chunked_equals_whole_values_and_gradients(sp: SamplingParams) -> None:
    torch.manual_seed(0)
    n, d, vocab = 37, 16, 300
    head = torch.nn.Linear(d, vocab, bias=False)
    allowed = torch.rand(vocab) > 0.2 if sp.cfg_scale == 1.0 else None
    tokens = torch.multinomial(torch.ones(vocab) * (allowed if allowed is not None else 1), n, replacement=True)
    results = []
    for fn in (lambda h, u: _whole(h, head, tokens, sp, allowed, u),
               lambda h, u: token_logprobs(h, head, vocab, tokens, sp, allowed, uncond=u, chunk_elements=5 * vocab)):
        torch.manual_seed(1)
        hidden = torch.randn(n, d, requires_grad=True)
        uncond = torch.randn(n, d, requires_grad=True) if sp.cfg_scale != 1.0 else None
        head.zero_grad()
        lp = fn(hidden, uncond)
        (lp * torch.linspace(-1, 1, n)).sum().backward()
        results.append((lp.detach(), hidden.grad, head.weight.grad.clone(), uncond.grad if uncond is not None else None))
    (a, ga, wa, ua), (b, gb, wb, ub) = results
    assert torch.isfinite(a).all() and a.shape == (n,)
    torch.testing.assert_close(b, a, atol=1e-6, rtol=1e-6)  # 8 chunks of 5 rows vs one 37-row GEMM: rounding
    torch.testing.assert_close(gb, ga, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(wb, wa, atol=1e-6, rtol=1e-5)
    if ua is not None:
        torch.testing.assert_close(ub, ua, atol=1e-6, rtol=1e-5)
    with torch.no_grad():  # the reference forward: no autograd, same values
        torch.testing.assert_close(token_logprobs(hidden.detach(), head, vocab, tokens, sp, allowed,
                                                  uncond=None if uncond is None else uncond.detach(),
                                                  chunk_elements=7 * vocab), a, atol=1e-6, rtol=1e-6)


def test_peak_memory_is_a_chunk_not_the_batch() -> None:
    """256 positions x 16,000-token vocabulary with top-p: the whole tensor is 16 MB of float32 logits (plus
    sort temporaries); chunks of 2^18 logits keep the forward + backward peak under a fixed bound."""
    torch.set_num_threads(1)
    torch.manual_seed(0)
    n, d, vocab = 256, 64, 16_000
    head = torch.nn.Linear(d, vocab, bias=False)
    sp = SamplingParams(temperature=0.9, top_p=0.9)
    tokens = torch.randint(vocab, (n,))
    full_bytes = n * vocab * 4

    def step(fn):
        hidden = torch.randn(n, d, requires_grad=True)
        fn(hidden).sum().backward()
        return hidden.grad

    _, whole = measured_peak(lambda: step(lambda h: _whole(h, head, tokens, sp, None, None)))
    _, chunked = measured_peak(lambda: step(lambda h: token_logprobs(h, head, vocab, tokens, sp,
                                                                     chunk_elements=1 << 18)))
    assert whole > 2 * full_bytes, "the unchunked computation should hold several [N, V] tensors"
    # a chunk's temporaries (logits, sort values + int64 indices, probs, masks: ~10 x 1 MB) + the weight grad
    assert chunked < 12 * (1 << 18) * 4 + 2 * d * vocab * 4, (chunked, whole)
    assert chunked < whole / 4, (chunked, whole)


def test_sampling_draws_the_tokens_torch_multinomial_draws_without_its_host_syncs() -> None:
    """``sample_tokens`` computes multinomial's one-sample algorithm itself (argmax of p / Exp(1) draws) to drop
    its two GPU->host reads per token: from the same generator state it must give the very same tokens --
    peaked and flat rows, rows with masked (-inf) tokens, a Janus-sized vocabulary -- and leave the generator
    where multinomial leaves it (the next draw agrees too)."""
    from r3_rl.policy.sampling import sample_tokens

    sp = SamplingParams(temperature=1.0)
    for seed, (rows, vocab) in enumerate([(4, 7), (16, 16384), (32, 102400)]):
        gen = torch.Generator().manual_seed(seed)
        logits = torch.randn(rows, vocab, generator=gen) * torch.linspace(0.1, 12.0, rows).unsqueeze(1)
        logits[:, : vocab // 3] = float("-inf")  # a mask: allowed tokens only
        logprobs = torch.log_softmax(logits, dim=-1)
        ours, theirs = torch.Generator().manual_seed(100 + seed), torch.Generator().manual_seed(100 + seed)
        for _ in range(3):
            tokens, lp = sample_tokens(logprobs, sp, ours)
            expected = torch.multinomial(logprobs.exp(), 1, generator=theirs).squeeze(-1)
            assert torch.equal(tokens, expected)
            assert torch.equal(lp, logprobs.gather(-1, expected.unsqueeze(-1)).squeeze(-1))
            assert (tokens >= vocab // 3).all()


def test_a_broken_row_of_probabilities_is_refused_once_per_sampling_call() -> None:
    """``torch.multinomial`` refused a NaN row or one with no allowed token; its one-sample algorithm without
    those host reads returns token 0 for it, with a non-finite log-prob.  ``check_sampled`` refuses that once per
    call (a NaN logit must not reach the learner as a NaN loss); healthy rows pass."""
    from r3_rl.policy.sampling import check_sampled, sample_tokens

    sp = SamplingParams(temperature=1.0)
    logprobs = torch.log_softmax(torch.randn(3, 10), dim=-1)
    logprobs[1] = float("nan")
    logprobs[2] = float("-inf")  # every token masked
    _, lp = sample_tokens(logprobs, sp, torch.Generator().manual_seed(0))
    assert torch.isfinite(lp[0]) and not torch.isfinite(lp[1:]).any()
    for broken in (lp, [[float(lp[0]), float(lp[1])]]):
        with pytest.raises(RuntimeError, match="non-finite log-prob"):
            check_sampled(broken, "test")
    check_sampled(lp[:1], "test")
    check_sampled([[-0.5, -1.0], []], "test")
