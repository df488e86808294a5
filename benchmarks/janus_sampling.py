"""Image-token sampling throughput: our Janus loop vs transformers' ``generate(generation_mode="image")``.

Same random Janus (built with :func:`r3_rl.policy.janus_tiny.make_tiny_janus`, saved and loaded back), same
prompts (equal length, so neither side pads), same batch, CFG on.  Prints image tokens/s of both and the
ratio, checks that both pick the same tokens when sampling greedily, and compares peak memory (torch
profiler memory events, above the weights).  The bound: the same decoding's bare matrix multiplications
(every layer's projections and MLP, the generation head and the generation aligner, prefill included, at
the same shapes, on the model's own weights) timed alone, divided by our time: what is left is attention
over the KV cache, element-wise work and Python.

    python benchmarks/janus_sampling.py [--batch 8] [--grid 4] [--hidden 64] [--layers 2] [--cfg 5]
                                        [--repeats 15] [--threads 1]

``--grid 24`` gives Janus-Pro's 576 tokens per image; ``--hidden 2048`` Janus-Pro-1B's width (from 1024 up
the trunk has Janus-Pro's proportions: head dim 128, MLP 2.75 x width, a 16,384-entry codebook).
"""
from __future__ import annotations

import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from r3_rl.arguments import OneLineArgumentParser, int_at_least, non_negative_float  # noqa: E402
from r3_rl.plan.measure import measured_peak  # noqa: E402
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


def bare_gemms(policy: JanusPolicy, batch: int, context: int, cfg: bool) -> tuple[int, float]:
    """One image's worth of the decoding's matrix multiplications, alone: returns (calls, seconds)."""
    model = policy.model
    lm = model.model.language_model
    rows = batch * (2 if cfg else 1)
    weights = [w for layer in lm.layers for w in (layer.self_attn.q_proj.weight, layer.self_attn.k_proj.weight,
               layer.self_attn.v_proj.weight, layer.self_attn.o_proj.weight, layer.mlp.gate_proj.weight,
               layer.mlp.up_proj.weight, layer.mlp.down_proj.weight)]
    aligner = model.model.generation_aligner
    head = model.model.generation_head
    steps = policy.num_image_tokens
    inputs = {tuple(w.shape): torch.randn(rows, w.shape[1]) for w in (*weights, aligner.fc1.weight,
                                                                        *[m.weight for m in aligner.hidden_layers
                                                                          if hasattr(m, "weight")],
                                                                        head.proj_out.weight, head.vision_head.weight)}
    prefill = {tuple(w.shape): torch.randn(rows * context, w.shape[1]) for w in weights}
    per_step = weights + [aligner.fc1.weight] + [m.weight for m in aligner.hidden_layers if hasattr(m, "weight")]
    calls = 0
    t0 = time.perf_counter()
    for w in weights:  # prefill
        torch.nn.functional.linear(prefill[tuple(w.shape)], w)
    for t in range(steps):
        torch.nn.functional.linear(torch.nn.functional.linear(inputs[tuple(head.proj_out.weight.shape)],
                                                              head.proj_out.weight), head.vision_head.weight)
        calls += 2
        if t < steps - 1:
            for w in per_step:
                torch.nn.functional.linear(inputs[tuple(w.shape)], w)
            calls += len(per_step)
    return calls + len(weights), time.perf_counter() - t0


def timed(fns: list, repeats: int) -> list[list[float]]:
    """Wall times of each function, ``repeats`` runs; runs are interleaved so machine load hits all alike."""
    times: list[list[float]] = [[] for _ in fns]
    for fn in fns:
        fn()  # warm-up
    for _ in range(repeats):
        for k, fn in enumerate(fns):
            t0 = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t0)
    return times


def main() -> None:
    ap = OneLineArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int_at_least(1), default=8)
    ap.add_argument("--grid", type=int_at_least(1), default=4, help="image is grid x grid VQ tokens (tiny default 4)")
    ap.add_argument("--hidden", type=int_at_least(1), default=64, help="trunk width (tiny default 64)")
    ap.add_argument("--layers", type=int_at_least(1), default=2, help="trunk depth (tiny default 2)")
    ap.add_argument("--cfg", type=non_negative_float, default=5.0)
    ap.add_argument("--repeats", type=int_at_least(1), default=15)
    ap.add_argument("--threads", type=int_at_least(1), default=1)
    ap.add_argument("--seed", type=int_at_least(0), default=0)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    shape = {}
    if args.hidden >= 1024:  # Janus-Pro's proportions (head dim 128, as many KV heads, MLP 2.75 x, VQ-16 codebook)
        heads = args.hidden // 128
        shape = {"heads": heads, "kv_heads": heads, "intermediate": args.hidden * 11 // 4, "codebook": 16384}
    with tempfile.TemporaryDirectory() as tmp:
        path = make_tiny_janus(Path(tmp) / "tiny_janus", grid=args.grid, hidden_size=args.hidden,
                               num_layers=args.layers, **shape)
        policy = JanusPolicy.from_pretrained(path, templates=TEMPLATES)
    items = prompts(args.batch)
    n_tokens = args.batch * policy.num_image_tokens

    greedy = SamplingParams(greedy=True, temperature=1.0, cfg_scale=args.cfg)
    a, b = ours(policy, items, greedy, args.seed), theirs(policy, items, greedy, args.seed)
    same = bool(torch.equal(a, b))

    sp = SamplingParams(temperature=1.0, top_k=0, top_p=1.0, cfg_scale=args.cfg)
    _, peak_ours = measured_peak(lambda: ours(policy, items, sp, args.seed))
    _, peak_hf = measured_peak(lambda: theirs(policy, items, sp, args.seed))
    context = len(policy._ids("generate", {"prompt": items[0].prompt, "plan": ""}, False, True))
    runs = timed([lambda: ours(policy, items, sp, args.seed), lambda: theirs(policy, items, sp, args.seed),
                  lambda: bare_gemms(policy, args.batch, context, args.cfg != 1.0)], args.repeats)
    t_ours, t_hf, t_gemm = (statistics.median(t) for t in runs)
    b_ours, b_hf, b_gemm = (min(t) for t in runs)  # the least disturbed run of each, on a shared machine
    lm = policy.model.config.text_config
    print(f"Janus: {sum(p.numel() for p in policy.model.parameters()) / 1e6:.2f}M params (width {lm.hidden_size}, "
          f"{lm.num_hidden_layers} layers, {lm.num_attention_heads} heads, MLP {lm.intermediate_size}), "
          f"{policy.num_image_tokens} tokens/image, batch {args.batch}, CFG {args.cfg}, {args.threads} threads")
    print(f"ours          : {n_tokens / t_ours:10.1f} image tokens/s ({t_ours * 1e3:.1f} ms/batch)")
    print(f"transformers  : {n_tokens / t_hf:10.1f} image tokens/s ({t_hf * 1e3:.1f} ms/batch)")
    print(f"ratio (ours / transformers): {t_hf / t_ours:.2f}x median of {args.repeats}, {b_hf / b_ours:.2f}x fastest runs")
    print(f"greedy tokens equal: {same}")
    print(f"peak memory above the weights: ours {peak_ours / 1e6:.1f} MB, transformers {peak_hf / 1e6:.1f} MB "
          f"(ours / theirs {peak_ours / peak_hf:.2f})")
    print(f"bare GEMMs of the same decoding: {t_gemm * 1e3:.1f} ms; bound / ours = {t_gemm / t_ours:.2f} median, "
          f"{b_gemm / b_ours:.2f} fastest runs (goal >= 0.8)")
    if not same:
        sys.exit(1)


if __name__ == "__main__":
    main()
