"""The first update's image ratios in bf16: the sampler's old log-probs against ``learner.old_logp: recompute``.

bf16 rounds a forward by its batch.  The sampler denoises a sibling group together; the learner rescores its images
in micro-batches of ``--micro-batch`` (the BAGEL recipe: 1).  With the sampler's numbers as the old log-probs the
first update -- at unchanged weights, where every ratio should be 1 -- sees ratios off 1 by the rounding, and
clips the images whose ratio leaves ``flow.clip_low`` (default 1e-4, Flow-GRPO's).  ``recompute`` takes the old
log-probs from the learner's own micro-batches (since 2026-12-06 for images too): the ratios are 1.

A random BAGEL-shaped model (``--hidden``, ``--layers``; BAGEL's heads of 128 and its MLP ratio) is saved in the
published layout and loaded through ``policy.kind: bagel`` in ``--dtype``; one group generates and one refines
(R3's settings), then one GRPO step runs per mode on the same weights.  Printed per mode: the flow ratio's min and
max, the fraction of image units clipped, the largest sampler-vs-learner log-prob gap.

    python benchmarks/flow_old_logp.py [--hidden 64] [--layers 1] [--group 4] [--micro-batch 1]
                                       [--dtype bfloat16|float32] [--threads 2]
"""
from __future__ import annotations

import copy
import sys
import tempfile
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
IMAGE = 32  # px: 4 latent tokens a side


def main() -> None:
    ap = OneLineArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--hidden", type=int_at_least(1), default=64)
    ap.add_argument("--layers", type=int_at_least(1), default=1)
    ap.add_argument("--group", type=int_at_least(2), default=4, help="siblings per group (R3: 16)")
    ap.add_argument("--micro-batch", type=int_at_least(1), default=1, help="learner.micro_batch_size")
    ap.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    ap.add_argument("--threads", type=int_at_least(1), default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        path = make_tiny_bagel(Path(tmp) / "bagel", seed=0, hidden_size=args.hidden, num_layers=args.layers,
                               num_heads=max(1, args.hidden // 128), num_kv_heads=max(1, args.hidden // 128 // 7),
                               intermediate_size=max(64, round(args.hidden * 18944 / 3584 / 64) * 64))
        options = BagelOptions(image_size=IMAGE, vit_size=(32, 16, 4), vae_size=(IMAGE, 16, 16))
        policy = BagelPolicy.from_pretrained(path, templates=TEMPLATES, dtype=args.dtype, options=options)
    prompts = [PromptItem("p", "a red cube left of two blue cats")] * args.group
    gen = torch.Generator().manual_seed(0)
    image = SamplingParams(temperature=1.0, cfg_scale=4.0)
    images = policy.generate(prompts, [None] * args.group, image, gen)
    edits = policy.refine(prompts, [ImageInput(images[0].image)] * args.group, ["make the cube blue"] * args.group,
                          image, gen)
    items = [TrainItem(s.segment, 1.0 if k % 2 == 0 else -1.0, stage, 0)
             for stage, samples in (("generate", images), ("refine", edits)) for k, s in enumerate(samples)]
    print(f"BAGEL-shaped policy: hidden {args.hidden}, layers {args.layers}, {args.dtype}; {args.group} siblings a "
          f"group, learner micro-batch {args.micro_batch}, flow.clip_low {Learner().flow.clip_low:g}; "
          f"{len(items)} images, {torch.get_num_threads()} threads")
    for mode in ("sampler", "recompute"):
        cfg = Learner(micro_batch_size=args.micro_batch, kl_coef_text=0.0, kl_coef_image=0.0, old_logp=mode)
        twin = policy.with_model(copy.deepcopy(policy.model))
        m = TorchLearner(twin, None, cfg).step(copy.deepcopy(items))
        gap = m.get("learner/sampler_flow_logp_gap_max")
        ratios = f"{m['learner/flow_ratio_min']:.6f} .. {m['learner/flow_ratio_max']:.6f}"
        print(f"  old_logp {mode:9s}  flow ratio {ratios}  clipped {m['learner/flow_clip_frac']:.3f}"
              + (f"  sampler gap max {gap:.2e}" if gap is not None else ""))


if __name__ == "__main__":
    main()
