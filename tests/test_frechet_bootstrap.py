"""The bootstrap interval of the Frechet distance against the spread of independent redraws."""

import numpy as np
import pytest

from ddpmkit.evaluate.frechet import bootstrap_frechet, frechet_distance


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
