"""BAGEL's configuration, read from the published checkpoint directory.

The hub checkpoint (ByteDance-Seed/BAGEL-7B-MoT) ships ``llm_config.json`` (a Qwen2.5-7B ``Qwen2Config``) and
``vit_config.json`` (SigLIP so400m); every other BAGEL number is a code constant of the reference loader.  We keep
those constants here as defaults, and :func:`read_bagel_config` cross-checks the two that vary between checkpoints
(the sizes of the two sin-cos tables) against the weight file's tensor shapes, so a small checkpoint in the same
layout (the tiny test model) needs no extra file.  Bad or missing files give a one-line :class:`UserError`.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from r3_rl.errors import UserError

LLM_CONFIG = "llm_config.json"
VIT_CONFIG = "vit_config.json"

# The fields the code reads from each JSON; a file missing one is refused up front.
_LLM_REQUIRED = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                 "num_key_value_heads", "vocab_size", "rms_norm_eps")
_FLOAT_FIELDS = ("rms_norm_eps",)  # every other required field is a count or a size: an integer
_VIT_REQUIRED = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "patch_size",
                 "image_size")


@dataclass(frozen=True)
class VaeConfig:
    """FLUX VAE constants (hard-coded in BAGEL's ``load_ae``; ``ae.safetensors`` ships no config)."""
    z_channels: int = 16
    downsample: int = 8
    scale_factor: float = 0.3611
    shift_factor: float = 0.1159


@dataclass(frozen=True)
class TokenIds:
    """Qwen2.5 ids of the tokens BAGEL's sequences are built from; resolved from the tokenizer at load."""
    im_start: int = 151644       # <|im_start|>: opens every text block
    im_end: int = 151645         # <|im_end|>: closes every text block, the end-of-text token
    vision_start: int = 151652   # <|vision_start|>: opens every image block (ViT, VAE or noised)
    vision_end: int = 151653     # <|vision_end|>


SPECIAL_TOKENS = {"im_start": "<|im_start|>", "im_end": "<|im_end|>", "vision_start": "<|vision_start|>",
                  "vision_end": "<|vision_end|>"}


@dataclass
class BagelConfig:
    """Everything needed to build :class:`~r3_rl.policy.bagel.model.BagelModel`.

    ``llm`` is a transformers ``Qwen2Config`` and ``vit`` a ``SiglipVisionConfig`` with the layer count BAGEL
    *uses* (the file's ``num_hidden_layers`` minus one) and no pooling head.  Defaults are BAGEL-7B-MoT's.
    """
    llm: Any
    vit: Any
    latent_patch_size: int = 2            # 2x2 VAE latents per generation token
    max_latent_size: int = 64             # latent_pos_embed is a 64x64 grid (1024 px at 16 px per token)
    vit_max_num_patch_per_side: int = 70  # vit_pos_embed is a 70x70 grid (980 px at 14 px per patch)
    connector_act: str = "gelu_pytorch_tanh"
    timestep_shift: float = 3.0           # the sampler's shift s (inference and R3); B's training forward uses 1.0
    vae: VaeConfig = field(default_factory=VaeConfig)
    tokens: TokenIds = field(default_factory=TokenIds)

    @property
    def hidden_size(self) -> int:
        return self.llm.hidden_size

    @property
    def patch_latent_dim(self) -> int:
        """Values per generation token: p*p*z (64 for BAGEL)."""
        return self.latent_patch_size ** 2 * self.vae.z_channels

    @property
    def latent_downsample(self) -> int:
        """Pixels per generation token along one side (16 for BAGEL)."""
        return self.vae.downsample * self.latent_patch_size

    @property
    def vit_patch_dim(self) -> int:
        return self.vit.num_channels * self.vit.patch_size ** 2


def _read_json(path: Path) -> dict:
    if not path.is_file():
        raise UserError(f"{path}: missing (a BAGEL checkpoint directory has llm_config.json, vit_config.json, "
                        f"ema.safetensors, ae.safetensors and the tokenizer files)")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def _require(path: Path, data: dict, keys: tuple[str, ...]) -> None:
    for key in keys:
        value = data.get(key)
        kinds, what = ((int, float), "number") if key in _FLOAT_FIELDS else ((int,), "integer")
        if not isinstance(value, kinds) or isinstance(value, bool) or value <= 0:
            raise UserError(f"{path}: '{key}' must be a positive {what}, got {value!r}")


def llm_config_from_dict(data: dict, path: Path | str = LLM_CONFIG):
    """A ``Qwen2Config`` from the published JSON, with BAGEL's in-code overrides (qk-norm, untied head)."""
    from transformers import Qwen2Config

    path = Path(path)
    _require(path, data, _LLM_REQUIRED)
    if data.get("use_sliding_window"):
        raise UserError(f"{path}: use_sliding_window=true is not supported (BAGEL attends over the full sequence)")
    if data["hidden_size"] % data["num_attention_heads"] or data["num_attention_heads"] % data["num_key_value_heads"]:
        raise UserError(f"{path}: hidden_size must divide into num_attention_heads heads, and those into "
                        f"num_key_value_heads groups")
    data = {**data, "tie_word_embeddings": False, "qk_norm": True, "layer_module": "Qwen2MoTDecoderLayer"}
    return Qwen2Config(**data)


def vit_config_from_dict(data: dict, path: Path | str = VIT_CONFIG):
    """A ``SiglipVisionConfig`` with the layers BAGEL uses (file's count minus one) and no pooling head."""
    from transformers import SiglipVisionConfig

    path = Path(path)
    _require(path, data, _VIT_REQUIRED)
    if data["num_hidden_layers"] < 2:
        raise UserError(f"{path}: num_hidden_layers must be >= 2 (BAGEL uses all but the last layer)")
    data = {k: v for k, v in data.items() if k not in ("rope",)}  # BAGEL's own flag; the checkpoint has rope=False
    data.update(num_hidden_layers=data["num_hidden_layers"] - 1, vision_use_head=False)
    return SiglipVisionConfig(**data)


def vit_config_to_dict(vit) -> dict:
    """The inverse of :func:`vit_config_from_dict`: the JSON as published (one more layer than used)."""
    data = {k: getattr(vit, k) for k in ("hidden_size", "intermediate_size", "num_attention_heads", "num_channels",
                                         "image_size", "patch_size", "hidden_act", "layer_norm_eps",
                                         "attention_dropout")}
    return {"model_type": "siglip_vision_model", **data, "num_hidden_layers": vit.num_hidden_layers + 1}


def grid_side(path: Path | str, key: str, rows: int) -> int:
    """Side G of a G*G sin-cos table with ``rows`` rows, or a one-line error naming the key."""
    side = math.isqrt(rows)
    if side * side != rows:
        raise UserError(f"{path}: {key} has {rows} rows, not a square grid")
    return side


def read_bagel_config(path: str | Path, shapes: dict[str, tuple[int, ...]] | None = None) -> BagelConfig:
    """The config of the checkpoint directory ``path``.

    ``shapes`` (key -> shape from the weight file's header) sets the two table sizes and the latent patch size
    from the tensors themselves; without it the BAGEL-7B-MoT values are used.
    """
    path = Path(path)
    llm = llm_config_from_dict(_read_json(path / LLM_CONFIG), path / LLM_CONFIG)
    vit = vit_config_from_dict(_read_json(path / VIT_CONFIG), path / VIT_CONFIG)
    config = BagelConfig(llm=llm, vit=vit)
    if shapes:
        updates = {}
        for key, name in (("latent_pos_embed.pos_embed", "max_latent_size"),
                          ("vit_pos_embed.pos_embed", "vit_max_num_patch_per_side")):
            if key in shapes:
                updates[name] = grid_side(path, key, shapes[key][0])
        if "vae2llm.weight" in shapes:
            per_token = shapes["vae2llm.weight"][1] // config.vae.z_channels
            updates["latent_patch_size"] = max(1, math.isqrt(per_token))
        config = replace(config, **updates)
    if config.vit_max_num_patch_per_side != vit.image_size // vit.patch_size:
        raise UserError(f"{path / VIT_CONFIG}: image_size/patch_size = {vit.image_size // vit.patch_size} patches per "
                        f"side, but vit_pos_embed.pos_embed is a {config.vit_max_num_patch_per_side}-per-side table")
    return config


def published_llm_dict() -> dict:
    """BAGEL-7B-MoT's ``llm_config.json`` values (Qwen2.5-7B-Instruct), for size tables and the benchmark."""
    return {"architectures": ["Qwen2ForCausalLM"], "attention_dropout": 0.0, "bos_token_id": 151643,
            "eos_token_id": 151645, "hidden_act": "silu", "hidden_size": 3584, "initializer_range": 0.02,
            "intermediate_size": 18944, "max_position_embeddings": 32768, "max_window_layers": 28,
            "model_type": "qwen2", "num_attention_heads": 28, "num_hidden_layers": 28, "num_key_value_heads": 4,
            "rms_norm_eps": 1e-06, "rope_theta": 1000000.0, "sliding_window": 131072, "tie_word_embeddings": False,
            "torch_dtype": "bfloat16", "use_cache": True, "use_sliding_window": False, "vocab_size": 152064}


def published_vit_dict() -> dict:
    """BAGEL-7B-MoT's ``vit_config.json`` values (SigLIP so400m-14-980; 27 layers in the file, 26 used)."""
    return {"model_type": "siglip_vision_model", "hidden_size": 1152, "image_size": 980, "intermediate_size": 4304,
            "num_attention_heads": 16, "num_hidden_layers": 27, "patch_size": 14, "num_channels": 3,
            "hidden_act": "gelu_pytorch_tanh", "layer_norm_eps": 1e-06, "attention_dropout": 0.0}


def published_config() -> BagelConfig:
    """BAGEL-7B-MoT's full config, without reading any file."""
    return BagelConfig(llm=llm_config_from_dict(published_llm_dict()), vit=vit_config_from_dict(published_vit_dict()))
