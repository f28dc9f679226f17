"""Deterministic stand-ins for networks the tests must not download."""

from __future__ import annotations

import math

import torch

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
