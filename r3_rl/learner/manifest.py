"""A checkpoint's file list (``checkpoint.json``'s ``files``): every file's size, and the SHA-256 of each up to
``HASH_MAX_BYTES`` (state files, configs, a small model; a 7B model's shards by size only: hashing them would
add minutes to every save), written at save and checked before a resume loads anything."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from r3_rl.errors import UserError

HASH_MAX_BYTES = 256 << 20  # files up to this size get a SHA-256 in checkpoint.json; all get their size


def _sha256(path: Path) -> str:
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def file_sizes(folder: Path) -> dict[str, int]:
    """``{relative path: bytes}`` of every file under ``folder``, in path order."""
    return {f.relative_to(folder).as_posix(): f.stat().st_size
            for f in sorted(p for p in folder.rglob("*") if p.is_file())}


def file_manifest(folder: Path) -> dict[str, dict[str, Any]]:
    """``{relative path: {"bytes", "sha256"}}`` of every file under ``folder`` (no hash past HASH_MAX_BYTES)."""
    return {rel: {"bytes": size, "sha256": _sha256(folder / rel) if size <= HASH_MAX_BYTES else None}
            for rel, size in file_sizes(folder).items()}


def sync_tree(folder: Path) -> None:
    """Flush every file and folder under ``folder`` (and ``folder`` itself) to disk.

    Written data sits in the page cache until the kernel flushes it; a checkpoint renamed into place before that
    -- and the older one pruned -- is lost whole if the node loses power, while ``checkpoint.json`` says it is
    complete.  torch.distributed.checkpoint fsyncs its files for the same reason (``sync_files``)."""
    inside = sorted(folder.rglob("*"))
    for p in inside:
        if p.is_file() and not p.is_symlink():
            sync_path(p)
    for d in sorted((p for p in inside if p.is_dir()), key=lambda d: -len(d.parts)):  # deepest first
        sync_path(d)
    sync_path(folder)


def sync_path(path: Path) -> None:
    """fsync one file or folder (a folder's fsync makes the names in it -- a rename, a new file -- durable)."""
    import os

    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def verify_files(path: Path, meta: dict[str, Any]) -> None:
    """Every file ``checkpoint.json`` lists is there, a regular file, of its size and hash; one line if not."""
    files = meta.get("files")
    if files is None:
        return  # written before the list
    damaged = "the checkpoint is damaged; resume from an earlier one (--resume PATH) or delete this one"
    for rel, want in files.items():
        f = path / rel
        if ".." in Path(rel).parts or Path(rel).is_absolute() or not isinstance(want, dict):
            raise UserError(f"{path / 'checkpoint.json'}: bad entry {str(rel)[:80]!r} in 'files'; {damaged}")
        linked = next((path / p for p in [*reversed(Path(rel).parents), Path(rel)] if (path / p).is_symlink()), None)
        if linked is not None or not f.is_file():  # a linked folder reads files from outside the checkpoint too
            raise UserError(f"{linked or f}: {'a symbolic link' if linked else 'missing'}; {damaged}")
        size = f.stat().st_size
        if size != want.get("bytes"):
            raise UserError(f"{f}: {size} bytes, {want.get('bytes')} when saved; {damaged}")
        if want.get("sha256") is not None and _sha256(f) != want["sha256"]:
            raise UserError(f"{f}: contents changed since it was saved (SHA-256 differs); {damaged}")
