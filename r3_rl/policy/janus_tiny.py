"""A tiny random Janus (a few M parameters) with an offline tokenizer, for tests and benchmarks.

``make_tiny_janus(path)`` writes a directory that ``JanusPolicy.from_pretrained(path)`` (and
``JanusForConditionalGeneration.from_pretrained`` / ``AutoProcessor.from_pretrained``) loads through
the very same code path as ``deepseek-community/Janus-Pro-1B``: a ``JanusConfig`` with Llama text
config, SigLIP-style vision tower, VQ-VAE, generation head, plus a ``JanusProcessor`` (tokenizer,
image processor, the Janus chat template).  Nothing is downloaded.

Why a byte-level tokenizer: prompts, plans and critiques are free text, so the tokenizer must encode
any string and decode sampled ids back to text losslessly.  A byte-level BPE with no merges does
that with a 256-symbol vocabulary; the Janus special tokens (BOS/EOS/pad, ``<image_placeholder>``,
``<begin_of_image>``, ``<end_of_image>``, the chat roles) are added tokens, as in the real tokenizer.
"""
from __future__ import annotations

from pathlib import Path

import torch

# The chat template transformers ships for Janus-Pro (convert_janus_weights_to_hf.py), verbatim in
# behaviour: "<|User|>: ...\n\n<|Assistant|>: ...<eos>", images as "<image_placeholder>".
JANUS_CHAT_TEMPLATE = (
    "{%set seps=['\n\n','<\uff5cend\u2581of\u2581sentence\uff5c>']%}"
    "{%set i=0%}"
    "{%for message in messages%}"
    "{%if message['role']|lower=='user'%}"
    "<|User|>: "
    "{%elif message['role']|lower=='assistant'%}"
    "<|Assistant|>:{%if not (loop.last and not add_generation_prompt and message['content'][0]['type']=='text' "
    "and message['content'][0]['text']=='')%} {%endif%}"
    "{%else%}"
    "{{message['role'].capitalize()}}: "
    "{%endif%}"
    "{%for content in message['content']%}"
    "{%if content['type']=='image'%}"
    "{%if not loop.first%}{{'\n'}}{%endif%}"
    "<image_placeholder>"
    "{%if not loop.last%}{{'\n'}}{%endif%}"
    "{%elif content['type']=='text'%}"
    "{%set text=content['text']%}"
    "{%if loop.first%}{%set text=text.lstrip()%}{%endif%}"
    "{%if loop.last%}{%set text=text.rstrip()%}{%endif%}"
    "{%if not loop.first and message['content'][loop.index0-1]['type']=='text'%}"
    "{{' '+text}}"
    "{%else%}"
    "{{text}}"
    "{%endif%}"
    "{%endif%}"
    "{%endfor%}"
    "{%if not loop.last or add_generation_prompt%}"
    "{%if message['role']|lower=='user'%}"
    "{{seps[0]}}"
    "{%else%}"
    "{{seps[1]}}"
    "{%endif%}"
    "{%endif%}"
    "{%endfor%}"
    "{%if add_generation_prompt%}<|Assistant|>:{%endif%}"
)

BOS = "<\uff5cbegin\u2581of\u2581sentence\uff5c>"
EOS = "<\uff5cend\u2581of\u2581sentence\uff5c>"
PAD = "<\uff5c\u2581pad\u2581\uff5c>"
IMAGE_TOKENS = {"image_token": "<image_placeholder>", "boi_token": "<begin_of_image>", "eoi_token": "<end_of_image>"}
# Plain added tokens (kept by decode): the chat roles and the plan/critique markers.
WORD_TOKENS = ["<|User|>", "<|Assistant|>", "<think>", "</think>"]


