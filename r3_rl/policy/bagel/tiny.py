"""A tiny random BAGEL (about 0.3 M + 0.4 M VAE parameters) saved in the published layout, for tests and benchmarks.

``make_tiny_bagel(path)`` writes exactly the files and key names of ByteDance-Seed/BAGEL-7B-MoT (``llm_config.json``,
``vit_config.json``, ``ema.safetensors``, ``ae.safetensors`` in BFL's key layout, the Qwen2 tokenizer files), so
:func:`~r3_rl.policy.bagel.checkpoint.load_bagel` loads it through the same code path as the real 29 GB checkpoint.
Nothing is downloaded: the tokenizer is a byte-level BPE with no merges (it encodes any string and decodes it back)
plus Qwen2.5's special tokens.

Geometry kept from BAGEL: 16 latent channels, 8x VAE downsampling, 2x2 latent patches (16 px per generation
token), GroupNorm(32) in the VAE.  Scaled down: widths, layers, vocabulary, the ViT (4 px patches, an 8x8 table:
32 px images), and the latent position table (8x8: up to 128 px images).
"""
from __future__ import annotations

from pathlib import Path

import torch

from r3_rl.policy.bagel.config import BagelConfig, TokenIds, llm_config_from_dict, vit_config_from_dict

SPECIALS = ["<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>"]


def build_tiny_tokenizer():
    """A ``Qwen2Tokenizer``: the 256 byte symbols, ``<|endoftext|>``, and BAGEL's four special tokens."""
    from tokenizers import AddedToken, pre_tokenizers
    from transformers import Qwen2Tokenizer

    vocab = {ch: i for i, ch in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    vocab["<|endoftext|>"] = len(vocab)
    tok = Qwen2Tokenizer(vocab=vocab, merges=[], eos_token="<|im_end|>", pad_token="<|endoftext|>")
    tok.add_special_tokens({"additional_special_tokens": [AddedToken(s, special=True, normalized=False)
                                                          for s in SPECIALS]})
    return tok


def bagel_shaped_config(hidden_size: int, num_layers: int, vocab_size: int, tokens: TokenIds,
                        num_heads: int | None = None, num_kv_heads: int | None = None,
                        intermediate_size: int | None = None, vit_hidden: int = 32, vit_patch: int = 4,
                        vit_side: int = 8, max_latent_size: int = 8, eos_id: int = 0, bos_id: int = 0) -> BagelConfig:
    """A config with BAGEL's structure at any width.  By default heads of 128 (at least one), BAGEL-7B's
    7 query heads per key/value head where possible, and its MLP ratio 18944/3584."""
    heads = num_heads or max(1, hidden_size // 128)
    kv = num_kv_heads or next(k for k in range(max(1, heads // 7), 0, -1) if heads % k == 0)
    inter = intermediate_size or max(64, round(hidden_size * 18944 / 3584 / 64) * 64)
    llm = llm_config_from_dict({
        "hidden_size": hidden_size, "intermediate_size": inter, "num_hidden_layers": num_layers,
        "num_attention_heads": heads, "num_key_value_heads": kv, "vocab_size": vocab_size, "rms_norm_eps": 1e-6,
        "rope_theta": 1e6, "max_position_embeddings": 32768, "hidden_act": "silu", "tie_word_embeddings": False,
        "bos_token_id": bos_id, "eos_token_id": eos_id, "model_type": "qwen2"})
    vit = vit_config_from_dict({
        "hidden_size": vit_hidden, "intermediate_size": 2 * vit_hidden, "num_attention_heads": 2,
        "num_hidden_layers": 2, "patch_size": vit_patch, "image_size": vit_patch * vit_side, "num_channels": 3,
        "hidden_act": "gelu_pytorch_tanh", "layer_norm_eps": 1e-6, "model_type": "siglip_vision_model"})
    return BagelConfig(llm=llm, vit=vit, max_latent_size=max_latent_size, vit_max_num_patch_per_side=vit_side,
                       tokens=tokens)


def tiny_bagel_config(tokenizer, hidden_size: int = 64, num_layers: int = 2, num_heads: int = 4,
                      num_kv_heads: int = 2, **sizes) -> BagelConfig:
    """The tiny test config; the vocabulary has a few spare rows past the tokenizer, as Qwen2.5's does."""
    ids = tokenizer.convert_tokens_to_ids
    tokens = TokenIds(im_start=ids("<|im_start|>"), im_end=ids("<|im_end|>"), vision_start=ids("<|vision_start|>"),
                      vision_end=ids("<|vision_end|>"))
    return bagel_shaped_config(hidden_size, num_layers, (len(tokenizer) + 7) // 8 * 8, tokens, num_heads=num_heads,
                               num_kv_heads=num_kv_heads, intermediate_size=sizes.pop("intermediate_size", None)
                               or 2 * hidden_size, eos_id=ids("<|im_end|>"), bos_id=ids("<|endoftext|>"), **sizes)


def tiny_flux_vae(width: int = 32, blocks: int = 1):
    """A 4-level FLUX-style VAE (8x downsampling, 16 latent channels) of ``width`` channels per level."""
    from r3_rl.policy.bagel.vae import build_flux_vae, flux_kwargs

    return build_flux_vae(flux_kwargs((width,) * 4, blocks))


def tiny_bagel(seed: int = 0, **sizes):
    """``(model, tokenizer)``: a tiny BAGEL built in memory from :func:`tiny_bagel_config` (``sizes``), its weights
    drawn after ``torch.manual_seed(seed)``."""
    from r3_rl.policy.bagel.model import BagelModel

    tokenizer = build_tiny_tokenizer()
    torch.manual_seed(seed)
    return BagelModel(tiny_bagel_config(tokenizer, **sizes)), tokenizer


def make_tiny_bagel(path: str | Path, seed: int = 0, **sizes) -> str:
    """Build a seeded tiny BAGEL + VAE + tokenizer and save them in the published layout; returns ``str(path)``.

    ``sizes`` go to :func:`tiny_bagel_config` (``hidden_size``, ``num_layers`` ...).
    """
    from r3_rl.policy.bagel.checkpoint import save_bagel

    model, tokenizer = tiny_bagel(seed, **sizes)
    vae = tiny_flux_vae()
    save_bagel(path, model, vae, tokenizer)
    return str(path)
