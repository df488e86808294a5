"""The Tree-RL parent buffer: images from earlier stages waiting to be refined.

Refine-stage groups start from a buffered image rather than a fresh generation, so every step trains
reflect/refine on a controlled mix of parents: ``correct_fraction`` of them already correct (where the
right answer is "no further edit needed") and the rest flawed (reference: 15% correct).  Entries keep
their round, so refinement can go any number of rounds deep.

Entries are stored by what rebuilds their image cheaply, never by their pixels: the policy's own images
as their VQ token ids (int32: 2.3 KB for Janus' 576 tokens, against 442 KB of 384x384 pixels), rebuilt by
the policy's decoder when an entry is drawn; any other image as lossless PNG bytes.  A full buffer of
2,048 Janus images is then a few MB in memory and in its checkpoint, which is one safetensors file
(tensors plus JSON metadata: nothing to unpickle).
"""
from __future__ import annotations

import io
import json
import random
from collections import deque
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from r3_rl.rollout.parent_mix import SHORTCUT_FEATURES, parent_feature, shortcut_balanced_accuracy
from r3_rl.trajectory import PromptItem
from r3_rl.validate import LIMITS

FORMAT = "1"
Decoder = Callable[[list[int]], np.ndarray]  # image tokens -> HxWx3 uint8 pixels


@dataclass
class BufferEntry:
    """A parent as rollout sees it: pixels included (rebuilt when drawn from the buffer)."""

    prompt: PromptItem
    image: np.ndarray
    image_tokens: list[int] | None
    reward: float
    correct: bool
    round: int
    source: str = ""  # "<tree id>/<node id>" of the image


@dataclass
class _Stored:
    """A parent as the buffer keeps it: token ids (int32) and/or PNG bytes instead of pixels (PNG only when
    the tokens cannot be decoded)."""

    prompt: PromptItem
    tokens: np.ndarray | None
    png: bytes | None
    reward: float
    correct: bool
    round: int
    source: str


