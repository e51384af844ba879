"""Flow matching and equivariant OT alignment (bgexp/training/flow_matching.py), and the Kabsch
rotation in any dimension (bgexp/geometry.py)."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("torchdyn", reason="torchdyn is installed with `pip install --no-deps torchdyn==1.0.6`")

from bgexp.flows.cnf import EquivariantCNF  # noqa: E402
from bgexp.flows.priors import MeanFreeNormalPrior  # noqa: E402
from bgexp.geometry import optimal_rotation  # noqa: E402
from bgexp.training.flow_matching import FlowMatchingLoss, align_to, match_batch  # noqa: E402


def random_rotation(d: int, generator: torch.Generator, proper: bool = True) -> torch.Tensor:
    q, r = torch.linalg.qr(torch.randn(d, d, generator=generator, dtype=torch.float64))
    q = q * torch.sign(torch.diagonal(r))
    if proper and torch.linalg.det(q) < 0:
        q[:, 0] = -q[:, 0]
    return q


def mean_free(x: torch.Tensor, n: int, d: int) -> torch.Tensor:
    xyz = x.reshape(x.shape[0], n, d)
    return (xyz - xyz.mean(1, keepdim=True)).reshape(x.shape)


def sorted_distances(x: torch.Tensor, n: int, d: int) -> torch.Tensor:
    xyz = x.reshape(x.shape[0], n, d)
    return torch.cdist(xyz, xyz).reshape(x.shape[0], -1).sort(-1).values


@pytest.mark.parametrize("d", [2, 3, 4])
def test_optimal_rotation_recovers_a_rotation_in_any_dimension(d):
    g = torch.Generator().manual_seed(d)
    x = torch.randn(5, 7, d, generator=g, dtype=torch.float64)
    x = x - x.mean(1, keepdim=True)
    rotations = torch.stack([random_rotation(d, g) for _ in range(5)])
    ref = x @ rotations.transpose(1, 2)
    found = optimal_rotation(x, ref)
    assert torch.allclose(found, rotations, atol=1e-10)
    assert torch.allclose(torch.linalg.det(found), torch.ones(5, dtype=torch.float64), atol=1e-12)


def test_optimal_rotation_never_returns_a_reflection():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(20, 6, 3, generator=g, dtype=torch.float64)
    x = x - x.mean(1, keepdim=True)
    mirrored = x * torch.tensor([-1.0, 1.0, 1.0], dtype=torch.float64)  # only a reflection maps x onto it
    assert torch.allclose(torch.linalg.det(optimal_rotation(x, mirrored)), torch.ones(20, dtype=torch.float64))


@pytest.mark.parametrize("d", [2, 3])
def test_equivariant_alignment_undoes_a_rotation_and_a_permutation(d):
    n, b = 6, 8
    g = torch.Generator().manual_seed(1)
    x0 = mean_free(torch.randn(b, n * d, generator=g, dtype=torch.float64), n, d)
    moved = []
    for row in x0.reshape(b, n, d):
        perm = torch.randperm(n, generator=g)
        moved.append(row[perm] @ random_rotation(d, g).T)
    x1 = torch.stack(moved).reshape(b, n * d)
    aligned = align_to(x0, x1, n, d, "equivariant", iterations=3)
    # x0 = g x1 exactly, so the aligned copy is x0 (the cost is zero only at the true g). With
    # alternation from no rotation alone, 6 of these 8 pairs stall in a local minimum.
    error = (aligned - x0).norm(dim=-1)
    assert (error < 1e-8).all(), error


@pytest.mark.parametrize("alignment", ["rotation", "permutation", "equivariant"])
def test_alignment_only_moves_data_within_its_orbit_and_never_lengthens_the_path(alignment):
    n, d, b = 5, 3, 64
    g = torch.Generator().manual_seed(2)
    x0 = mean_free(torch.randn(b, n * d, generator=g, dtype=torch.float64), n, d)
    x1 = mean_free(2.0 * torch.randn(b, n * d, generator=g, dtype=torch.float64), n, d)
    aligned = align_to(x0, x1, n, d, alignment)
    assert torch.allclose(sorted_distances(aligned, n, d), sorted_distances(x1, n, d), atol=1e-10)
    assert torch.allclose(aligned.reshape(b, n, d).mean(1), torch.zeros(b, d, dtype=torch.float64), atol=1e-12)
    before = ((x1 - x0) ** 2).sum(-1)
    after = ((aligned - x0) ** 2).sum(-1)
    assert (after <= before + 1e-10).all()
    assert after.mean() < 0.9 * before.mean()


def test_minibatch_ot_pairing_is_optimal_and_a_permutation_of_the_batch():
    g = torch.Generator().manual_seed(3)
    x0 = torch.randn(30, 4, generator=g, dtype=torch.float64)
    perm = torch.randperm(30, generator=g)
    x1 = x0[perm] + 1e-3 * torch.randn(30, 4, generator=g, dtype=torch.float64)
    paired = match_batch(x0, x1)
    assert torch.allclose(paired, x0, atol=1e-2)  # each x0 found its own noisy copy
    assert torch.equal(paired.sort(0).values, x1.sort(0).values)
    # and the total cost is no larger than any other pairing (brute force on a small batch)
    import itertools

    a, c = x0[:6], torch.randn(6, 4, generator=g, dtype=torch.float64)
    best = min(((a - c[list(p)]) ** 2).sum() for p in itertools.permutations(range(6)))
    assert math.isclose(float(((a - match_batch(a, c)) ** 2).sum()), float(best), rel_tol=1e-12)


def fake_generator(flow, prior, seed: int = 0):
    """What the loss reads from the Boltzmann generator: prior, flow, the latent generator and the
    target's space (its particles)."""
    from bgexp.spaces import Space

    target = SimpleNamespace(space=Space(flow.dim, particles=flow.n_particles, spatial_dim=flow.spatial_dim))
    return SimpleNamespace(flow=flow, prior=prior, target=target, latent_generator=torch.Generator().manual_seed(seed))


