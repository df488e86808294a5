"""The ``learner:`` section of a recipe: algorithm, optimiser, clipping, KL, modality weights, flow-step settings,
DeepSpeed, LoRA and PPO (kept apart from :mod:`r3_rl.config`, which re-exports every name here)."""
from __future__ import annotations

import sys
from typing import Annotated, Any, Literal

from pydantic import Field, field_validator, model_validator

from r3_rl.config_base import Section, plugin_name
from r3_rl.errors import UserError, close_match, shown
from r3_rl.trajectory import STAGES, Stage

# Adam's moment decay: 1 or more never forgets (and diverges)
Beta = Annotated[float, Field(ge=0.0, lt=1.0, allow_inf_nan=False)]


# DeepSpeed config keys the learner writes itself (:func:`r3_rl.learner.deepspeed_config.ds_config`): the recipe key
LEARNER_OWNED_DS_KEYS = {
    "train_micro_batch_size_per_gpu": "learner.micro_batch_size", "train_batch_size": "learner.micro_batch_size",
    "gradient_accumulation_steps": "learner.grad_accum", "gradient_clipping": "learner.grad_clip",
    "bf16": "learner.deepspeed.dtype", "fp16": "learner.deepspeed.dtype",
    "optimizer": "learner.lr, learner.betas and learner.weight_decay",
    "scheduler": "learner.warmup_steps, learner.lr_decay_steps and learner.lr_final",
    # the learner hands DeepSpeed a torch AdamW (fused under the offload) and reduces bf16 gradients in fp32
    "zero_force_ds_cpu_optimizer": "the learner's own AdamW (leave the key out)",
    "zero_allow_untested_optimizer": "the learner's own AdamW (leave the key out)",
    "data_types": "learner.deepspeed.dtype (gradients accumulate in fp32)",
    "communication_data_type": "learner.deepspeed.dtype (gradients are reduced in fp32)"}


class DeepSpeedCfg(Section):
    """``learner.backend: deepspeed``: the engine is built from these plus the learner's own keys
    (``micro_batch_size`` -> ``train_micro_batch_size_per_gpu``, ``grad_accum`` -> ``gradient_accumulation_steps``,
    ``grad_clip`` -> ``gradient_clipping``).  CPU runs use ``DS_ACCELERATOR=cpu`` and gloo, GPU runs NCCL."""

    zero_stage: int = Field(2, ge=0, le=3)
    # the engine's dtype; left out it follows policy.dtype (bf16: fp32 master weights), which it must agree with
    dtype: Literal["fp32", "bf16"] | None = None
    config: dict[str, Any] = Field(default_factory=dict)  # extra DeepSpeed config keys, merged last (expert use)

    @field_validator("config")
    @classmethod
    def _no_learner_owned_keys(cls, v: dict[str, Any]) -> dict[str, Any]:
        """Keys the learner sets from its own: given here they overrode them after every check (a
        ``zero_optimization.stage`` past the resume check and the ZeRO-3 refusal; a ``bf16`` against
        ``policy.dtype``; an ``optimizer`` beside the learner's AdamW)."""
        zero = v.get("zero_optimization")
        stage = isinstance(zero, dict) and "stage" in zero  # not a mapping: DeepSpeed's own check refuses it
        owned = [k for k in v if k in LEARNER_OWNED_DS_KEYS] + (["zero_optimization.stage"] if stage else [])
        if owned:
            use = LEARNER_OWNED_DS_KEYS.get(owned[0], "learner.deepspeed.zero_stage")
            raise ValueError(f"{owned[0]!r} is set by the learner: use {use} instead")
        return v


class LoraCfg(Section):
    """LoRA adapters through peft; the KL reference is then the base model with adapters disabled."""

    r: int = Field(8, ge=1)
    alpha: float = Field(16.0, gt=0.0)
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    target_modules: list[str] | str = Field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])
    # adapters go into the language model only; true: into the vision tower (Janus' SigLIP) as well
    train_vision: bool = False


