"""bgexp.evaluation: metric functions on cases with known answers, metric selection by the target's
declared abilities, figures from the metrics, and the arrows (no import of bgexp.training)."""

from __future__ import annotations

import math
import subprocess
import sys
from contextlib import contextmanager

import numpy as np
import pytest
import torch
from torch import nn

from bgexp.evaluation import Evaluation, evaluate
from bgexp.evaluation import metrics as m
from bgexp.evaluation.figures import draw_figures
from bgexp.evaluation.samples import GeneratorModel, SampleSet, draw_samples, importance_log_weights
from bgexp.flows.base import ContinuousFlow
from bgexp.targets.base import Reference, ReferenceValue, Target
from bgexp.targets.torus import TorusMixture

LOG_2PI = math.log(2 * math.pi)


class Gauss(Target):
    """u = |x|^2 / 2 in 2-D (mu = N(0, I)); states by the sign of x0; Delta F(left -> right) = 0."""

    dim, temperature = 2, 1.0

    def __init__(self, reference: bool = True):
        super().__init__()
        self.observables = {"x0": lambda x: x[:, 0], "x1": lambda x: x[:, 1]}
        self.states = {"left": lambda x: x[:, 0] < 0, "right": lambda x: x[:, 0] >= 0}
        if reference:
            self.reference = Reference(delta_f={"left->right": ReferenceValue(0.0, -0.1, 0.1, "symmetry")})

    def energy(self, x):
        return 0.5 * x.pow(2).sum(-1)


class GaussianModel(nn.Module):
    """q = N(mean, std^2 I) with exact samples and density: duck-types GeneratorModel."""

    def __init__(self, target, mean: float = 0.0, std: float = 1.0, flow=None, seed: int = 0):
        super().__init__()
        self.target, self.mean, self.std, self.seed = target, mean, std, seed
        self.flow = flow if flow is not None else nn.Identity()
        self.device = torch.device("cpu")
        self.n_energy = 0

    def sample(self, n, generator=None):
        x = self.mean + self.std * torch.randn(n, self.target.dim, generator=generator)
        return x, self.log_prob(x)

    def log_prob(self, x):
        z = (x - self.mean) / self.std
        return -0.5 * z.pow(2).sum(-1) - x.shape[-1] * (0.5 * LOG_2PI + math.log(self.std))

    def energy(self, x):
        self.n_energy += x.shape[0]
        return self.target.energy(x)

    @contextmanager
    def counting_evaluation(self):
        yield

    def make_generator(self, offset: int = 0):
        return torch.Generator().manual_seed(self.seed + offset)


def sample_set(x, log_w=None, **kw) -> SampleSet:
    x = torch.as_tensor(x, dtype=torch.float64)
    u = torch.zeros(x.shape[0], dtype=torch.float64)
    log_w = np.zeros(x.shape[0]) if log_w is None else np.asarray(log_w, dtype=float)
    return SampleSet(x=x, log_q=torch.as_tensor(-log_w), u=u, log_w=log_w, n_nonfinite=0, **kw)


# --- weights and energies -----------------------------------------------------------------------


def test_ess_of_equal_weights_is_one_and_of_one_dominant_weight_is_one_over_n():
    assert m.ess_metrics(sample_set(np.zeros((50, 2))))["ess"] == pytest.approx(1.0, abs=1e-12)
    log_w = np.full(50, -np.inf)
    log_w[3] = 0.0
    out = m.ess_metrics(sample_set(np.zeros((50, 2)), log_w))
    assert out["ess"] == pytest.approx(1 / 50) and out["n_samples"] == 50.0


def test_non_finite_energies_get_zero_weight_and_are_counted():
    u = torch.tensor([1.0, math.inf, math.nan, 2.0])
    log_q = torch.zeros(4)
    log_w = importance_log_weights(u, log_q)
    assert np.isneginf(log_w[1:3]).all() and log_w[0] == pytest.approx(-1.0)
    s = SampleSet(x=torch.zeros(4, 2), log_q=log_q, u=u, log_w=log_w, n_nonfinite=2)
    assert m.ess_metrics(s)["n_nonfinite_energies"] == 2.0
    stats = m.energy_stats(s)
    assert stats == {"energy_mean": 1.5, "energy_median": 1.5, "energy_min": 1.0}
    np.testing.assert_allclose(s.weights, [1.0, 0.0, 0.0, math.exp(-1.0)])


