"""Image grids, line charts, and the paper's figures.

Charts (``plot_lines``, ``rate_distortion_figure``) are drawn by matplotlib when it is installed
(``pip install 'ddpmkit[plots]'``: anti-aliased, and PDF or SVG as well as PNG, by the file's
suffix); without it they are drawn with Pillow, PNG only. Image grids always use Pillow.

Images at this edge are uint8 arrays laid out (N, H, W, C) (C = 1 or 3); float tensors in [-1, 1]
laid out (N, C, H, W) are accepted too and quantised with the library's rule
``round((x + 1) * 127.5)``. Every file is written atomically (a temporary name, then a rename).

The figure functions at the bottom (``progressive_figure``, ``interpolation_figure``,
``reconstruction_figure``, ``shared_xt_figure``, ``rate_distortion``) take a model callable and a
``GaussianDiffusion``; they call the samplers of ``ddpmkit.sampling`` and lay out the results the
way the paper's Figures 5-9 do.
"""

from __future__ import annotations

import enum
import importlib.util
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from ddpmkit.data.convert import to_uint8_nhwc
from ddpmkit.enums import parse_enum, unknown_choice
from ddpmkit.fileio import atomic_write
from ddpmkit.seeds import Stream, derive_seed, derived_generator

__all__ = [
    "ChartBackend",
    "image_grid",
    "images_to_uint8",
    "label_grid",
    "interpolation_figure",
    "interpolation_labels",
    "plot_lines",
    "progressive_figure",
    "progressive_labels",
    "rate_distortion",
    "rate_distortion_figure",
    "reconstruction_figure",
    "reconstruction_labels",
    "render_lines",
    "save_image",
    "readable_scale",
    "save_image_grid",
    "shared_xt_figure",
    "shared_xt_labels",
]

# matplotlib's "tab10" colours, so charts look familiar
PALETTE: tuple[tuple[int, int, int], ...] = (
    (31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
    (140, 86, 75), (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207),
)


VECTOR_SUFFIXES = (".pdf", ".svg")


class ChartBackend(str, enum.Enum):
    """Who draws a chart: matplotlib when installed (AUTO), or the one named."""

    AUTO = "auto"
    MATPLOTLIB = "matplotlib"
    PILLOW = "pillow"


# ---------------------------------------------------------------------------------- pixels
def images_to_uint8(images: Any) -> np.ndarray:
    """Images as uint8 (N, H, W, C).

    images: uint8 (N, H, W, C) or (N, H, W) array/tensor, or a float tensor (N, C, H, W) in [-1, 1]
    (quantised by ``data.to_uint8_nhwc``: ``round((x + 1) * 127.5)``, half up, clamped to [0, 255]).
    Returns a numpy uint8 array.
    """
    if isinstance(images, torch.Tensor) and images.is_floating_point():
        if images.ndim != 4:
            raise ValueError(f"float images must be shaped (N, C, H, W), got {tuple(images.shape)}")
        return to_uint8_nhwc(images.detach().cpu()).numpy()  # (N, H, W, C)
    a = images.detach().cpu().numpy() if isinstance(images, torch.Tensor) else np.asarray(images)
    if a.dtype != np.uint8:
        raise ValueError(
            f"expected uint8 images (N, H, W, C) or float images (N, C, H, W) in [-1, 1], got dtype {a.dtype}"
        )
    if a.ndim == 3:
        a = a[..., None]  # (N, H, W, 1)
    if a.ndim != 4 or a.shape[-1] not in (1, 3, 4):
        raise ValueError(f"expected uint8 images shaped (N, H, W, C) with C in (1, 3, 4), got {a.shape}")
    if a.shape[0] == 0:
        raise ValueError("expected at least one image, got N = 0")
    return a


def _to_pil(a: np.ndarray) -> Image.Image:
    """(H, W, C) uint8 -> a Pillow image (L, RGB or RGBA)."""
    if a.shape[-1] == 1:
        return Image.fromarray(a[..., 0], mode="L") if _MODE_KW else Image.fromarray(a[..., 0])
    return Image.fromarray(a)


_MODE_KW = int(Image.__version__.split(".")[0]) < 13  # Pillow 13 drops the mode argument


def image_grid(images: Any, *, nrow: int | None = None, padding: int = 2, pad_value: int = 0) -> Image.Image:
    """Tile images into one picture: ``nrow`` images per row (default ceil(sqrt(N))).

    images: uint8 (N, H, W, C) (see ``images_to_uint8``). ``padding`` pixels of ``pad_value``
    separate the tiles and frame the grid, so the result is
    (rows * (H + padding) + padding) x (nrow * (W + padding) + padding).
    """
    a = images_to_uint8(images)
    n, h, w, c = a.shape
    if nrow is None:
        nrow = math.ceil(math.sqrt(n))
    if isinstance(nrow, bool) or not isinstance(nrow, int) or nrow < 1:
        raise ValueError(f"nrow must be a positive int, got {nrow!r}")
    if isinstance(padding, bool) or not isinstance(padding, int) or padding < 0:
        raise ValueError(f"padding must be an int >= 0, got {padding!r}")
    ncol = min(nrow, n)
    rows = math.ceil(n / ncol)
    grid = np.full(
        (rows * (h + padding) + padding, ncol * (w + padding) + padding, c), pad_value, dtype=np.uint8
    )
    for i in range(n):
        r, q = divmod(i, ncol)
        y, x = padding + r * (h + padding), padding + q * (w + padding)
        grid[y : y + h, x : x + w] = a[i]
    return _to_pil(grid)


def _atomic_save(image: Image.Image, path: str | os.PathLike) -> Path:
    """Save ``image`` to ``path`` (format from the suffix) through a temporary file and a rename."""
    path = Path(path)
    fmt = Image.registered_extensions().get(path.suffix.lower())
    if fmt is None:
        raise ValueError(f"cannot tell the image format of {str(path)!r}; expected a suffix like .png")
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda f: image.save(f, format=fmt))
    return path


