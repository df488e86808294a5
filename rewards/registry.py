"""Finding rewards by name: built-ins, dotted paths, file paths and the ``r3_rl.rewards`` entry point group.

A recipe names a reward as one of:
  * a registered name: ``blocks``, ``clip``, ...                           (``r3-rl rewards`` lists them)
  * a dotted path ``pkg.module:attr``
  * a file path ``path/to/file.py:attr``
  * a name published by an installed package under the entry point group ``r3_rl.rewards``.
``attr`` may be a :class:`~r3_rl.rewards.base.Reward` subclass (instantiated with the recipe's options),
a Reward instance, or a plain function ``fn(samples, **options) -> list[float | RewardOutput | None]``.
Built-ins are registered lazily by import path so listing them does not load any model.
"""
from __future__ import annotations

import importlib
import importlib.util
import inspect
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any, Callable

from r3_rl.errors import UserError, close_match
from r3_rl.rewards.base import Reward, RewardOutput, RewardSample

# name -> ("module:attr", one-line description).  Modules are imported only when the reward is used.
BUILTINS: dict[str, tuple[str, str]] = {
    "blocks": ("r3_rl.rewards.blocks:BlocksReward", "Blocks world: exact detector + GenEval rules (partial credit or binary)"),
}
_REGISTERED: dict[str, tuple[Any, str]] = {}


def register(name: str, description: str = "") -> Callable[[Any], Any]:
    """Decorator registering a Reward subclass or function under ``name``."""

    def deco(obj: Any) -> Any:
        _REGISTERED[name] = (obj, description or (inspect.getdoc(obj) or "").split("\n")[0])
        return obj

    return deco


def available() -> dict[str, str]:
    """Registered reward names (built-ins, decorated, entry points) -> one-line description."""
    out = {name: desc for name, (_, desc) in BUILTINS.items()}
    out.update({name: desc for name, (_, desc) in _REGISTERED.items()})
    for ep in entry_points(group="r3_rl.rewards"):
        out.setdefault(ep.name, f"entry point {ep.value}")
    return dict(sorted(out.items()))


class FunctionReward(Reward):
    """Adapts ``fn(samples, **options) -> list[float | RewardOutput | None]``; ``None`` is a failure."""

    def __init__(self, fn: Callable[..., Any], name: str, **options: Any) -> None:
        self.fn, self.name, self.options = fn, name, options

    def __call__(self, samples: list[RewardSample]) -> list[RewardOutput]:
        raw = self.fn(samples, **self.options)
        if len(raw) != len(samples):
            raise ValueError(f"reward {self.name!r} returned {len(raw)} scores for {len(samples)} samples")
        return [to_output(x) for x in raw]


def to_output(x: Any) -> RewardOutput:
    if isinstance(x, RewardOutput):
        return x
    if x is None:
        return RewardOutput(failure="reward returned None")
    try:
        return RewardOutput(score=float(x))
    except (TypeError, ValueError):
        return RewardOutput(failure=f"reward returned {type(x).__name__}, expected a number")


def _import_attr(spec: str) -> Any:
    target, _, attr = spec.rpartition(":")
    if target.endswith(".py") or "/" in target:
        path = Path(target)
        if not path.is_file():
            raise UserError(f"reward {spec!r}: file {target} does not exist")
        mod_spec = importlib.util.spec_from_file_location(f"r3_rl_user_reward_{path.stem}", path)
        module = importlib.util.module_from_spec(mod_spec)
        assert mod_spec.loader is not None
        mod_spec.loader.exec_module(module)
    else:
        try:
            module = importlib.import_module(target)
        except ImportError as e:
            raise UserError(f"reward {spec!r}: cannot import module {target!r} ({e})") from None
    if not hasattr(module, attr):
        raise UserError(f"reward {spec!r}: {target} has no attribute {attr!r}")
    return getattr(module, attr)


def _resolve(spec: str) -> tuple[Any, str]:
    if spec in _REGISTERED:
        return _REGISTERED[spec][0], spec
    if spec in BUILTINS:
        return _import_attr(BUILTINS[spec][0]), spec
    if ":" in spec:
        return _import_attr(spec), spec.rpartition(":")[2]
    for ep in entry_points(group="r3_rl.rewards"):
        if ep.name == spec:
            return ep.load(), spec
    raise UserError(f"unknown reward {spec!r}{close_match(spec, available())}; use a registered name "
                    f"({', '.join(available())}), 'pkg.module:fn' or 'path/file.py:fn'")


def load_reward(spec: str, **options: Any) -> Reward:
    """Instantiate the reward named by ``spec`` with the recipe's ``options``."""
    obj, name = _resolve(spec)
    if inspect.isclass(obj) and issubclass(obj, Reward):
        reward = obj(**options)
    elif isinstance(obj, Reward):
        reward = obj
    elif callable(obj):
        reward = FunctionReward(obj, name, **options)
    else:
        raise UserError(f"reward {spec!r} is a {type(obj).__name__}; expected a Reward class or a function")
    if not getattr(reward, "name", None) or reward.name == "reward":
        reward.name = name
    return reward
