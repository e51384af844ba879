"""Rational-quadratic splines and spline couplings (bgexp/flows/splines.py).

The elementwise splines are checked in float64 with random (non-identity) parameters:
round trips, log-dets against autograd and finite differences, monotonicity, ranges, the
identity tails and C1 joins of the unconstrained spline, and the circle structure of the
circular spline (ends glued, derivative continuous across the seam, inputs wrapped). The
couplings are given random conditioner weights (N(0, 0.3^2)) before their log-dets are compared
with the brute-force Jacobian; a fresh coupling is the identity. With std 0.5 the conditioners
already squeeze single bins by up to exp(-10) per feature (|log det| up to ~40 for one coupling,
~80 for four): a map so ill-conditioned that even float64 round trips lose 1e-6; std 0.3 still
gives |log det| up to ~20, far from the identity.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch.autograd.functional import jacobian

from bgexp.flows.base import Flow
from bgexp.flows.nn import coupling_masks
from bgexp.flows.splines import (
    NeuralSpline,
    SplineCoupling,
    circular_rq_spline,
    rational_quadratic_spline,
    unconstrained_rq_spline,
    wrap_angle,
)

PI = math.pi
K = 7
HIDDEN = (16, 16)
F64 = torch.float64


def spline_params(n: int, n_derivatives: int, seed: int = 0, scale: float = 1.5):
    g = torch.Generator().manual_seed(seed)
    return tuple(scale * torch.randn(n, m, generator=g, dtype=F64) for m in (K, K, n_derivatives))


# name -> (spline(x, w, h, d, inverse), derivative count, forward domain, test inputs)
def _plain(x, w, h, d, inverse):
    return rational_quadratic_spline(x, w, h, d, inverse, left=-2.0, right=3.0, bottom=-1.0, top=0.5)


def _unconstrained(x, w, h, d, inverse):
    return unconstrained_rq_spline(x, w, h, d, inverse, bound=3.0)


def _circular(x, w, h, d, inverse):
    return circular_rq_spline(x, w, h, d, inverse)


SPLINES = {
    "plain": (_plain, K + 1, (-2.0, 3.0), (-1.0, 0.5)),
    "unconstrained": (_unconstrained, K - 1, (-6.0, 6.0), (-6.0, 6.0)),
    "circular": (_circular, K, (-PI, PI * (1 - 1e-9)), (-PI, PI)),
}


def uniform(lo: float, hi: float, n: int, seed: int) -> torch.Tensor:
    """n points in [lo, hi], the ends and the middle among them."""
    g = torch.Generator().manual_seed(seed)
    x = lo + (hi - lo) * torch.rand(n, generator=g, dtype=F64)
    x[:4] = torch.tensor([lo, hi, 0.5 * (lo + hi), lo + 1e-3], dtype=F64)
    return x


def inputs_for(name: str, n: int = 400, seed: int = 1) -> torch.Tensor:
    return uniform(*SPLINES[name][2], n, seed)


# --------------------------------------------------------------------------- elementwise splines


@pytest.mark.parametrize("name", sorted(SPLINES))
def test_spline_round_trip_and_opposite_logdets(name):
    spline, n_d, _, (bottom, top) = SPLINES[name]
    x = inputs_for(name)
    w, h, d = spline_params(len(x), n_d)
    y, ld = spline(x, w, h, d, False)
    assert y.dtype == F64 and y.shape == x.shape and ld.shape == x.shape
    x_back, ld_back = spline(y, w, h, d, True)
    err = (wrap_angle(x_back - x) if name == "circular" else x_back - x).abs().max()
    assert err < 1e-10
    torch.testing.assert_close(ld_back, -ld, atol=1e-10, rtol=0)
    # the other way round, from outputs spread over the output domain
    y2 = uniform(bottom, top * (1 - 1e-9) if name == "circular" else top, len(x), seed=2)
    x2, ld2 = spline(y2, w, h, d, True)
    y2_back, ld2_back = spline(x2, w, h, d, False)
    err = (wrap_angle(y2_back - y2) if name == "circular" else y2_back - y2).abs().max()
    assert err < 1e-10
    torch.testing.assert_close(ld2_back, -ld2, atol=1e-10, rtol=0)


@pytest.mark.parametrize("name", sorted(SPLINES))
@pytest.mark.parametrize("inverse", [False, True])
def test_spline_logdet_is_log_derivative(name, inverse):
    spline, n_d, (lo, hi), (bottom, top) = SPLINES[name]
    if inverse:
        lo, hi = bottom, top
    g = torch.Generator().manual_seed(3)
    x = lo + 0.01 + (hi - lo - 0.02) * torch.rand(300, generator=g, dtype=F64)
    w, h, d = spline_params(len(x), n_d, seed=4)
    xr = x.clone().requires_grad_(True)
    y, ld = spline(xr, w, h, d, inverse)
    (grad,) = torch.autograd.grad(y.sum(), xr)
    torch.testing.assert_close(ld, torch.log(grad), atol=1e-10, rtol=0)
    # central finite differences (smooth inside a bin; only C1 at knots, so O(eps) error there)
    eps = 1e-6
    with torch.no_grad():
        fd = (spline(x + eps, w, h, d, inverse)[0] - spline(x - eps, w, h, d, inverse)[0]) / (2 * eps)
    if name == "circular":
        fd = wrap_angle(fd * 2 * eps) / (2 * eps)
    torch.testing.assert_close(ld.detach(), torch.log(fd), atol=1e-4, rtol=0)


@pytest.mark.parametrize("name", sorted(SPLINES))
def test_spline_monotone_and_in_range(name):
    spline, n_d, (lo, hi), (bottom, top) = SPLINES[name]
    x = torch.linspace(lo, hi, 5001, dtype=F64)
    w, h, d = (p[:1] for p in spline_params(1, n_d, seed=5, scale=2.0))  # one spline, broadcast
    y, ld = spline(x, w, h, d, False)
    assert torch.isfinite(ld).all()
    assert (y[1:] > y[:-1]).all()
    assert y.min() >= bottom and y.max() <= top
    if name == "circular":
        assert y.max() < PI


@pytest.mark.parametrize("name", sorted(SPLINES))
def test_spline_zero_parameters_are_identity(name):
    spline, n_d, (lo, hi), _ = SPLINES[name]
    if name == "plain":  # the identity needs a square domain
        def spline(x, w, h, d, inverse):
            return rational_quadratic_spline(x, w, h, d, inverse, left=-2.0, right=3.0, bottom=-2.0, top=3.0)
    x = torch.linspace(lo, hi, 777, dtype=F64)
    zeros = [torch.zeros(len(x), m, dtype=F64) for m in (K, K, n_d)]
    for inverse in (False, True):
        y, ld = spline(x, *zeros, inverse)
        torch.testing.assert_close(y, x, atol=1e-12, rtol=0)
        torch.testing.assert_close(ld, torch.zeros_like(ld), atol=1e-12, rtol=0)


def test_plain_spline_maps_ends_to_ends():
    w, h, d = spline_params(3, K + 1, seed=6)
    ends = torch.tensor([-2.0, 3.0, 3.0], dtype=F64)
    y, _ = _plain(ends, w, h, d, False)
    torch.testing.assert_close(y, torch.tensor([-1.0, 0.5, 0.5], dtype=F64), atol=1e-14, rtol=0)
    x, _ = _plain(torch.tensor([-1.0, 0.5, -1.0], dtype=F64), w, h, d, True)
    torch.testing.assert_close(x, torch.tensor([-2.0, 3.0, -2.0], dtype=F64), atol=1e-12, rtol=0)


def test_unconstrained_spline_identity_tails_and_c1_at_bound():
    w, h, d = (p[:1] for p in spline_params(1, K - 1, seed=7, scale=2.0))
    tails = torch.tensor([-50.0, -3.5, -3.0 - 1e-9, 3.0 + 1e-9, 4.0, 1e3], dtype=F64)
    for inverse in (False, True):
        y, ld = unconstrained_rq_spline(tails, w, h, d, inverse, bound=3.0)
        assert torch.equal(y, tails) and torch.equal(ld, torch.zeros_like(ld))
    # value and slope continuous at +-B: g(+-B) = +-B and g'(+-B) = 1 from inside
    edge = torch.tensor([-3.0, 3.0, -3.0 + 1e-9, 3.0 - 1e-9], dtype=F64, requires_grad=True)
    y, ld = unconstrained_rq_spline(edge, w, h, d, False, bound=3.0)
    (grad,) = torch.autograd.grad(y.sum(), edge)
    torch.testing.assert_close(y[:2], edge[:2].detach(), atol=1e-14, rtol=0)
    torch.testing.assert_close(grad, torch.ones_like(grad), atol=1e-6, rtol=0)
    torch.testing.assert_close(ld[:2], torch.zeros(2, dtype=F64), atol=1e-14, rtol=0)


def test_circular_spline_glues_the_ends():
    w, h, d = (p[:1] for p in spline_params(1, K, seed=8, scale=2.0))
    # the unwrapped spline (last derivative = first) fixes both ends: f(-pi) = f(pi) - 2 pi
    d_full = torch.cat([d, d[:, :1]], -1)
    ends, _ = rational_quadratic_spline(torch.tensor([-PI, PI], dtype=F64), w, h, d_full,
                                        left=-PI, right=PI, bottom=-PI, top=PI)
    torch.testing.assert_close(ends[0], ends[1] - 2 * PI, atol=1e-14, rtol=0)
    # the circular map: pi and -pi are the same point; approaching the seam from both sides
    y, _ = circular_rq_spline(torch.tensor([-PI, PI, PI - 1e-9, -PI + 1e-9], dtype=F64), w, h, d)
    assert y[0] == y[1] == -PI
    assert abs(wrap_angle(y[2] - y[0])) < 1e-7 and abs(wrap_angle(y[3] - y[0])) < 1e-7
    # derivative continuous across the seam
    eps = 1e-8
    x = torch.tensor([-PI + eps, PI - eps], dtype=F64, requires_grad=True)
    y, ld = circular_rq_spline(x, w, h, d)
    (grad,) = torch.autograd.grad(y.sum(), x)
    assert abs(grad[0] - grad[1]) < 1e-5 * grad.max()
    assert abs(ld[0] - ld[1]) < 1e-5
    assert abs(grad[0] - 1.0) > 1e-2  # not trivially 1: the seam derivative is free


def test_circular_spline_wraps_inputs_and_shift_rotates():
    n = 200
    w, h, d = spline_params(n, K, seed=9)
    x = inputs_for("circular", n)
    y, ld = circular_rq_spline(x, w, h, d)
    for k in (-3, -1, 1, 2):
        yk, ldk = circular_rq_spline(x + 2 * PI * k, w, h, d)
        assert wrap_angle(yk - y).abs().max() < 1e-10
        torch.testing.assert_close(ldk, ld, atol=1e-10, rtol=0)
    assert ((y >= -PI) & (y < PI)).all()
    shift = 4.0 * torch.randn(n, generator=torch.Generator().manual_seed(10), dtype=F64)
    ys, lds = circular_rq_spline(x, w, h, d, shift=shift)
    assert ((ys >= -PI) & (ys < PI)).all()
    assert wrap_angle(ys - y - shift).abs().max() < 1e-12
    torch.testing.assert_close(lds, ld, atol=0, rtol=0)
    xb, ldb = circular_rq_spline(ys, w, h, d, inverse=True, shift=shift)
    assert wrap_angle(xb - x).abs().max() < 1e-10
    assert ((xb >= -PI) & (xb < PI)).all()
    torch.testing.assert_close(ldb, -ld, atol=1e-10, rtol=0)


def test_single_bin_spline():
    x = torch.linspace(-PI, PI * (1 - 1e-9), 101, dtype=F64)
    w, h, d = (torch.full((1, 1), 0.3, dtype=F64) for _ in range(3))
    y, ld = circular_rq_spline(x, w, h, d)
    assert (y[1:] > y[:-1]).all() and not torch.allclose(y, x)
    xb, ldb = circular_rq_spline(y, w, h, d, inverse=True)
    torch.testing.assert_close(xb, x, atol=1e-12, rtol=0)
    torch.testing.assert_close(ldb, -ld, atol=1e-12, rtol=0)


def test_spline_errors():
    x = torch.zeros(3)
    w = torch.zeros(3, K)
    with pytest.raises(ValueError, match="derivative parameters"):
        rational_quadratic_spline(x, w, w, torch.zeros(3, K))
    with pytest.raises(ValueError, match="derivative parameters"):
        unconstrained_rq_spline(x, w, w, torch.zeros(3, K + 1))
    with pytest.raises(ValueError, match="derivative parameters"):
        circular_rq_spline(x, w, w, torch.zeros(3, K - 1))
    with pytest.raises(ValueError, match="same number of bins"):
        circular_rq_spline(x, w, torch.zeros(3, K + 1), torch.zeros(3, K))
    with pytest.raises(ValueError, match="min_bin_width"):
        rational_quadratic_spline(x, w, w, torch.zeros(3, K + 1), min_bin_width=0.2)
    with pytest.raises(ValueError, match="bound"):
        unconstrained_rq_spline(x, w, w, torch.zeros(3, K - 1), bound=-1.0)
    with pytest.raises(ValueError, match="left < right"):
        rational_quadratic_spline(x, w, w, torch.zeros(3, K + 1), left=1.0, right=0.0)


# --------------------------------------------------------------------------- couplings and presets


def randomise(flow: Flow, seed: int = 0, std: float = 0.3) -> Flow:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in flow.parameters():
            p.copy_(std * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return flow


CIRC6 = [True, False, False, True, False, True]
# (a NeuralSpline followed by an AffineStandardization: the SequentialFlow entry of
# tests/test_flow_contract.py)
FLOWS = {
    "coupling-half": lambda: SplineCoupling(coupling_masks(6, 1, "half")[0], HIDDEN, bound=2.5),
    "coupling-alternate-relu": lambda: SplineCoupling(coupling_masks(5, 1, "alternate")[0], HIDDEN, "relu",
                                                      n_bins=4, bound=2.5),
    "coupling-circular": lambda: SplineCoupling(torch.tensor([1, 0, 1, 0, 0, 1], dtype=torch.bool), HIDDEN,
                                                bound=2.5, circular=CIRC6),
    "coupling-all-changed-circular": lambda: SplineCoupling(torch.tensor([0, 1, 1, 0, 1, 0], dtype=torch.bool),
                                                            HIDDEN, circular=CIRC6),
    "neural-spline": lambda: NeuralSpline(6, 4, HIDDEN, n_bins=5, bound=2.5),
    "neural-spline-circular": lambda: NeuralSpline(6, 4, HIDDEN, "tanh", bound=2.5, circular=CIRC6, seed=3),
    "neural-spline-half-odd": lambda: NeuralSpline(5, 3, HIDDEN, split="half", bound=2.5),
}


def circular_mask(flow: Flow) -> torch.Tensor:
    for m in flow.modules():
        if isinstance(m, SplineCoupling):
            return m.circular
    raise AssertionError("no spline coupling")


def sample_inputs(flow: Flow, n: int, seed: int = 0, dtype=F64) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    z = 2.0 * torch.randn(n, flow.dim, generator=g, dtype=dtype)  # many beyond bound 2.5
    circ = circular_mask(flow)
    angles = -PI + 2 * PI * torch.rand(n, flow.dim, generator=g, dtype=dtype)
    return torch.where(circ, angles, z)


def build(name: str, seed: int = 0) -> Flow:
    return randomise(FLOWS[name](), seed).to(F64)


@pytest.mark.parametrize("name", sorted(FLOWS))
@pytest.mark.parametrize("direction", ["forward", "inverse"])
def test_coupling_logdet_matches_brute_force_jacobian(name, direction):
    flow = build(name)
    fn = flow.forward if direction == "forward" else flow.inverse
    z = sample_inputs(flow, 4, seed=1)
    _, logdet = fn(z)
    for i in range(len(z)):
        jac = jacobian(lambda v: fn(v[None])[0][0], z[i])
        sign, logabs = torch.linalg.slogdet(jac)
        assert sign > 0  # the splines are increasing
        torch.testing.assert_close(logdet[i], logabs, atol=1e-8, rtol=1e-8)


@pytest.mark.parametrize("name", sorted(FLOWS))
def test_coupling_round_trip(name):
    flow = build(name)
    z = sample_inputs(flow, 64, seed=2)
    x, ld = flow.forward(z)
    z_back, ld_back = flow.inverse(x)
    torch.testing.assert_close(z_back, z, atol=1e-8, rtol=0)
    torch.testing.assert_close(ld_back, -ld, atol=1e-8, rtol=0)
    assert not torch.allclose(x, z, atol=1e-3)  # randomised: not the identity
    x2 = sample_inputs(flow, 64, seed=3)
    z2, _ = flow.inverse(x2)
    torch.testing.assert_close(flow.forward(z2)[0], x2, atol=1e-8, rtol=0)


@pytest.mark.parametrize("name", sorted(FLOWS))
def test_fresh_coupling_is_identity(name):
    flow = FLOWS[name]()
    z = sample_inputs(flow, 32, seed=4, dtype=torch.float32)
    for fn in (flow.forward, flow.inverse):
        x, ld = fn(z)
        torch.testing.assert_close(x, z, atol=1e-5, rtol=0)
        torch.testing.assert_close(ld, torch.zeros(32), atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", ["coupling-circular", "coupling-all-changed-circular", "neural-spline-circular"])
def test_circular_outputs_in_range_and_periodic(name):
    flow = build(name)
    circ = circular_mask(flow)
    z = sample_inputs(flow, 64, seed=5)
    for fn in (flow.forward, flow.inverse):
        x, ld = fn(z)
        assert ((x[:, circ] >= -PI) & (x[:, circ] < PI)).all()
    if isinstance(flow, SplineCoupling):
        # shifting a kept (conditioning) angle by 2 pi changes nothing in the transformed half
        kept_circ = flow.mask & circ
        shifted = z + 2 * PI * torch.where(kept_circ, torch.tensor(1.0, dtype=F64), torch.tensor(0.0, dtype=F64))
        for fn in (flow.forward, flow.inverse):
            x, ld = fn(z)
            xs, lds = fn(shifted)
            torch.testing.assert_close(xs[:, ~flow.mask], x[:, ~flow.mask], atol=1e-10, rtol=0)
            torch.testing.assert_close(lds, ld, atol=1e-10, rtol=0)
    # shifting every angle by a multiple of 2 pi changes no output angle (mod 2 pi) and no log-det
    shifted = z + 2 * PI * torch.where(circ, torch.tensor(-2.0, dtype=F64), torch.tensor(0.0, dtype=F64))
    for fn in (flow.forward, flow.inverse):
        x, ld = fn(z)
        xs, lds = fn(shifted)
        torch.testing.assert_close(xs[:, ~circ], x[:, ~circ], atol=1e-10, rtol=0)
        assert wrap_angle(xs[:, circ] - x[:, circ]).abs().max() < 1e-10
        torch.testing.assert_close(lds, ld, atol=1e-10, rtol=0)


def test_gradients_finite_float32():
    flow = randomise(NeuralSpline(6, 4, HIDDEN, circular=CIRC6, bound=2.5), seed=1, std=0.2)
    z = sample_inputs(flow, 128, seed=6, dtype=torch.float32)
    x, ld = flow.forward(z)
    z_back, ld_back = flow.inverse(x)
    loss = x.square().sum() + ld.sum() - ld_back.sum() + z_back.square().sum()
    loss.backward()
    grads = [p.grad for p in flow.parameters()]
    assert all(gr is not None and torch.isfinite(gr).all() for gr in grads)
    assert sum(float(gr.abs().sum()) for gr in grads) > 0
    lin = ~circular_mask(flow)
    assert (z_back - z)[:, lin].abs().max() < 1e-4
    assert wrap_angle(z_back - z)[:, ~lin].abs().max() < 1e-4


def test_spline_coupling_errors():
    with pytest.raises(ValueError, match="both kept and transformed"):
        SplineCoupling(torch.ones(4, dtype=torch.bool))
    with pytest.raises(ValueError, match="both kept and transformed"):
        SplineCoupling(torch.zeros(4, dtype=torch.bool))
    with pytest.raises(ValueError, match="both kept and transformed"):
        SplineCoupling(torch.ones(2, 2, dtype=torch.bool))
    with pytest.raises(ValueError, match="n_bins"):
        SplineCoupling(torch.tensor([True, False]), n_bins=1)
    with pytest.raises(ValueError, match="bound"):
        SplineCoupling(torch.tensor([True, False]), bound=0.0)
    with pytest.raises(ValueError, match="circular must be a bool mask of length dim=2"):
        SplineCoupling(torch.tensor([True, False]), circular=[True, False, True])
    with pytest.raises(ValueError, match="unknown activation"):
        SplineCoupling(torch.tensor([True, False]), activation="swish")
    with pytest.raises(ValueError, match="circular must be a bool mask of length dim=4"):
        NeuralSpline(4, circular=[True])
    with pytest.raises(ValueError, match="dim >= 2"):
        NeuralSpline(1)
    with pytest.raises(ValueError, match="n_couplings"):
        NeuralSpline(4, n_couplings=0)
    with pytest.raises(ValueError, match="unknown split"):
        NeuralSpline(4, split="diagonal")
    flow = NeuralSpline(4, 2, HIDDEN)
    with pytest.raises(ValueError, match=r"expects z of shape \[batch, 4\]"):
        flow.forward(torch.zeros(3, 5))
    with pytest.raises(ValueError, match=r"expects x of shape \[batch, 4\]"):
        flow.inverse(torch.zeros(4))