def test_the_loss_is_the_regression_onto_the_straight_path():
    n, d = 4, 2
    torch.manual_seed(0)
    flow = EquivariantCNF(n_particles=n, spatial_dim=d, field="pairwise", hidden=8).double()
    prior = MeanFreeNormalPrior(n, d).double()
    x1 = mean_free(torch.randn(16, n * d, dtype=torch.float64), n, d)
    loss_fn = FlowMatchingLoss(sigma=0.0)
    loss, metrics = loss_fn(fake_generator(flow, prior, seed=5), x1, step=0)
    # the same draws by hand: x0 from the prior, then t, with the same generator
    g = torch.Generator().manual_seed(5)
    x0 = prior.sample(16, generator=g)
    t = torch.rand(16, generator=g, dtype=torch.float64)
    xt = (1 - t[:, None]) * x0 + t[:, None] * x1
    expected = ((flow.velocity(t, xt) - (x1 - x0)) ** 2).mean()
    assert torch.allclose(loss, expected, atol=1e-12)
    assert metrics["flow_matching"] == pytest.approx(float(expected))


def test_per_sample_times_equal_one_call_per_time():
    n, d = 4, 3
    torch.manual_seed(1)
    for field in ("egnn", "pairwise"):
        flow = EquivariantCNF(n_particles=n, spatial_dim=d, field=field, hidden=8).double()
        x = torch.randn(5, n * d, dtype=torch.float64)
        t = torch.rand(5, dtype=torch.float64)
        together = flow.velocity(t, x)
        one_by_one = torch.cat([flow.velocity(t[i], x[i : i + 1]) for i in range(5)])
        assert torch.allclose(together, one_by_one, atol=1e-12)


def test_flow_matching_learns_the_gaussian_to_gaussian_flow():
    """Prior N(0, I) and data N(0, s^2 I) on the mean-free subspace: the marginal field of the
    independent coupling is linear, v(t, x) = c(t) x with c = (t s^2 - (1 - t)) / ((1 - t)^2 + t^2 s^2),
    which the pairwise field can represent exactly. After training, the ODE must carry the prior to
    data of standard deviation s."""
    n, d, s = 4, 2, 2.0
    torch.manual_seed(0)
    flow = EquivariantCNF(n_particles=n, spatial_dim=d, field="pairwise", hidden=16, solver="rk4", steps=20)
    prior = MeanFreeNormalPrior(n, d)
    bg = fake_generator(flow, prior)
    loss_fn = FlowMatchingLoss(sigma=0.0)
    optimizer = torch.optim.Adam(flow.parameters(), lr=3e-3)
    data_generator = torch.Generator().manual_seed(1)
    for _ in range(400):
        x1 = mean_free(s * torch.randn(256, n * d, generator=data_generator), n, d)
        loss, _ = loss_fn(bg, x1, step=0)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    # the learned field against the analytic marginal field
    t = torch.full((512,), 0.5)
    x = mean_free(torch.randn(512, n * d, generator=data_generator) * math.sqrt(0.25 + 0.25 * s**2), n, d)
    c = (0.5 * s**2 - 0.5) / (0.25 + 0.25 * s**2)
    with torch.no_grad():
        field_error = (flow.velocity(t, x) - c * x).pow(2).mean().sqrt() / (c * x).pow(2).mean().sqrt()
        flow.eval()
        samples, _ = flow(prior.sample(2000, generator=data_generator))
    assert field_error < 0.1, field_error
    # per-coordinate variance of a mean-free normal: s^2 (n - 1) / n
    std = samples.std() / math.sqrt((n - 1) / n)
    assert abs(float(std) - s) < 0.1, std


def test_flow_matching_errors_are_clear():
    n, d = 4, 2
    flow = EquivariantCNF(n_particles=n, spatial_dim=d, hidden=4, n_layers=1)
    prior = MeanFreeNormalPrior(n, d)
    with pytest.raises(ValueError, match="alignment"):
        FlowMatchingLoss(alignment="procrustes")
    with pytest.raises(ValueError, match="sigma"):
        FlowMatchingLoss(sigma=-1.0)
    with pytest.raises(ValueError, match="data"):
        FlowMatchingLoss()(fake_generator(flow, prior), None, step=0)
    no_field = SimpleNamespace(flow=torch.nn.Identity(), prior=prior, latent_generator=None)
    with pytest.raises(ValueError, match="continuous flow"):
        FlowMatchingLoss()(no_field, torch.zeros(3, n * d), step=0)