class ParentBuffer:
    """Correct and flawed parents, ``capacity`` of each (oldest dropped first).

    ``decode`` rebuilds the pixels of an image from its tokens (``Policy.decode_image_tokens``); without
    it, images are kept as PNG bytes.
    """

    def __init__(self, capacity: int, decode: Decoder | None = None) -> None:
        self.decode = decode
        self.correct: deque[_Stored] = deque(maxlen=capacity)
        self.flawed: deque[_Stored] = deque(maxlen=capacity)

    def __len__(self) -> int:
        return len(self.correct) + len(self.flawed)

    def clear(self) -> None:
        """Drop every parent (``tree.schedule: alternate``: each stage-A step's images replace the last)."""
        self.correct.clear()
        self.flawed.clear()

    def add(self, entry: BufferEntry) -> None:
        (self.correct if entry.correct else self.flawed).append(self._stored(entry))

    def add_many(self, entries: Iterable[BufferEntry]) -> None:
        """:meth:`add` of each entry in order, but an entry the same call would evict is never stored: a step
        that adds more images than ``capacity`` (256 prompts x 16 siblings: thousands of flawed images against
        2048 places) had PNG-encoded each, about 35 ms at 512 px, and dropped it at once."""
        kinds: dict[bool, list[BufferEntry]] = {True: [], False: []}
        for entry in entries:
            kinds[bool(entry.correct)].append(entry)
        for correct, batch in kinds.items():
            pool = self.correct if correct else self.flawed
            keep = batch[-pool.maxlen:] if pool.maxlen is not None else batch
            pool.extend(self._stored(entry) for entry in keep)

    def _stored(self, entry: BufferEntry) -> _Stored:
        decodable = entry.image_tokens is not None and self.decode is not None
        return _Stored(prompt=entry.prompt,
                       tokens=None if entry.image_tokens is None else np.asarray(entry.image_tokens, dtype=np.int32),
                       png=None if decodable else _png(entry.image), reward=float(entry.reward),
                       correct=bool(entry.correct), round=int(entry.round), source=entry.source)

    def sample(self, n: int, correct_fraction: float, rng: random.Random, balance: str = "pool") -> list[BufferEntry]:
        """``n`` parents, each correct with probability ``correct_fraction`` when both kinds exist.

        ``balance="pool"`` draws from the whole correct or flawed pool.  ``balance="tag"`` first draws a prompt
        tag (``metadata["tag"]``) uniformly among the tags that have both correct and flawed parents, then a
        parent of that tag: within every tag the critic sees ``correct_fraction`` correct parents, so the
        prompt's tag no longer tells the verdict (from the pools, easy tags give mostly correct images and hard
        tags mostly flawed ones, and a critic can score by reading the prompt alone).  ``balance="prompt"`` does
        the same per prompt text: within a tag, prompts still differ in how often they are drawn right, and a
        small critic learns a verdict per prompt (README: R3 synergy, session 28).  Without any such tag or
        prompt it falls back to ``"pool"``."""
        groups = self._balanced_groups(balance)
        if groups:
            out = []
            for _ in range(n):
                correct, flawed = groups[rng.randrange(len(groups))]
                pool_ = correct if rng.random() < correct_fraction else flawed
                out.append(self._entry(pool_[rng.randrange(len(pool_))]))
            return out
        out = []
        for _ in range(n):
            want_correct = rng.random() < correct_fraction
            pool = self.correct if (want_correct and self.correct) or not self.flawed else self.flawed
            if not pool:
                break
            out.append(self._entry(pool[rng.randrange(len(pool))]))
        return out

    def _balanced_groups(self, balance: str) -> list[tuple[list[_Stored], list[_Stored]]]:
        """The (correct, flawed) parents of each ``balance`` key ("tag" or "prompt") holding both kinds, in key
        order; none for ``"pool"`` or where no key holds both."""
        if balance == "pool":
            return []
        groups: dict[Any, tuple[list[_Stored], list[_Stored]]] = {}
        for pool, kind in ((self.correct, 0), (self.flawed, 1)):
            for s in pool:
                groups.setdefault(parent_feature(s, balance), ([], []))[kind].append(s)
        return [groups[k] for k in sorted(groups) if groups[k][0] and groups[k][1]]

    def shortcut_accuracy(self, balance: str = "pool") -> dict[str, float]:
        """Per feature of :data:`SHORTCUT_FEATURES`, the balanced accuracy of a verdict read off that feature
        alone, on the parents ``sample(..., balance=balance)`` draws now (:func:`shortcut_balanced_accuracy`):
        0.5 where the feature tells nothing, 1.0 where it tells the verdict outright.  A critic whose training
        verdict rises towards such a figure may be reading the prompt or the round instead of the image."""
        groups = self._balanced_groups(balance) or [(list(self.correct), list(self.flawed))]
        return {f: shortcut_balanced_accuracy([([parent_feature(s, f) for s in c], [parent_feature(s, f) for s in w])
                                               for c, w in groups]) for f in SHORTCUT_FEATURES}

    def _entry(self, s: _Stored) -> BufferEntry:
        tokens = s.tokens.tolist() if s.tokens is not None else None
        if s.png is not None:
            image = _unpng(s.png)
        elif self.decode is not None and tokens is not None:
            image = self.decode(tokens)
        else:
            raise ValueError("parent buffer: an entry holds image tokens only, but no decoder was given")
        return BufferEntry(prompt=s.prompt, image=image, image_tokens=tokens, reward=s.reward, correct=s.correct,
                           round=s.round, source=s.source)

    # ------------------------------------------------------------------ checkpointing
    # (resume restores the buffer: the reference lost it)
    def save(self, path: Path) -> None:
        """One safetensors file: all token ids and PNG bytes as two flat tensors, the rest as JSON metadata."""
        tokens: list[np.ndarray] = []
        pngs: list[bytes] = []
        entries = []
        n_tok = n_png = 0
        for pool, items in (("correct", self.correct), ("flawed", self.flawed)):
            for s in items:
                e: dict[str, Any] = {"pool": pool, "prompt": asdict(s.prompt), "reward": s.reward,
                                     "correct": s.correct, "round": s.round, "source": s.source}
                if s.tokens is not None:
                    e["tokens"] = [n_tok, n_tok + len(s.tokens)]
                    tokens.append(s.tokens)
                    n_tok += len(s.tokens)
                if s.png is not None:
                    e["png"] = [n_png, n_png + len(s.png)]  # type: ignore[arg-type]
                    pngs.append(s.png)  # type: ignore[arg-type]
                    n_png += len(s.png)  # type: ignore[arg-type]
                entries.append(e)
        tensors = {"tokens": torch.from_numpy(np.concatenate(tokens) if tokens else np.zeros(0, np.int32)),
                   "png": torch.frombuffer(bytearray(b"".join(pngs)), dtype=torch.uint8) if pngs
                   else torch.zeros(0, dtype=torch.uint8)}
        meta = {"format": FORMAT, "capacity": str(self.correct.maxlen), "entries": json.dumps(entries)}
        save_file(tensors, str(path), metadata=meta)

    def load(self, path: Path) -> None:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        if meta.get("format") != FORMAT:
            raise ValueError(f"{path}: not a parent-buffer file of format {FORMAT} (metadata {list(meta)[:4]})")
        tensors = load_file(str(path))
        tokens, png = tensors["tokens"].numpy(), tensors["png"].numpy()
        capacity, most = meta.get("capacity", ""), LIMITS["tree.buffer_size"][0]  # a recipe's own bound
        if not capacity.isdigit() or not 1 <= int(capacity) <= most:
            raise ValueError(f"{path}: capacity {capacity[:20]!r} is not a whole number in 1..{most}")
        entries = json.loads(meta.get("entries", "[]"))
        if not isinstance(entries, list):
            raise ValueError(f"{path}: 'entries' is not a list")
        correct, flawed = deque(maxlen=int(capacity)), deque(maxlen=int(capacity))
        token_lengths = set()
        for i, e in enumerate(entries):
            stored = _stored_entry(e, tokens, png, f"{path}: entry {i}")
            if stored.tokens is not None:
                token_lengths.add(len(stored.tokens))
            (correct if e["pool"] == "correct" else flawed).append(stored)
        if len(token_lengths) > 1:  # one policy, one image size: spans of several lengths were not written here
            raise ValueError(f"{path}: image token spans of {len(token_lengths)} different lengths")
        self.correct, self.flawed = correct, flawed  # only once every entry is read

    def load_legacy(self, state: dict[str, Any]) -> None:
        """A buffer checkpointed before the safetensors file (formats 1-2: entries with pixel lists)."""
        self.correct, self.flawed = deque(maxlen=state["capacity"]), deque(maxlen=state["capacity"])
        for pool in ("correct", "flawed"):
            for d in state[pool]:
                entry = BufferEntry(**{**d, "prompt": PromptItem(**d["prompt"]),
                                       "image": np.asarray(d["image"], dtype=np.uint8)})
                (self.correct if pool == "correct" else self.flawed).append(self._stored(entry))


