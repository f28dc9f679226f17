"""GaussianDiffusion: DDPM's forward process, reverse parameterizations, losses and the bound.

The Gaussian diffusion of Ho, Jain, Abbeel 2020, with the variational bound in bits/dim.

Equation numbers are the paper's (arXiv:2006.11239). Timesteps are 0-based: index t holds the
paper's t + 1. Shapes: x0, x_t: (B, C, H, W) (any (B, C, ...) works); t: (B,) int64 in [0, T).
The model is any callable ``model(x_t, t) -> Tensor`` of shape (B, C_out, H, W), with
C_out = ``model_output_channels(C)``. Derivations: docs/math.md.

One public API: each public method validates its arguments and then computes. Its keyword
``check=False`` is for a caller that has validated them once already (the samplers, the bound loop,
the trainer, the methods here calling each other): it skips every check, the range check of t
included, which reads t back (a device sync per call on a GPU). The model's output is always checked.
"""

from __future__ import annotations

import copy as _copy
import math
from collections.abc import Callable
from dataclasses import dataclass, fields
from enum import Enum
from typing import Any

import torch

from ddpmkit.checks import check_int
from ddpmkit.distributions import CDFType, discretized_gaussian_log_likelihood, normal_kl
from ddpmkit.enums import parse_enum, unknown_choice
from ddpmkit.schedules import BETA_SCHEDULES, get_named_beta_schedule
from ddpmkit.seeds import draw_standard_normal

__all__ = [
    "DiffusionConfig",
    "GaussianDiffusion",
    "LossType",
    "MeanType",
    "VarType",
    "check_same_shape",
    "check_tensor",
    "mean_flat",
]

VARIANCE_FLOOR = 1e-20  # the smallest sigma^2 whose log a fixed variance takes

Model = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class MeanType(str, Enum):
    """What the network predicts: the noise eps (eq. 11-12), x_0, or the mean of x_{t-1}."""

    EPS = "eps"
    X0 = "x0"
    X_PREV = "x_prev"


class VarType(str, Enum):
    """The reverse-process variance Sigma_theta(x_t, t) = sigma_t^2 I (Sec. 3.2)."""

    FIXED_LARGE = "fixedlarge"  # sigma_t^2 = beta_t (first log-variance from beta-tilde_2)
    FIXED_SMALL = "fixedsmall"  # sigma_t^2 = beta-tilde_t, eq. (7), log clipped at t = 1
    LEARNED = "learned"  # the network outputs log sigma_t^2 directly
    LEARNED_RANGE = "learned_range"  # v in [-1, 1] interpolates log beta-tilde_t .. log beta_t

    @property
    def is_learned(self) -> bool:
        """The network outputs the variance too (2 * C channels)."""
        return self in (VarType.LEARNED, VarType.LEARNED_RANGE)


class LossType(str, Enum):
    """The training objective."""

    MSE = "mse"  # L_simple, eq. (14) (targets eps, x_0 or mu-tilde depending on the mean type)
    KL = "kl"  # the true bound: L_{t-1} (eq. 5) in bits/dim at the sampled t
    RESCALED_KL = "rescaled_kl"  # T * L_{t-1}: an unbiased one-sample estimate of sum_t L_t
    HYBRID = "hybrid"  # L_simple + lambda * T * L_{t-1} with stop-gradient on the mean

    @property
    def is_vb(self) -> bool:
        """The objective is the bound term alone (improved-diffusion's ``LossType.is_vb``)."""
        return self in (LossType.KL, LossType.RESCALED_KL)




def check_tensor(x: Any, name: str, *, min_ndim: int = 1) -> None:
    """A ValueError unless x is a floating-point tensor of shape (B, C, ...) with >= min_ndim dims."""
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got dtype {x.dtype}")
    if x.ndim < min_ndim:
        raise ValueError(f"{name} must have shape (B, C, ...) with >= {min_ndim} dims, got {tuple(x.shape)}")


def check_same_shape(y: Any, x: torch.Tensor, name: str, x_name: str) -> None:
    """A ValueError unless y is a floating-point tensor of x's shape."""
    check_tensor(y, name)
    if y.shape != x.shape:
        raise ValueError(f"{name} must have the shape of {x_name} {tuple(x.shape)}, got {tuple(y.shape)}")


def mean_flat(x: torch.Tensor) -> torch.Tensor:
    """Mean over every dimension but the first: (B, ...) -> (B,)."""
    return x.mean(dim=tuple(range(1, x.ndim)))


