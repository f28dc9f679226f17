"""Samplers for a trained reverse process: the single steps, the samplers, their one loop and registry.

- ``p_sample``: one step of Algorithm 2; ``sample_ancestral`` runs it from x_T (on fewer
  ``timesteps``, over the respaced chain: ``respace.SpacedDiffusion``, docs/math.md Sec. 10).
- ``ddim_step``: one step of DDIM (Song, Meng, Ermon 2021, eq. 12); ``sample_ddim`` runs it.
- ``sample``: the dispatch on ``SamplerType`` through the registry ``SAMPLERS``.

The sampler contract: ``sample_X(model, diffusion, shape, *, timesteps, generator, clip_denoised,
x_T, device, progress, callback, <options>)``; ``timesteps`` is None (all T), a count, an
improved-diffusion string ("ddim50", "10,15,20") or a list (``respace.parse_timesteps``);
``callback(step, t, x_t, pred_x0)`` runs after each step. A sampler checks its arguments once and
runs its steps with ``check=False``, so no step reads t back (a device sync per step on a GPU).

Noise. Every sampler takes ``generator`` (``seeds.Generators``): ``None`` (torch's global RNG), one
``torch.Generator`` (the batch's noise drawn at once), or a sequence of generators, one per sample:
sample i then draws all of its noise from its own stream, so its result does not depend on the
batch it is in (``seeds.sample_generators``). Noise is drawn with ``seeds.draw_standard_normal``.

Shapes: x_t: (B, C, ...) float; t: a Python int (one timestep for the whole batch) or (B,) int64;
timesteps are 0-based (index t is the paper's t + 1). The model is any callable
``model(x_t, t) -> Tensor`` with t (B,) int64. This module imports the math only, never the network.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from enum import Enum
from typing import Any

import torch

from ddpmkit.analytic import analytic_chain, chain_variance
from ddpmkit.checks import check_float, check_int, is_int
from ddpmkit.diffusion import GaussianDiffusion, Model, check_same_shape, check_tensor
from ddpmkit.dpm_solver import dpm_solver_2m_update, half_log_snr
from ddpmkit.enums import parse_enum
from ddpmkit.respace import (
    Timesteps,
    chain_on,
    check_steps,
    check_timestep,
    diffusion_timesteps,
    logsnr_timesteps,
)
from ddpmkit.seeds import Generators, draw_standard_normal

__all__ = [
    "SAMPLERS",
    "Callback",
    "Noise",
    "SamplerType",
    "ddim_mean_variance",
    "ddim_step",
    "p_sample",
    "resolve_timesteps",
    "sample",
    "sample_analytic_ddim",
    "sample_analytic_ddpm",
    "sample_ancestral",
    "sample_ddim",
    "sample_dpm_solver",
    "t_batch",
]


class SamplerType(str, Enum):
    """How to run the reverse process."""

    DDPM = "ddpm"  # Algorithm 2 (all T steps), or respaced on S strided steps
    DDIM = "ddim"  # Song et al. eq. (12) with eta
    ANALYTIC_DDPM = "analytic-ddpm"  # respaced DDPM with Analytic-DPM's optimal variance (Bao et al.)
    ANALYTIC_DDIM = "analytic-ddim"  # DDIM's mean with Analytic-DPM's optimal variance
    DPM_SOLVER = "dpm-solver++"  # DPM-Solver++(2M) on the probability-flow ODE (Lu et al.)

    @property
    def min_steps(self) -> int:
        """The fewest strided steps it runs: a respaced chain has at least two."""
        return 2 if self in (SamplerType.DDPM, SamplerType.ANALYTIC_DDPM) else 1

    @property
    def takes_eta(self) -> bool:
        """It has DDIM's eta."""
        return self in (SamplerType.DDIM, SamplerType.ANALYTIC_DDIM)

    @property
    def needs_gamma(self) -> bool:
        """It needs Analytic-DPM's statistic Gamma_t of the model (``analytic.estimate_gamma``)."""
        return self in (SamplerType.ANALYTIC_DDPM, SamplerType.ANALYTIC_DDIM)


Callback = Callable[[int, int, torch.Tensor, torch.Tensor], Any]
# a step's noise z: a tensor, a function that draws it (after the model, only when needed), or none
Noise = torch.Tensor | Callable[[], torch.Tensor] | None


