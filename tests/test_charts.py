"""Charts through matplotlib (PNG, PDF, SVG) and the Pillow fallback when matplotlib is absent; line
and bar charts."""

from __future__ import annotations

import importlib.util
import math
import xml.etree.ElementTree as ET

import numpy as np
import pytest
from PIL import Image

from ddpmkit import charts
from ddpmkit.charts import PALETTE, BarPanel, _linear_ticks, _log_ticks, bar_chart, plot_lines
from ddpmkit.figures import rate_distortion_figure

needs_mpl = pytest.mark.skipif(importlib.util.find_spec("matplotlib") is None,
                               reason="matplotlib is not installed (pip install 'ddpmkit[plots]')")
T = np.arange(1, 101)
SERIES = {"rate": (T, 2 * np.exp(-T / 20)), "distortion": (T, T / 50.0)}


def _rd(n: int = 20) -> dict:
    return {"num_timesteps": n, "distortion_rmse": list(np.linspace(60, 1, n)),
            "rate": list(np.cumsum(np.linspace(0.1, 0.01, n))[::-1])}


def _blended(im: np.ndarray, colour: tuple[int, int, int]) -> int:
    """How many pixels are a 20-80% mix of ``colour`` with the white background (anti-aliasing)."""
    white = np.full(3, 255.0)
    d = white - np.asarray(colour, float)
    x = im.astype(float)
    a = ((white - x) @ d) / (d @ d)  # the colour's share in each pixel
    resid = np.linalg.norm(x - (white - a[..., None] * d), axis=-1)
    return int(((a > 0.2) & (a < 0.8) & (resid < 6)).sum())


def _near(im: np.ndarray, colour: tuple[int, int, int], tol: int = 12) -> np.ndarray:
    return (np.abs(im.astype(int) - np.array(colour)) <= tol).all(-1)


@needs_mpl
def test_matplotlib_png_draws_each_series_at_the_given_size(tmp_path) -> None:
    path = plot_lines(tmp_path / "c.png", SERIES, title="Rate", xlabel="t", ylabel="bits/dim",
                      size=(500, 300))
    im = np.asarray(Image.open(path).convert("RGB"))
    assert im.shape == (300, 500, 3)
    spans = []
    for k in range(2):
        ys, xs = np.nonzero(_near(im, PALETTE[k]))
        spans.append((ys, xs))
        assert xs.max() - xs.min() > 300, k  # the line (not only its legend swatch) spans the plot
    ys, xs = spans[0]
    assert ys[xs < xs.min() + 15].mean() < ys[xs > xs.max() - 15].mean() - 100  # series 0 falls
    ys, xs = spans[1]
    assert ys[xs < xs.min() + 15].mean() > ys[xs > xs.max() - 15].mean() + 100  # series 1 rises
    assert min(_blended(im, PALETTE[0]), _blended(im, PALETTE[1])) > 100  # anti-aliased lines


@needs_mpl
def test_matplotlib_vector_outputs(tmp_path) -> None:
    svg = plot_lines(tmp_path / "c.svg", SERIES, title="Rate chart", xlabel="t", ylabel="bits/dim")
    root = ET.parse(svg).getroot()
    assert root.tag.endswith("svg")
    assert len(root.findall(".//{http://www.w3.org/2000/svg}path")) > 10
    pdf = plot_lines(tmp_path / "c.pdf", SERIES, logy=True)
    assert pdf.read_bytes()[:5] == b"%PDF-"
    rd = rate_distortion_figure(_rd(), tmp_path / "rd.pdf")
    assert rd.read_bytes()[:5] == b"%PDF-"
    png = rate_distortion_figure(_rd(), tmp_path / "rd.png", size=(400, 300))
    assert Image.open(png).size == (1200, 300)
    with pytest.raises(ValueError, match="logy needs positive y values"):
        plot_lines(tmp_path / "bad.png", {"y": ([1, 2], [0, 1])}, logy=True)
    with pytest.raises(ValueError, match="expected .png, .pdf or .svg"):
        plot_lines(tmp_path / "bad.xyz", SERIES)
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary file left behind


def test_without_matplotlib_charts_fall_back_to_pillow(tmp_path, monkeypatch) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(charts.importlib.util, "find_spec",
                        lambda name, *a: None if name == "matplotlib" else real(name, *a))
    path = plot_lines(tmp_path / "c.png", SERIES, size=(500, 300))
    im = np.asarray(Image.open(path).convert("RGB"))
    for k in range(2):  # Pillow draws the exact palette colour (no anti-aliasing)
        assert (im == PALETTE[k]).all(-1).sum() > 300 and _blended(im, PALETTE[k]) == 0, k
    assert Image.open(rate_distortion_figure(_rd(), tmp_path / "rd.png", size=(400, 300))).size == (1200, 300)
    for bad in ("c.svg", "c.pdf"):
        with pytest.raises(ValueError, match=r"charts need matplotlib: pip install 'ddpmkit\[plots\]'"):
            plot_lines(tmp_path / bad, SERIES)
    with pytest.raises(ValueError, match=r"needs matplotlib: pip install 'ddpmkit\[plots\]'"):
        plot_lines(tmp_path / "c.png", SERIES, backend="matplotlib")
    with pytest.raises(ValueError, match="unknown backend 'cairo'; choose one of "):
        plot_lines(tmp_path / "c.png", SERIES, backend="cairo")


# ------------------------------------------------ the Pillow line chart (from tests/test_figures.py)
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


# ------------------------------------------------ bar charts (the reproduction's charts)
def _bar_lengths(path):
    """Blue pixels of each bar row in a Pillow bar chart, row by row (top to bottom)."""
    from PIL import Image

    a = np.asarray(Image.open(path).convert("RGB")).astype(int)
    blue = (a[..., 0] == 70) & (a[..., 1] == 120) & (a[..., 2] == 190)
    rows = blue.sum(1)
    return [int(r) for r in rows[rows > 0][[0, -1]]]  # the first and the last bar's widths


@pytest.mark.parametrize("log, lo, hi", [(False, 80, 120), (True, 15, 30)])
def test_bar_chart_log_axis_keeps_small_values_visible(tmp_path, log, lo, hi):
    panel = BarPanel(title="bits/dim", names=["a", "b"], means=[0.1, 10.0], spreads=[None, None], log=log)
    path = bar_chart(tmp_path / "bars.png", [panel], backend="pillow")
    small, large = _bar_lengths(path)
    # linear: 10 / 0.1 = 100; log axis from 10^-1.1 to 10^1.1: (2.1 / 0.1) = 21
    assert lo < large / small < hi, (small, large)


def test_bar_chart_with_matplotlib_writes_png_and_svg(tmp_path):
    pytest.importorskip("matplotlib")
    panel = BarPanel(title="FD", names=["μ̃: L, learned Σ", "ε: L_simple"], means=[3.0, 30.0],
                       spreads=[0.5, None], reference=2.0, log=True)
    for suffix in (".png", ".svg"):
        path = bar_chart(tmp_path / f"bars{suffix}", [panel], backend="matplotlib")
        assert path.stat().st_size > 1000
    with pytest.raises(ValueError, match="positive"):
        bar_chart(tmp_path / "bad.png", [BarPanel(title="x", names=["a"], means=[0.0], spreads=[None],
                                                       log=True)])
