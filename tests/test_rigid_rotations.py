"""Conditional convex-potential rotations on S^3/{+-1} (bgexp/flows/rigid/rotation.py), float64 unless stated."""

from __future__ import annotations

import pytest
import torch

from bgexp import quaternions as Q
from bgexp.flows.rigid import (
    ConvexRotation,
    RotationInversionError,
    convex_potential,
    n_rotation_params,
    solve_gradient_equation,
)

F64 = torch.float64


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def unit(n: int, seed: int, dtype=F64) -> torch.Tensor:
    return Q.random_unit(n, generator=gen(seed), dtype=dtype)


def raw_params(flow: ConvexRotation, n: int, seed: int, scale: float = 1.0, dtype=F64) -> torch.Tensor:
    return scale * torch.randn(n, flow.n_params, generator=gen(seed), dtype=dtype)


def projective_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Pairwise min(|a_i - b_j|, |a_i + b_j|): the distance of the rotations, not the quaternions."""
    return torch.minimum(torch.cdist(a, b), torch.cdist(a, -b))


def test_n_params_and_layout():
    assert ConvexRotation(0).n_params == 14
    assert ConvexRotation(2).n_params == 10 + 22 + 4 == n_rotation_params(2)
    assert ConvexRotation(3, rotation=False).n_params == 43
    p = ConvexRotation(2).params(torch.zeros(36, dtype=F64))
    eye = torch.eye(4, dtype=F64)
    assert torch.allclose(p.chol, eye, atol=1e-15) and torch.allclose(p.mixers, eye.expand(2, 4, 4), atol=1e-15)
    assert torch.allclose(p.weights, torch.full((2,), 1e-3, dtype=F64), rtol=1e-12)
    assert torch.equal(p.rotation, torch.tensor([1.0, 0.0, 0.0, 0.0], dtype=F64))
    # lower-triangular with the 10 entries filled row by row, diagonal >= min_diag
    raw = torch.randn(7, 36, generator=gen(0), dtype=F64)
    p = ConvexRotation(2).params(raw)
    assert torch.equal(p.chol.triu(1), torch.zeros_like(p.chol))
    assert p.chol[:, 1, 0].equal(raw[:, 1]) and p.chol[:, 3, 2].equal(raw[:, 8])
    assert (torch.diagonal(p.mixers, dim1=-2, dim2=-1) > 0.1).all()


def test_gradient_and_hessian_match_autograd_and_potential_is_homogeneous_and_even():
    raw = torch.randn(50, 10 + 11 * 3, generator=gen(1), dtype=F64)
    x = 2.0 * torch.randn(50, 4, generator=gen(2), dtype=F64)
    phi, g, h = convex_potential(x, raw)

    def value(xi, ri):
        return convex_potential(xi, ri)[0]

    g_ref = torch.func.vmap(torch.func.grad(value))(x, raw)
    h_ref = torch.func.vmap(torch.func.hessian(value))(x, raw)
    assert torch.allclose(g, g_ref, atol=1e-12, rtol=1e-12)
    assert torch.allclose(h, h_ref, atol=1e-11, rtol=1e-11)
    assert torch.allclose(convex_potential(-x, raw)[0], phi, rtol=1e-14)
    assert torch.allclose(convex_potential(3.0 * x, raw)[0], 9.0 * phi, rtol=1e-13)
    assert torch.allclose((h @ x[..., None])[..., 0], g, atol=1e-12)  # Euler: H x = g
    assert (torch.linalg.eigvalsh(h) > 0).all()  # strictly convex


@pytest.mark.parametrize("k", [2, 3])
def test_maps_the_sphere_to_itself_and_commutes_with_the_sign(k):
    flow = ConvexRotation(k)
    q, raw = unit(1000, 3), raw_params(flow, 1000, 4)
    y, logdet = flow(q, raw)
    y_neg, logdet_neg = flow(-q, raw)
    assert (y.norm(dim=-1) - 1).abs().max() < 1e-12
    assert torch.allclose(y_neg, -y, atol=1e-14)  # Phi odd, and r * (-n) = -(r * n)
    assert torch.allclose(logdet_neg, logdet, atol=1e-12)
    assert torch.allclose(Q.to_matrix(y_neg), Q.to_matrix(y), atol=1e-14)  # one rotation out
    assert (projective_distance(y[:1], q[:1]) > 1e-2).all()  # not the identity


def chart_map(flow: ConvexRotation, q: torch.Tensor, raw: torch.Tensor):
    """u in R^3 -> v = E_out^T forward(normalize(q + E_in u)): the map in local orthonormal charts."""
    e_in = Q.tangent_basis(q)
    y0, logdet = flow(q, raw)
    e_out = Q.tangent_basis(y0)

    def v(u):
        y, _ = flow(Q.normalize(q + (e_in @ u[..., None])[..., 0]), raw)
        return (e_out.transpose(-1, -2) @ y[..., None])[..., 0]
    return v, logdet


def test_logdet_equals_the_chart_jacobian():
    flow = ConvexRotation(3)
    n = 40
    q, raw = unit(n, 5), raw_params(flow, n, 6)
    v, logdet = chart_map(flow, q, raw)
    u0 = torch.zeros(n, 3, dtype=F64)
    jac = torch.autograd.functional.jacobian(lambda u: v(u).sum(0), u0).permute(1, 0, 2)  # [n, 3 out, 3 in]
    assert (torch.linalg.slogdet(jac).logabsdet - logdet).abs().max() < 1e-8
    h = 1e-6
    columns = []
    for m in range(3):
        du = torch.zeros(n, 3, dtype=F64)
        du[:, m] = h
        columns.append((v(u0 + du) - v(u0 - du)) / (2 * h))
    jac_fd = torch.stack(columns, -1)
    assert (torch.linalg.slogdet(jac_fd).logabsdet - logdet).abs().max() < 1e-6
    assert (torch.linalg.det(jac) > 0).all()  # orientation preserving (degree one)


def test_round_trips_and_logdets_cancel():
    flow = ConvexRotation(3)
    n = 2000
    q, raw = unit(n, 7), raw_params(flow, n, 8)
    y, logdet = flow(q, raw)
    q_back, logdet_back = flow.inverse(y, raw)
    assert (q_back - q).norm(dim=-1).max() < 1e-10  # q itself, not -q or another preimage
    assert (logdet + logdet_back).abs().max() < 1e-10
    y2 = unit(n, 9)
    x, logdet_inv = flow.inverse(y2, raw)
    y2_back, logdet_fwd = flow(x, raw)
    assert (y2_back - y2).norm(dim=-1).max() < 1e-10
    assert (logdet_inv + logdet_fwd).abs().max() < 1e-10


def test_zero_raw_parameters_give_the_identity_within_the_stated_bound():
    q = unit(2000, 10)
    # K = 0 and L = I: g(q) = q, exactly the identity
    flow = ConvexRotation(0)
    y, logdet = flow(q, torch.zeros(2000, flow.n_params, dtype=F64))
    assert (y - q).abs().max() < 1e-15 and logdet.abs().max() < 1e-14
    # K components with weight init_weight each: |Phi(q) - q| <= 2 K init_weight (module docstring)
    for init_weight in (1e-3, 1e-8):
        flow = ConvexRotation(3, init_weight=init_weight)
        zeros = torch.zeros(2000, flow.n_params, dtype=F64)
        y, logdet = flow(q, zeros)
        error = (y - q).norm(dim=-1).max()
        assert 0 < error <= 2 * 3 * init_weight
        assert logdet.abs().max() <= 20 * 3 * init_weight
        back, _ = flow.inverse(y, zeros)
        assert (back - q).norm(dim=-1).max() < 1e-12
    assert error < 1e-6


def test_pushed_forward_density_is_normalised():
    flow = ConvexRotation(2)
    n = 200_000
    raw = (0.5 * torch.randn(flow.n_params, generator=gen(11), dtype=F64)).expand(n, -1)
    y = unit(n, 12)
    with torch.no_grad():
        _, logdet_inv = flow.inverse(y, raw)
    weights = logdet_inv.exp()
    mean, stderr = weights.mean(), weights.std() / n ** 0.5
    assert weights.std() > 0.05  # a non-trivial map
    assert (mean - 1).abs() < 4 * stderr, (float(mean), float(stderr))


def test_gradcheck_of_the_inverse():
    flow = ConvexRotation(2)
    y0, raw = unit(3, 13), raw_params(flow, 3, 14)
    e = Q.tangent_basis(y0)

    def from_tangent(u):
        return flow.inverse(Q.normalize(y0 + (e @ u[..., None])[..., 0]), raw)

    u = (0.1 * torch.randn(3, 3, generator=gen(15), dtype=F64)).requires_grad_()
    assert torch.autograd.gradcheck(from_tangent, (u,))
    raw_var = raw.clone().requires_grad_()
    assert torch.autograd.gradcheck(lambda r: flow.inverse(y0, r), (raw_var,))


def test_forward_logdet_gradient_matches_finite_differences():
    flow = ConvexRotation(3)
    q, raw = unit(4, 16), raw_params(flow, 4, 17)
    raw_var = raw.clone().requires_grad_()
    (grad,) = torch.autograd.grad(flow(q, raw_var)[1].sum(), raw_var)
    h = 1e-6
    fd = torch.zeros_like(raw)
    for j in range(flow.n_params):
        step = torch.zeros_like(raw)
        step[:, j] = h
        fd[:, j] = (flow(q, raw + step)[1] - flow(q, raw - step)[1]) / (2 * h)
    assert torch.allclose(grad, fd, atol=1e-7, rtol=1e-6)
    assert grad.abs().max() > 1e-2


def test_float32_inputs_work():
    """float32 in, float32 out; the root is found in float64, so the float32 inverse agrees with the
    float64 inverse of the same inputs up to float32 rounding amplified by the map's conditioning."""
    flow = ConvexRotation(2)
    q, raw = unit(500, 18, torch.float32), raw_params(flow, 500, 19, scale=0.5, dtype=torch.float32)
    y, logdet = flow(q, raw)
    back, logdet_back = flow.inverse(y, raw)
    assert y.dtype == back.dtype == logdet.dtype == logdet_back.dtype == torch.float32
    y64, _ = flow(q.double(), raw.double())
    back64, _ = flow.inverse(y.double(), raw.double())
    assert (y.double() - y64).norm(dim=-1).max() < 1e-6
    assert (back.double() - back64).norm(dim=-1).max() < 3e-5
    assert (back - q).norm(dim=-1).max() < 5e-5
    assert (logdet + logdet_back).abs().max() < 5e-5


