"""Every picture legible: small-image grids upscaled nearest-neighbour to >= 512 px, labelled figures,
and `ddpm sample` choosing its batch size within a memory bound and printing images/s."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ddpmkit.cli import main
from ddpmkit.cli.sample import auto_batch_size
from ddpmkit.diffusion import DiffusionConfig
from ddpmkit.figures import image_grid, label_grid, progressive_labels, save_image_grid
from ddpmkit.nn import UNET_PRESETS, UNet, UNetConfig

T = 6


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    net = UNet(config=UNetConfig(resolution=8, in_channels=1, out_channels=1, ch=32, ch_mult=(1,),
                                 num_res_blocks=1, attn_resolutions=()))
    path = tmp_path_factory.mktemp("model") / "tiny"
    net.save(path, diffusion=DiffusionConfig(num_timesteps=T, beta_start=0.01, beta_end=0.4))
    return path


def test_small_grids_are_upscaled_nearest_neighbour_to_512_px(tmp_path):
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (64, 8, 8, 1), dtype=np.uint8)
    path = save_image_grid(a, tmp_path / "g.png", nrow=8, min_width=512)
    got = np.asarray(Image.open(path))
    small = np.asarray(image_grid(a, nrow=8))  # 82 x 82
    s = -(-512 // 82)  # 7: the smallest whole factor reaching 512 px
    assert got.shape[:2] == (82 * s, 82 * s)
    assert np.array_equal(got, small.repeat(s, axis=0).repeat(s, axis=1))  # nearest neighbour
    # already wide enough: left alone
    big = rng.integers(0, 256, (4, 300, 300, 3), dtype=np.uint8)
    assert Image.open(save_image_grid(big, tmp_path / "b.png", min_width=512)).width == 2 * 302 + 2


def _dark(region: np.ndarray) -> bool:
    return bool((region < 100).any())


def test_labels_sit_over_every_column_and_beside_every_row():
    tile, pad, cols, rows = 40, 4, 5, 4
    grid = Image.new("RGB", (cols * (tile + pad) + pad, rows * (tile + pad) + pad), (200, 200, 200))
    out = np.asarray(label_grid(grid, col_labels=[f"t = {t}" for t in range(cols)],
                                row_labels=["x_t", "pred x_0"], tile=tile, padding=pad).convert("L"))
    top = out.shape[0] - grid.height
    left = out.shape[1] - grid.width
    assert top > 0 and left > 0
    for j in range(cols):  # text over each column, in that column's span
        x0 = left + pad + j * (tile + pad)
        assert _dark(out[:top, x0:x0 + tile]), j
    for i in range(rows):  # text beside each row
        y0 = top + pad + i * (tile + pad)
        assert _dark(out[y0:y0 + tile, :left]), i
    assert np.array_equal(out[top:, left:], np.asarray(grid.convert("L")))  # the grid is untouched


def test_progressive_labels_name_the_chain_timesteps_in_order():
    from ddpmkit.sampling import sample_progressive

    diffusion = DiffusionConfig(num_timesteps=T, beta_start=0.01, beta_end=0.4).build()
    out = sample_progressive(lambda x, t: torch.zeros_like(x), diffusion, (1, 1, 4, 4),
                             snapshot_ts=__import__("ddpmkit.sampling").sampling.space_timesteps(T, 3),
                             generator=torch.Generator().manual_seed(0))
    cols, rows = progressive_labels(T, 3)
    assert cols == [f"t = {int(t)}" for t in out["t"]] and cols[0] == f"t = {T - 1}" and cols[-1] == "t = 0"
    assert rows == ["x_t", "pred x_0"] and progressive_labels(T, 3, "x0")[1] == ["pred x_0"]


def test_progressive_figure_file_is_labelled_and_wide(model_dir, tmp_path):
    out = tmp_path / "p.png"
    assert main(["figure", "progressive", str(model_dir), "--n", "2", "--snapshots", "3", "--out", str(out)]) == 0
    im = Image.open(out)
    assert im.width >= 512 + 20 and im.height > 7 * (4 * 10 + 2)  # >= 512 px of grid, plus the labels
    assert im.getpixel((0, 0)) == (255, 255, 255)  # the label band


def test_sample_grid_is_legible_and_batch_size_chosen(model_dir, tmp_path, capsys):
    out = tmp_path / "s"
    assert main(["sample", str(model_dir), "--n", "5", "--output-dir", str(out)]) == 0
    text = capsys.readouterr().out
    assert "batch 5;" in text and text.splitlines()[-2].endswith("images/s")
    assert Image.open(out / "grid.png").width >= 512


def test_auto_batch_size_respects_the_memory_bound():
    cpu = torch.device("cpu")
    assert auto_batch_size(UNET_PRESETS["digits"], 500, cpu) == 500
    cifar = auto_batch_size(UNET_PRESETS["cifar10"], 10**9, cpu)
    # the paper's CIFAR-10 U-Net holds ~7.5 MB of activations per image in a no_grad forward
    # (measured: peak RSS of one call at batch 32); the bound is at most 8 GiB
    assert 1 <= cifar <= (8 << 30) // (7 << 20)