class PpoCfg(Section):
    """``learner.algorithm: ppo``: stage-level rewards along each R3 chain, GAE over stages, a value critic."""

    gamma: float = Field(1.0, ge=0.0, le=1.0)
    lam: float = Field(0.95, ge=0.0, le=1.0)
    vf_coef: float = Field(0.5, ge=0.0)
    value_clip: float | None = Field(0.2, ge=0.0)  # null = unclipped value loss
    normalize_advantages: bool = True  # whiten GAE advantages over the batch
    critic: Literal["head", "separate"] = "head"  # value head on the policy, or a separate copy of the backbone
    # the critic's own learning rate (value head, and the separate body): verl's critic.optim.lr; null = learner.lr.
    # The warm-up and decay schedule scale it as they scale learner.lr; a head's shared trunk trains at learner.lr
    critic_lr: float | None = Field(None, gt=0.0)


class FlowLearnerCfg(Section):
    """Image actions made of denoising steps (flow-matching policies; ``r3_rl.learner.flow_loss``).

    A step's log-prob is a *mean* per-element log-density, so its log-ratios are tiny: flow RL clips at about
    1e-4 (Flow-GRPO), not at the text's 0.2.  ``kl_kind``: ``exact`` (mu - mu_ref)^2 / (2 s^2), ``r3`` twice that
    (R3's 1e-3), ``flow_grpo`` delta times that; its coefficient is ``learner.kl_coef_image``.
    """

    clip_low: float = Field(1e-4, gt=0.0, lt=1.0)
    clip_high: float | None = Field(None, gt=0.0)  # null = clip_low
    adv_clip: float | None = Field(5.0, gt=0.0)  # clamp advantages to +-adv_clip (Flow-GRPO 5); null = off
    ratio_unit: Literal["step", "image"] = "step"  # one ratio per SDE step (Flow-GRPO) or per image (mean log-prob)
    kl_kind: Literal["exact", "r3", "flow_grpo"] = "exact"
    # true: the unconditional CFG branches carry no gradient (Flow-GRPO detaches them); false: the exact gradient
    # of the guided policy that sampled (every branch; they share the weights)
    detach_uncond: bool = False


def _check_stage_names(mapping: dict[Any, Any]) -> None:
    """A per-stage mapping names only R3's stages (``ValueError`` naming the first other key)."""
    bad = [k for k in mapping if k not in STAGES]
    if bad:
        raise ValueError(f"unknown stage {bad[0]!r}{close_match(str(bad[0]), list(STAGES))} "
                         f"(valid: {', '.join(STAGES)})")


StageFlags = dict[Stage, bool]


class CriticReplayCfg(Section):
    """``learner.critic_replay``: rehearse the warm start's critiques during RL (InstructGPT's PPO-ptx, for the
    critic).  Every optimiser step adds ``coef`` x the cross-entropy of ``examples`` supervised critiques of
    Blocks images (training prompts; a correct image, flawed half the time with the flaw kind drawn evenly) to
    the RL loss, so the generator's updates, which share the critic's weights, do not wear its reading away.
    Policies with such examples only (``policy.kind`` tiny or tiny_flow); 0 = off (README: R3 synergy).
    ``questions``: yes/no questions (the warm start's ``questions``) asked about each of those images too."""

    coef: float = Field(0.0, ge=0.0, allow_inf_nan=False)
    examples: int = Field(16, ge=1, le=4096)  # critiques per optimiser step
    questions: int = Field(0, ge=0, le=16)  # yes/no questions per rehearsed image, answered with its truth


