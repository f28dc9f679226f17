"""Issue 27.11 and 27.14: a user's --config file and --set values are checked field by field, types
included, as one line naming the key; the four unclear values are refused."""

from __future__ import annotations

import json

import pytest

from ddpmkit.cli import main
from ddpmkit.config import TrainConfig, apply_overrides, config_from_partial_dict, load_config, train_preset

BAD_FILES = [
    ({"random_flip": "no"}, "random_flip must be a bool"),
    ({"lr": "0.001"}, "lr must be a number"),
    ({"steps": 1.5}, "steps must be an int"),
    ({"steps": True}, "steps must be an int"),
    ({"seed": "0"}, "seed must be an int"),
    ({"adam_betas": "0.9,0.999"}, "adam_betas must be"),
    ({"adam_betas": [0.9, "x"]}, "adam_betas[1] must be a number"),
    ({"data": 3}, "data must be a string or null"),
    ({"precision": 16}, "precision must be a string"),
    ({"unet": {"ch": "64"}}, "unet.ch must be an int"),
    ({"unet": {"ch_mult": 2}}, "unet.ch_mult must be a list"),
    ({"unet": {"dropout": None}}, "unet.dropout must be a number"),
    ({"unet": []}, "unet must be an object"),
    ({"diffusion": {"num_timesteps": "1000"}}, "diffusion.num_timesteps must be an int"),
    ({"diffusion": {"beta_end": [0.02]}}, "diffusion.beta_end must be a number"),
    ({"diffusion": {"var_type": 1}}, "diffusion.var_type must be a string"),
    ({"ema_warmup": 1}, "ema_warmup must be a bool"),
    ({"preset": 7}, "preset must be a string"),
]


@pytest.mark.parametrize(("content", "words"), BAD_FILES)
def test_a_config_file_of_the_wrong_type_is_one_line_naming_the_key(tmp_path, content, words):
    path = tmp_path / "c.json"
    path.write_text(json.dumps(content))
    with pytest.raises(ValueError) as err:
        load_config(path)
    assert words in str(err.value) and str(path) in str(err.value)


@pytest.mark.parametrize(("content", "words"), BAD_FILES[:3])
def test_the_cli_prints_it_as_one_line(tmp_path, capsys, content, words):
    path = tmp_path / "c.json"
    path.write_text(json.dumps(content))
    assert main(["train", "--config", str(path), "--steps", "1", "--output-dir", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and words in err and "Traceback" not in err


def test_a_good_config_file_still_loads(tmp_path):
    cfg = train_preset("digits")
    path = tmp_path / "c.json"
    path.write_text(json.dumps(cfg.to_dict()))
    assert load_config(path) == cfg
    assert config_from_partial_dict({"lr": 1, "unet": {"ch": 32}}).lr == 1.0


@pytest.mark.parametrize(("key", "value", "words"), [
    ("seed", str(10**22), "seed must be an int in [0, 9223372036854775807]"),
    ("diffusion.beta_start", "0.05", "beta_start"),
    ("adam_eps", "inf", "adam_eps must be a float > 0"),
    ("adam_eps", "0", "adam_eps must be a float > 0"),
])
def test_the_unclear_values_are_refused_naming_the_key(key, value, words):
    with pytest.raises(ValueError, match=words.replace("[", r"\[").replace("]", r"\]")):
        apply_overrides(train_preset("digits"), {key: value})


def test_a_set_value_of_the_wrong_type_is_refused():
    with pytest.raises(ValueError, match="random_flip must be a bool"):
        TrainConfig(random_flip="no")
    with pytest.raises(ValueError, match="lr must be"):
        TrainConfig(lr="0.001")


def test_a_state_json_world_size_string_is_refused():
    from ddpmkit.schema import problem
    from ddpmkit.training.state import STATE_SCHEMA

    spec = {k: STATE_SCHEMA[k] for k in ("step", "config", "world_size")}
    assert "world_size must be an int" in problem({"step": 1, "config": {}, "world_size": "1"}, spec)
