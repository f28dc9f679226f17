"""The Frechet distance and the Inception Score against closed forms and scipy."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.linalg
import torch

from ddpmkit.evaluate.frechet import (
    FeatureStats,
    bootstrap_frechet,
    classifier_score,
    frechet_distance,
    inception_score,
)


def _scipy_frechet(mu1, s1, mu2, s2) -> float:
    """The textbook formula with scipy's non-symmetric sqrtm (real part kept)."""
    covmean = scipy.linalg.sqrtm(s1 @ s2)
    covmean = np.real(covmean)
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def _random_spd(rng: np.random.Generator, d: int) -> np.ndarray:
    a = rng.standard_normal((d, d + 3))
    return a @ a.T / d + 0.05 * np.eye(d)


def test_frechet_closed_form_diagonal():
    # commuting (diagonal) covariances: tr((S1 S2)^1/2) = sum sqrt(a_i b_i), so
    # d^2 = |mu1 - mu2|^2 + sum (sqrt(a_i) - sqrt(b_i))^2
    mu1, mu2 = np.array([0.0, 1.0, -2.0, 3.0]), np.array([1.0, 1.0, 0.0, 0.5])
    a, b = np.array([1.0, 4.0, 9.0, 0.25]), np.array([4.0, 1.0, 9.0, 1.0])
    expected = 1.0 + 0.0 + 4.0 + 6.25 + (1.0 + 1.0 + 0.0 + 0.25)  # = 13.5
    assert frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(13.5, abs=1e-12)
    assert expected == 13.5


def test_frechet_closed_form_rotated_commuting():
    # S1 = Q diag(a) Q^T, S2 = Q diag(b) Q^T commute; the closed form holds in any rotated basis
    rng = np.random.default_rng(0)
    q, _ = np.linalg.qr(rng.standard_normal((6, 6)))
    a, b = rng.uniform(0.1, 3.0, 6), rng.uniform(0.1, 3.0, 6)
    mu1, mu2 = rng.standard_normal(6), rng.standard_normal(6)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    got = frechet_distance(mu1, q @ np.diag(a) @ q.T, mu2, q @ np.diag(b) @ q.T)
    assert got == pytest.approx(expected, rel=1e-10)


def test_frechet_matches_scipy_sqrtm_general_case():
    rng = np.random.default_rng(1)
    for d in (3, 16, 64):
        s1, s2 = _random_spd(rng, d), _random_spd(rng, d)
        mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
        assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(_scipy_frechet(mu1, s1, mu2, s2), rel=1e-9)


def test_frechet_identical_and_singular_covariances():
    rng = np.random.default_rng(2)
    x = rng.standard_normal((5, 20))  # 5 samples in 20 dims: a rank-4 covariance
    mu, s = x.mean(0), np.cov(x, rowvar=False)
    # the 16 zero eigenvalues come out as +-1e-16 and their square roots as ~1e-8 each
    assert abs(frechet_distance(mu, s, mu, s)) < 1e-6
    assert frechet_distance(mu, s, mu + 1.0, s) == pytest.approx(20.0, abs=1e-6)


def test_frechet_rejects_bad_statistics():
    with pytest.raises(ValueError, match="feature dimensions differ"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))
    with pytest.raises(ValueError, match="NaN or inf"):
        frechet_distance(np.full(2, np.nan), np.eye(2), np.zeros(2), np.eye(2))


def test_feature_stats_match_numpy_and_do_not_depend_on_batching():
    rng = np.random.default_rng(3)
    feats = (rng.standard_normal((1000, 8)) * 3 + 100).astype(np.float32)  # a large offset
    ref_mu, ref_cov = feats.astype(np.float64).mean(0), np.cov(feats.astype(np.float64), rowvar=False)
    results = []
    for bs in (1, 7, 100, 1000):
        st = FeatureStats(8)
        for s in range(0, 1000, bs):
            st.update(torch.from_numpy(feats[s:s + bs]))
        mu, cov = st.mean_cov()
        np.testing.assert_allclose(mu, ref_mu, rtol=1e-13)
        np.testing.assert_allclose(cov, ref_cov, rtol=1e-9, atol=1e-11)
        results.append(frechet_distance(mu, cov, np.zeros(8), np.eye(8)))
    assert max(results) - min(results) < 1e-9 * abs(results[0])


