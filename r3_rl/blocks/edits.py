"""Plans, critiques and grid edits: the language the Blocks world's R3 loop speaks.

Used to synthesise supervised warm-start trajectories (plan -> correct grid; flawed grid -> critique
-> edited grid; the grids themselves come from :mod:`r3_rl.blocks.synthesis`) and to check critiques.  All
texts use only :data:`r3_rl.blocks.world.WORDS`.

Edit instructions (``edit_text`` / ``parse_edit``), with "first"/"last" in raster order:
  * ``add a [colour] SHAPE``           a new object in a random empty cell (random colour if none given)
  * ``remove a [colour] SHAPE``        removes the LAST matching object (the first ``count`` objects are
                                       the ones GenEval checks, so removing from the end keeps them)
  * ``make the [colour] SHAPE COLOUR`` recolours the FIRST matching object (without a from-colour: the
                                       first one not already of the new colour)
  * ``move the SHAPE REL the SHAPE``   moves the first object of the first shape to a random empty cell
                                       where GenEval's ``REL`` holds towards the first of the second
  * ``swap the SHAPE and the SHAPE``   exchanges the first objects of the two shapes
An op that does not apply (no such object, no room) leaves the grid unchanged.

``diagnose`` writes a recolour without the from-colour ("make the triangle purple"): the prompt names the
shape and the colour it needs, so a critic writes a working instruction once it knows the colour is wrong,
without naming the wrong colour it may not read.  (Until 2026-12-04 it named it, "make the blue triangle
purple"; a critic that misread the colour then wrote an instruction that matches no object, and in the demo
most edits after RL were such no-ops: README, R3 synergy.)  The observation still names it ("the triangle is
blue not purple").

``diagnose`` mirrors GenEval's clause order (exclude overflow first, then each include clause: count,
colour, position) and only proposes ops that apply; each op provably moves a failing clause towards
satisfied, so repeatedly applying the first op converges (tested over random grids and prompts).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from r3_rl.blocks.codec import sprite_box
from r3_rl.blocks.detector import grid_detections
from r3_rl.blocks.world import (
    CELL, COLORS, INVERSE_RELATION, PLURALS, RELATIONS, SHAPES, article, number_word,
    objects, token_of,
)
from r3_rl.errors import UserError
from r3_rl.rewards.geneval_rules import RuleResult, evaluate, relative_position

STOP_TEXT = "no further edit needed"
KINDS: tuple[str, ...] = ("add", "remove", "recolor", "move", "swap")


@dataclass(frozen=True)
class EditOp:
    """One grid edit.  ``color``: the object's colour (add/remove) or the from-colour (recolor), ``None`` =
    unspecified; ``new_color``: recolor target; ``relation``/``target``: move (``target`` also for swap)."""

    kind: str
    shape: str
    color: str | None = None
    new_color: str | None = None
    relation: str | None = None
    target: str | None = None


Obj = tuple[int, int, str, str]  # (row, col, shape, colour)


# ------------------------------------------------------------------ metadata helpers
def check_metadata(metadata: dict[str, Any]) -> None:
    """Raise :class:`UserError` unless the metadata only names Blocks shapes/colours and GenEval keys."""
    for where in ("include", "exclude"):
        for i, req in enumerate(metadata.get(where, [])):
            if req.get("class") not in SHAPES:
                raise UserError(f"metadata {where}[{i}] class {req.get('class')!r} is not a Blocks shape {SHAPES}")
            if "color" in req and req["color"] not in COLORS:
                raise UserError(f"metadata {where}[{i}] color {req['color']!r} is not a Blocks colour {COLORS}")
            extra = set(req) - {"class", "count", "color", "position"}
            if extra:
                raise UserError(f"metadata {where}[{i}] has keys {sorted(extra)} the Blocks world does not support")


def judge(grid: np.ndarray, metadata: dict[str, Any], cell: int = CELL) -> RuleResult:
    """GenEval's verdict on a grid (token-level detections, identical to the pixel detector's)."""
    return evaluate(grid_detections(grid, cell), metadata)


def _noun(shape: str, n: int) -> str:
    return shape if n == 1 else PLURALS[shape]


def plan_text(metadata: dict[str, Any]) -> str:
    """``<think> one red square and one circle right of the square </think>``: the objects to draw."""
    check_metadata(metadata)
    include = metadata.get("include", [])
    exact = {(e["class"], e["count"] - 1) for e in metadata.get("exclude", [])}
    parts = []
    for req in include:
        k, s = req["count"], req["class"]
        words = ["exactly"] if (s, k) in exact else []
        words += [number_word(k)] + ([req["color"]] if "color" in req else []) + [_noun(s, k)]
        if "position" in req:
            rel, j = req["position"]
            words += [rel, "the", include[j]["class"]]
        parts.append(" ".join(words))
    return f"<think> {' and '.join(parts)} </think>"


# ------------------------------------------------------------------ edit texts
def edit_text(op: EditOp) -> str:
    obj = f"{op.color} {op.shape}" if op.color else op.shape
    if op.kind in ("add", "remove"):
        return f"{op.kind} {article(obj)} {obj}"
    if op.kind == "recolor":
        return f"make the {obj} {op.new_color}"
    if op.kind == "move":
        return f"move the {op.shape} {op.relation} the {op.target}"
    if op.kind == "swap":
        return f"swap the {op.shape} and the {op.target}"
    raise ValueError(f"unknown edit kind {op.kind!r}; valid: {KINDS}")


def _obj(toks: list[str], i: int) -> tuple[str | None, str, int] | None:
    """Parse ``[colour] SHAPE`` at ``toks[i]``."""
    color = None
    if i < len(toks) and toks[i] in COLORS:
        color, i = toks[i], i + 1
    if i < len(toks) and toks[i] in SHAPES:
        return color, toks[i], i + 1
    return None


def _rel(toks: list[str], i: int) -> tuple[str, int] | None:
    for rel in RELATIONS:
        n = len(rel.split())
        if " ".join(toks[i:i + n]) == rel:
            return rel, i + n
    return None


def parse_edit(text: str) -> EditOp | None:
    """The op an instruction names, or ``None`` (unparseable, or the stop phrase)."""
    toks = text.lower().replace(".", " ").split()
    if not toks:
        return None
    head = toks[0]
    if head in ("add", "remove") and len(toks) > 1 and toks[1] in ("a", "an"):
        o = _obj(toks, 2)
        if o and o[2] == len(toks):
            return EditOp(head, o[1], o[0])
    elif head == "make" and toks[1:2] == ["the"]:
        o = _obj(toks, 2)
        if o and o[2] == len(toks) - 1 and toks[-1] in COLORS:
            return EditOp("recolor", o[1], o[0], new_color=toks[-1])
    elif head == "move" and toks[1:2] == ["the"] and len(toks) > 2 and toks[2] in SHAPES:
        r = _rel(toks, 3)
        if r and len(toks) == r[1] + 2 and toks[r[1]] == "the" and toks[-1] in SHAPES and toks[-1] != toks[2]:
            return EditOp("move", toks[2], relation=r[0], target=toks[-1])
    elif head == "swap" and len(toks) == 6 and toks[1] == "the" and toks[3:5] == ["and", "the"]:
        if toks[2] in SHAPES and toks[5] in SHAPES and toks[2] != toks[5]:
            return EditOp("swap", toks[2], target=toks[5])
    return None


# ------------------------------------------------------------------ applying edits
def match_objects(objs: list[Obj], shape: str, color: str | None = None) -> list[Obj]:
    return [o for o in objs if o[2] == shape and (color is None or o[3] == color)]


def _holds(cell_a: tuple[int, int], shape_a: str, b: Obj, rel: str, cell: int) -> bool:
    box_a = sprite_box(cell_a[0], cell_a[1], shape_a, cell)
    return rel in relative_position(box_a, sprite_box(b[0], b[1], b[2], cell))


def move_cells(grid: np.ndarray, mover: Obj, targets: list[Obj], rel: str, cell: int) -> list[tuple[int, int]]:
    """Empty cells (or the mover's own) from which ``mover`` stands in ``rel`` to every target."""
    free = [(int(r), int(c)) for r, c in zip(*np.nonzero(grid == 0))] + [(mover[0], mover[1])]
    return [p for p in free if all(_holds(p, mover[2], t, rel, cell) for t in targets)]


def _can_move(grid: np.ndarray, mover: Obj, targets: list[Obj], rel: str, cell: int) -> bool:
    """A free cell, not the mover's own, from which ``mover`` would stand in ``rel`` to every target."""
    return any(p != (mover[0], mover[1]) for p in move_cells(grid, mover, targets, rel, cell))


def apply_edit(grid: np.ndarray, op: EditOp, rng: np.random.Generator, cell: int = CELL) -> np.ndarray:
    """A new grid with ``op`` applied (unchanged copy when the op does not apply)."""
    out = np.array(grid, dtype=np.int64, copy=True)
    objs = objects(out)
    if op.kind == "add":
        free = np.argwhere(out == 0)
        if len(free):
            r, c = free[int(rng.integers(len(free)))]
            out[r, c] = token_of(op.shape, op.color or COLORS[int(rng.integers(len(COLORS)))])
    elif op.kind == "remove":
        hits = match_objects(objs, op.shape, op.color)
        if hits:
            out[hits[-1][0], hits[-1][1]] = 0
    elif op.kind == "recolor":
        hits = [o for o in match_objects(objs, op.shape, op.color) if o[3] != op.new_color]
        if hits and op.new_color in COLORS:
            out[hits[0][0], hits[0][1]] = token_of(op.shape, op.new_color)
    elif op.kind in ("move", "swap"):
        a, b = match_objects(objs, op.shape), match_objects(objs, op.target or "")
        if a and b and op.kind == "swap":
            out[a[0][0], a[0][1]], out[b[0][0], b[0][1]] = out[b[0][0], b[0][1]], out[a[0][0], a[0][1]]
        elif a and b and op.relation in RELATIONS:
            cells = move_cells(out, a[0], b[:1], op.relation, cell)
            if cells:
                r, c = cells[int(rng.integers(len(cells)))]
                tok = out[a[0][0], a[0][1]]
                out[a[0][0], a[0][1]] = 0
                out[r, c] = tok
    else:
        raise ValueError(f"unknown edit kind {op.kind!r}; valid: {KINDS}")
    return out


# ------------------------------------------------------------------ diagnosis
def _clutter(objs: list[Obj], include: list[dict]) -> Obj | None:
    """The last object GenEval does not look at (beyond the first ``count`` of an included class)."""
    need = {}
    for req in include:
        need[req["class"]] = max(need.get(req["class"], 0), req["count"])
    seen: dict[str, int] = {}
    free = None
    for o in objs:
        seen[o[2]] = seen.get(o[2], 0) + 1
        if seen[o[2]] > need.get(o[2], 0):
            free = o
    return free


def _notes(grid: np.ndarray, metadata: dict[str, Any], cell: int) -> list[tuple[EditOp, str]]:
    """(op, observation) per failing clause; ops are checked to apply."""
    check_metadata(metadata)
    if judge(grid, metadata, cell).correct:
        return []
    objs = objects(grid)
    include, exclude = metadata.get("include", []), metadata.get("exclude", [])
    n_free = int((np.asarray(grid) == 0).sum())
    clutter = _clutter(objs, include)
    full_note = (EditOp("remove", clutter[2], clutter[3]), "the grid is too full") if clutter else None
    out: list[tuple[EditOp, str]] = []
    for ex in exclude:
        s, n = ex["class"], len(match_objects(objs, ex["class"]))
        if n >= ex["count"]:
            out.append((EditOp("remove", s), f"the image has {number_word(n)} {_noun(s, n)} but needs {number_word(ex['count'] - 1)}"))
    firsts: list[list[Obj] | None] = []
    for req in include:
        s, k, col = req["class"], req["count"], req.get("color")
        have = match_objects(objs, s)
        firsts.append(None)
        if len(have) < k:
            note = f"the image has {number_word(len(have))} {_noun(s, len(have))} but needs {number_word(k)}"
            out.append((EditOp("add", s, col), note) if n_free else full_note)  # type: ignore[arg-type]
            continue
        first = have[:k]
        wrong = [o for o in first if col is not None and o[3] != col]
        if wrong:
            out.append((EditOp("recolor", s, None, new_color=col), f"the {s} is {wrong[0][3]} not {col}"))
            continue
        if "position" in req:
            rel, j = req["position"]
            targets = firsts[j]
            if targets is None:
                continue  # the target clause already produced an op
            bad = [a for a in first if not all(_holds((a[0], a[1]), s, t, rel, cell) for t in targets)]
            if bad:
                out.append(_position_fix(grid, objs, req, include[j], bad[0], targets, full_note, cell))
                continue
        firsts[-1] = first
    out = [x for x in out if x is not None]
    if not out:
        raise RuntimeError(f"diagnose found no fix for an incorrect grid {np.asarray(grid).tolist()} / {metadata}")
    return out


def _position_fix(grid: np.ndarray, objs: list[Obj], req: dict, treq: dict, a: Obj, targets: list[Obj],
                  full_note: tuple[EditOp, str] | None, cell: int) -> tuple[EditOp, str] | None:
    s, t, rel = req["class"], treq["class"], req["position"][0]
    note = f"the {s} is not {rel} the {t}"
    for cls, k in ((s, req["count"]), (t, treq["count"])):
        n = len(match_objects(objs, cls))
        if n > k:  # extras make "the first" ambiguous after a move: remove them first
            return EditOp("remove", cls), f"the image has {number_word(n)} {_noun(cls, n)} but needs {number_word(k)}"
    if _can_move(grid, a, targets, rel, cell):
        return EditOp("move", s, relation=rel, target=t), note
    b = targets[0]
    inv = INVERSE_RELATION[rel]
    if len(targets) == 1 and _can_move(grid, b, [a], inv, cell):
        return EditOp("move", t, relation=inv, target=s), note
    if len(targets) == 1:
        # swapping fixes it, or (objects stuck at opposite edges of a long grid) makes a move possible
        a2, b2 = (b[0], b[1], s, a[3]), (a[0], a[1], t, b[3])
        swapped = np.array(grid, copy=True)
        swapped[a[0], a[1]], swapped[b[0], b[1]] = grid[b[0], b[1]], grid[a[0], a[1]]
        if (_holds((a2[0], a2[1]), s, b2, rel, cell) or _can_move(swapped, a2, [b2], rel, cell)
                or _can_move(swapped, b2, [a2], inv, cell)):
            return EditOp("swap", s, target=t), note
    if len(targets) > 1 and full_note is None:
        # a move or swap names one target; against several (a custom prompt's "left of two squares") no cell
        # may do: take the object out, and the next round's "add" draws it again (it raised "found no fix")
        return EditOp("remove", s), note
    return full_note


def diagnose(grid: np.ndarray, metadata: dict[str, Any], cell: int = CELL) -> list[EditOp]:
    """Edits that fix the grid, one per failing clause (``[]`` = GenEval judges it correct)."""
    return [op for op, _ in _notes(grid, metadata, cell)]


def critique_text(grid: np.ndarray, metadata: dict[str, Any], cell: int = CELL) -> str:
    """``<think> observation </think> instruction`` for the first fix, or the stop phrase."""
    notes = _notes(grid, metadata, cell)
    if not notes:
        return f"<think> the image matches the prompt </think> {STOP_TEXT}"
    op, note = notes[0]
    return f"<think> {note} </think> {edit_text(op)}"
