"""One home for pixels: [-1, 1] <-> uint8 and the flip (ddpmkit.data.convert), one conversion
(ddpmkit.images.to_uint8_nhwc), and every caller uses it.

The reference is exact rational arithmetic (fractions.Fraction), not the code under test.
"""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest
import torch

from ddpmkit.data.convert import horizontal_flip_where, quantize_uint8
from ddpmkit.images import to_uint8_nhwc


def exact_half_up(x: float) -> int:
    """floor((x + 1) * 255 / 2 + 1/2) in exact arithmetic, clamped to [0, 255]."""
    return min(255, max(0, math.floor((Fraction(x) + 1) * Fraction(255, 2) + Fraction(1, 2))))


def near_ties_float32() -> torch.Tensor:
    """Float32 values within 3 ulps of every k + 1/2 boundary: (N,) float32."""
    centre = torch.tensor([(2 * k + 1) / 255 - 1 for k in range(255)], dtype=torch.float32)
    vals = [centre]
    up, down = centre.clone(), centre.clone()
    for _ in range(3):
        up, down = torch.nextafter(up, torch.tensor(2.0)), torch.nextafter(down, torch.tensor(-2.0))
        vals += [up, down]
    return torch.cat(vals)


def test_quantize_rounds_half_up_at_hand_written_ties():
    # float64 inputs whose float64 product (x + 1) * 127.5 is exactly k + 1/2: half up -> k + 1
    # (torch.round, half to even, gives 64 and 32 for the first two)
    x64 = torch.tensor([-0.49411764705882355, -0.7450980392156863, 0.0, -0.8470588235294118],
                       dtype=torch.float64)
    assert ((x64 + 1) * 127.5).tolist() == [64.5, 32.5, 127.5, 19.5]
    assert quantize_uint8(x64).tolist() == [65, 33, 128, 20]
    # float32 inputs whose float32 product rounds onto k + 1/2 while the true value lies on one
    # side: -0.4941176176... is 64.50000x (-> 65), -0.4862745106... is 65.4999x (-> 65)
    x32 = torch.tensor([-0.4941176176071167, -0.48627451062202454], dtype=torch.float32)
    assert ((x32 + 1) * 127.5).tolist() == [64.5, 65.5]  # what a float32 pipeline would round
    assert quantize_uint8(x32).tolist() == [65, 65]
    # clamping
    clamped = quantize_uint8(torch.tensor([-3.0, -1.0, 1.0, 1.01, float("inf")]))
    assert clamped.tolist() == [0, 0, 255, 255, 255]


def test_quantize_is_exact_half_up_for_float32_near_every_boundary():
    x = near_ties_float32()  # (1785,)
    expected = [exact_half_up(float(v)) for v in x]
    assert quantize_uint8(x).tolist() == expected
    # bf16 and fp16 values are float32 values too: the same exact answer
    for dtype in (torch.bfloat16, torch.float16):
        xl = x.to(dtype)
        assert quantize_uint8(xl).tolist() == [exact_half_up(float(v)) for v in xl]


def test_every_caller_quantises_through_the_one_home(tmp_path, monkeypatch):
    """figures, FID, the trainer's sample grid and the data module give the exact answer at the
    float32 near-ties (the old float32 copies rounded some of them the other way)."""
    x = near_ties_float32()[:1764].view(441, 1, 2, 2)  # (N, C, H, W)
    expected = np.array([exact_half_up(float(v)) for v in x.flatten()], np.uint8).reshape(441, 2, 2, 1)
    np.testing.assert_array_equal(to_uint8_nhwc(x), expected)
    np.testing.assert_array_equal(to_uint8_nhwc(x.double()), expected)  # float32 values in float64
    # the trainer's grid, at values a float32 quantiser rounds the other way (64, 66, 128, 128)
    xg = torch.tensor([-0.4941176176071167, -0.48627451062202454, -1e-45, 0.0]).repeat(4).view(4, 1, 2, 2)
    assert _trainer_grid_pixels(tmp_path, monkeypatch, xg).reshape(4, 4).tolist() == [[65, 65, 127, 128]] * 4


def _trainer_grid_pixels(tmp_path, monkeypatch, x: torch.Tensor) -> np.ndarray:
    """The uint8 images the trainer hands to save_image_grid when the sampler returns x (4, 1, 2, 2)."""
    import ddpmkit.images
    import ddpmkit.sampling
    from ddpmkit.config import apply_overrides, train_preset
    from ddpmkit.train import train

    got = {}
    monkeypatch.setattr(ddpmkit.sampling, "sample_ancestral", lambda *a, **kw: x.clone())
    monkeypatch.setattr(ddpmkit.images, "save_image_grid",
                        lambda images, path, **kw: got.setdefault("u8", images))
    npz = tmp_path / "d.npz"
    np.savez(npz, np.random.default_rng(0).integers(0, 256, (8, 8, 8, 1), dtype=np.uint8))
    c = apply_overrides(train_preset("digits"), {
        "data": str(npz), "unet.ch": "32", "unet.ch_mult": "1", "unet.num_res_blocks": "1",
        "unet.attn_resolutions": "", "diffusion.num_timesteps": "10", "batch_size": "4", "steps": "1",
        "num_samples": "4", "sample_every": "1000"})
    train(c, tmp_path / "run", progress=False)
    return got["u8"]


def test_horizontal_flip_where_mirrors_the_width_axis_of_the_masked_images_only():
    x = torch.arange(2 * 1 * 2 * 3, dtype=torch.float32).view(2, 1, 2, 3)  # (B, C, H, W)
    out = horizontal_flip_where(x, torch.tensor([True, False]))
    assert out[0, 0].tolist() == [[2.0, 1.0, 0.0], [5.0, 4.0, 3.0]]  # written out by hand
    assert out[1, 0].tolist() == [[6.0, 7.0, 8.0], [9.0, 10.0, 11.0]]
    assert x[0, 0, 0].tolist() == [0.0, 1.0, 2.0]  # not modified
    with pytest.raises(ValueError, match="bool mask"):
        horizontal_flip_where(x, torch.tensor([1, 0]))
