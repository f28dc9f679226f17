"""The one way a name given by a user becomes a mode (an Enum member) or a registry entry.

Every parser (config fields, ``--set``, the CLI, the math's constructors, the data sources) goes
through ``parse_enum`` or ``unknown_choice``, so every refusal reads the same:
``unknown var_type 'x'; choose one of fixedlarge, fixedsmall, learned, learned_range``.
Imports nothing of ddpmkit, so the math, the network and the layers above may all use it.
"""

from __future__ import annotations

from collections.abc import Iterable
from enum import Enum
from typing import Any, TypeVar

__all__ = ["parse_enum", "unknown_choice"]

_E = TypeVar("_E", bound=Enum)


def unknown_choice(what: str, value: Any, allowed: Iterable[Any]) -> ValueError:
    """The error for ``value`` not among ``allowed`` (listed in the given order)."""
    names = ", ".join(str(getattr(a, "value", a)) for a in allowed)
    return ValueError(f"unknown {what} {value!r}; choose one of {names}")


def parse_enum(enum_cls: type[_E], value: Any, what: str) -> _E:
    """``enum_cls(value)`` for a member or a member's value, else ``unknown_choice``'s ValueError."""
    if isinstance(value, enum_cls):
        return value
    allowed = [m.value for m in enum_cls]
    if value not in allowed:
        raise unknown_choice(what, value, allowed)
    return enum_cls(value)
