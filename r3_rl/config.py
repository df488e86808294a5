"""Recipes: YAML -> typed, validated configuration.

Every section is a pydantic model with ``extra="forbid"``: an unknown key is an error naming its
full path (with a close match), never silently ignored.  ``--set a.b=c`` overrides are parsed as
YAML scalars and applied before validation.  :func:`load_recipe` raises :class:`UserError` with one
line; the CLI prints it and exits 2.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, ValidationError, field_validator, model_validator

from r3_rl.config_base import Section
from r3_rl.config_errors import one_line
from r3_rl.config_base import plugin_name as _plugin_name
from r3_rl.config_learner import CriticReplayCfg, DeepSpeedCfg, FlowLearnerCfg, Learner, LoraCfg, PpoCfg, StageFlags  # noqa: F401 (re-exported)
from r3_rl.errors import UserError
from r3_rl.textfiles import yaml_load_unique
from r3_rl.trajectory import SamplingParams


# numpy refuses negative seeds (a traceback deep in the warm start), and seeds are offset by stream numbers
SEED_MAX = 2**31 - 1


class Sampling(Section):
    temperature: float = Field(1.0, ge=0.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=0)
    cfg_scale: float = Field(1.0, ge=0.0)
    max_new_tokens: int = Field(32, ge=1)
    greedy: bool = False

    def params(self) -> SamplingParams:
        return SamplingParams(**self.model_dump())


class TinyModel(Section):
    """Shape of the built-in tiny token-unified policy (a Llama config built from scratch)."""

    hidden_size: int = Field(128, ge=1)
    num_layers: int = Field(4, ge=1)
    num_heads: int = Field(4, ge=1)
    intermediate_size: int = Field(256, ge=1)
    max_positions: int = Field(256, ge=1)
    # how the critic, the refiner and the yes/no answers read an image: its generation tokens (one per cell), or
    # words (a colour and a shape word per cell, "empty empty" for background) -- the tiny model's counterpart of
    # a unified model's separate understanding encoder (Janus: SigLIP features, not VQ codes; README: R3 synergy)
    image_input: Literal["tokens", "words"] = "tokens"
    # "modality": a Mixture-of-Transformers as BAGEL-7B-MoT is built -- image tokens and text tokens get their own
    # attention projections, feed-forward blocks and norms, attention runs over both (r3_rl.policy.tiny_mot)
    experts: Literal["shared", "modality"] = "shared"


class Policy(Section):
    # a registered policy (tiny, janus; `r3_rl.policy.registry`), `pkg.module:Class` or `path/file.py:Class`
    kind: str = "tiny"
    options: dict[str, Any] = Field(default_factory=dict)  # keyword arguments of the policy's from_recipe
    model: str | None = None  # hub id or local path; None = build the tiny model from `tiny`
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    device: str = "cpu"
    tiny: TinyModel = TinyModel()

    @field_validator("kind")
    @classmethod
    def _known_kind(cls, v: Any) -> Any:
        from r3_rl.policy.registry import POLICIES

        return _plugin_name(POLICIES, v)


class Templates(Section):
    """Prompt templates (placeholders: {prompt} {plan} {image} {instruction})."""

    system: str = ""
    reason: str = "<|im_start|> {prompt} <|im_end|> <|im_start|>"
    generate: str = "<image>"
    generate_uncond: str = "<|im_start|> <|im_end|> <image>"
    reflect: str = ("<|im_start|> {prompt} <image> {image} </image> how to further edit the image ? "
                    "<|im_end|> <|im_start|>")
    refine: str = "<|im_start|> {prompt} <image> {image} </image> {instruction} <|im_end|> <image>"
    stop_phrase: str = "no further edit needed"

    @field_validator("stop_phrase")
    @classmethod
    def _a_phrase(cls, v: str) -> str:
        if not v.strip():  # "" is in every critique: every critique would stop, and refinement never train
            raise ValueError("a blank phrase is in every critique (every critique would stop); give the words that "
                             "end the loop, e.g. 'no further edit needed'")
        return v


class BlocksData(Section):
    rows: int = Field(4, ge=2, le=8)
    cols: int = Field(4, ge=2, le=8)
    tags: dict[str, float] = Field(default_factory=lambda: {
        "single_object": 1, "two_object": 1, "counting": 1, "colors": 1, "position": 1, "color_attr": 1})


class Data(Section):
    source: Literal["blocks", "geneval", "tiif", "hf"] = "blocks"
    train: str | None = None  # built-in set (geneval:train, ...; `r3-rl data`), jsonl path or `datasets` name (hf)
    eval: str | None = None
    prompt_column: str = "prompt"  # record field / dataset column with the prompt (tiif: short_description)
    train_split: str = "train"  # `datasets` split for data.train (hf)
    eval_split: str = "test"  # `datasets` split for data.eval, or of data.train when data.eval is unset (hf)
    eval_size: int = Field(192, ge=1)  # held-out prompts per eval (a seeded subset when the file is larger)
    blocks: BlocksData = BlocksData()

    @model_validator(mode="before")
    @classmethod
    def _builtin_sets(cls, v: Any) -> Any:
        """Built-in names (``geneval:train``, ``r3-rl data``) set ``source`` when it is left out."""
        from r3_rl.prompt_sets import infer_source

        return infer_source(v) if isinstance(v, dict) else v


class Warmstart(Section):
    """Supervised warm start of the tiny policy on synthetic R3 trajectories (Blocks world)."""

    steps: int = Field(0, ge=0)
    batch_size: int = Field(64, ge=1)
    lr: float = Field(2e-3, gt=0.0)
    flaw_prob: float = Field(0.5, ge=0.0, le=1.0)  # first images deliberately flawed this often
    fix_prob: float = Field(0.7, ge=0.0, le=1.0)  # refine targets apply the right fix this often
    rounds: int = Field(3, ge=0)
    seed: int = Field(0, ge=0, le=SEED_MAX)
    questions: int = Field(1, ge=0)  # yes/no questions about each first image, answered with the truth
    random_layouts: float = Field(0.0, ge=0.0, le=1.0)  # critique chains on a randomly laid-out image this often
    random_edits: float = Field(0.0, ge=0.0, le=1.0)  # + a random instruction applied exactly (no-op if it does not apply)
    miss_prob: float = Field(0.0, ge=0.0, le=1.0)  # a flawed image's critique says "no further edit needed" (lenient)
    # critiques first say what the image holds, then the verdict: "objects" lists them ("the image has a blue
    # circle and two red circles"), "counts" first totals each shape ("the image has three circles with ...");
    # true = "objects", false = "none" (README: R3 synergy)
    describe: Literal["none", "objects", "counts"] = "none"
    critic_steps: int = Field(0, ge=0)  # + steps of half critiques (flaw kinds drawn evenly), half main-step examples

    @field_validator("describe", mode="before")
    @classmethod
    def _describe_bool(cls, v: Any) -> Any:
        return {True: "objects", False: "none"}.get(v, v) if isinstance(v, bool) else v

    @model_validator(mode="after")
    def _critic_steps_follow_the_main_ones(self) -> "Warmstart":
        """``steps: 0`` is no warm start at all: critic steps there would be silently skipped."""
        if self.critic_steps and not self.steps:
            raise ValueError(f"critic_steps={self.critic_steps} run after the main warm-start steps, but steps=0 "
                             f"(no warm start); set steps >= 1 or critic_steps: 0")
        return self


class Tree(Section):
    """Tree-RL: stage groups of `group_size` siblings."""

    group_size: int = Field(8, ge=2)
    prompts_per_step: int = Field(8, ge=1)  # stage A groups (reason -> generate) per step
    refine_groups_per_step: int = Field(8, ge=0)  # stage B/C groups (reflect -> refine) per step
    correct_parent_fraction: float = Field(0.15, ge=0.0, le=1.0)
    parent_balance: Literal["pool", "tag", "prompt"] = "pool"  # "tag" / "prompt": correct_parent_fraction within every tag / prompt
    buffer_size: int = Field(512, ge=1)
    max_round: int = Field(3, ge=1)  # refine-stage parents come from rounds < max_round
    # "together": every step runs both stages, parents drawn from a buffer of the last `buffer_size` images of
    # each kind (first images and refined ones).  "alternate": the reference's schedule (sen-ye/R3 online_rl.py,
    # rounds 2): even steps run stage A only and their first images replace the buffer; odd steps run stages B+C
    # only, on parents from the step before (first images only: max_round has no effect)
    schedule: Literal["together", "alternate"] = "together"

    @model_validator(mode="after")
    def _alternate_needs_both_stages(self) -> "Tree":
        if self.schedule == "alternate" and self.refine_groups_per_step < 1:
            raise ValueError("schedule 'alternate' runs stages B+C on odd steps: refine_groups_per_step must be "
                             ">= 1 (or use schedule 'together')")
        return self


class RewardSpec(Section):
    name: str
    weight: float = 1.0
    options: dict[str, Any] = Field(default_factory=dict)


class ReflectRewards(Section):
    """How a critique is rewarded (``rewards/compose.py``: ``CriticRule``); the defaults are the reference's."""

    stop_correct: float = 1.0  # "no further edit needed" on a correct image
    stop_flawed: float = 0.0  # "no further edit needed" on a flawed image (negative = a penalty)
    edit_correct: float = 0.0  # added to the (<= 0) improvement of an edit of a correct image
    # added to an edit of a flawed image that leaves it no better; = stop_flawed scores such an edit as a stop
    edit_flawed_unimproved: float = 0.0
    extra: list[RewardSpec] = Field(default_factory=list)  # rewards scored on critiques, e.g. verdict_consistency
    # the task reward's part that says whether an image is correct (e.g. blocks/correct: GenEval's verdict,
    # as the eval judges, while training on partial credit); null = task reward >= correct_threshold
    correct_part: str | None = None


