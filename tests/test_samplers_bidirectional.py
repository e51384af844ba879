"""bgexp.samplers.bidirectional: forward and reverse AIS works on one frozen protocol, BAR on them.

Against exact answers: log Z of a shifted, narrowed Gaussian (d = 10) without bias and with a
std that matches the scatter of replicates; the interval's coverage; the restricted (per-state)
normaliser of one well of a mixture; Crooks' theorem itself (no moves: the reverse works are the
forward ones mirrored, so BAR is exact for any protocol); named errors for bad protocols."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import stats

from bgexp.samplers import MALA, HMC, SamplerSettingError, smc
from bgexp.samplers.bidirectional import AnnealingProtocol, annealed_works, bidirectional_ais, pilot_protocol
from bgexp.spaces import Space

D, M, S = 10, 1.0, 0.5
EXACT = 0.5 * D * math.log(2 * math.pi * S * S)  # log Z_1 / Z_0 with pi_0 = N(0, I) normalised


def log_pi0(y):
    return -0.5 * (y ** 2).sum(-1) - 0.5 * y.shape[1] * math.log(2 * math.pi)


def log_pi1(y):
    return -0.5 * ((y - M) ** 2).sum(-1) / S ** 2


def gen(seed):
    return torch.Generator().manual_seed(seed)


@pytest.fixture(scope="module")
def protocol():
    g = gen(0)
    space = Space(D)
    pilot = smc(torch.randn(200, D, generator=g, dtype=torch.float64), log_pi0, log_pi1, space, MALA(space, 0.3),
                n_steps_per_level=3, cess_target=0.9, generator=g)
    return pilot_protocol(pilot)


def test_pilot_protocol_freezes_the_pilots_schedule_and_step_sizes(protocol):
    assert protocol.schedule[-1] == 1.0 and protocol.n_levels > 3
    assert all(b2 > b1 for b1, b2 in zip(protocol.schedule, protocol.schedule[1:]))
    assert len(protocol.step_sizes) == protocol.n_levels and protocol.n_steps_per_level == 3


def test_bar_recovers_log_z_without_bias_and_its_std_matches_the_scatter(protocol):
    space = Space(D)
    g = gen(1)
    errs, stds, covered = [], [], 0
    for _ in range(40):
        y0 = torch.randn(200, D, generator=g, dtype=torch.float64)
        y1 = M + S * torch.randn(200, D, generator=g, dtype=torch.float64)
        res = bidirectional_ais(y0, y1, log_pi0, log_pi1, space, MALA(space, 0.3), protocol, generator=g)
        errs.append(res.log_normalizer - EXACT)
        stds.append(res.std)
        covered += abs(res.log_normalizer - EXACT) <= 1.96 * res.std
    errs = np.array(errs)
    assert abs(errs.mean()) < 4 * errs.std(ddof=1) / math.sqrt(len(errs)), errs.mean()
    assert 0.6 < np.mean(stds) / errs.std(ddof=1) < 1.6
    assert covered >= 0.85 * len(errs)
    assert res.n_energy_evals == 400 * protocol.evals_per_particle(MALA(space, 0.3))


def test_without_moves_reverse_works_mirror_forward_ones_and_bar_is_exact():
    """No moves: W_F(y) = -(delta(y)) summed over the protocol telescopes to -delta(y) for any y,
    and the reverse work at y is +delta(y): Crooks holds exactly, and BAR is consistent for any
    schedule; the forward and reverse works of the same points are exact negatives."""
    space = Space(D)
    proto = AnnealingProtocol([0.1, 0.5, 1.0], [0.1, 0.1, 0.1], 0)
    y = torch.randn(50, D, generator=gen(2), dtype=torch.float64)
    wf = annealed_works(y, log_pi0, log_pi1, space, MALA(space, 0.1), proto)["works"]
    wr = annealed_works(y, log_pi0, log_pi1, space, MALA(space, 0.1), proto, reverse=True)["works"]
    delta = (log_pi1(y) - log_pi0(y)).numpy()
    np.testing.assert_allclose(wf, -delta, rtol=1e-10, atol=1e-9)
    np.testing.assert_allclose(wr, delta, rtol=1e-10, atol=1e-9)


def test_restricted_to_one_well_gives_that_wells_normaliser():
    """pi_1 a two-well mixture restricted to y > 0 (the per-state use): the estimate is the
    restricted normaliser  w_B Phi(mu_B / sd_B) (+ the left well's tail) relative to N(0, 3^2)
    restricted to y > 0, whose mass 1/2 is the forward particles' Q."""
    w_a, mu_a, sd_a, w_b, mu_b, sd_b = 0.25, -2.0, 0.4, 0.75, 2.5, 0.8
    space = Space(1)

    def lp1(y):
        comps = torch.stack([math.log(w_a) - 0.5 * ((y[:, 0] - mu_a) / sd_a) ** 2 - math.log(sd_a * math.sqrt(2 * math.pi)),
                             math.log(w_b) - 0.5 * ((y[:, 0] - mu_b) / sd_b) ** 2 - math.log(sd_b * math.sqrt(2 * math.pi))], 1)
        val = torch.logsumexp(comps, 1)
        return torch.where(y[:, 0] > 0, val, torch.full_like(val, -math.inf))

    def lp0(y):
        return -0.5 * (y[:, 0] / 3.0) ** 2 - math.log(3.0 * math.sqrt(2 * math.pi))

    exact = math.log(w_a * stats.norm.sf(-mu_a / sd_a) + w_b * stats.norm.cdf(mu_b / sd_b)) - math.log(0.5)
    g = gen(3)
    y0 = (3.0 * torch.randn(4000, 1, generator=g, dtype=torch.float64)).abs()[:600]  # pi_0 restricted to y > 0
    pilot = smc(y0[:200], lp0, lp1, space, MALA(space, 0.5), n_steps_per_level=3, cess_target=0.9, generator=g)
    proto = pilot_protocol(pilot)
    estimates = []
    for r in range(8):
        g = gen(10 + r)
        y0 = (3.0 * torch.randn(400, 1, generator=g, dtype=torch.float64)).abs()
        y1 = (mu_b + sd_b * torch.randn(800, 1, generator=g, dtype=torch.float64))
        y1 = y1[y1[:, 0] > 0][:400]  # the left well's tail beyond 0 is 1e-7 of the mass: ignored
        res = bidirectional_ais(y0, y1, lp0, lp1, space, MALA(space, 0.5), proto, generator=g)
        estimates.append(res.log_normalizer)
    est = np.array(estimates)
    assert abs(est.mean() - exact) < 4 * est.std(ddof=1) / math.sqrt(len(est)) + 1e-3, (est.mean(), exact)


@pytest.mark.bad_input
def test_protocol_errors():
    with pytest.raises(SamplerSettingError, match="increase strictly"):
        AnnealingProtocol([0.5, 0.4, 1.0], [0.1] * 3, 1)
    with pytest.raises(SamplerSettingError, match="increase strictly"):
        AnnealingProtocol([0.5, 0.9], [0.1] * 2, 1)
    with pytest.raises(SamplerSettingError, match="one finite step size"):
        AnnealingProtocol([0.5, 1.0], [0.1], 1)
    with pytest.raises(SamplerSettingError, match="one finite step size"):
        AnnealingProtocol([0.5, 1.0], [0.1, float("nan")], 1)
    with pytest.raises(SamplerSettingError, match="n_steps_per_level"):
        AnnealingProtocol([0.5, 1.0], [0.1, 0.1], -1)


@pytest.mark.bad_input
def test_bidirectional_refuses_weighted_starts_and_wrong_shapes():
    space = Space(D)
    proto = AnnealingProtocol([0.5, 1.0], [0.1, 0.1], 1)
    y = torch.randn(5, D, dtype=torch.float64)
    with pytest.raises(SamplerSettingError, match="exact samples"):
        bidirectional_ais(y, y, log_pi0, log_pi1, space, MALA(space), proto, log_weights0=torch.zeros(5))
    with pytest.raises(SamplerSettingError, match="non-empty tensor"):
        annealed_works(torch.zeros(0, D), log_pi0, log_pi1, space, MALA(space), proto)
    with pytest.raises(SamplerSettingError, match="another space"):
        annealed_works(y, log_pi0, log_pi1, space, HMC(Space(3)), proto)


# ---------------------------------------------------------------------------------------------
# the per-state refinement (bgexp.evaluation.refinement) with the bidirectional estimate
# ---------------------------------------------------------------------------------------------
class _TwoWells:
    """A 1-D target with two states: u(x) = -log of a two-Gaussian mixture, states x < 0, x >= 0;
    exact Delta F(left -> right) from the Gaussian CDFs."""

    w = (0.3, 0.7)
    mu = (-1.5, 1.8)
    sd = (0.4, 0.6)
    space = Space(1)
    relabelling = None
    reference = None
    observables: dict = {}  # as bgexp.targets.base.Target: none, so no observables block after SMC
    surfaces: dict = {}

    def energy(self, x):
        comps = torch.stack([math.log(w) - 0.5 * ((x[:, 0] - m) / s) ** 2 - math.log(s)
                             for w, m, s in zip(self.w, self.mu, self.sd)], 1)
        return -torch.logsumexp(comps, 1)

    @property
    def states(self):
        return {"left": lambda x: x[:, 0] < 0, "right": lambda x: x[:, 0] >= 0}

    def exact_delta_f(self):
        p_right = sum(w * stats.norm.sf(-m / s) for w, m, s in zip(self.w, self.mu, self.sd))
        return -math.log(p_right / (1 - p_right))

    def sample(self, n, g):
        comp = torch.rand(n, generator=g) < self.w[1]
        mu = torch.where(comp, self.mu[1], self.mu[0])
        sd = torch.where(comp, self.sd[1], self.sd[0])
        return (mu + sd * torch.randn(n, generator=g)).double()[:, None]


@pytest.mark.parametrize("reverse_steps", [0, 20])
def test_per_state_refinement_with_bidirectional_estimate_recovers_delta_f(reverse_steps):
    from bgexp.evaluation.refinement import Pullback, SMCSettings, refine
    from bgexp.flows.priors import NormalPrior

    torch.set_default_dtype(torch.float64)
    try:
        target = _TwoWells()
        path = Pullback(NormalPrior(1), None, target.energy, Space(1))
        data = target.sample(4000, gen(5))
        settings = SMCSettings(n_particles=300, n_replicates=5, step_size=0.3, n_steps_per_level=3, cess_target=0.9,
                               bidirectional=True, n_bidirectional=300, reverse_steps=reverse_steps, baselines=(),
                               progress=False)
        block = refine(path, target, settings, seed=3, data=data)
    finally:
        torch.set_default_dtype(torch.float32)
    bidir = block["bidirectional"]
    estimate = bidir["delta_f"]["left->right"]
    exact = target.exact_delta_f()
    assert estimate["ci_low"] - 0.05 <= exact <= estimate["ci_high"] + 0.05, (estimate, exact)
    assert abs(estimate["value"] - exact) < 0.15
    assert 0 < estimate["std"] < 0.1
    replicates = bidir["replicates_interval"]["left->right"]
    assert len(replicates["bar_std"]) == 5 and all(0 < s < 0.3 for s in replicates["bar_std"])
    assert replicates["ci_low"] - 0.05 <= exact <= replicates["ci_high"] + 0.05
    # the pooled std is of the order of the replicates' scatter / sqrt(5)
    assert 0.3 < estimate["std"] / (np.std(replicates["replicates"], ddof=1) / math.sqrt(5)) < 3
    assert "work_forward" not in bidir["replicates"][0]["left"]  # works stay out of results.json
    row = bidir["replicates"][0]["right"]
    assert row["n_forward"] == 300 and row["n_reverse"] == 300 and row["n_levels"] >= 1
    assert row["reverse_steps"] == reverse_steps and (row["reverse_step_size"] is None) == (reverse_steps == 0)
    # its energy evaluations are part of the block's total
    assert 0 < bidir["n_energy_evals"] < block["n_energy_evals"]


def test_energy_w2_of_the_refinement_and_of_mcmc_against_held_out_energies():
    """The final weighted particles of the per-state SMC (states mixed with their estimated Z_s)
    reproduce the target's energy distribution: W2 to exact held-out energies at the level of two
    exact samples' W2; against energies shifted by 1 it is about 1. MCMC from exact samples too."""
    from bgexp.evaluation.metrics import wasserstein_2
    from bgexp.evaluation.refinement import Pullback, SMCSettings, mcmc_from_data, refine
    from bgexp.flows.priors import NormalPrior

    torch.set_default_dtype(torch.float64)
    try:
        target = _TwoWells()
        path = Pullback(NormalPrior(1), None, target.energy, Space(1))
        heldout_u = target.energy(target.sample(20000, gen(7))).numpy()
        settings = SMCSettings(n_particles=400, n_replicates=3, step_size=0.3, n_steps_per_level=3, cess_target=0.9,
                               baselines=(), progress=False)
        block = refine(path, target, settings, seed=1, heldout_u=heldout_u)
        shifted = refine(path, target, settings, seed=1, heldout_u=heldout_u + 1.0)
        mcmc = mcmc_from_data(target, target.sample(400, gen(8)), 400 * 50, settings, seed=2, heldout_u=heldout_u)
    finally:
        torch.set_default_dtype(torch.float32)
    noise = wasserstein_2(heldout_u, target.energy(target.sample(400, gen(9))).numpy())
    w2 = block["energy_w2"]
    assert len(w2["replicates"]) == 3 and w2["ci_low"] <= w2["value"] <= w2["ci_high"]
    assert max(w2["replicates"]) < 4 * noise + 0.05, (w2, noise)
    assert 0.85 < shifted["energy_w2"]["value"] < 1.3
    assert mcmc["energy_w2"] < 4 * noise + 0.05
    assert "final" not in block["replicates"][0]
    # the energy histograms (pooled replicates, weighted) on the held-out frames' bins: densities
    # that hold nearly all the mass and sit on the held-out one
    from bgexp.evaluation.refinement import _weighted_density, energy_edges

    edges = energy_edges(heldout_u)
    reference = _weighted_density(heldout_u, None, edges)
    for density in (np.asarray(block["energy_histogram"]), np.asarray(mcmc["energy_histogram"])):
        assert density.shape == (50,) and 0.97 < float((density * np.diff(edges)).sum()) <= 1 + 1e-9
        assert float((np.abs(density - reference) * np.diff(edges)).sum()) < 0.25  # total variation x 2


@pytest.mark.bad_input
def test_bidirectional_settings_that_cannot_work_are_refused():
    from bgexp.evaluation.refinement import Pullback, SMCSettings, _check_bidirectional

    with pytest.raises(SamplerSettingError, match="per_state"):
        SMCSettings(bidirectional=True, per_state=False)
    with pytest.raises(SamplerSettingError, match="n_bidirectional"):
        SMCSettings(bidirectional=True, n_bidirectional=1)
    with pytest.raises(SamplerSettingError, match="reverse_steps"):
        SMCSettings(bidirectional=True, reverse_steps=-3)
    with pytest.raises(SamplerSettingError, match="reverse_frames must be one of"):
        SMCSettings(bidirectional=True, reverse_frames="test")
    with pytest.raises(SamplerSettingError, match="equilibrium data.*reverse_frames=heldout"):
        _check_bidirectional(Pullback(None, None, None, Space(1)), None, "heldout")


def test_a_state_the_flow_never_reaches_has_no_bidirectional_estimate_and_no_crash():
    from bgexp.evaluation.refinement import Pullback, SMCSettings, refine
    from bgexp.flows.priors import NormalPrior

    class FarState(_TwoWells):
        @property
        def states(self):  # the prior N(0, 1) never reaches x > 40
            return {"left": lambda x: x[:, 0] < 0, "far": lambda x: x[:, 0] > 40}

    torch.set_default_dtype(torch.float64)
    try:
        target = FarState()
        path = Pullback(NormalPrior(1), None, target.energy, Space(1))
        settings = SMCSettings(n_particles=50, n_replicates=2, n_steps_per_level=1, cess_target=0.5, bidirectional=True,
                               q_draws=1000, max_draw_factor=2, baselines=(), progress=False)
        block = refine(path, target, settings, seed=0, data=target.sample(500, gen(1)))
    finally:
        torch.set_default_dtype(torch.float32)
    assert block["bidirectional"]["delta_f"]["left->far"]["value"] is None
    assert block["bidirectional"]["replicates"][0]["far"]["log_z"] == -math.inf
