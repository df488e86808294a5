"""Rich TensorBoard summaries: framed trajectory image grids, trajectory text, reward/advantage histograms.

Scalars go through :class:`r3_rl.tracking.logger.MetricsLogger`; this module draws the pictures.
A trajectory's grid is a small table drawn into the image itself (TensorBoard shows no per-image caption):

* a header row with the prompt (and tag);
* one fixed-size cell per slot, left to right: first image, then each refined image; every run's grids
  have the same number of slots (``slots``: rounds + 1), so grids of different lengths show at the same
  scale and an unused slot stays visibly empty;
* a caption row under each image (round, stage, reward and its change);
* grid lines around every cell, so a blank image is still a framed white square and two 4x4
  images never read as one row of eight shapes.  They are 2 px wide: TensorBoard's image card shows a
  4-slot grid at about 0.6 of its size, and a browser drops some 1-px lines at that scale (seen in
  headless Chromium on the images tab).

Images are fitted into ``CELL`` x ``CELL`` (:func:`fit_cell`: Blocks cells stay crisp, photos are area-averaged,
a non-square image keeps its aspect ratio).
"""
from __future__ import annotations

import html
import math
from typing import Any

import numpy as np

from r3_rl.tracking.views import image_caption, image_steps, prompt_line, select_trajectories, text_label
from r3_rl.trajectory import Node, Tree

CELL = 128  # side of every image cell, in pixels
LINE = 2  # grid line width (module docstring: why not 1)
LINE_RGB = (96, 96, 96)
EMPTY_RGB = (236, 236, 236)  # an unused slot
HEADER_H = 16  # the prompt row
CAPTION_H = 28  # two caption lines under each image


def as_rgb(image: np.ndarray) -> np.ndarray:
    """HxWx3 uint8 of an HxW grey, HxWx1, HxWx3 or HxWx4 (alpha dropped) image."""
    im = np.asarray(image, dtype=np.uint8)
    if im.ndim == 2:
        im = im[..., None]
    if im.ndim != 3 or im.shape[2] not in (1, 3, 4):
        raise ValueError(f"an image must be HxW, HxWx1, HxWx3 or HxWx4, got shape {im.shape}")
    return np.repeat(im, 3, axis=2) if im.shape[2] == 1 else im[..., :3]


def fit_cell(image: np.ndarray, side: int = CELL) -> np.ndarray:
    """``image`` as ``side x side`` RGB: an integer nearest-neighbour upscale when it divides (a 4x4 Blocks image
    keeps its hard cells), else a PIL resize -- nearest when enlarging, an area average when shrinking (a 384 px
    Janus image in a 128 px cell: nearest kept one pixel in nine, and thin stripes came out all white).  A
    non-square image keeps its aspect ratio, centred on white (a 1024x512 image is not squashed); grey images
    are drawn in grey."""
    im = as_rgb(image)
    h, w = im.shape[:2]
    if h == w and side % h == 0:
        k = side // h
        return np.kron(im, np.ones((k, k, 1), dtype=np.uint8)) if k > 1 else im.copy()
    from PIL import Image, ImageOps

    how = Image.NEAREST if max(h, w) <= side else Image.BOX
    source = Image.fromarray(np.ascontiguousarray(im))
    if h == w:
        return np.asarray(source.resize((side, side), how), dtype=np.uint8)
    return np.asarray(ImageOps.pad(source, (side, side), method=how, color=(255, 255, 255)), dtype=np.uint8)


