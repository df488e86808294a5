"""The memory plan checked against measurement, on CPU, for Janus-Pro-shaped models.

A Janus-Pro-shaped policy (head dim 128, as many KV heads as heads, MLP 2.75 x width, a 16,384-entry
codebook) of a given width and depth, float32 on CPU with one thread, runs

* a GRPO learner step (torch backend, AdamW; bf16 weights step through fp32 masters; KL reference): two
  micro-batches of refine-stage image
  segments with CFG, contexts all distinct (one full-row forward: the plan's worst case); the peak of the
  second step (Adam state exists, and the second micro-batch runs on the first one's gradients);
* image sampling with CFG (a batch of prompts, a whole image each).

Measured: the torch profiler's memory events (:func:`r3_rl.plan.measure.measured_peak`) over the step,
plus the bytes of the weights that existed before.  Predicted: :mod:`r3_rl.plan.memory` from the model's
shape and the batch's sizes (exact context lengths, not the recipe-level allowance).
"""
from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch

from r3_rl.plan import memory
from r3_rl.plan.measure import measured_peak
from r3_rl.plan.shapes import ModelShape, shape_from_config
from r3_rl.trajectory import PromptItem, SamplingParams, Segment

TEMPLATES = {"system": "", "reason": "{prompt}", "generate": "{prompt}", "generate_uncond": "",
             "reflect": "{prompt}", "refine": "{prompt}. Edit: {instruction}"}
SP = SamplingParams(temperature=1.0, top_p=0.95, cfg_scale=5.0)


@dataclass
class Check:
    """Predicted vs measured peak bytes of one workload: in total, and above what existed before it started
    (weights, reference, Adam state: exact either way), which is where a wrong formula would show."""

    what: str  # "learner step" or "image sampling"
    width: int
    layers: int
    checkpointing: bool
    before: float  # bytes allocated before the workload started (measured = predicted)
    predicted_growth: float
    measured_growth: float
    parts: dict[str, float]  # predicted components of the growth

    @property
    def predicted(self) -> float:
        return self.before + self.predicted_growth

    @property
    def measured(self) -> float:
        return self.before + self.measured_growth

    @property
    def error(self) -> float:
        return self.predicted / self.measured - 1.0

    @property
    def growth_error(self) -> float:
        return self.predicted_growth / self.measured_growth - 1.0


