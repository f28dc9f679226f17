"""Analytic-DPM (Bao et al. 2022): the optimal reverse variance of a trained eps-model in closed form.

For a chain that steps from timestep t down to s < t (s = -1: to x_0, abar_s = 1), the reverse
kernels of DDIM's family share the forward kernel

    q_lambda(x_s | x_t, x_0) = N(sqrt(abar_s) x_0 + sqrt(1 - abar_s - lambda^2) eps_t, lambda^2 I),
    eps_t = (x_t - sqrt(abar_t) x_0) / sqrt(1 - abar_t),   lambda^2 = eta^2 beta-tilde_{s,t}

(eta = 1: DDPM's posterior, eq. (6)-(7), respaced; eta = 0: DDIM). Its mean is linear in x_0 with
the coefficient ``x0_coefficient`` c. The Gaussian p(x_s | x_t) that minimises the KL to it
(Bao et al., Theorem 1) has the mean with x_0 replaced by E[x_0 | x_t], and the variance

    sigma*^2 = lambda^2 + c^2 E tr Cov(x_0 | x_t) / d
             = lambda^2 + c^2 (1 - abar_t) / abar_t (1 - Gamma_t),   Gamma_t = E ||eps_theta(x_t, t)||^2 / d

because x_0 = (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t) and E ||E[eps | x_t]||^2 / d = Gamma_t for
the optimal eps-model. The bounds of their Theorem 2 clip it: Cov(x_0 | x_t) lies between 0 and
(1 - abar_t) / abar_t (Gamma_t >= 0) and, for data in [a, b]^d, ((b - a) / 2)^2.
All coefficients are float64. docs/math.md derives the formulas; tests/test_analytic.py checks
them on Gaussian data, where Var(x_s | x_t) is known.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from enum import Enum

import numpy as np
import torch

from ddpmkit.checks import check_float, check_int
from ddpmkit.diffusion import DiffusionConfig, GaussianDiffusion, Model, VarType
from ddpmkit.enums import parse_enum
from ddpmkit.respace import chain_on
from ddpmkit.seeds import draw_standard_normal

__all__ = [
    "GammaEstimate",
    "ReverseVariance",
    "reverse_chain",
    "analytic_chain",
    "chain_variance",
    "chain_alphas_cumprod",
    "estimate_gamma",
    "lambda_squared",
    "optimal_variance",
    "x0_coefficient",
]



def chain_alphas_cumprod(alphas_cumprod: Sequence[float] | np.ndarray | torch.Tensor,
                         kept: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """(abar_t, abar_s) for each step of the chain over ``kept`` (increasing timesteps k_0 < ...):
    step i goes from k_i to k_{i-1}, and step 0 to x_0 (abar = 1). Both (S,) float64."""
    abar = np.asarray(torch.as_tensor(alphas_cumprod, dtype=torch.float64))
    idx = np.asarray(list(kept), dtype=np.int64)
    abar_t = abar[idx]
    abar_s = np.concatenate([[1.0], abar[idx[:-1]]])
    return abar_t, abar_s


def lambda_squared(abar_t: np.ndarray, abar_s: np.ndarray, eta: float) -> np.ndarray:
    """lambda^2 = eta^2 beta-tilde_{s,t} = eta^2 (1 - abar_s) / (1 - abar_t) (1 - abar_t / abar_s),
    DDIM's eq. (16); eta = 1 is DDPM's posterior variance over the step. (S,) float64."""
    eta = check_float(eta, "eta", low=0.0)
    return eta**2 * (1.0 - abar_s) / (1.0 - abar_t) * (1.0 - abar_t / abar_s)


def x0_coefficient(abar_t: np.ndarray, abar_s: np.ndarray, lambda2: np.ndarray) -> np.ndarray:
    """c = sqrt(abar_s) - sqrt(1 - abar_s - lambda^2) sqrt(abar_t / (1 - abar_t)): the weight of x_0
    in the mean of q_lambda(x_s | x_t, x_0) once eps_t is written through x_0. (S,) float64."""
    eps_weight = np.sqrt(np.maximum(1.0 - abar_s - lambda2, 0.0))
    return np.sqrt(abar_s) - eps_weight * np.sqrt(abar_t / (1.0 - abar_t))


def optimal_variance(abar_t: np.ndarray, abar_s: np.ndarray, lambda2: np.ndarray, gamma: np.ndarray, *,
                     data_half_range: float = 1.0) -> np.ndarray:
    """sigma*^2 = lambda^2 + c^2 V, V = E tr Cov(x_0 | x_t) / d = (1 - abar_t) / abar_t (1 - Gamma_t),
    V clipped to [0, min((1 - abar_t) / abar_t, data_half_range^2)] (Bao et al. Theorem 2; images
    in [-1, 1] have half range 1). All (S,) float64; returns (S,) float64."""
    half = check_float(data_half_range, "data_half_range", low=0.0, low_open=True)
    gamma = np.asarray(gamma, dtype=np.float64)
    snr_inv = (1.0 - abar_t) / abar_t
    cov = np.clip(snr_inv * (1.0 - gamma), 0.0, np.minimum(snr_inv, half**2))
    return lambda2 + x0_coefficient(abar_t, abar_s, lambda2) ** 2 * cov


def chain_variance(diffusion: GaussianDiffusion, kept: Sequence[int], gamma: np.ndarray, *,
                   eta: float = 1.0) -> np.ndarray:
    """sigma*^2 of each step of the chain over ``kept`` (step i: k_i -> k_{i-1}, step 0: -> x_0) for
    DDIM's eta (1: DDPM's posterior), from Gamma (T,) of ``diffusion``'s timesteps. (S,) float64."""
    gamma = np.asarray(gamma.mean if isinstance(gamma, GammaEstimate) else gamma, dtype=np.float64)
    if gamma.shape != (diffusion.num_timesteps,) or not np.isfinite(gamma).all():
        raise ValueError(f"gamma must be ({diffusion.num_timesteps},) finite values, got shape {gamma.shape}")
    abar_t, abar_s = chain_alphas_cumprod(diffusion.alphas_cumprod, kept)
    lam2 = lambda_squared(abar_t, abar_s, eta)
    return optimal_variance(abar_t, abar_s, lam2, gamma[np.asarray(list(kept))])


