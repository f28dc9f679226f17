"""Deterministic stand-ins for networks the tests must not download."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ddpmkit.diffusion import DiffusionConfig, GaussianDiffusion

TINY_T = 8  # timesteps of the tiny saved model (conftest.tiny_model_dir)


class StandInFeatures(torch.nn.Module):
    """uint8 (B, C, H, W) -> {"pool": (B, 12), "logits": (B, 10)}: a fixed random conv net, float64,
    in place of the Inception network. ``logit_scale`` sets how confident its classes are."""

    def __init__(self, *, name: str = "stand-in-v1", logit_scale: float = 20.0) -> None:
        super().__init__()
        self.name, self.logit_scale = name, logit_scale
        g = torch.Generator().manual_seed(0)
        self.conv = torch.nn.Conv2d(3, 12, 3, padding=1)
        self.fc = torch.nn.Linear(12, 10)
        for p in self.parameters():
            p.data = torch.randn(p.shape, generator=g, dtype=torch.float64) * 0.3
        self.double().eval()

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        assert x.dtype == torch.uint8
        x = x.expand(-1, 3, -1, -1).double() / 127.5 - 1.0
        pool = torch.tanh(self.conv(x)).mean(dim=(2, 3))  # (B, 12)
        return {"pool": pool, "logits": self.fc(pool) * self.logit_scale}


def diffusers_ddpm_chain(sched, model, kept: list[int], shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """diffusers' DDPMScheduler run over the kept timesteps (custom timesteps, largest first) from
    x_T ~ N(0, I) drawn from ``seed``, with the same generator for every step's noise."""
    sched.set_timesteps(timesteps=kept[::-1])
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g)
    for t in sched.timesteps:
        x = sched.step(model(x, torch.full((shape[0],), int(t))), t, x, generator=g).prev_sample
    return x


def randomize_(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Every parameter random, so that zero or near-zero inits cannot hide a wiring mistake: conv and
    dense weights U(-a, a) at the fan_avg scale (activations stay O(1)), biases N(0, 0.1), GroupNorm
    scales 1 + N(0, 0.2) and shifts N(0, 0.2). Works on ours and on diffusers' UNet2DModel alike."""
    g = torch.Generator().manual_seed(seed)

    def rand(shape, std):
        return torch.randn(shape, generator=g) * std

    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)):
                receptive = m.weight[0, 0].numel()
                a = math.sqrt(6 / (m.weight.shape[1] * receptive + m.weight.shape[0] * receptive))
                m.weight.copy_((torch.rand(m.weight.shape, generator=g) * 2 - 1) * a)
                m.bias.copy_(rand(m.bias.shape, 0.1))
            elif isinstance(m, torch.nn.GroupNorm):
                m.weight.copy_(1 + rand(m.weight.shape, 0.2))
                m.bias.copy_(rand(m.bias.shape, 0.2))
    return module


T_SMALL = 20


SHAPE = (8, 2, 4, 4)


def beta_range(T: int) -> tuple[float, float]:
    """The paper's linear schedule stretched to T steps (x 1000 / T), the end capped at 0.4."""
    return 1e-4 * 1000 / T, min(0.02 * 1000 / T, 0.4)


def make_diffusion(var_type: str = "fixedlarge", T: int = T_SMALL) -> GaussianDiffusion:
    b0, b1 = beta_range(T)
    return DiffusionConfig(num_timesteps=T, beta_start=b0, beta_end=b1, var_type=var_type).build()


class ToyEps:
    """A deterministic eps-predictor that treats each sample on its own (elementwise maps and, with
    ``per_sample_mean``, a per-sample mean), so its output for a sample does not depend on the rest
    of the batch. Without the mean term it is elementwise: tanh(a_t x + b_t)."""

    def __init__(self, T: int, per_sample_mean: bool = True) -> None:
        g = torch.Generator().manual_seed(123)
        self.a = 0.5 + torch.rand(T, generator=g)
        self.b = 0.3 * torch.randn(T, generator=g)
        self.per_sample_mean = per_sample_mean

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        a = self.a[t].view(-1, *([1] * (x.ndim - 1)))
        b = self.b[t].view(-1, *([1] * (x.ndim - 1)))
        if not self.per_sample_mean:
            return torch.tanh(a * x + b)
        return torch.tanh(a * x + b) + 0.1 * x.mean(dim=tuple(range(1, x.ndim)), keepdim=True)


def diffusion_of(T: int = 1000, mean_type: str = "eps", var_type: str = "fixedlarge") -> GaussianDiffusion:
    b0, b1 = 1e-4 * 1000 / T, min(0.02 * 1000 / T, 0.4)
    loss_type = "hybrid" if var_type.startswith("learned") else "mse"
    return DiffusionConfig(num_timesteps=T, beta_start=b0, beta_end=b1, mean_type=mean_type,
                           var_type=var_type, loss_type=loss_type).build()


SHAPE4 = (4, 2, 4, 4)


LEGIBLE_T = 6


def _dark(region: np.ndarray) -> bool:
    return bool((region < 100).any())


# ---------------------------------------------------------------------------------- every figure labelled
R = 8  # the tiny model's images


def _bands(path: Path, cols: int, rows: int) -> tuple[np.ndarray, int, int, int]:
    """The figure as gray pixels, the label bands' sizes (top, left) and the scale: the grid of
    cols x rows tiles of R px, 2 px apart, enlarged by the smallest whole factor giving >= 512 px
    and tiles >= 64 px, sits in the bottom-right corner."""
    im = np.asarray(Image.open(path).convert("L"))
    s = next(s for s in range(1, 100) if s * (cols * (R + 2) + 2) >= 512 and s * R >= 64)
    gw, gh = s * (cols * (R + 2) + 2), s * (rows * (R + 2) + 2)
    assert im.shape[1] >= gw and im.shape[0] >= gh, (im.shape, gw, gh)
    return im, im.shape[0] - gh, im.shape[1] - gw, s


def _assert_labelled(path: Path, cols: int, rows: int, *, row_labels: bool) -> None:
    im, top, left, s = _bands(path, cols, rows)
    tile, pad = R * s, 2 * s
    assert im[top, left] == 0 and im[-1, -1] == 0, "the grid is not where its size says"  # black frame
    assert top > 0, "no label band above the columns"
    for j in range(cols):  # text over each column, in that column's span
        x0 = left + pad + j * (tile + pad)
        assert _dark(im[:top, x0:x0 + tile]), f"column {j} unlabelled"
    for j in range(1, cols):  # and no text runs into the next column (the middle of each gap is clear)
        gap = left + j * (tile + pad) + pad // 2
        assert not _dark(im[:top, gap]), f"the labels of columns {j - 1} and {j} touch"
    if row_labels:
        assert left > 0, "no label band beside the rows"
        for i in range(rows):
            y0 = top + pad + i * (tile + pad)
            assert _dark(im[y0:y0 + tile, :left]), f"row {i} unlabelled"
