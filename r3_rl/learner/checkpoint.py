"""Checkpoints for exact resume: ``<run_dir>/checkpoints/step_NNNNNN/``.

Layout of one checkpoint::

    model/                     policy weights (safetensors) + config + tokenizer: loadable by from_pretrained
                               (LoRA: merged weights; the unmerged adapters are in state/policy.safetensors)
    state/trainer.pt           step, policy version, RNG states (trainer, python, numpy, torch), data-sampler
                               position, reward-failure counts
    state/buffer.safetensors   the Tree-RL parent buffer (image token ids / PNG bytes + JSON metadata)
    state/learner/             optimiser + LR schedule (torch: optimizer.pt; DeepSpeed: its own checkpoint),
                               learner counters, critic weights (PPO)
    state/reference.safetensors  the frozen KL reference (absent with LoRA: it is the base model)
    checkpoint.json            written last: {"step", "policy_version", "complete": true, "files", ...}

Frozen weights (LoRA's base) are in ``model/`` only, merged: the state keeps what trains and a fingerprint of
the rest, which a resume loads from ``policy.model`` again and checks (:mod:`r3_rl.learner.frozen`).

Each component writes and reads its own part (:class:`CheckpointParts`): the learner exports the policy and
saves its optimiser state (and, under DeepSpeed, the trained weights), the run loop hands over its
``state_dict()``; nothing here reaches into a component.

Every ``.pt`` here is read with ``torch.load(weights_only=True)`` (:mod:`r3_rl.learner.safe_load`): a
checkpoint cannot run code on ``--resume``.  Format 2 keeps the numpy RNG state as plain lists; format 1
(numpy arrays) still loads.

Integrity: ``checkpoint.json`` lists every file with its size, and the SHA-256 of each file up to
``HASH_MAX_BYTES`` (the state files, configs, the tiny model; a 7B model's shards are checked by size only, as
hashing them would add minutes to every save).  ``--resume`` checks the list before anything is loaded, so a
missing buffer, a truncated shard or an edited ``trainer.pt`` is one line naming the file, not a run that
continues from a state nobody saved.  Checkpoints written before the list (no ``files``) load unchecked.

Atomicity: everything is written into ``checkpoints/.tmp-step_NNNNNN-<pid>/`` and renamed into place only
once complete, so a crash half-way leaves a ``.tmp-*`` folder that ``--resume auto`` never looks at
(and the next save removes).  A crash in the middle of re-saving a step (renaming the old copy aside, then the
new one into place) leaves the old copy as ``.old-step_NNNNNN-<pid>``: ``--resume`` renames it back
(:mod:`r3_rl.learner.checkpoint_find`).  A ``step_*`` folder without ``checkpoint.json`` is ignored too.  Every
file and folder is fsync'd before the rename (and the parent after it), so a power loss cannot leave a checkpoint named
complete whose data never reached the disk, with the older ones already pruned.  Only the last ``keep_last``
complete checkpoints are kept.
"""
from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Protocol

import torch
from safetensors.torch import load_file, load_model, save_model

from r3_rl.errors import UserError, raised
from r3_rl.learner.checkpoint_find import (  # noqa: F401 (re-exported: callers find and load through this module)
    CKPT_DIR, MARKER, OLD_RE, STEP_RE, _meta, checkpoints_before, complete_checkpoints, find_resume,
    latest_checkpoint, restore_interrupted_swap, set_aside_later)
from r3_rl.learner.manifest import file_manifest, sync_path, sync_tree, verify_files
from r3_rl.learner.safe_load import safe_torch_load, scan_checkpoint

# 3: the parent buffer in state/buffer.safetensors (1-2: pixel lists in trainer.pt); 2: no numpy objects in
# trainer.pt (1 stored the numpy RNG state as an array).  Older formats still load.
FORMAT = 3


# ---------------------------------------------------------------------------------------------- parts
class Stateful(Protocol):
    def state_dict(self) -> dict[str, Any]:
        ...

    def load_state_dict(self, state: dict[str, Any]) -> None:
        ...


