"""Free-energy estimators: reweighted state populations, FEP (Zwanzig/EXP), BAR and MBAR.

All results are dimensionless (units of kT) and computed in float64.  BAR and MBAR are delegated
to pymbar (imported lazily, so importing ``bgexp.estimators`` stays cheap and quiet).
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
from scipy.special import logsumexp

from bgexp.estimators.weights import _as_1d, _as_mask, _checked, _log_w, as_float64

__all__ = ["free_energy_difference", "fep", "bar", "mbar"]


def free_energy_difference(log_w: Any, in_a: Any, in_b: Any) -> float:
    """Reweighted free-energy difference between two states (regions of configuration space):

        Delta F(a -> b) = F_b - F_a = -ln( sum_{i in b} w_i / sum_{i in a} w_i )     [kT]
                        = -( logsumexp(log w[b]) - logsumexp(log w[a]) )

    i.e. minus the log ratio of the self-normalised importance-sampling estimates of the state
    populations.  ``in_a`` / ``in_b`` are boolean masks over the samples (they need not be
    complementary).  If state b has zero total weight the result is +inf, if state a has zero
    total weight it is -inf; if both have zero weight a ValueError is raised.

    Reference: Noé, Olsson, Köhler, Wu, Science 365, eaaw1147 (2019), "free energy differences"
    (Eq. 5 and Fig. 3); Owen, "Monte Carlo theory, methods and examples" (2013), ch. 9.
    """
    lw = _log_w(log_w)
    a = _as_mask(in_a, lw.size, "in_a")
    b = _as_mask(in_b, lw.size, "in_b")
    lse_a = logsumexp(lw[a]) if a.any() else -np.inf
    lse_b = logsumexp(lw[b]) if b.any() else -np.inf
    if np.isneginf(lse_a) and np.isneginf(lse_b):
        raise ValueError(
            f"both states have zero total weight (in_a: {int(a.sum())} samples, in_b: {int(b.sum())} "
            "samples, all with log-weight -inf or none at all); the free-energy difference is undefined"
        )
    if np.isneginf(lse_b):
        return float("inf")
    if np.isneginf(lse_a):
        return float("-inf")
    return float(-(lse_b - lse_a))


def fep(work: Any) -> tuple[float, float]:
    """Zwanzig free-energy perturbation (exponential averaging, EXP):

        Delta f = f_B - f_A = -ln < exp(-W) >_A = -( logsumexp(-W) - ln n )

    with W the reduced works, W = u_B(x) - u_A(x) for x ~ A (or generalised works of a flow,
    W = u_B(f(x)) - u_A(x) - ln|det J_f(x)|).  Returns (Delta f, std) where std is the delta-method
    estimate std(exp(-W)) / (sqrt(n) <exp(-W)>) as computed by ``pymbar.other_estimators.exp``.
    Works may be +inf (zero contribution); if all are +inf the result is (inf, nan).  NaN and -inf
    works raise ValueError.

    References: Zwanzig, J. Chem. Phys. 22, 1420 (1954); Shirts & Chodera, J. Chem. Phys. 129,
    124105 (2008) (pymbar); Jarzynski, Phys. Rev. E 73, 046105 (2006) (targeted FEP with maps).
    """
    w = _as_1d(work, "work", allow_posinf=True, allow_neginf=False)
    if np.all(np.isposinf(w)):
        return float("inf"), float("nan")
    from pymbar.other_estimators import exp as pymbar_exp

    res = pymbar_exp(w, compute_uncertainty=True)
    return float(res["Delta_f"]), float(res["dDelta_f"])


def _cap_posinf(w: np.ndarray, cap: float) -> np.ndarray:
    if np.isposinf(w).any():
        w = w.copy()
        w[np.isposinf(w)] = cap
    return w


def _bar_std(wf: np.ndarray, wr: np.ndarray, df: float) -> float:
    """Bennett's asymptotic std of BAR (the formula pymbar uses, uncertainty_method='BAR'),
    evaluated entirely in log space:

        var = sum f_F^2 / (sum f_F)^2 + sum f_R^2 / (sum f_R)^2 - 1/n_F - 1/n_R,
        f_F = 1 / (1 + exp(w_F + C)),  f_R = 1 / (1 + exp(w_R - C)),  C = ln(n_F/n_R) - Delta f.

    pymbar 4.0.3 overflows (returns NaN) once the works span more than ~700 kT; this does not.
    """
    c = np.log(wf.size / wr.size) - df
    log_ff = -np.logaddexp(0.0, wf + c)
    log_fr = -np.logaddexp(0.0, wr - c)
    var = (
        np.exp(logsumexp(2.0 * log_ff) - 2.0 * logsumexp(log_ff))
        + np.exp(logsumexp(2.0 * log_fr) - 2.0 * logsumexp(log_fr))
        - 1.0 / wf.size
        - 1.0 / wr.size
    )
    return float(np.sqrt(max(var, 0.0)))


def bar(work_forward: Any, work_reverse: Any) -> tuple[float, float]:
    """Bennett acceptance ratio estimate of Delta f = f_B - f_A (kT) with its asymptotic std.

    Solves for Delta f in

        sum_{i=1}^{n_F} 1 / (1 + exp(M + w_F,i - Delta f)) = sum_{j=1}^{n_R} 1 / (1 + exp(-M + w_R,j + Delta f)),
        M = ln(n_F / n_R),

    with forward works w_F = u_B(x) - u_A(x), x ~ A, and reverse works w_R = u_A(x) - u_B(x),
    x ~ B (via ``pymbar.other_estimators.bar``; the std is Bennett's asymptotic estimate).
    Works equal to +inf contribute zero to their sum (they are replaced by a finite value 1e3 kT
    beyond the largest finite work, where the Fermi function is < e^-1000).  NaN and -inf works
    raise ValueError.  If pymbar cannot bracket or converge (no overlap between the work
    distributions), a RuntimeWarning is issued and (nan, nan) is returned.  When pymbar's std
    overflows to NaN (works spread over more than ~700 kT) the same Bennett variance is recomputed
    in log space.

    References: Bennett, J. Comput. Phys. 22, 245 (1976); Shirts, Bair, Hooker, Pande, Phys. Rev.
    Lett. 91, 140601 (2003); Shirts & Chodera, J. Chem. Phys. 129, 124105 (2008).
    """
    wf = _as_1d(work_forward, "work_forward", allow_posinf=True, allow_neginf=False)
    wr = _as_1d(work_reverse, "work_reverse", allow_posinf=True, allow_neginf=False)
    finite = np.concatenate([wf[np.isfinite(wf)], wr[np.isfinite(wr)]])
    if not np.isfinite(wf).any() or not np.isfinite(wr).any():
        warnings.warn(
            "BAR: all forward or all reverse works are +inf (no overlap); returning (nan, nan)",
            RuntimeWarning,
            stacklevel=2,
        )
        return float("nan"), float("nan")
    cap = float(np.max(np.abs(finite))) + 1.0e3
    wf, wr = _cap_posinf(wf, cap), _cap_posinf(wr, cap)

    from pymbar.other_estimators import bar as pymbar_bar
    from pymbar.utils import BoundsError, ConvergenceError

    try:
        with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
            res = pymbar_bar(wf, wr, compute_uncertainty=True)
    except (BoundsError, ConvergenceError) as err:
        warnings.warn(f"BAR failed in pymbar ({err}); returning (nan, nan)", RuntimeWarning, stacklevel=2)
        return float("nan"), float("nan")
    df, ddf = float(res["Delta_f"]), float(res["dDelta_f"])
    if np.isfinite(df) and not np.isfinite(ddf):
        ddf = _bar_std(wf, wr, df)  # pymbar's variance overflows for widely spread works
    if df == 0.0 and ddf == 0.0:
        # pymbar's sentinel for "poor overlap": it logs a warning and guesses 0 with no uncertainty.
        warnings.warn(
            "BAR: pymbar reports poor overlap between forward and reverse work distributions "
            "(its fallback Delta f = 0 +- 0); returning (nan, nan)",
            RuntimeWarning,
            stacklevel=2,
        )
        return float("nan"), float("nan")
    return df, ddf


def mbar(u_kn: Any, n_k: Any) -> tuple[np.ndarray, np.ndarray]:
    """Multistate Bennett acceptance ratio: free energies f_k - f_0 (kT) of K states and their std.

    The f_k solve the self-consistent equations

        f_i = -ln sum_{n=1}^{N} exp(-u_i(x_n)) / sum_{k=1}^{K} N_k exp(f_k - u_k(x_n)),

    where u_kn[k, n] = u_k(x_n) is the reduced energy of sample n (from any state) evaluated in
    state k, and n_k[k] the number of samples drawn from state k, with the samples ordered by state
    (the first n_k[0] columns from state 0, etc.) and sum(n_k) = N.  Solved by ``pymbar.MBAR``;
    the std is the asymptotic covariance estimate of Shirts & Chodera.  u_kn may contain +inf
    (a sample impossible in a state); NaN and -inf raise ValueError.  Returns (f, std), arrays of
    shape [K] with f[0] = 0 and std[0] = 0.

    Reference: Shirts & Chodera, "Statistically optimal analysis of samples from multiple
    equilibrium states", J. Chem. Phys. 129, 124105 (2008).
    """
    u = _checked(u_kn, "u_kn [K states, N samples]", ndim=2, allow_posinf=True)
    nk = as_float64(n_k)
    if nk.ndim != 1 or nk.size != u.shape[0]:
        raise ValueError(f"n_k must have one entry per state (K={u.shape[0]}), got shape {tuple(nk.shape)}")
    if np.any(~np.isfinite(nk)) or np.any(nk < 0) or np.any(nk != np.round(nk)):
        raise ValueError(f"n_k must contain non-negative integers, got {nk.tolist()}")
    nk = nk.astype(np.int64)
    if nk.sum() != u.shape[1]:
        raise ValueError(f"sum(n_k) = {int(nk.sum())} must equal the number of samples N = {u.shape[1]} in u_kn")
    if nk.sum() == 0:
        raise ValueError("n_k sums to zero: no samples")
    for k in range(u.shape[0]):
        start = int(nk[:k].sum())
        own = u[k, start : start + nk[k]]
        if np.isposinf(own).any():
            raise ValueError(
                f"u_kn[{k}] is +inf for {int(np.isposinf(own).sum())} sample(s) drawn from state {k} itself"
            )
    import pymbar

    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        m = pymbar.MBAR(u, nk)
        res = m.compute_free_energy_differences(compute_uncertainty=True)
    f = np.asarray(res["Delta_f"], dtype=np.float64)[0].copy()
    df = np.asarray(res["dDelta_f"], dtype=np.float64)[0].copy()
    return f, df
