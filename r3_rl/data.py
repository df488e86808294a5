"""Prompt sources: the built-in Blocks generator, GenEval / GenEval++ / TIIF jsonl, `datasets` datasets.

Every source yields :class:`PromptItem` s whose ``metadata`` carries what rewards and evaluation need
(``tag`` for per-tag reports, GenEval's ``include``/``exclude``, TIIF's yes/no questions).  Files are
checked line by line when loaded, not when a reward first trips over them hours into a run: a
malformed line is a :class:`UserError` naming the file and line number.

Formats (one JSON object per line):

* ``geneval`` -- GenEval and GenEval++: ``{"prompt", "tag", "include": [{class, count, color?,
  position?: [relation, j], region?, size?}], "exclude"?: [{class, count}]}``; other top-level keys
  are kept as metadata.
* ``tiif`` -- TIIF: ``{"type", "short_description", "long_description"?, "yn_question_list",
  "yn_answer_list"}``; the prompt is ``short_description`` (or the field named by
  ``data.prompt_column`` when that is not ``prompt``), ``tag`` is ``type`` and answers are normalised
  to lower-case ``yes``/``no`` (the reference compared ``"Yes"`` with ``"yes"``).
* ``hf`` -- any `datasets` dataset with a prompt column: a ``save_to_disk`` folder, a local
  ``.jsonl/.json/.csv/.parquet`` file, or a hub name (hub cache only when offline).

``data.train`` / ``data.eval`` may also name a prompt set shipped with the package (``geneval:train``,
``geneval:test553``, ``tiif:test``, ...; :mod:`r3_rl.prompt_sets`, ``r3-rl data``); ``.jsonl.gz`` files work
wherever a ``.jsonl`` does.
"""
from __future__ import annotations

import json
import random
from collections import Counter
from pathlib import Path
from typing import Any, Iterator

from r3_rl.errors import UserError
from r3_rl.jsonl import read_jsonl_objects
from r3_rl.prompt_sets import BUILTIN, PromptSet, lookup
from r3_rl.trajectory import PromptItem

TIIF_ANSWERS = ("yes", "no")


def _check_geneval(rec: dict[str, Any], where: str) -> None:
    """GenEval(++) ``include``/``exclude`` checks, shared with the GenEval reward (one definition of valid)."""
    if "tag" in rec and not isinstance(rec["tag"], str):
        raise UserError(f"{where}: 'tag' must be a string, got {rec['tag']!r}")
    if "include" not in rec and "exclude" not in rec:
        return  # a plain prompt list: fine for rewards that need no GenEval metadata
    from r3_rl.rewards.geneval_rules import validate_metadata

    try:
        validate_metadata(rec)
    except UserError as e:
        raise UserError(f"{where}: {e}") from None


def _tiif_record(rec: dict[str, Any], where: str, prompt_field: str) -> tuple[Any, dict[str, Any]]:
    q, a = rec.get("yn_question_list"), rec.get("yn_answer_list")
    if not isinstance(q, list) or not isinstance(a, list) or len(q) != len(a) or not q:
        raise UserError(f"{where}: TIIF record needs non-empty 'yn_question_list' and 'yn_answer_list' "
                        f"of equal length")
    if not all(isinstance(x, str) and x.strip() for x in q):
        raise UserError(f"{where}: 'yn_question_list' must hold non-empty strings")
    answers = [x.strip().lower() if isinstance(x, str) else x for x in a]
    bad = [x for x in answers if x not in TIIF_ANSWERS]
    if bad:
        raise UserError(f"{where}: 'yn_answer_list' answers must be yes/no, got {bad[0]!r}")
    meta = {k: v for k, v in rec.items() if k != prompt_field}
    meta.update(yn_question_list=[x.strip() for x in q], yn_answer_list=answers, tag=str(rec.get("type", "tiif")))
    return rec.get(prompt_field), meta


