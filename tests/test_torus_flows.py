"""Smooth torus flows (bgexp/flows/torus.py): smoothness, log-dets, inverses, implicit gradients."""

from __future__ import annotations

import math

import pytest
import torch

from bgexp.flows import NeuralSpline, SmoothCoupling, SmoothTorusFlow, TorusPrior
from bgexp.flows.splines import circular_rq_spline
from bgexp.flows.torus import (
    CircularMixtureParams,
    RootFindingError,
    circular_mixture,
    invert_circular,
    smooth_circular_forward,
    smooth_circular_inverse,
    smooth_step,
    wrap_angle,
)

K = 5


def random_params(shape, scale=1.0, seed=0, dtype=torch.float64) -> tuple[torch.Tensor, CircularMixtureParams]:
    g = torch.Generator().manual_seed(seed)
    raw = scale * torch.randn(*shape, 4 * K + 2, generator=g, dtype=dtype)
    return raw, CircularMixtureParams.from_raw(raw, K)


def randomize(flow: torch.nn.Module, scale: float = 0.3, seed: int = 0) -> torch.nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in flow.parameters():
            p.copy_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return flow


def derivatives(fn, x: torch.Tensor, order: int) -> torch.Tensor:
    """The order-th derivative of an elementwise fn by repeated autograd (float64)."""
    x = x.clone().requires_grad_(True)
    y = fn(x)
    for _ in range(order):
        (y,) = torch.autograd.grad(y.sum(), x, create_graph=True)
    return y.detach()


# ------------------------------------------------------------------ the scalar building blocks


def test_smooth_step_values_slope_and_flat_ends():
    alpha = torch.tensor(0.7, dtype=torch.float64)
    t = torch.linspace(-0.5, 1.5, 2001, dtype=torch.float64)
    value, slope = smooth_step(t, alpha)
    assert torch.all(value[t <= 0] == 0) and torch.all(value[t >= 1] == 1)
    assert torch.all(torch.diff(value) >= 0)
    assert torch.allclose(derivatives(lambda s: smooth_step(s, alpha)[0], t, 1), slope, atol=1e-10)
    # every derivative vanishes at the ends: the 3rd derivative is ~0 just inside the interval
    near = torch.tensor([1e-3, 1 - 1e-3], dtype=torch.float64)
    assert derivatives(lambda s: smooth_step(s, alpha)[0], near, 3).abs().max() < 1e-200
    # sigma(1 - t) = 1 - sigma(t)
    assert torch.allclose(smooth_step(1 - t, alpha)[0], 1 - value, atol=1e-14)


def test_mixture_is_a_circle_diffeomorphism_with_bounded_slope():
    _, p = random_params((50,), scale=1.5)
    x = torch.linspace(0, 1, 401, dtype=torch.float64)[:, None].expand(401, 50)
    value, slope = circular_mixture(x, p)
    assert torch.allclose(value[0], torch.zeros(50, dtype=torch.float64), atol=1e-14)
    assert torch.allclose(value[-1], torch.ones(50, dtype=torch.float64), atol=1e-12)
    assert torch.all(slope >= p.c - 1e-12)
    assert torch.all(torch.diff(value, dim=0) > 0)
    assert torch.allclose(derivatives(lambda s: circular_mixture(s, p)[0], x, 1), slope, atol=1e-9)


@pytest.mark.parametrize("order", [1, 2, 3])
def test_derivatives_continuous_across_the_seam(order):
    """F^(k) at x -> 0+ equals F^(k) at x -> 1-: the map is smooth where the circle is glued."""
    _, p = random_params((200,), scale=1.5, seed=1)
    h = 1e-7
    lo = derivatives(lambda s: circular_mixture(s, p)[0], torch.full((200,), h, dtype=torch.float64), order)
    hi = derivatives(lambda s: circular_mixture(s, p)[0], torch.full((200,), 1 - h, dtype=torch.float64), order)
    scale = 1 + lo.abs().max()
    assert (lo - hi).abs().max() / scale < 1e-4


def test_second_derivative_continuous_at_ramp_window_edges_unlike_splines():
    """F'' just left and right of every ramp's window edge b +- 1/(2a) agrees (finite-difference
    test of C2); the same test finds the jump of a rational-quadratic spline at its knots."""
    _, p = random_params((1,), scale=1.0, seed=3)
    edges = torch.cat([p.b - 0.5 / p.a, p.b + 0.5 / p.a], dim=-1).reshape(-1)
    edges = torch.remainder(edges, 1.0)
    h = 1e-6

    def second(x):
        xx = x[:, None]
        return derivatives(lambda s: circular_mixture(s, p)[0], xx, 2)[:, 0]

    jump = (second(edges - h) - second(edges + h)).abs()
    assert jump.max() < 1e-3 * (1 + second(edges).abs().max())

    # negative control: the circular RQ spline's F'' jumps at its interior knots
    g = torch.Generator().manual_seed(0)
    widths, heights, derivs = (torch.randn(1, 8, generator=g, dtype=torch.float64) for _ in range(3))
    knots = -math.pi + 2 * math.pi * torch.cumsum(
        1e-3 + (1 - 8e-3) * torch.softmax(widths, -1), -1)[0, :-1]

    def spline(x):
        return circular_rq_spline(x[:, None], widths, heights, derivs)[0][:, 0]

    spline_jump = (derivatives(spline, knots - h, 2) - derivatives(spline, knots + h, 2)).abs()
    assert spline_jump.max() > 1e-2


