"""Line and bar charts: matplotlib when it is installed, Pillow as the fallback; one backend chooser.

With matplotlib (``pip install 'ddpmkit[plots]'``) charts are anti-aliased and may be written as
PDF or SVG as well as PNG, by the file's suffix; without it they are drawn with Pillow, PNG only.
Every file is written atomically (``fileio.atomic_write``).
"""

from __future__ import annotations

import enum
import importlib.util
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from ddpmkit.enums import parse_enum
from ddpmkit.fileio import atomic_write
from ddpmkit.images import font, save_pil

__all__ = ["PALETTE", "BarPanel", "ChartBackend", "LinePanel", "bar_chart", "plot_line_panels", "plot_lines",
           "render_lines"]

# matplotlib's "tab10" colours, so charts look familiar
PALETTE: tuple[tuple[int, int, int], ...] = (
    (31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
    (140, 86, 75), (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207),
)


VECTOR_SUFFIXES = (".pdf", ".svg")
Series = dict[str, tuple[Sequence[float], Sequence[float]]]  # name -> (xs, ys)


class ChartBackend(str, enum.Enum):
    """Who draws a chart: matplotlib when installed (AUTO), or the one named."""

    AUTO = "auto"
    MATPLOTLIB = "matplotlib"
    PILLOW = "pillow"


# ---------------------------------------------------------------------------------- line charts
@dataclass(frozen=True, kw_only=True)
class LinePanel:
    """One panel of ``plot_line_panels``: lines ``name -> (xs, ys)`` with their titles and axes."""

    series: Series
    title: str = ""
    xlabel: str = ""
    ylabel: str = ""
    logx: bool = False
    logy: bool = False


def plot_lines(
    path: str | os.PathLike,
    series: Series,
    *,
    title: str = "",
    xlabel: str = "",
    ylabel: str = "",
    logx: bool = False,
    logy: bool = False,
    size: tuple[int, int] = (640, 400),
    backend: ChartBackend | str = ChartBackend.AUTO,
) -> Path:
    """A line chart: one line per entry ``name -> (xs, ys)`` of ``series``, with axes, ticks,
    grid, labels, title and a legend. Non-finite points break a line. PNG, or with matplotlib
    PDF/SVG, by the suffix of ``path``; ``size`` is (width, height) in pixels at 100 dpi. Returns
    the path."""
    panel = LinePanel(series=series, title=title, xlabel=xlabel, ylabel=ylabel, logx=logx, logy=logy)
    return plot_line_panels(path, [panel], size=size, backend=backend)


def plot_line_panels(path: str | os.PathLike, panels: Sequence[LinePanel], *,
                     size: tuple[int, int] = (640, 400),
                     backend: ChartBackend | str = ChartBackend.AUTO) -> Path:
    """Line charts side by side in one figure of (len(panels) * width, height) pixels, ``size``
    being one panel's (width, height) (see ``plot_lines``). Returns the path."""
    if _chart_backend(backend, path) is ChartBackend.MATPLOTLIB:
        fig = _mpl_figure(size, len(panels))
        for ax, p in zip(fig.axes, panels, strict=True):
            _mpl_lines(ax, p.series, title=p.title, xlabel=p.xlabel, ylabel=p.ylabel, logx=p.logx,
                       logy=p.logy)
        return _atomic_savefig(fig, path)
    charts = [render_lines(p.series, title=p.title, xlabel=p.xlabel, ylabel=p.ylabel, logx=p.logx,
                           logy=p.logy, size=size) for p in panels]
    if len(charts) == 1:
        return save_pil(charts[0], path)
    joined = Image.new("RGB", (len(charts) * size[0], size[1]), "white")
    for k, chart in enumerate(charts):
        joined.paste(chart, (k * size[0], 0))
    return save_pil(joined, path)


def _chart_backend(backend: ChartBackend | str, path: str | os.PathLike) -> ChartBackend:
    """The backend that draws a chart to ``path``; ValueError when that one cannot."""
    b = parse_enum(ChartBackend, backend, "backend")
    have_mpl = importlib.util.find_spec("matplotlib") is not None
    suffix = Path(path).suffix.lower()
    if b is ChartBackend.AUTO:
        b = ChartBackend.MATPLOTLIB if have_mpl else ChartBackend.PILLOW
    if b is ChartBackend.MATPLOTLIB:
        if not have_mpl:
            raise ValueError("this chart needs matplotlib: pip install 'ddpmkit[plots]'")
        return b
    if b is ChartBackend.PILLOW:
        if suffix in VECTOR_SUFFIXES:
            raise ValueError(f"{suffix} charts need matplotlib: pip install 'ddpmkit[plots]' "
                             "(or write a .png)")
        return b
    raise ValueError(f"unknown chart backend {b!r}")


def _mpl_figure(size: tuple[int, int], panels: int) -> Any:
    """A matplotlib Figure of ``size`` pixels (at 100 dpi) with ``panels`` axes side by side."""
    from matplotlib.figure import Figure  # no pyplot: no global state, no GUI backend

    width, height = size
    if width < 200 or height < 150:
        raise ValueError(f"size must be at least (200, 150), got {size}")
    fig = Figure(figsize=(panels * width / 100, height / 100), dpi=100, layout="constrained")
    fig.subplots(1, panels, squeeze=False)
    return fig


def _mpl_lines(ax: Any, series: Series, *, title: str,
               xlabel: str, ylabel: str, logx: bool, logy: bool) -> None:
    """``render_lines``'s chart on matplotlib axes (the same checks, colours and layout)."""
    lines = _series_arrays(series)
    _axis([x for x, _ in lines.values()], logx, "x")  # the same errors as the Pillow chart
    _axis([y for _, y in lines.values()], logy, "y")
    for k, (name, (x, y)) in enumerate(lines.items()):
        ok = np.isfinite(x) & np.isfinite(y)
        y = np.where(ok, y, np.nan)  # a non-finite point breaks the line (a NaN gap)
        colour = tuple(c / 255 for c in PALETTE[k % len(PALETTE)])
        ax.plot(x, y, color=colour, linewidth=1.8, label=name)
        padded = np.concatenate([[False], ok, [False]])
        alone = ok & ~padded[:-2] & ~padded[2:]  # finite points with no finite neighbour: no segment
        if alone.any():
            ax.plot(x[alone], y[alone], linestyle="none", marker="o", markersize=3, color=colour)
    ax.set_xscale("log" if logx else "linear")
    ax.set_yscale("log" if logy else "linear")
    ax.grid(True, which="major", color="0.9")
    ax.set_axisbelow(True)
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.legend(loc="best")


def _atomic_savefig(fig: Any, path: str | os.PathLike) -> Path:
    """Save a matplotlib figure (format from the suffix) through a temporary file and a rename."""
    path = Path(path)
    fmt = path.suffix.lower().lstrip(".")
    if fmt not in fig.canvas.get_supported_filetypes():
        raise ValueError(f"cannot tell the chart format of {str(path)!r}; expected .png, .pdf or .svg")
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda f: fig.savefig(f, format=fmt, facecolor="white"))
    return path


