"""Image-token sampling throughput: our Janus loop vs transformers' ``generate(generation_mode="image")``.

Same tiny random Janus (built with :func:`r3_rl.policy.janus_tiny.make_tiny_janus`, saved and loaded
back), same prompts (equal length, so neither side pads), same batch, CFG on.  Prints image tokens/s
of both and the ratio, and checks that both pick the same tokens when sampling greedily.

    python benchmarks/janus_sampling.py [--batch 8] [--grid 4] [--hidden 64] [--layers 2] [--cfg 5]
                                        [--repeats 15] [--threads 1]

``--grid 24`` gives Janus-Pro's 576 tokens per image (still on the tiny trunk).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from r3_rl.policy.janus import JanusPolicy  # noqa: E402
from r3_rl.policy.janus_tiny import make_tiny_janus  # noqa: E402
from r3_rl.trajectory import PromptItem, SamplingParams  # noqa: E402

TEMPLATES = {"system": "", "reason": "{prompt}", "generate": "{prompt}", "generate_uncond": "",
             "reflect": "{prompt}", "refine": "{prompt} {instruction}"}


def prompts(batch: int) -> list[PromptItem]:
    """Equal-length prompts (3-letter/4-letter words are swapped at fixed slots)."""
    out = []
    for i in range(batch):
        colour = ["red", "tan", "sky", "ink"][i % 4]
        thing = ["cube", "ball", "tree", "bird"][(i // 4) % 4]
        out.append(PromptItem(id=str(i), prompt=f"a photo of a {colour} {thing}"))
    return out


def ours(policy: JanusPolicy, items: list[PromptItem], sp: SamplingParams, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    ctx = [policy._ids("generate", {"prompt": p.prompt, "plan": ""}, False, True) for p in items]
    null = [policy._null(c) for c in ctx] if sp.cfg_scale != 1.0 else None
    toks, _ = policy.engine.sample(ctx, [None] * len(ctx), "image", sp, policy.num_image_tokens, g, null_ids=null)
    return torch.tensor(toks)


def theirs(policy: JanusPolicy, items: list[PromptItem], sp: SamplingParams, seed: int) -> torch.Tensor:
    ctx = [policy._ids("generate", {"prompt": p.prompt, "plan": ""}, False, True) for p in items]
    ids = torch.tensor(ctx)
    torch.manual_seed(seed)
    kw = {"do_sample": False} if sp.greedy else {"do_sample": True, "temperature": sp.temperature,
                                                  "top_k": sp.top_k or None, "top_p": sp.top_p}
    return policy.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), generation_mode="image",
                                 guidance_scale=sp.cfg_scale, **kw)


def timed(fns: list, repeats: int) -> list[float]:
    """Median wall time of each function; runs are interleaved so machine load hits both alike."""
    times: list[list[float]] = [[] for _ in fns]
    for fn in fns:
        fn()  # warm-up
    for _ in range(repeats):
        for k, fn in enumerate(fns):
            t0 = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t0)
    return [statistics.median(t) for t in times]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--grid", type=int, default=4, help="image is grid x grid VQ tokens (tiny default 4)")
    ap.add_argument("--hidden", type=int, default=64, help="trunk width (tiny default 64)")
    ap.add_argument("--layers", type=int, default=2, help="trunk depth (tiny default 2)")
    ap.add_argument("--cfg", type=float, default=5.0)
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        path = make_tiny_janus(Path(tmp) / "tiny_janus", grid=args.grid, hidden_size=args.hidden,
                               num_layers=args.layers)
        policy = JanusPolicy.from_pretrained(path, templates=TEMPLATES)
    items = prompts(args.batch)
    n_tokens = args.batch * policy.num_image_tokens

    greedy = SamplingParams(greedy=True, temperature=1.0, cfg_scale=args.cfg)
    a, b = ours(policy, items, greedy, args.seed), theirs(policy, items, greedy, args.seed)
    same = bool(torch.equal(a, b))

    sp = SamplingParams(temperature=1.0, top_k=0, top_p=1.0, cfg_scale=args.cfg)
    t_ours, t_hf = timed([lambda: ours(policy, items, sp, args.seed), lambda: theirs(policy, items, sp, args.seed)],
                         args.repeats)
    print(f"tiny Janus: {sum(p.numel() for p in policy.model.parameters()) / 1e6:.2f}M params, "
          f"{policy.num_image_tokens} tokens/image, batch {args.batch}, CFG {args.cfg}, {args.threads} threads")
    print(f"ours          : {n_tokens / t_ours:10.1f} image tokens/s ({t_ours * 1e3:.1f} ms/batch)")
    print(f"transformers  : {n_tokens / t_hf:10.1f} image tokens/s ({t_hf * 1e3:.1f} ms/batch)")
    print(f"ratio (ours / transformers): {t_hf / t_ours:.2f}x")
    print(f"greedy tokens equal: {same}")
    if not same:
        sys.exit(1)


if __name__ == "__main__":
    main()