# T above this is refused before any schedule is built: the diffusion keeps about _COEFF_TABLES
# float64 tables of T entries (1000x the paper's T is 0.1 GiB; 10^9 steps would be 119 GiB).
MAX_NUM_TIMESTEPS = 1_000_000
_COEFF_TABLES = 16


@dataclass(frozen=True, kw_only=True)
class DiffusionConfig:
    """JSON-able description of a GaussianDiffusion (what a model folder or a run stores)."""

    schedule: str = "linear"
    num_timesteps: int = 1000
    beta_start: float = 1e-4
    beta_end: float = 0.02
    mean_type: MeanType = MeanType.EPS
    var_type: VarType = VarType.FIXED_LARGE
    loss_type: LossType = LossType.MSE
    hybrid_lambda: float = 0.001
    decoder_cdf: CDFType = CDFType.EXACT

    def __post_init__(self) -> None:
        if self.schedule not in BETA_SCHEDULES:
            raise unknown_choice("beta schedule", self.schedule, sorted(BETA_SCHEDULES))
        t = self.num_timesteps
        check_int(t, "num_timesteps", low=2)
        if t > MAX_NUM_TIMESTEPS:  # checked before betas() below allocates T float64 values
            raise ValueError(
                f"num_timesteps={t:,} needs at least ~{_COEFF_TABLES * 8 * t / 2**30:,.1f} GiB of float64 "
                f"coefficient tables; the limit is {MAX_NUM_TIMESTEPS:,} steps (the paper uses 1000)"
            )
        for name, cls in (
            ("mean_type", MeanType),
            ("var_type", VarType),
            ("loss_type", LossType),
            ("decoder_cdf", CDFType),
        ):
            object.__setattr__(self, name, parse_enum(cls, getattr(self, name), name))
        if not self.hybrid_lambda >= 0:
            raise ValueError(f"hybrid_lambda must be >= 0, got {self.hybrid_lambda!r}")
        self.betas()  # validates beta_start / beta_end now rather than at build()

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON types: enums become their string values."""
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        return {k: v.value if isinstance(v, Enum) else v for k, v in d.items()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DiffusionConfig:
        """Inverse of ``to_dict``; missing keys take the defaults, unknown keys raise ValueError."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown diffusion config keys {unknown}; expected a subset of {sorted(known)}")
        return cls(**d)

    def betas(self) -> torch.Tensor:
        """The schedule: (T,) float64."""
        return get_named_beta_schedule(
            self.schedule, self.num_timesteps, beta_start=self.beta_start, beta_end=self.beta_end
        )

    def build(self) -> GaussianDiffusion:
        return GaussianDiffusion(
            betas=self.betas(),
            mean_type=self.mean_type,
            var_type=self.var_type,
            loss_type=self.loss_type,
            hybrid_lambda=self.hybrid_lambda,
            decoder_cdf=self.decoder_cdf,
        )


