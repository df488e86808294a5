"""BAGEL (ByteDance-Seed/BAGEL-7B-MoT) re-implemented on transformers' Qwen2/SigLIP pieces and diffusers' VAE.

Modules, one concept each:

* :mod:`.config` — :class:`BagelConfig` read from ``llm_config.json`` / ``vit_config.json`` (+ BAGEL's constants);
* :mod:`.mot` — the Mixture-of-Transformers language model (understanding and ``*_moe_gen`` experts);
* :mod:`.layout` — blocks (text / ViT / VAE / noised), the padded layout, the attention mask, :class:`ContextCache`;
* :mod:`.embeddings` — sin-cos tables, timestep embedder, connector, patchify;
* :mod:`.vision` — the SigLIP tower under the published key names;
* :mod:`.vae` — the FLUX VAE as diffusers' ``AutoencoderKL`` (BFL key conversion both ways);
* :mod:`.model` — :class:`BagelModel`: contexts, velocity prediction, next-token logits;
* :mod:`.images` — resizing, latents <-> tokens, understanding and editing context blocks;
* :mod:`.checkpoint` — :func:`load_bagel` / :func:`save_bagel` in the published layout;
* :mod:`.tiny` — :func:`make_tiny_bagel`, a seconds-fast random BAGEL for tests;
* :mod:`.recipe` — ``policy.options`` and recipe checks (no torch import);
* :mod:`.contexts`, :mod:`.text_actions`, :mod:`.image_actions`, :mod:`.policy` — the R3 policy
  (``policy.kind: bagel``): what segments record, text and flow-matching actions, the four stages.

Names are imported lazily, so the recipe check (:mod:`.recipe`) loads no torch.
"""
from __future__ import annotations

import importlib
from typing import Any

_HOMES = {
    "LoadedBagel": "checkpoint", "load_bagel": "checkpoint", "save_bagel": "checkpoint",
    "BagelConfig": "config", "TokenIds": "config", "VaeConfig": "config", "published_config": "config",
    "read_bagel_config": "config",
    "ContextCache": "layout", "NoiseBlock": "layout", "TextBlock": "layout", "VaeBlock": "layout", "VitBlock": "layout",
    "BagelModel": "model", "BagelOutput": "model", "text_block": "model",
    "make_tiny_bagel": "tiny", "BagelPolicy": "policy",
}
__all__ = sorted(_HOMES)


def __getattr__(name: str) -> Any:
    if name not in _HOMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_HOMES[name]}"), name)
