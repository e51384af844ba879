"""Free-energy profiles (potentials of mean force) and histograms from (weighted) samples."""

from __future__ import annotations

from typing import Any

import numpy as np

from bgexp.estimators.weights import _as_1d, _check_same_length, as_float64, normalized_weights

__all__ = ["free_energy_profile", "align_profiles", "weighted_histogram2d", "histogram_kl"]


def free_energy_profile(
    values: Any,
    log_w: Any = None,
    bins: int | Any = 40,
    range: tuple[float, float] | None = None,  # noqa: A002 (numpy's name)
) -> tuple[np.ndarray, np.ndarray]:
    """Free-energy profile F(s) = -ln p(s) (kT) of a scalar collective variable s.

    For bin j with edges [e_j, e_{j+1}):

        p_j = sum_{i: s_i in bin j} wbar_i / (e_{j+1} - e_j),    F_j = -ln p_j,

    where wbar_i are the self-normalised importance weights (``normalized_weights(log_w)``; uniform
    1/n when ``log_w`` is None).  The weights are normalised over ALL samples, so p is an estimate of
    the full probability density even where samples fall outside ``range``; F is the absolute
    -ln density, not shifted to a minimum of zero (use ``align_profiles`` to compare).  Empty bins
    (zero weight) get F = +inf.  ``bins`` is a number of equal-width bins over ``range`` (default:
    min and max of ``values``) or an increasing array of bin edges (then ``range`` is ignored).
    Returns (bin centres, F), both of shape [n_bins].

    Reference: Kästner, "Umbrella sampling", WIREs Comput. Mol. Sci. 1, 932 (2011) (PMF as
    -kT ln p); Noé et al., Science 365, eaaw1147 (2019) (reweighted profiles of Boltzmann generators).
    """
    s = _as_1d(values, "values", allow_posinf=False, allow_neginf=False)
    if log_w is None:
        w = np.full(s.size, 1.0 / s.size)
    else:
        lw = _as_1d(log_w, "log_w", allow_posinf=False, allow_neginf=True)
        _check_same_length(values=s, log_w=lw)
        w = normalized_weights(lw)

    if np.ndim(bins) == 0:
        if not isinstance(bins, (int, np.integer)) or isinstance(bins, bool) or bins < 1:
            raise ValueError(f"bins must be a positive integer or an array of edges, got {bins!r}")
        if range is not None:
            lo, hi = float(range[0]), float(range[1])
            if not (np.isfinite(lo) and np.isfinite(hi) and hi > lo):
                raise ValueError(f"range must be (low, high) with finite low < high, got {range!r}")
        edges = np.histogram_bin_edges(s, bins=int(bins), range=range)
    else:
        edges = as_float64(bins)
        if edges.ndim != 1 or edges.size < 2:
            raise ValueError(f"bin edges must be a 1-D array of at least 2 values, got shape {tuple(edges.shape)}")
        if not np.all(np.isfinite(edges)) or np.any(np.diff(edges) <= 0):
            raise ValueError("bin edges must be finite and strictly increasing")

    mass, _ = np.histogram(s, bins=edges, weights=w)
    widths = np.diff(edges)
    with np.errstate(divide="ignore"):
        f = -np.log(mass / widths)
    centres = 0.5 * (edges[:-1] + edges[1:])
    return centres, f


