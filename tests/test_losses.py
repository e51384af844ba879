"""Losses: schedule, energy cut, KL/NLL against their definitions, RC entropy."""

from __future__ import annotations

import math

import pytest
import torch

from bgexp.flows import NormalPrior, RealNVP
from bgexp.targets.base import Target
from bgexp.training.losses import JointLoss, linlog_cut
from bgexp.training.module import BoltzmannGenerator


class Harmonic(Target):
    """u(x) = |x|^2 / (2 s^2): a Gaussian target with known normaliser."""

    def __init__(self, dim=3, s=0.5):
        super().__init__()
        self.dim, self.s, self.temperature = dim, s, 1.0
        self.observables = {"x0": lambda x: x[:, 0]}

    def energy(self, x):
        return (x**2).sum(-1) / (2 * self.s**2)


def make_bg(loss, dim=3):
    bg = BoltzmannGenerator(NormalPrior(dim), RealNVP(dim, 2, [8]), Harmonic(dim), loss,
                            optimizer=lambda params: torch.optim.Adam(params, 1e-3))
    bg.latent_generator = torch.Generator().manual_seed(0)
    return bg


def test_schedule_warmup_then_linear_ramp():
    loss = JointLoss(alpha=2.0, beta=1.0, nll_warmup_steps=10, kl_ramp_steps=4)
    assert [loss.kl_weight(s) for s in (0, 9, 10, 11, 13, 100)] == [0.0, 0.0, 0.5, 1.0, 2.0, 2.0]
    assert JointLoss(alpha=0.0, beta=1.0).kl_weight(100) == 0.0


def test_bad_weights_are_refused():
    with pytest.raises(ValueError, match="not both zero"):
        JointLoss(alpha=0.0, beta=0.0)
    with pytest.raises(ValueError, match="warm-up needs beta"):
        JointLoss(alpha=1.0, beta=0.0, nll_warmup_steps=5)
    with pytest.raises(ValueError, match="rc_observable"):
        JointLoss(rc_weight=1.0)


def test_linlog_cut_is_continuous_and_monotone():
    u = torch.linspace(0, 3000, 10001, dtype=torch.float64)
    cut, n_bad = linlog_cut(u, high=1000.0)
    assert n_bad == 0
    assert torch.all(cut[1:] >= cut[:-1])
    assert torch.allclose(cut[u <= 1000], u[u <= 1000])
    assert cut[-1] == pytest.approx(1000 + math.log(2001))


def test_identity_flow_losses_equal_their_definitions():
    """At initialisation the flow is the identity, so q = N(0, I) exactly:
    NLL = mean |x|^2/2 + d/2 log 2 pi, and the KL loss is mean u(z) (log-det 0)."""
    loss = JointLoss(alpha=1.0, beta=1.0, kl_batch_size=4096)
    bg = make_bg(loss)
    x = torch.randn(100, 3)
    expected_nll = (0.5 * (x**2).sum(-1) + 1.5 * math.log(2 * math.pi)).mean()
    torch.testing.assert_close(loss.nll(bg, x), expected_nll)
    kl, _ = loss.kl(bg, 4096)
    # E_{z ~ N(0, I)}[|z|^2 / (2 s^2)] = d / (2 s^2) = 6 for d = 3, s = 0.5
    assert float(kl) == pytest.approx(6.0, rel=0.05)
    assert bg.n_energy_evals_train == 4096


def test_rc_entropy_is_lowest_for_spread_samples():
    loss = JointLoss(rc_weight=1.0, rc_observable="x0", rc_range=(-1.0, 1.0), rc_bins=21)
    spread = torch.linspace(-1, 1, 2001)
    narrow = 0.01 * torch.randn(2000)
    uniform = float(loss.rc_negative_entropy(spread))
    assert uniform == pytest.approx(-math.log(21), abs=0.1)
    assert float(loss.rc_negative_entropy(narrow)) > uniform + 1.0
    # it is differentiable in the samples
    r = narrow.clone().requires_grad_(True)
    loss.rc_negative_entropy(r).backward()
    assert torch.isfinite(r.grad).all() and r.grad.abs().sum() > 0


def test_rc_loss_needs_a_known_observable():
    bg = make_bg(JointLoss(rc_weight=1.0, rc_observable="nope", rc_range=(0, 1)))
    with pytest.raises(ValueError, match="not an observable.*x0"):
        bg.loss.kl(bg, 8)
