"""``r3-rl plan``: a recipe's GPU memory, process by process and component by component, before launch.

The processes a recipe starts: ``learner.ranks`` learner ranks (Ray actors with ``gpus_per_rank``; one rank
is the trainer process itself), ``rollout.workers`` sampling actors with ``gpus_per_worker`` (``rollout.backend:
ray``; local rollout samples in the trainer process), ``rollout.reward_workers`` with ``gpus_per_reward_worker``
(their task rewards' models, :mod:`r3_rl.plan.reward_models`), and the trainer process on ``policy.device`` -- which
Ray does not know about, so it shares GPU 0 with an actor (worst case) unless ``--gpus`` leaves a GPU spare:
then it runs alone there, and Ray must be started without that GPU (``CUDA_VISIBLE_DEVICES``).  A process's peak is what it keeps (weights,
optimiser state, reference, reward models) plus the largest of its phases (a learner micro-batch, a sampling call, an eval
batch, a VQ decode).  Sizes come from :mod:`r3_rl.plan.memory`.  A GPU fits when its total stays under
``USABLE`` of its memory (the rest: CUDA context, NCCL buffers, allocator fragmentation).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from r3_rl.gpu_layout import actor_gpus, on_gpu
from r3_rl.learner.deepspeed_config import optimizer_offload
from r3_rl.plan import memory
from r3_rl.plan.bagel_shape import bagel_shape
from r3_rl.plan.memory import DTYPE_BYTES, PROMPT_TOKENS, Stage
from r3_rl.plan.reward_models import RewardModel, reward_models, trainer_reward_specs
from r3_rl.plan.shapes import ModelShape, model_shape
from r3_rl.policy.janus import DECODE_CHUNK

GB = 1e9
USABLE = 0.9
DEFAULT_LORA = (16, ["q_proj", "k_proj", "v_proj", "o_proj"])  # what the advice proposes


@dataclass
class Process:
    name: str
    per_gpu: float  # processes of this kind on one GPU (0: not on a GPU)
    resident: dict[str, float] = field(default_factory=dict)  # kept for the whole run: component -> bytes
    phases: dict[str, dict[str, float]] = field(default_factory=dict)  # phase -> its components
    notes: dict[str, str] = field(default_factory=dict)  # component -> how it was sized
    reward_models: list[RewardModel] = field(default_factory=list)  # on its GPU, sized or not

    def peak_phase(self) -> tuple[str, dict[str, float]]:
        if not self.phases:
            return "", {}
        return max(self.phases.items(), key=lambda kv: sum(kv[1].values()))

    @property
    def total(self) -> float:
        return sum(self.resident.values()) + sum(self.peak_phase()[1].values())


def stages(recipe: Any, shape: ModelShape) -> list[Stage]:
    """The four R3 stages' sizes (the text around their variable parts: a ``PROMPT_TOKENS`` allowance)."""
    r, image = recipe.rollout, shape.vision_tokens + 2

    def st(name: str, context: int, new: int, vocab: int) -> Stage:
        sp = getattr(r, name)
        # Janus / tiny mix every scale but 1 with an unconditional row; a flow policy (BAGEL) encodes its
        # text-unconditional branch only above 1 (flow.Guidance.active): 0.5 guides nothing there
        guided = name in ("generate", "refine") and (sp.cfg_scale > 1.0 if shape.flow else sp.cfg_scale != 1.0)
        # BAGEL edits: image-CFG's row, encoded only on top of text-CFG (flow.Guidance.uses_image_branch)
        rows = 1 + guided + (shape.image_cfg_rows if name == "refine" and guided else 0)
        return Stage(name, context, new, rows, vocab, sp.top_p < 1.0)
    return [st("reason", PROMPT_TOKENS, r.reason.max_new_tokens, shape.text_vocab),
            st("generate", PROMPT_TOKENS + r.reason.max_new_tokens, shape.image_tokens, shape.image_vocab),
            st("reflect", PROMPT_TOKENS + image, r.reflect.max_new_tokens, shape.text_vocab),
            st("refine", PROMPT_TOKENS + image + shape.edit_tokens + r.reflect.max_new_tokens, shape.image_tokens,
               shape.image_vocab)]


