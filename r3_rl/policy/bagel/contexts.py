"""What a BAGEL segment records about its context, and how the policy turns it back into blocks and caches.

A segment's ``context`` is JSON-safe: lists of block records per context row, plus the images they read once
each, as lossless PNGs:

* ``{"text": [ids]}`` -- a text block, ``<|im_start|>`` and ``<|im_end|>`` included;
* ``{"vit": k}`` -- image ``k`` read by SigLIP (understanding);
* ``{"vae": k}`` -- image ``k``'s clean VAE latents (an edit's input).

Rebuilding is deterministic (PIL bicubic resize, the VAE posterior mean), so the training forward sees exactly the
context the sampler saw.  :class:`ContextBuilder` also encodes rows of blocks into a
:class:`~r3_rl.policy.bagel.layout.ContextCache`, differentiably when gradients are on (the learner's forward).
"""
from __future__ import annotations

import hashlib
from collections import OrderedDict
from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image

from r3_rl.policy.bagel.images import encode_latents, image_tensor
from r3_rl.policy.bagel.layout import Block, ContextCache, TextBlock, VaeBlock, VitBlock
from r3_rl.policy.bagel.model import BagelModel, text_block
from r3_rl.policy.janus_prompts import image_ref, png_pixels

Record = dict[str, Any]
LATENT_CACHE = 64  # edit inputs whose VAE latents are kept (a rollout group and its training forward share them)


def text_record(tokenizer, text: str, tokens) -> Record:
    """``<|im_start|>`` + text + ``<|im_end|>``: BAGEL's text block (:func:`model.text_block`) as a record."""
    return {"text": list(text_block(tokenizer, text, tokens).ids)}


def store_images(images: Sequence[np.ndarray]) -> dict[str, Any]:
    """Images as a segment stores them (``{"0": {"png": ...}}``)."""
    return {str(k): image_ref(img, None) for k, img in enumerate(images)}


def stored_per_row(images: Sequence[np.ndarray]) -> list[dict[str, Any]]:
    """:func:`store_images` of each row's one input image, encoded once per distinct image and shared by the rows
    that read it: Tree-RL's siblings critique and edit the same parent, and a 512 px PNG is ~50 ms and ~0.7 MB of
    base64 -- 16 siblings had encoded and carried (through Ray, into the trees and the learner's batch) 16
    copies.  One shared dict also pickles once."""
    stored: dict[str, dict[str, Any]] = {}
    out = []
    for image in images:
        key = image_digest(image)
        if key not in stored:
            stored[key] = store_images([image])
        out.append(stored[key])
    return out


def image_digest(image: np.ndarray) -> str:
    arr = np.ascontiguousarray(image, dtype=np.uint8)
    return hashlib.sha1(arr.tobytes() + str(arr.shape).encode()).hexdigest()


class ContextBuilder:
    """Block records -> blocks -> context caches, for one model and its frozen VAE."""

    def __init__(self, model: BagelModel, vae: Any, vit_size: tuple[int, int, int],
                 vae_size: tuple[int, int, int]) -> None:
        self.model, self.vae = model, vae
        self.vit_size, self.vae_size = vit_size, vae_size
        self._latents: OrderedDict[str, tuple[torch.Tensor, tuple[int, int]]] = OrderedDict()

    def vit_block(self, image: np.ndarray) -> VitBlock:
        return VitBlock(image_tensor(Image.fromarray(np.ascontiguousarray(image, dtype=np.uint8)), self.vit_size))

    def vae_block(self, image: np.ndarray) -> VaeBlock:
        """The clean latents of an edit's input (cached by content: the VAE is frozen and deterministic)."""
        key = image_digest(image)
        if key not in self._latents:
            pixels = image_tensor(Image.fromarray(np.ascontiguousarray(image, dtype=np.uint8)), self.vae_size)
            with torch.no_grad():
                tokens, grid = encode_latents(self.vae, pixels[None].to(self.model.device),
                                              self.model.config.latent_patch_size)
            self._latents[key] = (tokens[0], grid)
            while len(self._latents) > LATENT_CACHE:
                self._latents.popitem(last=False)
        self._latents.move_to_end(key)
        tokens, grid = self._latents[key]
        return VaeBlock(tokens, grid)

    def blocks(self, records: Sequence[Record], images: dict[str, Any]) -> list[Block]:
        """Block records of one row; ``images`` maps ``str(k)`` to a stored image (or already its pixels)."""
        pixels: dict[str, np.ndarray] = {}

        def image(k: Any) -> np.ndarray:
            key = str(k)
            if key not in pixels:
                ref = images[key]
                pixels[key] = ref if isinstance(ref, np.ndarray) else png_pixels(ref)
            return pixels[key]

        out: list[Block] = []
        for rec in records:
            if "text" in rec:
                out.append(TextBlock([int(i) for i in rec["text"]]))
            elif "vit" in rec:
                out.append(self.vit_block(image(rec["vit"])))
            elif "vae" in rec:
                out.append(self.vae_block(image(rec["vae"])))
            else:
                raise ValueError(f"BAGEL context: unknown block record {sorted(rec)} (expected text, vit or vae)")
        return out

    def encode(self, rows: Sequence[Sequence[Block]], grad_expert: str | None = None) -> ContextCache:
        """The context cache of ``rows`` (one block list per row; rows may be empty: no context at all);
        ``grad_expert``: the only expert the cache's keys/values carry gradients to (None: both)."""
        if not any(rows):
            return ContextCache.empty(len(rows), self.model.device)
        return self.model.extend_context(None, rows, grad_expert)
