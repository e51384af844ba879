"""bgexp.samplers: MALA/HMC invariance on analytic targets and spaces, SMC/AIS normalizers and free
energies against exact answers, replicate error bars and their coverage, named errors before any
energy evaluation, non-finite energies, and the meaning of the final ESS."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import stats
from scipy.special import i0e, i1e

from bgexp.estimators import ess as estimators_ess
from bgexp.samplers import (
    HMC,
    MALA,
    BudgetError,
    DegenerateWeightsError,
    NoGradientError,
    SamplerError,
    SamplerSettingError,
    UnsupportedSpaceError,
    ais,
    delta_f_estimate,
    log_normalizer_estimate,
    run_replicates,
    smc,
)
from bgexp.spaces import Space


def gen(seed: int) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed(seed)
    return g


def kernel_for(name: str, space: Space, **kw):
    if name == "mala":
        return MALA(space, step_size=0.5, **kw)
    return HMC(space, step_size=0.3, n_leapfrog=4, **kw)


class Counting:
    """A log-density wrapper counting the points it is evaluated on and the non-finite values."""

    def __init__(self, fn):
        self.fn = fn
        self.calls = 0
        self.points = 0
        self.nonfinite = 0

    def __call__(self, y):
        self.calls += 1
        self.points += int(y.shape[0])
        out = self.fn(y)
        self.nonfinite += int((~torch.isfinite(out.detach())).sum())
        return out


def assert_moments(y: torch.Tensor, exact: dict, n_se: float = 4.0) -> None:
    """Each statistic's sample mean over independent chains agrees with its exact expectation within
    n_se standard errors (the chains are independent, started from independent exact samples)."""
    for name, (f, value) in exact.items():
        v = f(y.double())
        se = float(v.std() / math.sqrt(v.numel()))
        err = float(v.mean()) - value
        assert abs(err) < n_se * se, f"{name}: {float(v.mean()):.4f} vs exact {value:.4f} ({err / se:+.1f} SE)"


def run_chains(kernel, y, log_density, g, warmup=30, steps=60):
    state = kernel.warmup(y, log_density, warmup, g)
    assert not kernel.adapt
    eps = kernel.step_size
    state, rates = kernel.run(state, log_density, steps, g)
    assert kernel.step_size == eps  # frozen
    return state, float(np.mean(rates))


# ---------------------------------------------------------------------------------------------
# 1. invariance of the kernels
# ---------------------------------------------------------------------------------------------
def gaussian_moments(mean, cov):
    return {
        "E y0": (lambda y: y[:, 0], mean[0]), "E y1": (lambda y: y[:, 1], mean[1]),
        "E y0^2": (lambda y: y[:, 0] ** 2, cov[0][0] + mean[0] ** 2),
        "E y1^2": (lambda y: y[:, 1] ** 2, cov[1][1] + mean[1] ** 2),
        "E y0 y1": (lambda y: y[:, 0] * y[:, 1], cov[0][1] + mean[0] * mean[1]),
    }


@pytest.mark.parametrize("kernel_name", ["mala", "hmc"])
def test_kernel_keeps_correlated_gaussian_invariant(kernel_name):
    g = gen(1)
    mean = torch.tensor([1.0, -2.0])
    cov = torch.tensor([[1.0, 0.9 * 0.5], [0.9 * 0.5, 0.25]])  # correlation 0.9, scales 1 and 0.5
    dist = torch.distributions.MultivariateNormal(mean, cov)
    chol = torch.linalg.cholesky(cov)
    y0 = mean + torch.randn(8000, 2, generator=g) @ chol.T
    kernel = kernel_for(kernel_name, Space(2))
    state, acc = run_chains(kernel, y0, dist.log_prob, g)
    assert abs(acc - kernel.target_accept) < 0.1
    assert_moments(state.y, gaussian_moments(mean.tolist(), cov.tolist()))


@pytest.mark.parametrize("kernel_name", ["mala", "hmc"])
def test_kernel_keeps_gaussian_mixture_invariant(kernel_name):
    g = gen(2)
    w = torch.tensor([0.3, 0.7])
    means = torch.tensor([[-2.0, 0.0], [2.0, 1.0]])
    covs = torch.tensor([[[0.5, 0.2], [0.2, 0.4]], [[0.3, -0.1], [-0.1, 0.6]]])
    comps = torch.distributions.MultivariateNormal(means, covs)

    def log_p(y):
        return torch.logsumexp(torch.log(w) + comps.log_prob(y.unsqueeze(1)), dim=1)

    n = 8000
    k = torch.multinomial(w, n, replacement=True, generator=g)
    y0 = means[k] + (torch.linalg.cholesky(covs)[k] @ torch.randn(n, 2, 1, generator=g)).squeeze(-1)
    kernel = kernel_for(kernel_name, Space(2))
    state, _ = run_chains(kernel, y0, log_p, g)
    m = (w[:, None] * means).sum(0)
    second = (w[:, None, None] * (covs + means[:, :, None] * means[:, None, :])).sum(0)
    exact = {
        "E y0": (lambda y: y[:, 0], float(m[0])), "E y1": (lambda y: y[:, 1], float(m[1])),
        "E y0^2": (lambda y: y[:, 0] ** 2, float(second[0, 0])),
        "E y1^2": (lambda y: y[:, 1] ** 2, float(second[1, 1])),
        "E y0 y1": (lambda y: y[:, 0] * y[:, 1], float(second[0, 1])),
        "P(y0 > 0)": (lambda y: (y[:, 0] > 0).double(), float(
            w[0] * (1 - stats.norm.cdf(2 / math.sqrt(0.5))) + w[1] * stats.norm.cdf(2 / math.sqrt(0.3)))),
    }
    assert_moments(state.y, exact)


@pytest.mark.parametrize("kernel_name", ["mala", "hmc"])
def test_kernel_on_torus_stays_wrapped_and_keeps_von_mises(kernel_name):
    torch.manual_seed(3)
    g = gen(3)
    mu = torch.tensor([3.0, -2.8])  # near the seam at +-pi: wrapping is exercised constantly
    kappa = torch.tensor([2.0, 0.7])
    y0 = torch.distributions.VonMises(mu, kappa).sample((6000,))
    y0 = torch.remainder(y0 + math.pi, 2 * math.pi) - math.pi

    def log_p(y):
        return (kappa * torch.cos(y - mu)).sum(dim=1)

    kernel = kernel_for(kernel_name, Space(2, circular=(True, True)))
    state, _ = run_chains(kernel, y0, log_p, g, warmup=20, steps=40)
    y = state.y
    assert bool((y >= -math.pi).all()) and bool((y < math.pi).all())
    assert kernel.step_size <= math.pi
    a = i1e(kappa.numpy()) / i0e(kappa.numpy())  # mean resultant length of a von Mises
    exact = {}
    for j in range(2):
        exact[f"E cos y{j}"] = (lambda y, j=j: torch.cos(y[:, j]), float(a[j] * math.cos(mu[j])))
        exact[f"E sin y{j}"] = (lambda y, j=j: torch.sin(y[:, j]), float(a[j] * math.sin(mu[j])))
    assert_moments(y, exact)


@pytest.mark.parametrize("kernel_name", ["mala", "hmc"])
def test_kernel_on_particles_stays_mean_free(kernel_name):
    g = gen(4)
    p, sd = 4, 3
    space = Space(p * sd, particles=p, spatial_dim=sd)
    c = torch.arange(p * sd, dtype=torch.float32) / 6.0  # not mean-free: its gradient has a drift part

    def project(v):
        s = v.reshape(v.shape[0], p, sd)
        return (s - s.mean(1, keepdim=True)).reshape(v.shape)

    def log_p(y):  # restricted to the mean-free subspace: N(P c, P), P the projector
        return -0.5 * (y - c).pow(2).sum(dim=1)

    pc = project(c[None])[0]
    y0 = pc + project(torch.randn(6000, p * sd, generator=g))
    kernel = kernel_for(kernel_name, space)
    state, _ = run_chains(kernel, y0, log_p, g, warmup=20, steps=40)
    y = state.y
    com = y.reshape(-1, p, sd).mean(dim=1)
    assert float(com.abs().max()) < 1e-6
    exact = {f"E y{j}": (lambda y, j=j: y[:, j], float(pc[j])) for j in (0, 5, 11)}
    exact["E |y - Pc|^2"] = (lambda y: (y - pc.double()).pow(2).sum(1), float((p - 1) * sd))
    assert_moments(y, exact)


def test_kernel_adapts_step_size_towards_target_acceptance():
    g = gen(5)
    log_p = lambda y: -0.5 * (y / 0.1).pow(2).sum(dim=1)  # narrow: the initial step 1.0 is far too large
    kernel = MALA(Space(3), step_size=1.0)
    state = kernel.warmup(0.1 * torch.randn(2000, 3, generator=g), log_p, 200, g)
    _, rates = kernel.run(state, log_p, 20, g)
    assert 0.01 < kernel.step_size < 0.3
    assert abs(np.mean(rates) - 0.574) < 0.08


# ---------------------------------------------------------------------------------------------
# 2. log Z of N(0, I) -> N(m, s^2 I): exact value d log s
# ---------------------------------------------------------------------------------------------
def shifted_gaussian(m: float, s: float):
    return (lambda y: -0.5 * y.pow(2).sum(dim=1)), (lambda y: -(y - m).pow(2).sum(dim=1) / (2 * s * s))


@pytest.mark.parametrize("d, kernel_name", [(10, "mala"), (10, "hmc"), (50, "mala")])
def test_smc_recovers_log_z_of_a_shifted_gaussian(d, kernel_name):
    m, s = 1.0, 0.5
    lp0, lp1 = shifted_gaussian(m, s)
    space = Space(d)

    def run_one(g):
        return smc(torch.randn(400, d, generator=g), lp0, lp1, space, kernel_for(kernel_name, space),
                   n_steps_per_level=3, cess_target=0.95, generator=g)

    results = run_replicates(run_one, 8, seed=d)
    est = log_normalizer_estimate(results)
    exact = d * math.log(s)
    assert est.std_err < 0.1  # a precise estimate, so the comparison below has teeth
    assert abs(est.value - exact) < 4 * est.std_err, (est.value, exact, est.std_err)
    assert all(r.stop_reason == "complete" and r.history[-1].b == 1.0 for r in results)
    assert any(lvl.resampled for r in results for lvl in r.history)
    assert all(lvl.cess == pytest.approx(0.95, abs=1e-6) for r in results for lvl in r.history[:-1])


def test_smc_with_the_adaptive_schedule_fixed_recovers_log_z_in_d50():
    """Two passes: the adaptive run's schedule, fixed, gives an estimate unbiased for Z."""
    d, m, s = 50, 1.0, 0.5
    lp0, lp1 = shifted_gaussian(m, s)
    space = Space(d)
    pilot = smc(torch.randn(400, d, generator=gen(0)), lp0, lp1, space, MALA(space, 0.5), n_steps_per_level=3,
                cess_target=0.95, generator=gen(0))
    schedule = pilot.schedule
    assert len(schedule) > 20 and schedule[-1] == 1.0

    def run_one(g):
        return smc(torch.randn(400, d, generator=g), lp0, lp1, space, MALA(space, 0.5), n_steps_per_level=3,
                   schedule=schedule, generator=g)

    results = run_replicates(run_one, 8, seed=500)
    est = log_normalizer_estimate(results)
    assert est.std_err < 0.1
    assert abs(est.value - d * math.log(s)) < 4 * est.std_err, (est.value, d * math.log(s), est.std_err)
    assert all(r.schedule == schedule for r in results)


