"""A logged step's trajectory dump written on the training loop (r3-rl before 2026-12-06) against handed to the
trainer's background writer (:class:`r3_rl.tracking.background.BackgroundWriter`), in one run.

The dump is ``--trees`` trees of ``--images`` images each (``log.dump_trees`` is 64: a step of 32 prompts
in groups of 8, say), ``--size`` px photo-like images (smooth colour plus noise: a 1024 px one is about 2 MB of
PNG, as a 1024 px BAGEL image).  Printed: how long the loop is blocked each way, and the wall time of "dump, then a step's work"
against the two overlapped, where the step's work is ``--work`` seconds of one-thread torch matmuls (a GPU step
mostly waits on the device, which leaves the CPU to the writer; this is the CPU-only stand-in; by default as long
as the dump took on the loop, so the best the overlap can do is 0.5x, on a machine with a core to spare).

    python benchmarks/dump_writes.py [--trees 64] [--images 8] [--size 1024] [--work SECONDS]
"""
from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from r3_rl.arguments import OneLineArgumentParser, float_up_to, int_at_least  # noqa: E402


def photo_like(size: int, seed: int) -> Any:
    """A ``size`` px RGB image of smooth colour and noise (about 2 MB of PNG at 1024 px, as a photo)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    x = np.linspace(0, 6 + seed % 5, size)
    base = 127 + 60 * np.sin(x)[None, :, None] + 60 * np.cos(1.3 * x)[:, None, None]
    return (base + rng.normal(0, 8, (size, size, 3))).clip(0, 255).astype(np.uint8)


def make_trees(trees: int, images: int, size: int) -> list[Any]:
    from r3_rl.trajectory import Node, PromptItem, Tree

    out = []
    for t in range(trees):
        tree = Tree(id=f"t{t}", prompt=PromptItem(id=f"p{t}", prompt="a photo of a cat", metadata={"tag": "single"}))
        tree.add(Node(id="plan", parent=None, stage="reason", round=0, group_id="g0", policy_version=0, text="plan"))
        for i in range(images):
            tree.add(Node(id=f"img{i}", parent="plan", stage="generate", round=0, group_id="g1", policy_version=0,
                          image=photo_like(size, t * images + i), reward=0.5))
        out.append(tree)
    return out


def busy(seconds: float) -> None:
    import torch

    a = torch.randn(512, 512)
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        a = torch.tanh(a @ a)


def main(argv: list[str] | None = None) -> None:
    ap = OneLineArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trees", type=int_at_least(1), default=64)
    ap.add_argument("--images", type=int_at_least(1), default=8)
    ap.add_argument("--size", type=int_at_least(8), default=1024)
    ap.add_argument("--work", type=float_up_to(86400), default=None, help="seconds of the stand-in step's work (default: as long "
                    "as the dump took on the loop)")
    args = ap.parse_args(argv)

    import torch

    from r3_rl.tracking.background import BackgroundWriter
    from r3_rl.trajectory import write_trees

    torch.set_num_threads(1)
    trees = make_trees(args.trees, args.images, args.size)
    print(f"dump: {args.trees} trees x {args.images} images of {args.size} px")
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        write_trees(trees, Path(tmp) / "sync" / "step.jsonl")
        sync_block = time.perf_counter() - t0
        work = sync_block if args.work is None else args.work
        print(f"stand-in step: {work:.1f} s")
        busy(work)
        sync_wall = time.perf_counter() - t0

        writer = BackgroundWriter()
        t0 = time.perf_counter()
        writer.submit("step.jsonl", write_trees, trees, Path(tmp) / "bg" / "step.jsonl")
        bg_block = time.perf_counter() - t0
        busy(work)
        writer.close()
        bg_wall = time.perf_counter() - t0
    print(f"loop blocked by the dump: on the loop {sync_block:.2f} s, background {bg_block:.4f} s")
    print(f"dump + step wall: on the loop {sync_wall:.1f} s, background {bg_wall:.1f} s "
          f"({bg_wall / sync_wall:.2f}x)")


if __name__ == "__main__":
    main()
