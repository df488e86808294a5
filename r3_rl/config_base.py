"""The base of every recipe section, shared by :mod:`r3_rl.config` and :mod:`r3_rl.config_learner`."""
from __future__ import annotations

import types
import typing
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationInfo, field_validator

from r3_rl.errors import UserError


def type_members(annotation: Any) -> list[Any]:
    """The types a value of ``annotation`` may have: a union's members, ``Annotated``'s base, else itself."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Annotated:
        return type_members(args[0])
    if origin in (typing.Union, types.UnionType):
        return [m for a in args for m in type_members(a)]
    return [annotation]


def _bool_for_number(annotation: Any, value: Any) -> bool:
    """Whether ``value`` holds a YAML ``true``/``false`` where ``annotation`` wants a number, not a bool.

    pydantic's lax mode reads ``lr: true`` as 1.0 and ``seed: yes`` as 1 (YAML 1.1 spells booleans ``yes``/``on``
    too): a recipe that says something else than it means would train silently.  Containers are looked into
    (``dict[str, float]`` tag weights, lists of numbers); ``Any`` and unions that admit ``bool`` are left alone.
    """
    members = type_members(annotation)
    if bool in members:
        return False
    for m in members:
        origin, args = typing.get_origin(m), typing.get_args(m)
        if isinstance(value, bool):
            if m in (int, float):
                return True
        elif origin is dict and len(args) == 2 and isinstance(value, dict):
            if any(_bool_for_number(args[1], v) for v in value.values()):
                return True
        elif origin in (list, tuple) and args and isinstance(value, (list, tuple)):
            if any(_bool_for_number(args[0], v) for v in value):
                return True
    return False


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    @field_validator("*", mode="before")
    @classmethod
    def _no_bool_for_a_number(cls, value: Any, info: ValidationInfo) -> Any:
        field = cls.model_fields.get(info.field_name or "")
        if field is not None and _bool_for_number(field.annotation, value):
            raise ValueError("must be a number, not true/false (YAML reads true/false/yes/no/on/off as booleans)")
        return value


def plugin_name(registry: Any, v: Any) -> Any:
    """A plug-in name a registry knows, or a ``module:attr`` / ``file.py:attr`` path (imported later, in
    :mod:`r3_rl.validate`); checked here without importing anything."""
    try:
        registry.check_name(v)
    except UserError as e:
        raise ValueError(str(e)) from None
    return v