def test_ais_recovers_log_z_without_resampling():
    d, m, s = 10, 1.0, 0.5
    lp0, lp1 = shifted_gaussian(m, s)
    space = Space(d)
    schedule = (np.linspace(0, 1, 41)[1:] ** 2).tolist()

    def run_one(g):
        return ais(torch.randn(400, d, generator=g), lp0, lp1, space, MALA(space, 0.5),
                   schedule=schedule, n_steps_per_level=2, generator=g)

    results = run_replicates(run_one, 8, seed=7)
    est = log_normalizer_estimate(results)
    assert est.std_err < 0.15
    assert abs(est.value - d * math.log(s)) < 4 * est.std_err
    assert not any(lvl.resampled for r in results for lvl in r.history)
    assert [lvl.b for lvl in results[0].history] == schedule


def test_same_code_serves_x_space_and_latent_space():
    """x-space: pi_0 = q (the flow's density); z-space: pi_0 = the prior, pi_1 = the pull-back
    -u(F(z)) + log|det dF/dz|.  Both estimate log Z_u (here of N(1, 0.5^2) unnormalised in d = 5),
    since Z_q = Z_prior = 1."""
    d, m, s, a, c = 5, 1.0, 0.5, 0.8, 0.6  # the "flow" F(z) = a + c z is deliberately imperfect
    log_u = lambda x: -(x - m).pow(2).sum(dim=1) / (2 * s * s)
    log_prior = lambda z: -0.5 * z.pow(2).sum(dim=1) - 0.5 * d * math.log(2 * math.pi)
    log_q = lambda x: log_prior((x - a) / c) - d * math.log(c)
    pullback = lambda z: log_u(a + c * z) + d * math.log(c)
    exact = 0.5 * d * math.log(2 * math.pi * s * s)
    space = Space(d)
    for coords in ("x", "z"):
        def run_one(g, coords=coords):
            z0 = torch.randn(300, d, generator=g)
            if coords == "x":
                return smc(a + c * z0, log_q, log_u, space, MALA(space, 0.3), n_steps_per_level=3,
                           cess_target=0.9, generator=g)
            return smc(z0, log_prior, pullback, space, MALA(space, 0.5), n_steps_per_level=3,
                       cess_target=0.9, generator=g)

        est = log_normalizer_estimate(run_replicates(run_one, 6, seed=11))
        assert est.std_err < 0.1
        assert abs(est.value - exact) < 4 * est.std_err, (coords, est.value, exact)


