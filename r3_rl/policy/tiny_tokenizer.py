"""An offline word-level tokenizer for the tiny unified policy.

The Blocks world has a closed vocabulary, so one token per word keeps sequences short (fast on CPU)
and needs no download.  Image cells are words too (``<img_0>`` ... ``<img_{N-1}>``), which is what
makes the model *token-unified*: it reads and writes images in the same sequence as text.
Built with the `tokenizers` library and wrapped as a transformers fast tokenizer, so it saves and
loads with ``save_pretrained`` / ``from_pretrained`` like any other.
"""
from __future__ import annotations

import re
from typing import Iterable

from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from tokenizers.pre_tokenizers import WhitespaceSplit
from transformers import PreTrainedTokenizerFast

SPECIALS = ["<pad>", "<unk>", "<bos>", "<|im_start|>", "<|im_end|>", "<think>", "</think>", "<image>", "</image>"]
PLACEHOLDER = re.compile(r"\{(prompt|plan|image|instruction)\}")


def image_token(k: int) -> str:
    return f"<img_{k}>"


def template_words(templates: Iterable[str]) -> set[str]:
    """Literal words of the recipe's templates (placeholders removed)."""
    words: set[str] = set()
    for t in templates:
        words.update(PLACEHOLDER.sub(" ", t).split())
    return words


def build_tokenizer(words: Iterable[str], num_image_tokens: int) -> PreTrainedTokenizerFast:
    """Specials first, then image tokens (contiguous ids), then the sorted text words."""
    image_words = [image_token(k) for k in range(num_image_tokens)]
    rest = sorted(set(words) - set(SPECIALS) - set(image_words))
    vocab = {tok: i for i, tok in enumerate(SPECIALS + image_words + rest)}
    tok = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>",
                                   bos_token="<bos>", eos_token="<|im_end|>")
