"""The one argument checker: ints (never bools) and finite floats in a range, as one ValueError each.

Every public boundary that takes a count, an index or a coefficient from a user calls these, so
each refusal reads the same: ``steps must be an int in [1, 50], got 0``. Imports nothing of
ddpmkit, so the math, the network and the layers above may all use it.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

__all__ = ["check_float", "check_int", "is_int"]


def is_int(value: Any) -> bool:
    """True for a Python or numpy int; False for a bool (which Python counts as an int)."""
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def _range_text(kind: str, low: float | None, high: float | None) -> str:
    if low is not None and high is not None:
        return f"{kind} in [{low}, {high}]"
    if low == 1 and kind == "an int":
        return "a positive int"
    if low is not None:
        return f"{kind} >= {low}"
    if high is not None:
        return f"{kind} <= {high}"
    return kind


def check_int(value: Any, name: str, *, low: int | None = None, high: int | None = None,
              hint: str = "") -> int:
    """``value`` as an int in [low, high] (either end open when None), else a ValueError naming it.

    ``hint`` is appended to the expectation, e.g. ``"(the model's T = 1000)"``.
    """
    if not is_int(value) or (low is not None and value < low) or (high is not None and value > high):
        expected = _range_text("an int", low, high) + (f" {hint}" if hint else "")
        raise ValueError(f"{name} must be {expected}, got {value!r}")
    return int(value)


def check_float(value: Any, name: str, *, low: float | None = None, high: float | None = None,
                low_open: bool = False, hint: str = "") -> float:
    """``value`` as a finite float in [low, high] ((low, high] with ``low_open``), else a ValueError.

    Ints are accepted as floats; bools, strings, NaN and infinities are not.
    """
    ok = isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, (bool, np.bool_))
    v = float(value) if ok else math.nan
    if (not math.isfinite(v) or (low is not None and (v <= low if low_open else v < low))
            or (high is not None and v > high)):
        if low is not None and high is not None:
            expected = f"a float in {'(' if low_open else '['}{low}, {high}]"
        elif low is not None:
            expected = f"a float {'>' if low_open else '>='} {low}"
        else:
            expected = _range_text("a float", None, high)
        expected += f" {hint}" if hint else ""
        raise ValueError(f"{name} must be {expected}, got {value!r}")
    return v
