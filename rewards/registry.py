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
Built-ins are registered lazily by import path so listing them does not load any model.  The resolution
machinery is :class:`r3_rl.plugins.Registry`, shared with the policy and algorithm registries.
"""
from __future__ import annotations

import dataclasses
import inspect
import math
from typing import Any, Callable

from r3_rl.errors import UserError, raised
from r3_rl.plugins import Registry, check_options
from r3_rl.rewards.base import Reward, RewardOutput, RewardSample
from r3_rl.rewards.wire import finite_float

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
REWARDS = Registry("reward", ENTRY_POINT_GROUP, BUILTINS, example="fn")


def register(name: str, description: str = "") -> Callable[[Any], Any]:
    """Decorator registering a Reward subclass or function under ``name``."""
    return REWARDS.register(name, description)


def available() -> dict[str, str]:
    """Registered reward names (built-ins, decorated, entry points) -> one-line description."""
    return REWARDS.available()


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
    texts = {k: str(v) for k, v in (("reason", out.reason), ("failure", out.failure))
             if v is not None and not isinstance(v, str)}
    if texts:  # a reason or failure that is not text (an exception, a number) as text: the server's JSON and the
        out = dataclasses.replace(out, **texts)  # client's check take strings only, and the logs show it as such
    if out.failure is None and out.score is not None and not math.isfinite(float(out.score)):
        return RewardOutput(failure=f"reward returned a non-finite score ({out.score})", reason=out.reason)
    # the wire's rule (rewards.wire.finite_float), except that a bool counts as 0/1 in-process, as a score does
    bad = [k for k, v in out.components.items() if not isinstance(v, bool) and finite_float(v) is None]
    if out.failure is None and bad:  # else a NaN part is plotted, and a text part raised out of RewardSet.score
        parts = ", ".join(f"{k}={str(out.components[k])[:40]!r}" for k in bad[:3])
        return RewardOutput(failure=f"reward returned a component that is not a finite number ({parts})",
                            reason=out.reason)
    return out


def check_call_shape(what: str, fn: Callable[..., Any], options: dict[str, Any]) -> None:
    """A reward function is called as ``fn(samples, **options)``: one that cannot be (TRL's ``fn(prompts,
    completions, **kwargs)``, Flow-GRPO's ``fn(images, prompts, metadata)``) is refused now, in one line, rather
    than failing every sample after the model load and warm start.  Unknown option names are
    :func:`check_options`' to name."""
    try:
        params = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):  # a builtin without a signature: it will tell at the first call
        return
    P = inspect.Parameter
    positional = [p for p in params if p.kind in (P.POSITIONAL_ONLY, P.POSITIONAL_OR_KEYWORD)]
    shape = ("a reward function is called as fn(samples, **options) -- one list of RewardSample (.prompt, .image, "
             ".metadata), then the recipe's options; one written for TRL or Flow-GRPO needs a wrapper (README: "
             "Rewards)")
    if not positional and not any(p.kind is P.VAR_POSITIONAL for p in params):
        name = getattr(fn, "__name__", type(fn).__name__)
        raise UserError(f"{what}: {name} takes no positional argument for the samples; {shape}")
    rest = positional[1:] + [p for p in params if p.kind is P.KEYWORD_ONLY]
    missing = [p.name for p in rest if p.default is P.empty and p.name not in options]
    if missing:
        raise UserError(f"{what}: missing required option(s) {', '.join(missing)}; {shape}")


def with_recipe_defaults(spec: dict[str, Any], defaults: dict[str, Any]) -> dict[str, Any]:
    """``spec`` (``{name, weight, options}``) with each of ``defaults`` -- recipe-wide settings such as
    ``templates.stop_phrase`` -- added to its options where the reward takes an option of that name and the
    recipe's entry sets none: a reward that reads critiques then stops on the phrase the rollout stops on."""
    obj, _ = REWARDS.resolve(spec["name"])
    if isinstance(obj, Reward) or not callable(obj):
        return spec
    try:
        params = inspect.signature(obj.__init__ if inspect.isclass(obj) else obj).parameters
    except (TypeError, ValueError):  # no signature to read (a builtin): nothing to add
        return spec
    options = dict(spec.get("options") or {})
    added = {k: v for k, v in defaults.items() if k not in options and k in params
             and params[k].kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)}
    return {**spec, "options": {**options, **added}} if added else spec


def load_reward(spec: str, **options: Any) -> Reward:
    """Instantiate the reward named by ``spec`` with the recipe's ``options``."""
    obj, name = REWARDS.resolve(spec)
    what = f"reward {spec!r}"
    if inspect.isclass(obj) and issubclass(obj, Reward):
        check_options(what, obj.__init__, options)
        try:
            reward = obj(**options)
        except UserError:
            raise
        except (TypeError, ValueError) as e:
            raise UserError(f"reward {spec!r}: bad options {options}: {e}") from None
        except Exception as e:  # noqa: BLE001 - the plug-in's constructor failed: one line, where
            raise UserError(f"reward {spec!r}: constructing it failed: {raised(e)}") from None
    elif isinstance(obj, Reward):
        if options:
            raise UserError(f"reward {spec!r} is a ready-made Reward instance and takes no options "
                            f"(got {', '.join(options)})")
        reward = obj
    elif callable(obj) and not inspect.isclass(obj):
        check_call_shape(what, obj, options)
        check_options(what, obj, options)
        reward = FunctionReward(obj, name, **options)
    else:
        raise UserError(f"reward {spec!r} is a {type(obj).__name__}; expected a Reward class or a function")
    if not getattr(reward, "name", None) or reward.name == "reward":
        reward.name = name
    return reward
