"""When the training forward should run each distinct context once (Tree-RL siblings share contexts).

Siblings in a Tree-RL group have the same context -- the prompt, or the parent image and critique --
so a policy can run each distinct context once, copy its KV cache to the sibling rows and feed only
their targets.  That costs a second model call, so it pays only when contexts repeat and fewer tokens
go through the model.  Both policies (:mod:`r3_rl.policy.tiny`, :mod:`r3_rl.policy.janus_engine`)
decide with :func:`shared_context_rows`; the forwards themselves stay with each model.
"""
from __future__ import annotations

from typing import Hashable, Sequence


def shared_context_rows(keys: Sequence[Hashable], context_lens: Sequence[int], target_lens: Sequence[int],
                        full_row_lens: Sequence[int]) -> list[int] | None:
    """Each row's index among the distinct contexts, or None when one forward over full rows is cheaper.

    ``keys[i]`` identifies row i's context; ``full_row_lens[i]`` is the row's length in the full-row
    forward.  The shared forward runs every distinct context padded to the longest, then every row's
    targets but the last (the context's last position predicts the first).
    """
    distinct: dict[Hashable, int] = {}
    row_of = [distinct.setdefault(k, len(distinct)) for k in keys]
    if len(distinct) == len(row_of):
        return None
    shared_tokens = len(distinct) * max(context_lens) + len(row_of) * (max(target_lens) - 1)
    full_tokens = len(row_of) * max(full_row_lens)
    return row_of if shared_tokens < full_tokens else None


def first_rows(row_of: Sequence[int]) -> list[int]:
    """One row per distinct context (its first), in the order of the distinct indices."""
    first: dict[int, int] = {}
    for i, d in enumerate(row_of):
        first.setdefault(d, i)
    return list(first.values())