def read_jsonl_prompts(path: str | Path, kind: str, prompt_column: str = "prompt",
                       label: str | None = None) -> list[PromptItem]:
    """Load a GenEval/GenEval++ (``kind="geneval"``) or TIIF (``kind="tiif"``) jsonl file, checking every line.

    Item ids are ``<label>:<line>`` and their source ``label`` (a built-in set's name); without a label, the
    ids use the file's stem (``.gz`` dropped first) and the source is the path."""
    path = Path(path)
    source = label or str(path)
    label = label or Path(path.name.removesuffix(".gz")).stem
    if not path.is_file():
        raise UserError(f"{path}: prompt file not found")
    if kind not in ("geneval", "tiif"):
        raise UserError(f"{path}: unknown prompt file format {kind!r} (valid: geneval, tiif)")
    field = prompt_column if prompt_column != "prompt" or kind == "geneval" else "short_description"
    items: list[PromptItem] = []
    for lineno, rec in read_jsonl_objects(path):
        where = f"{path}:{lineno}"
        if kind == "tiif":
            text, meta = _tiif_record(rec, where, field)
        else:
            _check_geneval(rec, where)
            text, meta = rec.get(field), {k: v for k, v in rec.items() if k != field}
        if not isinstance(text, str) or not text.strip():
            raise UserError(f"{where}: missing prompt text (a non-empty string in {field!r})")
        items.append(PromptItem(id=f"{label}:{lineno}", prompt=text.strip(), metadata=meta, source=source))
    if not items:
        raise UserError(f"{path}: no prompts")
    return items


def _jsonable(value: Any) -> bool:
    try:
        json.dumps(value)
        return True
    except (TypeError, ValueError):
        return False


def _load_dataset(name: str, split: str) -> tuple[Any, str | None]:
    """``(dataset, the split it is)``: None where ``split`` does not apply (one file, a plain ``Dataset`` folder)."""
    import datasets

    p = Path(name)
    if p.is_dir():
        ds = datasets.load_from_disk(name)
        if isinstance(ds, datasets.DatasetDict):
            if split not in ds:
                raise UserError(f"dataset {name}: no split {split!r} (splits: {', '.join(ds)})")
            return ds[split], split
        return ds, None
    builders = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}
    suffix = Path(p.name.removesuffix(".gz")).suffix  # a .jsonl.gz is a jsonl file (datasets reads the gzip)
    if suffix in builders:
        if not p.is_file():
            raise UserError(f"dataset {name}: file not found")
        return datasets.load_dataset(builders[suffix], data_files=name, split="train"), None
    return datasets.load_dataset(name, split=split), split


def read_hf_prompts(name: str, column: str, split: str = "train") -> list[PromptItem]:
    """Prompts from a `datasets` dataset's ``column``; other JSON-serialisable columns become metadata
    (images and other binary columns are left out: trajectories are written as JSON)."""
    try:
        ds, split_used = _load_dataset(name, split)
    except UserError:
        raise
    except Exception as e:  # noqa: BLE001 - datasets raises many types; the user needs one line
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise UserError(f"dataset {name!r} (split {split!r}): cannot load: {first}") from None
    if column not in ds.column_names:
        raise UserError(f"data.prompt_column: {column!r} not in dataset {name} columns {ds.column_names}")
    if len(ds) == 0:
        raise UserError(f"dataset {name} (split {split!r}): no rows")
    first = ds[0]
    keep = [c for c in ds.column_names if c != column and _jsonable(first[c])]
    items = []
    label = Path(name).name if split_used is None else f"{Path(name).name}:{split_used}"  # train / test rows: apart
    for i, row in enumerate(ds):
        text = row[column]
        if not isinstance(text, str) or not text.strip():
            raise UserError(f"dataset {name}: row {i}: {column!r} must be a non-empty string, got {text!r}")
        items.append(PromptItem(id=f"{label}:{i}", prompt=text.strip(),
                                metadata={k: row[k] for k in keep}, source=name))
    return items


def load_prompts(source: str, name: str, prompt_column: str = "prompt", split: str = "train") -> list[PromptItem]:
    """One entry point for file/dataset sources (``geneval``, ``tiif``, ``hf``) and the built-in sets."""
    try:
        builtin = lookup(name)
    except ValueError as e:
        raise UserError(str(e)) from None
    if builtin is not None:
        if builtin.format != source:
            raise UserError(f"{name!r} is a {builtin.format}-format prompt set; set data.source: {builtin.format}")
        return read_jsonl_prompts(builtin.path, builtin.format, prompt_column, label=builtin.name)
    if source == "hf":
        return read_hf_prompts(name, prompt_column, split)
    return read_jsonl_prompts(name, source, prompt_column)


def builtin_summary() -> list[tuple[PromptSet, int, Counter[str]]]:
    """``(set, number of prompts, prompts per tag)`` for every built-in set, read and checked from the files."""
    out = []
    for s in BUILTIN.values():
        items = load_prompts(s.format, s.name)
        out.append((s, len(items), Counter(str(it.metadata.get("tag", "")) for it in items)))
    return out