class GaussianDiffusion:
    """Forward process q, reverse process p_theta, losses and bound for a fixed beta schedule.

    Not an ``nn.Module``: it holds (T,) float64 coefficient tensors on the CPU (the attributes
    below) and takes the model as an argument. When a batch extracts a coefficient it is cast to
    the batch's dtype and device (cached per dtype/device).

    Attributes, all (T,) float64, index t = paper's t + 1:
      betas, alphas, alphas_cumprod (abar_t), alphas_cumprod_prev (abar_{t-1}, 1 at t = 0),
      alphas_cumprod_next, one_minus_alphas_cumprod, sqrt_alphas_cumprod, sqrt_one_minus_alphas_cumprod,
      log_one_minus_alphas_cumprod, sqrt_recip_alphas_cumprod, sqrt_recipm1_alphas_cumprod,
      posterior_variance (beta-tilde_t, eq. 7), posterior_log_variance_clipped,
      posterior_mean_coef1, posterior_mean_coef2 (eq. 7), log_betas,
      model_variance_fixed / model_log_variance_fixed (for the fixed variance types).
    """

    def __init__(
        self,
        *,
        betas: torch.Tensor | Any,
        mean_type: MeanType | str = MeanType.EPS,
        var_type: VarType | str = VarType.FIXED_LARGE,
        loss_type: LossType | str = LossType.MSE,
        hybrid_lambda: float = 0.001,
        decoder_cdf: CDFType | str = CDFType.EXACT,
    ) -> None:
        self.mean_type = parse_enum(MeanType, mean_type, "mean_type")
        self.var_type = parse_enum(VarType, var_type, "var_type")
        self.loss_type = parse_enum(LossType, loss_type, "loss_type")
        self.decoder_cdf = parse_enum(CDFType, decoder_cdf, "decoder_cdf")
        if not hybrid_lambda >= 0:
            raise ValueError(f"hybrid_lambda must be >= 0, got {hybrid_lambda!r}")
        self.hybrid_lambda = float(hybrid_lambda)
        betas = torch.as_tensor(betas).detach().to(device="cpu", dtype=torch.float64)
        if betas.ndim != 1 or betas.shape[0] < 2:
            raise ValueError(f"betas must be a 1-D sequence of length T >= 2, got shape {tuple(betas.shape)}")
        if not bool(((betas > 0) & (betas <= 1)).all()):
            raise ValueError("betas must lie in (0, 1]")
        self.num_timesteps = int(betas.shape[0])
        self._cache: dict[tuple[str, torch.device, torch.dtype], torch.Tensor] = {}
        self._set_coefficients(betas)

    def _set_coefficients(self, betas: torch.Tensor) -> None:
        one = betas.new_ones(1)
        self.betas = betas
        self.log_betas = torch.log(betas)
        self.alphas = 1.0 - betas
        self.alphas_cumprod = torch.cumprod(self.alphas, dim=0)  # abar_t, eq. (4)
        self.alphas_cumprod_prev = torch.cat([one, self.alphas_cumprod[:-1]])
        self.alphas_cumprod_next = torch.cat([self.alphas_cumprod[1:], 0.0 * one])
        self.sqrt_alphas_cumprod = torch.sqrt(self.alphas_cumprod)
        self.one_minus_alphas_cumprod = 1.0 - self.alphas_cumprod  # float64: no cancellation at small t
        self.sqrt_one_minus_alphas_cumprod = torch.sqrt(self.one_minus_alphas_cumprod)
        self.log_one_minus_alphas_cumprod = torch.log(1.0 - self.alphas_cumprod)
        self.sqrt_recip_alphas_cumprod = torch.sqrt(1.0 / self.alphas_cumprod)
        self.sqrt_recipm1_alphas_cumprod = torch.sqrt(1.0 / self.alphas_cumprod - 1.0)
        # q(x_{t-1} | x_t, x_0) = N(coef1 x_0 + coef2 x_t, beta-tilde_t), eq. (6)-(7)
        self.posterior_variance = betas * (1.0 - self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        # beta-tilde_1 = 0: the log is clipped to log beta-tilde_2 (authors' code)
        pv_clipped = torch.cat([self.posterior_variance[1:2], self.posterior_variance[1:]])
        self.posterior_log_variance_clipped = torch.log(pv_clipped)
        self.posterior_mean_coef1 = betas * torch.sqrt(self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        self.posterior_mean_coef2 = (
            (1.0 - self.alphas_cumprod_prev) * torch.sqrt(self.alphas) / (1.0 - self.alphas_cumprod)
        )
        if self.var_type is VarType.FIXED_LARGE:
            # sigma_t^2 = beta_t, except sigma_1^2 = beta-tilde_2 (better decoder likelihood)
            var = torch.cat([self.posterior_variance[1:2], betas[1:]])
            self.model_variance_fixed, self.model_log_variance_fixed = var, torch.log(var)
        elif self.var_type is VarType.FIXED_SMALL:
            self.model_variance_fixed = self.posterior_variance
            self.model_log_variance_fixed = self.posterior_log_variance_clipped
        elif self.var_type.is_learned:
            self.model_variance_fixed = self.model_log_variance_fixed = None
        else:
            raise NotImplementedError(self.var_type)

    def with_fixed_variance(self, variance: torch.Tensor) -> GaussianDiffusion:
        """A copy whose reverse variance sigma_t^2 is ``variance`` ((T,) float64, >= 0) in place of
        beta_t or beta-tilde_t: what Analytic-DPM's optimal variance is (``ddpmkit.analytic``). The
        log is floored at VARIANCE_FLOOR, so a zero variance stays finite in the decoder."""
        if self.var_type.is_learned:
            raise ValueError(
                f"var_type {self.var_type.value!r}: the network gives the variance; only a model with a "
                "fixed variance (fixedlarge, fixedsmall) can take another fixed one"
            )
        var = torch.as_tensor(variance, dtype=torch.float64)
        if var.shape != (self.num_timesteps,) or not bool(torch.isfinite(var).all()) or bool((var < 0).any()):
            raise ValueError(
                f"variance must be ({self.num_timesteps},) finite and >= 0, got shape {tuple(var.shape)}"
            )
        copy = _copy.copy(self)
        copy._cache = {}
        copy.model_variance_fixed = var
        copy.model_log_variance_fixed = torch.log(var.clamp_min(VARIANCE_FLOOR))
        return copy

    def __repr__(self) -> str:
        return (
            f"GaussianDiffusion(T={self.num_timesteps}, mean_type={self.mean_type.value}, "
            f"var_type={self.var_type.value}, loss_type={self.loss_type.value})"
        )

    # ------------------------------------------------------------------ extraction and validation
    def _extract(self, name: str, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Coefficient ``name`` at t, cast to x's dtype/device: (B,) -> (B, 1, ..., 1)."""
        key = (name, x.device, x.dtype)
        arr = self._cache.get(key)
        if arr is None:
            arr = getattr(self, name).to(dtype=x.dtype).to(x.device)  # cast on the CPU, then move
            self._cache[key] = arr
        return arr[t.to(x.device)].reshape(t.shape[0], *([1] * (x.ndim - 1)))  # (B, 1, ..., 1)

    def _check_t(self, t: Any, batch: int) -> None:
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"t must be a (B,) int64 torch.Tensor, got {type(t).__name__}")
        if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
            raise ValueError(f"t must be an integer (int64) tensor, got dtype {t.dtype}")
        if t.shape != (batch,):
            raise ValueError(f"t must have shape (B,) = ({batch},), got {tuple(t.shape)}")
        if batch:  # the range check reads t back: a device sync on a GPU
            lo, hi = torch.aminmax(t)
            lo, hi = int(lo), int(hi)
            if lo < 0 or hi >= self.num_timesteps:
                raise ValueError(
                    f"t must lie in [0, {self.num_timesteps - 1}] (0-based timesteps), "
                    f"got values in [{lo}, {hi}]"
                )

    def _check_with_x_t(self, y: Any, name: str, x_t: Any, t: Any) -> None:
        """x_t and t of a batch, and ``y`` (named ``name``) of x_t's shape."""
        self._check_batch(x_t, t, "x_t")
        check_same_shape(y, x_t, name, "x_t")

    def _check_batch(self, x: Any, t: Any, name: str = "x", min_ndim: int = 1) -> None:
        check_tensor(x, name, min_ndim=min_ndim)
        self._check_t(t, x.shape[0])

    def _check_model_output(self, model_output: Any, x_t: torch.Tensor) -> None:
        B, C = x_t.shape[:2]
        expected = (B, self.model_output_channels(C), *x_t.shape[2:])
        if not isinstance(model_output, torch.Tensor) or tuple(model_output.shape) != expected:
            got = tuple(model_output.shape) if isinstance(model_output, torch.Tensor) else type(model_output)
            raise ValueError(
                f"model output must have shape {expected} for var_type {self.var_type.value!r}, got {got}"
            )
        if not model_output.is_floating_point():
            raise ValueError(f"model output must be a floating-point tensor, got dtype {model_output.dtype}")

    # ------------------------------------------------------------------ hooks of a respaced chain
    def _model_t(self, t: torch.Tensor) -> torch.Tensor:
        """The timesteps the model sees for this diffusion's indices t: (B,) -> (B,). Identity here;
        a ``respace.SpacedDiffusion`` maps index i to its kept timestep k_i."""
        return t

    def _model_output(self, model: Model, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """model(x_t, model timesteps of t), shape-checked: (B, C_out, ...)."""
        model_output = model(x_t, self._model_t(t))
        self._check_model_output(model_output, x_t)
        return model_output

    def _x0_from_model_xprev(self, x_t: torch.Tensor, t: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """x_0 implied by an x_prev model's output, the mean of x_{t-1} of the chain it was trained on."""
        return self.predict_x0_from_xprev(x_t, t, out, check=False)

    def _mean_from_model_xprev(
        self, out: torch.Tensor, pred_x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor
    ) -> torch.Tensor:
        """The reverse mean of an x_prev model: its output itself on the chain it was trained on."""
        return out

    def _xprev_target(self, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """What an x_prev model is trained to output at t: mu-tilde_t(x_t, x_0), eq. (7)."""
        return self.q_posterior_mean(x0, x_t, t, check=False)

    # ------------------------------------------------------------------ forward process q
    def q_mean_variance(
        self, x0: torch.Tensor, t: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q(x_t | x_0) = N(sqrt(abar_t) x_0, (1 - abar_t) I), eq. (4).

        x0: (B, ...); t: (B,). Returns (mean, variance, log_variance), each of x0's shape.
        """
        self._check_batch(x0, t, "x0")
        mean = self._extract("sqrt_alphas_cumprod", t, x0) * x0
        variance = self._extract("one_minus_alphas_cumprod", t, x0).expand_as(x0)
        log_variance = self._extract("log_one_minus_alphas_cumprod", t, x0).expand_as(x0)
        return mean, variance, log_variance

    def q_sample(
        self,
        x0: torch.Tensor,
        t: torch.Tensor,
        noise: torch.Tensor | None = None,
        *,
        generator: torch.Generator | None = None,
        check: bool = True,
    ) -> torch.Tensor:
        """x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps, eps ~ N(0, I): a sample of eq. (4).

        x0: (B, ...); t: (B,); noise: x0's shape or None (drawn with ``generator``). Returns x_t.
        """
        if check:
            self._check_batch(x0, t, "x0")
        if noise is None:
            noise = draw_standard_normal(x0.shape, generator, device=x0.device, dtype=x0.dtype)
        elif check:
            check_same_shape(noise, x0, "noise", "x0")
        return (
            self._extract("sqrt_alphas_cumprod", t, x0) * x0
            + self._extract("sqrt_one_minus_alphas_cumprod", t, x0) * noise
        )

    def q_posterior_mean(
        self, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor, *, check: bool = True
    ) -> torch.Tensor:
        """mu-tilde_t(x_t, x_0) = coef1 x_0 + coef2 x_t, eq. (7). x0, x_t: (B, ...); t: (B,)."""
        if check:
            self._check_with_x_t(x0, "x0", x_t, t)
        coef1 = self._extract("posterior_mean_coef1", t, x_t)
        coef2 = self._extract("posterior_mean_coef2", t, x_t)
        return coef1 * x0 + coef2 * x_t

    def q_posterior_mean_variance(
        self, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q(x_{t-1} | x_t, x_0) = N(mu-tilde_t(x_t, x_0), beta-tilde_t I), eq. (6)-(7).

        x0, x_t: (B, ...); t: (B,). Returns (mean, variance, log_variance_clipped), each of x_t's shape.
        """
        mean = self.q_posterior_mean(x0, x_t, t)
        variance = self._extract("posterior_variance", t, x_t).expand_as(x_t)
        log_variance = self._extract("posterior_log_variance_clipped", t, x_t).expand_as(x_t)
        return mean, variance, log_variance

    # ------------------------------------------------------------------ reparameterizations
    def predict_x0_from_eps(
        self, x_t: torch.Tensor, t: torch.Tensor, eps: torch.Tensor, *, check: bool = True
    ) -> torch.Tensor:
        """x_0 = (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t), eq. (4) solved for x_0 (used in eq. 15)."""
        if check:
            self._check_with_x_t(eps, "eps", x_t, t)
        return (
            self._extract("sqrt_recip_alphas_cumprod", t, x_t) * x_t
            - self._extract("sqrt_recipm1_alphas_cumprod", t, x_t) * eps
        )

    def predict_eps_from_x0(
        self, x_t: torch.Tensor, t: torch.Tensor, x0: torch.Tensor, *, check: bool = True
    ) -> torch.Tensor:
        """eps = (x_t - sqrt(abar_t) x_0) / sqrt(1 - abar_t), the inverse of ``predict_x0_from_eps``."""
        if check:
            self._check_with_x_t(x0, "x0", x_t, t)
        return (self._extract("sqrt_recip_alphas_cumprod", t, x_t) * x_t - x0) / self._extract(
            "sqrt_recipm1_alphas_cumprod", t, x_t
        )

    def predict_x0_from_xprev(
        self, x_t: torch.Tensor, t: torch.Tensor, x_prev: torch.Tensor, *, check: bool = True
    ) -> torch.Tensor:
        """x_0 from the posterior mean mu-tilde = coef1 x_0 + coef2 x_t (eq. 7) solved for x_0."""
        if check:
            self._check_with_x_t(x_prev, "x_prev", x_t, t)
        return (x_prev - self._extract("posterior_mean_coef2", t, x_t) * x_t) / self._extract(
            "posterior_mean_coef1", t, x_t
        )

    # ------------------------------------------------------------------ reverse process p_theta
    def model_output_channels(self, in_channels: int) -> int:
        """Channels the network must output: 2 C for learned variances (mean part, variance part), else C."""
        if self.var_type.is_learned:
            return 2 * in_channels
        if self.var_type in (VarType.FIXED_LARGE, VarType.FIXED_SMALL):
            return in_channels
        raise NotImplementedError(self.var_type)

    def p_mean_variance(
        self, model: Model, x_t: torch.Tensor, t: torch.Tensor, clip_denoised: bool = True, *,
        check: bool = True,
    ) -> dict[str, torch.Tensor]:
        """p_theta(x_{t-1} | x_t) = N(mu_theta(x_t, t), sigma_t^2 I), eq. (1), (11).

        x_t: (B, C, ...); t: (B,). Returns a dict of tensors of x_t's shape: ``mean``, ``variance``,
        ``log_variance``, ``pred_x0`` (clipped to [-1, 1] when ``clip_denoised``), ``pred_eps``, and
        ``model_output`` (the raw network output, (B, C_out, ...)).
        """
        if check:
            self._check_batch(x_t, t, "x_t", min_ndim=2)
        model_output = self._model_output(model, x_t, t)
        return self.p_mean_variance_from_output(model_output, x_t, t, clip_denoised, check=False)

    def p_mean_variance_from_output(
        self, model_output: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor, clip_denoised: bool = True,
        *, check: bool = True,
    ) -> dict[str, torch.Tensor]:
        """``p_mean_variance`` for a network output already computed: (B, C_out, ...)."""
        if check:
            self._check_batch(x_t, t, "x_t", min_ndim=2)
            self._check_model_output(model_output, x_t)
        out = model_output.to(x_t.dtype)
        mean_out, variance, log_variance = self._split_variance(out, x_t, t)

        def process_x0(x: torch.Tensor) -> torch.Tensor:
            return x.clamp(-1.0, 1.0) if clip_denoised else x

        if self.mean_type is MeanType.X_PREV:
            pred_x0 = process_x0(self._x0_from_model_xprev(x_t, t, mean_out))
            mean = self._mean_from_model_xprev(mean_out, pred_x0, x_t, t)
        elif self.mean_type is MeanType.X0:
            pred_x0 = process_x0(mean_out)
            mean = self.q_posterior_mean(pred_x0, x_t, t, check=False)
        elif self.mean_type is MeanType.EPS:
            pred_x0 = process_x0(self.predict_x0_from_eps(x_t, t, mean_out, check=False))
            mean = self.q_posterior_mean(pred_x0, x_t, t, check=False)  # = eq. (11) when nothing is clipped
        else:
            raise NotImplementedError(self.mean_type)
        if self.mean_type is MeanType.EPS and not clip_denoised:
            pred_eps = mean_out
        else:
            pred_eps = self.predict_eps_from_x0(x_t, t, pred_x0, check=False)
        return {
            "mean": mean,
            "variance": variance,
            "log_variance": log_variance,
            "pred_x0": pred_x0,
            "pred_eps": pred_eps,
            "model_output": model_output,
        }

    def _split_variance(
        self, out: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(mean part (B, C, ...), variance, log_variance), the last two of x_t's shape."""
        C = x_t.shape[1]
        if self.var_type in (VarType.FIXED_LARGE, VarType.FIXED_SMALL):
            variance = self._extract("model_variance_fixed", t, x_t).expand_as(x_t)
            log_variance = self._extract("model_log_variance_fixed", t, x_t).expand_as(x_t)
            return out, variance, log_variance
        mean_out, var_values = torch.split(out, C, dim=1)  # (B, C, ...) each
        if self.var_type is VarType.LEARNED:
            log_variance = var_values
        elif self.var_type is VarType.LEARNED_RANGE:
            min_log = self._extract("posterior_log_variance_clipped", t, x_t)
            max_log = self._extract("log_betas", t, x_t)
            frac = (var_values + 1.0) / 2.0  # v in [-1, 1] -> [0, 1]
            log_variance = frac * max_log + (1.0 - frac) * min_log
        else:
            raise NotImplementedError(self.var_type)
        return mean_out, torch.exp(log_variance), log_variance

    # ------------------------------------------------------------------ the bound, eq. (5)
    def vb_terms_bpd(
        self, p: dict[str, torch.Tensor], x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor, *,
        check: bool = True,
    ) -> torch.Tensor:
        """One term of eq. (5) in bits/dim: L_{t-1} = KL(q(x_{t-1}|x_t,x_0) || p_theta(x_{t-1}|x_t))
        for t > 0 (0-based), and the decoder L_0 = -log p_theta(x_0 | x_1) (eq. 13) at t = 0.

        p: the dict of ``p_mean_variance``; x0, x_t: (B, ...); t: (B,). Returns (B,).
        """
        if check:
            self._check_with_x_t(x0, "x0", x_t, t)
        true_mean = self.q_posterior_mean(x0, x_t, t, check=False)
        true_log_variance = self._extract("posterior_log_variance_clipped", t, x_t)
        kl = normal_kl(true_mean, true_log_variance, p["mean"], p["log_variance"])
        kl = mean_flat(kl) / math.log(2.0)
        # the decoder only where t = 0 (the paper's t = 1): it costs more than the KL, and in a
        # bound loop or a training batch only a few rows need it
        first = (t.to(x_t.device) == 0).nonzero().squeeze(1)  # (n,) row indices
        if first.numel() == 0:
            return kl
        decoder_nll = -discretized_gaussian_log_likelihood(
            x0[first], means=p["mean"][first], log_scales=0.5 * p["log_variance"][first], cdf=self.decoder_cdf
        )
        return kl.index_put((first,), mean_flat(decoder_nll) / math.log(2.0))

    def prior_bpd(self, x0: torch.Tensor) -> torch.Tensor:
        """L_T = KL(q(x_T | x_0) || N(0, I)) in bits/dim, eq. (5). x0: (B, ...) -> (B,)."""
        check_tensor(x0, "x0")
        t = torch.full((x0.shape[0],), self.num_timesteps - 1, dtype=torch.int64, device=x0.device)
        mean = self._extract("sqrt_alphas_cumprod", t, x0) * x0
        log_variance = self._extract("log_one_minus_alphas_cumprod", t, x0)
        zero = torch.zeros((), dtype=x0.dtype, device=x0.device)
        return mean_flat(normal_kl(mean, log_variance, zero, zero)) / math.log(2.0)

    # ------------------------------------------------------------------ the objective (Algorithm 1)
    def training_losses(
        self,
        model: Model,
        x0: torch.Tensor,
        t: torch.Tensor,
        noise: torch.Tensor | None = None,
        *,
        generator: torch.Generator | None = None,
        check: bool = True,
    ) -> dict[str, torch.Tensor]:
        """Per-example losses at the timesteps t (Algorithm 1).

        x0: (B, C, ...) in [-1, 1]; t: (B,); noise: x0's shape or None. Returns a dict of (B,)
        tensors: ``loss`` (the objective), plus ``mse`` (L_simple, eq. 14) for mse/hybrid and ``vb``
        (L_{t-1} in bits/dim) for kl/rescaled_kl/hybrid. The hybrid loss is
        mse + hybrid_lambda * T * vb, with the model mean detached inside vb (Nichol & Dhariwal).
        The trainer passes ``check=False``: it drew t in range and the noise itself, every step.
        """
        if check:
            self._check_batch(x0, t, "x0", min_ndim=2)
        if noise is None:
            noise = draw_standard_normal(x0.shape, generator, device=x0.device, dtype=x0.dtype)
        elif check:
            check_same_shape(noise, x0, "noise", "x0")
        x_t = self.q_sample(x0, t, noise, check=False)
        terms: dict[str, torch.Tensor] = {}
        if self.loss_type.is_vb:
            terms["vb"] = self._vb_term(self._model_output(model, x_t, t), x0, x_t, t)
            scale = self.num_timesteps if self.loss_type is LossType.RESCALED_KL else 1.0
            terms["loss"] = terms["vb"] * scale
            return terms
        if self.loss_type not in (LossType.MSE, LossType.HYBRID):
            raise NotImplementedError(self.loss_type)
        if self.loss_type is LossType.MSE and self.var_type.is_learned:
            raise ValueError(
                f"loss_type 'mse' trains no variance, but var_type is {self.var_type.value!r}; "
                "expected loss_type 'hybrid', 'kl' or 'rescaled_kl' (or a fixed var_type)"
            )
        model_output = self._model_output(model, x_t, t)
        terms["mse"] = self._simple_term(model_output, x0, x_t, t, noise)
        terms["loss"] = terms["mse"]
        if self.loss_type is LossType.HYBRID:
            # stop-gradient on the mean: the bound term trains only the variance
            C = x0.shape[1]
            frozen = torch.cat([model_output[:, :C].detach(), model_output[:, C:]], dim=1)
            terms["vb"] = self._vb_term(frozen, x0, x_t, t)
            terms["loss"] = terms["mse"] + self.hybrid_lambda * self.num_timesteps * terms["vb"]
        return terms

    def _simple_term(
        self, model_output: torch.Tensor, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor,
        noise: torch.Tensor,
    ) -> torch.Tensor:
        """L_simple, eq. (14): ||target - model||^2 per example (B,); the target is eps, x_0 or
        mu-tilde_t(x_t, x_0) by the mean type."""
        mean_out = model_output[:, :x0.shape[1]].to(x0.dtype)
        if self.mean_type is MeanType.EPS:
            target = noise
        elif self.mean_type is MeanType.X0:
            target = x0
        elif self.mean_type is MeanType.X_PREV:
            target = self._xprev_target(x0, x_t, t)
        else:
            raise NotImplementedError(self.mean_type)
        return mean_flat((target - mean_out) ** 2)

    def _vb_term(
        self, model_output: torch.Tensor, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor
    ) -> torch.Tensor:
        """L_{t-1} of eq. (5) in bits/dim (B,) for a network output, x_0 unclipped."""
        p = self.p_mean_variance_from_output(model_output, x_t, t, clip_denoised=False, check=False)
        return self.vb_terms_bpd(p, x0, x_t, t, check=False)

    # ------------------------------------------------------------------ the whole bound
    @torch.no_grad()
    def calc_bpd_loop(
        self,
        model: Model,
        x0: torch.Tensor,
        *,
        clip_denoised: bool = True,
        t_chunk: int | None = None,
        progress: bool = False,
        generator: torch.Generator | None = None,
    ) -> dict[str, torch.Tensor]:
        """Every term of the bound, eq. (5), in bits/dim, for each example of x0.

        x0: (B, C, ...) data in [-1, 1]. ``t_chunk`` timesteps go through the model in one call
        (the batch is repeated t_chunk times; default 1); the noise is drawn per timestep in order
        t = 0, 1, ..., so the result does not depend on t_chunk. Returns a dict:
          total_bpd (B,) = prior_bpd + vb.sum(1); prior_bpd (B,) = L_T;
          vb (B, T): column 0 the decoder L_0, column t the KL L_t;
          x0_mse (B, T): mean_flat((pred_x0 - x0)^2); mse (B, T): mean_flat((pred_eps - eps)^2).
        """
        from ddpmkit.logs import progress_bar

        check_tensor(x0, "x0", min_ndim=2)
        if x0.numel() and not bool((x0.abs() <= 1.0 + 1e-5).all()):
            raise ValueError("x0 must be data scaled to [-1, 1] (the decoder, eq. 13, bins 256 levels there)")
        if t_chunk is None:
            t_chunk = 1
        check_int(t_chunk, "t_chunk", low=1)
        T = self.num_timesteps
        terms: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        with progress_bar(total=T, disable=not progress, desc="bits/dim", unit="t") as bar:
            for start in range(0, T, t_chunk):
                k = min(t_chunk, T - start)
                terms.append(self._bound_terms(model, x0, start, k, clip_denoised, generator))
                bar.update(k)
        vb, x0_mse, mse = (torch.cat(column).T for column in zip(*terms, strict=True))  # (B, T) each
        prior = self.prior_bpd(x0)
        return {"total_bpd": vb.sum(dim=1) + prior, "prior_bpd": prior, "vb": vb, "x0_mse": x0_mse,
                "mse": mse}

    def _bound_terms(
        self, model: Model, x0: torch.Tensor, start: int, k: int, clip_denoised: bool,
        generator: torch.Generator | None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(L_t, x0 error, eps error) at t = start .. start + k - 1 in one model call: (k, B) each."""
        B = x0.shape[0]
        t = torch.arange(start, start + k, device=x0.device).repeat_interleave(B)  # (kB,)
        x0_k = x0.repeat(k, *([1] * (x0.ndim - 1)))  # (kB, C, ...), timestep-major
        noise = torch.cat(
            [draw_standard_normal(x0.shape, generator, device=x0.device, dtype=x0.dtype) for _ in range(k)]
        )  # (kB, C, ...)
        x_t = self.q_sample(x0_k, t, noise, check=False)
        p = self.p_mean_variance(model, x_t, t, clip_denoised, check=False)
        vb = self.vb_terms_bpd(p, x0_k, x_t, t, check=False).view(k, B)
        x0_mse = mean_flat((p["pred_x0"] - x0_k) ** 2).view(k, B)
        mse = mean_flat((p["pred_eps"] - noise) ** 2).view(k, B)
        return vb, x0_mse, mse
