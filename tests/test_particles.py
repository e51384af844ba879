"""The particle benchmark targets DW4, LJ13, LJ55 (SYSTEMS.md section 2): energies against an
independent numpy implementation, E(n) x S_n invariance, autograd forces, the MC reference sampler,
the Hydra configs and input validation."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir

from bgexp.targets import DoubleWell4, LennardJones, ParticleTarget
from bgexp.targets.md import sample_states
from bgexp.targets.particles import sample_reference
from bgexp.train import CONFIG_DIR
from bgexp.training.assemble import build_target


# independent reference implementation (numpy, float64, double loops over i < j) -----------------
def numpy_dw4(x: np.ndarray, n: int = 4, d: int = 2) -> np.ndarray:
    out = np.zeros(len(x))
    for b, conf in enumerate(x.reshape(len(x), n, d)):
        for i in range(n):
            for j in range(i + 1, n):
                r = np.sqrt(np.sum((conf[i] - conf[j]) ** 2))
                out[b] += 0.9 * (r - 4.0) ** 4 - 4.0 * (r - 4.0) ** 2
    return out


def numpy_lj(x: np.ndarray, n: int, d: int = 3) -> np.ndarray:
    out = np.zeros(len(x))
    for b, conf in enumerate(x.reshape(len(x), n, d)):
        for i in range(n):
            for j in range(i + 1, n):
                r = np.sqrt(np.sum((conf[i] - conf[j]) ** 2))
                out[b] += (1.0 / r) ** 12 - 2.0 * (1.0 / r) ** 6
        com = conf.mean(0)
        out[b] += 0.5 * np.sum((conf - com) ** 2)
    return out


TARGETS = {
    "dw4": (lambda: DoubleWell4(), lambda x: numpy_dw4(x)),
    "lj13": (lambda: LennardJones(13), lambda x: numpy_lj(x, 13)),
    "lj55": (lambda: LennardJones(55), lambda x: numpy_lj(x, 55)),
}


def configurations(target: ParticleTarget, n: int, seed: int = 0, jitter: float = 0.08) -> torch.Tensor:
    """float64 configurations near the target's low-energy arrangement, with a random offset."""
    g = torch.Generator().manual_seed(seed)
    x0 = target.low_energy_configuration(torch.float64).reshape(1, -1)
    x = x0 + jitter * torch.randn(n, target.dim, generator=g, dtype=torch.float64)
    return x + torch.randn(n, 1, target.spatial_dim, generator=g, dtype=torch.float64).expand(
        n, target.n_particles, target.spatial_dim).reshape(n, -1)


def random_orthogonal(d: int, g: torch.Generator) -> torch.Tensor:
    q, r = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    q = q * torch.sign(torch.diagonal(r))
    if torch.det(q) > 0:  # always include a reflection (det -1)
        q[:, 0] = -q[:, 0]
    return q


# energies -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(TARGETS))
def test_energy_matches_numpy_double_loop(name):
    make, reference = TARGETS[name]
    target = make()
    x = configurations(target, 6)
    u = target.energy(x)
    assert u.shape == (6,) and u.dtype == torch.float64
    np.testing.assert_allclose(u.numpy(), reference(x.numpy()), rtol=1e-12, atol=1e-10)
    # the temperature rescales: u = U / T
    hot = type(target)(**({"n_particles": target.n_particles} if name != "dw4" else {}), temperature=2.0)
    torch.testing.assert_close(hot.energy(x), u / 2.0, rtol=1e-14, atol=1e-12)


def test_analytic_pair_values():
    # DW4 pair term 0.9 s^4 - 4 s^2: 0 at d = 4, minimum -40/9 at d = 4 -+ sqrt(20/9)
    pair = DoubleWell4(n_particles=2)
    for d, value in [(4.0, 0.0), (4.0 - math.sqrt(20 / 9), -40 / 9), (4.0 + math.sqrt(20 / 9), -40 / 9), (3.0, -3.1)]:
        x = torch.tensor([[0.0, 0.0, d, 0.0]], dtype=torch.float64)
        assert abs(pair.energy(x).item() - value) < 1e-12
    # LJ at d = rm: -eps; oscillator 0.5 * 2 * (rm/2)^2 = 0.25 -> -0.75 (unordered pairs)
    lj = LennardJones(n_particles=2)
    x = torch.tensor([[0.0, 0.0, 0.0, 1.0, 0.0, 0.0]], dtype=torch.float64)
    assert abs(lj.lennard_jones(x).item() + 1.0) < 1e-14 and abs(lj.energy(x).item() + 0.75) < 1e-14
    # the DW4 square of the inner pair minimum: 4 sides at the minimum, 2 diagonals sqrt(2) longer
    dw4 = DoubleWell4()
    side = 4 - math.sqrt(20 / 9)
    diag = math.sqrt(2) * side - 4
    expected = 4 * (-40 / 9) + 2 * (0.9 * diag**4 - 4 * diag**2)
    assert abs(dw4.energy(dw4.low_energy_configuration().reshape(1, -1)).item() - expected) < 1e-12


