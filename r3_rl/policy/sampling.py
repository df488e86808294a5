"""The sampling distribution, as one pure function used both when sampling and when training.

Every policy turns raw next-token logits into the distribution it samples from with
:func:`sampling_logprobs` (CFG, which the caller has already combined -> allowed-token mask -> temperature ->
top-k -> top-p), and the learner recomputes log-probs with the very same function.  That is what makes
the policy ratio exactly 1 before the first update, and it is where the reference implementation
went wrong (it sampled a guided, tempered, nucleus-filtered distribution but trained on the plain
T=1 full-vocabulary one).

When recomputing, the sampled token is always kept inside the top-k / top-p set (``keep``): after
an update a previously sampled token may fall just outside the nucleus, and an infinite negative
log-prob would turn the clipped loss into NaN instead of a clipped ratio.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch.utils.checkpoint import checkpoint

from r3_rl.trajectory import SamplingParams


def cfg_logits(cond: torch.Tensor, uncond: torch.Tensor, scale: float) -> torch.Tensor:
    """Classifier-free guidance on logits: ``uncond + scale * (cond - uncond)`` (scale 1 = cond)."""
    if scale == 1.0:
        return cond
    return uncond + scale * (cond - uncond)


def sampling_logprobs(logits: torch.Tensor, sp: SamplingParams, allowed: torch.Tensor | None = None,
                      keep: torch.Tensor | None = None) -> torch.Tensor:
    """Log-probabilities (over the last dim) of the distribution that ``sp`` samples from.

    Args:
        logits: ``[..., V]`` raw logits (CFG already combined).
        sp: temperature / top-k / top-p (``greedy`` samples the argmax but log-probs are those of the
            tempered distribution, so greedy evaluation trajectories remain scoreable).
        allowed: optional ``[V]`` bool mask of tokens of the modality being sampled.
        keep: optional ``[...]`` token ids that must stay inside the top-k/top-p set (sampled tokens,
            when recomputing for training).
    """
    logits = logits.float()
    if allowed is not None:
        logits = logits.masked_fill(~allowed, float("-inf"))
    temperature = sp.temperature if sp.temperature > 0 else 1.0
    if temperature != 1.0:  # x / 1.0 == x exactly; skipping it saves a [B, T, V] op and its backward
        logits = logits / temperature
    if sp.top_k and sp.top_k > 0 and sp.top_k < logits.shape[-1]:
        kth = torch.topk(logits, sp.top_k, dim=-1).values[..., -1:]
        drop = logits < kth
        logits = _masked(logits, drop, keep)
    if sp.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        # mass strictly before each token; a token is dropped once the mass before it reaches top_p
        before = torch.cumsum(probs, dim=-1) - probs
        drop_sorted = before >= sp.top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = _masked(logits, drop, keep)
    return torch.log_softmax(logits, dim=-1)


# Logits per chunk of rows in token_logprobs: 2^24 float32 = 64 MB (164 positions of Janus' 102,400-token vocabulary)
LOGIT_CHUNK_ELEMENTS = 1 << 24


def token_logprobs(hidden: torch.Tensor, head: Callable[[torch.Tensor], torch.Tensor], vocab: int,
                   tokens: torch.Tensor, sp: SamplingParams, allowed: torch.Tensor | None = None,
                   uncond: torch.Tensor | None = None, chunk_elements: int = LOGIT_CHUNK_ELEMENTS) -> torch.Tensor:
    """Log-probs ``[N]`` of ``tokens`` under the sampling distribution, from hidden states ``[N, D]``.

    The head, the CFG mix with the null stream's hidden states ``uncond`` and :func:`sampling_logprobs` (top-k /
    top-p exact, sampled tokens kept) run on chunks of rows holding at most ``chunk_elements`` logits; under
    autograd each chunk is recomputed in backward (activation checkpointing), so no ``[N, vocab]`` float32
    tensor is alive at once or kept for backward -- only the hidden states are.
    """
    rows = max(1, chunk_elements // max(vocab, 1))

    def chunk(h: torch.Tensor, hu: torch.Tensor | None, tok: torch.Tensor) -> torch.Tensor:
        logits = head(h).float()
        if hu is not None:
            logits = cfg_logits(logits, head(hu).float(), sp.cfg_scale)
        return sampling_logprobs(logits, sp, allowed, keep=tok).gather(-1, tok.unsqueeze(-1)).squeeze(-1)

    recompute = torch.is_grad_enabled() and hidden.requires_grad
    out = []
    for s in range(0, hidden.shape[0], rows):
        args = (hidden[s:s + rows], None if uncond is None else uncond[s:s + rows], tokens[s:s + rows])
        out.append(checkpoint(chunk, *args, use_reentrant=False) if recompute else chunk(*args))
    return torch.cat(out) if out else hidden.new_zeros(0, dtype=torch.float32)


def check_sampled(logprobs: torch.Tensor | list[list[float]], where: str) -> None:
    """Once per sampling call (one host read, not one per token): the sampled tokens' log-probs are finite.  A NaN
    or infinite logit row, or a row with no allowed token, would otherwise go on as token 0 and reach the learner
    as a NaN loss; ``torch.multinomial`` refused such rows (see :func:`sample_tokens`)."""
    values = logprobs if torch.is_tensor(logprobs) else torch.tensor([v for row in logprobs for v in row])
    if values.numel() and not bool(torch.isfinite(values).all()):
        raise RuntimeError(f"{where}: a sampled token has a non-finite log-prob (its row of probabilities was NaN, "
                           f"infinite or all zero): the model's logits are broken")


def _masked(logits: torch.Tensor, drop: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
    if keep is not None:
        drop = drop.scatter(-1, keep.unsqueeze(-1), False)
    return logits.masked_fill(drop, float("-inf"))


def sample_tokens(logprobs: torch.Tensor, sp: SamplingParams,
                  generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample one token per row from ``[B, V]`` log-probs; returns (tokens ``[B]``, their log-probs ``[B]``).

    ``argmax(p / q)`` with ``q ~ Exp(1)`` is what ``torch.multinomial(p, 1)`` computes (the same draws from the
    same generator, so the same tokens), without the input checks it reads back to the host: two GPU syncs per
    token, about 1,700 a Janus task, each stalling the next step's kernel launches.  What those checks caught (a
    NaN row, or one with no allowed token) shows as a non-finite log-prob of the sampled token instead: a sampler
    calls :func:`check_sampled` once per call."""
    if sp.greedy or sp.temperature == 0:
        tokens = logprobs.argmax(dim=-1)
    else:
        probs = logprobs.exp()
        tokens = (probs / torch.empty_like(probs).exponential_(1, generator=generator)).argmax(dim=-1)
    return tokens, logprobs.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
