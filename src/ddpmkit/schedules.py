"""Beta schedules beta_1..beta_T, in float64, and a name -> function registry.

The first six are those of the authors' released code (``get_beta_schedule`` in
``diffusion_tf/diffusion_utils_2.py``); ``linear`` with T = 1000, beta_start = 1e-4 and
beta_end = 0.02 is the schedule of the paper (Sec. 4). ``cosine`` is Nichol & Dhariwal (2021),
Sec. 3.2: alpha_bar(t) = cos^2(((t/T + s) / (1 + s)) * pi / 2), s = 0.008, betas clipped at 0.999.

Every function returns a (T,) float64 tensor; index i holds beta_{i+1} (0-based timesteps).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from ddpmkit.checks import check_int
from ddpmkit.enums import unknown_choice

__all__ = [
    "BETA_SCHEDULES",
    "betas_for_alpha_bar",
    "const_beta_schedule",
    "cosine_beta_schedule",
    "get_named_beta_schedule",
    "jsd_beta_schedule",
    "linear_beta_schedule",
    "quad_beta_schedule",
    "warmup10_beta_schedule",
    "warmup50_beta_schedule",
]

COSINE_S = 0.008
MAX_BETA = 0.999


def linear_beta_schedule(num_timesteps: int, beta_start: float, beta_end: float) -> torch.Tensor:
    """beta_t = linspace(beta_start, beta_end, T): the paper's schedule. Returns (T,) float64."""
    return torch.linspace(beta_start, beta_end, num_timesteps, dtype=torch.float64)


def quad_beta_schedule(num_timesteps: int, beta_start: float, beta_end: float) -> torch.Tensor:
    """beta_t = linspace(sqrt(beta_start), sqrt(beta_end), T)^2. Returns (T,) float64."""
    return torch.linspace(beta_start**0.5, beta_end**0.5, num_timesteps, dtype=torch.float64) ** 2


def const_beta_schedule(num_timesteps: int, beta_start: float, beta_end: float) -> torch.Tensor:
    """beta_t = beta_end for every t (beta_start is unused). Returns (T,) float64."""
    del beta_start
    return torch.full((num_timesteps,), float(beta_end), dtype=torch.float64)


def jsd_beta_schedule(num_timesteps: int, beta_start: float, beta_end: float) -> torch.Tensor:
    """beta_t = 1 / (T - t + 1): 1/T, 1/(T-1), ..., 1 (beta_start, beta_end unused). (T,) float64."""
    del beta_start, beta_end
    return 1.0 / torch.linspace(num_timesteps, 1, num_timesteps, dtype=torch.float64)


def _warmup_beta(num_timesteps: int, beta_start: float, beta_end: float, frac: float) -> torch.Tensor:
    betas = torch.full((num_timesteps,), float(beta_end), dtype=torch.float64)
    warmup_time = int(num_timesteps * frac)
    betas[:warmup_time] = torch.linspace(beta_start, beta_end, warmup_time, dtype=torch.float64)
    return betas


def warmup10_beta_schedule(num_timesteps: int, beta_start: float, beta_end: float) -> torch.Tensor:
    """beta_end everywhere except a linear ramp from beta_start over the first 10%. (T,) float64."""
    return _warmup_beta(num_timesteps, beta_start, beta_end, 0.1)


def warmup50_beta_schedule(num_timesteps: int, beta_start: float, beta_end: float) -> torch.Tensor:
    """beta_end everywhere except a linear ramp from beta_start over the first 50%. (T,) float64."""
    return _warmup_beta(num_timesteps, beta_start, beta_end, 0.5)


def betas_for_alpha_bar(
    num_timesteps: int, alpha_bar: Callable[[float], float], max_beta: float = MAX_BETA
) -> torch.Tensor:
    """Discretize a continuous alpha_bar(tau), tau in [0, 1]:
    beta_i = min(1 - alpha_bar((i+1)/T) / alpha_bar(i/T), max_beta). Returns (T,) float64."""
    betas = [
        min(1.0 - alpha_bar((i + 1) / num_timesteps) / alpha_bar(i / num_timesteps), max_beta)
        for i in range(num_timesteps)
    ]
    return torch.tensor(betas, dtype=torch.float64)


def cosine_beta_schedule(num_timesteps: int, beta_start: float, beta_end: float) -> torch.Tensor:
    """Nichol & Dhariwal (2021) Sec. 3.2, s = 0.008, beta clipped at 0.999 (beta_start, beta_end
    unused). Returns (T,) float64."""
    del beta_start, beta_end

    def alpha_bar(tau: float) -> float:
        return math.cos((tau + COSINE_S) / (1 + COSINE_S) * math.pi / 2) ** 2

    return betas_for_alpha_bar(num_timesteps, alpha_bar)


BETA_SCHEDULES: dict[str, Callable[[int, float, float], torch.Tensor]] = {
    "linear": linear_beta_schedule,
    "quad": quad_beta_schedule,
    "const": const_beta_schedule,
    "jsd": jsd_beta_schedule,
    "warmup10": warmup10_beta_schedule,
    "warmup50": warmup50_beta_schedule,
    "cosine": cosine_beta_schedule,
}


_RISING = ("linear", "quad", "warmup10", "warmup50")  # schedules that go from beta_start to beta_end


def get_named_beta_schedule(
    name: str, num_timesteps: int, *, beta_start: float = 1e-4, beta_end: float = 0.02
) -> torch.Tensor:
    """The schedule ``name`` (one of ``BETA_SCHEDULES``) with T = ``num_timesteps`` steps.

    Returns betas: (T,) float64, every entry in (0, 1].
    Raises ValueError for an unknown name, T < 2, betas outside (0, 1], or beta_start > beta_end in a
    schedule that rises from one to the other.
    """
    if name not in BETA_SCHEDULES:
        raise unknown_choice("beta schedule", name, sorted(BETA_SCHEDULES))
    check_int(num_timesteps, "num_timesteps", low=2)
    betas = BETA_SCHEDULES[name](num_timesteps, float(beta_start), float(beta_end))
    decreasing = name in _RISING and float(beta_start) > float(beta_end)  # a noise level that falls with t
    if decreasing or not bool(((betas > 0) & (betas <= 1)).all()):
        raise ValueError(
            f"schedule {name!r} with beta_start={beta_start}, beta_end={beta_end} gives betas outside "
            "(0, 1]; expected 0 < beta_start <= beta_end <= 1"
        )
    return betas
