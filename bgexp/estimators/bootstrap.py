"""Nonparametric bootstrap confidence intervals for any scalar statistic of per-sample arrays."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Callable

import numpy as np

__all__ = ["BootstrapResult", "bootstrap", "bootstrap_independent"]


@dataclass
class BootstrapResult:
    """Point estimate, percentile confidence interval and bootstrap std of a statistic.

    ``n_boot`` is the number of bootstrap replicas drawn; ``n_nonfinite`` how many of them were
    non-finite (or raised ValueError) and were therefore left out of ``ci_low``, ``ci_high``, ``std``.
    """

    value: float
    ci_low: float
    ci_high: float
    std: float
    n_boot: int
    n_nonfinite: int = 0

    def as_dict(self) -> dict[str, float | int]:
        return asdict(self)


def _to_numpy(a: Any) -> np.ndarray:
    """numpy view of an array/tensor keeping its dtype (boolean masks stay boolean)."""
    if hasattr(a, "detach") and hasattr(a, "cpu"):
        a = a.detach().cpu()
        try:
            return a.numpy()
        except TypeError:  # e.g. bfloat16
            return a.double().numpy()
    return np.asarray(a)


def bootstrap(
    statistic: Callable[..., float],
    *arrays: Any,
    n_boot: int = 200,
    confidence: float = 0.95,
    seed: int | None = None,
) -> BootstrapResult:
    """Nonparametric bootstrap of ``statistic(*arrays) -> float``.

    value = statistic(*arrays) on the full data.  Each of the ``n_boot`` replicas draws n indices
    with replacement, i* ~ U{0..n-1}^n, and evaluates theta*_b = statistic(*(a[i*] for a in arrays)),
    resampling all arrays jointly along axis 0 (they must have the same length n, so paired
    per-sample quantities such as log-weights and state masks stay paired).  The confidence
    interval is the percentile interval

        [ q_{alpha/2}(theta*), q_{1-alpha/2}(theta*) ],   alpha = 1 - confidence,

    and std is the sample standard deviation (ddof=1) of the replicas.

    Non-finite values: replicas that are inf/NaN (or whose statistic raises ValueError, e.g. a
    state that lost all its samples) are counted in ``n_nonfinite`` and left out of the CI and std.
    If more than half of the replicas are non-finite, the CI and std are NaN.  If ``value`` itself
    is non-finite (e.g. +inf for a state with zero weight), no interval can be formed around it:
    the CI is (value, value) and std is NaN.  Arrays are passed to ``statistic`` as numpy arrays
    with their original dtype.

    Reference: Efron & Tibshirani, "An Introduction to the Bootstrap" (1993), ch. 6 and 13
    (bootstrap standard error, percentile interval).
    """
    if not arrays:
        raise ValueError("bootstrap needs at least one array to resample")
    _check_settings(n_boot, confidence)
    data = [_to_numpy(a) for a in arrays]
    for i, a in enumerate(data):
        if a.ndim == 0:
            raise ValueError(f"array {i} is a scalar; bootstrap resamples along axis 0 of arrays")
    lengths = [len(a) for a in data]
    if len(set(lengths)) > 1:
        raise ValueError(f"all arrays must have the same length along axis 0, got lengths {lengths}")
    n = lengths[0]
    if n == 0:
        raise ValueError("arrays are empty; cannot bootstrap zero samples")

    value = float(statistic(*data))
    rng = np.random.default_rng(seed)
    reps = np.empty(int(n_boot), dtype=np.float64)
    for b in range(int(n_boot)):
        idx = rng.integers(0, n, size=n)
        try:
            reps[b] = float(statistic(*(a[idx] for a in data)))
        except (ValueError, FloatingPointError, ZeroDivisionError):
            reps[b] = np.nan
    return _summarize(value, reps, confidence)


def _check_settings(n_boot: Any, confidence: float) -> None:
    if not isinstance(n_boot, (int, np.integer)) or n_boot < 1:
        raise ValueError(f"n_boot must be a positive integer, got {n_boot!r}")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must lie strictly between 0 and 1, got {confidence!r}")


def bootstrap_independent(
    statistic: Callable[..., float],
    *samples: Any,
    n_boot: int = 200,
    confidence: float = 0.95,
    seed: int | None = None,
) -> BootstrapResult:
    """Bootstrap of ``statistic(*samples)`` over independent samples of different sizes: each
    replica resamples every sample on its own, with replacement and at its own size (e.g. the
    forward and reverse works of BAR, which come from two different simulations). CI, std and
    non-finite handling as in `bootstrap`."""
    if not samples:
        raise ValueError("bootstrap_independent needs at least one sample")
    _check_settings(n_boot, confidence)
    data = [_to_numpy(a) for a in samples]
    for i, a in enumerate(data):
        if a.ndim == 0 or len(a) == 0:
            raise ValueError(f"sample {i} is empty or a scalar; bootstrap resamples along axis 0")
    value = float(statistic(*data))
    rng = np.random.default_rng(seed)
    reps = np.empty(int(n_boot), dtype=np.float64)
    for b in range(int(n_boot)):
        try:
            reps[b] = float(statistic(*(a[rng.integers(0, len(a), size=len(a))] for a in data)))
        except (ValueError, FloatingPointError, ZeroDivisionError):
            reps[b] = np.nan
    return _summarize(value, reps, confidence)


def _summarize(value: float, reps: np.ndarray, confidence: float) -> BootstrapResult:
    """The percentile interval and std of the finite replicas around `value` (see `bootstrap`)."""
    n_boot = reps.size
    finite = reps[np.isfinite(reps)]
    n_nonfinite = int(reps.size - finite.size)

    if not np.isfinite(value):
        return BootstrapResult(value, value, value, float("nan"), int(n_boot), n_nonfinite)
    if finite.size == 0 or n_nonfinite > reps.size / 2:
        return BootstrapResult(value, float("nan"), float("nan"), float("nan"), int(n_boot), n_nonfinite)
    alpha = 1.0 - confidence
    lo, hi = np.percentile(finite, [100.0 * alpha / 2.0, 100.0 * (1.0 - alpha / 2.0)])
    std = float(np.std(finite, ddof=1)) if finite.size > 1 else 0.0
    return BootstrapResult(value, float(lo), float(hi), std, int(n_boot), n_nonfinite)
