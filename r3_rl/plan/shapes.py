"""The shape of a recipe's policy, for memory planning, without downloading a single weight.

Where the shape comes from, in order: the model's ``config.json`` (a local directory, or the hub cache
when ``policy.model`` is a hub id already downloaded), else built-in shapes of known checkpoints (the
published ``config.json`` values of Janus-Pro-1B and -7B), else a one-line error.  The model is then
built on PyTorch's ``meta`` device -- shapes, no storage -- so parameter counts are exact, per part.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from r3_rl.errors import UserError

# Published values (deepseek-community/Janus-Pro-*/config.json, transformers' JanusConfig); everything not listed
# is JanusConfig's default, which is Janus-Pro's (SigLIP-L/16 at 384 px, VQ-16 with a 16,384-entry codebook).
_JANUS_PRO_TEXT = {"head_dim": 128, "max_position_embeddings": 16384, "vocab_size": 102400, "rms_norm_eps": 1e-6,
                   "bos_token_id": 100000, "eos_token_id": 100001, "pad_token_id": 100002}
BUILTIN: dict[str, dict[str, Any]] = {
    "deepseek-community/Janus-Pro-1B": {
        "text_config": {**_JANUS_PRO_TEXT, "hidden_size": 2048, "intermediate_size": 5632, "num_hidden_layers": 24,
                        "num_attention_heads": 16, "num_key_value_heads": 16},
        "vision_config": {"projection_dim": 2048}, "vq_config": {"projection_dim": 2048, "image_token_embed_dim": 2048},
        "image_token_id": 100581, "tie_word_embeddings": False},
    "deepseek-community/Janus-Pro-7B": {
        "text_config": {**_JANUS_PRO_TEXT, "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 30,
                        "num_attention_heads": 32, "num_key_value_heads": 32},
        "vision_config": {"projection_dim": 4096}, "vq_config": {"projection_dim": 4096, "image_token_embed_dim": 4096},
        "image_token_id": 100581, "tie_word_embeddings": False},
}
BUILTIN["deepseek-ai/Janus-Pro-1B"] = BUILTIN["deepseek-community/Janus-Pro-1B"]
BUILTIN["deepseek-ai/Janus-Pro-7B"] = BUILTIN["deepseek-community/Janus-Pro-7B"]


@dataclass(frozen=True)
class ModelShape:
    """What memory planning needs to know about a policy (parameter counts are exact)."""

    source: str  # where the shape came from, for the report
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    text_vocab: int
    image_vocab: int  # tokens the image head chooses from (Janus: VQ codebook)
    image_tokens: int  # tokens per generated image
    vision_tokens: int  # context positions an input image takes (Janus: SigLIP patches)
    params: int  # all parameters
    params_trained: int  # those the policy trains (Janus: all but the VQ-VAE and the SigLIP tower)
    params_vision: int  # the SigLIP tower (trained only with train_vision)
    largest_layer: int  # parameters of the largest decoder layer or embedding (ZeRO-3 gathers one at a time)
    largest_weight: int  # elements of the largest single weight (its gradient is a temporary in backward)
    image_side: int = 0  # decoded image side in pixels (0: no VQ decoder)
    vq_channels: int = 0  # VQ (BAGEL: VAE) decoder channels at full resolution
    # flow-matched images (BAGEL, r3_rl.plan.bagel_shape): no image vocabulary, images are latent positions
    flow: bool = False
    params_active: int = 0  # language-model parameters one token passes through (MoT: one expert a layer)
    params_llm: int = 0  # all language-model parameters (MoT: both experts); 0 = not a MoT model
    edit_tokens: int = 0  # extra context positions of an edit's input image (BAGEL: its VAE latent tokens)
    image_cfg_rows: int = 0  # extra CFG rows of an edit (BAGEL: image-CFG)
    decode_bytes: int = 0  # bytes per element of the image decoder (0: the policy's dtype)
    decode_chunk: int = 0  # images decoded at once (0: Janus' DECODE_CHUNK, -1: all of a call)
    # SDE steps the learner rescores per generated / edited flow image: each is one forward over the image's
    # latent positions, and all of an image's steps are kept for one backward (BAGEL: *_sde_count)
    gen_sde_steps: int = 1
    edit_sde_steps: int = 1

    @property
    def params_frozen(self) -> int:
        return self.params - self.params_trained

    def lora_params(self, r: int, targets: list[str] | str) -> int:
        """Adapter parameters of ``r``-rank LoRA on the language model's matching projections; ``targets`` as
        ``learner.lora.target_modules`` reads it (:func:`r3_rl.learner.lora.lora_targets`): module names, one
        name as a string, ``all-linear`` every projection."""
        d, q, kv, i = self.hidden, self.heads * self.head_dim, self.kv_heads * self.head_dim, self.intermediate
        shapes = {"q_proj": (d, q), "k_proj": (d, kv), "v_proj": (d, kv), "o_proj": (q, d), "gate_proj": (d, i),
                  "up_proj": (d, i), "down_proj": (i, d)}
        wanted = [targets] if isinstance(targets, str) else list(targets)
        wanted += [n[: -len("_moe_gen")] for n in wanted if n.endswith("_moe_gen")]  # BAGEL: either expert's name
        hit = list(shapes) if "all-linear" in wanted else [n for n in shapes if n in wanted]
        experts = 2 if self.params_llm else 1  # MoT: a name stands for both experts' copies (lora_target_names)
        return experts * self.layers * sum(r * (shapes[n][0] + shapes[n][1]) for n in hit)


def _count(model: Any, prefix: str) -> int:
    return sum(p.numel() for n, p in model.named_parameters() if n.startswith(prefix))


def shape_from_config(config: Any, source: str) -> ModelShape:
    """A :class:`ModelShape` from a transformers config (``JanusConfig`` or a causal-LM ``LlamaConfig``)."""
    import torch
    from transformers import AutoModelForCausalLM, JanusForConditionalGeneration

    janus = getattr(config, "model_type", None) == "janus"
    with torch.device("meta"):
        model = JanusForConditionalGeneration(config) if janus else AutoModelForCausalLM.from_config(config)
    text = config.text_config if janus else config
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    params = sum(p.numel() for p in model.parameters())
    layers = model.model.language_model.layers if janus else model.model.layers
    biggest = max(max(sum(p.numel() for p in layer.parameters()) for layer in layers),
                  model.get_input_embeddings().weight.numel(), model.get_output_embeddings().weight.numel())
    common = dict(source=source, hidden=text.hidden_size, layers=text.num_hidden_layers, heads=text.num_attention_heads,
                  kv_heads=text.num_key_value_heads or text.num_attention_heads, head_dim=head_dim,
                  intermediate=text.intermediate_size, params=params, largest_layer=biggest,
                  largest_weight=max(p.numel() for p in model.parameters()))
    if not janus:  # the tiny token-unified policy: images are grids of tokens in the same vocabulary
        return ModelShape(**common, text_vocab=text.vocab_size, image_vocab=text.vocab_size, image_tokens=0,
                          vision_tokens=0, params_trained=params, params_vision=0)
    vision, vq = _count(model, "model.vision_model."), _count(model, "model.vqmodel.")
    grid = config.vq_config.num_patches
    return ModelShape(**common, text_vocab=text.vocab_size, image_vocab=config.vq_config.num_embeddings,
                      image_tokens=grid * grid, vision_tokens=config.vision_config.num_image_tokens,
                      params_trained=params - vision - vq, params_vision=vision,
                      image_side=config.vision_config.image_size,
                      vq_channels=config.vq_config.base_channels * config.vq_config.channel_multiplier[0])


def model_shape(recipe: Any) -> ModelShape:
    """The shape of ``recipe.policy`` (see the module docstring for where it comes from)."""
    from transformers import AutoConfig, JanusConfig, LlamaConfig

    pol = recipe.policy
    if pol.kind == "tiny" and not pol.model:
        from r3_rl.blocks import world
        from r3_rl.policy.tiny_tokenizer import build_tokenizer, template_words

        t = pol.tiny
        words = set(world.WORDS) | template_words(recipe.templates.model_dump().values())
        vocab = len(build_tokenizer(words, world.N_TOKENS).get_vocab())  # as TinyUnifiedPolicy.build makes it
        config = LlamaConfig(vocab_size=vocab, hidden_size=t.hidden_size, intermediate_size=t.intermediate_size,
                             num_hidden_layers=t.num_layers, num_attention_heads=t.num_heads,
                             num_key_value_heads=t.num_heads, tie_word_embeddings=True)
        shape = shape_from_config(config, "the built-in tiny policy (policy.tiny)")
        cells = recipe.data.blocks.rows * recipe.data.blocks.cols
        read = cells * (2 if t.image_input == "words" else 1)  # policy.tiny.image_input: two words a cell
        shape = replace(shape, image_tokens=cells, vision_tokens=read + 2)
        if t.experts == "modality":  # a second copy of every decoder projection and norm (r3_rl.policy.tiny_mot)
            layer = 4 * t.hidden_size ** 2 + 3 * t.hidden_size * t.intermediate_size + 2 * t.hidden_size
            shape = replace(shape, params=shape.params + t.num_layers * layer,
                            params_trained=shape.params_trained + t.num_layers * layer,
                            largest_layer=max(shape.largest_layer, 2 * layer),
                            # a MoT model: LoRA adapts both copies of a target (lora_params), a token uses one
                            params_llm=shape.params + t.num_layers * layer, params_active=shape.params)
        return shape
    name = pol.model or ""
    if not name and pol.kind != "janus":  # a plug-in family: only a transformers config.json gives its shape
        raise UserError(f"policy.model: empty; r3-rl plan reads a model's shape from its config.json, and policy "
                        f"{pol.kind!r} builds its model itself (plannable: tiny, janus, or a policy.model folder)")
    path = Path(name).expanduser()
    config_file: str | None = str(path / "config.json") if (path / "config.json").is_file() else None
    if config_file is None and not path.exists() and name.count("/") == 1:
        from huggingface_hub import try_to_load_from_cache

        try:
            cached = try_to_load_from_cache(name, "config.json")
        except Exception:  # noqa: BLE001 - a malformed repo id is simply not cached
            cached = None
        config_file = cached if isinstance(cached, str) else None
    if config_file is not None:
        try:
            config = AutoConfig.from_pretrained(str(Path(config_file).parent), local_files_only=True)
        except (OSError, ValueError, KeyError) as e:
            raise UserError(f"policy.model: cannot read {config_file}: {str(e).splitlines()[0][:160]}") from None
        return shape_from_config(config, f"config.json of {name}")
    if name in BUILTIN:
        return shape_from_config(JanusConfig(**BUILTIN[name]), f"built-in shape of {name} (its published config.json)")
    known = ", ".join(k for k in BUILTIN if k.startswith("deepseek-community"))
    raise UserError(f"policy.model: no config.json for {name!r} (not a local directory, not in the hub cache) and no "
                    f"built-in shape; give a local path with config.json, or one of: {known}")