def held_out_subset(items: list[PromptItem], n: int, seed: int) -> list[PromptItem]:
    """``n`` prompts of a held-out list: all of it when ``n >= len``, else a seeded random subset kept in file
    order (eval files are often sorted by tag, so the first ``n`` lines would cover only one tag)."""
    if n >= len(items):
        return list(items)
    keep = sorted(random.Random(f"eval/{seed}").sample(range(len(items)), n))
    return [items[i] for i in keep]


class BlocksPrompts:
    """Indexed access to the Blocks generator's seeded train stream, plus its fixed held-out list."""

    def __init__(self, tags: dict[str, float], seed: int) -> None:
        self.tags, self.seed = dict(tags), seed
        self._it: Iterator[PromptItem] | None = None
        self._next = 0

    def train_prompt(self, k: int) -> PromptItem:
        from r3_rl.blocks.prompts import iter_prompts

        if self._it is None or k < self._next:  # restart the stream (e.g. after resume) and skip ahead
            self._it, self._next = iter_prompts("train", seed=self.seed, tag_mix=self.tags), 0
        while True:
            item = next(self._it)
            self._next += 1
            if self._next - 1 == k:
                return item

    def held_out(self, n: int) -> list[PromptItem]:
        from r3_rl.blocks.prompts import heldout_prompts

        return heldout_prompts(n, seed=self.seed, tag_mix=self.tags)


class PromptSource:
    """Training prompts (an endless shuffled stream) and a fixed held-out list."""

    _order: tuple[int, list[int]] | None = None  # (epoch, that epoch's shuffled order of train_items)

    def __init__(self, recipe: Any) -> None:
        self.recipe = recipe
        d = recipe.data
        if d.source == "blocks":
            self._blocks = BlocksPrompts(tags=d.blocks.tags, seed=recipe.seed)
            self.train_items: list[PromptItem] | None = None
        else:
            if not d.train:
                raise UserError(f"data.train: required for data.source={d.source!r} (a built-in set such as "
                                f"geneval:train, a jsonl path or a dataset)")
            self.train_items = load_prompts(d.source, d.train, d.prompt_column, d.train_split)
        self._eval_items: list[PromptItem] | None = None
        self.position = 0  # prompts consumed so far (checkpointed for exact resume)

    def eval_prompts(self, n: int) -> list[PromptItem]:
        """The held-out prompts (the same ones every time): the Blocks held-out pool, ``data.eval``, or for
        ``hf`` without ``data.eval`` the ``data.eval_split`` of ``data.train``."""
        d = self.recipe.data
        if d.source == "blocks":
            return self._blocks.held_out(n)
        if self._eval_items is None:
            if d.eval:
                self._eval_items = load_prompts(d.source, d.eval, d.prompt_column, d.eval_split)
            elif d.source == "hf":
                self._eval_items = load_prompts("hf", d.train, d.prompt_column, d.eval_split)
            else:
                raise UserError(f"data.eval: required for data.source={d.source!r} (a held-out set, e.g. "
                                f"geneval:test553 or a jsonl path); evaluating on training prompts would overstate "
                                f"accuracy")
        return held_out_subset(self._eval_items, n, self.recipe.seed)

    def eval_pool_size(self) -> int | None:
        """How many held-out prompts :meth:`eval_prompts` draws from (``None`` for Blocks: its held-out
        generator has no end); known once the eval prompts were read."""
        return None if self._eval_items is None else len(self._eval_items)

    def next_batch(self, n: int) -> list[PromptItem]:
        out = []
        for _ in range(n):
            out.append(self._item(self.position))
            self.position += 1
        return out

    def _item(self, k: int) -> PromptItem:
        if self.train_items is None:
            return self._blocks.train_prompt(k)
        epoch, idx = divmod(k, len(self.train_items))
        if self._order is None or self._order[0] != epoch:  # one shuffle per epoch, not per prompt (a 200k set
            order = list(range(len(self.train_items)))  # took 3 s for a 64-prompt batch)
            random.Random(f"{self.recipe.seed}/{epoch}").shuffle(order)
            self._order = (epoch, order)
        return self.train_items[self._order[1][idx]]

    def iter_train(self) -> Iterator[PromptItem]:
        while True:
            yield from self.next_batch(1)
