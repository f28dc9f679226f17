"""DPM-Solver++(2M) (Lu et al. 2022): a second-order multistep solver of the probability-flow ODE.

In the data-prediction form, with alpha_t = sqrt(abar_t), sigma_t = sqrt(1 - abar_t) and the
half log-SNR lambda_t = log(alpha_t / sigma_t), the ODE's exact solution from t to s < t is

    x_s = (sigma_s / sigma_t) x_t + sigma_s int_{lambda_t}^{lambda_s} e^lambda x0_theta(x_lambda) d lambda.

Holding x0_theta constant over the step gives the first-order update (DDIM with eta = 0); the 2M
update replaces it by a linear extrapolation through the previous step's data prediction:

    h = lambda_s - lambda_t,  r = h_prev / h,
    D = (1 + 1 / (2r)) x0_t - 1 / (2r) x0_prev,
    x_s = (sigma_s / sigma_t) x_t - alpha_s (e^{-h} - 1) D.

The model is called only at the chain's integer timesteps (as diffusers' multistep scheduler does
for a discrete-time model), once per step; the first step and the last (to x_0, lambda = +inf)
are first order, so S timesteps cost S model calls. The step choices (logSNR- and time-uniform)
are timestep specs of ``respace``. docs/math.md derives the update; on Gaussian
data tests/test_dpm_solver.py checks its error against the exact ODE map at second order.
"""

from __future__ import annotations

import math

import torch

__all__ = ["dpm_solver_2m_update", "half_log_snr"]


def half_log_snr(abar: float) -> float:
    """lambda = log(alpha / sigma) = log(abar / (1 - abar)) / 2."""
    return 0.5 * (math.log(abar) - math.log1p(-abar))


def dpm_solver_2m_update(x_t: torch.Tensor, x0_t: torch.Tensor, x0_prev: torch.Tensor | None, *,
                         abar_t: float, abar_s: float, h_prev: float | None) -> torch.Tensor:
    """One DPM-Solver++ step x_t -> x_s (s < t): second order through ``x0_prev`` (the data
    prediction one step earlier, h_prev its lambda step), first order when it is None.
    x_t, x0_t, x0_prev: (B, C, ...) -> x_s of that shape."""
    # 1. the step in lambda, and the ODE's linear part
    alpha_s, sigma_s, sigma_t = math.sqrt(abar_s), math.sqrt(1.0 - abar_s), math.sqrt(1.0 - abar_t)
    h = half_log_snr(abar_s) - half_log_snr(abar_t)
    # 2. the data prediction over the step: constant (first order) or extrapolated (2M)
    if x0_prev is None or h_prev is None:
        d = x0_t
    else:
        r = h_prev / h
        d = (1.0 + 0.5 / r) * x0_t - (0.5 / r) * x0_prev
    # 3. exponential integrator: x_s = (sigma_s / sigma_t) x_t - alpha_s (e^{-h} - 1) D
    return (sigma_s / sigma_t) * x_t - alpha_s * math.expm1(-h) * d
