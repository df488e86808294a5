"""R3 trajectory trees: the data that flows from rollout to rewards to the learner.

A tree starts at a prompt.  Stage A is ``reason`` (plan text) -> ``generate`` (first image); each later
round is ``reflect`` (critique + verdict) -> ``refine`` (edited image).  Tree-RL branches sibling
groups at a stage: every node carries the ``group_id`` of the siblings its advantage is computed
among.  Each sampled node keeps a :class:`Segment` with everything needed to recompute the
log-probabilities of its actions (tokens, or a continuous image action) under exactly the distribution
that sampled them, so the learner never trains on a different distribution than the one the rollout
used (a weak point of the reference implementation).

Trees serialise to JSON lines (one tree per line) with images as PNG files beside them; reading
them back gives equal objects (floats are written with ``repr`` precision, images are lossless PNG).
"""
from __future__ import annotations

import base64
import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Iterable, Iterator, Literal

import numpy as np

from r3_rl.errors import UserError
from r3_rl.jsonl import read_jsonl_objects
from r3_rl.textfiles import NotRegularFile, open_if_regular

Stage = Literal["reason", "generate", "reflect", "refine"]
Modality = Literal["text", "image"]
STAGES: tuple[str, ...] = ("reason", "generate", "reflect", "refine")


@dataclass
class SamplingParams:
    """How one stage samples.  The learner applies the same transform when it recomputes log-probs."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    cfg_scale: float = 1.0  # classifier-free guidance for image tokens; 1.0 = off
    max_new_tokens: int = 64
    greedy: bool = False


@dataclass
class PromptItem:
    """A prompt with its GenEval-style metadata (``tag``, ``include``, ``exclude``, ...)."""

    id: str
    prompt: str
    metadata: dict[str, Any] = field(default_factory=dict)
    source: str = ""

    @property
    def tag(self) -> str:
        """The prompt's tag (``metadata["tag"]``, ``"all"`` without one): the key of every per-tag eval figure
        and of tag-balanced refine parents."""
        return str(self.metadata.get("tag", "all"))


@dataclass
class Segment:
    """What a policy sampled in one stage, and how: the record its algorithm recomputes log-probs from.

    ``logprobs`` holds one log-probability per *action* under the sampling distribution (temperature,
    top-k/top-p, CFG, noise level included); the learner counts actions by it and never looks further.
    An action is a token (``token_ids``, aligned one-to-one with ``logprobs``) or something continuous
    whose JSON-safe record the policy keeps in ``action`` (a Gaussian latent; the denoising steps of a
    flow-matching image head, ``DenoisingTrace.to_dict()``), with ``token_ids`` empty.  ``context`` is
    policy-specific and JSON-serialisable (the tiny policy stores ``input_ids``; a Janus policy stores its
    prompt ids and the VQ tokens of any input image).
    """

    modality: Modality
    context: dict[str, Any]
    token_ids: list[int]
    logprobs: list[float]
    sampling: SamplingParams = field(default_factory=SamplingParams)
    action: dict[str, Any] | None = None  # a continuous action's record; None for tokens

    @property
    def num_actions(self) -> int:
        """How many actions the segment took (tokens, denoising steps, ...): the learner's unit of weight."""
        return len(self.logprobs)


@dataclass
class Node:
    """One stage output inside a tree."""

    id: str
    parent: str | None
    stage: Stage
    round: int  # 0 for reason/generate, k >= 1 for the k-th reflect/refine
    group_id: str  # siblings sharing this id are compared for advantages
    policy_version: int
    segment: Segment | None = None  # None when nothing was sampled (e.g. refine after "no further edit")
    text: str | None = None  # plan or critique
    edit_instruction: str | None = None  # reflect: text after the last </think>
    stop: bool | None = None  # reflect: True when the critique says no further edit is needed
    image: np.ndarray | None = None  # generate/refine: decoded HxWx3 uint8 image
    image_tokens: list[int] | None = None  # generate/refine: the discrete image tokens (None: a continuous head)
    rewards: dict[str, float] = field(default_factory=dict)  # per named reward (and components)
    reward_failures: dict[str, str] = field(default_factory=dict)  # reward name -> why it failed
    reward: float | None = None  # composed stage reward; None = failed / not scored
    advantage: float | None = None  # None = excluded from the update
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass
class Tree:
    """All nodes grown from one prompt (or from one buffered parent image, for refine-stage roots)."""

    id: str
    prompt: PromptItem
    nodes: dict[str, Node] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)

    def add(self, node: Node) -> Node:
        if node.id in self.nodes:
            raise ValueError(f"duplicate node id {node.id!r} in tree {self.id!r}")
        if node.parent is not None and node.parent not in self.nodes:
            raise ValueError(f"node {node.id!r} has unknown parent {node.parent!r}")
        self.nodes[node.id] = node
        return node

    def children(self, node_id: str | None) -> list[Node]:
        return [n for n in self.nodes.values() if n.parent == node_id]

    def path(self, node_id: str) -> list[Node]:
        """Nodes from the root down to ``node_id`` inclusive: the R3 history a reward sees."""
        out = []
        cur: str | None = node_id
        while cur is not None:
            node = self.nodes[cur]
            out.append(node)
            cur = node.parent
        return out[::-1]

    def leaves(self) -> list[Node]:
        parents = {n.parent for n in self.nodes.values()}
        return [n for n in self.nodes.values() if n.id not in parents]


