"""Targeted free-energy perturbation (bgexp/training/tfep.py) on a harmonic system with analytic
free energies: u = k |x|^2 / (2 kT) in d dimensions, Z ~ (kT / k)^(d/2), so between temperatures
f_B - f_A = -(d/2) ln(T_B / T_A); the map x -> sqrt(T_B / T_A) x carries A exactly onto B."""

from __future__ import annotations

import functools
import math

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from torch import nn

from bgexp.flows.base import Flow
from bgexp.targets.openmm import kbt_kj_per_mol
from bgexp.training.tfep import StatePairData, StateSamples, TargetedFEP, evaluate_tfep

DIM, K_SPRING, T_A, T_B = 6, 50.0, 250.0, 100.0
EXACT = -(DIM / 2) * math.log(T_B / T_A)


class Harmonic:
    """U = k |x|^2 / 2 kJ/mol at temperature T (the state B of the tests)."""

    def __init__(self, temperature: float):
        self.temperature, self.kbt = temperature, kbt_kj_per_mol(temperature)

    def potential(self, x):
        return 0.5 * K_SPRING * (x**2).sum(-1)

    def energy(self, x):
        return self.potential(x) / self.kbt


class Scale(Flow):
    """x -> exp(s) x, log|det| = d s (a learnable isotropic scale)."""

    def __init__(self, log_scale: float = 0.0):
        super().__init__()
        self.dim = DIM
        self.log_scale = nn.Parameter(torch.tensor(float(log_scale), dtype=torch.float64))

    def forward(self, z):
        return z * torch.exp(self.log_scale), (DIM * self.log_scale).to(z).expand(z.shape[0])

    def inverse(self, x):
        return x * torch.exp(-self.log_scale), (-DIM * self.log_scale).to(x).expand(x.shape[0])


def samples(temperature: float, n: int, seed: int) -> StateSamples:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, DIM, generator=g, dtype=torch.float64) * math.sqrt(kbt_kj_per_mol(temperature) / K_SPRING)
    return StateSamples(x=x, potential=Harmonic(temperature).potential(x), source=f"exact {temperature} K")


def correlated_samples(temperature: float, n: int, seed: int, phi: float) -> StateSamples:
    """A stationary AR(1) chain with the exact marginal: x_t = phi x_{t-1} + sqrt(1 - phi^2) sigma eps_t,
    like MD frames saved more often than they decorrelate; the works ~ |x|^2 then have
    g = (1 + phi^2) / (1 - phi^2)."""
    g = torch.Generator().manual_seed(seed)
    sigma = math.sqrt(kbt_kj_per_mol(temperature) / K_SPRING)
    noise = torch.randn(n, DIM, generator=g, dtype=torch.float64) * sigma
    x = torch.empty_like(noise)
    x[0] = noise[0]
    for t in range(1, n):
        x[t] = phi * x[t - 1] + math.sqrt(1 - phi**2) * noise[t]
    return StateSamples(x=x, potential=Harmonic(temperature).potential(x), source=f"AR(1) {temperature} K")


def module(log_scale: float = 0.0) -> TargetedFEP:
    return TargetedFEP(Scale(log_scale), Harmonic(T_B), T_A, optimizer=functools.partial(torch.optim.Adam, lr=0.05))


def test_the_exact_map_has_zero_variance_work_equal_to_the_free_energy():
    m = module(0.5 * math.log(T_B / T_A))
    result = evaluate_tfep(m, samples(T_A, 500, 0), samples(T_B, 500, 1), n_boot=50)
    lfep, lbar = result["estimates"]["lfep"], result["estimates"]["lbar"]
    assert lfep["value"] == pytest.approx(EXACT, abs=1e-9) and lbar["value"] == pytest.approx(EXACT, abs=1e-9)
    assert result["work_forward"]["std"] < 1e-9 and result["ess_mapped"] == pytest.approx(1.0)


def test_identity_map_gives_the_plain_works_and_estimates_agree_with_the_analytic_value():
    m = module(0.0)
    state_a, state_b = samples(T_A, 4000, 2), samples(T_B, 4000, 3)
    result = evaluate_tfep(m, state_a, state_b, n_boot=100, reference={"value": EXACT, "std": 0.0, "source": "analytic"})
    est = result["estimates"]
    assert est["lfep"]["value"] == pytest.approx(est["fep"]["value"], abs=1e-9)  # no map: the same works
    assert est["lbar"]["value"] == pytest.approx(est["bar"]["value"], abs=1e-9)
    # BAR with both states is accurate here; FEP from the hotter state is within its error bars
    assert abs(est["bar"]["error"]) < 4 * est["bar"]["std"] + 1e-3
    assert abs(est["fep"]["error"]) < 4 * est["fep"]["std"] + 1e-3
    assert result["ess_mapped"] < 0.9


def test_training_the_map_by_the_mean_work_finds_the_exact_scale():
    m = module(0.0)
    data = StatePairData(samples(T_A, 2000, 4), None, val_fraction=0.2, batch_size=200, dtype=torch.float64)
    trainer = pl.Trainer(max_epochs=15, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, accelerator="cpu")
    trainer.fit(m, datamodule=data)
    assert float(m.flow.log_scale) == pytest.approx(0.5 * math.log(T_B / T_A), abs=0.02)
    assert m.n_energy_evals_train == 15 * 8 * 200  # 1600 training samples, 8 batches per epoch
    result = evaluate_tfep(m, StateSamples(data.x_val, data.u_val, "held out"), samples(T_B, 400, 5), n_boot=50)
    assert result["ess_mapped"] > 0.95
    assert result["estimates"]["lfep"]["value"] == pytest.approx(EXACT, abs=0.02)


def test_error_bars_account_for_correlated_samples():
    # 24 independent correlated chains per state, no map: the spread of the BAR estimates over the
    # chains is what the reported 2 sigma must describe; the bootstrap that treats the frames as
    # independent is ~sqrt(g) = 3 times too small
    phi, n = 0.9, 1500
    values, stds, stds_iid, inefficiencies = [], [], [], []
    for chain in range(24):
        result = evaluate_tfep(module(0.0), correlated_samples(T_A, n, 2 * chain, phi),
                               correlated_samples(T_B, n, 2 * chain + 1, phi), n_boot=30, seed=chain)
        bar_estimate = result["estimates"]["bar"]
        values.append(bar_estimate["value"])
        stds.append(bar_estimate["std"])
        stds_iid.append(bar_estimate["std_iid"])
        inefficiencies += bar_estimate["statistical_inefficiency"]
        assert bar_estimate["std"] == pytest.approx(bar_estimate["std_iid"]
                                                   * math.sqrt(max(bar_estimate["statistical_inefficiency"])))
    spread = float(np.std(values, ddof=1))
    expected_g = (1 + phi**2) / (1 - phi**2)
    assert np.mean(inefficiencies) == pytest.approx(expected_g, rel=0.35)
    assert 0.6 < np.mean(stds) / spread < 1.7
    assert np.mean(stds_iid) / spread < 0.55
    assert abs(np.mean(values) - EXACT) < 3 * spread / math.sqrt(len(values))


def test_bad_settings_are_clear_errors():
    with pytest.raises(ValueError, match="temperature_a"):
        TargetedFEP(Scale(), Harmonic(T_B), -1.0, optimizer=torch.optim.Adam)
    with pytest.raises(ValueError, match="val_fraction"):
        StatePairData(samples(T_A, 10, 0), None, val_fraction=1.5)