def test_smc_on_a_torus_and_on_a_mean_free_particle_space():
    """Circular: uniform on the torus -> von Mises, Z_1 / Z_0 = prod_j I0(kappa_j).  Particles:
    N(0, I) -> N(0, s^2 I) on the mean-free subspace of dimension (P - 1) D: Z_1 / Z_0 = s^((P-1) D)."""
    torus = Space(2, circular=(True, True))
    mu, kappa = torch.tensor([3.0, -1.0]), torch.tensor([2.0, 0.7])

    def run_torus(g):
        y0 = (torch.rand(400, 2, generator=g) * 2 - 1) * math.pi
        return smc(y0, lambda y: 0.0 * y.sum(dim=1), lambda y: (kappa * torch.cos(y - mu)).sum(dim=1), torus,
                   MALA(torus, 0.5), n_steps_per_level=3, cess_target=0.9, generator=g)

    results = run_replicates(run_torus, 6, seed=31)
    assert all(bool((r.y >= -math.pi).all() and (r.y < math.pi).all()) for r in results)
    est = log_normalizer_estimate(results)
    exact = float(np.log(i0e(kappa.numpy())).sum() + kappa.sum())
    assert est.std_err < 0.05 and abs(est.value - exact) < 4 * est.std_err, (est.value, exact)

    p, sd, s = 5, 3, 0.7
    particles = Space(p * sd, particles=p, spatial_dim=sd)

    def run_particles(g):
        y0 = torch.randn(400, p * sd, generator=g).reshape(400, p, sd)
        y0 = (y0 - y0.mean(dim=1, keepdim=True)).reshape(400, p * sd)
        return smc(y0, lambda y: -0.5 * y.pow(2).sum(dim=1), lambda y: -y.pow(2).sum(dim=1) / (2 * s * s),
                   particles, HMC(particles, 0.3, n_leapfrog=3), n_steps_per_level=2, cess_target=0.9, generator=g)

    results = run_replicates(run_particles, 6, seed=32)
    assert max(float(r.y.reshape(-1, p, sd).mean(dim=1).abs().max()) for r in results) < 1e-6
    est = log_normalizer_estimate(results)
    exact = (p - 1) * sd * math.log(s)
    assert est.std_err < 0.05 and abs(est.value - exact) < 4 * est.std_err, (est.value, exact)


