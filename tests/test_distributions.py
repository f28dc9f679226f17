"""normal_kl and the discretized Gaussian decoder (eq. 13) against scipy, mpmath and the released
code's formulas."""

from __future__ import annotations

import math

import mpmath
import numpy as np
import pytest
import scipy.integrate
import scipy.stats
import torch

from ddpmkit.distributions import (
    approx_standard_normal_cdf,
    discretized_gaussian_log_likelihood,
    log_standard_normal_cdf_difference,
    normal_kl,
    standard_normal_cdf,
)

GRID = torch.linspace(-1.0, 1.0, 256, dtype=torch.float64)  # the 256 data values


def test_normal_kl_against_torch_distributions_and_quadrature() -> None:
    g = torch.Generator().manual_seed(0)
    m1, m2, lv1, lv2 = torch.randn(4, 50, generator=g, dtype=torch.float64)
    ours = normal_kl(m1, lv1, m2, lv2)
    ref = torch.distributions.kl_divergence(
        torch.distributions.Normal(m1, (0.5 * lv1).exp()), torch.distributions.Normal(m2, (0.5 * lv2).exp())
    )
    torch.testing.assert_close(ours, ref, rtol=1e-12, atol=1e-12)
    # and one value by numerical integration of p log(p/q)
    p, q = scipy.stats.norm(0.3, math.exp(0.5 * -0.7)), scipy.stats.norm(-0.2, math.exp(0.5 * 0.4))
    integral, _ = scipy.integrate.quad(lambda x: p.pdf(x) * (p.logpdf(x) - q.logpdf(x)), -20, 20)
    kl = normal_kl(torch.tensor(0.3), torch.tensor(-0.7), torch.tensor(-0.2), torch.tensor(0.4))
    assert kl.item() == pytest.approx(integral, rel=1e-6)


def test_normal_kl_is_zero_for_equal_gaussians_and_broadcasts() -> None:
    m = torch.randn(4, 3, 2, 2, dtype=torch.float64)
    lv = torch.randn(4, 1, 1, 1, dtype=torch.float64)
    assert normal_kl(m, lv, m, lv).shape == (4, 3, 2, 2)
    torch.testing.assert_close(normal_kl(m, lv, m, lv), torch.zeros_like(m), atol=1e-15, rtol=0)


def test_cdfs() -> None:
    x = torch.linspace(-8, 8, 1001, dtype=torch.float64)
    np.testing.assert_allclose(standard_normal_cdf(x).numpy(), scipy.stats.norm.cdf(x.numpy()), rtol=1e-13)
    np.testing.assert_allclose(standard_normal_cdf(-x).numpy(), scipy.stats.norm.sf(x.numpy()), rtol=1e-13)
    approx = approx_standard_normal_cdf(x).numpy()
    expected = 0.5 * (1 + np.tanh(np.sqrt(2 / np.pi) * (x.numpy() + 0.044715 * x.numpy() ** 3)))
    np.testing.assert_allclose(approx, expected, rtol=1e-14, atol=1e-16)
    # the tanh formula is a good approximation: max abs error ~ 2e-4
    assert np.abs(approx - scipy.stats.norm.cdf(x.numpy())).max() < 3e-4


