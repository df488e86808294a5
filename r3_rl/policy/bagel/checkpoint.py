"""Load and save BAGEL in the published checkpoint layout (ByteDance-Seed/BAGEL-7B-MoT).

A directory holds ``llm_config.json``, ``vit_config.json``, the Qwen2 tokenizer files, ``ae.safetensors`` (the
FLUX VAE in BFL's layout) and one weight set with BAGEL's key names: ``ema.safetensors`` (as published: one
unsharded 29 GB file), else ``model.safetensors``, else ``model.safetensors.index.json`` with its shards.

Loading is strict and memory-sane: the key names and shapes in the safetensors headers are checked against the
model before any tensor is read (one-line :class:`UserError` naming the first bad key); the model is built on the
meta device (no random init of 14 B parameters) and each tensor is read with ``safe_open`` straight to the target
device, cast to ``dtype`` and put in place one at a time, so peak memory is the model plus one tensor.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from r3_rl.errors import UserError
from r3_rl.policy.bagel.config import (LLM_CONFIG, SPECIAL_TOKENS, VIT_CONFIG, BagelConfig, TokenIds,
                                       published_llm_dict, read_bagel_config, vit_config_to_dict)
from r3_rl.policy.bagel.model import BagelModel
from r3_rl.policy.bagel.recipe import WEIGHT_FILES, WEIGHT_INDEX, read_weight_map
from r3_rl.policy.bagel.state_check import check_state_keys, opened_safetensors
from r3_rl.policy.bagel.vae import FluxVAE, load_flux_vae

VAE_FILE = "ae.safetensors"
MAP_WINDOW = 1 << 30  # bytes of the weight file mapped at a time while loading


@dataclass
class LoadedBagel:
    model: BagelModel
    vae: FluxVAE
    tokenizer: Any
    config: BagelConfig


def weight_files(path: Path) -> dict[str, Path]:
    """key -> file holding it, for the first weight set present (see module docstring)."""
    for name in WEIGHT_FILES:
        if (path / name).is_file():
            with opened_safetensors(path / name) as f:
                return {k: path / name for k in f.keys()}
    if (path / WEIGHT_INDEX).is_file():
        return {k: path / v for k, v in read_weight_map(path).items()}
    raise UserError(f"{path}: no BAGEL weights (expected {WEIGHT_FILES[0]}, {WEIGHT_FILES[1]} or {WEIGHT_INDEX})")


def read_shapes(files: dict[str, Path]) -> dict[str, tuple[int, ...]]:
    """Shapes from the safetensors headers only (no tensor data is read)."""
    shapes: dict[str, tuple[int, ...]] = {}
    by_file: dict[Path, list[str]] = {}
    for key, file in files.items():
        by_file.setdefault(file, []).append(key)
    for file, keys in by_file.items():
        if not file.is_file():
            raise UserError(f"{file}: missing (named by {WEIGHT_INDEX})")
        with opened_safetensors(file) as f:
            present = set(f.keys())
            for key in keys:
                if key not in present:
                    raise UserError(f"{file}: key '{key}' missing (named by {WEIGHT_INDEX})")
                shapes[key] = tuple(f.get_slice(key).get_shape())
    return shapes


def load_tokenizer(path: Path):
    """The Qwen2 tokenizer of the checkpoint, and BAGEL's special-token ids resolved from it."""
    from transformers import AutoTokenizer

    if not (path / "tokenizer.json").is_file() and not (path / "vocab.json").is_file():
        raise UserError(f"{path}: no tokenizer (expected tokenizer.json or vocab.json + merges.txt)")
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError) as e:
        raise UserError(f"{path}: the tokenizer does not load ({str(e).splitlines()[0]})") from None
    ids = {}
    for field, token in SPECIAL_TOKENS.items():
        tid = tokenizer.convert_tokens_to_ids(token)
        if tid is None or tid == tokenizer.unk_token_id:
            raise UserError(f"{path}: the tokenizer has no {token} token (BAGEL's sequences need "
                            f"{', '.join(SPECIAL_TOKENS.values())})")
        ids[field] = tid
    return tokenizer, TokenIds(**ids)


def _assign(model: nn.Module, key: str, value: torch.Tensor) -> None:
    owner, _, leaf = key.rpartition(".")
    module = model.get_submodule(owner)
    if leaf in module._parameters:
        module._parameters[leaf] = nn.Parameter(value, requires_grad=module._parameters[leaf].requires_grad)
    else:
        module._buffers[leaf] = value


