"""Gaussian KL divergence, the standard normal CDF, and the discretized Gaussian decoder (eq. 13).

All functions are elementwise and broadcast their tensor arguments; results are in nats.
"""

from __future__ import annotations

import math
from enum import Enum

import torch

from ddpmkit.enums import parse_enum

__all__ = [
    "CDFType",
    "approx_standard_normal_cdf",
    "discretized_gaussian_log_likelihood",
    "log_standard_normal_cdf_difference",
    "normal_kl",
    "standard_normal_cdf",
]

# Half the width of one of the 256 bins of [-1, 1]: data x in {-1, -1 + 2/255, ..., 1}.
HALF_BIN = 1.0 / 255.0
# The edges of the first and last bins extend to -inf / +inf (eq. 13): |x| > EDGE marks them.
EDGE = 0.999


class CDFType(str, Enum):
    """How the decoder evaluates Phi: exactly (default) or with the released code's tanh formula."""

    EXACT = "exact"
    TANH = "tanh"


def normal_kl(
    mean1: torch.Tensor, logvar1: torch.Tensor, mean2: torch.Tensor, logvar2: torch.Tensor
) -> torch.Tensor:
    """KL( N(mean1, exp(logvar1)) || N(mean2, exp(logvar2)) ) per element, in nats.

    = 0.5 * (logvar2 - logvar1 + exp(logvar1 - logvar2) + (mean1 - mean2)^2 exp(-logvar2) - 1).
    Arguments broadcast against each other; any of them may be a tensor of any shape.
    """
    return 0.5 * (
        -1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2)
    )


def standard_normal_cdf(x: torch.Tensor) -> torch.Tensor:
    """Phi(x), accurate to a few ulp in both tails (``torch.special.ndtr`` loses the lower tail)."""
    return torch.exp(torch.special.log_ndtr(x))


def approx_standard_normal_cdf(x: torch.Tensor) -> torch.Tensor:
    """The released code's approximation: Phi(x) ~ 0.5 (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))."""
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x.pow(3))))


def _log1mexp(a: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(a)) for a <= 0, accurate everywhere (Maechler 2012)."""
    near_zero = a > -math.log(2.0)
    # Each branch sees only the inputs it is evaluated at, so neither yields inf/nan gradients.
    a_near = torch.where(near_zero, a, torch.full_like(a, -1.0))
    a_far = torch.where(near_zero, torch.full_like(a, -1.0), a)
    return torch.where(near_zero, torch.log(-torch.expm1(a_near)), torch.log1p(-torch.exp(a_far)))


def log_standard_normal_cdf_difference(lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """log(Phi(hi) - Phi(lo)) for lo < hi, computed in log space so that neither tail underflows.

    In the upper tail it uses the symmetry Phi(hi) - Phi(lo) = Phi(-lo) - Phi(-hi).
    """
    upper = (lo + hi) > 0
    a = torch.where(upper, -hi, lo)  # (a, b): the same mass, moved into the lower half-line
    b = torch.where(upper, -lo, hi)
    log_b = torch.special.log_ndtr(b)
    return log_b + _log1mexp(torch.special.log_ndtr(a) - log_b)


def discretized_gaussian_log_likelihood(
    x: torch.Tensor,
    *,
    means: torch.Tensor,
    log_scales: torch.Tensor,
    cdf: CDFType | str = CDFType.EXACT,
) -> torch.Tensor:
    """log p(x) under the discretized Gaussian decoder, eq. (13), per element, in nats.

    x: data in [-1, 1] on the 256-level grid, any shape; means and log_scales (log of the standard
    deviation) broadcast to x. The bin of x is [x - 1/255, x + 1/255], except that the lowest bin
    extends to -inf and the highest to +inf. ``cdf="exact"`` uses Phi in log space (stable);
    ``cdf="tanh"`` reproduces the released code (tanh approximation, probabilities floored at 1e-12).
    Returns a tensor of x's shape.
    """
    cdf = parse_enum(CDFType, cdf, "cdf")
    centered = x - means
    inv_stdv = torch.exp(-log_scales)
    plus_in = inv_stdv * (centered + HALF_BIN)
    min_in = inv_stdv * (centered - HALF_BIN)
    if cdf is CDFType.EXACT:
        log_cdf_plus = torch.special.log_ndtr(plus_in)  # log Phi(upper edge): lowest bin
        log_one_minus_cdf_min = torch.special.log_ndtr(-min_in)  # log (1 - Phi(lower edge)): highest
        # log(Phi(plus_in) - Phi(min_in)) as in log_standard_normal_cdf_difference, reusing the two
        # log-CDFs above as the larger term (three log_ndtr evaluations instead of four)
        upper = (min_in + plus_in) > 0
        log_b = torch.where(upper, log_one_minus_cdf_min, log_cdf_plus)
        log_a = torch.special.log_ndtr(torch.where(upper, -plus_in, min_in))
        log_delta = log_b + _log1mexp(log_a - log_b)
    elif cdf is CDFType.TANH:
        cdf_plus = approx_standard_normal_cdf(plus_in)
        cdf_min = approx_standard_normal_cdf(min_in)
        log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
        log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
        log_delta = torch.log((cdf_plus - cdf_min).clamp(min=1e-12))
    else:
        raise NotImplementedError(cdf)
    return torch.where(x < -EDGE, log_cdf_plus, torch.where(x > EDGE, log_one_minus_cdf_min, log_delta))
