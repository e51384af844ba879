"""The toy torus target: exact normaliser, periodic differentiable energy, exact samples, reference."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from scipy.special import i0, iv
from scipy.stats import chi2

from bgexp.targets import TorusMixture
from bgexp.targets.torus import PRESETS
from bgexp.train import CONFIG_DIR
from bgexp.training.assemble import build_target

N_SAMPLES = 200_000


@pytest.fixture(scope="module")
def target() -> TorusMixture:
    return TorusMixture(preset="four_wells")


@pytest.fixture(scope="module")
def samples(target) -> torch.Tensor:
    return target.sample(N_SAMPLES, generator=torch.Generator().manual_seed(0))


def brute_force_log_kernel(components, t1: np.ndarray, t2: np.ndarray) -> np.ndarray:
    """log p~ written out independently of the module (numpy, float64)."""
    terms = []
    for c in components:
        d1, d2 = t1 - c["mean"][0], t2 - c["mean"][1]
        terms.append(math.log(c["weight"]) + c["concentration"][0] * np.cos(d1)
                     + c["concentration"][1] * np.cos(d2) + c["correlation"] * np.sin(d1) * np.sin(d2))
    terms = np.stack(terms)
    top = terms.max(0)
    return top + np.log(np.exp(terms - top).sum(0))


def brute_force_p_right(components, n: int) -> float:
    """P(t1 >= 0) by the midpoint rule on an n x n grid (n even: t1 = 0 is a cell edge)."""
    grid = -math.pi + (np.arange(n) + 0.5) * 2 * math.pi / n
    t1, t2 = np.meshgrid(grid, grid, indexing="ij")
    p = np.exp(brute_force_log_kernel(components, t1, t2))
    return float(p[n // 2:].sum() / p.sum())


# normaliser ----------------------------------------------------------------------------------
@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_quadrature_normaliser_converges(preset):
    target = TorusMixture(preset=preset)
    coarse, fine = target._log_normalizer(256), target._log_normalizer(1024)
    assert abs(coarse - fine) <= 1e-10 * abs(fine)
    assert abs(target.log_normalizer - fine) <= 1e-10 * abs(fine)
    grid, log_p, area = target.quadrature(300)
    assert grid.shape == (300,) and log_p.shape == (300, 300) and log_p.dtype == torch.float64
    assert float(log_p.exp().sum()) * area == pytest.approx(1.0, abs=1e-12)


def test_log_normalizer_is_analytic_for_uncorrelated_components():
    k1, k2 = 2.7, 0.9
    single = TorusMixture([{"weight": 1.0, "mean": [0.4, -2.9], "concentration": [k1, k2], "correlation": 0.0}])
    assert single.log_normalizer == pytest.approx(math.log(4 * math.pi**2 * i0(k1) * i0(k2)), rel=1e-13)
    mixture = TorusMixture([
        {"weight": 2.5, "mean": [3.1, 0.0], "concentration": [k1, k2], "correlation": 0.0},
        {"weight": 0.5, "mean": [-1.0, 1.0], "concentration": [4.0, 0.0], "correlation": 0.0},
    ])
    z = 4 * math.pi**2 * (2.5 * i0(k1) * i0(k2) + 0.5 * i0(4.0) * i0(0.0))
    assert mixture.log_normalizer == pytest.approx(math.log(z), rel=1e-13)


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_log_normalizer_matches_the_sine_model_series(preset):
    # Z of one sine-model component: 4 pi^2 sum_m C(2m, m) (r^2 / (4 k1 k2))^m I_m(k1) I_m(k2)
    z = 0.0
    for c in PRESETS[preset]:
        (k1, k2), r = c["concentration"], c["correlation"]
        z += c["weight"] * 4 * math.pi**2 * sum(
            math.comb(2 * m, m) * (r * r / (4 * k1 * k2)) ** m * iv(m, k1) * iv(m, k2) for m in range(60))
    assert TorusMixture(preset=preset).log_normalizer == pytest.approx(math.log(z), rel=1e-12)


def test_temperature_scales_the_energy_and_the_normaliser():
    hot = TorusMixture(preset="correlated", temperature=2.0)
    cold = TorusMixture(preset="correlated")
    x = torch.rand(64, 2, dtype=torch.float64) * 6 - 3
    torch.testing.assert_close(hot.energy(x), cold.energy(x) / 2.0)
    _, log_p, area = hot.quadrature(256)
    assert float(log_p.exp().sum()) * area == pytest.approx(1.0, abs=1e-12)
    assert hot.log_normalizer != pytest.approx(cold.log_normalizer)


# energy ------------------------------------------------------------------------------------------
def test_energy_is_periodic_and_matches_the_formula(target):
    x = (torch.rand(256, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * 2 - 1) * math.pi
    u = target.energy(x)
    assert u.shape == (256,) and u.dtype == torch.float64
    expected = -brute_force_log_kernel(PRESETS["four_wells"], x[:, 0].numpy(), x[:, 1].numpy())
    np.testing.assert_allclose(u.numpy(), expected, rtol=1e-13, atol=1e-13)
    for shift in ([2 * math.pi, 0.0], [0.0, -4 * math.pi], [6 * math.pi, 2 * math.pi]):
        torch.testing.assert_close(target.energy(x + torch.tensor(shift, dtype=torch.float64)), u,
                                   rtol=1e-12, atol=1e-12)
    # log_density is the normalised density
    torch.testing.assert_close(target.log_density(x), -u - target.log_normalizer)
    # float32 input gives float32 energies close to the float64 ones
    u32 = target.energy(x.float())
    assert u32.dtype == torch.float32
    torch.testing.assert_close(u32.double(), u, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="shape"):
        target.energy(torch.zeros(3, 3))


def test_energy_gradient_matches_finite_differences(target):
    x = (torch.rand(32, 2, generator=torch.Generator().manual_seed(2), dtype=torch.float64) * 2 - 1) * math.pi
    x.requires_grad_(True)
    (grad,) = torch.autograd.grad(target.energy(x).sum(), x)
    h = 1e-6
    with torch.no_grad():
        for i in range(2):
            e = torch.zeros(2, dtype=torch.float64)
            e[i] = h
            fd = (target.energy(x + e) - target.energy(x - e)) / (2 * h)
            torch.testing.assert_close(grad[:, i], fd, rtol=1e-7, atol=1e-7)


# exact sampling ----------------------------------------------------------------------------------
def test_samples_are_deterministic_and_on_the_torus(target, samples):
    assert samples.shape == (N_SAMPLES, 2) and samples.dtype == torch.get_default_dtype()
    assert bool((samples >= -math.pi).all() and (samples < math.pi).all())
    again = target.sample(1000, generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(again, target.sample(1000, generator=torch.Generator().manual_seed(7)),
                               rtol=0, atol=0)
    assert not torch.equal(again, target.sample(1000, generator=torch.Generator().manual_seed(8)))
    assert target.sample(0).shape == (0, 2)


def test_samples_reproduce_the_state_probability(target, samples):
    p_right = target.state_probabilities()["right"]
    assert 0.05 < p_right < 0.95
    observed = float(target.is_right(samples).double().mean())
    sigma = math.sqrt(p_right * (1 - p_right) / N_SAMPLES)
    assert abs(observed - p_right) < 5 * sigma


def test_samples_reproduce_the_theta1_marginal(target, samples):
    profile = target.reference.profiles["theta1"]
    p = np.exp(-np.asarray(profile["f"]))
    p /= p.sum()
    counts, _ = np.histogram(target.theta1(samples).double().numpy(), bins=np.asarray(profile["bin_edges"]))
    expected = N_SAMPLES * p
    assert counts.sum() == N_SAMPLES
    z = (counts - expected) / np.sqrt(expected * (1 - p))
    assert np.abs(z).max() < 5.0
    statistic = ((counts - expected) ** 2 / expected).sum()
    assert statistic < chi2.isf(1e-6, df=len(p) - 1)
    # the test has power: a marginal shifted by half a bin is rejected
    shifted, _ = np.histogram(target.theta1(samples).double().numpy() + math.pi / 36,
                              bins=np.asarray(profile["bin_edges"]))
    assert ((shifted - expected) ** 2 / expected).sum() > chi2.isf(1e-6, df=len(p) - 1)


def test_initial_configurations_are_exact_samples_inside_the_state(target):
    gen = torch.Generator().manual_seed(3)
    for state in ("left", "right"):
        x = target.initial_configurations(state, 500, gen)
        assert x.shape == (500, 2)
        assert bool(target.states[state](x).all())
        assert bool((x >= -math.pi).all() and (x < math.pi).all())
    with pytest.raises(ValueError, match="unknown state"):
        target.initial_configurations("middle", 10)


def test_sampler_refuses_a_violated_bound():
    target = TorusMixture(preset="correlated")
    target._log_bound = target.log_bound - 2.0  # pretend the grid maximum was far too low
    with pytest.raises(RuntimeError, match="bound"):
        target.sample(1000, generator=torch.Generator().manual_seed(0))


# reference ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_reference_delta_f_matches_a_brute_force_grid_sum(preset):
    target = TorusMixture(preset=preset)
    ref = target.reference.delta_f["left->right"]
    # midpoint rule on the half torus is O(h^2); Richardson extrapolation makes it O(h^4)
    coarse, fine = brute_force_p_right(PRESETS[preset], 400), brute_force_p_right(PRESETS[preset], 800)
    p_right = (4 * fine - coarse) / 3
    assert ref.value == pytest.approx(-math.log(p_right / (1 - p_right)), abs=1e-8)
    assert "quadrature" in ref.source and ref.ci_low is None


def test_reference_profiles_and_surface(target):
    ref = target.reference
    assert list(target.states) == ["left", "right"]
    assert set(ref.profiles) == {"theta1", "theta2"}
    edges = np.linspace(-math.pi, math.pi, 37)
    for name in ("theta1", "theta2"):
        prof = ref.profiles[name]
        assert len(prof["x"]) == len(prof["f"]) == 36 and min(prof["f"]) == 0.0
        np.testing.assert_allclose(prof["bin_edges"], edges)
        np.testing.assert_allclose(prof["x"], 0.5 * (edges[1:] + edges[:-1]))
    surface = ref.surfaces["torus"]
    p = np.asarray(surface["p"])
    assert surface["observables"] == ["theta1", "theta2"] and p.shape == (36, 36)
    assert p.sum() == pytest.approx(1.0, abs=1e-12) and (p > 0).all()
    np.testing.assert_allclose(surface["x_edges"], edges)
    # the theta2 profile is the surface's marginal; both agree with a fine midpoint grid
    f2 = -np.log(p.sum(0))
    np.testing.assert_allclose(ref.profiles["theta2"]["f"], f2 - f2.min(), atol=1e-12)
    def midpoint_bins(m: int) -> np.ndarray:  # m x m midpoint cells per bin, O(h^2)
        grid = -math.pi + (np.arange(36 * m) + 0.5) * 2 * math.pi / (36 * m)
        t1, t2 = np.meshgrid(grid, grid, indexing="ij")
        q = np.exp(brute_force_log_kernel(PRESETS["four_wells"], t1, t2)).reshape(36, m, 36, m).sum((1, 3))
        return q / q.sum()

    coarse, fine = midpoint_bins(15), midpoint_bins(30)
    np.testing.assert_allclose(p, (4 * fine - coarse) / 3, rtol=1e-7)  # Richardson: O(h^4)
    assert target.surfaces == {"torus": ("theta1", "theta2", (-math.pi, math.pi), (-math.pi, math.pi))}


def test_observables_wrap_angles(target):
    x = torch.tensor([[math.pi + 0.5, -3 * math.pi], [-0.25, 7.0]], dtype=torch.float64)
    torch.testing.assert_close(target.theta1(x), torch.tensor([-math.pi + 0.5, -0.25], dtype=torch.float64))
    torch.testing.assert_close(target.theta2(x), torch.tensor([-math.pi, 7.0 - 2 * math.pi], dtype=torch.float64))
    assert target.state_of(x).tolist() == [0, 0]
    assert target.state_of(torch.tensor([[0.0, 0.0], [-1e-9, 0.0]])).tolist() == [1, 0]


# validation --------------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs, field", [
    ({"preset": "three_wells"}, "preset"),
    ({"components": [{"weight": -1.0, "mean": [0, 0], "concentration": [1, 1]}]}, "weight"),
    ({"components": [{"weight": 1.0, "mean": [0, 0, 0], "concentration": [1, 1]}]}, "mean"),
    ({"components": [{"weight": 1.0, "mean": [0, 0], "concentration": [-1, 1]}]}, "concentration"),
    ({"components": [{"weight": 1.0, "concentration": [1, 1]}]}, "mean"),
    ({"components": [{"mean": [0, 0], "concentration": [1, 1], "correlation": float("nan")}]}, "correlation"),
    ({"components": []}, "components"),
    ({"temperature": 0.0}, "temperature"),
    ({"quadrature_points": 4}, "quadrature_points"),
])
def test_bad_inputs_raise_value_errors_naming_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        TorusMixture(**kwargs)


def test_unknown_preset_lists_the_known_ones():
    with pytest.raises(ValueError, match="four_wells"):
        TorusMixture(preset="nope")


# config ------------------------------------------------------------------------------------------
def test_hydra_config_builds_the_target():
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose(config_name="config", overrides=["target=torus_toy"])
    assert cfg.target.name == "torus_toy" and cfg.target.preset == "four_wells"
    assert cfg.data.generate.method == "exact" and cfg.data.generate.n_samples == 20000
    target = build_target(cfg)
    assert isinstance(target, TorusMixture) and target.dim == 2 and target.temperature == 1.0
    assert target.log_normalizer == pytest.approx(TorusMixture().log_normalizer, rel=1e-15)
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose(config_name="config", overrides=["target=torus_toy", "target.preset=correlated"])
    assert build_target(cfg).preset == "correlated"