class Rewards(Section):
    task: list[RewardSpec] = Field(default_factory=lambda: [RewardSpec(name="blocks")])
    eval: list[RewardSpec] = Field(default_factory=lambda: [RewardSpec(name="blocks", options={"binary": True})])
    format_weight: float = 0.1
    reason_format: str = r"^<think>.*</think>$"
    reflect_format: str = r"^<think>.*</think>.+$"
    correct_threshold: float = 1.0  # task reward at/above which an image counts as correct
    max_failure_fraction: float = Field(0.5, ge=0.0, le=1.0)
    reflect: ReflectRewards = ReflectRewards()


class Rollout(Section):
    """Who samples: in-process (``local``, for debugging) or ``rollout.workers`` Ray actors (``ray``)."""

    backend: Literal["local", "ray"] = "local"
    workers: int = Field(1, ge=1)  # Ray rollout actors, each holding a copy of the policy
    # sibling groups per work unit: the unit a worker samples (and re-samples if it dies); the same
    # split in local and Ray mode, so the same seeds give the same trajectories in both
    groups_per_task: int = Field(4, ge=1)
    cpus_per_worker: float = Field(1.0, gt=0.0)
    gpus_per_worker: float = Field(0.0, ge=0.0)
    threads_per_worker: int = Field(0, ge=0)  # torch threads in a worker (0 = cpus_per_worker)
    reward_workers: int = Field(0, ge=0)  # Ray actors scoring the task reward (0 = score in the trainer)
    # GPU share of each reward actor; 0: it sees no GPU (a reward on device auto runs on CPU, not on GPU 0)
    gpus_per_reward_worker: float = Field(0.0, ge=0.0)
    max_task_retries: int = Field(3, ge=0)  # times one task may lose its worker before the step fails
    # (also the attempts at restarting a lost worker); a worker that cannot be restarted is dropped and the
    # run carries on while at least min_workers remain, else it stops with one line (exit 2)
    min_workers: int = Field(1, ge=1)
    reason: Sampling = Sampling(max_new_tokens=16)
    generate: Sampling = Sampling()
    reflect: Sampling = Sampling(max_new_tokens=24)
    refine: Sampling = Sampling()
    # > 0: a parent whose critiques all gave one verdict is critiqued again at this temperature (GRPO learns
    # nothing from a group that agrees; README: R3 synergy); 0 = off
    verdict_rescue_temperature: float = Field(0.0, ge=0.0)

    @model_validator(mode="after")
    def _min_workers(self) -> "Rollout":
        if self.min_workers > self.workers:
            raise ValueError(f"min_workers={self.min_workers} must be <= workers={self.workers}")
        return self