# ---------------------------------------------------------------------------------- the contract
def t_batch(t: int, x: torch.Tensor) -> torch.Tensor:
    """One timestep for the whole batch: (B,) int64 on x's device."""
    return torch.full((x.shape[0],), t, dtype=torch.int64, device=x.device)  # (B,)


def _check_shape(shape: Sequence[int]) -> tuple[int, ...]:
    shape = tuple(int(s) for s in shape)
    if len(shape) < 2 or any(s < 1 for s in shape):
        raise ValueError(f"shape must be (B, C, ...) with positive sizes, got {shape}")
    return shape


def _x_start(
    shape: Sequence[int], x_T: torch.Tensor | None, generator: Generators, device: Any
) -> torch.Tensor:
    """x_T ~ N(0, I) (drawn first from each noise stream), or the given x_T."""
    if x_T is not None:
        if not isinstance(x_T, torch.Tensor) or not x_T.is_floating_point():
            raise ValueError(f"x_T must be a floating-point tensor, got {type(x_T).__name__}")
        if tuple(x_T.shape) != tuple(shape):
            raise ValueError(f"x_T must have shape {tuple(shape)}, got {tuple(x_T.shape)}")
        return x_T if device is None else x_T.to(device)
    return draw_standard_normal(_check_shape(shape), generator, device=device or "cpu", dtype=torch.float32)


def _run(
    step_fn: Callable[[int, torch.Tensor], tuple[torch.Tensor, torch.Tensor]],
    x: torch.Tensor,
    kept: Sequence[int],
    callback: Callback | None,
    progress: bool,
    desc: str,
) -> torch.Tensor:
    """The one loop of the samplers: for step = 0, 1, ... at position i = S-1-step (timestep
    kept[i]), (x_prev, pred_x0) = step_fn(i, x_t); then callback(step, kept[i], x_t, pred_x0);
    the tqdm bar (``progress``) is one more callback. Returns the last x_prev."""
    from ddpmkit.logs import progress_bar

    callbacks = [callback] if callback is not None else []
    bar = progress_bar(total=len(kept), disable=not progress, desc=desc, unit="step", leave=False)
    callbacks.append(lambda *_: bar.update(1))
    try:
        for step, i in enumerate(range(len(kept) - 1, -1, -1)):
            x_prev, pred_x0 = step_fn(i, x)
            for cb in callbacks:
                cb(step, kept[i], x, pred_x0)
            x = x_prev
    finally:
        bar.close()
    return x


# ---------------------------------------------------------------------------------- Algorithm 2
def p_sample(
    model: Model,
    diffusion: GaussianDiffusion,
    x_t: torch.Tensor,
    t: int | torch.Tensor,
    *,
    noise: torch.Tensor | None,
    clip_denoised: bool = True,
    check: bool = True,
) -> dict[str, torch.Tensor]:
    """One step of Algorithm 2, line 4: x_{t-1} = mu_theta(x_t, t) + sigma_t z, with z = 0 where
    t = 0 (the paper's t = 1) or when ``noise`` is None.

    x_t: (B, C, ...); t: an int or (B,) int64 index of ``diffusion`` (of a ``SpacedDiffusion``: a
    kept position, the model then sees the kept timestep); noise z: x_t's shape or None.
    ``check=False``: the caller checked x_t, t and noise (a sampler, once). Returns
    ``p_mean_variance``'s dict plus ``sample`` = x_{t-1}, all of x_t's shape.
    """
    if check:
        check_tensor(x_t, "x_t", min_ndim=2)
        if noise is not None:
            check_same_shape(noise, x_t, "noise", "x_t")
    tt = t_batch(t, x_t) if is_int(t) else t
    # 1. mu_theta(x_t, t) and sigma_t^2, eq. (11) and Sec. 3.2
    p = diffusion.p_mean_variance(model, x_t, tt, clip_denoised, check=check)
    if noise is None:
        p["sample"] = p["mean"]
        return p
    # 2. x_{t-1} = mu + sigma_t z, no noise at the paper's t = 1 (Algorithm 2, line 4)
    nonzero = (tt != 0).to(x_t.dtype).view(-1, *([1] * (x_t.ndim - 1)))  # (B, 1, ..., 1)
    p["sample"] = p["mean"] + nonzero * torch.exp(0.5 * p["log_variance"]) * noise
    return p


