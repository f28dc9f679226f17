"""The variational bound (eq. 5) against an exact oracle.

If the data set is a single image x*, then q(x_0) is a point mass,
x_t = sqrt(abar_t) x* + sqrt(1 - abar_t) eps, and the optimal (Bayes) noise predictor is known in closed form:

    eps*(x_t, t) = (x_t - sqrt(abar_t) x*) / sqrt(1 - abar_t).

Plugged in as the model, it gives pred_x0 = x* exactly, so the model mean equals the true posterior mean
mu-tilde_t(x_t, x*) (clipping pred_x0 to [-1, 1] is moot because x* lies in [-1, 1]). Every term of
calc_bpd_loop then has a closed form that does not depend on the noise drawn:

    L_T     = KL(N(sqrt(abar_T) x*, 1 - abar_T) || N(0, 1))
            = 1/2 (-1 - log(1 - abar_T) + (1 - abar_T) + abar_T x*^2)            per dimension
    L_{t-1} = KL(N(mu, beta-tilde_t) || N(mu, sigma_t^2))
            = 1/2 (log(sigma_t^2 / beta-tilde_t) + beta-tilde_t / sigma_t^2 - 1)  per dimension, t >= 2
            = 0 for fixedsmall (sigma_t^2 = beta-tilde_t); > 0 for fixedlarge (sigma_t^2 = beta_t)
    L_0     = -log of the N(x*, sigma_1^2) mass of x*'s bin (eq. 13): 2 Phi(h / sigma_1) - 1 inside,
              Phi(h / sigma_1) for the edge bins x* = -1 or 1, h = 1/255; sigma_1^2 = beta-tilde_2 for both
              fixed types (the released code's choice).

All of it in bits per dimension (mean over the D dimensions, divided by ln 2). The references below are
computed in NumPy/SciPy from the schedule's definition, independently of ddpmkit's coefficient tables.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.stats
import torch

from ddpmkit.diffusion import GaussianDiffusion, MeanType, VarType
from ddpmkit.schedules import get_named_beta_schedule

T = 1000
LN2 = math.log(2.0)

BETAS = np.linspace(1e-4, 0.02, T, dtype=np.float64)
ABAR = np.cumprod(1.0 - BETAS)
ABAR_PREV = np.append(1.0, ABAR[:-1])
BETA_TILDE = BETAS * (1.0 - ABAR_PREV) / (1.0 - ABAR)


def _image() -> np.ndarray:
    """x*: (1, 3, 4, 4) on the 256-level grid, with both edge values present."""
    rng = np.random.default_rng(0)
    levels = rng.integers(0, 256, size=(1, 3, 4, 4))
    levels.flat[:3] = [0, 255, 0]
    levels.flat[-2:] = [255, 128]
    return levels / 127.5 - 1.0


def _analytic(x_star: np.ndarray, sigma2: np.ndarray) -> dict[str, np.ndarray | float]:
    """The closed-form terms in bits/dim for the model variances sigma2: (T,)."""
    ab_T = ABAR[-1]
    prior = np.mean(0.5 * (-1.0 - np.log(1.0 - ab_T) + (1.0 - ab_T) + ab_T * x_star**2)) / LN2
    bt, s2 = BETA_TILDE[1:], sigma2[1:]
    kl = 0.5 * (np.log(s2 / bt) + bt / s2 - 1.0) / LN2  # (T - 1,): t = 1 .. T - 1 (0-based)
    h = (1.0 / 255.0) / math.sqrt(sigma2[0])
    edge = np.abs(x_star) > 0.999
    log_mass = np.where(
        edge, scipy.stats.norm.logcdf(h), np.log(scipy.stats.norm.cdf(h) - scipy.stats.norm.cdf(-h))
    )
    decoder = -np.mean(log_mass) / LN2
    vb = np.append(decoder, kl)  # (T,)
    return {"prior": prior, "vb": vb, "total": prior + vb.sum()}


def _oracle(mean_type: MeanType, x_star: torch.Tensor, var_channels: float | None):  # noqa: ANN202
    """The Bayes-optimal model for the data set {x*}, in the requested parameterization."""
    sqrt_ab = torch.from_numpy(np.sqrt(ABAR)).to(x_star.dtype)
    sqrt_1m_ab = torch.from_numpy(np.sqrt(1.0 - ABAR)).to(x_star.dtype)
    coef1 = torch.from_numpy(BETAS * np.sqrt(ABAR_PREV) / (1.0 - ABAR)).to(x_star.dtype)
    coef2 = torch.from_numpy((1.0 - ABAR_PREV) * np.sqrt(1.0 - BETAS) / (1.0 - ABAR)).to(x_star.dtype)

    def model(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        shape = (-1, 1, 1, 1)
        if mean_type is MeanType.EPS:
            out = (x_t - sqrt_ab[t].view(shape) * x_star) / sqrt_1m_ab[t].view(shape)
        elif mean_type is MeanType.X0:
            out = x_star.expand_as(x_t)
        elif mean_type is MeanType.X_PREV:
            out = coef1[t].view(shape) * x_star + coef2[t].view(shape) * x_t
        else:
            raise NotImplementedError(mean_type)
        if var_channels is not None:  # learned_range: a constant v in [-1, 1]
            out = torch.cat([out, torch.full_like(out, var_channels)], dim=1)
        return out

    return model


CASES = {
    # name: (var_type, v for learned_range, model variances sigma_t^2 (T,))
    "fixedsmall": (VarType.FIXED_SMALL, None, np.append(BETA_TILDE[1], BETA_TILDE[1:])),
    "fixedlarge": (VarType.FIXED_LARGE, None, np.append(BETA_TILDE[1], BETAS[1:])),
    # learned_range at its ends: v = -1 is beta-tilde (clipped), v = +1 is beta (also at t = 1)
    "learned_range_low": (VarType.LEARNED_RANGE, -1.0, np.append(BETA_TILDE[1], BETA_TILDE[1:])),
    "learned_range_high": (VarType.LEARNED_RANGE, 1.0, BETAS),
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("mean_type", list(MeanType))
@pytest.mark.parametrize("clip_denoised", [True, False])
def test_every_term_of_the_bound_matches_the_oracle(
    case: str, mean_type: MeanType, clip_denoised: bool
) -> None:
    var_type, v, sigma2 = CASES[case]
    x_star_np = _image()
    expected = _analytic(x_star_np, sigma2)
    x_star = torch.from_numpy(x_star_np)  # float64
    diffusion = GaussianDiffusion(
        betas=get_named_beta_schedule("linear", T), mean_type=mean_type, var_type=var_type
    )
    x0 = x_star.expand(2, -1, -1, -1)  # two copies see different noise; the terms must not depend on it
    out = diffusion.calc_bpd_loop(
        _oracle(mean_type, x_star, v),
        x0,
        clip_denoised=clip_denoised,
        t_chunk=250,
        generator=torch.Generator().manual_seed(0),
    )
    for b in range(2):
        assert out["prior_bpd"][b].item() == pytest.approx(expected["prior"], rel=1e-12)
        # the decoder L_0 and each KL L_1 .. L_{T-1}
        np.testing.assert_allclose(out["vb"][b, 0].item(), expected["vb"][0], rtol=1e-9)
        np.testing.assert_allclose(out["vb"][b, 1:].numpy(), expected["vb"][1:], rtol=1e-6, atol=1e-11)
        assert out["total_bpd"][b].item() == pytest.approx(expected["total"], rel=1e-9)
        # the oracle recovers x* and the noise
        assert out["x0_mse"][b].max().item() < 1e-20
        assert out["mse"][b].max().item() < 1e-20


def test_oracle_values_are_what_the_paper_setting_gives() -> None:
    """The numbers themselves, for the record: with the released fixedlarge choice the KL terms carry
    the whole bound, with fixedsmall they vanish; the decoder is the same for both."""
    x_star = _image()
    small = _analytic(x_star, CASES["fixedsmall"][2])
    large = _analytic(x_star, CASES["fixedlarge"][2])
    assert np.all(small["vb"][1:] == 0.0)
    assert large["vb"][1:].min() > 0
    assert small["vb"][0] == large["vb"][0]
    assert small["prior"] < 1e-4  # abar_T ~ 4e-5: L_T is negligible, as Sec. 3.1 assumes
    # the fixedlarge KL sum (0.486 bits/dim) is the price of sigma_t^2 = beta_t for a point-mass data set,
    # mostly paid at small t where beta_t / beta-tilde_t is largest
    assert 0.48 < large["vb"][1:].sum() < 0.49
    assert large["vb"][1] > large["vb"][10] > large["vb"][100] > large["vb"][999]


def test_oracle_float32_is_close() -> None:
    """The same check in float32 (the dtype of training and evaluation): total within 5e-5 bits/dim
    (measured 5e-6), every term within 1e-5 (measured 7e-7)."""
    x_star_np = _image()
    sigma2 = CASES["fixedlarge"][2]
    expected = _analytic(x_star_np, sigma2)
    x_star = torch.from_numpy(x_star_np).float()
    diffusion = GaussianDiffusion(betas=get_named_beta_schedule("linear", T), var_type="fixedlarge")
    out = diffusion.calc_bpd_loop(
        _oracle(MeanType.EPS, x_star, None), x_star, t_chunk=500, generator=torch.Generator().manual_seed(1)
    )
    assert out["total_bpd"].dtype == torch.float32
    assert out["total_bpd"].item() == pytest.approx(expected["total"], abs=5e-5)
    np.testing.assert_allclose(out["vb"][0].numpy(), expected["vb"], rtol=0, atol=1e-5)
