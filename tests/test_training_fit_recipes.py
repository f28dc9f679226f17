"""training/fit.py's recipes for --data without a preset: EMA warm-up on for the non-paper recipe;
the paper presets keep the paper's EMA, and the digits preset stays as it was (its weights too)."""

from __future__ import annotations

import math

import pytest

from ddpmkit.config import TRAIN_PRESETS, train_preset
from ddpmkit.training.fit import NetSize, config_for_data
from ddpmkit.training.state import ema_decay_at, ema_initial_weight


def test_the_small_recipe_warms_its_ema_up():
    c = config_for_data("folder", 16, 3, NetSize.SMALL)
    assert c.ema_warmup and c.ema_decay == 0.998


@pytest.mark.parametrize("name", sorted(TRAIN_PRESETS))
def test_presets_keep_their_ema(name):
    assert not train_preset(name).ema_warmup


def test_the_paper_network_keeps_the_papers_recipe():
    c = config_for_data("folder", 32, 3, NetSize.PAPER)
    assert (c.ema_warmup, c.ema_decay) == (False, 0.9999)


def test_initial_weight_share():
    c = train_preset("digits")
    assert math.isclose(ema_initial_weight(c, 110), 0.998 ** 110)
    warm = config_for_data("folder", 16, 3, NetSize.SMALL)
    assert ema_decay_at(warm, 0) == 0.0 and ema_initial_weight(warm, 1) == 0.0
    assert ema_initial_weight(warm, 0) == 1.0
