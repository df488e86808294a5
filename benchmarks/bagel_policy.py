"""Step times of the BAGEL policy (``policy.kind: bagel``) on a random BAGEL-shaped model the CPU can hold.

A random BAGEL (both experts, heads of 128, 7 query heads per KV head where the width allows, BAGEL's MLP ratio, 16
latent channels in 2x2 patches, 16 px per generation token) is saved in the published layout and loaded through
``policy.kind: bagel``; then, with R3's settings (16 grid points for generation, 21 for edits, one SDE step per
image, text-CFG 4.0 on (0.4, 1], image-CFG 1.5 for edits):

* image sampling: ``generate`` of one sibling group (conditional + text-unconditional rows per denoising step) and
  ``refine`` of one group (three CFG rows: VAE+ViT+instruction, VAE+ViT, instruction) -- seconds per group, per
  denoising step, and latent tokens denoised per second (rows x tokens x steps / time);
* the learner: one GRPO step (``TorchLearner``: recompute every action's log-prob with CFG, the frozen reference's,
  backward, AdamW; a bf16 policy steps through fp32 master weights) on the group's text and image segments, and on
  its image segments alone;
* expert isolation (``policy.options.expert_isolation``): the image segments' log-probs forward + backward with
  isolation on (the default: the understanding expert runs without gradient) and off (BAGEL's joint gradient) --
  seconds, and the bytes autograd keeps for backward (distinct storages saved by the forward's operations).

Scaled down from BAGEL-7B-MoT: width and layer count (``--hidden``, ``--layers``), the vocabulary (a byte-level
tokenizer: 262 ids instead of 152,064) and the VAE (32 channels per level instead of 128-512) and the ViT (4 px
patches, 32 px inputs); kept: the MoT routing, the block layout, the flow sampler and the losses.

    python benchmarks/bagel_policy.py [--hidden 2048] [--layers 1] [--image 128] [--group 2] [--context 48]
                                      [--dtype float32|bfloat16] [--threads 2] [--repeats 3]
"""
from __future__ import annotations

import copy
import dataclasses
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from r3_rl.arguments import OneLineArgumentParser, int_at_least  # noqa: E402
from r3_rl.config import Learner  # noqa: E402
from r3_rl.learner.batch import TrainItem  # noqa: E402
from r3_rl.learner.torch_learner import TorchLearner  # noqa: E402
from r3_rl.policy.bagel.policy import BagelPolicy  # noqa: E402
from r3_rl.policy.bagel.recipe import BagelOptions  # noqa: E402
from r3_rl.policy.bagel.tiny import make_tiny_bagel  # noqa: E402
from r3_rl.policy.base import ImageInput  # noqa: E402
from r3_rl.trajectory import PromptItem, SamplingParams  # noqa: E402

TEMPLATES = {"system": "You should first think about the planning process in the mind and then generate the image.",
             "reason": "{prompt}", "refine": "{instruction}",
             "reflect": "The description of the target image is: {prompt}\nHow to further edit the provided image?"}


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def saved_for_backward(fn):
    """``fn()``'s result and the bytes of the distinct storages autograd saved for backward while it ran."""
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        st = t.untyped_storage()
        storages[st.data_ptr()] = st.nbytes()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, sum(storages.values())


def isolation_figures(policy: BagelPolicy, segments: list) -> None:
    """Image log-probs forward + backward, and what autograd keeps, with expert isolation on and off."""
    rows = {}
    for on in (True, False):
        variant = copy.copy(policy)
        variant.options = dataclasses.replace(policy.options, expert_isolation=on)
        policy.model.zero_grad(set_to_none=True)
        start = time.perf_counter()
        lps, saved = saved_for_backward(lambda: variant.segment_logprobs(segments))
        sum(lp.sum() for lp in lps).backward()
        rows[on] = (time.perf_counter() - start, saved, [lp.detach() for lp in lps])
    policy.model.zero_grad(set_to_none=True)
    same = all(torch.equal(a, b) for a, b in zip(rows[True][2], rows[False][2]))
    (t_on, b_on, _), (t_off, b_off, _) = rows[True], rows[False]
    print(f"  expert isolation, image log-probs forward + backward ({len(segments)} segments): on {t_on:.2f} s, "
          f"off {t_off:.2f} s ({t_on / t_off:.2f}x); saved for backward: on {b_on / 2**20:.1f} MiB, off "
          f"{b_off / 2**20:.1f} MiB ({b_on / b_off:.2f}x); log-probs identical: {same}")