@dataclass
class CheckpointParts:
    """The components a checkpoint holds, each saving and loading its own state.

    ``learner``: ``export(folder)`` (a ``from_pretrained`` folder), ``save(dir)`` / ``load(dir)``, and two facts:
    ``saves_weights`` (its own files hold the trained weights: DeepSpeed) and ``adapters`` (LoRA: the export is
    merged, so the unmerged weights are kept beside it).  ``reference``: the frozen KL copy or ``None``.
    ``loop``: the run loop's own state (step, RNGs, sampler, failure counts).  ``buffer``: the Tree-RL parent
    buffer, ``save(file)`` / ``load(file)`` of its own safetensors file (formats 1-2 kept it in the loop's
    state, which the loop still reads).
    """

    policy: Any
    reference: Any
    learner: Any
    loop: Stateful
    buffer: Any = None
    # a file that holds exactly ``reference``'s weights (the last checkpoint this process wrote or resumed from):
    # the frozen reference never changes within a run, so a save hard-links it instead of writing it again
    reference_file: Path | None = None


def load_exported(model: torch.nn.Module, folder: Path, files: list[Path] | None = None) -> None:
    """Load ``save_pretrained`` safetensors (any number of shards; ``files``: the policy's
    :meth:`~r3_rl.policy.base.Policy.exported_weight_files`, default every one in ``folder``) into ``model``,
    exactly, one file at a time (a 7B model's shards never sit in host memory together).

    Keys missing from the files are accepted only when they are tied to a loaded tensor (``lm_head``
    tied to the embeddings is saved once); anything else missing or unexpected is an error.
    """
    files = sorted(folder.glob("*.safetensors")) if files is None else files
    if not files:
        raise UserError(f"{folder}: no .safetensors weights")
    own = model.state_dict()
    seen: set[str] = set()
    unexpected: list[str] = []
    for f in files:
        shard = load_file(str(f))
        unexpected += [k for k in shard if k not in own]
        model.load_state_dict({k: v for k, v in shard.items() if k in own}, strict=False)
        seen.update(shard)
        del shard
    loaded = {own[k].data_ptr() for k in seen if k in own}
    bad = [k for k in own if k not in seen and own[k].data_ptr() not in loaded]
    if bad or unexpected:
        raise UserError(f"{folder}: weights do not match the policy (missing {bad[:3]}, unexpected "
                        f"{unexpected[:3]})")


# ---------------------------------------------------------------------------------------------- save
def _check_meta(meta: dict[str, Any], path: Path) -> None:
    """The fields of ``checkpoint.json`` that resuming reads have their types (a hand-edited file is one line)."""
    step = meta.get("step", 0)
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise UserError(f"{path / MARKER}: 'step' must be a whole number >= 0, got {str(step)[:40]!r}")
    for key in ("structure", "files"):
        if key in meta and not isinstance(meta[key], dict):
            raise UserError(f"{path / MARKER}: {key!r} must be a mapping, got {type(meta[key]).__name__}")


def _clean_partials(root: Path, keep: Path | None = None) -> None:
    for p in root.iterdir():
        if p.is_dir() and p.name.startswith((".tmp-", ".old-")) and p != keep:
            shutil.rmtree(p, ignore_errors=True)


def _save_reference(parts: CheckpointParts, dest: Path) -> None:
    """The frozen KL reference: a hard link to ``parts.reference_file`` when there is one (no bytes written -- a
    policy-sized file, 29 GB for BAGEL, at every save -- and pruning the older checkpoint keeps the data), else
    written; a filesystem without hard links falls back to writing."""
    if parts.reference_file is not None and parts.reference_file.is_file():
        try:
            os.link(parts.reference_file, dest)
            return
        except OSError:
            pass
    save_model(parts.reference.model, str(dest))


