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


# ---------------------------------------------------------------------------------------------
# RC log-barrier (rc_form=log_barrier)
# ---------------------------------------------------------------------------------------------

def barrier(**kw):
    return JointLoss(rc_weight=1.0, rc_observable="x0", rc_range=(0.5, 2.5), rc_bins=11, rc_form="log_barrier", **kw)


def test_rc_log_barrier_against_a_hand_computation():
    loss = barrier()
    r = [0.9, 1.3, 2.2, 0.4]
    centres = [0.5 + 0.2 * k for k in range(11)]
    sigma = 2.0 / 11
    assert loss.rc_bandwidth == pytest.approx(sigma)
    hist = [0.0] * 11
    for ri in r:
        m = [math.exp(-(ri - c) ** 2 / (2 * sigma**2)) for c in centres]
        for k in range(11):
            hist[k] += m[k] / sum(m) / len(r)
    assert sum(hist) == pytest.approx(1.0)
    expected = -sum(math.log(h) for h in hist)
    value = loss.rc_log_barrier(torch.tensor(r, dtype=torch.float64))
    assert float(value) == pytest.approx(expected, rel=1e-12)
    log_h = loss.rc_soft_histogram(torch.tensor(r, dtype=torch.float64))
    assert torch.exp(log_h).tolist() == pytest.approx(hist, rel=1e-12)


def test_rc_log_barrier_is_minimised_by_a_flat_histogram_and_has_finite_gradients():
    loss = barrier()
    k_log_k = 11 * math.log(11)
    g = torch.Generator().manual_seed(0)
    spread = torch.linspace(0.5, 2.5, 2001)
    collapsed = 1.0 + 0.01 * torch.randn(2000, generator=g)
    for r in (spread, collapsed, 0.5 + 2 * torch.rand(300, generator=g), 3 * torch.rand(300, generator=g)):
        assert float(loss.rc_log_barrier(r)) >= k_log_k - 1e-4  # AM-GM: -sum log h >= K log K
    flat = float(loss.rc_log_barrier(spread))
    assert flat == pytest.approx(k_log_k, abs=0.5)
    assert float(loss.rc_log_barrier(collapsed)) > flat + 20.0
    # the gradient is finite, also for samples far outside the range (empty bins)
    for r0 in (collapsed, torch.tensor([10.0, 11.0, -5.0])):
        r = r0.clone().requires_grad_(True)
        loss.rc_log_barrier(r).backward()
        assert torch.isfinite(r.grad).all() and r.grad.abs().sum() > 0


def test_rc_form_is_checked_and_the_barrier_rides_on_the_kl_samples():
    with pytest.raises(ValueError, match="rc_form"):
        JointLoss(rc_form="histogram")
    bg = make_bg(barrier(alpha=1.0, beta=0.0))
    _, stats = bg.loss.kl(bg, 64)
    assert "rc_log_barrier" in stats and "rc_neg_entropy" not in stats
    assert stats["rc_log_barrier"] >= 11 * math.log(11) - 1e-4


# ---------------------------------------------------------------------------------------------
# staged schedule (loss.stages)
# ---------------------------------------------------------------------------------------------

STAGES = [{"steps": 3, "nll": 1.0, "kl": 0.0, "rc": 0.0, "energy_cut": 1e4},
          {"steps": 2, "nll": 100.0, "kl": 1.0, "rc": 1.0, "energy_cut": 1e4},
          {"steps": 2, "nll": 20.0, "kl": 1.0, "rc": 10.0, "energy_cut": 1e3},
          {"nll": 0.1, "kl": 1.0, "rc": 10.0, "energy_cut": 1e3}]


def staged(**kw):
    return JointLoss(stages=STAGES, rc_observable="x0", rc_range=(-1.0, 1.0), rc_bins=11, rc_form="log_barrier",
                     kl_batch_size=32, **kw)


def test_stage_weights_at_the_boundaries():
    loss = staged()
    expected = {0: 0, 2: 0, 3: 1, 4: 1, 5: 2, 6: 2, 7: 3, 10**6: 3}
    assert {step: loss.stage(step)[0] for step in expected} == expected
    assert [loss.kl_weight(s) for s in (2, 3, 7)] == [0.0, 1.0, 1.0]
    assert [loss.stage(s)[1].nll for s in (2, 3, 5, 7)] == [1.0, 100.0, 20.0, 0.1]
    assert [loss.stage(s)[1].energy_cut for s in (4, 5)] == [1e4, 1e3]
    assert loss.needs_data
    assert not JointLoss(stages=[{"nll": 0.0, "kl": 1.0}]).needs_data


@pytest.mark.bad_input
def test_stages_and_the_flat_schedule_are_not_both_accepted():
    for key, value in [("alpha", 1.0), ("beta", 1.0), ("nll_warmup_steps", 10), ("kl_ramp_steps", 5),
                       ("rc_weight", 1.0), ("energy_cut_high", 1e3)]:
        with pytest.raises(ValueError, match=rf"replaces .*also gives \['{key}'\]"):
            staged(**{key: value})


