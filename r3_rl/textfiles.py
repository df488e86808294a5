"""Reading files a user hands us (recipes, prompt sets): one-line errors naming the file and line, and size caps.

A hostile or broken file must not become a traceback, a hang or a memory blow-up: a FIFO or a directory is
refused before anything is read from it (checked on the open descriptor, opened without blocking), bytes that
are not UTF-8 are reported as ``file:line``, and YAML aliases (which let 1.5 KB expand to hundreds of MB:
"billion laughs") are limited by the size of the expanded document.  Trajectory dumps (images included) and a
user's reference images are opened the same way (:func:`open_if_regular`).
"""
from __future__ import annotations

import functools
import gzip
import os
import stat
import zlib
from pathlib import Path
from typing import Any, BinaryIO, Iterator

from r3_rl.errors import UserError

MAX_RECIPE_BYTES = 1 << 20  # a recipe is a page of YAML; 1 MiB is far beyond any real one
MAX_RECIPE_NODES = 100_000  # keys + values after expanding YAML aliases


class NotRegularFile(ValueError):
    """A path that names a FIFO, a device or a directory: reading it could block forever or mean nothing."""


def open_if_regular(path: str | Path) -> BinaryIO:
    """``open(path, "rb")``, refusing (:class:`NotRegularFile`) anything but a regular file.

    The file is opened without blocking and checked on the open descriptor, so a FIFO is refused instead of
    hanging the reader, and a file swapped for a FIFO between a check and the open is caught too.  Missing or
    unreadable files raise the ``OSError`` that ``open`` would."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0))
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise NotRegularFile(f"{path} is not a regular file")
        if hasattr(os, "set_blocking"):
            os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def open_regular(path: str | Path, what: str = "file") -> Any:
    """``open(path, "rb")`` for a regular file, or a one-line :class:`UserError` (missing, FIFO, directory, denied)."""
    p = Path(path)
    if not p.exists():
        raise UserError(f"{p}: {what} not found")
    try:
        return open_if_regular(p)
    except NotRegularFile:
        raise UserError(f"{p}: {what} is not a regular file") from None
    except OSError as e:
        raise UserError(f"{p}: cannot read {what} ({e.strerror or e})") from None


def utf8_lines(path: str | Path, what: str = "file", max_bytes: int | None = None) -> Iterator[tuple[int, str]]:
    """``(line number, text)`` of a UTF-8 file (gzip-compressed when its name ends in ``.gz``); a bad byte is
    ``file:line: not valid UTF-8 (...)``.  ``max_bytes`` caps what is read -- for a ``.gz`` file what it
    decompresses to, whose size on disk says nothing (1000x for a gzip bomb) -- and no line is read past it."""
    gz = str(path).endswith(".gz")
    with open_regular(path, what) as raw_fh, (gzip.GzipFile(fileobj=raw_fh) if gz else raw_fh) as fh:
        lineno, left = 0, max_bytes
        while True:
            try:
                raw = fh.readline(-1 if left is None else left + 1)
            except (gzip.BadGzipFile, EOFError, zlib.error) as e:  # a bad header, a short file, a damaged block
                raise UserError(f"{path}: not a valid gzip file ({e})") from None
            if not raw:
                break
            lineno += 1
            if left is not None:
                left -= len(raw)
                if left < 0:
                    raise UserError(f"{path}: {what} is over the limit of {max_bytes} bytes"
                                    f"{' once decompressed' if gz else ''}")
            try:
                yield lineno, raw.decode("utf-8")
            except UnicodeDecodeError as e:
                column = len(raw[:e.start].decode("utf-8")) + 1  # in characters, as an editor counts them
                raise UserError(f"{path}:{lineno}: not valid UTF-8 (byte 0x{raw[e.start]:02x} at column "
                                f"{column}); save the file as UTF-8") from None


def read_utf8(path: str | Path, what: str = "file", max_bytes: int | None = None) -> str:
    p = Path(path)
    if max_bytes is not None and p.is_file() and p.stat().st_size > max_bytes:  # the usual case, named exactly
        raise UserError(f"{p}: {what} is {p.stat().st_size} bytes, over the limit of {max_bytes}")
    return "".join(line for _, line in utf8_lines(p, what, max_bytes))


def expanded_size(obj: Any, limit: int) -> int:
    """Nodes of ``obj`` counting every alias expansion (shared and self-referencing ones too), up to ``limit + 1``."""
    count, stack = 0, [obj]
    while stack and count <= limit:
        x = stack.pop()
        count += 1
        if isinstance(x, dict):
            stack.extend(x.keys())
            stack.extend(x.values())
        elif isinstance(x, (list, tuple)):
            stack.extend(x)
    return count


def check_expanded_size(data: Any, source: str) -> None:
    if expanded_size(data, MAX_RECIPE_NODES) > MAX_RECIPE_NODES:
        raise UserError(f"{source}: the recipe expands to more than {MAX_RECIPE_NODES} values (YAML aliases?); "
                        f"write it out without '*alias' chains")


@functools.lru_cache(maxsize=1)
def _unique_key_loader() -> Any:
    """A ``yaml.SafeLoader`` that refuses a key given twice in one mapping (PyYAML keeps the last silently, so
    ``lr: 1.0e-4`` followed later by ``lr: 5.0`` trained at 5.0).  ``<<`` merge keys still override."""
    import yaml

    class UniqueKeyLoader(yaml.SafeLoader):
        def construct_mapping(self, node: Any, deep: bool = False) -> Any:
            if isinstance(node, yaml.MappingNode):
                seen: dict[Any, Any] = {}
                for key_node, _ in node.value:
                    if key_node.tag == "tag:yaml.org,2002:merge":
                        continue
                    key = self.construct_object(key_node, deep=True)
                    try:
                        first = seen.setdefault(key, key_node)
                    except TypeError:  # an unhashable key: the base constructor reports it
                        continue
                    if first is not key_node:
                        raise yaml.constructor.ConstructorError(
                            None, None, f"duplicate key {key!r}, first given on line {first.start_mark.line + 1}",
                            key_node.start_mark)
            return super().construct_mapping(node, deep=deep)

    return UniqueKeyLoader


def yaml_load_unique(text: str) -> Any:
    """``yaml.safe_load`` that raises ``yaml.YAMLError`` on a duplicate key (see :func:`_unique_key_loader`)."""
    import yaml

    return yaml.load(text, Loader=_unique_key_loader())  # noqa: S506 - a SafeLoader subclass


def read_recipe_yaml(path: str | Path) -> dict[str, Any]:
    """A recipe file -> its mapping; empty, non-UTF-8, unreadable, oversized or alias-bombed files are errors."""
    import yaml

    p = Path(path)
    if not p.is_file():
        raise UserError(f"{p}: recipe file not found" if not p.exists() else f"{p}: recipe is not a regular file")
    text = read_utf8(p, "recipe", MAX_RECIPE_BYTES)
    try:
        data = yaml_load_unique(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f":{mark.line + 1}" if mark is not None else ""
        problem = (str(getattr(e, "problem", None) or e).splitlines() or [""])[0]  # one line, whatever PyYAML says
        raise UserError(f"{p}{where}: not valid YAML ({problem})") from None
    except RecursionError:
        raise UserError(f"{p}: YAML nested too deeply") from None
    if data is None or data == {}:
        raise UserError(f"{p}: recipe is empty; start from recipes/tiny_blocks.yaml (an empty recipe would "
                        f"train on defaults)")
    if not isinstance(data, dict):
        raise UserError(f"{p}: a recipe must be a mapping of sections, got {type(data).__name__}")
    check_expanded_size(data, str(p))
    return data