def save_checkpoint(run_dir: Path, step: int, keep_last: int, parts: CheckpointParts, recipe: Any) -> Path:
    """Write every part's state after ``step`` completed steps; returns the checkpoint folder."""
    root = Path(run_dir) / CKPT_DIR
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step_{step:06d}"
    tmp = root / f".tmp-{final.name}-{os.getpid()}"
    _clean_partials(root)
    tmp.mkdir()
    learner = parts.learner
    learner.export(tmp / "model")
    state = tmp / "state"
    state.mkdir()
    if learner.adapters is not None and not learner.saves_weights:  # the export is merged: keep the adapters
        learner.adapters.save(state / "policy.safetensors")
    if parts.reference is not None:
        _save_reference(parts, state / "reference.safetensors")
    learner.save(state / "learner")
    torch.save(parts.loop.state_dict(), state / "trainer.pt")
    if parts.buffer is not None:
        parts.buffer.save(state / "buffer.safetensors")
    meta = {"complete": True, "format": FORMAT, "step": step, "policy_version": parts.policy.version,
            "time": time.strftime("%Y-%m-%dT%H:%M:%S"), "recipe": recipe.name, "structure": structure(recipe),
            "files": file_manifest(tmp)}
    (tmp / MARKER).write_text(json.dumps(meta, indent=2))
    sync_tree(tmp)  # on disk before it is named complete and older checkpoints are pruned
    if final.exists():  # re-saving a step (e.g. a finished run resumed): swap, never leave a gap
        old = root / f".old-{final.name}-{os.getpid()}"
        final.rename(old)
        tmp.rename(final)
        sync_path(root)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(final)
        sync_path(root)
    prune(root, keep_last)
    return final


def prune(root: Path, keep_last: int) -> None:
    """Delete all but the newest ``keep_last`` complete checkpoints (incomplete ones are not counted)."""
    for stale in complete_checkpoints(root)[:-keep_last] if keep_last > 0 else []:
        shutil.rmtree(stale, ignore_errors=True)


# ---------------------------------------------------------------------------------------------- load
# Recipe keys that shape the saved state: resuming with a different value cannot restore it exactly.
# ``seed`` draws every step's tasks and ``tree.buffer_size`` is the saved buffer's capacity: a resume with
# another value would not continue the run it names (hyperparameters such as the learning rate may change).
STRUCTURAL = ("policy.kind", "policy.options", "policy.model", "policy.tiny", "data.blocks", "learner.algorithm",
              "learner.backend", "learner.lora", "learner.ppo.critic", "learner.ppo.critic_lr",
              "learner.deepspeed.zero_stage", "learner.deepspeed.dtype", "learner.ranks", "seed", "tree.buffer_size")


def structure(recipe: Any) -> dict[str, Any]:
    dump = recipe.model_dump(mode="json")
    out = {}
    for key in STRUCTURAL:
        value: Any = dump
        for part in key.split("."):
            value = value.get(part) if isinstance(value, dict) else None
        out[key] = value
    return out


def check_compatible(meta: dict[str, Any], recipe: Any, path: Path) -> None:
    """One-line errors for a checkpoint the recipe cannot continue (before anything is loaded)."""
    if meta.get("step", 0) > recipe.steps:
        raise UserError(f"{path}: checkpoint is at step {meta['step']} but the recipe has steps={recipe.steps}; "
                        f"raise steps to continue training")
    now = structure(recipe)
    for key, saved in (meta.get("structure") or {}).items():
        if key in now and now[key] != saved:
            raise UserError(f"{path}: recipe key '{key}' is {now[key]!r} but the checkpoint was written with "
                            f"{saved!r}; resume with the same value")


def newest_sound(latest: Path, recipe: Any, warn: Callable[[str], None]) -> tuple[Path, dict[str, Any]]:
    """``--resume auto``: the newest complete checkpoint up to ``latest`` that passes :func:`check_resumable`, and
    its metadata.  A damaged one (a file truncated by a crash before the disk flushed it, a changed hash) is
    reported through ``warn`` and the one before it tried; a recipe that does not fit is not damage: it stops."""
    earlier = checkpoints_before(latest)
    for path, before in zip([latest, *earlier], [*earlier, None]):
        meta = _meta(path) or {}
        if isinstance(meta.get("structure", {}), dict) and isinstance(meta.get("step"), int):
            check_compatible(meta, recipe, path)
        try:
            return path, check_resumable(path, recipe)
        except UserError as e:
            if before is None:
                raise
            warn(f"--resume auto: {e}; trying {before.name}")
    raise AssertionError("the loop returns or raises")


