"""TrainConfig: the paper's recipe in the presets, JSON round trips, overrides, deviations."""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import shutil
import tempfile
import time
from pathlib import Path

import pytest
from hypothesis import event, given
from json_inputs import FAST, json_files, one_line, same_json
from tiny_runs import config, tiny_config

from ddpmkit.cli import main
from ddpmkit.config import (
    TRAIN_PRESETS,
    Precision,
    TrainConfig,
    apply_overrides,
    changed_on_resume,
    config_from_partial_dict,
    deviations_from_paper,
    load_config,
    parse_overrides,
    save_config,
    train_preset,
)
from ddpmkit.data import OnBadImage
from ddpmkit.diffusion import LossType, MeanType, VarType


def _assert_paper_diffusion(c: TrainConfig) -> None:
    d = c.diffusion
    assert (d.schedule, d.num_timesteps, d.beta_start, d.beta_end) == ("linear", 1000, 1e-4, 0.02)
    assert d.mean_type is MeanType.EPS and d.loss_type is LossType.MSE


def test_cifar10_preset_is_the_papers_recipe():
    c = train_preset("cifar10")
    assert (c.lr, c.warmup_steps, c.grad_clip, c.ema_decay) == (2e-4, 5000, 1.0, 0.9999)
    assert (c.adam_betas, c.adam_eps) == ((0.9, 0.999), 1e-8)
    assert (c.batch_size, c.random_flip, c.steps) == (128, True, 800_000)
    assert c.precision is Precision.FP32
    u = c.unet
    assert (u.resolution, u.ch, u.ch_mult, u.num_res_blocks, u.attn_resolutions, u.dropout) == (
        32, 128, (1, 2, 2, 2), 2, (16,), 0.1)
    _assert_paper_diffusion(c)
    assert c.diffusion.var_type is VarType.FIXED_LARGE


@pytest.mark.parametrize("name", ["celebahq256", "lsun256"])
def test_256_presets_are_the_papers_recipe(name):
    c = train_preset(name)
    assert (c.lr, c.batch_size, c.warmup_steps, c.grad_clip, c.ema_decay, c.random_flip) == (
        2e-5, 64, 5000, 1.0, 0.9999, True)
    u = c.unet
    assert (u.resolution, u.ch, u.ch_mult, u.attn_resolutions, u.dropout) == (
        256, 128, (1, 1, 2, 2, 4, 4), (16,), 0.0)
    _assert_paper_diffusion(c)
    assert c.diffusion.var_type is VarType.FIXED_SMALL  # the 256 models sample with beta-tilde


@pytest.mark.parametrize("name", ["cifar10", "celebahq256", "lsun256"])
def test_paper_presets_have_no_deviations(name):
    assert deviations_from_paper(train_preset(name)) == []


def test_deviations_name_each_changed_recipe_setting_and_skip_bookkeeping():
    c = apply_overrides(train_preset("cifar10"), {
        "lr": "1e-4", "unet.dropout": "0", "diffusion.num_timesteps": "500", "precision": "bf16",
        "seed": "7", "checkpoint_every": "10", "data": "/some/folder",  # bookkeeping: not deviations
    })
    devs = deviations_from_paper(c)
    assert len(devs) == 4, devs
    assert {d.split()[0] for d in devs} == {"lr", "unet.dropout", "diffusion.num_timesteps", "precision"}
    assert "lr 0.0001 (paper's cifar10: 0.0002)" in devs


def test_digits_deviations_are_listed_against_cifar10():
    devs = deviations_from_paper(train_preset("digits"))
    keys = {d.split()[0] for d in devs}
    assert {"steps", "lr", "ema_decay", "unet.resolution", "unet.in_channels", "random_flip"} <= keys
    assert all("paper's cifar10" in d for d in devs)


@pytest.mark.parametrize("name", sorted(TRAIN_PRESETS))
def test_json_round_trip(name, tmp_path):
    c = train_preset(name)
    assert TrainConfig.from_dict(json.loads(json.dumps(c.to_dict()))) == c
    path = save_config(c, tmp_path / "config.json")
    assert load_config(path) == c


