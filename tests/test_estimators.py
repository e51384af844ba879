"""Tests of bgexp.estimators against analytic results (Gaussians, harmonic wells, mixtures)."""

from __future__ import annotations

import math
import subprocess
import sys

import numpy as np
import pytest
import torch

from bgexp.estimators import (
    BootstrapResult,
    align_profiles,
    as_float64,
    bar,
    bootstrap,
    ess,
    fep,
    free_energy_difference,
    free_energy_profile,
    log_weights,
    mbar,
    normalized_weights,
)


def gauss_logpdf(x: np.ndarray, mu: float, sigma: float) -> np.ndarray:
    return -0.5 * ((x - mu) / sigma) ** 2 - math.log(sigma) - 0.5 * math.log(2 * math.pi)


# ----------------------------------------------------------------------------- weights / ESS


def test_as_float64_torch_and_lists():
    t = torch.tensor([1.0, 2.0], dtype=torch.float32, requires_grad=True) * 2
    a = as_float64(t)
    assert isinstance(a, np.ndarray) and a.dtype == np.float64
    np.testing.assert_allclose(a, [2.0, 4.0])
    assert as_float64([1, 2]).dtype == np.float64


def test_log_weights_formula_and_infinite_energy():
    u = np.array([1.0, 2.0, np.inf])
    lq = torch.tensor([-0.5, 0.5, 0.0])
    lw = log_weights(u, lq)
    np.testing.assert_allclose(lw[:2], [-0.5, -2.5])
    assert np.isneginf(lw[2])
    w = normalized_weights(lw)
    assert w[2] == 0.0 and w.sum() == pytest.approx(1.0)
    np.testing.assert_allclose(w[:2], np.exp([-0.5, -2.5]) / np.exp([-0.5, -2.5]).sum())


def test_ess_identical_weights_is_one():
    assert ess(np.full(1000, -123.4)) == pytest.approx(1.0, abs=1e-12)


def test_ess_one_dominant_weight():
    n = 500
    lw = np.zeros(n)
    lw[7] = 800.0  # would overflow exp() without log-space arithmetic
    assert ess(lw) == pytest.approx(1.0 / n, rel=1e-6)


def test_ess_zero_weights_count_in_n():
    lw = np.array([0.0, 0.0, -np.inf, -np.inf])
    assert ess(lw) == pytest.approx(0.5)


def test_ess_gaussian_importance_sampling_matches_analytic():
    sq, sp, n = 1.5, 1.0, 400_000
    rng = np.random.default_rng(1)
    x = rng.normal(0.0, sq, size=n)
    energy = 0.5 * (x / sp) ** 2  # unnormalised target N(0, sp^2)
    lw = log_weights(energy, gauss_logpdf(x, 0.0, sq))
    expected = sp * math.sqrt(2 * sq**2 - sp**2) / sq**2  # 1 / E_q[(p/q)^2]
    assert ess(lw) == pytest.approx(expected, rel=0.02)


# ----------------------------------------------------------------------------- state free energies


def test_free_energy_difference_mixture_within_bootstrap_ci():
    c_a, c_b, mu, sig = 0.3, 0.7, 3.0, 0.5
    rng = np.random.default_rng(2)
    n = 20_000
    x = rng.normal(0.0, 3.0, size=n)
    p = c_a * np.exp(gauss_logpdf(x, -mu, sig)) + c_b * np.exp(gauss_logpdf(x, mu, sig))
    with np.errstate(divide="ignore"):
        energy = -np.log(p) + 5.0  # arbitrary offset: unnormalised target
    lw = log_weights(energy, gauss_logpdf(x, 0.0, 3.0))
    exact = -math.log(c_b / c_a)

    def stat(lw_, x_):
        return free_energy_difference(lw_, x_ < 0, x_ >= 0)

    res = bootstrap(stat, lw, x, n_boot=200, seed=0)
    assert res.value == pytest.approx(stat(lw, x))
    assert res.ci_low <= exact <= res.ci_high, res
    assert res.ci_high - res.ci_low < 0.2  # the CI is informative
    assert abs(res.value - exact) < 0.1


