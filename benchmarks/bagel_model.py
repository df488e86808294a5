"""BAGEL model step times at a width the machine holds, and BAGEL-7B-MoT's parameter table.

A random BAGEL-shaped model (r3_rl/policy/bagel; heads of 128, 7 query heads per KV head where the width allows,
BAGEL's MLP ratio, 16 latent channels in 2x2 patches, 16 px per generation token) is timed on what the R3 stages
do with it:

* velocity step: one denoising step of an image (``predict_velocity``) against a cached text context, with the
  conditional and text-unconditional (CFG) rows batched; reported per step and as latent tokens/s;
* velocity forward+backward: the learner's forward over [context, noised image] and the backward of a loss on its
  velocity (gradient checkpointing off);
* text prefill of the context and one cached decoding step (next-token logits).

The table at the end is BAGEL-7B-MoT's parameter count per component, from its published config (the model is built
on the meta device: no memory), next to the figure in the design notes.

With ``--load-check`` it also saves that model in the published layout and loads it with ``load_bagel`` in a fresh
process, printing the peak resident memory against the weight file's size (loading maps at most ``MAP_WINDOW``
bytes of the file at a time, so the peak should be about the model plus one window, not twice the model).

    python benchmarks/bagel_model.py [--hidden 512] [--layers 2] [--image 256] [--context 128] [--vocab 16384]
                                     [--dtype float32|bfloat16] [--repeats 5] [--threads 2] [--load-check]
"""
from __future__ import annotations

import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from r3_rl.arguments import OneLineArgumentParser, int_at_least  # noqa: E402
from r3_rl.policy.bagel import BagelModel, NoiseBlock, TextBlock, TokenIds, published_config  # noqa: E402
from r3_rl.policy.bagel.tiny import bagel_shaped_config  # noqa: E402

NOTES_TOTAL = 14_607_260_128  # /work/notes/bagel.md §6, counted by hand from the tensor shapes