def _series_arrays(series: Series) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    if not series:
        raise ValueError("series must hold at least one line: {name: (xs, ys)}")
    lines: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for name, (xs, ys) in series.items():
        x, y = np.asarray(xs, dtype=np.float64), np.asarray(ys, dtype=np.float64)
        if x.ndim != 1 or x.shape != y.shape:
            raise ValueError(
                f"series {name!r}: xs and ys must be 1-D of one length, got {x.shape}, {y.shape}"
            )
        lines[name] = (x, y)
    return lines


@dataclass(frozen=True)
class _Scale:
    """One axis of a Pillow chart: its limits, ticks, and whether it is logarithmic."""

    lim: tuple[float, float]
    ticks: list[float]
    log: bool

    def px(self, v: np.ndarray, a: float, b: float) -> np.ndarray:
        """Values ``v`` as pixels, the limits mapped to ``a`` and ``b``."""
        lo, hi = (math.log10(self.lim[0]), math.log10(self.lim[1])) if self.log else self.lim
        with np.errstate(divide="ignore", invalid="ignore"):
            u = np.log10(v) if self.log else v
        return a + (u - lo) / (hi - lo) * (b - a)


Box = tuple[float, float, float, float]  # the plot box (x0, y0, x1, y1) in pixels


def render_lines(
    series: Series,
    *,
    title: str = "",
    xlabel: str = "",
    ylabel: str = "",
    logx: bool = False,
    logy: bool = False,
    size: tuple[int, int] = (640, 400),
) -> Image.Image:
    """The chart of ``plot_lines`` as a Pillow RGB image of ``size`` (width, height)."""
    lines = _series_arrays(series)
    width, height = size
    if width < 200 or height < 150:
        raise ValueError(f"size must be at least (200, 150), got {size}")
    xs = _Scale(*_axis([x for x, _ in lines.values()], logx, "x"), logx)
    ys = _Scale(*_axis([y for _, y in lines.values()], logy, "y"), logy)

    img = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(img)
    big, small = font(14), font(11)
    ytick_w = max(_text_size(draw, _tick_label(v), small)[0] for v in ys.ticks)
    left = 12 + (18 if ylabel else 0) + ytick_w + 8
    top, right = (34 if title else 14), 16
    bottom = 24 + (22 if xlabel else 0)
    box = (left, top, width - right, height - bottom)
    _draw_grid(draw, box, xs, ys, small)
    _draw_series(draw, box, lines, xs, ys)
    _legend(draw, list(lines), small, box[2], box[1])
    _draw_titles(img, draw, box, big, title=title, xlabel=xlabel, ylabel=ylabel)
    return img


