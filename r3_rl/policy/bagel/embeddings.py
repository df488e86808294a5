"""BAGEL's small embedding pieces: 2-D sin-cos tables, the timestep embedder, the ViT connector, patchify.

Module and parameter names follow the published checkpoint (``time_embedder.mlp.0``, ``connector.fc1``,
``latent_pos_embed.pos_embed`` ...), so a plain ``load_state_dict`` of ``ema.safetensors`` fills them.
"""
from __future__ import annotations

import math

import torch
from torch import nn
from transformers.activations import ACT2FN


def sincos_1d(dim: int, pos: torch.Tensor) -> torch.Tensor:
    """[len(pos), dim]: ``[sin(pos*w), cos(pos*w)]`` with ``w_k = 10000^(-k/(dim/2))`` (float64)."""
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2.0))
    out = pos.to(torch.float64)[:, None] * omega[None]
    return torch.cat([out.sin(), out.cos()], dim=1)


def sincos_2d_table(dim: int, side: int) -> torch.Tensor:
    """The MAE/DiT 2-D table [side*side, dim] in float32; row ``r*side + c`` is ``[1d(c), 1d(r)]``.

    The first half encodes the column: this is the layout BAGEL's checkpoint stores (and diffusers'
    ``get_2d_sincos_pos_embed`` computes).
    """
    if dim % 4:
        raise ValueError(f"a 2-D sin-cos table needs a width divisible by 4, got {dim}")
    rows, cols = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
    table = torch.cat([sincos_1d(dim // 2, cols.reshape(-1)), sincos_1d(dim // 2, rows.reshape(-1))], dim=1)
    return table.float()


class PositionTable(nn.Module):
    """A frozen 2-D sin-cos table, stored as the persistent buffer ``pos_embed`` [side*side, dim].

    The checkpoint holds it (as a frozen parameter in the reference); a buffer keeps it out of optimisers
    while ``state_dict`` still round-trips the published key ``<module>.pos_embed``.
    """

    def __init__(self, side: int, dim: int) -> None:
        super().__init__()
        self.side = side
        self.register_buffer("pos_embed", sincos_2d_table(dim, side))

    def forward(self, position_ids: torch.Tensor) -> torch.Tensor:
        return self.pos_embed[position_ids]


def grid_position_ids(rows: int, cols: int, side: int, device=None) -> torch.Tensor:
    """Flat ids ``r*side + c`` of the top-left ``rows x cols`` sub-grid (BAGEL's "extrapolate" positions)."""
    if rows > side or cols > side:
        raise ValueError(f"a {rows}x{cols} grid does not fit the {side}x{side} position table")
    r = torch.arange(rows, device=device)[:, None]
    c = torch.arange(cols, device=device)[None, :]
    return (r * side + c).reshape(-1)


def timestep_sinusoid(t: torch.Tensor, dim: int = 256, max_period: float = 10000.0) -> torch.Tensor:
    """DiT's timestep features [len(t), dim]: ``[cos(t*f), sin(t*f)]``, ``f_k = max_period^(-k/(dim/2))``.

    BAGEL feeds t in [0, 1] directly (no x1000), so only the lowest frequencies move much.
    """
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.reshape(-1).float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class TimestepEmbedder(nn.Module):
    """t -> sinusoid(256) -> Linear -> SiLU -> Linear (keys ``mlp.0``, ``mlp.2``)."""

    def __init__(self, hidden_size: int, frequency_size: int = 256) -> None:
        super().__init__()
        self.frequency_size = frequency_size
        self.mlp = nn.Sequential(nn.Linear(frequency_size, hidden_size), nn.SiLU(),
                                 nn.Linear(hidden_size, hidden_size))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        features = timestep_sinusoid(t, self.frequency_size)
        return self.mlp(features.to(self.mlp[0].weight.dtype))


class Connector(nn.Module):
    """ViT width -> LLM width: fc1, activation, fc2 (BAGEL's ``MLPconnector``)."""

    def __init__(self, in_dim: int, out_dim: int, act: str) -> None:
        super().__init__()
        self.fc1 = nn.Linear(in_dim, out_dim)
        self.act = ACT2FN[act]
        self.fc2 = nn.Linear(out_dim, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


def patchify(x: torch.Tensor, p: int) -> torch.Tensor:
    """[..., c, h*p, w*p] -> [..., h*w, p*p*c], each patch flattened in (row-in-patch, col-in-patch, channel) order.

    One order for both paths: VAE latents (p = 2) and ViT pixels (p = 14, the order of the 2-D patch Linear).
    """
    *lead, c, hh, ww = x.shape
    if hh % p or ww % p:
        raise ValueError(f"a {hh}x{ww} grid is not a multiple of the patch size {p}")
    h, w = hh // p, ww // p
    x = x.reshape(*lead, c, h, p, w, p)
    n = len(lead)
    x = x.permute(*range(n), n + 1, n + 3, n + 2, n + 4, n)  # -> h, w, p, q, c
    return x.reshape(*lead, h * w, p * p * c)


def unpatchify(tokens: torch.Tensor, grid: tuple[int, int], p: int) -> torch.Tensor:
    """The inverse of :func:`patchify`: [..., h*w, p*p*c] -> [..., c, h*p, w*p]."""
    h, w = grid
    *lead, n, d = tokens.shape
    if n != h * w or d % (p * p):
        raise ValueError(f"{n} tokens of {d} values do not form a {h}x{w} grid of {p}x{p} patches")
    c = d // (p * p)
    x = tokens.reshape(*lead, h, w, p, p, c)
    k = len(lead)
    x = x.permute(*range(k), k + 4, k, k + 2, k + 1, k + 3)  # -> c, h, p, w, q
    return x.reshape(*lead, c, h * p, w * p)