def test_errors_are_clear_and_the_inverse_never_hangs():
    flow = ConvexRotation(2)
    y, raw = unit(5, 20), raw_params(flow, 5, 21)
    bad = raw.clone()
    bad[2, 3] = float("nan")
    with pytest.raises(RotationInversionError, match="non-finite"):
        flow.inverse(y, bad)
    bad[2, 3] = float("inf")
    with pytest.raises(RotationInversionError, match="non-finite"):
        flow.inverse(y, bad)
    with pytest.raises(RotationInversionError, match="did not converge in 1 Newton"):
        ConvexRotation(2, max_iter=1).inverse(y, raw)
    with pytest.raises(ValueError, match=r"\[5, 36\]"):
        flow(y, raw[:, :-1])
    with pytest.raises(ValueError, match=r"\[5, 36\]"):
        flow.inverse(y, raw[:4])
    with pytest.raises(ValueError, match=r"\[\.\.\., 4\]"):
        flow(y[:, :3], raw)
    with pytest.raises(ValueError, match=r"\[\.\.\., 10 \+ 11 K\]"):
        convex_potential(y, raw[:, :12])


def test_distinct_rotations_stay_distinct():
    flow = ConvexRotation(3)
    q = unit(500, 22)
    raw = raw_params(flow, 1, 23).expand(500, -1)  # one map
    y, _ = flow(q, raw)
    d_in, d_out = projective_distance(q, q), projective_distance(y, y)
    off = ~torch.eye(500, dtype=torch.bool)
    assert d_out[off].min() > 0
    # bi-Lipschitz (a diffeomorphism of a compact manifold): distances shrink at most by a bounded factor
    assert (d_out[off] / d_in[off]).min() > 1e-2
    # the solver recovers exactly these inputs from the outputs
    p = flow.params(raw)
    x, iterations = solve_gradient_equation(Q.multiply(Q.conjugate(p.rotation), y), p)
    assert (Q.normalize(x) - q).norm(dim=-1).max() < 1e-10 and iterations.max() <= 20
