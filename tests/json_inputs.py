"""Hypothesis settings and strategies of JSON values and bytes, for the property tests of the readers."""

from __future__ import annotations

import copy
import json
import os

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

# CI draws the same examples every run (a landing does not hang on a lucky draw); a developer's run
# explores new ones each time
FAST = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow],
                derandomize=bool(os.environ.get("CI")))


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=12,
)


json_bytes = st.one_of(
    json_values.map(lambda v: json.dumps(v).encode()),
    st.binary(max_size=200),
    st.integers(1, 3000).map(lambda d: b"[" * d + b"]" * d),
    st.integers(1, 3000).map(lambda d: b'{"a":' * d + b"1" + b"}" * d),
)


def one_line(err: ValueError) -> None:
    assert "\n" not in str(err), str(err)


def _paths(value, prefix=()):
    """Every key path into a JSON value."""
    yield prefix
    if isinstance(value, dict):
        for k, v in value.items():
            yield from _paths(v, (*prefix, k))
    elif isinstance(value, list) and len(value) <= 8:  # the 624-word RNG lists: their container only
        for i, v in enumerate(value):
            yield from _paths(v, (*prefix, i))


def _replaced(value, path, new):
    if not path:
        return new
    out = copy.copy(value)
    out[path[0]] = _replaced(value[path[0]], path[1:], new)
    return out


def same_json(value, expected) -> bool:
    """``value`` (read from a file) states ``expected``: equal, with a bool only where a bool is and an
    int where an int is (a float where a float is may be written as an int: JSON has one number)."""
    if isinstance(value, bool) or isinstance(expected, bool):
        return type(value) is type(expected) and value == expected
    if isinstance(expected, (int, float)):
        return type(value) in ((int,) if isinstance(expected, int) else (int, float)) and value == expected
    if isinstance(expected, dict):
        return (isinstance(value, dict) and value.keys() == expected.keys()
                and all(same_json(value[k], expected[k]) for k in expected))
    if isinstance(expected, (list, tuple)):
        return (isinstance(value, list) and len(value) == len(expected)
                and all(same_json(v, e) for v, e in zip(value, expected, strict=True)))
    return value == expected


def json_twins(value):
    """Values that Python compares equal to ``value`` but JSON types otherwise (1, 1.0, true)."""
    if isinstance(value, bool):
        return st.sampled_from([int(value), float(value)])
    if isinstance(value, int):
        return st.sampled_from([float(value), bool(value)] if value in (0, 1) else [float(value)])
    if isinstance(value, float) and value.is_integer() and abs(value) < 2**53:
        return st.just(int(value))
    return st.nothing()


def _at(value, path):
    for k in path:
        value = value[k]
    return value


@st.composite
def edited(draw, valid):
    """``valid`` with one value (anywhere in it) replaced by any JSON value or by a twin of the
    value there (``json_twins``), or one object key removed."""
    where = draw(st.sampled_from(sorted(_paths(valid), key=str)))
    if where and isinstance(_at(valid, where[:-1]), dict) and draw(st.integers(0, 5)) == 0:
        parent = dict(_at(valid, where[:-1]))
        del parent[where[-1]]
        return _replaced(valid, where[:-1], parent)
    return _replaced(valid, where, draw(json_values | json_twins(_at(valid, where))))


def json_files(valid):
    """The bytes of a JSON file that a reader of files like ``valid`` may meet: ``valid`` itself, an
    ``edited`` copy, or ``json_bytes`` (any JSON, any bytes, deep nesting)."""
    return st.one_of(st.just(valid), edited(valid), edited(valid), json_bytes).map(
        lambda v: v if isinstance(v, bytes) else json.dumps(v).encode())
