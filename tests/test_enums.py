"""One enum parser, one message. Every place that turns a user's name into a mode or a
registry entry refuses an unknown one with ``unknown <what> 'x'; choose one of a, b, c``."""

from __future__ import annotations

import re

import pytest
import torch

from ddpmkit import config
from ddpmkit.config import TrainConfig, apply_overrides, train_preset
from ddpmkit.data import OnBadImage, open_source
from ddpmkit.diffusion import DiffusionConfig, GaussianDiffusion
from ddpmkit.distributions import discretized_gaussian_log_likelihood
from ddpmkit.enums import parse_enum, unknown_choice
from ddpmkit.nn import UNet
from ddpmkit.schedules import get_named_beta_schedule

ONE_FORMAT = re.compile(r"^unknown (?P<what>.+) 'x'; choose one of (?P<names>[^\[\]'\"]+)$")


def _diffusion():
    return GaussianDiffusion(betas=[0.1, 0.2])


CALLERS = {
    "mean_type": lambda: GaussianDiffusion(betas=[0.1, 0.2], mean_type="x"),
    "var_type (config)": lambda: DiffusionConfig(var_type="x"),
    "beta schedule (config)": lambda: DiffusionConfig(schedule="x"),
    "beta schedule": lambda: get_named_beta_schedule("x", 10),
    "cdf": lambda: discretized_gaussian_log_likelihood(torch.zeros(1), means=torch.zeros(1),
                                                       log_scales=torch.zeros(1), cdf="x"),
    "precision": lambda: TrainConfig(precision="x"),
    "on_bad_image (config)": lambda: TrainConfig(on_bad_image="x"),
    "--set enum": lambda: apply_overrides(train_preset("digits"), {"diffusion.loss_type": "x"}),
    "config key": lambda: apply_overrides(train_preset("digits"), {"x": "1"}),
    "preset": lambda: train_preset("x"),
    "U-Net preset": lambda: UNet.from_preset("x"),
    "split": lambda: open_source("digits", resolution=8, channels=1, split="x"),
    "on_bad_image": lambda: open_source("digits", resolution=8, channels=1, on_bad_image="x"),
}


@pytest.mark.parametrize("name", list(CALLERS))
def test_every_parser_refuses_with_the_one_message(name):
    with pytest.raises(ValueError) as e:
        CALLERS[name]()
    # "--set" prefixes "bad value ... for k: "
    message = str(e.value).split(": ", 1)[-1] if name == "--set enum" else str(e.value)
    m = ONE_FORMAT.match(message)
    assert m, f"{name}: {message!r} is not in the one format"
    assert "x" not in m["names"].split(", ")


def test_sampling_parsers_use_it():
    from ddpmkit.chains import _parse_encoder
    from ddpmkit.sampling import sample

    for call in (lambda: _parse_encoder("x"),
                 lambda: sample(lambda a, b: a, _diffusion(), (1, 1, 2, 2), sampler="x", steps=1)):
        with pytest.raises(ValueError) as e:
            call()
        assert ONE_FORMAT.match(str(e.value)), str(e.value)


def test_the_helper_lists_the_allowed_values_in_order_and_accepts_members_and_values():
    expected = "unknown size 'x'; choose one of tiny, small"
    assert str(unknown_choice("size", "x", ["tiny", "small"])) == expected
    assert parse_enum(OnBadImage, "error", "on_bad_image") is OnBadImage.ERROR
    assert parse_enum(OnBadImage, OnBadImage.SKIP, "on_bad_image") is OnBadImage.SKIP
    with pytest.raises(ValueError, match=r"^unknown on_bad_image 'x'; choose one of skip, error$"):
        parse_enum(OnBadImage, "x", "on_bad_image")


def test_one_bad_image_enum():
    assert [k for k, v in vars(config).items() if v is OnBadImage] == ["OnBadImage"]  # one name
    assert TrainConfig(on_bad_image="error").on_bad_image is OnBadImage.ERROR