@torch.inference_mode()
def sample_ancestral(
    model: Model,
    diffusion: GaussianDiffusion,
    shape: Sequence[int],
    *,
    timesteps: Timesteps = None,
    generator: Generators = None,
    clip_denoised: bool = True,
    x_T: torch.Tensor | None = None,
    device: torch.device | str | None = None,
    progress: bool = False,
    callback: Callback | None = None,
) -> torch.Tensor:
    """Algorithm 2: x_T ~ N(0, I), then x_{t-1} = mu_theta(x_t, t) + sigma_t z for t = T, ..., 1;
    on fewer ``timesteps`` (``parse_timesteps``) the respaced chain (``SpacedDiffusion``).

    The sampler contract (every sampler): shape (B, C, H, W), ``timesteps``, ``generator``,
    ``clip_denoised``, ``x_T``, ``device``, ``progress``, and ``callback(step, t, x_t, pred_x0)``
    after each step (t the original timestep; x_t, pred_x0 (B, C, H, W)). Returns x_0 (B, C, H, W)
    on ``device`` (clipped only through pred_x0; quantise at the edge).
    """
    kept = diffusion_timesteps(diffusion, timesteps)
    x = _x_start(shape, x_T, generator, device)
    chain = chain_on(diffusion, kept)  # index i of the chain is timestep kept[i]
    return _ancestral_loop(model, chain, x, kept, generator, clip_denoised, callback, progress, "sampling")