def test_free_energy_difference_zero_weight_states():
    lw = np.array([0.0, 0.0, -np.inf, -np.inf])
    in_a = np.array([True, True, False, False])
    in_b = ~in_a
    assert free_energy_difference(lw, in_a, in_b) == math.inf
    assert free_energy_difference(lw, in_b, in_a) == -math.inf
    assert free_energy_difference(lw, in_a, np.zeros(4, bool)) == math.inf
    with pytest.raises(ValueError, match="both states"):
        free_energy_difference(lw, in_b, in_b)
    # equal weights, one vs three samples
    assert free_energy_difference(np.zeros(4), [1, 0, 0, 0], [0, 1, 1, 1]) == pytest.approx(-math.log(3))


# ----------------------------------------------------------------------------- FEP / BAR / MBAR


def harmonic_samples(k: float, d: int, n: int, rng) -> np.ndarray:
    return rng.normal(0.0, 1.0 / math.sqrt(k), size=(n, d))


def test_fep_and_bar_harmonic_wells():
    k1, k2, d, n = 1.0, 2.5, 2, 5000
    exact = 0.5 * d * math.log(k2 / k1)
    rng = np.random.default_rng(3)
    xa, xb = harmonic_samples(k1, d, n, rng), harmonic_samples(k2, d, n, rng)
    sq_a, sq_b = (xa**2).sum(1), (xb**2).sum(1)
    w_f = 0.5 * (k2 - k1) * sq_a  # u_B - u_A at x ~ A
    w_r = -0.5 * (k2 - k1) * sq_b  # u_A - u_B at x ~ B

    df, sd = fep(w_f)
    assert 0 < sd < 0.1
    assert abs(df - exact) < 3 * sd, (df, sd, exact)
    res = bootstrap(lambda w: fep(w)[0], w_f, n_boot=200, seed=1)
    assert res.ci_low <= exact <= res.ci_high, res
    assert res.std == pytest.approx(sd, rel=0.3)

    df_b, sd_b = bar(w_f, torch.as_tensor(w_r))
    assert 0 < sd_b < 0.05
    assert abs(df_b - exact) < 3 * sd_b, (df_b, sd_b, exact)
    res_b = bootstrap(lambda f, r: bar(f, r)[0], w_f, w_r, n_boot=100, seed=2)
    assert res_b.ci_low <= exact <= res_b.ci_high, res_b
    # reverse FEP gives minus the difference
    df_r, sd_r = fep(w_r)
    assert abs(-df_r - exact) < 4 * sd_r + 0.05


def test_fep_infinite_works():
    w = np.array([0.0, np.inf, 0.0, np.inf])
    df, _ = fep(w)
    assert df == pytest.approx(math.log(2))
    assert fep(np.full(3, np.inf))[0] == math.inf
    with pytest.raises(ValueError, match="-inf"):
        fep(np.array([0.0, -np.inf]))


def test_bar_infinite_forward_work_is_zero_contribution():
    # hard-wall-free check: adding +inf forward works equals adding samples of zero Fermi weight;
    # it must stay finite and close to the estimate without them (plus the n_F bookkeeping).
    k1, k2, d, n = 1.0, 2.0, 1, 4000
    rng = np.random.default_rng(4)
    w_f = 0.5 * (k2 - k1) * (harmonic_samples(k1, d, n, rng) ** 2).sum(1)
    w_r = -0.5 * (k2 - k1) * (harmonic_samples(k2, d, n, rng) ** 2).sum(1)
    w_f_inf = np.concatenate([w_f, np.full(10, np.inf)])
    df, sd = bar(w_f_inf, w_r)
    assert np.isfinite(df) and np.isfinite(sd)
    assert abs(df - 0.5 * math.log(2)) < 4 * sd + 0.01


def test_bar_std_stable_for_widely_spread_works():
    from bgexp.estimators.free_energy import _bar_std

    rng = np.random.default_rng(9)
    w_f = 0.5 * rng.normal(size=3000) ** 2
    w_r = -0.25 * rng.normal(size=2000) ** 2
    df, sd = bar(w_f, w_r)
    assert _bar_std(w_f, w_r, df) == pytest.approx(sd, rel=1e-8)  # same formula as pymbar
    # a few huge (finite) works: pymbar's own std would be NaN; ours stays close to the above
    df2, sd2 = bar(np.concatenate([w_f, np.full(3, 5000.0)]), w_r)
    assert np.isfinite(sd2) and sd2 == pytest.approx(sd, rel=0.05)
    assert df2 == pytest.approx(df, abs=3 * sd)


