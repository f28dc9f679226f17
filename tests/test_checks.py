"""ddpmkit.checks: the one int / float argument checker."""

import math

import numpy as np
import pytest

from ddpmkit.checks import check_float, check_int, is_int
from ddpmkit.diffusion import LossType, VarType


@pytest.mark.parametrize("v, ok", [(3, True), (np.int64(3), True), (True, False), (np.bool_(True), False),
                                   (3.0, False), ("3", False), (None, False)])
def test_is_int_refuses_bools_and_floats(v, ok):
    assert is_int(v) is ok


def test_check_int_messages_name_the_range():
    assert check_int(np.int32(4), "n", low=1) == 4 and type(check_int(np.int32(4), "n", low=1)) is int
    with pytest.raises(ValueError, match=r"^n must be a positive int, got True$"):
        check_int(True, "n", low=1)
    with pytest.raises(ValueError, match=r"^padding must be an int >= 0, got -1$"):
        check_int(-1, "padding", low=0)
    with pytest.raises(ValueError, match=r"^steps must be an int in \[1, 50\] \(T = 50\), got 51$"):
        check_int(51, "steps", low=1, high=50, hint="(T = 50)")
    assert check_int(50, "steps", low=1, high=50) == 50


def test_check_float_refuses_non_finite_and_bools():
    assert check_float(0, "eta", low=0) == 0.0
    for bad in (math.inf, math.nan, True, "0.1", -0.5):
        with pytest.raises(ValueError, match=r"^eta must be a float >= 0, got "):
            check_float(bad, "eta", low=0)
    with pytest.raises(ValueError, match=r"^ema_decay must be a float in \(0, 1\], got 0$"):
        check_float(0, "ema_decay", low=0, high=1, low_open=True)


def test_mode_properties_live_on_the_enums():
    assert [v.is_learned for v in VarType] == [False, False, True, True]
    assert [t.is_vb for t in LossType] == [False, True, True, False]
