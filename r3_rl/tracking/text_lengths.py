"""Per-stage text lengths, and how many texts ran into their token limit (TRL logs ``completions/clipped_ratio``).

A plan or critique that used every one of its stage's ``rollout.<stage>.max_new_tokens`` was most likely cut off:
a critique cut inside ``<think>`` has no instruction after ``</think>`` and counts as "no further edit needed"
(as in the reference), so a rising ``rollout/at_token_limit/reflect`` means verdicts the critic never gave.  (A
text that ends exactly at the limit counts too: the segment does not say whether its last token was the end.)
"""
from __future__ import annotations

from collections import defaultdict

from r3_rl.trajectory import Tree


def text_length_metrics(trees: list[Tree]) -> dict[str, float]:
    """``rollout/text_tokens/<stage>`` (mean sampled tokens) and ``rollout/at_token_limit/<stage>`` (fraction of
    texts whose token count reached ``max_new_tokens``), for each text stage sampled in ``trees``."""
    lengths: dict[str, list[int]] = defaultdict(list)
    at_limit: dict[str, int] = defaultdict(int)
    for t in trees:
        for n in t.nodes.values():
            seg = n.segment
            if seg is None or seg.modality != "text" or not seg.token_ids:
                continue
            lengths[n.stage].append(len(seg.token_ids))
            at_limit[n.stage] += len(seg.token_ids) >= seg.sampling.max_new_tokens
    out: dict[str, float] = {}
    for stage, counts in sorted(lengths.items()):
        out[f"rollout/text_tokens/{stage}"] = sum(counts) / len(counts)
        out[f"rollout/at_token_limit/{stage}"] = at_limit[stage] / len(counts)
    return out