def timed(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def step_times(args) -> None:
    tokens = TokenIds(im_start=1, im_end=2, vision_start=3, vision_end=4)
    side = args.image // 16
    config = bagel_shaped_config(args.hidden, args.layers, args.vocab, tokens, max_latent_size=max(side, 8))
    torch.manual_seed(0)
    dtype = getattr(torch, args.dtype)
    model = BagelModel(config).to(dtype).eval()
    n_params = sum(p.numel() for p in model.parameters())
    grid, d = (side, side), config.patch_latent_dim
    gen = torch.Generator().manual_seed(0)
    ctx = [[TextBlock([1] + torch.randint(5, args.vocab, (args.context - 2,), generator=gen).tolist() + [2])],
           [TextBlock([1, 5, 2])]]                     # conditional row, text-unconditional (CFG) row
    x = torch.randn(2, side * side, d, generator=gen)
    print(f"BAGEL-shaped model: hidden {args.hidden}, layers {args.layers}, heads {config.llm.num_attention_heads}"
          f"/{config.llm.num_key_value_heads} kv, MLP {config.llm.intermediate_size}, vocab {args.vocab}, "
          f"{args.dtype}, "
          f"{n_params / 1e6:.1f} M params; image {args.image} px = {side * side} latent tokens; "
          f"context {args.context} tokens; {torch.get_num_threads()} threads")
    with torch.no_grad():
        cache = model.extend_context(None, ctx)
        prefill = timed(lambda: model.extend_context(None, ctx), args.repeats)
        velocity = timed(lambda: model.predict_velocity(cache, x, torch.tensor([0.8, 0.8]), grid), args.repeats)
        one = cache.select([0])
        decode = timed(lambda: model.next_token_logits(one, [[TextBlock([7])]]), args.repeats)
    model.train()

    def learner() -> None:
        out = model([ctx[0] + [NoiseBlock(x[0], 0.8, grid)]])
        model.velocity(out.hidden[0, out.layout.spans[0][-1].inner]).pow(2).mean().backward()
        model.zero_grad(set_to_none=True)
    backward = timed(learner, args.repeats)
    rows = [("velocity step (cond + CFG row, cached context)", velocity,
             f"{2 * side * side / velocity:,.0f} latent tokens/s"),
            ("velocity forward+backward (learner, 1 row)", backward, ""),
            (f"text prefill ({args.context} + 3 tokens, 2 rows)", prefill, ""),
            ("text decode step (1 row, cached)", decode, f"{1 / decode:,.1f} tokens/s")]
    print(f"\n{'step':54s} {'median ms':>10s}")
    for name, secs, extra in rows:
        print(f"{name:54s} {secs * 1e3:10.2f}  {extra}")


# VmHWM, not ru_maxrss: a forked child inherits its parent's ru_maxrss, exec starts a fresh high-water mark
PEAK = "int(open('/proc/self/status').read().split('VmHWM:')[1].split()[0]) * 1024"
LOAD_SCRIPT = f"""
import sys, time, torch, diffusers
from r3_rl.policy.bagel import load_bagel
start = time.perf_counter()
load_bagel(sys.argv[1], dtype=torch.float32)
print(time.perf_counter() - start, {PEAK})
"""


def load_memory(args) -> None:
    from r3_rl.policy.bagel import save_bagel
    from r3_rl.policy.bagel.tiny import build_tiny_tokenizer, tiny_flux_vae

    tok = build_tiny_tokenizer()
    tokens = TokenIds(*(tok.convert_tokens_to_ids(t) for t in ("<|im_start|>", "<|im_end|>", "<|vision_start|>",
                                                              "<|vision_end|>")))
    with tempfile.TemporaryDirectory() as tmp:
        model = BagelModel(bagel_shaped_config(args.hidden, args.layers, args.vocab, tokens))
        save_bagel(tmp, model, tiny_flux_vae(), tok)
        del model
        size = os.path.getsize(f"{tmp}/ema.safetensors")
        base = subprocess.run([sys.executable, "-c", "import torch, diffusers, r3_rl.policy.bagel; "
                               f"print({PEAK})"], capture_output=True, text=True, check=True, cwd=REPO)
        run = subprocess.run([sys.executable, "-c", LOAD_SCRIPT, tmp], capture_output=True, text=True, check=True,
                             cwd=REPO)
        secs, peak = run.stdout.split()
        extra = int(peak) - int(base.stdout)
        print(f"\nload_bagel of a {size / 1e9:.2f} GB ema.safetensors (fp32): {float(secs):.1f} s, peak RSS "
              f"{int(peak) / 1e9:.2f} GB = imports {int(base.stdout) / 1e9:.2f} GB + {extra / 1e9:.2f} GB "
              f"({extra / size:.2f}x the file)")


def parameter_table() -> None:
    with torch.device("meta"):
        model = BagelModel(published_config())
    groups: dict[str, int] = {}

    def add(group: str, n: int) -> None:
        groups[group] = groups.get(group, 0) + n
    for name, t in model.state_dict().items():
        if name.startswith("language_model.model.layers."):
            add("decoder layers, generation expert (*_moe_gen)" if "_moe_gen" in name
                else "decoder layers, understanding expert", t.numel())
        elif name.startswith("language_model.model.embed_tokens"):
            add("embed_tokens", t.numel())
        elif name.startswith("language_model.lm_head"):
            add("lm_head", t.numel())
        elif name.startswith("language_model.model.norm"):
            add("final norms (norm, norm_moe_gen)", t.numel())
        else:
            add(name.split(".")[0] + (" (frozen table)" if name.endswith("pos_embed") else ""), t.numel())
    total = sum(groups.values())
    print(f"\nBAGEL-7B-MoT from its published config ({len(model.state_dict())} tensors):")
    for group, n in groups.items():
        print(f"  {group:48s} {n:>16,d}")
    print(f"  {'total (ema.safetensors)':48s} {total:>16,d}   = {total / 1e9:.2f} B, {2 * total / 1e9:.2f} GB in bf16")
    print(f"  {'design notes':48s} {NOTES_TOTAL:>16,d}   {'match' if total == NOTES_TOTAL else 'MISMATCH'}")


def main() -> None:
    parser = OneLineArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int_at_least(1), default=512)
    parser.add_argument("--layers", type=int_at_least(1), default=2)
    parser.add_argument("--image", type=int_at_least(1), default=256, help="square image side in px (16 px per latent token)")
    parser.add_argument("--context", type=int_at_least(1), default=128, help="text tokens in the conditional context")
    parser.add_argument("--vocab", type=int_at_least(1), default=16384)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--repeats", type=int_at_least(1), default=5)
    parser.add_argument("--threads", type=int_at_least(1), default=2)
    parser.add_argument("--load-check", action="store_true", help="also measure load_bagel's peak memory")
    args = parser.parse_args()
    if args.image % 16:
        parser.error("--image must be a multiple of 16 px")
    torch.set_num_threads(args.threads)
    step_times(args)
    if args.load_check:
        load_memory(args)
    parameter_table()


if __name__ == "__main__":
    main()
