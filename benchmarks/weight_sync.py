"""Weight sync to rollout workers through Ray's object store: packed numpy bytes (ours) against torch tensors.

What :meth:`r3_rl.rollout.ray_engine.RayEngine.sync` moves after a learner step: the driver puts the policy's
state once, every worker loads it into its own copy of the model.  Two ways of putting it are timed on a
Janus-shaped bf16 model (embedding, ``--layers`` decoder layers of width ``--width`` with an MLP of
``--intermediate``, a head over ``--vocab``):

* **ours**: :func:`r3_rl.ray_runtime.pack_state` (each tensor's bytes as a flat numpy array, which Ray stores
  and hands back as a view of its shared memory) and :func:`~r3_rl.ray_runtime.unpack_state` in the worker;
* **torch tensors** (r3-rl before 2026-12-06): the state dict of CPU tensors, pickled into private copies on
  both sides.

Printed for each: the put's time and the driver's private memory peak above its size before (``RssAnon``,
sampled every millisecond: the object store's shared pages are not counted), all workers' load time and the
largest private peak of a worker from before the weights arrive to the end of its load.  Last, the bytes a LoRA step sends (r 64 on the attention
projections, peft's fp32 adapters) against the full state: after a learner step only the trainable weights travel.

    python benchmarks/weight_sync.py [--width 2048] [--layers 2] [--intermediate 5632] [--vocab 102400]
                                     [--workers 2] [--repeats 3]
"""
from __future__ import annotations

import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from r3_rl.arguments import OneLineArgumentParser, int_at_least  # noqa: E402
from r3_rl.ray_runtime import pack_state, unpack_state  # noqa: E402


def private_mb() -> float:
    """Private (anonymous) resident memory of this process: shared object-store pages are not in it."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no RssAnon in /proc/self/status")


class PeakAbove:
    """The highest private memory while the block runs, in MB above the value at entry (sampled every ms)."""

    def __enter__(self) -> "PeakAbove":
        self.base = self.top = private_mb()
        self.running = True
        self.thread = threading.Thread(target=self._watch, daemon=True)
        self.thread.start()
        return self

    def _watch(self) -> None:
        while self.running:
            self.top = max(self.top, private_mb())
            time.sleep(0.001)

    def __exit__(self, *_: Any) -> None:
        self.running = False
        self.thread.join()
        self.top = max(self.top, private_mb())

    @property
    def mb(self) -> float:
        return self.top - self.base


def janus_shaped(width: int, layers: int, intermediate: int, vocab: int) -> torch.nn.Module:
    torch.manual_seed(0)
    model = torch.nn.Module()
    model.embed = torch.nn.Embedding(vocab, width)
    model.layers = torch.nn.ModuleList()
    for _ in range(layers):
        layer = torch.nn.Module()
        for name, (i, o) in {"q": (width, width), "k": (width, width), "v": (width, width), "o": (width, width),
                             "gate": (width, intermediate), "up": (width, intermediate),
                             "down": (intermediate, width)}.items():
            setattr(layer, name, torch.nn.Linear(i, o, bias=False))
        model.layers.append(layer)
    model.head = torch.nn.Linear(width, vocab, bias=False)
    return model.to(torch.bfloat16)


class Worker:
    """A rollout worker's side: its own copy of the model, loading what the driver put."""

    def __init__(self, shape: tuple[int, int, int, int]) -> None:
        torch.set_num_threads(1)
        self.model = janus_shaped(*shape)

    def settle(self) -> None:
        """Private memory now, before the next load's argument arrives (Ray deserialises it before ``load``)."""
        import gc

        gc.collect()
        self.idle = private_mb()

    def load(self, state: Any, packed: bool) -> tuple[float, float]:
        t0 = time.perf_counter()
        with PeakAbove() as peak:
            self.model.load_state_dict(unpack_state(state) if packed else state)
        return time.perf_counter() - t0, peak.top - self.idle


def main() -> None:
    ap = OneLineArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--width", type=int_at_least(8), default=2048)
    ap.add_argument("--layers", type=int_at_least(1), default=2)
    ap.add_argument("--intermediate", type=int_at_least(8), default=5632)
    ap.add_argument("--vocab", type=int_at_least(8), default=102400)
    ap.add_argument("--workers", type=int_at_least(1), default=2)
    ap.add_argument("--repeats", type=int_at_least(1), default=3)
    args = ap.parse_args()
    import ray

    shape = (args.width, args.layers, args.intermediate, args.vocab)
    model = janus_shaped(*shape)
    nbytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    ray.init(num_cpus=args.workers, object_store_memory=max(2 ** 30, 4 * nbytes), include_dashboard=False,
             log_to_driver=False, configure_logging=False)
    workers = [ray.remote(num_cpus=1)(Worker).remote(shape) for _ in range(args.workers)]
    rows: dict[str, dict[str, list[float]]] = {}
    for _ in range(args.repeats):
        for name, packed in (("ours (numpy bytes)", True), ("torch tensors (before)", False)):
            with torch.no_grad():
                for p in model.parameters():
                    p.add_(1e-3)  # a learner step
            state = model.state_dict()
            t0 = time.perf_counter()
            with PeakAbove() as peak:
                ref = ray.put(pack_state(state) if packed else {k: v.detach().to("cpu") for k, v in state.items()})
            put_s = time.perf_counter() - t0
            ray.get([w.settle.remote() for w in workers])
            t0 = time.perf_counter()
            loads = ray.get([w.load.remote(ref, packed) for w in workers])
            row = rows.setdefault(name, {"put": [], "driver": [], "load": [], "worker": []})
            row["put"].append(put_s)
            row["driver"].append(peak.mb)
            row["load"].append(time.perf_counter() - t0)
            row["worker"].append(max(mb for _, mb in loads))
            del ref
    ray.shutdown()
    med = {name: {k: statistics.median(v) for k, v in row.items()} for name, row in rows.items()}
    ours, before = med["ours (numpy bytes)"], med["torch tensors (before)"]
    print(f"weight sync, {nbytes / 2 ** 20:.0f} MB of bf16 weights (width {args.width}, {args.layers} layers, "
          f"vocab {args.vocab}), {args.workers} workers, median of {args.repeats}")
    for name, m in med.items():
        print(f"  {name:24s} put {m['put']:6.2f} s, driver peak +{m['driver']:6.0f} MB; all loads {m['load']:6.2f} s, "
              f"worker peak +{m['worker']:6.0f} MB")
    print(f"  ours / before: put time {ours['put'] / before['put']:.2f}x, load time {ours['load'] / before['load']:.2f}x")
    lora = args.layers * 4 * 64 * 2 * args.width * 4  # r 64 on q, k, v, o: A (64 x w) and B (w x 64), peft's fp32
    print(f"  a LoRA step (r 64 on q, k, v, o; fp32 adapters) sends {lora / 2 ** 20:.1f} MB of {nbytes / 2 ** 20:.0f} MB "
          f"({nbytes / lora:.0f}x less than the full state)")


if __name__ == "__main__":
    main()
