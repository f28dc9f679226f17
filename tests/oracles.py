"""Exact models for the tests: the optimal eps-model of Gaussian data and its closed forms, and the
Bayes-optimal model of a data set of one known image, in each parameterization."""

from __future__ import annotations

import numpy as np
import torch

from ddpmkit.diffusion import GaussianDiffusion, MeanType


def _per_channel(v, x: torch.Tensor):
    """A float as it is; a 1-D tensor as per-channel values along dim 1 of ``x``."""
    if isinstance(v, torch.Tensor):
        return v.to(x.dtype).view(1, -1, *([1] * (x.ndim - 2)))
    return v


def gaussian_eps(abar: torch.Tensor, mean, var):
    """The optimal eps-model of x_0 ~ N(mean, diag(var)): E[eps | x_t] in closed form,
    sqrt(1 - abar) (x - sqrt(abar) mean) / (abar var + 1 - abar). ``mean`` and ``var`` are floats, or
    1-D tensors of per-channel values (dim 1 of x); ``abar`` is the alphas_cumprod table."""

    def eps(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        ab = abar[t].view(-1, *([1] * (x.ndim - 1))).to(x.dtype)
        m, s2 = _per_channel(mean, x), _per_channel(var, x)
        return (1 - ab).sqrt() * (x - ab.sqrt() * m) / (ab * s2 + 1 - ab)

    return eps


def exact_gamma(abar: np.ndarray, var: float) -> np.ndarray:
    """E ||E[eps | x_t]||^2 / d = (1 - abar) / (abar var + 1 - abar) for N(mean, var) data."""
    return (1 - abar) / (abar * var + 1 - abar)


class ImageOracle:
    """The perfect model of each parameterization for the data set {x0}: eps, x0 or the posterior
    mean of x_{t-1} (eq. 7). It reads the *original* timestep t it is given (so a respaced index
    passed by mistake breaks it) and records those it saw in ``seen``. ``var_channel``: a constant
    v in [-1, 1] appended as the learned_range channels (None: no extra channels)."""

    def __init__(self, mean_type: MeanType, x0: torch.Tensor, tables: dict[str, torch.Tensor],
                 var_channel: float | None = None) -> None:
        self.mean_type, self.x0, self.var_channel, self.seen = MeanType(mean_type), x0, var_channel, set()
        self.tables = {k: v.to(x0.dtype) for k, v in tables.items()}

    @classmethod
    def of(cls, d: GaussianDiffusion, x0: torch.Tensor, extra_channels: bool = False) -> ImageOracle:
        """The oracle from the diffusion's own tables (float64 like x0)."""
        ab = d.alphas_cumprod
        tables = {"sqrt_ab": ab.sqrt(), "sqrt_1m_ab": (1 - ab).sqrt(), "coef1": d.posterior_mean_coef1,
                  "coef2": d.posterior_mean_coef2}
        return cls(d.mean_type, x0, tables, 0.0 if extra_channels else None)

    @classmethod
    def of_betas(cls, betas: np.ndarray, mean_type: MeanType, x0: torch.Tensor,
                 var_channel: float | None) -> ImageOracle:
        """The oracle from tables computed here in float64 NumPy from ``betas``, cast to x0's dtype."""
        abar = np.cumprod(1.0 - betas)
        abar_prev = np.append(1.0, abar[:-1])
        tables = {"sqrt_ab": np.sqrt(abar), "sqrt_1m_ab": np.sqrt(1.0 - abar),
                  "coef1": betas * np.sqrt(abar_prev) / (1.0 - abar),
                  "coef2": (1.0 - abar_prev) * np.sqrt(1.0 - betas) / (1.0 - abar)}
        return cls(mean_type, x0, {k: torch.from_numpy(v) for k, v in tables.items()}, var_channel)

    def __call__(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        self.seen |= set(t.tolist())
        tab, x0, shape = self.tables, self.x0, (-1, 1, 1, 1)
        if self.mean_type is MeanType.EPS:
            out = (x_t - tab["sqrt_ab"][t].view(shape) * x0) / tab["sqrt_1m_ab"][t].view(shape)
        elif self.mean_type is MeanType.X0:
            out = x0.expand_as(x_t)
        else:
            out = tab["coef1"][t].view(shape) * x0 + tab["coef2"][t].view(shape) * x_t
        if self.var_channel is not None:
            out = torch.cat([out, torch.full_like(out, self.var_channel)], dim=1)
        return out
