"""Reading checkpoint files without running code: every ``.pt`` goes through ``torch.load(weights_only=True)``.

Why: unpickling runs whatever callable the file names (a ``__reduce__`` payload), and a checkpoint folder
can come from anyone (a shared filesystem, a colleague, a download).  ``weights_only=True`` builds only
tensors, plain containers and numbers, plus the few classes allowlisted here:

* ``numpy`` arrays: ``trainer.pt`` of checkpoint format 1 stored the numpy RNG state as an array (format 2
  stores plain lists); an array's items go through the same restricted unpickler.
* three DeepSpeed classes that its ZeRO optimiser state pickles (a loss scaler, a stage enum, a fragment
  address): data holders, built field by field by the restricted unpickler.

:func:`scan_checkpoint` reads only the pickle opcodes of every ``.pt`` in a checkpoint (no tensor data) so
``--resume`` can refuse a planted file in one line before any model is built; the load itself is still
``weights_only=True``, which is the guarantee.  DeepSpeed's ``engine.load_checkpoint`` calls
``torch.load(weights_only=False)`` through its checkpoint engine: :func:`make_deepspeed_loads_safe`
replaces that engine's ``load`` with ours.
"""
from __future__ import annotations

import pickle
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

from r3_rl.errors import UserError

NUMPY_GLOBALS = {"numpy._core.multiarray._reconstruct", "numpy.core.multiarray._reconstruct", "numpy.ndarray",
                 "numpy.dtype", "numpy.dtypes.UInt32DType"}
DEEPSPEED_GLOBALS = {"deepspeed.runtime.fp16.loss_scaler.LossScaler", "deepspeed.runtime.zero.config.ZeroStageEnum",
                     "deepspeed.utils.tensor_fragment.fragment_address"}
ALLOWED = NUMPY_GLOBALS | DEEPSPEED_GLOBALS


def _numpy_objects() -> list[Any]:
    core = getattr(np, "_core", None) or np.core  # numpy 2 / numpy 1
    return [core.multiarray._reconstruct, np.ndarray, np.dtype, type(np.dtype(np.uint32))]


def _deepspeed_objects() -> list[Any]:
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, ZeroStageEnum, fragment_address]


def _refusal(path: Path | str, detail: str) -> UserError:
    return UserError(f"{path}: refusing to load it: {detail}; only tensors and plain data are accepted, because "
                     f"anything else in a pickle can run code when loaded (delete the checkpoint or re-create it)")


def safe_torch_load(path: Path | str, map_location: Any = None, deepspeed: bool = False) -> Any:
    """``torch.load(path, weights_only=True)``; a file that needs more is a one-line :class:`UserError`."""
    allowed = _numpy_objects() + (_deepspeed_objects() if deepspeed else [])
    try:
        with torch.serialization.safe_globals(allowed):
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        # torch's reasons: "Unsupported global: GLOBAL a.b.c was not an allowed global ...", "Unsupported operand
        # 105", or for a module it never allows, "Trying to load unsupported GLOBAL posix.system whose module
        # posix is blocked" (kept up to the sentence's end: a name's dots are not one)
        found = re.search(r"(?:Unsupported (?:global|operand)|unsupported GLOBAL)(?:[^\n.]|\.(?=\w))*", str(e))
        raise _refusal(path, found.group(0) if found else "it is not a weights-only pickle") from None
    except (OSError, EOFError, RuntimeError, ValueError) as e:
        raise UserError(f"{path}: cannot read checkpoint file ({type(e).__name__}: "
                        f"{(str(e).splitlines() or [''])[0][:200]})") from None


def scan_checkpoint(folder: Path | str) -> None:
    """Refuse (one line) any ``.pt`` under ``folder`` whose pickle names a callable outside the allowlist.

    Reads opcodes only, so it costs milliseconds even for large optimiser states.
    """
    for f in sorted(Path(folder).rglob("*.pt")):
        try:
            names = torch.serialization.get_unsafe_globals_in_checkpoint(f)
        except Exception:  # noqa: BLE001 - a legacy or damaged file: the weights_only load decides
            continue
        bad = [n for n in names if n not in ALLOWED]
        if bad:
            raise _refusal(f, f"it references {bad[0]}")


def make_deepspeed_loads_safe(engine: Any) -> None:
    """Route every file DeepSpeed's ``load_checkpoint`` reads through :func:`safe_torch_load`.

    Universal checkpoints are read by other code paths of DeepSpeed (``torch.load(weights_only=False)``):
    refused here rather than trusted.
    """
    if getattr(engine, "load_universal_checkpoint", lambda: False)():
        raise UserError("learner.deepspeed.config: DeepSpeed universal checkpoints are loaded with "
                        "torch.load(weights_only=False) by DeepSpeed; r3-rl refuses to resume from them")
    ce = engine.checkpoint_engine
    ce.load = lambda path, map_location=None: safe_torch_load(path, map_location=map_location, deepspeed=True)
