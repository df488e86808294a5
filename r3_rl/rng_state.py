"""The process-wide random generators (python, numpy, torch, CUDA) as plain data, for a checkpoint's
``trainer.pt``: read back with ``torch.load(weights_only=True)``, so no numpy object may be in it."""
from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch


def global_rng_state() -> dict[str, Any]:
    """The process-wide RNGs (python, numpy, torch, CUDA) as plain data for ``weights_only`` loading."""
    return {"python_rng": random.getstate(), "numpy_rng": _numpy_rng_state(), "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_global_rng_state(state: dict[str, Any]) -> None:
    """Inverse of :func:`global_rng_state` (format 1's numpy array key state too)."""
    random.setstate(state["python_rng"])
    kind, keys, *rest = state["numpy_rng"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), *rest))
    torch.set_rng_state(state["torch_rng"])
    if state.get("cuda_rng") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda_rng"])


def _numpy_rng_state() -> tuple[Any, ...]:
    """numpy's global RNG state with its key array as a list: plain data for ``weights_only`` loading."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return kind, keys.tolist(), pos, has_gauss, gauss