def learner_positions(stage: Stage, shape: ModelShape) -> int:
    """Positions one row of a ``stage`` segment puts through the learner's forward: its context and its new
    tokens -- for a flow image, the latent positions of every SDE step it rescores (each step one forward against
    the same context, all kept for the one backward)."""
    steps = {"generate": shape.gen_sde_steps, "refine": shape.edit_sde_steps}.get(stage.name, 1) if shape.flow else 1
    return stage.context + stage.new_tokens * steps


def separate_critic(cfg: Any) -> bool:
    """PPO with ``ppo.critic: separate``: a second copy of the policy's trunk, with its own optimiser state."""
    return cfg.algorithm == "ppo" and cfg.ppo.critic == "separate"


def trained_params(cfg: Any, shape: ModelShape, use_lora: bool) -> int:
    """Parameters the learner trains: LoRA's adapters (``learner.lora``, or the advice's default), else the model's
    trainable ones."""
    r, targets = (cfg.lora.r, cfg.lora.target_modules) if cfg.lora is not None else DEFAULT_LORA
    return shape.lora_params(r, targets) if use_lora else shape.params_trained


def offloads_optimizer(cfg: Any, zero: int | None) -> bool:
    """Whether a ZeRO stage ``zero`` engine steps the optimiser in CPU memory (``offload_optimizer: {device: cpu}``;
    stage 0 and the torch backend, ``None``, have no offload)."""
    return bool(zero) and optimizer_offload(cfg.deepspeed.config or {}) == "cpu"


def add_learner(p: Process, recipe: Any, shape: ModelShape, *, micro_batch: int | None = None,
                zero_stage: int | None = -1, ranks: int | None = None, checkpointing: bool | None = None,
                lora: bool | None = None) -> Process:
    """One learner rank's states and micro-batch phase (keywords override the recipe, for the advice)."""
    cfg = recipe.learner
    mbs, ranks = micro_batch or cfg.micro_batch_size, ranks or cfg.ranks
    ckpt = cfg.gradient_checkpointing if checkpointing is None else checkpointing
    use_lora = (cfg.lora is not None) if lora is None else lora
    zero = (cfg.deepspeed.zero_stage if cfg.backend == "deepspeed" else None) if zero_stage == -1 else zero_stage
    policy_b = b = DTYPE_BYTES[recipe.policy.dtype]  # the compute dtype of rollout and learner alike
    trained = trained_params(cfg, shape, use_lora)
    offload = offloads_optimizer(cfg, zero)
    states = memory.model_states(shape, weight_bytes=b, trained=trained, zero_stage=zero, ranks=ranks, offload=offload)
    p.resident.update(states)
    how = "torch AdamW" if zero is None else f"DeepSpeed ZeRO-{zero}, {ranks} rank(s)"
    p.notes["weights"] = f"{b}-byte, {shape.params / 1e9:.2f} B parameters ({how})"
    p.notes["gradients"] = f"{trained / 1e9:.3f} B trained" + (" (LoRA adapters)" if use_lora else "")
    p.notes["master weights"] = "fp32 copy of what trains" if b < 4 else "none (fp32 weights)"
    p.notes["optimizer (Adam)"] = "fp32 moments"
    if offload:
        cpu = memory.offloaded_states(trained, b, ranks)
        p.notes["master weights"] = p.notes["optimizer (Adam)"] = (
            f"offloaded: {cpu / GB:.1f} GB of CPU memory per rank (fp32 masters, gradients, Adam)")
    bucket = memory.reduction_bucket(zero, b, offload, cfg.deepspeed.config or {})
    if bucket:
        p.resident["reduction bucket"] = bucket
        elements = bucket / (4 if zero == 1 else b) / 1e6
        p.notes["reduction bucket"] = (f"DeepSpeed's reduce_bucket_size: {elements:g} M elements in "
                                       f"{'float32' if zero == 1 else recipe.policy.dtype}, at every backward")
    if separate_critic(cfg):  # a second trunk: a copy of the policy (LoRA's adapters included), trained alike
        p.resident["critic (separate)"] = sum(states.values())
        p.notes["critic (separate)"] = ("a copy of the policy: its weights, and the gradients, master weights and Adam "
                                        "state of what trains in it" + (" (its LoRA adapters)" if use_lora else "")
                                        + (" (those offloaded)" if offload else ""))
    kl = cfg.kl_coef_text > 0 or cfg.kl_coef_image > 0
    p.resident["reference"] = policy_b * shape.params if kl and not use_lora else 0.0
    p.notes["reference"] = ("frozen copy of the policy" if p.resident["reference"] else
                            "none (LoRA: adapters off)" if use_lora else "none (KL weights 0)")
    worst = max(stages(recipe, shape), key=lambda s: s.rows * learner_positions(s, shape))
    rehearsal = rehearsal_tokens(recipe, shape)
    tokens = mbs * worst.rows * (learner_positions(worst, shape) - 1) + rehearsal
    value_tokens = mbs * worst.context if cfg.algorithm == "ppo" else 0  # the critic's forward over each context
    saved, backward = memory.activations(shape, tokens + value_tokens, b, ckpt, weight_grads=not use_lora)
    other, _ = memory.activations(shape, tokens + value_tokens, b, not ckpt, weight_grads=not use_lora)
    # the reference scores the micro-batch only: the rehearsal's cross-entropy has no KL term
    ref_forward = memory.forward_temporaries(shape, tokens - rehearsal, policy_b) if p.resident["reference"] else 0.0
    p.phases["learner micro-batch"] = {"activations": saved, "backward temporaries": max(backward, ref_forward),
                                       "logits": max(memory.learner_logits(s) for s in stages(recipe, shape))}
    steps = (learner_positions(worst, shape) - worst.context) // max(worst.new_tokens, 1)
    p.notes["activations"] = (f"{mbs} {worst.name} segment(s) x {worst.rows} x {learner_positions(worst, shape)} "
                              f"tokens{f' ({steps} SDE steps)' if steps > 1 else ''}"
                              f"{f' + the critic over each context ({value_tokens} tokens)' if value_tokens else ''}"
                              f", checkpointing {'on' if ckpt else 'off'} ({'off' if ckpt else 'on'}: "
                              f"{other / GB:.1f} GB)")
    if rehearsal:
        replay = cfg.critic_replay
        p.notes["activations"] += (f", + the critic_replay rehearsal beside it ({replay.examples} critiques"
                                   f"{f' and {replay.examples * replay.questions} questions' if replay.questions else ''}"
                                   f", {rehearsal} tokens)")
    p.notes["backward temporaries"] = "weight/activation gradients" + (", one recomputed layer" if ckpt else "")
    p.notes["logits"] = "float32, one row chunk of token_logprobs at a time"
    return p