def _ancestral_loop(model: Model, chain: GaussianDiffusion, x: torch.Tensor, kept: list[int],
                    generator: Generators, clip_denoised: bool, callback: Callback | None, progress: bool,
                    desc: str) -> torch.Tensor:
    """Algorithm 2 over ``chain``, whose index i is timestep kept[i], from x = x_T."""

    def step(i: int, x_t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # z ~ N(0, I) if t > 1, else z = 0 (Algorithm 2, line 3)
        z = draw_standard_normal(x_t.shape, generator, device=x_t.device, dtype=x_t.dtype) if i > 0 else None
        p = p_sample(model, chain, x_t, t_batch(i, x_t), noise=z, clip_denoised=clip_denoised, check=False)
        return p["sample"], p["pred_x0"]

    return _run(step, x, kept, callback, progress, desc)


@torch.inference_mode()
def sample_analytic_ddpm(
    model: Model,
    diffusion: GaussianDiffusion,
    shape: Sequence[int],
    *,
    timesteps: Timesteps = None,
    gamma: Any,
    generator: Generators = None,
    clip_denoised: bool = True,
    x_T: torch.Tensor | None = None,
    device: torch.device | str | None = None,
    progress: bool = False,
    callback: Callback | None = None,
) -> torch.Tensor:
    """Analytic-DDPM (Bao et al. 2022): ``sample_ancestral``'s chain with sigma^2 the optimal
    variance of the jump k_i -> k_{i-1} (``analytic.chain_variance``, eta = 1) from ``gamma`` ((T,)
    Gamma_t or an ``analytic.GammaEstimate``). The contract of ``sample_ancestral``."""
    kept = diffusion_timesteps(diffusion, timesteps)
    x = _x_start(shape, x_T, generator, device)
    chain = analytic_chain(diffusion, kept, gamma)
    return _ancestral_loop(model, chain, x, kept, generator, clip_denoised, callback, progress,
                           "analytic-ddpm")


# ---------------------------------------------------------------------------------- DDIM
def ddim_mean_variance(
    diffusion: GaussianDiffusion,
    x_t: torch.Tensor,
    t: int,
    t_prev: int,
    pred_x0: torch.Tensor,
    pred_eps: torch.Tensor,
    eta: float,
    variance: float | None = None,
) -> tuple[torch.Tensor, float]:
    """One DDIM step from timestep t to t_prev < t (t_prev = -1: to x_0, abar = 1), Song et al. eq. (12):

        sigma^2 = eta^2 (1 - abar_prev) / (1 - abar_t) (1 - abar_t / abar_prev)      eq. (16)
        mean    = sqrt(abar_prev) pred_x0 + sqrt(1 - abar_prev - sigma^2) pred_eps   eq. (12)

    x_t, pred_x0, pred_eps: (B, C, ...). Returns (mean of x_t's shape, sigma^2 as a float).
    With t_prev = t - 1 and eta = 1, sigma^2 = beta-tilde_t and the mean is mu-tilde_t(x_t, pred_x0).
    ``variance``: the sigma^2 returned in place of eta's (Analytic-DDIM); the mean keeps eta's.
    """
    if not -1 <= t_prev < t < diffusion.num_timesteps:
        raise ValueError(f"expected -1 <= t_prev < t < {diffusion.num_timesteps}, got t={t}, t_prev={t_prev}")
    eta = check_float(eta, "eta", low=0)
    abar_t = float(diffusion.alphas_cumprod[t])
    abar_prev = float(diffusion.alphas_cumprod[t_prev]) if t_prev >= 0 else 1.0
    var = eta**2 * (1.0 - abar_prev) / (1.0 - abar_t) * (1.0 - abar_t / abar_prev)
    coef_eps = math.sqrt(max(1.0 - abar_prev - var, 0.0))
    return math.sqrt(abar_prev) * pred_x0 + coef_eps * pred_eps, var if variance is None else float(variance)


def ddim_step(
    model: Model,
    diffusion: GaussianDiffusion,
    x_t: torch.Tensor,
    t: int,
    t_prev: int,
    *,
    eta: float = 0.0,
    noise: Noise = None,
    clip_denoised: bool = True,
    variance: float | None = None,
    check: bool = True,
) -> dict[str, torch.Tensor]:
    """One DDIM step x_t -> x_{t_prev} (Song et al. eq. 12; t_prev = -1 lands on x_0): the model's
    pred_x0 (clipped when ``clip_denoised``) and the eps it implies give the mean of
    ``ddim_mean_variance``; sigma z is added when sigma > 0 (``noise`` z, or a function drawing
    it, is then required). ``variance``: sigma^2 in place of eta's (``ddim_mean_variance``).

    x_t: (B, C, ...); t, t_prev: ints. Returns {"sample": x_{t_prev}, "pred_x0", "pred_eps"}, x_t's shape.
    """
    if check:
        check_tensor(x_t, "x_t", min_ndim=2)
        t = check_timestep(diffusion.num_timesteps, t)
        check_int(t_prev, "t_prev", low=-1, high=t - 1, hint="(t - 1; -1 lands on x_0)")
        eta = check_float(eta, "eta", low=0)
        if isinstance(noise, torch.Tensor):
            check_same_shape(noise, x_t, "noise", "x_t")
    # 1. the predicted x_0 and the eps it implies ("predicted x_0" of eq. 12)
    p = diffusion.p_mean_variance(model, x_t, t_batch(t, x_t), clip_denoised, check=False)
    # 2. sigma_t(eta)^2 and the mean of x_{t_prev}, eq. (16) and (12)
    mean, var = ddim_mean_variance(diffusion, x_t, t, t_prev, p["pred_x0"], p["pred_eps"], eta, variance)
    out = {"sample": mean, "pred_x0": p["pred_x0"], "pred_eps": p["pred_eps"]}
    # 3. x_{t_prev} = mean + sigma_t z, only where sigma_t > 0
    if var > 0:
        z = noise() if callable(noise) else noise
        if z is None:
            raise ValueError(f"eta = {eta} > 0 adds noise at this step: pass noise of x_t's shape")
        out["sample"] = mean + math.sqrt(var) * z
    return out


@torch.inference_mode()
def sample_ddim(
    model: Model,
    diffusion: GaussianDiffusion,
    shape: Sequence[int],
    *,
    timesteps: Timesteps = None,
    eta: float = 0.0,
    generator: Generators = None,
    clip_denoised: bool = True,
    x_T: torch.Tensor | None = None,
    device: torch.device | str | None = None,
    progress: bool = False,
    callback: Callback | None = None,
) -> torch.Tensor:
    """DDIM (``ddim_step``) over the kept ``timesteps`` (``parse_timesteps``; default all T), the
    last step to x_0; eta = 0 is deterministic given x_T, eta = 1 with all T steps is Algorithm 2
    with sigma_t^2 = beta-tilde_t. A learned variance is ignored. The contract of
    ``sample_ancestral``. shape: (B, C, H, W) -> x_0 of that shape."""
    kept = diffusion_timesteps(diffusion, timesteps)
    eta = check_float(eta, "eta", low=0)
    x = _x_start(shape, x_T, generator, device)
    return _ddim_loop(model, diffusion, x, kept, eta, None, generator, clip_denoised, callback, progress,
                      "ddim")


def _ddim_loop(model: Model, diffusion: GaussianDiffusion, x: torch.Tensor, kept: list[int], eta: float,
               variances: Sequence[float] | None, generator: Generators, clip_denoised: bool,
               callback: Callback | None, progress: bool, desc: str) -> torch.Tensor:
    """DDIM steps over ``kept`` from x = x_T; ``variances[i]``: step i's sigma^2 in place of eta's."""
    prevs = [-1, *kept[:-1]]  # t_prev of position i; -1 lands on x_0

    def step(i: int, x_t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        def noise() -> torch.Tensor:  # drawn after the model, and only when sigma_t > 0
            return draw_standard_normal(x_t.shape, generator, device=x_t.device, dtype=x_t.dtype)

        var = None if variances is None else variances[i]
        out = ddim_step(model, diffusion, x_t, kept[i], prevs[i], eta=eta, noise=noise,
                        clip_denoised=clip_denoised, variance=var, check=False)
        return out["sample"], out["pred_x0"]

    return _run(step, x, kept, callback, progress, desc)


@torch.inference_mode()
def sample_analytic_ddim(
    model: Model,
    diffusion: GaussianDiffusion,
    shape: Sequence[int],
    *,
    timesteps: Timesteps = None,
    eta: float = 0.0,
    gamma: Any,
    generator: Generators = None,
    clip_denoised: bool = True,
    x_T: torch.Tensor | None = None,
    device: torch.device | str | None = None,
    progress: bool = False,
    callback: Callback | None = None,
) -> torch.Tensor:
    """Analytic-DDIM (Bao et al. 2022): DDIM's mean for ``eta`` (0: Song et al.'s deterministic
    mean) with the optimal variance of that kernel family (``analytic.chain_variance``) from
    ``gamma``; no noise on the last step, to x_0. The contract of ``sample_ancestral``."""
    kept = diffusion_timesteps(diffusion, timesteps)
    eta = check_float(eta, "eta", low=0)
    variances = chain_variance(diffusion, kept, gamma, eta=eta).tolist()
    variances[0] = 0.0  # the step to x_0 returns its mean, as Algorithm 2's last step does
    x = _x_start(shape, x_T, generator, device)
    return _ddim_loop(model, diffusion, x, kept, eta, variances, generator, clip_denoised, callback, progress,
                      "analytic-ddim")


# ---------------------------------------------------------------------------------- DPM-Solver++
@torch.inference_mode()
def sample_dpm_solver(
    model: Model,
    diffusion: GaussianDiffusion,
    shape: Sequence[int],
    *,
    timesteps: Timesteps = None,
    generator: Generators = None,
    clip_denoised: bool = True,
    x_T: torch.Tensor | None = None,
    device: torch.device | str | None = None,
    progress: bool = False,
    callback: Callback | None = None,
) -> torch.Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022, ``dpm_solver``) over the kept ``timesteps`` (a count S: S
    logSNR-uniform ones, ``respace.logsnr_timesteps``; default 20), one model call each, the last
    step to x_0 first order (it lands on pred_x0); x_T drawn as every sampler draws it, then no
    noise. The contract of ``sample_ancestral``. shape: (B, C, H, W) -> x_0 of that shape."""
    kept = resolve_timesteps(SamplerType.DPM_SOLVER, diffusion, timesteps=timesteps)
    x = _x_start(shape, x_T, generator, device)
    abar = [float(a) for a in diffusion.alphas_cumprod[kept]]
    last: list[tuple[torch.Tensor, float]] = []  # the previous step's (pred_x0, lambda step)

    def step(i: int, x_t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # 1. the data prediction at k_i (the model's pred_x0, clipped when clip_denoised)
        p = diffusion.p_mean_variance(model, x_t, t_batch(kept[i], x_t), clip_denoised, check=False)
        x0_t = p["pred_x0"]
        if i == 0:  # 2. to x_0 (lambda = +inf): the first-order step lands on the data prediction
            return x0_t, x0_t
        # 3. the 2M update to k_{i-1} through the previous data prediction (first order at the start)
        x0_prev, h_prev = last[0] if last else (None, None)
        x_s = dpm_solver_2m_update(x_t, x0_t, x0_prev, abar_t=abar[i], abar_s=abar[i - 1], h_prev=h_prev)
        last[:] = [(x0_t, half_log_snr(abar[i - 1]) - half_log_snr(abar[i]))]
        return x_s, x0_t

    return _run(step, x, kept, callback, progress, "dpm-solver++")


# ---------------------------------------------------------------------------------- the registry
def resolve_timesteps(sampler: SamplerType | str, diffusion: GaussianDiffusion, *, steps: int | None = None,
                      timesteps: Timesteps = None) -> list[int]:
    """The one check of what a sampler runs on: a count ``steps`` or any ``timesteps`` spec (not
    both; neither: all T, or DPM-Solver's 20), as the kept list. A count means evenly strided
    timesteps, logSNR-uniform ones for DPM-Solver (its own choice); the ddpm samplers need two."""
    sampler = parse_enum(SamplerType, sampler, "sampler")
    T = diffusion.num_timesteps
    if steps is not None and timesteps is not None:
        raise ValueError("give steps (a count) or timesteps, not both")
    if steps is not None:
        timesteps = check_steps(T, steps, low=sampler.min_steps, hint=f"for the {sampler.value} sampler")
    if sampler is SamplerType.DPM_SOLVER and (timesteps is None or isinstance(timesteps, int)):
        return logsnr_timesteps(diffusion.alphas_cumprod, min(20, T - 1) if timesteps is None else timesteps)
    kept = diffusion_timesteps(diffusion, timesteps)
    if len(kept) < sampler.min_steps:
        raise ValueError(f"the {sampler.value} sampler needs at least {sampler.min_steps} timesteps, "
                         f"got {kept}")
    return kept



SAMPLERS: dict[SamplerType, Callable[..., torch.Tensor]] = {
    SamplerType.DDPM: sample_ancestral,
    SamplerType.DDIM: sample_ddim,
    SamplerType.ANALYTIC_DDPM: sample_analytic_ddpm,
    SamplerType.ANALYTIC_DDIM: sample_analytic_ddim,
    SamplerType.DPM_SOLVER: sample_dpm_solver,
}


def sample(
    model: Model,
    diffusion: GaussianDiffusion,
    shape: Sequence[int],
    *,
    sampler: SamplerType | str = SamplerType.DDPM,
    steps: int | None = None,
    timesteps: Timesteps = None,
    eta: float = 0.0,
    gamma: Any = None,
    generator: Generators = None,
    clip_denoised: bool = True,
    device: torch.device | str | None = None,
    progress: bool = False,
    callback: Callback | None = None,
) -> torch.Tensor:
    """The sampler ``SAMPLERS[sampler]`` ("ddpm": ``sample_ancestral``, respaced on fewer
    timesteps; "ddim": ``sample_ddim``; the analytic and DPM-Solver samplers; ``eta`` goes to those
    whose ``SamplerType.takes_eta``, ``gamma`` to those whose ``needs_gamma``) with the sampler contract.
    ``steps`` is a count (``timesteps`` takes every form of ``parse_timesteps``; give one of the
    two). shape: (B, C, H, W) -> x_0 (B, C, H, W)."""
    sampler = parse_enum(SamplerType, sampler, "sampler")
    kept = resolve_timesteps(sampler, diffusion, steps=steps, timesteps=timesteps)
    run = SAMPLERS[sampler]
    if sampler.takes_eta:
        run = functools.partial(run, eta=eta)
    if sampler.needs_gamma:
        if gamma is None:
            raise ValueError(f"the {sampler.value} sampler needs gamma, Analytic-DPM's Gamma_t of the model "
                             "(ddpmkit.analytic.estimate_gamma)")
        run = functools.partial(run, gamma=gamma)
    return run(model, diffusion, shape, timesteps=kept, generator=generator, clip_denoised=clip_denoised,
               device=device, progress=progress, callback=callback)