def test_smc_from_weighted_particles():
    """y0 ~ q = N(0, 1.3^2 I) (normalised) with initial weights towards pi_0 = exp(-|y|^2/2):
    log_normalizer then estimates log Z_1 / Z_q = log Z_1 = (d/2) log(2 pi s^2)."""
    d, m, s, sq = 4, 1.0, 0.5, 1.3
    lp0, lp1 = shifted_gaussian(m, s)
    space = Space(d)

    def run_one(g):
        y0 = sq * torch.randn(400, d, generator=g)
        log_q = -0.5 * (y0 / sq).pow(2).sum(dim=1) - d * math.log(sq) - 0.5 * d * math.log(2 * math.pi)
        return smc(y0, lp0, lp1, space, MALA(space, 0.5), n_steps_per_level=3, cess_target=0.9,
                   log_weights0=lp0(y0) - log_q, generator=g)

    est = log_normalizer_estimate(run_replicates(run_one, 6, seed=41))
    exact = 0.5 * d * math.log(2 * math.pi * s * s)
    assert est.std_err < 0.05 and abs(est.value - exact) < 4 * est.std_err, (est.value, exact)


# ---------------------------------------------------------------------------------------------
# 3. Delta F between the wells of a mixture
# ---------------------------------------------------------------------------------------------
W_A, MU_A, SD_A = 0.25, -2.0, 0.4
W_B, MU_B, SD_B = 0.75, 2.5, 0.8
# exact Delta F(a -> b) for a = {y < 0}, b = {y > 0}: -ln 3 up to the tails crossing 0
P_B = W_A * stats.norm.cdf(MU_A / SD_A) + W_B * stats.norm.cdf(MU_B / SD_B)
DF_EXACT = -math.log(P_B / (1.0 - P_B))