@pytest.mark.bad_input
@pytest.mark.parametrize("stages, match", [
    ([], "non-empty list"),
    ([{"steps": 5, "nll": 1.0, "kl": 0.0}], "last stage lasts for the rest"),
    ([{"nll": 1.0, "kl": 0.0}, {"nll": 1.0, "kl": 1.0}], r"stages\[0\]: steps must be an integer"),
    ([{"steps": 2, "nll": 1.0, "kl": 0.0, "lr": 1e-4}, {"nll": 1.0, "kl": 1.0}], "learning rate per stage"),
    ([{"nll": 1.0, "kl": 0.0, "rc": 1.0}], "rc=1.0 needs kl > 0"),
    ([{"nll": 0.0, "kl": 0.0}], "no loss"),
    ([{"nll": 1.0, "kl": -1.0}], ">= 0"),
    ([{"nll": 1.0}], r"missing \['kl'\]"),
    ([{"nll": 1.0, "kl": 1.0, "weight": 2}], "unknown keys"),
])
def test_bad_stages_are_refused_with_the_field_named(stages, match):
    with pytest.raises(ValueError, match=match):
        JointLoss(stages=stages, rc_observable="x0")


def test_staged_loss_end_to_end_in_every_stage():
    """On the tiny flow: each stage evaluates exactly its terms, with its weights and energy cut; a
    stage with kl = 0 draws no KL batch (no energy evaluations)."""
    loss = staged()
    bg = make_bg(loss)
    x = 0.5 * torch.randn(64, 3)
    for step, index in [(0, 0), (3, 1), (5, 2), (7, 3), (50, 3)]:
        before = bg.n_energy_evals_train
        value, metrics = loss(bg, x, step=step)
        stage = STAGES[index]
        assert torch.isfinite(value) and value.requires_grad
        assert metrics["stage"] == index
        assert (metrics["weight/nll"], metrics["weight/kl"], metrics["weight/rc"], metrics["energy_cut"]) == \
            (stage["nll"], stage["kl"], stage["rc"], stage["energy_cut"])
        if index == 0:
            assert bg.n_energy_evals_train == before and "kl" not in metrics and "rc_log_barrier" not in metrics
            assert float(value) == pytest.approx(metrics["nll"])
        else:
            assert bg.n_energy_evals_train == before + 32
            expected = stage["nll"] * metrics["nll"] + stage["kl"] * metrics["kl"] + stage["rc"] * metrics["rc_log_barrier"]
            assert float(value) == pytest.approx(expected, rel=1e-5)
        value.backward()
        assert all(p.grad is None or torch.isfinite(p.grad).all() for p in bg.parameters())
        bg.zero_grad()


def test_the_staged_config_is_the_published_recipe():
    from pathlib import Path

    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    cfg = OmegaConf.load(Path(__file__).resolve().parents[1] / "conf" / "loss" / "staged.yaml")
    loss = instantiate(cfg)
    assert [(s.nll, s.kl, s.rc, s.energy_cut) for s in loss.stages] == [
        (1.0, 0.0, 0.0, 1e4), (100.0, 1.0, 1.0, 1e4), (20.0, 1.0, 10.0, 1e3), (0.1, 1.0, 10.0, 1e3)]
    assert loss.rc_form == "log_barrier" and loss.rc_bandwidth == pytest.approx(2 / 11)
    assert loss.rc_grid.tolist() == pytest.approx([0.5 + 0.2 * k for k in range(11)])


def test_kl_at_several_temperatures_against_its_definition():
    """Identity flow at initialisation: z ~ N(0, tau I), u / tau = |z|^2 / (2 s^2 tau), so
    E[u / tau] = d tau / (2 s^2 tau) = d / (2 s^2) = 6 at every tau; the batch is split evenly, every
    sample's energy counted once; one temperature [1] is the plain KL, bit for bit."""
    loss = JointLoss(alpha=1.0, beta=1.0, kl_batch_size=6000, kl_temperatures=[0.25, 1.0, 4.0])
    bg = make_bg(loss)
    kl, _, _ = loss.reverse_kl(bg, 6000, 1e3)
    _, groups, _ = loss.reverse_kl(bg, 6000, 1e3)
    assert [len(g) for g in groups] == [2000, 2000, 2000]
    assert float(kl) == pytest.approx(6.0, rel=0.05)
    widths = [float(g.square().mean()) for g in groups]  # E z_i^2 = tau
    assert widths == pytest.approx([0.25, 1.0, 4.0], rel=0.1)
    assert bg.n_energy_evals_train == 12000
    plain, one = JointLoss(kl_batch_size=256), JointLoss(kl_batch_size=256, kl_temperatures=[1.0])
    a, _ = plain.kl(make_bg(plain), 256)
    b, _ = one.kl(make_bg(one), 256)
    assert torch.equal(a, b)


@pytest.mark.bad_input
@pytest.mark.parametrize("kw, match", [({"kl_temperatures": [1.0, -0.5]}, "> 0"),
                                       ({"kl_temperatures": [1.0, 2.0], "kl_batch_size": 1}, "smaller than")])
def test_bad_kl_temperatures_are_refused(kw, match):
    with pytest.raises(ValueError, match=match):
        JointLoss(**kw)
