"""Feature statistics, the Frechet distance and the Inception Score, all in float64.

The Frechet distance between N(mu1, S1) and N(mu2, S2) (Heusel et al. 2017, eq. 6; Dowson &
Landau 1982) is

    d^2 = |mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^{1/2}).

``tr((S1 S2)^{1/2})`` is computed without a non-symmetric matrix square root: S1 S2 is similar to
the symmetric PSD matrix M = S1^{1/2} S2 S1^{1/2}, so tr((S1 S2)^{1/2}) = sum_i sqrt(lambda_i(M)).
Both steps are symmetric eigendecompositions in float64, so the result is real by construction
(scipy.linalg.sqrtm of S1 S2 returns small imaginary parts that have to be discarded).

Statistics are accumulated over all features in float64 (``FeatureStats``), so they do not depend
on how the features were batched.
"""

from __future__ import annotations

import math
import statistics

import numpy as np
import torch

from ddpmkit.checks import check_int
from ddpmkit.seeds import Stream, seed_sequence

__all__ = ["FeatureStats", "bootstrap_frechet", "classifier_score", "frechet_distance", "inception_score"]


class FeatureStats:
    """Running mean and covariance of feature vectors in float64.

    ``update(feats)`` takes (B, D) features; ``mean_cov()`` returns mu (D,) and the unbiased
    covariance sigma (D, D) (divisor n - 1, as ``np.cov``). Sums are taken around a shift (the
    first batch's mean) to avoid cancellation in ``E[x x^T] - mu mu^T``.
    """

    def __init__(self, dim: int) -> None:
        self.dim = int(dim)
        self.n = 0
        self._shift: np.ndarray | None = None
        self._sum = np.zeros(self.dim, np.float64)  # (D,)  sum of (x - shift)
        self._outer = np.zeros((self.dim, self.dim), np.float64)  # (D, D)  sum of (x - shift)(x - shift)^T

    def update(self, feats: torch.Tensor | np.ndarray) -> None:
        x = feats.detach().cpu().double().numpy() if isinstance(feats, torch.Tensor) else np.asarray(feats)
        x = x.astype(np.float64, copy=False)
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise ValueError(f"expected features shaped (B, {self.dim}), got {x.shape}")
        if not np.isfinite(x).all():
            raise ValueError("features contain NaN or inf")
        if x.shape[0] == 0:
            return
        if self._shift is None:
            self._shift = x.mean(axis=0)
        d = x - self._shift  # (B, D)
        self._sum += d.sum(axis=0)
        self._outer += d.T @ d
        self.n += x.shape[0]

    def mean_cov(self) -> tuple[np.ndarray, np.ndarray]:
        """mu (D,), sigma (D, D) in float64; needs at least two feature vectors."""
        if self.n < 2:
            raise ValueError(f"need at least 2 images for a covariance, got {self.n}")
        assert self._shift is not None
        mean_d = self._sum / self.n
        cov = (self._outer - self.n * np.outer(mean_d, mean_d)) / (self.n - 1)
        return self._shift + mean_d, (cov + cov.T) / 2.0


def _sqrt_psd(a: np.ndarray) -> np.ndarray:
    """Symmetric square root of a symmetric PSD matrix (negative eigenvalues from round-off -> 0)."""
    w, v = np.linalg.eigh((a + a.T) / 2.0)
    return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def _check_stats(mu: np.ndarray, sigma: np.ndarray, name: str) -> tuple[np.ndarray, np.ndarray]:
    mu = np.atleast_1d(np.asarray(mu, np.float64))
    sigma = np.atleast_2d(np.asarray(sigma, np.float64))
    if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
        raise ValueError(f"{name}: expected mu (D,) and sigma (D, D), got {mu.shape} and {sigma.shape}")
    if not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
        raise ValueError(f"{name}: statistics contain NaN or inf")
    return mu, sigma


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """d^2(N(mu1, sigma1), N(mu2, sigma2)) (Heusel et al. 2017, eq. 6), in float64.

    mu: (D,); sigma: (D, D) symmetric PSD. The two sets must have the same dimension D.
    """
    mu1, sigma1 = _check_stats(mu1, sigma1, "first statistics")
    mu2, sigma2 = _check_stats(mu2, sigma2, "second statistics")
    if mu1.shape != mu2.shape:
        raise ValueError(f"feature dimensions differ: {mu1.shape[0]} vs {mu2.shape[0]}")
    root1 = _sqrt_psd(sigma1)
    m = root1 @ sigma2 @ root1  # (D, D) symmetric PSD, similar to sigma1 @ sigma2
    tr_covmean = float(np.sqrt(np.clip(np.linalg.eigvalsh((m + m.T) / 2.0), 0.0, None)).sum())
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * tr_covmean)


