"""BAGEL sequences: blocks, their padded layout, the attention mask, and the context KV cache.

A row (one sample) is a list of blocks:

* :class:`TextBlock` — token ids, causal attention, one RoPE position per token, understanding expert;
* :class:`VitBlock` — ``<|vision_start|>``, SigLIP tokens of an image, ``<|vision_end|>``; full attention inside;
* :class:`VaeBlock` — the same markers around the clean VAE latents of an image (t = 0), full attention inside;
* :class:`NoiseBlock` — the markers around noised latents x_t at time t: full attention inside, and **no other
  token may attend to it**, so several noised copies can follow one context in a row.

Image blocks take one RoPE position for all their tokens (spatial information comes from the sin-cos tables); a
noised block does not advance the position (R3 puts every noised copy at the same position).  Latent tokens use
the generation expert; everything else (markers included) the understanding expert.

The mask rule (BAGEL's ``create_sparse_mask``): key k is visible to query q iff k is valid and (k is not later than
q, or both are in the same full/noise block) and k is not in a noise block other than q's.  Every query also sees
itself, so padding rows never produce an all-masked softmax.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence, Union

import torch

CAUSAL, FULL, NOISE = 0, 1, 2
PAD, TOKEN, VIT, LATENT = 0, 1, 2, 3  # what fills a position


@dataclass(frozen=True)
class TextBlock:
    """Token ids as given; BAGEL wraps text in ``<|im_start|>`` ... ``<|im_end|>`` (``model.text_block``)."""
    ids: Sequence[int]


@dataclass(frozen=True)
class VitBlock:
    """An image for the understanding path: pixels [3, H, W] in [-1, 1], sides multiples of the ViT patch."""
    pixels: torch.Tensor


@dataclass(frozen=True)
class VaeBlock:
    """Clean patchified VAE latents [h*w, p*p*z] of an image (an edit's input): t = 0, generation expert."""
    latents: torch.Tensor
    grid: tuple[int, int]


@dataclass(frozen=True)
class NoiseBlock:
    """Noised latents x_t [h*w, p*p*z] at flow time ``t`` (1 = noise, 0 = data): the block being denoised."""
    latents: torch.Tensor
    t: Union[float, torch.Tensor]
    grid: tuple[int, int]


Block = Union[TextBlock, VitBlock, VaeBlock, NoiseBlock]


@dataclass
class Span:
    """Where one block sits in its row of the layout: positions [start, end), markers included for images."""
    kind: str
    start: int
    end: int

    @property
    def inner(self) -> slice:
        """The content positions (an image block's tokens without its two markers)."""
        return slice(self.start + 1, self.end - 1) if self.kind != "text" else slice(self.start, self.end)


@dataclass
class Layout:
    """Per-position tensors [B, L] of a padded batch of rows, plus where each block and image landed."""
    token_ids: torch.Tensor
    source: torch.Tensor
    position_ids: torch.Tensor
    block_ids: torch.Tensor
    modes: torch.Tensor
    spans: list[list[Span]]
    vit_items: list[tuple[int, int, VitBlock]] = field(default_factory=list)            # (row, first index, block)
    latent_items: list[tuple[int, int, Union[VaeBlock, NoiseBlock]]] = field(default_factory=list)
    next_position: torch.Tensor | None = None
    next_block: torch.Tensor | None = None

    @property
    def valid(self) -> torch.Tensor:
        return self.source != PAD

    @property
    def gen_mask(self) -> torch.Tensor:
        return self.source == LATENT

    @property
    def last_index(self) -> torch.Tensor:
        """[B]: index of each row's last real position."""
        return torch.tensor([row[-1].end - 1 if row else 0 for row in self.spans], device=self.source.device)


def build_layout(rows: Sequence[Sequence[Block]], *, vit_patch: int, marker_ids: tuple[int, int],
                 start_position: Sequence[int] | None = None, start_block: Sequence[int] | None = None,
                 device=None) -> Layout:
    """Lay the rows out side by side, right-padded to the longest; positions/blocks continue the given counters."""
    begin, end = marker_ids
    b = len(rows)
    start_position = list(start_position) if start_position is not None else [0] * b
    start_block = list(start_block) if start_block is not None else [0] * b
    cols = {name: [] for name in ("ids", "src", "pos", "blk", "mode")}
    spans, vit_items, latent_items, next_pos, next_blk = [], [], [], [], []
    for r, row in enumerate(rows):
        ids, src, pos, blk, mode, row_spans = [], [], [], [], [], []
        p, k = start_position[r], start_block[r]
        for block in row:
            start = len(ids)
            if isinstance(block, TextBlock):
                n = len(block.ids)
                if n == 0:
                    raise ValueError("a text block needs at least one token")
                ids += [int(i) for i in block.ids]
                src += [TOKEN] * n
                pos += range(p, p + n)
                blk += [k] * n
                mode += [CAUSAL] * n
                p += n
                row_spans.append(Span("text", start, start + n))
            else:
                if isinstance(block, VitBlock):
                    _, hh, ww = block.pixels.shape
                    n, kind, inner, m = (hh // vit_patch) * (ww // vit_patch), "vit", VIT, FULL
                    vit_items.append((r, start + 1, block))
                else:
                    n = block.latents.shape[0]
                    if n != block.grid[0] * block.grid[1]:
                        raise ValueError(f"{n} latent tokens do not fill a {block.grid} grid")
                    noised = isinstance(block, NoiseBlock)
                    kind, inner, m = ("noise", LATENT, NOISE) if noised else ("vae", LATENT, FULL)
                    latent_items.append((r, start + 1, block))
                ids += [begin] + [0] * n + [end]
                src += [TOKEN] + [inner] * n + [TOKEN]
                pos += [p] * (n + 2)
                blk += [k] * (n + 2)
                mode += [m] * (n + 2)
                if kind != "noise":
                    p += 1
                row_spans.append(Span(kind, start, start + n + 2))
            k += 1
        for name, col in zip(cols, (ids, src, pos, blk, mode)):
            cols[name].append(col)
        spans.append(row_spans)
        next_pos.append(p)
        next_blk.append(k)
    length = max(1, max(len(c) for c in cols["ids"]))
    pads = {"ids": 0, "src": PAD, "pos": 0, "blk": -1, "mode": CAUSAL}

    def tensor(name):
        data = [c + [pads[name]] * (length - len(c)) for c in cols[name]]
        return torch.tensor(data, dtype=torch.long, device=device)

    return Layout(token_ids=tensor("ids"), source=tensor("src"), position_ids=tensor("pos"),
                  block_ids=tensor("blk"), modes=tensor("mode"), spans=spans, vit_items=vit_items,
                  latent_items=latent_items, next_position=torch.tensor(next_pos, device=device),
                  next_block=torch.tensor(next_blk, device=device))


def attention_mask(q_block: torch.Tensor, q_mode: torch.Tensor, k_block: torch.Tensor, k_mode: torch.Tensor,
                   k_valid: torch.Tensor) -> torch.Tensor:
    """Boolean mask [B, 1, Lq, Lk] (True = attend) for queries that are the last Lq of the Lk keys."""
    lq, lk = q_block.shape[1], k_block.shape[1]
    q_idx = torch.arange(lk - lq, lk, device=q_block.device)
    k_idx = torch.arange(lk, device=q_block.device)
    earlier = (k_idx[None, :] <= q_idx[:, None])[None]
    same = q_block[:, :, None] == k_block[:, None, :]
    inside = same & (q_mode != CAUSAL)[:, :, None]
    hidden_noise = (k_mode == NOISE)[:, None, :] & ~same
    allowed = (earlier | inside) & ~hidden_noise & k_valid[:, None, :]
    allowed = allowed | (k_idx[None, :] == q_idx[:, None])[None]
    return allowed[:, None]


KV = tuple[torch.Tensor, torch.Tensor]


@dataclass
class ContextCache:
    """Post-RoPE keys/values of an encoded context, per layer [B, kv_heads, Lc, head_dim], with each key's block,
    mode and validity (for the mask) and each row's next RoPE position and block id.

    Immutable in use: :meth:`BagelModel.extend_context` returns a new cache.  ``select`` (siblings, CFG rows) is a
    differentiable index, so a training forward can share one context's cache among rows and still backpropagate
    into it.  ``kv`` is None for an empty context.
    """
    kv: list[KV] | None
    block_ids: torch.Tensor
    modes: torch.Tensor
    valid: torch.Tensor
    next_position: torch.Tensor
    next_block: torch.Tensor

    @classmethod
    def empty(cls, batch_size: int, device=None) -> "ContextCache":
        z = torch.zeros(batch_size, 0, dtype=torch.long, device=device)
        zero = torch.zeros(batch_size, dtype=torch.long, device=device)
        return cls(None, z, z.clone(), z.bool(), zero, zero.clone())

    @property
    def batch_size(self) -> int:
        return self.valid.shape[0]

    @property
    def length(self) -> int:
        return self.valid.shape[1]

    def select(self, rows: Sequence[int] | torch.Tensor) -> "ContextCache":
        """Rows ``rows`` of this cache (repeats allowed: one context copied to its siblings or CFG rows)."""
        idx = torch.as_tensor(rows, dtype=torch.long, device=self.valid.device)
        kv = None if self.kv is None else [(k.index_select(0, idx), v.index_select(0, idx)) for k, v in self.kv]
        return ContextCache(kv, self.block_ids[idx], self.modes[idx], self.valid[idx], self.next_position[idx],
                            self.next_block[idx])

    def appended(self, layout: Layout, new_kv: list[KV]) -> "ContextCache":
        """This cache followed by the keys/values of ``layout``'s tokens (its pads become invalid keys)."""
        kv = new_kv if self.kv is None else [(torch.cat([k0, k1], 2), torch.cat([v0, v1], 2))
                                             for (k0, v0), (k1, v1) in zip(self.kv, new_kv)]
        return ContextCache(kv, torch.cat([self.block_ids, layout.block_ids], 1),
                            torch.cat([self.modes, layout.modes], 1), torch.cat([self.valid, layout.valid], 1),
                            layout.next_position, layout.next_block)

    @staticmethod
    def concat(caches: Sequence["ContextCache"]) -> "ContextCache":
        """Stack caches along the batch, right-padding shorter ones with invalid keys (e.g. cond + CFG rows)."""
        length = max(c.length for c in caches)
        shapes = next((c.kv for c in caches if c.kv is not None), None)

        def pad(t, value):
            extra = length - t.shape[-1]
            return t if extra == 0 else torch.cat([t, t.new_full((*t.shape[:-1], extra), value)], -1)

        kv = None
        if shapes is not None:
            kv = []
            for layer, (k_ref, _) in enumerate(shapes):
                ks, vs = [], []
                for c in caches:
                    if c.kv is None:
                        k = v = k_ref.new_zeros(c.batch_size, k_ref.shape[1], 0, k_ref.shape[3])
                    else:
                        k, v = c.kv[layer]
                    extra = length - k.shape[2]
                    if extra:
                        zeros = k.new_zeros(k.shape[0], k.shape[1], extra, k.shape[3])
                        k, v = torch.cat([k, zeros], 2), torch.cat([v, zeros], 2)
                    ks.append(k)
                    vs.append(v)
                kv.append((torch.cat(ks), torch.cat(vs)))
        return ContextCache(kv, torch.cat([pad(c.block_ids, -1) for c in caches]),
                            torch.cat([pad(c.modes, CAUSAL) for c in caches]),
                            torch.cat([pad(c.valid, False) for c in caches]),
                            torch.cat([c.next_position for c in caches]), torch.cat([c.next_block for c in caches]))
