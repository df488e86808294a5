"""Finding plug-ins by name: the one resolution machinery behind the reward, policy and algorithm registries.

A recipe names a plug-in (``rewards.task[].name``, ``policy.kind``, ``learner.algorithm``) as one of:
  * a registered name: a built-in (``blocks``, ``tiny``, ``grpo``, ...) or one made by a ``@register`` decorator;
  * a dotted path ``pkg.module:attr``;
  * a file path ``path/to/file.py:attr`` (relative paths are relative to the working directory);
  * a name published by an installed package under the kind's entry-point group, e.g. in its pyproject.toml:
    ``[project.entry-points."r3_rl.policies"] my_model = "my_pkg.policy:MyPolicy"``.
Built-ins are registered lazily by import path, so listing them (``r3-rl rewards``) or checking a recipe's
names loads no model.  A file is imported once however many registries name it (a plug-in file may hold a
policy, its algorithm and its reward).  Every failure is a one-line :class:`UserError`.
"""
from __future__ import annotations

import hashlib
import importlib
import importlib.util
import inspect
import sys
from importlib.metadata import entry_points
from pathlib import Path
from types import ModuleType
from typing import Any, Callable

from r3_rl.errors import UserError, close_match, raised

_FILE_MODULES: dict[Path, ModuleType] = {}


def _load_file_module(what: str, target: str) -> ModuleType:
    path = Path(target).expanduser()
    if not path.is_file():
        raise UserError(f"{what}: file {target} does not exist")
    path = path.resolve()
    if path in _FILE_MODULES:  # task and eval reward sets, or a policy and its reward, may name the same file
        return _FILE_MODULES[path]
    digest = hashlib.sha1(str(path).encode()).hexdigest()[:8]
    mod_name = f"r3_rl_user_{path.stem}_{digest}"  # the same name in every process: Ray actors unpickle by it
    mod_spec = importlib.util.spec_from_file_location(mod_name, path)
    if mod_spec is None or mod_spec.loader is None:
        raise UserError(f"{what}: cannot import {path} (not a Python file?)")
    module = importlib.util.module_from_spec(mod_spec)
    sys.modules[mod_name] = module  # dataclasses and pickling inside the file need the module registered
    try:
        mod_spec.loader.exec_module(module)
    except (Exception, SystemExit) as e:  # noqa: BLE001 - user code can raise anything; report it in one line
        del sys.modules[mod_name]
        raise UserError(f"{what}: importing {path} failed: {raised(e)}") from None
    _FILE_MODULES[path] = module
    return module


def import_attr(spec: str, what: str, example: str) -> Any:
    """The object ``pkg.module:attr`` or ``path/file.py:attr`` names; ``what`` starts every error message."""
    target, _, attr = spec.rpartition(":")
    if not target or not attr:
        raise UserError(f"{what}: expected 'pkg.module:{example}' or 'path/file.py:{example}'")
    if target.endswith(".py") or "/" in target or "\\" in target:
        module = _load_file_module(what, target)
    else:
        try:
            module = importlib.import_module(target)
        except ModuleNotFoundError as e:
            raise UserError(f"{what}: cannot import module {target!r} ({e})") from None
        except (Exception, SystemExit) as e:  # noqa: BLE001 - the module's own code failed: one line, where
            raise UserError(f"{what}: importing module {target!r} failed: {raised(e)}") from None
    if not hasattr(module, attr):
        names = [n for n in vars(module) if not n.startswith("_")]
        raise UserError(f"{what}: {target} has no attribute {attr!r}{close_match(attr, names)}")
    return getattr(module, attr)


def check_options(what: str, fn: Callable[..., Any], options: dict[str, Any], skip: int = 1) -> None:
    """Option names must be parameters of ``fn`` (after its first ``skip`` ones); required ones must be given.

    A callable taking ``**kwargs`` accepts any option.  A misspelt option is an error, never a silent default.
    """
    try:
        params = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):
        return
    params = params[skip:]
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return
    named = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    valid = [p.name for p in params if p.kind in named]
    for key in options:
        if key not in valid:
            raise UserError(f"{what}: unknown option {key!r}{close_match(key, valid)}; "
                            f"valid options: {', '.join(valid) or 'none'}")
    missing = [p.name for p in params if p.default is inspect.Parameter.empty and p.name not in options
               and p.kind in named]
    if missing:
        raise UserError(f"{what}: missing required option(s) {', '.join(missing)}")