def mixture_log_p(y):
    comps = torch.stack([math.log(W_A) - 0.5 * ((y[:, 0] - MU_A) / SD_A) ** 2 - math.log(SD_A),
                         math.log(W_B) - 0.5 * ((y[:, 0] - MU_B) / SD_B) ** 2 - math.log(SD_B)], dim=1)
    return torch.logsumexp(comps, dim=1)


def broad_log_p(y):
    return -0.5 * (y[:, 0] / 3.0) ** 2


def mixture_smc(n, g, steps=3, cess=0.9):
    y0 = 3.0 * torch.randn(n, 1, generator=g)
    return smc(y0, broad_log_p, mixture_log_p, Space(1), MALA(Space(1), 0.5), n_steps_per_level=steps,
               cess_target=cess, generator=g)


def test_smc_delta_f_between_mixture_wells():
    assert abs(DF_EXACT + math.log(3)) < 5e-3  # the tail of the right well crossing 0
    results = run_replicates(lambda g: mixture_smc(1000, g), 10, seed=21)
    est = delta_f_estimate(results, lambda y: y[:, 0] < 0, lambda y: y[:, 0] > 0)
    assert est.std_err < 0.05
    assert abs(est.value - DF_EXACT) < 4 * est.std_err, (est.value, DF_EXACT, est.std_err)
    # log Z of the normalised mixture against the normalised broad Gaussian ratio: Z_1/Z_0 = sqrt(2 pi)/(3 sqrt(2 pi))
    z = log_normalizer_estimate(results)
    assert abs(z.value - math.log(1 / 3.0)) < 4 * z.std_err


