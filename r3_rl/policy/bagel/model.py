"""The BAGEL model: MoT language model, SigLIP understanding path, flow-matching generation heads.

Parameter names are the published ``ema.safetensors`` keys, so ``load_state_dict`` of the file works as is.
One forward serves every use: :meth:`BagelModel.forward` takes rows of blocks (:mod:`~r3_rl.policy.bagel.layout`),
optionally after a cached context, and returns the final hidden states.  On top of it:

* :meth:`~BagelModel.extend_context` — encode text / ViT / VAE blocks into a :class:`ContextCache`;
* :meth:`~BagelModel.predict_velocity` — the flow sampler's function: v(x_t, t | context), the context read from the
  cache (never updated), so one context serves every denoising step, CFG row and sibling;
* :meth:`~BagelModel.next_token_logits` — append text to a context and read the next-token logits.

Flow convention (BAGEL's): t = 1 is noise, t = 0 data, x_t = (1 - t) x0 + t eps, and the model predicts
v = eps - x0 = dx/dt; an Euler step is x <- x - v dt.  Velocities and logits come back in float32.

Every forward takes ``grad_expert`` (None, "und" or "gen"): the only expert whose weights the forward's outputs
can train.  With "gen", the token embeddings, the ViT and connector, and the understanding expert's every routed
computation run without gradient; with "und", the latent embeddings and the generation expert
(:mod:`r3_rl.policy.bagel.mot`).  Values do not change, only where gradients may flow.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import nn

from r3_rl.policy.bagel.config import BagelConfig
from r3_rl.policy.bagel.embeddings import Connector, PositionTable, TimestepEmbedder, grid_position_ids
from r3_rl.policy.bagel.layout import (LATENT, TOKEN, Block, ContextCache, Layout, NoiseBlock, TextBlock,
                                       attention_mask, build_layout)
from r3_rl.policy.bagel.mot import MoTForCausalLM, expert_grad
from r3_rl.policy.bagel.vision import VitTower


@dataclass
class BagelOutput:
    """Final hidden states [B, L, H] of the new tokens (normed by each token's expert), their layout, and the
    extended cache when the forward was asked to keep it."""
    hidden: torch.Tensor
    layout: Layout
    cache: ContextCache | None = None

    def last_hidden(self) -> torch.Tensor:
        """[B, H]: each row's last real position (where the next token is predicted)."""
        rows = torch.arange(self.hidden.shape[0], device=self.hidden.device)
        return self.hidden[rows, self.layout.last_index]


class BagelModel(nn.Module):
    def __init__(self, config: BagelConfig) -> None:
        super().__init__()
        self.config = config
        h = config.hidden_size
        self.language_model = MoTForCausalLM(config.llm)
        self.vit_model = VitTower(config.vit)
        self.connector = Connector(config.vit.hidden_size, h, config.connector_act)
        self.vit_pos_embed = PositionTable(config.vit_max_num_patch_per_side, h)
        self.time_embedder = TimestepEmbedder(h)
        self.vae2llm = nn.Linear(config.patch_latent_dim, h)
        self.llm2vae = nn.Linear(h, config.patch_latent_dim)
        self.latent_pos_embed = PositionTable(config.max_latent_size, h)

    @property
    def dtype(self) -> torch.dtype:
        return self.vae2llm.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.vae2llm.weight.device

    supports_gradient_checkpointing = True  # what ``learner.gradient_checkpointing`` looks for (transformers' flag)

    def set_gradient_checkpointing(self, enabled: bool = True) -> None:
        """Recompute each decoder layer in backward (the LLM holds nearly all activations)."""
        self.language_model.model.gradient_checkpointing = enabled

    def activation_checkpointing_enable(self, activation_checkpointing_kwargs: dict | None = None) -> None:
        """transformers' switch, as ``learner.gradient_checkpointing`` calls it; the layers always recompute with
        non-reentrant checkpointing (the kwargs' only setting, ``use_reentrant=False``, is what they do)."""
        self.set_gradient_checkpointing(True)

    # ------------------------------------------------------------------ embeddings of each block kind
    def embed_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """pixels [N, 3, H, W] in [-1, 1] (one size) -> LLM-width ViT tokens [N, (H/p)*(W/p), hidden]."""
        p = self.config.vit.patch_size
        ids = grid_position_ids(pixels.shape[-2] // p, pixels.shape[-1] // p, self.config.vit_max_num_patch_per_side,
                                pixels.device)
        features = self.vit_model(pixels, ids)
        return self.connector(features) + self.vit_pos_embed(ids).to(features.dtype)

    def embed_latents(self, latents: torch.Tensor, t: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """latents [N, h*w, p*p*z] at times t [N] -> [N, h*w, hidden]: vae2llm + time embedding + 2-D position."""
        ids = grid_position_ids(grid[0], grid[1], self.config.max_latent_size, latents.device)
        x = self.vae2llm(latents.to(self.dtype))
        return x + self.time_embedder(t)[:, None] + self.latent_pos_embed(ids).to(x.dtype)[None]

    def _embed(self, layout: Layout, grad_expert: str | None = None) -> torch.Tensor:
        b, n = layout.token_ids.shape
        with expert_grad("und", grad_expert):
            tokens = self.language_model.model.embed_tokens(layout.token_ids)
        x = torch.where((layout.source == TOKEN)[..., None], tokens, torch.zeros((), dtype=tokens.dtype,
                                                                                 device=tokens.device))
        x = x.reshape(b * n, -1)
        kinds = ((layout.vit_items, self._embed_vit_group, "und"), (layout.latent_items, self._embed_latent_group,
                                                                      "gen"))
        for items, embed, expert in kinds:
            groups: dict = {}
            for row, first, block in items:
                key = tuple(block.pixels.shape) if hasattr(block, "pixels") else tuple(block.grid)
                groups.setdefault(key, []).append((row, first, block))
            for key, group in groups.items():
                with expert_grad(expert, grad_expert):
                    values = embed(group, key)  # [len(group), tokens, H]
                count = values.shape[1]
                idx = torch.cat([row * n + first + torch.arange(count, device=x.device) for row, first, _ in group])
                x = x.index_copy(0, idx, values.reshape(-1, values.shape[-1]).to(x.dtype))
        return x.reshape(b, n, -1)

    def _embed_vit_group(self, group, _shape) -> torch.Tensor:
        return self.embed_images(torch.stack([block.pixels for _, _, block in group]).to(self.device))

    def _embed_latent_group(self, group, grid) -> torch.Tensor:
        latents = torch.stack([block.latents for _, _, block in group]).to(self.device)
        t = torch.stack([torch.as_tensor(block.t if isinstance(block, NoiseBlock) else 0.0, dtype=torch.float32,
                                         device=self.device).reshape(()) for _, _, block in group])
        return self.embed_latents(latents, t, grid)

    # ------------------------------------------------------------------ the forward
    def forward(self, rows: Sequence[Sequence[Block]], cache: ContextCache | None = None,
                keep_cache: bool = False, grad_expert: str | None = None) -> BagelOutput:
        """Run ``rows`` (one list of blocks per batch row) after ``cache`` (same number of rows, or None).

        With ``keep_cache`` the returned output carries the cache extended by these tokens (for context blocks;
        a noised block in it would stay invisible to later blocks).  ``grad_expert``: see the module docstring.
        """
        if cache is None:
            cache = ContextCache.empty(len(rows), self.device)
        if cache.batch_size != len(rows):
            raise ValueError(f"{len(rows)} rows after a context cache of {cache.batch_size} rows")
        tok = self.config.tokens
        layout = build_layout(rows, vit_patch=self.config.vit.patch_size, marker_ids=(tok.vision_start, tok.vision_end),
                              start_position=cache.next_position.tolist(), start_block=cache.next_block.tolist(),
                              device=self.device)
        x = self._embed(layout, grad_expert)
        mask = attention_mask(layout.block_ids, layout.modes, torch.cat([cache.block_ids, layout.block_ids], 1),
                              torch.cat([cache.modes, layout.modes], 1), torch.cat([cache.valid, layout.valid], 1))
        hidden, new_kv = self.language_model.model(x, layout.position_ids, layout.source == LATENT, mask, cache.kv,
                                                   grad_expert)
        return BagelOutput(hidden, layout, cache.appended(layout, new_kv) if keep_cache else None)

    # ------------------------------------------------------------------ heads
    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Next-token logits (float32) from understanding-token hidden states [..., H]."""
        return self.language_model.lm_head(hidden).float()

    def velocity(self, hidden: torch.Tensor) -> torch.Tensor:
        """Velocity (float32) [..., p*p*z] from generation-token hidden states [..., H]."""
        return self.llm2vae(hidden).float()

    # ------------------------------------------------------------------ what samplers call
    def extend_context(self, cache: ContextCache | None, rows: Sequence[Sequence[Block]],
                       grad_expert: str | None = None) -> ContextCache:
        """``cache`` (None = empty) followed by ``rows``' text / ViT / VAE blocks, one list per row."""
        return self(rows, cache, keep_cache=True, grad_expert=grad_expert).cache

    def predict_velocity(self, cache: ContextCache, x_t: torch.Tensor, t: torch.Tensor | float,
                         grid: tuple[int, int], grad_expert: str | None = None) -> torch.Tensor:
        """v(x_t, t | context) [B, h*w, p*p*z] (float32) for noised latents x_t [B, h*w, p*p*z] at times t
        (a float, or [B] per row); the context cache is read, not extended."""
        t = torch.as_tensor(t, dtype=torch.float32, device=x_t.device).expand(x_t.shape[0])
        rows = [[NoiseBlock(x_t[i], t[i], grid)] for i in range(x_t.shape[0])]
        out = self(rows, cache, grad_expert=grad_expert)
        return self.velocity(out.hidden[:, 1:-1])

    def next_token_logits(self, cache: ContextCache | None, rows: Sequence[Sequence[Block]]
                          ) -> tuple[torch.Tensor, ContextCache]:
        """Append ``rows`` (each ending in text) to the context; logits [B, vocab] at each row's last token, and
        the extended cache (for decoding, append one ``TextBlock([token])`` per row per step)."""
        out = self(rows, cache, keep_cache=True)
        return self.logits(out.last_hidden()), out.cache


def text_ids(tokenizer, text: str) -> list[int]:
    """The ids of ``text`` as text: a literal ``<|im_end|>`` or ``<|vision_start|>`` in a prompt, plan or critique is
    encoded as its characters (``split_special_tokens``), so it cannot close a block or open an image early."""
    return tokenizer.encode(text, add_special_tokens=False, split_special_tokens=True)


def text_block(tokenizer, text: str, tokens) -> TextBlock:
    """BAGEL's text block: ``<|im_start|>`` + text (:func:`text_ids`) + ``<|im_end|>``, no role, no chat template."""
    return TextBlock([tokens.im_start, *text_ids(tokenizer, text), tokens.im_end])
