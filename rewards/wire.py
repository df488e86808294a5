"""JSON wire format for rewards over HTTP: samples with base64 PNG images in, outputs out.

Why not pickle (as the Flow-GRPO reward server does): unpickling executes code chosen by the sender,
and it ties client and server to the same library versions.  PNG is lossless, so a remote reward sees
exactly the pixels a local one would.  Everything here is pure and tested on round trips.
"""
from __future__ import annotations

import base64
import io
import math
from typing import Any

import numpy as np
from PIL import Image

from r3_rl.rewards.base import RewardOutput, RewardSample, Turn


class WireError(ValueError):
    """A request or reply that does not follow the wire format (one line, names the field)."""


class WireLimitError(WireError):
    """A well-formed request over one of the server's limits (images per request, pixels per image): HTTP 413."""


PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def png_size(raw: bytes, where: str = "image") -> tuple[int, int]:
    """``(width, height)`` from a PNG's IHDR header, read before anything is decompressed."""
    if raw[:8] != PNG_SIGNATURE or raw[12:16] != b"IHDR" or len(raw) < 24:
        raise WireError(f"{where}: not a PNG image (the wire format sends images as base64 PNG)")
    return int.from_bytes(raw[16:20], "big"), int.from_bytes(raw[20:24], "big")


def count_images(samples: list[Any]) -> int:
    """Images in a decoded-JSON ``samples`` list (latest images and history), counted before any is decoded."""
    n = 0
    for s in samples:
        if isinstance(s, dict):
            n += s.get("image") is not None
            hist = s.get("history")
            n += sum(isinstance(t, dict) and t.get("image") is not None for t in hist) if isinstance(hist, list) else 0
    return n


def image_to_png_bytes(image: np.ndarray) -> bytes:
    arr = np.asarray(image)
    if arr.dtype != np.uint8 or arr.ndim not in (2, 3):
        raise WireError(f"image must be an HxW or HxWxC uint8 array, got {arr.dtype} {arr.shape}")
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def encode_image(image: np.ndarray | None) -> str | None:
    """HxWx3 uint8 array -> base64 PNG (``None`` stays ``None``)."""
    if image is None:
        return None
    return base64.b64encode(image_to_png_bytes(image)).decode("ascii")


def image_data_url(image: np.ndarray) -> str:
    """``data:image/png;base64,...`` as OpenAI-compatible chat APIs take images."""
    return "data:image/png;base64," + base64.b64encode(image_to_png_bytes(image)).decode("ascii")


def decode_image(data: Any, where: str = "image", max_pixels: int | None = None) -> np.ndarray | None:
    """A base64 PNG -> HxW(xC) uint8 array; with ``max_pixels`` the PNG header is checked before decoding (a
    7 KiB PNG can decode to 8000x8000)."""
    if data is None:
        return None
    if not isinstance(data, str):
        raise WireError(f"{where}: expected a base64 PNG string, got {type(data).__name__}")
    try:
        raw = base64.b64decode(data, validate=True)
    except ValueError:
        raise WireError(f"{where}: not a base64-encoded image (bad base64)") from None
    if max_pixels is not None:
        w, h = png_size(raw, where)
        if w * h > max_pixels:
            raise WireLimitError(f"{where}: {w}x{h} = {w * h} pixels, over the server's limit of {max_pixels} "
                                 f"(--max-image-pixels)")
    try:
        with Image.open(io.BytesIO(raw), formats=["PNG"]) as im:
            im.load()
            if im.mode not in ("RGB", "L", "RGBA"):
                im = im.convert("RGB")
            return np.asarray(im).copy()
    except Exception as e:  # noqa: BLE001 - binascii / PIL raise many types
        raise WireError(f"{where}: not a base64-encoded image ({type(e).__name__})") from None


def sample_to_json(sample: RewardSample, history: bool = True,
                   encoded: dict[int, tuple[Any, str | None]] | None = None) -> dict[str, Any]:
    """The wire form of ``sample``.  ``encoded`` (pass one dict for a whole request) keeps each image array's PNG:
    the judged image is also its history's last turn, and siblings share their parent's, so a refine sample had
    encoded the same pixels three times (~50 ms each at 512 px, in the driver's scoring loop)."""
    cache: dict[int, tuple[Any, str | None]] = {} if encoded is None else encoded

    def png(image: np.ndarray | None) -> str | None:
        if image is None:
            return None
        if id(image) not in cache:  # the array is kept beside its PNG, so its id is not reused meanwhile
            cache[id(image)] = (image, encode_image(image))
        return cache[id(image)][1]

    return {
        "prompt": sample.prompt, "metadata": sample.metadata, "stage": sample.stage, "round": sample.round,
        "text": sample.text, "image": png(sample.image),
        "history": [{"stage": t.stage, "round": t.round, "text": t.text, "image": png(t.image),
                     "reward": t.reward} for t in sample.history] if history else [],
    }