def test_free_energy_difference_of_a_two_state_sample_with_known_populations():
    """300 samples left and 100 right with equal weights: Delta F = -ln(100 / 300) = ln 3; doubling
    the weights of the right samples gives -ln(200 / 300)."""
    x = np.zeros((400, 2))
    x[:300, 0], x[300:, 0] = -1.0, 1.0
    target = Gauss()
    df = m.free_energy_differences(sample_set(x), target, n_bootstrap=50, seed=1)
    entry = df["left->right"]
    assert entry["value"] == pytest.approx(math.log(3.0), abs=1e-12)
    assert entry["ci_low"] <= entry["value"] <= entry["ci_high"]
    assert entry["reference"] == 0.0 and entry["reference_source"] == "symmetry"
    assert entry["error"] == pytest.approx(math.log(3.0))
    log_w = np.where(x[:, 0] > 0, math.log(2.0), 0.0)
    assert m.free_energy_differences(sample_set(x, log_w), target, 20)["left->right"]["value"] == pytest.approx(
        -math.log(2.0 / 3.0), abs=1e-12)
    assert m.populations(sample_set(x), target) == {"population/left": 0.75, "population/right": 0.25}
    flat = m.delta_f_metrics(df)
    assert list(flat) == ["delta_f/left->right/error", "delta_f/left->right/value", "delta_f/left->right/ci_low",
                          "delta_f/left->right/ci_high"]


def test_an_empty_state_gives_no_numbers_but_keeps_the_entry():
    x = np.zeros((10, 2)) - 1.0  # all left
    df = m.free_energy_differences(sample_set(x), Gauss(reference=False), n_bootstrap=10)
    assert df["left->right"]["value"] is None and "error" not in df["left->right"]
    assert m.delta_f_metrics(df) == {}


# --- profiles, surfaces, distributions --------------------------------------------------------------


def test_profile_rmse_needs_a_reference_profile_and_is_zero_against_itself():
    g = np.random.default_rng(0)
    x = g.normal(size=(2000, 2))
    target = Gauss(reference=False)
    s = sample_set(x, observed={"x0": x[:, 0], "x1": x[:, 1]})
    assert m.profile_rmse(s, target) == {}
    edges = np.linspace(-2, 2, 11)
    curve = m.profile_curve(s, target, "x0", bins=edges)
    target.reference = Reference(profiles={"x0": {"x": list(curve.centres), "f": list(curve.f), "bin_edges": list(edges)}})
    out = m.profile_rmse(s, target)
    assert list(out) == ["profile/x0/rmse"] and out["profile/x0/rmse"] == pytest.approx(0.0, abs=1e-12)


def test_surface_kl_is_zero_against_its_own_histogram_and_absent_without_a_reference():
    g = np.random.default_rng(1)
    x = g.uniform(-1, 1, size=(500, 2))
    target = Gauss(reference=False)
    target.surfaces = {"plane": ("x0", "x1", (-1.0, 1.0), (-1.0, 1.0))}
    s = sample_set(x, observed={"x0": x[:, 0], "x1": x[:, 1]})
    assert m.surface_kl(s, target, bins=5) == {}
    hist = m.surface_histogram(s, target, "plane", bins=5)
    assert hist.p.shape == (5, 5) and hist.p.sum() == pytest.approx(1.0)
    target.reference = Reference(surfaces={"plane": {"x_edges": hist.x_edges, "y_edges": hist.y_edges, "p": hist.p}})
    assert m.surface_kl(s, target)["surface/plane/kl"] == pytest.approx(0.0, abs=1e-12)


def test_energy_and_distribution_w1_are_zero_for_identical_sets_and_need_data():
    x = torch.randn(30, 2, generator=torch.Generator().manual_seed(0))
    target = Gauss()
    target.distributions = {"abs": lambda y: y.abs()}
    s = SampleSet(x=x, log_q=torch.zeros(30), u=target.energy(x), log_w=np.zeros(30), n_nonfinite=0)
    assert m.energy_w1(s) == {} and m.distribution_w1(s, target) == {}
    s.data, s.data_u = x, target.energy(x).double().numpy()
    assert m.energy_w1(s) == {"energy_w1_flow": 0.0, "energy_w1_reweighted": 0.0}
    assert m.distribution_w1(s, target) == {"distribution/abs/w1_flow": 0.0, "distribution/abs/w1_reweighted": 0.0}
    values, repeated = m.distribution_values(s, target, "abs")
    assert list(values) == ["data", "flow samples"] and values["data"].shape == (60,) and repeated.shape == (60,)


# --- the density: held-out NLL, forces, quadrature ------------------------------------------------


def test_heldout_nll_and_force_matching_of_the_exact_density():
    target = Gauss()
    bg = GaussianModel(target)
    y = torch.randn(64, 2, generator=torch.Generator().manual_seed(2))
    s = sample_set(np.zeros((8, 2)), data=y, forces=-y)
    expected = float((0.5 * y.double().pow(2).sum(-1) + LOG_2PI).mean())
    assert m.heldout_nll(s, target, bg)["nll_test"] == pytest.approx(expected, rel=1e-6)
    fm = m.force_matching(s, target, bg)  # score of N(0, I) is -x = the reduced force
    assert fm["force_rmse"] == pytest.approx(0.0, abs=1e-6) and fm["force_rmse_relative"] == pytest.approx(0.0, abs=1e-6)
    assert m.heldout_nll(sample_set(np.zeros((8, 2))), target, bg) == {}
    assert m.force_matching(sample_set(np.zeros((8, 2)), data=y), target, bg) == {}