# --------------------------------------------------------------------------------------------
# Serialisation: JSONL + PNG
# --------------------------------------------------------------------------------------------

def _save_png(image: np.ndarray, path: Path) -> None:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(image, dtype=np.uint8)).save(buf, format="PNG")
    _write_png_bytes(buf.getvalue(), path)


def _write_png_bytes(data: bytes, path: Path) -> None:
    """``data`` at ``path``, whole or not at all (a temporary file renamed into place)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.png")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _inside_dump(base_dir: Path, rel: str) -> Path:
    """The file a dump names, which must lie under the dump's folder: a dump is a file people share, and an
    absolute or ``../`` path would read (and ``inspect --html`` embed) any image the reader can open."""
    path = (base_dir / rel).resolve()
    if Path(rel).is_absolute() or not path.is_relative_to(base_dir.resolve()):
        raise ValueError(f"image path {rel[:120]!r} is outside the dump's folder")
    return path


def _open_in_dump(base_dir: Path, rel: str) -> BinaryIO:
    """A dump's file (:func:`_inside_dump`), opened only if it is a regular file: a FIFO planted where an image
    should be would block the reader (``r3-rl inspect``) forever."""
    path = _inside_dump(base_dir, rel)
    try:
        return open_if_regular(path)
    except NotRegularFile:
        raise ValueError(f"image path {rel[:120]!r} is not a regular file") from None


MAX_IMAGE_PIXELS = 4096 * 4096  # a dump's image is at most this (Janus 384^2, BAGEL 1024^2): more is not ours


def _load_png(base_dir: Path, rel: str) -> np.ndarray:
    """A dump's image (:func:`_inside_dump`), at most :data:`MAX_IMAGE_PIXELS`."""
    from PIL import Image

    with _open_in_dump(base_dir, rel) as fh:
        try:
            im = Image.open(fh)
        except Image.DecompressionBombError as e:
            raise ValueError(f"image {rel[:120]!r}: {e}") from None
        with im:
            if im.width * im.height > MAX_IMAGE_PIXELS:
                raise ValueError(f"image {rel[:120]!r} is {im.width}x{im.height} pixels, over {MAX_IMAGE_PIXELS}")
            return np.asarray(im.convert("RGB"), dtype=np.uint8).copy()


MAX_CONTEXT_PNG_BYTES = 64 << 20  # an input image a dump's context points at (BAGEL's 1024 px PNG: about 2 MB)


def _map_png_refs(value: Any, key: str, fn: Any) -> Any:
    """A copy of ``value`` (a segment context: dicts, lists, scalars) with every ``{key: str}`` dict replaced by
    ``fn(str)``; lists of scalars (token ids) are returned as they are."""
    if isinstance(value, dict):
        if len(value) == 1 and isinstance(value.get(key), str):
            return fn(value[key])
        return {k: _map_png_refs(v, key, fn) for k, v in value.items()}
    if isinstance(value, list) and any(isinstance(v, (dict, list)) for v in value):
        return [_map_png_refs(v, key, fn) for v in value]
    return value


def _context_png_to_file(b64: str, image_dir: Path, folder: str, written: dict[bytes, str]) -> dict[str, str]:
    """An input image a context carries as base64 PNG, written once per dump (every critique and edit of a
    parent repeats it: half a BAGEL dump's JSONL), as ``{"png_file": path}``; the PNG bytes are kept as they are."""
    import hashlib

    digest = b"png:" + hashlib.blake2b(b64.encode("ascii"), digest_size=16).digest()
    rel = written.get(digest)
    if rel is None:
        rel = written[digest] = f"{folder}/input_{digest[4:12].hex()}.png"
        _write_png_bytes(base64.b64decode(b64), image_dir / rel)
    return {"png_file": rel}


def _context_png_from_file(base_dir: Path, rel: str) -> dict[str, str]:
    """The inverse of :func:`_context_png_to_file`, with :func:`_load_png`'s folder rule and a size cap."""
    with _open_in_dump(base_dir, rel) as fh:
        if os.fstat(fh.fileno()).st_size > MAX_CONTEXT_PNG_BYTES:
            raise ValueError(f"image {rel[:120]!r} is over {MAX_CONTEXT_PNG_BYTES >> 20} MiB")
        return {"png": base64.b64encode(fh.read()).decode("ascii")}


def node_to_dict(node: Node, image_path: str | None) -> dict[str, Any]:
    d = {f.name: getattr(node, f.name) for f in dataclasses.fields(Node) if f.name != "image"}
    d["segment"] = dataclasses.asdict(node.segment) if node.segment is not None else None
    d["image"] = image_path
    return d


