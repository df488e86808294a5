"""Finding rewards by name: built-ins, dotted paths, file paths and the ``r3_rl.rewards`` entry point group.

A recipe names a reward as one of:
  * a registered name: ``blocks``, ``clip``, ...                           (``r3-rl rewards`` lists them)
  * a dotted path ``pkg.module:attr``
  * a file path ``path/to/file.py:attr`` (relative paths are relative to the working directory)
  * a name published by an installed package under the entry point group ``r3_rl.rewards``, e.g. in
    the package's pyproject.toml: ``[project.entry-points."r3_rl.rewards"] my_reward = "my_pkg.rewards:score"``.
``attr`` may be a :class:`~r3_rl.rewards.base.Reward` subclass (instantiated with the recipe's options),
a Reward instance (takes no options), or a plain function ``fn(samples, **options) ->
list[float | RewardOutput | None]``.  Options are checked against the constructor / function signature
so a misspelt option is a one-line error at start-up, not a silent default.
Built-ins are registered lazily by import path so listing them does not load any model.
"""
from __future__ import annotations

import hashlib
import importlib
import importlib.util
import inspect
import math
import sys
from importlib.metadata import entry_points
from pathlib import Path
from types import ModuleType
from typing import Any, Callable

from r3_rl.errors import UserError, close_match
from r3_rl.rewards.base import Reward, RewardOutput, RewardSample

ENTRY_POINT_GROUP = "r3_rl.rewards"

# name -> ("module:attr", one-line description).  Modules are imported only when the reward is used.
BUILTINS: dict[str, tuple[str, str]] = {
    "blocks": ("r3_rl.rewards.blocks:BlocksReward", "Blocks world: exact detector + GenEval rules (partial credit or binary)"),
    "clip": ("r3_rl.rewards.clip:ClipReward", "prompt-image cosine similarity of a CLIP model (transformers or open_clip)"),
    "geneval": ("r3_rl.rewards.geneval:GenevalReward", "GenEval rules on Mask2Former / OWLv2 detections + CLIP colours"),
    "self_consistency": ("r3_rl.rewards.self_consistency:SelfConsistencyReward",
                         "the policy answers yes/no questions about its own image; agreement with the expected answers"),
    "verdict_consistency": ("r3_rl.rewards.self_consistency:VerdictConsistencyReward",
                            "1 when the reflect verdict (stop / edit) agrees with the task reward of the critiqued image"),
    "vlm_judge": ("r3_rl.rewards.vlm_judge:VlmJudgeReward",
                  "OpenAI-compatible VLM judge: GenEval++ checklist verdict or yes/no questions (TIIF)"),
    "remote": ("r3_rl.rewards.remote:RemoteReward", "any reward served by `r3-rl serve-reward` (JSON over HTTP)"),
}
_REGISTERED: dict[str, tuple[Any, str]] = {}
_FILE_MODULES: dict[Path, ModuleType] = {}


def register(name: str, description: str = "") -> Callable[[Any], Any]:
    """Decorator registering a Reward subclass or function under ``name``."""

    def deco(obj: Any) -> Any:
        _REGISTERED[name] = (obj, description or (inspect.getdoc(obj) or "").split("\n")[0])
        return obj

    return deco


def _entry_points() -> list[Any]:
    return list(entry_points(group=ENTRY_POINT_GROUP))


def available() -> dict[str, str]:
    """Registered reward names (built-ins, decorated, entry points) -> one-line description."""
    out = {name: desc for name, (_, desc) in BUILTINS.items()}
    out.update({name: desc for name, (_, desc) in _REGISTERED.items()})
    for ep in _entry_points():
        out.setdefault(ep.name, f"entry point {ep.value}")
    return dict(sorted(out.items()))


class FunctionReward(Reward):
    """Adapts ``fn(samples, **options) -> list[float | RewardOutput | None]``; ``None`` is a failure."""

    def __init__(self, fn: Callable[..., Any], name: str, **options: Any) -> None:
        self.fn, self.name, self.options = fn, name, options

    def __call__(self, samples: list[RewardSample]) -> list[RewardOutput]:
        raw = self.fn(samples, **self.options)
        raw = list(raw)
        if len(raw) != len(samples):
            raise ValueError(f"reward {self.name!r} returned {len(raw)} scores for {len(samples)} samples")
        return [to_output(x) for x in raw]


def to_output(x: Any) -> RewardOutput:
    """Normalise what a reward returned for one sample; NaN/inf and non-numbers are failures, never 0."""
    if isinstance(x, RewardOutput):
        out = x
    elif x is None:
        return RewardOutput(failure="reward returned None")
    else:
        try:
            out = RewardOutput(score=float(x))
        except (TypeError, ValueError):
            return RewardOutput(failure=f"reward returned {type(x).__name__}, expected a number")
    if out.failure is None and out.score is not None and not math.isfinite(float(out.score)):
        return RewardOutput(failure=f"reward returned a non-finite score ({out.score})", reason=out.reason)
    return out


