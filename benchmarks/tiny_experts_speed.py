"""What ``policy.tiny.experts: modality`` costs in time against the shared tiny model, measured in the same run.

Both models have the demo's shape (or ``--hidden-size``'s); each samples plans and images for ``--prompts``
prompts, then runs the training forward + backward over those segments (three times, the mean printed).  The
two kinds alternate ``--repeats`` times and the last round is printed, so a warm-up does not count against
either.  Printed: seconds for each, and modality / shared.

    python benchmarks/tiny_experts_speed.py [--prompts 64] [--hidden-size 128] [--threads 1]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from r3_rl.arguments import OneLineArgumentParser, int_at_least  # noqa: E402
from r3_rl.config import Templates  # noqa: E402
from r3_rl.policy.tiny import TinyUnifiedPolicy  # noqa: E402
from r3_rl.trajectory import PromptItem, SamplingParams  # noqa: E402


def measure(experts: str, args: argparse.Namespace) -> tuple[float, float]:
    """(seconds to sample plans and images, seconds of one training forward + backward over them)."""
    policy = TinyUnifiedPolicy.build(Templates().model_dump(), rows=4, cols=4, hidden_size=args.hidden_size,
                                     num_layers=4, num_heads=4, intermediate_size=2 * args.hidden_size, seed=0,
                                     experts=experts)
    prompts = [PromptItem(str(i), "a photo of a red square and a blue circle") for i in range(args.prompts)]
    g = torch.Generator().manual_seed(0)
    t0 = time.perf_counter()
    plans = policy.reason(prompts, SamplingParams(temperature=1.0, max_new_tokens=16), g)
    images = policy.generate(prompts, [p.text for p in plans], SamplingParams(temperature=1.0), g)
    t1 = time.perf_counter()
    segments = [s.segment for s in (*plans, *images)]
    for _ in range(3):
        policy.model.zero_grad()
        sum(lp.sum() for lp in policy.segment_logprobs(segments)).backward()
    return t1 - t0, (time.perf_counter() - t1) / 3


def main() -> None:
    ap = OneLineArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int_at_least(1), default=64)
    ap.add_argument("--hidden-size", type=int_at_least(1), default=128)
    ap.add_argument("--threads", type=int_at_least(1), default=1)
    ap.add_argument("--repeats", type=int_at_least(1), default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    last: dict[str, tuple[float, float]] = {}
    for _ in range(args.repeats):
        for experts in ("shared", "modality"):
            last[experts] = measure(experts, args)
    for experts, (sample, train) in last.items():
        print(f"{experts:>8}: sample {sample:.2f} s, training forward + backward {train:.2f} s")
    (s0, t0), (s1, t1) = last["shared"], last["modality"]
    print(f"modality / shared: sampling {s1 / s0:.2f}x, training {t1 / t0:.2f}x "
          f"({args.prompts} prompts, hidden size {args.hidden_size}, {args.threads} thread(s))")


if __name__ == "__main__":
    main()
