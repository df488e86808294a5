"""The recipe-facing half of the tiny policy: template placeholders, recipe checks, construction from a recipe.

Kept apart from :mod:`r3_rl.policy.tiny` (torch, transformers) so that checking a recipe imports neither:
``r3-rl train`` rejects a bad recipe in about a second.  :class:`~r3_rl.policy.tiny.TinyUnifiedPolicy`
inherits it, so the class is still the whole policy family.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from r3_rl.errors import UserError

# The tail of the tiny policy's "cannot load" error: advice about the recipe, which `r3-rl eval` drops because
# its model is --checkpoint, not policy.model.
BUILD_TINY_HINT = " (or leave policy.model empty to build the tiny model)"

# reflect tokens a described critique (``warmstart.describe``) of a busy 4x4 grid needs: the longest of 3000
# synthetic ones is 28 words with "objects", 31 with "counts", verdict included
DESCRIBED_CRITIQUE_TOKENS = 40
GRID_FILE = "r3_grid.json"  # what save_pretrained adds beside the weights: grid size, version, image_input
# config.json attribute of a tiny model with modality experts: [first image-token id, end) (r3_rl.policy.tiny_mot)
EXPERTS_CONFIG_KEY = "r3_image_token_span"
MAX_PARAMS = 2_000_000_000  # fp32 weights + AdamW = 16 bytes a parameter: 32 GB already


class TinyRecipe:
    """Mixin of :class:`~r3_rl.policy.tiny.TinyUnifiedPolicy` (``from_recipe`` builds that class)."""

    replays_critiques = True  # learner.critic_replay: the warm start's critiques (r3_rl.policy.critique_replay)
    template_fields: dict[str, set[str]] = {"reason": {"prompt"}, "reflect": {"prompt", "image"},
                                            "refine": {"prompt", "image", "instruction"}}

    @classmethod
    def from_recipe(cls, recipe: Any) -> Any:
        """``policy.model`` (a ``save_pretrained`` folder), or a random model of ``policy.tiny``'s shape; in
        ``policy.dtype``, the compute dtype of rollout and learner."""
        from r3_rl.policy.base import DTYPES

        templates = recipe.templates.model_dump()
        if recipe.policy.model:
            policy = cls.from_pretrained(recipe.policy.model, templates)  # type: ignore[attr-defined]
        else:
            t = recipe.policy.tiny
            policy = cls.build(templates, recipe.data.blocks.rows, recipe.data.blocks.cols,  # type: ignore[attr-defined]
                               hidden_size=t.hidden_size, num_layers=t.num_layers, num_heads=t.num_heads,
                               intermediate_size=t.intermediate_size, max_positions=t.max_positions,
                               seed=recipe.seed, image_input=t.image_input,
                               experts=t.experts)
        policy.model.to(DTYPES[recipe.policy.dtype])
        return policy

    @classmethod
    def skeleton(cls, recipe: Any) -> Any:
        """The random-weight build itself, before the warm start: a tiny model builds in milliseconds, and its
        construction computes (palette codes) where the meta device cannot.  A saved ``policy.model`` has no warm
        start and loads in a moment: its module is checked once loaded."""
        return None if recipe.policy.model else cls.from_recipe(recipe, **recipe.policy.options)

    @classmethod
    def check_recipe(cls, recipe: Any, source: str, weights: bool = True) -> None:
        """CPU only; a head count that divides the width; a size a CPU can hold; ``policy.model`` is a folder."""
        if not recipe.policy.device.startswith("cpu"):
            raise UserError(f"{source}: key 'policy.device': the tiny policy runs on the CPU only, "
                            f"got {recipe.policy.device!r}")
        t = recipe.policy.tiny
        if t.hidden_size % t.num_heads:
            raise UserError(f"{source}: key 'policy.tiny.hidden_size': {t.hidden_size} is not a multiple of "
                            f"policy.tiny.num_heads={t.num_heads}")
        copies = 2 if t.experts == "modality" else 1  # modality experts: two of every projection
        params = copies * t.num_layers * (4 * t.hidden_size ** 2 + 3 * t.hidden_size * t.intermediate_size)
        if params > MAX_PARAMS:
            raise UserError(f"{source}: policy.tiny: about {params:.3g} parameters, over the limit of "
                            f"{MAX_PARAMS:.0e} for the tiny CPU policy (use policy.kind: janus for real models)")
        if t.image_input != "tokens" and recipe.policy.kind != "tiny":
            raise UserError(f"{source}: key 'policy.tiny.image_input': {t.image_input!r} is for policy.kind tiny; "
                            f"{recipe.policy.kind} reads images as 'tokens'")
        if t.experts != "shared" and recipe.policy.kind != "tiny":
            raise UserError(f"{source}: key 'policy.tiny.experts': {t.experts!r} is for policy.kind tiny; "
                            f"{recipe.policy.kind} has the experts its own architecture has")
        room = recipe.rollout.reflect.max_new_tokens
        need = DESCRIBED_CRITIQUE_TOKENS
        if recipe.warmstart.describe != "none" and recipe.warmstart.steps and room < need:
            raise UserError(f"{source}: key 'rollout.reflect.max_new_tokens': {room} cuts short the critiques "
                            f"warmstart.describe={recipe.warmstart.describe} teaches; give at least {need}")
        model = recipe.policy.model
        if weights and model and not (Path(model).expanduser() / "config.json").is_file():
            raise UserError(f"policy.model: cannot load '{model}': no config.json there; give a directory written "
                            f"by save_pretrained{BUILD_TINY_HINT}")
        if weights and model and "image_input" in t.model_fields_set:  # a saved model reads images its own way
            grid_file = Path(model).expanduser() / GRID_FILE
            try:
                saved = json.loads(grid_file.read_text()).get("image_input", "tokens")
            except (OSError, ValueError, AttributeError):
                saved = "tokens"  # no readable grid file: a folder saved before the option
            if saved != t.image_input:
                raise UserError(f"{source}: key 'policy.tiny.image_input': {t.image_input!r}, but the model in "
                                f"{model} was trained with {saved!r}; drop the key or give {saved!r}")
        if weights and model and "experts" in t.model_fields_set:  # the saved weights have the shape they have
            saved = _saved_experts(Path(model).expanduser() / "config.json")
            if saved != t.experts:
                raise UserError(f"{source}: key 'policy.tiny.experts': {t.experts!r}, but the model in {model} "
                                f"has {saved!r} experts; drop the key or give {saved!r}")


def _saved_experts(config_file: Path) -> str:
    """``policy.tiny.experts`` of a saved tiny model: its config.json names an image-token span or not."""
    try:
        return "modality" if json.loads(config_file.read_text()).get(EXPERTS_CONFIG_KEY) else "shared"
    except (OSError, ValueError, AttributeError):
        return "shared"
