"""Frozen weights are not checkpointed: a resume takes them from ``policy.model`` again, after checking it is the same.

Under LoRA the frozen base is almost the whole model (Janus-Pro-7B: 14.8 GB of 15.1), and it never changes
during a run.  Writing it into every checkpoint beside the merged ``model/`` export doubled each save (DeepSpeed's
module file; the torch backend's unmerged policy).  So a checkpoint keeps only what trains, and a fingerprint of
what does not: on resume the base is loaded from ``policy.model`` as at the start, and a base that is not the
one the adapters were trained on (a re-downloaded snapshot, another fine-tune under the same path) stops the
resume in one line instead of silently pairing old adapters with new weights.

The fingerprint samples :data:`SAMPLES` evenly spaced values of each frozen tensor (with its name, dtype and
shape): a different or re-trained base changes nearly every weight, so it is caught; a single edited weight
may not be.  Reading the samples costs well under a second for a 7B model, on any device.
"""
from __future__ import annotations

import hashlib
from typing import Iterable

import torch

from r3_rl.errors import UserError

SAMPLES = 4096  # values read from each frozen tensor


def frozen_names(module: torch.nn.Module) -> set[str]:
    """State-dict names of what does not train in ``module``: frozen parameters and buffers.  A tied weight
    (``lm_head.weight`` beside the embedding) goes under both its names together: both are frozen, or both train
    and are saved (``remove_duplicate=False``), so a checkpoint never holds one name of a trained tie without the
    other."""
    trained = {n for n, p in module.named_parameters(remove_duplicate=False) if p.requires_grad}
    return set(module.state_dict(keep_vars=True)) - trained


def fingerprint(named: Iterable[tuple[str, torch.Tensor]]) -> str | None:
    """A SHA-256 over each tensor's name, dtype, shape and :data:`SAMPLES` evenly spaced values; ``None`` when
    there is no tensor (nothing frozen: nothing to check)."""
    digest, count = hashlib.sha256(), 0
    for name, tensor in sorted(named, key=lambda item: item[0]):
        flat = tensor.detach().reshape(-1)
        # evenly spaced positions, computed on the CPU in float64 so every device reads the same ones (a plain
        # stride that divides the row length would read one column only)
        where = torch.linspace(0, max(flat.numel() - 1, 0), min(flat.numel(), SAMPLES), dtype=torch.float64)
        sample = flat[where.round().long().to(flat.device)].cpu()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(sample.view(torch.uint8).numpy().tobytes() if sample.numel() else b"")
        count += 1
    return digest.hexdigest() if count else None


def frozen_fingerprint(module: torch.nn.Module) -> str | None:
    """:func:`fingerprint` of ``module``'s frozen parameters (before ZeRO-3 partitions them)."""
    return fingerprint((n, p) for n, p in module.named_parameters() if not p.requires_grad)


def check_same_frozen(saved: str | None, now: str | None, where: str) -> None:
    """One line when the frozen weights a checkpoint was trained on are not those loaded now.  ``saved`` is
    ``None`` for a checkpoint written before fingerprints (it holds its frozen weights itself)."""
    if saved is not None and saved != now:
        raise UserError(f"{where}: the frozen (base) weights loaded from policy.model are not those this checkpoint "
                        f"was trained on (fingerprint {str(now)[:12]} vs {saved[:12]}); resume with the same base "
                        f"model files (and, for a warm-started tiny policy, the run's warmstart/ folder)")


def check_loaded_keys(missing: Iterable[str], unexpected: Iterable[str], frozen: set[str], where: str) -> None:
    """After a non-strict load of a state without its frozen weights: any other key missing, or any key the
    module does not have, is a damaged or foreign checkpoint."""
    lost = sorted(k for k in missing if k not in frozen)
    extra = sorted(unexpected)
    if lost or extra:
        raise RuntimeError(f"{where}: weights do not match the model (missing {lost[:3]}, unexpected {extra[:3]})")