def test_partial_config_file_takes_the_rest_from_its_preset(tmp_path):
    (tmp_path / "c.json").write_text(json.dumps({"preset": "digits", "lr": 5e-4, "unet": {"ch": 32}}))
    c = load_config(tmp_path / "c.json")
    ref = train_preset("digits")
    assert c.lr == 5e-4 and c.unet.ch == 32
    assert c.unet.ch_mult == ref.unet.ch_mult and c.steps == ref.steps and c.ema_decay == ref.ema_decay
    assert config_from_partial_dict({"lr": 1e-3}) == dataclasses.replace(TrainConfig(), lr=1e-3)


def test_overrides_parse_to_the_fields_types():
    c = apply_overrides(train_preset("cifar10"), parse_overrides([
        "unet.ch_mult=1,2", "unet.attn_resolutions=", "random_flip=false", "batch_size=32",
        "diffusion.mean_type=x0", "adam_betas=(0.5, 0.9)", "on_bad_image=error", "data=none",
        "unet.resolution=8",
    ]))
    assert c.unet.ch_mult == (1, 2) and c.unet.attn_resolutions == ()
    assert c.random_flip is False and c.batch_size == 32 and c.adam_betas == (0.5, 0.9)
    assert c.diffusion.mean_type is MeanType.X0 and c.on_bad_image is OnBadImage.ERROR
    assert c.data is None
    # typed values pass through
    assert apply_overrides(c, {"steps": 12, "precision": Precision.BF16}).steps == 12


@pytest.mark.parametrize("items, match", [
    (["nope=1"], "unknown config key 'nope'"),
    (["unet.nope=1"], "unknown config key 'unet.nope'"),
    (["optim.lr=1"], "unknown config group"),
    (["batch_size=abc"], "bad value 'abc' for batch_size"),
    (["precision=fp8"], "bad value 'fp8' for precision"),
    (["lr"], "expected KEY=VALUE"),
    (["batch_size=0"], "batch_size must be an integer >= 1"),
    (["ema_decay=1.5"], r"ema_decay must be in \[0, 1\)"),
    (["unet.ch=48"], "multiple of 32"),
])
def test_bad_overrides_are_clear_value_errors(items, match):
    with pytest.raises(ValueError, match=match):
        apply_overrides(train_preset("cifar10"), parse_overrides(items))


def test_changed_on_resume_allows_only_bookkeeping_and_length():
    c = train_preset("digits")
    ok = apply_overrides(c, {"steps": "99999", "checkpoint_every": "5", "num_workers": "2"})
    assert changed_on_resume(c, ok) == []
    bad = apply_overrides(c, {"lr": "1e-5", "unet.ch": "128", "seed": "3"})
    assert sorted(changed_on_resume(c, bad)) == ["lr", "seed", "unet.ch"]


