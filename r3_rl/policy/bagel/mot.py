"""BAGEL's Mixture-of-Transformers language model on transformers' Qwen2 pieces.

Every decoder layer holds two full sets of weights: the understanding expert (the Qwen2.5 names: ``q_proj``,
``mlp``, ``input_layernorm`` ...) for text, ViT tokens and the image-marker tokens, and the generation expert (the
``*_moe_gen`` twins) for VAE-latent tokens, clean or noised.  There is no learned router: a per-token boolean
``gen_mask`` picks the expert.  Attention is one softmax over all tokens of a row (both experts' keys mixed), under
the boolean mask built by :mod:`r3_rl.policy.bagel.layout`.

Rows are padded (one sample per row, not NaViT packing).  A layer takes the keys/values of an already-encoded
context (``past``, post-RoPE) and returns the new tokens' keys/values, so contexts can be cached and reused across
denoising steps, CFG rows and siblings (:class:`r3_rl.policy.bagel.layout.ContextCache`).

A token's every projection, norm and MLP come from its own expert only: tokens of a row without VAE latents never
touch a ``*_moe_gen`` weight (the generation expert is then not even called).

Expert isolation (``grad_expert``): the joint attention still couples the experts -- a noised latent attends to the
context's keys/values and to its own block's image markers, which the understanding expert computes -- so a velocity
loss reaches understanding weights (BAGEL's own training backpropagates through everything).  A forward given
``grad_expert="gen"`` (or ``"und"``) runs the other expert's every routed computation under ``torch.no_grad()``:
same values, bit for bit, but the other expert's outputs are constants, so the loss trains its own expert only, and
the other expert's activations are not kept for backward.
"""
from __future__ import annotations

from contextlib import nullcontext
from typing import Callable, ContextManager

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers.models.qwen2.modeling_qwen2 import (Qwen2MLP, Qwen2RMSNorm, Qwen2RotaryEmbedding,
                                                      apply_rotary_pos_emb)

KV = tuple[torch.Tensor, torch.Tensor]
EXPERTS = ("und", "gen")
GEN_SUFFIX = "_moe_gen"  # the generation expert's copy of a projection or norm: q_proj -> q_proj_moe_gen


def expert_grad(expert: str, grad_expert: str | None) -> ContextManager:
    """``torch.no_grad()`` around ``expert``'s computation when the forward trains only the other one, else nothing."""
    if grad_expert is not None and grad_expert not in EXPERTS:
        raise ValueError(f"grad_expert: {grad_expert!r} is not one of {EXPERTS} or None (both experts)")
    return torch.no_grad() if grad_expert not in (None, expert) else nullcontext()


class Routing:
    """Splits a padded batch between the two experts by ``gen_mask`` [B, L] (True = generation expert).

    ``route(x, und, gen)`` runs ``und`` on the understanding tokens and ``gen`` on the generation tokens and puts
    the results back in place, out of place for autograd; each expert costs FLOPs for its own tokens only.
    With ``grad_expert`` ("und" / "gen"), the other expert runs without gradient (see the module docstring).
    """

    def __init__(self, gen_mask: torch.Tensor, grad_expert: str | None = None) -> None:
        expert_grad("und", grad_expert)  # validates the name
        self.grad_expert = grad_expert
        self.shape = tuple(gen_mask.shape)
        flat = gen_mask.reshape(-1)
        self.gen_idx = flat.nonzero().squeeze(1)
        self.und_idx = (~flat).nonzero().squeeze(1)
        self.all_und = self.gen_idx.numel() == 0
        self.all_gen = self.und_idx.numel() == 0

    def __call__(self, x: torch.Tensor, und: Callable, gen: Callable) -> torch.Tensor:
        if self.all_und:
            with expert_grad("und", self.grad_expert):
                return und(x)
        if self.all_gen:
            with expert_grad("gen", self.grad_expert):
                return gen(x)
        flat = x.reshape(-1, x.shape[-1])
        with expert_grad("und", self.grad_expert):
            y_und = und(flat[self.und_idx])
        with expert_grad("gen", self.grad_expert):
            y_gen = gen(flat[self.gen_idx]).to(y_und.dtype)
        out = y_und.new_zeros(flat.shape[0], y_und.shape[-1])
        out = out.index_copy(0, self.und_idx, y_und).index_copy(0, self.gen_idx, y_gen)
        return out.reshape(*self.shape, y_und.shape[-1])


