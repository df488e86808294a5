"""Text actions of BAGEL (reason, reflect): sampling a ``<|im_start|> ... <|im_end|>`` block after a context, and
recomputing its tokens' log-probs for the learner.

Sampling encodes the context once into a cache, then appends one token per row per step.  The learner runs the
context and the whole sampled block in one forward (teacher forcing).  Both turn the logits into the sampled
distribution with :func:`r3_rl.policy.sampling.sampling_logprobs` (temperature, top-k, top-p, and the same
allowed-token mask), so the ratio is 1 before the first update.  The actions are the tokens after
``<|im_start|>``, ``<|im_end|>`` included when it was sampled (a block cut at ``max_new_tokens`` is closed with an
``<|im_end|>`` that is context, not an action).
"""
from __future__ import annotations

from typing import Sequence

import torch

from r3_rl.policy.bagel.layout import Block, ContextCache, TextBlock
from r3_rl.policy.bagel.model import BagelModel
from r3_rl.policy.sampling import check_sampled, sample_tokens, sampling_logprobs
from r3_rl.trajectory import SamplingParams


def text_vocabulary(model: BagelModel, tokenizer) -> torch.Tensor:
    """[V] bool: what a text action may be -- the tokenizer's ids (the embedding has spare rows past them) minus
    ``<|im_start|>`` and the two image markers, which only the policy itself places."""
    vocab = model.language_model.lm_head.out_features
    allowed = torch.arange(vocab) < len(tokenizer)
    tok = model.config.tokens
    allowed[[tok.im_start, tok.vision_start, tok.vision_end]] = False
    return allowed.to(model.device)


@torch.no_grad()
def sample_text(model: BagelModel, cache: ContextCache, sp: SamplingParams, allowed: torch.Tensor,
                generator: torch.Generator | None) -> tuple[list[list[int]], list[list[float]]]:
    """Per row of ``cache``: the sampled token ids (after ``<|im_start|>``) and their log-probs."""
    tok = model.config.tokens
    n = cache.batch_size
    ids: list[list[int]] = [[] for _ in range(n)]
    logps: list[list[float]] = [[] for _ in range(n)]
    done = [False] * n
    logits, cache = model.next_token_logits(cache, [[TextBlock([tok.im_start])] for _ in range(n)])
    for _ in range(sp.max_new_tokens):
        lp = sampling_logprobs(logits, sp, allowed)
        chosen, chosen_lp = sample_tokens(lp.cpu(), sp, generator)
        for r in range(n):
            if not done[r]:
                ids[r].append(int(chosen[r]))
                logps[r].append(float(chosen_lp[r]))
                done[r] = int(chosen[r]) == tok.im_end
        if all(done):
            break
        nxt = [[TextBlock([tok.im_end if done[r] else int(chosen[r])])] for r in range(n)]
        logits, cache = model.next_token_logits(cache, nxt)
    check_sampled(logps, "BAGEL text sampling")
    return ids, logps


def closed_block(ids: Sequence[int], tokens) -> list[int]:
    """The full text block of a sampled answer: ``<|im_start|>`` + ids (+ ``<|im_end|>`` if it was cut)."""
    ids = [int(i) for i in ids]
    return [tokens.im_start, *ids] + ([] if ids and ids[-1] == tokens.im_end else [tokens.im_end])


def text_logprobs(model: BagelModel, contexts: Sequence[Sequence[Block]], token_ids: Sequence[Sequence[int]],
                  samplings: Sequence[SamplingParams], allowed: torch.Tensor, isolate: bool = False
                  ) -> list[torch.Tensor]:
    """Differentiable log-probs [n_i] of each row's sampled ids after its context (one padded forward); with
    ``isolate`` they train the understanding expert only (a context's VAE latents reach no generation weight)."""
    tok = model.config.tokens
    rows = [[*ctx, TextBlock([tok.im_start, *ids])] for ctx, ids in zip(contexts, token_ids)]
    out = model(rows, grad_expert="und" if isolate else None)
    result = []
    for r, (ids, sp) in enumerate(zip(token_ids, samplings)):
        if not ids:
            result.append(out.hidden.new_zeros(0, dtype=torch.float32))
            continue
        span = out.layout.spans[r][-1]
        logits = model.logits(out.hidden[r, span.start:span.start + len(ids)])  # position j predicts ids[j]
        target = torch.tensor(ids, device=logits.device)
        lp = sampling_logprobs(logits, sp, allowed, keep=target)
        result.append(lp.gather(-1, target[:, None]).squeeze(-1))
    return result