# ---------------------------------------------------------------------------------------------
# 4. coverage of the replicate intervals
# ---------------------------------------------------------------------------------------------
def test_replicate_interval_coverage_of_log_z():
    d, m, s = 2, 1.0, 0.6
    lp0, lp1 = shifted_gaussian(m, s)
    space = Space(d)
    exact = d * math.log(s)

    def run_one(g):
        return smc(torch.randn(100, d, generator=g), lp0, lp1, space, MALA(space, 0.8),
                   n_steps_per_level=2, cess_target=0.8, generator=g)

    n_exp, covered, widths = 100, 0, []
    for e in range(n_exp):
        est = log_normalizer_estimate(run_replicates(run_one, 5, seed=1000 + e), confidence=0.95)
        covered += est.covers(exact)
        widths.append(est.ci_high - est.ci_low)
    assert covered / n_exp >= 0.9, covered
    assert np.median(widths) < 0.5  # informative intervals, not trivially wide


def test_replicate_interval_coverage_of_delta_f():
    n_exp, covered = 60, 0
    for e in range(n_exp):
        res = run_replicates(lambda g: mixture_smc(150, g, steps=2, cess=0.8), 5, seed=5000 + e)
        est = delta_f_estimate(res, lambda y: y[:, 0] < 0, lambda y: y[:, 0] > 0, confidence=0.95)
        covered += est.covers(DF_EXACT)
    assert covered / n_exp >= 0.9, covered


def test_mean_of_log_z_is_biased_low_and_log_mean_exp_is_not():
    """With few particles (plain importance sampling, one level) Var(log Z-hat) is large: the mean
    of log Z-hat lies below log Z by about Var/2, the log of the mean of Z-hat does not."""
    d, m, s = 2, 1.0, 0.5
    lp0, lp1 = shifted_gaussian(m, s)
    space = Space(d)
    exact = d * math.log(s)
    results = run_replicates(lambda g: smc(torch.randn(10, d, generator=g), lp0, lp1, space, MALA(space),
                                           n_steps_per_level=0, schedule=[1.0], generator=g), 400, seed=3)
    lme = log_normalizer_estimate(results)
    ml = log_normalizer_estimate(results, method="mean_log")
    var = float(np.var(ml.values, ddof=1))
    assert lme.covers(exact)
    assert ml.ci_high < exact
    assert 0.25 * var < exact - ml.value < var


def test_replicates_are_reproducible_and_independent():
    lp0, lp1 = shifted_gaussian(1.0, 0.5)
    space = Space(3)
    run_one = lambda g: smc(torch.randn(50, 3, generator=g), lp0, lp1, space, MALA(space), n_steps_per_level=1,
                            cess_target=0.8, generator=g)
    a = run_replicates(run_one, 3, seed=9)
    b = run_replicates(run_one, 3, seed=9)
    assert [r.log_normalizer for r in a] == [r.log_normalizer for r in b]
    assert len({r.log_normalizer for r in a}) == 3


