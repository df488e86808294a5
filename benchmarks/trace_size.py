"""Bytes one recorded SDE step of a flow image takes in a denoising trace, now (version 2) against version 1.

A trace is what a flow image's segment carries through Ray, into the parent trees, the learner's batch and the
trajectory dumps (JSON, tensors as base64).  Version 1 kept ``x_t``, ``x_next`` and the behaviour mean in float32;
version 2 keeps ``x_t`` and ``x_next`` in the latent's own dtype (the learner recomputes the mean).  This samples
one image with one SDE step through :func:`r3_rl.flow.sample_flow` at the latent shape asked for -- by default a
512 px BAGEL image: (512 / 16)^2 = 1024 latent positions of 2 x 2 x 16 = 64 channels -- and prints the JSON size
of its trace in both formats (version 1 written as it was: the same step with float32 latents and a mean).

    python benchmarks/trace_size.py [--positions 1024] [--channels 64] [--dtype float32|bfloat16]
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from r3_rl.arguments import OneLineArgumentParser, int_at_least  # noqa: E402
from r3_rl.flow import EtaSchedule, FlowVelocity, Guidance, sample_flow, timestep_grid  # noqa: E402
from r3_rl.flow.codec import encode_tensor  # noqa: E402
from r3_rl.flow.transition import sde_gaussian  # noqa: E402


def main() -> None:
    ap = OneLineArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--positions", type=int_at_least(1), default=1024, help="latent positions of an image")
    ap.add_argument("--channels", type=int_at_least(1), default=64, help="channels per latent position")
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"), help="the latent's dtype")
    args = ap.parse_args()
    torch.manual_seed(0)
    x_T = torch.randn(1, args.positions, args.channels).to(getattr(torch, args.dtype))
    grid = timestep_grid(16)
    out = sample_flow(FlowVelocity(lambda x, t: -x.float()), x_T, grid=grid, sde_steps=[(2,)],
                      eta=EtaSchedule("r3", 0.7), guidance=Guidance(), noise_seeds=[1])
    trace = out.traces[0]
    step = trace.steps[0]
    mean, _ = sde_gaussian(step.x_t.float()[None], -step.x_t.float()[None], step.t, step.delta, step.eta)
    now = len(json.dumps(trace.to_dict()))
    v1_step = {**step.to_dict(), "x_t": encode_tensor(step.x_t.float()), "x_next": encode_tensor(step.x_next.float()),
               "mean": encode_tensor(mean[0].float())}
    before = len(json.dumps({**trace.to_dict(), "version": 1, "steps": [v1_step]}))
    print(f"one SDE step of a {args.positions} x {args.channels} {args.dtype} latent: version 2 {now / 1e6:.2f} MB, "
          f"version 1 {before / 1e6:.2f} MB ({now / before:.2f}x)")


if __name__ == "__main__":
    main()
