"""Bytes per GPU of each memory component of a run: pure functions of a :class:`ModelShape` and sizes.

Model states follow DeepSpeed's own accounting (``estimate_zero2/3_model_states_mem_needs``; tested equal):
bf16/fp16 weights and gradients, fp32 master weights, fp32 gradients for the optimiser, fp32 Adam moments,
sharded over ``ranks`` by ZeRO stage.  The torch backend keeps the same states unsharded
(:class:`r3_rl.learner.precision.MasterWeights`: bf16 weights, fp32 masters with fp32 gradients, fp32 Adam).

Activations are those of transformers' Llama decoder layer as autograd keeps them (sdpa attention: no
``S x S`` matrix), counted op by op and checked on CPU against the torch profiler (``r3_rl.plan.validate``):
per token and layer ``(8 + 6b)D + 2b*D_kv + 4b*I`` bytes for ``b``-byte activations; with gradient
checkpointing each layer keeps only its input (measured: ``2bD``), and backward recomputes one layer at a
time.  Backward also holds weight-sized gradient temporaries (two of the largest weight: the CFG streams use
the head twice) and the gradients of one layer's activations.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from r3_rl.plan.shapes import ModelShape
from r3_rl.policy.sampling import LOGIT_CHUNK_ELEMENTS

DTYPE_BYTES = {"float32": 4, "fp32": 4, "bfloat16": 2, "bf16": 2, "float16": 2, "fp16": 2}
# Token allowance for a stage's text around the variable parts: chat template, system prompt, the prompt itself
PROMPT_TOKENS = 96
# Peak of sampling_logprobs (+ sampling, or + backward in token_logprobs) in units of a float32 [rows, vocab]
# tensor: top-p sorts (values and int64 indices), cumulative sums and masks; measured on CPU (CFG included):
# 8.5 and 3.8 with and without top-p
LOGIT_TEMPS_TOP_P, LOGIT_TEMPS = 9, 4
# Activation-gradient temporaries in backward, as a fraction of one layer's saved activations (measured)
BACKWARD_TEMPS, RECOMPUTE_TEMPS = 0.25, 0.75
VQ_TEMPS = 6  # full-resolution feature maps alive at once in the VQ decoder (GroupNorm, SiLU, conv, residual, ...)


@dataclass(frozen=True)
class Stage:
    """One sampling stage's sizes: context length, new tokens, rows per segment (2 with CFG), its vocabulary."""

    name: str
    context: int
    new_tokens: int
    rows: int
    vocab: int
    top_p: bool


def model_states(shape: ModelShape, *, weight_bytes: int, trained: int, zero_stage: int | None,
                 ranks: int, offload: bool = False) -> dict[str, float]:
    """Weights, gradients, master weights and Adam state of one learner rank, on its GPU.

    ``zero_stage`` None = the torch backend (no sharding); ``trained`` = trainable parameters (LoRA: adapters).
    ``offload``: DeepSpeed's ``offload_optimizer: {device: cpu}`` -- the fp32 master weights, fp32 gradients and
    Adam moments live in CPU memory (:func:`offloaded_states`); the GPU keeps the bf16 weights (ZeRO-3: its shard
    plus one gathered layer and that layer's gradients), and in mixed precision the fp32 gradients DeepSpeed 0.19.8
    accumulates micro-batches in before the copy to CPU (``stage_1_and_2.py``; its
    ``estimate_zero2_model_states_mem_needs(cpu_offload=True)`` leaves them out): ZeRO-2 the rank's partition
    (``_build_compact_grad_partition_buffer``, on the accelerator), ZeRO-1 a full-size ``grad_accum`` of every
    trained weight and then that partition; plus a bf16 staging buffer the size of the largest weight.
    """
    if offload and zero_stage:
        b, n = weight_bytes, max(ranks, 1)
        if zero_stage == 3:
            gathered = b * shape.largest_layer
            return {"weights": b * shape.params / n + gathered, "gradients": gathered,
                    "master weights": 0.0, "optimizer (Adam)": 0.0}
        partition = 4 * trained / n + b * shape.largest_weight if b < 4 else 0.0
        if zero_stage == 1 and b < 4:  # unpartitioned gradients: each weight's fp32 grad_accum, whole
            partition += 4 * trained
        return {"weights": b * shape.params, "gradients": partition, "master weights": 0.0, "optimizer (Adam)": 0.0}
    p, n, b = shape.params, max(ranks, 1), weight_bytes
    mixed = b < 4
    fp32_grads = 4 * trained if mixed else 0  # the optimiser's fp32 copy of the gradients
    master = 4 * trained if mixed else 0
    adam = 8 * trained
    if zero_stage is None:  # torch: bf16 gradients are added into the fp32 masters' as soon as backward makes them
        return {"weights": b * p, "gradients": 4 * trained, "master weights": master, "optimizer (Adam)": adam}
    if zero_stage == 0:  # DeepSpeed ZeRO-0 (fp32 only: bf16 would accumulate in bf16)
        return {"weights": b * p, "gradients": b * trained + fp32_grads, "master weights": master,
                "optimizer (Adam)": adam}
    if zero_stage == 1:  # bf16: DeepSpeed's BF16_Optimizer keeps fp32 gradients of the whole model, not a share
        return {"weights": b * p, "gradients": b * trained + fp32_grads, "master weights": master / n,
                "optimizer (Adam)": adam / n}
    if zero_stage == 2:
        return {"weights": b * p, "gradients": (b * trained + fp32_grads) / n, "master weights": master / n,
                "optimizer (Adam)": adam / n}
    gathered = b * shape.largest_layer  # ZeRO-3 gathers one layer's weights (and its gradients) at a time
    grads = (fp32_grads if mixed else b * trained) / n + gathered
    return {"weights": b * p / n + gathered, "gradients": grads, "master weights": master / n,  # frozen too
            "optimizer (Adam)": adam / n}


