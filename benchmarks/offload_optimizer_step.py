"""The optimiser step under DeepSpeed's ``offload_optimizer: {device: cpu}``: ours against DeepSpeedCPUAdam.

With the offload (the BAGEL recipe's learner) every update runs on the CPU over the rank's fp32 partition:
for BAGEL-7B on 4 ranks 3.5 B elements a step.  Three optimisers are handed to the same driver
(:class:`r3_rl.learner.deepspeed_learner.DeepSpeedOptim`, bf16, ZeRO-2 unless ``--stage``):

* **ours**: what the driver builds under the offload -- torch's fused AdamW (no compiled op);
* **torch AdamW loop**: the same torch AdamW with its default per-tensor implementation (the driver's
  optimiser before 2026-12-06);
* **DeepSpeedCPUAdam** (the peer, DeepSpeed's own recommendation for the offload): its compiled AVX
  op, JIT-built on first use (about 40 s, cached in ``TORCH_EXTENSIONS_DIR``); ``--no-peer`` leaves it out.

Each is timed over ``engine.step()`` (gradient copy to the CPU partition, the update, the copy back into
the bf16 weights), median of ``--repeats`` steps after one warm-up step, the variants interleaved so
machine load hits them alike.  The extra peak memory of a step is the process's high-water mark
(``VmHWM``, reset through ``/proc/self/clear_refs``) above its size before the step.  The model is a
stack of ``--width`` x ``--width`` bf16 linear layers of about ``--elements`` weights in all.

    python benchmarks/offload_optimizer_step.py [--elements 1e8] [--width 2048] [--stage 2] [--threads 2]
                                                [--repeats 5] [--no-peer]
"""
from __future__ import annotations

import gc
import os
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Callable

os.environ.setdefault("DS_ACCELERATOR", "cpu")
REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions"))
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

import r3_rl.learner.deepspeed_learner as ds_driver  # noqa: E402
from r3_rl.arguments import OneLineArgumentParser, int_at_least, int_between, positive_float  # noqa: E402
from r3_rl.config import Learner  # noqa: E402


def _status_kb(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise KeyError(key)


def extra_peak_mb(fn: Callable[[], Any]) -> float:
    """MB the process's resident high-water mark rises above its current size while ``fn`` runs (Linux)."""
    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current VmRSS
    before = _status_kb("VmRSS")
    fn()
    return max(0, _status_kb("VmHWM") - before) / 1024


def torch_loop(params: list, cfg: Any, lrs: Any = None, **_: Any) -> torch.optim.AdamW:
    return torch.optim.AdamW(params, lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay,
                             foreach=False)


def deepspeed_cpu_adam(params: list, cfg: Any, lrs: Any = None, **_: Any) -> torch.optim.Optimizer:
    from deepspeed.ops.adam import DeepSpeedCPUAdam

    return DeepSpeedCPUAdam(params, lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay,
                            adamw_mode=True)


class Variant:
    """One optimiser in the driver: a bf16 layer stack, its engine, and a way to make gradients."""

    def __init__(self, name: str, make: Callable | None, elements: int, width: int, stage: int) -> None:
        self.name = name
        layers = max(1, round(elements / (width * width)))
        torch.manual_seed(0)
        self.model = torch.nn.Sequential(*[torch.nn.Linear(width, width, bias=False) for _ in range(layers)])
        self.model.to(torch.bfloat16)
        self.elements = layers * width * width
        cfg = Learner(lr=1e-6, micro_batch_size=4, warmup_steps=0, grad_clip=1.0, backend="deepspeed",
                      deepspeed={"zero_stage": stage, "dtype": "bf16",
                                 "config": {"zero_optimization": {"offload_optimizer": {"device": "cpu"}}}})
        original = ds_driver.make_adamw
        if make is not None:
            ds_driver.make_adamw = make
        try:
            self.opt = ds_driver.DeepSpeedOptim({"policy": self.model}, cfg)
        finally:
            ds_driver.make_adamw = original
        self.x = torch.randn(4, width).bfloat16()
        self.times: list[float] = []
        self.peaks: list[float] = []

    def run_step(self) -> None:
        loss = self.opt.forward(lambda: (self.model(self.x).float().pow(2).mean(), {}, []))[0]
        self.opt.backward(loss)
        t0 = time.perf_counter()
        self.peaks.append(extra_peak_mb(self.opt.step))
        self.times.append(time.perf_counter() - t0)


def main() -> None:
    ap = OneLineArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--elements", type=positive_float, default=1e8, help="trained weights in all (default 1e8)")
    ap.add_argument("--width", type=int_at_least(8), default=2048, help="layer width (Janus-Pro-7B: 4096)")
    ap.add_argument("--stage", type=int_between(1, 3), default=2, help="ZeRO stage (the BAGEL recipe: 2)")
    ap.add_argument("--threads", type=int_at_least(1), default=2)
    ap.add_argument("--repeats", type=int_at_least(1), default=5)
    ap.add_argument("--no-peer", action="store_true", help="leave DeepSpeedCPUAdam out (no op compile)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    elements = int(args.elements)
    choices: list[tuple[str, Callable | None]] = [("ours (torch fused AdamW)", None),
                                                 ("torch AdamW loop (before)", torch_loop)]
    if not args.no_peer:
        choices.append(("DeepSpeedCPUAdam (peer)", deepspeed_cpu_adam))
    variants = [Variant(name, make, elements, args.width, args.stage) for name, make in choices]
    for v in variants:  # warm-up (and the peer's op build)
        v.run_step()
        v.times.clear()
        v.peaks.clear()
    for _ in range(args.repeats):
        for v in variants:
            v.run_step()
    n = variants[0].elements
    print(f"offload_optimizer step, ZeRO-{args.stage} bf16, {n / 1e6:.0f} M trained weights "
          f"({args.width} wide), {args.threads} thread(s), median of {args.repeats}")
    ours = statistics.median(variants[0].times)
    for v in variants:
        t = statistics.median(v.times)
        print(f"  {v.name:28s} {t:7.3f} s  ({t / n * 1e8:.3f} s per 1e8 weights)  {t / ours:5.2f}x ours' time  "
              f"extra peak memory {statistics.median(v.peaks):7.0f} MB")


if __name__ == "__main__":
    main()
