"""Charts through matplotlib (PNG, PDF, SVG) and the Pillow fallback when matplotlib is absent."""

from __future__ import annotations

import importlib.util
import xml.etree.ElementTree as ET

import numpy as np
import pytest
from PIL import Image

from ddpmkit import figures
from ddpmkit.figures import PALETTE, plot_lines, rate_distortion_figure

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
    monkeypatch.setattr(figures.importlib.util, "find_spec",
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