def test_bar_no_overlap_warns_and_returns_nan():
    with pytest.warns(RuntimeWarning):
        df, sd = bar(np.full(5, np.inf), np.zeros(5))
    assert math.isnan(df) and math.isnan(sd)


def test_mbar_three_harmonic_states():
    ks = np.array([1.0, 2.0, 4.0])
    d, n = 2, 2000
    rng = np.random.default_rng(5)
    x = np.concatenate([harmonic_samples(k, d, n, rng) for k in ks])
    sq = (x**2).sum(1)
    u_kn = 0.5 * ks[:, None] * sq[None, :]
    f, sd = mbar(u_kn, [n, n, n])
    exact = 0.5 * d * np.log(ks / ks[0])
    assert f.shape == (3,) and sd.shape == (3,)
    assert f[0] == 0.0 and sd[0] == 0.0
    assert np.all(sd[1:] > 0) and np.all(sd[1:] < 0.05)
    np.testing.assert_array_less(np.abs(f - exact), 4 * sd + 1e-12)


def test_mbar_input_errors():
    u = np.zeros((2, 4))
    with pytest.raises(ValueError, match="sum"):
        mbar(u, [2, 3])
    with pytest.raises(ValueError, match="one entry per state"):
        mbar(u, [4])
    u[1, 0] = np.nan
    with pytest.raises(ValueError, match="1 NaN"):
        mbar(u, [2, 2])


# ----------------------------------------------------------------------------- profiles


def test_profile_unweighted_gaussian():
    rng = np.random.default_rng(6)
    x = rng.normal(size=100_000)
    centres, f = free_energy_profile(x, bins=40, range=(-3.0, 3.0))
    assert centres.shape == f.shape == (40,)
    # absolute (not shifted): F = x^2/2 + ln sqrt(2 pi)
    assert f[np.argmin(np.abs(centres))] == pytest.approx(0.5 * math.log(2 * math.pi) + centres[19] ** 2 / 2, abs=0.03)
    shifted, rmse = align_profiles(f, centres**2 / 2, max_f_ref=3.0)
    assert rmse < 0.03
    assert np.min(shifted) == pytest.approx(np.min(centres**2 / 2), abs=0.05)


def test_profile_reweighted_from_wider_gaussian():
    rng = np.random.default_rng(7)
    sq = 1.5
    x = rng.normal(0.0, sq, size=100_000)
    lw = log_weights(0.5 * x**2, gauss_logpdf(x, 0.0, sq))
    centres, f = free_energy_profile(torch.as_tensor(x), log_w=lw, bins=np.linspace(-3, 3, 41))
    ref = centres**2 / 2
    _, rmse = align_profiles(f, ref, max_f_ref=3.0)
    assert rmse < 0.05
    # without reweighting the wider Gaussian gives a visibly different profile
    _, f_raw = free_energy_profile(x, bins=np.linspace(-3, 3, 41))
    _, rmse_raw = align_profiles(f_raw, ref, max_f_ref=3.0)
    assert rmse_raw > 5 * rmse


def test_profile_empty_bins_are_inf_and_edges_validated():
    _, f = free_energy_profile(np.array([0.1, 0.2]), bins=[0.0, 1.0, 2.0])
    assert np.isfinite(f[0]) and np.isposinf(f[1])
    assert f[0] == pytest.approx(0.0)  # all mass in a bin of width 1 -> density 1
    with pytest.raises(ValueError, match="increasing"):
        free_energy_profile(np.array([0.1]), bins=[1.0, 0.0])
    with pytest.raises(ValueError, match="both finite"):
        align_profiles(np.array([np.inf, 1.0]), np.array([0.0, np.inf]))


# ----------------------------------------------------------------------------- bootstrap


def test_bootstrap_mean_of_gaussian():
    mu, n = 1.3, 2000
    x = np.random.default_rng(8).normal(mu, 1.0, size=n)
    res = bootstrap(np.mean, x, n_boot=1000, seed=0)
    assert isinstance(res, BootstrapResult)
    assert res.value == pytest.approx(x.mean())
    assert res.ci_low <= mu <= res.ci_high
    width = res.ci_high - res.ci_low
    assert width == pytest.approx(2 * 1.96 / math.sqrt(n), rel=0.2)
    # tighter (percentile noise with 1000 replicas is ~3%): tells a 95% from a 90% interval
    assert width == pytest.approx(2 * 1.96 * x.std() / math.sqrt(n), rel=0.08)
    assert res.std == pytest.approx(1 / math.sqrt(n), rel=0.1)
    d = res.as_dict()
    assert set(d) >= {"value", "ci_low", "ci_high", "std", "n_boot"} and d["n_boot"] == 1000