def _draw_grid(draw: ImageDraw.ImageDraw, box: Box, xs: _Scale, ys: _Scale, small: Any) -> None:
    """Grid lines, ticks and tick labels on both axes, and the frame of the plot box."""
    x0, y0, x1, y1 = box
    for v in xs.ticks:
        x = float(xs.px(np.array(v), x0, x1))
        draw.line([(x, y0), (x, y1)], fill=(232, 232, 232))
        draw.line([(x, y1), (x, y1 + 4)], fill="black")
        tw, _ = _text_size(draw, _tick_label(v), small)
        draw.text((x - tw / 2, y1 + 6), _tick_label(v), fill="black", font=small)
    for v in ys.ticks:
        y = float(ys.px(np.array(v), y1, y0))
        draw.line([(x0, y), (x1, y)], fill=(232, 232, 232))
        draw.line([(x0 - 4, y), (x0, y)], fill="black")
        tw, th = _text_size(draw, _tick_label(v), small)
        draw.text((x0 - 6 - tw, y - th / 2 - 2), _tick_label(v), fill="black", font=small)
    draw.rectangle([x0, y0, x1, y1], outline="black")


def _draw_series(draw: ImageDraw.ImageDraw, box: Box, lines: dict[str, tuple[np.ndarray, np.ndarray]],
                 xs: _Scale, ys: _Scale) -> None:
    """Each line in its palette colour; a non-finite point breaks it, a lone point is a dot."""
    x0, y0, x1, y1 = box
    for k, (x, y) in enumerate(lines.values()):
        colour = PALETTE[k % len(PALETTE)]
        xp, yp = xs.px(x, x0, x1), ys.px(y, y1, y0)
        ok = np.isfinite(xp) & np.isfinite(yp)
        for run in _finite_runs(xp, yp, ok):
            if len(run) > 1:
                draw.line(run, fill=colour, width=2)
            else:
                draw.point(run, fill=colour)


