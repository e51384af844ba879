"""Statistical inefficiency of a time series, for error bars from correlated (MD) samples.

For a stationary series a_1..a_n with normalised autocorrelation C(t), the variance of its mean is

    Var(mean) = (sigma^2 / n) * g,   g = 1 + 2 sum_{t=1}^{n-1} (1 - t/n) C(t),

so n correlated samples carry the information of n / g independent ones (Flyvbjerg & Petersen,
J. Chem. Phys. 91, 461 (1989); Chodera et al., J. Chem. Theory Comput. 3, 26 (2007)). The sum is
truncated at the first zero crossing of C(t), as in `pymbar.timeseries.statistical_inefficiency`,
which computes it here. A bootstrap that treats the samples as independent underestimates the
standard error by about sqrt(g); `inflate_for_correlation` applies that factor.
"""

from __future__ import annotations

import math
import warnings
from typing import Any, Iterable

import numpy as np

from bgexp.estimators.weights import as_float64

__all__ = ["statistical_inefficiency", "inflate_for_correlation"]


def statistical_inefficiency(series: Any) -> float:
    """g >= 1 of a time-ordered 1-d series (pymbar's estimator, truncated at C(t) = 0).

    Non-finite entries (zero-weight works) are dropped first. A series with fewer than 3 finite
    values or no variance has no measurable correlation: g = 1.
    """
    values = as_float64(series)
    if values.ndim != 1:
        raise ValueError(f"statistical_inefficiency expects a 1-d time series, got shape {values.shape}")
    values = values[np.isfinite(values)]
    if values.size < 3 or float(np.var(values)) <= 1e-300 * max(1.0, float(np.mean(values)) ** 2):
        return 1.0
    from pymbar import timeseries

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        g = float(timeseries.statistical_inefficiency(values, fast=False, mintime=3))
    return max(1.0, g)


def inflate_for_correlation(std: float, inefficiencies: Iterable[float]) -> float:
    """std * sqrt(max g): the standard error of an estimate from several correlated series, from the
    standard error computed as if their samples were independent. Taking the largest g is the
    conservative choice when the series enter one estimate (BAR)."""
    g = max([1.0, *[float(x) for x in inefficiencies]])
    return float(std) * math.sqrt(g) if math.isfinite(std) else float(std)