REDUCE_BUCKET_ELEMENTS = 500_000_000  # DeepSpeed's default zero_optimization.reduce_bucket_size


def reduction_bucket(zero_stage: int | None, weight_bytes: int, offload: bool, conf: dict[str, Any]) -> float:
    """Bytes of the gradient reduction bucket DeepSpeed's ZeRO-1/2 optimiser allocates at every backward
    (``stage_1_and_2.py`` ``setup_buckets``): ``reduce_bucket_size`` elements -- 500 M by default, whatever the
    model's size -- in fp32 under ZeRO-1 (its fp32 accumulator's staging) and in the weights' dtype under ZeRO-2,
    twice with ``overlap_comm``.  ZeRO-1 in bf16 without offload runs DeepSpeed's BF16_Optimizer, which has none.
    DeepSpeed's own memory estimators leave it out (``tests/test_plan_bagel.py`` finds it in the engine)."""
    if zero_stage not in (1, 2) or (zero_stage == 1 and weight_bytes < 4 and not offload):
        return 0.0
    zero = (conf or {}).get("zero_optimization") or {}
    elements = int(float(zero.get("reduce_bucket_size", REDUCE_BUCKET_ELEMENTS)))
    return elements * (4 if zero_stage == 1 else weight_bytes) * (2 if zero.get("overlap_comm") else 1)


def offloaded_states(trained: int, weight_bytes: int, ranks: int) -> float:
    """CPU bytes of one rank's offloaded optimiser partition: fp32 master weights, fp32 gradients, Adam moments
    (mixed precision; fp32 weights: gradients and moments only)."""
    return (16 if weight_bytes < 4 else 12) * trained / max(ranks, 1)


def layer_activations(shape: ModelShape, b: int) -> int:
    """Bytes one decoder layer keeps for backward per token (no checkpointing)."""
    d, dkv, i = shape.hidden, shape.kv_heads * shape.head_dim, shape.intermediate
    return (8 + 6 * b) * d + 2 * b * dkv + 4 * b * i


def activations(shape: ModelShape, tokens: int, b: int, checkpointing: bool,
                weight_grads: bool = True) -> tuple[float, float]:
    """(bytes kept for backward by a micro-batch of ``tokens`` positions, peak extra bytes during backward).

    ``weight_grads``: the big weights train (not LoRA), so backward holds weight-sized gradient temporaries."""
    per_layer = layer_activations(shape, b)
    # a weight's gradient before it is added to .grad; CFG uses the image head twice
    grad_temp = 2 * b * shape.largest_weight if weight_grads else 0
    if checkpointing:
        return tokens * (2 * shape.layers + 5) * b * shape.hidden, grad_temp + RECOMPUTE_TEMPS * per_layer * tokens
    return tokens * (shape.layers * per_layer + 2 * b * shape.hidden), grad_temp + BACKWARD_TEMPS * per_layer * tokens


