"""Policies by name (``policy.kind``): built-ins, ``@register_policy``, dotted paths, files, ``r3_rl.policies``.

A policy family is one file holding a :class:`~r3_rl.policy.base.Policy` subclass that defines
``from_recipe(recipe, **options)`` (``options`` = the recipe's ``policy.options``, checked against that
signature).  Name it in a recipe as ``policy.kind: my_pkg.policy:MyPolicy`` or ``policy.kind: path/to/file.py:MyPolicy``,
or register it under a short name with ``@register_policy("mine")`` (the module must then be imported, e.g.
through an entry point ``[project.entry-points."r3_rl.policies"] mine = "my_pkg.policy:MyPolicy"``).
Built-ins are imported only when used, so listing and checking names loads no model.
"""
from __future__ import annotations

import inspect
from typing import TYPE_CHECKING, Any, Callable

from r3_rl.errors import UserError, raised
from r3_rl.plugins import Registry, check_options, import_attr

if TYPE_CHECKING:
    from r3_rl.policy.base import Policy

BUILTINS: dict[str, tuple[str, str]] = {
    "tiny": ("r3_rl.policy.tiny:TinyUnifiedPolicy", "token-unified Llama on the Blocks world, trains on 2 CPU cores"),
    "tiny_flow": ("r3_rl.policy.tiny_flow:TinyFlowPolicy",
                  "the tiny policy's text path + a flow-matching image head (continuous latents), 2 CPU cores"),
    "janus": ("r3_rl.policy.janus:JanusPolicy", "Janus-Pro 1B / 7B (transformers), VQ image tokens with CFG"),
    "bagel": ("r3_rl.policy.bagel.policy:BagelPolicy",
              "BAGEL-7B-MoT (Mixture-of-Transformers), flow-matching images with text/image CFG, R3's prompts"),
}
POLICIES = Registry("policy", "r3_rl.policies", BUILTINS, example="Class")
# What a recipe check reads of a built-in family (template placeholders, check_recipe, from_recipe's signature),
# in a module that imports no torch: the policy classes inherit these halves.
RECIPE_SIDE: dict[str, str] = {"tiny": "r3_rl.policy.tiny_recipe:TinyRecipe",
                               "janus": "r3_rl.policy.janus_recipe:JanusRecipe",
                               "bagel": "r3_rl.policy.bagel.recipe:BagelRecipe"}


def register_policy(name: str, description: str = "") -> Callable[[Any], Any]:
    """Class decorator: ``@register_policy("mine")`` makes ``policy.kind: mine`` build this class."""
    return POLICIES.register(name, description)


def policy_class(kind: str) -> "type[Policy]":
    """The :class:`Policy` subclass ``kind`` names; anything else is a one-line error."""
    from r3_rl.policy.base import Policy

    obj, _ = POLICIES.resolve(kind)
    if not (inspect.isclass(obj) and issubclass(obj, Policy)):
        raise UserError(f"policy {kind!r} is a {type(obj).__name__}; expected a subclass of r3_rl.policy.base.Policy")
    if obj.from_recipe.__func__ is Policy.from_recipe.__func__:  # type: ignore[attr-defined]
        raise UserError(f"policy {kind!r}: {obj.__name__} does not define from_recipe(recipe, **options)")
    return obj


def recipe_side(kind: str) -> Any:
    """What a recipe check reads of policy ``kind``: ``template_fields``, ``check_recipe`` and ``from_recipe``
    (for its signature).  A plug-in's class itself; a built-in's light half (no torch import)."""
    if kind in RECIPE_SIDE and kind not in POLICIES.registered:
        return import_attr(RECIPE_SIDE[kind], f"policy {kind!r}", "Class")
    return policy_class(kind)


def check_policy_options(recipe: Any, side: Any = None) -> Any:
    """``policy.options`` against ``from_recipe``'s signature; returns the family's recipe side."""
    side = side if side is not None else recipe_side(recipe.policy.kind)
    check_options(f"policy {recipe.policy.kind!r}", side.from_recipe, recipe.policy.options)
    return side


def build_policy(recipe: Any) -> "Policy":
    """The recipe's policy with its initial weights (random, or ``policy.model``'s); no warm start here."""
    cls = policy_class(recipe.policy.kind)
    check_policy_options(recipe, cls)
    if not recipe.policy.model:
        return cls.from_recipe(recipe, **recipe.policy.options)
    try:
        return cls.from_recipe(recipe, **recipe.policy.options)
    except UserError:
        raise
    except Exception as e:  # noqa: BLE001 - a damaged or foreign model folder (truncated weights, bad config)
        raise UserError(f"policy.model: {recipe.policy.model}: cannot load it ({raised(e)})") from None