# ---------------------------------------------------------------------------------------------
# 5. bad input: named errors before any energy evaluation; non-finite energies
# ---------------------------------------------------------------------------------------------
def test_bad_settings_are_named_errors_before_any_energy_evaluation():
    space = Space(2)
    lp0, lp1 = shifted_gaussian(1.0, 0.5)
    y0 = torch.randn(100, 2, generator=gen(0))

    def check(err, **kw):
        e0, e1 = Counting(lp0), Counting(lp1)
        args = dict(y0=y0, log_pi0=e0, log_pi1=e1, space=space, kernel=MALA(space), n_steps_per_level=5)
        args.update(kw)
        with pytest.raises(err) as info:
            smc(**args)
        assert e1.points == 0 and e0.points == 0
        assert isinstance(info.value, SamplerError) and isinstance(info.value, ValueError)
        return info.value

    check(BudgetError, y0=torch.zeros(0, 2))
    msg = str(check(BudgetError, max_energy_evals=599))  # 100 initial + 100 x 5 x 1 for one level
    assert "599" in msg and "600" in msg
    check(BudgetError, max_energy_evals=2599, kernel=HMC(space, n_leapfrog=5))  # 100 + 100 x 5 x 5 = 2600
    for bad in (0.0, 1.0, 1.5, -0.1):
        check(SamplerSettingError, cess_target=bad)
    check(SamplerSettingError, resample_threshold=1.5)
    check(SamplerSettingError, schedule=[0.5, 0.3, 1.0])
    check(SamplerSettingError, schedule=[0.5, 0.9])
    check(SamplerSettingError, y0=torch.randn(10, 3))
    check(SamplerSettingError, kernel=MALA(Space(2, circular=(True, True))))
    no_grad = Counting(lambda y: -(y.detach() ** 2).sum(dim=1))
    with pytest.raises(NoGradientError):
        smc(y0, lp0, no_grad, space, MALA(space))
    assert no_grad.points == 0
    rigid = Space(7, molecules=1, box=(1.0, 1.0, 1.0))
    with pytest.raises(UnsupportedSpaceError):
        MALA(rigid)
    with pytest.raises(UnsupportedSpaceError):
        HMC(rigid)
    check(UnsupportedSpaceError, space=rigid, y0=torch.randn(10, 7))


def test_no_gradient_is_a_named_error_before_any_kernel_step():
    for fn in (lambda y: torch.as_tensor((y.detach() ** 2).sum(dim=1).numpy()),  # no autograd history
               lambda y: torch.zeros(y.shape[0], requires_grad=True)):  # does not depend on y
        for kernel in (MALA(Space(2)), HMC(Space(2))):
            with pytest.raises(NoGradientError):
                kernel.step(torch.randn(5, 2), fn)


def test_budget_is_respected_and_the_run_finishes_by_reweighting():
    d = 10
    lp0, lp1 = shifted_gaussian(1.0, 0.5)
    e1 = Counting(lp1)
    space = Space(d)
    budget = 200 + 3 * 200 * 2 + 50  # the initial evaluation and 3 levels of 2 MALA steps
    res = smc(torch.randn(200, d, generator=gen(1)), lp0, e1, space, MALA(space), n_steps_per_level=2,
              cess_target=0.99, max_energy_evals=budget, generator=gen(1), progress=True)
    assert res.budget_exhausted and res.stop_reason == "budget"
    assert res.n_energy_evals == e1.points == 200 + 3 * 200 * 2 <= budget
    assert res.history[-1].b == 1.0 and res.history[-1].n_moves == 0
    assert sum(lvl.n_moves > 0 for lvl in res.history) == 3
    assert math.isfinite(res.log_normalizer)


def test_nonfinite_energies_are_counted_and_get_weight_zero():
    """log pi_1 = N(0.5, 1) restricted to y0 < 1.5, NaN outside: counted, weight zero, and the
    normalizer is that of the truncated target, Z_1 / Z_0 = Phi(1)."""
    d = 2

    def lp1(y):
        out = -0.5 * (y - 0.5).pow(2).sum(dim=1)
        return torch.where(y[:, 0] < 1.5, out, torch.full_like(out, float("nan")))

    e1 = Counting(lp1)
    space = Space(d)
    res = smc(torch.randn(4000, d, generator=gen(2)), lambda y: -0.5 * y.pow(2).sum(dim=1), e1, space,
              MALA(space, 0.8), n_steps_per_level=3, cess_target=0.9, generator=gen(2))
    assert res.n_nonfinite == e1.nonfinite > 0
    assert res.n_energy_evals == e1.points
    first = res.history[0]
    assert first.ess < 0.95  # the particles beyond the cut lost their weight at the first level
    lw = res.log_weights
    outside = res.y[:, 0] >= 1.5
    assert bool(torch.isneginf(lw[outside.cpu()]).all())
    p = stats.norm.cdf(1.0)
    se = math.sqrt((1 - p) / (p * 4000))
    assert abs(res.log_normalizer - math.log(p)) < 5 * se