class MoTAttention(nn.Module):
    """Qwen2 attention with per-head q/k RMSNorm and a generation twin of every projection and norm."""

    def __init__(self, config, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        hidden, q_dim, kv_dim = config.hidden_size, self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        eps = config.rms_norm_eps
        for suffix in ("", GEN_SUFFIX):
            setattr(self, f"q_proj{suffix}", nn.Linear(hidden, q_dim, bias=True))
            setattr(self, f"k_proj{suffix}", nn.Linear(hidden, kv_dim, bias=True))
            setattr(self, f"v_proj{suffix}", nn.Linear(hidden, kv_dim, bias=True))
            setattr(self, f"o_proj{suffix}", nn.Linear(q_dim, hidden, bias=False))
            setattr(self, f"q_norm{suffix}", Qwen2RMSNorm(self.head_dim, eps=eps))
            setattr(self, f"k_norm{suffix}", Qwen2RMSNorm(self.head_dim, eps=eps))

    def _qkv(self, suffix: str) -> Callable:
        proj_q, proj_k, proj_v = (getattr(self, f"{n}_proj{suffix}") for n in "qkv")
        norm_q, norm_k = getattr(self, f"q_norm{suffix}"), getattr(self, f"k_norm{suffix}")
        hd = self.head_dim

        def qkv(h: torch.Tensor) -> torch.Tensor:
            lead = h.shape[:-1]
            q = norm_q(proj_q(h).reshape(*lead, -1, hd)).reshape(*lead, -1)  # RMSNorm over each head, before RoPE
            k = norm_k(proj_k(h).reshape(*lead, -1, hd)).reshape(*lead, -1)
            return torch.cat([q, k, proj_v(h)], dim=-1)
        return qkv

    def forward(self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, route: Routing,
                mask: torch.Tensor, past: KV | None = None) -> tuple[torch.Tensor, KV]:
        """h [B, L, H]; mask [B, 1, L, Lpast + L] bool (True = may attend); returns (out, this block's (k, v))."""
        b, n, _ = h.shape
        qkv = route(h, self._qkv(""), self._qkv(GEN_SUFFIX))
        q_dim, kv_dim = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        q, k, v = qkv.split([q_dim, kv_dim, kv_dim], dim=-1)
        q = q.reshape(b, n, self.num_heads, self.head_dim).transpose(1, 2)
        k = k.reshape(b, n, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = v.reshape(b, n, self.num_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        keys, values = (k, v) if past is None else (torch.cat([past[0], k], 2), torch.cat([past[1], v], 2))
        out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask,
                                             enable_gqa=self.num_heads != self.num_kv_heads)
        out = out.transpose(1, 2).reshape(b, n, q_dim)
        return route(out, self.o_proj, self.o_proj_moe_gen), (k, v)


class MoTDecoderLayer(nn.Module):
    """Pre-norm block; norms, attention projections and MLP all routed per token."""

    def __init__(self, config, layer_idx: int) -> None:
        super().__init__()
        eps = config.rms_norm_eps
        self.self_attn = MoTAttention(config, layer_idx)
        self.mlp = Qwen2MLP(config)
        self.mlp_moe_gen = Qwen2MLP(config)
        self.input_layernorm = Qwen2RMSNorm(config.hidden_size, eps=eps)
        self.input_layernorm_moe_gen = Qwen2RMSNorm(config.hidden_size, eps=eps)
        self.post_attention_layernorm = Qwen2RMSNorm(config.hidden_size, eps=eps)
        self.post_attention_layernorm_moe_gen = Qwen2RMSNorm(config.hidden_size, eps=eps)

    def forward(self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, route: Routing, mask: torch.Tensor,
                past: KV | None = None) -> tuple[torch.Tensor, KV]:
        x = route(h, self.input_layernorm, self.input_layernorm_moe_gen)
        attn, kv = self.self_attn(x, cos, sin, route, mask, past)
        h = h + attn
        mlp = route(h, lambda t: self.mlp(self.post_attention_layernorm(t)),
                    lambda t: self.mlp_moe_gen(self.post_attention_layernorm_moe_gen(t)))
        return h + mlp, kv


class MoTModel(nn.Module):
    """Embedding, MoT layers, and the routed final norm (``norm`` / ``norm_moe_gen``)."""

    def __init__(self, config) -> None:
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(MoTDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = Qwen2RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.norm_moe_gen = Qwen2RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = Qwen2RotaryEmbedding(config=config)
        self.gradient_checkpointing = False

    def forward(self, inputs_embeds: torch.Tensor, position_ids: torch.Tensor, gen_mask: torch.Tensor,
                mask: torch.Tensor, past: list[KV] | None = None, grad_expert: str | None = None
                ) -> tuple[torch.Tensor, list[KV]]:
        """Final hidden states [B, L, H] (already normed by each token's expert) and each layer's new (k, v);
        ``grad_expert``: the only expert this forward trains (None: both)."""
        route = Routing(gen_mask, grad_expert)
        cos, sin = self.rotary_emb(inputs_embeds, position_ids)
        h, new_kv = inputs_embeds, []
        for i, layer in enumerate(self.layers):
            layer_past = past[i] if past is not None else None
            if self.gradient_checkpointing and torch.is_grad_enabled():
                h, kv = checkpoint(layer, h, cos, sin, route, mask, layer_past, use_reentrant=False)
            else:
                h, kv = layer(h, cos, sin, route, mask, layer_past)
            new_kv.append(kv)
        return route(h, self.norm, self.norm_moe_gen), new_kv


class MoTForCausalLM(nn.Module):
    """``model`` + untied ``lm_head``: the key layout of transformers' ``Qwen2ForCausalLM`` plus the twins."""

    def __init__(self, config) -> None:
        super().__init__()
        self.config = config
        self.model = MoTModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