def janus_shaped(path: Path, width: int, layers: int, grid: int) -> str:
    from r3_rl.policy.janus_tiny import make_tiny_janus

    heads = max(1, width // 128)
    return make_tiny_janus(path, hidden_size=width, num_layers=layers, grid=grid, heads=heads, kv_heads=heads,
                           intermediate=width * 11 // 4, codebook=16384)


def _weights_bytes(model: torch.nn.Module) -> int:
    seen = {t.data_ptr(): t.nbytes for t in (*model.parameters(), *model.buffers())}
    return sum(seen.values())


def _refine_items(policy: Any, n: int, seed: int) -> list[Any]:
    """``n`` refine-stage image segments with CFG, each with its own prompt and input image."""
    from r3_rl.learner.batch import TrainItem
    from r3_rl.policy.janus_prompts import image_ref

    rng = np.random.default_rng(seed)
    segs = []
    for i in range(n):
        ids = policy._ids("refine", {"prompt": f"photo {i} of {'a cat ' * (i % 3)}", "instruction": "add a dog"},
                          True, True)
        tokens = rng.integers(0, policy.codebook_size, policy.num_image_tokens).tolist()
        context = {"stage": "refine", "input_ids": ids, "image": image_ref(np.zeros(1), tokens[::-1]),
                   "uncond_ids": policy._null(ids)}
        segs.append(Segment(modality="image", context=context, token_ids=tokens, logprobs=[], sampling=SP))
    with torch.no_grad():
        for s, lp in zip(segs, policy.segment_logprobs(segs)):
            s.logprobs = lp.tolist()
    return [TrainItem(s, float(a), "refine", 0) for s, a in zip(segs, rng.standard_normal(n))]


def learner_check(path: str, shape: ModelShape, checkpointing: bool, micro_batch: int,
                  dtype: str = "float32") -> Check:
    """A second learner step (two micro-batches) on top of weights, reference and the first step's fp32 masters
    (bf16 weights) and Adam state."""
    from r3_rl.config import Learner
    from r3_rl.learner.build import build_learner
    from r3_rl.policy.janus import JanusPolicy

    policy = JanusPolicy.from_pretrained(path, templates=TEMPLATES, dtype=dtype)
    items = _refine_items(policy, 2 * micro_batch, seed=0)
    cfg = Learner(backend="torch", lr=1e-6, micro_batch_size=micro_batch, gradient_checkpointing=checkpointing,
                  kl_coef_image=1e-3)
    reference = policy.frozen_copy()
    learner = build_learner(policy, reference, SimpleNamespace(learner=cfg))
    learner.step(items)  # allocates the fp32 masters (bf16 weights) and Adam's state; gradients are freed after it
    adam = sum(t.nbytes for st in learner.optim.optimizer.state.values() for t in st.values()
               if isinstance(t, torch.Tensor))
    model = {p.data_ptr() for p in policy.model.parameters()}
    masters = sum(p.nbytes for p in learner.optim.params if p.data_ptr() not in model)
    before = 2 * _weights_bytes(policy.model) + masters + adam  # the policy and its reference (a full copy)
    _, growth = measured_peak(lambda: learner.step(items))
    context = max(len(it.segment.context["input_ids"]) for it in items)
    stage = memory.Stage("refine", context, shape.image_tokens, 2, shape.image_vocab, True)
    tokens = micro_batch * stage.rows * (stage.context + stage.new_tokens - 1)
    b = memory.DTYPE_BYTES[dtype]
    saved, backward = memory.activations(shape, tokens, b, checkpointing)
    states = memory.model_states(shape, weight_bytes=b, trained=shape.params_trained, zero_stage=None, ranks=1)
    parts = {"gradients": states["gradients"], "activations": saved,
             "backward / reference forward": max(backward, memory.forward_temporaries(shape, tokens, b)),
             "logits": memory.learner_logits(stage)}
    return Check("learner step", shape.hidden, shape.layers, checkpointing, before, sum(parts.values()), growth, parts)


def sampling_check(path: str, shape: ModelShape, batch: int) -> Check:
    """Image sampling with CFG for ``batch`` prompts, on top of the weights."""
    from r3_rl.policy.janus import JanusPolicy

    policy = JanusPolicy.from_pretrained(path, templates=TEMPLATES)
    prompts = [PromptItem(str(i), "a photo of a red cat next to a blue dog") for i in range(batch)]
    ctx = [policy._ids("generate", {"prompt": p.prompt, "plan": ""}, False, True) for p in prompts]
    null = [policy._null(c) for c in ctx]
    _, growth = measured_peak(lambda: policy.engine.sample(ctx, [None] * batch, "image", SP, policy.num_image_tokens,
                                                           torch.Generator().manual_seed(0), null_ids=null))
    stage = memory.Stage("generate", max(len(c) for c in ctx), shape.image_tokens, 2, shape.image_vocab, True)
    parts = memory.sampling_peak(shape, stage, batch, 4)
    return Check("image sampling", shape.hidden, shape.layers, False, _weights_bytes(policy.model),
                 sum(parts.values()), growth, parts)


def run(width: int, layers: int, checkpointing: bool | None = None, sampling: bool = True, grid: int = 8,
        micro_batch: int = 2, sample_batch: int = 4, dtype: str = "float32") -> list[Check]:
    """Checks for one Janus-shaped model (built in a temp dir, nothing downloaded): a learner step unless
    ``checkpointing`` is None, image sampling if ``sampling``."""
    from transformers import AutoConfig

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        path = janus_shaped(Path(tmp) / "janus", width, layers, grid)
        shape = shape_from_config(AutoConfig.from_pretrained(path), "validation")
        checks = [] if checkpointing is None else [learner_check(path, shape, checkpointing, micro_batch, dtype)]
        return checks + ([sampling_check(path, shape, sample_batch)] if sampling else [])
