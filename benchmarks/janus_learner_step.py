"""Learner step on a Janus-shaped model in bf16 with fp32 master weights: shared-context forward vs one per row.

A Tree-RL reflect/refine group is ``--group`` siblings of one parent: the same prompt and parent image
(SigLIP features in the context), each with its own critique (text) and refined image (VQ tokens, CFG
on, so each refine row also has its null row).  The learner step (reference forward for the KL, policy
forward, clipped loss, backward, AdamW on the fp32 masters, rounding back into the bf16 weights) is
timed twice on the same batch:

* *shared*: what the learner does -- each distinct context runs once and its KV cache serves its
  siblings' targets (``JanusEngine._shared_context_hidden``);
* *per row*: one right-padded forward over every ``context + target`` row (the same engine with the
  sharing decision switched off), as a learner without tree knowledge would do.

Rounds interleave the two so machine load hits both alike; medians of ``--repeats`` rounds.  The model is
the tiny Janus config (``benchmarks/janus_sampling.py``'s) at the requested width and depth; ``--grid``
sets both the VQ grid and SigLIP's patches (Janus-Pro: 24, i.e. 576 tokens; CPU-sized default 8).

    python benchmarks/janus_learner_step.py [--hidden 256] [--layers 2] [--grid 8] [--contexts 2]
                                            [--group 4] [--text 16] [--backend torch] [--repeats 5] [--threads 1]
"""
from __future__ import annotations

import copy
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace
from unittest import mock

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions"))
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from r3_rl.arguments import OneLineArgumentParser, int_at_least  # noqa: E402
from r3_rl.config import Learner  # noqa: E402
from r3_rl.learner.batch import TrainItem  # noqa: E402
from r3_rl.learner.build import build_learner  # noqa: E402
from r3_rl.policy.janus import JanusPolicy  # noqa: E402
from r3_rl.policy.janus_engine import JanusEngine  # noqa: E402
from r3_rl.policy.janus_tiny import make_tiny_janus  # noqa: E402
from r3_rl.trajectory import SamplingParams, Segment  # noqa: E402

TEMPLATES = {"system": "", "reason": "{prompt}", "generate": "{prompt}", "generate_uncond": "",
             "reflect": "{prompt} How to further edit the image?", "refine": "{prompt} {instruction}"}
TEXT_SP = SamplingParams(temperature=0.9, top_p=0.9, max_new_tokens=16)
IMAGE_SP = SamplingParams(temperature=1.0, cfg_scale=5.0)


def make_items(policy: JanusPolicy, contexts: int, group: int, text_len: int, seed: int = 0) -> list[TrainItem]:
    """``contexts`` parents x ``group`` siblings of reflect (text) and refine (image, CFG) segments."""
    g = torch.Generator().manual_seed(seed)
    codebook = policy.model.config.vq_config.num_embeddings
    text_ids = policy.text_mask.nonzero().squeeze(-1)
    text_ids = text_ids[text_ids != policy.eos_id]
    items = []
    for c in range(contexts):
        parent = {"tokens": torch.randint(codebook, (policy.num_image_tokens,), generator=g).tolist()}
        prompt = f"a photo of {c + 2} red cubes"
        reflect_ids = policy._ids("reflect", {"prompt": prompt}, True, False)
        for j in range(group):
            critique = text_ids[torch.randint(len(text_ids), (text_len,), generator=g)].tolist()
            items.append(TrainItem(Segment("text", {"stage": "reflect", "input_ids": reflect_ids, "image": parent},
                                           critique, [0.0] * text_len, copy.copy(TEXT_SP)),
                                   float(j % 2) - 0.5, "reflect", 0))
            ids = policy._ids("refine", {"prompt": prompt, "instruction": f"make cube {j} blue"}, True, True)
            image = torch.randint(codebook, (policy.num_image_tokens,), generator=g).tolist()
            ctx = {"stage": "refine", "input_ids": ids, "image": parent, "uncond_ids": policy._null(ids)}
            items.append(TrainItem(Segment("image", ctx, image, [0.0] * len(image), copy.copy(IMAGE_SP)),
                                   0.5 - float(j % 2), "refine", 0))
    with torch.no_grad():  # behaviour log-probs = the current policy's: ratios start at 1, as in a real step
        for it, lp in zip(items, policy.segment_logprobs([it.segment for it in items])):
            it.segment.logprobs = lp.float().tolist()
    return items