def main() -> None:
    ap = OneLineArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--hidden", type=int_at_least(1), default=2048)
    ap.add_argument("--layers", type=int_at_least(1), default=1)
    ap.add_argument("--image", type=int_at_least(1), default=128, help="generated image side in px (16 px per latent token)")
    ap.add_argument("--group", type=int_at_least(1), default=2, help="siblings per group (R3: 16)")
    ap.add_argument("--context", type=int_at_least(1), default=48, help="approximate plan length in tokens")
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    ap.add_argument("--threads", type=int_at_least(1), default=2)
    ap.add_argument("--repeats", type=int_at_least(1), default=3, help="learner steps timed per kind (the median is printed)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    load = os.getloadavg()
    side = args.image // 16
    with tempfile.TemporaryDirectory() as tmp:
        path = make_tiny_bagel(Path(tmp) / "bagel", seed=0, hidden_size=args.hidden, num_layers=args.layers,
                               num_heads=max(1, args.hidden // 128), num_kv_heads=max(1, args.hidden // 128 // 7),
                               intermediate_size=max(64, round(args.hidden * 18944 / 3584 / 64) * 64),
                               max_latent_size=max(8, side))
        options = BagelOptions(image_size=args.image, vit_size=(32, 16, 4), vae_size=(args.image, 16, 16))
        policy = BagelPolicy.from_pretrained(path, templates=TEMPLATES, dtype=args.dtype, options=options)
    cfg = policy.model.config.llm
    params = sum(p.numel() for p in policy.model.parameters())
    print(f"BAGEL-shaped policy: hidden {args.hidden}, layers {args.layers}, heads {cfg.num_attention_heads}/"
          f"{cfg.num_key_value_heads} kv, MLP {cfg.intermediate_size}, {params / 1e6:.0f} M params (both experts), "
          f"{args.dtype}; image {args.image} px = {side * side} latent tokens; group of {args.group}; "
          f"{torch.get_num_threads()} threads")
    prompts = [PromptItem("p", "a photo of a red cube left of two blue cats")] * args.group
    gen = torch.Generator().manual_seed(0)
    text = SamplingParams(temperature=0.9, top_p=0.9, max_new_tokens=args.context)
    image = SamplingParams(temperature=1.0, cfg_scale=4.0)
    plans, t_reason = timed(lambda: policy.reason(prompts, text, gen))
    images, t_gen = timed(lambda: policy.generate(prompts, [p.text for p in plans], image, gen))
    inputs = [ImageInput(images[0].image)] * args.group
    edits, t_edit = timed(lambda: policy.refine(prompts, inputs, ["make the cube blue"] * args.group, image, gen))
    tokens = side * side
    for name, took, points, rows in (("generate", t_gen, options.gen_steps, 2), ("refine", t_edit,
                                                                                options.edit_steps, 3)):
        steps = points - 1
        print(f"  sampling {name:8s} {took:7.2f} s per group = {took / steps:6.3f} s per denoising step "
              f"({steps} steps, {rows} CFG rows x {args.group} images): "
              f"{rows * args.group * tokens * steps / took:8.0f} latent tokens/s")
    print(f"  (reason: {t_reason:.2f} s for {args.group} plans of <= {args.context} tokens)")

    learner_cfg = Learner(lr=1e-5, micro_batch_size=2 * args.group, kl_coef_text=1e-3, kl_coef_image=1e-3,
                          loss_weight_image=2.0)
    reference = policy.frozen_copy()
    learner = TorchLearner(policy, reference, learner_cfg)
    adv = [1.0 if k % 2 == 0 else -1.0 for k in range(args.group)]
    both = [TrainItem(s.segment, a, stage, 0) for stage, samples in (("reason", plans), ("generate", images),
                                                                     ("refine", edits))
            for s, a in zip(samples, adv)]
    only_images = [it for it in both if it.segment.modality == "image"]
    only_text = [it for it in both if it.segment.modality == "text"]
    learner.step(copy.deepcopy(both))  # warm-up (optimiser state allocated)
    for name, items in (("text + image segments", both), ("text segments", only_text),
                        ("image segments", only_images)):
        times = sorted(timed(lambda: learner.step(copy.deepcopy(items)))[1] for _ in range(args.repeats))
        actions = sum(it.segment.num_actions for it in items)
        print(f"  learner GRPO step, {name:22s}: {statistics.median(times):7.2f} s median, {times[0]:7.2f} s fastest "
              f"({len(items)} segments, {actions} actions, reference KL included)")
    isolation_figures(policy, [it.segment for it in only_images])
    print(f"load average (1 min) at start {load[0]:.1f}, at end {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores "
          f"(a shared machine: other processes' load slows every figure)")


if __name__ == "__main__":
    main()