def test_bootstrap_seed_reproducible_and_lengths_checked():
    x = np.arange(50.0)
    assert bootstrap(np.mean, x, seed=3) == bootstrap(np.mean, x, seed=3)
    with pytest.raises(ValueError, match="same length"):
        bootstrap(lambda a, b: 0.0, np.zeros(3), np.zeros(4))
    with pytest.raises(ValueError, match="empty"):
        bootstrap(np.mean, np.zeros(0))


def test_bootstrap_nonfinite_replicas():
    # statistic is +inf whenever sample 0 is missing from the resample (~ (1-1/n)^n = 37% for n=20)
    x = np.arange(20.0)
    stat = lambda a: np.inf if not np.any(a == 0) else float(a.mean())  # noqa: E731
    res = bootstrap(stat, x, n_boot=300, seed=0)
    assert 0 < res.n_nonfinite < 150 and np.isfinite(res.ci_low) and np.isfinite(res.ci_high)
    # mostly non-finite -> NaN CI
    stat2 = lambda a: float(a.mean()) if np.sum(a == 0) >= 2 else np.nan  # noqa: E731
    res2 = bootstrap(stat2, x, n_boot=300, seed=0)
    assert res2.n_nonfinite > 150 and math.isnan(res2.ci_low) and math.isnan(res2.ci_high)
    # infinite point estimate -> degenerate CI at the value
    res3 = bootstrap(lambda a: np.inf, x, n_boot=10, seed=0)
    assert res3.ci_low == res3.ci_high == math.inf


# ----------------------------------------------------------------------------- input errors


def test_nan_log_weights_raise_with_count():
    lw = np.array([0.0, np.nan, 1.0, np.nan])
    for fn in (ess, normalized_weights, lambda a: free_energy_difference(a, [1, 0, 0, 0], [0, 1, 1, 1])):
        with pytest.raises(ValueError, match="2 NaN"):
            fn(lw)
    with pytest.raises(ValueError, match="NaN"):
        log_weights(np.array([np.nan]), np.zeros(1))
    with pytest.raises(ValueError, match="NaN"):
        fep(np.array([0.0, np.nan]))
    with pytest.raises(ValueError, match="NaN"):
        bar(np.array([0.0, np.nan]), np.zeros(2))


def test_mismatched_lengths_raise():
    with pytest.raises(ValueError, match="same number of samples"):
        log_weights(np.zeros(3), np.zeros(4))
    with pytest.raises(ValueError, match="length"):
        free_energy_difference(np.zeros(3), np.ones(2, bool), np.ones(3, bool))
    with pytest.raises(ValueError, match="same number of samples"):
        free_energy_profile(np.zeros(3), log_w=np.zeros(2))
    with pytest.raises(ValueError, match="same shape"):
        align_profiles(np.zeros(3), np.zeros(4))


def test_empty_and_bad_inputs_raise():
    for fn in (ess, normalized_weights, fep, free_energy_profile):
        with pytest.raises(ValueError, match="empty"):
            fn(np.zeros(0))
    with pytest.raises(ValueError, match="empty"):
        bar(np.zeros(0), np.zeros(3))
    with pytest.raises(ValueError, match="all 3"):
        ess(np.full(3, -np.inf))
    with pytest.raises(ValueError, match=r"\+inf"):
        ess(np.array([0.0, np.inf]))
    with pytest.raises(ValueError, match="one-dimensional"):
        ess(np.zeros((2, 2)))


