"""An exact object detector for Blocks-world pixels (the stand-in for GenEval's Mask2Former + CLIP).

It works on PIXELS, not tokens, so a reward scored through it judges exactly what a human would see
in the PNG: connected components (8-connectivity) of non-background pixels are objects; the label is
the shape whose sprite mask is nearest to the component's mask, the colour the palette colour nearest
to the component's mean RGB, the box its pixel extent, the score 1.0.  On images rendered by
:mod:`r3_rl.blocks.codec` it is exact (the one-pixel margin keeps sprites of neighbouring cells
apart); on any other image it still returns an honest answer (e.g. two touching blobs are ONE
object, as for a real detector).

:func:`grid_detections` is the token-level shortcut (same detections, straight from a grid) used
where rendering would be wasted work, e.g. to check synthesised grids; tests hold the two equal.
"""
from __future__ import annotations

import numpy as np

from r3_rl.blocks.codec import sprite_box, sprite_masks
from r3_rl.blocks.world import BACKGROUND_RGB, CELL, COLORS, PALETTE, SHAPES, objects
from r3_rl.rewards.geneval_rules import Detection

MIN_SIDE = 4  # smallest sprite side whose templates differ (see codec.MIN_CELL)
_PALETTE = np.array([PALETTE[c] for c in COLORS], dtype=np.float64)


def label_components(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """8-connected components of a boolean ``(H, W)`` mask.

    Returns ``(labels, n)`` with labels in ``[0, n)`` on the mask and ``-1`` elsewhere, numbered in
    raster order of each component's first pixel.  Vectorised min-label propagation: every pixel
    starts with its own flat index, repeatedly takes the minimum over its 3x3 neighbourhood (mask
    pixels only) and then jumps to its label's label (pointer jumping), until nothing changes.
    """
    mask = np.asarray(mask, dtype=bool)
    h, w = mask.shape
    big = h * w
    lab = np.where(mask, np.arange(big).reshape(h, w), big)
    while True:
        p = np.pad(lab, 1, constant_values=big)
        nb = lab.copy()
        for dy in (0, 1, 2):
            for dx in (0, 1, 2):
                np.minimum(nb, p[dy:dy + h, dx:dx + w], out=nb)
        nb = np.where(mask, nb, big)
        flat = np.append(nb.ravel(), big)  # sentinel so label `big` maps to itself
        nb = flat[flat[nb]]  # pointer jumping (two hops)
        if np.array_equal(nb, lab):
            break
        lab = nb
    roots, labels = np.unique(lab[mask], return_inverse=True)
    out = np.full((h, w), -1, dtype=np.int64)
    out[mask] = labels  # np.unique sorts roots = raster order of first pixels
    return out, len(roots)


def classify_shape(mask: np.ndarray) -> str:
    """Shape whose sprite template (at the component's size) differs from ``mask`` in fewest pixels."""
    h, w = mask.shape
    side = max(h, w, MIN_SIDE)
    templates = sprite_masks(side + 2)
    # sample the component's mask on the template grid (identity for rendered sprites)
    ys = np.minimum((np.arange(side) * h) // side, h - 1)
    xs = np.minimum((np.arange(side) * w) // side, w - 1)
    sampled = mask[np.ix_(ys, xs)]
    dist = [np.count_nonzero(templates[s] != sampled) for s in SHAPES]
    return SHAPES[int(np.argmin(dist))]



def nearest_color(rgb: np.ndarray) -> str:
    return COLORS[int(np.argmin(((_PALETTE - np.asarray(rgb, dtype=np.float64)) ** 2).sum(1)))]


def detect(image: np.ndarray, background: tuple[int, int, int] = BACKGROUND_RGB) -> list[Detection]:
    """Objects in one ``(H, W, 3)`` image, in raster order of their boxes' top-left corners."""
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[-1] != 3:
        raise ValueError(f"image must have shape (H, W, 3), got {image.shape}")
    fg = (image != np.asarray(background, dtype=image.dtype)).any(-1)
    labels, n = label_components(fg)
    if n == 0:
        return []
    ys, xs = np.nonzero(labels >= 0)
    lab = labels[ys, xs]
    order = np.argsort(lab, kind="stable")
    ys, xs, lab = ys[order], xs[order], lab[order]
    starts = np.searchsorted(lab, np.arange(n + 1))
    dets = []
    for i in range(n):
        y, x = ys[starts[i]:starts[i + 1]], xs[starts[i]:starts[i + 1]]
        y0, y1, x0, x1 = y.min(), y.max() + 1, x.min(), x.max() + 1
        crop = labels[y0:y1, x0:x1] == i
        color = nearest_color(image[y, x].astype(np.float64).mean(0))
        dets.append(Detection(label=classify_shape(crop), box=(float(x0), float(y0), float(x1), float(y1)),
                              score=1.0, color=color))
    dets.sort(key=lambda d: (d.box[1], d.box[0]))
    return dets


def grid_detections(grid: np.ndarray, cell: int = CELL) -> list[Detection]:
    """What :func:`detect` returns for ``codec.encode(grid, cell)``, computed from the tokens."""
    return [Detection(label=shape, box=sprite_box(r, c, shape, cell), score=1.0, color=color)
            for r, c, shape, color in objects(grid)]
