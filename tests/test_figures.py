"""Image grids, the Pillow line chart, and the paper's figure layouts on a toy model."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image

from ddpmkit.diffusion import DiffusionConfig
from ddpmkit.figures import (
    PALETTE,
    _linear_ticks,
    _log_ticks,
    format_rate_distortion_table,
    image_grid,
    images_to_uint8,
    interpolation_figure,
    plot_lines,
    progressive_figure,
    rate_distortion,
    rate_distortion_figure,
    reconstruction_figure,
    save_image,
    save_image_grid,
    shared_xt_figure,
)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def toy_eps(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """A deterministic stand-in for the network: eps-shaped, depends on x and t."""
    return torch.tanh(x * (1 + t.view(-1, 1, 1, 1) / 10))


# ---------------------------------------------------------------------------------- grids
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
    u = images_to_uint8(x)
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


# ---------------------------------------------------------------------------------- line chart
def test_ticks_are_nice_and_cover_the_data() -> None:
    for lo, hi in [(0.0, 1000.0), (0.013, 1.78), (-3.2, 7.9), (12.0, 12.0), (0.95, 67.6)]:
        a, b, ticks = _linear_ticks(lo, hi)
        assert a <= lo and b >= hi and ticks[0] == a and math.isclose(ticks[-1], b)
        step = ticks[1] - ticks[0]
        mantissa = step / 10 ** math.floor(math.log10(step))
        assert any(math.isclose(mantissa, m) for m in (1, 2, 2.5, 5)), (lo, hi, step)
        assert 2 <= len(ticks) <= 8
    a, b, ticks = _log_ticks(3.0, 4.0e5)
    assert (a, b) == (1.0, 1e6) and ticks == [10.0**k for k in range(7)]
    a, b, ticks = _log_ticks(0.3, 7.0)
    assert a <= 0.3 and b >= 7 and ticks == [0.2, 0.5, 1.0, 2.0, 5.0, 10.0]


def test_plot_lines_draws_each_series(tmp_path) -> None:
    t = np.arange(1, 101)
    path = plot_lines(tmp_path / "chart.png", {"rate": (t, 2 * np.exp(-t / 20)), "distortion": (t, t / 50.0)},
                      title="Rate", xlabel="t", ylabel="bits/dim", size=(500, 300), backend="pillow")
    im = np.asarray(Image.open(path).convert("RGB"))
    assert im.shape == (300, 500, 3)
    for k in range(2):
        ys, xs = np.nonzero((im == PALETTE[k]).all(-1))
        assert xs.max() - xs.min() > 300, k  # the line spans most of the plot's width
    # series 0 falls from left to right, series 1 rises
    ys, xs = np.nonzero((im == PALETTE[0]).all(-1))
    left, right = ys[xs < xs.min() + 20].mean(), ys[xs > xs.max() - 20].mean()
    assert left < right - 100  # image rows grow downwards
    assert (im < 100).all(-1).sum() > 500  # text, ticks and axes in black


def test_plot_lines_log_axes_and_errors(tmp_path) -> None:
    x = np.array([1.0, 10.0, 100.0, np.nan, 1000.0])
    path = plot_lines(tmp_path / "log.png", {"y": (x, x**2)}, logx=True, logy=True)
    assert Image.open(path).size == (640, 400)
    with pytest.raises(ValueError, match="logy needs positive y values"):
        plot_lines(tmp_path / "bad.png", {"y": ([1, 2], [0, 1])}, logy=True)
    with pytest.raises(ValueError, match="at least one line"):
        plot_lines(tmp_path / "bad.png", {})
    with pytest.raises(ValueError, match="1-D of one length"):
        plot_lines(tmp_path / "bad.png", {"y": ([1, 2, 3], [1, 2])})


# ---------------------------------------------------------------------------------- the paper's figures
@pytest.fixture(scope="module")
def diffusion():
    return DiffusionConfig(num_timesteps=10, beta_start=0.01, beta_end=0.4).build()


def test_figure_layouts(diffusion) -> None:
    images, cols = progressive_figure(toy_eps, diffusion, (2, 1, 4, 4), num_snapshots=5)
    assert cols == 5 and images.shape == (2 * 2 * 5, 4, 4, 1) and images.dtype == np.uint8
    images, cols = progressive_figure(toy_eps, diffusion, (3, 3, 4, 4), num_snapshots=4, show="x0")
    assert cols == 4 and images.shape == (3 * 4, 4, 4, 3)
    x = torch.rand(2, 3, 4, 4, generator=torch.Generator().manual_seed(0)) * 2 - 1
    images, cols = reconstruction_figure(toy_eps, diffusion, x, [2, 9])
    assert cols == 1 + 2 * 2 and images.shape == (2 * 5, 4, 4, 3)
    np.testing.assert_array_equal(images[0], images_to_uint8(x[:1])[0])  # the original comes first
    images, cols = interpolation_figure(toy_eps, diffusion, x[:1], x[1:], [3, 6, 9], num_lambdas=4)
    assert cols == 6 and images.shape == (3 * 6, 4, 4, 3)
    np.testing.assert_array_equal(images[5], images_to_uint8(x[1:])[0])  # source b closes each row
    images, cols = shared_xt_figure(toy_eps, diffusion, (1, 3, 4, 4), [2, 9], num_samples=3)
    assert cols == 4 and images.shape == (2 * 4, 4, 4, 3)
    with pytest.raises(ValueError, match="unknown show 'all'; choose one of both, x0, xt$"):
        progressive_figure(toy_eps, diffusion, (1, 1, 4, 4), show="all")


def test_rate_distortion_from_the_bound_terms(diffusion, tmp_path) -> None:
    x = torch.rand(3, 1, 4, 4, generator=torch.Generator().manual_seed(0)) * 2 - 1
    rd = rate_distortion(toy_eps, diffusion, x, seed=5)
    terms = diffusion.calc_bpd_loop(toy_eps, x, generator=torch.Generator().manual_seed(5))
    vb, prior = terms["vb"].double().mean(0), float(terms["prior_bpd"].double().mean())
    T = diffusion.num_timesteps
    for t in range(T):  # rate(t) = L_T + sum of the KL terms after t (reverse order: T-1 .. t+1)
        assert rd["rate"][t] == pytest.approx(prior + float(vb[t + 1 :].sum()), rel=1e-12, abs=1e-12)
        rmse = 127.5 * math.sqrt(float(terms["x0_mse"][:, t].double().mean()))
        assert rd["distortion_rmse"][t] == pytest.approx(rmse, rel=1e-12)
    assert all(a >= b for a, b in zip(rd["rate"], rd["rate"][1:], strict=False))  # KL terms >= 0
    assert rd["rate_bpd"] + rd["distortion_bpd"] == pytest.approx(rd["total_bpd"], rel=1e-6)  # float32 sum
    assert [r["reverse_time"] for r in rd["table"]] == list(range(10, 0, -1))
    assert rd["table"][0]["rate_bpd"] == rd["rate"][0] and rd["table"][-1]["rate_bpd"] == rd["rate"][T - 1]
    text = format_rate_distortion_table(rd)
    assert "reverse time" in text and len(text.splitlines()) == 12
    path = rate_distortion_figure(rd, tmp_path / "rd.png", size=(400, 300))
    assert Image.open(path).size == (1200, 300)
