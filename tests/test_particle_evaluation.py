"""Evaluation of continuous flows on the particle systems: function evaluations per sample, the
1-Wasserstein distances of energies and pooled pair distances from the data, their histograms."""

from __future__ import annotations

import functools
import math

import numpy as np
import pytest
import torch
from scipy.stats import wasserstein_distance

pytest.importorskip("torchdyn", reason="torchdyn is installed with `pip install --no-deps torchdyn==1.0.6`")

from bgexp.flows.cnf import EquivariantCNF  # noqa: E402
from bgexp.flows.priors import MeanFreeNormalPrior  # noqa: E402
from bgexp.targets.particles import DoubleWell4  # noqa: E402
from bgexp.evaluation import evaluate, wasserstein_1, wasserstein_2  # noqa: E402
from bgexp.training.flow_matching import FlowMatchingLoss  # noqa: E402
from bgexp.training.module import BoltzmannGenerator  # noqa: E402


def test_wasserstein_1_of_a_shift_and_of_weights():
    g = np.random.default_rng(0)
    v = g.normal(size=500)
    assert wasserstein_1(v, v + 0.3) == pytest.approx(0.3, abs=1e-12)
    # weights that keep only the values equal to the reference give zero
    assert wasserstein_1(np.zeros(3), np.array([0.0, 5.0]), np.array([1.0, 0.0])) == pytest.approx(0.0)
    # non-finite values are left out, and nothing finite gives None
    assert wasserstein_1(np.array([0.0, np.inf]), np.array([1.0, np.nan])) == pytest.approx(1.0)
    assert wasserstein_1(np.array([np.nan]), np.array([1.0])) is None


def test_wasserstein_2_against_sorted_pairs_repetition_and_gaussians():
    g = np.random.default_rng(1)
    x, y = g.normal(size=40), g.normal(1.0, 2.0, size=40)
    # equal sizes, equal weights: the optimal coupling pairs the sorted values
    assert wasserstein_2(x, y) == pytest.approx(math.sqrt(np.mean((np.sort(x) - np.sort(y)) ** 2)), rel=1e-12)
    # unequal sizes: 3 and 2 values, each repeated to 6 (an equal-size problem with the same measures)
    a, b = g.normal(size=3), g.normal(size=2)
    brute = math.sqrt(np.mean((np.sort(np.repeat(a, 2)) - np.sort(np.repeat(b, 3))) ** 2))
    assert wasserstein_2(a, b) == pytest.approx(brute, rel=1e-12)
    # integer weights are repetitions, on either side
    v, w = np.array([2.0, -1.0, 0.5]), np.array([3.0, 1.0, 2.0])
    assert wasserstein_2(x, v, w) == pytest.approx(wasserstein_2(x, np.repeat(v, [3, 1, 2])), rel=1e-12)
    assert wasserstein_2(v, x, reference_weights=w) == pytest.approx(wasserstein_2(x, v, w), rel=1e-12)
    # two Gaussians: W2^2 = (m1 - m2)^2 + (s1 - s2)^2
    big_a, big_b = g.normal(0.0, 1.0, 200_000), g.normal(0.5, 2.0, 200_000)
    assert wasserstein_2(big_a, big_b) == pytest.approx(math.sqrt(0.25 + 1.0), abs=0.01)
    # W2 >= W1, non-finite values left out, nothing left gives None
    assert wasserstein_2(x, y) >= wasserstein_1(x, y)
    assert wasserstein_2(np.array([0.0, np.inf]), np.array([3.0, np.nan])) == pytest.approx(3.0)
    assert wasserstein_2(np.array([np.nan]), np.array([1.0])) is None
    assert wasserstein_2(np.zeros(2), np.ones(2), np.zeros(2)) is None


def test_evaluation_of_a_cnf_on_dw4_reports_nfe_and_distances(tmp_path):
    torch.manual_seed(0)
    target = DoubleWell4()
    flow = EquivariantCNF(n_particles=4, spatial_dim=2, hidden=8, n_layers=1, solver="rk4", steps=3)
    bg = BoltzmannGenerator(MeanFreeNormalPrior(4, 2), flow, target, FlowMatchingLoss(),
                            optimizer=functools.partial(torch.optim.Adam, lr=1e-3))
    data = target.remove_com(3.0 * torch.randn(300, 8))
    result = evaluate(bg, n_samples=400, batch_size=150, n_bootstrap=5, data=data, figure_dir=tmp_path)
    m = result.metrics
    assert m["nfe_per_sample"] == 12  # 3 steps x 4 stages of RK4, for every batch (also the last, smaller one)
    assert m["sampling_s_per_1000"] > 0
    u_data = target.energy(data).double().numpy()
    assert m["energy_w1_flow"] == pytest.approx(wasserstein_distance(u_data, result.samples["energy"]), rel=1e-9)
    assert m["energy_w2_flow"] == pytest.approx(wasserstein_2(u_data, result.samples["energy"]), rel=1e-9)
    assert m["energy_w2_flow"] >= m["energy_w1_flow"] and "energy_w2_reweighted" in m
    d_data = target.pair_distances(data).double().numpy().reshape(-1)
    d_flow = target.pair_distances(torch.as_tensor(result.samples["x"])).numpy().reshape(-1)
    assert m["distribution/pair_distance/w1_flow"] == pytest.approx(wasserstein_distance(d_data, d_flow), rel=1e-6)
    w = np.exp(result.samples["log_w"] - result.samples["log_w"].max())
    expected = wasserstein_distance(d_data, d_flow, v_weights=np.repeat(w, 6))
    assert m["distribution/pair_distance/w1_reweighted"] == pytest.approx(expected, rel=1e-6)
    assert (tmp_path / "histogram_pair_distance.png").is_file()
    assert result.figures["histogram_pair_distance"].endswith("histogram_pair_distance.png")


@pytest.mark.parametrize("sensitivity", ["autograd", "adjoint"])
def test_the_joint_loss_trains_a_cnf_through_the_energy(sensitivity):
    """Reverse KL + NLL through the ODE (the generic joint loss): finite loss, finite gradients in
    every parameter, with direct backpropagation and with the adjoint."""
    from bgexp.training.losses import JointLoss

    torch.manual_seed(0)
    target = DoubleWell4()
    flow = EquivariantCNF(n_particles=4, spatial_dim=2, hidden=8, n_layers=2, solver="rk4", steps=2,
                          sensitivity=sensitivity)
    bg = BoltzmannGenerator(MeanFreeNormalPrior(4, 2), flow, target, JointLoss(alpha=1.0, beta=1.0, kl_batch_size=16),
                            optimizer=functools.partial(torch.optim.Adam, lr=1e-3))
    bg.latent_generator = torch.Generator().manual_seed(0)
    data = target.remove_com(3.0 * torch.randn(16, 8))
    loss, metrics = bg.loss(bg, data, step=0)
    loss.backward()
    assert math.isfinite(float(loss)) and math.isfinite(metrics["kl"]) and math.isfinite(metrics["nll"])
    grads = [p.grad for p in flow.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert sum(float(g.abs().sum()) for g in grads) > 0
