"""Pixel conversions shared by every module: float tensors in [-1, 1] <-> uint8 at the edges.

Inside the library an image is a float tensor in [-1, 1] laid out (..., C, H, W); at the edges
(files, ``.npz``, Pillow, FID) it is uint8 laid out (..., H, W, C). The map is the authors'
``x_uint8 = round((x + 1) * 127.5)`` clamped to [0, 255], and its inverse ``x = a / 127.5 - 1``,
so ``to_uint8_nhwc(from_uint8_nhwc(a)) == a`` for every uint8 array ``a``.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor


def to_uint8_nhwc(x: Tensor) -> Tensor:
    """Quantise images to 8 bits and move channels last.

    x: (..., C, H, W) float in [-1, 1] (values outside are clamped)  ->  (..., H, W, C) uint8,
    on x's device. Rounding is torch's round-half-to-even of ``(x + 1) * 127.5``.
    """
    if x.dim() < 3:
        raise ValueError(f"expected images shaped (..., C, H, W), got shape {tuple(x.shape)}")
    a = ((x.float() + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8)
    return a.movedim(-3, -1).contiguous()  # (..., H, W, C)


def from_uint8_nhwc(a: np.ndarray | Tensor) -> Tensor:
    """uint8 (..., H, W, C) array or tensor  ->  (..., C, H, W) float32 in [-1, 1]."""
    if isinstance(a, np.ndarray):
        a = np.ascontiguousarray(a) if a.flags.writeable else np.array(a)  # torch wants writable memory
        t = torch.from_numpy(a)
    else:
        t = a
    if t.dtype != torch.uint8:
        raise ValueError(f"expected uint8 pixels shaped (..., H, W, C), got dtype {t.dtype}")
    if t.dim() < 3:
        raise ValueError(f"expected uint8 pixels shaped (..., H, W, C), got shape {tuple(t.shape)}")
    return (t.movedim(-1, -3).float() / 127.5 - 1.0).contiguous()  # (..., C, H, W)


def random_horizontal_flip(x: Tensor, *, generator: torch.Generator | None = None) -> Tensor:
    """Mirror each image left-right with probability 1/2 (the paper's only augmentation).

    x: (B, C, H, W). Draws exactly B uniforms from ``generator`` (``torch.rand(B)`` on the
    generator's device), so a run that saves and restores the generator's state flips the same
    images after a resume. Returns a new tensor; x is not modified.
    """
    if x.dim() != 4:
        raise ValueError(f"expected a batch shaped (B, C, H, W), got shape {tuple(x.shape)}")
    device = generator.device if generator is not None else torch.device("cpu")
    flip = torch.rand(x.shape[0], generator=generator, device=device) < 0.5  # (B,)
    flip = flip.to(x.device).view(-1, 1, 1, 1)  # (B, 1, 1, 1)
    return torch.where(flip, x.flip(-1), x)
