"""The recipe-facing half of the Janus-Pro policy: template placeholders, recipe checks, construction.

Kept apart from :mod:`r3_rl.policy.janus` so that checking a recipe's templates imports no torch;
:class:`~r3_rl.policy.janus.JanusPolicy` inherits it.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from r3_rl.errors import UserError
from r3_rl.policy.janus_prompts import STAGE_FIELDS


class JanusRecipe:
    """Mixin of :class:`~r3_rl.policy.janus.JanusPolicy` (``from_recipe`` builds that class)."""

    template_fields: dict[str, set[str]] = STAGE_FIELDS

    @classmethod
    def from_recipe(cls, recipe: Any) -> Any:
        p = recipe.policy
        return cls.from_pretrained(p.model, templates=recipe.templates.model_dump(),  # type: ignore[attr-defined]
                                   dtype=p.dtype, device=p.device)

    @classmethod
    def check_recipe(cls, recipe: Any, source: str, weights: bool = True) -> None:
        """``policy.model`` is on this machine (a folder, or the hub cache), or the hub is reachable."""
        if weights:
            resolve_model(recipe.policy.model or "")


def resolve_model(model: str) -> tuple[str, bool]:
    """(what to pass to ``from_pretrained``, local files only?) -- failing fast with one line.

    A hub id already in the local cache is loaded from it without touching the network; one that is
    not fails at once when HF_HUB_OFFLINE is set or the hub host cannot be reached (instead of
    huggingface_hub's retries, which take tens of seconds without a network).
    """
    def fail(reason: str) -> UserError:
        return UserError(f"policy.model: cannot load '{model}': {reason}; give a local path or a hub id "
                         f"available offline")

    if not model:
        raise UserError("policy.model: empty; give a local path or a hub id available offline")
    path = Path(model).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise fail("no config.json in that directory")
        return str(path), True
    if path.exists():
        raise fail("not a directory")
    if model.startswith(("/", ".", "~")) or model.count("/") > 1:
        raise fail("no such directory")
    from huggingface_hub import constants, try_to_load_from_cache

    try:
        cached = try_to_load_from_cache(model, "config.json")
    except Exception:  # noqa: BLE001 - a malformed repo id is simply "not available"
        cached = None
    if isinstance(cached, str):
        return model, True
    offline = constants.HF_HUB_OFFLINE or os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
    if offline:
        raise fail("not a local directory and not in the hub cache (HF_HUB_OFFLINE is set)")
    if not _hub_reachable(constants.ENDPOINT):
        raise fail(f"not a local directory, not in the hub cache, and {constants.ENDPOINT} cannot be reached")
    return model, False


def _hub_reachable(endpoint: str, timeout: float = 3.0) -> bool:
    """A TCP connect to the hub host (skipped behind a proxy, where only the proxy can tell)."""
    if any(os.environ.get(k) for k in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True
    import socket
    from urllib.parse import urlparse

    url = urlparse(endpoint)
    try:
        socket.create_connection((url.hostname or "", url.port or (443 if url.scheme == "https" else 80)),
                                 timeout=timeout).close()
        return True
    except OSError:
        return False
