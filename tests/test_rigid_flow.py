"""The rigid-body flow on (T^3 x S^3)^N (bgexp/flows/rigid/): couplings, log-dets, symmetries.

float64 unless stated. The flows under test are perturbed far from their (near-)identity
initialisation: N(0, 0.3) is added to every parameter, except that the zero-initialised head
weights get N(0, 0.3 / sqrt(fan_in)) so that each raw coupling parameter moves by about
N(0, 0.42^2) (N(0, 0.3) on all 64 head inputs would give raw parameters of spread 2.4: convex
rotations so distorted that the flow's Jacobian reaches condition numbers ~1e16 on some
configurations, where no 1e-8 check is meaningful). The perturbed flow still moves centres and
quaternions by ~0.3 on average and its log-det spreads by ~4 between configurations.
"""

from __future__ import annotations

import math

import pytest
import torch

from bgexp import quaternions as Q
from bgexp.flows.rigid import MoleculeTransformer, RigidBodyFlow, RotationCoupling, TranslationCoupling

F64 = torch.float64
BOX = (1.2, 1.5, 1.8)
N = 3


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def perturb(module: torch.nn.Module, seed: int, scale: float = 0.3) -> torch.nn.Module:
    g = gen(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            s = scale / math.sqrt(p.shape[-1]) if name.endswith("head.weight") else scale
            p.add_(s * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return module


def configurations(batch: int, n: int, seed: int, dtype=F64, box=BOX) -> torch.Tensor:
    """x [batch, 7n]: centres uniform in the box, Haar-uniform unit quaternions."""
    g = gen(seed)
    c = torch.rand(batch, n, 3, generator=g, dtype=dtype) * torch.tensor(box, dtype=dtype)
    q = Q.random_unit((batch, n), generator=g, dtype=dtype)
    return torch.cat([c, q], -1).reshape(batch, 7 * n)


def parts(x: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    m = x.reshape(x.shape[0], n, 7)
    return m[..., :3], m[..., 3:]


def periodic_difference(a: torch.Tensor, b: torch.Tensor, box=BOX) -> torch.Tensor:
    length = torch.tensor(box, dtype=a.dtype)
    return torch.remainder(a - b + length / 2, length) - length / 2


def sign_free_difference(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.minimum((a - b).norm(dim=-1), (a + b).norm(dim=-1))


@pytest.fixture(scope="module")
def flow() -> RigidBodyFlow:
    torch.manual_seed(0)
    return perturb(RigidBodyFlow(N, BOX, n_blocks=2).double(), seed=1)


@pytest.fixture(scope="module")
def anchored() -> RigidBodyFlow:
    torch.manual_seed(0)
    return perturb(RigidBodyFlow(N, BOX, n_blocks=2, anchor=True).double(), seed=1)


def chart_jacobian(fn, x0: torch.Tensor, n: int) -> torch.Tensor:
    """The 6n x 6n Jacobian of fn in charts: per molecule (c, u) with q = normalize(q0 + E_in u),
    E_in = tangent_basis(q0), and (c_out, E_out^T q_out) with E_out = tangent_basis(q_out(u = 0))."""
    c0, q0 = parts(x0, n)
    c0, q0 = c0[0], q0[0]
    e_in = Q.tangent_basis(q0)
    _, q_out0 = parts(fn(x0)[0], n)
    e_out = Q.tangent_basis(q_out0[0])

    def chart_map(v: torch.Tensor) -> torch.Tensor:
        v = v.reshape(n, 6)
        q = Q.normalize(q0 + (e_in @ v[:, 3:, None])[..., 0])
        y = fn(torch.cat([c0 + v[:, :3], q], -1).reshape(1, 7 * n))[0]
        c_out, q_out = parts(y, n)
        return torch.cat([c_out[0], (e_out.transpose(-1, -2) @ q_out[0][..., None])[..., 0]], -1).reshape(-1)

    return torch.autograd.functional.jacobian(chart_map, torch.zeros(6 * n, dtype=x0.dtype))


def test_molecule_transformer_is_equivariant_and_starts_at_zero():
    torch.manual_seed(0)
    net = MoleculeTransformer(5, 7, hidden=16, n_heads=4, n_layers=2).double()
    h = torch.randn(4, 6, 5, generator=gen(0), dtype=F64)
    out = net(h)
    assert out.shape == (4, 6, 7)
    assert torch.equal(out, torch.zeros_like(out))  # zero head: every coupling starts at raw = 0
    perturb(net, seed=1)
    out = net(h)
    assert out.abs().mean() > 0.1
    perm = torch.tensor([3, 0, 5, 1, 4, 2])
    assert torch.allclose(net(h[:, perm]), out[:, perm], atol=1e-12)
    # the molecules interact: changing one molecule's features changes the others' outputs
    h2 = h.clone()
    h2[:, 0] += 1.0
    assert (net(h2)[:, 1:] - out[:, 1:]).abs().max() > 1e-3
    with pytest.raises(ValueError, match=r"\[batch, n_molecules, 5\]"):
        net(h[..., :4])
    with pytest.raises(ValueError, match="divisible"):
        MoleculeTransformer(5, 7, hidden=10, n_heads=4)


def test_couplings_change_only_their_coordinates():
    torch.manual_seed(0)
    x = configurations(20, N, seed=2)
    c, q = parts(x, N)
    rot = perturb(RotationCoupling(N, BOX).double(), seed=3)
    y, _ = rot(x)
    c_out, q_out = parts(y, N)
    assert torch.allclose(c_out, c, atol=1e-15) and sign_free_difference(q_out, q).min() > 1e-3
    for axis in range(3):
        trans = perturb(TranslationCoupling(N, BOX, axis).double(), seed=4 + axis)
        y, _ = trans(x)
        c_out, q_out = parts(y, N)
        others = [b for b in range(3) if b != axis]
        assert torch.equal(q_out, q) and torch.allclose(c_out[..., others], c[..., others], atol=1e-15)
        assert periodic_difference(c_out[..., axis], c[..., axis], BOX[axis]).abs().min() > 1e-4


@pytest.mark.parametrize("which", ["flow", "anchored"])
def test_logdet_matches_brute_force_jacobian_in_charts(which, request):
    flow = request.getfixturevalue(which)
    x = configurations(3, N, seed=10)
    y, logdet = flow(x)
    z, logdet_inv = flow.inverse(x)
    for b in range(x.shape[0]):
        jac = chart_jacobian(flow.forward, x[b:b + 1], N)
        sign, value = torch.linalg.slogdet(jac)
        assert sign != 0 and abs(float(value - logdet[b].detach())) < 1e-8, (float(value), float(logdet[b].detach()))
        jac = chart_jacobian(flow.inverse, x[b:b + 1], N)
        sign, value = torch.linalg.slogdet(jac)
        assert sign != 0 and abs(float(value - logdet_inv[b].detach())) < 1e-8, (float(value), float(logdet_inv[b].detach()))
    assert logdet.std() > 1.0  # the perturbed flow is far from volume preserving


@pytest.mark.parametrize("which", ["flow", "anchored"])
def test_round_trip_and_output_domain(which, request):
    flow = request.getfixturevalue(which)
    x = configurations(100, N, seed=11)
    y, logdet = flow(x)
    c_out, q_out = parts(y, N)
    length = torch.tensor(BOX, dtype=F64)
    assert (c_out >= 0).all() and (c_out < length).all()
    assert (q_out.norm(dim=-1) - 1).abs().max() < 1e-12
    c, q = parts(x, N)
    assert periodic_difference(c_out, c).abs().mean() > 0.05  # far from the identity (the anchor never moves)
    x_back, logdet_back = flow.inverse(y)
    c_back, q_back = parts(x_back, N)
    assert periodic_difference(c_back, c).abs().max() < 1e-8
    assert sign_free_difference(q_back, q).max() < 1e-8
    assert (logdet + logdet_back).abs().max() < 1e-8
    # and the other way round, from configurations with centres outside the box
    shifted = x.clone().reshape(100, N, 7)
    shifted[..., :3] += torch.tensor([-1.0, 2.0, 3.0], dtype=F64) * length
    z, logdet_inv = flow.inverse(shifted.reshape(100, 7 * N))
    x_again, logdet_fwd = flow(z)
    assert periodic_difference(parts(x_again, N)[0], c).abs().max() < 1e-8
    assert sign_free_difference(parts(x_again, N)[1], q).max() < 1e-8
    assert (logdet_inv + logdet_fwd).abs().max() < 1e-8


def test_permutation_equivariance(flow):
    x = configurations(20, N, seed=12)
    perm = torch.tensor([2, 0, 1])
    x_perm = x.reshape(20, N, 7)[:, perm].reshape(20, 7 * N)
    for fn in (flow.forward, flow.inverse):
        y, logdet = fn(x)
        y_perm, logdet_perm = fn(x_perm)
        assert torch.allclose(y_perm, y.reshape(20, N, 7)[:, perm].reshape(20, 7 * N), atol=1e-10, rtol=0)
        assert torch.allclose(logdet_perm, logdet, atol=1e-10, rtol=0)


def test_quaternion_sign_flips_change_nothing_but_signs(flow):
    x = configurations(20, N, seed=13)
    flips = torch.ones(20, N, 7, dtype=F64)
    flips[:, :, 3:] = torch.where(torch.rand(20, N, 1, generator=gen(14)) < 0.5, -1.0, 1.0).to(F64)
    flips[0, :, 3:] = -1.0  # every molecule of the first sample
    assert (flips[..., 3] < 0).any() and (flips[..., 3] > 0).any()
    x_flip = (x.reshape(20, N, 7) * flips).reshape(20, 7 * N)
    for fn in (flow.forward, flow.inverse):
        y, logdet = fn(x)
        y_flip, logdet_flip = fn(x_flip)
        (c, q), (c_flip, q_flip) = parts(y, N), parts(y_flip, N)
        assert torch.allclose(c_flip, c, atol=1e-12, rtol=0)
        assert torch.allclose(Q.to_matrix(q_flip), Q.to_matrix(q), atol=1e-12, rtol=0)
        assert torch.allclose(logdet_flip, logdet, atol=1e-12, rtol=0)


def test_periodic_in_the_centres(flow):
    x = configurations(20, N, seed=15)
    y, logdet = flow(x)
    z, logdet_inv = flow.inverse(x)
    for axis in range(3):
        for molecule in (0, N - 1):
            for k in (1.0, -1.0):
                shifted = x.clone()
                shifted[:, 7 * molecule + axis] += k * BOX[axis]
                y_s, logdet_s = flow(shifted)
                assert periodic_difference(parts(y_s, N)[0], parts(y, N)[0]).abs().max() < 1e-10
                assert (parts(y_s, N)[1] - parts(y, N)[1]).abs().max() < 1e-10
                assert (logdet_s - logdet).abs().max() < 1e-10
    shifted = x.clone().reshape(20, N, 7)
    shifted[..., :3] += torch.tensor([2.0, -3.0, 1.0], dtype=F64) * torch.tensor(BOX, dtype=F64)
    z_s, logdet_inv_s = flow.inverse(shifted.reshape(20, 7 * N))
    assert periodic_difference(parts(z_s, N)[0], parts(z, N)[0]).abs().max() < 1e-10
    assert (logdet_inv_s - logdet_inv).abs().max() < 1e-10


def test_fresh_flow_is_near_the_identity():
    torch.manual_seed(0)
    fresh = RigidBodyFlow(16, BOX).double()
    x = configurations(200, 16, seed=16)
    with torch.no_grad():
        y, logdet = fresh(x)
    (c, q), (c_out, q_out) = parts(x, 16), parts(y, 16)
    dc = periodic_difference(c_out, c).abs().max()
    dq = (q_out - q).abs().max()  # the near-identity keeps the sign
    print(f"fresh flow: max |dc| = {float(dc):.2e} nm, max |dq| = {float(dq):.2e}, "
          f"max |log-det| = {float(logdet.abs().max()):.2e} (16 molecules)")
    assert dc < 1e-2 and dq < 1e-2
    # measured 2.8e-1: about 0.01 per molecule and translation layer (the ramp mixtures' ripple at
    # init_floor = 0.9) and 0.0015 per molecule and rotation layer (init_weight = 1e-3), summed
    assert logdet.abs().max() < 0.02 * 16 and logdet.mean().abs() < 0.05


def test_gradients_reach_every_parameter(flow):
    x = configurations(8, N, seed=17)
    flow.zero_grad()
    y, logdet = flow(x)
    (logdet.mean() + y.sum()).backward()
    for name, p in flow.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all() and p.grad.abs().max() > 0, name
    flow.zero_grad()
    # and through the inputs (mapping samples of one state onto another needs dx/dz)
    z = x.clone().requires_grad_(True)
    y, logdet = flow(z)
    (logdet.sum() + y.square().sum()).backward()
    assert torch.isfinite(z.grad).all() and z.grad.abs().max() > 0


def test_float32_round_trip():
    torch.manual_seed(0)
    flow32 = perturb(RigidBodyFlow(N, BOX), seed=1)
    assert next(flow32.parameters()).dtype == torch.float32
    x = configurations(200, N, seed=18, dtype=torch.float32)
    y, logdet = flow32(x)
    assert y.dtype == logdet.dtype == torch.float32
    x_back, logdet_back = flow32.inverse(y)
    assert x_back.dtype == torch.float32
    (c, q), (c_back, q_back) = parts(x, N), parts(x_back, N)
    # float32 rounding in the forward pass, amplified by the inverse's conditioning: typically 5e-6,
    # up to a few 1e-4 on the most distorted configurations of the perturbed flow
    error_q = sign_free_difference(q_back, q).detach()
    assert periodic_difference(c_back, c).abs().max() < 1e-4
    assert error_q.median() < 2e-5 and error_q.max() < 1e-3
    assert (logdet + logdet_back).abs().max() < 2e-3
    # float32 inputs through a float64 flow: the conditioners run in float64, the outputs in float32
    flow64 = perturb(RigidBodyFlow(N, BOX).double(), seed=1)
    y64, _ = flow64(x.double())
    y_mixed, _ = flow64(x)
    assert y_mixed.dtype == torch.float32
    assert periodic_difference(parts(y_mixed, N)[0].double(), parts(y64, N)[0]).abs().max() < 1e-4


def test_bad_inputs_raise_clear_errors(flow):
    x = configurations(4, N, seed=19)
    for bad in (x[:, :-1], x.reshape(4, N, 7), x[0]):
        for fn in (flow.forward, flow.inverse):
            with pytest.raises(ValueError, match=r"\[batch, 7N\] = \[batch, 21\]"):
                fn(bad)
    not_unit = x.clone()
    not_unit[2, 7 + 3:7 + 7] *= 1.01
    for fn in (flow.forward, flow.inverse):
        with pytest.raises(ValueError, match=r"unit quaternions.*molecule 1 of sample 2"):
            fn(not_unit)
    slightly_off = x.clone()
    slightly_off[:, 3:7] *= 1.0005  # within the tolerance of 1e-3
    flow(slightly_off)
    nan = x.clone()
    nan[1, 0] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        flow(nan)
    with pytest.raises(ValueError, match="axis"):
        TranslationCoupling(N, BOX, axis=3)
    with pytest.raises(ValueError, match="box"):
        RigidBodyFlow(N, (1.0, -1.0, 1.0))


def test_anchored_flow_is_equivariant_under_global_translations(anchored, flow):
    """F(x + t) = F(x) + t (mod L) with the same log-det for a shift t of every centre, and the
    anchor molecule's centre is never moved; the flow without an anchor is not equivariant."""
    x = configurations(50, N, seed=13)
    t = torch.rand(50, 1, 3, generator=gen(14), dtype=F64) * torch.tensor(BOX, dtype=F64)
    shifted = x.reshape(50, N, 7).clone()
    shifted[..., :3] += t
    shifted = shifted.reshape(50, 7 * N)
    for direction in ("forward", "inverse"):
        y, logdet = getattr(anchored, direction)(x)
        y_shift, logdet_shift = getattr(anchored, direction)(shifted)
        c, q = parts(y, N)
        c_shift, q_shift = parts(y_shift, N)
        assert periodic_difference(c_shift, c + t).abs().max() < 1e-9
        assert sign_free_difference(q_shift, q).max() < 1e-9
        assert (logdet_shift - logdet).abs().max() < 1e-9
        assert periodic_difference(c[:, 0], parts(x, N)[0][:, 0]).abs().max() < 1e-12  # the anchor stays
    y, _ = flow(x)
    y_shift, _ = flow(shifted)
    assert periodic_difference(parts(y_shift, N)[0], parts(y, N)[0] + t).abs().max() > 1e-3