def test_root_finder_inverts_to_machine_precision_in_few_evaluations(monkeypatch):
    import bgexp.flows.torus as torus

    _, p = random_params((3000,), scale=3.0, seed=4)
    y = torch.rand(3000, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    calls = []
    original = torus.circular_mixture
    monkeypatch.setattr(torus, "circular_mixture", lambda x, q: calls.append(1) or original(x, q))
    x = invert_circular(y, p)
    assert (original(x, p)[0] - y).abs().max() <= 1e-12
    assert len(calls) <= 30  # bisection alone would need ~40 for 1e-12


def test_root_finder_fails_loudly_on_non_finite_parameters():
    raw, _ = random_params((4,))
    raw[1, 0] = float("nan")
    p = CircularMixtureParams.from_raw(raw, K)
    with pytest.raises(RootFindingError, match="non-finite"):
        invert_circular(torch.full((4,), 0.3, dtype=torch.float64), p)


def test_circular_inverse_roundtrip_and_logdet():
    _, p = random_params((500,), scale=1.5, seed=6)
    theta = (torch.rand(500, generator=torch.Generator().manual_seed(7), dtype=torch.float64) * 2 - 1) * math.pi
    out, ld = smooth_circular_forward(theta, p)
    back, ld_inv = smooth_circular_inverse(out, p)
    assert torch.all((out >= -math.pi) & (out < math.pi))
    assert wrap_angle(back - theta).abs().max() < 1e-10
    assert (ld + ld_inv).abs().max() < 1e-10
    assert torch.allclose(derivatives(lambda s: smooth_circular_forward(s, p)[0], theta, 1), ld.exp(), atol=1e-9)


def test_implicit_gradients_of_the_inverse_equal_finite_differences():
    """gradcheck compares autograd (implicit function theorem) with finite differences, w.r.t.
    both the angle and the unconstrained transform parameters."""
    raw, _ = random_params((6,), scale=1.0, seed=8)
    theta = torch.linspace(-3.0, 3.0, 6, dtype=torch.float64)

    def inverse(theta, raw):
        out, ld = smooth_circular_inverse(theta, CircularMixtureParams.from_raw(raw, K))
        return out, ld

    assert torch.autograd.gradcheck(inverse, (theta.requires_grad_(), raw.requires_grad_()), eps=1e-6, atol=1e-5)


# ------------------------------------------------------------------ couplings and flows


def brute_force_logdet(fn, x: torch.Tensor) -> torch.Tensor:
    out = []
    for row in x:
        jac = torch.autograd.functional.jacobian(lambda v: fn(v[None])[0][0], row)
        out.append(torch.linalg.slogdet(jac)[1])
    return torch.stack(out)


MIXED = torch.tensor([True, False, True, True, False])


@pytest.mark.parametrize("analytic", ["inverse", "forward"])
def test_coupling_logdets_equal_brute_force_and_invert(analytic):
    torch.manual_seed(0)
    coupling = SmoothCoupling(torch.tensor([True, True, False, False, False]), circular=MIXED,
                              hidden=(16,), n_components=K, analytic=analytic).double()
    randomize(coupling, 0.5)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(6, 5, generator=g, dtype=torch.float64)
    x[:, MIXED] = wrap_angle(3 * x[:, MIXED])
    z, ld = coupling.inverse(x)
    assert torch.allclose(ld, brute_force_logdet(coupling.inverse, x), atol=1e-8)
    x2, ld2 = coupling.forward(z)
    assert torch.allclose(ld2, brute_force_logdet(coupling.forward, z), atol=1e-8)
    diff = x2 - x
    diff[:, MIXED] = wrap_angle(diff[:, MIXED])
    assert diff.abs().max() < 1e-10 and (ld + ld2).abs().max() < 1e-10
    assert torch.equal(z[:, :2], x[:, :2])  # the kept features pass unchanged


def test_torus_flow_is_periodic():
    # (log-det against the brute-force Jacobian and the round trip of the preset: the smooth_torus
    # entry of tests/test_flow_contract.py)
    flow = randomize(SmoothTorusFlow(4, n_couplings=4, hidden=(16,), n_components=K).double(), 0.3)
    z = (torch.rand(8, 4, generator=torch.Generator().manual_seed(2), dtype=torch.float64) * 2 - 1) * math.pi
    x, ld = flow.forward(z)
    # a full turn of any input angle changes nothing: the map lives on the torus
    shifted = z + 2 * math.pi * torch.tensor([1.0, -1.0, 0.0, 2.0], dtype=torch.float64)
    xs, lds = flow.forward(shifted)
    assert wrap_angle(xs - x).abs().max() < 1e-9 and torch.allclose(lds, ld, atol=1e-9)


def test_reverse_kl_gradients_through_root_finding_match_finite_differences():
    """Sampling direction (root finding, implicit gradients): d/dparam of mean(x) + logdet."""
    flow = randomize(SmoothTorusFlow(2, n_couplings=2, hidden=(8,), n_components=3).double(), 0.4, seed=3)
    z = (torch.rand(16, 2, generator=torch.Generator().manual_seed(4), dtype=torch.float64) * 2 - 1) * 3.0
    param = flow.layers[1].net[-1].bias

    def objective():
        x, ld = flow.forward(z)
        return (torch.sin(x).sum(-1) + ld).mean()

    (grad,) = torch.autograd.grad(objective(), param)
    eps = 1e-6
    fd = torch.zeros_like(param)
    with torch.no_grad():
        for i in range(param.numel()):
            param[i] += eps
            up = objective()
            param[i] -= 2 * eps
            down = objective()
            param[i] += eps
            fd[i] = (up - down) / (2 * eps)
    assert torch.allclose(grad, fd, atol=1e-6, rtol=1e-5)


def test_score_of_the_density_is_smooth_across_the_seam():
    """grad log q at theta -> -pi and theta -> +pi agree (analytic direction, all orders)."""
    flow = randomize(SmoothTorusFlow(2, n_couplings=3, hidden=(16,), n_components=K).double(), 0.3)
    prior = TorusPrior(2).double()

    def score(x):
        x = x.clone().requires_grad_(True)
        z, ld = flow.inverse(x)
        (g,) = torch.autograd.grad((prior.log_prob(z) + ld).sum(), x, create_graph=True)
        return g

    y = torch.tensor([0.4, -1.3], dtype=torch.float64)
    h = 1e-7
    left = torch.stack([torch.full_like(y, -math.pi + h), y], -1)
    right = torch.stack([torch.full_like(y, math.pi - h), y], -1)
    assert (score(left) - score(right)).abs().max() < 1e-4
    # and its derivative (what force matching differentiates) too
    d_left = torch.autograd.grad(score(left)[:, 0].sum(), flow.layers[0].net[-1].bias)[0]
    d_right = torch.autograd.grad(score(right)[:, 0].sum(), flow.layers[0].net[-1].bias)[0]
    assert (d_left - d_right).abs().max() < 1e-4


def test_coupling_rejects_bad_configuration():
    mask = torch.tensor([True, False])
    with pytest.raises(ValueError, match="smooth activation"):
        SmoothCoupling(mask, activation="relu")
    with pytest.raises(ValueError, match="min_slope"):
        SmoothCoupling(mask, min_slope=0.0)
    with pytest.raises(ValueError, match="analytic"):
        SmoothCoupling(mask, analytic="both")
    with pytest.raises(ValueError, match="circular"):
        SmoothTorusFlow(3, circular=[True, False])
    with pytest.raises(ValueError, match="shape"):
        SmoothTorusFlow(3).forward(torch.zeros(2, 4))


def test_equal_parameter_count_of_the_toy_baseline():
    """The toy benchmark compares flows of equal size: 4K + 2 = 3 bins + 1 outputs per angle."""
    smooth = SmoothTorusFlow(2, n_couplings=4, hidden=(64, 64), n_components=8)
    spline = NeuralSpline(2, n_couplings=4, hidden=(64, 64), n_bins=11, split="alternate",
                          circular=[True, True])
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(smooth) == count(spline)


# ------------------------------------------------------------------ the prior


def test_torus_prior_sampling_and_density():
    prior = TorusPrior(3, circular=[True, False, True])
    z = prior.sample(20000, generator=torch.Generator().manual_seed(0))
    assert torch.all(z[:, [0, 2]].abs() <= math.pi)
    assert abs(float(z[:, 1].std()) - 1.0) < 0.03 and abs(float(z[:, 0].mean())) < 0.05
    # log p integrates to one: the circular part is uniform, the linear part normal (quadrature)
    grid = torch.linspace(-8, 8, 4001, dtype=torch.float64)
    pts = torch.stack([torch.zeros_like(grid), grid, torch.zeros_like(grid)], -1)
    marginal = prior.double().log_prob(pts).exp() * (2 * math.pi) ** 2
    assert abs(float(torch.trapezoid(marginal, grid)) - 1.0) < 1e-6
    assert torch.allclose(prior.log_prob(pts + torch.tensor([2 * math.pi, 0, 0], dtype=torch.float64)),
                          prior.log_prob(pts))
    with pytest.raises(ValueError, match="circular"):
        TorusPrior(2, circular=[True])
