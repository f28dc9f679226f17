"""A small custom image folder for tests and the CPU recipe in docs/training.md: coloured shapes.

``make_shapes_folder(folder, n, size, seed)`` writes ``n`` PNGs of ``size`` x ``size`` RGB pixels:
a filled circle, square or triangle in one of six saturated colours, at a random place and size,
on black. ``clean_fraction(images)`` measures how many images look like that: at least 90% of the
pixels within 60 (of 255, per channel max) of black or of the image's dominant bright colour, and
a shape covering 4-60% of the image. Real shapes score about 1.0 (0.99: 298 of the 300 16 px
images of docs/training.md's folder) and uniform noise 0.0.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

COLOURS = ((230, 40, 40), (40, 200, 60), (50, 90, 240), (240, 220, 40), (220, 60, 220), (40, 220, 230))


def make_shapes(n: int, size: int, seed: int) -> np.ndarray:
    """uint8 (n, size, size, 3) images of one coloured shape each on black."""
    rng = np.random.default_rng(seed)
    out = np.zeros((n, size, size, 3), np.uint8)
    for i in range(n):
        im = Image.new("RGB", (size, size))
        draw = ImageDraw.Draw(im)
        r = rng.uniform(0.18, 0.35) * size
        cx, cy = rng.uniform(r, size - r, 2)
        colour = COLOURS[rng.integers(len(COLOURS))]
        kind = rng.integers(3)
        if kind == 0:
            draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=colour)
        elif kind == 1:
            draw.rectangle((cx - r, cy - r, cx + r, cy + r), fill=colour)
        else:
            draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=colour)
        out[i] = np.asarray(im)
    return out


def make_shapes_folder(folder: Path, n: int = 300, size: int = 32, seed: int = 0) -> Path:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for i, a in enumerate(make_shapes(n, size, seed)):
        Image.fromarray(a).save(folder / f"shape_{i:04d}.png")
    return folder


def clean_fraction(images: np.ndarray) -> float:
    """Share of uint8 (N, H, W, 3) images that are one bright flat shape on black (see the module)."""
    ok = 0
    for a in images.astype(np.int32):
        px = a.reshape(-1, 3)
        dark = px.max(axis=1) <= 60
        bright = px[~dark]
        if not 0.04 <= bright.shape[0] / px.shape[0] <= 0.60:
            continue
        colour = np.median(bright, axis=0)
        near = np.abs(bright - colour).max(axis=1) <= 60
        ok += (dark.sum() + near.sum()) / px.shape[0] >= 0.90
    return ok / len(images)