def rebuild_non_persistent(model: BagelModel, device) -> None:
    """Recreate the buffers no checkpoint holds (RoPE frequencies in fp32, SigLIP position ids) on ``device``."""
    from transformers.models.qwen2.modeling_qwen2 import Qwen2RotaryEmbedding

    lm = model.language_model.model
    lm.rotary_emb = Qwen2RotaryEmbedding(config=model.config.llm).to(device)
    emb = model.vit_model.vision_model.embeddings
    emb.register_buffer("position_ids", torch.arange(emb.num_positions, device=device)[None], persistent=False)


def bagel_skeleton(path: Path) -> tuple[BagelModel, Any, BagelConfig, dict[str, Path]]:
    """The checkpoint's model on the meta device (config and safetensors headers only, no tensor data), its
    tokenizer, config and weight files; every weight's name and shape checked against the model."""
    if not path.is_dir():
        raise UserError(f"{path}: not a directory (expected a BAGEL checkpoint such as BAGEL-7B-MoT)")
    files = weight_files(path)
    shapes = read_shapes(files)
    config = read_bagel_config(path, shapes)
    tokenizer, tokens = load_tokenizer(path)
    config.tokens = tokens
    if max(tokens.__dict__.values()) >= config.llm.vocab_size:
        raise UserError(f"{path / LLM_CONFIG}: vocab_size {config.llm.vocab_size} is smaller than the tokenizer's "
                        f"special-token ids {tokens}")
    with torch.device("meta"):
        model = BagelModel(config)
    check_state_keys({k: tuple(v.shape) for k, v in model.state_dict().items()}, shapes, _weights_name(path, files))
    return model, tokenizer, config, files


def _weights_name(path: Path, files: dict[str, Path]) -> str:
    """The weights file, or the index naming several, for error messages."""
    return str(files[next(iter(files))]) if len(set(files.values())) == 1 else str(path / WEIGHT_INDEX)


def load_bagel(path: str | Path, dtype: torch.dtype = torch.bfloat16, device: str | torch.device = "cpu",
               vae_dtype: torch.dtype = torch.float32) -> LoadedBagel:
    """Model, VAE, tokenizer and config from a checkpoint directory in the published layout."""
    path = Path(path)
    model, tokenizer, config, files = bagel_skeleton(path)
    vae = load_flux_vae(path / VAE_FILE, config.vae, dtype=vae_dtype, device=device)  # small: checked before the LLM
    device = torch.device(device)
    by_file: dict[Path, list[str]] = {}
    for key, file in files.items():
        by_file.setdefault(file, []).append(key)
    for file, keys in by_file.items():
        done = 0
        while done < len(keys):
            # safe_open maps the file; tensors are views of it until copied.  Reopening every MAP_WINDOW bytes
            # unmaps the pages already copied, so resident memory stays near the model plus one window.
            with opened_safetensors(file, device=str(device)) as f:
                window = 0
                while done < len(keys) and window < MAP_WINDOW:
                    value = f.get_tensor(keys[done])
                    window += value.numel() * value.element_size()
                    if value.is_floating_point() and value.dtype != dtype:
                        value = value.to(dtype)
                    elif value.device.type == "cpu":
                        # an owned, allocator-aligned copy: CPU GEMM kernels round differently on the file's offsets
                        value = torch.empty_like(value).copy_(value)
                    _assign(model, keys[done], value)
                    done += 1
    rebuild_non_persistent(model, device)
    left = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if left:
        raise UserError(f"{_weights_name(path, files)}: key '{left[0]}' was not loaded")
    return LoadedBagel(model.eval(), vae, tokenizer, config)


def llm_config_to_dict(llm) -> dict:
    """The ``llm_config.json`` fields as published, from a ``Qwen2Config``."""
    data = published_llm_dict()
    for key in ("attention_dropout", "bos_token_id", "eos_token_id", "hidden_act", "hidden_size", "initializer_range",
                "intermediate_size", "max_position_embeddings", "num_attention_heads", "num_hidden_layers",
                "num_key_value_heads", "rms_norm_eps", "vocab_size"):
        data[key] = getattr(llm, key)
    data["rope_theta"] = float(llm.rope_parameters["rope_theta"])
    data["max_window_layers"] = llm.num_hidden_layers
    return data


def save_bagel(path: str | Path, model: BagelModel, vae: FluxVAE, tokenizer) -> Path:
    """Write ``model``/``vae``/``tokenizer`` as the published directory layout (file and key names)."""
    from safetensors.torch import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    (path / LLM_CONFIG).write_text(json.dumps(llm_config_to_dict(model.config.llm), indent=2) + "\n")
    (path / VIT_CONFIG).write_text(json.dumps(vit_config_to_dict(model.config.vit), indent=2) + "\n")
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(path / WEIGHT_FILES[0]), metadata={"format": "pt"})
    save_file(vae.bfl_state_dict(), str(path / VAE_FILE), metadata={"format": "pt"})
    tokenizer.save_pretrained(str(path))
    return path
