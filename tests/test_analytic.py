"""Analytic-DPM's optimal variance against the true reverse conditional of isotropic Gaussian data,
where the optimal eps-model and Var(x_s | x_t) are known in closed form."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from oracles import exact_gamma, gaussian_eps

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
    ours = optimal_variance(a_t, a_s, lam2, exact_gamma(a_t, VAR))
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
    z = (est.mean - exact_gamma(abar, VAR)) / est.stderr
    assert est.mean.shape == (T,) and est.num_samples == 400
    assert np.abs(z).max() < 4.5, np.abs(z).max()
    big = estimate_gamma(optimal_eps, abar_t, iter(data.split(500)), num_samples=1600,
                         generator=torch.Generator().manual_seed(0))
    ratio = np.median(est.stderr / big.stderr)
    assert 1.8 < ratio < 2.2, ratio
    with pytest.raises(ValueError, match="Gamma needs num_samples = 5000"):
        estimate_gamma(optimal_eps, abar_t, iter(data.split(500)), num_samples=5000, generator=g)


# ---------------------------------------------------------------------------------- samplers and bound
MEAN2, VAR2 = 0.1, 0.04  # inside [-1, 1] to 4.5 standard deviations (the bound bins data there)


@pytest.mark.parametrize("sampler", ["analytic-ddpm", "analytic-ddim"])
def test_analytic_samplers_draw_the_data_distribution_in_few_steps(sampler):
    """For Gaussian data with the optimal model each optimal Gaussian kernel is the true reverse
    conditional, so 10 steps already give x_0 ~ N(MEAN, VAR) (less Var(x_0 | x_{k_0}), since the last
    step returns its mean); the fixed beta-tilde of the same chain gives a visibly narrower law."""
    from ddpmkit.sampling import sample

    d = DiffusionConfig(num_timesteps=T, var_type="fixedsmall").build()
    abar_t = d.alphas_cumprod
    eps = gaussian_eps(abar_t, MEAN, VAR)
    gamma = exact_gamma(abar_t.numpy(), VAR)
    kept = list(range(0, T, 100))  # k_0 = 0: Var(x_0 | x_{k_0}) is 1e-4 of VAR
    shape = (20000, 1, 1, 1)
    g = torch.Generator().manual_seed(0)
    x = sample(eps, d, shape, sampler=sampler, timesteps=kept, gamma=gamma, generator=g, clip_denoised=False)
    x = x.double().flatten()
    a0 = abar_t[0].item()
    expected_var = VAR - VAR * (1 - a0) / (a0 * VAR + 1 - a0)
    se_var = expected_var * (2 / x.numel()) ** 0.5
    assert abs(x.mean().item() - MEAN) < 5 * (expected_var / x.numel()) ** 0.5
    assert abs(x.var().item() - expected_var) < 5 * se_var, (x.var().item(), expected_var)
    fixed = sample(eps, d, shape, sampler="ddpm", timesteps=kept, generator=torch.Generator().manual_seed(0),
                   clip_denoised=False).double().flatten()
    assert fixed.var().item() < expected_var - 20 * se_var  # beta-tilde of a 100-step jump is too small


def test_the_k_step_bound_equals_its_closed_form():
    """Every KL term of the bound through the analytic chain: E KL(q(x_s | x_t, x_0) || p(x_s | x_t))
    = 1/2 log(sigma*^2 / lambda^2) per dimension, with lambda^2 the chain's beta-tilde (the mean
    error term and lambda^2 / sigma^2 add up to 1 at the optimum); L_T = 1/2 (abar_T (m^2 + s^2) -
    abar_T - log(1 - abar_T)). Each is the Monte-Carlo mean of the bound within 5 standard errors.
    The fixed beta and beta-tilde of the same 10-step chain give a larger bound."""
    d = DiffusionConfig(num_timesteps=T, var_type="fixedsmall").build()
    abar_t = d.alphas_cumprod
    eps = gaussian_eps(abar_t, MEAN2, VAR2)
    kept = list(range(0, T, 100))
    x0 = MEAN2 + VAR2**0.5 * torch.randn(4000, 1, 2, 2, generator=torch.Generator().manual_seed(2),
                                         dtype=torch.float64)
    x0 = x0[(x0.abs() <= 1).flatten(1).all(1)]
    from ddpmkit.analytic import analytic_chain

    a_t, a_s = chain_alphas_cumprod(abar_t, kept)
    lam2 = lambda_squared(a_t, a_s, 1.0)
    sigma2 = optimal_variance(a_t, a_s, lam2, (1 - a_t) / (a_t * VAR2 + 1 - a_t))
    closed = 0.5 * np.log(sigma2[1:] / lam2[1:]) / np.log(2.0)  # bits/dim, steps 1..S-1
    chain = analytic_chain(d, kept, (1 - abar_t.numpy()) / (abar_t.numpy() * VAR2 + 1 - abar_t.numpy()))
    out = chain.calc_bpd_loop(eps, x0, clip_denoised=False, generator=torch.Generator().manual_seed(3))
    vb = out["vb"][:, 1:].numpy()
    se = vb.std(0, ddof=1) / len(vb) ** 0.5
    assert np.all(np.abs(vb.mean(0) - closed) < 5 * se + 1e-12), (vb.mean(0), closed)
    aT = a_t[-1]
    prior = 0.5 * (aT * (MEAN2**2 + VAR2) - aT - np.log1p(-aT)) / np.log(2.0)
    assert abs(out["prior_bpd"].mean().item() - prior) < 5 * out["prior_bpd"].std().item() / len(vb) ** 0.5
    from ddpmkit.respace import respace_diffusion

    for var_type in ("fixedsmall", "fixedlarge"):
        fixed = respace_diffusion(DiffusionConfig(num_timesteps=T, var_type=var_type).build(), kept)
        f = fixed.calc_bpd_loop(eps, x0, clip_denoised=False, generator=torch.Generator().manual_seed(3))
        assert f["vb"][:, 1:].sum(1).mean() > out["vb"][:, 1:].sum(1).mean() + 0.05