def _scaled(image: Image.Image, scale: int) -> Image.Image:
    if isinstance(scale, bool) or not isinstance(scale, int) or scale < 1:
        raise ValueError(f"scale must be a positive int, got {scale!r}")
    if scale == 1:
        return image
    return image.resize((image.width * scale, image.height * scale), Image.Resampling.NEAREST)


def save_image(image: Any, path: str | os.PathLike, *, scale: int = 1) -> Path:
    """Write one image, uint8 (H, W, C) / (H, W) or float (C, H, W) in [-1, 1], atomically."""
    if isinstance(image, torch.Tensor) and image.is_floating_point():
        a = images_to_uint8(image[None])[0]
    else:
        a = images_to_uint8((image.detach().cpu().numpy() if isinstance(image, torch.Tensor)
                             else np.asarray(image))[None])[0]
    return _atomic_save(_scaled(_to_pil(a), scale), path)


def readable_scale(width: int, min_width: int = 512) -> int:
    """The whole nearest-neighbour factor that brings a ``width``-px picture to >= ``min_width`` px."""
    return max(1, -(-min_width // max(1, width)))


def save_image_grid(
    images: Any, path: str | os.PathLike, *, nrow: int | None = None, scale: int = 1, padding: int = 2,
    min_width: int = 0, col_labels: Sequence[str] = (), row_labels: Sequence[str] = (), corner: str = "",
) -> Path:
    """Write ``image_grid(images, nrow=nrow, padding=padding)``, enlarged ``scale`` times (nearest
    neighbour; more when needed to be ``min_width`` px wide), to ``path`` atomically, with the
    column and row labels (and corner text) of ``label_grid`` when given. Returns the path."""
    grid = image_grid(images, nrow=nrow, padding=padding)
    scale = max(scale, readable_scale(grid.width, min_width)) if min_width else scale
    grid = _scaled(grid, scale)
    if col_labels or row_labels or corner:
        grid = label_grid(grid, col_labels=col_labels, row_labels=row_labels, corner=corner,
                          tile=images_to_uint8(images).shape[2] * scale, padding=padding * scale)
    return _atomic_save(grid, path)


def _label_font(size: int) -> Any:
    try:
        return ImageFont.load_default(size=size)  # Pillow >= 10.1: a scalable embedded font
    except TypeError:  # older Pillow: the fixed bitmap font
        return ImageFont.load_default()


def _wrap(text: str, font: Any, room: float) -> str:
    """``text`` with each line broken at spaces (greedily) into lines no wider than ``room`` px
    where the words allow."""
    probe = ImageDraw.Draw(Image.new("L", (1, 1)))
    out = []
    for line in text.split("\n"):
        words = line.split(" ")
        cur = words[0]
        for w in words[1:]:
            if probe.textlength(f"{cur} {w}", font=font) <= room:
                cur = f"{cur} {w}"
            else:
                out.append(cur)
                cur = w
        out.append(cur)
    return "\n".join(out)


def _fitting_labels(labels: Sequence[str], size: int, room: float) -> tuple[list[str], Any, int]:
    """The labels and their font so that every line fits in ``room`` px: the font at ``size`` px
    or smaller (down to 12 px), else broken into more lines at spaces (down to 9 px)."""
    probe = ImageDraw.Draw(Image.new("L", (1, 1)))

    def fits(texts: Sequence[str], font: Any) -> bool:
        return all(probe.textlength(line, font=font) <= room for t in texts for line in t.split("\n"))

    for k in range(size, 8, -1):
        font = _label_font(k)
        texts = list(labels) if k >= 12 else [_wrap(t, font, room) for t in labels]
        if fits(texts, font) or k == 9:
            return texts, font, k
    raise AssertionError("unreachable")


def _draw_lines(draw: ImageDraw.ImageDraw, xy: tuple[float, float], text: str, font: Any, size: int,
                anchor: str) -> None:
    """``text``'s lines ("\\n"-separated) stacked one under the other, centred vertically on xy."""
    lines = text.split("\n")
    lead = round(size * 1.2)
    for k, line in enumerate(lines):
        y = xy[1] + (k - (len(lines) - 1) / 2) * lead
        draw.text((xy[0], y), line, fill="black", font=font, anchor=anchor)


def label_grid(grid: Image.Image, *, col_labels: Sequence[str] = (), row_labels: Sequence[str] = (),
               tile: int, padding: int, corner: str = "") -> Image.Image:
    """``grid`` (tiles ``tile`` px wide, ``padding`` px apart, as ``image_grid`` lays them out) with
    a white band above naming each column and one on the left naming each row, black text; labels
    may have several lines ("t = 249\\nx_t"). ``corner`` (e.g. "lambda") goes in the top-left
    corner, naming the quantity the column labels give.

    A row label repeats over rows when there are fewer labels than rows (e.g. ["x_t", "pred x_0"]
    for the chains of the progressive figure). Column text shrinks to fit a column (down to 12 px;
    below that it is also broken at spaces, down to 9 px).
    """
    step = tile + padding
    size = max(12, min(22, tile // 3))
    col_labels, col_font, col_size = _fitting_labels(col_labels, size, step - 4)
    row_font, row_size = _label_font(size), size
    probe = ImageDraw.Draw(grid)
    side = [line for text in (*row_labels, corner) for line in text.split("\n") if line]
    left = 0 if not side else 12 + max(int(probe.textlength(t, font=row_font)) for t in side)
    n_lines = max([len(t.split("\n")) for t in (*col_labels, corner) if t] or [0])
    top = 0 if not n_lines else round(col_size * (1.2 * n_lines + 0.8))
    out = Image.new("RGB", (grid.width + left, grid.height + top), "white")
    out.paste(grid.convert("RGB"), (left, top))
    draw = ImageDraw.Draw(out)
    for j, text in enumerate(col_labels):
        _draw_lines(draw, (left + padding + j * step + tile / 2, top / 2), text, col_font, col_size, "mm")
    rows = (grid.height - padding) // step
    for i in range(rows if row_labels else 0):
        y = top + padding + i * step + tile / 2
        _draw_lines(draw, (left - 6, y), row_labels[i % len(row_labels)], row_font, row_size, "rm")
    if corner:
        _draw_lines(draw, (left - 6, top / 2), corner, row_font, row_size, "rm")
    return out


# ---------------------------------------------------------------------------------- line chart
def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)  # Pillow >= 10.1: a scalable embedded font
    except TypeError:  # older Pillow: the fixed bitmap font
        return ImageFont.load_default()


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


def plot_lines(
    path: str | os.PathLike,
    series: dict[str, tuple[Sequence[float], Sequence[float]]],
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
    if _chart_backend(backend, path) is ChartBackend.PILLOW:
        chart = render_lines(
            series, title=title, xlabel=xlabel, ylabel=ylabel, logx=logx, logy=logy, size=size
        )
        return _atomic_save(chart, path)
    fig = _mpl_figure(size, 1)
    _mpl_lines(fig.axes[0], series, title=title, xlabel=xlabel, ylabel=ylabel, logx=logx, logy=logy)
    return _atomic_savefig(fig, path)


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


def _mpl_lines(ax: Any, series: dict[str, tuple[Sequence[float], Sequence[float]]], *, title: str,
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


def _series_arrays(
    series: dict[str, tuple[Sequence[float], Sequence[float]]],
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
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


def render_lines(
    series: dict[str, tuple[Sequence[float], Sequence[float]]],
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
    xlim, xticks = _axis([x for x, _ in lines.values()], logx, "x")
    ylim, yticks = _axis([y for _, y in lines.values()], logy, "y")

    img = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(img)
    font, small = _font(14), _font(11)
    ytick_w = max(_text_size(draw, _tick_label(v), small)[0] for v in yticks)
    left = 12 + (18 if ylabel else 0) + ytick_w + 8
    top, right = (34 if title else 14), 16
    bottom = 24 + (22 if xlabel else 0)
    x0, y0, x1, y1 = left, top, width - right, height - bottom  # the plot box

    def px(v: np.ndarray, lim: tuple[float, float], log: bool, a: float, b: float) -> np.ndarray:
        lo, hi = (math.log10(lim[0]), math.log10(lim[1])) if log else lim
        with np.errstate(divide="ignore", invalid="ignore"):
            u = np.log10(v) if log else v
        return a + (u - lo) / (hi - lo) * (b - a)

    for v in xticks:  # grid and ticks
        x = float(px(np.array(v), xlim, logx, x0, x1))
        draw.line([(x, y0), (x, y1)], fill=(232, 232, 232))
        draw.line([(x, y1), (x, y1 + 4)], fill="black")
        tw, _ = _text_size(draw, _tick_label(v), small)
        draw.text((x - tw / 2, y1 + 6), _tick_label(v), fill="black", font=small)
    for v in yticks:
        y = float(px(np.array(v), ylim, logy, y1, y0))
        draw.line([(x0, y), (x1, y)], fill=(232, 232, 232))
        draw.line([(x0 - 4, y), (x0, y)], fill="black")
        tw, th = _text_size(draw, _tick_label(v), small)
        draw.text((x0 - 6 - tw, y - th / 2 - 2), _tick_label(v), fill="black", font=small)
    draw.rectangle([x0, y0, x1, y1], outline="black")

    for k, (x, y) in enumerate(lines.values()):
        colour = PALETTE[k % len(PALETTE)]
        xp, yp = px(x, xlim, logx, x0, x1), px(y, ylim, logy, y1, y0)
        ok = np.isfinite(xp) & np.isfinite(yp)
        for run in _finite_runs(xp, yp, ok):
            if len(run) > 1:
                draw.line(run, fill=colour, width=2)
            else:
                draw.point(run, fill=colour)

    _legend(draw, list(lines), small, x1, y0)
    if title:
        tw, _ = _text_size(draw, title, font)
        draw.text(((x0 + x1 - tw) / 2, 8), title, fill="black", font=font)
    if xlabel:
        tw, _ = _text_size(draw, xlabel, font)
        draw.text(((x0 + x1 - tw) / 2, height - 22), xlabel, fill="black", font=font)
    if ylabel:
        tw, th = _text_size(draw, ylabel, font)
        label = Image.new("RGB", (tw + 4, th + 8), "white")
        ImageDraw.Draw(label).text((2, 0), ylabel, fill="black", font=font)
        label = label.rotate(90, expand=True)
        img.paste(label, (6, int((y0 + y1 - label.height) / 2)))
    return img


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


# ---------------------------------------------------------------------------------- the paper's figures
# Each returns the figure's grid as uint8 (rows * cols, H, W, C) in row-major order and the number
# of columns, ready for ``save_image_grid(images, path, nrow=cols)``.
Model = Any  # a callable model(x_t, t) -> Tensor


def _rows(rows: list[torch.Tensor]) -> tuple[np.ndarray, int]:
    """Rows of images, each (cols, C, H, W) float in [-1, 1] -> uint8 (rows * cols, H, W, C), cols."""
    cols = rows[0].shape[0]
    assert all(r.shape[0] == cols for r in rows)
    return images_to_uint8(torch.cat([r.float().cpu() for r in rows])), cols


def progressive_figure(
    model: Model,
    diffusion: Any,
    shape: Sequence[int],
    *,
    num_snapshots: int = 10,
    seed: int = 0,
    device: torch.device | str = "cpu",
    show: str = "both",
) -> tuple[np.ndarray, int]:
    """Fig. 6: for each of shape[0] samples, the chain's x_t (row 1) and predicted x_0 (row 2) at
    ``num_snapshots`` timesteps evenly spaced from T - 1 to 0 (left to right). ``show``: "both",
    "x0" or "xt". shape: (B, C, H, W). Returns (uint8 grid images, columns)."""
    from ddpmkit.chains import sample_progressive
    from ddpmkit.respace import space_timesteps
    from ddpmkit.seeds import sample_generators

    if show not in ("both", "x0", "xt"):
        raise unknown_choice("show", show, ("both", "x0", "xt"))
    T = diffusion.num_timesteps
    if isinstance(num_snapshots, bool) or not isinstance(num_snapshots, int) or not 2 <= num_snapshots <= T:
        raise ValueError(f"num_snapshots must be an int in [2, {T}], got {num_snapshots!r}")
    ts = space_timesteps(T, num_snapshots)
    out = sample_progressive(
        model, diffusion, shape, snapshot_ts=ts, generator=sample_generators(seed, range(shape[0])),
        device=device,
    )
    rows = []
    for b in range(shape[0]):
        if show in ("both", "xt"):
            rows.append(out["x_t"][:, b].clamp(-1, 1))  # (K, C, H, W), t decreasing
        if show in ("both", "x0"):
            rows.append(out["pred_x0"][:, b])
    return _rows(rows)


def progressive_labels(num_timesteps: int, num_snapshots: int, show: str = "both", *,
                       one_based: bool = False) -> tuple[list[str], list[str]]:
    """Column labels ("t = 999", ..., "t = 0"; the paper's "t = 1000", ..., "t = 1" when
    ``one_based``) and row labels ("x_t", "pred x_0") of ``progressive_figure``'s grid, for
    ``save_image_grid(..., col_labels=, row_labels=)``."""
    from ddpmkit.respace import space_timesteps

    ts = sorted(set(space_timesteps(num_timesteps, num_snapshots)), reverse=True)
    rows = {"both": ["x_t", "pred x_0"], "xt": ["x_t"], "x0": ["pred x_0"]}[show]
    return [f"t = {t + int(one_based)}" for t in ts], rows


def reconstruction_labels(ts: Sequence[int]) -> tuple[list[str], list[str]]:
    """Column labels of ``reconstruction_figure``'s grid: "data x_0", then for each t "t = ..."
    over "x_t" and over "decoded" (x_0 from the reverse chain started at that x_t); no row labels
    (a row is one data image)."""
    cols = ["data\nx_0"]
    for t in ts:
        cols += [f"t = {t}\nx_t", f"t = {t}\ndecoded"]
    return cols, []


def interpolation_labels(ts: Sequence[int], num_lambdas: int,
                         num_pairs: int = 1) -> tuple[list[str], list[str]]:
    """Column labels ("source\\nx_0", the lambdas 0 .. 1, "source\\nx'_0") and row labels ("t = ...",
    with the pair's number when there are several) of ``interpolation_figure``'s grid."""
    lambdas = [f"{i / (num_lambdas - 1):.2g}" for i in range(num_lambdas)]
    rows = [f"pair {b + 1}\nt = {t}" if num_pairs > 1 else f"t = {t}" for b in range(num_pairs) for t in ts]
    return ["source\nx_0", *lambdas, "source\nx'_0"], rows


def shared_xt_labels(ts: Sequence[int], num_samples: int) -> tuple[list[str], list[str]]:
    """Column labels ("x_t", then "x_0 (k)" for each draw from p(x_0 | x_t)) and row labels
    ("t = ...", decreasing, as ``sample_progressive`` orders them) of ``shared_xt_figure``'s grid."""
    cols = ["x_t", *[f"x_0 ({k + 1})" for k in range(num_samples)]]
    return cols, [f"t = {t}" for t in sorted(set(ts), reverse=True)]


def reconstruction_figure(
    model: Model, diffusion: Any, x0: torch.Tensor, ts: Sequence[int], *, seed: int = 0
) -> tuple[np.ndarray, int]:
    """Reconstructions through the stochastic encoder q (Sec. 4.3): for each image of x0 (B, C, H, W)
    a row [x_0, then for each t in ``ts``: x_t, x_0 decoded from x_t]. Returns (grid images, cols)."""
    from ddpmkit.chains import reconstruct
    from ddpmkit.seeds import sample_generators

    rows = []
    for b in range(x0.shape[0]):
        row = [x0[b : b + 1]]
        for t in ts:
            x_t, rec = reconstruct(model, diffusion, x0[b : b + 1], t, generator=sample_generators(seed, [b]))
            row += [x_t.clamp(-1, 1), rec]
        rows.append(torch.cat(row))  # (1 + 2 len(ts), C, H, W)
    return _rows(rows)


def interpolation_figure(
    model: Model,
    diffusion: Any,
    x0_a: torch.Tensor,
    x0_b: torch.Tensor,
    ts: Sequence[int],
    *,
    num_lambdas: int = 11,
    seed: int = 0,
    encoder: str = "q",
    timesteps: Any = None,
) -> tuple[np.ndarray, int]:
    """Fig. 8-9: for each pair (x0_a[b], x0_b[b]) and each t in ``ts``, a row [source a, the
    decoded interpolations for lambda = 0, 1/(L-1), ..., 1, source b]. ``encoder`` "q" (the paper)
    or "ddim" (deterministic, over ``timesteps``; ``chains.interpolate``). Returns (grid images, cols)."""
    from ddpmkit.chains import interpolate

    if isinstance(num_lambdas, bool) or not isinstance(num_lambdas, int) or num_lambdas < 2:
        raise ValueError(f"num_lambdas must be an int >= 2, got {num_lambdas!r}")
    lambdas = [i / (num_lambdas - 1) for i in range(num_lambdas)]
    rows = []
    for b in range(x0_a.shape[0]):
        for t in ts:
            g = derived_generator(seed, Stream.INTERPOLATION, b)  # the pair's encoder noise
            mix = interpolate(model, diffusion, x0_a[b : b + 1], x0_b[b : b + 1], t, lambdas, generator=g,
                              encoder=encoder, timesteps=timesteps)
            rows.append(torch.cat([x0_a[b : b + 1], mix[0].to(x0_a.device), x0_b[b : b + 1]]))
    return _rows(rows)


def shared_xt_figure(
    model: Model,
    diffusion: Any,
    shape: Sequence[int],
    ts: Sequence[int],
    *,
    num_samples: int = 3,
    seed: int = 0,
    device: torch.device | str = "cpu",
) -> tuple[np.ndarray, int]:
    """Fig. 7: one chain from x_T is stopped at each t in ``ts``; each row shows that x_t and then
    ``num_samples`` draws of x_0 ~ p_theta(x_0 | x_t) that share it. shape: (1, C, H, W)."""
    from ddpmkit.chains import sample_progressive, sample_shared_xt
    from ddpmkit.seeds import sample_generators

    if tuple(shape)[0] != 1:
        raise ValueError(f"shape must be (1, C, H, W): one chain, got {tuple(shape)}")
    out = sample_progressive(
        model, diffusion, shape, snapshot_ts=ts, generator=sample_generators(seed, [0]), device=device
    )
    rows = []
    for k, t in enumerate(out["t"]):
        x_t = out["x_t"][k]  # (1, C, H, W)
        gens = sample_generators(derive_seed(seed, Stream.SHARED_XT, k), range(num_samples))
        draws = sample_shared_xt(model, diffusion, x_t, t, num_samples, generator=gens)
        rows.append(torch.cat([x_t.clamp(-1, 1), draws]))
    return _rows(rows)


def rate_distortion(model: Model, diffusion: Any, x0: torch.Tensor, *, seed: int = 0,
                    t_chunk: int | None = None, progress: bool = False) -> dict[str, Any]:
    """Rate and distortion along the reverse process (Sec. 4.3, Fig. 5, Table 4) on images x0
    (B, C, H, W) in [-1, 1], from the terms of ``calc_bpd_loop``, averaged over the images.

    With 0-based t (x_t is the paper's x_{t+1}): rate[t] = L_T + sum_{k > t} vb[k], the bits/dim
    received once x_t is known (the decoder term vb[0] excluded), and distortion[t] =
    RMSE(pred_x0(x_t), x_0) on the [0, 255] scale = 127.5 sqrt(x0_mse[t]). Returns a JSON-able dict
    with per-t lists, the totals (rate = rate[0], distortion = the decoder's vb[0], total_bpd) and a
    Table-4-style list of rows at reverse-process times T, 0.9 T, ..., 0.1 T."""
    from ddpmkit.evaluate.bpd import rate_distortion_by_t, rate_distortion_table

    g = torch.Generator().manual_seed(seed)  # on the CPU: the same noise on any device
    terms = diffusion.calc_bpd_loop(model, x0, generator=g, t_chunk=t_chunk, progress=progress)
    vb = terms["vb"].double().mean(0).cpu().numpy()  # (T,)
    prior = float(terms["prior_bpd"].double().mean())
    T = vb.shape[0]
    rate, distortion = rate_distortion_by_t(vb, terms["x0_mse"].double().mean(0).cpu().numpy(), prior)
    by_t = {"rate": rate.tolist(), "distortion": distortion.tolist()}
    table = [{"reverse_time": r, "t": T - r + 1, "rate_bpd": rt, "distortion_rmse": d}  # paper's 1-based t
             for r, rt, d in rate_distortion_table({"by_t": by_t})]
    return {
        "num_images": int(x0.shape[0]),
        "num_timesteps": T,
        "total_bpd": float(terms["total_bpd"].double().mean()),
        "rate_bpd": float(rate[0]),
        "distortion_bpd": float(vb[0]),
        "prior_bpd": prior,
        "rate": rate.tolist(),
        "distortion_rmse": distortion.tolist(),
        "table": table,
    }


def format_rate_distortion_table(rd: dict[str, Any]) -> str:
    """Table 4 of the paper as text: reverse-process time, rate (bits/dim), distortion (RMSE)."""
    lines = [
        f"rate {rd['rate_bpd']:.5f} + distortion {rd['distortion_bpd']:.5f} = "
        f"{rd['total_bpd']:.5f} bits/dim on {rd['num_images']} images",
        f"{'reverse time (T-t+1)':>22}  {'rate (bits/dim)':>16}  {'distortion (RMSE [0,255])':>26}",
    ]
    lines += [f"{r['reverse_time']:>22}  {r['rate_bpd']:>16.5f}  {r['distortion_rmse']:>26.5f}"
              for r in rd["table"]]
    return "\n".join(lines)


def rate_distortion_figure(rd: dict[str, Any], path: str | os.PathLike,
                           size: tuple[int, int] = (480, 360),
                           backend: ChartBackend | str = ChartBackend.AUTO) -> Path:
    """Fig. 5: distortion and rate against reverse-process steps (T - t), and distortion against
    rate, side by side in one figure of (3 * width, height) pixels (PNG; PDF/SVG with matplotlib)."""
    T = rd["num_timesteps"]
    steps = [T - 1 - t for t in range(T)]  # reverse-process steps taken when x_t (0-based) is reached
    specs = [
        ({"distortion": (steps, rd["distortion_rmse"])}, "Distortion", "reverse process steps (T - t)",
         "RMSE [0, 255]"),
        ({"rate": (steps, rd["rate"])}, "Rate", "reverse process steps (T - t)", "bits/dim"),
        ({"distortion vs rate": (rd["rate"], rd["distortion_rmse"])}, "Rate-distortion", "rate (bits/dim)",
         "RMSE [0, 255]"),
    ]
    if _chart_backend(backend, path) is ChartBackend.MATPLOTLIB:
        mfig = _mpl_figure(size, 3)
        for ax, (series, title, xlabel, ylabel) in zip(mfig.axes, specs, strict=True):
            _mpl_lines(ax, series, title=title, xlabel=xlabel, ylabel=ylabel, logx=False, logy=False)
        return _atomic_savefig(mfig, path)
    panels = [render_lines(series, title=title, xlabel=xlabel, ylabel=ylabel, size=size)
              for series, title, xlabel, ylabel in specs]
    fig = Image.new("RGB", (3 * size[0], size[1]), "white")
    for k, panel in enumerate(panels):
        fig.paste(panel, (k * size[0], 0))
    return _atomic_save(fig, path)
