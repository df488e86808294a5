"""Algorithms by name (``learner.algorithm``): built-ins, ``@register_algorithm``, dotted paths, files,
and the ``r3_rl.algorithms`` entry-point group.

An algorithm is a subclass of :class:`~r3_rl.learner.algorithm.Algorithm` (a GRPO variant: of
:class:`~r3_rl.learner.algorithm.GRPO`) constructed as ``cls(recipe, **learner.options)``.  Name it in a
recipe as ``learner.algorithm: my_pkg.algo:MyGRPO`` or ``path/to/file.py:MyGRPO``, or register it with
``@register_algorithm("my_grpo")`` and publish it under ``[project.entry-points."r3_rl.algorithms"]``.
"""
from __future__ import annotations

import inspect
from typing import TYPE_CHECKING, Any, Callable

from r3_rl.errors import UserError, raised
from r3_rl.plugins import Registry, check_options

if TYPE_CHECKING:
    from r3_rl.learner.algorithm import Algorithm

BUILTINS: dict[str, tuple[str, str]] = {
    "grpo": ("r3_rl.learner.algorithm:GRPO",
             "group-relative advantages among Tree-RL siblings; clipped surrogate + KL to the reference"),
    "ppo": ("r3_rl.learner.ppo_learner:PPO", "GAE over each R3 chain's stages with a value critic; clipped surrogate"),
}
ALGORITHMS = Registry("algorithm", "r3_rl.algorithms", BUILTINS, example="Class")


def register_algorithm(name: str, description: str = "") -> Callable[[Any], Any]:
    """Class decorator: ``@register_algorithm("my_grpo")`` makes ``learner.algorithm: my_grpo`` use this class."""
    return ALGORITHMS.register(name, description)


def algorithm_class(name: str) -> "type[Algorithm]":
    """The :class:`Algorithm` subclass ``name`` names; anything else is a one-line error."""
    from r3_rl.learner.algorithm import Algorithm

    obj, _ = ALGORITHMS.resolve(name)
    if not (inspect.isclass(obj) and issubclass(obj, Algorithm)):
        raise UserError(f"algorithm {name!r} is a {type(obj).__name__}; expected a subclass of "
                        f"r3_rl.learner.algorithm.Algorithm")
    return obj


def check_algorithm(recipe: Any) -> None:
    """What a recipe check can say before any work: a plug-in imports and takes ``learner.options`` (it is
    constructed: that loads no model); a built-in takes none (its settings are the typed ``learner.*`` keys),
    which needs no import."""
    name, options = recipe.learner.algorithm, recipe.learner.options
    if name in ALGORITHMS.builtins and name not in ALGORITHMS.registered:
        if options:
            raise UserError(f"algorithm {name!r}: unknown option {next(iter(options))!r}; the built-in algorithms "
                            f"take no learner.options (their settings are learner.* keys)")
        return
    load_algorithm(recipe)


def load_algorithm(recipe: Any) -> "Algorithm":
    """``learner.algorithm`` built with ``learner.options`` (option names checked against its ``__init__``)."""
    name, options = recipe.learner.algorithm, recipe.learner.options
    cls = algorithm_class(name)
    check_options(f"algorithm {name!r}", cls.__init__, options, skip=2)  # self, recipe
    try:
        return cls(recipe, **options)
    except (TypeError, ValueError) as e:
        raise UserError(f"algorithm {name!r}: bad learner.options {options}: {e}") from None
    except Exception as e:  # noqa: BLE001 - the plug-in's constructor failed: one line, where
        raise UserError(f"algorithm {name!r}: constructing it failed: {raised(e)}") from None
