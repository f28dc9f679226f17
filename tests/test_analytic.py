"""Analytic-DPM's optimal variance against the true reverse conditional of isotropic Gaussian data,
where the optimal eps-model and Var(x_s | x_t) are known in closed form."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ddpmkit.analytic import (
    chain_alphas_cumprod,
    estimate_gamma,
    lambda_squared,
    optimal_variance,
)
from ddpmkit.diffusion import DiffusionConfig

T = 1000
MEAN, VAR = 0.3, 0.25  # x_0 ~ N(MEAN, VAR I)


@pytest.fixture(scope="module")
def abar() -> np.ndarray:
    return DiffusionConfig(num_timesteps=T).build().alphas_cumprod.numpy()


def exact_gamma(abar: np.ndarray) -> np.ndarray:
    """E ||E[eps | x_t]||^2 / d = (1 - abar) / (abar VAR + 1 - abar) for N(MEAN, VAR) data."""
    return (1 - abar) / (abar * VAR + 1 - abar)


def conditional_variance(abar_t, abar_s, lambda2):
    """Var(x_s | x_t) under q_lambda, from the joint Gaussian of (x_s, x_t): x_t = sqrt(abar_t) x_0 +
    sqrt(1 - abar_t) eps, x_s = sqrt(abar_s) x_0 + sqrt(1 - abar_s - lambda^2) eps + lambda z."""
    var_s = abar_s * VAR + 1 - abar_s
    var_t = abar_t * VAR + 1 - abar_t
    cov = np.sqrt(abar_s * abar_t) * VAR + np.sqrt(np.maximum(1 - abar_s - lambda2, 0)) * np.sqrt(1 - abar_t)
    return var_s - cov**2 / var_t


@pytest.mark.parametrize("kept", [list(range(T)), list(range(0, T, 10)), [0, 3, 40, 41, 500, 999]])
@pytest.mark.parametrize("eta", [0.0, 0.5, 1.0])
def test_the_optimal_variance_is_the_true_conditional_variance(abar, kept, eta):
    a_t, a_s = chain_alphas_cumprod(abar, kept)
    lam2 = lambda_squared(a_t, a_s, eta)
    ours = optimal_variance(a_t, a_s, lam2, exact_gamma(a_t))
    np.testing.assert_allclose(ours, conditional_variance(a_t, a_s, lam2), rtol=1e-9, atol=1e-15)
    if eta == 1.0:  # DDPM's Markov chain: Var(x_s | x_t) = v_s - (abar_t / abar_s) v_s^2 / v_t
        v_s, v_t = a_s * VAR + 1 - a_s, a_t * VAR + 1 - a_t
        np.testing.assert_allclose(ours, v_s - a_t / a_s * v_s**2 / v_t, rtol=1e-9, atol=1e-15)


def test_the_bounds_clip_the_variance(abar):
    """Gamma outside [0, 1] is clipped to Bao et al.'s bounds: lambda^2 below (Gamma >= 1), and
    lambda^2 + c^2 min((1 - abar_t) / abar_t, 1) above (Gamma <= 0; data in [-1, 1])."""
    a_t, a_s = chain_alphas_cumprod(abar, list(range(0, T, 50)))
    lam2 = lambda_squared(a_t, a_s, 1.0)
    np.testing.assert_array_equal(optimal_variance(a_t, a_s, lam2, np.full_like(a_t, 1.7)), lam2)
    hi = optimal_variance(a_t, a_s, lam2, np.full_like(a_t, -3.0))
    c = np.sqrt(a_s) - np.sqrt(1 - a_s - lam2) * np.sqrt(a_t / (1 - a_t))
    np.testing.assert_allclose(hi, lam2 + c**2 * np.minimum((1 - a_t) / a_t, 1.0), rtol=1e-12)
    assert hi[-1] < lam2[-1] + c[-1] ** 2 * (1 - a_t[-1]) / a_t[-1]  # the data range binds at large t


def test_gamma_estimate_converges_to_its_closed_form(abar):
    """The Monte-Carlo Gamma_t of the optimal eps-model lies within 4.5 standard errors of the
    closed form at every t (1000 t's), and its standard error shrinks as 1/sqrt(M)."""
    abar_t = torch.as_tensor(abar)

    def optimal_eps(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        ab = abar_t[t].view(-1, 1, 1, 1).to(x.dtype)
        return (1 - ab).sqrt() * (x - ab.sqrt() * MEAN) / (ab * VAR + 1 - ab)

    g = torch.Generator().manual_seed(0)
    data = MEAN + VAR**0.5 * torch.randn(4000, 1, 4, 4, generator=torch.Generator().manual_seed(1))
    est = estimate_gamma(optimal_eps, abar_t, iter(data.split(500)), num_samples=400, generator=g)
    z = (est.mean - exact_gamma(abar)) / est.stderr
    assert est.mean.shape == (T,) and est.num_samples == 400
    assert np.abs(z).max() < 4.5, np.abs(z).max()
    big = estimate_gamma(optimal_eps, abar_t, iter(data.split(500)), num_samples=1600,
                         generator=torch.Generator().manual_seed(0))
    ratio = np.median(est.stderr / big.stderr)
    assert 1.8 < ratio < 2.2, ratio
    with pytest.raises(ValueError, match="Gamma needs num_samples = 5000"):
        estimate_gamma(optimal_eps, abar_t, iter(data.split(500)), num_samples=5000, generator=g)
