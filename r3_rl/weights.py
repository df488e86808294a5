"""Where a model's weights are -- a local folder or the Hugging Face hub cache, never the network -- and how
big the run's checkpoints will be.

Used by ``r3-rl doctor`` before hours of GPU time: a missing shard or a half-finished download must show
up as one line with the command that fixes it, not as a traceback after the Ray cluster has started.
Parameter counts come from the safetensors headers (a few KB read per file), so nothing is loaded.
"""
from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from r3_rl.errors import UserError

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2, "fp32": 4, "bf16": 2}
SAFETENSORS_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
                     "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}
# The parent buffer (state/buffer.safetensors) keeps each image's tokens as int32 plus its entry's JSON
# metadata (prompt, GenEval metadata, reward, source): measured 260-520 bytes per entry.
BUFFER_ENTRY_BYTES = 512
VQ_PATCH = 16  # pixels per image token side (Janus-Pro's VQ-16)


class WeightsMissing(Exception):
    """The weights are not where the recipe says; ``fix`` is the command or key that makes them so."""

    def __init__(self, message: str, fix: str) -> None:
        super().__init__(message)
        self.fix = fix


@dataclass
class ModelFacts:
    """What the doctor needs to know about the recipe's policy model."""

    where: str  # a folder, or how the model is built
    params: int
    image_pixels: int  # height x width of one generated image
    folder: Path | None = None  # the folder with config.json and weights (None: built from the recipe)


def hub_cache() -> Path:
    """The hub cache ``huggingface_hub`` reads (``HF_HUB_CACHE`` / ``HF_HOME`` respected)."""
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def _looks_like_repo_id(name: str) -> bool:
    parts = name.split("/")
    return len(parts) == 2 and all(parts) and not name.startswith((".", "~")) and "\\" not in name


def locate(model: str, key: str = "policy.model", cache_dir: str | Path | None = None,
           local: str | None = None) -> Path:
    """The local folder holding ``model`` (a folder path, or a hub id found in the hub cache).

    ``key`` names the setting in messages; ``local`` says how to point it at a folder instead."""
    local = local or f"--set {key}=/path/to/local/folder"
    path = Path(model).expanduser()
    if path.exists() or not _looks_like_repo_id(model):
        if not path.is_dir():
            raise WeightsMissing(f"{key} {model!r}: no such folder",
                                 f"{local} (a folder with config.json and weights), or a hub id")
        return path
    from huggingface_hub import try_to_load_from_cache

    cache = Path(cache_dir) if cache_dir is not None else hub_cache()
    found = try_to_load_from_cache(model, "config.json", cache_dir=str(cache))
    if not isinstance(found, str):
        raise WeightsMissing(f"{key} {model!r} is not in the Hugging Face cache ({cache})",
                             f"download it first: `hf download {model}`, or {local}")
    return Path(found).parent


def weight_files(folder: Path, key: str = "policy.model") -> list[Path]:
    """The weight files of a ``save_pretrained`` folder, every shard of a sharded index present."""
    if not (folder / "config.json").is_file():
        raise WeightsMissing(f"{key}: {folder} has no config.json", "point it at a folder written by save_pretrained")
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = folder / index_name
        if index.is_file():
            try:  # cut off mid-download, or not an index: one line with the fix, not a JSONDecodeError
                weight_map = json.loads(index.read_text(errors="replace")).get("weight_map")
                shards = sorted(set(weight_map.values()))
                if not shards or not all(isinstance(s, str) for s in shards):
                    raise ValueError("no shard names")
            except (ValueError, AttributeError, TypeError, RecursionError) as e:
                raise WeightsMissing(f"{key}: {index} is not a readable shard index with a 'weight_map' "
                                     f"({type(e).__name__}): an interrupted download?",
                                     "download the model again (`hf download REPO` resumes)") from None
            missing = [s for s in shards if not (folder / s).is_file()]
            if missing:
                raise WeightsMissing(f"{key}: {folder} lacks {len(missing)} of {len(shards)} weight shards "
                                     f"({missing[0]}, ...): an interrupted download?",
                                     "download the model again (`hf download REPO` resumes)")
            return [folder / s for s in shards]
    files = sorted(folder.glob("*.safetensors")) or sorted(folder.glob("*.bin"))
    files = [f for f in files if f.is_file()]  # a dangling hub-cache link is a file not downloaded
    if not files:
        raise WeightsMissing(f"{key}: {folder} has no weight files (*.safetensors / *.bin)",
                             "download the model again, or point at a folder written by save_pretrained")
    return files


SAFETENSORS_MAX_HEADER = 100_000_000  # bytes: the safetensors library refuses a longer header too


def safetensors_params(path: Path) -> int:
    """Number of values stored in a safetensors file, from its header and its size.  A file that is not one -- a
    download cut short (in the header or in the tensors after it), a header length no real file has (read before
    anything is allocated for it) -- is
    :class:`WeightsMissing`, which ``r3-rl doctor`` and ``r3-rl plan`` report in one line."""
    def damaged(why: str) -> WeightsMissing:
        return WeightsMissing(f"{path}: not a complete safetensors file ({why})",
                              "download the model again, or point at a folder written by save_pretrained")

    with open(path, "rb") as fh:
        head = fh.read(8)
        if len(head) != 8:
            raise damaged(f"{len(head)} bytes, shorter than the 8-byte header length")
        (n,) = struct.unpack("<Q", head)
        if n > SAFETENSORS_MAX_HEADER:
            raise damaged(f"a header length of {n} bytes, over {SAFETENSORS_MAX_HEADER}")
        raw = fh.read(n)
    if len(raw) != n:
        raise damaged(f"the header is cut at {len(raw)} of {n} bytes")
    try:
        tensors = [t for k, t in json.loads(raw).items() if k != "__metadata__"]
        count = sum(math.prod(t["shape"]) for t in tensors)
        data_end = max((int(t["data_offsets"][1]) for t in tensors), default=0)
    except (ValueError, RecursionError, AttributeError, TypeError, KeyError, IndexError):
        raise damaged("the header is not a JSON object of tensors with shapes and data offsets") from None
    size = path.stat().st_size
    if size < 8 + n + data_end:  # the header arrived whole, the tensors did not
        raise damaged(f"{size} bytes, the header names {8 + n + data_end}")
    return count


