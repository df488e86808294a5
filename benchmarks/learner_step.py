"""Learner step time: our GRPO learner (DeepSpeed ZeRO-2 on CPU, and plain torch) vs TRL's ``GRPOTrainer``.

Same tiny text-only task on both sides: the ``tiny_blocks`` policy shape (a Llama built from a config,
saved once, loaded by each side with ``from_pretrained``), the same ``prompts x group`` completions of the
same fixed length, the same loss (token-mean clipped surrogate, TRL ``bnpo`` / our ``token_mean``, k3 KL
with beta 1e-3), AdamW, grad clipping 1.0, one optimiser step over the whole batch in one micro-batch.

A *learner step* is what each side does per rollout batch once the completions exist: reference log-probs,
policy forward, loss, backward, clipping, optimiser step.  TRL's is its own code, called the way its
``training_step`` calls it: ``_get_per_token_logps_and_entropies(ref_model, ...)`` (done in TRL's
generation phase, so added here), ``compute_loss`` and ``accelerator.backward``, then the optimiser
``create_optimizer`` builds.  Generation is excluded on both sides.  Rounds interleave the three learners
so machine load hits them alike; the median of ``--repeats`` rounds is reported.

Two layouts of the same batch are measured.  *Siblings* is GRPO's: each prompt's ``group`` completions
share the prompt, and our tiny policy runs each distinct context once and shares its KV cache among
the siblings (TRL runs every row in full).  *Distinct* gives every completion its own prompt, so
nothing is shared and our learner runs one forward over full rows like TRL.  The goal is for the
sibling layout, the one GRPO and Tree-RL train on.

    python benchmarks/learner_step.py [--prompts 8] [--group 8] [--length 16] [--hidden 128] [--layers 4]
                                      [--repeats 10] [--threads 2]
"""
from __future__ import annotations

import argparse
import logging
import os
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions"))
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from r3_rl.arguments import OneLineArgumentParser, int_at_least  # noqa: E402
from r3_rl.config import Learner, Templates  # noqa: E402
from r3_rl.learner.batch import TrainItem  # noqa: E402
from r3_rl.learner.build import build_learner  # noqa: E402
from r3_rl.policy.tiny import TinyUnifiedPolicy  # noqa: E402
from r3_rl.trajectory import SamplingParams, Segment  # noqa: E402

BETA, LR, CLIP = 1e-3, 1e-6, 0.2  # a tiny lr keeps the ratio near 1 over the repeats, like a real first epoch


NUMBERS = ["one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"]
COLOURS = ["red", "blue", "green", "yellow", "purple", "orange"]
SHAPES = ["squares", "circles", "triangles"]


def prompt_text(i: int) -> str:
    """The ``i``-th of 180 distinct prompts, all of the same length."""
    return f"a photo of {NUMBERS[i % 10]} {COLOURS[i // 10 % 6]} {SHAPES[i // 60 % 3]}"


def make_items(policy: TinyUnifiedPolicy, prompts: int, group: int, length: int, distinct: bool = False,
               seed: int = 0) -> list[TrainItem]:
    """``prompts x group`` completions of exactly ``length`` text tokens with their behaviour log-probs.

    Siblings share their prompt unless ``distinct``, where every completion has a prompt of its own."""
    gen = torch.Generator().manual_seed(seed)
    allowed = policy.text_mask.nonzero().squeeze(-1)
    allowed = allowed[allowed != policy.stop_id]
    sp = SamplingParams(temperature=1.0, max_new_tokens=length)
    segs = []
    for i in range(prompts):
        for j in range(group):
            ctx = policy.render("reason", prompt=prompt_text(i * group + j if distinct else i))
            toks = allowed[torch.randint(len(allowed), (length,), generator=gen)].tolist()
            segs.append(Segment(modality="text", context={"input_ids": ctx}, token_ids=toks, logprobs=[], sampling=sp))
    with torch.no_grad():
        for s, lp in zip(segs, policy.segment_logprobs(segs)):
            s.logprobs = lp.tolist()
    adv = torch.randn(len(segs), generator=gen)
    return [TrainItem(s, float(a), "reason", 0) for s, a in zip(segs, adv)]


def ours(path: str, items: list[TrainItem], backend: str) -> Callable[[], None]:
    policy = TinyUnifiedPolicy.from_pretrained(path, Templates().model_dump())
    cfg = Learner(backend=backend, lr=LR, clip_low=CLIP, clip_high=CLIP, loss_type="token_mean", kl_coef_text=BETA,
                  kl_coef_image=BETA, kl_kind="k3", micro_batch_size=len(items), grad_clip=1.0,
                  deepspeed={"zero_stage": 2, "dtype": "fp32"})
    learner = build_learner(policy, policy.frozen_copy(), SimpleNamespace(learner=cfg))

    def step() -> None:
        m = learner.step(items)
        assert m.get("learner/optimizer_steps") == 1.0, m
    return step


