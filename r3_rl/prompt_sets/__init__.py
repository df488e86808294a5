"""Prompt sets that ship with the package, by name: ``data.train: geneval:train``, ``data.eval: geneval:test553``.

Why ship them: the promised command ``r3-rl train recipes/grpo_geneval.yaml`` must run with nothing to supply
but the model weights.  The files next to this module are gzipped, byte-identical copies of the public R3
repository's prompt sets (sen-ye/R3, Apache-2.0, commit e9912ac5fe9dd24f6429ed2c8719fb76f44d355f, folder
``data/``); ``README.md`` in this folder names the original benchmarks.

A built-in name is ``<family>:<split>``.  This module is only the catalogue (no parsing, no heavy imports:
the recipe validator uses it); :mod:`r3_rl.data` loads and checks the records.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from r3_rl.errors import close_match

HERE = Path(__file__).resolve().parent


@dataclass(frozen=True)
class PromptSet:
    name: str  # "<family>:<split>", what a recipe writes
    format: str  # the data.source that reads it: geneval (GenEval / GenEval++) or tiif
    file: str  # relative to this folder
    about: str  # one line for `r3-rl data`

    @property
    def path(self) -> Path:
        return HERE / self.file


BUILTIN: dict[str, PromptSet] = {s.name: s for s in (
    PromptSet("geneval:train", "geneval", "geneval/train_geneval.jsonl.gz",
              "GenEval-format training prompts (Flow-GRPO's training split)"),
    PromptSet("geneval:test", "geneval", "geneval/test_geneval.jsonl.gz",
              "GenEval benchmark, each of its 553 prompts 4 times (GenEval scores 4 images per prompt)"),
    PromptSet("geneval:test553", "geneval", "geneval/test_geneval_553.jsonl.gz",
              "GenEval benchmark, 553 unique prompts"),
    PromptSet("geneval++:test", "geneval", "geneval/test_geneval++.jsonl.gz",
              "GenEval++: harder compositions with region / size fields (7 tags x 40)"),
    PromptSet("tiif:train", "tiif", "tiif/train_TIIF.jsonl.gz", "TIIF-format prompts with yes/no question lists"),
    PromptSet("tiif:test", "tiif", "tiif/test_TIIF.jsonl.gz", "TIIF-Bench test prompts with yes/no question lists"),
)}
FAMILIES = sorted({n.split(":")[0] for n in BUILTIN})


def lookup(name: Any) -> PromptSet | None:
    """The built-in set called ``name``; None for anything else (a path, a `datasets` name).

    A ``<family>:<split>`` name with a known family but an unknown split is an error (a typo must not be
    read as a missing file hours later), unless a file of that name exists.
    """
    if not isinstance(name, str) or ":" not in name:
        return None
    if name in BUILTIN:
        return BUILTIN[name]
    family = name.split(":", 1)[0]
    if family in FAMILIES and not Path(name).exists():
        raise ValueError(f"unknown built-in prompt set {name!r}{close_match(name, list(BUILTIN))} "
                         f"(built-in: {', '.join(BUILTIN)}; `r3-rl data` lists them)")
    return None


def infer_source(data: dict[str, Any]) -> dict[str, Any]:
    """A recipe's ``data`` section with ``source`` filled in from its built-in names (when not given), and a
    one-line error when a built-in name and ``data.source`` disagree."""
    named = {key: s for key in ("train", "eval") if (s := lookup(data.get(key))) is not None}
    if not named:
        return data
    formats = {s.format for s in named.values()}
    if len(formats) > 1:
        raise ValueError("data.train and data.eval are built-in sets of different formats ("
                         + ", ".join(f"{s.name}: {s.format}" for s in named.values()) + ")")
    fmt = formats.pop()
    source = data.get("source")
    if source is None:
        return {**data, "source": fmt}
    if source != fmt:
        key, s = next(iter(named.items()))
        raise ValueError(f"data.{key} {s.name!r} is a {fmt}-format prompt set but data.source is {source!r}; "
                         f"set data.source: {fmt} (or leave it out)")
    return data