def bootstrap_frechet(feats: np.ndarray, ref_mu: np.ndarray, ref_sigma: np.ndarray, *, resamples: int,
                      seed: int = 0, level: float = 0.95) -> tuple[float, float]:
    """A bootstrap interval of the Frechet distance over the samples: ``resamples`` draws of N
    features with replacement from feats (N, D), each against the fixed reference (mu (D,), sigma
    (D, D)); the distance of feats +- z sd, z the normal quantile of ``level`` and sd that of the
    resampled distances. Not their percentiles: resampling with duplicates shrinks the covariance
    and adds to the distance's small-sample bias, which would shift the interval off the estimate.
    Seeded by ``seed``."""
    feats = np.asarray(feats, np.float64)
    if feats.ndim != 2 or feats.shape[0] < 2:
        raise ValueError(f"feats must be (N, D) with N >= 2, got {feats.shape}")
    check_int(resamples, "resamples", low=2)
    rng = np.random.default_rng(seed_sequence(seed, Stream.BOOTSTRAP))
    n = feats.shape[0]
    fds = []
    for _ in range(resamples):
        x = feats[rng.integers(0, n, n)]
        fds.append(frechet_distance(x.mean(0), np.cov(x, rowvar=False), ref_mu, ref_sigma))
    own = frechet_distance(feats.mean(0), np.cov(feats, rowvar=False), ref_mu, ref_sigma)
    z = statistics.NormalDist().inv_cdf((1.0 + level) / 2.0)
    sd = float(np.std(fds, ddof=1))
    return own - z * sd, own + z * sd


def _log_softmax64(logits: torch.Tensor | np.ndarray) -> torch.Tensor:
    x = torch.as_tensor(np.asarray(logits) if not isinstance(logits, torch.Tensor) else logits)
    x = x.detach().cpu().double()
    if x.ndim != 2 or x.shape[0] == 0:
        raise ValueError(f"expected logits shaped (N, K) with N >= 1, got {tuple(x.shape)}")
    return torch.log_softmax(x, dim=1)  # (N, K)


def classifier_score(logits: torch.Tensor | np.ndarray) -> float:
    """exp(E_x KL(p(y|x) || p(y))) with p(y) = E_x p(y|x), over all N examples (no splits).

    logits: (N, K). Between 1 (one class, or no confidence) and K (confident and balanced).
    """
    logp = _log_softmax64(logits)  # (N, K)
    log_py = torch.logsumexp(logp, dim=0) - math.log(logp.shape[0])  # (K,) log of the marginal
    kl = (logp.exp() * (logp - log_py)).sum(dim=1)  # (N,)
    return float(torch.exp(kl.mean()))


def inception_score(logits: torch.Tensor | np.ndarray, splits: int = 10, *,
                    shuffle_seed: int | None = None) -> tuple[float, float]:
    """Inception Score (Salimans et al. 2016): mean and std of ``classifier_score`` over ``splits``
    consecutive parts, part i = examples [i N // splits, (i + 1) N // splits) (the original code).

    torch-fidelity's default shuffles the examples first; ``shuffle_seed`` does the same, with its
    permutation ``np.random.RandomState(seed).permutation(N)`` (its default seed is 2020), so
    ``shuffle_seed=2020`` matches ``torch_fidelity.calculate_metrics(isc=True)`` and None (the
    default) matches it with ``samples_shuffle=False`` and the original code.

    logits: (N, K), N >= splits. Returns (mean, std) with the population std (numpy's default).
    """
    logp = _log_softmax64(logits)
    n = logp.shape[0]
    check_int(splits, "splits", low=1)
    if n < splits:
        raise ValueError(f"the Inception Score needs at least {splits} images ({splits} splits), got {n}")
    if shuffle_seed is not None:
        logp = logp[torch.from_numpy(np.random.RandomState(shuffle_seed).permutation(n))]
    scores = [classifier_score(logp[i * n // splits:(i + 1) * n // splits]) for i in range(splits)]
    return float(np.mean(scores)), float(np.std(scores))
