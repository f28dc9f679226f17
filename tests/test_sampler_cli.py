"""`ddpm sample --timesteps` and `ddpm figure interpolate --encode ddim` on a tiny U-Net (T = 8),
against the library called directly."""

from __future__ import annotations

import json
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

T = TINY_T


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model_dir(tiny_model_dir: Path) -> Path:
    return tiny_model_dir


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