def _draw_titles(img: Image.Image, draw: ImageDraw.ImageDraw, box: Box, big: Any, *, title: str,
                 xlabel: str, ylabel: str) -> None:
    """The title above the plot box, the x label below it, the y label turned on its left."""
    x0, y0, x1, y1 = box
    if title:
        tw, _ = _text_size(draw, title, big)
        draw.text(((x0 + x1 - tw) / 2, 8), title, fill="black", font=big)
    if xlabel:
        tw, _ = _text_size(draw, xlabel, big)
        draw.text(((x0 + x1 - tw) / 2, img.height - 22), xlabel, fill="black", font=big)
    if ylabel:
        tw, th = _text_size(draw, ylabel, big)
        label = Image.new("RGB", (tw + 4, th + 8), "white")
        ImageDraw.Draw(label).text((2, 0), ylabel, fill="black", font=big)
        label = label.rotate(90, expand=True)
        img.paste(label, (6, int((y0 + y1 - label.height) / 2)))


def _nice_step(span: float, max_ticks: int) -> float:
    """The smallest of 1, 2, 2.5, 5 x 10^k giving at most ``max_ticks`` intervals over ``span``."""
    raw = span / max(max_ticks, 1)
    mag = 10.0 ** math.floor(math.log10(raw))
    for m in (1.0, 2.0, 2.5, 5.0, 10.0):
        if m * mag >= raw:
            return m * mag
    return 10.0 * mag


def _linear_ticks(lo: float, hi: float, max_ticks: int = 6) -> tuple[float, float, list[float]]:
    """Axis limits widened to nice values and the ticks between them."""
    if hi <= lo:
        pad = abs(lo) * 0.1 or 1.0
        lo, hi = lo - pad, hi + pad
    step = _nice_step(hi - lo, max_ticks)
    lo, hi = math.floor(lo / step + 1e-9) * step, math.ceil(hi / step - 1e-9) * step
    n = round((hi - lo) / step)
    return lo, hi, [lo + i * step for i in range(n + 1)]


def _log_ticks(lo: float, hi: float) -> tuple[float, float, list[float]]:
    """Log-axis limits at decades (or 1-2-5 steps over fewer than two decades) and the ticks."""
    k0, k1 = math.floor(math.log10(lo) + 1e-9), math.ceil(math.log10(hi) - 1e-9)
    if k1 == k0:
        k1 += 1
    decades = list(range(k0, k1 + 1))
    stride = max(1, math.ceil(len(decades) / 8))
    ticks = [10.0**k for k in decades[::stride]]
    if k1 - k0 <= 2:
        ticks = sorted({m * 10.0**k for k in decades for m in (1, 2, 5) if m * 10.0**k <= 10.0**k1})
        lo_t = max(t for t in ticks if t <= lo * (1 + 1e-9))
        hi_t = min(t for t in ticks if t >= hi * (1 - 1e-9))
        ticks = [t for t in ticks if lo_t <= t <= hi_t]
        return lo_t, hi_t, ticks
    return 10.0**k0, 10.0**k1, ticks


def _tick_label(v: float) -> str:
    if v != 0 and (abs(v) >= 1e5 or abs(v) < 1e-3):
        return f"{v:.0e}".replace("e-0", "e-").replace("e+0", "e")
    return f"{v:.6g}"


def _text_size(draw: ImageDraw.ImageDraw, text: str, font: Any) -> tuple[int, int]:
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    return right - left, bottom - top


def _axis(values: list[np.ndarray], log: bool, name: str) -> tuple[tuple[float, float], list[float]]:
    v = np.concatenate(values)
    v = v[np.isfinite(v)]
    if log:
        if (v <= 0).any():
            raise ValueError(f"log{name} needs positive {name} values, got min {v.min():g}")
    if v.size == 0:
        raise ValueError(f"no finite {name} values to plot")
    lo, hi, ticks = _log_ticks(float(v.min()), float(v.max())) if log else _linear_ticks(
        float(v.min()), float(v.max())
    )
    return (lo, hi), ticks


