"""Strict key/shape check of a weight file against a model, with a one-line error naming the first bad key, and
the opening of a weight file that refuses a damaged one in one line.

Runs on shapes only (from a safetensors header), so a wrong file is refused before any weight is read.
"""
from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

from r3_rl.errors import UserError


@contextmanager
def opened_safetensors(path: str | Path, **kwargs: Any) -> Iterator[Any]:
    """``safe_open(path, framework="pt", **kwargs)``; a file safetensors cannot read (cut short by a copy, not a
    safetensors file at all) is a one-line :class:`UserError` naming it, not a bare ``SafetensorError`` traceback
    saying "Error while deserializing header"."""
    from safetensors import SafetensorError, safe_open

    try:
        handle = safe_open(str(path), framework="pt", **kwargs)
    except SafetensorError as e:
        raise UserError(f"{path}: not a readable safetensors file ({e}); copy it again from the published "
                        f"checkpoint") from None
    with handle as f:
        yield f


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
