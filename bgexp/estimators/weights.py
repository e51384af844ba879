"""Importance weights of a Boltzmann generator and their effective sample size.

All functions accept numpy arrays or torch tensors (any device, with or without grad) and compute
in float64.  Energies are reduced (in units of kT), log-densities are natural logarithms.

Conventions for non-finite values (shared by the whole ``bgexp.estimators`` package):

* ``-inf`` log-weight means weight zero (a sample with infinite energy); it is allowed.
* ``+inf`` log-weight would be an infinite weight and is rejected with a ``ValueError``.
* ``NaN`` anywhere is rejected with a ``ValueError`` that reports how many NaNs there are.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from scipy.special import logsumexp

__all__ = ["as_float64", "log_weights", "normalized_weights", "ess"]


def as_float64(a: Any) -> np.ndarray:
    """Convert ``a`` (numpy array, torch tensor, sequence or scalar) to a float64 numpy array.

    Torch tensors are detached and moved to the CPU first (torch itself is not imported here).
    The result is a new array or a view; it never carries autograd history.
    """
    if hasattr(a, "detach") and hasattr(a, "cpu"):  # torch.Tensor without importing torch
        a = a.detach().cpu()
        if getattr(a, "is_complex", lambda: False)():
            raise ValueError("expected a real-valued tensor, got a complex one")
        return a.double().numpy()
    try:
        out = np.asarray(a, dtype=np.float64)
    except (TypeError, ValueError) as err:
        raise ValueError(f"cannot convert input of type {type(a).__name__} to a float64 array: {err}") from err
    return out


def _checked(a: Any, name: str, *, ndim: int = 1, allow_posinf: bool = False,
             allow_neginf: bool = False) -> np.ndarray:
    """float64 array of `ndim` dimensions with the package's checks: non-empty, no NaN,
    infinities as allowed."""
    x = as_float64(a)
    if x.ndim != ndim:
        expected = "one-dimensional [n_samples]" if ndim == 1 else f"{ndim}-dimensional"
        raise ValueError(f"{name} must be {expected}, got shape {tuple(x.shape)}")
    if x.size == 0:
        raise ValueError(f"{name} is empty (shape {tuple(x.shape)}); at least one sample is required")
    n_nan = int(np.isnan(x).sum())
    if n_nan:
        raise ValueError(f"{name} contains {n_nan} NaN value(s) out of {x.size}")
    if not allow_posinf:
        n = int(np.isposinf(x).sum())
        if n:
            raise ValueError(f"{name} contains {n} +inf value(s) out of {x.size}; +inf is not allowed here")
    if not allow_neginf:
        n = int(np.isneginf(x).sum())
        if n:
            raise ValueError(f"{name} contains {n} -inf value(s) out of {x.size}; -inf is not allowed here")
    return x


def _as_1d(a: Any, name: str, *, allow_posinf: bool = False, allow_neginf: bool = False) -> np.ndarray:
    """float64 1-D array of samples with the checks of `_checked`."""
    return _checked(a, name, ndim=1, allow_posinf=allow_posinf, allow_neginf=allow_neginf)


def _check_same_length(**arrays: np.ndarray) -> None:
    lengths = {k: len(v) for k, v in arrays.items()}
    if len(set(lengths.values())) > 1:
        desc = ", ".join(f"{k}={n}" for k, n in lengths.items())
        raise ValueError(f"inputs must have the same number of samples, got {desc}")


def _as_mask(m: Any, n: int, name: str) -> np.ndarray:
    """Boolean mask of length ``n``; accepts bool arrays/tensors or 0/1 numbers."""
    if hasattr(m, "detach") and hasattr(m, "cpu"):
        m = m.detach().cpu().numpy()
    m = np.asarray(m)
    if m.ndim != 1:
        raise ValueError(f"{name} must be a one-dimensional boolean mask, got shape {tuple(m.shape)}")
    if len(m) != n:
        raise ValueError(f"{name} has length {len(m)} but there are {n} samples (log-weights)")
    if m.dtype == bool:
        return m
    if m.dtype.kind in "iuf" and np.all((m == 0) | (m == 1)):
        return m.astype(bool)
    raise ValueError(f"{name} must be a boolean mask (or 0/1 values), got dtype {m.dtype}")


def _log_w(log_w: Any, name: str = "log_w") -> np.ndarray:
    """Validated log-weights: -inf allowed (zero weight), NaN/+inf rejected, not all -inf."""
    lw = _as_1d(log_w, name, allow_posinf=False, allow_neginf=True)
    if not np.any(np.isfinite(lw)):
        raise ValueError(f"all {lw.size} {name} are -inf: every sample has zero weight")
    return lw


def log_weights(energy: Any, log_q: Any) -> np.ndarray:
    """Log importance weights of samples x_i ~ q towards the Boltzmann density exp(-u).

        log w_i = -u(x_i) - log q(x_i)

    with u the reduced energy (kT) and log q the flow's log-density of the sample (unnormalised
    weights: the unknown partition function cancels in every self-normalised estimator).
    ``energy`` may contain +inf (the weight is then zero, log w = -inf); NaN in either input,
    -inf energies and infinite ``log_q`` raise ValueError.

    Reference: Noé, Olsson, Köhler, Wu, "Boltzmann generators: Sampling equilibrium states of
    many-body systems with deep learning", Science 365, eaaw1147 (2019), Eq. 4.
    """
    u = _as_1d(energy, "energy", allow_posinf=True, allow_neginf=False)
    lq = _as_1d(log_q, "log_q", allow_posinf=False, allow_neginf=False)
    _check_same_length(energy=u, log_q=lq)
    return -u - lq


def normalized_weights(log_w: Any) -> np.ndarray:
    """Self-normalised importance weights  w_i / sum_j w_j = exp(log w_i - logsumexp(log w)).

    Computed with a log-sum-exp shift, so arbitrarily large or small log-weights are fine; -inf
    gives weight 0.  The result sums to 1.

    Reference: Owen, "Monte Carlo theory, methods and examples" (2013), ch. 9.2 (self-normalised
    importance sampling).
    """
    lw = _log_w(log_w)
    w = np.exp(lw - logsumexp(lw))
    return w / w.sum()


def ess(log_w: Any) -> float:
    """Kish effective sample size as a fraction of the number of samples n:

        ESS / n = (sum_i w_i)^2 / (n * sum_i w_i^2)
                = exp(2 logsumexp(log w) - logsumexp(2 log w) - ln n)   in (0, 1].

    Equals 1 for equal weights and 1/n when a single weight dominates.  Samples with log w = -inf
    count in n but carry no weight.

    Reference: Kish, "Survey Sampling" (1965); Liu, "Monte Carlo Strategies in Scientific
    Computing" (2001), Sec. 2.5.3.
    """
    lw = _log_w(log_w)
    n = lw.size
    log_frac = 2.0 * logsumexp(lw) - logsumexp(2.0 * lw) - np.log(n)
    return float(min(1.0, np.exp(log_frac)))