class RayCfg(Section):
    """``address: auto`` joins a running cluster (``ray start --head``); unset starts a local Ray that the
    run shuts down when it ends."""

    address: str | None = None
    num_cpus: int | None = Field(None, ge=1)  # a local Ray's CPUs (default: the machine's cores)
    # a local Ray's object store in GB (default: Ray's, 30% of the node's memory, at most 200 GB or /dev/shm);
    # `r3-rl plan` lists what the run keeps there, `r3-rl doctor` compares it with the store the node would get
    object_store_gb: float | None = Field(None, gt=0)
    log_to_driver: bool = True  # print the actors' stdout/stderr in the trainer's console
    # how long to wait for the cluster: an actor to find a node with room; one call (weight load, rollout task,
    # reward batch, checkpoint); one collective between learner ranks (then a rank lost mid-step stops the run)
    placement_timeout_s: float = Field(60.0, gt=0)
    call_timeout_s: float = Field(900.0, gt=0)
    collective_timeout_s: float = Field(600.0, gt=0)

    @model_validator(mode="after")
    def _local_only(self) -> "RayCfg":
        """A joined cluster keeps the CPUs and store `ray start` gave it: ray.init refuses them with an address."""
        given = [k for k in ("num_cpus", "object_store_gb") if getattr(self, k) is not None]
        if self.address and given:
            raise ValueError(f"{' and '.join(given)} {'size' if len(given) > 1 else 'sizes'} a local Ray and cannot "
                             f"be set with address {self.address!r} (give it to `ray start` on the cluster instead)")
        return self