def analytic_chain(diffusion: GaussianDiffusion, kept: list[int], gamma: np.ndarray) -> GaussianDiffusion:
    """The (respaced) DDPM chain over ``kept`` with Analytic-DPM's variance (eta = 1): ancestral
    sampling and the bound through it are Analytic-DDPM's."""
    chain = chain_on(diffusion, kept)
    return chain.with_fixed_variance(torch.from_numpy(chain_variance(diffusion, kept, gamma, eta=1.0)))


class ReverseVariance(str, Enum):
    """The variance of a (respaced) reverse chain, for sampling or the bound."""

    MODEL = "model"  # the model's own var_type
    FIXED_LARGE = "fixedlarge"  # sigma^2 = beta of the chain
    FIXED_SMALL = "fixedsmall"  # sigma^2 = beta-tilde of the chain
    ANALYTIC = "analytic"  # Analytic-DPM's optimal variance (needs Gamma_t)


def reverse_chain(config: DiffusionConfig, kept: list[int], variance: ReverseVariance | str = "model",
                  gamma: np.ndarray | GammaEstimate | None = None) -> GaussianDiffusion:
    """The DDPM chain over ``kept`` timesteps of ``config`` with the given ``variance``: what
    ``ddpm eval bpd --timesteps K --variance V`` takes the bound through."""
    variance = parse_enum(ReverseVariance, variance, "variance")
    if variance is ReverseVariance.ANALYTIC:
        if gamma is None:
            raise ValueError("the analytic variance needs Gamma_t of the model (analytic.estimate_gamma)")
        return analytic_chain(config.build(), kept, gamma)
    if variance is not ReverseVariance.MODEL:
        config = dataclasses.replace(config, var_type=VarType(variance.value))
    return chain_on(config.build(), kept)


@dataclass(frozen=True, kw_only=True)
class GammaEstimate:
    """Gamma_t = E ||eps_theta(x_t, t)||^2 / d by Monte Carlo: ``mean`` and ``stderr`` (T,) float64,
    from ``num_samples`` draws (x_0 from the data, eps ~ N(0, I)) at every timestep."""

    mean: np.ndarray
    stderr: np.ndarray
    num_samples: int


@torch.inference_mode()
def estimate_gamma(predict_eps: Model, alphas_cumprod: torch.Tensor, batches: Iterable[torch.Tensor], *,
                   num_samples: int, generator: torch.Generator, device: torch.device | str = "cpu",
                   progress: Callable[[int], None] | None = None) -> GammaEstimate:
    """Gamma_t for t = 0 .. T-1 from ``num_samples`` data images (the first ones ``batches`` yields,
    each (B, C, H, W) in [-1, 1]): at each t the same images, each with its own noise from
    ``generator``, x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps (eq. 4). ``predict_eps(x_t, t)`` is the
    model's eps (B, C, H, W). ``progress(k)`` is called after each timestep."""
    num_samples = check_int(num_samples, "num_samples", low=2)
    x0 = _first_images(batches, num_samples).to(device)
    abar = torch.as_tensor(alphas_cumprod, dtype=torch.float64)
    T = abar.shape[0]
    per_sample = torch.empty(T, num_samples, dtype=torch.float64)
    for t in range(T):
        eps = draw_standard_normal(x0.shape, generator, device=device, dtype=torch.float32)
        a = float(abar[t])
        x_t = (a**0.5) * x0 + ((1.0 - a) ** 0.5) * eps
        tt = torch.full((num_samples,), t, dtype=torch.int64, device=device)
        out = predict_eps(x_t, tt).to(torch.float64)
        per_sample[t] = out.pow(2).flatten(1).mean(1).cpu()  # ||eps_theta||^2 / d per image
        if progress is not None:
            progress(t + 1)
    mean = per_sample.mean(1).numpy()
    stderr = (per_sample.std(1, correction=1) / num_samples**0.5).numpy()
    return GammaEstimate(mean=mean, stderr=stderr, num_samples=num_samples)


def _first_images(batches: Iterable[torch.Tensor], n: int) -> torch.Tensor:
    taken: list[torch.Tensor] = []
    have = 0
    for b in batches:
        taken.append(b[: n - have])
        have += taken[-1].shape[0]
        if have >= n:
            break
    if have < n:
        raise ValueError(f"the data has {have} images; Gamma needs num_samples = {n}")
    return torch.cat(taken).to(torch.float32)  # (n, C, H, W)
