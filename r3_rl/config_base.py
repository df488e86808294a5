"""The base of every recipe section, shared by :mod:`r3_rl.config` and :mod:`r3_rl.config_learner`."""
from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict

from r3_rl.errors import UserError


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


def plugin_name(registry: Any, v: Any) -> Any:
    """A plug-in name a registry knows, or a ``module:attr`` / ``file.py:attr`` path (imported later, in
    :mod:`r3_rl.validate`); checked here without importing anything."""
    try:
        registry.check_name(v)
    except UserError as e:
        raise ValueError(str(e)) from None
    return v
