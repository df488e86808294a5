"""Grids for training and testing the Blocks world's R3 loop: a random grid GenEval judges correct, and its
one-mistake variants (a missing, extra, recoloured, reshaped or misplaced object).

The warm start draws its supervised trajectories from these (a correct grid after a plan; a flawed one before a
critique), and the fixed reference set of understanding evals draws its correct and flawed images from them.
The edit language these variants are written in (and :func:`~r3_rl.blocks.edits.apply_edit`, which makes the
swap and extra-object variants) lives in :mod:`r3_rl.blocks.edits`.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from r3_rl.blocks.edits import EditOp, Obj, apply_edit, check_metadata, judge, match_objects, move_cells
from r3_rl.blocks.world import CELL, COLS, COLORS, ROWS, SHAPES, object_of, objects, token_of
from r3_rl.errors import UserError


def random_correct_grid(metadata: dict[str, Any], rng: np.random.Generator, rows: int = ROWS, cols: int = COLS,
                        *, distractors: int = 0, cell: int = CELL) -> np.ndarray:
    """A random grid GenEval judges correct: exactly the requested objects (random colours where none
    is asked), positions satisfying GenEval's margin rule, plus up to ``distractors`` objects of shapes
    the prompt does not mention."""
    check_metadata(metadata)
    include = metadata.get("include", [])
    mentioned = {r["class"] for r in include} | {r["class"] for r in metadata.get("exclude", [])}
    others = [s for s in SHAPES if s not in mentioned]
    if sum(r["count"] for r in include) > rows * cols:
        raise UserError(f"prompt {metadata.get('prompt')!r} needs more objects than a {rows}x{cols} grid holds")
    for _ in range(200):
        grid = np.zeros((rows, cols), dtype=np.int64)
        placed: list[list[Obj]] = []
        ok = True
        for req in include:
            group = []
            for _k in range(req["count"]):
                color = req.get("color") or COLORS[int(rng.integers(len(COLORS)))]
                probe: Obj = (0, 0, req["class"], color)
                if "position" in req:
                    rel, j = req["position"]
                    free = list(dict.fromkeys(p for p in move_cells(grid, probe, placed[j], rel, cell) if grid[p] == 0))
                else:
                    free = [tuple(p) for p in np.argwhere(grid == 0)]
                if not free:
                    ok = False
                    break
                r, c = free[int(rng.integers(len(free)))]
                grid[r, c] = token_of(req["class"], color)
                group.append((int(r), int(c), req["class"], color))
            if not ok:
                break
            placed.append(group)
        if not ok:
            continue
        for _d in range(distractors if others else 0):
            free = np.argwhere(grid == 0)
            if len(free):
                r, c = free[int(rng.integers(len(free)))]
                grid[r, c] = token_of(others[int(rng.integers(len(others)))], COLORS[int(rng.integers(len(COLORS)))])
        if judge(grid, metadata, cell).correct:
            return grid
    raise UserError(f"cannot place prompt {metadata.get('prompt')!r} correctly in a {rows}x{cols} grid")


def _mutations(grid: np.ndarray, metadata: dict[str, Any], rng: np.random.Generator, cell: int) -> list[np.ndarray]:
    """One candidate per plausible mistake kind (missing, extra, colour, shape, position)."""
    objs = objects(grid)
    include = metadata.get("include", [])
    cands = []
    for req in include:
        s, k = req["class"], req["count"]
        have = match_objects(objs, s)
        g = grid.copy()
        for o in have[k - 1:]:  # missing object: one fewer than asked
            g[o[0], o[1]] = 0
        cands.append(g)
        if have:
            o = have[int(rng.integers(min(k, len(have))))]
            shape, color = object_of(grid[o[0], o[1]])  # type: ignore[misc]
            g = grid.copy()  # wrong colour
            g[o[0], o[1]] = token_of(shape, [c for c in COLORS if c != color][int(rng.integers(len(COLORS) - 1))])
            cands.append(g)
            g = grid.copy()  # wrong shape
            g[o[0], o[1]] = token_of([x for x in SHAPES if x != shape][int(rng.integers(len(SHAPES) - 1))], color)
            cands.append(g)
        if "position" in req and have:
            a, t = have[0], include[req["position"][1]]["class"]
            g = apply_edit(grid, EditOp("swap", s, target=t), rng, cell)
            cands.append(g)
            free = [tuple(p) for p in np.argwhere(grid == 0)]
            if free:
                g = grid.copy()
                r, c = free[int(rng.integers(len(free)))]
                g[r, c], g[a[0], a[1]] = g[a[0], a[1]], 0
                cands.append(g)
    for ex in metadata.get("exclude", []):  # extra object
        g = grid.copy()
        while len(match_objects(objects(g), ex["class"])) < ex["count"] and (g == 0).any():
            g = apply_edit(g, EditOp("add", ex["class"]), rng, cell)
        cands.append(g)
    return cands


def flaw_candidates(grid: np.ndarray, metadata: dict[str, Any], rng: np.random.Generator,
                    cell: int = CELL) -> list[np.ndarray]:
    """Every one-mistake variant of ``grid`` (the kinds :func:`perturb` draws from) that is judged incorrect."""
    check_metadata(metadata)
    cands = _mutations(np.array(grid, dtype=np.int64, copy=True), metadata, rng, cell)
    return [g for g in cands if not judge(g, metadata, cell).correct]


def perturb(grid: np.ndarray, metadata: dict[str, Any], rng: np.random.Generator, cell: int = CELL) -> np.ndarray:
    """A flawed variant of ``grid`` with one plausible mistake, always judged incorrect."""
    check_metadata(metadata)
    grid = np.array(grid, dtype=np.int64, copy=True)
    cands = _mutations(grid, metadata, rng, cell)
    for i in rng.permutation(len(cands)):
        if not judge(cands[i], metadata, cell).correct:
            return cands[i]
    raise UserError(f"cannot make a flawed variant for prompt {metadata.get('prompt')!r} (no include/exclude?)")
