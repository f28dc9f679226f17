"""`ddpm train --data FOLDER|NPZ` without a preset: the network fits the data, or the run is refused.

The folders are built here: 32x32 RGB, 64x64 grayscale, mixed sizes, a non-square size.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ddpmkit.cli import build_parser, main
from ddpmkit.cli.train import resolve_config
from ddpmkit.config import TRAIN_PRESETS, train_preset
from ddpmkit.data import open_source
from ddpmkit.nn import UNET_PRESETS, UNet
from ddpmkit.training.fit import (
    NetSize,
    auto_batch_size,
    config_for_data,
    default_net_size,
    small_recipe,
    unet_for_data,
)
from ddpmkit.training.state import ema_decay_at, ema_initial_weight

CIFAR10_PARAMS = 35_746_307  # the authors' run_cifar.py network (the paper: 35.7M)


def _folder(root: Path, name: str, sizes: list[tuple[int, int]], mode: str) -> Path:
    folder = root / name
    folder.mkdir()
    rng = np.random.default_rng(len(name))
    for i, (w, h) in enumerate(sizes):
        a = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        Image.fromarray(a).convert(mode).save(folder / f"{i:03d}.png")
    return folder


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("folders")
    return {
        "rgb32": _folder(root, "rgb32", [(32, 32)] * 6, "RGB"),
        "gray64": _folder(root, "gray64", [(64, 64)] * 4, "L"),
        "mixed": _folder(root, "mixed", [(32, 32), (48, 40), (64, 64)], "RGB"),
        "wide": _folder(root, "wide", [(40, 30)] * 3, "RGB"),
    }


def _resolve(*argv):
    return resolve_config(build_parser().parse_args(["train", *argv]))


def _num_params(config) -> int:
    with torch.device("meta"):
        return sum(p.numel() for p in UNet(config=config).parameters())


def test_a_32px_rgb_folder_gets_the_cifar10_network_on_a_gpu_or_with_net_paper(folders):
    config, run_dir = _resolve("--data", str(folders["rgb32"]), "--net", "paper", "--device", "cpu")
    assert (config.unet.resolution, config.unet.in_channels, config.unet.out_channels) == (32, 3, 3)
    assert config.unet == UNET_PRESETS["cifar10"]
    assert _num_params(config.unet) == CIFAR10_PARAMS
    assert run_dir == Path("runs/rgb32") and config.preset == "custom"
    # the recipe is the paper's CIFAR-10 one, apart from the data
    paper = train_preset("cifar10").to_dict()
    ours = config.to_dict()
    assert {k for k in paper if paper[k] != ours[k]} == {"preset", "data"}
    # without --net, what a GPU gets (no GPU is needed to build the config)
    assert config_for_data(str(folders["rgb32"]), 32, 3, device="cuda") == config
    assert config_for_data(str(folders["rgb32"]), 32, 3, device=torch.device("cuda", 1)) == config
    # and on a CPU, without --net, the small network and the CPU recipe
    cpu, _ = _resolve("--data", str(folders["rgb32"]), "--device", "cpu")
    assert cpu == config_for_data(str(folders["rgb32"]), 32, 3, NetSize.SMALL, device="cuda")
    assert cpu.unet == unet_for_data(32, 3, NetSize.SMALL) and cpu.steps == 500


def test_a_64px_grayscale_folder_gets_a_64px_one_channel_network(folders):
    config, _ = _resolve("--data", str(folders["gray64"]), "--net", "paper")
    u = config.unet
    assert (u.resolution, u.in_channels, u.out_channels) == (64, 1, 1)
    assert u.level_resolutions == (64, 32, 16, 8, 4) and u.attn_resolutions == (16,)
    assert (u.ch, u.num_res_blocks) == (128, 2) and config.steps == train_preset("cifar10").steps
    assert open_source(config.data, resolution=u.resolution, channels=u.in_channels)[0].shape == (1, 64, 64)
    assert config_for_data(config.data, 64, 1, device="cuda") == config  # a GPU's default
    small, _ = _resolve("--data", str(folders["gray64"]), "--device", "cpu")  # a CPU's default
    assert (small.unet.level_resolutions, small.unet.attn_resolutions) == ((64, 32, 16, 8, 4), ())
    assert (small.unet.ch, small.unet.num_res_blocks, small.unet.in_channels) == (64, 1, 1)


@pytest.mark.parametrize(("resolution", "cpu", "cuda"), [
    (8, NetSize.SMALL, NetSize.SMALL), (16, NetSize.SMALL, NetSize.SMALL),
    (32, NetSize.SMALL, NetSize.PAPER), (64, NetSize.SMALL, NetSize.PAPER),
    (256, NetSize.SMALL, NetSize.PAPER)])
def test_the_default_network_depends_on_the_device(resolution, cpu, cuda):
    assert default_net_size(resolution, "cpu") is cpu
    assert default_net_size(resolution, torch.device("cpu")) is cpu
    assert default_net_size(resolution, "cuda") is cuda
    assert default_net_size(resolution, "cuda:0") is cuda
    for device, size in (("cpu", cpu), ("cuda", cuda)):
        assert config_for_data("f", resolution, 3, device=device) == config_for_data("f", resolution, 3, size,
                                                                                     device=device)


@pytest.mark.parametrize(("resolution", "steps", "batch", "grid"), [
    (8, 4000, 64, 64), (16, 1000, 64, 64), (32, 500, 32, 16), (64, 500, 32, 4), (256, 500, 32, 4)])
def test_the_cpu_recipe_is_sized_to_the_images(resolution, steps, batch, grid):
    assert small_recipe(resolution) == {"steps": steps, "batch_size": batch, "num_samples": grid,
                                        "sample_every": steps}
    c = config_for_data("f", resolution, 3, device="cpu")
    assert (c.steps, c.batch_size, c.num_samples, c.sample_every) == (steps, batch, grid, steps)
    assert (c.lr, c.warmup_steps, c.ema_decay, c.ema_warmup, c.num_threads, c.random_flip) == (
        1e-3, 50, 0.998, True, 1, True)
    assert c.unet == unet_for_data(resolution, 3, NetSize.SMALL)


def test_mixed_sizes_ask_for_resolution_and_resize_only_when_asked(folders):
    with pytest.raises(ValueError, match=r"differ in size \(32x32, 48x40, 64x64\).*--resolution N"):
        _resolve("--data", str(folders["mixed"]))
    config, _ = _resolve("--data", str(folders["mixed"]), "--resolution", "32")
    assert (config.unet.resolution, config.unet.in_channels) == (32, 3)
    expected = "differ in size .* the digits preset trains 8x8 grayscale .*--resolution 8"
    with pytest.raises(ValueError, match=expected):
        _resolve("--preset", "digits", "--data", str(folders["mixed"]))


def test_a_non_square_size_is_refused_with_a_suggested_resolution(folders):
    with pytest.raises(ValueError, match=r"are 40x30, not a square.*--resolution 32"):
        _resolve("--data", str(folders["wide"]))


def test_a_preset_of_another_size_is_refused_naming_both_and_the_fix(folders):
    with pytest.raises(ValueError) as err:
        _resolve("--preset", "digits", "--data", str(folders["rgb32"]))
    msg = str(err.value)
    assert "32x32 RGB" in msg and "the digits preset trains 8x8 grayscale" in msg
    assert "--resolution 8 --channels 1" in msg and "without --preset" in msg
    with pytest.raises(ValueError, match="64x64 grayscale images but the cifar10 preset trains 32x32 RGB"):
        _resolve("--preset", "cifar10", "--data", str(folders["gray64"]))
    # explicit resizing and conversion is a flag
    config, _ = _resolve("--preset", "digits", "--data", str(folders["rgb32"]), "--resolution", "8",
                         "--channels", "1")
    assert config.unet == UNET_PRESETS["digits"]


def test_a_saved_config_of_another_size_is_refused(folders, tmp_path):
    (tmp_path / "c.json").write_text(json.dumps({"preset": "digits"}))
    with pytest.raises(ValueError, match="the config .* trains 8x8 grayscale.*without --config"):
        _resolve("--config", str(tmp_path / "c.json"), "--data", str(folders["rgb32"]))


def test_named_sources_keep_their_presets():
    assert _resolve()[0] == train_preset("digits")
    assert _resolve("--data", "digits")[0] == train_preset("digits")


def test_tiny_images_get_the_small_cpu_network(tmp_path):
    npz = tmp_path / "tiny.npz"
    np.savez(npz, np.zeros((3, 16, 16, 3), np.uint8))
    config, run_dir = _resolve("--data", str(npz))
    u = config.unet
    assert (u.resolution, u.in_channels, u.ch, u.ch_mult, u.num_res_blocks) == (16, 3, 64, (1, 1, 1), 1)
    assert config.lr == train_preset("digits").lr and config.random_flip and run_dir == Path("runs/tiny")
    # at 8 px the small network is the digits preset's
    assert unet_for_data(8, 1, "small") == UNET_PRESETS["digits"]
    with pytest.raises(ValueError, match="--net applies only"):
        _resolve("--preset", "digits", "--data", str(npz), "--net", "small")


def test_cli_trains_a_32px_rgb_model_and_says_so_in_one_line(folders, tmp_path, capsys):
    run = tmp_path / "run"
    argv = ["train", "--data", str(folders["rgb32"]), "--net", "small", "--steps", "1", "--batch-size", "2",
            "--num-samples", "0", "--set", "unet.ch=32", "--set", "unet.ch_mult=1,1",
            "--set", "diffusion.num_timesteps=10", "-o", str(run), "--no-progress"]
    assert main(argv) == 0
    first = capsys.readouterr().out.splitlines()[0]
    assert first.startswith(f"training on image folder {folders['rgb32']}: 32x32, 3 channels (as stored)")
    assert "U-Net 0." in first and "M parameters" in first and "1 steps of batch 2" in first
    saved = json.loads((run / "model" / "config.json").read_text())
    unet = saved.get("unet", saved)
    assert (unet["resolution"], unet["in_channels"]) == (32, 3)


def test_a_preset_of_another_size_without_data_is_refused_not_trained_on_resized_digits(tmp_path, capsys):
    from ddpmkit.cli.train import check_default_data

    out = tmp_path / "run"
    small = ["--steps", "1", "--batch-size", "2", "--num-samples", "0", "--set", "unet.ch=32"]  # fast, if run
    assert main(["train", "--preset", "cifar10", *small, "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert "the cifar10 preset trains 32x32 RGB images but no --data was given" in err
    assert "--data cifar10" in err and "--resolution 32 --channels 3" in err
    assert not (out / "checkpoints").exists()  # nothing trained
    assert main(["train", "--preset", "celebahq256", *small, "-o", str(out)]) == 2
    assert "256x256 RGB images" in capsys.readouterr().err
    # printing the config needs no data; the digits preset and an explicit resize still resolve
    assert main(["train", "--preset", "cifar10", "--print-config"]) == 0
    for argv in (["--preset", "digits"], ["--preset", "cifar10", "--resolution", "32", "--channels", "3"]):
        args = build_parser().parse_args(["train", *argv])
        config, _ = resolve_config(args)
        check_default_data(config, args, what="x")
    args = build_parser().parse_args(["train", "--preset", "cifar10", "--resolution", "32"])  # gray -> RGB
    with pytest.raises(ValueError, match="no --data was given"):
        check_default_data(resolve_config(args)[0], args, what="x")


def test_auto_batch_size_respects_the_memory_bound():
    cpu = torch.device("cpu")
    assert auto_batch_size(UNET_PRESETS["digits"], 500, cpu) == 500
    cifar = auto_batch_size(UNET_PRESETS["cifar10"], 10**9, cpu)
    # the paper's CIFAR-10 U-Net holds ~7.5 MB of activations per image in a no_grad forward
    # (measured: peak RSS of one call at batch 32); the bound is at most 8 GiB
    assert 1 <= cifar <= (8 << 30) // (7 << 20)


def test_the_small_recipe_warms_its_ema_up():
    c = config_for_data("folder", 16, 3, NetSize.SMALL, device="cpu")
    assert c.ema_warmup and c.ema_decay == 0.998


@pytest.mark.parametrize("name", sorted(TRAIN_PRESETS))
def test_presets_keep_their_ema(name):
    assert not train_preset(name).ema_warmup


def test_the_paper_network_keeps_the_papers_recipe():
    c = config_for_data("folder", 32, 3, NetSize.PAPER, device="cpu")
    assert (c.ema_warmup, c.ema_decay) == (False, 0.9999)


def test_initial_weight_share():
    c = train_preset("digits")
    assert math.isclose(ema_initial_weight(c, 110), 0.998 ** 110)
    warm = config_for_data("folder", 16, 3, NetSize.SMALL, device="cpu")
    assert ema_decay_at(warm, 0) == 0.0 and ema_initial_weight(warm, 1) == 0.0
    assert ema_initial_weight(warm, 0) == 1.0
