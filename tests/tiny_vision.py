"""Tiny CLIP / OWLv2 / Mask2Former checkpoints built from configs, written with save_pretrained.

Rewards load them back through their real ``from_pretrained`` path.  Nothing is downloaded: the
tokenizer is a byte-level CLIP BPE with no merges (one token per character), the image processors
are constructed directly.  Building each takes well under a second.
"""
from __future__ import annotations

from pathlib import Path

import torch

VISION = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=1, num_attention_heads=2, image_size=32, patch_size=8)


def clip_tokenizer(max_len: int = 24):
    from tokenizers import pre_tokenizers
    from transformers import CLIPTokenizer

    # Special tokens go last: OWLv2 treats a query whose first id is 0 as padding.
    chars = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab: dict[str, int] = {}
    for c in chars:
        vocab.setdefault(c, len(vocab))
    for c in chars:
        vocab.setdefault(c + "</w>", len(vocab))
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=max_len)


def _text_config(vocab_size: int, max_len: int) -> dict:
    bos, eos = vocab_size - 2, vocab_size - 1
    return dict(vocab_size=vocab_size, hidden_size=32, intermediate_size=37, num_hidden_layers=1, num_attention_heads=2,
                max_position_embeddings=max_len, bos_token_id=bos, eos_token_id=eos, pad_token_id=eos)


def save_tiny_clip(path: Path, seed: int = 0) -> str:
    from transformers import CLIPConfig, CLIPModel, CLIPProcessor
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    torch.manual_seed(seed)
    tok = clip_tokenizer(24)
    cfg = CLIPConfig(text_config=_text_config(len(tok), 24), vision_config=VISION, projection_dim=16)
    CLIPModel(cfg).save_pretrained(path)
    ip = CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    CLIPProcessor(image_processor=ip, tokenizer=tok).save_pretrained(path)
    return str(path)


def save_tiny_owlv2(path: Path, seed: int = 0) -> str:
    from transformers import Owlv2Config, Owlv2ForObjectDetection, Owlv2Processor
    from transformers.models.owlv2.image_processing_pil_owlv2 import Owlv2ImageProcessorPil

    torch.manual_seed(seed)
    tok = clip_tokenizer(16)
    # OWLv2's box head needs projection_dim == vision hidden_size.
    cfg = Owlv2Config(text_config=_text_config(len(tok), 16), vision_config=VISION, projection_dim=32)
    Owlv2ForObjectDetection(cfg).save_pretrained(path)
    Owlv2Processor(image_processor=Owlv2ImageProcessorPil(size={"height": 32, "width": 32}), tokenizer=tok).save_pretrained(path)
    return str(path)


def save_tiny_mask2former(path: Path, labels: list[str], size: int = 64, seed: int = 0) -> str:
    """Needs scipy (transformers' Mask2Former loss imports it at construction)."""
    from transformers import Mask2FormerConfig, Mask2FormerForUniversalSegmentation
    from transformers.models.mask2former.image_processing_pil_mask2former import Mask2FormerImageProcessorPil

    torch.manual_seed(seed)
    cfg = Mask2FormerConfig(
        backbone_config=dict(model_type="swin", embed_dim=16, depths=[1, 1, 1, 1], num_heads=[1, 1, 1, 1], image_size=64,
                             out_features=["stage1", "stage2", "stage3", "stage4"]),
        hidden_dim=32, mask_feature_size=32, feature_size=32, encoder_feedforward_dim=32, decoder_layers=2, dim_feedforward=32,
        num_queries=6, num_attention_heads=2, encoder_layers=1, common_stride=4,
        id2label=dict(enumerate(labels)), label2id={n: i for i, n in enumerate(labels)})
    Mask2FormerForUniversalSegmentation(cfg).save_pretrained(path)
    Mask2FormerImageProcessorPil(size={"shortest_edge": size, "longest_edge": 4 * size}, size_divisor=32).save_pretrained(path)
    return str(path)