class Understanding(Section):
    """What every eval measures of the critic besides accuracy (``eval/understanding.py``)."""

    yes_no: bool = True  # ask the policy the prompts' yes/no questions about its own images
    max_questions: int | None = Field(None, ge=1)  # per image (first ones); None = all
    # fixed reference images: "auto" = Blocks pairs (one correct, one flawed per held-out prompt) when
    # data.source is blocks, else none; a jsonl of {prompt, metadata, image: png path}; null = none
    reference: str | None = "auto"
    reference_size: int = Field(96, ge=1)  # Blocks: held-out prompts, two images each


class Eval(Section):
    every: int = Field(0, ge=0)  # steps between evals during training (0 = before and after only)
    rounds: int = Field(3, ge=0)  # refine rounds after the first image
    # Texts (plans, critiques) are decoded greedily by default; images are sampled at this temperature
    # with a fixed seed, as GenEval evaluates image generators (greedy per-cell decoding of image tokens
    # collapses to the most frequent cell value, e.g. an empty grid).
    text_temperature: float = Field(0.0, ge=0.0)  # 0 = greedy
    image_temperature: float = Field(1.0, ge=0.0)  # 0 = greedy
    size: int | None = Field(None, ge=1)  # defaults to data.eval_size
    batch_size: int = Field(256, ge=1)  # prompts whose R3 chains are sampled together (GPU memory: `r3-rl plan`)
    dump: int = Field(64, ge=0)  # eval chains written to eval/<name>_trajectories.jsonl + .html (0 = none)
    understanding: Understanding = Understanding()


class Log(Section):
    tensorboard: bool = True
    trajectories_every: int = Field(10, ge=0)
    chains: int = Field(2, ge=0)  # full R3 chains sampled for the logs at those steps (not trained on)
    dump_trees: int = Field(64, ge=0)  # trees of such a step written to trajectories/ (spread over tree kinds and tags)
    console: bool = True


class Recipe(Section):
    name: str = "run"
    seed: int = Field(0, ge=0, le=SEED_MAX)
    steps: int = Field(100, ge=0)
    save_every: int = Field(0, ge=0)
    keep_last: int = Field(2, ge=1)
    out_dir: str = "runs"
    threads: int = Field(0, ge=0)  # torch intra-op threads (0 = torch default)
    policy: Policy = Policy()
    templates: Templates = Templates()
    data: Data = Data()
    warmstart: Warmstart = Warmstart()
    tree: Tree = Tree()
    rewards: Rewards = Rewards()
    learner: Learner = Learner()
    rollout: Rollout = Rollout()
    ray: RayCfg = RayCfg()
    eval: Eval = Eval()
    log: Log = Log()

    @field_validator("name")
    @classmethod
    def _name_is_path_safe(cls, v: str) -> str:
        # the name starts the run folder's name: a tab or a newline in it would make a folder no shell lists plainly
        if not v or any(c in "/\\" or c.isspace() or not c.isprintable() for c in v):
            raise ValueError("must be non-empty with no '/', '\\', spaces or control characters")
        return v


# ------------------------------------------------------------------------------------------------

def parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise UserError(f"--set {item!r}: expected KEY=VALUE, e.g. --set learner.lr=1e-4")
    key, _, raw = item.partition("=")
    try:
        value = yaml_load_unique(raw) if raw != "" else ""
    except yaml.constructor.ConstructorError as e:  # a duplicate key (or a bad tag): never a silent choice
        raise UserError(f"--set {item!r}: {(str(e.problem or e).splitlines() or [''])[0]}") from None
    except yaml.YAMLError:
        value = raw
    except RecursionError:  # thousands of "[": as the recipe file's own check says, never a traceback
        raise UserError(f"--set {key.strip()}=...: value nested too deeply ({len(raw)} characters)") from None
    return key.strip().split("."), value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    for item in overrides:
        keys, value = parse_override(item)
        cur = data
        for k in keys[:-1]:
            nxt = cur.get(k)
            if nxt is None:
                nxt = cur[k] = {}
            if not isinstance(nxt, dict):
                raise UserError(f"--set {item!r}: '{k}' is not a section")
            cur = nxt
        cur[keys[-1]] = value
    return data


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    """Read, override and type-check a recipe (the deeper checks are :func:`r3_rl.validate.validate_recipe`)."""
    from r3_rl.textfiles import check_expanded_size, read_recipe_yaml

    path = Path(path)
    data = apply_overrides(read_recipe_yaml(path), overrides or [])
    check_expanded_size(data, str(path))
    try:
        return Recipe.model_validate(data)
    except ValidationError as e:
        raise UserError(one_line(e, str(path), Recipe)) from None


def recipe_yaml(recipe: Recipe) -> str:
    """The resolved recipe as ``recipe.yaml`` holds it."""
    return yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False)


def save_recipe(recipe: Recipe, path: str | Path) -> None:
    Path(path).write_text(recipe_yaml(recipe))
