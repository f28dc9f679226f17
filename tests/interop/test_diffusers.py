"""Weights in and out of the diffusers layout: parity with diffusers' own UNet2DModel and
DDPMScheduler, every unsupported field refused by name, unsafe or broken files refused."""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import pytest
import torch
from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel
from safetensors.torch import load_file, save_file
from stand_ins import randomize_

from ddpmkit.cli import main as cli_main
from ddpmkit.convert import convert_from_diffusers, convert_to_diffusers
from ddpmkit.diffusion import DiffusionConfig, LossType, MeanType, VarType
from ddpmkit.interop.diffusers import (
    diffusion_config_from_scheduler,
    scheduler_config_from_diffusion,
    unet_config_from_diffusers,
    unet_from_diffusers_state_dict,
)
from ddpmkit.models import load_model, load_unet
from ddpmkit.nn import UNET_PRESETS, UNet, UNetConfig

# google/ddpm-cifar10-32 unet/config.json (released_models.md)
CIFAR10_CONFIG = {
    "sample_size": 32, "in_channels": 3, "out_channels": 3,
    "block_out_channels": [128, 256, 256, 256], "layers_per_block": 2,
    "down_block_types": ["DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"],
    "mid_block_scale_factor": 1, "add_attention": True, "attention_head_dim": None,
    "norm_num_groups": 32, "norm_eps": 1e-06, "attn_norm_num_groups": None, "act_fn": "silu",
    "time_embedding_type": "positional", "flip_sin_to_cos": False, "freq_shift": 1,
    "downsample_padding": 0, "downsample_type": "conv", "upsample_type": "conv",
    "resnet_time_scale_shift": "default", "center_input_sample": False, "dropout": 0.0,
    "class_embed_type": None, "num_class_embeds": None, "num_train_timesteps": None,
}  # fmt: skip
# The 256x256 layout at reduced width and resolution 32: six levels, attention at level 4 (16x16 of
# 256x256 in the released models; 2x2 here).
SIX_LEVEL_CONFIG = {
    **CIFAR10_CONFIG, "sample_size": 32, "block_out_channels": [32, 32, 64, 64, 128, 128],
    "down_block_types": ["DownBlock2D"] * 4 + ["AttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "AttnUpBlock2D"] + ["UpBlock2D"] * 4,
}  # fmt: skip
# Attention at the full resolution and at the lowest level, one res block per level.
OTHER_ATTN_CONFIG = {
    **CIFAR10_CONFIG, "sample_size": 16, "block_out_channels": [32, 64, 64], "layers_per_block": 1,
    "down_block_types": ["AttnDownBlock2D", "DownBlock2D", "AttnDownBlock2D"],
    "up_block_types": ["AttnUpBlock2D", "UpBlock2D", "AttnUpBlock2D"], "dropout": 0.1,
}  # fmt: skip
RELEASED_SCHEDULER = {
    "_class_name": "DDPMScheduler", "beta_start": 0.0001, "beta_end": 0.02, "beta_schedule": "linear",
    "num_train_timesteps": 1000, "trained_betas": None, "variance_type": "fixed_large", "clip_sample": True,
}  # fmt: skip
TOL = {"rtol": 0.0, "atol": 1e-4}


def diffusers_unet(config: dict, seed: int = 0) -> UNet2DModel:
    return randomize_(UNet2DModel(**config), seed).eval()


def save_pipeline(unet: UNet2DModel, folder: Path, **scheduler) -> Path:
    DDPMPipeline(unet=unet, scheduler=DDPMScheduler(**{**RELEASED_SCHEDULER, **scheduler})).save_pretrained(
        folder
    )
    return folder


def inputs(config: dict, batch: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    size = config["sample_size"]
    x = torch.randn(batch, config["in_channels"], size, size, generator=g)
    t = torch.tensor([0, 999, 500][:batch]) if batch <= 3 else torch.randint(0, 1000, (batch,), generator=g)
    return x, t


def forward(model, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    out = model(x, t)
    return out if isinstance(out, torch.Tensor) else out.sample  # diffusers returns UNet2DOutput


def assert_same_outputs(ours, theirs, config: dict, batches=(1, 3), ts=None) -> None:
    """Max abs difference <= 1e-4 on random x, at batch sizes ``batches`` (t = 0, 999, 500 for
    batch 3, t = 0 for batch 1) or at each t in ``ts``."""
    for batch in batches:
        x, t = inputs(config, batch)
        for tt in [t] if ts is None else [torch.full((batch,), s) for s in ts]:
            with torch.no_grad():
                ref = forward(theirs, x, tt)
                out = forward(ours, x, tt)
            assert float(ref.abs().max()) > 0.5  # randomized weights: a non-trivial output
            torch.testing.assert_close(out, ref, **TOL)


# --- parity --------------------------------------------------------------------------------------


def test_released_cifar10_config_loads_with_equal_outputs(tmp_path):
    ref = diffusers_unet(CIFAR10_CONFIG)
    folder = save_pipeline(ref, tmp_path / "ddpm-cifar10-32")
    loaded = load_model(folder)
    assert loaded.unet.config == UNET_PRESETS["cifar10"].replace(dropout=0.0)
    assert sum(p.numel() for p in loaded.unet.parameters()) == 35_746_307
    assert loaded.diffusion == DiffusionConfig(
        schedule="linear", num_timesteps=1000, beta_start=1e-4, beta_end=0.02,
        mean_type=MeanType.EPS, var_type=VarType.FIXED_LARGE,
    )  # fmt: skip
    assert_same_outputs(loaded.unet, ref, CIFAR10_CONFIG, batches=(1,), ts=[250])
    assert_same_outputs(loaded.unet, ref, CIFAR10_CONFIG, batches=(3,))  # t = 0, 999, 500


@pytest.mark.parametrize("config", [SIX_LEVEL_CONFIG, OTHER_ATTN_CONFIG], ids=["six-levels", "other-attn"])
def test_other_layouts_load_with_equal_outputs_and_export_back(tmp_path, config):
    ref = diffusers_unet(config, seed=1)
    ref.save_pretrained(tmp_path / "flat")  # a flat folder, no scheduler
    unet = load_unet(tmp_path / "flat")
    levels = len(config["block_out_channels"])
    attn = [
        config["sample_size"] // 2**i
        for i in range(levels)
        if config["down_block_types"][i].startswith("Attn")
    ]
    assert unet.config.attn_resolutions == tuple(attn)
    assert_same_outputs(unet, ref, config)

    unet.save(tmp_path / "ours")
    convert_to_diffusers(tmp_path / "ours", tmp_path / "back")
    back = UNet2DModel.from_pretrained(tmp_path / "back" / "unet").eval()
    assert_same_outputs(back, ref, config)


def _export_round_trip(tmp_path: Path, config: dict) -> None:
    """diffusers -> ours (with the scheduler) -> diffusers; UNet2DModel and DDPMPipeline reload it."""
    ref = diffusers_unet(config, seed=2)
    save_pipeline(ref, tmp_path / "src", variance_type="fixed_small")
    convert_from_diffusers(tmp_path / "src", tmp_path / "ours")
    assert (
        json.loads((tmp_path / "ours" / "config.json").read_text())["diffusion"]["var_type"] == "fixedsmall"
    )
    convert_to_diffusers(tmp_path / "ours", tmp_path / "back")

    back = UNet2DModel.from_pretrained(tmp_path / "back" / "unet").eval()
    assert_same_outputs(back, ref, config, batches=(3,))
    pipe = DDPMPipeline.from_pretrained(tmp_path / "back")
    assert_same_outputs(pipe.unet.eval(), ref, config, batches=(1,))
    assert pipe.scheduler.config.variance_type == "fixed_small"
    assert pipe.scheduler.config.prediction_type == "epsilon"
    torch.testing.assert_close(pipe.scheduler.betas.double(), DiffusionConfig().betas(), rtol=1e-6, atol=0)


def test_export_loads_in_diffusers_unet_and_ddpm_pipeline(tmp_path):
    _export_round_trip(tmp_path, SIX_LEVEL_CONFIG)


@pytest.mark.slow
def test_released_cifar10_config_round_trips_through_ddpm_pipeline(tmp_path):
    _export_round_trip(tmp_path, CIFAR10_CONFIG)


def test_ddpm_pipeline_samples_from_an_exported_tiny_model(tmp_path):
    config = UNetConfig(
        resolution=8,
        in_channels=1,
        out_channels=1,
        ch=32,
        ch_mult=(1, 1),
        num_res_blocks=1,
        attn_resolutions=(4,),
    )
    unet = randomize_(UNet(config=config))
    diffusion = DiffusionConfig(num_timesteps=10, var_type=VarType.FIXED_SMALL)
    unet.save(tmp_path / "ours", diffusion=diffusion)
    convert_to_diffusers(tmp_path / "ours", tmp_path / "pipe")
    pipe = DDPMPipeline.from_pretrained(tmp_path / "pipe")
    images = pipe(
        batch_size=2, num_inference_steps=10, generator=torch.Generator().manual_seed(0), output_type="np"
    )
    assert images.images.shape == (2, 8, 8, 1)


def test_learned_variance_round_trips(tmp_path):
    unet = randomize_(UNet(config=UNetConfig(resolution=16, ch=32, ch_mult=(1, 2), num_res_blocks=1,
                                             attn_resolutions=(8,), learned_variance=True)))  # fmt: skip
    diffusion = DiffusionConfig(var_type=VarType.LEARNED_RANGE, loss_type=LossType.HYBRID)
    unet.save(tmp_path / "ours", diffusion=diffusion)
    convert_to_diffusers(tmp_path / "ours", tmp_path / "hf")
    hf = UNet2DModel.from_pretrained(tmp_path / "hf" / "unet").eval()
    assert hf.config.out_channels == 6
    assert (
        DDPMScheduler.from_pretrained(tmp_path / "hf" / "scheduler").config.variance_type == "learned_range"
    )
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([4, 900])
    with torch.no_grad():
        torch.testing.assert_close(hf(x, t).sample, unet.eval()(x, t), **TOL)
    loaded = load_model(tmp_path / "hf")
    assert loaded.unet.config == unet.config
    assert loaded.diffusion == diffusion


def test_legacy_bin_with_old_attention_names_loads_with_weights_only(tmp_path):
    ref = diffusers_unet(OTHER_ATTN_CONFIG, seed=3)
    old_names = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    state = {}
    for key, value in ref.state_dict().items():
        for new, old in old_names.items():
            if ".attentions." in key and f".{new}." in key:
                key = key.replace(f".{new}.", f".{old}.")
        state[key] = value
    assert any(".proj_attn." in k for k in state)
    folder = tmp_path / "legacy"
    folder.mkdir()
    torch.save(state, folder / "diffusion_pytorch_model.bin")
    (folder / "config.json").write_text(json.dumps({"_class_name": "UNet2DModel", **OTHER_ATTN_CONFIG}))
    assert_same_outputs(load_unet(folder), ref, OTHER_ATTN_CONFIG)


# --- refused files -------------------------------------------------------------------------------


class _Payload:
    """Pickles to a call that creates a marker file: what a malicious checkpoint would do."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (str(self.marker),))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")  # torch's note on the plain pickle
@pytest.mark.parametrize("container", ["torch-zip", "torch-legacy", "plain-pickle"])
def test_malicious_pickle_is_refused_and_runs_nothing(tmp_path, container):
    ref = diffusers_unet(OTHER_ATTN_CONFIG)
    folder = tmp_path / "evil"
    folder.mkdir()
    marker = tmp_path / "pwned"
    state = dict(ref.state_dict())
    state["conv_in.bias"] = _Payload(marker)
    if container == "plain-pickle":
        (folder / "diffusion_pytorch_model.bin").write_bytes(pickle.dumps(state))
    else:
        zipped = container == "torch-zip"
        torch.save(state, folder / "diffusion_pytorch_model.bin", _use_new_zipfile_serialization=zipped)
    (folder / "config.json").write_text(json.dumps({"_class_name": "UNet2DModel", **OTHER_ATTN_CONFIG}))

    with pytest.raises(ValueError, match="diffusion_pytorch_model.bin: refused") as err:
        load_unet(folder)
    assert str(folder) in str(err.value)
    assert "weights_only` set to `False`" not in str(err.value)  # no advice to load it unsafely
    if container != "plain-pickle":
        assert "mkdir" in str(err.value)  # the refused call is named
    assert not marker.exists()
    # The payload is real: an unsafe load would have run it.
    data = (folder / "diffusion_pytorch_model.bin").read_bytes()
    if container == "plain-pickle":
        pickle.loads(data)
    else:
        torch.load(folder / "diffusion_pytorch_model.bin", weights_only=False)
    assert marker.exists()


@pytest.fixture()
def small_diffusers_folder(tmp_path) -> Path:
    return save_pipeline(diffusers_unet(OTHER_ATTN_CONFIG), tmp_path / "hf")


def test_truncated_or_corrupt_safetensors_are_refused(small_diffusers_folder):
    weights = small_diffusers_folder / "unet" / "diffusion_pytorch_model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="not a readable safetensors file") as err:
        load_unet(small_diffusers_folder)
    assert str(weights) in str(err.value)
    weights.write_bytes(b"\x00garbage" * 100)
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        load_unet(small_diffusers_folder)


def test_truncated_bin_is_refused(tmp_path):
    folder = tmp_path / "bin"
    folder.mkdir()
    torch.save(diffusers_unet(OTHER_ATTN_CONFIG).state_dict(), folder / "diffusion_pytorch_model.bin")
    data = (folder / "diffusion_pytorch_model.bin").read_bytes()
    (folder / "diffusion_pytorch_model.bin").write_bytes(data[: len(data) // 3])
    (folder / "config.json").write_text(json.dumps({"_class_name": "UNet2DModel", **OTHER_ATTN_CONFIG}))
    with pytest.raises(
        ValueError, match=r"diffusion_pytorch_model\.bin: not a readable PyTorch weights file"
    ):
        load_unet(folder)


def test_mismatched_shapes_nonfinite_and_missing_weights_are_refused(small_diffusers_folder):
    weights = small_diffusers_folder / "unet" / "diffusion_pytorch_model.safetensors"
    good = load_file(weights)

    bad = dict(good, **{"conv_in.weight": torch.zeros(32, 3, 5, 5)})
    save_file(bad, weights)
    with pytest.raises(
        ValueError, match=r"'conv_in.weight' has shape \(32, 3, 5, 5\).*expects \(32, 3, 3, 3\)"
    ):
        load_unet(small_diffusers_folder)

    bad = dict(good)
    bad["mid_block.resnets.0.conv1.weight"] = bad["mid_block.resnets.0.conv1.weight"].clone()
    bad["mid_block.resnets.0.conv1.weight"][0, 0, 0, 0] = float("nan")
    save_file(bad, weights)
    with pytest.raises(ValueError, match=r"'mid_block.resnets.0.conv1.weight' holds 1 non-finite") as err:
        load_unet(small_diffusers_folder)
    assert str(weights) in str(err.value)

    bad = {k: v for k, v in good.items() if k != "conv_out.bias"}
    save_file(bad, weights)
    with pytest.raises(ValueError, match=r"1 missing tensor\(s\), e.g. \['conv_out.bias'\]"):
        load_unet(small_diffusers_folder)

    weights.unlink()
    with pytest.raises(FileNotFoundError, match="no weights file"):
        load_unet(small_diffusers_folder)


# --- configs that our U-Net or diffusion cannot express ------------------------------------------


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("flip_sin_to_cos", True),
        ("freq_shift", 0),
        ("downsample_padding", 1),
        ("norm_eps", 1e-5),
        ("norm_num_groups", 16),
        ("attention_head_dim", 8),
        ("resnet_time_scale_shift", "scale_shift"),
        ("time_embedding_type", "fourier"),
        ("act_fn", "gelu"),
        ("mid_block_scale_factor", 1.414),
        ("add_attention", False),
        ("center_input_sample", True),
        ("class_embed_type", "timestep"),
        ("downsample_type", "resnet"),
        ("block_out_channels", [128, 192, 256, 256]),
        ("down_block_types", ["DownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D", "DownBlock2D"]),
        ("up_block_types", ["UpBlock2D", "AttnUpBlock2D", "UpBlock2D", "UpBlock2D"]),
        ("sample_size", None),
        ("time_embedding_dim", 256),
        ("some_future_field", 1),
    ],
)
def test_inexpressible_unet_config_is_refused_naming_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        unet_config_from_diffusers({**CIFAR10_CONFIG, field: value})


def test_missing_fields_take_diffusers_defaults_which_we_check():
    config = {k: v for k, v in CIFAR10_CONFIG.items() if k != "freq_shift"}  # diffusers' default is 0
    with pytest.raises(ValueError, match="'freq_shift' = 0"):
        unet_config_from_diffusers(config)


def test_unet_config_mapping_matches_what_diffusers_builds():
    for config in (CIFAR10_CONFIG, SIX_LEVEL_CONFIG, OTHER_ATTN_CONFIG):
        with torch.device("meta"):
            theirs = UNet2DModel(**config)
            ours = UNet(config=unet_config_from_diffusers(config))
        assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in theirs.parameters())


def test_cli_convert_refuses_an_inexpressible_config(tmp_path, capsys):
    ref = diffusers_unet(OTHER_ATTN_CONFIG)
    ref.save_pretrained(tmp_path / "hf")
    cfg_path = tmp_path / "hf" / "config.json"
    cfg_path.write_text(
        json.dumps({**json.loads(cfg_path.read_text()), "resnet_time_scale_shift": "scale_shift"})
    )
    assert (
        cli_main(["convert", "--from-diffusers", str(tmp_path / "hf"), "--out", str(tmp_path / "out")]) == 2
    )
    err = capsys.readouterr().err
    assert "resnet_time_scale_shift" in err and str(cfg_path) in err
    assert not (tmp_path / "out").exists()


# --- schedulers ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("beta_schedule", "ours"),
    [("linear", "linear"), ("scaled_linear", "quad"), ("squaredcos_cap_v2", "cosine")],
)
def test_scheduler_betas_equal_diffusers(beta_schedule, ours):
    config = {**RELEASED_SCHEDULER, "beta_schedule": beta_schedule}
    diffusion = diffusion_config_from_scheduler(config)
    assert diffusion.schedule == ours
    theirs = DDPMScheduler(**{k: v for k, v in config.items() if k != "_class_name"}).betas
    torch.testing.assert_close(diffusion.betas(), theirs.double(), rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        ({}, {"var_type": VarType.FIXED_LARGE, "mean_type": MeanType.EPS, "loss_type": LossType.MSE}),
        ({"variance_type": "fixed_small"}, {"var_type": VarType.FIXED_SMALL}),
        ({"variance_type": "learned"}, {"var_type": VarType.LEARNED, "loss_type": LossType.HYBRID}),
        ({"variance_type": "learned_range"}, {"var_type": VarType.LEARNED_RANGE}),
        ({"prediction_type": "sample"}, {"mean_type": MeanType.X0}),
        ({"num_train_timesteps": 4000, "beta_end": 0.01}, {"num_timesteps": 4000, "beta_end": 0.01}),
        ({"clip_sample": False, "timestep_spacing": "trailing"}, {}),
    ],
)
def test_scheduler_fields_map_to_our_diffusion(fields, expected):
    diffusion = diffusion_config_from_scheduler({**RELEASED_SCHEDULER, **fields})
    for name, value in expected.items():
        assert getattr(diffusion, name) == value


def test_scheduler_defaults_are_diffusers_defaults():
    # DDPMScheduler's default variance_type is fixed_small, unlike the paper's CIFAR-10 run.
    assert diffusion_config_from_scheduler({"_class_name": "DDPMScheduler"}).var_type == VarType.FIXED_SMALL


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("beta_schedule", "sigmoid"),
        ("variance_type", "fixed_small_log"),
        ("prediction_type", "v_prediction"),
        ("thresholding", True),
        ("rescale_betas_zero_snr", True),
        ("trained_betas", [0.1] * 1000),
        ("_class_name", "EulerDiscreteScheduler"),
        ("some_future_field", 1),
    ],
)
def test_inexpressible_scheduler_is_refused_naming_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        diffusion_config_from_scheduler({**RELEASED_SCHEDULER, field: value})


@pytest.mark.parametrize("schedule", ["linear", "quad", "cosine", "warmup10", "jsd"])
def test_scheduler_export_round_trips_and_diffusers_agrees(schedule):
    ours = DiffusionConfig(schedule=schedule, num_timesteps=100, beta_start=1e-3, beta_end=0.05)
    config = scheduler_config_from_diffusion(ours)
    back = diffusion_config_from_scheduler(config)
    torch.testing.assert_close(back.betas(), ours.betas(), rtol=1e-12, atol=0)
    theirs = DDPMScheduler(**{k: v for k, v in config.items() if not k.startswith("_")}).betas
    torch.testing.assert_close(theirs.double(), ours.betas(), rtol=1e-5, atol=1e-8)


def test_x_prev_mean_has_no_diffusers_equivalent(tmp_path):
    with pytest.raises(ValueError, match="mean_type 'x_prev'"):
        scheduler_config_from_diffusion(DiffusionConfig(mean_type=MeanType.X_PREV))


# --- ddpm convert, end to end --------------------------------------------------------------------


def test_cli_convert_from_and_to_diffusers(tmp_path, capsys):
    ref = diffusers_unet(OTHER_ATTN_CONFIG, seed=4)
    src = save_pipeline(ref, tmp_path / "hf", variance_type="fixed_small")
    ours, back = tmp_path / "ours", tmp_path / "back"
    assert cli_main(["convert", "--from-diffusers", str(src), "--out", str(ours)]) == 0
    assert json.loads((ours / "config.json").read_text())["format"] == "ddpmkit.model"
    loaded = load_model(ours)
    assert loaded.diffusion.var_type == VarType.FIXED_SMALL
    assert_same_outputs(loaded.unet, ref, OTHER_ATTN_CONFIG)

    assert cli_main(["convert", "--to-diffusers", str(ours), "--out", str(back)]) == 0
    assert f"wrote {back}" in capsys.readouterr().out
    pipe = DDPMPipeline.from_pretrained(back)
    assert_same_outputs(pipe.unet.eval(), ref, OTHER_ATTN_CONFIG)

    # the output folder must not exist or be empty; a missing source is one clear line
    assert cli_main(["convert", "--to-diffusers", str(ours), "--out", str(back)]) == 2
    assert "not empty" in capsys.readouterr().err
    assert (
        cli_main(["convert", "--from-diffusers", str(tmp_path / "nope"), "--out", str(tmp_path / "o2")]) == 2
    )
    assert "nope" in capsys.readouterr().err


def test_state_dict_entry_point_matches_the_folder_loader():
    ref = diffusers_unet(OTHER_ATTN_CONFIG, seed=5)
    unet = unet_from_diffusers_state_dict(
        ref.state_dict(), {"_class_name": "UNet2DModel", **OTHER_ATTN_CONFIG}
    )
    assert not unet.training
    assert_same_outputs(unet, ref, OTHER_ATTN_CONFIG, batches=(3,))


def test_unreadable_configs_are_refused_naming_the_file(small_diffusers_folder):
    scheduler = small_diffusers_folder / "scheduler" / "scheduler_config.json"
    scheduler.write_text("{ truncated")
    with pytest.raises(ValueError, match="not valid JSON") as err:
        load_model(small_diffusers_folder)
    assert str(scheduler) in str(err.value)
    scheduler.write_text(json.dumps(RELEASED_SCHEDULER))
    unet_config = small_diffusers_folder / "unet" / "config.json"
    unet_config.write_text("[1, 2]")
    with pytest.raises(ValueError, match="expected a JSON object") as err:
        load_model(small_diffusers_folder)
    assert str(unet_config) in str(err.value)


def test_cli_convert_to_diffusers_from_a_run_directory_takes_the_ema_weights(tmp_path):
    config = unet_config_from_diffusers(OTHER_ATTN_CONFIG)
    ema, raw = randomize_(UNet(config=config), 6), randomize_(UNet(config=config), 7)
    ema.save(tmp_path / "run" / "model", diffusion=DiffusionConfig())
    raw.save(tmp_path / "run" / "model_raw", diffusion=DiffusionConfig())
    assert cli_main(["convert", "--to-diffusers", str(tmp_path / "run"), "--out", str(tmp_path / "hf")]) == 0
    hf = UNet2DModel.from_pretrained(tmp_path / "hf" / "unet").eval()
    assert_same_outputs(ema.eval(), hf, OTHER_ATTN_CONFIG)