def test_a_deeply_nested_config_file_is_one_line(tmp_path, capsys):
    from ddpmkit.cli import main

    path = tmp_path / "config.json"
    path.write_text("[" * 100000)
    assert main(["train", "--config", str(path), "-o", str(tmp_path / "run"), "--steps", "1"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "config.json: JSON nested deeper than" in err, err


@pytest.mark.parametrize("key,value,message", [
    ("grad_accum", 0, "grad_accum must be an integer >= 1, got 0"),
    ("grad_accum", 3, "batch_size 8 must be divisible by grad_accum 3"),
    ("lr_schedule", "step", "unknown lr_schedule 'step'; choose one of constant, linear, cosine"),
    ("logger", "mlflow", "unknown logger 'mlflow'; choose one of none, tensorboard, wandb"),
    ("lr_min", 1.0, "lr_min must be in [0, lr=0.001], got 1.0"),
    ("ema_power", 0.0, "ema_power must be a finite number > 0, got 0.0"),
    ("ema_inv_gamma", -1.0, "ema_inv_gamma must be a finite number > 0, got -1.0"),
    ("ema_min_decay", 0.9, "ema_min_decay must be in [0, ema_decay=0.75], got 0.9"),
    ("ema_warmup", 1, "ema_warmup must be a bool, got 1"),
])
def test_bad_values_are_one_line_value_errors(noise_npz, key, value, message):
    base = config(noise_npz)
    with pytest.raises(ValueError, match=r"^" + message.replace("[", r"\[").replace("(", r"\(") + "$"):
        dataclasses.replace(base, **{key: value})


# ------------------------------------------------------------------------- 9: non-finite update results
def test_lr_inf_is_refused_up_front(tiny_npz):
    for lr in ("inf", "nan"):
        with pytest.raises(ValueError, match="lr must be"):
            tiny_config(tiny_npz, lr=lr)


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


def _one_line_fast(capsys, argv, *words):
    t0 = time.perf_counter()
    assert main(argv) == 2
    assert time.perf_counter() - t0 < 10
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    for w in words:
        assert w in err, err


def test_a_model_folder_with_a_million_res_blocks_is_refused_at_once(tiny_model_dir, tmp_path, capsys):
    model = tmp_path / "m"
    shutil.copytree(tiny_model_dir, model)
    cfg = json.loads((model / "config.json").read_text())
    cfg["unet"]["num_res_blocks"] = 10**6
    (model / "config.json").write_text(json.dumps(cfg))
    _one_line_fast(capsys, ["sample", str(model), "--n", "1", "--output-dir", str(tmp_path / "s"),
                            "--device", "cpu"], "num_res_blocks")


def test_a_diffusers_folder_with_a_million_layers_per_block_is_refused_at_once(tiny_model_dir, tmp_path,
                                                                                capsys):
    hf = tmp_path / "hf"
    assert main(["convert", "--to-diffusers", str(tiny_model_dir), "--out", str(hf)]) == 0
    capsys.readouterr()
    path = next(p for p in hf.rglob("config.json") if "layers_per_block" in p.read_text())
    cfg = json.loads(path.read_text())
    cfg["layers_per_block"] = 10**6
    path.write_text(json.dumps(cfg))
    _one_line_fast(capsys, ["sample", str(hf), "--n", "1", "--output-dir", str(tmp_path / "s"),
                            "--device", "cpu"], "num_res_blocks")


@pytest.mark.parametrize(("flag", "value", "key"), [
    ("--num-samples", "100000000", "num_samples"), ("--num-threads", "1000000000", "num_threads"),
    ("--num-threads", "100000000", "num_threads"), ("--num-workers", "1000000", "num_workers"),
])
def test_a_huge_train_flag_is_refused_before_training(tmp_path, capsys, flag, value, key):
    _one_line_fast(capsys, ["train", "--preset", "digits", "--steps", "1", flag, value, "--output-dir",
                            str(tmp_path / "r")], key)
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("key", ["ch", "num_res_blocks"])
def test_unet_sizes_are_bounded(key):
    from ddpmkit.nn import UNetConfig

    with pytest.raises(ValueError, match=key):
        UNetConfig(resolution=8, **{key: 2**20 * 32})
    with pytest.raises(ValueError, match="ch_mult"):
        UNetConfig(resolution=8, ch_mult=(1,) * 100)
    assert TrainConfig(num_threads=64, num_samples=1024).num_threads == 64


def _stated(file_value, config_value) -> bool:
    """The loaded config holds what the file said, of its JSON types (nested objects key by key)."""
    if isinstance(file_value, dict) and isinstance(config_value, dict):
        return all(k in config_value and _stated(v, config_value[k]) for k, v in file_value.items())
    return same_json(file_value, config_value)


@FAST
@given(content=json_files(train_preset("digits").to_dict()))
def test_a_config_file_loads_as_written_or_is_one_line_at_exit_2(tmp_path_factory, content):
    """Whatever ``--config FILE`` holds, it loads to a config holding exactly the values it states,
    or is a one-line ValueError; ``ddpm train --config FILE`` exits 0 or 2 with one line."""
    path = Path(tempfile.mkdtemp(dir=tmp_path_factory.getbasetemp())) / "config.json"
    path.write_bytes(content)
    try:
        loaded = load_config(path)
    except ValueError as e:
        event("refused")
        one_line(e)
    else:
        event("loaded")
        assert _stated(json.loads(content), loaded.to_dict()), loaded
    err, out = io.StringIO(), io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
        code = main(["train", "--config", str(path), "--print-config", "-o", str(path.parent / "r")])
    assert code in (0, 2) and (code == 0) == (err.getvalue() == ""), err.getvalue()
    assert code == 0 or err.getvalue().count("\n") == 1 and "Traceback" not in err.getvalue(), err.getvalue()
