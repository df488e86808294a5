"""``policy.tiny.experts: modality``: the tiny Llama as a Mixture-of-Transformers, the way BAGEL-7B-MoT is built.

R3's base model (BAGEL) gives the tokens it writes as an image and the tokens of text their own weights: every
attention projection, feed-forward block and norm of a layer comes in two copies, one per modality, while the
self-attention itself runs over the whole sequence.  In the shared tiny model the generator's updates wear away
how the critic reads an image -- through the weights they share (README: R3 synergy).  Here a token's copy
follows from its id: image-cell tokens take the image expert, every other token (words, markers) the text one.

The routing mask is computed once per forward from ``input_ids`` and handed to every decoder layer as a keyword,
so a layer recomputed under activation checkpointing routes exactly as it did in the forward.
"""
from __future__ import annotations

import copy
from typing import Any

import torch
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.models.llama.modeling_llama import LlamaDecoderLayer

from r3_rl.policy.tiny_recipe import EXPERTS_CONFIG_KEY as CONFIG_KEY  # set in a config: modality experts

ROUTE_KEY = "r3_image_mask"  # the keyword a decoder layer receives its routing mask under
ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")
NORMS = ("input_layernorm", "post_attention_layernorm")


class Route:
    """The image-token mask a decoder layer is running with; one per model, shared by its routed modules."""

    def __init__(self) -> None:
        self.image: torch.Tensor | None = None


class ModalityExperts(torch.nn.Module):
    """Two copies of one module: ``text`` and ``image``; each token goes through the copy of its modality."""

    def __init__(self, module: torch.nn.Module, route: Route) -> None:
        super().__init__()
        self.text, self.image = module, copy.deepcopy(module)
        object.__setattr__(self, "route", route)  # shared state, not a submodule

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mask = self.route.image
        if mask is None or mask.shape != x.shape[:-1]:
            got = None if mask is None else tuple(mask.shape)
            raise RuntimeError(f"modality experts: routing mask {got} does not fit the hidden states "
                               f"{tuple(x.shape)}; call the model with input_ids")
        if not bool(mask.any()):
            return self.text(x)
        if bool(mask.all()):
            return self.image(x)
        text, image = self.text(x[~mask]), self.image(x[mask])
        out = text.new_empty((*x.shape[:-1], text.shape[-1]))
        out[~mask] = text
        out[mask] = image
        return out


class MoTDecoderLayer(LlamaDecoderLayer):
    """A Llama decoder layer whose projections and norms are :class:`ModalityExperts`; it takes its routing mask
    as the keyword :data:`ROUTE_KEY` (so checkpointing replays it) and sets it before running them."""

    route: Route

    def forward(self, hidden_states: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        self.route.image = kwargs.pop(ROUTE_KEY)
        return super().forward(hidden_states, **kwargs)


class MoTLlamaForCausalLM(LlamaForCausalLM):
    """A Llama with modality experts over the image-token ids ``config.r3_image_token_span``."""

    def __init__(self, config: LlamaConfig) -> None:
        super().__init__(config)
        if not has_modality_experts(config):
            raise ValueError(f"MoTLlamaForCausalLM needs config.{CONFIG_KEY} (modality_config)")
        self.route = Route()
        for layer in self.model.layers:
            layer.__class__ = MoTDecoderLayer  # only forward differs: the weights Llama initialised stay
            object.__setattr__(layer, "route", self.route)
            for name in ATTENTION:
                setattr(layer.self_attn, name, ModalityExperts(getattr(layer.self_attn, name), self.route))
            for name in MLP:
                setattr(layer.mlp, name, ModalityExperts(getattr(layer.mlp, name), self.route))
            for name in NORMS:
                setattr(layer, name, ModalityExperts(getattr(layer, name), self.route))
        self.model.register_forward_pre_hook(self._add_route, with_kwargs=True)

    def _add_route(self, module: torch.nn.Module, args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict]:
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is None:
            raise RuntimeError("modality experts route by token id: call the model with input_ids")
        first, end = getattr(self.config, CONFIG_KEY)
        return args, {**kwargs, ROUTE_KEY: (ids >= first) & (ids < end)}


def modality_config(config: LlamaConfig, first_image_id: int, image_tokens: int) -> LlamaConfig:
    """``config`` marked for modality experts over image-token ids ``[first_image_id, first + image_tokens)``."""
    setattr(config, CONFIG_KEY, [first_image_id, first_image_id + image_tokens])
    return config


def has_modality_experts(config: LlamaConfig) -> bool:
    """Whether ``config`` (a saved tiny model's too) describes modality experts."""
    return bool(getattr(config, CONFIG_KEY, None))