class Learner(Section):
    # a registered algorithm (grpo, ppo; `r3_rl.learner.registry`), `pkg.module:Class` or `path/file.py:Class`
    algorithm: str = "grpo"
    options: dict[str, Any] = Field(default_factory=dict)  # keyword arguments of the algorithm's constructor
    backend: Literal["torch", "deepspeed"] = "torch"
    lr: float = Field(5e-4, ge=0.0)
    betas: tuple[Beta, Beta] = (0.9, 0.95)
    weight_decay: float = Field(0.0, ge=0.0)
    warmup_steps: int = Field(0, ge=0)
    lr_decay_steps: int = Field(0, ge=0)  # linear decay to lr_final x lr by this optimiser step (0 = constant lr)
    lr_final: float = Field(1.0, ge=0.0, le=1.0)
    grad_clip: float = Field(1.0, ge=0.0)  # 0 = no clipping
    clip_low: float = Field(0.2, ge=0.0, lt=1.0)  # the ratio's floor is 1 - clip_low
    clip_high: float = Field(0.2, ge=0.0)
    # how token terms add up (r3_rl/algorithms/losses.py); "modality_mean": a token mean over text tokens plus one
    # over image tokens, each over the mini-batch (the reference's "1.0 text + 2.0 image" with loss_weight_image 2)
    loss_type: Literal["token_mean", "seq_mean", "dr_grpo", "modality_mean"] = "token_mean"
    # divide group advantages by the group std: one flag for all stages, or per stage ({reason: true, ...};
    # stages not listed are not normalised)
    normalize_std: bool | StageFlags = False
    # whose std divides, where normalize_std is on: "group" = the group's own (GRPO, TRL's scale_rewards: group);
    # "batch" = the std of every reward of that stage in the step (TRL's scale_rewards: batch, Flow-GRPO's
    # global_std): small within-group differences are no longer blown up to unit size.  Unbiased std + 1e-6.
    # Only where a group advantage is divided: not under PPO (GAE), nor for critiques with critic_baseline:
    # verdict or refined images with refine_baseline: parent
    std_scope: Literal["group", "batch"] = "group"
    # the critique's baseline: "group" = its 8 siblings' mean (GRPO: a group that agrees teaches nothing, however
    # wrong); "verdict" = the mean of the batch's other critiques of parents with the same verdict (correct /
    # flawed), so a group that all stop on a flawed image gets a negative advantage (README: R3 synergy)
    critic_baseline: Literal["group", "verdict"] = "group"
    # a refined image's baseline: "group" = its siblings' mean (R3's: the siblings were refined from other
    # critiques, so a refiner that carries out a useless instruction faithfully is blamed for it); "parent" = the
    # reward of the image it edited, so the refiner is paid for what its edit changed (README: R3 synergy)
    refine_baseline: Literal["group", "parent"] = "group"
    kl_coef_text: float = Field(1e-3, ge=0.0)
    kl_coef_image: float = Field(1e-3, ge=0.0)
    kl_kind: Literal["k1", "k2", "k3"] = "k3"
    # each token's KL times its (differentiable) ratio: the unbiased KL gradient on tokens the old policy sampled
    # (TRL's use_bias_correction_kl, True there); off = plain k3, as the R3 authors train.  Token actions only
    # (a flow-matching image's KL is the closed-form Gaussian one, learner.flow.kl_kind)
    kl_importance_weight: bool = False
    # the "old" log-probs of the ratio: "sampler" = as the sampler recorded them (R3, Flow-GRPO, TRL without vLLM);
    # "recompute" = one no-grad training forward per batch first (verl), so the ratio of the first update is exactly
    # 1 also where the sampler and the trainer round differently (bf16; sampler on other kernels); token actions only
    old_logp: Literal["sampler", "recompute"] = "sampler"
    # modality weights of the policy loss (not of the KL): R3 uses 1.0 text + 2.0 image; they cover image
    # tokens and image denoising steps alike
    loss_weight_text: float = Field(1.0, ge=0.0)
    loss_weight_image: float = Field(1.0, ge=0.0)
    # per-stage weights of the policy loss (not of the KL), times the modality weight; stages not listed weigh 1.
    # R3's stages share one set of weights, so this sets how much each role's updates count against the others'
    # (in the Blocks demo no setting beat the default: README, R3 synergy)
    stage_weights: dict[str, float] = Field(default_factory=dict)
    critic_replay: CriticReplayCfg = CriticReplayCfg()  # supervised critiques rehearsed during RL; off by default
    flow: FlowLearnerCfg = FlowLearnerCfg()  # images made of denoising steps: own clip range and KL units
    epochs: int = Field(1, ge=1)
    micro_batch_size: int = Field(64, ge=1)  # samples per forward/backward
    # recompute each decoder layer's activations in backward instead of keeping them: one more forward of
    # compute for a fraction of the activation memory (`r3-rl plan` shows both); shared-context KV cache kept
    gradient_checkpointing: bool = False
    grad_accum: int = Field(0, ge=0)  # micro-batches per optimiser step; 0 = the whole rollout batch in one step
    max_staleness: int = Field(0, ge=0)  # policy versions a sample may lag behind before it is refused
    # data-parallel learner ranks as Ray actors (one per GPU); 1 = the learner runs in the trainer process
    ranks: int = Field(1, ge=1)
    cpus_per_rank: float = Field(1.0, gt=0.0)
    gpus_per_rank: float = Field(0.0, ge=0.0)
    deepspeed: DeepSpeedCfg = DeepSpeedCfg()
    lora: LoraCfg | None = None
    ppo: PpoCfg = PpoCfg()

    @field_validator("algorithm")
    @classmethod
    def _known_algorithm(cls, v: Any) -> Any:
        from r3_rl.learner.registry import ALGORITHMS

        return plugin_name(ALGORITHMS, v)

    @field_validator("stage_weights", mode="before")
    @classmethod
    def _stage_weight_keys(cls, v: Any) -> Any:
        if not isinstance(v, dict):
            raise ValueError("must be a mapping of stage -> weight, e.g. {reflect: 1.5, refine: 1.5}")
        _check_stage_names(v)
        odd = [k for k, x in v.items()  # an int past the largest float would overflow float(x) below
               if isinstance(x, bool) or not isinstance(x, (int, float)) or not (0 <= x <= sys.float_info.max)]
        if odd:
            raise ValueError(f"stage {odd[0]!r}: expected a finite weight >= 0, got {shown(v[odd[0]])}")
        return {k: float(x) for k, x in v.items()}

    @field_validator("normalize_std", mode="before")
    @classmethod
    def _stage_keys(cls, v: Any) -> Any:
        if isinstance(v, dict):
            _check_stage_names(v)
            odd = [k for k, x in v.items() if not isinstance(x, bool)]
            if odd:
                raise ValueError(f"stage {odd[0]!r}: expected true/false, got {shown(v[odd[0]])}")
        elif not isinstance(v, bool):
            raise ValueError("must be true/false or a mapping of stage -> true/false")
        return v

    @model_validator(mode="after")
    def _baselines_need_groups(self) -> "Learner":
        for key in ("critic_baseline", "refine_baseline"):
            value = getattr(self, key)
            if value != "group" and self.algorithm == "ppo":
                raise ValueError(f"{key}: {value!r} replaces GRPO's group baseline; PPO's value head is its "
                                 f"baseline: use {key}: group with algorithm: ppo")
        return self


