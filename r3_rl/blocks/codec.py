"""Grid <-> pixels for the Blocks world.

Each cell renders as a ``cell x cell`` tile: a one-pixel background margin around a sprite of side
``cell - 2`` (a filled square, a disc, or an upward triangle) in the object's palette colour.  The
margin means sprites in adjacent cells (diagonals included) are always at least two pixels apart, so
the pixel detector's connected components are exactly the objects.

Both directions are table look-ups over whole batches (no Python loop per cell): ``encode`` indexes a
``(N_TOKENS, cell, cell, 3)`` tile table; ``decode`` picks the nearest tile per cell (exact inverse on
rendered images, and a sensible nearest-object answer on slightly perturbed ones).
"""
from __future__ import annotations

from functools import lru_cache

import numpy as np

from r3_rl.blocks.world import (
    BACKGROUND_RGB, CELL, COLORS, N_TOKENS, PALETTE, token_of,
)

MIN_CELL = 6  # below this the disc and the square render identically


@lru_cache(maxsize=None)
def sprite_masks(cell: int = CELL) -> dict[str, np.ndarray]:
    """Boolean ``(s, s)`` masks, ``s = cell - 2``, per shape.  Cached; do not mutate."""
    if cell < MIN_CELL:
        raise ValueError(f"cell size {cell} too small: shapes are distinguishable from {MIN_CELL} px")
    s = cell - 2
    centres = np.arange(s) + 0.5
    y, x = np.meshgrid(centres, centres, indexing="ij")
    half = s / 2
    masks = {
        "square": np.ones((s, s), dtype=bool),
        "circle": (x - half) ** 2 + (y - half) ** 2 <= half**2,
        # row i spans a half-width growing linearly from the apex to the full base
        "triangle": np.abs(x - half) <= (np.floor(y) + 1) / s * half,
    }
    for m in masks.values():
        m.setflags(write=False)
    return masks


@lru_cache(maxsize=None)
def tiles(cell: int = CELL) -> np.ndarray:
    """``(N_TOKENS, cell, cell, 3)`` uint8 tile per cell token (token 0 = background)."""
    out = np.empty((N_TOKENS, cell, cell, 3), dtype=np.uint8)
    out[:] = BACKGROUND_RGB
    for shape, mask in sprite_masks(cell).items():
        for color in COLORS:
            tile = out[token_of(shape, color), 1:-1, 1:-1]
            tile[mask] = PALETTE[color]
    out.setflags(write=False)
    return out


def sprite_box(row: int, col: int, shape: str, cell: int = CELL) -> tuple[float, float, float, float]:
    """Pixel box ``(x0, y0, x1, y1)`` (end-exclusive) of the sprite drawn in cell (row, col)."""
    mask = sprite_masks(cell)[shape]
    ys, xs = np.nonzero(mask)
    ox, oy = col * cell + 1, row * cell + 1
    return (float(ox + xs.min()), float(oy + ys.min()), float(ox + xs.max() + 1), float(oy + ys.max() + 1))


def encode(grid: np.ndarray, cell: int = CELL) -> np.ndarray:
    """Render ``(..., rows, cols)`` cell tokens as ``(..., rows*cell, cols*cell, 3)`` uint8 images."""
    grid = np.asarray(grid)
    if grid.ndim < 2:
        raise ValueError(f"grid must have shape (..., rows, cols), got {grid.shape}")
    if grid.size and (grid.min() < 0 or grid.max() >= N_TOKENS):
        raise ValueError(f"grid tokens must lie in [0, {N_TOKENS}), got [{grid.min()}, {grid.max()}]")
    *lead, rows, cols = grid.shape
    t = tiles(cell)[grid.astype(np.intp)]  # (..., rows, cols, cell, cell, 3)
    nd = len(lead)
    perm = (*range(nd), nd, nd + 2, nd + 1, nd + 3, nd + 4)  # -> (..., rows, cell, cols, cell, 3)
    return np.ascontiguousarray(t.transpose(perm)).reshape(*lead, rows * cell, cols * cell, 3)


def decode(image: np.ndarray, cell: int = CELL) -> np.ndarray:
    """Nearest-tile decoding of ``(..., H, W, 3)`` images to ``(..., H//cell, W//cell)`` int64 grids."""
    image = np.asarray(image)
    if image.ndim < 3 or image.shape[-1] != 3:
        raise ValueError(f"image must have shape (..., H, W, 3), got {image.shape}")
    *lead, h, w, _ = image.shape
    if h % cell or w % cell:
        raise ValueError(f"image size {h}x{w} is not a multiple of the cell size {cell}")
    rows, cols = h // cell, w // cell
    nd = len(lead)
    x = image.reshape(*lead, rows, cell, cols, cell, 3)
    x = x.transpose(*range(nd), nd, nd + 2, nd + 1, nd + 3, nd + 4).reshape(-1, cell * cell * 3)
    x = x.astype(np.float32)
    t = tiles(cell).reshape(N_TOKENS, -1).astype(np.float32)
    # squared distance to every tile up to |x|^2 (constant per cell); float32 is plenty: distinct
    # tiles differ by >1e5 while its rounding error here is far smaller
    d = (t * t).sum(1)[None, :] - 2.0 * (x @ t.T)
    return d.argmin(1).astype(np.int64).reshape(*lead, rows, cols)

