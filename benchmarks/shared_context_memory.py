"""Peak memory of the learner's shared-context forward + backward: each row's context gathered inside its
layer (now) against gathered up front for every layer (until 2026-12-06), in the same run.

Tree-RL siblings share their context (prompt + parent image + critique), so the learner runs it once and gives
every row that context's keys/values (:meth:`r3_rl.policy.kv_cache.ReplayCache.select`).  Gathered up front,
each layer's per-row copy lived for the whole forward and, under gradient checkpointing, until backward (the
checkpoint keeps the cache for its recompute).  A Janus-Pro-shaped policy (head dim 64, MLP 2.75 x width,
float32 on CPU, one thread) scores a refine group of ``--siblings`` images with CFG and backpropagates; the
torch profiler's memory events give the peak above the weights (``r3_rl.plan.measure``).  Log-probs and
gradients are checked bit-identical between the two.

    python benchmarks/shared_context_memory.py [--width 1024] [--layers 4] [--grid 16] [--siblings 8]
                                               [--checkpointing on|off]
"""
from __future__ import annotations

import logging
import os
import sys
import tempfile
import warnings
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from r3_rl.arguments import OneLineArgumentParser, int_at_least  # noqa: E402
from r3_rl.policy.kv_cache import ReplayCache  # noqa: E402

TEMPLATES = {"system": "", "reason": "{prompt}", "generate": "{prompt}", "generate_uncond": "", "reflect": "{prompt}",
             "refine": "{prompt}. Edit: {instruction}"}


def gathered_up_front(self: ReplayCache, rows: torch.Tensor) -> ReplayCache:
    """The selection as it was until 2026-12-06: every layer's per-row copy made here, held by the new cache."""
    past = [(layer.keys.index_select(0, rows), layer.values.index_select(0, rows)) for layer in self.layers]
    return ReplayCache(len(self.layers), past)


def main() -> None:
    ap = OneLineArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--width", type=int_at_least(64), default=1024)
    ap.add_argument("--layers", type=int_at_least(1), default=4)
    ap.add_argument("--grid", type=int_at_least(2), default=16, help="image tokens per side (Janus-Pro: 24)")
    ap.add_argument("--siblings", type=int_at_least(2), default=8)
    ap.add_argument("--checkpointing", choices=["on", "off"], default="on")
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    logging.getLogger("transformers").setLevel(logging.ERROR)
    torch.set_num_threads(1)  # the profiler sees the calling thread's allocations only

    from r3_rl.plan.measure import measured_peak
    from r3_rl.policy.base import ImageInput
    from r3_rl.policy.janus import JanusPolicy
    from r3_rl.policy.janus_tiny import make_tiny_janus
    from r3_rl.policy.kv_cache import enable_gradient_checkpointing
    from r3_rl.trajectory import PromptItem, SamplingParams

    heads = max(1, args.width // 64)
    with tempfile.TemporaryDirectory() as tmp:
        path = make_tiny_janus(Path(tmp) / "janus", hidden_size=args.width, num_layers=args.layers, grid=args.grid,
                               heads=heads, kv_heads=heads, intermediate=int(2.75 * args.width))
        policy = JanusPolicy.from_pretrained(path, templates=TEMPLATES)
    if args.checkpointing == "on":
        enable_gradient_checkpointing(policy.model)
    sp = SamplingParams(temperature=1.0, top_k=50, cfg_scale=4.0)
    g = torch.Generator().manual_seed(0)
    prompts = [PromptItem("0", "a red cube and two dogs")] * args.siblings
    with torch.no_grad():
        first = policy.generate(prompts[:1], [None], sp, g)[0]
        parents = [ImageInput(first.image, first.image_tokens)] * args.siblings
        segs = [s.segment for s in policy.refine(prompts, parents, ["make the cube blue"] * args.siblings, sp, g)]
    context = len(segs[0].context["input_ids"])

    def step() -> list[torch.Tensor]:
        policy.model.zero_grad(set_to_none=True)
        lps = policy.segment_logprobs(segs)
        sum(lp.sum() for lp in lps).backward()
        return [lp.detach() for lp in lps]

    results = {}
    for name in ("up front", "in the layer"):
        original = ReplayCache.select
        if name == "up front":
            ReplayCache.select = gathered_up_front  # type: ignore[method-assign]
        try:
            step()  # warm-up: lazily built buffers are not part of the step's peak
            logprobs, peak = measured_peak(step)
        finally:
            ReplayCache.select = original  # type: ignore[method-assign]
        grads = [p.grad.clone() for p in policy.model.parameters() if p.grad is not None]
        results[name] = (peak, logprobs, grads)
    (old, lp_old, g_old), (new, lp_new, g_new) = results["up front"], results["in the layer"]
    same = all(torch.equal(a, b) for a, b in zip(lp_old, lp_new)) and all(torch.equal(a, b) for a, b in zip(g_old, g_new))
    rows = 2 * args.siblings  # CFG: a conditional and an unconditional row per sibling
    copies = rows * args.layers * 2 * context * args.width * 4  # every layer's per-row keys and values, float32
    print(f"width {args.width} x {args.layers} layers, {args.siblings} siblings x 2 CFG rows, context {context} "
          f"positions, {len(segs[0].token_ids)} image tokens each, checkpointing {args.checkpointing}")
    print(f"per-row context copies, all layers: {copies / 1e6:.0f} MB")
    print(f"peak above weights: gathered up front {old / 1e6:.0f} MB, in the layer {new / 1e6:.0f} MB "
          f"({new / old:.2f}x, {(old - new) / 1e6:.0f} MB less); log-probs and gradients "
          f"{'bit-identical' if same else 'DIFFER'}")
    if not same:
        sys.exit(1)


if __name__ == "__main__":
    main()
