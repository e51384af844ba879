"""Observables after SMC (bgexp/evaluation/smc_observables.py): the final weighted particles and the
MCMC sweeps at b = 1 are weighted samples of the target (moments of a Gaussian against their exact
values), the sweeps cover more of a histogram (the torus toy's surface KL against its exact
quadrature reference falls), the per-state mixture weights follow Z_s, and the energy evaluations
of the sweeps are counted."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from bgexp.evaluation.smc_observables import (ObservedSample, concatenate, mix_states, observable_metrics,
                                              swept_sample)
from bgexp.samplers import MALA, smc
from bgexp.spaces import Space
from bgexp.targets.torus import TorusMixture


class _Gaussian:
    """Target N(m, s^2 I) in d = 2 seen through its first coordinate (no reference)."""

    m, s = 1.0, 0.5
    observables = {"x0": staticmethod(lambda x: x[:, 0])}
    surfaces: dict = {}
    reference = None

    def log_pi1(self, y):
        return -0.5 * ((y - self.m) / self.s).square().sum(dim=1)


def _gaussian_run(seed: int, n: int = 400):
    target, space = _Gaussian(), Space(2)
    g = torch.Generator().manual_seed(seed)
    y0 = torch.randn(n, 2, generator=g, dtype=torch.float64)
    result = smc(y0, lambda y: -0.5 * y.square().sum(dim=1), target.log_pi1, space, MALA(space, 0.3),
                 n_steps_per_level=3, cess_target=0.9, generator=g)
    return target, space, result, g


def test_sweeps_keep_a_weighted_sample_of_the_gaussian():
    means, variances = [], []
    for seed in range(5):
        target, space, result, g = _gaussian_run(seed)
        sample = swept_sample(target, lambda y: y, target.log_pi1, result, MALA(space, 0.3), n_sweeps=10,
                              n_steps=3, generator=g)
        alive = int((result.normalized_weights() > 0).sum())
        assert sample.n == 11 * alive and sample.weights.sum() == pytest.approx(1.0)
        # every sweep carries the final weights: the weights of sweep k equal those of the final particles
        w = sample.weights.reshape(11, alive)
        assert np.allclose(w, w[0]) and w[0].sum() == pytest.approx(1 / 11)
        assert sample.n_energy_evals == alive * (1 + 10 * 3)
        x0 = sample.observed["x0"]
        mean = float(np.sum(sample.weights * x0))
        means.append(mean)
        variances.append(float(np.sum(sample.weights * (x0 - mean) ** 2)))
    # 5 runs of ~400 particles: the mean's standard error is about 0.5 / sqrt(5 * 300) = 0.013
    assert abs(np.mean(means) - 1.0) < 0.05, means
    assert abs(np.mean(variances) - 0.25) < 0.03, variances


def test_no_sweeps_is_the_final_particles_alone():
    target, space, result, g = _gaussian_run(0)
    sample = swept_sample(target, lambda y: y, target.log_pi1, result, MALA(space, 0.3), n_sweeps=0, n_steps=3,
                          generator=g)
    assert sample.n == result.n_particles and sample.n_energy_evals == 0
    assert np.allclose(sample.weights, result.normalized_weights())
    assert np.allclose(sample.observed["x0"], result.y[:, 0].numpy())


def test_sweeps_cover_more_of_the_torus_surface():
    """Uniform on the torus -> the four-well toy, 150 particles: the surface KL to the exact
    reference after 20 sweeps is well below that of the final particles alone, and the profile RMSE
    is finite and small."""
    target = TorusMixture()
    space = target.space
    g = torch.Generator().manual_seed(3)
    y0 = (torch.rand(150, 2, generator=g, dtype=torch.float64) * 2 - 1) * math.pi

    def log_pi1(y):
        return -target.energy(y)

    result = smc(y0, lambda y: 0.0 * y.sum(dim=1), log_pi1, space, MALA(space, 0.3), n_steps_per_level=3,
                 cess_target=0.9, generator=g)
    alone = observable_metrics(target, swept_sample(target, lambda y: y, log_pi1, result, MALA(space, 0.3), 0, 3, g))
    swept = observable_metrics(target, swept_sample(target, lambda y: y, log_pi1, result, MALA(space, 0.3), 20, 3, g))
    assert set(swept) == {"profile/theta1/rmse", "profile/theta2/rmse", "surface/torus/kl"}
    assert swept["surface/torus/kl"] < 0.5 * alone["surface/torus/kl"], (alone, swept)
    assert swept["profile/theta1/rmse"] < 0.5


def test_states_mix_by_their_normalizers_and_empty_states_drop_out():
    a = ObservedSample({"s": np.zeros(3)}, np.full(3, 1 / 3))
    b = ObservedSample({"s": np.ones(2)}, np.array([0.25, 0.75]))
    mixed = mix_states({"a": a, "b": b, "c": ObservedSample({"s": np.ones(1)}, np.ones(1))},
                       {"a": math.log(3.0), "b": math.log(1.0), "c": -math.inf})
    assert mixed.n == 5 and mixed.weights.sum() == pytest.approx(1.0)
    assert mixed.weights[:3].sum() == pytest.approx(0.75) and mixed.weights[3:] == pytest.approx([0.0625, 0.1875])
    pooled = concatenate([a, b], [1.0, 1.0])
    assert pooled.weights[:3].sum() == pytest.approx(0.5)
    assert mix_states({}, {}).n == 0 and observable_metrics(_Gaussian(), mix_states({}, {})) == {}


@pytest.mark.parametrize("bad", [-1, 2.5])
def test_a_bad_number_of_sweeps_is_a_named_error(bad):
    from bgexp.evaluation.refinement import SMCSettings
    from bgexp.samplers.errors import SamplerSettingError

    with pytest.raises(SamplerSettingError, match="final_sweeps must be an integer >= 0"):
        SMCSettings(final_sweeps=bad)