def is_path_spec(spec: str) -> bool:
    """``pkg.module:attr`` or ``path/file.py:attr``: resolved by importing, not by a registered name."""
    return ":" in spec


class Registry:
    """Names -> plug-in objects of one kind.

    ``kind`` names the plug-in in messages (``reward``, ``policy``, ``algorithm``); ``group`` is its entry-point
    group; ``builtins`` maps a name to ``("module:attr", one-line description)``, imported on first use;
    ``example`` is what an attribute is called in the hint of an error (``fn``, ``Class``).
    """

    def __init__(self, kind: str, group: str, builtins: dict[str, tuple[str, str]], example: str = "attr") -> None:
        self.kind, self.group, self.builtins, self.example = kind, group, builtins, example
        self.registered: dict[str, tuple[Any, str]] = {}

    # ------------------------------------------------------------------ registration
    def register(self, name: str, description: str = "") -> Callable[[Any], Any]:
        """Decorator registering ``obj`` under ``name``.  A taken name is an error, never silently replaced
        (registering the same class or function again, e.g. when its module is re-imported, is fine)."""

        def deco(obj: Any) -> Any:
            taken = self.registered.get(name, (None, ""))[0]
            if name in self.builtins or (taken is not None and _identity(taken) != _identity(obj)):
                owner = self.builtins[name][0] if name in self.builtins else _qualname(taken)
                raise UserError(f"{self.kind} name {name!r} is already registered ({owner}); register "
                                f"{_qualname(obj)} under another name")
            self.registered[name] = (obj, description or (inspect.getdoc(obj) or "").split("\n")[0])
            return obj

        return deco

    def entry_points(self) -> list[Any]:
        return list(entry_points(group=self.group))

    def available(self) -> dict[str, str]:
        """Registered names (built-ins, decorated, entry points) -> one-line description, sorted."""
        out = {name: desc for name, (_, desc) in self.builtins.items()}
        out.update({name: desc for name, (_, desc) in self.registered.items()})
        for ep in self.entry_points():
            out.setdefault(ep.name, f"entry point {ep.value}")
        return dict(sorted(out.items()))

    # ------------------------------------------------------------------ resolution
    def unknown(self, spec: str) -> UserError:
        known = self.available()
        return UserError(f"unknown {self.kind} {spec!r}{close_match(spec, known)}; use a registered name "
                         f"({', '.join(known)}), 'pkg.module:{self.example}' or 'path/file.py:{self.example}'")

    def check_name(self, spec: Any) -> None:
        """The cheap check a config validator can make: the name is listed or is a path (nothing imported)."""
        if not isinstance(spec, str) or not spec:
            raise UserError(f"{self.kind} name must be a non-empty string, got {spec!r}")
        if is_path_spec(spec):
            return
        if spec.endswith(".py"):
            raise UserError(f"{self.kind} {spec!r}: name the function or class too, e.g. '{spec}:{self.example}'")
        if spec not in self.available():
            raise self.unknown(spec)

    def resolve(self, spec: str) -> tuple[Any, str]:
        """``(object, name)`` for ``spec``; the name is the registered name or the attribute of a path."""
        self.check_name(spec)
        what = f"{self.kind} {spec!r}"
        if spec in self.registered:
            return self.registered[spec][0], spec
        if spec in self.builtins:
            return import_attr(self.builtins[spec][0], what, self.example), spec
        if is_path_spec(spec):
            return import_attr(spec, what, self.example), spec.rpartition(":")[2]
        for ep in self.entry_points():
            if ep.name == spec:
                try:
                    return ep.load(), spec
                except (Exception, SystemExit) as e:  # noqa: BLE001 - a broken plug-in package: one line
                    raise UserError(f"{what}: entry point {ep.value} failed to load: {raised(e)}") from None
        raise self.unknown(spec)


def _qualname(obj: Any) -> str:
    return f"{getattr(obj, '__module__', '?')}:{getattr(obj, '__qualname__', type(obj).__name__)}"


def _identity(obj: Any) -> tuple[str, str]:
    """The same definition imported twice (a file named by path and by module) is the same plug-in."""
    try:
        where = str(Path(inspect.getfile(obj)).resolve())
    except TypeError:  # an instance, a builtin
        where = getattr(obj, "__module__", "?")
    return getattr(obj, "__qualname__", type(obj).__name__), where