def _finite_runs(xp: np.ndarray, yp: np.ndarray, ok: np.ndarray) -> list[list[tuple[float, float]]]:
    """The maximal runs of consecutive finite points, as pixel coordinate lists."""
    runs: list[list[tuple[float, float]]] = [[]]
    for xi, yi, good in zip(xp.tolist(), yp.tolist(), ok.tolist(), strict=True):
        if good:
            runs[-1].append((xi, yi))
        elif runs[-1]:
            runs.append([])
    return [r for r in runs if r]


def _legend(draw: ImageDraw.ImageDraw, names: list[str], font: Any, x_right: float, y_top: float) -> None:
    """A framed legend inside the top-right corner of the plot box."""
    sizes = [_text_size(draw, n, font) for n in names]
    row = max(h for _, h in sizes) + 6
    bx1, by0 = x_right - 8, y_top + 8
    bx0, by1 = bx1 - (max(w for w, _ in sizes) + 44), by0 + row * len(names) + 8
    draw.rectangle([bx0, by0, bx1, by1], fill="white", outline=(160, 160, 160))
    for k, name in enumerate(names):
        y = by0 + 4 + k * row + row / 2
        colour = PALETTE[k % len(PALETTE)]
        draw.line([(bx0 + 8, y), (bx0 + 32, y)], fill=colour, width=2)
        draw.text((bx0 + 38, y - sizes[k][1] / 2 - 3), name, fill="black", font=font)


# ---------------------------------------------------------------------------------- bar charts
@dataclass(frozen=True, kw_only=True)
class BarPanel:
    """One panel of ``bar_chart``: a mean (and a spread, or None) per name; ``reference`` draws a
    dashed line (e.g. the real-data floor); ``log`` puts the values on a log axis."""

    title: str
    names: list[str]
    means: list[float]
    spreads: list[float | None]
    reference: float | None = None
    log: bool = False


def bar_chart(path: str | os.PathLike, panels: list[BarPanel], *, width: int = 900, row_h: int = 26,
              backend: ChartBackend | str = ChartBackend.AUTO) -> Path:
    """Horizontal bars with +- spread error bars, one panel per ``BarPanel``, stacked; drawn by
    matplotlib when installed (PNG, PDF or SVG), else by Pillow (PNG, labels spelled in ASCII)."""
    for p in panels:
        if p.log and any(math.isfinite(m) and m <= 0 for m in p.means):
            raise ValueError(f"panel {p.title!r}: a log axis needs positive values, got {p.means}")
    if _chart_backend(backend, path) is ChartBackend.MATPLOTLIB:
        return _mpl_bar_chart(path, panels, width=width, row_h=row_h)
    return _pil_bar_chart(path, panels, width=width, row_h=row_h)


def _mpl_bar_chart(path: str | os.PathLike, panels: list[BarPanel], *, width: int, row_h: int) -> Path:
    from matplotlib.figure import Figure

    heights = [60 + row_h * len(p.names) for p in panels]
    fig = Figure(figsize=(width / 100, sum(heights) / 100), dpi=100, layout="constrained")
    axes = fig.subplots(len(panels), 1, squeeze=False, height_ratios=heights)[:, 0]
    colour = tuple(c / 255 for c in PALETTE[0])
    for ax, p in zip(axes, panels, strict=True):
        y = np.arange(len(p.names))
        finite = [math.isfinite(m) for m in p.means]
        means = [m if ok else np.nan for m, ok in zip(p.means, finite, strict=True)]
        xerr = [s if (s and ok) else 0.0 for s, ok in zip(p.spreads, finite, strict=True)]
        ax.barh(y, means, xerr=xerr, color=colour, capsize=4, height=0.6)
        for yi, m, err, ok in zip(y, p.means, xerr, finite, strict=True):
            if ok:  # the value, right of its error bar
                ax.annotate(f"{m:.4g}", (m + err, yi), xytext=(6, 0), textcoords="offset points",
                            va="center", fontsize=9)
            else:  # at the axis' left edge (x in axes coordinates: also right on a log axis)
                ax.annotate("not finite", (0, yi), xycoords=ax.get_yaxis_transform(), xytext=(6, 0),
                            textcoords="offset points", va="center", fontsize=9, color="red")
        if p.reference is not None:
            ax.axvline(p.reference, color=(0.8, 0.16, 0.16), linestyle="--", linewidth=1.5)
        ax.set_yticks(y, p.names)
        ax.invert_yaxis()  # the first name on top, as in the table
        ax.set_xscale("log" if p.log else "linear")
        ax.grid(True, axis="x", which="both" if p.log else "major", color="0.9")
        ax.set_axisbelow(True)
        ax.set_title(p.title, fontsize=11, loc="left")
        ax.set_xlabel("log scale" if p.log else "")
        ax.margins(x=0.15)
    return _atomic_savefig(fig, path)