@pytest.mark.parametrize("name", sorted(TARGETS))
def test_energy_invariant_under_rotation_reflection_translation_permutation(name):
    target = TARGETS[name][0]()
    g = torch.Generator().manual_seed(1)
    x = configurations(target, 4, seed=2)
    u = target.energy(x)
    r = x.reshape(4, target.n_particles, target.spatial_dim)
    q = random_orthogonal(target.spatial_dim, g)
    assert torch.det(q) < 0  # includes a reflection
    shift = 10.0 * torch.randn(4, 1, target.spatial_dim, generator=g, dtype=torch.float64)
    perm = torch.randperm(target.n_particles, generator=g)
    moved = ((r @ q.T) + shift)[:, perm].reshape(4, -1)
    assert not torch.allclose(moved, x)
    torch.testing.assert_close(target.energy(moved), u, rtol=0, atol=1e-10)
    torch.testing.assert_close(target.mean_distance(moved), target.mean_distance(x), rtol=0, atol=1e-10)


@pytest.mark.parametrize("name", sorted(TARGETS))
def test_autograd_forces_match_central_differences(name):
    target = TARGETS[name][0]()
    x = configurations(target, 2, seed=3).requires_grad_(True)
    (grad,) = torch.autograd.grad(target.energy(x).sum(), x)
    h = 1e-6
    idx = torch.randperm(target.dim, generator=torch.Generator().manual_seed(4))[:12]
    with torch.no_grad():
        for k in idx.tolist():
            e = torch.zeros_like(x)
            e[:, k] = h
            fd = (target.energy(x + e) - target.energy(x - e)) / (2 * h)
            torch.testing.assert_close(grad[:, k], fd, rtol=1e-6, atol=1e-5)


@pytest.mark.parametrize("name", sorted(TARGETS))
def test_float32_and_pair_distances(name):
    target = TARGETS[name][0]()
    x64 = configurations(target, 3, seed=5)
    x32 = x64.float()
    u32 = target.energy(x32)
    assert u32.dtype == torch.float32 and torch.isfinite(u32).all()
    torch.testing.assert_close(u32.double(), target.energy(x64), rtol=1e-4, atol=1e-3)
    d = target.pair_distances(x64)
    n = target.n_particles
    assert d.shape == (3, n * (n - 1) // 2)
    conf = x64[0].reshape(n, -1).numpy()
    brute = [np.linalg.norm(conf[i] - conf[j]) for i in range(n) for j in range(i + 1, n)]
    np.testing.assert_allclose(d[0].numpy(), brute, rtol=1e-14)
    torch.testing.assert_close(target.observables["mean_distance"](x64), d.mean(-1))


# data generation ----------------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(TARGETS))
def test_initial_configurations_are_mean_free_and_finite(name):
    target = TARGETS[name][0]()
    x = target.initial_configurations("all", 8, torch.Generator().manual_seed(0))
    assert x.shape == (8, target.dim)
    assert target.centre_of_mass(x).abs().max() < 1e-6
    assert torch.isfinite(target.energy(x)).all()
    assert target.states["all"](x).all() and (target.state_of(x) == 0).all()
    with pytest.raises(ValueError, match="unknown state"):
        target.initial_configurations("open", 2)


@pytest.mark.parametrize("name", ["dw4", "lj13"])
def test_mc_reference_samples_are_mean_free_and_sane(name):
    target = TARGETS[name][0]()
    ref = sample_reference(target, n_chains=16, n_steps=400, burn_in=400, thin=20,
                           step_size=0.3 if name == "dw4" else 0.05, seed=0)
    assert ref.x.shape == (16 * 20, target.dim) and ref.energies.shape == (16 * 20,)
    assert torch.isfinite(ref.x).all() and torch.isfinite(ref.energies).all()
    assert target.centre_of_mass(ref.x).abs().max() < 1e-5
    assert 0.2 < ref.acceptance < 0.7
    # the stored energies belong to the (centred) samples
    torch.testing.assert_close(target.energy(ref.x), ref.energies, rtol=1e-4, atol=1e-3)


def test_data_module_generation_path_with_state_all():
    target = DoubleWell4()
    samples = sample_states(target, states=["all"], n_chains=8, n_steps=200, burn_in=200, thin=10,
                            step_size=0.3, seed=0, progress=False)
    assert samples.x.shape == (8 * 20, 8) and samples.states == ["all"]
    assert torch.isfinite(samples.x).all() and 0.2 < samples.acceptance["all"] < 0.7
    assert target.centre_of_mass(target.remove_com(samples.x)).abs().max() < 1e-5


# configs and validation -----------------------------------------------------------------------------
@pytest.mark.parametrize("name,cls,n,d", [("dw4", DoubleWell4, 4, 2), ("lj13", LennardJones, 13, 3),
                                          ("lj55", LennardJones, 55, 3)])
def test_configs_compose_and_instantiate(name, cls, n, d):
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose(config_name="config", overrides=[f"target={name}"])
    target = build_target(cfg)
    assert isinstance(target, cls) and target.n_particles == n and target.spatial_dim == d
    assert target.dim == n * d and target.temperature == 1.0
    assert set(cfg.data.generate.states) <= set(target.states)
    assert cfg.data.forces is False


@pytest.mark.parametrize("name", sorted(TARGETS))
def test_wrong_shapes_raise_naming_the_expected_shape(name):
    target = TARGETS[name][0]()
    for bad in (torch.zeros(target.dim), torch.zeros(2, target.dim + 1),
                torch.zeros(2, target.n_particles, target.spatial_dim)):
        with pytest.raises(ValueError, match=rf"\[batch, {target.dim}\]"):
            target.energy(bad)
        with pytest.raises(ValueError, match=rf"\[batch, {target.dim}\]"):
            target.pair_distances(bad)
    with pytest.raises(ValueError, match="temperature"):
        type(target)(temperature=0.0)
