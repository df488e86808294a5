"""One-line recipe errors from pydantic's: the key as a recipe spells it, a close match for an unknown key.

Kept apart from :mod:`r3_rl.config` (the recipe's schema): these functions walk any root model's types, so they
take it as an argument.
"""
from __future__ import annotations

import typing
from typing import Any

from pydantic import ValidationError

from r3_rl.config_base import type_members
from r3_rl.errors import close_match, shown


def _section(annotation: Any) -> Any:
    """The section class a field holds: ``LoraCfg`` for ``LoraCfg | None`` (the first pydantic model of a union),
    else the annotation itself."""
    return next((m for m in type_members(annotation) if hasattr(m, "model_fields")), annotation)


def _fields_at(root: Any, path: tuple[Any, ...]) -> list[str]:
    """Valid keys of the section at ``path`` (for 'did you mean'): through optional sections (``learner.lora``)
    and list entries (``rewards.task[0]``, whose index pydantic gives as an int)."""
    model: Any = root
    for part in path:
        model = _section(model)
        if isinstance(part, int):
            args = typing.get_args(model)
            if typing.get_origin(model) is not list or not args:
                return []
            model = args[0]
            continue
        field = getattr(model, "model_fields", {}).get(part)
        if field is None:
            return []
        model = field.annotation
    return list(getattr(_section(model), "model_fields", {}))


def _recipe_loc(root: Any, loc: tuple[Any, ...]) -> tuple[tuple[Any, ...], bool]:
    """``loc`` as the recipe spells it, and whether pydantic's union-branch tags were left out of it.

    For a field typed ``list[str] | str`` pydantic reports ``('learner', 'lora', 'target_modules', 'list[str]')``:
    the tag names the branch tried, not a key a user could write.  Walking the recipe's types tells a field, a
    mapping key or a list index from a tag."""
    kinds: list[Any] = [root]
    out: list[Any] = []
    dropped = False
    for part in loc:
        cands = [m for k in kinds for m in type_members(k)]
        nxt: list[Any] = []
        for c in cands:
            origin, args = typing.get_origin(c), typing.get_args(c)
            if isinstance(part, int) and origin in (list, tuple) and args:
                nxt.append(args[0])
            elif isinstance(part, str) and part in getattr(c, "model_fields", {}):
                nxt.append(c.model_fields[part].annotation)
            elif origin is dict and len(args) == 2:
                nxt.append(args[1])
        if nxt or not cands or any(c is typing.Any for c in cands):
            out.append(part)
            kinds = nxt or [typing.Any]
        else:  # no type here has this key: a union's branch tag
            dropped = True
    return tuple(out), dropped


def _key(loc: tuple[Any, ...]) -> str:
    """``rewards.task[0].weight``: a list entry's index as the recipe validator writes it (:mod:`r3_rl.validate`)."""
    return "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc).lstrip(".")


def one_line(err: ValidationError, source: str, root: Any) -> str:
    """The first error of validating a recipe against ``root`` (the ``Recipe`` model), as one line naming the key
    as the recipe spells it: ``r.yaml: key 'learner.lr': ...``, ``r.yaml: unknown key 'x' (did you mean ...)``."""
    errors = err.errors()
    e = errors[0]
    if e["type"] == "extra_forbidden":  # the last part is the user's unknown key: kept as written
        section = _recipe_loc(root, tuple(e["loc"])[:-1])[0]
        valid = _fields_at(root, section)
        unknown = e["loc"][-1]
        hint = close_match(str(unknown), valid) or (f" (valid: {', '.join(valid)})" if valid else "")
        return f"{source}: unknown key '{_key(section + (unknown,))}'{hint}"
    loc, dropped = _recipe_loc(root, tuple(e["loc"]))
    key = _key(loc)
    msg = e["msg"]
    if dropped:  # every branch of the union said why: "a valid list or a valid string", not only the first
        msgs = [x["msg"] for x in errors if _recipe_loc(root, tuple(x["loc"]))[0] == loc]
        prefix = "Input should be "
        rest = [m.removeprefix(prefix) if m.startswith(prefix) else m for m in dict.fromkeys(msgs[1:]) if m != msg]
        msg = " or ".join([msg, *rest])
    got = e.get("input")
    got_s = f", got {shown(got)}" if not isinstance(got, dict) else ""
    return f"{source}: key '{key}': {msg}{got_s}"
