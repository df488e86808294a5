"""Rich TensorBoard summaries: captioned trajectory image grids, trajectory text, reward/advantage histograms.

Scalars go through :class:`r3_rl.tracking.metrics.MetricsLogger`; this module draws the pictures.
Tiny Blocks images are 32x32: they are upscaled with nearest-neighbour (``np.kron``) so a cell is at
least ``MIN_CELL`` pixels and stays crisp.  Captions are drawn into the image itself because
TensorBoard shows no per-image caption.
"""
from __future__ import annotations

import html
import math
from typing import Any

import numpy as np

from r3_rl.tracking.views import image_caption, image_steps, prompt_line, select_trajectories, text_label
from r3_rl.trajectory import Node, Tree

MIN_CELL = 128  # smallest image side in a grid, in pixels
GAP = 4  # white pixels between cells
CAPTION_H = 28  # two caption lines under each image


def upscale(image: np.ndarray, min_side: int = MIN_CELL) -> np.ndarray:
    """Nearest-neighbour upscale by the smallest integer factor that makes the longer side >= ``min_side``."""
    h, w = image.shape[:2]
    k = max(1, math.ceil(min_side / max(h, w)))
    return np.kron(image, np.ones((k, k, 1), dtype=np.uint8)) if k > 1 else image


def _draw_caption(width: int, lines: list[str]) -> np.ndarray:
    from PIL import Image, ImageDraw, ImageFont

    band = Image.new("RGB", (width, CAPTION_H), (255, 255, 255))
    draw = ImageDraw.Draw(band)
    font = ImageFont.load_default()
    for i, line in enumerate(lines[:2]):
        draw.text((2, 1 + 13 * i), line, fill=(0, 0, 0), font=font)
    return np.asarray(band, dtype=np.uint8)


def image_strip(images: list[np.ndarray], captions: list[str], min_side: int = MIN_CELL) -> np.ndarray:
    """Images left to right, each upscaled and captioned underneath; HxWx3 uint8.

    Height is ``max(scaled heights) + CAPTION_H``; width is the sum of scaled widths plus ``GAP`` between cells.
    A caption's first line is split from the rest at its first ``" R="``.
    """
    if not images:
        raise ValueError("image_strip needs at least one image")
    cells = [upscale(np.asarray(im, dtype=np.uint8)[..., :3], min_side) for im in images]
    height = max(c.shape[0] for c in cells)
    cols = []
    for cell, cap in zip(cells, captions):
        pad = np.full((height - cell.shape[0], cell.shape[1], 3), 255, dtype=np.uint8)
        head, sep, tail = cap.partition(" R=")
        lines = [head, ("R=" + tail) if sep else ""]
        cols.append(np.concatenate([cell, pad, _draw_caption(cell.shape[1], lines)], axis=0))
    gap = np.full((height + CAPTION_H, GAP, 3), 255, dtype=np.uint8)
    out: list[np.ndarray] = []
    for i, c in enumerate(cols):
        if i:
            out.append(gap)
        out.append(c)
    return np.concatenate(out, axis=1)


def trajectory_image(path: list[Node]) -> np.ndarray | None:
    """The grid of one trajectory: first image, then each refined image, captioned with round and reward."""
    steps = list(image_steps(path))
    if not steps:
        return None
    return image_strip([n.image for n, _ in steps], [image_caption(n, p) for n, p in steps])


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
                     limit: int = 4) -> int:
    """Log up to ``limit`` trajectories as ``<prefix>/<i>`` (image grid) and ``<prefix>/<i>/text``; returns count."""
    chosen = select_trajectories(trees, limit)
    for i, (tree, path) in enumerate(chosen):
        grid = trajectory_image(path)
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