def rehearsal_tokens(recipe: Any, shape: ModelShape) -> int:
    """Tokens of ``learner.critic_replay``'s forward (0 when off).  The first micro-batch of every optimiser step
    adds the rehearsal's cross-entropy to its loss, so both graphs are alive until that backward: with
    ``examples: 4096`` the rehearsal, not the micro-batch, sets the learner's peak.  A critique is sized as the
    reflect stage, a question as an image with the prompt allowance around it."""
    replay = recipe.learner.critic_replay
    if replay.coef <= 0:
        return 0
    reflect = next(s for s in stages(recipe, shape) if s.name == "reflect")
    question = PROMPT_TOKENS + shape.vision_tokens + 2  # the question's words and its one-word answer
    return replay.examples * (reflect.context + reflect.new_tokens - 1 + replay.questions * question)


def add_sampling(p: Process, recipe: Any, shape: ModelShape, segments: int, what: str) -> Process:
    """The phases of sampling ``segments`` segments per call: the largest stage, and the VQ decode."""
    b = DTYPE_BYTES[recipe.policy.dtype]
    best = max(((memory.sampling_peak(shape, s, segments, b), s) for s in stages(recipe, shape)),
               key=lambda x: sum(x[0].values()))
    parts, s = best
    p.phases[f"{what} ({s.name}: {segments} x {s.rows} rows x {s.context + s.new_tokens} positions)"] = parts
    if shape.flow:  # BAGEL: say what the sampling terms assume
        per = 2 * shape.layers * shape.kv_heads * shape.head_dim * b
        p.notes["KV cache"] = f"every row's context + image positions, {per / 1e3:.0f} KB a position"
        p.notes["prefill activations"] = "one forward's intermediates: the context, or a denoising step's rows"
        p.notes["VAE decode"] = f"{shape.decode_bytes or b}-byte FLUX decoder, all images of a call at once"
        if s.rows > 1:
            p.notes["KV cache"] += f" ({s.rows} CFG rows)"

    if shape.image_side:
        what = "VAE decode" if shape.flow else "VQ decode"
        n = segments if shape.decode_chunk < 0 else min(segments, shape.decode_chunk or DECODE_CHUNK)
        p.phases[f"{what} ({n} images at a time)"] = {what: memory.vq_decode(shape, n, shape.decode_bytes or b)}
    return p


