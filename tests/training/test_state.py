"""What a checkpoint holds of a run (training.state): the EMA warm-up decay, state.json read back."""

from __future__ import annotations

import dataclasses

import pytest
from tiny_runs import config

from ddpmkit.training.state import ema_decay_at


# ------------------------------------------------------------------------- EMA warm-up
def test_ema_warmup_decay_is_diffusers_closed_form(noise_npz):
    c = config(noise_npz, ema_warmup="true", ema_decay=0.9999, ema_inv_gamma=1.0, ema_power=0.75)
    for s in (0, 1, 10, 1000, 10**6):
        want = min(0.9999, 1 - (1 + s) ** -0.75)
        assert ema_decay_at(c, s) == pytest.approx(want, rel=1e-12, abs=0), s
    assert ema_decay_at(c, 0) == 0.0 and ema_decay_at(c, 10**6) == 0.9999  # the cap
    c2 = dataclasses.replace(c, ema_inv_gamma=4.0, ema_power=2 / 3, ema_min_decay=0.1)
    assert ema_decay_at(c2, 0) == 0.1 and ema_decay_at(c2, 8) == pytest.approx(1 - 3 ** (-2 / 3), rel=1e-12)
    assert ema_decay_at(dataclasses.replace(c, ema_warmup=False), 0) == 0.9999  # off: the constant
