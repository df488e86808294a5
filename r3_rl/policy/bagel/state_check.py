"""Strict key/shape check of a weight file against a model, with a one-line error naming the first bad key.

Runs on shapes only (from a safetensors header), so a wrong file is refused before any weight is read.
"""
from __future__ import annotations

from typing import Callable, Mapping

from r3_rl.errors import UserError


def check_state_keys(expected: Mapping[str, tuple[int, ...]], found: Mapping[str, tuple[int, ...]], where: str,
                     rename: Callable[[str], str] = lambda k: k) -> None:
    """Raise :class:`UserError` for the first key (in the model's order) that is missing or has the wrong shape,
    else for the first key of the file the model does not have.  ``rename`` maps a model key to the file's name."""
    for key, shape in expected.items():
        if key not in found:
            raise UserError(f"{where}: key '{rename(key)}' missing (expected shape {list(shape)}; "
                            f"{len(found)} keys in the file, the model has {len(expected)})")
        if tuple(found[key]) != tuple(shape):
            raise UserError(f"{where}: key '{rename(key)}' has shape {list(found[key])}, the model expects "
                            f"{list(shape)}")
    for key in found:
        if key not in expected:
            raise UserError(f"{where}: unexpected key '{rename(key)}' (not a BAGEL weight; "
                            f"the model has {len(expected)} keys)")