def forward_temporaries(shape: ModelShape, tokens: int, b: int) -> float:
    """Peak bytes of a forward without autograd (reference, sampling prefill): one layer's intermediates."""
    return tokens * (3 * shape.intermediate + 5 * shape.hidden) * b


def logits(rows: int, vocab: int, top_p: bool) -> float:
    """float32 logits and their sampling temporaries for ``rows`` positions at once."""
    return rows * vocab * 4 * (LOGIT_TEMPS_TOP_P if top_p else LOGIT_TEMPS)


def learner_logits(stage: Stage) -> float:
    """The training forward's logits: one chunk of ``token_logprobs`` at a time (CFG: both streams' heads)."""
    rows = min(stage.new_tokens, max(1, LOGIT_CHUNK_ELEMENTS // stage.vocab))
    return logits(rows, stage.vocab, stage.top_p)


def kv_cache(shape: ModelShape, rows: int, length: int, b: int) -> float:
    """A KV cache of ``rows`` x ``length`` positions (keys and values of every layer)."""
    return rows * length * shape.layers * 2 * shape.kv_heads * shape.head_dim * b


def vq_decode(shape: ModelShape, images: int, b: int) -> float:
    """The VQ decoder's peak for ``images`` decoded at once (full-resolution feature maps)."""
    return images * shape.image_side ** 2 * shape.vq_channels * b * VQ_TEMPS


def sampling_peak(shape: ModelShape, stage: Stage, segments: int, b: int) -> dict[str, float]:
    """What one sampling call of ``segments`` segments adds to the weights: its preallocated KV cache
    (context + every new token, CFG rows included), the prefill's (flow images: a denoising forward's)
    intermediates and a step's logits."""
    rows = segments * stage.rows
    # flow-matched images (BAGEL): each denoising step is one forward over all the image's positions
    forward = max(stage.context, stage.new_tokens) if shape.flow and stage.vocab == shape.image_vocab else stage.context
    return {"KV cache": kv_cache(shape, rows, stage.context + stage.new_tokens, b),
            "prefill activations": forward_temporaries(shape, rows * forward, b),
            "logits": logits(segments, stage.vocab, stage.top_p) + rows * stage.vocab * 4}


def png_bytes_at_most(side: int) -> int:
    """An upper bound of one ``side`` x ``side`` RGB image's PNG: its pixels, one filter byte a row, zlib's
    5 bytes per stored 64 KB block when nothing compresses, and the chunk headers.  Generated images compress
    to about half of it (0.47 of 0.79 MB at 512 px)."""
    raw = side * (3 * side + 1)
    return raw + 5 * (raw // 65535 + 1) + 128


def parent_buffer(shape: ModelShape, capacity: int) -> float:
    """The trainer's Tree-RL parent buffer when full (:class:`r3_rl.rollout.buffer.ParentBuffer`): ``capacity``
    correct and ``capacity`` flawed parents.  An image the policy can decode again (Janus) is kept as int32 token
    ids; a flow-matched one (BAGEL) as PNG bytes, counted at :func:`png_bytes_at_most`."""
    if not shape.image_side:
        return 0.0
    each = 4 * shape.image_tokens if not shape.flow and shape.image_tokens else png_bytes_at_most(shape.image_side)
    return 2.0 * capacity * each


def eval_chains(shape: ModelShape, prompts: int, rounds: int) -> float:
    """What one eval keeps until it has scored every chain (:func:`r3_rl.eval.evaluate.evaluate`): each prompt's
    images after rounds 0..``rounds`` as pixels, and for a policy whose segments carry their input image as a
    base64 PNG (BAGEL: :func:`r3_rl.policy.bagel.contexts.store_images`) two of those per critiqued image, one in
    the critique's context and one in the edit's (a Janus context keeps the image's token ids: negligible)."""
    if not shape.image_side:
        return 0.0
    pixels = 3 * shape.image_side ** 2
    per_chain = (rounds + 1) * pixels
    if shape.flow:
        per_chain += rounds * 2 * 4 * -(-png_bytes_at_most(shape.image_side) // 3)
    return float(prompts * per_chain)
