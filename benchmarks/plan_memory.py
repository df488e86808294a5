"""``r3-rl plan``'s memory model against measurement, on CPU, for Janus-Pro-shaped models.

For each configuration (width x layers, gradient checkpointing on/off) a Janus-Pro-shaped policy (head dim 128,
MLP 2.75 x width, 16,384-entry codebook; float32, one thread) runs a GRPO learner step (torch backend, KL
reference, two micro-batches of refine-stage image segments with CFG) and image sampling with CFG; the peak is
measured with the torch profiler's memory events (``r3_rl.plan.measure``) and predicted by ``r3_rl.plan.memory``
from the same sizes.  Prints predicted / measured in total and above what existed before (weights, reference,
Adam state), and the error.  See ``r3_rl/plan/validate.py``.

    python benchmarks/plan_memory.py [--configs 1024x2:off,1024x4:on,2048x2:on,2048x2:off] [--sampling 2048x4]
                                     [--grid 8] [--micro-batch 2] [--sample-batch 4] [--dtype float32]
"""
from __future__ import annotations

import logging
import os
import sys
import warnings
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from r3_rl.arguments import OneLineArgumentParser, int_at_least  # noqa: E402
from r3_rl.plan.validate import Check, run  # noqa: E402

# each width, each depth and both checkpointing settings appear; 2048 x 4 only samples (its float32 learner
# states would take > 4 GB of this machine's shared memory)
LEARNER = "1024x2:off,1024x4:on,2048x2:on,2048x2:off"
SAMPLING = "1024x2,2048x4"


def row(c: Check) -> str:
    mode = "-" if c.what == "image sampling" else ("on" if c.checkpointing else "off")
    return (f"| {c.what} | {c.width} x {c.layers} | {mode} | {c.predicted / 1e6:.0f} / {c.measured / 1e6:.0f} MB "
            f"({c.error:+.1%}) | {c.predicted_growth / 1e6:.0f} / {c.measured_growth / 1e6:.0f} MB "
            f"({c.growth_error:+.1%}) |")


def main() -> None:
    ap = OneLineArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--configs", default=LEARNER, help="learner steps: WIDTHxLAYERS:on|off, comma-separated")
    ap.add_argument("--sampling", default=SAMPLING, help="image sampling: WIDTHxLAYERS, comma-separated")
    ap.add_argument("--grid", type=int_at_least(1), default=8, help="image is grid x grid tokens (Janus-Pro: 24)")
    ap.add_argument("--micro-batch", type=int_at_least(1), default=2)
    ap.add_argument("--sample-batch", type=int_at_least(1), default=4)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                    help="policy dtype of the learner steps (bfloat16: fp32 master weights and Adam state)")
    a = ap.parse_args()
    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)
    print(f"Janus-Pro-shaped, learner {a.dtype} (sampling float32), CPU, 1 thread, {a.grid * a.grid} tokens per "
          f"image, CFG; peak measured with the torch profiler's memory events")
    print("| workload | width x layers | checkpointing | total: predicted / measured | above weights+states: "
          "predicted / measured |")
    print("|---|---|---|---|---|")
    for spec in filter(None, a.configs.split(",")):
        size, ckpt = spec.split(":")
        w, layers = map(int, size.split("x"))
        for c in run(w, layers, ckpt == "on", sampling=False, grid=a.grid, micro_batch=a.micro_batch, dtype=a.dtype):
            print(row(c), flush=True)
    for spec in filter(None, a.sampling.split(",")):
        w, layers = map(int, spec.split("x"))
        for c in run(w, layers, None, sampling=True, grid=a.grid, sample_batch=a.sample_batch):
            print(row(c), flush=True)


if __name__ == "__main__":
    main()