def test_classifier_and_inception_score_closed_forms():
    k = 10
    # confident and balanced: p(y|x) one-hot, p(y) uniform -> score = K
    logits = torch.full((100, k), -1e4, dtype=torch.float64)
    logits[torch.arange(100), torch.arange(100) % k] = 0.0
    assert classifier_score(logits) == pytest.approx(k, rel=1e-12)
    # all in one class -> 1; uniform predictions -> 1
    assert classifier_score(torch.zeros(50, k)) == pytest.approx(1.0, abs=1e-12)
    # two classes, p(y|x) = (p, 1-p) for half and (1-p, p) for the other half: p(y) uniform,
    # KL = log 2 - H(p)
    p = 0.8
    lg = torch.tensor([[math.log(p), math.log(1 - p)], [math.log(1 - p), math.log(p)]], dtype=torch.float64)
    lg = lg.repeat(20, 1)
    h = -(p * math.log(p) + (1 - p) * math.log(1 - p))
    assert classifier_score(lg) == pytest.approx(math.exp(math.log(2) - h), rel=1e-12)
    mean, std = inception_score(logits, splits=10)  # every split of 10 holds all 10 classes
    assert mean == pytest.approx(10.0, rel=1e-12) and std == pytest.approx(0.0, abs=1e-9)


def test_inception_score_matches_a_direct_numpy_computation():
    rng = np.random.default_rng(4)
    logits = rng.standard_normal((103, 7)) * 3
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    scores = []
    for i in range(10):
        part = p[i * 103 // 10:(i + 1) * 103 // 10]
        py = part.mean(0, keepdims=True)
        scores.append(np.exp(np.mean(np.sum(part * (np.log(part) - np.log(py)), 1))))
    mean, std = inception_score(torch.from_numpy(logits), splits=10)
    assert mean == pytest.approx(np.mean(scores), rel=1e-12)
    assert std == pytest.approx(np.std(scores), rel=1e-9)
    with pytest.raises(ValueError, match="at least 10 images"):
        inception_score(logits[:5], splits=10)


def test_the_bootstrap_width_matches_the_spread_of_independent_draws():
    """Features ~ N((0.3, 0), I) against the exact reference N(0, I) (true distance 0.09): the 95%
    bootstrap interval of one set of 500 is about as wide as the middle 95% of the distances of
    200 independent sets of 500 (averaged over 10 sets), and it holds the set's own distance."""
    rng = np.random.default_rng(0)
    mu, sigma = np.zeros(2), np.eye(2)

    def draw():
        return rng.standard_normal((500, 2)) + np.array([0.3, 0.0])

    redraws = [
        frechet_distance(x.mean(0), np.cov(x, rowvar=False), mu, sigma) for x in (draw() for _ in range(200))
    ]
    spread = np.quantile(redraws, 0.975) - np.quantile(redraws, 0.025)
    widths = []
    for k in range(10):
        x = draw()
        lo, hi = bootstrap_frechet(x, mu, sigma, resamples=300, seed=k)
        own = frechet_distance(x.mean(0), np.cov(x, rowvar=False), mu, sigma)
        assert lo < own < hi
        widths.append(hi - lo)
    assert 0.8 < np.mean(widths) / spread < 1.25, (np.mean(widths), spread)
    assert bootstrap_frechet(x, mu, sigma, resamples=300, seed=9) == (lo, hi)  # seeded


def test_bad_arguments():
    with pytest.raises(ValueError, match="resamples must be an int >= 2"):
        bootstrap_frechet(np.zeros((5, 2)), np.zeros(2), np.eye(2), resamples=1)
    with pytest.raises(ValueError, match=r"feats must be \(N, D\)"):
        bootstrap_frechet(np.zeros(5), np.zeros(2), np.eye(2), resamples=10)
