"""`ddpm sample` and `ddpm figure` end to end on a tiny U-Net model folder (T = 8)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from stand_ins import TINY_T

from ddpmkit.chains import interpolate
from ddpmkit.cli import main
from ddpmkit.sampling import sample
from ddpmkit.seeds import sample_generators

pytestmark = pytest.mark.usefixtures("one_thread")


T = TINY_T


@pytest.fixture(scope="module")
def model_dir(tiny_model_dir: Path) -> Path:
    return tiny_model_dir


def pngs(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.glob("[0-9]*.png"))


def load_npz(folder: Path) -> np.ndarray:
    (path,) = folder.glob("samples_*.npz")
    with np.load(path) as f:
        assert list(f.keys()) == ["arr_0"]
        return f["arr_0"]


def test_sample_writes_pngs_grid_and_npz(model_dir, tmp_path, capsys) -> None:
    out = tmp_path / "s"
    assert main(["sample", str(model_dir), "--n", "5", "--output-dir", str(out), "--batch-size", "2",
                 "--seed", "3"]) == 0
    assert pngs(out) == [f"{i:06d}.png" for i in range(5)]
    arr = load_npz(out)
    assert (out / "samples_5x8x8x1.npz").is_file()
    assert arr.dtype == np.uint8 and arr.shape == (5, 8, 8, 1)
    for i in range(5):
        np.testing.assert_array_equal(np.asarray(Image.open(out / f"{i:06d}.png"))[..., None], arr[i])
    assert arr.std() > 10  # not a blank image
    # 5 images, 3 per row, upscaled nearest-neighbour by ceil(512 / 32) = 16 to be legible
    assert Image.open(out / "grid.png").size == (16 * (3 * 10 + 2), 16 * (2 * 10 + 2))
    settings = json.loads((out / "sampling.json").read_text())
    assert settings["sampler"] == "ddpm" and settings["steps"] == T and settings["seed"] == 3
    assert "images/s" in capsys.readouterr().out
    assert [p.name for p in out.glob(".*")] == [".lock"]  # no temporary files left behind, only the lock


def test_same_images_for_any_batch_size_and_seed_matters(model_dir, tmp_path) -> None:
    arrays = {}
    for b in (1, 8):
        assert main(["sample", str(model_dir), "--n", "6", "--output-dir", str(tmp_path / f"b{b}"),
                     "--batch-size", str(b)]) == 0
        arrays[b] = load_npz(tmp_path / f"b{b}").astype(int)
    # the noise is per sample; batched convolutions may differ in the last float bits, which can
    # move a pixel across a rounding boundary: allow one level on at most 1% of the pixels
    diff = np.abs(arrays[1] - arrays[8])
    assert diff.max() <= 1 and (diff > 0).mean() <= 0.01
    assert main(["sample", str(model_dir), "--n", "6", "--output-dir", str(tmp_path / "other"),
                 "--seed", "1"]) == 0
    assert np.abs(load_npz(tmp_path / "other").astype(int) - arrays[8]).max() > 50


def test_resume_and_shards_give_the_run_in_one_go(model_dir, tmp_path, capsys) -> None:
    whole, shards = tmp_path / "whole", tmp_path / "shards"
    args = [str(model_dir), "--sampler", "ddim", "--steps", "4", "--eta", "0.5", "--batch-size", "1"]
    assert main(["sample", *args, "--n", "6", "--output-dir", str(whole)]) == 0
    assert main(["sample", *args, "--n", "2", "--start-index", "4", "--output-dir", str(shards)]) == 0
    assert pngs(shards) == ["000004.png", "000005.png"]
    assert main(["sample", *args, "--n", "3", "--output-dir", str(shards)]) == 0
    first = (shards / "000000.png").read_bytes()
    capsys.readouterr()
    assert main(["sample", *args, "--n", "6", "--output-dir", str(shards)]) == 0  # resume: only index 3
    printed = capsys.readouterr().out
    assert "sampled 1 images" in printed and "skipped 5 existing" in printed
    assert (shards / "000000.png").read_bytes() == first
    assert sorted(p.name for p in shards.glob("*.npz")) == ["samples_6x8x8x1.npz"]  # older npz removed
    np.testing.assert_array_equal(load_npz(shards), load_npz(whole))


def test_sample_with_respaced_ddpm_and_no_ema_of_a_run_directory(model_dir, tmp_path) -> None:
    run = tmp_path / "run"
    shutil.copytree(model_dir, run / "model")
    shutil.copytree(model_dir, run / "model_raw")
    assert main(["sample", str(run), "--n", "2", "--steps", "3", "--no-ema", "--output-dir",
                 str(tmp_path / "s")]) == 0
    assert load_npz(tmp_path / "s").shape == (2, 8, 8, 1)


def test_sample_from_a_diffusers_folder_matches_our_folder(model_dir, tmp_path) -> None:
    hf = tmp_path / "hf"
    assert main(["convert", "--to-diffusers", str(model_dir), "--out", str(hf)]) == 0
    for name, src in (("ours", model_dir), ("hf", hf)):
        assert main(["sample", str(src), "--n", "3", "--output-dir", str(tmp_path / name)]) == 0
    np.testing.assert_array_equal(load_npz(tmp_path / "hf"), load_npz(tmp_path / "ours"))


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--n", "0"], "n must be a positive int, got 0"),
        (["--n", "2", "--steps", str(T + 1)],
         f"steps must be an int in [2, {T}] for the ddpm sampler, got {T + 1}"),
        (["--n", "2", "--sampler", "plms"], "unknown sampler 'plms'; choose one of ddpm, ddim"),
        (["--n", "2", "--eta", "0.5"], "eta applies to the ddim and analytic-ddim samplers only"),
        (["--n", "2", "--start-index", "-1"], "start_index must be an int >= 0, got -1"),
        (["--n", "2", "--batch-size", "0"], "batch_size must be a positive int, got 0"),
        (["--n", "2", "--sampler", "ddpm", "--steps", "1"],
         f"steps must be an int in [2, {T}] for the ddpm sampler, got 1"),
    ],
)
def test_sample_bad_arguments_exit_2(model_dir, tmp_path, capsys, extra, message) -> None:
    assert main(["sample", str(model_dir), "--output-dir", str(tmp_path / "s"), *extra]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "s").exists() or not pngs(tmp_path / "s")


def test_sample_bad_models_exit_2(tmp_path, capsys) -> None:
    assert main(["sample", str(tmp_path / "missing"), "--n", "1", "--output-dir", str(tmp_path / "s")]) == 2
    assert "no such model folder" in capsys.readouterr().err
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["sample", str(empty), "--n", "1", "--output-dir", str(tmp_path / "s")]) == 2
    assert "not a model folder" in capsys.readouterr().err
    wrong = tmp_path / "wrong"
    wrong.mkdir()
    (wrong / "config.json").write_text(json.dumps({"format": "something.else"}))
    assert main(["sample", str(wrong), "--n", "1", "--output-dir", str(tmp_path / "s")]) == 2
    assert "config.json" in capsys.readouterr().err


def test_sample_refuses_to_mix_settings_in_one_folder(model_dir, tmp_path, capsys) -> None:
    out = str(tmp_path / "s")
    assert main(["sample", str(model_dir), "--n", "1", "--output-dir", out]) == 0
    assert main(["sample", str(model_dir), "--n", "2", "--output-dir", out, "--seed", "9"]) == 2
    assert "other settings (seed: 0 there vs 9 now)" in capsys.readouterr().err


# ---------------------------------------------------------------------------------- ddpm figure
@pytest.mark.parametrize(
    "kind,extra,size",
    [
        # default scale: the smallest reaching 512 px wide (and tiles >= 64 px), ceil(512 / 32) = 16;
        # tiles 8 px + 2 px padding; the labels: tests/test_images.py
        ("shared-xt", ["--n", "2", "--t", "1,7"], (16 * (3 * 10 + 2), 16 * (2 * 10 + 2))),
        ("reconstruct", ["--data", "digits", "--n", "2", "--t", "3,7", "--scale", "1"],
         (5 * 10 + 2, 2 * 10 + 2)),
        ("interpolate", ["--data", "digits", "--n", "1", "--t", "4", "--lambdas", "3", "--scale", "2"],
         (2 * (5 * 10 + 2), 2 * (1 * 10 + 2))),
    ],
)
def test_figure_files_have_the_expected_size(model_dir, tmp_path, kind, extra, size) -> None:
    out = tmp_path / f"{kind}.png"
    assert main(["figure", kind, str(model_dir), "--out", str(out), *extra]) == 0
    im = Image.open(out).convert("L")
    (W, H), (w, h) = im.size, size  # the grid, bottom right, with the label bands above and left
    assert W >= w and H > h
    assert im.getpixel((W - w, H - h)) == 0 and im.getpixel((W - 1, H - 1)) == 0  # the grid's black frame
    assert im.getpixel((W - 1, H - h - 1)) == 255  # the white label band right above it


def test_rate_distortion_figure_and_json(model_dir, tmp_path, capsys) -> None:
    out = tmp_path / "rd.png"
    assert main(["figure", "rate-distortion", str(model_dir), "--data", "digits", "--n", "4",
                 "--out", str(out)]) == 0
    assert Image.open(out).size == (3 * 480, 360)
    rd = json.loads(out.with_suffix(".json").read_text())
    assert rd["num_images"] == 4 and rd["num_timesteps"] == T and len(rd["rate"]) == T
    assert rd["rate_bpd"] + rd["distortion_bpd"] == pytest.approx(rd["total_bpd"], rel=1e-5)
    assert "rate (bits/dim)" in capsys.readouterr().out


def test_figure_bad_input_exit_2(model_dir, tmp_path, capsys) -> None:
    assert main(["figure", "reconstruct", str(model_dir), "--data", "digits", "--t", str(T)]) == 2
    assert f"--t must list 0-based timesteps in [0, {T - 1}]" in capsys.readouterr().err
    assert main(["figure", "progressive", str(tmp_path / "missing")]) == 2
    assert main(["figure", "rate-distortion", str(model_dir), "--data", str(tmp_path / "nope.npz")]) == 2
    assert main(["figure"]) == 2
    assert "expected a figure KIND" in capsys.readouterr().err


@pytest.mark.parametrize("key, value", [("resolution", 100000), ("num_timesteps", 10**9)])
def test_sample_refuses_a_model_config_that_cannot_fit(tmp_path, capsys, key, value):
    from ddpmkit.cli import main
    from ddpmkit.diffusion import DiffusionConfig
    from ddpmkit.nn import UNet, UNetConfig

    net = UNet(config=UNetConfig(resolution=8, in_channels=1, out_channels=1, ch=32, ch_mult=(1,),
                                 num_res_blocks=1, attn_resolutions=()))
    net.save(tmp_path / "m", diffusion=DiffusionConfig(num_timesteps=10, beta_start=0.01, beta_end=0.4))
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    (cfg["diffusion"] if key == "num_timesteps" else cfg["unet"] if "unet" in cfg else cfg)[key] = value
    (tmp_path / "m" / "config.json").write_text(json.dumps(cfg))
    assert main(["sample", str(tmp_path / "m"), "--n", "1", "--output-dir", str(tmp_path / "s"),
                 "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "GiB" in err, err


def _npz(folder: Path) -> np.ndarray:
    (path,) = folder.glob("samples_*.npz")
    with np.load(path) as f:
        return f["arr_0"]


@pytest.mark.parametrize("spec,kept,sampler", [
    ("ddim4", [0, 2, 4, 6], "ddpm"), ("3,2", [0, 2, 3, 4, 7], "ddim"), ("list:7,0,3", [0, 3, 7], "ddpm"),
])
def test_sample_timesteps_option(model_dir, tmp_path, spec, kept, sampler) -> None:
    from ddpmkit.models import load_model

    out = tmp_path / "s"
    assert main(["sample", str(model_dir), "--n", "3", "--output-dir", str(out), "--timesteps", spec,
                 "--sampler", sampler, "--seed", "2", "--device", "cpu"]) == 0
    settings = json.loads((out / "sampling.json").read_text())
    assert settings["timesteps"] == kept and settings["steps"] == len(kept)
    loaded = load_model(str(model_dir))
    with torch.inference_mode():
        x0 = sample(loaded.unet.eval(), loaded.diffusion.build(), (3, 1, 8, 8), sampler=sampler,
                    timesteps=kept, generator=sample_generators(2, range(3)))
    ref = ((x0.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    assert np.abs(_npz(out).astype(int) - ref.astype(int)).max() <= 1


def test_sample_timesteps_errors_exit_2(model_dir, tmp_path, capsys) -> None:
    base = ["sample", str(model_dir), "--n", "1", "--output-dir", str(tmp_path / "s")]
    assert main([*base, "--steps", "4", "--timesteps", "ddim4"]) == 2
    assert "not both" in capsys.readouterr().err
    assert main([*base, "--timesteps", "ddim7"]) == 2
    assert "no integer stride" in capsys.readouterr().err
    assert main([*base, "--timesteps", "list:0,9"]) == 2
    assert "distinct ints in [0, 7]" in capsys.readouterr().err


def test_interpolation_figure_with_ddim_encoding(model_dir, tmp_path) -> None:
    out = tmp_path / "i.png"
    args = ["figure", "interpolate", str(model_dir), "--data", "digits", "--n", "1", "--t", "5",
            "--lambdas", "3", "--scale", "1", "--encode", "ddim", "--timesteps", "list:0,2",
            "--out", str(out)]
    assert main(args) == 0
    im = Image.open(out).convert("L")  # the 52 x 12 grid, bottom right, under the label bands
    (W, H), (w, h) = im.size, (5 * 10 + 2, 10 + 2)
    assert W >= w and H > h and im.getpixel((W - w, H - h)) == 0 and im.getpixel((W - 1, H - h - 1)) == 255
    assert main([*args[:-6], "--timesteps", "ddim4"]) == 2  # --timesteps needs --encode ddim


def test_ddim_interpolation_endpoints_reconstruct_through_inversion(model_dir) -> None:
    """lambda = 0 and 1 decode ddim_invert(x0_a) and ddim_invert(x0_b): with all steps kept up to t
    these are the round trips; the middle mixes them."""
    from ddpmkit.chains import ddim_invert
    from ddpmkit.models import load_model
    from ddpmkit.sampling import sample_ddim

    loaded = load_model(str(model_dir))
    net, d = loaded.unet.eval(), loaded.diffusion.build()
    g = torch.Generator().manual_seed(0)
    a, b = (torch.rand(2, 1, 8, 8, generator=g) * 2 - 1 for _ in range(2))
    with torch.inference_mode():
        mix = interpolate(net, d, a, b, 5, [0.0, 0.5, 1.0], encoder="ddim")
        x_t = ddim_invert(net, d, a, list(range(6)), clip_denoised=True)
        ref_a = sample_ddim(net, d, a.shape, timesteps=list(range(6)), x_T=x_t)
    torch.testing.assert_close(mix[:, 0], ref_a, atol=1e-5, rtol=0)
    assert (mix[:, 1] - mix[:, 0]).abs().max() > 1e-3
    with pytest.raises(ValueError, match="unknown encoder 'x'"):
        interpolate(net, d, a, b, 5, [0.5], encoder="x")
