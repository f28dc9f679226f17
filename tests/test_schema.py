"""ddpmkit.schema: a message names the key, in one line whatever the key holds."""

from __future__ import annotations

import pytest
from hypothesis import given
from json_inputs import FAST, json_values, one_line

from ddpmkit.schema import DictOf, check


def test_a_key_with_a_newline_is_named_in_one_line():
    with pytest.raises(ValueError) as err:
        check({"rng": {"\n": None}}, {"rng": DictOf(dict)}, "state.json")
    assert str(err.value) == r"state.json: rng.'\n' must be an object, got None"


@FAST
@given(value=json_values)
def test_every_problem_is_one_line(value):
    try:
        check({"a": value}, {"a": DictOf({"b": [int]})}, "f.json")
    except ValueError as e:
        one_line(e)
