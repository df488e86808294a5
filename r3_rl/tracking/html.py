"""A static, self-contained HTML page of trajectories: each image beside the critique that led to it.

Images are embedded as base64 PNG data URIs so the page can be copied or mailed on its own; tiny
images are scaled up in the browser with ``image-rendering: pixelated``.  All text is HTML-escaped.
"""
from __future__ import annotations

import base64
import io
from html import escape
from pathlib import Path

import numpy as np

from r3_rl.tracking.views import image_caption, prompt_line, text_label, trajectory_paths
from r3_rl.trajectory import Node, Tree

_CSS = """
body{font-family:system-ui,sans-serif;margin:1.5em;background:#fafafa;color:#222}
h1{font-size:1.3em} h2{font-size:1.05em;margin:1.6em 0 .3em}
.tree{background:#fff;border:1px solid #ddd;border-radius:6px;padding:.6em 1em;margin-bottom:1em}
.path{display:flex;flex-wrap:wrap;align-items:flex-start;gap:.5em;margin:.5em 0;padding-top:.5em;
      border-top:1px dashed #eee}
.card{border:1px solid #e3e3e3;border-radius:4px;padding:.3em;background:#fcfcfc}
.img img{width:160px;height:auto;image-rendering:pixelated;display:block}
.txt{max-width:280px;font-size:.85em;white-space:pre-wrap;word-break:break-word}
.cap{font-size:.8em;color:#555;margin-top:.2em}
.meta{color:#777;font-size:.85em}
"""


def png_data_uri(image: np.ndarray) -> str:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(image, dtype=np.uint8)).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _path_html(path: list[Node]) -> str:
    cells = []
    prev: Node | None = None
    for n in path:
        if n.image is not None:
            cap = escape(image_caption(n, prev))
            cells.append(f'<div class="card img"><img src="{png_data_uri(n.image)}" alt="{cap}">'
                         f'<div class="cap">{cap}</div></div>')
            prev = n
        elif n.text is not None:
            extra = ""
            if n.stage == "reflect" and n.edit_instruction:
                extra = f'<div class="cap">edit: {escape(n.edit_instruction)}</div>'
            cells.append(f'<div class="card txt"><b>{escape(text_label(n))}</b>\n{escape(n.text)}{extra}</div>')
    return '<div class="path">' + "".join(cells) + "</div>"


def trees_html(trees: list[Tree], title: str, max_paths: int = 8) -> str:
    """The page as a string: per tree, its prompt and up to ``max_paths`` trajectories."""
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{escape(title)}</title>"
             f"<style>{_CSS}</style></head><body><h1>{escape(title)}</h1>"
             f"<p class='meta'>{len(trees)} trees</p>"]
    for t in trees:
        paths = trajectory_paths(t)
        parts.append(f'<div class="tree"><h2>{escape(prompt_line(t))}</h2>'
                     f'<div class="meta">tree {escape(t.id)} &middot; {escape(str(t.meta.get("kind", "")))} '
                     f'&middot; {len(paths)} trajectories</div>')
        parts.extend(_path_html(p) for p in paths[:max_paths])
        if len(paths) > max_paths:
            parts.append(f'<div class="meta">... {len(paths) - max_paths} more</div>')
        parts.append("</div>")
    parts.append("</body></html>")
    return "\n".join(parts)


def write_html(trees: list[Tree], out_path: str | Path, title: str = "r3-rl trajectories",
               max_paths: int = 8) -> Path:
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(trees_html(trees, title, max_paths), encoding="utf-8")
    return out
