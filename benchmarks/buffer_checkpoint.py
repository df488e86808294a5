"""Tree-RL parent buffer checkpoint at the real recipe's size: ``tree.buffer_size: 2048`` Janus images (384x384).

Fills both pools (correct and flawed: 4,096 parents) with 576-token images, then times the checkpoint write and
read and prints the file size, the buffer's memory and the checkpoint's peak (tracemalloc), against the
issue's limits (10 s, 200 MB).  The pixels are rebuilt from the tokens by a stand-in VQ decoder.

    python benchmarks/buffer_checkpoint.py [--size 2048]
"""
from __future__ import annotations

import random
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from r3_rl.arguments import OneLineArgumentParser, int_at_least  # noqa: E402
from r3_rl.rollout.buffer import BufferEntry, ParentBuffer  # noqa: E402
from r3_rl.trajectory import PromptItem  # noqa: E402

PALETTE = np.random.default_rng(0).integers(0, 256, size=(16384, 3), dtype=np.uint8)


def decode(tokens: list[int]) -> np.ndarray:
    grid = PALETTE[np.asarray(tokens).reshape(24, 1, 24, 1)]
    return np.ascontiguousarray(np.broadcast_to(grid, (24, 16, 24, 16, 3))).reshape(384, 384, 3)


def main() -> None:
    ap = OneLineArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int_at_least(1), default=2048, help="tree.buffer_size (each pool holds this many)")
    a = ap.parse_args()
    rng = np.random.default_rng(0)
    buf = ParentBuffer(a.size, decode=decode)
    tracemalloc.start()
    for i in range(2 * a.size):
        tokens = rng.integers(0, 16384, 576).tolist()
        buf.add(BufferEntry(PromptItem(str(i), f"a photo of {i} cats", {"tag": "counting"}), decode(tokens), tokens,
                            reward=float(i % 2), correct=i % 2 == 0, round=i % 3, source=f"t{i}/g0"))
    held = tracemalloc.get_traced_memory()[0]
    tracemalloc.reset_peak()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "buffer.safetensors"
        t0 = time.perf_counter()
        buf.save(path)
        t_save = time.perf_counter() - t0
        peak = tracemalloc.get_traced_memory()[1] - held
        tracemalloc.stop()
        t0 = time.perf_counter()
        back = ParentBuffer(1, decode=decode)
        back.load(path)
        t_load = time.perf_counter() - t0
        size = path.stat().st_size
    same = all(np.array_equal(x.image, y.image) for x, y in zip(buf.sample(16, 0.15, random.Random(1)),
                                                                 back.sample(16, 0.15, random.Random(1))))
    print(f"{len(buf)} parents (buffer_size {a.size}, both pools full), 384x384 images of 576 tokens")
    print(f"held in memory : {held / 1e6:7.1f} MB   (pixels would be {len(buf) * 384 * 384 * 3 / 1e9:.1f} GB)")
    print(f"checkpoint     : {t_save:7.2f} s write, {t_load:.2f} s read, {size / 1e6:.1f} MB file, "
          f"{peak / 1e6:.1f} MB peak while writing (limits: 10 s, 200 MB)")
    print(f"drawn parents identical after reload: {same}")


if __name__ == "__main__":
    main()