def align_profiles(f: Any, f_ref: Any, max_f_ref: float | None = None) -> tuple[np.ndarray, float]:
    """Shift profile f by the constant that best matches f_ref in the least-squares sense.

    Over the bins M where both f and f_ref are finite (and, if ``max_f_ref`` is given, where
    f_ref - min(f_ref) <= max_f_ref, min over the finite entries of f_ref):

        c = mean_{j in M} (f_ref_j - f_j),    f_shifted = f + c,
        rmse = sqrt( mean_{j in M} (f_shifted_j - f_ref_j)^2 ).

    Free-energy profiles are defined up to an additive constant; this removes it before comparing.
    Non-finite entries (+inf for empty bins, NaN for missing reference values) are ignored and
    stay as they are in the result.  Raises ValueError if the shapes differ or no bin is usable.
    Returns (f_shifted, rmse).
    """
    a = as_float64(f)
    r = as_float64(f_ref)
    if a.shape != r.shape:
        raise ValueError(f"f and f_ref must have the same shape, got {tuple(a.shape)} and {tuple(r.shape)}")
    if a.size == 0:
        raise ValueError("f and f_ref are empty")
    mask = np.isfinite(a) & np.isfinite(r)
    if max_f_ref is not None:
        finite_ref = r[np.isfinite(r)]
        if finite_ref.size == 0:
            raise ValueError("f_ref has no finite entries")
        mask &= np.where(np.isfinite(r), r - finite_ref.min(), np.inf) <= float(max_f_ref)
    if not mask.any():
        raise ValueError(
            "no bin where f and f_ref are both finite"
            + (f" and f_ref - min(f_ref) <= {max_f_ref}" if max_f_ref is not None else "")
        )
    c = float(np.mean(r[mask] - a[mask]))
    shifted = a + c
    rmse = float(np.sqrt(np.mean((shifted[mask] - r[mask]) ** 2)))
    return shifted, rmse


def weighted_histogram2d(a: Any, b: Any, log_w: Any, x_edges: Any, y_edges: Any) -> np.ndarray:
    """Probability of each 2-D bin under self-normalised weights: P_jk = sum_{i in bin jk} wbar_i.

    Samples outside the edges keep their weight in the normalisation (so P sums to the
    probability of the covered region); samples with log w = -inf weigh nothing.
    """
    sa = _as_1d(a, "a", allow_posinf=False, allow_neginf=False)
    sb = _as_1d(b, "b", allow_posinf=False, allow_neginf=False)
    lw = _as_1d(log_w, "log_w", allow_posinf=False, allow_neginf=True)
    _check_same_length(a=sa, b=sb, log_w=lw)
    p, _, _ = np.histogram2d(sa, sb, bins=[as_float64(x_edges), as_float64(y_edges)], weights=normalized_weights(lw))
    return p


def histogram_kl(p_ref: Any, p: Any, eps: float = 1e-10) -> float:
    """KL(p_ref || p) = sum_j p_ref_j ln(p_ref_j / p_j) over the bins of two histograms.

    Both are renormalised to sum to one; bins where p_ref is zero contribute nothing, and p is
    floored at ``eps`` so that a reference bin the model misses gives a large, finite penalty.
    This is the discrete KL divergence used to compare Ramachandran histograms (Köhler, Krämer,
    Noé, "Smooth normalizing flows", NeurIPS 2021).
    """
    r = as_float64(p_ref).ravel()
    q = as_float64(p).ravel()
    if r.shape != q.shape:
        raise ValueError(f"histograms differ in size: {r.size} and {q.size} bins")
    if np.any(r < 0) or np.any(q < 0) or r.sum() <= 0 or q.sum() <= 0:
        raise ValueError("histograms must be non-negative with a positive total")
    r, q = r / r.sum(), np.maximum(q / q.sum(), eps)
    m = r > 0
    return float(np.sum(r[m] * np.log(r[m] / q[m])))


def quadrature_kl(log_p: Any, log_q: Any, cell_volume: float) -> float:
    """KL(p || q) = integral p (ln p - ln q) dx by the midpoint rule on a grid.

    `log_p` and `log_q` are normalised log-densities at the grid points (any shape, same shape),
    `cell_volume` the volume per point. On a periodic domain (the torus) the midpoint rule is
    spectrally accurate for smooth integrands. Points where p underflows to zero contribute
    nothing; a point where q = 0 but p > 0 gives +inf.
    """
    lp = as_float64(log_p).ravel()
    lq = as_float64(log_q).ravel()
    if lp.shape != lq.shape:
        raise ValueError(f"log_p and log_q differ in size: {lp.size} and {lq.size} points")
    if not cell_volume > 0:
        raise ValueError(f"cell_volume must be positive, got {cell_volume}")
    if np.any(np.isnan(lp)) or np.any(np.isnan(lq)):
        raise ValueError("log_p and log_q must not contain NaN")
    p = np.exp(lp)
    m = p > 0
    return float(np.sum(p[m] * (lp[m] - lq[m])) * cell_volume)
