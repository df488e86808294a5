"""The FLUX VAE of BAGEL (``ae.safetensors``) as diffusers' ``AutoencoderKL``.

The file is in Black Forest Labs' original key layout and ships no config; the architecture is read off the tensor
shapes (so the real 84 M-parameter VAE and a tiny test VAE load through the same code) and the keys are mapped to
diffusers' names (the rules of diffusers' ``convert_ldm_vae_checkpoint``, with the inverse map for saving).

BAGEL's latent convention: ``encode(x) = scale * (mean - shift)`` (the posterior mean: no sampling, so edit contexts
are deterministic) and ``decode(z) = decoder(z / scale + shift)``, with images in [-1, 1].
"""
from __future__ import annotations

import re
from pathlib import Path

import torch
from torch import nn

from r3_rl.errors import UserError
from r3_rl.policy.bagel.config import VaeConfig
from r3_rl.policy.bagel.state_check import check_state_keys, opened_safetensors

# One table serves both directions: (BFL template, diffusers template) after the "encoder."/"decoder." prefix.
# Fields: {u} is a decoder level (numbered in reverse in diffusers), the others are renamed through _RENAME.
_RULES = (
    ("down.{i}.block.{j}.{name}.{leaf}", "down_blocks.{i}.resnets.{j}.{name}.{leaf}"),
    ("up.{u}.block.{j}.{name}.{leaf}", "up_blocks.{u}.resnets.{j}.{name}.{leaf}"),
    ("down.{i}.downsample.conv.{leaf}", "down_blocks.{i}.downsamplers.0.conv.{leaf}"),
    ("up.{u}.upsample.conv.{leaf}", "up_blocks.{u}.upsamplers.0.conv.{leaf}"),
    ("mid.block_{mid}.{name}.{leaf}", "mid_block.resnets.{mid}.{name}.{leaf}"),
    ("mid.attn_1.{attn}.{leaf}", "mid_block.attentions.0.{attn}.{leaf}"),
    ("norm_out.{leaf}", "conv_norm_out.{leaf}"),
)
_RENAME = {"name": {"nin_shortcut": "conv_shortcut"}, "mid": {"1": "0", "2": "1"},
           "attn": {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}}


def _regex(template: str) -> re.Pattern:
    parts = re.split(r"\{(\w+)\}", template)
    return re.compile("".join(re.escape(p) if i % 2 == 0 else
                              (rf"(?P<{p}>to_out\.0|[^.]+)" if p == "attn" else rf"(?P<{p}>[^.]+)")
                              for i, p in enumerate(parts)))


_COMPILED = tuple((_regex(bfl), bfl, _regex(diff), diff) for bfl, diff in _RULES)


def _levels(keys, part: str) -> int:
    found = {int(m.group(1)) for k in keys if (m := re.match(rf"{part}\.(\d+)\.", k))}
    return max(found) + 1 if found else 0


def _convert(key: str, num_levels: int, to_diffusers: bool) -> str:
    side, _, rest = key.partition(".")
    for bfl_re, bfl, diff_re, diff in _COMPILED:
        m = (bfl_re if to_diffusers else diff_re).fullmatch(rest)
        if m:
            fields = {}
            for name, value in m.groupdict().items():
                if name == "u":
                    value = str(num_levels - 1 - int(value))
                elif name in _RENAME:
                    table = _RENAME[name] if to_diffusers else {b: a for a, b in _RENAME[name].items()}
                    value = table.get(value, value)
                fields[name] = value
            return f"{side}.{(diff if to_diffusers else bfl).format(**fields)}"
    return key  # conv_in, conv_out


def bfl_to_diffusers_key(key: str, num_levels: int) -> str:
    """One ``ae.safetensors`` key -> its ``AutoencoderKL`` key (decoder levels are numbered in reverse)."""
    return _convert(key, num_levels, to_diffusers=True)


def diffusers_to_bfl_key(key: str, num_levels: int) -> str:
    """The inverse of :func:`bfl_to_diffusers_key`."""
    return _convert(key, num_levels, to_diffusers=False)


def _is_attn_proj(diffusers_key: str) -> bool:
    return bool(re.search(r"attentions\.0\.(to_q|to_k|to_v|to_out\.0)\.weight$", diffusers_key))


