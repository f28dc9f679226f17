"""Image grids, the one uint8 conversion and atomic image writes (moved from tests/test_figures.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from stand_ins import _dark

from ddpmkit.images import image_grid, label_grid, save_image, save_image_grid, to_uint8_nhwc


def test_image_grid_layout_and_pixels() -> None:
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, size=(10, 8, 6, 3), dtype=np.uint8)
    im = image_grid(a, nrow=4, padding=2, pad_value=7)
    assert im.mode == "RGB" and im.size == (4 * (6 + 2) + 2, 3 * (8 + 2) + 2)  # (W, H) = (34, 32)
    g = np.asarray(im)
    for i in range(10):
        r, c = divmod(i, 4)
        y, x = 2 + r * 10, 2 + c * 8
        np.testing.assert_array_equal(g[y : y + 8, x : x + 6], a[i])
    assert (g[:2] == 7).all() and (g[:, :2] == 7).all()
    assert (g[22:, 2 + 2 * 8 :] == 7).all()  # the two empty cells of the last row
    assert image_grid(a).size == (4 * 8 + 2, 3 * 10 + 2)  # default nrow = ceil(sqrt(10)) = 4


def test_grayscale_and_float_inputs() -> None:
    gray = np.arange(2 * 4 * 4, dtype=np.uint8).reshape(2, 4, 4, 1)
    im = image_grid(gray, padding=0)
    assert im.mode == "L" and im.size == (8, 4)
    x = torch.tensor([-1.0, -0.5, 0.0, 0.2, 1.0, 1.7]).view(1, 1, 2, 3)
    u = to_uint8_nhwc(x)
    assert u.shape == (1, 2, 3, 1) and u.dtype == np.uint8
    expected = np.clip(np.round((x.numpy() + 1) * 127.5), 0, 255).astype(np.uint8).reshape(1, 2, 3, 1)
    np.testing.assert_array_equal(u, expected)


def test_save_image_grid_scales_and_leaves_no_temp_files(tmp_path) -> None:
    a = np.zeros((5, 8, 8, 1), dtype=np.uint8)
    path = save_image_grid(a, tmp_path / "sub" / "grid.png", nrow=5, scale=3)
    assert Image.open(path).size == (3 * (5 * 10 + 2), 3 * 12)
    save_image(torch.zeros(3, 4, 5), tmp_path / "one.png", scale=2)
    assert Image.open(tmp_path / "one.png").size == (10, 8)
    assert sorted(p.name for p in tmp_path.rglob("*") if p.is_file()) == ["grid.png", "one.png"]


@pytest.mark.parametrize(
    "bad,match",
    [
        (np.zeros((2, 4, 4, 3), dtype=np.float64), "expected uint8 images"),
        (np.zeros((0, 4, 4, 3), dtype=np.uint8), "at least one image"),
        (np.zeros((2, 4, 4, 2), dtype=np.uint8), "C in"),
        (torch.zeros(2, 4, 4), "float images must be shaped"),
    ],
)
def test_grid_rejects_bad_images(bad, match) -> None:
    with pytest.raises(ValueError, match=match):
        image_grid(bad)


def test_grid_rejects_bad_layout(tmp_path) -> None:
    a = np.zeros((2, 4, 4, 3), dtype=np.uint8)
    with pytest.raises(ValueError, match="nrow must be a positive int"):
        image_grid(a, nrow=0)
    with pytest.raises(ValueError, match="scale must be a positive int"):
        save_image_grid(a, tmp_path / "g.png", scale=0)
    with pytest.raises(ValueError, match="cannot tell the image format"):
        save_image_grid(a, tmp_path / "g.unknown")


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
