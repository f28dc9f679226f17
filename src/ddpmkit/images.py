"""Pictures at the edge: the one uint8 conversion, image grids, their labels, enlargement, image writes.

Images at this edge are uint8 arrays laid out (N, H, W, C) (C = 1, 3 or 4); float tensors in
[-1, 1] laid out (N, C, H, W) are accepted too and quantised with the library's rule
``data.convert.quantize_uint8`` (round half up of ``(x + 1) * 127.5``, clamped). ``to_uint8_nhwc``
is the one conversion every caller uses (figures, FID, the digits metric, the trainer's grids).
Every file is written atomically (``fileio.atomic_write``: a temporary name, then a rename).
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from ddpmkit.checks import check_int
from ddpmkit.data.convert import quantize_uint8
from ddpmkit.fileio import atomic_write

__all__ = [
    "enlarge",
    "font",
    "image_grid",
    "label_grid",
    "readable_scale",
    "save_image",
    "save_image_grid",
    "save_pil",
    "to_uint8_nhwc",
]

_MODE_KW = int(Image.__version__.split(".")[0]) < 13  # Pillow 13 drops the mode argument


# ---------------------------------------------------------------------------------- pixels
def to_uint8_nhwc(images: Any) -> np.ndarray:
    """Images of any supported kind as a numpy uint8 array (N, H, W, C), N >= 1, C in (1, 3, 4).

    images: a float tensor (N, C, H, W) in [-1, 1] (quantised by ``data.convert.quantize_uint8``:
    ``round((x + 1) * 127.5)``, half up, clamped to [0, 255]; channels moved last), or uint8
    (N, H, W, C) / (N, H, W) as a numpy array or a tensor (passed through; (N, H, W) gains C = 1).
    """
    if isinstance(images, torch.Tensor) and images.is_floating_point():
        if images.ndim != 4:
            raise ValueError(f"float images must be shaped (N, C, H, W), got {tuple(images.shape)}")
        a = quantize_uint8(images.detach().cpu()).movedim(-3, -1).contiguous().numpy()  # (N, H, W, C)
    else:
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
        raise ValueError("expected at least one image, got an empty set (N = 0)")
    return a


def _to_pil(a: np.ndarray) -> Image.Image:
    """(H, W, C) uint8 -> a Pillow image (L, RGB or RGBA)."""
    if a.shape[-1] == 1:
        return Image.fromarray(a[..., 0], mode="L") if _MODE_KW else Image.fromarray(a[..., 0])
    return Image.fromarray(a)


# ---------------------------------------------------------------------------------- grids and writes
def image_grid(images: Any, *, nrow: int | None = None, padding: int = 2, pad_value: int = 0) -> Image.Image:
    """Tile images into one picture: ``nrow`` images per row (default ceil(sqrt(N))).

    images: uint8 (N, H, W, C) (see ``to_uint8_nhwc``). ``padding`` pixels of ``pad_value``
    separate the tiles and frame the grid, so the result is
    (rows * (H + padding) + padding) x (nrow * (W + padding) + padding).
    """
    a = to_uint8_nhwc(images)
    n, h, w, c = a.shape
    if nrow is None:
        nrow = math.ceil(math.sqrt(n))
    nrow = check_int(nrow, "nrow", low=1)
    padding = check_int(padding, "padding", low=0)
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


def save_pil(image: Image.Image, path: str | os.PathLike) -> Path:
    """Save a Pillow ``image`` to ``path`` (format from the suffix) atomically; returns the path."""
    path = Path(path)
    fmt = Image.registered_extensions().get(path.suffix.lower())
    if fmt is None:
        raise ValueError(f"cannot tell the image format of {str(path)!r}; expected a suffix like .png")
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda f: image.save(f, format=fmt))
    return path


def enlarge(image: Image.Image, scale: int) -> Image.Image:
    """``image`` enlarged ``scale`` times by nearest neighbour (the same image for scale 1)."""
    scale = check_int(scale, "scale", low=1)
    if scale == 1:
        return image
    return image.resize((image.width * scale, image.height * scale), Image.Resampling.NEAREST)


def readable_scale(width: int, min_width: int = 512) -> int:
    """The whole nearest-neighbour factor that brings a ``width``-px picture to >= ``min_width`` px."""
    return max(1, -(-min_width // max(1, width)))


def save_image(image: Any, path: str | os.PathLike, *, scale: int = 1) -> Path:
    """Write one image, uint8 (H, W, C) / (H, W) or float (C, H, W) in [-1, 1], atomically."""
    if isinstance(image, torch.Tensor) and image.is_floating_point():
        a = to_uint8_nhwc(image[None])[0]
    else:
        a = to_uint8_nhwc((image.detach().cpu().numpy() if isinstance(image, torch.Tensor)
                           else np.asarray(image))[None])[0]
    return save_pil(enlarge(_to_pil(a), scale), path)


def save_image_grid(
    images: Any, path: str | os.PathLike, *, nrow: int | None = None, scale: int = 1, padding: int = 2,
    min_width: int = 0, col_labels: Sequence[str] = (), row_labels: Sequence[str] = (), corner: str = "",
) -> Path:
    """Write ``image_grid(images, nrow=nrow, padding=padding)``, enlarged ``scale`` times (nearest
    neighbour; more when needed to be ``min_width`` px wide), to ``path`` atomically, with the
    column and row labels (and corner text) of ``label_grid`` when given. Returns the path."""
    grid = image_grid(images, nrow=nrow, padding=padding)
    scale = max(scale, readable_scale(grid.width, min_width)) if min_width else scale
    grid = enlarge(grid, scale)
    if col_labels or row_labels or corner:
        grid = label_grid(grid, col_labels=col_labels, row_labels=row_labels, corner=corner,
                          tile=to_uint8_nhwc(images).shape[2] * scale, padding=padding * scale)
    return save_pil(grid, path)


# ---------------------------------------------------------------------------------- labels
def font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    """Pillow's embedded font at ``size`` px (the fixed bitmap font on Pillow < 10.1)."""
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

    def fits(texts: Sequence[str], face: Any) -> bool:
        return all(probe.textlength(line, font=face) <= room for t in texts for line in t.split("\n"))

    for k in range(size, 8, -1):
        face = font(k)
        texts = list(labels) if k >= 12 else [_wrap(t, face, room) for t in labels]
        if fits(texts, face) or k == 9:
            return texts, face, k
    raise AssertionError("unreachable")


def _draw_lines(draw: ImageDraw.ImageDraw, xy: tuple[float, float], text: str, face: Any, size: int,
                anchor: str) -> None:
    """``text``'s lines ("\\n"-separated) stacked one under the other, centred vertically on xy."""
    lines = text.split("\n")
    lead = round(size * 1.2)
    for k, line in enumerate(lines):
        y = xy[1] + (k - (len(lines) - 1) / 2) * lead
        draw.text((xy[0], y), line, fill="black", font=face, anchor=anchor)


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
    row_font, row_size = font(size), size
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
