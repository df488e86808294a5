"""The Blocks world: a GenEval in miniature that runs on CPU with nothing to download.

An image is a ``rows x cols`` grid of cells; each cell is background or one coloured shape.  Shapes
stand in for COCO classes and colours for GenEval's colour names, so GenEval's prompts, metadata and
scoring rules apply unchanged (see :mod:`r3_rl.rewards.geneval_rules`).  A token-unified model emits
one token per cell: ``0`` is background and ``1 + shape_idx * len(COLORS) + color_idx`` an object.

``WORDS`` is the closed vocabulary of every prompt, plan, critique and edit text this package
generates; the tiny policy builds a word-level tokenizer from it, so texts are lowercase and
whitespace-tokenisable (no punctuation).
"""
from __future__ import annotations

import numpy as np

SHAPES: tuple[str, ...] = ("square", "circle", "triangle")
PLURALS: dict[str, str] = {"square": "squares", "circle": "circles", "triangle": "triangles"}
# A subset of GenEval's colour names, so GenEval-style metadata reads the same.
COLORS: tuple[str, ...] = ("red", "green", "blue", "yellow", "purple", "orange")
# RGB palette: far apart so the detector's nearest-colour rule is exact on rendered images.
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (30, 70, 220),
    "yellow": (235, 215, 20),
    "purple": (140, 40, 170),
    "orange": (245, 135, 20),
}
BACKGROUND_RGB: tuple[int, int, int] = (255, 255, 255)

BACKGROUND = 0
N_TOKENS = 1 + len(SHAPES) * len(COLORS)  # vocabulary size of image tokens
ROWS = 4
COLS = 4
CELL = 8  # pixels per cell side when rendered

RELATIONS: tuple[str, ...] = ("left of", "right of", "above", "below")  # GenEval's relation names
INVERSE_RELATION: dict[str, str] = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}

NUMBER_WORDS: tuple[str, ...] = (
    "zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten",
    "eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen",
    "nineteen", "twenty",
)


def number_word(n: int) -> str:
    """English word for a count; ``many`` beyond twenty (grids larger than the default)."""
    if n < 0:
        raise ValueError(f"negative count {n}")
    return NUMBER_WORDS[n] if n < len(NUMBER_WORDS) else "many"


def word_number(word: str) -> int | None:
    return NUMBER_WORDS.index(word) if word in NUMBER_WORDS else None


def article(word: str) -> str:
    """``a`` or ``an`` for the word that follows (GenEval writes "an orange ...")."""
    return "an" if word[:1] in "aeiou" else "a"


def token_of(shape: str, color: str) -> int:
    """Cell token of a (shape, colour) pair."""
    try:
        return 1 + SHAPES.index(shape) * len(COLORS) + COLORS.index(color)
    except ValueError:
        raise ValueError(f"unknown shape/colour {shape!r}/{color!r}; shapes {SHAPES}, colours {COLORS}") from None


def object_of(token: int) -> tuple[str, str] | None:
    """(shape, colour) of a cell token, or ``None`` for background."""
    token = int(token)
    if token == BACKGROUND:
        return None
    if not 0 < token < N_TOKENS:
        raise ValueError(f"cell token {token} out of range [0, {N_TOKENS})")
    s, c = divmod(token - 1, len(COLORS))
    return SHAPES[s], COLORS[c]


def shape_index(tokens: np.ndarray) -> np.ndarray:
    """Vectorised shape index per token (-1 for background)."""
    tokens = np.asarray(tokens)
    return np.where(tokens > 0, (tokens - 1) // len(COLORS), -1)


def color_index(tokens: np.ndarray) -> np.ndarray:
    """Vectorised colour index per token (-1 for background)."""
    tokens = np.asarray(tokens)
    return np.where(tokens > 0, (tokens - 1) % len(COLORS), -1)


def empty_grid(rows: int = ROWS, cols: int = COLS) -> np.ndarray:
    return np.zeros((rows, cols), dtype=np.int64)


def objects(grid: np.ndarray) -> list[tuple[int, int, str, str]]:
    """Objects of a grid as ``(row, col, shape, colour)`` in raster order (the detector's order)."""
    grid = np.asarray(grid)
    out = []
    for r, c in zip(*np.nonzero(grid)):
        shape, color = object_of(grid[r, c])  # type: ignore[misc]
        out.append((int(r), int(c), shape, color))
    return out


# --------------------------------------------------------------------------------------------
# The closed vocabulary.  Order is fixed (tokenizer ids derive from it); tests check that every
# text this package generates is covered.
# --------------------------------------------------------------------------------------------
_MARKUP = ("<think>", "</think>")
_FUNCTION_WORDS = (
    "a", "an", "the", "of", "photo", "and", "but", "not", "is", "are", "has", "it", "no", "with",
    "left", "right", "above", "below", "exactly", "many",
)
# yes/no questions about an image (r3_rl.rewards.checklists phrasing, lowercased, punctuation dropped)
_QUESTION_WORDS = ("yes", "there", "in", "to", "or", "more")
_EDIT_WORDS = ("add", "remove", "make", "move", "swap", "further", "edit", "needed")
_OBSERVATION_WORDS = ("image", "needs", "matches", "prompt", "grid", "too", "full", "first", "empty")

WORDS: tuple[str, ...] = tuple(dict.fromkeys(
    _MARKUP + _FUNCTION_WORDS + _EDIT_WORDS + _OBSERVATION_WORDS + _QUESTION_WORDS
    + SHAPES + tuple(PLURALS[s] for s in SHAPES) + COLORS + NUMBER_WORDS
))