def _get(d: dict[str, Any], key: str, kinds: tuple[type, ...], where: str, default: Any = ...,
         refuse_bool: bool = True) -> Any:
    """``d[key]`` if it is one of ``kinds``; a JSON ``true`` is refused where ``kinds`` are numbers (Python counts
    it as the int 1) unless ``refuse_bool`` is off for a caller that refuses it with its own message."""
    if key not in d:
        if default is ...:
            raise WireError(f"{where}: missing '{key}'")
        return default
    v = d[key]
    if (v is not None or default is ...) and (  # a required field cannot be null
            not isinstance(v, kinds) or (refuse_bool and isinstance(v, bool) and bool not in kinds)):
        raise WireError(f"{where}.{key}: expected {'/'.join(k.__name__ for k in kinds)}, got {type(v).__name__}")
    return v


def sample_from_json(d: Any, where: str = "samples[0]", max_pixels: int | None = None) -> RewardSample:
    if not isinstance(d, dict):
        raise WireError(f"{where}: expected an object, got {type(d).__name__}")
    hist = _get(d, "history", (list,), where, [])
    turns = []
    for j, t in enumerate(hist or []):
        tw = f"{where}.history[{j}]"
        if not isinstance(t, dict):
            raise WireError(f"{tw}: expected an object")
        turns.append(Turn(stage=_get(t, "stage", (str,), tw), round=int(_get(t, "round", (int,), tw, 0) or 0),
                          text=_get(t, "text", (str,), tw, None), image=decode_image(t.get("image"), f"{tw}.image", max_pixels),
                          reward=_get(t, "reward", (int, float), tw, None)))
    return RewardSample(
        prompt=_get(d, "prompt", (str,), where), metadata=_get(d, "metadata", (dict,), where, {}) or {},
        stage=_get(d, "stage", (str,), where, "generate") or "generate",
        round=int(_get(d, "round", (int,), where, 0) or 0),
        image=decode_image(d.get("image"), f"{where}.image", max_pixels), history=turns,
        text=_get(d, "text", (str,), where, None))


def finite_float(v: Any) -> float | None:
    """``v`` as a finite float, or None (a bool, a non-number, NaN, infinity, an integer too big for a float)."""
    if isinstance(v, (bool, str, bytes)):
        return None
    try:
        f = float(v)
    except (TypeError, ValueError, OverflowError):
        return None
    return f if math.isfinite(f) else None


def output_to_json(out: RewardOutput) -> dict[str, Any]:
    """A result as JSON without NaN or infinity: a non-finite score or component makes a success a failure."""
    score = None if out.score is None else finite_float(out.score)
    comps = {k: finite_float(v) for k, v in out.components.items()}
    failure = out.failure
    if failure is None and score is None:
        failure = f"non-finite score {out.score}"
    elif failure is None and None in comps.values():
        failure = "non-finite component " + ", ".join(f"{k}={out.components[k]}" for k, v in comps.items() if v is None)
    return {"score": score, "components": {k: v for k, v in comps.items() if v is not None},
            "reason": out.reason, "failure": failure}


def output_from_json(d: Any, where: str = "results[0]") -> RewardOutput:
    """A result from a server's JSON; a score or component that is not a finite number is a :class:`WireError`
    (a NaN ``correct`` part would otherwise read as "flawed", a ``true`` score as 1.0)."""
    if not isinstance(d, dict):
        raise WireError(f"{where}: expected an object, got {type(d).__name__}")
    raw_score = _get(d, "score", (int, float), where, None, refuse_bool=False)  # a bool: refused just below
    score = None if raw_score is None else finite_float(raw_score)
    if raw_score is not None and score is None:
        raise WireError(f"{where}.score: expected a finite number, got {str(raw_score)[:40]}")
    raw_comps = _get(d, "components", (dict,), where, {}) or {}
    comps = {k: finite_float(v) for k, v in raw_comps.items()}
    bad = [k for k, v in comps.items() if v is None]
    if bad:
        raise WireError(f"{where}.components.{str(bad[0])[:40]}: expected a finite number, "
                        f"got {str(raw_comps[bad[0]])[:40]}")
    failure = _get(d, "failure", (str,), where, None)
    if failure is None and score is None:
        failure = "server returned no score"
    return RewardOutput(score=score, components={k: float(v) for k, v in comps.items()},
                        reason=_get(d, "reason", (str,), where, None), failure=failure)
