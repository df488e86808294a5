"""The recipe-facing half of the BAGEL policy: its options, template placeholders and recipe checks.

Kept apart from :mod:`r3_rl.policy.bagel.policy` so that checking a recipe loads no model code (only the SDE-step
check imports :mod:`r3_rl.flow`, when the options are built); the policy class inherits it.  What the recipe says, and where it goes:

* ``policy.model``: a local checkpoint directory in the published BAGEL-7B-MoT layout (``llm_config.json``,
  ``vit_config.json``, ``ema.safetensors``, ``ae.safetensors``, the tokenizer); ``policy.dtype`` / ``policy.device``;
* ``templates``: R3's prompts.  Every text block is ``<|im_start|>`` + text + ``<|im_end|>`` with no role and no chat
  template (the policy adds the two markers, so a template must not contain them):
  ``system`` is the stage-A "think, then generate" system prompt (also the only text of generation's
  text-unconditional context), ``reason`` the user prompt block (``{prompt}``), ``reflect`` the reflection question
  (``{prompt}``), ``refine`` the edit instruction block (``{instruction}``).  ``generate`` and ``generate_uncond``
  are not used: generation's contexts are the reason stage's blocks plus the plan;
* ``rollout.<stage>``: text sampling (temperature, top-p, top-k, max_new_tokens) for reason/reflect; for
  generate/refine ``cfg_scale`` is the text-CFG scale and ``temperature: 0`` (or ``greedy``) draws the image with
  ODE steps only, on ``ode_steps`` grid points (R3's eval: 50), with nothing to train;
* ``policy.options`` (:meth:`BagelRecipe.from_recipe`): the flow-matching settings, R3's by default.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from r3_rl.errors import UserError, close_match

# R3's understanding system prompt (BAGEL's VLM_THINK_SYSTEM_PROMPT), used before the reflect stage's image
R3_REFLECT_SYSTEM = ("You should first think about the reasoning process in the mind and then provide the user with "
                     "the answer. \nThe reasoning process is enclosed within <think> </think> tags, i.e. <think> "
                     "reasoning process here </think> answer here")
RENORMS = ("none", "global", "channel", "text_channel")
MARKERS = ("<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>")
WEIGHT_FILES = ("ema.safetensors", "model.safetensors")   # as published, then as saved by other trainers
WEIGHT_INDEX = "model.safetensors.index.json"


@dataclass(frozen=True)
class BagelOptions:
    """``policy.options`` of ``policy.kind: bagel`` (defaults: the R3 reference's ``scripts/train_rl.sh``)."""

    image_size: int = 512                      # side of generated images (px; a multiple of 16)
    gen_steps: int = 16                        # grid points of generation (15 denoising steps)
    edit_steps: int = 21                       # grid points of editing (20 steps)
    ode_steps: int = 50                        # grid points of a draw with no SDE step (temperature 0: R3's eval)
    timestep_shift: float = 3.0                # t = s u / (1 + (s - 1) u)
    gen_eta: float = 0.7                       # eta(t) = c sqrt(t / (1 - min(t, 0.95)))
    edit_eta: float = 1.0
    gen_sde_count: int = 1                     # SDE steps per generated image, at random indices (shared by a group)
    edit_sde_count: int = 1
    edit_sde_max_index: int = 2                # edits' SDE steps only among the first 2 steps (R3)
    cfg_interval: tuple[float, float] = (0.4, 1.0)  # guidance iff lo < t <= hi
    image_cfg: float = 1.5                     # image-CFG of edits, >= 1; applied only on top of text-CFG
    #                                            (rollout.refine.cfg_scale > 1), as in BAGEL
    gen_renorm: str = "global"
    edit_renorm: str = "text_channel"
    share_initial_noise: bool = True           # siblings start from the same x_T (R3)
    vit_size: tuple[int, int, int] = (504, 252, 14)   # (max side, min side, stride) of images read by SigLIP
    vae_size: tuple[int, int, int] = (512, 256, 16)   # ... and of edit inputs encoded by the VAE
    reflect_system: str = R3_REFLECT_SYSTEM
    train_vit: bool = False                    # R3 freezes the ViT; the VAE is always frozen
    vae_dtype: str = "float32"
    # each loss trains its own expert only: text log-probs the understanding expert (+ embeddings, connector, lm_head),
    # image (SDE-step) log-probs the generation expert; false = one joint gradient (BAGEL's and the R3 reference's)
    expert_isolation: bool = True

    def __post_init__(self) -> None:
        for name in ("image_size", "gen_steps", "edit_steps", "ode_steps", "gen_sde_count", "edit_sde_count",
                     "edit_sde_max_index"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < (2 if "steps" in name else 1):
                raise UserError(f"policy.options.{name}: expected an integer >= {2 if 'steps' in name else 1}, "
                                f"got {value!r}")
        if self.image_size % 16:
            raise UserError(f"policy.options.image_size: {self.image_size} is not a multiple of 16 (px per token)")
        for name in ("timestep_shift", "gen_eta", "edit_eta", "image_cfg"):
            if not isinstance(getattr(self, name), (int, float)) or getattr(self, name) <= 0:
                raise UserError(f"policy.options.{name}: expected a number > 0, got {getattr(self, name)!r}")
        if self.image_cfg < 1:  # BAGEL guides with the image only above 1: a smaller scale would be ignored
            raise UserError(f"policy.options.image_cfg: expected a number >= 1 (1: no image guidance; BAGEL applies "
                            f"none below 1 either), got {self.image_cfg!r}")
        lo_hi = tuple(self.cfg_interval)
        if len(lo_hi) != 2 or not 0.0 <= lo_hi[0] < lo_hi[1] <= 1.0:
            raise UserError(f"policy.options.cfg_interval: expected [lo, hi] with 0 <= lo < hi <= 1, got {lo_hi}")
        object.__setattr__(self, "cfg_interval", (float(lo_hi[0]), float(lo_hi[1])))
        for name in ("gen_renorm", "edit_renorm"):
            if getattr(self, name) not in RENORMS:
                raise UserError(f"policy.options.{name}: {getattr(self, name)!r} is not one of {', '.join(RENORMS)}")
        for name in ("vit_size", "vae_size"):
            size = tuple(getattr(self, name))
            if len(size) != 3 or not all(type(v) is int and v > 0 for v in size) or size[1] > size[0]:
                raise UserError(f"policy.options.{name}: expected [max_side, min_side, stride] (positive integers, "
                                f"min <= max), got {list(size)}")
            object.__setattr__(self, name, size)
        if not isinstance(self.expert_isolation, bool):
            raise UserError(f"policy.options.expert_isolation: expected true or false, got {self.expert_isolation!r}")
        if self.vae_dtype not in ("float32", "bfloat16", "float16"):
            raise UserError(f"policy.options.vae_dtype: {self.vae_dtype!r} is not float32, bfloat16 or float16")
        self._check_sde_steps()

    def _check_sde_steps(self) -> None:
        """Each image kind's grid fine enough for its eta (``r3_rl.flow.schedule.check_sde_steps``)."""
        from r3_rl.flow.schedule import EtaSchedule, StochasticSteps, check_sde_steps, timestep_grid
        for kind, points, eta, steps in (
                ("gen", self.gen_steps, self.gen_eta, StochasticSteps("random", count=self.gen_sde_count)),
                ("edit", self.edit_steps, self.edit_eta,
                 StochasticSteps("random", count=self.edit_sde_count, max_index=self.edit_sde_max_index))):
            try:
                check_sde_steps(timestep_grid(points, self.timestep_shift), EtaSchedule("r3", eta), steps,
                                self.timestep_shift)
            except ValueError as e:
                raise UserError(f"policy.options.{kind}_eta {eta} with {kind}_steps {points}: {e}") from None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class BagelRecipe:
    """Mixin of :class:`~r3_rl.policy.bagel.policy.BagelPolicy` (``from_recipe`` builds that class)."""

    template_fields: dict[str, set[str]] = {"reason": {"prompt"}, "reflect": {"prompt"}, "refine": {"instruction"}}
    critic_features = False  # no value_features yet: PPO is refused at validation (it had waited for the model load)

    @classmethod
    def from_recipe(cls, recipe: Any, **options: Any) -> Any:
        """``policy.model`` in ``policy.dtype`` on ``policy.device``; ``options``: :class:`BagelOptions`' fields."""
        p = recipe.policy
        return cls.from_pretrained(p.model, templates=recipe.templates.model_dump(),  # type: ignore[attr-defined]
                                   dtype=p.dtype, device=p.device, options=bagel_options(options))

    @classmethod
    def check_recipe(cls, recipe: Any, source: str, weights: bool = True) -> None:
        """Options valid, templates free of BAGEL's markers, ``policy.model`` a checkpoint directory."""
        try:
            options = bagel_options(recipe.policy.options)
        except UserError as e:
            raise UserError(f"{source}: {e}") from None
        from r3_rl.flow.guidance import Guidance

        text_cfg = recipe.rollout.refine.cfg_scale  # an edit's guidance as the policy builds it (flow_settings)
        edit = Guidance(text_scale=float(text_cfg), image_scale=options.image_cfg)
        if "image_cfg" in recipe.policy.options and options.image_cfg > 1 and not edit.uses_image_branch:
            raise UserError(f"{source}: key 'policy.options.image_cfg': {options.image_cfg:g} has no effect while "
                            f"rollout.refine.cfg_scale is {text_cfg:g} (BAGEL guides an edit by the image only on top "
                            f"of its text guidance); set rollout.refine.cfg_scale above 1, or image_cfg: 1")
        for stage, text in recipe.templates.model_dump().items():
            for marker in MARKERS:
                if marker in text and stage in ("system", "reason", "reflect", "refine"):
                    raise UserError(f"{source}: key 'templates.{stage}': remove {marker}; the BAGEL policy wraps "
                                    f"every text block in <|im_start|> ... <|im_end|> itself")
        if not recipe.policy.model:
            raise UserError(f"{source}: key 'policy.model': the BAGEL policy needs a local checkpoint directory "
                            f"(BAGEL-7B-MoT's layout: llm_config.json, vit_config.json, ema.safetensors, "
                            f"ae.safetensors, tokenizer)")
        if weights:
            check_model_dir(recipe.policy.model)


def bagel_options(options: dict[str, Any]) -> BagelOptions:
    """``policy.options`` as :class:`BagelOptions`; a misspelt name is a one-line error listing the valid ones."""
    names = [f.name for f in fields(BagelOptions)]
    for key in options:
        if key not in names:
            raise UserError(f"policy.options: unknown option {key!r}{close_match(str(key), names)} for policy 'bagel' "
                            f"(valid: {', '.join(names)})")
    return BagelOptions(**options)


def check_model_dir(model: str) -> Path:
    """The checkpoint directory, once its files are all present (one line naming the first missing one)."""
    path = Path(model).expanduser()
    if not path.is_dir():
        raise UserError(f"policy.model: cannot load '{model}': not a local directory (download BAGEL-7B-MoT first, "
                        f"e.g. `hf download ByteDance-Seed/BAGEL-7B-MoT --local-dir DIR`)")
    for name in ("llm_config.json", "vit_config.json", "ae.safetensors"):
        if not (path / name).is_file():
            raise UserError(f"policy.model: cannot load '{model}': {name} is missing (not a BAGEL checkpoint?)")
    weight_set(path)
    return path


def weight_set(path: Path) -> list[Path]:
    """The files of the directory's weight set: ``ema.safetensors``, else ``model.safetensors``, else the shards of
    ``model.safetensors.index.json`` (the order :func:`~r3_rl.policy.bagel.checkpoint.load_bagel` reads them in)."""
    for name in WEIGHT_FILES:
        if (path / name).is_file():
            return [path / name]
    if not (path / WEIGHT_INDEX).is_file():
        raise UserError(f"policy.model: cannot load '{path}': no weights ({', '.join(WEIGHT_FILES)} or {WEIGHT_INDEX})")
    shards = sorted(set(read_weight_map(path).values()))
    missing = [s for s in shards if not (path / s).is_file()]
    if missing:
        raise UserError(f"policy.model: {path} lacks {len(missing)} of {len(shards)} weight shards ({missing[0]}, ...)")
    return [path / s for s in shards]


def read_weight_map(path: Path) -> dict[str, str]:
    """``model.safetensors.index.json``'s weight name -> shard file, each shard a file name beside the index: not a
    path out of the checkpoint (``/etc/x``, ``../x``).  The recipe check and the loader both read the index here."""
    index = path / WEIGHT_INDEX
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError):
        raise UserError(f"{index}: expected a JSON object with a 'weight_map'") from None
    if not isinstance(weight_map, dict) or not all(
            isinstance(v, str) and v not in ("", ".", "..") and Path(v).name == v for v in weight_map.values()):
        raise UserError(f"{index}: 'weight_map' must map each weight name to the file name of a shard in {path}")
    return weight_map


@dataclass
class StageTemplates:
    """The four texts the policy fills (see the module docstring)."""

    system: str = ""
    reason: str = "{prompt}"
    reflect: str = "{prompt}"
    refine: str = "{instruction}"

    @classmethod
    def from_templates(cls, templates: dict[str, str]) -> "StageTemplates":
        return cls(system=templates.get("system", ""), reason=templates.get("reason", "{prompt}"),
                   reflect=templates.get("reflect", "{prompt}"), refine=templates.get("refine", "{instruction}"))