def count_params(files: list[Path], config: dict[str, Any]) -> int:
    """Parameters in ``files``: exact for safetensors, file size / dtype size for ``.bin``."""
    total = 0
    for f in files:
        if f.suffix == ".safetensors":
            total += safetensors_params(f)
        else:
            total += f.stat().st_size // DTYPE_BYTES.get(str(config.get("torch_dtype", "float32")), 4)
    return total


def image_side(config: dict[str, Any]) -> int:
    """Side of a generated Janus image: VQ patches per side x the decoder's upsampling (384 for Janus-Pro)."""
    vq = config.get("vq_config") or {}
    return int(vq.get("num_patches", 24)) * 2 ** (len(vq.get("channel_multiplier", [1, 1, 2, 2, 4])) - 1)


def policy_facts(recipe: Any, cache_dir: str | Path | None = None) -> ModelFacts:
    """Size facts about the recipe's policy; :class:`WeightsMissing` when its weights are not on this machine."""
    p = recipe.policy
    if p.kind == "bagel":  # BAGEL's published layout has no config.json (llm_config.json instead)
        from r3_rl.policy.bagel.recipe import bagel_options, check_model_dir, weight_set

        try:
            folder = check_model_dir(p.model or "")
        except UserError as e:
            raise WeightsMissing(str(e), "--set policy.model=/path/to/BAGEL-7B-MoT (a local checkpoint directory)"
                                 ) from None
        files = weight_set(folder) + [folder / "ae.safetensors"]
        side = bagel_options(p.options).image_size
        return ModelFacts(str(folder), sum(safetensors_params(f) for f in files), side * side, folder)
    if p.kind != "janus":
        from r3_rl.blocks.world import CELL

        pixels = recipe.data.blocks.rows * recipe.data.blocks.cols * CELL * CELL
        if not p.model:  # the tiny policy and plug-ins build their model from the recipe (policy.kind by name)
            from r3_rl.policy.registry import build_policy

            model = build_policy(recipe).model
            what = "policy.tiny" if p.kind == "tiny" else f"policy {p.kind}"
            return ModelFacts(f"built from {what} (nothing to load)", sum(t.numel() for t in model.parameters()),
                              pixels)
    if not p.model:
        raise WeightsMissing(f"policy.model: required for policy.kind {p.kind}",
                             "--set policy.model=HUB_ID (e.g. deepseek-community/Janus-Pro-1B) or a local folder")
    folder = locate(p.model, cache_dir=cache_dir)
    files = weight_files(folder)
    config = json.loads((folder / "config.json").read_text())
    if p.kind != "tiny":
        pixels = image_side(config) ** 2
    return ModelFacts(str(folder), count_params(files, config), pixels, folder)


def checkpoint_bytes(recipe: Any, params: int, image_pixels: int) -> dict[str, int]:
    """Estimated bytes of one checkpoint, by part (an upper bound: every parameter counted as trainable).

    model/ in ``policy.dtype``, and the KL reference where the run keeps a frozen copy (no LoRA, a KL weight
    above 0); AdamW's two fp32 moments plus, for bf16 weights, fp32 master weights (either backend: the torch
    backend steps bf16 weights through fp32 masters too), and under DeepSpeed its own module file beside them (the trained module in the engine's dtype); with
    LoRA only the adapters train and only they are kept beside the merged export (the frozen base is not, see
    :mod:`r3_rl.learner.frozen`), too small to count; a separate PPO critic doubles model and optimiser; the
    Tree-RL parent buffer holds up to ``buffer_size`` correct and as many flawed images.
    """
    from r3_rl.learner.build import needs_frozen_reference

    learner = recipe.learner
    w = params * DTYPE_BYTES[recipe.policy.dtype]
    lora = learner.lora is not None
    deepspeed = learner.backend == "deepspeed"
    # both backends: AdamW's two fp32 moments, plus fp32 master weights for bf16 / fp16 weights
    precision = (learner.deepspeed.dtype or recipe.policy.dtype) if deepspeed else recipe.policy.dtype
    optim = params * (8 if precision in ("fp32", "float32") else 12)
    parts = {"model": w, "reference": w if needs_frozen_reference(recipe) else 0, "optimiser": 0 if lora else optim}
    if deepspeed and not lora:
        parts["DeepSpeed module"] = w
    if learner.algorithm == "ppo" and learner.ppo.critic == "separate":
        parts["critic"] = w + optim
    tokens = (recipe.data.blocks.rows * recipe.data.blocks.cols if recipe.policy.kind == "tiny"
              else image_pixels // VQ_PATCH ** 2)
    parts["parent buffer"] = 2 * recipe.tree.buffer_size * (4 * tokens + BUFFER_ENTRY_BYTES)
    return parts


def checkpoints_on_disk(recipe: Any) -> int:
    """Most checkpoints on disk at once: the ``keep_last`` kept plus the one being written."""
    saves = (recipe.steps - 1) // recipe.save_every + 1 if recipe.save_every and recipe.steps else 1
    return min(recipe.keep_last, saves - 1) + 1