def test_estimators_do_not_import_heavy_layers():
    code = (
        "import sys, bgexp.estimators\n"
        "bad = [m for m in sys.modules if m.split('.')[0] in ('lightning', 'pytorch_lightning', 'hydra')"
        " or m.startswith(('bgexp.flows', 'bgexp.targets', 'bgexp.training'))]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_histogram_kl_against_analytic_values():
    from bgexp.estimators import histogram_kl

    p = np.array([[0.5, 0.5], [0.0, 0.0]])
    assert histogram_kl(p, p) == 0.0
    q = np.array([[0.25, 0.25], [0.25, 0.25]])
    assert histogram_kl(p, q) == pytest.approx(np.log(2.0))  # sum 0.5 ln(0.5/0.25)
    assert histogram_kl(2 * p, 4 * q) == pytest.approx(np.log(2.0))  # normalised first
    # a reference bin the model misses: finite, large penalty set by eps
    miss = np.array([[1.0, 0.0], [0.0, 0.0]])
    assert histogram_kl(np.array([[0.5, 0.0], [0.5, 0.0]]), miss, eps=1e-10) == pytest.approx(
        0.5 * np.log(0.5 / 1.0) + 0.5 * np.log(0.5 / 1e-10), rel=1e-6)
    with pytest.raises(ValueError, match="differ in size"):
        histogram_kl(p, np.ones(3))
    with pytest.raises(ValueError, match="non-negative"):
        histogram_kl(-p, q)


def test_weighted_histogram2d_reweights_to_the_target_probabilities():
    from bgexp.estimators import weighted_histogram2d

    rng = np.random.default_rng(0)
    n = 200_000
    a, b = rng.uniform(0, 1, n), rng.uniform(0, 1, n)
    # target density 4 a b on the unit square: weights w = 4 a b against the uniform proposal
    log_w = np.log(4 * a * b)
    edges = np.array([0.0, 0.5, 1.0])
    p = weighted_histogram2d(a, b, log_w, edges, edges)
    exact = np.outer([0.25, 0.75], [0.25, 0.75])  # integral of 2a over [0, .5] and [.5, 1]
    np.testing.assert_allclose(p, exact, atol=5e-3)
    assert p.sum() == pytest.approx(1.0)
    # samples outside the edges keep their weight in the normalisation
    p_half = weighted_histogram2d(a, b, np.zeros(n), [0.0, 0.5], [0.0, 1.0])
    assert p_half.sum() == pytest.approx(0.5, abs=5e-3)


def test_quadrature_kl_of_two_von_mises_densities_is_analytic():
    """KL(VM(mu1, k1) || VM(mu2, k2)) = ln(I0(k2)/I0(k1)) + A(k1) (k1 - k2 cos(mu1 - mu2)),
    A = I1/I0 (mean resultant length); the midpoint rule on the circle is spectrally accurate."""
    from scipy.special import i0, i1

    from bgexp.estimators import quadrature_kl

    mu1, k1, mu2, k2 = 0.3, 2.0, -1.1, 0.7
    n = 256
    theta = -np.pi + (np.arange(n) + 0.5) * 2 * np.pi / n
    log_p = k1 * np.cos(theta - mu1) - np.log(2 * np.pi * i0(k1))
    log_q = k2 * np.cos(theta - mu2) - np.log(2 * np.pi * i0(k2))
    exact = np.log(i0(k2) / i0(k1)) + i1(k1) / i0(k1) * (k1 - k2 * np.cos(mu1 - mu2))
    assert quadrature_kl(log_p, log_q, 2 * np.pi / n) == pytest.approx(exact, abs=1e-12)
    assert quadrature_kl(log_p, log_p, 2 * np.pi / n) == pytest.approx(0.0, abs=1e-14)
    with pytest.raises(ValueError, match="differ in size"):
        quadrature_kl(log_p, log_q[:-1], 1.0)


def test_bootstrap_independent_resamples_each_sample_at_its_own_size():
    """The difference of the means of two independent samples of different sizes: the bootstrap std
    must match sqrt(s_a^2 / n_a + s_b^2 / n_b) (not a paired resampling, which needs equal sizes)."""
    from bgexp.estimators import bootstrap_independent

    rng = np.random.default_rng(0)
    a, b = rng.normal(0.0, 1.0, 400), rng.normal(1.0, 3.0, 900)
    result = bootstrap_independent(lambda x, y: y.mean() - x.mean(), a, b, n_boot=2000, seed=1)
    expected = np.sqrt(a.var(ddof=1) / a.size + b.var(ddof=1) / b.size)
    assert result.value == pytest.approx(b.mean() - a.mean())
    assert result.std == pytest.approx(expected, rel=0.08)
    assert result.ci_low < result.value < result.ci_high
    with pytest.raises(ValueError, match="empty"):
        bootstrap_independent(np.mean, np.array([]))