def test_quadrature_kl_of_the_uniform_density_is_log_area_minus_entropy():
    torus = TorusMixture(quadrature_points=32)
    bg = GaussianModel(torus)
    bg.log_prob = lambda x: torch.full((x.shape[0],), -math.log(4 * math.pi**2))  # uniform on the torus
    _, log_p, cell = torus.quadrature(64)
    p = log_p.exp()
    expected = float((p * (log_p + math.log(4 * math.pi**2))).sum() * cell)
    out = m.quadrature_metrics(sample_set(np.zeros((4, 2))), torus, bg, n_points=64, batch_size=1000)
    assert out["kl_quadrature"] == pytest.approx(expected, rel=1e-6) and expected > 0  # log q in float32


# --- selection by ability, the whole evaluation -------------------------------------------------------


def test_evaluation_of_the_exact_model_selects_metrics_by_ability(tmp_path):
    target = Gauss()
    bg = GaussianModel(target)
    assert isinstance(bg, GeneratorModel)
    data = torch.randn(100, 2, generator=torch.Generator().manual_seed(5))
    result = evaluate(bg, n_samples=400, batch_size=150, n_bootstrap=20, data=data, forces=-data,
                      figure_dir=tmp_path, tag="t")
    assert isinstance(result, Evaluation)
    mt = result.metrics
    assert mt["ess"] == pytest.approx(1.0, abs=1e-9)  # q = mu: equal weights
    assert "kl_quadrature" not in mt  # Gauss is no QuadratureTarget
    assert "nfe_per_sample" not in mt  # nn.Identity is no ContinuousFlow
    assert not any(k.startswith(("surface/", "distribution/", "profile/")) for k in mt)
    assert mt["force_rmse"] == pytest.approx(0.0, abs=1e-6) and "nll_test" in mt and "energy_w1_flow" in mt
    assert abs(result.delta_f["left->right"]["value"]) < 0.5
    assert set(result.figures) == {"profile_x0", "profile_x1", "energies", "histogram_x0", "histogram_x1"}
    assert all(p.endswith("_t.png") and (tmp_path / p.split("/")[-1]).is_file() for p in result.figures.values())
    assert set(result.samples) == {"x", "log_q", "energy", "log_w"} and result.samples["x"].shape == (400, 2)
    assert bg.training  # the mode is restored
    torus = TorusMixture(quadrature_points=32)
    out = evaluate(GaussianModel(torus), n_samples=50, batch_size=50, n_bootstrap=5, quadrature_points=32)
    assert "kl_quadrature" in out.metrics and "surface/torus/kl" in out.metrics and out.figures == {}


def test_evaluation_checks_its_inputs():
    bg = GaussianModel(Gauss())
    with pytest.raises(ValueError, match="n_samples >= 2"):
        evaluate(bg, n_samples=1)
    with pytest.raises(ValueError, match="need data of the same shape"):
        evaluate(bg, n_samples=10, forces=torch.zeros(3, 2))


class CountingFlow(nn.Module):
    """A stand-in continuous flow: `nfe` after each solve, a `velocity` and a `transport`."""

    nfe = 7

    def velocity(self, t, x):
        return torch.zeros_like(x)

    def transport(self, z):
        return z


class NfeOnly(nn.Module):
    nfe = 7


def test_function_evaluations_are_counted_for_continuous_flows_only():
    assert isinstance(CountingFlow(), ContinuousFlow) and not isinstance(NfeOnly(), ContinuousFlow)
    for flow, counted in ((CountingFlow(), True), (NfeOnly(), False)):
        stats: dict[str, float] = {}
        bg = GaussianModel(Gauss(), flow=flow)
        x, log_q, u = draw_samples(bg, 25, 10, torch.Generator().manual_seed(0), stats=stats)
        assert x.shape == (25, 2) and bg.n_energy == 25 and stats["sampling_s_per_1000"] > 0
        assert (stats.get("nfe_per_sample") == 7.0) if counted else ("nfe_per_sample" not in stats)


def test_figures_come_from_the_metrics(tmp_path):
    target = Gauss()
    target.surfaces = {"plane": ("x0", "x1", (-3.0, 3.0), (-3.0, 3.0))}
    target.distributions = {"abs": lambda y: y.abs()}
    x = torch.randn(200, 2, generator=torch.Generator().manual_seed(3))
    s = SampleSet(x=x, log_q=torch.zeros(200), u=target.energy(x), log_w=np.zeros(200), n_nonfinite=0,
                  observed={"x0": x[:, 0].double().numpy(), "x1": x[:, 1].double().numpy()})
    figures = draw_figures(s, target, {"ess": 1.0, "surface/plane/kl": 0.1}, tmp_path / "figs")
    assert list(figures) == ["profile_x0", "profile_x1", "surface_plane", "histogram_abs", "energies",
                             "histogram_x0", "histogram_x1"]
    assert all((tmp_path / "figs" / f"{k}.png").is_file() for k in figures)


def test_evaluation_imports_nothing_of_training():
    code = ("import sys, bgexp.evaluation; "
            "bad = [k for k in sys.modules if k.startswith('bgexp.training')]; assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)