def _text_band(width: int, height: int, lines: list[str]) -> np.ndarray:
    """Dark text on white, each line cut to fit (the default bitmap font is ~6 px per character)."""
    from PIL import Image, ImageDraw, ImageFont

    band = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(band)
    font = ImageFont.load_default()
    fit = max(1, (width - 4) // 6)
    for i, line in enumerate(lines[: max(1, height // 13)]):
        draw.text((2, 1 + 13 * i), line if len(line) <= fit else line[:fit - 1] + "~", fill=(0, 0, 0), font=font)
    return np.asarray(band, dtype=np.uint8)


def grid_size(slots: int) -> tuple[int, int]:
    """(height, width) of a grid with ``slots`` cells."""
    return (HEADER_H + CELL + CAPTION_H + 4 * LINE, slots * CELL + (slots + 1) * LINE)


def image_strip(images: list[np.ndarray], captions: list[str], header: str = "", slots: int | None = None
                ) -> np.ndarray:
    """The framed grid of one trajectory (module docstring); HxWx3 uint8 of :func:`grid_size` ``(slots)``.

    ``slots`` defaults to ``len(images)``; later images than ``slots`` are dropped.  A caption's first line is
    split from the rest at its first ``" R="``.
    """
    if not images:
        raise ValueError("image_strip needs at least one image")
    slots = slots or len(images)
    height, width = grid_size(slots)
    out = np.empty((height, width, 3), dtype=np.uint8)
    out[:] = LINE_RGB  # everything not painted over below is a grid line
    y_img = 2 * LINE + HEADER_H
    y_cap = y_img + CELL + LINE
    out[LINE:LINE + HEADER_H, LINE:width - LINE] = _text_band(width - 2 * LINE, HEADER_H, [header])
    for k in range(slots):
        x = LINE + k * (CELL + LINE)
        if k < len(images):
            out[y_img:y_img + CELL, x:x + CELL] = fit_cell(images[k])
            head, sep, tail = captions[k].partition(" R=")
            out[y_cap:y_cap + CAPTION_H, x:x + CELL] = _text_band(CELL, CAPTION_H, [head, ("R=" + tail) if sep else ""])
        else:
            out[y_img:y_img + CELL, x:x + CELL] = EMPTY_RGB
            out[y_cap:y_cap + CAPTION_H, x:x + CELL] = 255
    return out


def trajectory_image(tree: Tree, path: list[Node], slots: int | None = None) -> np.ndarray | None:
    """The grid of one trajectory: first image, then each refined image, captioned with round and reward."""
    steps = list(image_steps(path))
    if not steps:
        return None
    return image_strip([n.image for n, _ in steps], [image_caption(n, p) for n, p in steps],
                       header=prompt_line(tree), slots=max(slots or 0, len(steps)) if slots else None)


def _md(text: str | None) -> str:
    """Plan/critique text for TensorBoard's markdown: ``<think>`` must survive its HTML sanitiser."""
    return html.escape(text or "").replace("\n", " ") or "_(empty)_"


def trajectory_markdown(tree: Tree, path: list[Node]) -> str:
    """Prompt, plan and critiques (with rewards) of one trajectory, as markdown."""
    lines = [f"**prompt:** {_md(prompt_line(tree))}  ", f"tree `{tree.id}`", ""]
    prev: Node | None = None
    for n in path:
        if n.image is not None:
            lines.append(f"- image: {html.escape(image_caption(n, prev))}")
            prev = n
        elif n.text is not None:
            lines.append(f"- **{html.escape(text_label(n))}**: {_md(n.text)}")
    return "\n".join(lines)


def add_trajectories(writer: Any, trees: list[Tree], step: int, prefix: str = "trajectories",
                     limit: int = 4, slots: int | None = None) -> int:
    """Log up to ``limit`` trajectories as ``<prefix>/<i>`` (image grid) and ``<prefix>/<i>/text``; returns count."""
    chosen = select_trajectories(trees, limit)
    for i, (tree, path) in enumerate(chosen):
        grid = trajectory_image(tree, path, slots)
        if grid is not None:
            writer.add_image(f"{prefix}/{i}", grid, step, dataformats="HWC")
        writer.add_text(f"{prefix}/{i}/text", trajectory_markdown(tree, path), step)
    return len(chosen)


def stage_values(trees: list[Tree], attr: str) -> dict[str, np.ndarray]:
    """Sampled nodes' ``reward`` or ``advantage`` per stage (failed/missing values left out)."""
    vals: dict[str, list[float]] = {}
    for t in trees:
        for n in t.nodes.values():
            v = getattr(n, attr)
            if n.policy_version >= 0 and v is not None and math.isfinite(v):
                vals.setdefault(n.stage, []).append(float(v))
    return {k: np.asarray(v, dtype=np.float64) for k, v in vals.items()}


def add_histograms(writer: Any, trees: list[Tree], step: int) -> None:
    """``hist_reward/<stage>`` and ``hist_advantage/<stage>`` histograms of this step's sampled nodes."""
    for attr, name in (("reward", "hist_reward"), ("advantage", "hist_advantage")):
        for stage, arr in sorted(stage_values(trees, attr).items()):
            writer.add_histogram(f"{name}/{stage}", arr, step)