def _pil_bar_chart(path: str | os.PathLike, panels: list[BarPanel], *, width: int, row_h: int) -> Path:
    face, left, right = font(12), 330, 60
    heights = [40 + row_h * len(p.names) + 20 for p in panels]
    img = Image.new("RGB", (width, sum(heights)), "white")
    d, y0 = ImageDraw.Draw(img), 0
    for p, h in zip(panels, heights, strict=True):
        ends = [m + (s or 0) for m, s in zip(p.means, p.spreads, strict=True) if math.isfinite(m)]
        ends += [p.reference] if p.reference else []
        starts = [max(m - (s or 0), m / 10)
                  for m, s in zip(p.means, p.spreads, strict=True) if math.isfinite(m)]
        lo = math.log10(min(starts)) - 0.1 if (p.log and starts) else 0.0
        hi = (math.log10(max(ends)) + 0.1) if (p.log and ends) else max(ends + [1e-12]) * 1.1

        def pos(v: float, lo: float = lo, hi: float = hi, log: bool = p.log) -> float:
            """The x pixel of value ``v``."""
            u = (math.log10(max(v, 10 ** lo)) if log else v) - lo
            return left + u * (width - left - right) / (hi - lo)

        title = _ascii(p.title) + (" (log scale)" if p.log else "")
        d.text((10, y0 + 8), title, fill="black", font=font(14))
        for i, (name, m, s) in enumerate(zip(p.names, p.means, p.spreads, strict=True)):
            y = y0 + 40 + i * row_h
            d.text((10, y + 5), _ascii(name), fill="black", font=face)
            if not math.isfinite(m):
                d.text((left + 4, y + 5), "not finite", fill="red", font=face)
                continue
            d.rectangle([left, y + 4, pos(m), y + row_h - 4], fill=(70, 120, 190))
            if s:
                lo_x, hi_x, cy = pos(max(m - s, 0.0)), pos(m + s), y + row_h // 2
                d.line([lo_x, cy, hi_x, cy], fill="black", width=2)
                d.line([lo_x, cy - 5, lo_x, cy + 5], fill="black", width=2)
                d.line([hi_x, cy - 5, hi_x, cy + 5], fill="black", width=2)
            d.text((pos(m + (s or 0)) + 6, y + 5), f"{m:.4g}", fill="black", font=face)
        if p.reference:
            x = pos(p.reference)
            for yy in range(y0 + 36, y0 + h - 16, 8):
                d.line([x, yy, x, yy + 4], fill=(200, 40, 40), width=2)
        d.line([left, y0 + 36, left, y0 + h - 16], fill="black")
        y0 += h
    return save_pil(img, path)


_ASCII = (("μ̃", "mu~"), ("μ", "mu"), ("Σ", "Sigma"), ("ε", "eps"), ("‖", "|"), ("−", "-"), ("²", "^2"),
          ("θ", "theta"))


def _ascii(text: str) -> str:
    """Pillow's fallback font has no Greek: the labels spelled out."""
    for a, b in _ASCII:
        text = text.replace(a, b)
    return text