def build_tiny_tokenizer():
    """Byte-level BPE (no merges) + Janus special tokens, as a transformers fast tokenizer."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {ch: i for i, ch in enumerate(alphabet)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    specials = [BOS, EOS, PAD, *IMAGE_TOKENS.values()]
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in specials])
    tok.add_tokens([AddedToken(s, special=False, normalized=False) for s in WORD_TOKENS])
    # like the real (Llama-style) tokenizer: BOS added unless add_special_tokens=False
    tok.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", pair=f"{BOS} $A $B",
                                                       special_tokens=[(BOS, tok.token_to_id(BOS))])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD,
                                   extra_special_tokens=dict(IMAGE_TOKENS), padding_side="left")


def tiny_janus_config(vocab_size: int, pad_id: int, bos_id: int, eos_id: int, image_token_id: int,
                      hidden_size: int = 64, num_layers: int = 2, grid: int = 4, codebook: int = 512,
                      heads: int = 4, kv_heads: int = 2, intermediate: int | None = None):
    """A JanusConfig a few M parameters big (or Janus-Pro-shaped: ``heads = hidden_size // 128``, ``kv_heads =
    heads``, ``intermediate = 2.75 * hidden_size``, ``codebook = 16384``, at any width and depth).

    ``grid`` x ``grid`` image tokens per image (both the SigLIP patches of the understanding path and
    the VQ latent grid of the generation path); the VQ decoder upsamples 2x, so images are
    ``2*grid`` pixels square.  VQ channel counts are multiples of 32 (GroupNorm with 32 groups).
    """
    from transformers import JanusConfig, JanusVisionConfig, JanusVQVAEConfig, LlamaConfig

    patch = 8
    text = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=intermediate or 2 * hidden_size,
                       num_hidden_layers=num_layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                       max_position_embeddings=2048, pad_token_id=pad_id, bos_token_id=bos_id, eos_token_id=eos_id,
                       tie_word_embeddings=False)
    vision = JanusVisionConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=grid * patch,
                               patch_size=patch, projection_dim=hidden_size, mlp_ratio=2.0, depth=2,
                               num_image_tokens=grid * grid)
    vq = JanusVQVAEConfig(embed_dim=8, num_embeddings=codebook, latent_channels=32, base_channels=32,
                          channel_multiplier=[1, 1], num_res_blocks=1, projection_dim=hidden_size,
                          image_token_embed_dim=hidden_size, num_hidden_layers=2)
    return JanusConfig(text_config=text, vision_config=vision, vq_config=vq, image_token_id=image_token_id)


def make_tiny_janus(path: str | Path, seed: int = 0, hidden_size: int = 64, num_layers: int = 2,
                    grid: int = 4, **shape: int) -> str:
    """Build a tiny random Janus + processor and ``save_pretrained`` both to ``path``; returns ``str(path)``.

    ``shape``: more :func:`tiny_janus_config` sizes (``heads``, ``kv_heads``, ``intermediate``, ``codebook``)."""
    from transformers import JanusForConditionalGeneration, JanusProcessor
    from transformers.models.janus.image_processing_pil_janus import JanusImageProcessorPil

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tok = build_tiny_tokenizer()
    ids = tok.convert_tokens_to_ids
    config = tiny_janus_config(len(tok), ids(PAD), ids(BOS), ids(EOS), ids(IMAGE_TOKENS["image_token"]),
                               hidden_size=hidden_size, num_layers=num_layers, grid=grid, **shape)
    torch.manual_seed(seed)
    model = JanusForConditionalGeneration(config)
    # what transformers' image-mode generate reads (as in the Janus-Pro hub checkpoints); a config not
    # marked "from model config" keeps its custom entries (boi_token_id) when loaded back
    model.generation_config._from_model_config = False
    model.generation_config.pad_token_id = ids(PAD)
    model.generation_config.bos_token_id = ids(BOS)
    model.generation_config.eos_token_id = ids(EOS)
    model.generation_config.boi_token_id = ids(IMAGE_TOKENS["boi_token"])
    model.generation_config.generation_kwargs = {"boi_token_id": ids(IMAGE_TOKENS["boi_token"])}
    model.generation_config.guidance_scale = 5
    side = config.vision_config.image_size
    image_processor = JanusImageProcessorPil(size={"height": side, "width": side}, image_mean=[0.5, 0.5, 0.5],
                                             image_std=[0.5, 0.5, 0.5])
    processor = JanusProcessor(image_processor=image_processor, tokenizer=tok, chat_template=JANUS_CHAT_TEMPLATE,
                               use_default_system_prompt=False, num_image_tokens=grid * grid)
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return str(path)