def check_ranks(cfg: Learner) -> None:
    """``learner.ranks > 1`` needs DeepSpeed at ZeRO 0-2: the ranks are DeepSpeed data-parallel processes, and
    ZeRO-3 gathers each module's parameters with a collective when the module is called, so every rank would
    have to call the same modules in the same order -- R3's stages differ per rank, and the ranks would hang.
    Checked at recipe validation (``train``, ``doctor``, ``plan``: before any model loads) and again where the
    ranks start (:class:`r3_rl.learner.ray_ranks.RankedLearner`); raises :class:`UserError` with one line."""
    if cfg.ranks == 1:
        return
    if cfg.backend != "deepspeed":
        raise UserError(f"learner.ranks: {cfg.ranks} ranks need learner.backend: deepspeed (got {cfg.backend}); "
                        f"use learner.backend: deepspeed with learner.deepspeed.zero_stage 0-2, or learner.ranks: 1")
    if cfg.deepspeed.zero_stage == 3:
        raise UserError(f"learner.deepspeed.zero_stage: 3 with learner.ranks: {cfg.ranks} is not supported (ZeRO-3 "
                        f"parameter gathers need every rank to call the same modules; R3 stages differ per rank); "
                        f"use learner.deepspeed.zero_stage 0-2 with ranks > 1, or learner.ranks: 1")