def _stored_entry(e: Any, tokens: np.ndarray, png: np.ndarray, where: str) -> _Stored:
    """One entry of a buffer file, every field checked (a hand-edited or foreign file fails here, in one line,
    not steps later when a span of the wrong size is reshaped into an image)."""
    if not isinstance(e, dict) or e.get("pool") not in ("correct", "flawed"):
        raise ValueError(f"{where}: not an entry of pool 'correct' or 'flawed'")

    def span(key: str, array: np.ndarray) -> tuple[int, int] | None:
        v = e.get(key)
        if v is None:
            return None
        if (not isinstance(v, list) or len(v) != 2 or not all(type(x) is int for x in v)
                or not 0 <= v[0] < v[1] <= len(array)):
            raise ValueError(f"{where}: '{key}' span {str(v)[:40]} is not within the file's {len(array)} values")
        return v[0], v[1]

    span_t, span_p = span("tokens", tokens), span("png", png)
    reward, rnd, prompt = e.get("reward"), e.get("round"), e.get("prompt")
    if (span_t is None and span_p is None) or type(e.get("correct")) is not bool or type(rnd) is not int or rnd < 0:
        raise ValueError(f"{where}: needs an image span, a true/false 'correct' and a whole 'round' >= 0")
    if (e["pool"] == "correct") is not e["correct"]:  # a flawed image among the correct parents is taught as right
        raise ValueError(f"{where}: in pool {e['pool']!r} but 'correct' is {str(e['correct']).lower()}")
    if isinstance(reward, bool) or not isinstance(reward, (int, float)) or not np.isfinite(reward):
        raise ValueError(f"{where}: 'reward' must be a finite number, got {str(reward)[:40]}")
    if (not isinstance(prompt, dict) or not isinstance(prompt.get("id"), str)
            or not isinstance(prompt.get("prompt"), str) or not isinstance(prompt.get("metadata", {}), dict)
            or set(prompt) - {"id", "prompt", "metadata", "source"} or not isinstance(e.get("source"), str)):
        raise ValueError(f"{where}: 'prompt' must be {{id, prompt, metadata, source}} and 'source' a string")
    return _Stored(prompt=PromptItem(**prompt), tokens=tokens[span_t[0]:span_t[1]].copy() if span_t else None,
                   png=png[span_p[0]:span_p[1]].tobytes() if span_p else None, reward=float(reward),
                   correct=e["correct"], round=rnd, source=e["source"])


def _png(image: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(image, dtype=np.uint8)).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def _unpng(data: bytes) -> np.ndarray:
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        return np.asarray(im, dtype=np.uint8).copy()  # same mode as written: RGB, RGBA or L