def test_all_nonfinite_energies_are_a_named_error_not_a_crash():
    space = Space(2)
    with pytest.raises(DegenerateWeightsError):
        smc(torch.randn(20, 2), lambda y: -y.pow(2).sum(1), lambda y: y.sum(1) * float("nan"), space,
            MALA(space), n_steps_per_level=1)


# ---------------------------------------------------------------------------------------------
# 6. the final ESS is that of the final weights before any last resampling
# ---------------------------------------------------------------------------------------------
def test_final_ess_is_that_of_the_final_weights_before_any_resampling():
    d = 5
    lp0, lp1 = shifted_gaussian(0.7, 0.6)
    space = Space(d)
    y0 = torch.randn(500, d, generator=gen(8))
    # one level 0 -> 1 and a threshold that resamples whenever ESS < 1: the final weights are the
    # plain importance weights of y0, whatever the moves after them
    res = smc(y0, lp0, lp1, space, MALA(space), n_steps_per_level=3, schedule=[1.0], resample_threshold=1.0,
              generator=gen(8))
    w_is = lp1(y0).double() - lp0(y0).double()
    expected = estimators_ess(w_is)
    assert expected < 0.6
    assert res.ess == pytest.approx(expected, rel=1e-9)
    assert res.ess == pytest.approx(estimators_ess(res.log_weights), rel=1e-12)
    assert not res.history[-1].resampled and res.history[-1].ess == res.ess
    assert torch.allclose(res.log_weights, w_is, atol=1e-6)  # log mean exp = the IS estimate of log Z
    assert res.log_normalizer == pytest.approx(float(torch.logsumexp(w_is, 0) - math.log(500)))
    assert not torch.equal(res.y, y0)  # the moves happened, after the weighting
    # two levels with resampling forced at the first: only the last one keeps its weights
    res2 = smc(y0, lp0, lp1, space, MALA(space), n_steps_per_level=3, schedule=[0.5, 1.0], resample_threshold=1.0,
               generator=gen(8))
    assert res2.history[0].resampled and not res2.history[1].resampled
    assert res2.ess == res2.history[-1].ess == pytest.approx(estimators_ess(res2.log_weights), rel=1e-12)
    assert res2.ess < 1.0
    assert float(torch.logsumexp(res2.log_weights, 0) - math.log(500)) == pytest.approx(res2.log_normalizer)


def test_result_reports_time_split_and_history():
    d = 4
    lp0, lp1 = shifted_gaussian(1.0, 0.5)
    space = Space(d)
    res = smc(torch.randn(100, d, generator=gen(3)), lp0, lp1, space, HMC(space, n_leapfrog=3),
              n_steps_per_level=2, cess_target=0.9, generator=gen(3))
    assert res.wall_s >= res.model_s > 0 and res.overhead_s == pytest.approx(res.wall_s - res.model_s)
    assert 0 < res.overhead_fraction < 1
    table = res.history_table()
    assert table["b"][-1] == 1.0 and all(b2 > b1 for b1, b2 in zip(table["b"], table["b"][1:]))
    assert all(0 < c <= 1 for c in table["cess"][:-1])
    assert all(c == pytest.approx(0.9, abs=1e-6) for c in table["cess"][:-1])  # adaptive: CESS on target
    assert res.n_energy_evals == 100 + sum(lvl.n_moves for lvl in res.history) * 100 * 3
    assert res.resample(gen(0)).shape == (100, d)


def test_samplers_import_neither_lightning_nor_hydra_nor_training():
    import subprocess
    import sys

    code = ("import sys, bgexp.samplers; bad = [m for m in sys.modules if m.split('.')[0] in "
            "('lightning', 'pytorch_lightning', 'hydra') or m.startswith(('bgexp.training', 'bgexp.evaluation'))]; "
            "print(bad); sys.exit(1 if bad else 0)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