def check_resumable(path: Path, recipe: Any) -> dict[str, Any]:
    """The checks :func:`load_checkpoint` starts with, cheap enough to run before the trainer is built."""
    meta = _meta(Path(path))
    if meta is None:
        raise UserError(f"{path}: not a complete checkpoint (no {MARKER} with complete: true)")
    _check_meta(meta, Path(path))
    check_compatible(meta, recipe, Path(path))
    scan_checkpoint(path)  # one line for a planted pickle, before anything is loaded
    verify_files(Path(path), meta)
    _check_state_files(Path(path), meta)
    return meta


def _check_state_files(path: Path, meta: dict[str, Any]) -> None:
    """What a checkpoint without a file list (or with one rewritten) can still be checked for cheaply: the
    loop's state is of the step ``checkpoint.json`` names, and format 3's parent-buffer file is there."""
    state = path / "state"
    loop_state = safe_torch_load(state / "trainer.pt")
    if not isinstance(loop_state, dict) or loop_state.get("step", meta.get("step")) != meta.get("step"):
        got = loop_state.get("step") if isinstance(loop_state, dict) else type(loop_state).__name__
        raise UserError(f"{state / 'trainer.pt'}: holds step {got!r}, {MARKER} says {meta.get('step')}; the "
                        f"checkpoint is damaged")
    buffer_file = state / "buffer.safetensors"
    if meta.get("format", 1) >= 3 and not buffer_file.is_file():
        raise UserError(f"{buffer_file}: missing (format {meta['format']} keeps the parent buffer there); the "
                        f"checkpoint is damaged")
    if buffer_file.is_file():  # read once here (a few MB): every entry checked before the model is built
        from r3_rl.rollout.buffer import ParentBuffer

        try:
            ParentBuffer(1).load(buffer_file)
        except Exception as e:  # noqa: BLE001 - a damaged or foreign file: one line
            raise UserError(f"{buffer_file}: not a parent buffer this run can read ({(str(e).splitlines() or [''])[0]})"
                            f"; the checkpoint is damaged") from None


def load_checkpoint(path: Path, parts: CheckpointParts, recipe: Any, checked: dict[str, Any] | None = None
                    ) -> dict[str, Any]:
    """Restore every part (built from the same recipe) to the state saved in ``path``; returns its meta.

    ``checked``: the meta :func:`check_resumable` already returned for ``path`` (the CLI checks before it builds
    the trainer), so the files are not hashed and the buffer not read twice."""
    path = Path(path)
    meta = checked if checked is not None else check_resumable(path, recipe)
    try:
        _restore(path, meta, parts)
    except UserError:
        raise
    except Exception as e:  # noqa: BLE001 - a damaged or foreign file: one line naming the checkpoint
        raise UserError(f"{path}: cannot restore this checkpoint ({raised(e)}); resume from an earlier one "
                        f"(--resume PATH) or delete it") from None
    return meta


def _restore(path: Path, meta: dict[str, Any], parts: CheckpointParts) -> None:
    state = path / "state"
    loop_state = safe_torch_load(state / "trainer.pt")
    buffer_file = state / "buffer.safetensors"
    learner = parts.learner
    if learner.saves_weights:
        pass  # the learner's own checkpoint restores the module weights (policy, adapters, critic)
    elif learner.adapters is not None:
        learner.adapters.load(state / "policy.safetensors")
    else:
        load_exported(parts.policy.model, path / "model", parts.policy.exported_weight_files(path / "model"))
    ref_file = state / "reference.safetensors"
    if parts.reference is not None and ref_file.is_file():
        load_model(parts.reference.model, str(ref_file))
    learner.load(state / "learner")
    parts.loop.load_state_dict(loop_state)  # formats 1-2: the buffer too
    if parts.buffer is not None and buffer_file.is_file():
        parts.buffer.load(buffer_file)
