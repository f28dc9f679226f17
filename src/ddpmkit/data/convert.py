"""Pixel math shared by every module: the 8-bit quantisation, its inverse, and the flip.

Inside the library an image is a float tensor in [-1, 1] laid out (..., C, H, W); at the edges
(files, ``.npz``, Pillow, FID) it is uint8 laid out (..., H, W, C). The map is the authors'
``x_uint8 = round((x + 1) * 127.5)`` clamped to [0, 255] (``quantize_uint8``), and its inverse
``x = a / 127.5 - 1`` (``from_uint8_nhwc``), so ``images.to_uint8_nhwc(from_uint8_nhwc(a)) == a``
for every uint8 array ``a``.

This module is the one home of that rounding: ``ddpmkit.images.to_uint8_nhwc``, the one conversion
that figures, FID, the digits metric and the trainer's grids call, rounds through it, so an image
is quantised the same way wherever it goes.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor


def quantize_uint8(x: Tensor) -> Tensor:
    """``floor((x + 1) * 127.5 + 1/2)`` clamped to [0, 255]: round half up, same layout, on x's device.

    Computed as ``floor(x * 127.5) + 128`` in float64, the same number in exact arithmetic. For a
    float32, bf16 or fp16 x the product ``x * 127.5`` is exact in float64 (8 + 24 mantissa bits),
    so every value rounds to the integer nearest its true ``(x + 1) * 127.5``, ties up. (Evaluated
    in float32, the product is itself rounded and can land on k + 1/2 from either side, and torch's
    round-half-to-even then goes either way.) A float64 x: half up of the float64 product.
    """
    if not x.is_floating_point():
        raise ValueError(f"expected float images in [-1, 1], got dtype {x.dtype}")
    v = (x.detach().double() * 127.5).floor_().add_(128.0)
    return v.clamp_(0, 255).to(torch.uint8)


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
    return horizontal_flip_where(x, flip)


def horizontal_flip_where(x: Tensor, flip: Tensor) -> Tensor:
    """Mirror left-right (the width axis) the images whose ``flip`` is True.

    x: (B, C, H, W); flip: (B,) bool on any device. Returns a new tensor; x is not modified.
    """
    if x.dim() != 4 or flip.shape != (x.shape[0],) or flip.dtype != torch.bool:
        raise ValueError(f"expected x (B, C, H, W) and a bool mask (B,), got {tuple(x.shape)} and "
                         f"{tuple(flip.shape)} {flip.dtype}")
    return torch.where(flip.to(x.device).view(-1, 1, 1, 1), x.flip(-1), x)  # mask (B, 1, 1, 1)
