"""Statistical inefficiency against the analytic value of an AR(1) process."""

import math

import numpy as np
import pytest

from bgexp.estimators import inflate_for_correlation, statistical_inefficiency


def ar1(phi: float, n: int, rng: np.random.Generator, n_series: int = 1) -> np.ndarray:
    """x_t = phi x_{t-1} + sqrt(1 - phi^2) eps_t, stationary with unit variance and C(t) = phi^t."""
    x = np.empty((n_series, n))
    x[:, 0] = rng.standard_normal(n_series)
    noise = rng.standard_normal((n_series, n)) * math.sqrt(1 - phi**2)
    for t in range(1, n):
        x[:, t] = phi * x[:, t - 1] + noise[:, t]
    return x


@pytest.mark.parametrize("phi", [0.5, 0.8, 0.95])
def test_ar1_matches_analytic_inefficiency(phi):
    # g = 1 + 2 sum_t phi^t = (1 + phi) / (1 - phi) for n -> infinity
    x = ar1(phi, 200_000, np.random.default_rng(0))[0]
    expected = (1 + phi) / (1 - phi)
    assert statistical_inefficiency(x) == pytest.approx(expected, rel=0.15)


def test_independent_samples_have_unit_inefficiency():
    x = np.random.default_rng(1).standard_normal(50_000)
    assert statistical_inefficiency(x) == pytest.approx(1.0, abs=0.1)


def test_inflated_error_matches_the_spread_of_means():
    # the standard error computed as if independent (sigma / sqrt(n)), times sqrt(g), equals the
    # observed spread of the mean over independent replicas of the correlated series
    phi, n = 0.9, 4000
    x = ar1(phi, n, np.random.default_rng(2), n_series=400)
    naive = x[0].std(ddof=1) / math.sqrt(n)
    inflated = inflate_for_correlation(naive, [statistical_inefficiency(x[0]), 1.0])
    assert x.mean(axis=1).std(ddof=1) == pytest.approx(inflated, rel=0.25)
    assert x.mean(axis=1).std(ddof=1) > 2.5 * naive  # without the factor the bar is ~4x too small


def test_edge_cases_and_bad_input():
    assert statistical_inefficiency(np.ones(100)) == 1.0
    assert statistical_inefficiency([1.0, 2.0]) == 1.0
    assert statistical_inefficiency(np.array([np.inf, 1.0, 2.0, np.inf, 3.0, 2.5])) >= 1.0
    assert inflate_for_correlation(2.0, [4.0, 0.5]) == pytest.approx(4.0)
    assert math.isnan(inflate_for_correlation(float("nan"), [4.0]))
    with pytest.raises(ValueError, match="1-d"):
        statistical_inefficiency(np.zeros((3, 3)))