@dataclass
class Plan:
    recipe: Any
    shape: ModelShape
    gpus: int
    gpu_memory: float
    processes: list[Process]
    gpus_needed: int
    errors: list[str]
    host: dict[str, float] = field(default_factory=dict)  # CPU memory of the whole node, by part (bytes)

    def gpu_totals(self) -> list[tuple[str, float]]:
        """Per kind of GPU: (what it holds, bytes), the trainer process added to the fullest one."""
        rows = [(f"{p.per_gpu:g} {p.name}{'s' if p.per_gpu > 1 else ''}", p.total * p.per_gpu)
                for p in self.processes if p.per_gpu > 0 and p.name != "trainer process"]
        trainer = self.processes[-1]
        if trainer.per_gpu > 0:
            if rows and self.gpus > self.gpus_needed:  # a spare GPU: the trainer alone, Ray started without it
                rows.append(("the trainer process (alone on a spare GPU: Ray without it)", trainer.total))
            elif rows:
                i = max(range(len(rows)), key=lambda k: rows[k][1])
                rows[i] = (f"{rows[i][0]} + the trainer process (GPU 0, worst case)", rows[i][1] + trainer.total)
            else:
                rows.append(("the trainer process", trainer.total))
        return rows

    @property
    def fits(self) -> bool:
        return not self.errors and all(v <= USABLE * self.gpu_memory * GB for _, v in self.gpu_totals())


def add_reward_models(process: Process, specs: list[Any]) -> Process:
    """The reward models ``specs`` load on ``process``'s GPU, kept for the whole run (:mod:`r3_rl.plan.reward_models`)."""
    process.reward_models = reward_models(specs)
    sized = [m for m in process.reward_models if m.params]
    if sized:
        process.resident["reward models"] = sum(m.bytes for m in sized)
        process.notes["reward models"] = "; ".join(m.describe() for m in sized) + " (weights only)"
    return process


def make_plan(recipe: Any, gpus: int, gpu_memory: float, shape: ModelShape | None = None) -> Plan:
    shape = shape or (bagel_shape(recipe) if recipe.policy.kind == "bagel" else model_shape(recipe))
    cfg, r = recipe.learner, recipe.rollout
    gpu = on_gpu(recipe)
    group = recipe.tree.group_size * r.groups_per_task
    b = DTYPE_BYTES[recipe.policy.dtype]
    errors, processes = [], []
    if cfg.ranks > 1:
        processes.append(add_learner(Process("learner rank", 1 / cfg.gpus_per_rank if cfg.gpus_per_rank else 0),
                                     recipe, shape))
        if gpu and not cfg.gpus_per_rank:
            errors.append("learner.gpus_per_rank is 0 with policy.device cuda: the ranks would see no GPU")
    if r.backend == "ray":
        worker = Process("rollout worker", 1 / r.gpus_per_worker if r.gpus_per_worker else 0,
                         {"weights": b * shape.params})
        worker.notes["weights"] = f"{recipe.policy.dtype}, {shape.params / 1e9:.2f} B parameters"
        processes.append(add_sampling(worker, recipe, shape, group, "sampling"))
        if gpu and not r.gpus_per_worker:
            errors.append("rollout.gpus_per_worker is 0 with policy.device cuda: the workers would see no GPU")
    if r.reward_workers and gpu and r.gpus_per_reward_worker:
        processes.append(add_reward_models(Process("reward worker", min(1 / r.gpus_per_reward_worker, r.reward_workers)),
                                           recipe.rewards.task))
    trainer = Process("trainer process", 1.0 if gpu else 0.0)
    if cfg.ranks == 1:
        add_learner(trainer, recipe, shape)
    else:
        trainer.resident["weights"] = b * shape.params
        trainer.notes["weights"] = "its policy copy (mirrors rank 0's weights, runs the evals)"
        from r3_rl.learner.build import needs_frozen_reference

        trainer.resident["reference"] = 0.0
        trainer.notes["reference"] = ("in host memory (starts the ranks' references, goes into checkpoints)"
                                      if needs_frozen_reference(recipe)
                                      else "none (LoRA: adapters off)" if cfg.lora is not None else
                                      "none (KL weights 0)")
    if r.backend == "local":
        add_sampling(trainer, recipe, shape, group, "rollout sampling")
    add_sampling(trainer, recipe, shape, recipe.eval.batch_size, "eval sampling")
    if gpu:
        add_reward_models(trainer, trainer_reward_specs(recipe))
    processes.append(trainer)
    needed = max(actor_gpus(recipe), 1 if gpu else 0)
    if gpu and needed > gpus:
        errors.append(f"the actors need {needed} GPUs (learner.ranks x gpus_per_rank + rollout.workers x "
                      f"gpus_per_worker + rollout.reward_workers x gpus_per_reward_worker) but --gpus is {gpus}")
    return Plan(recipe, shape, gpus, gpu_memory, processes, needed, errors, host_memory(recipe, shape))


