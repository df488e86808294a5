"""Prompt sources: the built-in Blocks generator, GenEval / GenEval++ / TIIF jsonl, `datasets` datasets.

Every source yields :class:`PromptItem` s.  File formats are checked line by line: a malformed line is a
:class:`UserError` naming the file and line number.
"""
from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any, Iterator

from r3_rl.errors import UserError
from r3_rl.trajectory import PromptItem


def read_jsonl_prompts(path: str | Path, kind: str) -> list[PromptItem]:
    """GenEval (``prompt`` + ``tag``/``include``/``exclude``) or TIIF (``short_description`` + yes/no lists)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: prompt file not found")
    items: list[PromptItem] = []
    with open(path) as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
            if not isinstance(rec, dict):
                raise UserError(f"{path}:{lineno}: expected a JSON object, got {type(rec).__name__}")
            if kind == "tiif":
                text = rec.get("short_description") or rec.get("prompt")
                q, a = rec.get("yn_question_list"), rec.get("yn_answer_list")
                if not isinstance(q, list) or not isinstance(a, list) or len(q) != len(a):
                    raise UserError(f"{path}:{lineno}: TIIF record needs yn_question_list and yn_answer_list "
                                    f"of equal length")
                meta = dict(rec, tag=rec.get("type", "tiif"))
            else:
                text = rec.get("prompt")
                if not isinstance(rec.get("include", []), list):
                    raise UserError(f"{path}:{lineno}: 'include' must be a list of {{class, count, ...}}")
                meta = {k: v for k, v in rec.items() if k != "prompt"}
            if not isinstance(text, str) or not text.strip():
                raise UserError(f"{path}:{lineno}: missing prompt text")
            items.append(PromptItem(id=f"{path.stem}:{lineno}", prompt=text, metadata=meta, source=str(path)))
    if not items:
        raise UserError(f"{path}: no prompts")
    return items


def read_hf_prompts(name: str, column: str) -> list[PromptItem]:
    import datasets

    try:
        ds = datasets.load_from_disk(name) if Path(name).is_dir() else datasets.load_dataset(name, split="train")
    except Exception as e:  # noqa: BLE001 - datasets raises many types; the user needs one line
        raise UserError(f"data.train: cannot load dataset {name!r}: {str(e).splitlines()[0]}") from None
    if column not in ds.column_names:
        raise UserError(f"data.prompt_column: {column!r} not in dataset columns {ds.column_names}")
    return [PromptItem(id=f"{name}:{i}", prompt=row[column],
                       metadata={k: v for k, v in row.items() if k != column}, source=name)
            for i, row in enumerate(ds)]


class PromptSource:
    """Training prompts (an endless shuffled stream) and a fixed held-out list."""

    def __init__(self, recipe: Any) -> None:
        self.recipe = recipe
        d = recipe.data
        if d.source == "blocks":
            from r3_rl.blocks.prompts import BlocksPrompts

            self._blocks = BlocksPrompts(rows=d.blocks.rows, cols=d.blocks.cols, tags=d.blocks.tags,
                                         seed=recipe.seed)
            self.train_items: list[PromptItem] | None = None
        else:
            if not d.train:
                raise UserError(f"data.train: required for data.source={d.source!r} (a jsonl path or dataset)")
            self.train_items = (read_hf_prompts(d.train, d.prompt_column) if d.source == "hf"
                                else read_jsonl_prompts(d.train, d.source))
        self.position = 0  # prompts consumed so far (checkpointed for exact resume)

    def eval_prompts(self, n: int) -> list[PromptItem]:
        d = self.recipe.data
        if d.source == "blocks":
            return self._blocks.held_out(n)
        items = (read_jsonl_prompts(d.eval, d.source) if d.eval and d.source != "hf"
                 else read_hf_prompts(d.eval, d.prompt_column) if d.eval else self.train_items or [])
        return items[:n]

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
        order = list(range(len(self.train_items)))
        random.Random(f"{self.recipe.seed}/{epoch}").shuffle(order)
        return self.train_items[order[idx]]

    def iter_train(self) -> Iterator[PromptItem]:
        while True:
            yield from self.next_batch(1)
