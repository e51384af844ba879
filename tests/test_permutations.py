"""Canonical relabelling of interchangeable particles (bgexp/targets/permutations.py): a
measure-preserving rearrangement onto the canonical region, and unbiased reweighting of
permutation-invariant observables with flow samples outside the region at weight zero."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import integrate

from bgexp.estimators import ess
from bgexp.evaluation.samples import importance_log_weights
from bgexp.targets import DimerTarget
from bgexp.targets.permutations import ParticleRelabelling, RelabellingError, square_lattice


def _dimer_configurations(n: int, seed: int = 0) -> torch.Tensor:
    target = DimerTarget()
    return target.initial_configurations("closed", n, generator=torch.Generator().manual_seed(seed)) + \
        0.3 * torch.randn(n, 76, generator=torch.Generator().manual_seed(seed + 1))


def _permute_solvent(x: torch.Tensor, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    r = x.reshape(x.shape[0], 38, 2).clone()
    for b in range(x.shape[0]):
        order = torch.randperm(36, generator=g) + 2
        r[b, 2:] = r[b, order]
    return r.reshape(x.shape)


def test_dimer_relabelling_keeps_energies_and_is_canonical():
    target = DimerTarget(relabel_solvent=True)
    x = _dimer_configurations(64)
    y = target.relabelling.canonicalize(x)
    assert torch.allclose(target.energy(y), target.energy(x), rtol=1e-5, atol=1e-4)
    assert torch.equal(target.dimer_distance(y), target.dimer_distance(x))
    assert bool(target.relabelling.in_canonical_region(y).all())
    assert torch.equal(target.relabelling.canonicalize(y), y)  # one representative: idempotent
    # the same multiset of particle positions: a rearrangement, nothing created or lost
    rx = x.reshape(64, 38, 2)[:, 2:].numpy()
    ry = y.reshape(64, 38, 2)[:, 2:].numpy()
    for a, b in zip(rx, ry):
        assert np.allclose(np.sort(a, axis=0), np.sort(b, axis=0))


def test_a_permuted_copy_maps_to_the_same_representative():
    relabelling = DimerTarget(relabel_solvent=True).relabelling
    x = _dimer_configurations(32, seed=3)
    copy = _permute_solvent(x, seed=7)
    assert not torch.equal(copy, x)
    assert torch.equal(relabelling.canonicalize(copy), relabelling.canonicalize(x))
    # a random permutation of a canonical configuration is (almost surely) outside the region
    assert not bool(relabelling.in_canonical_region(_permute_solvent(relabelling.canonicalize(x), 11)).any())


def test_forces_follow_the_positions():
    relabelling = DimerTarget(relabel_solvent=True).relabelling
    x = _dimer_configurations(8, seed=5)
    f = torch.arange(8 * 76, dtype=torch.float32).reshape(8, 76)
    perm = relabelling.permutation(x)
    assert torch.equal(relabelling.permute(x, perm), relabelling.canonicalize(x))
    f_new = relabelling.permute(f, perm).reshape(8, 38, 2)
    for b in range(8):
        for j in range(38):
            assert torch.equal(f_new[b, j], f.reshape(8, 38, 2)[b, perm[b, j]])


@pytest.mark.bad_input
@pytest.mark.parametrize("groups, sites, message", [
    ([[0]], np.zeros((3, 2)), "at least 2"),
    ([[0, 5]], np.zeros((3, 2)), "outside"),
    ([[0, 1], [1, 2]], np.zeros((3, 2)), "disjoint"),
    ([[0, 1]], np.zeros((3, 3)), "shape"),
    ([], np.zeros((3, 2)), "no group"),
])
def test_bad_groups_are_named_errors(groups, sites, message):
    with pytest.raises(RelabellingError, match=message):
        ParticleRelabelling(groups, sites, 2)


def _expected_max_radius(k: int) -> float:
    """E[max_i |r_i|] of k independent standard 2-D Gaussians: int_0^inf 1 - F(r)^k dr,
    F(r) = 1 - exp(-r^2 / 2) (Rayleigh)."""
    value, _ = integrate.quad(lambda r: 1.0 - (1.0 - math.exp(-r * r / 2.0)) ** k, 0.0, math.inf)
    return value


def test_reweighting_invariant_observables_is_unbiased():
    """Four identical particles in a 2-D harmonic well, u = sum_i |r_i|^2 / 2 (exact: independent
    standard Gaussians), relabelled onto a 2 x 2 lattice. A Gaussian q fitted to relabelled samples
    (a density of the canonical region with spill-over, like a trained flow) reweighted with
    w = exp(-u) 1_R / q estimates E[max_i |r_i|] and E[mean_i |r_i|^2] without bias."""
    k, dim = 4, 8
    relabelling = ParticleRelabelling([list(range(k))], square_lattice(2, 1.0), 2)
    g = torch.Generator().manual_seed(0)
    canonical = relabelling.canonicalize(torch.randn(20000, dim, generator=g, dtype=torch.float64))
    q = torch.distributions.MultivariateNormal(canonical.mean(0), torch.cov(canonical.T))
    exact_max, exact_r2 = _expected_max_radius(k), 2.0  # E|r|^2 = 2 in 2-D

    def observables(x):
        r = x.reshape(x.shape[0], k, 2).norm(dim=-1)
        return r.max(1).values, (r ** 2).mean(1)

    estimates = []
    torch.manual_seed(1)
    for _ in range(20):
        y = q.sample((5000,))
        u = 0.5 * (y ** 2).sum(1)
        inside = relabelling.in_canonical_region(y)
        log_w = importance_log_weights(u, q.log_prob(y), inside)
        assert np.isneginf(log_w[~inside.numpy()]).all() and np.isfinite(log_w[inside.numpy()]).all()
        w = np.exp(log_w - log_w.max())
        a, b = (o.numpy() for o in observables(y))
        estimates.append([(w * a).sum() / w.sum(), (w * b).sum() / w.sum()])
        assert ess(log_w) > 0.05
    est = np.array(estimates)
    mean, sem = est.mean(0), est.std(0, ddof=1) / math.sqrt(len(est))
    assert abs(mean[0] - exact_max) < 4 * sem[0] + 1e-3, (mean[0], exact_max, sem[0])
    assert abs(mean[1] - exact_r2) < 4 * sem[1] + 1e-3, (mean[1], exact_r2, sem[1])
    assert 0.0 < (~relabelling.in_canonical_region(q.sample((2000,)))).float().mean() < 0.9  # q spills over R


def test_training_data_are_relabelled(tmp_path):
    from bgexp.training.data import TargetDataModule

    x = _dimer_configurations(40, seed=2)
    np.savez(tmp_path / "dimer.npz", x=x.numpy())
    target = DimerTarget(relabel_solvent=True)
    dm = TargetDataModule(target, path=str(tmp_path / "dimer.npz"), cache_dir=str(tmp_path), progress=False)
    dm.setup()
    both = torch.cat([dm.x_train, dm.x_val])
    assert bool(target.relabelling.in_canonical_region(both).all())
    assert torch.allclose(torch.sort(target.energy(both)).values, torch.sort(target.energy(x)).values,
                          rtol=1e-5, atol=1e-4)