def bfl_to_diffusers(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A whole BFL state dict in diffusers' layout (1x1-conv attention weights squeezed to Linear)."""
    levels = _levels(state, "encoder.down")
    out = {}
    for key, value in state.items():
        new = bfl_to_diffusers_key(key, levels)
        out[new] = value.reshape(value.shape[:2]) if _is_attn_proj(new) and value.ndim == 4 else value
    return out


def diffusers_to_bfl(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    levels = _levels(state, "encoder.down_blocks")
    return {diffusers_to_bfl_key(k, levels): (v[:, :, None, None] if _is_attn_proj(k) else v)
            for k, v in state.items()}


def flux_kwargs(block_out_channels: tuple[int, ...], layers_per_block: int, latent_channels: int = 16,
                in_channels: int = 3, out_channels: int = 3, vae: VaeConfig = VaeConfig()) -> dict:
    """``AutoencoderKL`` arguments of a FLUX-style VAE (FLUX.1: widths (128, 256, 512, 512), 2 blocks per level)."""
    levels = len(block_out_channels)
    return dict(in_channels=in_channels, out_channels=out_channels, latent_channels=latent_channels,
                down_block_types=("DownEncoderBlock2D",) * levels, up_block_types=("UpDecoderBlock2D",) * levels,
                block_out_channels=tuple(block_out_channels), layers_per_block=layers_per_block, norm_num_groups=32,
                act_fn="silu", use_quant_conv=False, use_post_quant_conv=False, mid_block_add_attention=True,
                scaling_factor=vae.scale_factor, shift_factor=vae.shift_factor, force_upcast=True, sample_size=1024)


def autoencoder_kwargs(shapes: dict[str, tuple[int, ...]], vae: VaeConfig = VaeConfig(), where: str = "ae") -> dict:
    """:func:`flux_kwargs` read off the BFL-layout tensor shapes of an ``ae.safetensors``."""
    levels = _levels(shapes, "encoder.down")
    blocks = _levels(shapes, "encoder.down.0.block")
    if levels == 0 or blocks == 0:
        raise UserError(f"{where}: no encoder.down.N.block.M tensors (not a FLUX VAE in the original BFL layout)")
    try:
        widths = tuple(shapes[f"encoder.down.{i}.block.0.conv1.weight"][0] for i in range(levels))
        kwargs = flux_kwargs(widths, blocks, latent_channels=shapes["decoder.conv_in.weight"][1],
                             in_channels=shapes["encoder.conv_in.weight"][1],
                             out_channels=shapes["decoder.conv_out.weight"][0], vae=vae)
    except KeyError as e:
        raise UserError(f"{where}: key {e.args[0]!r} missing (not a FLUX VAE in the original BFL layout)") from None
    if kwargs["latent_channels"] != vae.z_channels or 2 ** (levels - 1) != vae.downsample:
        raise UserError(f"{where}: a VAE with {kwargs['latent_channels']} latent channels and {2 ** (levels - 1)}x "
                        f"downsampling; BAGEL needs {vae.z_channels} and {vae.downsample}x")
    return kwargs


class FluxVAE(nn.Module):
    """``AutoencoderKL`` with BAGEL's scale/shift; images [B, 3, H, W] in [-1, 1] <-> latents [B, 16, H/8, W/8]."""

    def __init__(self, autoencoder) -> None:
        super().__init__()
        self.autoencoder = autoencoder
        self.scale = float(autoencoder.config.scaling_factor)
        self.shift = float(autoencoder.config.shift_factor)

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.autoencoder.config.block_out_channels) - 1)

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Latents of ``[B, 3, H, W]`` images in [-1, 1]: the posterior *mean*, where BAGEL's inference samples the
        posterior (``DiagonalGaussian(sample=True)`` in its ``autoencoder.py``).  Deliberate: an edit's context is
        rebuilt by the rollout worker, the learner and the trainer, and must be the same image in all three, or the
        ratio of an edit's log-probs is not 1 before the first update."""
        dtype = next(self.autoencoder.parameters()).dtype
        mean = self.autoencoder.encode(images.to(dtype)).latent_dist.mode()
        return self.scale * (mean - self.shift)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        dtype = next(self.autoencoder.parameters()).dtype
        return self.autoencoder.decode((latents / self.scale + self.shift).to(dtype)).sample

    def bfl_state_dict(self) -> dict[str, torch.Tensor]:
        """The weights in ``ae.safetensors``'s layout (for saving a checkpoint as published)."""
        return diffusers_to_bfl({k: v.contiguous() for k, v in self.autoencoder.state_dict().items()})


def build_flux_vae(kwargs: dict) -> FluxVAE:
    """A randomly initialised :class:`FluxVAE` from ``AutoencoderKL`` arguments (:func:`flux_kwargs`)."""
    from diffusers import AutoencoderKL

    return FluxVAE(AutoencoderKL(**kwargs))


def flux_vae_skeleton(path: str | Path, vae: VaeConfig = VaeConfig()) -> FluxVAE:
    """``ae.safetensors``' architecture on the meta device, from its header alone (no tensor data read)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: missing (BAGEL's FLUX VAE weights)")
    with opened_safetensors(path) as f:
        shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    with torch.device("meta"):
        return build_flux_vae(autoencoder_kwargs(shapes, vae, str(path)))


def load_flux_vae(path: str | Path, vae: VaeConfig = VaeConfig(), dtype: torch.dtype = torch.float32,
                  device="cpu") -> FluxVAE:
    """``ae.safetensors`` -> :class:`FluxVAE` (strict: the first missing/unexpected/misshapen key is an error)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: missing (BAGEL's FLUX VAE weights)")
    with opened_safetensors(path) as f:
        raw = {k: f.get_tensor(k) for k in f.keys()}
    model = build_flux_vae(autoencoder_kwargs({k: tuple(v.shape) for k, v in raw.items()}, vae, str(path)))
    levels = len(model.autoencoder.config.block_out_channels)
    state = bfl_to_diffusers(raw)
    expected = {k: tuple(v.shape) for k, v in model.autoencoder.state_dict().items()}
    check_state_keys(expected, {k: tuple(v.shape) for k, v in state.items()}, str(path),
                     rename=lambda k: diffusers_to_bfl_key(k, levels))
    model.autoencoder.load_state_dict(state, strict=True)
    return model.to(device=device, dtype=dtype).eval().requires_grad_(False)
