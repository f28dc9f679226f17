"""ddpmkit.models: our model folder round-trips; run directories (EMA / raw); diffusers folders;
broken, truncated, mismatched or non-finite files refused with the file named."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from diffusers import UNet2DModel
from safetensors.torch import load_file, save_file
from stand_ins import randomize_

from ddpmkit.cli import EXIT_USER_ERROR, main
from ddpmkit.config import apply_overrides, train_preset
from ddpmkit.diffusion import DiffusionConfig, LossType, MeanType, VarType
from ddpmkit.models import LoadedModel, load_model, load_unet
from ddpmkit.nn import UNet, UNetConfig
from ddpmkit.train import EventKind, train

SMALL = UNetConfig(resolution=16, ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(8,), dropout=0.1)
DIFFUSION = DiffusionConfig(
    schedule="cosine", num_timesteps=400, mean_type=MeanType.X0, var_type=VarType.FIXED_SMALL
)


def small_unet(seed: int = 0, **overrides) -> UNet:
    return randomize_(UNet(config=SMALL.replace(**overrides)), seed)


def same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_our_folder_round_trips(tmp_path):
    unet = small_unet()
    assert unet.save(tmp_path / "m", diffusion=DIFFUSION) == tmp_path / "m"
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    assert config["format"] == "ddpmkit.model" and config["version"] == 1
    assert config["unet"] == SMALL.to_dict()
    assert config["diffusion"] == DIFFUSION.to_dict()
    assert set(load_file(tmp_path / "m" / "model.safetensors")) == set(unet.state_dict())

    loaded = load_model(tmp_path / "m")
    assert isinstance(loaded, LoadedModel)
    assert loaded.unet.config == SMALL and loaded.diffusion == DIFFUSION
    assert loaded.source == str(tmp_path / "m")
    assert not loaded.unet.training  # eval mode: dropout off
    assert same_weights(loaded.unet, unet)
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([1, 300])
    with torch.no_grad():
        torch.testing.assert_close(loaded.unet(x, t), unet.eval()(x, t), rtol=0, atol=0)
    assert same_weights(load_unet(tmp_path / "m"), unet)


def test_saving_again_overwrites_and_accepts_a_dict(tmp_path):
    small_unet(seed=0).save(tmp_path / "m")
    second = small_unet(seed=1)
    second.save(tmp_path / "m", diffusion=DIFFUSION.to_dict())
    assert same_weights(load_unet(tmp_path / "m"), second)
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["config.json", "model.safetensors"]


def test_channels_last_weights_save_and_load(tmp_path):
    unet = small_unet().to(memory_format=torch.channels_last)
    unet.save(tmp_path / "m")
    assert same_weights(load_unet(tmp_path / "m"), unet)


def test_a_folder_without_diffusion_gets_the_papers_defaults(tmp_path):
    small_unet().save(tmp_path / "m")
    assert load_model(tmp_path / "m").diffusion == DiffusionConfig()
    small_unet(learned_variance=True).save(tmp_path / "lv")
    with pytest.raises(ValueError, match="learned-variance U-Net needs its diffusion settings"):
        load_model(tmp_path / "lv")
    assert load_unet(tmp_path / "lv").config.learned_variance


def test_run_directory_ema_and_raw(tmp_path):
    ema, raw = small_unet(seed=0), small_unet(seed=1)
    run = tmp_path / "run"
    ema.save(run / "model", diffusion=DIFFUSION)
    raw.save(run / "model_raw", diffusion=DIFFUSION)
    (run / "checkpoints").mkdir()
    assert same_weights(load_unet(run), ema)
    assert same_weights(load_model(run).unet, ema)
    loaded = load_model(run, ema=False)
    assert same_weights(loaded.unet, raw) and loaded.source == str(run / "model_raw")
    assert loaded.diffusion == DIFFUSION
    with pytest.raises(ValueError, match="ema=False needs a training run directory"):
        load_model(run / "model", ema=False)


def test_run_directory_without_weights_is_a_clear_error(tmp_path):
    (tmp_path / "run" / "model").mkdir(parents=True)
    with pytest.raises(ValueError, match="run directory has no readable model/config.json"):
        load_model(tmp_path / "run")


def test_diffusers_folders_flat_and_pipeline(tmp_path):
    config = {
        "sample_size": 16, "block_out_channels": [32, 64], "layers_per_block": 1,
        "down_block_types": ["DownBlock2D", "AttnDownBlock2D"],
        "up_block_types": ["AttnUpBlock2D", "UpBlock2D"],
        "attention_head_dim": None, "norm_eps": 1e-6, "flip_sin_to_cos": False, "freq_shift": 1,
        "downsample_padding": 0,
    }  # fmt: skip
    ref = randomize_(UNet2DModel(**config)).eval()
    ref.save_pretrained(tmp_path / "flat")
    ref.save_pretrained(tmp_path / "pipe" / "unet")
    (tmp_path / "pipe" / "scheduler").mkdir()
    (tmp_path / "pipe" / "scheduler" / "scheduler_config.json").write_text(
        json.dumps(
            {"_class_name": "DDPMScheduler", "variance_type": "fixed_large", "beta_schedule": "linear"}
        )
    )
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([0, 999])
    with torch.no_grad():
        expected = ref(x, t).sample
    for folder in (tmp_path / "flat", tmp_path / "pipe", tmp_path / "pipe" / "unet"):
        loaded = load_model(folder)
        with torch.no_grad():
            torch.testing.assert_close(loaded.unet(x, t), expected, rtol=0, atol=1e-4)
    assert load_model(tmp_path / "flat").diffusion == DiffusionConfig()  # no scheduler: the paper's
    assert load_model(tmp_path / "pipe").diffusion.var_type == VarType.FIXED_LARGE
    assert load_model(tmp_path / "pipe").source == str(tmp_path / "pipe" / "unet")


# --- refused ---------------------------------------------------------------------------------------


@pytest.fixture()
def saved(tmp_path) -> Path:
    small_unet().save(tmp_path / "m", diffusion=DIFFUSION)
    return tmp_path / "m"


def test_missing_paths_and_files(tmp_path, saved):
    with pytest.raises(FileNotFoundError, match="no such model folder"):
        load_unet(tmp_path / "nowhere")
    with pytest.raises(NotADirectoryError, match="expected a folder"):
        load_unet(saved / "model.safetensors")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="not a model folder"):
        load_unet(tmp_path / "empty")
    (saved / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"m/model\.safetensors: file not found"):
        load_unet(saved)


def test_truncated_and_corrupt_weights(saved):
    weights = saved / "model.safetensors"
    data = weights.read_bytes()
    for broken in (data[: len(data) // 2], data[:7], b"{not safetensors at all" * 10):
        weights.write_bytes(broken)
        with pytest.raises(ValueError, match="not a readable safetensors file") as err:
            load_unet(saved)
        assert str(weights) in str(err.value)


def test_mismatched_shapes_and_keys(saved):
    weights = saved / "model.safetensors"
    good = load_file(weights)
    save_file({**good, "conv_out.weight": torch.zeros(3, 64, 3, 3)}, weights)
    with pytest.raises(
        ValueError, match=r"'conv_out.weight' has shape \(3, 64, 3, 3\).*expects \(3, 32, 3, 3\)"
    ):
        load_unet(saved)
    save_file({**good, "extra.weight": torch.zeros(1)}, weights)
    with pytest.raises(ValueError, match=r"1 unexpected tensor\(s\), e.g. \['extra.weight'\]"):
        load_unet(saved)
    save_file({**good, "conv_in.weight": good["conv_in.weight"].to(torch.int32)}, weights)
    with pytest.raises(ValueError, match="'conv_in.weight' has dtype torch.int32"):
        load_unet(saved)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_weights_are_refused(saved, bad):
    weights = saved / "model.safetensors"
    good = load_file(weights)
    w = good["time_embedding.linear_1.weight"].clone()
    w[3, 4] = bad
    save_file({**good, "time_embedding.linear_1.weight": w}, weights)
    with pytest.raises(ValueError, match=r"'time_embedding.linear_1.weight' holds 1 non-finite") as err:
        load_unet(saved)
    assert str(weights) in str(err.value)


def test_saving_non_finite_weights_is_refused(tmp_path):
    unet = small_unet()
    with torch.no_grad():
        unet.conv_in.bias[0] = float("nan")
    with pytest.raises(ValueError, match="'conv_in.bias' holds 1 non-finite"):
        unet.save(tmp_path / "m")


def test_half_precision_weights_load_as_float32(saved):
    weights = saved / "model.safetensors"
    save_file({k: v.half() for k, v in load_file(weights).items()}, weights)
    unet = load_unet(saved)
    assert all(p.dtype == torch.float32 for p in unet.parameters())


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (lambda c: {**c, "format": "other"}, "neither our model format"),
        (lambda c: {**c, "version": 2}, "unsupported version 2"),
        (lambda c: {**c, "unet": {**c["unet"], "ch": 48}}, "bad 'unet' section.*multiple of 32"),
        (
            lambda c: {**c, "unet": {**c["unet"], "heads": 4}},
            "bad 'unet' section.*unknown U-Net config field",
        ),
        (lambda c: {**c, "diffusion": {**c["diffusion"], "var_type": "huge"}}, "bad 'diffusion' section"),
        (lambda c: {**c, "diffusion": 3}, "'diffusion' must be a JSON object"),
    ],
)
def test_bad_config_json_is_refused_naming_the_file(saved, edit, match):
    path = saved / "config.json"
    path.write_text(json.dumps(edit(json.loads(path.read_text()))))
    with pytest.raises(ValueError, match=match) as err:
        load_model(saved)
    assert str(saved) in str(err.value)


def test_unreadable_config_json(saved):
    (saved / "config.json").write_text("{ not json")
    with pytest.raises(ValueError, match="neither our model format"):
        load_model(saved)


def test_loss_type_and_other_settings_survive_the_folder(tmp_path):
    diffusion = DiffusionConfig(var_type=VarType.LEARNED_RANGE, loss_type=LossType.HYBRID, hybrid_lambda=0.01)
    small_unet(learned_variance=True).save(tmp_path / "m", diffusion=diffusion)
    assert load_model(tmp_path / "m").diffusion == diffusion


TINY = {"unet.ch": "32", "unet.ch_mult": "1", "unet.num_res_blocks": "1", "unet.attn_resolutions": "",
        "diffusion.num_timesteps": "20", "batch_size": "8", "steps": "6", "checkpoint_every": "2",
        "sample_every": "1000", "num_samples": "0"}


class _Stop(Exception):
    pass


def _train_until(run, step: int) -> None:
    """Train and stop at ``step`` as if the trainer were still running there."""
    def stop(event):
        if event.kind is EventKind.UPDATE and event.step == step:
            raise _Stop

    with pytest.raises(_Stop):
        train(apply_overrides(train_preset("digits"), TINY), run, progress=False, callbacks=[stop])


def _sample_error(capsys, run, tmp_path) -> str:
    capsys.readouterr()
    assert main(["sample", str(run), "--n", "1", "--output-dir", str(tmp_path / "s")]) == EXIT_USER_ERROR
    err = capsys.readouterr().err
    assert "no model yet" in err and f"ddpm train --output-dir {run} --resume auto" in err, err
    assert "neither our model format" not in err
    return err


@pytest.mark.usefixtures("one_thread")
def test_before_the_first_checkpoint(tmp_path, capsys):
    run = tmp_path / "run"
    _train_until(run, 1)  # checkpoint_every 2: nothing saved yet
    assert not (run / "model").exists()
    assert "no checkpoint yet" in _sample_error(capsys, run, tmp_path)


@pytest.mark.usefixtures("one_thread")
def test_after_a_checkpoint_without_its_model(tmp_path, capsys):
    run = tmp_path / "run"
    _train_until(run, 3)
    shutil.rmtree(run / "model")  # killed between the checkpoint's rename and the model's write
    shutil.rmtree(run / "model_raw")
    assert "checkpoints/step-000000002 (step 2)" in _sample_error(capsys, run, tmp_path)