def trl(path: str, items: list[TrainItem], group: int, length: int, out: str) -> Callable[[], None]:
    from datasets import Dataset
    from transformers import PreTrainedTokenizerFast
    from trl import GRPOConfig, GRPOTrainer

    tok = PreTrainedTokenizerFast.from_pretrained(path)
    args = GRPOConfig(output_dir=out, per_device_train_batch_size=len(items), num_generations=group,
                      max_completion_length=length, beta=BETA, epsilon=CLIP, loss_type="bnpo", learning_rate=LR,
                      max_grad_norm=1.0, optim="adamw_torch", use_cpu=True, bf16=False, report_to=[],
                      save_strategy="no", logging_steps=10 ** 9, temperature=1.0)
    data = Dataset.from_dict({"prompt": ["a photo of a red square"] * len(items)})
    trainer = GRPOTrainer(model=path, reward_funcs=lambda completions, **kw: [0.0] * len(completions), args=args,
                          train_dataset=data, processing_class=tok)
    trainer.current_gradient_accumulation_steps = 1  # set by Trainer's training loop; one micro-batch here
    model = trainer.model
    model.train()
    optimizer = trainer.create_optimizer()
    width = max(len(it.segment.context["input_ids"]) for it in items)
    prompt_ids = torch.full((len(items), width), tok.pad_token_id, dtype=torch.long)
    prompt_mask = torch.zeros((len(items), width), dtype=torch.long)
    for i, it in enumerate(items):  # TRL left-pads prompts
        ctx = it.segment.context["input_ids"]
        prompt_ids[i, width - len(ctx):] = torch.tensor(ctx)
        prompt_mask[i, width - len(ctx):] = 1
    completion_ids = torch.tensor([it.segment.token_ids for it in items])
    inputs: dict[str, Any] = {"prompt_ids": prompt_ids, "prompt_mask": prompt_mask, "completion_ids": completion_ids,
                              "completion_mask": torch.ones_like(completion_ids),
                              "advantages": torch.tensor([it.advantage for it in items])}
    input_ids = torch.cat([prompt_ids, completion_ids], 1)
    attention = torch.cat([prompt_mask, inputs["completion_mask"]], 1)

    def step() -> None:
        with torch.no_grad():
            ref, _, _ = trainer._get_per_token_logps_and_entropies(trainer.ref_model, input_ids, attention, length)
        loss = trainer.compute_loss(model, {**inputs, "ref_per_token_logps": ref})
        trainer.accelerator.backward(loss)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return step


def measure(path: str, items: list[TrainItem], a: argparse.Namespace, tmp: str) -> dict[str, list[float]]:
    """Seconds per learner step of TRL, ours on torch and ours on DeepSpeed, interleaved round by round."""
    steps = {"TRL GRPOTrainer": trl(path, items, a.group, a.length, tmp),
             "ours, torch AdamW": ours(path, items, "torch"),
             "ours, DeepSpeed ZeRO-2": ours(path, items, "deepspeed")}
    times: dict[str, list[float]] = {k: [] for k in steps}
    for r in range(a.warmup + a.repeats):
        for name, fn in steps.items():
            t0 = time.perf_counter()
            fn()
            if r >= a.warmup:
                times[name].append(time.perf_counter() - t0)
    return times


def report(title: str, times: dict[str, list[float]], goal: bool) -> None:
    med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
    print(title)
    for k, v in med.items():
        print(f"  {k:24s} {v:8.1f} ms   (min {min(times[k]) * 1e3:.1f}, max {max(times[k]) * 1e3:.1f})")
    print(f"  ours (DeepSpeed ZeRO-2) / TRL      = {med['ours, DeepSpeed ZeRO-2'] / med['TRL GRPOTrainer']:.2f}x"
          + ("  (goal <= 1.0x)" if goal else ""))
    print(f"  DeepSpeed ZeRO-2 / plain torch step = "
          f"{med['ours, DeepSpeed ZeRO-2'] / med['ours, torch AdamW']:.2f}x" + ("  (goal <= 1.2x)" if goal else ""))


def main() -> None:
    ap = OneLineArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int_at_least(1), default=8)
    ap.add_argument("--group", type=int_at_least(1), default=8)
    ap.add_argument("--length", type=int_at_least(1), default=16)
    ap.add_argument("--hidden", type=int_at_least(1), default=128)
    ap.add_argument("--layers", type=int_at_least(1), default=4)
    ap.add_argument("--repeats", type=int_at_least(1), default=10)
    ap.add_argument("--warmup", type=int_at_least(0), default=2)
    ap.add_argument("--threads", type=int_at_least(1), default=2)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)
    with tempfile.TemporaryDirectory() as tmp:
        policy = TinyUnifiedPolicy.build(Templates().model_dump(), rows=4, cols=4, hidden_size=a.hidden,
                                         num_layers=a.layers, num_heads=4, intermediate_size=2 * a.hidden,
                                         max_positions=160)
        policy.save_pretrained(tmp + "/model")
        siblings = measure(tmp + "/model", make_items(policy, a.prompts, a.group, a.length), a, tmp + "/trl")
        distinct = measure(tmp + "/model", make_items(policy, a.prompts, a.group, a.length, distinct=True), a,
                           tmp + "/trl_distinct")
    n = a.prompts * a.group
    print(f"learner step, {n} completions ({a.prompts} prompts x {a.group}) of {a.length} tokens, tiny Llama "
          f"hidden {a.hidden} x {a.layers} layers, {a.threads} threads, CPU; median of {a.repeats}:")
    report(f"siblings share their prompt (GRPO groups of {a.group}):", siblings, goal=True)
    report("every completion has its own prompt (nothing to share):", distinct, goal=False)


if __name__ == "__main__":
    main()