def main() -> None:
    ap = OneLineArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", type=int_at_least(1), default=256, help="trunk width (Janus-Pro-1B: 2048)")
    ap.add_argument("--layers", type=int_at_least(1), default=2)
    ap.add_argument("--grid", type=int_at_least(1), default=8, help="grid x grid image tokens (Janus-Pro: 24)")
    ap.add_argument("--contexts", type=int_at_least(1), default=2, help="parent images (sibling groups) per batch")
    ap.add_argument("--group", type=int_at_least(1), default=4, help="siblings per parent")
    ap.add_argument("--text", type=int_at_least(1), default=16, help="critique tokens")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    ap.add_argument("--backend", default="torch", choices=["torch", "deepspeed"])
    ap.add_argument("--repeats", type=int_at_least(1), default=5)
    ap.add_argument("--threads", type=int_at_least(1), default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        path = make_tiny_janus(Path(tmp) / "janus", hidden_size=args.hidden, num_layers=args.layers, grid=args.grid)
        policy = JanusPolicy.from_pretrained(path, templates=TEMPLATES, dtype=args.dtype)
    items = make_items(policy, args.contexts, args.group, args.text)
    cfg = Learner(lr=1e-6, kl_coef_text=1e-3, kl_coef_image=1e-3, micro_batch_size=len(items), backend=args.backend,
                  deepspeed={"zero_stage": 1})
    learner = build_learner(policy, policy.frozen_copy(), SimpleNamespace(learner=cfg))

    def shared() -> None:
        learner.step(copy.deepcopy(items))

    def per_row() -> None:
        with mock.patch("r3_rl.policy.janus_engine.shared_context_rows", return_value=None):
            learner.step(copy.deepcopy(items))

    times: dict[str, list[float]] = {"shared": [], "per_row": []}
    real = JanusEngine._shared_context_hidden
    for fn, want in ((shared, True), (per_row, False)):  # warm-up, checking each takes the path it names
        calls: list[int] = []
        with mock.patch.object(JanusEngine, "_shared_context_hidden",
                               lambda self, *a: calls.append(1) or real(self, *a)):  # noqa: B023
            fn()
        if bool(calls) != want:
            sys.exit(f"{fn.__name__}: the shared-context forward was {'not ' if want else ''}taken")
    for _ in range(args.repeats):
        for name, fn in (("shared", shared), ("per_row", per_row)):
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    params = sum(p.numel() for p in policy.model.parameters())
    masters = getattr(getattr(learner.optim, "masters", None), "active", args.backend == "deepspeed")
    rows = len(items) + sum(1 for it in items if "uncond_ids" in it.segment.context)
    ctx_len = int(np.mean([len(it.segment.context["input_ids"]) for it in items]))
    print(f"Janus-shaped: width {args.hidden}, {args.layers} layers, {params / 1e6:.1f}M params, {args.dtype} weights"
          f"{', fp32 master weights' if masters else ''} ({args.backend}), {args.threads} threads")
    print(f"batch: {args.contexts} parents x {args.group} siblings x (reflect + refine with CFG) = {rows} rows; "
          f"context ~{ctx_len} tokens ({policy.num_image_tokens} image), targets {args.text} text / "
          f"{policy.num_image_tokens} image tokens")
    print(f"shared-context step : {med['shared'] * 1e3:9.1f} ms")
    print(f"one forward per row : {med['per_row'] * 1e3:9.1f} ms")
    print(f"ratio (shared / per row): {med['shared'] / med['per_row']:.2f}x")


if __name__ == "__main__":
    main()
