"""Every picture legible: small-image grids upscaled nearest-neighbour to >= 512 px, labelled figures,
and `ddpm sample` choosing its batch size within a memory bound and printing images/s."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ddpmkit.cli import main
from ddpmkit.diffusion import DiffusionConfig
from ddpmkit.figures import progressive_labels
from ddpmkit.images import image_grid, label_grid, save_image_grid
from ddpmkit.nn import UNET_PRESETS, UNet, UNetConfig
from ddpmkit.training.fit import auto_batch_size

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
    from ddpmkit.chains import sample_progressive

    diffusion = DiffusionConfig(num_timesteps=T, beta_start=0.01, beta_end=0.4).build()
    out = sample_progressive(lambda x, t: torch.zeros_like(x), diffusion, (1, 1, 4, 4),
                             snapshot_ts=__import__("ddpmkit.respace").respace.space_timesteps(T, 3),
                             generator=torch.Generator().manual_seed(0))
    cols, rows = progressive_labels(T, 3)
    assert cols == [f"t = {int(t)}" for t in out["t"]] and cols[0] == f"t = {T - 1}" and cols[-1] == "t = 0"
    assert rows == ["x_t", "pred x_0"] and progressive_labels(T, 3, "x0")[1] == ["pred x_0"]


def test_progressive_figure_file_is_labelled_and_wide(model_dir, tmp_path):
    out = tmp_path / "p.png"
    assert main(["figure", "progressive", str(model_dir), "--n", "2", "--snapshots", "3",
                 "--out", str(out)]) == 0
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


# ---------------------------------------------------------------------------------- every figure labelled
R = 8  # the tiny model's images


def _bands(path: Path, cols: int, rows: int) -> tuple[np.ndarray, int, int, int]:
    """The figure as gray pixels, the label bands' sizes (top, left) and the scale: the grid of
    cols x rows tiles of R px, 2 px apart, enlarged by the smallest whole factor giving >= 512 px
    and tiles >= 64 px, sits in the bottom-right corner."""
    im = np.asarray(Image.open(path).convert("L"))
    s = next(s for s in range(1, 100) if s * (cols * (R + 2) + 2) >= 512 and s * R >= 64)
    gw, gh = s * (cols * (R + 2) + 2), s * (rows * (R + 2) + 2)
    assert im.shape[1] >= gw and im.shape[0] >= gh, (im.shape, gw, gh)
    return im, im.shape[0] - gh, im.shape[1] - gw, s


def _assert_labelled(path: Path, cols: int, rows: int, *, row_labels: bool) -> None:
    im, top, left, s = _bands(path, cols, rows)
    tile, pad = R * s, 2 * s
    assert im[top, left] == 0 and im[-1, -1] == 0, "the grid is not where its size says"  # black frame
    assert top > 0, "no label band above the columns"
    for j in range(cols):  # text over each column, in that column's span
        x0 = left + pad + j * (tile + pad)
        assert _dark(im[:top, x0:x0 + tile]), f"column {j} unlabelled"
    for j in range(1, cols):  # and no text runs into the next column (the middle of each gap is clear)
        gap = left + j * (tile + pad) + pad // 2
        assert not _dark(im[:top, gap]), f"the labels of columns {j - 1} and {j} touch"
    if row_labels:
        assert left > 0, "no label band beside the rows"
        for i in range(rows):
            y0 = top + pad + i * (tile + pad)
            assert _dark(im[y0:y0 + tile, :left]), f"row {i} unlabelled"


@pytest.mark.parametrize(
    "kind,extra,cols,rows,row_labels",
    [
        ("progressive", ["--n", "2", "--snapshots", "3"], 3, 4, True),
        ("reconstruct", ["--data", "digits", "--n", "2", "--t", "3,5"], 5, 2, False),
        ("interpolate", ["--data", "digits", "--n", "2", "--t", "2,5", "--lambdas", "6"], 8, 4, True),
        ("shared-xt", ["--n", "2", "--t", "1,5"], 3, 2, True),
    ],
)
def test_every_figure_is_labelled_and_wide(model_dir, tmp_path, kind, extra, cols, rows, row_labels):
    out = tmp_path / f"{kind}.png"
    assert main(["figure", kind, str(model_dir), "--out", str(out), *extra]) == 0
    _assert_labelled(out, cols, rows, row_labels=row_labels)


def test_figure_labels_match_the_figures_layout():
    from ddpmkit.chains import sample_progressive
    from ddpmkit.figures import (
        interpolation_figure,
        interpolation_labels,
        reconstruction_figure,
        reconstruction_labels,
        shared_xt_figure,
        shared_xt_labels,
    )

    diffusion = DiffusionConfig(num_timesteps=T, beta_start=0.01, beta_end=0.4).build()
    eps = lambda x, t: torch.zeros_like(x)  # noqa: E731
    x = torch.rand(2, 1, 4, 4, generator=torch.Generator().manual_seed(0)) * 2 - 1
    images, cols = reconstruction_figure(eps, diffusion, x, [1, 4])
    labels, rows = reconstruction_labels([1, 4])
    assert len(labels) == cols and rows == []
    assert labels == ["data\nx_0", "t = 1\nx_t", "t = 1\ndecoded", "t = 4\nx_t", "t = 4\ndecoded"]
    images, cols = interpolation_figure(eps, diffusion, x[:1], x[1:], [2, 5], num_lambdas=3)
    labels, rows = interpolation_labels([2, 5], 3)
    assert labels == ["source\nx_0", "0", "0.5", "1", "source\nx'_0"] and len(labels) == cols
    assert rows == ["t = 2", "t = 5"] and len(rows) == images.shape[0] // cols
    assert interpolation_labels([2], 3, 2)[1] == ["pair 1\nt = 2", "pair 2\nt = 2"]
    images, cols = shared_xt_figure(eps, diffusion, (1, 1, 4, 4), [1, 5, 3], num_samples=2)
    labels, rows = shared_xt_labels([1, 5, 3], 2)
    out = sample_progressive(eps, diffusion, (1, 1, 4, 4), snapshot_ts=[1, 5, 3])
    assert labels == ["x_t", "x_0 (1)", "x_0 (2)"] and len(labels) == cols
    assert rows == [f"t = {int(t)}" for t in out["t"]] == ["t = 5", "t = 3", "t = 1"]


def test_multiline_labels_and_corner_are_drawn_and_long_labels_shrink_to_fit():
    tile, pad, cols = 48, 6, 4
    grid = Image.new("RGB", (cols * (tile + pad) + pad, tile + 2 * pad), (200, 200, 200))
    one = np.asarray(label_grid(grid, col_labels=["a"] * cols, tile=tile, padding=pad).convert("L"))
    two = np.asarray(label_grid(grid, col_labels=["a\nb"] * cols, tile=tile, padding=pad).convert("L"))
    assert two.shape[0] > one.shape[0]  # a taller band for two lines
    band = two[: two.shape[0] - grid.height]
    dark_rows = np.flatnonzero((band < 100).any(axis=1))
    assert dark_rows.size and np.diff(dark_rows).max() > 1  # two separate lines of text
    long = np.asarray(label_grid(grid, col_labels=["a very long column label"] * cols, corner="lambda",
                                 tile=tile, padding=pad).convert("L"))
    top, left = long.shape[0] - grid.height, long.shape[1] - grid.width
    assert left > 0 and _dark(long[:top, :left])  # the corner text
    for j in range(1, cols):
        assert not _dark(long[:top, left + j * (tile + pad) + pad // 2])  # shrunk: the gaps stay clear


def test_report_card_shows_the_sample_grid_enlarged(tmp_path):
    from ddpmkit.evaluate.report import build_report

    run = tmp_path / "run"
    (run / "samples").mkdir(parents=True)
    (run / "config.json").write_text('{"preset": "digits", "batch_size": 4, "steps": 1}')
    rng = np.random.default_rng(0)
    small = rng.integers(0, 256, (42, 42, 3), dtype=np.uint8)  # 16 digits at 8 px, scale 1
    Image.fromarray(small).save(run / "samples" / "step-000000001.png")
    build_report(run)
    got = np.asarray(Image.open(run / "report" / "samples.png"))
    s = -(-512 // 42)
    assert np.array_equal(got, small.repeat(s, axis=0).repeat(s, axis=1))  # nearest neighbour, >= 512 px
    big = rng.integers(0, 256, (600, 600, 3), dtype=np.uint8)
    Image.fromarray(big).save(run / "samples" / "step-000000002.png")
    build_report(run)
    assert np.array_equal(np.asarray(Image.open(run / "report" / "samples.png")), big)  # wide already
