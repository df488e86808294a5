"""Images in and out of BAGEL: resizing, VAE latents <-> generation tokens, and the two image contexts.

Resizing follows BAGEL's ``MaxLongEdgeMinShortEdgeResize`` with PIL bicubic (what torchvision does for a PIL image,
so no torchvision is needed): scale the long side down to ``max_size``, the short side up to ``min_size``, round
each side to a multiple of ``stride``, then cap the pixel count at 14*14*9*1024 (it binds at the VAE's 1024 px for
images longer than about 7:1) and the long side again.  Checked against the reference's ``data/transforms.py`` on
221 sizes at each of the four sizes below (session 35).

Contexts (R3's stages, positions continuing from the cache):

* understanding: text and ViT blocks in any order (reflect: ``[ViT(image)]`` then the reflection prompt);
* editing (refine): ``[VAE(image)]``, ``[ViT(image)]``, ``[instruction]``; the noised target block then has the
  input's size.
"""
from __future__ import annotations

from typing import Sequence, Union

import numpy as np
import torch
from PIL import Image

from r3_rl.policy.bagel.embeddings import patchify, unpatchify
from r3_rl.policy.bagel.layout import Block, VaeBlock, VitBlock
from r3_rl.policy.bagel.model import BagelModel, text_block
from r3_rl.policy.bagel.vae import FluxVAE

# (max_size, min_size, stride) of the two transforms
BAGEL_VAE_SIZE, BAGEL_VIT_SIZE = (1024, 512, 16), (980, 224, 14)   # B: app.py / inference notebook
R3_VAE_SIZE, R3_VIT_SIZE = (512, 256, 16), (504, 252, 14)          # R3: a 512 px image -> 32x32 latents, 36x36 ViT


MAX_PIXELS = 14 * 14 * 9 * 1024  # BAGEL's ImageTransform default


def target_size(width: int, height: int, max_size: int, min_size: int, stride: int,
                max_pixels: int = MAX_PIXELS) -> tuple[int, int]:
    """(width, height) after BAGEL's resize rule."""
    def snap(v: float) -> int:
        return max(stride, int(round(round(v) / stride)) * stride)

    scale = min(max_size / max(width, height), 1.0)
    scale = max(scale, min_size / min(width, height))
    w, h = snap(width * scale), snap(height * scale)
    if w * h > max_pixels:  # the reference scales both sides by the area ratio (not its square root): kept as is
        scale = max_pixels / (w * h)
        w, h = snap(w * scale), snap(h * scale)
    if max(w, h) > max_size:  # rounding up can overshoot the long side
        scale = max_size / max(w, h)
        w, h = snap(w * scale), snap(h * scale)
    return w, h


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB, with transparency composited on white where BAGEL's ``pil_img2rgb`` does it: RGBA images and any image
    with a ``transparency`` key (palette, RGB or grey); an LA image's alpha is dropped, as there."""
    if image.mode == "RGBA" or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")


def image_tensor(image: Image.Image, size: tuple[int, int, int]) -> torch.Tensor:
    """A PIL image resized by ``size`` = (max, min, stride) -> [3, H, W] float32 in [-1, 1]."""
    image = to_rgb(image)
    w, h = target_size(*image.size, *size)
    if (w, h) != image.size:
        image = image.resize((w, h), Image.BICUBIC)
    array = np.asarray(image, dtype=np.float32) / 255.0
    return torch.from_numpy(array).permute(2, 0, 1) * 2.0 - 1.0


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """[B, 3, H, W] in [-1, 1] -> uint8 [B, H, W, 3] (BAGEL: (x * 0.5 + 0.5).clamp(0, 1) * 255, truncated)."""
    x = ((images.float() * 0.5 + 0.5).clamp(0, 1) * 255).to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()


def encode_latents(vae: FluxVAE, pixels: torch.Tensor, patch: int) -> tuple[torch.Tensor, tuple[int, int]]:
    """Images [B, 3, H, W] in [-1, 1] (sides multiples of 8*patch) -> tokens [B, h*w, p*p*z] (fp32) and (h, w)."""
    latents = vae.encode(pixels).float()
    grid = (latents.shape[-2] // patch, latents.shape[-1] // patch)
    return patchify(latents, patch), grid


def decode_latents(vae: FluxVAE, tokens: torch.Tensor, grid: tuple[int, int], patch: int) -> torch.Tensor:
    """Tokens [B, h*w, p*p*z] -> images [B, 3, h*p*8, w*p*8] in [-1, 1] (not clamped)."""
    return vae.decode(unpatchify(tokens.float(), grid, patch))


def latent_grid(height: int, width: int, model: BagelModel) -> tuple[int, int]:
    """The generation-token grid (h, w) of an image of ``height`` x ``width`` pixels (16 px per token)."""
    d = model.config.latent_downsample
    if height % d or width % d:
        raise ValueError(f"a {height}x{width} image is not a multiple of {d} px per generation token")
    return height // d, width // d


Item = Union[str, Image.Image, Block]


def understanding_blocks(tokenizer, model: BagelModel, items: Sequence[Item],
                         vit_size: tuple[int, int, int] = R3_VIT_SIZE) -> list[Block]:
    """Blocks of an understanding context: each str becomes a text block, each image a ViT block."""
    blocks: list[Block] = []
    for item in items:
        if isinstance(item, str):
            blocks.append(text_block(tokenizer, item, model.config.tokens))
        elif isinstance(item, Image.Image):
            blocks.append(VitBlock(image_tensor(item, vit_size)))
        else:
            blocks.append(item)
    return blocks


def editing_blocks(tokenizer, model: BagelModel, vae: FluxVAE, image: Image.Image, instruction: str | None,
                   vae_size: tuple[int, int, int] = R3_VAE_SIZE,
                   vit_size: tuple[int, int, int] = R3_VIT_SIZE) -> tuple[list[Block], tuple[int, int]]:
    """``[VAE(image), ViT(image), instruction]`` (no instruction: the image-only CFG context) and the grid of
    the image to generate, which is the input's."""
    pixels = image_tensor(image, vae_size)[None].to(model.device)
    tokens, grid = encode_latents(vae, pixels, model.config.latent_patch_size)
    blocks: list[Block] = [VaeBlock(tokens[0], grid), VitBlock(image_tensor(image, vit_size))]
    if instruction is not None:
        blocks.append(text_block(tokenizer, instruction, model.config.tokens))
    return blocks, grid

