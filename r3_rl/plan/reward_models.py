"""The reward models a run puts on a GPU, sized for ``r3-rl plan`` (and so for the doctor's memory check).

Which process holds which: the trainer process loads its eval rewards' models and, unless
``rollout.reward_workers`` score the task reward, the task rewards' too; each reward worker loads the task
rewards' models.  A process loads a model once per (model, dtype) -- ``rewards/clip.py``'s ``shared_model``:
GenEval's colour CLIP and a ``clip`` reward on the same id are one copy -- so each is counted once per process.
A reward on ``device: cpu`` is not on a GPU.

Sizes are the weights only (a reward's forward over ``batch_size`` images is not counted): exact from the
safetensors headers where the weights are on this machine (a folder, or a hub id in the Hugging Face cache:
nothing is downloaded), else the parameter count of the defaults (:data:`KNOWN_PARAMS`), else the model is
listed as not counted.  Until 2026-12-06 the plan listed every reward model as not counted.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Iterable

from r3_rl.weights import DTYPE_BYTES, WeightsMissing, count_params, locate, weight_files

# The default reward models' parameters, counted on the meta device with transformers' own classes built to
# the published architectures (CLIP ViT-L/14: 427.6 M, as its model card says; Mask2Former's defaults with a
# Swin-S backbone and COCO's 80 instance classes; OWLv2's defaults, which are B/16), as
# tests/test_plan_reward_models.py counts them again.
CLIP_L14 = "openai/clip-vit-large-patch14"
OPEN_CLIP_L14 = "ViT-L-14"  # open_clip's name for it: what ClipEncoder loads for the default under open_clip
MASK2FORMER_SWIN_S = "facebook/mask2former-swin-small-coco-instance"
OWLV2_B16 = "google/owlv2-base-patch16-ensemble"
KNOWN_PARAMS = {CLIP_L14: 427_616_513, MASK2FORMER_SWIN_S: 68_741_083, OWLV2_B16: 153_971_464}
DETECTORS = {"mask2former": MASK2FORMER_SWIN_S, "owlv2": OWLV2_B16}  # geneval's ``detector`` -> default model


@dataclass(frozen=True)
class RewardModel:
    """One model a reward loads: ``params`` None when the plan has no size for it."""

    role: str  # "geneval detector (mask2former)", "CLIP"
    model: str  # hub id, folder, or open_clip architecture
    dtype: str
    params: int | None
    sized_from: str  # "weights on this machine", "published config", or why it is not counted

    @property
    def bytes(self) -> float:
        return float(self.params or 0) * DTYPE_BYTES.get(self.dtype, 4)

    def describe(self) -> str:
        size = f"{self.params / 1e6:.0f} M, " if self.params else ""
        return f"{self.role}: {self.model}, {size}{self.dtype} ({self.sized_from})"


def _params(model: str) -> tuple[int | None, str]:
    try:
        folder = locate(model, key="reward model")
        files = weight_files(folder, key="reward model")
        return count_params(files, json.loads((folder / "config.json").read_text())), "weights on this machine"
    except (WeightsMissing, OSError, ValueError):
        pass
    if model in KNOWN_PARAMS:
        return KNOWN_PARAMS[model], "published config"
    return None, "not on this machine"


def models_of(spec: Any) -> list[RewardModel]:
    """The models one reward entry (``rewards.task`` / ``rewards.eval`` item) loads on a GPU."""
    options = spec.options or {}
    if spec.name not in ("geneval", "clip") or options.get("device", "auto") == "cpu":
        return []
    dtype = str(options.get("dtype", "float32"))
    prefix = "" if spec.name == "clip" else "clip_"
    clips: list[tuple[str, str]] = []
    if options.get(f"{prefix}backend", "transformers") == "open_clip":
        arch = str(options.get(f"{prefix}model", OPEN_CLIP_L14))
        arch = OPEN_CLIP_L14 if arch == CLIP_L14 else arch  # as ClipEncoder reads it
        out = [RewardModel("CLIP (open_clip)", arch, dtype, None, "an open_clip architecture, no weights to size")]
    else:
        clips.append(("CLIP", str(options.get(f"{prefix}model") or CLIP_L14)))
        out = []
    if spec.name == "geneval":
        detector = str(options.get("detector", "mask2former"))
        clips.insert(0, (f"geneval detector ({detector})", str(options.get("model") or DETECTORS.get(detector, ""))))
    for role, model in clips:
        params, how = _params(model)
        out.append(RewardModel(role, model, dtype, params, how))
    return out


def reward_models(specs: Iterable[Any]) -> list[RewardModel]:
    """Every model ``specs`` load in one process, each (model, dtype) once."""
    seen: dict[tuple[str, str], RewardModel] = {}
    for spec in specs:
        for m in models_of(spec):
            seen.setdefault((m.model, m.dtype), m)
    return list(seen.values())


def trainer_reward_specs(recipe: Any) -> list[Any]:
    """The reward entries the trainer process scores: eval, and task unless reward workers score it."""
    return list(recipe.rewards.eval) + ([] if recipe.rollout.reward_workers else list(recipe.rewards.task))