def _load_file_module(spec: str, target: str) -> ModuleType:
    path = Path(target).expanduser()
    if not path.is_file():
        raise UserError(f"reward {spec!r}: file {target} does not exist")
    path = path.resolve()
    if path in _FILE_MODULES:  # task and eval reward sets may name the same file: import it once
        return _FILE_MODULES[path]
    digest = hashlib.sha1(str(path).encode()).hexdigest()[:8]
    mod_name = f"r3_rl_user_reward_{path.stem}_{digest}"
    mod_spec = importlib.util.spec_from_file_location(mod_name, path)
    if mod_spec is None or mod_spec.loader is None:
        raise UserError(f"reward {spec!r}: cannot import {path} (not a Python file?)")
    module = importlib.util.module_from_spec(mod_spec)
    sys.modules[mod_name] = module  # dataclasses and pickling inside the file need the module registered
    try:
        mod_spec.loader.exec_module(module)
    except Exception as e:  # noqa: BLE001 - user code can raise anything; report it in one line
        del sys.modules[mod_name]
        raise UserError(f"reward {spec!r}: importing {path} failed: {type(e).__name__}: {e}") from None
    _FILE_MODULES[path] = module
    return module


def _import_attr(spec: str) -> Any:
    target, _, attr = spec.rpartition(":")
    if not target or not attr:
        raise UserError(f"reward {spec!r}: expected 'pkg.module:name' or 'path/file.py:name'")
    if target.endswith(".py") or "/" in target or "\\" in target:
        module = _load_file_module(spec, target)
    else:
        try:
            module = importlib.import_module(target)
        except ImportError as e:
            raise UserError(f"reward {spec!r}: cannot import module {target!r} ({e})") from None
    if not hasattr(module, attr):
        names = [n for n in vars(module) if not n.startswith("_")]
        raise UserError(f"reward {spec!r}: {target} has no attribute {attr!r}{close_match(attr, names)}")
    return getattr(module, attr)


def _resolve(spec: str) -> tuple[Any, str]:
    if not isinstance(spec, str) or not spec:
        raise UserError(f"reward name must be a non-empty string, got {spec!r}")
    if spec in _REGISTERED:
        return _REGISTERED[spec][0], spec
    if spec in BUILTINS:
        return _import_attr(BUILTINS[spec][0]), spec
    if ":" in spec:
        return _import_attr(spec), spec.rpartition(":")[2]
    if spec.endswith(".py"):
        raise UserError(f"reward {spec!r}: name the function or class too, e.g. '{spec}:score'")
    for ep in _entry_points():
        if ep.name == spec:
            try:
                return ep.load(), spec
            except Exception as e:  # noqa: BLE001 - a broken plug-in package: one line
                raise UserError(f"reward {spec!r}: entry point {ep.value} failed to load: "
                                f"{type(e).__name__}: {e}") from None
    raise UserError(f"unknown reward {spec!r}{close_match(spec, available())}; use a registered name "
                    f"({', '.join(available())}), 'pkg.module:fn' or 'path/file.py:fn'")


def _check_options(spec: str, fn: Callable[..., Any], options: dict[str, Any], skip_first: bool) -> None:
    """Unknown option names are errors (unless the callable takes ``**kwargs``)."""
    try:
        params = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):
        return
    if skip_first and params:
        params = params[1:]
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return
    valid = [p.name for p in params if p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD,
                                                   inspect.Parameter.KEYWORD_ONLY)]
    for key in options:
        if key not in valid:
            raise UserError(f"reward {spec!r}: unknown option {key!r}{close_match(key, valid)}; "
                            f"valid options: {', '.join(valid) or 'none'}")
    missing = [p.name for p in params if p.default is inspect.Parameter.empty and p.name not in options
               and p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)]
    if missing:
        raise UserError(f"reward {spec!r}: missing required option(s) {', '.join(missing)}")


def load_reward(spec: str, **options: Any) -> Reward:
    """Instantiate the reward named by ``spec`` with the recipe's ``options``."""
    obj, name = _resolve(spec)
    if inspect.isclass(obj) and issubclass(obj, Reward):
        _check_options(spec, obj.__init__, options, skip_first=True)
        try:
            reward = obj(**options)
        except UserError:
            raise
        except (TypeError, ValueError) as e:
            raise UserError(f"reward {spec!r}: bad options {options}: {e}") from None
    elif isinstance(obj, Reward):
        if options:
            raise UserError(f"reward {spec!r} is a ready-made Reward instance and takes no options "
                            f"(got {', '.join(options)})")
        reward = obj
    elif callable(obj) and not inspect.isclass(obj):
        _check_options(spec, obj, options, skip_first=True)
        reward = FunctionReward(obj, name, **options)
    else:
        raise UserError(f"reward {spec!r} is a {type(obj).__name__}; expected a Reward class or a function")
    if not getattr(reward, "name", None) or reward.name == "reward":
        reward.name = name
    return reward