def _scipy_log_likelihood(x: np.ndarray, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
    """eq. (13) by scipy: bins [x - 1/255, x + 1/255], the outer ones extended to -inf / +inf."""
    hi = np.where(x > 0.999, np.inf, x + 1 / 255)
    lo = np.where(x < -0.999, -np.inf, x - 1 / 255)
    lower = scipy.stats.norm.cdf(hi, mean, std) - scipy.stats.norm.cdf(lo, mean, std)
    upper = scipy.stats.norm.sf(lo, mean, std) - scipy.stats.norm.sf(hi, mean, std)  # same mass
    with np.errstate(divide="ignore"):
        return np.log(np.where(lo + hi > 2 * mean, upper, lower))


def test_discretized_exact_against_scipy() -> None:
    g = torch.Generator().manual_seed(1)
    x = GRID[torch.randint(0, 256, (2000,), generator=g)]
    x[:50], x[50:100] = -1.0, 1.0  # the two edge bins
    means = (x + 0.1 * torch.randn(2000, generator=g, dtype=torch.float64)).clamp(-1.2, 1.2)
    log_scales = torch.empty(2000, dtype=torch.float64).uniform_(math.log(1e-3), math.log(0.3), generator=g)
    ours = discretized_gaussian_log_likelihood(x, means=means, log_scales=log_scales)
    ref = _scipy_log_likelihood(x.numpy(), means.numpy(), log_scales.exp().numpy())
    finite = np.isfinite(ref)  # scipy underflows beyond ~ -745 nats; the far tails are tested below
    assert finite.mean() > 0.8
    assert (ours.numpy()[~finite] < -700).all()  # where float64 Phi-differences underflow
    np.testing.assert_allclose(ours.numpy()[finite], ref[finite], rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("std", [1e-3, 0.01, 0.1, 1.0, 5.0])
@pytest.mark.parametrize("mean", [-1.0, -0.37, 0.0, 0.999, 1.3])
def test_discretized_probabilities_sum_to_one(mean: float, std: float) -> None:
    logp = discretized_gaussian_log_likelihood(
        GRID,
        means=torch.tensor(mean, dtype=torch.float64),
        log_scales=torch.tensor(math.log(std), dtype=torch.float64),
    )
    assert torch.logsumexp(logp, 0).item() == pytest.approx(0.0, abs=1e-12)


def _mp_log_mass(lo: object, hi: object) -> float:
    """log(Phi(hi) - Phi(lo)) in 60-digit arithmetic; the upper tail by the symmetry of N(0, 1)."""
    if lo > 0:
        lo, hi = -hi, -lo
    return float(mpmath.log(mpmath.ncdf(hi) - mpmath.ncdf(lo)))


def test_discretized_far_tails_are_exact() -> None:
    """Where Phi rounds to 0 or 1, the log-space computation stays exact (mpmath reference)."""
    mpmath.mp.dps = 60
    cases = [(0.5, -0.4, 1e-3), (-0.6, 0.7, 1e-2), (0.2, 0.0, 2e-3), (1.0, -1.0, 5e-3), (-1.0, 1.0, 5e-3)]
    for x, mean, std in cases:
        ours = discretized_gaussian_log_likelihood(
            torch.tensor(x, dtype=torch.float64),
            means=torch.tensor(mean, dtype=torch.float64),
            log_scales=torch.tensor(math.log(std), dtype=torch.float64),
        ).item()
        lo = -mpmath.inf if x < -0.999 else (mpmath.mpf(x) - mpmath.mpf(1) / 255 - mean) / std
        hi = mpmath.inf if x > 0.999 else (mpmath.mpf(x) + mpmath.mpf(1) / 255 - mean) / std
        ref = _mp_log_mass(lo, hi)
        assert ref < -1000  # these probabilities underflow in float64
        assert ours == pytest.approx(ref, rel=1e-9)


def test_log_cdf_difference_both_tails() -> None:
    mpmath.mp.dps = 50
    lo = torch.tensor([-40.0, 39.0, -0.5, 5.0, -3e-3], dtype=torch.float64)
    hi = torch.tensor([-39.0, 40.0, 0.5, 5.0001, 3e-3], dtype=torch.float64)
    ours = log_standard_normal_cdf_difference(lo, hi)
    pairs = zip(lo.tolist(), hi.tolist(), strict=True)
    ref = [_mp_log_mass(mpmath.mpf(lw), mpmath.mpf(h)) for lw, h in pairs]
    np.testing.assert_allclose(ours.numpy(), ref, rtol=1e-10)


def test_discretized_float32_gradients_are_finite() -> None:
    x = GRID.float()[torch.tensor([0, 1, 100, 254, 255])]
    means = torch.tensor([0.9, -0.9, 0.3, -2.0, 0.2], requires_grad=True)
    log_scales = torch.tensor([-8.0, -8.0, 3.0, -6.0, 0.0], requires_grad=True)
    logp = discretized_gaussian_log_likelihood(x, means=means, log_scales=log_scales)
    assert torch.isfinite(logp).all()
    logp.sum().backward()
    assert torch.isfinite(means.grad).all() and torch.isfinite(log_scales.grad).all()


def test_discretized_tanh_matches_released_formula() -> None:
    """cdf='tanh' is the released code: tanh CDF, probabilities floored at 1e-12 (NumPy re-statement)."""
    g = torch.Generator().manual_seed(2)
    x = GRID[torch.randint(0, 256, (500,), generator=g)]
    x[:20], x[20:40] = -1.0, 1.0
    means = x + 0.05 * torch.randn(500, generator=g, dtype=torch.float64)
    log_scales = torch.empty(500, dtype=torch.float64).uniform_(-7, -1, generator=g)
    ours = discretized_gaussian_log_likelihood(x, means=means, log_scales=log_scales, cdf="tanh").numpy()

    def cdf(v: np.ndarray) -> np.ndarray:
        return 0.5 * (1.0 + np.tanh(np.sqrt(2.0 / np.pi) * (v + 0.044715 * v**3)))

    xn, c, inv = x.numpy(), x.numpy() - means.numpy(), np.exp(-log_scales.numpy())
    cdf_plus, cdf_min = cdf(inv * (c + 1 / 255)), cdf(inv * (c - 1 / 255))
    log_delta = np.log(np.maximum(cdf_plus - cdf_min, 1e-12))
    ref = np.where(
        xn < -0.999,
        np.log(np.maximum(cdf_plus, 1e-12)),
        np.where(xn > 0.999, np.log(np.maximum(1 - cdf_min, 1e-12)), log_delta),
    )
    # the probability differences cancel (1 - 1 + tiny), so compare probabilities, not logs
    np.testing.assert_allclose(np.exp(ours), np.exp(ref), rtol=1e-9, atol=1e-15)
    exact = discretized_gaussian_log_likelihood(x, means=means, log_scales=log_scales).numpy()
    close = exact > -10  # the approximation agrees where the probability is not tiny
    assert np.abs(np.exp(ours[close]) - np.exp(exact[close])).max() < 5e-4


def test_unknown_cdf() -> None:
    with pytest.raises(ValueError, match=r"unknown cdf 'erf'; choose one of exact, tanh$"):
        discretized_gaussian_log_likelihood(GRID, means=GRID, log_scales=GRID, cdf="erf")
