"""Vectorised Metropolis MC (bgexp/targets/md.py): right distribution, constraints, dimer data."""

from __future__ import annotations

import pytest
import torch

from bgexp.targets import DimerTarget
from bgexp.targets.md import metropolis


def gaussian(variance: float):
    return lambda x: 0.5 * (x**2).sum(-1) / variance


def double_well(x: torch.Tensor) -> torch.Tensor:
    """u = 3 (x^2 - 1)^2: minima at +-1, barrier 3 kT."""
    return 3.0 * (x[:, 0] ** 2 - 1.0) ** 2


@pytest.mark.parametrize("variance", [1.0, 4.0])
def test_gaussian_moments(variance):
    g = torch.Generator().manual_seed(0)
    x0 = 3.0 * torch.ones(400, 2, dtype=torch.float64)  # start off-centre: burn-in must forget it
    res = metropolis(gaussian(variance), x0, n_steps=300, step_size=0.5, burn_in=200, generator=g)
    s = res.samples.reshape(-1, 2)
    assert res.samples.shape == (300, 400, 2) and res.energies.shape == (300, 400)
    assert s.dtype == torch.float64
    assert s.mean(0).abs().max() < 0.05 * variance**0.5
    torch.testing.assert_close(s.var(0), torch.full((2,), variance, dtype=torch.float64), atol=0.06 * variance, rtol=0)
    # the step sizes were adapted towards the target acceptance, then frozen
    assert 0.25 < res.acceptance < 0.6
    assert res.step_size.shape == (400,) and (res.step_size != 0.5).all()


def test_energies_belong_to_samples_and_thinning():
    g = torch.Generator().manual_seed(1)
    x0 = torch.zeros(8, 3)
    res = metropolis(gaussian(1.0), x0, n_steps=60, thin=4, burn_in=10, generator=g)
    assert res.samples.shape == (15, 8, 3)
    torch.testing.assert_close(res.energies, gaussian(1.0)(res.samples.reshape(-1, 3)).reshape(15, 8))
    # chains move
    assert (res.samples[-1] != 0).any(dim=-1).all()


def test_reproducible_with_generator():
    x0 = torch.zeros(4, 2)
    a = metropolis(gaussian(1.0), x0, 50, generator=torch.Generator().manual_seed(5))
    b = metropolis(gaussian(1.0), x0, 50, generator=torch.Generator().manual_seed(5))
    c = metropolis(gaussian(1.0), x0, 50, generator=torch.Generator().manual_seed(6))
    assert torch.equal(a.samples, b.samples)
    assert not torch.equal(a.samples, c.samples)


def test_constraint_is_never_violated():
    x0 = -torch.ones(200, 1, dtype=torch.float64)
    kwargs = dict(n_steps=400, step_size=1.0, burn_in=0, generator=torch.Generator().manual_seed(2))
    free = metropolis(double_well, x0, **kwargs)
    assert (free.samples >= 0).any()  # without the constraint chains do cross: the test has teeth
    kwargs["generator"] = torch.Generator().manual_seed(2)
    res = metropolis(double_well, x0, constraint=lambda x: x[:, 0] < 0, **kwargs)
    assert (res.samples < 0).all()
    assert res.acceptance > 0.05
    # inside the constraint the left well is sampled: mean near -1
    assert abs(res.samples.mean().item() + 1.0) < 0.1


def test_constraint_violated_at_start_raises():
    x0 = torch.tensor([[-1.0], [0.5]])
    with pytest.raises(ValueError, match="constraint"):
        metropolis(double_well, x0, 10, constraint=lambda x: x[:, 0] < 0)


@pytest.mark.parametrize(
    "kwargs", [dict(n_steps=0), dict(n_steps=10, thin=0), dict(n_steps=10, burn_in=-1)]
)
def test_bad_arguments_raise(kwargs):
    with pytest.raises(ValueError):
        metropolis(gaussian(1.0), torch.zeros(2, 2), **kwargs)
    with pytest.raises(ValueError, match="n_chains, dim"):
        metropolis(gaussian(1.0), torch.zeros(2), 10)


@pytest.mark.parametrize("state, index", [("closed", 0), ("open", 1)])
def test_dimer_runs_stay_in_their_state(state, index):
    target = DimerTarget()
    g = torch.Generator().manual_seed(3)
    x0 = target.initial_configurations(state, 4, generator=g)
    assert x0.shape == (4, 76)
    assert target.states[state](x0).all()
    assert (target.state_of(x0) == index).all()
    assert torch.isfinite(target.energy(x0)).all()
    res = metropolis(
        target.energy, x0, n_steps=200, step_size=0.02, burn_in=100, generator=g,
        constraint=target.states[state], adapt_every=25,
    )
    samples = res.samples.reshape(-1, 76)
    assert (target.state_of(samples) == index).all()
    assert torch.isfinite(res.energies).all()
    assert res.acceptance > 0.1
    # MC relaxes the lattice start: the mean energy drops below the starting energy
    assert res.energies[-50:].mean() < target.energy(x0).mean()
    # the dimer stays near its well (0.94 closed, 2.06 open)
    d = target.dimer_distance(samples)
    expected = 0.94 if state == "closed" else 2.06
    assert (d - expected).abs().mean() < 0.15
