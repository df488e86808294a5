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
* :mod:`.tiny` — :func:`make_tiny_bagel`, a seconds-fast random BAGEL for tests.
"""
from r3_rl.policy.bagel.checkpoint import LoadedBagel, load_bagel, save_bagel
from r3_rl.policy.bagel.config import BagelConfig, TokenIds, VaeConfig, published_config, read_bagel_config
from r3_rl.policy.bagel.layout import ContextCache, NoiseBlock, TextBlock, VaeBlock, VitBlock
from r3_rl.policy.bagel.model import BagelModel, BagelOutput, text_block
from r3_rl.policy.bagel.tiny import make_tiny_bagel

__all__ = ["BagelConfig", "BagelModel", "BagelOutput", "ContextCache", "LoadedBagel", "NoiseBlock", "TextBlock",
           "TokenIds", "VaeBlock", "VaeConfig", "VitBlock", "load_bagel", "make_tiny_bagel", "published_config",
           "read_bagel_config", "save_bagel", "text_block"]
