"""The shape of a BAGEL policy (``policy.kind: bagel``) for ``r3-rl plan``, without reading a weight.

Where it comes from, in order: a local checkpoint folder in the published layout (``llm_config.json``,
``vit_config.json``, the weight file's and ``ae.safetensors``' safetensors headers -- shapes only), else the
built-in shape of ByteDance-Seed/BAGEL-7B-MoT (its published config values, :func:`published_config`), else a
one-line error.  The model is built on PyTorch's ``meta`` device, so parameter counts are exact: ``params``
are the weight file's tensors (both experts, the ViT, the two frozen sin-cos tables) plus the VAE's.

What the planner must know about BAGEL that a Janus shape does not say:

* Mixture-of-Transformers: every decoder layer holds two weight sets (understanding and generation experts), so
  the weights, gradients and optimiser state are of both (~14.1 B in the LLM), while a token passes through one
  (activations per token are those of one Qwen2 layer; "active" parameters ~7.6 B).  ZeRO-3 gathers a whole
  MoT layer (both experts) at a time.
* Images are flow-matched VAE latents, not tokens of a vocabulary: a generated image of side S takes (S/16)^2
  positions (8x VAE downsampling, 2x2 patches), its "head" has 64 outputs; an edit's context holds the input
  image twice (SigLIP tokens and VAE latent tokens) and edits use up to 3 CFG rows (text- and image-CFG).
* The FLUX VAE (frozen) decodes in ``policy.options.vae_dtype``, all images of a call at once.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from r3_rl.errors import UserError
from r3_rl.plan.shapes import ModelShape

BUILTIN_BAGEL = ("ByteDance-Seed/BAGEL-7B-MoT",)
FLUX_WIDTHS, FLUX_BLOCKS = (128, 256, 512, 512), 2  # FLUX.1's VAE (ae.safetensors ships no config)
VAE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


def _vit_tokens(size: tuple[int, int, int]) -> int:
    """SigLIP positions of the largest image read at ``(max side, min side, stride)``: a square of the max side."""
    side = size[0] // size[2]
    return side * side


def bagel_shape_from_config(config: Any, options: Any, source: str, vae_params: int | None = None,
                            vae_channels: int = FLUX_WIDTHS[0]) -> ModelShape:
    """A :class:`ModelShape` of ``BagelModel(config)`` (+ the FLUX VAE) for a recipe's ``policy.options``.

    ``vae_params``, ``vae_channels``: the VAE's count and full-resolution decoder width from ``ae.safetensors``'
    header; None = FLUX.1's VAE built on ``meta``."""
    import torch

    from r3_rl.policy.bagel.model import BagelModel

    with torch.device("meta"):
        model = BagelModel(config)
        if vae_params is None:
            from r3_rl.policy.bagel.vae import build_flux_vae, flux_kwargs

            vae_params = sum(p.numel() for p in build_flux_vae(flux_kwargs(FLUX_WIDTHS, FLUX_BLOCKS)).parameters())
    named = dict(model.named_parameters())
    tables = sum(t.numel() for n, t in model.named_buffers() if n.endswith("pos_embed"))  # frozen, in the file
    bagel = sum(p.numel() for p in named.values()) + tables
    vit = sum(p.numel() for n, p in named.items() if n.startswith("vit_model."))
    llm_params = sum(p.numel() for n, p in named.items() if n.startswith("language_model."))
    gen_expert = sum(p.numel() for n, p in named.items() if "moe_gen" in n)
    llm = config.llm
    layers = model.language_model.model.layers
    head_dim = getattr(llm, "head_dim", None) or llm.hidden_size // llm.num_attention_heads
    trained = bagel - tables - (0 if options.train_vit else vit)
    side = options.image_size // config.latent_downsample
    return ModelShape(
        source=source, hidden=llm.hidden_size, layers=llm.num_hidden_layers, heads=llm.num_attention_heads,
        kv_heads=llm.num_key_value_heads, head_dim=head_dim, intermediate=llm.intermediate_size,
        text_vocab=llm.vocab_size, image_vocab=config.patch_latent_dim, image_tokens=side * side,
        vision_tokens=_vit_tokens(options.vit_size), params=bagel + vae_params, params_trained=trained,
        params_vision=vit,
        largest_layer=max(max(sum(p.numel() for p in layer.parameters()) for layer in layers),
                          model.language_model.model.embed_tokens.weight.numel(),
                          model.language_model.lm_head.weight.numel()),
        largest_weight=max(p.numel() for p in named.values()),
        image_side=options.image_size, vq_channels=vae_channels,
        flow=True, params_active=llm_params - gen_expert, params_llm=llm_params,
        edit_tokens=(options.vae_size[0] // config.latent_downsample) ** 2 + 2,
        image_cfg_rows=1 if options.image_cfg > 1.0 else 0,  # and only with text-CFG: plan.report.stages
        decode_bytes=VAE_BYTES[options.vae_dtype], decode_chunk=-1,
        gen_sde_steps=options.gen_sde_count, edit_sde_steps=options.edit_sde_count)


def _vae_header(file: Path) -> tuple[int, int]:
    """(parameters, decoder channels at full resolution) of ``ae.safetensors`` from its header alone."""
    from r3_rl.policy.bagel.state_check import opened_safetensors

    total, channels = 0, FLUX_WIDTHS[0]
    with opened_safetensors(file) as f:
        for key in f.keys():
            shape = f.get_slice(key).get_shape()
            total += math.prod(shape)
            if key == "decoder.conv_out.weight":  # [3, C, 3, 3]
                channels = shape[1]
    return total, channels


def bagel_shape(recipe: Any) -> ModelShape:
    """The shape of a ``policy.kind: bagel`` recipe's model (see the module docstring for where it comes from)."""
    from r3_rl.policy.bagel.config import LLM_CONFIG, published_config, read_bagel_config
    from r3_rl.policy.bagel.recipe import bagel_options

    pol = recipe.policy
    options = bagel_options(dict(pol.options or {}))
    name = pol.model or ""
    path = Path(name).expanduser()
    if name and (path / LLM_CONFIG).is_file():
        from r3_rl.policy.bagel.checkpoint import VAE_FILE, read_shapes, weight_files

        config = read_bagel_config(path, read_shapes(weight_files(path)))
        vae, channels = _vae_header(path / VAE_FILE) if (path / VAE_FILE).is_file() else (None, FLUX_WIDTHS[0])
        return bagel_shape_from_config(config, options, f"llm_config.json/vit_config.json of {name}", vae, channels)
    known = [k for k in BUILTIN_BAGEL if name == k or (not path.exists() and path.name == k.split("/")[1])]
    if known:
        where = "" if name == known[0] else f"; {name} is not on this machine"
        return bagel_shape_from_config(published_config(), options,
                                       f"built-in shape of {known[0]} (its published configs{where})")
    raise UserError(f"policy.model: {name!r} is not a BAGEL checkpoint folder (no {LLM_CONFIG}) and has no built-in "
                    f"shape; give a local folder in the published layout, or one of: {', '.join(BUILTIN_BAGEL)}")
