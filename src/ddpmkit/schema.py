"""Field-by-field type checks of JSON read back from disk: each reader states its shape once here.

A spec is a Python type (``int`` never accepts a bool; ``float`` accepts any JSON number, NaN and
infinities included; ``str``, ``bool``, ``None``; ``object`` accepts anything), a one-item list
``[spec]`` (a list of such items), a tuple ``(spec, ...)`` (a list of exactly those items), a dict
``{"key": spec}`` (an object with at least those keys; extra keys are allowed), ``DictOf(spec)``,
``OneOf(spec, ...)`` or ``Optional(spec)`` (a dict key that may be absent). ``check`` raises a
one-line ValueError naming the file and the key: ``state.json: optimizer.param_groups[0].lr must be
a number, got '0.001'``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

__all__ = ["DictOf", "OneOf", "Optional", "check", "problem"]


@dataclass(frozen=True)
class DictOf:
    """An object with any string keys, each value of ``spec``."""

    spec: Any


@dataclass(frozen=True)
class OneOf:
    """A value of any one of ``specs``."""

    specs: tuple[Any, ...]

    def __init__(self, *specs: Any) -> None:
        object.__setattr__(self, "specs", specs)


@dataclass(frozen=True)
class Optional:
    """As a dict spec's value: the key may be absent; when present it is of ``spec``."""

    spec: Any


_NAMES = {int: "an int", float: "a number", str: "a string", bool: "a bool", None: "null", dict: "an object",
          list: "a list", object: "anything"}


def _describe(spec: Any) -> str:
    if isinstance(spec, list):
        return f"a list of {_describe(spec[0])}"
    if isinstance(spec, tuple):
        return f"a list of {len(spec)} items"
    if isinstance(spec, (dict, DictOf)):
        return "an object"
    if isinstance(spec, OneOf):
        return " or ".join(_describe(s) for s in spec.specs)
    return _NAMES.get(spec, getattr(spec, "__name__", repr(spec)))


def _is_scalar(value: Any, spec: Any) -> bool:
    if spec is object:
        return True
    if spec is None:
        return value is None
    if spec is int:
        return type(value) is int
    if spec is float:
        return type(value) in (int, float)
    if spec in (str, bool, dict, list):
        return type(value) is spec
    raise TypeError(f"not a schema spec: {spec!r}")


def _problem(value: Any, spec: Any, key: str) -> str | None:
    """Why ``value`` at ``key`` does not match ``spec``, or None."""
    if isinstance(spec, OneOf):
        if any(_problem(value, s, key) is None for s in spec.specs):
            return None
    elif isinstance(spec, list):
        if type(value) is list:
            return next((p for i, v in enumerate(value) if (p := _problem(v, spec[0], f"{key}[{i}]"))), None)
    elif isinstance(spec, tuple):
        if type(value) is list and len(value) == len(spec):
            return next((p for i, (v, s) in enumerate(zip(value, spec, strict=True))
                         if (p := _problem(v, s, f"{key}[{i}]"))), None)
    elif isinstance(spec, DictOf):
        if type(value) is dict:
            return next((p for k, v in value.items() if (p := _problem(v, spec.spec, _join(key, k)))), None)
    elif isinstance(spec, dict):
        if type(value) is dict:
            return _dict_problem(value, spec, key)
    elif _is_scalar(value, spec):
        return None
    return f"{key or 'the top level'} must be {_describe(spec)}, got {_short(value)}"


def _dict_problem(value: dict[str, Any], spec: dict[str, Any], key: str) -> str | None:
    for name, sub in spec.items():
        if name not in value:
            if isinstance(sub, Optional):
                continue
            return f"{_join(key, name)} is missing"
        p = _problem(value[name], sub.spec if isinstance(sub, Optional) else sub, _join(key, name))
        if p is not None:
            return p
    return None


def _join(key: str, name: str) -> str:
    name = str(name) if str(name).isprintable() else repr(name)  # a key from the file: one line, always
    return f"{key}.{name}" if key else name


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def problem(value: Any, spec: Any) -> str | None:
    """Why ``value`` does not match ``spec`` (naming the key), or None when it does."""
    return _problem(value, spec, "")


def check(value: Any, spec: Any, where: str) -> Any:
    """``value`` if it matches ``spec``, else a ValueError ``"{where}: {problem}"``."""
    p = problem(value, spec)
    if p is not None:
        raise ValueError(f"{where}: {p}")
    return value