def node_from_dict(d: dict[str, Any], image: np.ndarray | None) -> Node:
    """The inverse of :func:`node_to_dict`; files written before ``Segment.action`` existed read the same."""
    d = dict(d)
    seg = d.pop("segment")
    d.pop("image")
    if seg is not None:
        seg = dict(seg)
        seg["sampling"] = SamplingParams(**seg["sampling"])
        seg = Segment(**seg)
    return Node(segment=seg, image=image, **d)


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)


def tree_to_dict(tree: Tree, image_dir: Path, image_prefix: str, written: dict[bytes, str] | None = None
                 ) -> dict[str, Any]:
    """Write the tree's images under ``image_dir`` and return its JSON-ready dict.  ``written`` (digest -> path)
    spans a dump: an image already written -- a "no further edit" copy of its parent -- points at that file
    instead of being encoded again (a 384 px PNG is about 220 KB and 65 ms)."""
    import hashlib

    written = {} if written is None else written
    nodes = []
    for node in tree.nodes.values():
        rel = None
        if node.image is not None:
            im = np.ascontiguousarray(node.image)
            digest = hashlib.blake2b(im.tobytes(), digest_size=16, person=str(im.shape).encode()[:16]).digest()
            rel = written.get(digest)
            if rel is None:
                rel = written[digest] = f"{image_prefix}/{_safe(tree.id)}/{_safe(node.id)}.png"
                _save_png(node.image, image_dir / rel)
        d = node_to_dict(node, rel)
        if d["segment"] is not None:
            d["segment"]["context"] = _map_png_refs(d["segment"]["context"], "png", lambda b64: _context_png_to_file(
                b64, image_dir, f"{image_prefix}/{_safe(tree.id)}", written))
        nodes.append(d)
    return {"id": tree.id, "prompt": dataclasses.asdict(tree.prompt), "meta": tree.meta, "nodes": nodes}


def tree_from_dict(d: dict[str, Any], base_dir: Path) -> Tree:
    tree = Tree(id=d["id"], prompt=PromptItem(**d["prompt"]), meta=d.get("meta", {}))
    if not isinstance(d["nodes"], list):
        raise TypeError(f"'nodes' is {type(d['nodes']).__name__}, not a list")
    for i, nd in enumerate(d["nodes"]):
        if not isinstance(nd, dict):
            raise TypeError(f"node {i} is {type(nd).__name__}, not an object")
        img = _load_png(base_dir, str(nd["image"])) if nd.get("image") else None
        if isinstance(nd.get("segment"), dict) and "context" in nd["segment"]:
            nd = {**nd, "segment": {**nd["segment"], "context": _map_png_refs(
                nd["segment"]["context"], "png_file", lambda rel: _context_png_from_file(base_dir, rel))}}
        node = node_from_dict(nd, img)
        tree.nodes[node.id] = node  # stored in insertion (topological) order
    return tree


class _Encoder(json.JSONEncoder):
    def default(self, o: Any) -> Any:  # numpy scalars sneak in from reward code
        if isinstance(o, np.generic):
            return o.item()
        if isinstance(o, np.ndarray):
            return o.tolist()
        return super().default(o)


def write_trees(trees: Iterable[Tree], jsonl_path: str | Path) -> Path:
    """Write trees to ``jsonl_path`` (atomically) and their images to ``<stem>_images/`` beside it."""
    jsonl_path = Path(jsonl_path)
    jsonl_path.parent.mkdir(parents=True, exist_ok=True)
    prefix = f"{jsonl_path.stem}_images"
    tmp = jsonl_path.with_suffix(".jsonl.tmp")
    written: dict[bytes, str] = {}
    with open(tmp, "w") as fh:
        for tree in trees:
            fh.write(json.dumps(tree_to_dict(tree, jsonl_path.parent, prefix, written), cls=_Encoder) + "\n")
    os.replace(tmp, jsonl_path)
    return jsonl_path


def read_trees(jsonl_path: str | Path) -> Iterator[Tree]:
    """Trees of a JSONL file; a line that is not a tree this version can read is a one-line ``file:line`` error."""
    jsonl_path = Path(jsonl_path)
    for line, d in read_jsonl_objects(jsonl_path):
        try:
            tree = tree_from_dict(d, jsonl_path.parent)
        # OSError: a missing or unreadable image (PIL's too); AttributeError: a value of the wrong JSON type
        except (KeyError, TypeError, ValueError, OSError, AttributeError) as e:
            raise UserError(f"{jsonl_path}:{line}: not a trajectory tree r3-rl can read "
                            f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
        yield tree


@dataclass
class ReferenceImage:
    """A fixed image to critique (understanding measured on the same images before and after RL): built as
    ``kind`` ("correct" / "flawed"); the eval reward has the last word.  Built by
    :func:`r3_rl.blocks.reference.reference_pairs` or read from a user's jsonl (:mod:`r3_rl.eval.understanding`)."""

    prompt: PromptItem
    image: np.ndarray
    image_tokens: list[int] | None
    kind: str
