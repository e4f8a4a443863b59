"""Strategy registry: a name, a preset, or ``package.module:Class`` for a strategy outside the repository.

A *preset* is a strategy with options under a name of its own (``full_scale_all``), so that a sweep
can list it as one value of ``conditioning.name`` (W&B sweeps have no per-value options)."""

from __future__ import annotations

import importlib
from typing import Any

from conditioning.base import ConditioningStrategy

# Built-ins, as "module:Class" strings so that listing names imports nothing.
BUILTIN: dict[str, str] = {
    "full_scale": "conditioning.full_scale:FullScale",
    "max_scale": "conditioning.max_scale:MaxScale",
    "sar": "conditioning.sar:SAR",
    "text_only": "conditioning.text_only:TextOnly",
}
# Presets: name -> (strategy, options). Options given in the config override the preset's.
PRESETS: dict[str, tuple[str, dict[str, Any]]] = {
    "full_scale_all": ("full_scale", {"visibility": "all"}),  # the paper's Eq. 4: every target scale sees every source scale
}
_registered: dict[str, type[ConditioningStrategy]] = {}


def register(cls: type[ConditioningStrategy]) -> type[ConditioningStrategy]:
    """Class decorator: make ``cls`` selectable by ``cls.name`` (``conditioning.name: <name>``)."""
    _registered[cls.name] = cls
    return cls


def available() -> list[str]:
    return sorted(set(BUILTIN) | set(PRESETS) | set(_registered))


def _import(path: str) -> type[ConditioningStrategy]:
    module_name, _, attr = path.partition(":")
    try:
        cls = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as err:
        raise KeyError(f"cannot import strategy {path!r}: {err}") from None
    if not (isinstance(cls, type) and issubclass(cls, ConditioningStrategy)):
        raise TypeError(f"{path!r} is not a ConditioningStrategy subclass")
    return cls


def resolve(name: str) -> type[ConditioningStrategy]:
    """The strategy class of ``name``; unknown names fail with the list of registered ones."""
    if name in _registered:
        return _registered[name]
    if name in BUILTIN:
        return _import(BUILTIN[name])
    if name in PRESETS:
        return resolve(PRESETS[name][0])
    if ":" in name:
        return _import(name)
    raise KeyError(f"unknown conditioning strategy {name!r}; registered: {available()} (or use 'package.module:Class')")


def build(name: str, options: dict[str, Any] | None = None) -> ConditioningStrategy:
    preset = PRESETS.get(name, (name, {}))[1] if name not in _registered else {}
    return resolve(name).from_dict({**preset, **(options or {})})


def validate_options(name: str, options: dict[str, Any] | None) -> None:
    """Raise KeyError/TypeError/ValueError with a clear message if ``name``/``options`` are invalid."""
    build(name, options)