def host_memory(recipe: Any, shape: ModelShape) -> dict[str, float]:
    """The node's CPU memory the run holds beyond its processes' own, at its peak.

    The offloaded optimiser states of every learner rank; Ray's object store: the last full weight state stays
    pinned (a replacement worker loads it), with LoRA's last update beside it (the driver's adapters: bf16 under
    DeepSpeed, else peft's fp32), and with several learner ranks rank 0's trained weights on their way to the
    driver's mirror beside that -- or, at set-up, the policy (and a frozen KL reference) sent to the ranks; the
    trainer's CPU copy of a GPU policy while it puts a full state (:meth:`r3_rl.rollout.ray_engine.RayEngine.sync`);
    and, with ranks, the trainer's KL reference (:meth:`r3_rl.components.Components.reference`); with LoRA, the
    host copy the export merges at each checkpoint (:meth:`r3_rl.learner.lora.LoraAdapters.export`); the trainer's
    parent buffer when full and one eval's chains (:func:`r3_rl.plan.memory.parent_buffer`,
    :func:`r3_rl.plan.memory.eval_chains`: BAGEL keeps both as images, Janus its parents as token ids)."""
    from r3_rl.learner.build import needs_frozen_reference
    from r3_rl.learner.lora import adapters_in_base_dtype

    cfg, b = recipe.learner, DTYPE_BYTES[recipe.policy.dtype]
    trained = trained_params(cfg, shape, cfg.lora is not None)
    lora = trained if cfg.lora is not None else 0
    full, host = b * shape.params, {}
    if offloads_optimizer(cfg, cfg.deepspeed.zero_stage if cfg.backend == "deepspeed" else None):
        copies = 2 if separate_critic(cfg) else 1  # the separate critic's states are offloaded beside the policy's
        host["offloaded optimiser states"] = memory.offloaded_states(trained, b, cfg.ranks) * cfg.ranks * copies
    store = 0.0
    if recipe.rollout.backend == "ray":  # the driver's adapters: fp32 (peft), in the policy's dtype under DeepSpeed
        update = lora * (b if adapters_in_base_dtype(cfg) else 4)
        store = full + (update if 2 * update <= full else 0)
    if cfg.ranks > 1:
        store = max(store + b * trained, full * (2 if needs_frozen_reference(recipe) else 1))
    if store:
        host["Ray object store"] = store
    gpu = on_gpu(recipe)
    copies = [why for why, when in (("a full sync", recipe.rollout.backend == "ray"),
                                    ("a LoRA export", cfg.lora is not None)) if when and gpu]
    if copies:  # never at once: a full sync at start and resume, the export's merge copy at each checkpoint
        host[f"the trainer's CPU copy during {' or '.join(copies)}"] = full
    if cfg.ranks > 1 and needs_frozen_reference(recipe):
        host["the trainer's KL reference"] = full
    buffer = memory.parent_buffer(shape, recipe.tree.buffer_size)
    if buffer:
        host["the trainer's parent buffer, full"] = buffer
    chains = memory.eval_chains(shape, recipe.eval.size or recipe.data.eval_size, recipe.eval.rounds)
    if chains:
        host["the trainer's eval chains"] = chains
    return host
